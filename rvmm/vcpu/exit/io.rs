// SPDX-License-Identifier: GPL-2.0

//! Port I/O exits: one element per exit to userspace. INS and OUTS go through the
//! instruction emulator (segments, page crossing, device memory), one element per run.

use super::*;

impl VcpuInner {
    pub(super) fn io(&mut self, vmcs: &CurrentVmcs, run: *mut uapi::Run, qual: u64) -> Next {
        let io = IoAccess::decode(qual);
        if io.string {
            let cause = emulate::Cause::StringIo {
                port: io.port,
                size: io.size,
                input: io.input,
            };
            return self.emulate_insn(vmcs, run, cause, None);
        }
        let data = if io.input {
            0
        } else {
            self.gprs.rax & ((1u64 << (8 * u32::from(io.size))) - 1)
        };
        let (rip, len) = (
            vmcs.read(guest::RIP),
            vmcs.read(ro::VMEXIT_INSTRUCTION_LEN) as u8,
        );
        self.pending = if io.input {
            Pending::IoIn {
                size: io.size,
                rip,
                len,
            }
        } else {
            Pending::IoOut { rip, len }
        };
        self.io_exit(run, io, data)
    }

    /// Fills the run page for a port I/O exit of one element (`data` for an OUT).
    pub(in crate::vcpu) fn io_exit(
        &mut self,
        run: *mut uapi::Run,
        io: IoAccess,
        data: u64,
    ) -> Next {
        let mut io_data = [0u64; 32];
        io_data[0] = data;
        // SAFETY: our run page.
        unsafe {
            ptr::write_volatile(
                ptr::addr_of_mut!((*run).io),
                uapi::ExitIo {
                    direction: if io.input {
                        uapi::RVMM_EXIT_IO_IN
                    } else {
                        uapi::RVMM_EXIT_IO_OUT
                    },
                    size: io.size,
                    port: io.port,
                    count: 1,
                    data_offset: core::mem::offset_of!(uapi::Run, io_data) as u64,
                },
            );
            ptr::write_volatile(ptr::addr_of_mut!((*run).io_data), io_data);
        }
        self.exit_to_user(run, uapi::RVMM_EXIT_IO)
    }
}
