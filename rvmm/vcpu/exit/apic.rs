// SPDX-License-Identifier: GPL-2.0

//! APIC-access exits: an access to the xAPIC page that VMX's APIC-register
//! virtualization does not serve (the timer's current count, PPR, a write of another
//! size than 32 bits, ...). The emulator carries out the instruction against the APIC
//! model, as it does for the page without APIC virtualization. (APIC writes, the
//! trap-like exits, are `lapic::apic_write`.)

use rvmm_core::exit::ApicAccessQual;

use super::*;

impl VcpuInner {
    pub(super) fn apic_access(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
        qual: u64,
    ) -> Next {
        match ApicAccessQual::decode(qual) {
            ApicAccessQual::Read(_) | ApicAccessQual::Write(_) => {
                self.emulate_insn(vmcs, run, emulate::Cause::Mmio, None)
            }
            // Code on the page, or an event whose delivery touched it (its IDT, stack
            // or TSS there): nothing the emulator runs, as for any device memory.
            _ => {
                self.mmio_reads.clear();
                self.internal_error(
                    run,
                    uapi::RVMM_INTERNAL_EMULATION,
                    [
                        ExitReason::ApicAccess as u64,
                        qual,
                        vmcs.read(guest::RIP),
                        0,
                    ],
                )
            }
        }
    }
}
