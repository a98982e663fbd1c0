// SPDX-License-Identifier: GPL-2.0

//! VM-exit handlers: one per exit reason, called with the vCPU's VMCS current and
//! interrupts off. They allocate nothing and never sleep.

use core::ptr;

use rvmm_core::apic::{MSR_TSC_DEADLINE, X2APIC_MSR_BASE, X2APIC_MSR_END};
use rvmm_core::emulate::{MmioOp, Source, WriteKind};
use rvmm_core::exit::{
    combine_exceptions, intr, vector, CrAccess, ExitReason, IoAccess, MemOperand,
    EXIT_REASON_FAILED_ENTRY,
};
use rvmm_core::mmu::mode::*;
use rvmm_core::mmu::pool::Fix as PoolFix;
use rvmm_core::mmu::{walker, Access, GuestMemory, PermCtx};
use rvmm_uapi as uapi;
use x86::msr;
use x86::vmx::vmcs::control::PrimaryControls;
use x86::vmx::vmcs::{control, guest, ro};

use super::{vmr, vmw, Next, Pending, VcpuInner};
use crate::ffi::*;
use crate::mmu::GuestMem;

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
    pub(super) fn handle_exit(&mut self, run: *mut uapi::Run, id: u32) -> Next {
        let reason = vmr(ro::EXIT_REASON) as u32;
        let basic = reason as u16;
        // The guest's MOV CR8 writes went to the virtual-APIC page: the APIC's TPR first.
        if self.vapic_tpr != 0 {
            self.tpr_from_vapic();
        }
        if let Some(n) = self.stats.exits.get(usize::from(basic)) {
            n.inc();
        }
        if reason & EXIT_REASON_FAILED_ENTRY != 0 {
            if basic == EXIT_REASON_MACHINE_CHECK {
                // SAFETY: as for a #MC exit: the host handles it.
                unsafe { rvmm_machine_check() };
            }
            // SAFETY: our run page.
            unsafe {
                ptr::write_volatile(
                    ptr::addr_of_mut!((*run).exit_reason),
                    uapi::RVMM_EXIT_FAIL_ENTRY,
                );
                ptr::write_volatile(
                    ptr::addr_of_mut!((*run).fail_entry),
                    uapi::ExitFailEntry {
                        hardware_entry_failure_reason: reason.into(),
                        cpu: rvmm_cpu() as u32,
                        vmfail: 0,
                    },
                );
            }
            user_pr!(
                pr_info,
                "vcpu {}: VM entry failed, exit reason {:#x}, qualification {:#x}\n",
                id,
                reason,
                vmr(ro::EXIT_QUALIFICATION)
            );
            return Next::User;
        }
        // An event whose delivery the exit interrupted is delivered again on entry.
        let idt = vmr(ro::IDT_VECTORING_INFO) as u32;
        if idt & intr::VALID != 0 {
            vmw(
                control::VMENTRY_INTERRUPTION_INFO_FIELD,
                u64::from(idt & !intr::NMI_UNBLOCK),
            );
            if idt & intr::HAS_ERROR_CODE != 0 {
                vmw(
                    control::VMENTRY_EXCEPTION_ERR_CODE,
                    vmr(ro::IDT_VECTORING_ERR_CODE),
                );
            }
            vmw(
                control::VMENTRY_INSTRUCTION_LEN,
                vmr(ro::VMEXIT_INSTRUCTION_LEN),
            );
        }
        // (Otherwise nothing to do: a VM exit clears the valid bit of the VM-entry
        // interruption information, SDM 27.2.)
        let next = self.dispatch(run, id, basic);
        if core::mem::take(&mut self.triple_fault) {
            return self.exit_to_user(run, uapi::RVMM_EXIT_SHUTDOWN);
        }
        next
    }

    fn dispatch(&mut self, run: *mut uapi::Run, id: u32, basic: u16) -> Next {
        use ExitReason::*;
        // The exit qualification, read only by the exits that have one.
        let qual = || vmr(ro::EXIT_QUALIFICATION);
        match ExitReason::from_basic(basic) {
            Some(ExceptionNmi) => self.exception_or_nmi(run, qual()),
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
            Some(TripleFault) => self.exit_to_user(run, uapi::RVMM_EXIT_SHUTDOWN),
            Some(Cpuid) => self.cpuid(),
            Some(Hlt) => {
                self.skip_instruction();
                self.hlt(run)
            }
            Some(Invlpg) => self.invlpg(run, qual()),
            Some(Invpcid) => self.invpcid(run, qual()),
            Some(Vmcall) => self.vmcall(run),
            Some(CrAccess) => self.cr_access(run, qual()),
            Some(DrAccess) => self.dr_access(qual()),
            Some(Io) => self.io(run, qual()),
            Some(Rdmsr) => self.rdmsr(),
            Some(Wrmsr) => self.wrmsr(),
            Some(InterruptWindow) => self.interrupt_window(run),
            // The guest can take the NMI that waited: it goes in before the next entry.
            Some(NmiWindow) => {
                self.set_nmi_window_exiting(false);
                Next::Fast
            }
            Some(Xsetbv) => self.xsetbv(),
            Some(Invd) | Some(Wbinvd) | Some(Pause) => {
                self.skip_instruction();
                Next::Fast
            }
            Some(
                Vmclear | Vmlaunch | Vmptrld | Vmptrst | Vmread | Vmresume | Vmwrite | Vmxoff
                | Vmxon | Invept | Invvpid | Vmfunc | Mwait | Monitor | Rdpmc | Rdtscp,
            ) => self.inject(vector::UD, None),
            _ => {
                let qual = qual();
                user_pr!(
                    pr_info,
                    "vcpu {}: unhandled VM exit {} (qualification {:#x}) at RIP {:#x}\n",
                    id,
                    basic,
                    qual,
                    vmr(guest::RIP)
                );
                self.internal_error(
                    run,
                    uapi::RVMM_INTERNAL_UNHANDLED_EXIT,
                    [basic.into(), qual, vmr(guest::RIP), 0],
                )
            }
        }
    }

    fn exit_to_user(&mut self, run: *mut uapi::Run, reason: u32) -> Next {
        // SAFETY: our run page.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).exit_reason), reason) };
        Next::User
    }

    /// Advances RIP past the exiting instruction; STI/MOV SS blocking ends with it.
    fn skip_instruction(&mut self) {
        let rip = self.rip_after(vmr(guest::RIP), vmr(ro::VMEXIT_INSTRUCTION_LEN));
        vmw(guest::RIP, rip);
        let intr_state = vmr(guest::INTERRUPTIBILITY_STATE);
        if intr_state & 3 != 0 {
            vmw(guest::INTERRUPTIBILITY_STATE, intr_state & !3);
        }
    }

    /// Whether the guest runs 64-bit code (IA-32e mode and CS.L).
    pub(super) fn long_mode_code(&self) -> bool {
        self.efer & EFER_LMA != 0 && vmr(guest::CS_ACCESS_RIGHTS) & (1 << 13) != 0
    }

    /// RIP after an instruction of `len` bytes at `rip`: it wraps at 64 bits in 64-bit
    /// code and at 32 bits otherwise (SDM Vol. 1, 3.5), whatever RIP the guest chose.
    pub(super) fn rip_after(&self, rip: u64, len: u64) -> u64 {
        let next = rip.wrapping_add(len);
        if self.long_mode_code() {
            next
        } else {
            next & 0xffff_ffff
        }
    }

    /// Queues a hardware exception for the next entry, folding it with an event that
    /// was being delivered (double fault, or shutdown on a triple fault).
    pub(super) fn inject(&mut self, vec: u8, error_code: Option<u32>) -> Next {
        let pending = vmr(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32;
        let (vec, error_code) =
            if pending & intr::VALID != 0 && pending & intr::TYPE_MASK == intr::TYPE_HW_EXCEPTION {
                match combine_exceptions(intr::vector(pending), vec) {
                    Some(vector::DF) if vec != vector::DF => (vector::DF, Some(0)),
                    Some(v) => (v, error_code),
                    None => {
                        // A fault while delivering #DF: the processor would shut down.
                        vmw(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
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
            vmw(guest::RFLAGS, vmr(guest::RFLAGS) | (1 << 16));
        }
        if let Some(ec) = error_code.filter(|_| vector::has_error_code(vec)) {
            info |= intr::HAS_ERROR_CODE;
            vmw(control::VMENTRY_EXCEPTION_ERR_CODE, ec.into());
        }
        vmw(control::VMENTRY_INTERRUPTION_INFO_FIELD, info.into());
        Next::Fast
    }

    fn exception_or_nmi(&mut self, run: *mut uapi::Run, qual: u64) -> Next {
        let info = vmr(ro::VMEXIT_INTERRUPTION_INFO) as u32;
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
            let s = vmr(guest::INTERRUPTIBILITY_STATE);
            vmw(guest::INTERRUPTIBILITY_STATE, s | 8);
        }
        if self.rmode && vec != vector::PF {
            return self.rmode_exception(run, vec);
        }
        let ec = (info & intr::HAS_ERROR_CODE != 0)
            .then(|| vmr(ro::VMEXIT_INTERRUPTION_ERR_CODE) as u32);
        if vec == vector::PF {
            return self.page_fault(run, qual, ec.unwrap_or(0));
        }
        // Only #PF is intercepted; anything else belongs to the guest.
        self.inject(vec, ec)
    }

    pub(super) fn perm_ctx(&self) -> PermCtx {
        PermCtx {
            wp: self.cr0 & CR0_WP != 0,
            smep: self.cr4 & CR4_SMEP != 0,
            smap: self.cr4 & CR4_SMAP != 0,
            ac: vmr(guest::RFLAGS) & (1 << 18) != 0,
            nxe: self.efer & EFER_NXE != 0,
            gbpages: true,
            maxphyaddr: self.maxphyaddr,
        }
    }

    /// A #PF in the guest: fill the shadow from the guest's tables, or give the guest
    /// the fault its tables call for.
    fn page_fault(&mut self, run: *mut uapi::Run, gva: u64, ec: u32) -> Next {
        let access = Access::from_error_code(ec);
        let ctx = self.perm_ctx();
        if self.on_pool {
            // A reserved-bit fault can only come from an MMIO entry of the pool: the
            // guest-physical address is in it, no guest walk needed.
            if ec & (1 << 3) != 0 {
                let gpa = match self.shadow.pool.lock().as_deref_mut() {
                    Some(storage) => {
                        let mut pool = storage.pool();
                        if pool.st.generation == self.proot_gen {
                            pool.mmio_fast(self.proot, gva, access, &ctx)
                        } else {
                            None
                        }
                    }
                    None => None,
                };
                if let Some(gpa) = gpa {
                    return self.mmio(run, gpa, &ctx);
                }
            }
            return self.pool_fault(run, gva, ec, access, &ctx);
        }
        // No shadow (the VM's pool could not give a root): nothing to fix.
        self.internal_error(
            run,
            uapi::RVMM_INTERNAL_NO_SHADOW,
            [gva, u64::from(ec), vmr(guest::RIP), 0],
        )
    }

    /// An access to guest-physical memory that is not RAM (or a write to a read-only
    /// slot): decode the instruction and hand the access to userspace.
    fn mmio(&mut self, run: *mut uapi::Run, gpa: u64, ctx: &PermCtx) -> Next {
        let rip = vmr(guest::RIP);
        let cs_ar = vmr(guest::CS_ACCESS_RIGHTS);
        let long = self.efer & EFER_LMA != 0 && cs_ar & (1 << 13) != 0;
        let linear = if long {
            rip
        } else {
            vmr(guest::CS_BASE).wrapping_add(rip) & 0xffff_ffff
        };
        let mut code = [0u8; 15];
        let n = self.fetch_code(linear, ctx, &mut code);
        let decoded = match rvmm_core::emulate::decode(&code[..n], long, cs_ar & (1 << 14) != 0) {
            Ok(d) => d,
            Err(_) => {
                let first = u64::from_le_bytes(code[..8].try_into().unwrap_or([0; 8]));
                return self.internal_error(
                    run,
                    uapi::RVMM_INTERNAL_EMULATION,
                    [gpa, rip, first, 4],
                );
            }
        };
        if self.apic_page() == Some(gpa & !0xfff) {
            return self.apic_page_access(gpa, rip, decoded, long);
        }
        let mut mmio = uapi::ExitMmio {
            phys_addr: gpa,
            ..Default::default()
        };
        match decoded.op {
            MmioOp::Store { size, src } => {
                let v = match src {
                    Source::Reg(r) => self.gpr(r),
                    Source::HighByte(r) => self.gpr(r) >> 8,
                    Source::Imm(v) => v,
                };
                mmio.len = size.into();
                mmio.is_write = 1;
                mmio.data = v.to_le_bytes();
                for b in mmio.data.iter_mut().skip(usize::from(size)) {
                    *b = 0;
                }
            }
            MmioOp::Load { size, .. } => {
                mmio.len = size.into();
                self.pending = Pending::MmioRead {
                    op: decoded.op,
                    long,
                };
            }
        }
        // SAFETY: our run page.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).mmio), mmio) };
        vmw(guest::RIP, self.rip_after(rip, decoded.len.into()));
        self.stats.mmio_exits.inc();
        self.exit_to_user(run, uapi::RVMM_EXIT_MMIO)
    }

    /// A decoded access to the xAPIC page, done in the kernel.
    fn apic_page_access(
        &mut self,
        gpa: u64,
        rip: u64,
        decoded: rvmm_core::emulate::Decoded,
        long: bool,
    ) -> Next {
        match decoded.op {
            MmioOp::Store { size, src } => {
                let v = match src {
                    Source::Reg(r) => self.gpr(r),
                    Source::HighByte(r) => self.gpr(r) >> 8,
                    Source::Imm(v) => v,
                };
                self.apic_mmio(gpa, size, Some(v));
            }
            MmioOp::Load { size, dst, .. } => {
                let data = self.apic_mmio(gpa, size, None).unwrap_or(0);
                let new = rvmm_core::emulate::load_result(self.gpr(dst), data, &decoded.op, long);
                self.set_gpr(dst, new);
            }
        }
        vmw(guest::RIP, self.rip_after(rip, decoded.len.into()));
        Next::Fast
    }

    /// Reads up to 15 bytes of code at linear address `rip`; returns how many.
    fn fetch_code(&mut self, rip: u64, ctx: &PermCtx, out: &mut [u8; 15]) -> usize {
        let slots = self.slots.clone();
        let fetch = Access {
            write: false,
            user: vmr(guest::SS_ACCESS_RIGHTS) >> 5 & 3 == 3,
            fetch: true,
        };
        // Linear addresses wrap at 32 bits outside 64-bit mode, at 64 bits in it.
        let mask = if self.long_mode_code() {
            u64::MAX
        } else {
            0xffff_ffff
        };
        let mut n = 0;
        while n < out.len() {
            let la = rip.wrapping_add(n as u64) & mask;
            let Ok(w) = walker::walk(&mut GuestMem(&slots), self.mode, self.cr3, la, fetch, ctx)
            else {
                break;
            };
            let chunk = ((0x1000 - (w.gpa & 0xfff)) as usize).min(out.len() - n);
            let Some(p) = slots.ptr(w.gpa, chunk as u64) else {
                break;
            };
            // SAFETY: `p` points at `chunk` bytes of a pinned guest page.
            unsafe { ptr::copy_nonoverlapping(p, out[n..].as_mut_ptr(), chunk) };
            n += chunk;
        }
        n
    }

    /// A #PF under the VM's pool: sync the missing entry (or report the guest's fault,
    /// or MMIO).
    fn pool_fault(
        &mut self,
        run: *mut uapi::Run,
        gva: u64,
        ec: u32,
        access: Access,
        ctx: &PermCtx,
    ) -> Next {
        let fix = {
            let mut guard = self.shadow.pool.lock();
            let Some(storage) = guard.as_deref_mut() else {
                drop(guard);
                return self.internal_error(run, uapi::RVMM_INTERNAL_NO_SHADOW, [gva, 1, 0, 0]);
            };
            let mut pool = storage.pool();
            let fix = if pool.st.generation != self.proot_gen {
                None
            } else {
                Some(pool.page_fault(
                    &mut GuestMem(&self.slots),
                    self.proot,
                    self.cr3,
                    gva,
                    access,
                    ctx,
                ))
            };
            let dirty = core::mem::take(&mut pool.st.tlb_dirty);
            let unsync = pool.unsync_count();
            self.shadow.publish(pool.st, unsync);
            drop(guard);
            self.flush_remote(dirty);
            fix
        };
        match fix {
            // The pool was reset (full): load the root again and retry the access.
            None | Some(Err(_)) => {
                if !self.reload_root(matches!(fix, Some(Err(_)))) {
                    return self.no_shadow(run, gva, 0);
                }
                Next::Fast
            }
            Some(Ok(PoolFix::Mapped)) => {
                self.stats.shadow_faults.inc();
                let rip = vmr(guest::RIP);
                if (gva, rip) == self.last_fault {
                    self.repeat_faults += 1;
                    if self.repeat_faults > 64 {
                        self.repeat_faults = 0;
                        user_pr!(
                            pr_err,
                            "shadow fault loop (pool): gva {:#x} ec {:#x} rip {:#x}\n",
                            gva,
                            ec,
                            rip
                        );
                        return self.internal_error(
                            run,
                            uapi::RVMM_INTERNAL_NO_SHADOW,
                            [gva, u64::from(ec), rip, 0],
                        );
                    }
                } else {
                    self.last_fault = (gva, rip);
                    self.repeat_faults = 0;
                }
                Next::Fast
            }
            Some(Ok(PoolFix::GuestFault(f))) => {
                if let Some(table) = f.unbacked_table {
                    return self.internal_error(
                        run,
                        uapi::RVMM_INTERNAL_EMULATION,
                        [table, gva, vmr(guest::RIP), 1],
                    );
                }
                self.stats.guest_faults.inc();
                self.cr2 = gva;
                self.inject(vector::PF, Some(f.error_code))
            }
            Some(Ok(PoolFix::Mmio { gpa, .. })) => self.mmio(run, gpa, ctx),
            Some(Ok(PoolFix::WriteProtected { gpa, .. })) => self.pt_write(run, gva, gpa, ctx),
        }
    }

    /// A write to a write-protected upper-level guest page table: emulate the
    /// instruction (MOV, XCHG, CMPXCHG, OR, AND, BTS, BTR), then let the pool update the
    /// shadow entries it covers. What the emulator does not handle unsyncs the table
    /// instead, and the instruction runs again natively.
    fn pt_write(&mut self, run: *mut uapi::Run, gva: u64, gpa: u64, ctx: &PermCtx) -> Next {
        let rip = vmr(guest::RIP);
        let cs_ar = vmr(guest::CS_ACCESS_RIGHTS);
        let long = self.efer & EFER_LMA != 0 && cs_ar & (1 << 13) != 0;
        let mut code = [0u8; 15];
        let n = self.fetch_code(rip, ctx, &mut code);
        let op = rvmm_core::emulate::decode_write(&code[..n], long, cs_ar & (1 << 14) != 0);
        let emulated = match op {
            // Within one naturally aligned 8-byte word (entries are), so that the
            // read-modify-write is one atomic compare-exchange on it: other vCPUs may
            // write the same table at the same time (their writes trap as well, but the
            // emulation runs outside the pool lock).
            Ok(op) if (gpa & 7) + u64::from(op.size) <= 8 => {
                match self.slots.ptr_mut(gpa & !7, 8) {
                    Some(p) => {
                        // SAFETY: `p` is an 8-byte aligned pointer into a pinned guest page
                        // (`ptr` checked the range); the guest and other vCPUs only access it
                        // as memory, so atomic accesses through it are sound.
                        let word = unsafe { &*p.cast::<core::sync::atomic::AtomicU64>() };
                        let shift = 8 * (gpa & 7);
                        let mask = if op.size == 8 {
                            u64::MAX
                        } else {
                            ((1u64 << (8 * u32::from(op.size))) - 1) << shift
                        };
                        let src = match op.src {
                            Source::Reg(r) => self.gpr(r),
                            Source::HighByte(r) => self.gpr(r) >> 8,
                            Source::Imm(v) => v,
                        };
                        let (rax, rflags) = (self.gprs.rax, vmr(guest::RFLAGS));
                        let (edx_eax, ecx_ebx) = (
                            (self.gprs.rdx << 32) | (rax & 0xffff_ffff),
                            (self.gprs.rcx << 32) | (self.gprs.rbx & 0xffff_ffff),
                        );
                        let mut cur = word.load(core::sync::atomic::Ordering::SeqCst);
                        let e = loop {
                            let old = (cur & mask) >> shift;
                            let e = if op.kind == WriteKind::Cmpxchg8b {
                                let (mem, reg, rflags) = rvmm_core::emulate::apply_cmpxchg8b(
                                    old, edx_eax, ecx_ebx, rflags,
                                );
                                rvmm_core::emulate::WriteEffect {
                                    mem,
                                    reg: reg.map(|v| (0, v)),
                                    rflags,
                                }
                            } else {
                                rvmm_core::emulate::apply_write(&op, old, src, rax, rflags)
                            };
                            let next = (cur & !mask) | ((e.mem << shift) & mask);
                            match word.compare_exchange(
                                cur,
                                next,
                                core::sync::atomic::Ordering::SeqCst,
                                core::sync::atomic::Ordering::SeqCst,
                            ) {
                                Ok(_) => break e,
                                Err(now) => cur = now,
                            }
                        };
                        if let (WriteKind::Cmpxchg8b, Some((_, v))) = (op.kind, e.reg) {
                            // EDX:EAX (32-bit writes: the upper halves clear).
                            self.gprs.rax = v & 0xffff_ffff;
                            self.gprs.rdx = v >> 32;
                        } else if let Some((_, v)) = e.reg {
                            // XCHG: the source register; CMPXCHG: rAX. Merged as a MOV
                            // of the operand size (32-bit results zero-extend).
                            let (r, shift) = match (op.kind, op.src) {
                                (WriteKind::Xchg, Source::HighByte(h)) => (h, 8),
                                (WriteKind::Xchg, Source::Reg(r)) => (r, 0),
                                _ => (0, 0),
                            };
                            let merged = match op.size {
                                8 => v,
                                4 => v & 0xffff_ffff,
                                2 => (self.gpr(r) & !0xffff) | (v & 0xffff),
                                _ => (self.gpr(r) & !(0xff << shift)) | ((v & 0xff) << shift),
                            };
                            self.set_gpr(r, merged);
                        }
                        vmw(guest::RFLAGS, e.rflags);
                        vmw(guest::RIP, self.rip_after(rip, op.len.into()));
                        Some(op.size)
                    }
                    None => None,
                }
            }
            _ => None,
        };
        let r = {
            let mut guard = self.shadow.pool.lock();
            match guard.as_deref_mut() {
                Some(storage) => {
                    let mut pool = storage.pool();
                    let r = match emulated {
                        Some(size) => pool.pt_written(&mut GuestMem(&self.slots), gpa, size, ctx),
                        None => {
                            pool.unprotect(gpa >> 12);
                            Ok(())
                        }
                    };
                    let unsync = pool.unsync_count();
                    self.shadow.publish(pool.st, unsync);
                    (r, core::mem::take(&mut pool.st.tlb_dirty))
                }
                None => (Ok(()), false),
            }
        };
        let (r, dirty) = r;
        self.flush_remote(dirty);
        if r.is_err() && !self.reload_root(true) {
            return self.no_shadow(run, gva, 4);
        }
        Next::Fast
    }

    /// After a pool operation (lock released): a remote flush if entries lost rights
    /// (`Some(Ok(true))`); a new root if the pool was full (`Some(Err)`) or reset under
    /// this vCPU (`None`). False if no root can be had.
    fn finish_pool_op(&mut self, r: Option<Result<bool, rvmm_core::mmu::pool::Full>>) -> bool {
        match r {
            Some(Ok(dirty)) => {
                self.flush_remote(dirty);
                true
            }
            Some(Err(_)) => self.reload_root(true),
            None => self.reload_root(false),
        }
    }

    /// The pool is full (`full`: reset it), or was reset under this vCPU: load this
    /// vCPU's root again. False if even that fails.
    fn reload_root(&mut self, full: bool) -> bool {
        if full {
            if let Some(storage) = self.shadow.pool.lock().as_deref_mut() {
                let mut pool = storage.pool();
                pool.reset();
                self.shadow.publish(pool.st, 0);
            }
            self.stats.shadow_resets.inc();
        }
        self.reset_shadow()
    }

    /// No shadow for the guest (the pool cannot give a root): the vCPU stops with an
    /// internal error; `site` says where.
    fn no_shadow(&mut self, run: *mut uapi::Run, gva: u64, site: u64) -> Next {
        self.internal_error(
            run,
            uapi::RVMM_INTERNAL_NO_SHADOW,
            [gva, 0, vmr(guest::RIP), site],
        )
    }

    fn invlpg(&mut self, run: *mut uapi::Run, gva: u64) -> Next {
        if self.on_pool {
            let ctx = self.perm_ctx();
            // None: the root is from an older pool generation.
            let r = match self.shadow.pool.lock().as_deref_mut() {
                Some(storage) => {
                    let mut pool = storage.pool();
                    if pool.st.generation != self.proot_gen {
                        None
                    } else {
                        let r = pool.invlpg(&mut GuestMem(&self.slots), self.proot, gva, &ctx);
                        let unsync = pool.unsync_count();
                        self.shadow.publish(pool.st, unsync);
                        Some(r.map(|()| core::mem::take(&mut pool.st.tlb_dirty)))
                    }
                }
                None => None,
            };
            let ok = self.finish_pool_op(r);
            if !ok {
                return self.no_shadow(run, gva, 2);
            }
            self.skip_instruction();
            return Next::Fast;
        }
        self.skip_instruction();
        Next::Fast
    }

    /// INVPCID (SDM Vol. 2A): type 0 invalidates one address of one PCID, 1 one PCID,
    /// 2 and 3 every PCID. The shadow is shared by PCIDs: type 0 for the current PCID is
    /// an INVLPG, anything else brings every out-of-sync shadow up to date.
    fn invpcid(&mut self, run: *mut uapi::Run, qual: u64) -> Next {
        // Segment bases in instruction-information order: ES CS SS DS FS GS.
        const SEG_BASES: [u32; 6] = [
            guest::ES_BASE,
            guest::CS_BASE,
            guest::SS_BASE,
            guest::DS_BASE,
            guest::FS_BASE,
            guest::GS_BASE,
        ];
        let slots = self.slots.clone();
        if vmr(guest::CS_ACCESS_RIGHTS) >> 5 & 3 != 0 {
            return self.inject(vector::GP, Some(0));
        }
        let op = MemOperand::decode(vmr(ro::VMEXIT_INSTRUCTION_INFO) as u32);
        let kind = self.gpr(op.reg2);
        let long = self.efer & EFER_LMA != 0;
        let ea = op.effective(qual, |r| self.gpr(r));
        let seg_base = match op.seg {
            4 => vmr(guest::FS_BASE),
            5 => vmr(guest::GS_BASE),
            s if !long => vmr(SEG_BASES[usize::from(s).min(5)]),
            _ => 0,
        };
        let la = seg_base.wrapping_add(ea);
        // The 16-byte descriptor: PCID in bits 11:0, bits 63:12 reserved, the linear
        // address in bits 127:64.
        let mut desc = [0u64; 2];
        let ctx = self.perm_ctx();
        let read = Access::default();
        for (i, d) in desc.iter_mut().enumerate() {
            let a = la.wrapping_add(8 * i as u64);
            match walker::walk(&mut GuestMem(&slots), self.mode, self.cr3, a, read, &ctx) {
                Ok(w) => match GuestMem(&slots).read_entry(w.gpa, 8) {
                    Some(v) if w.gpa & 7 == 0 => *d = v,
                    _ => {
                        return self.internal_error(
                            run,
                            uapi::RVMM_INTERNAL_EMULATION,
                            [a, w.gpa, vmr(guest::RIP), 5],
                        )
                    }
                },
                Err(f) => {
                    self.cr2 = a;
                    return self.inject(vector::PF, Some(f.error_code));
                }
            }
        }
        let (pcid, addr) = (desc[0], desc[1]);
        let canonical = ((addr as i64) << 16 >> 16) as u64 == addr;
        if kind > 3 || pcid >> 12 != 0 || (kind == 0 && !canonical) {
            return self.inject(vector::GP, Some(0));
        }
        let current = if self.cr4 & CR4_PCIDE != 0 {
            self.cr3 & 0xfff
        } else {
            0
        };
        if kind == 0 && pcid == current {
            // Like INVLPG (which skips the instruction itself).
            return self.invlpg(run, addr);
        }
        // None: the root is from an older pool generation (or there is no pool).
        let r = match self.shadow.pool.lock().as_deref_mut() {
            Some(storage) if self.on_pool => {
                let mut pool = storage.pool();
                if pool.st.generation != self.proot_gen {
                    None
                } else {
                    let r = pool.flush_all(&mut GuestMem(&self.slots), &ctx);
                    let unsync = pool.unsync_count();
                    self.shadow.publish(pool.st, unsync);
                    Some(r.map(|()| core::mem::take(&mut pool.st.tlb_dirty)))
                }
            }
            _ => None,
        };
        let ok = self.finish_pool_op(r);
        if !ok {
            return self.no_shadow(run, addr, 3);
        }
        self.skip_instruction();
        Next::Fast
    }

    fn cpuid(&mut self) -> Next {
        let (leaf, sub) = (self.gprs.rax as u32, self.gprs.rcx as u32);
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
        self.gprs.rax = a.into();
        self.gprs.rbx = b.into();
        self.gprs.rcx = c.into();
        self.gprs.rdx = d.into();
        self.skip_instruction();
        Next::Fast
    }

    /// CPUID leaves with subleaves or state (and any leaf while userspace has set
    /// entries): the host's answer through the policy, then userspace's entries.
    #[cold]
    #[inline(never)]
    fn cpuid_slow(&self, leaf: u32, sub: u32) -> [u32; 4] {
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
            tsc_khz: self.tsc_khz,
            host_max_basic: self.host_max_basic,
        }
    }

    fn vmcall(&mut self, run: *mut uapi::Run) -> Next {
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
        self.skip_instruction();
        self.exit_to_user(run, uapi::RVMM_EXIT_HYPERCALL)
    }

    fn gpr(&self, n: u8) -> u64 {
        self.gprs.get(n, vmr(guest::RSP))
    }

    fn set_gpr(&mut self, n: u8, v: u64) {
        if !self.gprs.set(n, v) {
            vmw(guest::RSP, v);
        }
    }

    fn cr_access(&mut self, _run: *mut uapi::Run, qual: u64) -> Next {
        let long = self.efer & EFER_LMA != 0;
        let width = |v: u64| if long { v } else { v & 0xffff_ffff };
        match CrAccess::decode(qual) {
            CrAccess::MovTo { cr: 0, gpr } => {
                if let Err(n) = self.set_cr0(width(self.gpr(gpr))) {
                    return n;
                }
            }
            CrAccess::MovTo { cr: 3, gpr } => {
                let v = self.gpr(gpr);
                // With PCIDs, bit 63 set keeps the TLB entries (no flush).
                let keep = self.cr4 & CR4_PCIDE != 0 && v & (1 << 63) != 0;
                self.cr3 = if long {
                    v & !(1 << 63)
                } else {
                    v & 0xffff_ffff
                };
                self.load_cr3_shadow(!keep);
            }
            CrAccess::MovTo { cr: 4, gpr } => {
                let v = width(self.gpr(gpr));
                // PCIDE: only in IA-32e mode with CR3[11:0] = 0 (SDM 4.10.1).
                let pcide_on = v & CR4_PCIDE != 0 && self.cr4 & CR4_PCIDE == 0;
                let bad = v & !(rvmm_core::guest_state::CR4_ALLOWED & self.cr4_allowed) != 0
                    || (pcide_on && (!long || self.cr3 & 0xfff != 0))
                    || (v & (1 << 18) != 0 && !self.xsave)
                    || (long && v & CR4_PAE == 0);
                if bad {
                    return self.inject(vector::GP, Some(0));
                }
                self.cr4 = v;
                self.apply_paging_state();
                self.reset_shadow();
            }
            CrAccess::MovTo { cr: 8, gpr } => {
                let v = self.gpr(gpr);
                if v >> 4 != 0 {
                    return self.inject(vector::GP, Some(0));
                }
                match self.apic.as_mut() {
                    // CR8 is TPR[7:4].
                    Some(a) => a.set_tpr((v as u32) << 4),
                    None => self.cr8 = v,
                }
            }
            CrAccess::MovFrom { cr: 8, gpr } => {
                let v = self
                    .apic
                    .as_ref()
                    .map_or(self.cr8, |a| u64::from(a.tpr() >> 4));
                self.set_gpr(gpr, v);
            }
            CrAccess::MovFrom { cr: 3, gpr } => self.set_gpr(gpr, self.cr3),
            CrAccess::Clts => {
                self.cr0 &= !(1 << 3);
                self.apply_paging_state();
                self.need_reset = false;
            }
            CrAccess::Lmsw { value } => {
                let v = (self.cr0 & !0xe) | u64::from(value & 0xf) | (self.cr0 & 1);
                if let Err(n) = self.set_cr0(v) {
                    return n;
                }
            }
            _ => return self.inject(vector::UD, None),
        }
        self.skip_instruction();
        Next::Fast
    }

    fn set_cr0(&mut self, v: u64) -> Result<(), Next> {
        // Paging off with PCIDs on is #GP (SDM 4.10.1).
        let reserved = v >> 32 != 0 || (v & CR0_PG == 0 && self.cr4 & CR4_PCIDE != 0);
        let pg_without_pe = v & CR0_PG != 0 && v & CR0_PE == 0;
        let long_without_pae =
            v & CR0_PG != 0 && self.efer & EFER_LME != 0 && self.cr4 & CR4_PAE == 0;
        let nw_without_cd = v & (1 << 29) != 0 && v & (1 << 30) == 0;
        if reserved || pg_without_pe || long_without_pae || nw_without_cd {
            return Err(self.inject(vector::GP, Some(0)));
        }
        let paging_bits = CR0_PG | CR0_PE | CR0_WP;
        let changed = (self.cr0 ^ v) & paging_bits != 0;
        self.cr0 = v;
        self.apply_paging_state();
        if changed {
            self.reset_shadow();
        } else {
            self.need_reset = false;
        }
        Ok(())
    }

    fn dr_access(&mut self, qual: u64) -> Next {
        let dr = (qual & 7) as usize;
        let gpr = ((qual >> 8) & 0xf) as u8;
        if qual & (1 << 4) == 0 {
            let v = self.gpr(gpr);
            if dr == 7 {
                vmw(guest::DR7, v);
            }
            self.dr[dr] = v;
        } else {
            let v = if dr == 7 {
                vmr(guest::DR7)
            } else {
                self.dr[dr]
            };
            self.set_gpr(gpr, v);
        }
        self.skip_instruction();
        Next::Fast
    }

    fn io(&mut self, run: *mut uapi::Run, qual: u64) -> Next {
        let io = IoAccess::decode(qual);
        if io.string {
            return self.string_io(run, io);
        }
        let data = if io.input {
            0
        } else {
            self.gprs.rax & ((1u64 << (8 * u32::from(io.size))) - 1)
        };
        let (rip, len) = (vmr(guest::RIP), vmr(ro::VMEXIT_INSTRUCTION_LEN) as u8);
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
    pub(super) fn io_exit(&mut self, run: *mut uapi::Run, io: IoAccess, data: u64) -> Next {
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
    fn string_io(&mut self, run: *mut uapi::Run, io: IoAccess) -> Next {
        let info = vmr(ro::VMEXIT_INSTRUCTION_INFO);
        let addr_mask = match (info >> 7) & 7 {
            0 => 0xffff,
            1 => 0xffff_ffff,
            _ => u64::MAX,
        };
        if io.rep && self.gprs.rcx & addr_mask == 0 {
            self.skip_instruction();
            return Next::Fast;
        }
        let long = self.efer & EFER_LMA != 0 && vmr(guest::CS_ACCESS_RIGHTS) & (1 << 13) != 0;
        let (base, index) = if io.input {
            (
                if long { 0 } else { vmr(guest::ES_BASE) },
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
            let b = vmr(seg_base[seg.min(5)]);
            (
                if long && seg < 4 { 0 } else { b },
                self.gprs.rsi & addr_mask,
            )
        };
        let la = base.wrapping_add(index);
        let ctx = self.perm_ctx();
        let access = Access {
            write: io.input,
            user: vmr(guest::SS_ACCESS_RIGHTS) >> 5 & 3 == 3,
            fetch: false,
        };
        let slots = self.slots.clone();
        let gpa = match walker::walk(&mut GuestMem(&slots), self.mode, self.cr3, la, access, &ctx) {
            Ok(w) => w.gpa,
            Err(f) => {
                self.cr2 = la;
                return self.inject(vector::PF, Some(f.error_code));
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
                [30, la, vmr(guest::RIP), 3],
            );
        };
        let step = if vmr(guest::RFLAGS) & (1 << 10) != 0 {
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
            self.skip_instruction();
        }
        self.io_exit(run, io, data)
    }

    fn rdmsr(&mut self) -> Next {
        if (X2APIC_MSR_BASE..=X2APIC_MSR_END).contains(&(self.gprs.rcx as u32)) {
            self.stats.apic_accesses.inc();
        }
        let Some(v) = self.get_msr(self.gprs.rcx as u32) else {
            return self.inject(vector::GP, Some(0));
        };
        self.gprs.rax = v & 0xffff_ffff;
        self.gprs.rdx = v >> 32;
        self.skip_instruction();
        Next::Fast
    }

    fn wrmsr(&mut self) -> Next {
        let v = (self.gprs.rdx << 32) | (self.gprs.rax & 0xffff_ffff);
        let index = self.gprs.rcx as u32;
        if (X2APIC_MSR_BASE..=X2APIC_MSR_END).contains(&index) {
            self.stats.apic_accesses.inc();
        }
        if !self.set_msr(index, v) {
            return self.inject(vector::GP, Some(0));
        }
        self.skip_instruction();
        match index {
            // Loaded in the CPU for the whole section: update it there too.
            // SAFETY: inside a run section with the guest's context loaded; `v` is canonical
            // (checked by `set_msr`).
            msr::IA32_KERNEL_GSBASE => unsafe { crate::vmx::wrmsr_arch(index, v) },
            // Loaded at the section's start: end the section so the next one loads them.
            msr::IA32_STAR | msr::IA32_LSTAR | msr::IA32_CSTAR | msr::IA32_FMASK => {
                return Next::Host
            }
            _ => {}
        }
        Next::Fast
    }

    /// The guest's value of an MSR rvmm virtualizes (VMCS current); `None`: #GP.
    pub(crate) fn get_msr(&self, index: u32) -> Option<u64> {
        Some(match index {
            msr::IA32_EFER => self.efer,
            msr::IA32_FS_BASE => vmr(guest::FS_BASE),
            msr::IA32_GS_BASE => vmr(guest::GS_BASE),
            msr::IA32_KERNEL_GSBASE => self.kernel_gs_base,
            msr::IA32_STAR => self.syscall_msrs[0],
            msr::IA32_LSTAR => self.syscall_msrs[1],
            msr::IA32_CSTAR => self.syscall_msrs[2],
            msr::IA32_FMASK => self.syscall_msrs[3],
            msr::IA32_SYSENTER_CS => vmr(guest::IA32_SYSENTER_CS),
            msr::IA32_SYSENTER_ESP => vmr(guest::IA32_SYSENTER_ESP),
            msr::IA32_SYSENTER_EIP => vmr(guest::IA32_SYSENTER_EIP),
            msr::IA32_PAT => vmr(guest::IA32_PAT_FULL),
            msr::IA32_TIME_STAMP_COUNTER => rdtsc().wrapping_add(vmr(control::TSC_OFFSET_FULL)),
            msr::IA32_APIC_BASE => self.apic.as_ref().map_or(0xfee0_0900, |a| a.base_msr()),
            X2APIC_MSR_BASE..=X2APIC_MSR_END if self.apic.is_some() => {
                return self.apic.as_ref()?.rdmsr(index, self.guest_tsc()).ok();
            }
            MSR_TSC_DEADLINE if self.apic.is_some() => self.apic.as_ref()?.tsc_deadline(),
            msr::IA32_MISC_ENABLE => 1,
            // IA32_BIOS_SIGN_ID: the microcode revision (none: 0), which Linux writes 0
            // to and reads back after a CPUID.
            IA32_BIOS_SIGN_ID => 0,
            _ => return None,
        })
    }

    /// Sets an MSR for the guest (VMCS current); false if the guest would get #GP.
    pub(crate) fn set_msr(&mut self, index: u32, v: u64) -> bool {
        let canonical = ((v as i64) << 16 >> 16) as u64 == v;
        match index {
            msr::IA32_EFER => {
                let lme_change = (v ^ self.efer) & EFER_LME != 0 && self.cr0 & CR0_PG != 0;
                if v & !rvmm_core::guest_state::EFER_ALLOWED != 0 || lme_change {
                    return false;
                }
                self.efer = (v & !EFER_LMA) | (self.efer & EFER_LMA);
                self.apply_paging_state();
                self.reset_shadow();
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
            msr::IA32_FS_BASE => vmw(guest::FS_BASE, v),
            msr::IA32_GS_BASE => vmw(guest::GS_BASE, v),
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
            msr::IA32_SYSENTER_CS => vmw(guest::IA32_SYSENTER_CS, v),
            msr::IA32_SYSENTER_ESP => vmw(guest::IA32_SYSENTER_ESP, v),
            msr::IA32_SYSENTER_EIP => vmw(guest::IA32_SYSENTER_EIP, v),
            msr::IA32_PAT => {
                // Each byte must be a valid memory type (0, 1, 4, 5, 6, 7).
                if (0..8).any(|i| matches!((v >> (8 * i)) as u8, 2 | 3 | 8..=255)) {
                    return false;
                }
                vmw(guest::IA32_PAT_FULL, v)
            }
            msr::IA32_TIME_STAMP_COUNTER => {
                self.tsc_offset = v.wrapping_sub(rdtsc());
                vmw(control::TSC_OFFSET_FULL, self.tsc_offset);
            }
            msr::IA32_APIC_BASE if self.apic.is_some() => {
                let m = self.maxphyaddr;
                if self
                    .apic
                    .as_mut()
                    .is_some_and(|a| a.set_base_msr(v, m).is_err())
                {
                    return false;
                }
                self.apic_publish();
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
            msr::IA32_MISC_ENABLE | msr::IA32_APIC_BASE | IA32_BIOS_SIGN_ID => {}
            _ => return false,
        }
        true
    }

    /// XSETBV: the guest's XCR0, within x87/SSE/AVX and the architecture's rules.
    fn xsetbv(&mut self) -> Next {
        let v = (self.gprs.rdx << 32) | (self.gprs.rax & 0xffff_ffff);
        let cpl = vmr(guest::SS_ACCESS_RIGHTS) >> 5 & 3;
        let ok = self.xsave
            && self.cr4 & (1 << 18) != 0
            && cpl == 0
            && self.gprs.rcx as u32 == 0
            && v & !super::GUEST_XCR0_SUPPORTED == 0
            && v & 1 != 0
            && (v & 4 == 0 || v & 2 != 0);
        if !ok {
            if !self.xsave || self.cr4 & (1 << 18) == 0 {
                return self.inject(vector::UD, None);
            }
            return self.inject(vector::GP, Some(0));
        }
        self.xcr0 = v;
        self.skip_instruction();
        Next::Fast
    }

    fn interrupt_window(&mut self, run: *mut uapi::Run) -> Next {
        self.set_window_exiting(false);
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

    pub(crate) fn set_window_exiting(&mut self, on: bool) {
        self.irq_window = on;
        self.write_proc_controls();
    }

    /// Asks for an exit when the guest can take an NMI (where VMX has virtual NMIs).
    pub(crate) fn set_nmi_window_exiting(&mut self, on: bool) {
        if self.virtual_nmis {
            self.nmi_window = on;
            self.write_proc_controls();
        }
    }

    fn write_proc_controls(&self) {
        let mut v = self.proc_base;
        if self.irq_window {
            v |= PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
        }
        if self.nmi_window {
            v |= PrimaryControls::NMI_WINDOW_EXITING.bits();
        }
        vmw(control::PRIMARY_PROCBASED_EXEC_CONTROLS, v.into());
    }

    /// Whether the guest can take an external interrupt now.
    pub(crate) fn interruptible(&self) -> bool {
        !self.rmode
            && vmr(guest::RFLAGS) & (1 << 9) != 0
            && vmr(guest::INTERRUPTIBILITY_STATE) & 3 == 0
            && vmr(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32 & intr::VALID == 0
    }

    /// Puts queued events into the VMCS before an entry (VMCS current).
    #[inline]
    pub(crate) fn deliver_events(&mut self) {
        if self.apic.is_none() && self.pending_exception.is_none() && self.pending_irq.is_none() {
            return;
        }
        if self.apic.is_some() {
            self.apic_inject();
        }
        if self.pending_exception.is_none() && self.pending_irq.is_none() {
            return;
        }
        if let Some((vec, ec)) = self.pending_exception.take() {
            if vmr(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32 & intr::VALID == 0 {
                let _ = self.inject(vec, ec);
            } else {
                self.pending_exception = Some((vec, ec));
            }
        }
        if let Some(vec) = self.pending_irq {
            if self.interruptible() {
                vmw(
                    control::VMENTRY_INTERRUPTION_INFO_FIELD,
                    u64::from(intr::VALID | intr::TYPE_EXT_INTR | u32::from(vec)),
                );
                self.pending_irq = None;
            } else {
                self.set_window_exiting(true);
            }
        }
    }
}
