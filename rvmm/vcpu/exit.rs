// SPDX-License-Identifier: GPL-2.0

//! VM-exit handlers: one per exit reason, called with the vCPU's VMCS current and
//! interrupts off. They allocate nothing and never sleep.

use core::ptr;

use rvmm_core::apic::{MSR_TSC_DEADLINE, X2APIC_MSR_BASE, X2APIC_MSR_END};
use rvmm_core::exit::{
    combine_exceptions, intr, vector, CrAccess, ExitReason, IoAccess, MemOperand,
    EXIT_REASON_FAILED_ENTRY,
};
use rvmm_core::mmu::mode::*;
use rvmm_core::mmu::pool::{Fix as PoolFix, SYNC_BUDGET};
use rvmm_core::mmu::{walker, Access, GuestMemory, PermCtx};
use rvmm_uapi as uapi;
use x86::bits64::rflags::RFlags;
use x86::vmx::vmcs::control::PrimaryControls;
use x86::vmx::vmcs::{control, guest, ro};

use super::{Next, Pending, RootLoad, VcpuInner};
use crate::ffi::*;
use crate::mmu::GuestMem;
use crate::vmx::CurrentVmcs;

/// IA32_MISC_ENABLE at reset: fast strings on, branch trace store and PEBS unavailable
/// (bits 0, 11 and 12; rvmm has no BTS or PEBS).
pub(super) const MISC_ENABLE_RESET: u64 = (1 << 0) | (1 << 11) | (1 << 12);
/// IA32_DEBUGCTL.BTF: single-step on branches.
const DEBUGCTL_BTF: u64 = 1 << 1;
/// The pending-debug-exceptions field's BS bit: a single-step trap (SDM Vol. 3C, 25.4.2).
const PENDING_DBG_BS: u64 = 1 << 14;

mod apic;
mod emulate;
mod io;
mod msrs;
mod paging;
mod task;

pub(in crate::vcpu) use emulate::{guest_mode, Cause, GuestEnv};
pub(crate) use emulate::{MmioReads, PORT_KEY};

/// Basic exit reason 41: a machine-check event during VM entry (SDM C).
const EXIT_REASON_MACHINE_CHECK: u16 = 41;

/// IA32_BIOS_SIGN_ID (microcode update signature).
const IA32_BIOS_SIGN_ID: u32 = 0x8b;

/// The host's TSC.
pub(super) fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

impl VcpuInner {
    pub(super) fn handle_exit(&mut self, vmcs: &CurrentVmcs, run: *mut uapi::Run, id: u32) -> Next {
        let reason = vmcs.read(ro::EXIT_REASON) as u32;
        let basic = reason as u16;
        // The guest's MOV CR8 writes went to the virtual-APIC page: the APIC's TPR first.
        if self.vapic_tpr != 0 {
            self.tpr_from_vapic();
            if self.vid {
                self.vid_pull(vmcs);
            }
        }
        if let Some(n) = self.stats.exits.get(usize::from(basic)) {
            n.inc();
        }
        if reason & EXIT_REASON_FAILED_ENTRY != 0 {
            if basic == EXIT_REASON_MACHINE_CHECK {
                // SAFETY: as for a #MC exit: the host handles it.
                unsafe { rvmm_machine_check() };
            }
            self.fail_entry(run, reason.into(), false);
            user_pr!(
                pr_info,
                "vcpu {}: VM entry failed, exit reason {:#x}, qualification {:#x}\n",
                id,
                reason,
                vmcs.read(ro::EXIT_QUALIFICATION)
            );
            return Next::User;
        }
        // An event whose delivery the exit interrupted is delivered again on entry.
        // Not in rvmm's vm86, where nothing is delivered through the IDT: what a CPU
        // may report there is the guest's INT n refused for IOPL (the #GP that exited),
        // which the emulator carries out through the IVT.
        let mut idt = vmcs.read(ro::IDT_VECTORING_INFO) as u32;
        if self.vid {
            idt = self.vid_vectoring(vmcs, idt);
        }
        // Nor for a task switch through a task gate, which delivers that event itself.
        if !self.real.vm86 && basic != ExitReason::TaskSwitch as u16 {
            Self::requeue_event(vmcs, idt);
        }
        // (Otherwise nothing to do: a VM exit clears the valid bit of the VM-entry
        // interruption information, SDM 27.2.)
        let next = self.dispatch(vmcs, run, id, basic);
        if core::mem::take(&mut self.triple_fault) {
            return self.exit_to_user(run, uapi::RVMM_EXIT_SHUTDOWN);
        }
        next
    }

    fn dispatch(&mut self, vmcs: &CurrentVmcs, run: *mut uapi::Run, id: u32, basic: u16) -> Next {
        use ExitReason::*;
        // The exit qualification, read only by the exits that have one.
        let qual = || vmcs.read(ro::EXIT_QUALIFICATION);
        match ExitReason::from_basic(basic) {
            Some(ExceptionNmi) => self.exception_or_nmi(vmcs, run, qual()),
            // Interrupts for the host exit here whatever the guest's RFLAGS.IF, as the SDM
            // says. (Bochs 2.7 does not while the guest has IF = 0: there the preemption
            // timer gives the CPU back.)
            // The APIC timer's deadline cut the slice short: its interrupt goes in now.
            Some(PreemptionTimer)
                if self
                    .apic
                    .as_ref()
                    .and_then(|a| a.timer_deadline())
                    .is_some_and(|d| d <= self.guest_tsc()) =>
            {
                Next::Fast
            }
            Some(ExternalInterrupt) | Some(PreemptionTimer) => Next::Host,
            // The guest lowered its TPR below a pending interrupt's class: it goes in
            // before the next entry.
            Some(TprBelowThreshold) => Next::Fast,
            Some(ApicWrite) => self.apic_write(rvmm_core::exit::apic_write_offset(qual())),
            Some(ApicAccess) => self.apic_access(vmcs, run, qual()),
            Some(TripleFault) => self.exit_to_user(run, uapi::RVMM_EXIT_SHUTDOWN),
            Some(Cpuid) => self.cpuid(vmcs),
            Some(TaskSwitch) => self.task_switch(vmcs, run, qual()),
            Some(Hlt) => {
                self.skip_instruction(vmcs);
                self.hlt(vmcs, run)
            }
            Some(Invlpg) => self.invlpg(vmcs, run, qual()),
            Some(Invpcid) => self.invpcid(vmcs, run, qual()),
            Some(Vmcall) => self.vmcall(vmcs, run),
            Some(CrAccess) => self.cr_access(vmcs, run, qual()),
            Some(DrAccess) => self.dr_access(vmcs, qual()),
            Some(Io) => self.io(vmcs, run, qual()),
            Some(Rdmsr) => self.rdmsr(vmcs),
            Some(Wrmsr) => self.wrmsr(vmcs),
            Some(InterruptWindow) => self.interrupt_window(vmcs, run),
            // The guest can take the NMI that waited: it goes in before the next entry.
            Some(NmiWindow) => {
                self.set_nmi_window_exiting(vmcs, false);
                Next::Fast
            }
            Some(Xsetbv) => self.xsetbv(vmcs),
            Some(Invd) | Some(Wbinvd) | Some(Pause) => {
                self.skip_instruction(vmcs);
                Next::Fast
            }
            Some(
                Vmclear | Vmlaunch | Vmptrld | Vmptrst | Vmread | Vmresume | Vmwrite | Vmxoff
                | Vmxon | Invept | Invvpid | Vmfunc | Mwait | Monitor | Rdpmc | Rdtscp,
            ) => self.inject(vmcs, vector::UD, None),
            _ => {
                let qual = qual();
                user_pr!(
                    pr_info,
                    "vcpu {}: unhandled VM exit {} (qualification {:#x}) at RIP {:#x}\n",
                    id,
                    basic,
                    qual,
                    vmcs.read(guest::RIP)
                );
                self.internal_error(
                    run,
                    uapi::RVMM_INTERNAL_UNHANDLED_EXIT,
                    [basic.into(), qual, vmcs.read(guest::RIP), 0],
                )
            }
        }
    }

    /// The event whose delivery the exit interrupted (IDT-vectoring information `idt`,
    /// if valid) goes in again at the next entry.
    #[inline]
    pub(super) fn requeue_event(vmcs: &CurrentVmcs, idt: u32) {
        if idt & intr::VALID == 0 {
            return;
        }
        vmcs.write(
            control::VMENTRY_INTERRUPTION_INFO_FIELD,
            u64::from(idt & !intr::NMI_UNBLOCK),
        );
        if idt & intr::HAS_ERROR_CODE != 0 {
            vmcs.write(
                control::VMENTRY_EXCEPTION_ERR_CODE,
                vmcs.read(ro::IDT_VECTORING_ERR_CODE),
            );
        }
        vmcs.write(
            control::VMENTRY_INSTRUCTION_LEN,
            vmcs.read(ro::VMEXIT_INSTRUCTION_LEN),
        );
    }

    pub(super) fn exit_to_user(&mut self, run: *mut uapi::Run, reason: u32) -> Next {
        // SAFETY: our run page.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).exit_reason), reason) };
        Next::User
    }

    /// Advances RIP past the exiting instruction; STI/MOV SS blocking ends with it.
    fn skip_instruction(&mut self, vmcs: &CurrentVmcs) {
        self.retire(
            vmcs,
            vmcs.read(guest::RIP),
            vmcs.read(ro::VMEXIT_INSTRUCTION_LEN),
        );
    }

    /// Completes an instruction of `len` bytes at `rip` that the hypervisor carried
    /// out, as the CPU completes one: RIP moves past it, a blocking by STI or MOV SS
    /// that covered it ends (SDM Vol. 3A, 6.8.3), RFLAGS.RF is cleared, and with
    /// RFLAGS.TF a single-step #DB is pending (DR6.BS; not under DEBUGCTL.BTF, which
    /// traps on branches only: Vol. 3B, 18.4.3).
    pub(super) fn retire(&mut self, vmcs: &CurrentVmcs, rip: u64, len: u64) {
        self.retire_to(vmcs, self.rip_after(vmcs, rip, len));
    }

    /// Completes an instruction the host carried out, as `retire` does, with RIP
    /// moving to `next` (the emulator's, which may be a branch target).
    pub(super) fn retire_to(&mut self, vmcs: &CurrentVmcs, next: u64) {
        let tf = vmcs.read(guest::RFLAGS) & RFlags::FLAGS_TF.bits() != 0;
        self.retire_to_tf(vmcs, next, tf);
    }

    /// `retire_to` for an instruction that started with RFLAGS.TF = `tf`.
    pub(super) fn retire_to_tf(&mut self, vmcs: &CurrentVmcs, next: u64, tf: bool) {
        vmcs.write(guest::RIP, next);
        let intr_state = vmcs.read(guest::INTERRUPTIBILITY_STATE);
        if intr_state & 3 != 0 {
            vmcs.write(guest::INTERRUPTIBILITY_STATE, intr_state & !3);
        }
        let rflags = RFlags::from_bits_truncate(vmcs.read(guest::RFLAGS));
        if rflags.contains(RFlags::FLAGS_RF) {
            vmcs.write(guest::RFLAGS, (rflags - RFlags::FLAGS_RF).bits());
        }
        if tf && vmcs.read(guest::IA32_DEBUGCTL_FULL) & DEBUGCTL_BTF == 0 {
            let pending = vmcs.read(guest::PENDING_DBG_EXCEPTIONS);
            vmcs.write(guest::PENDING_DBG_EXCEPTIONS, pending | PENDING_DBG_BS);
        }
    }

    /// Whether the guest runs 64-bit code (IA-32e mode and CS.L).
    pub(super) fn long_mode_code(&self, vmcs: &CurrentVmcs) -> bool {
        self.efer & EFER_LMA != 0 && vmcs.read(guest::CS_ACCESS_RIGHTS) & (1 << 13) != 0
    }

    /// RIP after an instruction of `len` bytes at `rip`: it wraps at 64 bits in 64-bit
    /// code and at 32 bits otherwise (SDM Vol. 1, 3.5), whatever RIP the guest chose.
    pub(super) fn rip_after(&self, vmcs: &CurrentVmcs, rip: u64, len: u64) -> u64 {
        let next = rip.wrapping_add(len);
        if self.long_mode_code(vmcs) {
            next
        } else {
            next & 0xffff_ffff
        }
    }

    /// Queues a hardware exception for the next entry, folding it with an event that
    /// was being delivered (double fault, or shutdown on a triple fault).
    pub(super) fn inject(&mut self, vmcs: &CurrentVmcs, vec: u8, error_code: Option<u32>) -> Next {
        let pending = vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32;
        let (vec, error_code) =
            if pending & intr::VALID != 0 && pending & intr::TYPE_MASK == intr::TYPE_HW_EXCEPTION {
                match combine_exceptions(intr::vector(pending), vec) {
                    Some(vector::DF) if vec != vector::DF => (vector::DF, Some(0)),
                    Some(v) => (v, error_code),
                    None => {
                        // A fault while delivering #DF: the processor would shut down.
                        vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
                        self.triple_fault = true;
                        return Next::User;
                    }
                }
            } else {
                (vec, error_code)
            };
        let mut info = intr::VALID | intr::TYPE_HW_EXCEPTION | u32::from(vec);
        // A fault pushes RFLAGS with RF set (SDM 6.13, 18.3.1.1), so that the faulting
        // instruction, restarted by IRET, does not trigger its instruction breakpoint
        // again; the processor does that for what it delivers itself, rvmm for what
        // it injects.
        if vector::is_fault(vec) {
            vmcs.write(guest::RFLAGS, vmcs.read(guest::RFLAGS) | (1 << 16));
        }
        if let Some(ec) = error_code.filter(|_| vector::has_error_code(vec)) {
            info |= intr::HAS_ERROR_CODE;
            vmcs.write(control::VMENTRY_EXCEPTION_ERR_CODE, ec.into());
        }
        vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info.into());
        Next::Fast
    }

    fn exception_or_nmi(&mut self, vmcs: &CurrentVmcs, run: *mut uapi::Run, qual: u64) -> Next {
        let info = vmcs.read(ro::VMEXIT_INTERRUPTION_INFO) as u32;
        if info & intr::TYPE_MASK == intr::TYPE_NMI {
            // SAFETY: hands the host's NMI back to the host.
            unsafe { rvmm_reraise_nmi() };
            return Next::Host;
        }
        let vec = intr::vector(info);
        if vec == vector::MC {
            // SAFETY: the host's machine-check handling, for a #MC that hit the guest.
            unsafe { rvmm_machine_check() };
            return Next::Host;
        }
        // A fault in the guest's IRET unblocked virtual NMIs; IRET runs again later, so
        // they are blocked until then (SDM 28.2.3).
        if self.virtual_nmis && info & intr::NMI_UNBLOCK != 0 {
            let s = vmcs.read(guest::INTERRUPTIBILITY_STATE);
            vmcs.write(guest::INTERRUPTIBILITY_STATE, s | 8);
        }
        if self.real.vm86 && vec != vector::PF {
            return self.vm86_exception(vmcs, run, info);
        }
        let ec = (info & intr::HAS_ERROR_CODE != 0)
            .then(|| vmcs.read(ro::VMEXIT_INTERRUPTION_ERR_CODE) as u32);
        if vec == vector::PF {
            return self.page_fault(vmcs, run, qual, ec.unwrap_or(0));
        }
        // Only #PF is intercepted; anything else belongs to the guest.
        self.inject(vmcs, vec, ec)
    }

    pub(super) fn perm_ctx(&self, vmcs: &CurrentVmcs) -> PermCtx {
        PermCtx {
            wp: self.cr0 & CR0_WP != 0,
            smep: self.cr4 & CR4_SMEP != 0,
            smap: self.cr4 & CR4_SMAP != 0,
            ac: vmcs.read(guest::RFLAGS) & (1 << 18) != 0,
            nxe: self.efer & EFER_NXE != 0,
            gbpages: self.gbpages,
            maxphyaddr: self.maxphyaddr,
        }
    }

    // Inlined into the exit loop, as the hottest exits are: a call here costs tens of
    // instructions per exit (Bochs' `make bench` counts them).
    #[inline(always)]
    fn cpuid(&mut self, vmcs: &CurrentVmcs) -> Next {
        let (leaf, sub) = (self.gprs.rax as u32, self.gprs.rcx as u32);
        let [a, b, c, d] = self.cpuid_values(leaf, sub);
        self.gprs.rax = a.into();
        self.gprs.rbx = b.into();
        self.gprs.rcx = c.into();
        self.gprs.rdx = d.into();
        self.skip_instruction(vmcs);
        Next::Fast
    }

    /// The guest's CPUID leaf `leaf`, sub-leaf `sub`.
    #[inline]
    pub(super) fn cpuid_values(&self, leaf: u32, sub: u32) -> [u32; 4] {
        let cached = match leaf {
            0..=0x15 if super::CPUID_CACHEABLE >> leaf & 1 != 0 => {
                self.cpuid_basic.get(leaf as usize)
            }
            0x8000_0000..=0x8000_0008 => self.cpuid_ext.get((leaf - 0x8000_0000) as usize),
            _ => None,
        };
        let [a, b, mut c, d] = match cached {
            Some(&v) if self.cpuid.is_empty() => v,
            _ => self.cpuid_slow(leaf, sub),
        };
        if leaf == 1 && self.cr4 & (1 << 18) != 0 && self.xsave {
            c |= 1 << 27;
        }
        [a, b, c, d]
    }

    /// CPUID leaves with subleaves or state (and any leaf while userspace has set
    /// entries): the host's answer through the policy, then userspace's entries.
    #[cold]
    #[inline(never)]
    /// What the guest's CPUID says of its paging: 1-GiB pages (leaf 0x80000001, EDX bit
    /// 26) and MAXPHYADDR (leaf 0x80000008, EAX bits 7:0; no more than the host's, and
    /// 36 where the leaf says 0).
    pub(super) fn cpuid_paging(&mut self) {
        self.gbpages = self.cpuid_slow(0x8000_0001, 0)[3] & rvmm_core::cpuid::EXT_EDX_PAGE1GB != 0;
        let m = (self.cpuid_slow(0x8000_0008, 0)[0] & 0xff) as u8;
        let m = if m == 0 { 36 } else { m.max(32) };
        self.maxphyaddr = m.min(self.host_maxphyaddr);
    }

    pub(super) fn cpuid_slow(&self, leaf: u32, sub: u32) -> [u32; 4] {
        let r = core::arch::x86_64::__cpuid_count(leaf, sub);
        let mut v = rvmm_core::cpuid::guest(
            leaf,
            sub,
            [r.eax, r.ebx, r.ecx, r.edx],
            &rvmm_core::cpuid::Config {
                osxsave: self.cr4 & (1 << 18) != 0,
                xcr0: self.xcr0,
                ..self.cpuid_cfg
            },
        );
        // Entries userspace set win; VMX stays hidden (rvmm does not nest).
        let found = self.cpuid.iter().find(|e| {
            e.function == leaf
                && (e.flags & uapi::RVMM_CPUID_SIGNIFICANT_INDEX == 0 || e.index == sub)
        });
        if let Some(e) = found {
            v = [e.eax, e.ebx, e.ecx, e.edx];
            if leaf == 1 {
                v[2] &= !(1 << 5);
            }
        }
        v
    }

    /// What the guest's CPUID shows beyond the host's bits.
    pub(super) fn cpuid_config(&self) -> rvmm_core::cpuid::Config {
        rvmm_core::cpuid::Config {
            xsave: self.xsave,
            osxsave: self.cr4 & (1 << 18) != 0,
            xcr0: self.xcr0,
            xcr0_supported: super::GUEST_XCR0_SUPPORTED,
            apic: self.apic.is_some(),
            apic_id: self.vcpu_id,
            invpcid: self.invpcid,
            rdtscp: self.rdtscp,
            tsc_khz: self.tsc_khz,
            host_max_basic: self.host_max_basic,
        }
    }

    /// VMCALL: to userspace if it asked for this hypercall (`RVMM_SET_HYPERCALL_EXITS`),
    /// else an error in RAX, in the kernel and without a log line (KVM's -KVM_ENOSYS,
    /// -KVM_EPERM outside ring 0): a guest that probes hypercalls costs one exit each.
    fn vmcall(&mut self, vmcs: &CurrentVmcs, run: *mut uapi::Run) -> Next {
        let nr = self.gprs.rax;
        let cpl0 = vmcs.read(guest::SS_ACCESS_RIGHTS) >> 5 & 3 == 0;
        let asked = self
            .hypercall_exits
            .load(core::sync::atomic::Ordering::Relaxed);
        let exits = nr < 64 && asked & (1 << nr) != 0;
        if !cpl0 || !exits {
            self.gprs.rax = if cpl0 {
                uapi::RVMM_HC_ENOSYS
            } else {
                uapi::RVMM_HC_EPERM
            };
            self.skip_instruction(vmcs);
            return Next::Fast;
        }
        let g = &self.gprs;
        // SAFETY: our run page.
        unsafe {
            ptr::write_volatile(
                ptr::addr_of_mut!((*run).hypercall),
                uapi::ExitHypercall {
                    nr: g.rax,
                    args: [g.rbx, g.rcx, g.rdx, g.rsi, g.rdi, g.r8],
                    ret: 0,
                },
            );
        }
        self.pending = Pending::Hypercall;
        self.skip_instruction(vmcs);
        self.exit_to_user(run, uapi::RVMM_EXIT_HYPERCALL)
    }

    fn gpr(&self, vmcs: &CurrentVmcs, n: u8) -> u64 {
        self.gprs.get(n, vmcs.read(guest::RSP))
    }

    fn set_gpr(&mut self, vmcs: &CurrentVmcs, n: u8, v: u64) {
        if !self.gprs.set(n, v) {
            vmcs.write(guest::RSP, v);
        }
    }

    #[inline(always)]
    fn cr_access(&mut self, vmcs: &CurrentVmcs, run: *mut uapi::Run, qual: u64) -> Next {
        match CrAccess::decode(qual) {
            CrAccess::MovTo { cr, gpr } => {
                if let Err(n) = self.write_cr(vmcs, run, cr, self.gpr(vmcs, gpr)) {
                    return n;
                }
            }
            CrAccess::MovFrom { cr: 8, gpr } => {
                let v = self
                    .apic
                    .as_ref()
                    .map_or(self.cr8, |a| u64::from(a.tpr() >> 4));
                self.set_gpr(vmcs, gpr, v);
            }
            CrAccess::MovFrom { cr: 3, gpr } => self.set_gpr(vmcs, gpr, self.cr3),
            CrAccess::Clts => {
                self.cr0 &= !(1 << 3);
                self.apply_paging_state(vmcs);
                self.need_reset = false;
            }
            CrAccess::Lmsw { value } => {
                let v = (self.cr0 & !0xe) | u64::from(value & 0xf) | (self.cr0 & 1);
                if let Err(n) = self.set_cr0(vmcs, run, v) {
                    return n;
                }
            }
            _ => return self.inject(vmcs, vector::UD, None),
        }
        self.skip_instruction(vmcs);
        Next::Fast
    }

    /// MOV to CR0, CR2, CR3, CR4 or CR8 of `v` (the register's 64 bits): the checks,
    /// then the change. `Err` is what the guest gets instead (an exception, or the
    /// instruction running again while a flush goes on in steps); the caller retires
    /// the instruction on `Ok`.
    #[inline(always)]
    pub(super) fn write_cr(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
        cr: u8,
        v: u64,
    ) -> Result<(), Next> {
        // IA-32e mode decides the CR rules; 64-bit code (CS.L) the operand's width: in
        // compatibility mode MOV to CR moves 32 bits (SDM Vol. 2B, MOV Control Regs).
        let long = self.efer & EFER_LMA != 0;
        let wide = self.long_mode_code(vmcs);
        let width = |v: u64| if wide { v } else { v & 0xffff_ffff };
        match cr {
            0 => self.set_cr0(vmcs, run, width(v))?,
            2 => self.cr2 = width(v),
            3 => {
                // With PCIDs, bit 63 set keeps the TLB entries (no flush).
                let pcids = self.cr4 & CR4_PCIDE != 0;
                let keep = wide && pcids && v & (1 << 63) != 0;
                let new = if wide {
                    if pcids {
                        v & !(1 << 63)
                    } else {
                        v
                    }
                } else {
                    v & 0xffff_ffff
                };
                // In IA-32e mode, bits 63:MAXPHYADDR are reserved (bit 63 too without
                // PCIDs): #GP (SDM Vol. 3A, 4.5.2 and MOV CR3).
                if long && new.checked_shr(u32::from(self.maxphyaddr)).unwrap_or(0) != 0 {
                    return Err(self.inject(vmcs, vector::GP, Some(0)));
                }
                // Under PAE paging MOV CR3 loads the four PDPTEs.
                if self.mode == PagingMode::Pae && !self.pdptes_ok(new) {
                    return Err(self.inject(vmcs, vector::GP, Some(0)));
                }
                let old = (self.cr3, self.pdptes);
                self.cr3 = new;
                self.pdptes = None;
                if let RootLoad::Again = self.load_cr3_step(vmcs, !keep, SYNC_BUDGET) {
                    // The sync goes on when the guest runs MOV CR3 again.
                    (self.cr3, self.pdptes) = old;
                    return Err(self.sync_pause());
                }
            }
            4 => {
                let v = width(v);
                // PCIDE: only in IA-32e mode with CR3[11:0] = 0 (SDM 4.10.1).
                let pcide_on = v & CR4_PCIDE != 0 && self.cr4 & CR4_PCIDE == 0;
                let bad = v & !(rvmm_core::guest_state::CR4_ALLOWED & self.cr4_allowed) != 0
                    || (pcide_on && (!long || self.cr3 & 0xfff != 0))
                    || (v & (1 << 18) != 0 && !self.xsave)
                    || (long && v & CR4_PAE == 0);
                // Under PAE paging, a change of PAE, PGE, PSE or SMEP loads the PDPTEs.
                let loads_pdptes = self.cr0 & CR0_PG != 0
                    && !long
                    && v & CR4_PAE != 0
                    && (v ^ self.cr4) & (CR4_PAE | CR4_PGE | CR4_PSE | CR4_SMEP) != 0;
                if bad || (loads_pdptes && !self.pdptes_ok(self.cr3)) {
                    return Err(self.inject(vmcs, vector::GP, Some(0)));
                }
                let flush = (v ^ self.cr4) & CR4_FLUSH != 0;
                if flush {
                    // A global flush first (every PCID's entries go), in steps.
                    match self.flush_all_step(vmcs) {
                        Some(true) => {}
                        Some(false) => return Err(self.sync_pause()),
                        None => return Err(self.no_shadow(vmcs, run, 0, 7)),
                    }
                }
                let need_reset = self.need_reset;
                if loads_pdptes {
                    self.pdptes = None;
                }
                self.cr4 = v;
                self.apply_paging_state(vmcs);
                if flush {
                    self.reset_shadow(vmcs);
                } else {
                    // The root and its rights stay (nothing of paging changed).
                    self.need_reset = need_reset;
                }
            }
            8 => {
                if v >> 4 != 0 {
                    return Err(self.inject(vmcs, vector::GP, Some(0)));
                }
                match self.apic.as_mut() {
                    // CR8 is TPR[7:4].
                    Some(a) => a.set_tpr((v as u32) << 4),
                    None => self.cr8 = v,
                }
            }
            _ => return Err(self.inject(vmcs, vector::UD, None)),
        }
        Ok(())
    }

    fn set_cr0(&mut self, vmcs: &CurrentVmcs, run: *mut uapi::Run, v: u64) -> Result<(), Next> {
        // Paging off with PCIDs on is #GP (SDM 4.10.1).
        let reserved = v >> 32 != 0 || (v & CR0_PG == 0 && self.cr4 & CR4_PCIDE != 0);
        let pg_without_pe = v & CR0_PG != 0 && v & CR0_PE == 0;
        let long_without_pae =
            v & CR0_PG != 0 && self.efer & EFER_LME != 0 && self.cr4 & CR4_PAE == 0;
        let nw_without_cd = v & (1 << 29) != 0 && v & (1 << 30) == 0;
        // A change of PG, CD or NW that leaves PAE paging on (outside IA-32e mode) loads
        // the PDPTEs (SDM Vol. 3A, 4.4.1).
        const CR0_CD_NW: u64 = (1 << 30) | (1 << 29);
        let loads_pdptes = v & CR0_PG != 0
            && (v ^ self.cr0) & (CR0_PG | CR0_CD_NW) != 0
            && self.cr4 & CR4_PAE != 0
            && self.efer & EFER_LME == 0;
        let bad_pdptes = loads_pdptes && !self.pdptes_ok(self.cr3);
        if reserved || pg_without_pe || long_without_pae || nw_without_cd || bad_pdptes {
            return Err(self.inject(vmcs, vector::GP, Some(0)));
        }
        let paging_bits = CR0_PG | CR0_PE | CR0_WP;
        // (A PDPTE load also takes the root again: its copy of them.)
        let changed = (self.cr0 ^ v) & paging_bits != 0 || loads_pdptes;
        if changed {
            // A paging change flushes every PCID's entries: that sync first, in steps.
            match self.flush_all_step(vmcs) {
                Some(true) => {}
                Some(false) => return Err(self.sync_pause()),
                None => return Err(self.no_shadow(vmcs, run, 0, 8)),
            }
        }
        if loads_pdptes {
            self.pdptes = None;
        }
        let pe_changed = (self.cr0 ^ v) & CR0_PE != 0;
        self.cr0 = v;
        self.apply_paging_state(vmcs);
        if pe_changed {
            if v & CR0_PE == 0 {
                self.enter_real_mode(vmcs);
            } else {
                self.leave_real_mode(vmcs);
            }
        }
        if changed {
            self.reset_shadow(vmcs);
        } else {
            self.need_reset = false;
        }
        Ok(())
    }

    /// Whether the four PDPTEs at `cr3` can be loaded (PAE paging): a present one with
    /// a reserved bit (2:1, 8:5, 63:MAXPHYADDR) makes the instruction that loads them
    /// #GP (SDM Vol. 3A, 4.4.1), before it changes anything.
    fn pdptes_ok(&self, cr3: u64) -> bool {
        let base = cr3 & 0xffff_ffe0;
        let phys = 1u64
            .checked_shl(u32::from(self.maxphyaddr))
            .map_or(u64::MAX, |b| b - 1);
        (0..4u64).all(|i| {
            // Outside RAM: nothing to check here (a walk through it reports it).
            let e = GuestMem(&self.slots)
                .read_entry(base + 8 * i, 8)
                .unwrap_or(0);
            e & 1 == 0 || e & (0x1e6 | !phys) == 0
        })
    }

    /// MOV to or from a debug register (SDM Vol. 3B, 18.2): #GP outside ring 0 or for
    /// a DR6/DR7 value with bits 63:32 set, #UD for DR4/DR5 under CR4.DE (else they
    /// are DR6/DR7).
    fn dr_access(&mut self, vmcs: &CurrentVmcs, qual: u64) -> Next {
        let mut dr = (qual & 7) as usize;
        let gpr = ((qual >> 8) & 0xf) as u8;
        if vmcs.read(guest::SS_ACCESS_RIGHTS) >> 5 & 3 != 0 {
            return self.inject(vmcs, vector::GP, Some(0));
        }
        if dr == 4 || dr == 5 {
            if self.cr4 & CR4_DE != 0 {
                return self.inject(vmcs, vector::UD, None);
            }
            dr += 2;
        }
        if qual & (1 << 4) == 0 {
            let v = if self.long_mode_code(vmcs) {
                self.gpr(vmcs, gpr)
            } else {
                self.gpr(vmcs, gpr) & 0xffff_ffff
            };
            if dr >= 6 && v >> 32 != 0 {
                return self.inject(vmcs, vector::GP, Some(0));
            }
            let mut next = Next::Fast;
            match dr {
                // Only B0-B3, BD, BS, BT and RTM are writable; the rest read as 1
                // (bits 11:4, 31:17) or 0 (bit 12).
                6 => {
                    self.dr[6] = (v & 0x0001_e00f) | 0xfffe_0ff0;
                    // SAFETY: the guest's DR6 is in the CPU for this section.
                    unsafe { crate::vmx::write_dr6(self.dr[6]) };
                }
                7 => {
                    let v = (v | 0x400) & !(1 << 12 | 1 << 14 | 1 << 15);
                    vmcs.write(guest::DR7, v);
                    self.dr[7] = v;
                    // Breakpoints enabled now: the next section loads DR0-3.
                    if v & 0xff != 0 && !self.guest_drs_loaded {
                        next = Next::Host;
                    }
                }
                _ => {
                    self.dr[dr] = v;
                    if self.guest_drs_loaded {
                        // SAFETY: the guest's debug registers are loaded for this section
                        // (the host's come back at its end).
                        unsafe { crate::vmx::write_dr(dr, v) };
                    }
                }
            }
            self.skip_instruction(vmcs);
            return next;
        } else {
            let v = match dr {
                // What the guest's #DBs reported so far, in the CPU for this section.
                6 => crate::vmx::read_dr6(),
                7 => vmcs.read(guest::DR7),
                _ => self.dr[dr],
            };
            self.set_gpr(vmcs, gpr, v);
        }
        self.skip_instruction(vmcs);
        Next::Fast
    }

    /// XSETBV: the guest's XCR0, within x87/SSE/AVX and the architecture's rules.
    fn xsetbv(&mut self, vmcs: &CurrentVmcs) -> Next {
        let v = (self.gprs.rdx << 32) | (self.gprs.rax & 0xffff_ffff);
        let cpl = vmcs.read(guest::SS_ACCESS_RIGHTS) >> 5 & 3;
        let ok = self.xsave
            && self.cr4 & (1 << 18) != 0
            && cpl == 0
            && self.gprs.rcx as u32 == 0
            && v & !super::GUEST_XCR0_SUPPORTED == 0
            && v & 1 != 0
            && (v & 4 == 0 || v & 2 != 0);
        if !ok {
            if !self.xsave || self.cr4 & (1 << 18) == 0 {
                return self.inject(vmcs, vector::UD, None);
            }
            return self.inject(vmcs, vector::GP, Some(0));
        }
        self.xcr0 = v;
        self.skip_instruction(vmcs);
        Next::Fast
    }

    fn interrupt_window(&mut self, vmcs: &CurrentVmcs, run: *mut uapi::Run) -> Next {
        self.set_window_exiting(vmcs, false);
        if self.pending_irq.is_some() {
            return Next::Fast;
        }
        // With an APIC the window may have been the APIC's: userspace sees it only if it
        // asked for it.
        // SAFETY: our run page.
        let asked = unsafe { ptr::read_volatile(ptr::addr_of!((*run).request_interrupt_window)) };
        if self.apic.is_some() && asked == 0 {
            return Next::Fast;
        }
        self.exit_to_user(run, uapi::RVMM_EXIT_IRQ_WINDOW_OPEN)
    }

    pub(crate) fn set_window_exiting(&mut self, vmcs: &CurrentVmcs, on: bool) {
        self.irq_window = on;
        self.write_proc_controls(vmcs);
    }

    /// Asks for an exit when the guest can take an NMI (where VMX has virtual NMIs).
    pub(crate) fn set_nmi_window_exiting(&mut self, vmcs: &CurrentVmcs, on: bool) {
        if self.virtual_nmis {
            self.nmi_window = on;
            self.write_proc_controls(vmcs);
        }
    }

    fn write_proc_controls(&self, vmcs: &CurrentVmcs) {
        let mut v = self.proc_base;
        if self.irq_window {
            v |= PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
        }
        if self.nmi_window {
            v |= PrimaryControls::NMI_WINDOW_EXITING.bits();
        }
        vmcs.write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, v.into());
    }

    /// Whether the guest can take an external interrupt now.
    pub(crate) fn interruptible(&self, vmcs: &CurrentVmcs) -> bool {
        vmcs.read(guest::RFLAGS) & (1 << 9) != 0
            && vmcs.read(guest::INTERRUPTIBILITY_STATE) & 3 == 0
            && vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32 & intr::VALID == 0
            && !Self::debug_trap_pending(vmcs)
    }

    /// Whether a debug trap of an instruction rvmm completed is pending (a single step,
    /// [`Self::retire`], or a data breakpoint the emulator's accesses hit): it goes first (a trap on the previous instruction outranks NMIs and
    /// external interrupts, SDM Vol. 3A, 6.9), and a VM entry that injects an event
    /// would drop it (Vol. 3C, 27.7.3), so events wait for a window exit.
    pub(crate) fn debug_trap_pending(vmcs: &CurrentVmcs) -> bool {
        vmcs.read(guest::PENDING_DBG_EXCEPTIONS)
            & (PENDING_DBG_BS | rvmm_core::debug::ENABLED_BREAKPOINT | 0xf)
            != 0
    }

    /// A debug trap an emulated instruction left pending (a single step, a data
    /// breakpoint) while the guest runs in the emulator, where no entry delivers it: it
    /// goes in now, as the CPU would deliver it after the instruction (DR6 gets its
    /// bits, the guest a #DB; through the IVT in real mode).
    pub(super) fn emulated_debug_trap(&mut self, vmcs: &CurrentVmcs) {
        let p = vmcs.read(guest::PENDING_DBG_EXCEPTIONS);
        if p == 0 {
            return;
        }
        vmcs.write(guest::PENDING_DBG_EXCEPTIONS, 0);
        if p & (PENDING_DBG_BS | 0xf) == 0 {
            return;
        }
        let dr6 = crate::vmx::read_dr6();
        let dr6 = (dr6 & !0xf) | (p & (PENDING_DBG_BS | 0xf));
        // SAFETY: the guest's DR6 is in the CPU for this run section.
        unsafe { crate::vmx::write_dr6(dr6) };
        self.dr[6] = dr6;
        let _ = self.inject(vmcs, vector::DB, None);
    }

    /// Puts queued events into the VMCS before an entry (VMCS current).
    #[inline]
    pub(crate) fn deliver_events(&mut self, vmcs: &CurrentVmcs) {
        if self.real.emulating && !self.real.active {
            // A mode switch in the emulator: events wait for the protected-mode entry.
            return;
        }
        if self.apic.is_none() && self.pending_exception.is_none() && self.pending_irq.is_none() {
            if self.real.active {
                self.real_mode_deliver(vmcs);
            }
            return;
        }
        if self.apic.is_some() {
            self.apic_inject(vmcs);
        }
        if self.pending_exception.is_none() && self.pending_irq.is_none() {
            if self.real.active {
                self.real_mode_deliver(vmcs);
            }
            return;
        }
        if let Some((vec, ec)) = self.pending_exception.take() {
            if vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32 & intr::VALID == 0 {
                let _ = self.inject(vmcs, vec, ec);
            } else {
                self.pending_exception = Some((vec, ec));
            }
        }
        if let Some(vec) = self.pending_irq {
            if self.interruptible(vmcs) {
                vmcs.write(
                    control::VMENTRY_INTERRUPTION_INFO_FIELD,
                    u64::from(intr::VALID | intr::TYPE_EXT_INTR | u32::from(vec)),
                );
                self.pending_irq = None;
            } else {
                self.set_window_exiting(vmcs, true);
            }
        }
        if self.real.active {
            self.real_mode_deliver(vmcs);
        }
    }
}
