// SPDX-License-Identifier: GPL-2.0

//! A vCPU: its VMCS, the guest state rvmm keeps beside it, its shadow MMU, and the run
//! loop. Exit handlers are in [`exit`].
//!
//! The VMCS is current only inside an interrupts-off section (see `vmx::CurrentVmcs`):
//! the run loop enters and leaves the guest as often as it can inside one such section
//! (fast exits: CPUID, CR and MSR accesses, shadow page faults), and leaves it, VMCLEARs
//! the VMCS and puts back whatever VMCS was current before, when the host needs the CPU
//! (an interrupt, need_resched, a signal) or userspace must see the exit. Because the
//! VMCS is always clear outside, a vCPU may run on any CPU next time: the per-CPU host
//! fields are written at each section's start.

use core::ptr::{self, addr_of_mut};
use core::sync::atomic::Ordering;

use kernel::{new_mutex, page::Page, prelude::*, sync::Arc, sync::Mutex};
use rvmm_core::caps::{AllowedControls, VmxBasic};
use rvmm_core::mmu::mode::*;
use rvmm_core::mmu::pool::NIL;
use rvmm_core::mmu::PagingMode;
use rvmm_uapi as uapi;
use x86::msr;
use x86::vmx::vmcs::control::{
    EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls,
};
use x86::vmx::vmcs::{control, guest, host, ro};

use crate::ffi::*;
use crate::mmu::MemSlots;
use crate::vmx::{self, Gprs, HostState};

mod exit;
mod lapic;
mod realmode;
mod stats;

use realmode::RFLAGS_VM;
use stats::Stats;

/// Shadow table pages per vCPU (the pool that issue #4 turns into a shared cache).

/// The host's values of what a run section switches to the guest's.
struct HostContext {
    kernel_gs_base: u64,
    /// The SYSCALL MSRs.
    syscall: [u64; 4],
    xcr0: u64,
}

/// The SYSCALL MSRs, in the order of `VcpuInner::syscall_msrs`.
const SYSCALL_MSRS: [u32; 4] = [
    msr::IA32_STAR,
    msr::IA32_LSTAR,
    msr::IA32_CSTAR,
    msr::IA32_FMASK,
];

/// x87/SSE/AVX state of the guest (standard XSAVE format; FXSAVE uses its first 512
/// bytes).
#[repr(C, align(64))]
struct FxArea([u8; 1024]);

/// XCR0 components rvmm gives guests: x87, SSE, AVX.
pub(crate) const GUEST_XCR0_SUPPORTED: u64 = 0x7;

fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV of XCR0 with CR4.OSXSAVE set (callers check `xsave`).
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

/// # Safety
/// `v` must be a valid XCR0 value for this CPU.
unsafe fn xsetbv0(v: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        core::arch::asm!("xsetbv", in("ecx") 0u32, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nomem, nostack))
    };
}

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
    /// An INS: the data is in the run page, for guest-physical `gpa`.
    StringIn {
        gpa: u64,
        size: u8,
    },
    /// An MMIO read: the data is in the run page.
    MmioRead {
        op: rvmm_core::emulate::MmioOp,
        long: bool,
    },
}

/// Recent roots a vCPU keeps a reference on (as many as the default root cache).
const HINTS: usize = 64;

/// The hint slot of a CR3 value (its page, and a PAE PDPT's place in it).
fn hint_slot(cr3: u64) -> usize {
    (((cr3 >> 12) ^ (cr3 >> 5)) as usize) & (HINTS - 1)
}

/// A recent root of a vCPU: for CR3 `cr3` under the paging state `key`.
#[derive(Clone, Copy)]
struct RootHint {
    cr3: u64,
    key: u64,
    root: u32,
    pa: u64,
    gen: u64,
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
    /// MSRs switched by hand around the guest (reset value 0, never the host's: the
    /// host's SYSCALL entry point must not be where a guest SYSCALL lands).
    kernel_gs_base: u64,
    syscall_msrs: [u64; 4],
    fx: KBox<FxArea>,
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
    /// The preemption timer field holds a value shortened for the APIC timer.
    preemption_short: bool,
    /// The in-kernel local APIC (`RVMM_CREATE_IRQCHIP`) and the VM's mailboxes.
    apic: Option<rvmm_core::apic::Apic>,
    irq: Option<Arc<crate::apic::Irqchip>>,
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
    /// Real mode, run in virtual-8086 mode (see `realmode`).
    rmode: bool,
    /// A vector from the 8259s (an ExtINT message) waiting for the guest.
    pending_extint: Option<u8>,
    /// The VMCS's TSC offset (guest TSC = host TSC + offset).
    tsc_offset: u64,
    /// The virtual-APIC page of the CPU's TPR shadow (where VMX has it and the vCPU has
    /// an APIC): the guest's MOV CR8 reads and writes its byte 0x80 without exits.
    vapic: Option<Page>,
    /// The address of its VTPR byte in the direct map (0: no TPR shadow).
    vapic_tpr: usize,
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
    pinned_active: u32,
    pinned_gen: u64,
    /// Recent roots by CR3 (direct-mapped), each with a reference of its own: a MOV CR3
    /// to one of them needs no lock (see `load_pool_root`).
    hints: [RootHint; HINTS],
    hint_mask: usize,
    /// The pool root in use (pool::NIL when none) and the pool generation it is from.
    proot: u32,
    proot_gen: u64,
    on_pool: bool,
    /// The CPU lets the guest run INVPCID (exiting on it): CPUID shows INVPCID.
    pub(crate) invpcid: bool,
    mode: PagingMode,
    slots: Arc<MemSlots>,
    need_reset: bool,
    state_checked: bool,
    maxphyaddr: u8,
    pending: Pending,
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
    inner: Mutex<VcpuInner>,
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

/// The longest a run section goes on handling exits (with interrupts off) before it
/// lets the host in, in microseconds. Host interrupts end a section sooner.
const SECTION_BUDGET_US: u64 = 250;

/// What the run loop does after an exit.
pub(crate) enum Next {
    /// Re-enter at once (still inside the interrupts-off section).
    Fast,
    /// Leave the section (let interrupts and the scheduler in), then re-enter.
    Host,
    /// Return to userspace with the exit in the run page.
    User,
}

fn vmw(field: u32, value: u64) {
    // SAFETY: called only while this vCPU's VMCS is current (all callers are inside
    // `with_vmcs` or the run section); a failing VMWRITE leaves the VMCS unchanged.
    let _ = unsafe { vmx::vmwrite(field, value) };
}

fn vmr(field: u32) -> u64 {
    // SAFETY: as for `vmw`.
    unsafe { vmx::vmread(field) }.unwrap_or(0)
}

fn seg_ar(s: &uapi::Segment) -> u64 {
    if s.unusable != 0 {
        return 1 << 16;
    }
    u64::from(s.seg_type & 0xf)
        | u64::from(s.s & 1) << 4
        | u64::from(s.dpl & 3) << 5
        | u64::from(s.present & 1) << 7
        | u64::from(s.avl & 1) << 12
        | u64::from(s.l & 1) << 13
        | u64::from(s.db & 1) << 14
        | u64::from(s.g & 1) << 15
}

fn seg_from_ar(base: u64, limit: u32, selector: u16, ar: u64) -> uapi::Segment {
    uapi::Segment {
        base,
        limit,
        selector,
        seg_type: (ar & 0xf) as u8,
        s: (ar >> 4 & 1) as u8,
        dpl: (ar >> 5 & 3) as u8,
        present: (ar >> 7 & 1) as u8,
        avl: (ar >> 12 & 1) as u8,
        l: (ar >> 13 & 1) as u8,
        db: (ar >> 14 & 1) as u8,
        g: (ar >> 15 & 1) as u8,
        unusable: (ar >> 16 & 1) as u8,
        padding: 0,
    }
}

/// (selector, base, limit, access rights) VMCS fields of each segment, in the order of
/// `uapi::Sregs`.
const SEGS: [(u32, u32, u32, u32); 8] = [
    (
        guest::CS_SELECTOR,
        guest::CS_BASE,
        guest::CS_LIMIT,
        guest::CS_ACCESS_RIGHTS,
    ),
    (
        guest::DS_SELECTOR,
        guest::DS_BASE,
        guest::DS_LIMIT,
        guest::DS_ACCESS_RIGHTS,
    ),
    (
        guest::ES_SELECTOR,
        guest::ES_BASE,
        guest::ES_LIMIT,
        guest::ES_ACCESS_RIGHTS,
    ),
    (
        guest::FS_SELECTOR,
        guest::FS_BASE,
        guest::FS_LIMIT,
        guest::FS_ACCESS_RIGHTS,
    ),
    (
        guest::GS_SELECTOR,
        guest::GS_BASE,
        guest::GS_LIMIT,
        guest::GS_ACCESS_RIGHTS,
    ),
    (
        guest::SS_SELECTOR,
        guest::SS_BASE,
        guest::SS_LIMIT,
        guest::SS_ACCESS_RIGHTS,
    ),
    (
        guest::TR_SELECTOR,
        guest::TR_BASE,
        guest::TR_LIMIT,
        guest::TR_ACCESS_RIGHTS,
    ),
    (
        guest::LDTR_SELECTOR,
        guest::LDTR_BASE,
        guest::LDTR_LIMIT,
        guest::LDTR_ACCESS_RIGHTS,
    ),
];

impl Vcpu {
    pub(crate) fn new(
        id: u32,
        shadow: Arc<crate::shadow::Shadow>,
        irq: Option<Arc<crate::apic::Irqchip>>,
    ) -> Result<Arc<Self>> {
        let basic = VmxBasic(vmx::rdmsr(msr::IA32_VMX_BASIC).ok_or(ENODEV)?);
        let vmcs = Page::alloc_page(GFP_KERNEL_ACCOUNT | __GFP_ZERO)?;
        let rev = basic.revision_id().to_ne_bytes();
        // SAFETY: 4 bytes into a 4-KiB page we own.
        unsafe { vmcs.write_raw(rev.as_ptr(), 0, 4)? };
        // SAFETY: a page we own.
        let vmcs_pa = unsafe { rvmm_page_to_phys(vmcs.as_ptr().cast()) };
        let run = Page::alloc_page(GFP_KERNEL_ACCOUNT | __GFP_ZERO)?;
        let msr_bitmap = Page::alloc_page(GFP_KERNEL_ACCOUNT)?;
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
        let mut fx = KBox::new(FxArea([0; 1024]), GFP_KERNEL_ACCOUNT)?;
        let xsave = core::arch::x86_64::__cpuid(1).ecx & (1 << 27) != 0
            && xgetbv0() & GUEST_XCR0_SUPPORTED == GUEST_XCR0_SUPPORTED;
        fx.0[0..2].copy_from_slice(&0x37fu16.to_le_bytes()); // FCW
        fx.0[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR
        let maxphyaddr = (core::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff) as u8;
        // SAFETY: reads a kernel variable.
        let stats = Arc::new(Stats::new(unsafe { rvmm_tsc_khz() }), GFP_KERNEL_ACCOUNT)?;
        let inner = VcpuInner {
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
            kernel_gs_base: 0,
            syscall_msrs: [0; 4],
            fx,
            xsave,
            xcr0: 1,
            entry_base: 0,
            proc_base: 0,
            preemption_quantum: 0,
            preemption_shift: 0,
            // SAFETY: reads a kernel variable.
            section_budget: (u64::from(unsafe { rvmm_tsc_khz() }).max(1000) * SECTION_BUDGET_US)
                / 1000,
            preemption_short: false,
            apic: irq
                .as_ref()
                .map(|_| rvmm_core::apic::Apic::new(id, id == 0)),
            irq,
            halted: false,
            pending_nmi: false,
            virtual_nmis: false,
            irq_window: false,
            nmi_window: false,
            wait_sipi: false,
            rmode: false,
            pending_extint: None,
            tsc_offset: 0,
            vapic: None,
            vapic_tpr: 0,
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
            pinned_active: NIL,
            pinned_gen: u64::MAX,
            hints: [RootHint {
                cr3: 0,
                key: 0,
                root: NIL,
                pa: 0,
                gen: u64::MAX,
            }; HINTS],
            hint_mask: 0,
            proot: rvmm_core::mmu::pool::NIL,
            proot_gen: 0,
            on_pool: false,
            invpcid: false,
            mode: PagingMode::None,
            slots: Arc::new(MemSlots::new(), GFP_KERNEL_ACCOUNT)?,
            need_reset: true,
            state_checked: false,
            maxphyaddr: if maxphyaddr == 0 { 36 } else { maxphyaddr },
            pending: Pending::None,
            triple_fault: false,
            last_fault: (0, 0),
            repeat_faults: 0,
            stats: stats.clone(),
        };
        let vcpu = Arc::pin_init(
            try_pin_init!(Self { id, run, stats, inner <- new_mutex!(inner) }),
            GFP_KERNEL_ACCOUNT,
        )?;
        {
            let mut g = vcpu.inner.lock();
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
            if let (Some(irq), Some(apic)) = (&g.irq, &g.apic) {
                irq.add_vcpu(id, &apic.addressing())?;
            }
        }
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
        self.inner.lock().with_vmcs(|g| g.regs())
    }

    pub(crate) fn set_regs(&self, r: &uapi::Regs) -> Result {
        self.inner.lock().with_vmcs(|g| g.set_regs(r))
    }

    pub(crate) fn get_sregs(&self) -> Result<uapi::Sregs> {
        self.inner.lock().with_vmcs(|g| g.sregs())
    }

    pub(crate) fn set_sregs(&self, s: &uapi::Sregs) -> Result {
        self.inner.lock().with_vmcs(|g| g.set_sregs(s))?
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
        let mut v = KVec::with_capacity(entries.len(), GFP_KERNEL_ACCOUNT)?;
        for e in entries {
            v.push(*e, GFP_KERNEL_ACCOUNT)?;
        }
        self.inner.lock().cpuid = v;
        Ok(())
    }

    /// `RVMM_GET_MSRS` / `RVMM_SET_MSRS`: returns how many entries were done (stops at
    /// the first MSR rvmm does not virtualize, or a value the guest could not write).
    pub(crate) fn msrs(&self, m: &mut uapi::Msrs, set: bool) -> Result<usize> {
        let n = (m.nmsrs as usize).min(m.entries.len());
        self.inner.lock().with_vmcs(|g| {
            for (i, e) in m.entries[..n].iter_mut().enumerate() {
                if set {
                    if !g.set_msr(e.index, e.data) {
                        return i;
                    }
                } else {
                    match g.get_msr(e.index) {
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
                g.slots = vm.slots();
                g.need_reset = true;
            }
            g.take_init_sipi();
            if g.wait_sipi {
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

impl VcpuInner {
    /// Runs `f` with this vCPU's VMCS current (interrupts off), then clears it and puts
    /// back the VMCS that was current before.
    /// `EIO` if the VMCS cannot be made current: `f` does not run (its VMREADs and
    /// VMWRITEs would go to whatever VMCS is current, perhaps KVM's).
    pub(crate) fn with_vmcs<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> Result<R> {
        // SAFETY: interrupts stay off until `irq_restore`, so this task stays on this
        // CPU, which is in VMX operation while the module is loaded; our VMCS is not
        // active anywhere (it is VMCLEARed whenever a section ends).
        unsafe {
            let flags = rvmm_irq_save();
            let r = match vmx::CurrentVmcs::load(self.vmcs_pa) {
                Ok(_guard) => Ok(f(self)),
                Err(_) => Err(EIO),
            };
            rvmm_irq_restore(flags);
            if r.is_err() {
                user_pr!(pr_err, "VMPTRLD of a vCPU's VMCS failed\n");
            }
            r
        }
    }

    fn init_vmcs(&mut self) -> Result {
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
        let exit = AllowedControls(caps.exit).adjust(
            (ExitControls::HOST_ADDRESS_SPACE_SIZE
                | ExitControls::SAVE_IA32_PAT
                | ExitControls::LOAD_IA32_PAT
                | ExitControls::SAVE_IA32_EFER
                | ExitControls::LOAD_IA32_EFER)
                .bits(),
            0,
        );
        let entry = AllowedControls(caps.entry).adjust(
            (EntryControls::LOAD_IA32_PAT | EntryControls::LOAD_IA32_EFER).bits(),
            0,
        );
        let (Ok(pin), Ok(proc), Ok(exit), Ok(entry)) = (pin, proc, exit, entry) else {
            user_pr!(pr_err, "this CPU lacks VMX controls rvmm needs (pin {:?}, proc {:?}, exit {:?}, entry {:?})\n", pin, proc, exit, entry);
            return Err(EOPNOTSUPP);
        };
        self.entry_base = entry;
        self.virtual_nmis = pin & PinbasedControls::VIRTUAL_NMIS.bits() != 0;
        if pin & PinbasedControls::VMX_PREEMPTION_TIMER.bits() != 0 {
            // The timer counts down at the TSC rate >> IA32_VMX_MISC[4:0]: 4 ms a slice.
            // SAFETY: reads a kernel variable.
            let khz = u64::from(unsafe { rvmm_tsc_khz() }).max(1000);
            self.preemption_shift = (caps.misc & 0x1f) as u32;
            self.preemption_quantum =
                ((khz * 4) >> self.preemption_shift).clamp(1, u64::from(u32::MAX));
        }
        self.proc_base = proc;
        // Secondary controls only for INVPCID (which then exits, with INVLPG exiting);
        // without them a guest INVPCID is #UD and CPUID does not show it.
        let proc2 = if proc & PrimaryControls::SECONDARY_CONTROLS.bits() != 0 {
            AllowedControls(caps.procbased2)
                .adjust(0, SecondaryControls::ENABLE_INVPCID.bits())
                .unwrap_or(0)
        } else {
            0
        };
        self.invpcid = proc2 & SecondaryControls::ENABLE_INVPCID.bits() != 0;
        let mut vapic_pa = 0;
        if proc & PrimaryControls::USE_TPR_SHADOW.bits() != 0 {
            let page = Page::alloc_page(GFP_KERNEL_ACCOUNT | __GFP_ZERO)?;
            // SAFETY: a page we own.
            vapic_pa = unsafe { rvmm_page_to_phys(page.as_ptr().cast()) };
            // SAFETY: the page is in the direct map for as long as we own it; byte 0x80
            // is VTPR (SDM 30.1.1).
            self.vapic_tpr = unsafe { rvmm_pa_to_va(vapic_pa).cast::<u8>().add(0x80) } as usize;
            self.vapic = Some(page);
        }
        self.with_vmcs(|g| {
            if vapic_pa != 0 {
                vmw(control::VIRT_APIC_ADDR_FULL, vapic_pa);
                vmw(control::TPR_THRESHOLD, 0);
            }
            if proc & PrimaryControls::SECONDARY_CONTROLS.bits() != 0 {
                vmw(control::SECONDARY_PROCBASED_EXEC_CONTROLS, proc2.into());
            }
            vmw(control::PINBASED_EXEC_CONTROLS, pin.into());
            vmw(control::PRIMARY_PROCBASED_EXEC_CONTROLS, proc.into());
            vmw(control::VMEXIT_CONTROLS, exit.into());
            vmw(control::VMENTRY_CONTROLS, entry.into());
            // #MC always exits: a machine check belongs to the host (SDM 27.1: it goes
            // to the guest otherwise).
            vmw(control::EXCEPTION_BITMAP, EXCEPTION_BITMAP);
            vmw(control::TSC_OFFSET_FULL, 0);
            vmw(control::MSR_BITMAPS_ADDR_FULL, g.msr_bitmap_pa);
            vmw(control::PAGE_FAULT_ERR_CODE_MASK, 0);
            vmw(control::PAGE_FAULT_ERR_CODE_MATCH, 0);
            vmw(control::CR3_TARGET_COUNT, 0);
            vmw(control::CR0_GUEST_HOST_MASK, !0);
            vmw(control::CR4_GUEST_HOST_MASK, !0);
            vmw(control::VMEXIT_MSR_STORE_COUNT, 0);
            vmw(control::VMEXIT_MSR_LOAD_COUNT, 0);
            vmw(control::VMENTRY_MSR_LOAD_COUNT, 0);
            vmw(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
            vmw(guest::LINK_PTR_FULL, !0);
            vmw(guest::DR7, 0x400);
            // Reset values (a VMCS field never written holds whatever the CPU left).
            vmw(guest::IA32_DEBUGCTL_FULL, 0);
            vmw(guest::IA32_SYSENTER_CS, 0);
            vmw(guest::IA32_SYSENTER_ESP, 0);
            vmw(guest::IA32_SYSENTER_EIP, 0);
            vmw(guest::IA32_PAT_FULL, 0x0007_0406_0007_0406);
            vmw(guest::ACTIVITY_STATE, 0);
            vmw(guest::INTERRUPTIBILITY_STATE, 0);
            vmw(guest::PENDING_DBG_EXCEPTIONS, 0);
            // Host state that does not change between CPUs or entries.
            let (cs, ss): (u16, u16);
            // SAFETY: reading CS and SS.
            unsafe { core::arch::asm!("mov {0:x}, cs", "mov {1:x}, ss", out(reg) cs, out(reg) ss, options(nomem, nostack)) };
            let cr0: u64;
            // SAFETY: reading CR0.
            unsafe { core::arch::asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack)) };
            vmw(host::CR0, cr0);
            vmw(host::CS_SELECTOR, cs.into());
            vmw(host::SS_SELECTOR, ss.into());
            vmw(host::DS_SELECTOR, 0);
            vmw(host::ES_SELECTOR, 0);
            vmw(host::FS_SELECTOR, 0);
            vmw(host::GS_SELECTOR, 0);
            vmw(host::TR_SELECTOR, vmx::host_tr().into());
            vmw(host::IA32_PAT_FULL, vmx::rdmsr_arch(msr::IA32_PAT));
            vmw(host::IA32_EFER_FULL, vmx::rdmsr_arch(msr::IA32_EFER));
            vmw(host::IA32_SYSENTER_CS, vmx::rdmsr_arch(msr::IA32_SYSENTER_CS));
            vmw(host::RIP, vmx::host_rip());
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
            let _ = g.set_sregs(&sregs);
            g.set_regs(&uapi::Regs { rflags: 2, ..Default::default() });
        })?;
        Ok(())
    }

    fn regs(&self) -> uapi::Regs {
        let g = &self.gprs;
        uapi::Regs {
            rax: g.rax,
            rbx: g.rbx,
            rcx: g.rcx,
            rdx: g.rdx,
            rsi: g.rsi,
            rdi: g.rdi,
            rsp: vmr(guest::RSP),
            rbp: g.rbp,
            r8: g.r8,
            r9: g.r9,
            r10: g.r10,
            r11: g.r11,
            r12: g.r12,
            r13: g.r13,
            r14: g.r14,
            r15: g.r15,
            rip: vmr(guest::RIP),
            rflags: vmr(guest::RFLAGS) & !(1 << 17),
        }
    }

    fn set_regs(&mut self, r: &uapi::Regs) {
        self.gprs = Gprs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
        };
        vmw(guest::RSP, r.rsp);
        vmw(guest::RIP, r.rip);
        // A real-mode vCPU runs in virtual-8086 mode: RFLAGS.VM stays set (userspace
        // sees RFLAGS without it).
        let vm86 = if self.rmode { RFLAGS_VM } else { 0 };
        vmw(guest::RFLAGS, r.rflags | vm86);
        self.state_checked = false;
    }

    fn sregs(&self) -> uapi::Sregs {
        let seg = |i: usize| {
            let (s, b, l, a) = SEGS[i];
            seg_from_ar(vmr(b), vmr(l) as u32, vmr(s) as u16, vmr(a))
        };
        uapi::Sregs {
            cs: seg(0),
            ds: seg(1),
            es: seg(2),
            fs: seg(3),
            gs: seg(4),
            ss: seg(5),
            tr: seg(6),
            ldt: seg(7),
            gdt: uapi::Dtable {
                base: vmr(guest::GDTR_BASE),
                limit: vmr(guest::GDTR_LIMIT) as u16,
                padding: [0; 3],
            },
            idt: uapi::Dtable {
                base: vmr(guest::IDTR_BASE),
                limit: vmr(guest::IDTR_LIMIT) as u16,
                padding: [0; 3],
            },
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: self.cr8,
            efer: self.efer,
            apic_base: 0xfee0_0900,
        }
    }

    fn set_sregs(&mut self, s: &uapi::Sregs) -> Result {
        if self.rmode {
            // Userspace's segments replace the virtual-8086 ones: rvmm's real mode ends.
            self.rmode = false;
            vmw(guest::RFLAGS, vmr(guest::RFLAGS) & !RFLAGS_VM);
            vmw(control::EXCEPTION_BITMAP, EXCEPTION_BITMAP);
        }
        let segs = [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt];
        for (seg, (sel, base, limit, ar)) in segs.iter().zip(SEGS) {
            vmw(sel, seg.selector.into());
            vmw(base, seg.base);
            vmw(limit, seg.limit.into());
            vmw(ar, seg_ar(seg));
        }
        vmw(guest::GDTR_BASE, s.gdt.base);
        vmw(guest::GDTR_LIMIT, s.gdt.limit.into());
        vmw(guest::IDTR_BASE, s.idt.base);
        vmw(guest::IDTR_LIMIT, s.idt.limit.into());
        self.cr0 = s.cr0;
        self.cr2 = s.cr2;
        self.cr3 = s.cr3;
        self.cr4 = s.cr4;
        self.cr8 = s.cr8 & 0xf;
        self.efer = s.efer;
        self.apply_paging_state();
        self.state_checked = false;
        Ok(())
    }

    /// Writes the real CR0/CR4/EFER and the read shadows from the guest's views, and
    /// drops the shadow (its shape or its permissions may have changed).
    fn apply_paging_state(&mut self) {
        let lma = self.efer & EFER_LME != 0 && self.cr0 & CR0_PG != 0;
        if lma {
            self.efer |= EFER_LMA;
        } else {
            self.efer &= !EFER_LMA;
        }
        const CR0_GUEST_BITS: u64 =
            (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 18);
        let real_cr0 = (self.cr0 & CR0_GUEST_BITS) | CR0_PE | CR0_PG | CR0_WP | (1 << 5);
        const CR4_GUEST_BITS: u64 = (1 << 2)
            | (1 << 3)
            | (1 << 8)
            | (1 << 9)
            | (1 << 10)
            | (1 << 16)
            | (1 << 18)
            | CR4_SMEP
            | CR4_SMAP;
        // SMEP and SMAP act on paging: with the guest's paging off they must not act on
        // the identity shadow (whose entries are all user entries).
        let guest_bits = if self.cr0 & CR0_PG != 0 {
            CR4_GUEST_BITS
        } else {
            CR4_GUEST_BITS & !(CR4_SMEP | CR4_SMAP)
        };
        let real_cr4 = (self.cr4 & guest_bits) | CR4_PAE | (1 << 13);
        let real_efer = EFER_NXE | if lma { EFER_LME | EFER_LMA } else { 0 } | (self.efer & 1);
        vmw(guest::CR0, real_cr0);
        vmw(control::CR0_READ_SHADOW, self.cr0);
        vmw(guest::CR4, real_cr4);
        vmw(control::CR4_READ_SHADOW, self.cr4);
        vmw(guest::IA32_EFER_FULL, real_efer);
        let ia32e = if lma {
            EntryControls::IA32E_MODE_GUEST.bits()
        } else {
            0
        };
        vmw(control::VMENTRY_CONTROLS, (self.entry_base | ia32e).into());
        self.mode = PagingMode::from_regs(self.cr0, self.cr4, self.efer);
        self.need_reset = true;
    }

    /// Drops the whole shadow and makes an empty root (a full TLB flush). The VMCS must
    /// be current.
    pub(crate) fn reset_shadow(&mut self) -> bool {
        self.load_cr3_shadow(true)
    }

    /// The shadow for a (new) CR3 or paging mode, from the VM's pool; `flush` says
    /// whether out-of-sync shadows must be brought up to date (MOV CR3 with PCIDs and
    /// bit 63 set does not flush).
    pub(crate) fn load_cr3_shadow(&mut self, flush: bool) -> bool {
        self.shadow.usable() && self.load_pool_root(flush)
    }

    /// MOV CR3 (or a paging change): the root for CR3 and the paging mode from the VM's
    /// pool. The VMCS must be current.
    fn load_pool_root(&mut self, flush: bool) -> bool {
        // A root this vCPU holds a reference on (a recent one), while the pool has not
        // been reset and nothing needs a resync: no lock, no pool work.
        let gen = self.shadow.modes.generation.load(Ordering::Acquire);
        if !flush || self.shadow.modes.unsync.load(Ordering::Acquire) == 0 {
            let key = self.root_key();
            let cr3 = self.cr3;
            let h = &self.hints[hint_slot(cr3) & self.hint_mask];
            if h.root != NIL && h.gen == gen && h.cr3 == cr3 && h.key == key {
                let (root, pa) = (h.root, h.pa);
                self.proot = root;
                self.proot_gen = gen;
                vmw(guest::CR3, pa);
                self.shadow.fast_root_hits.fetch_add(1, Ordering::Relaxed);
                self.on_pool = true;
                self.need_reset = false;
                return true;
            }
        }
        let ctx = self.perm_ctx();
        let key = self.root_key();
        // Fields only below (no `&mut self` calls): the guard borrows `self.shadow`.
        let mut guard = self.shadow.pool.lock();
        let Some(storage) = guard.as_deref_mut() else {
            return false;
        };
        let mut pool = storage.pool();
        if self.slots.generation != pool.st.slots_generation {
            if self.slots.generation < pool.st.slots_generation {
                // This vCPU's memory map is older than the pool's entries: no root until
                // it has taken the new one (the pre-entry check sends it to do so).
                self.on_pool = false;
                self.proot = NIL;
                self.need_reset = true;
                return true;
            }
            // The map changed under every shadow (`Shadow::memory_map_changed` does the
            // same when the ioctl gets the lock first).
            pool.reset();
            pool.st.slots_generation = self.slots.generation;
        }
        let prev = if self.pinned_gen == pool.st.generation {
            self.pinned_active
        } else {
            NIL
        };
        let mut mem = crate::mmu::GuestMem(&self.slots);
        let root = match pool.load_root(&mut mem, self.mode, self.cr3, &ctx, prev, flush) {
            Ok(r) => r,
            Err(_) => {
                pool.reset();
                self.stats.shadow_resets.inc();
                match pool.load_root(&mut mem, self.mode, self.cr3, &ctx, NIL, true) {
                    Ok(r) => r,
                    Err(_) => return false,
                }
            }
        };
        let gen = pool.st.generation;
        self.pinned_active = root;
        self.pinned_gen = gen;
        self.proot = root;
        self.proot_gen = gen;
        let pa = pool.root_pa(root);
        vmw(guest::CR3, pa);
        // Remember it, with a reference of its own, for the lock-free path.
        let cr3 = self.cr3;
        // As many hints as the root cache keeps roots (a power of two): their references
        // must leave the pool room to work in.
        let cap = 1usize << (usize::BITS - 1 - pool.st.max_roots.leading_zeros());
        self.hint_mask = cap.min(HINTS) - 1;
        let slot = &mut self.hints[hint_slot(cr3) & self.hint_mask];
        if !(slot.root == root && slot.gen == gen && slot.cr3 == cr3 && slot.key == key) {
            if slot.gen == gen {
                pool.unpin(slot.root);
            }
            pool.pin(root);
            *slot = RootHint {
                cr3,
                key,
                root,
                pa,
                gen,
            };
        }
        let dirty = core::mem::take(&mut pool.st.tlb_dirty);
        let unsync = pool.unsync_count();
        self.shadow.publish(pool.st, unsync);
        drop(guard);
        self.flush_remote(dirty);
        self.on_pool = true;
        self.need_reset = false;
        true
    }

    /// What a root's role depends on besides CR3: paging mode and permission bits.
    fn root_key(&self) -> u64 {
        (self.cr0 & (CR0_WP | CR0_PG))
            | (self.cr4 & (CR4_PSE | CR4_PAE | CR4_SMEP | CR4_SMAP))
            | ((self.efer & (EFER_LMA | EFER_NXE)) << 40)
    }

    /// After a pool operation (lock released): if shadow entries lost rights, the
    /// VM's other vCPUs leave guest mode before this one relies on it.
    pub(super) fn flush_remote(&self, dirty: bool) {
        if dirty {
            self.shadow.kick_others(self.vcpu_id);
        }
    }

    /// Moves RIP past a port I/O instruction that exited to userspace at `rip`, unless
    /// userspace has moved RIP since; returns whether it did.
    fn complete_io(&mut self, rip: u64, len: u8) -> bool {
        if vmr(guest::RIP) != rip {
            return false;
        }
        vmw(guest::RIP, self.rip_after(rip, len.into()));
        let intr_state = vmr(guest::INTERRUPTIBILITY_STATE);
        if intr_state & 3 != 0 {
            vmw(guest::INTERRUPTIBILITY_STATE, intr_state & !3);
        }
        true
    }

    /// Completes the exit userspace has handled (the data of an IN or MMIO read, RIP past
    /// an I/O instruction). The VMCS must be current.
    fn complete_pending(&mut self, run: *mut uapi::Run) {
        match self.pending {
            Pending::None => {}
            Pending::IoOut { rip, len } => {
                self.complete_io(rip, len);
            }
            Pending::IoIn { size, rip, len } => {
                if !self.complete_io(rip, len) {
                    self.pending = Pending::None;
                    return;
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
            Pending::StringIn { gpa, size } => {
                // SAFETY: our run page.
                let io_data = unsafe { ptr::read_volatile(addr_of_mut!((*run).io_data)) };
                let data = io_data[0].to_le_bytes();
                if let Some(p) = self.slots.ptr_mut(gpa, size.into()) {
                    // SAFETY: `size` bytes of a pinned, writable guest page.
                    unsafe { ptr::copy_nonoverlapping(data.as_ptr(), p, usize::from(size)) };
                }
            }
            Pending::MmioRead { op, long } => {
                // SAFETY: our run page.
                let data = u64::from_le_bytes(unsafe {
                    ptr::read_volatile(addr_of_mut!((*run).mmio.data))
                });
                if let rvmm_core::emulate::MmioOp::Load { dst, .. } = op {
                    let load = |old| rvmm_core::emulate::load_result(old, data, &op, long);
                    if dst == 4 {
                        // RSP lives in the VMCS.
                        vmw(guest::RSP, load(vmr(guest::RSP)));
                    } else {
                        let new = load(self.gprs.get(dst, 0));
                        self.gprs.set(dst, new);
                    }
                }
            }
            Pending::Hypercall => {
                // SAFETY: as above.
                self.gprs.rax = unsafe { ptr::read_volatile(addr_of_mut!((*run).hypercall.ret)) };
            }
        }
        self.pending = Pending::None;
    }

    /// One interrupts-off section: enter the guest, handle fast exits, until the host or
    /// userspace needs the CPU.
    fn run_section(&mut self, run: *mut uapi::Run, id: u32) -> Next {
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
            Ok(_guard) => self.enter_loop(run, id, start),
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

    /// The run section's body; `start` is the TSC when interrupts went off.
    fn enter_loop(&mut self, run: *mut uapi::Run, id: u32, start: u64) -> Next {
        self.write_host_state();
        // The exit userspace handled completes here, with the VMCS current.
        self.complete_pending(run);
        if self.need_reset && !self.reset_shadow() {
            return self.internal_error(run, uapi::RVMM_INTERNAL_NO_SHADOW, [0, 0, 0, 0]);
        }
        if !self.state_checked {
            if let Err(check) = rvmm_core::guest_state::check_state(&self.guest_state()) {
                user_pr!(
                    pr_info,
                    "vcpu {}: guest state refused before VM entry: {}\n",
                    id,
                    check.explain()
                );
                // SAFETY: our run page.
                unsafe {
                    ptr::write_volatile(
                        ptr::addr_of_mut!((*run).exit_reason),
                        uapi::RVMM_EXIT_FAIL_ENTRY,
                    );
                    ptr::write_volatile(
                        ptr::addr_of_mut!((*run).fail_entry),
                        uapi::ExitFailEntry {
                            hardware_entry_failure_reason:
                                (rvmm_core::exit::EXIT_REASON_FAILED_ENTRY | 33).into(),
                            cpu: rvmm_cpu() as u32,
                            vmfail: 0,
                        },
                    );
                    ptr::write_volatile(ptr::addr_of_mut!((*run).internal.suberror), check as u32);
                }
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
            && !self.interruptible()
        {
            self.set_window_exiting(true);
        }
        let host_state = HostState::read();
        // SAFETY: interrupts are off for the whole section; the guest context is put back
        // below on every way out of the loop.
        let host = unsafe { self.load_guest_context() };
        // Every entry of the section starts the timer from this value: without the "save
        // VMX-preemption timer value" exit control, exits leave the field alone.
        if self.preemption_quantum != 0 {
            vmw(guest::VMX_PREEMPTION_TIMER_VALUE, self.preemption_quantum);
            self.preemption_short = false;
        }
        let mut launched = false;
        let next = loop {
            self.deliver_events();
            self.shadow.entering(id);
            let root_gen = self.on_pool.then_some(self.proot_gen);
            if self.need_reset || !self.shadow.pre_entry_ok(root_gen, self.slots.generation) {
                // Out of guest mode before anything that may take the pool lock: a
                // remote flush waits for vCPUs in guest mode.
                self.shadow.exited(id);
                if self.shadow.pre_entry_ok(None, self.slots.generation) {
                    // The pool was reset (or the paging state changed): a new root.
                    if !self.reset_shadow() {
                        break self.internal_error(
                            run,
                            uapi::RVMM_INTERNAL_NO_SHADOW,
                            [0, 0, vmr(guest::RIP), 6],
                        );
                    }
                    continue;
                }
                // The memory map changed: the run loop takes the new one.
                break Next::Host;
            }
            let r = self.enter_once(launched, host.xcr0);
            self.shadow.exited(id);
            if r.is_err() {
                let err = vmr(ro::VM_INSTRUCTION_ERROR);
                user_pr!(
                    pr_info,
                    "vcpu {}: VM entry instruction failed, VM-instruction error {}\n",
                    id,
                    err
                );
                // SAFETY: our run page.
                unsafe {
                    ptr::write_volatile(
                        ptr::addr_of_mut!((*run).exit_reason),
                        uapi::RVMM_EXIT_FAIL_ENTRY,
                    );
                    ptr::write_volatile(
                        ptr::addr_of_mut!((*run).fail_entry),
                        uapi::ExitFailEntry {
                            hardware_entry_failure_reason: err,
                            cpu: rvmm_cpu() as u32,
                            vmfail: 1,
                        },
                    );
                }
                break Next::User;
            }
            launched = true;
            let next = self.handle_exit(run, id);
            if let Next::User = next {
                let ready = self.interruptible() && self.pending_irq.is_none();
                // SAFETY: our run page.
                unsafe {
                    ptr::write_volatile(
                        ptr::addr_of_mut!((*run).if_flag),
                        u8::from(vmr(guest::RFLAGS) & (1 << 9) != 0),
                    );
                    ptr::write_volatile(
                        ptr::addr_of_mut!((*run).ready_for_interrupt_injection),
                        u8::from(ready),
                    );
                }
            }
            match next {
                // SAFETY: plain queries with interrupts off.
                // The section ends after its time budget whatever the guest does (an
                // exit storm of a timer, a fault loop), so that interrupts are never off
                // for longer.
                Next::Fast
                    if unsafe { !rvmm_exit_request() }
                        && exit::rdtsc().wrapping_sub(start) < self.section_budget =>
                {
                    continue
                }
                Next::Fast | Next::Host => break Next::Host,
                Next::User => break Next::User,
            }
        };
        self.shadow.section_end(id);
        if let Some(a) = self.apic.as_ref() {
            self.stats.apic_timer_irqs.set(a.timer_fired);
        }
        // What VM exits changed (DS, ES, LDTR, GDTR's limit, DR7, DEBUGCTL) goes back
        // once, here: nothing in the section depends on it.
        // SAFETY: the state `HostState::read` took on this CPU at the start.
        unsafe { host_state.restore_after_exit() };
        // SAFETY: `host` is what `load_guest_context` saved in this section.
        unsafe { self.save_guest_context(&host) };
        next
    }

    /// Loads the guest's FPU/SSE/AVX state and the MSRs switched by hand, once per
    /// section (not per entry: nothing in the section uses them on the host's behalf —
    /// the task's FPU state is saved by kernel_fpu_begin, KERNEL_GS_BASE matters only at
    /// a SWAPGS and the SYSCALL MSRs only at a SYSCALL, both after the section).
    ///
    /// # Safety
    /// Interrupts off, inside `rvmm_fpu_begin`; `save_guest_context` must follow in the
    /// same section.
    unsafe fn load_guest_context(&mut self) -> HostContext {
        // SAFETY: see above; the MSRs exist on every x86-64 CPU with VMX.
        unsafe {
            let mut host = HostContext {
                kernel_gs_base: vmx::rdmsr_arch(msr::IA32_KERNEL_GSBASE),
                syscall: [0; 4],
                xcr0: 0,
            };
            vmx::wrmsr_arch(msr::IA32_KERNEL_GSBASE, self.kernel_gs_base);
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
            host
        }
    }

    /// # Safety
    /// After `load_guest_context` in the same section, with its result.
    unsafe fn save_guest_context(&mut self, host: &HostContext) {
        // SAFETY: see `load_guest_context`.
        unsafe {
            if self.xsave {
                core::arch::asm!("xsave64 [{}]", in(reg) self.fx.0.as_mut_ptr(), in("eax") GUEST_XCR0_SUPPORTED as u32, in("edx") 0u32, options(nostack));
            } else {
                core::arch::asm!("fxsave64 [{}]", in(reg) self.fx.0.as_mut_ptr(), options(nostack));
            }
            // The guest cannot change the SYSCALL MSRs without an exit (WRMSR, which ends
            // the section), so `syscall_msrs` is current: only the host's go back.
            for (i, &m) in SYSCALL_MSRS.iter().enumerate() {
                if host.syscall[i] != self.syscall_msrs[i] {
                    vmx::wrmsr_arch(m, host.syscall[i]);
                }
            }
            // SWAPGS in the guest changes KERNEL_GS_BASE without an exit: read it back.
            self.kernel_gs_base = vmx::rdmsr_arch(msr::IA32_KERNEL_GSBASE);
            vmx::wrmsr_arch(msr::IA32_KERNEL_GSBASE, host.kernel_gs_base);
        }
    }

    /// One VM entry and exit. Per entry only what the host cannot run with: the guest's
    /// XCR0 (NMI handlers may use XSAVE features) and CR2.
    fn enter_once(&mut self, launched: bool, host_xcr0: u64) -> Result<(), vmx::VmFail> {
        // SAFETY: interrupts are off, our VMCS is current with complete state, and the
        // guest context is loaded (run section); XCR0 values are the guest's, checked at
        // XSETBV, and the host's, read at the section start.
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

    /// The state the pre-entry checks look at (VMCS current).
    fn guest_state(&self) -> rvmm_core::guest_state::GuestState {
        let seg = |i: usize| {
            let (sel, base, limit, ar) = SEGS[i];
            rvmm_core::guest_state::Seg {
                selector: vmr(sel) as u16,
                base: vmr(base),
                limit: vmr(limit) as u32,
                ar: vmr(ar) as u32,
            }
        };
        rvmm_core::guest_state::GuestState {
            cr0: self.cr0,
            cr4: self.cr4,
            efer: self.efer,
            rflags: vmr(guest::RFLAGS),
            rip: vmr(guest::RIP),
            // SEGS is in uapi::Sregs order (CS DS ES FS GS SS TR LDTR).
            segs: [
                seg(0),
                seg(5),
                seg(1),
                seg(2),
                seg(3),
                seg(4),
                seg(6),
                seg(7),
            ],
            gdtr_base: vmr(guest::GDTR_BASE),
            idtr_base: vmr(guest::IDTR_BASE),
        }
    }

    /// Host state that depends on the CPU or the task.
    fn write_host_state(&self) {
        let gdt = vmx::host_gdt_base();
        // SAFETY: reading CR3 and the CR4 shadow of this CPU.
        let (cr3, cr4) = unsafe { (rvmm_read_cr3(), cr4_read_shadow() as u64) };
        vmw(host::CR3, cr3);
        vmw(host::CR4, cr4);
        vmw(host::FS_BASE, vmx::rdmsr_arch(msr::IA32_FS_BASE));
        vmw(host::GS_BASE, vmx::rdmsr_arch(msr::IA32_GS_BASE));
        vmw(host::TR_BASE, vmx::host_tss_base(gdt, vmx::host_tr()));
        vmw(host::GDTR_BASE, gdt);
        vmw(host::IDTR_BASE, vmx::host_idt_base());
        vmw(
            host::IA32_SYSENTER_ESP,
            vmx::rdmsr_arch(msr::IA32_SYSENTER_ESP),
        );
        vmw(
            host::IA32_SYSENTER_EIP,
            vmx::rdmsr_arch(msr::IA32_SYSENTER_EIP),
        );
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
