// SPDX-License-Identifier: GPL-2.0

//! Real mode without "unrestricted guest" (no EPT), as KVM runs it there:
//!
//! - While virtual-8086 mode holds the real-mode state exactly (see
//!   `rvmm_core::realmode`), the guest runs in vm86 with IOPL 0 and every exception
//!   intercepted. What vm86 runs differently from real mode (CLI/STI, PUSHF/POPF, INT,
//!   IRET, HLT, the system instructions) raises #GP, which exits; the instruction
//!   emulator carries it out with real-mode semantics. Other exceptions go to the guest
//!   through its interrupt vector table.
//! - Otherwise (after CR0.PE is cleared, until the guest has reloaded its segments;
//!   "unreal" 4-GiB limits; 32-bit code segments) the emulator runs the guest one
//!   instruction at a time inside the run section, without entering.
//! - After CR0.PE is set, until the segments are ones VMX enters protected mode with
//!   (CS loaded from the GDT by a far JMP), the emulator runs the guest too.
//!
//! Events for a real-mode guest go through its IVT, delivered here. In vm86 the VMCS
//! holds the vm86 access rights and rvmm's own TSS; the guest's are kept aside.

use rvmm_core::emulate::Stop;
use rvmm_core::exit::intr;
use rvmm_core::guest_state::ar::{
    REAL_CODE as AR_REAL_CODE, REAL_DATA as AR_REAL_DATA, VM86 as AR_VM86,
};
use rvmm_core::guest_state::Seg;
use rvmm_core::realmode::vm86_holds_all;
use x86::vmx::vmcs::{control, guest};

use super::exit::{guest_mode, GuestEnv};
use super::state::SEGS;
use super::{Next, VcpuInner};
use crate::vmx::CurrentVmcs;

pub(super) const RFLAGS_VM: u64 = 1 << 17;
const RFLAGS_IOPL: u64 = 3 << 12;

/// The TSS VMX needs in vm86. Every exception exits and no event is injected there, so
/// the CPU uses it only for the I/O permission check of IN/OUT (its map base is the
/// word at guest-physical 0x66, whatever the guest keeps there): either way they exit,
/// as a #GP or, after the check, as an I/O exit.
const VM86_TR: Seg = Seg {
    selector: 0,
    base: 0,
    limit: 0x67,
    ar: 0x8b,
};
const TR: usize = 6;

/// Index in SEGS of each `SegReg` (ES, CS, SS, DS, FS, GS).
pub(super) const fn seg_index(s: rvmm_core::emulate::SegReg) -> usize {
    use rvmm_core::emulate::SegReg::*;
    match s {
        Cs => 0,
        Ds => 1,
        Es => 2,
        Fs => 3,
        Gs => 4,
        Ss => 5,
    }
}

/// What the real-mode code of a vCPU is doing now.
#[derive(Clone, Copy, Default)]
pub(super) struct RealMode {
    /// The guest is in real mode (CR0.PE = 0).
    pub(super) active: bool,
    /// The VMCS holds the vm86 picture of it: RFLAGS.VM, the vm86 access rights and
    /// rvmm's TSS; `ar` and `tr` hold the guest's.
    pub(super) vm86: bool,
    pub(super) ar: [u32; 6],
    pub(super) tr: Seg,
    /// The state cannot be entered (real mode outside vm86, or protected mode with
    /// segments VMX refuses): the emulator runs the guest.
    pub(super) emulating: bool,
}

impl VcpuInner {
    fn vmcs_seg(vmcs: &CurrentVmcs, i: usize) -> Seg {
        let (s, b, l, a) = SEGS[i];
        Seg {
            selector: vmcs.read(s) as u16,
            base: vmcs.read(b),
            limit: vmcs.read(l) as u32,
            ar: vmcs.read(a) as u32,
        }
    }

    fn write_vmcs_seg(vmcs: &CurrentVmcs, i: usize, seg: Seg) {
        let (s, b, l, a) = SEGS[i];
        vmcs.write(s, seg.selector.into());
        vmcs.write(b, seg.base);
        vmcs.write(l, seg.limit.into());
        vmcs.write(a, seg.ar.into());
    }

    /// Segment `i` (SEGS order) as the guest sees it.
    pub(super) fn guest_seg(&self, vmcs: &CurrentVmcs, i: usize) -> Seg {
        let mut seg = Self::vmcs_seg(vmcs, i);
        if self.real.vm86 {
            if i < 6 {
                seg.ar = self.real.ar[i];
            } else if i == TR {
                seg = self.real.tr;
            }
        }
        seg
    }

    /// Loads segment `i` (one of the six) as an instruction did.
    pub(super) fn set_guest_seg(&mut self, vmcs: &CurrentVmcs, i: usize, seg: Seg) {
        if self.real.vm86 {
            self.real.ar[i] = seg.ar;
            Self::write_vmcs_seg(vmcs, i, Seg { ar: AR_VM86, ..seg });
        } else {
            Self::write_vmcs_seg(vmcs, i, seg);
        }
    }

    /// CR0.PE went to 0 (or userspace set a real-mode state): the segments keep what
    /// they hold; vm86 if it can run them, else the emulator.
    pub(super) fn enter_real_mode(&mut self, vmcs: &CurrentVmcs) {
        self.real.active = true;
        self.real.vm86 = false;
        self.real_mode_refresh(vmcs);
    }

    /// CR0.PE went to 1: the guest's segments back in the VMCS; the emulator runs it
    /// until VMX can enter its state.
    pub(super) fn leave_real_mode(&mut self, vmcs: &CurrentVmcs) {
        self.leave_vm86(vmcs);
        self.real.active = false;
        self.real.emulating = true;
        self.state_checked = false;
        vmcs.write(control::EXCEPTION_BITMAP, super::EXCEPTION_BITMAP);
    }

    fn leave_vm86(&mut self, vmcs: &CurrentVmcs) {
        if !self.real.vm86 {
            return;
        }
        for i in 0..6 {
            vmcs.write(SEGS[i].3, self.real.ar[i].into());
        }
        Self::write_vmcs_seg(vmcs, TR, self.real.tr);
        vmcs.write(guest::RFLAGS, vmcs.read(guest::RFLAGS) & !RFLAGS_VM);
        self.real.vm86 = false;
    }

    /// After a real-mode instruction or event: runs in vm86 if vm86 holds the state,
    /// else marks it for the emulator.
    pub(super) fn real_mode_refresh(&mut self, vmcs: &CurrentVmcs) {
        if !self.real.active {
            return;
        }
        let segs: [Seg; 6] = core::array::from_fn(|i| self.guest_seg(vmcs, i));
        let others = [segs[1], segs[2], segs[3], segs[4], segs[5]];
        if vm86_holds_all(&segs[0], &others) {
            if !self.real.vm86 {
                for (i, s) in segs.iter().enumerate() {
                    self.real.ar[i] = s.ar;
                    vmcs.write(SEGS[i].3, AR_VM86.into());
                }
                self.real.tr = Self::vmcs_seg(vmcs, TR);
                Self::write_vmcs_seg(vmcs, TR, VM86_TR);
                self.real.vm86 = true;
                vmcs.write(control::EXCEPTION_BITMAP, 0xffff_ffff);
            }
            // IOPL 0: CLI, STI, PUSHF, POPF, INT and IRET raise #GP and are emulated.
            let rflags = vmcs.read(guest::RFLAGS);
            vmcs.write(guest::RFLAGS, (rflags & !RFLAGS_IOPL) | RFLAGS_VM);
            self.real.emulating = false;
        } else {
            self.leave_vm86(vmcs);
            self.real.emulating = true;
        }
    }

    /// Whether the guest must run in the emulator now (no entry): real mode outside
    /// vm86, or a protected-mode state VMX refuses (after CR0.PE was set).
    #[inline]
    pub(super) fn needs_emulation(&mut self, vmcs: &CurrentVmcs) -> bool {
        if !self.real.emulating {
            return false;
        }
        if self.real.active {
            return true;
        }
        if rvmm_core::guest_state::check_state(&self.guest_state(vmcs)).is_ok() {
            self.real.emulating = false;
            self.state_checked = true;
            return false;
        }
        true
    }

    /// One instruction of a guest that cannot be entered, by the emulator.
    pub(super) fn emulate_step(&mut self, vmcs: &CurrentVmcs, run: *mut rvmm_uapi::Run) -> Next {
        self.stats.emulated_steps.inc();
        self.emulate_insn(vmcs, run, super::exit::Cause::Any, None)
    }

    /// A start-up IPI with `vector`: the vCPU starts in real mode at vector << 12.
    pub(super) fn start_real_mode(&mut self, vmcs: &CurrentVmcs, vector: u8) {
        self.cr0 = (1 << 4) | (1 << 29) | (1 << 30); // ET, NW, CD
        self.cr4 = 0;
        self.efer = 0;
        self.cr3 = 0;
        self.apply_paging_state(vmcs);
        self.leave_vm86(vmcs);
        for i in 0..6 {
            let ar = if i == 0 { AR_REAL_CODE } else { AR_REAL_DATA };
            Self::write_vmcs_seg(
                vmcs,
                i,
                Seg {
                    selector: 0,
                    base: 0,
                    limit: 0xffff,
                    ar,
                },
            );
        }
        let cs = u16::from(vector) << 8;
        Self::write_vmcs_seg(
            vmcs,
            0,
            Seg {
                selector: cs,
                base: u64::from(cs) << 4,
                limit: 0xffff,
                ar: AR_REAL_CODE,
            },
        );
        Self::write_vmcs_seg(vmcs, TR, VM86_TR);
        vmcs.write(guest::LDTR_ACCESS_RIGHTS, 0x1_0000);
        vmcs.write(guest::GDTR_BASE, 0);
        vmcs.write(guest::GDTR_LIMIT, 0xffff);
        vmcs.write(guest::IDTR_BASE, 0);
        vmcs.write(guest::IDTR_LIMIT, 0xffff);
        vmcs.write(guest::RIP, 0);
        vmcs.write(guest::RSP, 0);
        vmcs.write(guest::RFLAGS, 2);
        vmcs.write(guest::INTERRUPTIBILITY_STATE, 0);
        vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
        self.gprs = Default::default();
        // Whatever the vCPU was waiting for from userspace belongs to what INIT ended.
        self.pending = super::Pending::None;
        self.mmio_reads.clear();
        // INIT's debug registers (SDM Vol. 3A, Table 10-1).
        self.dr = [0, 0, 0, 0, 0xffff_0ff0, 0x400, 0xffff_0ff0, 0x400];
        vmcs.write(guest::DR7, 0x400);
        self.need_reset = true;
        self.enter_real_mode(vmcs);
    }

    /// An exception in vm86: #GP is an instruction real mode runs and vm86 does not,
    /// and INT3/INTO go through the IVT: the emulator carries them out. Other
    /// exceptions go to the guest's IVT.
    pub(super) fn vm86_exception(
        &mut self,
        vmcs: &CurrentVmcs,
        run: *mut rvmm_uapi::Run,
        info: u32,
    ) -> Next {
        let vec = intr::vector(info);
        let software = info & intr::TYPE_MASK == intr::TYPE_SW_EXCEPTION;
        if vec == rvmm_core::exit::vector::GP || software {
            return self.emulate_insn(vmcs, run, super::exit::Cause::Any, None);
        }
        if info & intr::TYPE_MASK == intr::TYPE_PRIV_SW_EXCEPTION {
            // INT1 (ICEBP): a #DB trap after it.
            let len = vmcs.read(x86::vmx::vmcs::ro::VMEXIT_INSTRUCTION_LEN);
            let ip = vmcs.read(guest::RIP).wrapping_add(len) & 0xffff;
            vmcs.write(guest::RIP, ip);
        }
        // Real mode pushes no error code.
        self.inject(vmcs, vec, None)
    }

    /// In real mode an event queued for the next entry (an interrupt, an exception)
    /// goes through the guest's IVT now: FLAGS, CS and IP on its stack, CS:IP from
    /// the table. A delivery that faults shuts the vCPU down.
    #[inline(never)]
    pub(super) fn real_mode_deliver(&mut self, vmcs: &CurrentVmcs) {
        let info = vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32;
        if info & intr::VALID == 0 {
            return;
        }
        vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
        let mut regs = self.emu_regs(vmcs);
        let software = matches!(
            info & intr::TYPE_MASK,
            intr::TYPE_SW_INTR | intr::TYPE_SW_EXCEPTION | intr::TYPE_PRIV_SW_EXCEPTION
        );
        if software {
            let len = vmcs.read(control::VMENTRY_INSTRUCTION_LEN);
            regs.rip = regs.rip.wrapping_add(len) & 0xffff;
        }
        let mode = guest_mode(self, vmcs);
        let ctx = self.perm_ctx(vmcs);
        let before = regs;
        let mut env = GuestEnv::new(self, vmcs, &ctx, None);
        let r =
            rvmm_core::emulate::real_mode_interrupt(intr::vector(info), &mode, &mut regs, &mut env);
        let effects = env.effects();
        match r {
            Ok(()) => {
                self.apply_effects(vmcs, &ctx, &effects);
                self.emu_commit_regs(vmcs, &before, &regs, rvmm_core::emulate::Done::Repeat);
                vmcs.write(guest::RIP, regs.rip);
                // An NMI blocks NMIs until the handler's IRET (emulated: see
                // `emulate_insn`).
                let nmi = if info & intr::TYPE_MASK == intr::TYPE_NMI {
                    8
                } else {
                    0
                };
                let s = vmcs.read(guest::INTERRUPTIBILITY_STATE);
                vmcs.write(guest::INTERRUPTIBILITY_STATE, (s & !3) | nmi);
                self.halted = false;
                self.real_mode_refresh(vmcs);
            }
            Err(Stop::Exception(_)) | Err(Stop::Retry) | Err(Stop::Unsupported(_)) => {
                // The IVT or the stack is beyond its limit, or not in RAM: as a real
                // CPU's double and triple fault would, this ends in a shutdown.
                self.triple_fault = true;
            }
        }
        if self.real.vm86 {
            let rflags = vmcs.read(guest::RFLAGS);
            vmcs.write(guest::RFLAGS, (rflags & !RFLAGS_IOPL) | RFLAGS_VM);
        }
    }
}
