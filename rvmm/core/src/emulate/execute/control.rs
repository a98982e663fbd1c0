// SPDX-License-Identifier: GPL-2.0

//! Control transfers and flag instructions: near and far jumps, calls and returns,
//! LOOP/Jcc, INT and IRET, the segment-register loads, PUSHF/POPF and CLI/STI, and the
//! register-only moves a guest runs between mode switches (MOV r,imm, LEA, XCHG rAX,
//! CBW, PUSHA...). Far transfers and segment loads follow real-address mode or, in
//! protected mode, the same-privilege rules; privilege changes through gates, task
//! switches and returns to an outer level are not emulated.

use super::super::decode::{Map, Rm, SegReg};
use super::super::flags::{self, mask, sext, sign, RFlags, STATUS};
use super::{
    Cpu, Done, Env, Exception, Seg, Stop, AR_CODE, AR_DB, AR_UNUSABLE, RAX, RCX, RDX, RSP,
};

use crate::guest_state::ar::{
    ACCESSED as AR_ACCESSED, DC as AR_CONFORMING, L as AR_L, P as AR_PRESENT,
    REAL_DATA as AR_REAL_DATA, RW as AR_RW, S as AR_S, VM86 as AR_VM86,
};

/// The RFLAGS bits POPF and IRET may change: with a 32- or 64-bit operand (ID, AC,
/// NT, IOPL, OF, DF, IF, TF, SF, ZF, AF, PF, CF), and with a 16-bit one.
const POPF_MASK: u64 = 0x0025_7fd5;
const POPF_MASK16: u64 = 0x7fd5;
const IOPL_SHIFT: u32 = 12;

/// The segment `raw` (an 8-byte descriptor) describes, as a register holds it.
pub(crate) fn seg_from_descriptor(selector: u16, raw: u64) -> Seg {
    let base = (raw >> 16 & 0xff_ffff) | (raw >> 56 & 0xff) << 24;
    let mut limit = (raw & 0xffff) as u32 | ((raw >> 48 & 0xf) as u32) << 16;
    let ar = (raw >> 40 & 0xff) as u32 | ((raw >> 52 & 0xf) as u32) << 12;
    if ar & (1 << 15) != 0 {
        limit = limit << 12 | 0xfff;
    }
    Seg {
        selector,
        base,
        limit,
        ar,
    }
}

impl<E: Env> Cpu<'_, E> {
    fn real_mode(&self) -> bool {
        !self.mode.protected && self.mode.cpl == 0
    }

    fn vm86(&self) -> bool {
        !self.mode.protected && self.mode.cpl == 3
    }

    fn iopl(&self) -> u8 {
        (self.r.rflags >> IOPL_SHIFT & 3) as u8
    }

    /// What a segment register gets from `sel` outside protected mode: base sel << 4;
    /// in real mode the limit and attributes stay (a limit set in protected mode
    /// lasts: "unreal" mode), in virtual-8086 mode they are 64 KiB, read/write, DPL 3.
    fn real_seg(&mut self, s: SegReg, sel: u16) -> Seg {
        let cur = self.env.segment(s);
        let (limit, ar) = if self.vm86() {
            (0xffff, AR_VM86)
        } else if cur.ar & AR_UNUSABLE != 0 {
            (cur.limit, AR_REAL_DATA)
        } else {
            (cur.limit, cur.ar | AR_PRESENT)
        };
        Seg {
            selector: sel,
            base: u64::from(sel) << 4,
            limit,
            ar,
        }
    }

    /// Reads the descriptor `sel` selects, with the linear address it is at; #GP(sel)
    /// outside its table.
    pub(super) fn descriptor(&mut self, sel: u16) -> Result<(u64, u64), Stop> {
        let c = self.env.control()?;
        let (base, limit) = if sel & 4 != 0 {
            if c.ldtr.ar & AR_UNUSABLE != 0 {
                return Err(Exception::gp(sel & !3).into());
            }
            (c.ldtr.base, c.ldtr.limit)
        } else {
            (c.gdtr.0, u32::from(c.gdtr.1))
        };
        if u32::from(sel | 7) > limit {
            return Err(Exception::gp(sel & !3).into());
        }
        let la = base.wrapping_add(u64::from(sel & !7));
        let la = if self.mode.long { la } else { la & 0xffff_ffff };
        let mut b = [0u8; 8];
        self.env.read(la, &mut b)?;
        Ok((u64::from_le_bytes(b), la))
    }

    /// Sets a descriptor's accessed bit in its table, as a segment load does.
    fn mark_accessed(&mut self, raw: u64, la: u64) -> Result<(), Stop> {
        let ar = (raw >> 40) as u8;
        if u32::from(ar) & AR_ACCESSED == 0 {
            self.env
                .write(la.wrapping_add(5), &[ar | AR_ACCESSED as u8])?;
        }
        Ok(())
    }

    /// The segment a protected-mode load of `sel` into `s` (not CS) gives, after the
    /// checks of MOV/POP Sreg and LDS & co. (SDM Vol. 2B, MOV).
    fn protected_data_seg(&mut self, s: SegReg, sel: u16) -> Result<Seg, Stop> {
        let rpl = u32::from(sel & 3);
        let cpl = u32::from(self.mode.cpl);
        if sel & !3 == 0 {
            if s == SegReg::Ss && !(self.mode.long && cpl != 3 && rpl == cpl) {
                return Err(Exception::GP0.into());
            }
            // A null SS keeps the privilege level (VMX reads CPL from SS.DPL).
            let dpl = if s == SegReg::Ss { cpl << 5 } else { 0 };
            return Ok(Seg {
                selector: sel,
                base: 0,
                limit: 0,
                ar: AR_UNUSABLE | dpl,
            });
        }
        let (raw, la) = self.descriptor(sel)?;
        let seg = seg_from_descriptor(sel, raw);
        let (ar, dpl) = (seg.ar, seg.ar >> 5 & 3);
        let code = ar & AR_CODE != 0;
        let fault = Exception::gp(sel & !3);
        if ar & AR_S == 0 {
            return Err(fault.into());
        }
        if s == SegReg::Ss {
            if rpl != cpl || code || ar & AR_RW == 0 || dpl != cpl {
                return Err(fault.into());
            }
            if ar & AR_PRESENT == 0 {
                return Err(Exception::ss(sel & !3).into());
            }
        } else {
            if code && ar & AR_RW == 0 {
                return Err(fault.into());
            }
            let conforming_code = code && ar & AR_CONFORMING != 0;
            if !conforming_code && (rpl > dpl || cpl > dpl) {
                return Err(fault.into());
            }
            if ar & AR_PRESENT == 0 {
                return Err(Exception::np(sel & !3).into());
            }
        }
        self.mark_accessed(raw, la)?;
        Ok(Seg {
            ar: ar | AR_ACCESSED,
            ..seg
        })
    }

    /// Loads segment register `s` (not CS) with `sel` as MOV, POP, LDS & co. do.
    pub(super) fn load_sreg(&mut self, s: SegReg, sel: u16) -> Result<(), Stop> {
        let seg = if self.mode.protected {
            self.protected_data_seg(s, sel)?
        } else {
            self.real_seg(s, sel)
        };
        self.env.load_segment(s, seg)?;
        if s == SegReg::Ss {
            self.env.interrupt_shadow(true);
        }
        Ok(())
    }

    /// The code segment a far JMP, CALL or RET to `sel` loads (same privilege only;
    /// `rpl_is_cpl`: RET, whose selector's RPL is the privilege returned to).
    fn far_code_seg(&mut self, sel: u16, ret: bool) -> Result<Seg, Stop> {
        if !self.mode.protected {
            return Ok(self.real_seg(SegReg::Cs, sel));
        }
        if sel & !3 == 0 {
            return Err(Exception::GP0.into());
        }
        let (raw, la) = self.descriptor(sel)?;
        let seg = seg_from_descriptor(sel, raw);
        let (ar, dpl) = (seg.ar, seg.ar >> 5 & 3);
        let (rpl, cpl) = (u32::from(sel & 3), u32::from(self.mode.cpl));
        if ar & AR_S == 0 {
            // A call gate, task gate or TSS: a task switch or a privilege change.
            return Err(Stop::Unsupported(u32::from(self.insn.op)));
        }
        let fault = Exception::gp(sel & !3);
        // A code segment with both L and D is #GP in IA-32e mode (and VMX refuses it
        // there); outside it the L bit is reserved.
        if ar & AR_CODE == 0 || (ar & AR_L != 0 && ar & AR_DB != 0) {
            return Err(fault.into());
        }
        if ret {
            if rpl < cpl {
                return Err(fault.into());
            }
            if rpl > cpl {
                // A return to an outer privilege level.
                return Err(Stop::Unsupported(u32::from(self.insn.op)));
            }
        }
        let ok = if ar & AR_CONFORMING != 0 {
            dpl <= cpl
        } else {
            rpl <= cpl && dpl == cpl
        };
        if !ok {
            return Err(fault.into());
        }
        if ar & AR_PRESENT == 0 {
            return Err(Exception::np(sel & !3).into());
        }
        self.mark_accessed(raw, la)?;
        Ok(Seg {
            selector: (sel & !3) | self.mode.cpl as u16,
            ar: ar | AR_ACCESSED,
            ..seg
        })
    }

    /// Jumps to `off` in `cs` (already checked): #GP(0) beyond its limit.
    fn far_branch(&mut self, cs: Seg, off: u64, size: u8) -> Result<(), Stop> {
        let off = off & mask(size);
        if !self.mode.long && off > u64::from(cs.limit) {
            return Err(Exception::GP0.into());
        }
        self.env.load_segment(SegReg::Cs, cs)?;
        self.r.rip = off;
        Ok(())
    }

    /// A far JMP (`call` false) or CALL to `sel:off` with operand size `size`.
    fn far_transfer(&mut self, sel: u16, off: u64, size: u8, call: bool) -> Result<(), Stop> {
        if self.mode.long {
            return Err(Stop::Unsupported(u32::from(self.insn.op)));
        }
        let cs = self.far_code_seg(sel, false)?;
        if call {
            let old_cs = u64::from(self.env.segment(SegReg::Cs).selector);
            let next = self.next_rip();
            self.push(size, old_cs)?;
            self.push(size, next)?;
        }
        self.far_branch(cs, off, size)
    }

    /// Delivers interrupt `vector` through the real-mode interrupt vector table:
    /// FLAGS, CS and IP (`ret_ip`) pushed, IF, TF and AC cleared, CS:IP from the
    /// table (SDM Vol. 3A, 20.1.4).
    pub(super) fn real_interrupt(&mut self, vector: u8, ret_ip: u64) -> Result<(), Stop> {
        let c = self.env.control()?;
        let off = u64::from(vector) * 4;
        if off + 3 > u64::from(c.idtr.1) {
            return Err(Exception::GP0.into());
        }
        let mut b = [0u8; 4];
        self.env
            .read(c.idtr.0.wrapping_add(off) & 0xffff_ffff, &mut b)?;
        let cs = self.env.segment(SegReg::Cs).selector;
        let flags = self.r.rflags;
        self.push(2, flags)?;
        self.push(2, cs.into())?;
        self.push(2, ret_ip)?;
        let new_cs = u16::from_le_bytes([b[2], b[3]]);
        let seg = self.real_seg(SegReg::Cs, new_cs);
        self.env.load_segment(SegReg::Cs, seg)?;
        self.r.rip = u64::from(u16::from_le_bytes([b[0], b[1]]));
        self.r.rflags &= !(RFlags::FLAGS_IF | RFlags::FLAGS_TF | RFlags::FLAGS_AC).bits();
        Ok(())
    }

    /// RFLAGS after POPF or IRET loads `v` with a `size`-byte operand, as far as the
    /// privilege level lets it.
    fn popped_flags(&self, v: u64, size: u8) -> u64 {
        let mut m = if size == 2 { POPF_MASK16 } else { POPF_MASK };
        if self.mode.cpl > 0 {
            m &= !(3 << IOPL_SHIFT);
        }
        if self.mode.cpl > self.iopl() {
            m &= !RFlags::FLAGS_IF.bits();
        }
        (self.r.rflags & !m) | (v & m) | 2
    }

    fn cond_branch(&mut self, take: bool, next: u64) -> Result<Done, Stop> {
        let size = if self.insn.long { 8 } else { self.insn.opsize };
        if take {
            self.branch(next.wrapping_add(self.insn.imm), size)?;
        } else {
            self.r.rip = next;
        }
        Ok(Done::Next)
    }

    /// The instructions of this file; `Unsupported` for any other.
    pub(super) fn run_control(&mut self, next: u64) -> Result<Done, Stop> {
        let i = *self.insn;
        let w = i.opsize;
        let ext = i.reg & 7;
        let sreg_of = |op: u8| match op {
            0x06 | 0x07 => SegReg::Es,
            0x0e => SegReg::Cs,
            0x16 | 0x17 => SegReg::Ss,
            0xa0 | 0xa1 => SegReg::Fs,
            0xa8 | 0xa9 => SegReg::Gs,
            _ => SegReg::Ds,
        };
        match (i.map, i.op) {
            (Map::One, 0x70..=0x7f) | (Map::Two, 0x80..=0x8f) => {
                let take = flags::condition(i.op & 15, self.flags());
                return self.cond_branch(take, next);
            }
            (Map::One, 0xe0..=0xe3) => {
                let a = i.addrsize;
                let cx = self.r.gpr[usize::from(RCX)] & mask(a);
                let take = if i.op == 0xe3 {
                    cx == 0
                } else {
                    let cx = cx.wrapping_sub(1) & mask(a);
                    self.set_reg(RCX, a, cx);
                    let zf = self.flags().contains(RFlags::FLAGS_ZF);
                    cx != 0 && (i.op == 0xe2 || (i.op == 0xe1) == zf)
                };
                return self.cond_branch(take, next);
            }
            (Map::One, 0xe9 | 0xeb) => return self.cond_branch(true, next),
            (Map::One, 0x9a | 0xea) => {
                self.far_transfer(i.sel, i.imm, w, i.op == 0x9a)?;
                return Ok(Done::Next);
            }
            (Map::One, 0xff) if ext == 3 || ext == 5 => {
                // JMP/CALL far through m16:16/32.
                let m = self.mem_only()?;
                let ea = self.ea(&m);
                let off = self.read_at(m.seg, ea, w)?;
                let sel =
                    self.read_at(m.seg, ea.wrapping_add(u64::from(w)) & mask(i.addrsize), 2)?;
                self.far_transfer(sel as u16, off, w, ext == 3)?;
                return Ok(Done::Next);
            }
            (Map::One, 0xca | 0xcb) => {
                if self.mode.long {
                    return Err(Stop::Unsupported(u32::from(i.op)));
                }
                let sas = self.stack_addr_size();
                let sp0 = self.r.gpr[usize::from(RSP)];
                let off = self.pop(w)?;
                let sel = self.pop(w)? as u16;
                let cs = self.far_code_seg(sel, true)?;
                if i.op == 0xca {
                    let sp = self.r.gpr[usize::from(RSP)].wrapping_add(i.imm) & mask(sas);
                    self.set_reg(RSP, sas, sp);
                }
                if let Err(e) = self.far_branch(cs, off, w) {
                    self.r.gpr[usize::from(RSP)] = sp0;
                    return Err(e);
                }
                return Ok(Done::Next);
            }
            (Map::One, 0xcf) => {
                if self.vm86() && self.iopl() < 3 {
                    return Err(Exception::GP0.into());
                }
                let nt = self.r.rflags & RFlags::FLAGS_NT.bits() != 0;
                if self.mode.long || (self.mode.protected && nt) {
                    // A task return (NT), or IRETQ.
                    return Err(Stop::Unsupported(0xcf));
                }
                let off = self.pop(w)?;
                let sel = self.pop(w)? as u16;
                let fl = self.pop(w)?;
                if self.mode.protected
                    && (u32::from(sel & 3) != u32::from(self.mode.cpl)
                        || (w == 4 && fl & RFlags::FLAGS_VM.bits() != 0))
                {
                    // A return to another privilege level or to virtual-8086 mode.
                    return Err(Stop::Unsupported(0xcf));
                }
                let cs = self.far_code_seg(sel, true)?;
                let flags = self.popped_flags(fl, w);
                self.far_branch(cs, off, w)?;
                self.r.rflags = flags;
                return Ok(Done::Next);
            }
            (Map::One, 0xcc..=0xce) => {
                let vector = match i.op {
                    0xcc => 3,
                    0xce => 4,
                    _ => i.imm as u8,
                };
                if i.op == 0xce && !self.flags().contains(RFlags::FLAGS_OF) {
                    self.r.rip = next;
                    return Ok(Done::Next);
                }
                if !self.real_mode() {
                    // Through the IDT (protected mode) or with the vm86 monitor.
                    return Err(Stop::Unsupported(u32::from(i.op)));
                }
                self.real_interrupt(vector, next)?;
                return Ok(Done::Next);
            }
            _ => {}
        }
        match (i.map, i.op) {
            (Map::One, 0x06 | 0x0e | 0x16 | 0x1e) | (Map::Two, 0xa0 | 0xa8) => {
                let sel = self.env.segment(sreg_of(i.op)).selector;
                let size = i.stack_opsize();
                let sas = self.stack_addr_size();
                let sp = self.r.gpr[usize::from(RSP)].wrapping_sub(u64::from(size)) & mask(sas);
                // A segment register push writes 16 bits in a wider slot.
                self.write_at(SegReg::Ss, sp, 2, sel.into())?;
                self.set_reg(RSP, sas, sp);
            }
            (Map::One, 0x07 | 0x17 | 0x1f) | (Map::Two, 0xa1 | 0xa9) => {
                let sp0 = self.r.gpr[usize::from(RSP)];
                let v = self.pop(i.stack_opsize())?;
                if let Err(e) = self.load_sreg(sreg_of(i.op), v as u16) {
                    self.r.gpr[usize::from(RSP)] = sp0;
                    return Err(e);
                }
            }
            (Map::One, 0x8e) => {
                let s = SegReg::from_bits(ext).ok_or(Exception::UD)?;
                if s == SegReg::Cs {
                    return Err(Exception::UD.into());
                }
                let v = self.read_rm(2)?;
                self.load_sreg(s, v as u16)?;
            }
            (Map::One, 0xc4 | 0xc5) | (Map::Two, 0xb2 | 0xb4 | 0xb5) => {
                let s = match (i.map, i.op) {
                    (Map::One, 0xc4) => SegReg::Es,
                    (Map::One, _) => SegReg::Ds,
                    (_, 0xb2) => SegReg::Ss,
                    (_, 0xb4) => SegReg::Fs,
                    _ => SegReg::Gs,
                };
                let m = self.mem_only()?;
                let ea = self.ea(&m);
                let off = self.read_at(m.seg, ea, w)?;
                let sel =
                    self.read_at(m.seg, ea.wrapping_add(u64::from(w)) & mask(i.addrsize), 2)?;
                self.load_sreg(s, sel as u16)?;
                self.set_reg(i.reg, w, off);
            }
            (Map::One, 0x40..=0x4f) => {
                let n = i.op & 7;
                let a = self.reg(n, w);
                let (r, f) = if i.op < 0x48 {
                    flags::add(a, 1, false, w)
                } else {
                    flags::sub(a, 1, false, w)
                };
                self.set_flags(STATUS - RFlags::FLAGS_CF, f);
                self.set_reg(n, w, r);
            }
            (Map::One, 0x60) => {
                let sp = self.r.gpr[usize::from(RSP)];
                for n in 0..8u8 {
                    let v = if n == RSP {
                        sp
                    } else {
                        self.r.gpr[usize::from(n)]
                    };
                    self.push(w, v & mask(w))?;
                }
            }
            (Map::One, 0x61) => {
                for n in (0..8u8).rev() {
                    let v = self.pop(w)?;
                    if n != RSP {
                        self.set_reg(n, w, v);
                    }
                }
            }
            (Map::One, 0x8d) => {
                let m = self.mem_only()?;
                let ea = self.ea(&m);
                self.set_reg(i.reg, w, ea);
            }
            (Map::One, 0x90..=0x97) => {
                let n = (i.op & 7) | if i.rex_b { 8 } else { 0 };
                if n != 0 {
                    let (a, b) = (self.reg(RAX, w), self.reg(n, w));
                    self.set_reg(RAX, w, b);
                    self.set_reg(n, w, a);
                }
            }
            (Map::One, 0x98) => {
                let half = w / 2;
                let v = sext(self.reg(RAX, half), half);
                self.set_reg(RAX, w, v);
            }
            (Map::One, 0x99) => {
                let v = if sign(self.reg(RAX, w), w) {
                    u64::MAX
                } else {
                    0
                };
                self.set_reg(RDX, w, v);
            }
            (Map::One, 0x9c) => {
                if self.vm86() && self.iopl() < 3 {
                    return Err(Exception::GP0.into());
                }
                let size = i.stack_opsize();
                let v = self.r.rflags & !(RFlags::FLAGS_VM | RFlags::FLAGS_RF).bits();
                self.push(size, v)?;
            }
            (Map::One, 0x9d) => {
                if self.vm86() && self.iopl() < 3 {
                    return Err(Exception::GP0.into());
                }
                let size = i.stack_opsize();
                let v = self.pop(size)?;
                self.r.rflags = self.popped_flags(v, size);
            }
            (Map::One, 0x9e) => {
                let ah = self.r.gpr[usize::from(RAX)] >> 8 & 0xd5;
                self.r.rflags = (self.r.rflags & !0xff) | ah | 2;
            }
            (Map::One, 0x9f) => {
                let f = self.r.rflags & 0xd5 | 2;
                self.set_reg(4, 1, f);
            }
            (Map::One, 0xa8 | 0xa9) => {
                let size = if i.op == 0xa8 { 1 } else { w };
                let a = self.reg(RAX, size);
                let (_, f) = flags::logic(a & i.imm, size);
                self.set_flags(STATUS, f);
            }
            (Map::One, 0xb0..=0xb7) => {
                let n = (i.op & 7) | if i.rex_b { 8 } else { 0 };
                self.set_reg(n, 1, i.imm & 0xff);
            }
            (Map::One, 0xb8..=0xbf) => {
                let n = (i.op & 7) | if i.rex_b { 8 } else { 0 };
                self.set_reg(n, w, i.imm);
            }
            (Map::One, 0xc9) => {
                let sas = self.stack_addr_size();
                let bp = self.r.gpr[5] & mask(sas);
                let sp0 = self.r.gpr[usize::from(RSP)];
                self.set_reg(RSP, sas, bp);
                match self.pop(i.stack_opsize()) {
                    Ok(v) => self.set_reg(5, i.stack_opsize(), v),
                    Err(e) => {
                        self.r.gpr[usize::from(RSP)] = sp0;
                        return Err(e);
                    }
                }
            }
            (Map::One, 0xd7) => {
                let seg = i.seg.unwrap_or(SegReg::Ds);
                let ea = self.r.gpr[3].wrapping_add(self.r.gpr[usize::from(RAX)] & 0xff)
                    & mask(i.addrsize);
                let v = self.read_at(seg, ea, 1)?;
                self.set_reg(RAX, 1, v);
            }
            (Map::One, 0xf5) => self.r.rflags ^= RFlags::FLAGS_CF.bits(),
            (Map::One, 0xf8 | 0xf9) => {
                let on = if i.op == 0xf9 {
                    RFlags::FLAGS_CF
                } else {
                    RFlags::empty()
                };
                self.set_flags(RFlags::FLAGS_CF, on);
            }
            (Map::One, 0xfc | 0xfd) => {
                let on = if i.op == 0xfd {
                    RFlags::FLAGS_DF
                } else {
                    RFlags::empty()
                };
                self.set_flags(RFlags::FLAGS_DF, on);
            }
            (Map::One, 0xfa | 0xfb) => {
                let allowed = if self.vm86() {
                    self.iopl() == 3
                } else {
                    !self.mode.protected || self.mode.cpl <= self.iopl()
                };
                if !allowed {
                    return Err(Exception::GP0.into());
                }
                let was = self.flags().contains(RFlags::FLAGS_IF);
                if i.op == 0xfb {
                    if !was {
                        self.env.interrupt_shadow(false);
                    }
                    self.set_flags(RFlags::FLAGS_IF, RFlags::FLAGS_IF);
                } else {
                    self.set_flags(RFlags::FLAGS_IF, RFlags::empty());
                }
            }
            (Map::Two, 0xc8..=0xcf) => {
                let n = (i.op & 7) | if i.rex_b { 8 } else { 0 };
                let v = match w {
                    8 => self.r.gpr[usize::from(n)].swap_bytes(),
                    4 => u64::from((self.r.gpr[usize::from(n)] as u32).swap_bytes()),
                    // BSWAP of a 16-bit register: undefined; Intel CPUs give 0.
                    _ => 0,
                };
                self.set_reg(n, w, v);
            }
            _ => return self.run_system(next),
        }
        self.r.rip = next;
        Ok(Done::Next)
    }

    /// Whether the r/m operand is a register (for forms that need memory).
    pub(super) fn rm_is_reg(&self) -> bool {
        matches!(self.insn.rm, Some(Rm::Reg(_)))
    }
}

/// Delivers interrupt `vector` to a real-mode guest through its interrupt vector
/// table, returning to `regs.rip` (the event comes before that instruction: an
/// external interrupt, an NMI, an exception; for INT n the caller passes RIP past it).
/// Like an instruction, it changes nothing unless it completes: a failure (the table
/// or the stack beyond their limits) is the exception the delivery raises.
pub fn real_mode_interrupt<E: Env>(
    vector: u8,
    mode: &super::Mode,
    regs: &mut super::Regs,
    env: &mut E,
) -> Result<(), Stop> {
    let insn = bare_insn();
    let mut cpu = Cpu {
        insn: &insn,
        mode,
        r: *regs,
        env,
    };
    let ret = cpu.r.rip;
    cpu.real_interrupt(vector, ret)?;
    *regs = cpu.r;
    Ok(())
}

/// An instruction with no operands (16-bit sizes), for the executor's helpers when
/// an event rather than an instruction drives them.
pub(super) const fn bare_insn() -> super::super::decode::Insn {
    super::super::decode::Insn {
        len: 0,
        map: Map::One,
        op: 0,
        opsize: 2,
        addrsize: 2,
        reg: 0,
        rm: None,
        imm: 0,
        lock: false,
        rep: super::super::decode::Rep::None,
        p66: false,
        rex: false,
        rex_w: false,
        rex_b: false,
        seg: None,
        long: false,
        vex: None,
        sel: 0,
    }
}
