// SPDX-License-Identifier: GPL-2.0

//! Hardware task switches (SDM Vol. 3A, 8.3), which VMX leaves to the VMM: a JMP or
//! CALL to a TSS or task gate, an IRET with NT set, or an interrupt or exception
//! through a task gate. The current state goes to the old TSS, the new task's comes
//! from its TSS; busy bits, the back link and NT follow the source. 32-bit TSSs only.

use super::super::decode::SegReg;
use super::control::seg_from_descriptor;
use super::{Cpu, Env, Exception, Mode, Regs, Seg, Stop, AR_CODE, AR_UNUSABLE};
use crate::guest_state::ar::{P as AR_PRESENT, S as AR_S};

/// What started the task switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskSource {
    /// CALL to a TSS or task gate: the new task links back to the old one.
    Call,
    /// IRET with NT set: back to the task in the back link.
    Iret,
    /// JMP to a TSS or task gate.
    Jmp,
    /// An interrupt or exception through a task gate in the IDT (its error code, if
    /// it has one, goes on the new task's stack); the gate's DPL is not checked.
    Gate(Option<u32>),
}

/// The system registers a task switch loads, for the caller to apply with the
/// instruction's other effects (segments through [`Env::load_segment`], the memory
/// writes, the registers); CR0.TS is set and DR7's local enables cleared, as by the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskLoad {
    /// The new task register (busy TSS).
    pub tr: Seg,
    /// The new LDTR.
    pub ldtr: Seg,
    /// CR3 from the new TSS, to load when paging is on.
    pub cr3: u64,
}

/// The 32-bit TSS's fields (byte offsets).
const TSS_LINK: u64 = 0x00;
const TSS_CR3: u64 = 0x1c;
const TSS_EIP: u64 = 0x20;
const TSS_EFLAGS: u64 = 0x24;
const TSS_GPRS: u64 = 0x28;
const TSS_SEGS: u64 = 0x48;
const TSS_LDT: u64 = 0x60;
/// The smallest limit of a 32-bit TSS.
const TSS32_MIN_LIMIT: u32 = 0x67;

const TYPE_TSS32_AVAILABLE: u32 = 9;
const TYPE_TSS32_BUSY: u32 = 11;
const TYPE_BUSY_BIT: u8 = 1 << 1;
const TYPE_LDT: u32 = 2;
const RFLAGS_NT: u64 = 1 << 14;
const RFLAGS_VM: u64 = 1 << 17;

/// The segment registers in the TSS's order (ES, CS, SS, DS, FS, GS).
const TSS_SEG_ORDER: [SegReg; 6] = [
    SegReg::Es,
    SegReg::Cs,
    SegReg::Ss,
    SegReg::Ds,
    SegReg::Fs,
    SegReg::Gs,
];

/// #TS with a selector error code.
const fn ts(sel: u16) -> Exception {
    Exception {
        vector: 10,
        error_code: Some(sel as u32),
        cr2: None,
    }
}

impl<E: Env> Cpu<'_, E> {
    fn read_u32(&mut self, la: u64) -> Result<u32, Stop> {
        let mut b = [0u8; 4];
        self.env.read(la & 0xffff_ffff, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn write_u32(&mut self, la: u64, v: u32) -> Result<(), Stop> {
        self.env.write(la & 0xffff_ffff, &v.to_le_bytes())
    }

    /// Sets or clears the busy bit of the TSS descriptor `sel` in the GDT.
    fn set_busy(&mut self, sel: u16, busy: bool) -> Result<(), Stop> {
        let (raw, la) = self.descriptor(sel)?;
        let ar = (raw >> 40) as u8;
        let new = if busy {
            ar | TYPE_BUSY_BIT
        } else {
            ar & !TYPE_BUSY_BIT
        };
        if new != ar {
            self.env.write(la.wrapping_add(5), &[new])?;
        }
        Ok(())
    }

    /// A segment register of the new task, with the checks of SDM 8.3 (step 13) at
    /// privilege level `cpl` (the new CS's RPL).
    fn task_segment(&mut self, s: SegReg, sel: u16, cpl: u32, ldtr: &Seg) -> Result<Seg, Stop> {
        let fault = ts(sel & !3);
        if sel & !3 == 0 {
            if matches!(s, SegReg::Cs | SegReg::Ss) {
                return Err(fault.into());
            }
            return Ok(Seg {
                selector: sel,
                base: 0,
                limit: 0,
                ar: AR_UNUSABLE,
            });
        }
        // The new task's LDT, not the old one's.
        let (table, limit) = if sel & 4 != 0 {
            if ldtr.ar & AR_UNUSABLE != 0 {
                return Err(fault.into());
            }
            (ldtr.base, ldtr.limit)
        } else {
            let c = self.env.control()?;
            (c.gdtr.0, u32::from(c.gdtr.1))
        };
        if u32::from(sel | 7) > limit {
            return Err(fault.into());
        }
        let la = table.wrapping_add(u64::from(sel & !7)) & 0xffff_ffff;
        let mut b = [0u8; 8];
        self.env.read(la, &mut b)?;
        let raw = u64::from_le_bytes(b);
        let seg = seg_from_descriptor(sel, raw);
        let (ar, dpl, rpl) = (seg.ar, seg.ar >> 5 & 3, u32::from(sel & 3));
        let code = ar & AR_CODE != 0;
        let ok = ar & AR_S != 0
            && match s {
                SegReg::Cs => code && if ar & 4 != 0 { dpl <= rpl } else { dpl == rpl },
                SegReg::Ss => !code && ar & 2 != 0 && dpl == cpl && rpl == cpl,
                _ => (!code || ar & 2 != 0) && (code && ar & 4 != 0 || (dpl >= cpl && dpl >= rpl)),
            };
        if !ok {
            return Err(fault.into());
        }
        if ar & AR_PRESENT == 0 {
            return Err(if s == SegReg::Ss {
                Exception::ss(sel & !3)
            } else {
                Exception::np(sel & !3)
            }
            .into());
        }
        if ar & 1 == 0 {
            self.env.write(la.wrapping_add(5), &[(ar as u8) | 1])?;
        }
        Ok(Seg { ar: ar | 1, ..seg })
    }

    fn switch_task(
        &mut self,
        sel: u16,
        source: TaskSource,
        next_eip: u64,
    ) -> Result<TaskLoad, Stop> {
        if self.mode.long || !self.mode.protected {
            return Err(Stop::Unsupported(0x0f_0009));
        }
        let c = self.env.control()?;
        // The new TSS's descriptor: in the GDT, present, 32-bit, and available (busy for
        // IRET); its limit holds a 32-bit TSS.
        if sel & 4 != 0 || sel & !3 == 0 {
            return Err(Exception::gp(sel & !3).into());
        }
        let (raw, _) = self.descriptor(sel)?;
        let new = seg_from_descriptor(sel, raw);
        let ty = new.ar & 0xf;
        let want = if source == TaskSource::Iret {
            TYPE_TSS32_BUSY
        } else {
            TYPE_TSS32_AVAILABLE
        };
        if new.ar & AR_S != 0 || ty != want {
            if matches!(ty, 1 | 3) {
                // A 16-bit TSS.
                return Err(Stop::Unsupported(0x0f_0009));
            }
            return Err(Exception::gp(sel & !3).into());
        }
        if matches!(source, TaskSource::Call | TaskSource::Jmp) {
            let dpl = new.ar >> 5 & 3;
            if u32::from(sel & 3) > dpl || u32::from(self.mode.cpl) > dpl {
                return Err(Exception::gp(sel & !3).into());
            }
        }
        if new.ar & AR_PRESENT == 0 {
            return Err(Exception::np(sel & !3).into());
        }
        if new.limit < TSS32_MIN_LIMIT {
            return Err(ts(sel & !3).into());
        }
        let old = c.tr;
        if old.ar & 0xf != TYPE_TSS32_BUSY || old.limit < TSS32_MIN_LIMIT {
            return Err(Stop::Unsupported(0x0f_0009));
        }
        // The new task's state, read before anything is written (the old and new TSS
        // may be the same).
        let nb = new.base;
        let cr3 = self.read_u32(nb + TSS_CR3)?;
        let eip = self.read_u32(nb + TSS_EIP)?;
        let mut eflags = u64::from(self.read_u32(nb + TSS_EFLAGS)?);
        let mut gprs = [0u32; 8];
        for (k, g) in gprs.iter_mut().enumerate() {
            *g = self.read_u32(nb + TSS_GPRS + 4 * k as u64)?;
        }
        let mut sels = [0u16; 6];
        for (k, s) in sels.iter_mut().enumerate() {
            *s = self.read_u32(nb + TSS_SEGS + 4 * k as u64)? as u16;
        }
        let ldt_sel = self.read_u32(nb + TSS_LDT)? as u16;
        if eflags & RFLAGS_VM != 0 {
            // A virtual-8086 task.
            return Err(Stop::Unsupported(0x0f_0009));
        }
        // The old task: busy bit (JMP, IRET), NT in its saved EFLAGS (IRET), then its
        // dynamic state.
        if matches!(source, TaskSource::Jmp | TaskSource::Iret) {
            self.set_busy(old.selector, false)?;
        }
        let mut old_flags = self.r.rflags;
        if source == TaskSource::Iret {
            old_flags &= !RFLAGS_NT;
        }
        // EIP, EFLAGS, the general registers and the selectors: 64 contiguous bytes.
        let mut state = [0u8; 64];
        let mut put = |k: usize, v: u32| state[4 * k..4 * k + 4].copy_from_slice(&v.to_le_bytes());
        put(0, next_eip as u32);
        put(1, old_flags as u32);
        for k in 0..8 {
            put(2 + k, self.r.gpr[k] as u32);
        }
        for (k, s) in TSS_SEG_ORDER.iter().enumerate() {
            put(10 + k, self.env.segment(*s).selector.into());
        }
        let at = old.base.wrapping_add(TSS_EIP);
        self.env.write(at & 0xffff_ffff, &state[..32])?;
        self.env
            .write(at.wrapping_add(32) & 0xffff_ffff, &state[32..])?;
        // The new task: back link and NT (CALL, gate), busy bit (not for IRET: it is).
        if matches!(source, TaskSource::Call | TaskSource::Gate(_)) {
            self.write_u32(nb + TSS_LINK, old.selector.into())?;
            eflags |= RFLAGS_NT;
        }
        if source != TaskSource::Iret {
            self.set_busy(sel, true)?;
        }
        let tr = Seg {
            selector: sel,
            ar: (new.ar & !0xf) | TYPE_TSS32_BUSY,
            ..new
        };
        // LDTR, then the segment registers at the new CPL (CS's RPL).
        let ldtr = if ldt_sel & !3 == 0 {
            Seg {
                selector: ldt_sel,
                base: 0,
                limit: 0,
                ar: AR_UNUSABLE,
            }
        } else {
            if ldt_sel & 4 != 0 {
                return Err(ts(ldt_sel & !3).into());
            }
            let (raw, _) = self
                .descriptor(ldt_sel)
                .map_err(|_| Stop::from(ts(ldt_sel & !3)))?;
            let l = seg_from_descriptor(ldt_sel, raw);
            if l.ar & AR_S != 0 || l.ar & 0xf != TYPE_LDT {
                return Err(ts(ldt_sel & !3).into());
            }
            if l.ar & AR_PRESENT == 0 {
                return Err(Exception::np(ldt_sel & !3).into());
            }
            l
        };
        let cpl = u32::from(sels[1] & 3);
        let mut segs = [Seg::default(); 6];
        for (k, s) in TSS_SEG_ORDER.iter().enumerate() {
            segs[k] = self.task_segment(*s, sels[k], cpl, &ldtr)?;
        }
        if u64::from(eip) > u64::from(segs[1].limit) {
            return Err(Exception::GP0.into());
        }
        for (k, s) in TSS_SEG_ORDER.iter().enumerate() {
            self.env.load_segment(*s, segs[k])?;
        }
        for (slot, g) in self.r.gpr.iter_mut().zip(gprs) {
            *slot = u64::from(g);
        }
        self.r.rip = eip.into();
        self.r.rflags = (eflags & 0x003f_7fd7) | 2;
        // An exception's error code goes on the new task's stack.
        if let TaskSource::Gate(Some(code)) = source {
            let ss = segs[2];
            let size: u8 = if ss.ar & (1 << 14) != 0 { 4 } else { 2 };
            let mask = if size == 4 { 0xffff_ffff } else { 0xffff };
            let sp = self.r.gpr[4].wrapping_sub(4) & mask;
            if sp.wrapping_add(3) > u64::from(ss.limit) {
                return Err(Exception::ss(0).into());
            }
            self.write_u32(ss.base.wrapping_add(sp), code)?;
            self.r.gpr[4] = (self.r.gpr[4] & !mask) | sp;
        }
        Ok(TaskLoad {
            tr,
            ldtr,
            cr3: cr3.into(),
        })
    }
}

/// Switches to the task whose TSS `sel` selects, for `source`, with `regs` the old
/// task's registers (`regs.rip` the EIP it resumes at: past a CALL, JMP or IRET or an
/// INT n, at a faulting instruction). On `Ok`, `regs` is the new task's and the env
/// holds the TSS and descriptor writes and the segment loads; the caller loads what
/// [`TaskLoad`] says. An exception is returned for the checks before the switch; the
/// new task's segment checks, which the CPU makes after it, are made before it too.
pub fn task_switch<E: Env>(
    sel: u16,
    source: TaskSource,
    mode: &Mode,
    regs: &mut Regs,
    env: &mut E,
) -> Result<TaskLoad, Stop> {
    let insn = super::control::bare_insn();
    let mut cpu = Cpu {
        insn: &insn,
        mode,
        r: *regs,
        env,
    };
    let next = cpu.r.rip;
    let load = cpu.switch_task(sel, source, next)?;
    *regs = cpu.r;
    Ok(load)
}
