// SPDX-License-Identifier: GPL-2.0

//! A vCPU's side of its in-kernel local APIC (`rvmm_core::apic::Apic`): merging what
//! was posted to its mailbox, the timer (the VMX-preemption timer ends guest execution
//! at the APIC timer's deadline; a halted vCPU sleeps on an hrtimer until it), injection
//! on VM entry, HLT, and the xAPIC page / x2APIC MSR accesses. Everything here runs with
//! the vCPU's lock held; nothing allocates.

use core::ptr;

use rvmm_core::apic::{reg, Effect, Trigger, VecReg};
use rvmm_core::exit::intr;
use x86::vmx::vmcs::{control, guest};

use super::{Next, VcpuInner};
use crate::ffi::*;
use crate::vmx::CurrentVmcs;

/// The host's TSC.
fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

impl VcpuInner {
    /// The guest's TSC now.
    pub(super) fn guest_tsc(&self) -> u64 {
        rdtsc().wrapping_add(self.tsc_offset)
    }

    /// Moves what other vCPUs and devices posted into the APIC, and raises the timer's
    /// interrupt if it is due.
    pub(super) fn apic_collect(&mut self) {
        let now = self.guest_tsc();
        let khz = self.tsc_khz;
        let (Some(apic), Some(irq)) = (self.apic.as_mut(), self.irq.as_ref()) else {
            return;
        };
        // The timer's shortest periodic period is 200 us at the TSC's rate (this runs
        // before every entry, so before the guest can start a count).
        apic.set_tsc_khz(khz);
        if let Some(p) = irq.mailbox(self.vcpu_id).take() {
            for (i, &(edge, level)) in p.vectors.iter().enumerate() {
                for (bits, trigger) in [(edge, Trigger::Edge), (level, Trigger::Level)] {
                    let mut b = bits;
                    while b != 0 {
                        let v = (i * 64) as u32 + b.trailing_zeros();
                        b &= b - 1;
                        apic.accept(v as u8, trigger);
                    }
                }
            }
            self.pending_nmi |= p.nmi;
            // The PIC's output reaches the CPU through LINT0 in ExtINT mode, or directly
            // while the APIC is disabled (virtual wire).
            if let Some(v) = p.extint {
                let lint0 = apic.lint(0);
                if !apic.hw_enabled() || (lint0 & (1 << 16) == 0 && (lint0 >> 8) & 7 == 7) {
                    self.pending_extint = Some(v);
                }
            }
        }
        apic.tick(now);
    }

    /// Before an entry (VMCS current, nothing else queued): inject the APIC's NMI or
    /// highest deliverable vector if the guest can take it now, else ask for an
    /// interrupt-window exit; cut the preemption timer to the APIC timer's deadline.
    pub(super) fn apic_inject(&mut self, vmcs: &CurrentVmcs) {
        self.apic_collect();
        // With virtual-interrupt delivery the CPU takes the APIC's vectors itself
        // (`vid_push`), but not in real mode: vm86 would deliver them through the IDT,
        // not the IVT.
        let cpu_delivers = self.vid && !self.real.active && !self.real.emulating;
        let Some(pending) = self
            .apic
            .as_ref()
            .map(|a| a.pending().filter(|_| !cpu_delivers))
        else {
            return;
        };
        let slot_free =
            vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32 & intr::VALID == 0;
        if slot_free && self.pending_irq.is_none() && self.pending_exception.is_none() {
            let istate = vmcs.read(guest::INTERRUPTIBILITY_STATE);
            // A pending single-step #DB blocks like STI (see `debug_trap_pending`).
            let dbg = Self::debug_trap_pending(vmcs);
            let istate = if dbg { istate | 1 } else { istate };
            if self.pending_nmi && istate & 0xa == 0 && !dbg {
                // No blocking by NMI or MOV SS.
                vmcs.write(
                    control::VMENTRY_INTERRUPTION_INFO_FIELD,
                    u64::from(intr::VALID | intr::TYPE_NMI | 2),
                );
                self.pending_nmi = false;
            } else if self.pending_nmi {
                // Blocked (an NMI handler runs): an exit when its IRET unblocks NMIs.
                self.set_nmi_window_exiting(vmcs, true);
            } else if let Some(v) = self.pending_extint {
                // From the 8259 (acknowledged there): no IRR/ISR of the APIC, no TPR.
                if vmcs.read(guest::RFLAGS) & (1 << 9) != 0 && istate & 3 == 0 {
                    vmcs.write(
                        control::VMENTRY_INTERRUPTION_INFO_FIELD,
                        u64::from(intr::VALID | intr::TYPE_EXT_INTR | u32::from(v)),
                    );
                    self.pending_extint = None;
                    self.stats.apic_injections.inc();
                } else {
                    self.set_window_exiting(vmcs, true);
                }
            } else if let Some(v) = pending {
                if vmcs.read(guest::RFLAGS) & (1 << 9) != 0 && istate & 3 == 0 {
                    if let Some(a) = self.apic.as_mut() {
                        a.ack(v);
                    }
                    vmcs.write(
                        control::VMENTRY_INTERRUPTION_INFO_FIELD,
                        u64::from(intr::VALID | intr::TYPE_EXT_INTR | u32::from(v)),
                    );
                    self.stats.apic_injections.inc();
                } else {
                    self.set_window_exiting(vmcs, true);
                }
            }
        }
        self.program_preemption_timer(vmcs);
        self.tpr_to_vapic(vmcs);
        self.vapic_sync();
        self.vid_push(vmcs, cpu_delivers);
    }

    /// With virtual-interrupt delivery, before an entry (after `vapic_sync`): the
    /// guest interrupt status names the highest in-service vector (SVI) and, where the
    /// CPU delivers, the highest requested one (RVI). The CPU then delivers it when
    /// the guest can take it and ends it at the guest's EOI, without exits.
    fn vid_push(&mut self, vmcs: &CurrentVmcs, cpu_delivers: bool) {
        if !self.vid {
            return;
        }
        let Some(a) = self.apic.as_ref() else {
            return;
        };
        let status = a.interrupt_status(cpu_delivers);
        if status != self.vid_status {
            vmcs.write(guest::INTERRUPT_STATUS, status.into());
            self.vid_status = status;
        }
    }

    /// The event an exit interrupted (IDT-vectoring information `idt`), with
    /// virtual-interrupt delivery (see `rvmm_core::apic::interrupted_event`).
    pub(super) fn vid_vectoring(&self, vmcs: &CurrentVmcs, idt: u32) -> u32 {
        if idt & intr::VALID == 0 || !self.vid_delivered {
            return idt;
        }
        let interrupts_on = vmcs.read(guest::RFLAGS) & (1 << 9) != 0;
        rvmm_core::apic::interrupted_event(
            idt,
            self.vid_delivered,
            (self.vid_status >> 8) as u8,
            interrupts_on,
        )
    }

    /// With virtual-interrupt delivery, after an exit (before anything reads the APIC):
    /// what the CPU delivered and ended since the entry, from the virtual-APIC page.
    /// Every delivery and EOI changes the guest interrupt status (a delivered vector
    /// leaves RVI; an EOI moves SVI), so with the status unchanged only the IRR is read.
    pub(super) fn vid_pull(&mut self, vmcs: &CurrentVmcs) {
        let status = vmcs.read(guest::INTERRUPT_STATUS) as u16;
        self.vid_delivered = false;
        // A self-IPI the CPU took itself (an ICR write with the self shorthand, SDM
        // 30.1.5) leaves the ICR's low half in the page and adds to the IRR, without
        // moving RVI when a higher vector waits: the IRR is read at every exit.
        // SAFETY: as in `vapic_pull`.
        let icr = unsafe { core::ptr::read_volatile(self.vapic_reg(reg::ICR)) };
        if icr != self.vapic_icr_lo {
            self.vapic_icr_lo = icr;
            if let Some(a) = self.apic.as_mut() {
                a.record_icr_low(icr);
            }
        }
        let irr = VecReg::from_words(self.vapic_vector_words(reg::IRR));
        if status == self.vid_status {
            // No delivery and no EOI: the IRR can only have grown.
            if let Some(a) = self.apic.as_mut().filter(|a| a.irr != irr) {
                let isr = a.isr;
                a.load_vectors(irr, isr);
            }
            return;
        }
        self.vid_status = status;
        let isr = self.vapic_vector_words(reg::ISR);
        let Some(a) = self.apic.as_mut() else {
            return;
        };
        let isr = VecReg::from_words(isr);
        let delivered = a.cpu_deliveries(&irr, &isr);
        self.stats.apic_injections.add(delivered.into());
        self.vid_delivered = delivered != 0;
        a.load_vectors(irr, isr);
    }

    /// The eight 32-bit words of a 256-bit register (IRR, ISR) in the virtual-APIC page.
    fn vapic_vector_words(&self, first: u32) -> [u32; 8] {
        let mut w = [0u32; 8];
        for (i, v) in w.iter_mut().enumerate() {
            // SAFETY: as in `vapic_pull`.
            *v = unsafe { core::ptr::read_volatile(self.vapic_reg(first + 0x10 * i as u32)) };
        }
        w
    }

    /// A 32-bit register of the virtual-APIC page (with APIC virtualization).
    fn vapic_reg(&self, offset: u32) -> *mut u32 {
        // The page starts 0x80 before VTPR; `offset` is a register's (below 0x400).
        (self.vapic_tpr - 0x80 + (offset & 0xff0) as usize) as *mut u32
    }

    /// With APIC virtualization: the ICR's high half, whose writes the CPU keeps in the
    /// virtual-APIC page without an exit, into the APIC (before anything reads the
    /// APIC's ICR or rewrites the page).
    pub(super) fn vapic_pull(&mut self) {
        if !self.apicv {
            return;
        }
        // SAFETY: our virtual-APIC page; the CPU writes it only while this vCPU is in
        // guest mode, which it is not.
        let hi = unsafe { core::ptr::read_volatile(self.vapic_reg(reg::ICR2)) };
        // Only a value rvmm did not put there is the guest's (the APIC's own may be
        // newer: a write through the emulator that the page does not show yet).
        if hi == self.vapic_icr2 {
            return;
        }
        self.vapic_icr2 = hi;
        if let Some(a) = self.apic.as_mut() {
            if !a.x2apic() {
                a.mmio_write(reg::ICR2, 4, hi.into(), 0);
            }
        }
    }

    /// With APIC virtualization, before an entry: the virtual-APIC page shows the
    /// APIC's registers, as VMX serves reads from it (rewritten only after a change).
    fn vapic_sync(&mut self) {
        if !self.apicv {
            return;
        }
        self.vapic_pull();
        self.vapic_push();
    }

    /// The APIC's registers into the virtual-APIC page, if they changed since they
    /// were last written there. (After a mode or base change, right away: the page's
    /// ICR high half is the APIC's again, so that `vapic_pull` takes nothing stale.)
    pub(super) fn vapic_push(&mut self) {
        if !self.apicv {
            return;
        }
        let Some(a) = self.apic.as_mut() else {
            return;
        };
        if !a.take_page_stale() {
            return;
        }
        let base = self.vapic_tpr - 0x80;
        let (icr_lo, icr2) = (&mut self.vapic_icr_lo, &mut self.vapic_icr2);
        a.page_words(|offset, v| {
            match offset {
                reg::ICR => *icr_lo = v,
                reg::ICR2 => *icr2 = v,
                _ => {}
            }
            // SAFETY: as in `vapic_pull`; `offset` is below 0x400, inside the page.
            unsafe { core::ptr::write_volatile((base + offset as usize) as *mut u32, v) }
        });
    }

    /// APIC-write exit (trap-like: the write is done, RIP is past it): the guest wrote
    /// the register at `offset` of the xAPIC page, and the value waits in the
    /// virtual-APIC page; the APIC takes it with its effects.
    pub(super) fn apic_write(&mut self, offset: u32) -> Next {
        self.vapic_pull();
        // SAFETY: as in `vapic_pull`.
        let v = unsafe { core::ptr::read_volatile(self.vapic_reg(offset)) };
        let now = self.guest_tsc();
        let Some(a) = self.apic.as_mut() else {
            return Next::Fast;
        };
        self.stats.apic_accesses.inc();
        let e = a.mmio_write(offset, 4, v.into(), now);
        self.apic_effect(e);
        // What the APIC kept of the value (not always what was written) goes back
        // into the page before the next entry, as does a write the APIC ignores.
        if let Some(a) = self.apic.as_mut() {
            a.set_page_stale();
        }
        Next::Fast
    }

    /// After an exit, with the TPR shadow: the guest's VTPR becomes the APIC's TPR.
    pub(super) fn tpr_from_vapic(&mut self) {
        if self.vapic_tpr == 0 {
            return;
        }
        // SAFETY: `vapic_tpr` points into the virtual-APIC page this vCPU owns.
        let v = unsafe { core::ptr::read_volatile(self.vapic_tpr as *const u8) };
        if let Some(a) = self.apic.as_mut() {
            a.set_tpr(v.into());
        }
    }

    /// Before an entry, with the TPR shadow: the APIC's TPR into VTPR, and the TPR
    /// threshold: the class of the highest interrupt the TPR holds back, so that the
    /// guest's lowering CR8 below it exits (SDM 30.1.2).
    fn tpr_to_vapic(&mut self, vmcs: &CurrentVmcs) {
        if self.vapic_tpr == 0 {
            return;
        }
        let Some(a) = self.apic.as_ref() else {
            return;
        };
        let tpr = a.tpr();
        let blocked = match (a.irr.highest(), a.pending()) {
            (Some(v), None) => u32::from(v >> 4).min(tpr >> 4),
            _ => 0,
        };
        // SAFETY: as in `tpr_from_vapic`.
        unsafe { core::ptr::write_volatile(self.vapic_tpr as *mut u8, tpr as u8) };
        vmcs.write(control::TPR_THRESHOLD, blocked.into());
    }

    /// The VMX-preemption timer ends guest execution at the APIC timer's deadline (or
    /// after the usual quantum, whichever is first).
    fn program_preemption_timer(&mut self, vmcs: &CurrentVmcs) {
        if self.preemption_quantum == 0 {
            return;
        }
        let deadline = self.apic.as_ref().and_then(|a| a.timer_deadline());
        match deadline {
            Some(d) => {
                let left = d.saturating_sub(self.guest_tsc()) >> self.preemption_shift;
                vmcs.write(
                    guest::VMX_PREEMPTION_TIMER_VALUE,
                    left.min(self.preemption_quantum),
                );
                self.preemption_short = true;
            }
            None if self.preemption_short => {
                vmcs.write(guest::VMX_PREEMPTION_TIMER_VALUE, self.preemption_quantum);
                self.preemption_short = false;
            }
            None => {}
        }
    }

    /// Whether an interrupt (or NMI) waits that would end a HLT.
    fn wakeup_due(&self) -> bool {
        self.pending_nmi
            || self.pending_extint.is_some()
            || self.pending_irq.is_some()
            || self.apic.as_ref().is_some_and(|a| a.pending().is_some())
    }

    /// HLT (RIP already past it). Without an APIC, or with interrupts off (only an NMI
    /// or INIT could end it: rvmm reports that HLT to userspace, as before), userspace
    /// sees the exit; else the vCPU sleeps in the host until an interrupt is due.
    pub(super) fn hlt(&mut self, vmcs: &CurrentVmcs, run: *mut rvmm_uapi::Run) -> Next {
        if self.apic.is_none() || vmcs.read(guest::RFLAGS) & (1 << 9) == 0 {
            // SAFETY: our run page.
            unsafe {
                ptr::write_volatile(
                    ptr::addr_of_mut!((*run).exit_reason),
                    rvmm_uapi::RVMM_EXIT_HLT,
                )
            };
            return Next::User;
        }
        self.apic_collect();
        if self.wakeup_due() {
            return Next::Fast;
        }
        self.halted = true;
        Next::Host
    }

    /// Sleeps (interrupts on, outside any run section) until an interrupt is due for
    /// the halted guest; `Err` on a signal (the vCPU stays halted).
    pub(super) fn halt_wait(&mut self) -> Result<(), ()> {
        let Some(w) = self.irq.as_ref().map(|i| i.mailbox(self.vcpu_id).waiter()) else {
            self.halted = false;
            return Ok(());
        };
        self.stats.halt_sleeps.inc();
        loop {
            // SAFETY: the waiter lives as long as the VM's irqchip, which we hold.
            unsafe { rvmm_waiter_arm(w) };
            self.apic_collect();
            if self.wakeup_due() {
                self.halted = false;
                return Ok(());
            }
            let timeout = match self.apic.as_ref().and_then(|a| a.timer_deadline()) {
                Some(d) => ticks_to_ns(d.saturating_sub(self.guest_tsc())),
                None => -1,
            };
            // SAFETY: as above; we hold no spinlock and interrupts are on.
            if unsafe { rvmm_waiter_sleep(w, timeout) } != 0 {
                return Err(());
            }
        }
    }

    /// INIT and start-up IPIs from the mailbox: INIT makes the vCPU wait for a SIPI, a
    /// SIPI starts a waiting vCPU in real mode at its vector's page.
    pub(super) fn take_init_sipi(&mut self) {
        let Some(irq) = self.irq.clone() else {
            return;
        };
        let b = irq.mailbox(self.vcpu_id);
        if b.take_init() {
            self.wait_sipi = true;
            self.halted = false;
        }
        if let Some(v) = b.take_sipi() {
            if self.wait_sipi {
                self.wait_sipi = false;
                // The VMCS cannot fail to load here but for a broken VMX: then the
                // vCPU stays where it was.
                let _ = self.with_vmcs(|g, vmcs| g.start_real_mode(vmcs, v));
            }
        }
    }

    /// Sleeps until an INIT or SIPI arrives (interrupts on, outside a run section);
    /// `Err` on a signal.
    pub(super) fn sipi_wait(&mut self) -> Result<(), ()> {
        let Some(irq) = self.irq.clone() else {
            return Err(());
        };
        let b = irq.mailbox(self.vcpu_id);
        let w = b.waiter();
        // SAFETY: the waiter lives as long as the VM's irqchip, which we hold.
        unsafe { rvmm_waiter_arm(w) };
        if b.has_init_sipi() {
            return Ok(());
        }
        // SAFETY: as above; no spinlock held, interrupts on.
        if unsafe { rvmm_waiter_sleep(w, -1) } != 0 {
            return Err(());
        }
        Ok(())
    }

    /// Carries out what an APIC register write asks for.
    pub(super) fn apic_effect(&mut self, e: Effect) {
        match e {
            Effect::None => {}
            Effect::Send(ipi) => {
                if let Some(irq) = self.irq.as_ref() {
                    irq.deliver(&ipi, Some(self.vcpu_id));
                }
            }
            // Level-triggered interrupts come from userspace's I/O APIC, which rvmm
            // does not tell about EOIs yet: nothing to do.
            Effect::LevelEoi(_) => {}
        }
        self.apic_publish();
    }

    /// Publishes the APIC's addressing state for senders.
    pub(super) fn apic_publish(&self) {
        if let (Some(a), Some(irq)) = (self.apic.as_ref(), self.irq.as_ref()) {
            irq.mailbox(self.vcpu_id)
                .publish(&a.addressing(), a.mmio_base());
        }
    }

    /// An access to guest-physical `gpa` in the xAPIC page; `Some(value)` for a read.
    pub(super) fn apic_mmio(&mut self, gpa: u64, len: u8, write: Option<u64>) -> Option<u64> {
        self.vapic_pull();
        let now = self.guest_tsc();
        let apic = self.apic.as_mut()?;
        self.stats.apic_accesses.inc();
        let off = (gpa & 0xfff) as u32;
        match write {
            Some(v) => {
                let e = apic.mmio_write(off, len, v, now);
                self.apic_effect(e);
                None
            }
            None => Some(apic.mmio_read(off, len, now)),
        }
    }

    /// The xAPIC page's base, if the guest's APIC is in xAPIC mode.
    pub(super) fn apic_page(&self) -> Option<u64> {
        self.apic.as_ref().and_then(|a| a.mmio_base())
    }
}

/// TSC ticks to nanoseconds (capped at an hour: the caller sleeps again after).
fn ticks_to_ns(ticks: u64) -> i64 {
    // SAFETY: reads a kernel variable.
    let khz = u64::from(unsafe { rvmm_tsc_khz() }).max(1);
    let cap = 3_600_000_000_000u64;
    let ns = if ticks > u64::MAX / 1_000_000 {
        cap
    } else {
        (ticks * 1_000_000 / khz).min(cap)
    };
    ns as i64
}
