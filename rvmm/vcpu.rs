// SPDX-License-Identifier: GPL-2.0

//! A vCPU: its VMCS, the guest state rvmm keeps beside it, its shadow MMU, and the run
//! loop. This file holds the vCPU and its ioctls; [`vmcs`] sets the VMCS up, [`state`]
//! holds the guest's registers, [`roots`] its shadow root from the VM's pool,
//! [`section`] the interrupts-off run section, [`exit`] one handler per exit reason,
//! [`lapic`] and [`realmode`] the local APIC and real mode, [`stats`] its counters.
//!
//! The VMCS is current only inside an interrupts-off section (see `vmx::CurrentVmcs`):
//! the run loop enters and leaves the guest as often as it can inside one such section
//! (fast exits: CPUID, CR and MSR accesses, shadow page faults), and leaves it, VMCLEARs
//! the VMCS and puts back whatever VMCS was current before, when the host needs the CPU
//! (an interrupt, need_resched, a signal) or userspace must see the exit. Because the
//! VMCS is always clear outside, a vCPU may run on any CPU next time: the per-CPU host
//! fields are written at each section's start.

use core::ptr::{self, addr_of_mut};
use core::sync::atomic::AtomicU64;

use kernel::{new_mutex, page::Page, prelude::*, sync::Arc, sync::Mutex};
use rvmm_core::caps::VmxBasic;
use rvmm_core::mmu::mode::*;
use rvmm_core::mmu::pool::SpId;
use rvmm_core::mmu::PagingMode;
use rvmm_uapi as uapi;
use x86::msr;

use crate::ffi::*;
use crate::mmu::MemSlots;
use crate::vmx::{self, CurrentVmcs, Gprs};

mod exit;
mod lapic;
mod realmode;
mod roots;
mod section;
mod state;
mod stats;
mod vmcs;

use realmode::RFLAGS_VM;
use roots::RootLoad;
use rvmm_core::mmu::root_hints::RootHints;
use section::{xgetbv0, SECTION_BUDGET_US};
use stats::Stats;

/// x87/SSE/AVX state of the guest (standard XSAVE format; FXSAVE uses its first 512
/// bytes).
#[repr(C, align(64))]
struct FxArea([u8; 1024]);

/// XCR0 components rvmm gives guests: x87, SSE, AVX.
pub(crate) const GUEST_XCR0_SUPPORTED: u64 = 0x7;

/// Work left from the last exit to userspace, finished before the next entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pending {
    None,
    /// An IN: the data is in the run page. As KVM does, the instruction completes (RIP
    /// moves past it) on the next run, so registers read during the exit show it
    /// unexecuted; a RIP changed by userspace in between cancels the completion.
    IoIn {
        size: u8,
        rip: u64,
        len: u8,
    },
    /// An OUT: completes (RIP moves past it) on the next run, as an IN does.
    IoOut {
        rip: u64,
        len: u8,
    },
    /// A VMCALL: the result is in the run page.
    Hypercall,
    /// An INS's port read: the data is in the run page, and the instruction runs
    /// again with it.
    PortIn {
        port: u16,
        size: u8,
    },
    /// An MMIO read of `len` bytes at `gpa`: the data is in the run page, and the
    /// instruction runs again with it.
    MmioRead {
        gpa: u64,
        len: u8,
    },
    /// An MMIO write went to userspace: the instruction's next one, if any, follows.
    MmioWrite,
}

pub(crate) struct VcpuInner {
    /// The VMCS region (owned; its physical address is `vmcs_pa`).
    _vmcs: Page,
    /// MSR bitmap: every MSR access exits except those to FS/GS/KernelGS base, which are
    /// guest state the CPU (VMCS fields) or the run section (KERNEL_GS_BASE) switches.
    _msr_bitmap: Page,
    msr_bitmap_pa: u64,
    vmcs_pa: u64,
    gprs: Gprs,
    /// Guest views of the control registers and EFER.
    cr0: u64,
    cr3: u64,
    cr4: u64,
    cr8: u64,
    efer: u64,
    cr2: u64,
    dr: [u64; 8],
    /// The guest's DR0-DR3 are in the CPU (this run section).
    guest_drs_loaded: bool,
    /// MSRs switched by hand around the guest (reset value 0, never the host's: the
    /// host's SYSCALL entry point must not be where a guest SYSCALL lands).
    kernel_gs_base: u64,
    syscall_msrs: [u64; 4],
    /// IA32_MISC_ENABLE as the guest last wrote it.
    misc_enable: u64,
    /// The machine-check banks (never an error in them).
    mca: rvmm_core::mca::Mca,

    fx: KBox<FxArea>,
    /// The guest's FPU/SSE/AVX state is in the CPU (between `load_guest_context` and
    /// `save_guest_context`), not in `fx`.
    guest_fpu_loaded: bool,
    /// The host has XSAVE with x87, SSE and AVX enabled: the guest gets them too, and
    /// its state is switched with XSAVE/XRSTOR (else FXSAVE/FXRSTOR, and no XSAVE).
    pub(crate) xsave: bool,
    /// The guest's XCR0.
    pub(crate) xcr0: u64,
    /// VM-entry controls without "IA-32e mode guest".
    entry_base: u32,
    /// Primary processor-based controls without interrupt-window exiting.
    proc_base: u32,
    /// VMX-preemption timer value written before each entry (0: no timer). It bounds the
    /// time in the guest even where external interrupts fail to exit: Bochs 2.7 takes no
    /// external-interrupt exit while the guest has RFLAGS.IF = 0.
    preemption_quantum: u64,
    /// The preemption timer counts at the TSC rate >> this.
    preemption_shift: u32,
    /// How long a run section may go on handling exits with interrupts off (TSC
    /// ticks): `SECTION_BUDGET_US`.
    section_budget: u64,
    /// When the current run section started (TSC): a flushing instruction's sync in
    /// steps starts a step early in a section (see `sync_late`).
    section_tsc: u64,
    /// The preemption timer field holds a value shortened for the APIC timer.
    preemption_short: bool,
    /// The in-kernel local APIC (`RVMM_CREATE_IRQCHIP`) and the VM's mailboxes.
    apic: Option<rvmm_core::apic::Apic>,
    irq: Option<Arc<crate::apic::Irqchip>>,
    /// The VM's `RVMM_SET_HYPERCALL_EXITS` mask (bit n: VMCALL n exits to userspace).
    hypercall_exits: Arc<AtomicU64>,
    /// The guest executed HLT with interrupts on: it sleeps until an interrupt is due.
    halted: bool,
    /// An NMI from the APIC waits for the guest to be able to take it.
    pending_nmi: bool,
    /// VMX has virtual NMIs (and so NMI-window exiting); the window controls set now.
    virtual_nmis: bool,
    irq_window: bool,
    nmi_window: bool,
    /// The vCPU waits for a start-up IPI (after INIT, or as userspace set it).
    wait_sipi: bool,
    /// Real mode and mode switches (see `realmode`).
    real: realmode::RealMode,
    /// A vector from the 8259s (an ExtINT message) waiting for the guest.
    pending_extint: Option<u8>,
    /// The VMCS's TSC offset (guest TSC = host TSC + offset).
    tsc_offset: u64,
    /// The virtual-APIC page of the CPU's TPR shadow (where VMX has it and the vCPU has
    /// an APIC): the guest's MOV CR8 reads and writes its byte 0x80 without exits.
    vapic: Option<Page>,
    /// The address of its VTPR byte in the direct map (0: no TPR shadow).
    vapic_tpr: usize,
    /// The VMCS virtualizes xAPIC accesses (APIC-access page, APIC-register
    /// virtualization): the virtual-APIC page shows the APIC's registers to reads
    /// (`lapic::vapic_sync`), and writes exit as APIC writes.
    apicv: bool,
    /// The ICR's high half as rvmm last wrote it to the virtual-APIC page: a different
    /// value there is the guest's (`lapic::vapic_pull`).
    vapic_icr2: u32,
    /// The ICR's low half likewise (a different value: a self-IPI the CPU virtualized).
    vapic_icr_lo: u32,
    /// The VMCS has virtual-interrupt delivery (with `apicv`, where the CPU has it):
    /// the CPU delivers the APIC's vectors and virtualizes EOIs; `vid_status` is the
    /// guest interrupt status as last written or read (see `lapic::vid_pull`).
    vid: bool,
    vid_status: u16,
    /// The CPU delivered a virtual interrupt in the last run (see
    /// `lapic::vid_vectoring`).
    vid_delivered: bool,
    /// CR4 bits the guest may set: those of the features its CPUID shows.
    cr4_allowed: u64,
    /// The guest's CPUID configuration (what does not change while it runs).
    cpuid_cfg: rvmm_core::cpuid::Config,
    /// The guest's answers for the basic and extended leaves that have no subleaves
    /// (leaf 1 without OSXSAVE, which follows CR4), computed once: a CPUID exit reads
    /// them instead of running the host's CPUID.
    cpuid_basic: [[u32; 4]; CPUID_CACHED_BASIC],
    cpuid_ext: [[u32; 4]; CPUID_CACHED_EXT],
    /// The host's highest basic CPUID leaf, and its TSC frequency (kHz).
    host_max_basic: u32,
    tsc_khz: u32,
    /// An external interrupt userspace queued (RVMM_INTERRUPT), waiting for the guest to
    /// be interruptible.
    pending_irq: Option<u8>,
    /// An exception userspace queued.
    pending_exception: Option<(u8, Option<u32>)>,
    /// CPUID entries set by userspace (function, index, significant index, eax..edx).
    cpuid: KVec<uapi::CpuidEntry>,
    // Shadow MMU: the VM's pool for 4-level paging (one vCPU), else a TLB-like shadow
    // of this vCPU's own.
    shadow: Arc<crate::shadow::Shadow>,
    /// This vCPU's index (for the pool's remote flushes).
    vcpu_id: u32,
    /// The root this vCPU holds its active reference on, and its pool generation.
    pinned_active: Option<SpId>,
    pinned_gen: u64,
    /// Recent roots by CR3 (direct-mapped), each with a reference of its own: a MOV CR3
    /// to one of them needs no lock (see `load_pool_root`).
    hints: RootHints,
    /// The pool root in use and the pool generation it is from.
    proot: Option<SpId>,
    proot_gen: u64,
    on_pool: bool,
    /// The CPU lets the guest run INVPCID (exiting on it): CPUID shows INVPCID.
    pub(crate) invpcid: bool,
    /// RDTSCP and RDPID run in the guest (the "enable RDTSCP" control is on).
    pub(crate) rdtscp: bool,
    /// The guest's IA32_TSC_AUX (in the CPU during run sections when `rdtscp`).
    tsc_aux: u64,
    /// The guest's IA32_TSC_ADJUST: what its writes to it and to the TSC added.
    tsc_adjust: u64,
    mode: PagingMode,
    /// Under PAE paging, the PDPTE registers: what the last load (MOV CR3, a paging
    /// change) read from the PDPT, which walks use instead of memory; `None` when a
    /// load happened and the registers are read at their next use.
    pdptes: Option<[u64; 4]>,
    slots: Arc<MemSlots>,
    need_reset: bool,
    state_checked: bool,
    /// MAXPHYADDR as the guest's CPUID says (leaf 0x80000008, at most the host's):
    /// address bits above it are reserved in its page tables and CR3.
    maxphyaddr: u8,
    host_maxphyaddr: u8,
    /// 1-GiB pages, as the guest's CPUID says (leaf 0x80000001, EDX bit 26): without
    /// them a PDPTE's PS bit is reserved.
    gbpages: bool,
    pending: Pending,
    /// MMIO reads answered for the instruction being emulated.
    mmio_reads: exit::MmioReads,
    triple_fault: bool,
    /// (gva, rip) of the last shadow fault, and how often it repeated.
    last_fault: (u64, u64),
    repeat_faults: u32,
    pub(crate) stats: Arc<Stats>,
}

#[pin_data]
pub(crate) struct Vcpu {
    pub(crate) id: u32,
    run: Page,
    /// The counters, readable while the vCPU runs (`inner` is locked then).
    stats: Arc<Stats>,
    #[pin]
    /// On the heap: 4.3 KB, which must not be moved through kernel stack frames.
    inner: Mutex<KBox<VcpuInner>>,
}

/// Basic CPUID leaves kept in `VcpuInner::cpuid_basic` (0..=0x15), and which of them
/// (no subleaves, nothing that changes while the guest runs).
pub(crate) const CPUID_CACHED_BASIC: usize = 0x16;
pub(crate) const CPUID_CACHEABLE: u32 = !((1 << 4)
    | (1 << 7)
    | (1 << 0xb)
    | (1 << 0xd)
    | (1 << 0xf)
    | (1 << 0x10)
    | (1 << 0x12)
    | (1 << 0x14));
/// Extended leaves kept (0x8000_0000..=0x8000_0008).
pub(crate) const CPUID_CACHED_EXT: usize = 9;

/// Exceptions that exit outside real mode: #PF (shadow paging) and #MC, which belongs
/// to the host (without the bit it would be delivered to the guest, SDM 27.1).
pub(crate) const EXCEPTION_BITMAP: u64 =
    (1 << rvmm_core::exit::vector::PF) | (1 << rvmm_core::exit::vector::MC);

/// What the run loop does after an exit.
pub(crate) enum Next {
    /// Re-enter at once (still inside the interrupts-off section).
    Fast,
    /// Leave the section (let interrupts and the scheduler in), then re-enter.
    Host,
    /// Return to userspace with the exit in the run page.
    User,
}

impl Vcpu {
    pub(crate) fn new(
        id: u32,
        shadow: Arc<crate::shadow::Shadow>,
        irq: Option<Arc<crate::apic::Irqchip>>,
        hypercall_exits: Arc<AtomicU64>,
    ) -> Result<Arc<Self>> {
        let basic = VmxBasic(vmx::rdmsr(msr::IA32_VMX_BASIC).ok_or(ENODEV)?);
        let vmcs = Page::alloc_page(crate::vm_gfp() | __GFP_ZERO)?;
        let rev = basic.revision_id().to_ne_bytes();
        // SAFETY: 4 bytes into a 4-KiB page we own.
        unsafe { vmcs.write_raw(rev.as_ptr(), 0, 4)? };
        // SAFETY: a page we own.
        let vmcs_pa = unsafe { rvmm_page_to_phys(vmcs.as_ptr().cast()) };
        let run = Page::alloc_page(crate::vm_gfp() | __GFP_ZERO)?;
        let msr_bitmap = Page::alloc_page(crate::vm_gfp())?;
        let ones = [0xffu8; 256];
        for off in (0..4096).step_by(256) {
            // SAFETY: 256 bytes within a 4096-byte page we own.
            unsafe { msr_bitmap.write_raw(ones.as_ptr(), off, ones.len())? };
        }
        // FS_BASE, GS_BASE and KERNEL_GS_BASE (0xc000_0100..=0xc000_0102) share byte 0x20 of
        // the high-MSR read (0x400) and write (0xc00) bitmaps (SDM 25.6.9): bits 0-2 clear.
        const PASSTHROUGH: [u32; 3] = [
            msr::IA32_FS_BASE,
            msr::IA32_GS_BASE,
            msr::IA32_KERNEL_GSBASE,
        ];
        let mut byte = 0xffu8;
        for m in PASSTHROUGH {
            byte &= !(1 << ((m - 0xc000_0100) % 8));
        }
        for base in [0x400, 0xc00] {
            // SAFETY: one byte within the page.
            unsafe { msr_bitmap.write_raw(&byte, base + 0x20, 1)? };
        }
        // SAFETY: a page we own.
        let msr_bitmap_pa = unsafe { rvmm_page_to_phys(msr_bitmap.as_ptr().cast()) };
        let mut fx = KBox::new(FxArea([0; 1024]), crate::vm_gfp())?;
        let xsave = core::arch::x86_64::__cpuid(1).ecx & (1 << 27) != 0
            && xgetbv0() & GUEST_XCR0_SUPPORTED == GUEST_XCR0_SUPPORTED;
        fx.0[0..2].copy_from_slice(&0x37fu16.to_le_bytes()); // FCW
        fx.0[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR
        let host_bits = (core::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff) as u8;
        let host_bits = if host_bits == 0 { 36 } else { host_bits };
        // SAFETY: reads a kernel variable.
        let stats = Arc::new(Stats::new(unsafe { rvmm_tsc_khz() }), crate::vm_gfp())?;
        let stats_inner = stats.clone();
        let inner = KBox::init(
            try_init!(VcpuInner {
            _vmcs: vmcs,
            _msr_bitmap: msr_bitmap,
            msr_bitmap_pa,
            vmcs_pa,
            gprs: Gprs::default(),
            cr0: CR0_PE | (1 << 4),
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            cr2: 0,
            dr: [0, 0, 0, 0, 0xffff_0ff0, 0x400, 0xffff_0ff0, 0x400],
            guest_drs_loaded: false,
            kernel_gs_base: 0,
            misc_enable: exit::MISC_ENABLE_RESET,
            mca: Default::default(),

            syscall_msrs: [0; 4],
            fx,
            guest_fpu_loaded: false,
            xsave,
            xcr0: 1,
            entry_base: 0,
            proc_base: 0,
            preemption_quantum: 0,
            preemption_shift: 0,
            // SAFETY: reads a kernel variable.
            section_budget: (u64::from(unsafe { rvmm_tsc_khz() }).max(1000) * SECTION_BUDGET_US)
                / 1000,
            section_tsc: 0,
            preemption_short: false,
            apic: irq
                .as_ref()
                .map(|_| rvmm_core::apic::Apic::new(id, id == 0)),
            irq,
            hypercall_exits,
            halted: false,
            pending_nmi: false,
            virtual_nmis: false,
            irq_window: false,
            nmi_window: false,
            wait_sipi: false,
            real: Default::default(),
            pending_extint: None,
            tsc_offset: 0,
            vapic: None,
            vapic_tpr: 0,
            apicv: false,
            vapic_icr2: 0,
            vapic_icr_lo: 0,
            vid: false,
            vid_status: 0,
            vid_delivered: false,
            cr4_allowed: 0,
            cpuid_cfg: rvmm_core::cpuid::Config::default(),
            cpuid_basic: [[0; 4]; CPUID_CACHED_BASIC],
            cpuid_ext: [[0; 4]; CPUID_CACHED_EXT],
            host_max_basic: core::arch::x86_64::__cpuid(0).eax,
            // SAFETY: reads a kernel variable.
            tsc_khz: unsafe { rvmm_tsc_khz() },
            pending_irq: None,
            pending_exception: None,
            cpuid: KVec::new(),
            shadow,
            vcpu_id: id,
            pinned_active: None,
            pdptes: None,
            pinned_gen: u64::MAX,
            hints: RootHints::new(),
            proot: None,
            proot_gen: 0,
            on_pool: false,
            invpcid: false,
            rdtscp: false,
            tsc_aux: 0,
            tsc_adjust: 0,
            mode: PagingMode::None,
            slots: Arc::new(MemSlots::new(), crate::vm_gfp())?,
            need_reset: true,
            state_checked: false,
            maxphyaddr: host_bits,
            host_maxphyaddr: host_bits,
            gbpages: false,
            pending: Pending::None,
            mmio_reads: exit::MmioReads::default(),
            triple_fault: false,
            last_fault: (0, 0),
            repeat_faults: 0,
            stats: stats_inner,
        }? Error),
            crate::vm_gfp(),
        )?;
        // Set up before it is behind its lock (no lock nests in the VM's vCPU list's).
        let mut g = inner;
        let cfg = g.cpuid_config();
        let host = |l: u32| {
            let r = core::arch::x86_64::__cpuid_count(l, 0);
            [r.eax, r.ebx, r.ecx, r.edx]
        };
        g.cr4_allowed = rvmm_core::cpuid::cr4_allowed(
            rvmm_core::cpuid::guest(1, 0, host(1), &cfg),
            rvmm_core::cpuid::guest(7, 0, host(7), &cfg),
        );
        g.init_vmcs()?;
        g.cpuid_cfg = g.cpuid_config();
        let cfg = rvmm_core::cpuid::Config {
            osxsave: false,
            ..g.cpuid_cfg
        };
        for (l, e) in g.cpuid_basic.iter_mut().enumerate() {
            *e = rvmm_core::cpuid::guest(l as u32, 0, host(l as u32), &cfg);
        }
        for (l, e) in g.cpuid_ext.iter_mut().enumerate() {
            let leaf = 0x8000_0000 + l as u32;
            *e = rvmm_core::cpuid::guest(leaf, 0, host(leaf), &cfg);
        }
        g.cpuid_paging();
        if let (Some(irq), Some(apic)) = (&g.irq, &g.apic) {
            irq.add_vcpu(id, &apic.addressing(), apic.mmio_base())?;
        }
        let inner = g;
        let vcpu = Arc::pin_init(
            try_pin_init!(Self { id, run, stats, inner <- new_mutex!(inner) }),
            crate::vm_gfp(),
        )?;
        Ok(vcpu)
    }

    /// The run page, for mmap.
    pub(crate) fn run_page(&self) -> &Page {
        &self.run
    }

    fn run_ptr(&self) -> *mut uapi::Run {
        // SAFETY: the run page is ours for the vCPU's lifetime and mapped in the direct
        // map; `uapi::Run` fits in it (checked below).
        unsafe { rvmm_pa_to_va(rvmm_page_to_phys(self.run.as_ptr().cast())).cast() }
    }

    pub(crate) fn get_regs(&self) -> Result<uapi::Regs> {
        self.inner.lock().with_vmcs(|g, vmcs| g.regs(vmcs))
    }

    pub(crate) fn set_regs(&self, r: &uapi::Regs) -> Result {
        self.inner.lock().with_vmcs(|g, vmcs| g.set_regs(vmcs, r))
    }

    pub(crate) fn get_sregs(&self) -> Result<uapi::Sregs> {
        self.inner.lock().with_vmcs(|g, vmcs| g.sregs(vmcs))
    }

    pub(crate) fn set_sregs(&self, s: &uapi::Sregs) -> Result {
        self.inner
            .lock()
            .with_vmcs(|g, vmcs| g.set_sregs(vmcs, s))?
    }

    /// `RVMM_INTERRUPT`: queues an event for the next entry.
    pub(crate) fn queue_event(&self, ev: &uapi::Interrupt) -> Result {
        let mut g = self.inner.lock();
        match ev.kind {
            uapi::RVMM_EVENT_INTERRUPT if ev.vector >= 32 && ev.vector < 256 => {
                if g.pending_irq.is_some() {
                    return Err(EBUSY);
                }
                g.pending_irq = Some(ev.vector as u8);
            }
            uapi::RVMM_EVENT_EXCEPTION if ev.vector < 32 && ev.vector != 2 => {
                let ec = (ev.has_error_code != 0).then_some(ev.error_code);
                if ec.is_some() != rvmm_core::exit::vector::has_error_code(ev.vector as u8) {
                    user_pr!(
                        pr_info,
                        "vcpu {}: exception {} {} an error code\n",
                        self.id,
                        ev.vector,
                        if ec.is_some() { "takes no" } else { "needs" }
                    );
                    return Err(EINVAL);
                }
                g.pending_exception = Some((ev.vector as u8, ec));
            }
            _ => {
                user_pr!(
                    pr_info,
                    "vcpu {}: bad event: kind {} vector {}\n",
                    self.id,
                    ev.kind,
                    ev.vector
                );
                return Err(EINVAL);
            }
        }
        Ok(())
    }

    /// `RVMM_SET_MP_STATE`: runnable (0) or waiting for a start-up IPI (1).
    pub(crate) fn set_mp_state(&self, state: u32) -> Result {
        let mut g = self.inner.lock();
        match state {
            uapi::RVMM_MP_STATE_RUNNABLE => g.wait_sipi = false,
            uapi::RVMM_MP_STATE_WAIT_SIPI => {
                g.wait_sipi = true;
                g.halted = false;
            }
            _ => {
                user_pr!(pr_info, "vcpu {}: bad MP state {}\n", self.id, state);
                return Err(EINVAL);
            }
        }
        Ok(())
    }

    /// `RVMM_SET_CPUID`.
    pub(crate) fn set_cpuid(&self, entries: &[uapi::CpuidEntry]) -> Result {
        let mut v = KVec::with_capacity(entries.len(), crate::vm_gfp())?;
        for e in entries {
            v.push(*e, crate::vm_gfp())?;
        }
        let mut g = self.inner.lock();
        g.cpuid = v;
        g.cpuid_paging();
        Ok(())
    }

    /// `RVMM_GET_MSRS` / `RVMM_SET_MSRS`: returns how many entries were done (stops at
    /// the first MSR rvmm does not virtualize, or a value the guest could not write).
    pub(crate) fn msrs(&self, m: &mut uapi::Msrs, set: bool) -> Result<usize> {
        let n = (m.nmsrs as usize).min(m.entries.len());
        self.inner.lock().with_vmcs(|g, vmcs| {
            for (i, e) in m.entries[..n].iter_mut().enumerate() {
                if set {
                    if !g.set_msr(vmcs, e.index, e.data) {
                        return i;
                    }
                } else {
                    match g.get_msr(vmcs, e.index) {
                        Some(v) => e.data = v,
                        None => return i,
                    }
                }
            }
            n
        })
    }

    /// Adds this vCPU's counters to `out` (without waiting for a running vCPU).
    pub(crate) fn add_stats(&self, out: &mut uapi::VmStats) {
        self.stats.add_to(out);
    }

    /// A new memory map: taken now unless the vCPU is in RUN (it takes it itself).
    /// Returns the map it let go of, for the caller to drop outside its locks.
    pub(crate) fn offer_memory_map(&self, slots: &Arc<MemSlots>) -> Option<Arc<MemSlots>> {
        let mut g = self.inner.try_lock()?;
        if g.slots.generation >= slots.generation {
            return None;
        }
        g.need_reset = true;
        Some(core::mem::replace(&mut g.slots, slots.clone()))
    }

    /// `RVMM_RUN`: runs until an exit userspace must see, or a signal.
    pub(crate) fn run(&self, vm: &crate::vm::Vm) -> Result<isize> {
        const _: () = assert!(core::mem::size_of::<uapi::Run>() <= 4096);
        let run = self.run_ptr();
        // SAFETY: a query of the current task.
        if unsafe { rvmm_task_has_io_bitmap() } {
            user_pr!(
                pr_info,
                "vcpu {}: the calling task uses ioperm(); rvmm cannot run vCPUs from it\n",
                self.id
            );
            return Err(EINVAL);
        }
        let mut g = self.inner.lock();
        // SAFETY: `run` points at our run page (see `run_ptr`); userspace may write it
        // concurrently, which only affects this vCPU.
        unsafe {
            ptr::write_volatile(ptr::addr_of_mut!((*run).ready_for_interrupt_injection), 0);
            if ptr::read_volatile(addr_of_mut!((*run).immediate_exit)) != 0 {
                ptr::write_volatile(ptr::addr_of_mut!((*run).exit_reason), uapi::RVMM_EXIT_INTR);
                return Err(EINTR);
            }
        }
        loop {
            // SAFETY: plain queries of the current task.
            if unsafe { rvmm_signal_pending() } {
                // SAFETY: as above.
                unsafe {
                    ptr::write_volatile(ptr::addr_of_mut!((*run).exit_reason), uapi::RVMM_EXIT_INTR)
                };
                return Err(EINTR);
            }
            // SAFETY: we hold no spinlock and interrupts are on.
            unsafe { rvmm_cond_resched() };
            // The memory map the guest runs on: the VM's current one (the pre-entry
            // check sends the vCPU back here when it changes). The old one is unpinned
            // when the last vCPU lets go of it.
            if g.slots.generation != vm.slots_generation() {
                let old = core::mem::replace(&mut g.slots, vm.slots());
                g.need_reset = true;
                // The old map is let go of without this vCPU's lock: its last reference
                // unpins pages, which takes the mm's lock.
                drop(g);
                drop(old);
                g = self.inner.lock();
            }
            g.shadow.top_up();
            g.take_init_sipi();
            if g.wait_sipi {
                if g.irq.is_none() {
                    // Nothing can send it the start-up IPI it waits for.
                    user_pr!(
                        pr_info,
                        "vcpu {}: waits for a start-up IPI in a VM without an irqchip; make it runnable (RVMM_SET_MP_STATE)\n",
                        self.id
                    );
                    return Err(EINVAL);
                }
                if g.sipi_wait().is_err() {
                    // SAFETY: our run page.
                    unsafe {
                        ptr::write_volatile(
                            ptr::addr_of_mut!((*run).exit_reason),
                            uapi::RVMM_EXIT_INTR,
                        )
                    };
                    return Err(EINTR);
                }
                continue;
            }
            if g.halted && g.halt_wait().is_err() {
                // SAFETY: our run page.
                unsafe {
                    ptr::write_volatile(ptr::addr_of_mut!((*run).exit_reason), uapi::RVMM_EXIT_INTR)
                };
                return Err(EINTR);
            }
            if let Next::User = g.run_section(run, self.id) {
                g.stats.user_exits.inc();
                return Ok(0);
            }
        }
    }
}
