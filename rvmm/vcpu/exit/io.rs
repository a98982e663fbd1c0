// SPDX-License-Identifier: GPL-2.0

//! Port I/O exits: one element per exit to userspace, string I/O included.

use super::*;

impl VcpuInner {
    pub(super) fn io(&mut self, vmcs: &CurrentVmcs, run: *mut uapi::Run, qual: u64) -> Next {
        let io = IoAccess::decode(qual);
        if io.string {
            return self.string_io(vmcs, run, io);
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

    /// INS/OUTS, one element per exit: a REP prefix re-executes the instruction until
    /// the count runs out, so interrupts and signals get in between elements.
    pub(super) fn string_io(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
        io: IoAccess,
    ) -> Next {
        let info = vmcs.read(ro::VMEXIT_INSTRUCTION_INFO);
        let addr_mask = match (info >> 7) & 7 {
            0 => 0xffff,
            1 => 0xffff_ffff,
            _ => u64::MAX,
        };
        if io.rep && self.gprs.rcx & addr_mask == 0 {
            self.skip_instruction(vmcs);
            return Next::Fast;
        }
        let long = self.efer & EFER_LMA != 0 && vmcs.read(guest::CS_ACCESS_RIGHTS) & (1 << 13) != 0;
        let (base, index) = if io.input {
            (
                if long { 0 } else { vmcs.read(guest::ES_BASE) },
                self.gprs.rdi & addr_mask,
            )
        } else {
            let seg_base = [
                guest::ES_BASE,
                guest::CS_BASE,
                guest::SS_BASE,
                guest::DS_BASE,
                guest::FS_BASE,
                guest::GS_BASE,
            ];
            let seg = ((info >> 15) & 7) as usize;
            let b = vmcs.read(seg_base[seg.min(5)]);
            (
                if long && seg < 4 { 0 } else { b },
                self.gprs.rsi & addr_mask,
            )
        };
        let la = base.wrapping_add(index);
        let ctx = self.perm_ctx(vmcs);
        let access = Access {
            write: io.input,
            user: vmcs.read(guest::SS_ACCESS_RIGHTS) >> 5 & 3 == 3,
            fetch: false,
        };
        let slots = self.slots.clone();
        let gpa = match walker::walk(
            &mut self.walk_mem(&slots),
            self.mode,
            self.cr3,
            la,
            access,
            &ctx,
        ) {
            Ok(w) => w.gpa,
            // Other vCPUs keep changing the entries: the instruction runs again.
            Err(f) if f.raced => return Next::Fast,
            Err(f) => {
                self.cr2 = la;
                return self.inject(vmcs, vector::PF, Some(f.error_code));
            }
        };
        let p = if io.input {
            slots.ptr_mut(gpa, io.size.into())
        } else {
            slots.ptr(gpa, io.size.into())
        };
        let Some(p) = p else {
            // Crossing a page, outside RAM, or INS into a read-only slot: not supported
            // yet.
            return self.internal_error(
                run,
                uapi::RVMM_INTERNAL_EMULATION,
                [30, la, vmcs.read(guest::RIP), 3],
            );
        };
        let step = if vmcs.read(guest::RFLAGS) & (1 << 10) != 0 {
            u64::from(io.size).wrapping_neg()
        } else {
            u64::from(io.size)
        };
        let mut data = 0;
        if io.input {
            self.gprs.rdi =
                (self.gprs.rdi & !addr_mask) | (self.gprs.rdi.wrapping_add(step) & addr_mask);
            self.pending = Pending::StringIn { gpa, size: io.size };
        } else {
            let mut bytes = [0u8; 8];
            // SAFETY: `p` points at `size` bytes of a pinned guest page.
            unsafe { ptr::copy_nonoverlapping(p, bytes.as_mut_ptr(), usize::from(io.size)) };
            data = u64::from_le_bytes(bytes);
            self.gprs.rsi =
                (self.gprs.rsi & !addr_mask) | (self.gprs.rsi.wrapping_add(step) & addr_mask);
        }
        let mut done = true;
        if io.rep {
            let c = (self.gprs.rcx & addr_mask).wrapping_sub(1) & addr_mask;
            self.gprs.rcx = (self.gprs.rcx & !addr_mask) | c;
            done = c == 0;
        }
        if done {
            self.skip_instruction(vmcs);
        }
        self.io_exit(run, io, data)
    }
}
