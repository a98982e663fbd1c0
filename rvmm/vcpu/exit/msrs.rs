// SPDX-License-Identifier: GPL-2.0

//! RDMSR and WRMSR: the MSRs rvmm virtualizes, everything else #GP.

use super::*;
use x86::msr;

impl VcpuInner {
    pub(super) fn rdmsr(&mut self, vmcs: &CurrentVmcs) -> Next {
        if (X2APIC_MSR_BASE..=X2APIC_MSR_END).contains(&(self.gprs.rcx as u32)) {
            self.stats.apic_accesses.inc();
        }
        let Some(v) = self.get_msr(vmcs, self.gprs.rcx as u32) else {
            return self.inject(vmcs, vector::GP, Some(0));
        };
        self.gprs.rax = v & 0xffff_ffff;
        self.gprs.rdx = v >> 32;
        self.skip_instruction(vmcs);
        Next::Fast
    }

    pub(super) fn wrmsr(&mut self, vmcs: &CurrentVmcs) -> Next {
        let v = (self.gprs.rdx << 32) | (self.gprs.rax & 0xffff_ffff);
        let index = self.gprs.rcx as u32;
        if (X2APIC_MSR_BASE..=X2APIC_MSR_END).contains(&index) {
            self.stats.apic_accesses.inc();
        }
        if index == msr::IA32_EFER
            && (v ^ self.efer) & (EFER_NXE | EFER_LME) != 0
            && self.flush_all_step(vmcs) == Some(false)
        {
            // A paging change flushes every PCID's entries: that sync first, in steps
            // (the guest runs WRMSR again).
            return self.sync_pause();
        }
        if !self.set_msr(vmcs, index, v) {
            return self.inject(vmcs, vector::GP, Some(0));
        }
        self.skip_instruction(vmcs);
        match index {
            // Loaded in the CPU for the whole section: update it there too.
            // SAFETY: inside a run section with the guest's context loaded; `v` is canonical
            // (checked by `set_msr`).
            msr::IA32_KERNEL_GSBASE => unsafe { crate::vmx::wrmsr_arch(index, v) },
            // SAFETY: as above; the section loaded the guest's IA32_TSC_AUX (`rdtscp`),
            // and puts the host's back at its end.
            msr::IA32_TSC_AUX => unsafe { crate::vmx::wrmsr_arch(index, v) },
            // Loaded at the section's start: end the section so the next one loads them.
            msr::IA32_STAR | msr::IA32_LSTAR | msr::IA32_CSTAR | msr::IA32_FMASK => {
                return Next::Host
            }
            _ => {}
        }
        Next::Fast
    }

    /// The guest's value of an MSR rvmm virtualizes (VMCS current); `None`: #GP.
    pub(crate) fn get_msr(&self, vmcs: &CurrentVmcs, index: u32) -> Option<u64> {
        Some(match index {
            msr::IA32_EFER => self.efer,
            msr::IA32_FS_BASE => vmcs.read(guest::FS_BASE),
            msr::IA32_GS_BASE => vmcs.read(guest::GS_BASE),
            msr::IA32_KERNEL_GSBASE => self.kernel_gs_base,
            msr::IA32_STAR => self.syscall_msrs[0],
            msr::IA32_LSTAR => self.syscall_msrs[1],
            msr::IA32_CSTAR => self.syscall_msrs[2],
            msr::IA32_FMASK => self.syscall_msrs[3],
            msr::IA32_SYSENTER_CS => vmcs.read(guest::IA32_SYSENTER_CS),
            msr::IA32_SYSENTER_ESP => vmcs.read(guest::IA32_SYSENTER_ESP),
            msr::IA32_SYSENTER_EIP => vmcs.read(guest::IA32_SYSENTER_EIP),
            msr::IA32_PAT => vmcs.read(guest::IA32_PAT_FULL),
            msr::IA32_TIME_STAMP_COUNTER => {
                rdtsc().wrapping_add(vmcs.read(control::TSC_OFFSET_FULL))
            }
            msr::IA32_APIC_BASE => self.apic.as_ref().map_or(0xfee0_0900, |a| a.base_msr()),
            X2APIC_MSR_BASE..=X2APIC_MSR_END if self.apic.is_some() => {
                return self.apic.as_ref()?.rdmsr(index, self.guest_tsc()).ok();
            }
            MSR_TSC_DEADLINE if self.apic.is_some() => self.apic.as_ref()?.tsc_deadline(),
            msr::IA32_MISC_ENABLE => self.misc_enable,
            msr::IA32_TSC_AUX if self.rdtscp => self.tsc_aux,
            msr::IA32_TSC_ADJUST => self.tsc_adjust,
            // IA32_BIOS_SIGN_ID: the microcode revision (none: 0), which Linux writes 0
            // to and reads back after a CPUID.
            IA32_BIOS_SIGN_ID => 0,
            i if rvmm_core::mca::is_mca_msr(i) => return self.mca.rdmsr(i),
            _ => return None,
        })
    }

    /// Sets an MSR for the guest (VMCS current); false if the guest would get #GP.
    pub(crate) fn set_msr(&mut self, vmcs: &CurrentVmcs, index: u32, v: u64) -> bool {
        let canonical = ((v as i64) << 16 >> 16) as u64 == v;
        match index {
            msr::IA32_EFER => {
                let lme_change = (v ^ self.efer) & EFER_LME != 0 && self.cr0 & CR0_PG != 0;
                if v & !rvmm_core::guest_state::EFER_ALLOWED != 0 || lme_change {
                    return false;
                }
                let paging = (v ^ self.efer) & (EFER_NXE | EFER_LME) != 0;
                let need_reset = self.need_reset;
                self.efer = (v & !EFER_LMA) | (self.efer & EFER_LMA);
                self.apply_paging_state(vmcs);
                if paging {
                    self.reset_shadow(vmcs);
                } else {
                    // The root and its rights stay (SCE is not about paging).
                    self.need_reset = need_reset;
                }
            }
            msr::IA32_FS_BASE
            | msr::IA32_GS_BASE
            | msr::IA32_KERNEL_GSBASE
            | msr::IA32_LSTAR
            | msr::IA32_CSTAR
                if !canonical =>
            {
                return false;
            }
            msr::IA32_FS_BASE => vmcs.write(guest::FS_BASE, v),
            msr::IA32_GS_BASE => vmcs.write(guest::GS_BASE, v),
            msr::IA32_KERNEL_GSBASE => self.kernel_gs_base = v,
            msr::IA32_STAR | msr::IA32_LSTAR | msr::IA32_CSTAR | msr::IA32_FMASK => {
                let i = match index {
                    msr::IA32_STAR => 0,
                    msr::IA32_LSTAR => 1,
                    msr::IA32_CSTAR => 2,
                    _ => 3,
                };
                self.syscall_msrs[i] = v;
            }
            msr::IA32_SYSENTER_CS => vmcs.write(guest::IA32_SYSENTER_CS, v),
            msr::IA32_SYSENTER_ESP => vmcs.write(guest::IA32_SYSENTER_ESP, v),
            msr::IA32_SYSENTER_EIP => vmcs.write(guest::IA32_SYSENTER_EIP, v),
            msr::IA32_PAT => {
                // Each byte must be a valid memory type (0, 1, 4, 5, 6, 7).
                if (0..8).any(|i| matches!((v >> (8 * i)) as u8, 2 | 3 | 8..=255)) {
                    return false;
                }
                vmcs.write(guest::IA32_PAT_FULL, v)
            }
            msr::IA32_TIME_STAMP_COUNTER => {
                // IA32_TSC_ADJUST follows a write to the TSC (SDM Vol. 3B, 18.17.3).
                let offset = v.wrapping_sub(rdtsc());
                self.tsc_adjust = self
                    .tsc_adjust
                    .wrapping_add(offset.wrapping_sub(self.tsc_offset));
                self.tsc_offset = offset;
                vmcs.write(control::TSC_OFFSET_FULL, self.tsc_offset);
            }
            msr::IA32_TSC_ADJUST => {
                // Writing it moves the TSC by the difference.
                self.tsc_offset = self
                    .tsc_offset
                    .wrapping_add(v.wrapping_sub(self.tsc_adjust));
                self.tsc_adjust = v;
                vmcs.write(control::TSC_OFFSET_FULL, self.tsc_offset);
            }
            // Bits 63:32 are reserved.
            msr::IA32_TSC_AUX if self.rdtscp && v >> 32 == 0 => self.tsc_aux = v,
            msr::IA32_APIC_BASE if self.apic.is_some() => {
                // What the guest wrote to the page without an exit is the APIC's
                // before the change (a global disable resets the registers).
                self.vapic_pull();
                let m = self.maxphyaddr;
                if self
                    .apic
                    .as_mut()
                    .is_some_and(|a| a.set_base_msr(v, m).is_err())
                {
                    return false;
                }
                self.apic_publish();
                self.vapic_push();
                // The xAPIC page's mapping follows the VM's APICs (a remote flush if
                // it changes; rare: a mode switch).
                if let Some(irq) = self.irq.as_ref() {
                    irq.update_apic_access();
                }
            }
            X2APIC_MSR_BASE..=X2APIC_MSR_END if self.apic.is_some() => {
                let now = self.guest_tsc();
                match self.apic.as_mut().map(|a| a.wrmsr(index, v, now)) {
                    Some(Ok(e)) => self.apic_effect(e),
                    _ => return false,
                }
            }
            MSR_TSC_DEADLINE if self.apic.is_some() => {
                if let Some(a) = self.apic.as_mut() {
                    a.set_tsc_deadline(v);
                }
            }
            // Kept as written (KVM does the same): the guest reads back what it set.
            msr::IA32_MISC_ENABLE => self.misc_enable = v,
            msr::IA32_APIC_BASE | IA32_BIOS_SIGN_ID => {}
            i if rvmm_core::mca::is_mca_msr(i) => return self.mca.wrmsr(i, v).is_ok(),
            _ => return false,
        }
        true
    }
}
