// SPDX-License-Identifier: GPL-2.0

//! VMX operation: is VT-x usable, the capability MSRs, the per-CPU VMX enable (the
//! kernel's refcounted one, through the C helper's CPU hotplug state), and the VMX
//! instructions.
//!
//! Current-VMCS rule: KVM keeps a per-CPU "current VMCS" of its own and does not
//! VMPTRLD again while it believes its VMCS is current. Whoever else loads a VMCS on a
//! CPU must therefore put the previous one back before preemption (or interrupts) can
//! let KVM run there: rvmm saves the pointer with VMPTRST and restores it with VMPTRLD
//! in the same non-preemptible section ([`CurrentVmcs`]).

use core::arch::asm;
use core::ffi::c_void;
use core::sync::atomic::{AtomicU32, Ordering};

use kernel::{page::Page, prelude::*};
use rvmm_core::caps::{check_vmx, AllowedControls, ControlMsrs, VmxBasic, VmxUnavailable};
use rvmm_uapi as uapi;
use x86::msr;

extern "C" {
    fn rvmm_vmx_enable_all() -> i32;
    fn rvmm_vmx_disable_all();
    fn rvmm_vmx_held_here() -> bool;
    fn rvmm_vmx_shared_here() -> bool;
    fn rvmm_cr4_vmxe_here() -> bool;
    fn rvmm_rdmsr_safe(msr: u32, val: *mut u64) -> i32;
    fn rvmm_on_each_online_cpu(f: unsafe extern "C" fn(*mut c_void), info: *mut c_void) -> u32;
    fn rvmm_page_to_phys(page: *mut c_void) -> u64;
}

/// Reads an MSR, `None` if it faults.
pub(crate) fn rdmsr(index: u32) -> Option<u64> {
    let mut val = 0u64;
    // SAFETY: `rvmm_rdmsr_safe` only writes the u64 it is given, and catches the #GP of
    // an MSR that does not exist.
    (unsafe { rvmm_rdmsr_safe(index, &mut val) } == 0).then_some(val)
}

/// Checks that VT-x exists and is enabled on this CPU.
pub(crate) fn check_support() -> Result<(), VmxUnavailable> {
    let ecx = core::arch::x86_64::__cpuid(1).ecx;
    let fc = if ecx & rvmm_core::caps::CPUID_1_ECX_VMX != 0 {
        rdmsr(msr::IA32_FEATURE_CONTROL)
    } else {
        None
    };
    check_vmx(ecx, fc)
}

/// Reads the VMX capability MSRs (uniform across CPUs).
pub(crate) fn read_caps() -> uapi::VmxCaps {
    let basic = VmxBasic(rdmsr(msr::IA32_VMX_BASIC).unwrap_or(0));
    let ctl = ControlMsrs::for_basic(basic);
    let procbased = rdmsr(ctl.procbased).unwrap_or(0);
    // Secondary controls and EPT/VPID capabilities exist only where the primary
    // controls allow "activate secondary controls" (bit 31).
    let secondary = AllowedControls(procbased).supports(1 << 31);
    let procbased2 = if secondary {
        rdmsr(msr::IA32_VMX_PROCBASED_CTLS2).unwrap_or(0)
    } else {
        0
    };
    let ept_vpid = if secondary && (procbased2 >> 32) & ((1 << 1) | (1 << 5)) != 0 {
        rdmsr(msr::IA32_VMX_EPT_VPID_CAP).unwrap_or(0)
    } else {
        0
    };
    uapi::VmxCaps {
        basic: basic.0,
        pinbased: rdmsr(ctl.pinbased).unwrap_or(0),
        procbased,
        procbased2,
        exit: rdmsr(ctl.exit).unwrap_or(0),
        entry: rdmsr(ctl.entry).unwrap_or(0),
        misc: rdmsr(msr::IA32_VMX_MISC).unwrap_or(0),
        ept_vpid_cap: ept_vpid,
        cr0_fixed0: rdmsr(msr::IA32_VMX_CR0_FIXED0).unwrap_or(0),
        cr0_fixed1: rdmsr(msr::IA32_VMX_CR0_FIXED1).unwrap_or(0),
        cr4_fixed0: rdmsr(msr::IA32_VMX_CR4_FIXED0).unwrap_or(0),
        cr4_fixed1: rdmsr(msr::IA32_VMX_CR4_FIXED1).unwrap_or(0),
        vmcs_revision: basic.revision_id(),
        vmcs_size: basic.region_size(),
    }
}

/// VMX operation on every online CPU (and on CPUs that come online) while alive.
pub(crate) struct VmxOn(());

impl VmxOn {
    pub(crate) fn enable() -> Result<Self> {
        // SAFETY: FFI call with no arguments; on failure nothing is held.
        let r = unsafe { rvmm_vmx_enable_all() };
        if r < 0 {
            return Err(Error::from_errno(r));
        }
        Ok(Self(()))
    }
}

impl Drop for VmxOn {
    fn drop(&mut self) {
        // SAFETY: `enable` succeeded, so the hotplug state and syscore ops are registered.
        unsafe { rvmm_vmx_disable_all() };
    }
}

/// A failed VMX instruction (VMfailInvalid or VMfailValid).
#[derive(Debug, Clone, Copy)]
pub(crate) struct VmFail;

/// Result of a VMX instruction from RFLAGS: CF (VMfailInvalid) or ZF (VMfailValid).
fn vm_result(failed: u8) -> Result<(), VmFail> {
    if failed == 0 {
        Ok(())
    } else {
        Err(VmFail)
    }
}

/// VMPTRST: the current-VMCS pointer (`u64::MAX` when none).
///
/// # Safety
/// The CPU must be in VMX operation.
pub(crate) unsafe fn vmptrst() -> u64 {
    let mut ptr = 0u64;
    // SAFETY: the caller guarantees VMX operation; the instruction stores 8 bytes.
    unsafe { asm!("vmptrst [{0}]", in(reg) &mut ptr, options(nostack)) };
    ptr
}

/// VMCLEAR of the VMCS at physical address `pa`.
///
/// # Safety
/// The CPU must be in VMX operation and `pa` must be a VMCS region owned by the caller.
pub(crate) unsafe fn vmclear(pa: u64) -> Result<(), VmFail> {
    let failed: u8;
    // SAFETY: the caller guarantees VMX operation and ownership of the region.
    unsafe {
        asm!("vmclear [{0}]", "setna {1}", in(reg) &pa, out(reg_byte) failed, options(nostack))
    };
    vm_result(failed)
}

/// VMPTRLD of the VMCS at physical address `pa`.
///
/// # Safety
/// The CPU must be in VMX operation and `pa` a VMCS region that may be made current.
pub(crate) unsafe fn vmptrld(pa: u64) -> Result<(), VmFail> {
    let failed: u8;
    // SAFETY: the caller guarantees VMX operation and a valid region.
    unsafe {
        asm!("vmptrld [{0}]", "setna {1}", in(reg) &pa, out(reg_byte) failed, options(nostack))
    };
    vm_result(failed)
}

/// VMREAD of `field` in the current VMCS.
///
/// # Safety
/// The CPU must be in VMX operation with a current VMCS owned by the caller.
pub(crate) unsafe fn vmread(field: u32) -> Result<u64, VmFail> {
    let value: u64;
    let failed: u8;
    // SAFETY: the caller guarantees a current VMCS of its own.
    unsafe {
        asm!("vmread {0}, {1}", "setna {2}", out(reg) value, in(reg) u64::from(field),
             out(reg_byte) failed, options(nostack))
    };
    vm_result(failed).map(|()| value)
}

/// VMWRITE of `value` to `field` in the current VMCS.
///
/// # Safety
/// The CPU must be in VMX operation with a current VMCS owned by the caller.
pub(crate) unsafe fn vmwrite(field: u32, value: u64) -> Result<(), VmFail> {
    let failed: u8;
    // SAFETY: the caller guarantees a current VMCS of its own.
    unsafe {
        asm!("vmwrite {0}, {1}", "setna {2}", in(reg) u64::from(field), in(reg) value,
             out(reg_byte) failed, options(nostack))
    };
    vm_result(failed)
}

/// Makes a VMCS of rvmm's current on this CPU and restores the previous current VMCS
/// (KVM's, for instance) when dropped. Must live inside a non-preemptible section.
pub(crate) struct CurrentVmcs {
    previous: u64,
    ours: u64,
}

impl CurrentVmcs {
    /// # Safety
    /// The CPU must be in VMX operation, preemption and interrupts must stay disabled
    /// for the guard's lifetime, and `pa` must be a VMCS region owned by the caller and
    /// not active on another CPU.
    pub(crate) unsafe fn load(pa: u64) -> Result<Self, VmFail> {
        // SAFETY: guaranteed by the caller.
        let previous = unsafe { vmptrst() };
        // SAFETY: guaranteed by the caller.
        unsafe { vmptrld(pa) }?;
        Ok(Self { previous, ours: pa })
    }
}

impl Drop for CurrentVmcs {
    fn drop(&mut self) {
        // SAFETY: `load` made `ours` current on this CPU, which is still in VMX operation
        // (preemption is off). VMCLEAR flushes it and leaves no VMCS current; the
        // previous pointer, if any, was active on this CPU and is made current again.
        unsafe {
            let _ = vmclear(self.ours);
            if self.previous != u64::MAX {
                let _ = vmptrld(self.previous);
            }
        }
    }
}

/// Per-CPU results of [`check_all_cpus`].
#[derive(Default)]
struct Check {
    vmx: AtomicU32,
    shared: AtomicU32,
    vmxe: AtomicU32,
    vmcs_ok: AtomicU32,
    clobbered: AtomicU32,
    foreign: AtomicU32,
}

struct CheckCtx<'a> {
    vmcs_pa: &'a [u64],
    out: Check,
}

/// A value that tells the CPUs' writes apart.
const CHECK_MARKER: u64 = 0x7276_6d6d_0000_0000;

unsafe extern "C" fn check_this_cpu(info: *mut c_void) {
    // SAFETY: `check_all_cpus` passes a `CheckCtx` that outlives the on_each_cpu call.
    let ctx = unsafe { &*info.cast::<CheckCtx<'_>>() };
    let out = &ctx.out;
    // SAFETY: plain per-CPU reads, IRQs are off (on_each_cpu callback).
    let (held, shared, vmxe) = unsafe {
        (
            rvmm_vmx_held_here(),
            rvmm_vmx_shared_here(),
            rvmm_cr4_vmxe_here(),
        )
    };
    if !held {
        return;
    }
    out.vmx.fetch_add(1, Ordering::Relaxed);
    if shared {
        out.shared.fetch_add(1, Ordering::Relaxed);
    }
    if !vmxe {
        // Not in VMX operation any more: any VMX instruction would #UD.
        return;
    }
    out.vmxe.fetch_add(1, Ordering::Relaxed);
    let cpu = kernel::cpu::CpuId::current().as_u32() as usize;
    let Some(&pa) = ctx.vmcs_pa.get(cpu) else {
        return;
    };
    // SAFETY: CR4.VMXE is set and rvmm holds a VMX reference: the CPU is in VMX operation.
    let before = unsafe { vmptrst() };
    if before != u64::MAX {
        out.foreign.fetch_add(1, Ordering::Relaxed);
    }
    let marker = CHECK_MARKER | cpu as u64;
    let ok = {
        // SAFETY: VMX operation (above), IRQs off for the whole callback, and `pa` is this
        // CPU's own region, used by no other CPU.
        match unsafe { vmclear(pa).and_then(|()| CurrentVmcs::load(pa)) } {
            Ok(_guard) => {
                let rip = x86::vmx::vmcs::guest::RIP;
                // SAFETY: our VMCS is current (guard).
                let read = unsafe { vmwrite(rip, marker).and_then(|()| vmread(rip)) };
                matches!(read, Ok(v) if v == marker)
            }
            Err(_) => false,
        }
    };
    if ok {
        out.vmcs_ok.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: still in VMX operation.
    if unsafe { vmptrst() } != before {
        out.clobbered.fetch_add(1, Ordering::Relaxed);
    }
}

/// Checks VMX operation on every online CPU (see [`uapi::Status`]).
pub(crate) fn check_all_cpus() -> Result<uapi::Status> {
    let basic = VmxBasic(rdmsr(msr::IA32_VMX_BASIC).ok_or(ENODEV)?);
    let ncpus = kernel::cpu::nr_cpu_ids() as usize;
    let mut pages = KVec::with_capacity(ncpus, GFP_KERNEL)?;
    let mut pas = KVec::with_capacity(ncpus, GFP_KERNEL)?;
    let rev = basic.revision_id().to_ne_bytes();
    for _ in 0..ncpus {
        let page = Page::alloc_page(GFP_KERNEL | __GFP_ZERO)?;
        // SAFETY: `rev` is 4 readable bytes and the page is 4096 bytes long.
        unsafe { page.write_raw(rev.as_ptr(), 0, rev.len())? };
        // SAFETY: `page` is a valid page we own.
        pas.push(
            unsafe { rvmm_page_to_phys(page.as_ptr().cast()) },
            GFP_KERNEL,
        )?;
        pages.push(page, GFP_KERNEL)?;
    }
    let mut ctx = CheckCtx {
        vmcs_pa: &pas,
        out: Check::default(),
    };
    // SAFETY: `check_this_cpu` only reads `ctx` (and its atomics), which outlives the
    // synchronous on_each_cpu call.
    let online = unsafe { rvmm_on_each_online_cpu(check_this_cpu, (&raw mut ctx).cast()) };
    let o = &ctx.out;
    // The pages are VMCLEARed (not active anywhere) before they are freed with `pages`.
    drop(pages);
    Ok(uapi::Status {
        online_cpus: online,
        vmx_cpus: o.vmx.load(Ordering::Relaxed),
        vmxe_cpus: o.vmxe.load(Ordering::Relaxed),
        vmcs_ok_cpus: o.vmcs_ok.load(Ordering::Relaxed),
        shared_cpus: o.shared.load(Ordering::Relaxed),
        vmcs_ptr_clobbered: o.clobbered.load(Ordering::Relaxed),
        foreign_vmcs_cpus: o.foreign.load(Ordering::Relaxed),
        reserved: 0,
    })
}
