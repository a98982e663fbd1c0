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
use core::marker::PhantomData;
use core::sync::atomic::{AtomicU32, Ordering};

use kernel::{page::Page, prelude::*};
use rvmm_core::caps::{check_vmx, AllowedControls, ControlMsrs, VmxBasic, VmxUnavailable};
use rvmm_uapi as uapi;
use x86::msr;

use crate::ffi::*;

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

/// VMREAD of `field` in the current VMCS (only through [`CurrentVmcs`]).
///
/// # Safety
/// The CPU must be in VMX operation with a current VMCS owned by the caller.
unsafe fn vmread(field: u32) -> Result<u64, VmFail> {
    let value: u64;
    let failed: u8;
    // SAFETY: the caller guarantees a current VMCS of its own.
    unsafe {
        asm!("vmread {0}, {1}", "setna {2}", out(reg) value, in(reg) u64::from(field),
             out(reg_byte) failed, options(nostack))
    };
    vm_result(failed).map(|()| value)
}

/// VMWRITE of `value` to `field` in the current VMCS (only through [`CurrentVmcs`]).
///
/// # Safety
/// The CPU must be in VMX operation with a current VMCS owned by the caller.
unsafe fn vmwrite(field: u32, value: u64) -> Result<(), VmFail> {
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
///
/// Invariant: while the guard exists, the VMCS it loaded is the current VMCS of the CPU
/// the code holding the guard runs on, and that VMCS belongs to the guard's owner
/// ([`Self::load`]'s contract: interrupts and preemption stay off for the guard's
/// lifetime, the region is the caller's). A `&CurrentVmcs` is therefore the proof that
/// VMREAD and VMWRITE reach that VMCS, which makes [`Self::read`] and [`Self::write`]
/// safe: code that reads or writes a vCPU's VMCS takes the guard as a parameter. The
/// guard is neither `Send` nor `Sync`, so it cannot leave the CPU (and the section) it
/// was made in.
pub(crate) struct CurrentVmcs {
    previous: u64,
    ours: u64,
    /// `!Send` and `!Sync`: the VMCS is current on this CPU only.
    _not_send: PhantomData<*mut ()>,
}

impl CurrentVmcs {
    /// Fails, without a VMX instruction, on a CPU where rvmm holds no VMX reference
    /// (it left VMX operation for shutdown or CPU offline).
    ///
    /// # Safety
    /// Preemption and interrupts must stay disabled for the guard's lifetime, and `pa`
    /// must be a VMCS region owned by the caller and not active on another CPU.
    pub(crate) unsafe fn load(pa: u64) -> Result<Self, VmFail> {
        // After shutdown (or this CPU's offline path) left VMX operation, any VMX
        // instruction would #UD.
        // SAFETY: a per-CPU flag read with interrupts off (guaranteed by the caller).
        if !unsafe { rvmm_vmx_held_here() } {
            return Err(VmFail);
        }
        // SAFETY: guaranteed by the caller.
        let previous = unsafe { vmptrst() };
        // SAFETY: guaranteed by the caller.
        unsafe { vmptrld(pa) }?;
        Ok(Self {
            previous,
            ours: pa,
            _not_send: PhantomData,
        })
    }

    /// VMREAD of `field` in this guard's VMCS.
    pub(crate) fn try_read(&self, field: u32) -> Result<u64, VmFail> {
        // SAFETY: the guard exists, so its VMCS, owned by its holder, is current on this
        // CPU, which is in VMX operation, until the guard is dropped (`load`'s contract:
        // interrupts and preemption off for the guard's lifetime).
        unsafe { vmread(field) }
    }

    /// VMWRITE of `value` to `field` in this guard's VMCS.
    pub(crate) fn try_write(&self, field: u32, value: u64) -> Result<(), VmFail> {
        // SAFETY: as for `try_read`.
        unsafe { vmwrite(field, value) }
    }

    /// VMREAD of `field` in this guard's VMCS; 0 if the VMREAD fails.
    pub(crate) fn read(&self, field: u32) -> u64 {
        self.try_read(field).unwrap_or(0)
    }

    /// VMWRITE of `value` to `field` in this guard's VMCS; a failing VMWRITE leaves the
    /// VMCS unchanged.
    pub(crate) fn write(&self, field: u32, value: u64) {
        let _ = self.try_write(field, value);
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
            Ok(vmcs) => {
                let rip = x86::vmx::vmcs::guest::RIP;
                let read = vmcs
                    .try_write(rip, marker)
                    .and_then(|()| vmcs.try_read(rip));
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
        let pa = unsafe { rvmm_page_to_phys(page.as_ptr().cast()) };
        pas.push(pa, GFP_KERNEL)?;
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

/// Guest general registers, saved and loaded by the entry stub (RSP, RIP and RFLAGS
/// live in the VMCS). The layout is the stub's: do not reorder.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct Gprs {
    pub(crate) rax: u64,
    pub(crate) rbx: u64,
    pub(crate) rcx: u64,
    pub(crate) rdx: u64,
    pub(crate) rsi: u64,
    pub(crate) rdi: u64,
    pub(crate) rbp: u64,
    pub(crate) r8: u64,
    pub(crate) r9: u64,
    pub(crate) r10: u64,
    pub(crate) r11: u64,
    pub(crate) r12: u64,
    pub(crate) r13: u64,
    pub(crate) r14: u64,
    pub(crate) r15: u64,
}

impl Gprs {
    /// Register `n` in the encoding of exit qualifications (0 = RAX ... 15 = R15);
    /// `rsp` is the guest's RSP, which lives in the VMCS.
    pub(crate) fn get(&self, n: u8, rsp: u64) -> u64 {
        match n {
            0 => self.rax,
            1 => self.rcx,
            2 => self.rdx,
            3 => self.rbx,
            4 => rsp,
            5 => self.rbp,
            6 => self.rsi,
            7 => self.rdi,
            8 => self.r8,
            9 => self.r9,
            10 => self.r10,
            11 => self.r11,
            12 => self.r12,
            13 => self.r13,
            14 => self.r14,
            _ => self.r15,
        }
    }

    /// Sets register `n`; returns false for RSP (the caller writes it to the VMCS).
    pub(crate) fn set(&mut self, n: u8, v: u64) -> bool {
        *match n {
            0 => &mut self.rax,
            1 => &mut self.rcx,
            2 => &mut self.rdx,
            3 => &mut self.rbx,
            4 => return false,
            5 => &mut self.rbp,
            6 => &mut self.rsi,
            7 => &mut self.rdi,
            8 => &mut self.r8,
            9 => &mut self.r9,
            10 => &mut self.r10,
            11 => &mut self.r11,
            12 => &mut self.r12,
            13 => &mut self.r13,
            14 => &mut self.r14,
            _ => &mut self.r15,
        } = v;
        true
    }
}

// The VM entry/exit stub. rvmm_vmx_run(regs, launched) saves the host's callee-saved
// registers, points HOST_RSP at its frame, loads the guest's GPRs and enters with
// VMLAUNCH (launched == 0) or VMRESUME. A VM exit lands at rvmm_vmx_exit (HOST_RIP)
// with the host RSP of the frame: the guest's GPRs are stored back and 0 returned.
// If the entry instruction itself fails (VMfail), 1 is returned.
core::arch::global_asm!(
    ".pushsection .text",
    ".globl rvmm_vmx_run",
    ".type rvmm_vmx_run, @function",
    "rvmm_vmx_run:",
    "push rbp",
    "mov rbp, rsp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdi",
    "mov rax, 0x6c14", // HOST_RSP
    "vmwrite rax, rsp",
    "bt esi, 0", // CF: launched (the MOVs below leave flags alone)
    "mov rax, [rdi + 0]",
    "mov rbx, [rdi + 8]",
    "mov rcx, [rdi + 16]",
    "mov rdx, [rdi + 24]",
    "mov rsi, [rdi + 32]",
    "mov rbp, [rdi + 48]",
    "mov r8, [rdi + 56]",
    "mov r9, [rdi + 64]",
    "mov r10, [rdi + 72]",
    "mov r11, [rdi + 80]",
    "mov r12, [rdi + 88]",
    "mov r13, [rdi + 96]",
    "mov r14, [rdi + 104]",
    "mov r15, [rdi + 112]",
    "mov rdi, [rdi + 40]",
    // MDS / MMIO stale data: the CPU's buffers cleared after the last load, right
    // before entry, where the kernel clears them for its own guests (rvmm_spec_verw).
    "jc 2f",
    "cmp byte ptr [rip + rvmm_spec_verw], 0",
    "je 11f",
    "verw word ptr [rip + rvmm_spec_verw_sel]",
    "11:",
    "vmlaunch",
    "jmp 3f",
    "2:",
    "cmp byte ptr [rip + rvmm_spec_verw], 0",
    "je 12f",
    "verw word ptr [rip + rvmm_spec_verw_sel]",
    "12:",
    "vmresume",
    "3:",
    "pop rdi",
    "mov eax, 1",
    "jmp 4f",
    ".globl rvmm_vmx_exit",
    "rvmm_vmx_exit:",
    "endbr64",
    "xchg rdi, [rsp]",
    "mov [rdi + 0], rax",
    "mov [rdi + 8], rbx",
    "mov [rdi + 16], rcx",
    "mov [rdi + 24], rdx",
    "mov [rdi + 32], rsi",
    "mov [rdi + 48], rbp",
    "mov [rdi + 56], r8",
    "mov [rdi + 64], r9",
    "mov [rdi + 72], r10",
    "mov [rdi + 80], r11",
    "mov [rdi + 88], r12",
    "mov [rdi + 96], r13",
    "mov [rdi + 104], r14",
    "mov [rdi + 112], r15",
    "pop rax",
    "mov [rdi + 40], rax",
    // The guest may have filled the return stack buffer with its own targets: before
    // the host's first RET, overwrite it (32 entries, rvmm_spec_rsb = 1) or retire one
    // CALL (post-barrier RSB, rvmm_spec_rsb = 2), as the kernel asks for its guests.
    "cmp byte ptr [rip + rvmm_spec_rsb], 1",
    "jb 17f",
    "ja 16f",
    "mov ecx, 16",
    "13:",
    "20:",
    ".pushsection .discard.annotate_insn, \"M\", @progbits, 8",
    ".long 20b - ., 7", // objtool: ANNOTYPE_INTRA_FUNCTION_CALL
    ".popsection",
    "call 14f",
    "int3",
    "14:",
    "21:",
    ".pushsection .discard.annotate_insn, \"M\", @progbits, 8",
    ".long 21b - ., 7", // objtool: ANNOTYPE_INTRA_FUNCTION_CALL
    ".popsection",
    "call 15f",
    "int3",
    "15:",
    "add rsp, 16",
    "dec ecx",
    "jnz 13b",
    "lfence",
    "jmp 17f",
    "16:",
    "22:",
    ".pushsection .discard.annotate_insn, \"M\", @progbits, 8",
    ".long 22b - ., 7", // objtool: ANNOTYPE_INTRA_FUNCTION_CALL
    ".popsection",
    "call 18f",
    "int3",
    "18:",
    "add rsp, 8",
    "lfence",
    "17:",
    // Branch History Injection: the guest's indirect branches must not steer the host's
    // (the kernel's software loop, where its mitigation asks for it; clobbers RAX, RCX).
    "cmp byte ptr [rip + rvmm_spec_bhb], 0",
    "je 19f",
    "call clear_bhb_loop",
    "19:",
    "xor eax, eax",
    "4:",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    ".size rvmm_vmx_run, . - rvmm_vmx_run",
    ".popsection",
);

extern "C" {
    fn rvmm_vmx_run(regs: *mut Gprs, launched: u64) -> u64;
    fn rvmm_vmx_exit();
}

/// HOST_RIP: where VM exits land.
pub(crate) fn host_rip() -> u64 {
    rvmm_vmx_exit as *const () as u64
}

/// Enters the guest whose VMCS is current, until the next VM exit.
///
/// # Safety
/// VMX operation, the vCPU's VMCS current on this CPU with complete host and guest
/// state, interrupts disabled.
pub(crate) unsafe fn enter(regs: &mut Gprs, launched: bool) -> Result<(), VmFail> {
    // SAFETY: guaranteed by the caller; the stub preserves every callee-saved register
    // and returns to us on both VM exit and VMfail.
    let r = unsafe { rvmm_vmx_run(regs, u64::from(launched)) };
    if r == 0 {
        Ok(())
    } else {
        Err(VmFail)
    }
}

/// A descriptor-table register.
#[repr(C, packed)]
#[derive(Default)]
struct DtReg {
    limit: u16,
    base: u64,
}

/// The host's GDTR base (this CPU's, read-only mapping).
pub(crate) fn host_gdt_base() -> u64 {
    let mut d = DtReg::default();
    // SAFETY: SGDT stores 10 bytes into `d`.
    unsafe { asm!("sgdt [{}]", in(reg) &raw mut d, options(nostack)) };
    d.base
}

/// The host's IDTR base.
pub(crate) fn host_idt_base() -> u64 {
    let mut d = DtReg::default();
    // SAFETY: SIDT stores 10 bytes into `d`.
    unsafe { asm!("sidt [{}]", in(reg) &raw mut d, options(nostack)) };
    d.base
}

/// The host's TR selector.
pub(crate) fn host_tr() -> u16 {
    let tr: u16;
    // SAFETY: STR reads the task register.
    unsafe { asm!("str {0:x}", out(reg) tr, options(nomem, nostack)) };
    tr
}

/// Base of the TSS that `tr` selects in the GDT at `gdt` (a 16-byte system descriptor).
pub(crate) fn host_tss_base(gdt: u64, tr: u16) -> u64 {
    let p = (gdt + u64::from(tr & !7)) as *const u64;
    // SAFETY: the host's GDT is mapped and holds a 16-byte TSS descriptor at TR.
    let (lo, hi) = unsafe { (ptr_read(p), ptr_read(p.add(1))) };
    ((lo >> 16) & 0xff_ffff) | (((lo >> 56) & 0xff) << 24) | ((hi & 0xffff_ffff) << 32)
}

fn ptr_read(p: *const u64) -> u64 {
    // SAFETY: callers pass mapped, aligned addresses.
    unsafe { core::ptr::read_volatile(p) }
}

/// Host state that a VM exit does not give back as the host had it (SDM 28.5): DS, ES
/// and LDTR come back null, GDTR's limit 0xFFFF, DR7 0x400 and IA32_DEBUGCTL 0. (FS
/// and GS come back with null selectors and the bases of HOST_FS_BASE/HOST_GS_BASE:
/// right for 64-bit tasks, whose FS and GS selectors are null. TR's limit is handled by
/// `rvmm_after_vmexit`.)
#[derive(Clone, Copy, Default)]
pub(crate) struct HostState {
    pub(crate) ds: u16,
    pub(crate) es: u16,
    pub(crate) ldt: u16,
    gdt_limit: u16,
    gdt_base: u64,
    dr7: u64,
    debugctl: u64,
}

/// DR7's value after reset and after a VM exit.
pub(crate) const DR7_INIT: u64 = 0x400;

impl HostState {
    pub(crate) fn read() -> Self {
        let (ds, es, ldt): (u16, u16, u16);
        let mut gdt = DtReg::default();
        let dr7: u64;
        // SAFETY: reading segment registers, LDTR, GDTR and DR7 has no side effects
        // (ring 0); SGDT stores 10 bytes into `gdt`.
        unsafe {
            asm!("mov {0:x}, ds", "mov {1:x}, es", "sldt {2:x}",
                 out(reg) ds, out(reg) es, out(reg) ldt, options(nomem, nostack));
            asm!("sgdt [{}]", in(reg) &raw mut gdt, options(nostack));
            asm!("mov {}, dr7", out(reg) dr7, options(nomem, nostack));
        }
        Self {
            ds,
            es,
            ldt,
            gdt_limit: gdt.limit,
            gdt_base: gdt.base,
            dr7,
            debugctl: rdmsr_arch(msr::IA32_DEBUGCTL),
        }
    }

    /// Puts back what a VM exit changed.
    ///
    /// # Safety
    /// `self` must hold this CPU's and this task's state, read before the VM entry in
    /// the same interrupts-off section.
    pub(crate) unsafe fn restore_after_exit(&self) {
        let gdt = DtReg {
            limit: self.gdt_limit,
            base: self.gdt_base,
        };
        // SAFETY: valid selectors of this task and this CPU's own GDT, DR7 and
        // DEBUGCTL (read by `read`). Without the GDT's real limit, LSL/LAR/VERR from
        // user space on a selector past the GDT would read beyond its page.
        unsafe {
            asm!("lgdt [{}]", in(reg) &raw const gdt, options(nostack));
            if self.ds != 0 {
                asm!("mov ds, {0:x}", in(reg) self.ds, options(nostack));
            }
            if self.es != 0 {
                asm!("mov es, {0:x}", in(reg) self.es, options(nostack));
            }
            if self.ldt != 0 {
                asm!("lldt {0:x}", in(reg) self.ldt, options(nostack));
            }
            if self.dr7 != DR7_INIT {
                asm!("mov dr7, {}", in(reg) self.dr7, options(nomem, nostack));
            }
            if self.debugctl != 0 {
                wrmsr_arch(msr::IA32_DEBUGCTL, self.debugctl);
            }
        }
    }
}

/// DR0-DR3 (`n` below 4; others read 0).
pub(crate) fn read_dr(n: usize) -> u64 {
    let v: u64;
    // SAFETY: reading a debug register has no side effects (ring 0).
    unsafe {
        match n {
            0 => asm!("mov {}, dr0", out(reg) v, options(nomem, nostack)),
            1 => asm!("mov {}, dr1", out(reg) v, options(nomem, nostack)),
            2 => asm!("mov {}, dr2", out(reg) v, options(nomem, nostack)),
            3 => asm!("mov {}, dr3", out(reg) v, options(nomem, nostack)),
            _ => v = 0,
        }
    }
    v
}

/// Sets DR0-DR3 (`n` below 4; others are ignored).
///
/// # Safety
/// The host's value must be put back before the host relies on it (its hardware
/// breakpoints).
pub(crate) unsafe fn write_dr(n: usize, v: u64) {
    // SAFETY: an address register; whether it matches is up to DR7.
    unsafe {
        match n {
            0 => asm!("mov dr0, {}", in(reg) v, options(nomem, nostack)),
            1 => asm!("mov dr1, {}", in(reg) v, options(nomem, nostack)),
            2 => asm!("mov dr2, {}", in(reg) v, options(nomem, nostack)),
            3 => asm!("mov dr3, {}", in(reg) v, options(nomem, nostack)),
            _ => {}
        }
    }
}

/// DR6.
pub(crate) fn read_dr6() -> u64 {
    let v: u64;
    // SAFETY: reading a debug register has no side effects (ring 0).
    unsafe { asm!("mov {}, dr6", out(reg) v, options(nomem, nostack)) };
    v
}

/// Sets DR6.
///
/// # Safety
/// The host's value must be put back before the host takes a #DB.
pub(crate) unsafe fn write_dr6(v: u64) {
    // SAFETY: a status register; guaranteed by the caller.
    unsafe { asm!("mov dr6, {}", in(reg) v, options(nomem, nostack)) };
}

/// Sets DR7.
///
/// # Safety
/// The host's value must be put back before the host relies on its breakpoints.
pub(crate) unsafe fn write_dr7(v: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("mov dr7, {}", in(reg) v, options(nomem, nostack)) };
}

/// CR2.
pub(crate) fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack)) };
    v
}

/// Sets CR2 (for the guest, right before entry).
///
/// # Safety
/// Interrupts must be disabled (a host #PF would overwrite it, which is harmless for the
/// host but loses the guest's value).
pub(crate) unsafe fn write_cr2(v: u64) {
    // SAFETY: CR2 is only a record of the last fault address.
    unsafe { asm!("mov cr2, {}", in(reg) v, options(nomem, nostack)) };
}

/// RDMSR of an MSR that exists on every VMX CPU.
pub(crate) fn rdmsr_arch(index: u32) -> u64 {
    // SAFETY: callers only read architectural MSRs present with VMX and long mode.
    unsafe { x86::msr::rdmsr(index) }
}

/// WRMSR of an architectural MSR.
///
/// # Safety
/// The value must be valid for the MSR and not break the host (callers restore host
/// values before the host depends on them).
pub(crate) unsafe fn wrmsr_arch(index: u32, value: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { x86::msr::wrmsr(index, value) };
}
