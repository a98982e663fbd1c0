// SPDX-License-Identifier: GPL-2.0

//! The VMCS: making it current (only inside an interrupts-off section), the controls and
//! fixed state a vCPU starts with, and the host state of the CPU and task it runs on.

use rvmm_core::caps::AllowedControls;
use x86::vmx::vmcs::control::{
    EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls,
};
use x86::vmx::vmcs::{control, guest, host};

use super::*;

impl VcpuInner {
    /// Runs `f` with this vCPU's VMCS current (interrupts off) and the guard that makes
    /// it so, then clears it and puts back the VMCS that was current before.
    /// `EIO` if the VMCS cannot be made current: `f` does not run (its VMREADs and
    /// VMWRITEs would go to whatever VMCS is current, perhaps KVM's).
    pub(crate) fn with_vmcs<R>(
        &mut self,
        f: impl FnOnce(&mut Self, &CurrentVmcs) -> R,
    ) -> Result<R> {
        // SAFETY: interrupts stay off until `irq_restore`, so this task stays on this
        // CPU, which is in VMX operation while the module is loaded; our VMCS is not
        // active anywhere (it is VMCLEARed whenever a section ends).
        unsafe {
            let flags = rvmm_irq_save();
            let r = match vmx::CurrentVmcs::load(self.vmcs_pa) {
                Ok(vmcs) => Ok(f(self, &vmcs)),
                Err(_) => Err(EIO),
            };
            rvmm_irq_restore(flags);
            if r.is_err() {
                user_pr!(pr_err, "VMPTRLD of a vCPU's VMCS failed\n");
            }
            r
        }
    }

    pub(super) fn init_vmcs(&mut self) -> Result {
        let caps = vmx::read_caps();
        // Virtual NMIs where VMX has them and NMI-window exiting with them: an NMI for
        // the guest that arrives while its NMI handler runs exits at the handler's IRET.
        let vnmi = AllowedControls(caps.pinbased).supports(PinbasedControls::VIRTUAL_NMIS.bits())
            && AllowedControls(caps.procbased).supports(PrimaryControls::NMI_WINDOW_EXITING.bits());
        let pin = AllowedControls(caps.pinbased).adjust(
            (PinbasedControls::EXTERNAL_INTERRUPT_EXITING | PinbasedControls::NMI_EXITING).bits(),
            PinbasedControls::VMX_PREEMPTION_TIMER.bits()
                | if vnmi {
                    PinbasedControls::VIRTUAL_NMIS.bits()
                } else {
                    0
                },
        );
        // With an APIC and the CPU's TPR shadow, CR8 accesses go to the virtual-APIC
        // page (exiting only when the guest lowers its TPR below a pending interrupt's
        // class); otherwise every CR8 access exits.
        let tpr_shadow = self.apic.is_some()
            && AllowedControls(caps.procbased).supports(PrimaryControls::USE_TPR_SHADOW.bits());
        let cr8 = if tpr_shadow {
            PrimaryControls::USE_TPR_SHADOW
        } else {
            PrimaryControls::CR8_LOAD_EXITING | PrimaryControls::CR8_STORE_EXITING
        };
        let proc = AllowedControls(caps.procbased).adjust(
            (PrimaryControls::HLT_EXITING
                | PrimaryControls::INVLPG_EXITING
                | PrimaryControls::MWAIT_EXITING
                | PrimaryControls::RDPMC_EXITING
                | PrimaryControls::CR3_LOAD_EXITING
                | PrimaryControls::CR3_STORE_EXITING
                | cr8
                | PrimaryControls::MOV_DR_EXITING
                | PrimaryControls::UNCOND_IO_EXITING
                | PrimaryControls::MONITOR_EXITING
                | PrimaryControls::USE_TSC_OFFSETTING
                | PrimaryControls::USE_MSR_BITMAPS)
                .bits(),
            PrimaryControls::SECONDARY_CONTROLS.bits(),
        );
        // Debug controls: the guest's DR7 and DEBUGCTL come from the VMCS at entry and
        // go back to it at exit, never the host's.
        let exit = AllowedControls(caps.exit).adjust(
            (ExitControls::HOST_ADDRESS_SPACE_SIZE
                | ExitControls::SAVE_DEBUG_CONTROLS
                | ExitControls::SAVE_IA32_PAT
                | ExitControls::LOAD_IA32_PAT
                | ExitControls::SAVE_IA32_EFER
                | ExitControls::LOAD_IA32_EFER)
                .bits(),
            0,
        );
        let entry = AllowedControls(caps.entry).adjust(
            (EntryControls::LOAD_IA32_PAT
                | EntryControls::LOAD_IA32_EFER
                | EntryControls::LOAD_DEBUG_CONTROLS)
                .bits(),
            0,
        );
        let (Ok(pin), Ok(proc), Ok(exit), Ok(entry)) = (pin, proc, exit, entry) else {
            user_pr!(pr_err, "this CPU lacks VMX controls rvmm needs (pin {:?}, proc {:?}, exit {:?}, entry {:?})\n", pin, proc, exit, entry);
            return Err(EOPNOTSUPP);
        };
        self.entry_base = entry;
        self.virtual_nmis = pin & PinbasedControls::VIRTUAL_NMIS.bits() != 0;
        if pin & PinbasedControls::VMX_PREEMPTION_TIMER.bits() != 0 {
            // The timer counts down at the TSC rate >> IA32_VMX_MISC[4:0]. A slice is a
            // run section's time budget: where host interrupts do not make the guest
            // exit (Bochs 2.7 with the guest's RFLAGS.IF clear), the timer still ends
            // the section in time.
            // SAFETY: reads a kernel variable.
            let khz = u64::from(unsafe { rvmm_tsc_khz() }).max(1000);
            self.preemption_shift = (caps.misc & 0x1f) as u32;
            self.preemption_quantum = ((khz * super::section::SECTION_BUDGET_US / 1000)
                >> self.preemption_shift)
                .clamp(1, u64::from(u32::MAX));
        }
        self.proc_base = proc;
        // Secondary controls for INVPCID (which then exits, with INVLPG exiting) and
        // RDTSCP (and RDPID: they run in the guest, reading its IA32_TSC_AUX, which the
        // run section switches); without them a guest INVPCID, RDTSCP or RDPID is #UD
        // and CPUID does not show it.
        // With the VM's APIC-access page (the chip decided the CPU has what it takes),
        // xAPIC reads are served from the virtual-APIC page and writes exit as APIC
        // writes (see `Irqchip::update_apic_access` for when the page is mapped).
        let apic_access = self
            .irq
            .as_ref()
            .and_then(|i| i.apic_access_pa())
            .filter(|_| proc & PrimaryControls::USE_TPR_SHADOW.bits() != 0);
        let apicv_bits = if apic_access.is_some() {
            (SecondaryControls::VIRTUALIZE_APIC | SecondaryControls::VIRTUALIZE_APIC_REGISTER)
                .bits()
        } else {
            0
        };
        // And virtual-interrupt delivery where the CPU has it: the APIC's vectors go in
        // without injection or window exits, EOIs without exits (external-interrupt
        // exiting, which it needs, is always on).
        let vid_bit = if apicv_bits != 0 {
            SecondaryControls::VIRTUAL_INTERRUPT_DELIVERY.bits()
        } else {
            0
        };
        let proc2 = if proc & PrimaryControls::SECONDARY_CONTROLS.bits() != 0 {
            AllowedControls(caps.procbased2)
                .adjust(
                    apicv_bits,
                    (SecondaryControls::ENABLE_INVPCID | SecondaryControls::ENABLE_RDTSCP).bits()
                        | if crate::module_parameters::vid.value() {
                            vid_bit
                        } else {
                            0
                        },
                )
                .unwrap_or(0)
        } else {
            0
        };
        self.apicv = apicv_bits != 0 && proc2 & apicv_bits == apicv_bits;
        if self
            .irq
            .as_ref()
            .is_some_and(|i| i.apic_access_pa().is_some())
            && !self.apicv
        {
            // The VM maps its xAPIC page to the APIC-access page, which this vCPU's CPU
            // would not virtualize: it would read and write that page itself.
            user_pr!(
                pr_err,
                "vcpu {}: this CPU cannot virtualize APIC accesses as the VM's first CPU did; load rvmm with apicv=0\n",
                self.vcpu_id
            );
            return Err(EOPNOTSUPP);
        }
        self.vid = self.apicv && vid_bit != 0 && proc2 & vid_bit != 0;
        self.invpcid = proc2 & SecondaryControls::ENABLE_INVPCID.bits() != 0;
        // The host must have RDTSCP for its IA32_TSC_AUX to exist.
        self.rdtscp = proc2 & SecondaryControls::ENABLE_RDTSCP.bits() != 0
            && core::arch::x86_64::__cpuid(0x8000_0001).edx & rvmm_core::cpuid::EXT_EDX_RDTSCP != 0;
        let mut vapic_pa = 0;
        if proc & PrimaryControls::USE_TPR_SHADOW.bits() != 0 {
            let page = Page::alloc_page(crate::vm_gfp() | __GFP_ZERO)?;
            // SAFETY: a page we own.
            vapic_pa = unsafe { rvmm_page_to_phys(page.as_ptr().cast()) };
            // SAFETY: the page is in the direct map for as long as we own it; byte 0x80
            // is VTPR (SDM 30.1.1).
            self.vapic_tpr = unsafe { rvmm_pa_to_va(vapic_pa).cast::<u8>().add(0x80) } as usize;
            self.vapic = Some(page);
        }
        self.with_vmcs(|g, vmcs| {
            if vapic_pa != 0 {
                vmcs.write(control::VIRT_APIC_ADDR_FULL, vapic_pa);
                vmcs.write(control::TPR_THRESHOLD, 0);
            }
            if let (true, Some(pa)) = (g.apicv, apic_access) {
                vmcs.write(control::APIC_ACCESS_ADDR_FULL, pa);
            }
            if g.vid {
                // No EOI exits: level-triggered EOIs have no listener yet (see
                // `apic_effect`).
                for f in [
                    control::EOI_EXIT0_FULL,
                    control::EOI_EXIT1_FULL,
                    control::EOI_EXIT2_FULL,
                    control::EOI_EXIT3_FULL,
                ] {
                    vmcs.write(f, 0);
                }
                vmcs.write(guest::INTERRUPT_STATUS, 0);
                g.vid_status = 0;
            }
            if proc & PrimaryControls::SECONDARY_CONTROLS.bits() != 0 {
                vmcs.write(control::SECONDARY_PROCBASED_EXEC_CONTROLS, proc2.into());
            }
            vmcs.write(control::PINBASED_EXEC_CONTROLS, pin.into());
            vmcs.write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, proc.into());
            vmcs.write(control::VMEXIT_CONTROLS, exit.into());
            vmcs.write(control::VMENTRY_CONTROLS, entry.into());
            // #MC always exits: a machine check belongs to the host (SDM 27.1: it goes
            // to the guest otherwise).
            vmcs.write(control::EXCEPTION_BITMAP, EXCEPTION_BITMAP);
            vmcs.write(control::TSC_OFFSET_FULL, 0);
            vmcs.write(control::MSR_BITMAPS_ADDR_FULL, g.msr_bitmap_pa);
            vmcs.write(control::PAGE_FAULT_ERR_CODE_MASK, 0);
            vmcs.write(control::PAGE_FAULT_ERR_CODE_MATCH, 0);
            vmcs.write(control::CR3_TARGET_COUNT, 0);
            vmcs.write(control::CR0_GUEST_HOST_MASK, !0);
            vmcs.write(control::CR4_GUEST_HOST_MASK, !0);
            vmcs.write(control::VMEXIT_MSR_STORE_COUNT, 0);
            vmcs.write(control::VMEXIT_MSR_LOAD_COUNT, 0);
            vmcs.write(control::VMENTRY_MSR_LOAD_COUNT, 0);
            vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
            vmcs.write(guest::LINK_PTR_FULL, !0);
            vmcs.write(guest::DR7, 0x400);
            // Reset values (a VMCS field never written holds whatever the CPU left).
            vmcs.write(guest::IA32_DEBUGCTL_FULL, 0);
            vmcs.write(guest::IA32_SYSENTER_CS, 0);
            vmcs.write(guest::IA32_SYSENTER_ESP, 0);
            vmcs.write(guest::IA32_SYSENTER_EIP, 0);
            vmcs.write(guest::IA32_PAT_FULL, 0x0007_0406_0007_0406);
            vmcs.write(guest::ACTIVITY_STATE, 0);
            vmcs.write(guest::INTERRUPTIBILITY_STATE, 0);
            vmcs.write(guest::PENDING_DBG_EXCEPTIONS, 0);
            // Host state that does not change between CPUs or entries.
            let (cs, ss): (u16, u16);
            // SAFETY: reading CS and SS.
            unsafe { core::arch::asm!("mov {0:x}, cs", "mov {1:x}, ss", out(reg) cs, out(reg) ss, options(nomem, nostack)) };
            let cr0: u64;
            // SAFETY: reading CR0.
            unsafe { core::arch::asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack)) };
            vmcs.write(host::CR0, cr0);
            vmcs.write(host::CS_SELECTOR, cs.into());
            vmcs.write(host::SS_SELECTOR, ss.into());
            vmcs.write(host::DS_SELECTOR, 0);
            vmcs.write(host::ES_SELECTOR, 0);
            vmcs.write(host::FS_SELECTOR, 0);
            vmcs.write(host::GS_SELECTOR, 0);
            vmcs.write(host::TR_SELECTOR, vmx::host_tr().into());
            vmcs.write(host::IA32_PAT_FULL, vmx::rdmsr_arch(msr::IA32_PAT));
            vmcs.write(host::IA32_EFER_FULL, vmx::rdmsr_arch(msr::IA32_EFER));
            vmcs.write(host::IA32_SYSENTER_CS, vmx::rdmsr_arch(msr::IA32_SYSENTER_CS));
            vmcs.write(host::RIP, vmx::host_rip());
            // A flat 32-bit protected-mode guest with paging off; userspace sets the rest.
            let code = uapi::Segment { limit: 0xffff_ffff, selector: 8, seg_type: 0xb, present: 1, s: 1, db: 1, g: 1, ..Default::default() };
            let data = uapi::Segment { selector: 0x10, seg_type: 0x3, ..code };
            let tr = uapi::Segment { limit: 0x67, seg_type: 0xb, present: 1, ..Default::default() };
            let ldt = uapi::Segment { unusable: 1, ..Default::default() };
            let sregs = uapi::Sregs {
                cs: code,
                ds: data,
                es: data,
                fs: data,
                gs: data,
                ss: data,
                tr,
                ldt,
                cr0: CR0_PE | (1 << 4),
                ..Default::default()
            };
            let _ = g.set_sregs(vmcs, &sregs);
            g.set_regs(vmcs, &uapi::Regs { rflags: 2, ..Default::default() });
        })?;
        Ok(())
    }

    /// Host state that depends on the CPU or the task.
    pub(super) fn write_host_state(&self, vmcs: &CurrentVmcs) {
        let gdt = vmx::host_gdt_base();
        // SAFETY: reading CR3 and the CR4 shadow of this CPU.
        let (cr3, cr4) = unsafe { (rvmm_read_cr3(), cr4_read_shadow() as u64) };
        vmcs.write(host::CR3, cr3);
        vmcs.write(host::CR4, cr4);
        vmcs.write(host::FS_BASE, vmx::rdmsr_arch(msr::IA32_FS_BASE));
        vmcs.write(host::GS_BASE, vmx::rdmsr_arch(msr::IA32_GS_BASE));
        vmcs.write(host::TR_BASE, vmx::host_tss_base(gdt, vmx::host_tr()));
        vmcs.write(host::GDTR_BASE, gdt);
        vmcs.write(host::IDTR_BASE, vmx::host_idt_base());
        vmcs.write(
            host::IA32_SYSENTER_ESP,
            vmx::rdmsr_arch(msr::IA32_SYSENTER_ESP),
        );
        vmcs.write(
            host::IA32_SYSENTER_EIP,
            vmx::rdmsr_arch(msr::IA32_SYSENTER_EIP),
        );
    }
}
