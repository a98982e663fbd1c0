// SPDX-License-Identifier: GPL-2.0

//! One interrupts-off run section: the guest's FPU and hand-switched MSRs in and out,
//! VM entries and exits until the host or userspace needs the CPU (or the section's time
//! budget is spent), the pre-entry checks, and the completion of what userspace handled.

use rvmm_core::exit::intr;
use x86::vmx::vmcs::{control, guest, ro};

use super::*;
use crate::vmx::{HostState, DR7_INIT};

/// The host's values of what a run section switches to the guest's.
pub(super) struct HostContext {
    kernel_gs_base: u64,
    /// DR0-DR3, if the guest's were loaded (its DR7 enables breakpoints), and DR6.
    drs: Option<[u64; 4]>,
    dr6: u64,
    /// The SYSCALL MSRs: the host's, and the guest's loaded at the section's start (a
    /// guest WRMSR changes `syscall_msrs` but not the CPU, and ends the section).
    syscall: [u64; 4],
    guest_syscall: [u64; 4],
    xcr0: u64,
    /// The host's IA32_TSC_AUX (its CPU number, for RDTSCP and RDPID), when the
    /// guest's is loaded.
    tsc_aux: Option<u64>,
}

/// The SYSCALL MSRs, in the order of `VcpuInner::syscall_msrs`.
pub(super) const SYSCALL_MSRS: [u32; 4] = [
    msr::IA32_STAR,
    msr::IA32_LSTAR,
    msr::IA32_CSTAR,
    msr::IA32_FMASK,
];

pub(super) fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV of XCR0 with CR4.OSXSAVE set (callers check `xsave`).
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

/// # Safety
/// `v` must be a valid XCR0 value for this CPU.
pub(super) unsafe fn xsetbv0(v: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        core::arch::asm!("xsetbv", in("ecx") 0u32, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nomem, nostack))
    };
}

/// The longest a run section goes on handling exits (with interrupts off) before it
/// lets the host in, in microseconds. Host interrupts end a section sooner.
pub(super) const SECTION_BUDGET_US: u64 = 250;

impl VcpuInner {
    /// Moves RIP past a port I/O instruction that exited to userspace at `rip`, unless
    /// userspace has moved RIP since; returns whether it did.
    pub(super) fn complete_io(&mut self, vmcs: &CurrentVmcs, rip: u64, len: u8) -> bool {
        if vmcs.read(guest::RIP) != rip {
            return false;
        }
        self.retire(vmcs, rip, len.into());
        true
    }

    /// Completes the exit userspace has handled (the data of an IN or MMIO read, RIP past
    /// an I/O instruction). The VMCS must be current. `Some` when that ends in another
    /// exit to userspace (an emulated instruction that needs more).
    pub(super) fn complete_pending(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
    ) -> Option<Next> {
        match self.pending {
            Pending::None => {}
            Pending::IoOut { rip, len } => {
                self.complete_io(vmcs, rip, len);
            }
            Pending::IoIn { size, rip, len } => {
                if !self.complete_io(vmcs, rip, len) {
                    self.pending = Pending::None;
                    return None;
                }
                // SAFETY: our run page; io_data is plain bytes.
                let data = unsafe { ptr::read_volatile(addr_of_mut!((*run).io_data)) }[0];
                let mask = match size {
                    1 => 0xff,
                    2 => 0xffff,
                    _ => 0xffff_ffff,
                };
                self.gprs.rax = if size == 4 {
                    data & mask
                } else {
                    (self.gprs.rax & !mask) | (data & mask)
                };
            }
            Pending::PortIn { port, size } => {
                let string_io = super::exit::Cause::StringIo {
                    port,
                    size,
                    input: true,
                };
                // SAFETY: our run page.
                let data = unsafe { ptr::read_volatile(addr_of_mut!((*run).io_data)) }[0];
                self.mmio_reads
                    .push(super::exit::PORT_KEY | u64::from(port), size, data);
                self.pending = Pending::None;
                let cause = self.mmio_reads.resume_cause(string_io);
                return Some(self.emulate_insn(vmcs, run, cause, None));
            }
            Pending::MmioRead { gpa, len } => {
                // SAFETY: our run page.
                let data = u64::from_le_bytes(unsafe {
                    ptr::read_volatile(addr_of_mut!((*run).mmio.data))
                });
                self.mmio_reads.push(gpa, len, data);
                self.pending = Pending::None;
                // The instruction runs again, now with the data (and may need more).
                let cause = self.mmio_reads.resume_cause(super::exit::Cause::Mmio);
                return Some(self.emulate_insn(vmcs, run, cause, None));
            }
            Pending::MmioWrite => {
                self.pending = Pending::None;
                return self.next_mmio_write(run);
            }
            Pending::Hypercall => {
                // SAFETY: as above.
                self.gprs.rax = unsafe { ptr::read_volatile(addr_of_mut!((*run).hypercall.ret)) };
            }
        }
        self.pending = Pending::None;
        None
    }

    /// One interrupts-off section: enter the guest, handle fast exits, until the host or
    /// userspace needs the CPU.
    pub(super) fn run_section(&mut self, run: *mut uapi::Run, id: u32) -> Next {
        // SAFETY: kernel_fpu_begin saves the task's FPU state and disables preemption;
        // interrupts are then disabled until the end of the section.
        let flags = unsafe {
            rvmm_fpu_begin();
            rvmm_irq_save()
        };
        let start = exit::rdtsc();
        // SAFETY: see `with_vmcs`.
        let guard = unsafe { vmx::CurrentVmcs::load(self.vmcs_pa) };
        let next = match guard {
            Err(_) => {
                self.internal_error(run, uapi::RVMM_INTERNAL_UNHANDLED_EXIT, [0xffff, 0, 0, 0])
            }
            Ok(vmcs) => self.enter_loop(&vmcs, run, id, start),
        };
        let took = exit::rdtsc().wrapping_sub(start);
        if took > self.stats.longest_section.get() {
            self.stats.longest_section.set(took);
        }
        // SAFETY: the guard (dropped above) cleared our VMCS and restored the previous
        // one; TR's limit is fixed up before anything can use the I/O bitmap.
        unsafe {
            rvmm_after_vmexit();
            rvmm_irq_restore(flags);
            rvmm_fpu_end();
        }
        next
    }

    /// The run section's body; `start` is the TSC when interrupts went off. Its own
    /// function, with the hot exit handlers inlined in it.
    #[inline(never)]
    pub(super) fn enter_loop(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut uapi::Run,
        id: u32,
        start: u64,
    ) -> Next {
        self.section_tsc = start;
        self.write_host_state(vmcs);
        // The exit userspace handled completes here, with the VMCS current.
        if let Some(Next::User) = self.complete_pending(vmcs, run) {
            return Next::User;
        }
        if self.need_reset && !self.reset_shadow(vmcs) {
            return self.internal_error(run, uapi::RVMM_INTERNAL_NO_SHADOW, [0, 0, 0, 0]);
        }
        if !self.state_checked && !self.real.emulating {
            let checked = if self.real.active {
                rvmm_core::guest_state::check_real(
                    self.cr0,
                    self.cr4,
                    self.efer,
                    vmcs.read(guest::RFLAGS),
                    vmcs.read(guest::RIP),
                )
            } else {
                rvmm_core::guest_state::check_state(&self.guest_state(vmcs))
            };
            if let Err(check) = checked {
                user_pr!(
                    pr_info,
                    "vcpu {}: guest state refused before VM entry: {}\n",
                    id,
                    check.explain()
                );
                self.fail_entry(
                    run,
                    (rvmm_core::exit::EXIT_REASON_FAILED_ENTRY | 33).into(),
                    false,
                );
                // SAFETY: our run page.
                unsafe {
                    ptr::write_volatile(ptr::addr_of_mut!((*run).internal.suberror), check as u32)
                };
                return Next::User;
            }
            self.state_checked = true;
        }
        // Marked running before the mailbox is read (see `crate::apic`): an interrupt
        // posted from now on either is seen below or kicks this CPU.
        // SAFETY: a plain query; interrupts are off, so this task stays on this CPU.
        self.shadow.section_start(id, unsafe { rvmm_cpu() });
        // SAFETY: our run page.
        if unsafe { ptr::read_volatile(addr_of_mut!((*run).request_interrupt_window)) } != 0
            && !self.interruptible(vmcs)
        {
            self.set_window_exiting(vmcs, true);
        }
        let host_state = HostState::read();
        // SAFETY: interrupts are off for the whole section; the guest context is put back
        // below on every way out of the loop.
        let host = unsafe { self.load_guest_context() };
        // Every entry of the section starts the timer from this value: without the "save
        // VMX-preemption timer value" exit control, exits leave the field alone.
        if self.preemption_quantum != 0 {
            vmcs.write(guest::VMX_PREEMPTION_TIMER_VALUE, self.preemption_quantum);
            self.preemption_short = false;
        }
        // L1TF: host data may be in the L1D since the last section (where the kernel
        // mitigates it for its own guests).
        // SAFETY: an MSR write (or nothing) with interrupts off.
        unsafe { rvmm_spec_l1d_flush() };
        let mut launched = false;
        let next = loop {
            self.deliver_events(vmcs);
            if core::mem::take(&mut self.triple_fault) {
                break self.exit_to_user(run, uapi::RVMM_EXIT_SHUTDOWN);
            }
            if self.needs_emulation(vmcs) {
                // A state VMX cannot enter: the emulator runs the guest, an
                // instruction per turn, within the section's budget.
                let next = self.emulation_turn(vmcs, run);
                if core::mem::take(&mut self.triple_fault) {
                    break self.exit_to_user(run, uapi::RVMM_EXIT_SHUTDOWN);
                }
                match next {
                    Next::Fast if self.section_goes_on(start) => continue,
                    Next::Fast | Next::Host => break Next::Host,
                    Next::User => {
                        self.report_interrupt_window(vmcs, run);
                        break Next::User;
                    }
                }
            }
            self.shadow.entering(id);
            let root_gen = self.on_pool.then_some(self.proot_gen);
            if self.need_reset || !self.shadow.pre_entry_ok(root_gen, self.slots.generation) {
                // Out of guest mode before anything that may take the pool lock: a
                // remote flush waits for vCPUs in guest mode.
                self.shadow.exited(id);
                if self.shadow.pre_entry_ok(None, self.slots.generation) {
                    // The pool was reset (or the paging state changed): a new root.
                    if !self.reset_shadow(vmcs) {
                        break self.internal_error(
                            run,
                            uapi::RVMM_INTERNAL_NO_SHADOW,
                            [0, 0, vmcs.read(guest::RIP), 6],
                        );
                    }
                    // Other vCPUs may keep resetting the pool: the budget holds here too.
                    if exit::rdtsc().wrapping_sub(start) >= self.section_budget {
                        break Next::Host;
                    }
                    continue;
                }
                // The memory map changed: the run loop takes the new one.
                break Next::Host;
            }
            let r = self.enter_once(vmcs, launched, host.xcr0);
            self.shadow.exited(id);
            if r.is_err() {
                let err = vmcs.read(ro::VM_INSTRUCTION_ERROR);
                user_pr!(
                    pr_info,
                    "vcpu {}: VM entry instruction failed, VM-instruction error {}\n",
                    id,
                    err
                );
                self.fail_entry(run, err, true);
                break Next::User;
            }
            launched = true;
            let next = self.handle_exit(vmcs, run, id);
            if let Next::User = next {
                self.report_interrupt_window(vmcs, run);
            }
            match next {
                // The section ends after its time budget whatever the guest does (an
                // exit storm of a timer, a fault loop), so that interrupts are never off
                // for longer.
                Next::Fast if self.section_goes_on(start) => continue,
                Next::Fast | Next::Host => break Next::Host,
                Next::User => break Next::User,
            }
        };
        self.shadow.section_end(id);
        if let Some(a) = self.apic.as_ref() {
            self.stats.apic_timer_irqs.set(a.timer_fired);
        }
        // The guest's context out and the host's DR0-3 back first, then what VM exits
        // changed (DS, ES, LDTR, GDTR's limit, DR7, DEBUGCTL), once, here: nothing in
        // the section depends on it.
        // SAFETY: `host` is what `load_guest_context` saved in this section.
        unsafe { self.save_guest_context(&host) };
        // SAFETY: the state `HostState::read` took on this CPU at the start.
        unsafe { host_state.restore_after_exit() };
        next
    }

    /// One instruction of a guest VMX cannot enter, by the emulator (out of the exit
    /// loop's hot path).
    #[cold]
    #[inline(never)]
    fn emulation_turn(&mut self, vmcs: &CurrentVmcs, run: *mut uapi::Run) -> Next {
        let pending = vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD);
        if self.real.active || pending & u64::from(intr::VALID) == 0 {
            let next = self.emulate_step(vmcs, run);
            self.emulated_debug_trap(vmcs);
            return next;
        }
        // An exception in the middle of a switch to protected mode, before the guest
        // has a state to take it in.
        self.internal_error(
            run,
            uapi::RVMM_INTERNAL_EMULATION,
            [pending, vmcs.read(guest::RIP), 0, 9],
        )
    }

    /// Whether the run section started at `start` may go on with another entry: the
    /// host has no work for this CPU and the section's time budget is not spent.
    #[inline(always)]
    fn section_goes_on(&self, start: u64) -> bool {
        // SAFETY: a plain query of this CPU's flags, with interrupts off.
        let host_wants_cpu = unsafe { rvmm_exit_request() };
        !host_wants_cpu && exit::rdtsc().wrapping_sub(start) < self.section_budget
    }

    /// Tells userspace, at an exit to it, whether the guest takes an interrupt now.
    fn report_interrupt_window(&self, vmcs: &CurrentVmcs, run: *mut uapi::Run) {
        let ready = self.interruptible(vmcs) && self.pending_irq.is_none();
        // SAFETY: our run page.
        unsafe {
            ptr::write_volatile(
                ptr::addr_of_mut!((*run).if_flag),
                u8::from(vmcs.read(guest::RFLAGS) & (1 << 9) != 0),
            );
            ptr::write_volatile(
                ptr::addr_of_mut!((*run).ready_for_interrupt_injection),
                u8::from(ready),
            );
        }
    }

    /// Loads the guest's FPU/SSE/AVX state and the MSRs switched by hand, once per
    /// section (not per entry: nothing in the section uses them on the host's behalf —
    /// the task's FPU state is saved by kernel_fpu_begin, KERNEL_GS_BASE matters only at
    /// a SWAPGS and the SYSCALL MSRs only at a SYSCALL, both after the section).
    ///
    /// # Safety
    /// Interrupts off, inside `rvmm_fpu_begin`; `save_guest_context` must follow in the
    /// same section.
    pub(super) unsafe fn load_guest_context(&mut self) -> HostContext {
        // SAFETY: see above; the MSRs exist on every x86-64 CPU with VMX.
        unsafe {
            let mut host = HostContext {
                kernel_gs_base: vmx::rdmsr_arch(msr::IA32_KERNEL_GSBASE),
                drs: None,
                dr6: 0,
                syscall: [0; 4],
                guest_syscall: self.syscall_msrs,
                xcr0: 0,
                tsc_aux: None,
            };
            if self.rdtscp {
                let h = vmx::rdmsr_arch(msr::IA32_TSC_AUX);
                if h != self.tsc_aux {
                    vmx::wrmsr_arch(msr::IA32_TSC_AUX, self.tsc_aux);
                }
                host.tsc_aux = Some(h);
            }
            vmx::wrmsr_arch(msr::IA32_KERNEL_GSBASE, self.kernel_gs_base);
            // The guest's breakpoint addresses, only while its DR7 enables one: the
            // host's would match in the guest otherwise (and tell it where they are).
            // The host's DR7 is live until the first VM entry: off first, so that the
            // guest's addresses never arm the host's breakpoints (`HostState` puts the
            // host's DR7 back at the end, after its DR0-3).
            if self.dr[7] & 0xff != 0 {
                vmx::write_dr7(DR7_INIT);
                let mut saved = [0; 4];
                for (n, s) in saved.iter_mut().enumerate() {
                    *s = vmx::read_dr(n);
                    vmx::write_dr(n, self.dr[n]);
                }
                host.drs = Some(saved);
                self.guest_drs_loaded = true;
            }
            // DR6 collects what a #DB in the guest reports (single steps included): the
            // guest's in the CPU for the section, the host's back at the end.
            host.dr6 = vmx::read_dr6();
            if host.dr6 != self.dr[6] {
                vmx::write_dr6(self.dr[6]);
            }
            for (i, &m) in SYSCALL_MSRS.iter().enumerate() {
                host.syscall[i] = vmx::rdmsr_arch(m);
                if host.syscall[i] != self.syscall_msrs[i] {
                    vmx::wrmsr_arch(m, self.syscall_msrs[i]);
                }
            }
            // Under the host's XCR0, a superset of what the guest may enable: nothing of
            // the guest's state is lost whatever its own XCR0.
            if self.xsave {
                host.xcr0 = xgetbv0();
                core::arch::asm!("xrstor64 [{}]", in(reg) self.fx.0.as_ptr(), in("eax") GUEST_XCR0_SUPPORTED as u32, in("edx") 0u32, options(nostack));
            } else {
                core::arch::asm!("fxrstor64 [{}]", in(reg) self.fx.0.as_ptr(), options(nostack));
            }
            self.guest_fpu_loaded = true;
            host
        }
    }

    /// Copies the guest's FPU/SSE/AVX state from the CPU to `fx` (for the emulator),
    /// when it is in the CPU.
    pub(super) fn guest_fpu_to_memory(&mut self) {
        if !self.guest_fpu_loaded {
            return;
        }
        // SAFETY: the guest's state is in the CPU (inside the section, interrupts off,
        // within rvmm_fpu_begin); `fx` is a 64-byte aligned XSAVE area of 1024 bytes.
        unsafe {
            if self.xsave {
                core::arch::asm!("xsave64 [{}]", in(reg) self.fx.0.as_mut_ptr(), in("eax") GUEST_XCR0_SUPPORTED as u32, in("edx") 0u32, options(nostack));
            } else {
                core::arch::asm!("fxsave64 [{}]", in(reg) self.fx.0.as_mut_ptr(), options(nostack));
            }
        }
    }

    /// Loads `fx` (changed by the emulator) back into the CPU, when the guest's state
    /// is there.
    pub(super) fn guest_fpu_from_memory(&mut self) {
        if !self.guest_fpu_loaded {
            return;
        }
        // SAFETY: as in `guest_fpu_to_memory`; `fx` holds a valid image (saved by it).
        unsafe {
            if self.xsave {
                core::arch::asm!("xrstor64 [{}]", in(reg) self.fx.0.as_ptr(), in("eax") GUEST_XCR0_SUPPORTED as u32, in("edx") 0u32, options(nostack));
            } else {
                core::arch::asm!("fxrstor64 [{}]", in(reg) self.fx.0.as_ptr(), options(nostack));
            }
        }
    }

    /// # Safety
    /// After `load_guest_context` in the same section, with its result.
    pub(super) unsafe fn save_guest_context(&mut self, host: &HostContext) {
        // SAFETY: see `load_guest_context`.
        unsafe {
            if self.xsave {
                core::arch::asm!("xsave64 [{}]", in(reg) self.fx.0.as_mut_ptr(), in("eax") GUEST_XCR0_SUPPORTED as u32, in("edx") 0u32, options(nostack));
            } else {
                core::arch::asm!("fxsave64 [{}]", in(reg) self.fx.0.as_mut_ptr(), options(nostack));
            }
            self.guest_fpu_loaded = false;
            // A guest WRMSR to IA32_TSC_AUX went to the CPU too.
            if let Some(h) = host.tsc_aux {
                if h != self.tsc_aux {
                    vmx::wrmsr_arch(msr::IA32_TSC_AUX, h);
                }
            }
            // The guest cannot change the SYSCALL MSRs in the CPU (WRMSR exits, and
            // ends the section): the host's go back where the guest's differed.
            for (i, &m) in SYSCALL_MSRS.iter().enumerate() {
                if host.syscall[i] != host.guest_syscall[i] {
                    vmx::wrmsr_arch(m, host.syscall[i]);
                }
            }
            self.dr[6] = vmx::read_dr6();
            if self.dr[6] != host.dr6 {
                vmx::write_dr6(host.dr6);
            }
            if let Some(saved) = host.drs {
                for (n, &v) in saved.iter().enumerate() {
                    vmx::write_dr(n, v);
                }
                self.guest_drs_loaded = false;
            }
            // SWAPGS in the guest changes KERNEL_GS_BASE without an exit: read it back.
            self.kernel_gs_base = vmx::rdmsr_arch(msr::IA32_KERNEL_GSBASE);
            vmx::wrmsr_arch(msr::IA32_KERNEL_GSBASE, host.kernel_gs_base);
        }
    }

    /// One VM entry and exit. Per entry only what the host cannot run with: the guest's
    /// XCR0 (NMI handlers may use XSAVE features) and CR2.
    pub(super) fn enter_once(
        &mut self,
        _vmcs: &CurrentVmcs,
        launched: bool,
        host_xcr0: u64,
    ) -> Result<(), vmx::VmFail> {
        // SAFETY: interrupts are off, our VMCS is current (`_vmcs`) with complete state,
        // and the guest context is loaded (run section); XCR0 values are the guest's,
        // checked at XSETBV, and the host's, read at the section start.
        unsafe {
            // The guest's XCR0 matters only with its CR4.OSXSAVE on (without it, XSAVE
            // instructions and AVX raise #UD in the guest whatever XCR0 holds).
            let switch_xcr0 = self.xsave && self.cr4 & (1 << 18) != 0 && host_xcr0 != self.xcr0;
            if switch_xcr0 {
                xsetbv0(self.xcr0);
            }
            vmx::write_cr2(self.cr2);
            let r = vmx::enter(&mut self.gprs, launched);
            self.cr2 = vmx::read_cr2();
            if switch_xcr0 {
                xsetbv0(host_xcr0);
            }
            r
        }
    }

    /// A failed VM entry for userspace: `reason` as the hardware (or rvmm's pre-entry
    /// check) gives it; `vmfail` for a VMLAUNCH/VMRESUME that failed as an instruction.
    pub(in crate::vcpu) fn fail_entry(&self, run: *mut uapi::Run, reason: u64, vmfail: bool) {
        // SAFETY: our run page.
        unsafe {
            ptr::write_volatile(
                ptr::addr_of_mut!((*run).exit_reason),
                uapi::RVMM_EXIT_FAIL_ENTRY,
            );
            ptr::write_volatile(
                ptr::addr_of_mut!((*run).fail_entry),
                uapi::ExitFailEntry {
                    hardware_entry_failure_reason: reason,
                    cpu: rvmm_cpu() as u32,
                    vmfail: vmfail.into(),
                },
            );
        }
    }

    pub(crate) fn internal_error(
        &mut self,
        run: *mut uapi::Run,
        suberror: u32,
        data: [u64; 4],
    ) -> Next {
        // SAFETY: our run page.
        unsafe {
            ptr::write_volatile(
                ptr::addr_of_mut!((*run).exit_reason),
                uapi::RVMM_EXIT_INTERNAL_ERROR,
            );
            ptr::write_volatile(
                ptr::addr_of_mut!((*run).internal),
                uapi::ExitInternal {
                    suberror,
                    ndata: 4,
                    data,
                },
            );
        }
        Next::User
    }
}
