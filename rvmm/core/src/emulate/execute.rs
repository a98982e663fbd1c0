// SPDX-License-Identifier: GPL-2.0

//! Carries out one decoded instruction against a register file and an [`Env`] (guest
//! linear memory and segments), with the architectural results: flags, operand and
//! address sizes, segment bases and limits, and the exceptions the CPU would raise.
//!
//! Nothing changes unless the instruction completes: `regs` is updated only on `Ok`,
//! and an [`Env`] must hold back its writes until the caller commits them (an access
//! may still fault, or need data from userspace, after an earlier one was made).

use super::decode::{Insn, Map, Mem, Rep, Rm, SegReg};
use super::flags::{self, mask, sext, sign, RFlags, STATUS};
use crate::guest_state::Seg;

mod control;
mod system;
mod task;

pub use control::real_mode_interrupt;
pub use task::{task_switch, TaskLoad, TaskSource};

/// The general registers, RIP and RFLAGS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15 (the ModRM order).
    pub gpr: [u64; 16],
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
}

/// What the executor needs to know about the CPU's mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mode {
    /// 64-bit mode (IA-32e mode and CS.L).
    pub long: bool,
    /// CS.D: 32-bit default operand and address size (outside 64-bit mode).
    pub def32: bool,
    /// SS.B: 32-bit stack pointer (outside 64-bit mode).
    pub stack32: bool,
    /// Protected mode (CR0.PE, not virtual-8086): segment types and usability checked.
    pub protected: bool,
    /// Current privilege level.
    pub cpl: u8,
    /// CR0.AM: with RFLAGS.AC at CPL 3, misaligned accesses raise #AC.
    pub align_check: bool,
    /// CR4.LA57: canonical addresses have 57 bits.
    pub la57: bool,
    /// SSE instructions run (CR4.OSFXSR set, CR0.EM clear); else they are #UD.
    pub sse: bool,
    /// AVX instructions run (CR4.OSXSAVE, and XCR0 enables SSE and AVX state).
    pub avx: bool,
    /// CR0.TS: SSE and AVX instructions raise #NM.
    pub ts: bool,
}

/// An exception to deliver to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exception {
    /// Vector.
    pub vector: u8,
    /// Error code, for the vectors that push one.
    pub error_code: Option<u32>,
    /// CR2 for a #PF.
    pub cr2: Option<u64>,
}

impl Exception {
    /// #DE.
    pub const DE: Self = Self::new(0, None);
    /// #UD.
    pub const UD: Self = Self::new(6, None);
    /// #GP(0).
    pub const GP0: Self = Self::new(13, Some(0));
    /// #SS(0).
    pub const SS0: Self = Self::new(12, Some(0));
    /// #AC(0).
    pub const AC0: Self = Self::new(17, Some(0));
    /// #NM.
    pub const NM: Self = Self::new(7, None);

    /// #GP with a selector error code.
    pub const fn gp(code: u16) -> Self {
        Self::new(13, Some(code as u32))
    }

    /// #NP (segment not present) with a selector error code.
    pub const fn np(code: u16) -> Self {
        Self::new(11, Some(code as u32))
    }

    /// #SS with a selector error code.
    pub const fn ss(code: u16) -> Self {
        Self::new(12, Some(code as u32))
    }

    const fn new(vector: u8, error_code: Option<u32>) -> Self {
        Self {
            vector,
            error_code,
            cr2: None,
        }
    }

    /// #PF with `error_code` at `cr2`.
    pub const fn page_fault(error_code: u32, cr2: u64) -> Self {
        Self {
            vector: 14,
            error_code: Some(error_code),
            cr2: Some(cr2),
        }
    }
}

/// Why an instruction did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The guest gets this exception; the instruction did not run.
    Exception(Exception),
    /// The environment cannot make an access now (a read of device memory that
    /// userspace has to answer, or page tables that changed under a walk): run the
    /// instruction again later.
    Retry,
    /// An instruction the emulator does not carry out (its opcode).
    Unsupported(u32),
}

impl From<Exception> for Stop {
    fn from(e: Exception) -> Self {
        Self::Exception(e)
    }
}

/// How an instruction completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Done {
    /// RIP moved on (to the next instruction or a branch target).
    Next,
    /// A REP string instruction did one iteration and has more: RIP stays.
    Repeat,
}

/// The system registers the system instructions read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    /// CR0, CR2, CR3, CR4 as the guest sees them.
    pub cr: [u64; 5],
    /// GDTR (base, limit).
    pub gdtr: (u64, u16),
    /// IDTR (base, limit); the interrupt vector table in real mode.
    pub idtr: (u64, u16),
    /// LDTR.
    pub ldtr: Seg,
    /// TR.
    pub tr: Seg,
}

/// A change of system state: the [`Env`] checks it when the instruction makes it (an
/// invalid value is the exception it returns) and applies it when the caller commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SysWrite {
    /// MOV to CR0, CR2, CR3 or CR4 (also LMSW and CLTS, as CR0 writes).
    Cr(u8, u64),
    /// LGDT: base, limit.
    Gdtr(u64, u16),
    /// LIDT: base, limit.
    Idtr(u64, u16),
    /// WRMSR: index, value.
    Msr(u32, u64),
    /// HLT: the vCPU waits for an interrupt after the instruction retires.
    Halt,
}

/// Guest memory and segment registers, as the executor sees them. The system side
/// (segment loads, control registers, MSRs, CPUID) has defaults that refuse: an
/// environment that emulates only data accesses need not provide it.
pub trait Env {
    /// Segment register `s`.
    fn segment(&mut self, s: SegReg) -> Seg;
    /// Reads `buf.len()` bytes (at most 32) at linear address `la`, which may cross a
    /// page, with the rights of the current privilege level.
    fn read(&mut self, la: u64, buf: &mut [u8]) -> Result<(), Stop>;
    /// Writes `data` (at most 32 bytes) at linear address `la`: checked now (a fault
    /// is returned now), made when the caller commits.
    fn write(&mut self, la: u64, data: &[u8]) -> Result<(), Stop>;
    /// Reads `size` bytes from I/O port `port` (`Stop::Retry` while userspace has not
    /// answered).
    fn port_in(&mut self, port: u16, size: u8) -> Result<u64, Stop>;
    /// Writes `size` bytes of `value` to I/O port `port`, when the caller commits.
    fn port_out(&mut self, port: u16, size: u8, value: u64) -> Result<(), Stop>;
    /// Vector register `n` (YMMn; XMMn is its low 16 bytes).
    fn vreg(&mut self, n: u8) -> [u8; 32];
    /// Sets YMMn, when the caller commits.
    fn set_vreg(&mut self, n: u8, v: [u8; 32]);
    /// Loads segment register `s` (selector and descriptor cache), when the caller
    /// commits; later reads of `segment(s)` in the same instruction see the old value.
    fn load_segment(&mut self, _s: SegReg, _seg: Seg) -> Result<(), Stop> {
        Err(Stop::Unsupported(0))
    }
    /// The control registers and descriptor-table registers.
    fn control(&mut self) -> Result<Control, Stop> {
        Err(Stop::Unsupported(0))
    }
    /// A change of system state (see [`SysWrite`]); one per instruction.
    fn sys_write(&mut self, _w: SysWrite) -> Result<(), Stop> {
        Err(Stop::Unsupported(0))
    }
    /// RDMSR: the value, or the exception (#GP for an MSR the vCPU does not have).
    fn rdmsr(&mut self, _index: u32) -> Result<u64, Stop> {
        Err(Stop::Unsupported(0))
    }
    /// CPUID leaf `leaf`, sub-leaf `sub`: EAX, EBX, ECX, EDX.
    fn cpuid(&mut self, _leaf: u32, _sub: u32) -> Result<[u32; 4], Stop> {
        Err(Stop::Unsupported(0))
    }
    /// The instruction blocks interrupts until the next one retires: STI that set
    /// IF (`mov_ss` false), or a load of SS (`mov_ss` true).
    fn interrupt_shadow(&mut self, _mov_ss: bool) {}
}

const RAX: u8 = 0;
const RCX: u8 = 1;
const RDX: u8 = 2;
const RSP: u8 = 4;
const RSI: u8 = 6;
const RDI: u8 = 7;

// Segment access rights (VMX format) bits the checks read.
use crate::guest_state::ar::{
    CODE as AR_CODE, DB as AR_DB, DC as AR_EXPAND_DOWN, RW as AR_WRITABLE_OR_READABLE,
    UNUSABLE as AR_UNUSABLE,
};

struct Cpu<'a, E: Env> {
    insn: &'a Insn,
    mode: &'a Mode,
    r: Regs,
    env: &'a mut E,
}

/// Carries out `insn` (decoded at `regs.rip`).
pub fn execute<E: Env>(
    insn: &Insn,
    mode: &Mode,
    regs: &mut Regs,
    env: &mut E,
) -> Result<Done, Stop> {
    let mut cpu = Cpu {
        insn,
        mode,
        r: *regs,
        env,
    };
    let done = cpu.run()?;
    *regs = cpu.r;
    Ok(done)
}

/// `n / d` for a quotient that fits 64 bits, with the remainder; `None` if `d` is 0 or
/// the quotient does not fit (#DE). Long division: the kernel has no 128-bit divide.
fn div_wide(n: u128, d: u64) -> Option<(u64, u64)> {
    let hi = (n >> 64) as u64;
    if d == 0 || hi >= d {
        return None;
    }
    let (mut q, mut r) = (0u64, u128::from(hi));
    let lo = n as u64;
    for bit in (0..64).rev() {
        r = (r << 1) | u128::from(lo >> bit & 1);
        q <<= 1;
        if r >= u128::from(d) {
            r -= u128::from(d);
            q |= 1;
        }
    }
    Some((q, r as u64))
}

/// Whether LOCK is allowed on `insn` (SDM Vol. 2A, LOCK): only these read-modify-write
/// instructions, and only with a memory destination; anything else is #UD.
fn lockable(i: &Insn) -> bool {
    let ext = i.reg & 7;
    let op_ok = match i.map {
        Map::One => match i.op {
            0x00..=0x3f => i.op >> 3 != 7 && i.op & 7 < 2,
            0x80..=0x83 => ext != 7,
            0x86 | 0x87 => true,
            0xf6 | 0xf7 => ext == 2 || ext == 3,
            0xfe => ext < 2,
            0xff => ext < 2,
            _ => false,
        },
        Map::Two => match i.op {
            0xab | 0xb3 | 0xbb | 0xb0 | 0xb1 | 0xc0 | 0xc1 => true,
            0xba => ext >= 5,
            0xc7 => ext == 1,
            _ => false,
        },
        Map::Three38 => false,
    };
    op_ok && i.mem().is_some()
}

impl<E: Env> Cpu<'_, E> {
    fn gp_or_ss(seg: SegReg) -> Exception {
        if seg == SegReg::Ss {
            Exception::SS0
        } else {
            Exception::GP0
        }
    }

    fn code_mask(&self) -> u64 {
        if self.mode.long {
            u64::MAX
        } else if self.mode.def32 {
            0xffff_ffff
        } else {
            0xffff
        }
    }

    fn next_rip(&self) -> u64 {
        self.r.rip.wrapping_add(u64::from(self.insn.len)) & self.code_mask()
    }

    fn reg(&self, n: u8, size: u8) -> u64 {
        if size == 1 {
            let (r, shift) = self.insn.byte_reg(n);
            return self.r.gpr[usize::from(r & 15)] >> shift & 0xff;
        }
        self.r.gpr[usize::from(n & 15)] & mask(size)
    }

    /// Writes register `n` as an instruction with a `size`-byte destination does:
    /// bytes and words merge, doublewords zero-extend.
    fn set_reg(&mut self, n: u8, size: u8, v: u64) {
        let (r, shift) = if size == 1 {
            self.insn.byte_reg(n)
        } else {
            (n, 0)
        };
        let slot = &mut self.r.gpr[usize::from(r & 15)];
        *slot = match size {
            1 | 2 => (*slot & !(mask(size) << shift)) | ((v & mask(size)) << shift),
            4 => v & 0xffff_ffff,
            _ => v,
        };
    }

    fn flags(&self) -> RFlags {
        RFlags::from_bits_truncate(self.r.rflags)
    }

    fn set_flags(&mut self, which: RFlags, f: RFlags) {
        self.r.rflags = flags::merge(self.r.rflags, which, f);
    }

    fn canonical(&self, la: u64) -> bool {
        let bits = if self.mode.la57 { 57 } else { 48 };
        let shift = 64 - bits;
        ((la << shift) as i64 >> shift) as u64 == la
    }

    /// The linear address of `size` bytes at offset `ea` in `seg`, after the checks of
    /// segmentation (SDM Vol. 3A, 5.3 and 5.4) or, in 64-bit mode, canonicality; and
    /// alignment checking.
    fn linear(&mut self, seg: SegReg, ea: u64, size: u8, write: bool) -> Result<u64, Stop> {
        let la = if self.mode.long {
            let base = match seg {
                SegReg::Fs | SegReg::Gs => self.env.segment(seg).base,
                _ => 0,
            };
            let la = base.wrapping_add(ea);
            let last = la.wrapping_add(u64::from(size) - 1);
            if !self.canonical(la) || !self.canonical(last) {
                return Err(Self::gp_or_ss(seg).into());
            }
            la
        } else {
            let s = self.env.segment(seg);
            let fault = Self::gp_or_ss(seg);
            if self.mode.protected {
                if s.ar & AR_UNUSABLE != 0 {
                    return Err(fault.into());
                }
                let code = s.ar & AR_CODE != 0;
                let rw = s.ar & AR_WRITABLE_OR_READABLE != 0;
                // Writes need a writable data segment; reads of code need a readable one.
                let refused = if write { code || !rw } else { code && !rw };
                if refused {
                    return Err(fault.into());
                }
            }
            // (An offset past 32 bits is beyond any limit; it cannot wrap to pass.)
            let Some(last) = ea.checked_add(u64::from(size) - 1) else {
                return Err(fault.into());
            };
            let limit = u64::from(s.limit);
            let expand_down = s.ar & (AR_CODE | AR_EXPAND_DOWN) == AR_EXPAND_DOWN;
            let ok = if expand_down && self.mode.protected {
                let upper = if s.ar & AR_DB != 0 {
                    0xffff_ffff
                } else {
                    0xffff
                };
                ea > limit && last <= upper
            } else {
                last <= limit
            };
            if !ok {
                return Err(fault.into());
            }
            s.base.wrapping_add(ea) & 0xffff_ffff
        };
        if self.mode.align_check
            && self.mode.cpl == 3
            && self.r.rflags & RFlags::FLAGS_AC.bits() != 0
            && matches!(size, 2 | 4 | 8)
            && la & (u64::from(size) - 1) != 0
        {
            return Err(Exception::AC0.into());
        }
        Ok(la)
    }

    /// The effective address (offset in the segment) of `m`, wrapped to the address
    /// size.
    fn ea(&self, m: &Mem) -> u64 {
        let mut ea = m.disp;
        if let Some(b) = m.base {
            ea = ea.wrapping_add(self.r.gpr[usize::from(b & 15)]);
        }
        if let Some((x, scale)) = m.index {
            ea = ea.wrapping_add(self.r.gpr[usize::from(x & 15)].wrapping_mul(u64::from(scale)));
        }
        if m.rip_rel {
            ea = ea.wrapping_add(self.next_rip());
        }
        ea & mask(self.insn.addrsize)
    }

    fn read_at(&mut self, seg: SegReg, ea: u64, size: u8) -> Result<u64, Stop> {
        let la = self.linear(seg, ea, size, false)?;
        let mut b = [0u8; 8];
        self.env.read(la, &mut b[..usize::from(size.min(8))])?;
        Ok(u64::from_le_bytes(b))
    }

    fn write_at(&mut self, seg: SegReg, ea: u64, size: u8, v: u64) -> Result<(), Stop> {
        let la = self.linear(seg, ea, size, true)?;
        self.env
            .write(la, &v.to_le_bytes()[..usize::from(size.min(8))])
    }

    /// The r/m operand's value.
    fn read_rm(&mut self, size: u8) -> Result<u64, Stop> {
        match self.insn.rm {
            Some(Rm::Reg(n)) => Ok(self.reg(n, size)),
            Some(Rm::Mem(m)) => {
                let ea = self.ea(&m);
                self.read_at(m.seg, ea, size)
            }
            None => Err(Exception::UD.into()),
        }
    }

    /// Reads the r/m operand that the instruction then writes: the write rights are
    /// checked before the read, as the CPU does for a read-modify-write.
    fn read_rm_for_write(&mut self, size: u8) -> Result<u64, Stop> {
        if let Some(Rm::Mem(m)) = self.insn.rm {
            let ea = self.ea(&m);
            self.linear(m.seg, ea, size, true)?;
        }
        self.read_rm(size)
    }

    fn write_rm(&mut self, size: u8, v: u64) -> Result<(), Stop> {
        match self.insn.rm {
            Some(Rm::Reg(n)) => {
                self.set_reg(n, size, v);
                Ok(())
            }
            Some(Rm::Mem(m)) => {
                let ea = self.ea(&m);
                self.write_at(m.seg, ea, size, v)
            }
            None => Err(Exception::UD.into()),
        }
    }

    fn mem_only(&self) -> Result<Mem, Stop> {
        self.insn.mem().ok_or(Stop::Exception(Exception::UD))
    }

    fn stack_addr_size(&mut self) -> u8 {
        if self.mode.long {
            8
        } else if self.mode.stack32 {
            4
        } else {
            2
        }
    }

    fn push(&mut self, size: u8, v: u64) -> Result<(), Stop> {
        let sas = self.stack_addr_size();
        let sp = self.r.gpr[usize::from(RSP)].wrapping_sub(u64::from(size)) & mask(sas);
        self.write_at(SegReg::Ss, sp, size, v)?;
        self.set_reg(RSP, sas, sp);
        Ok(())
    }

    fn pop(&mut self, size: u8) -> Result<u64, Stop> {
        let sas = self.stack_addr_size();
        let sp = self.r.gpr[usize::from(RSP)] & mask(sas);
        let v = self.read_at(SegReg::Ss, sp, size)?;
        self.set_reg(RSP, sas, sp.wrapping_add(u64::from(size)));
        Ok(v)
    }

    /// A near branch to `target` (operand size `size`): #GP(0) outside the code
    /// segment's limit or, in 64-bit mode, at a non-canonical address.
    fn branch(&mut self, target: u64, size: u8) -> Result<(), Stop> {
        let target = target & mask(size);
        if self.mode.long {
            if !self.canonical(target) {
                return Err(Exception::GP0.into());
            }
        } else if target > u64::from(self.env.segment(SegReg::Cs).limit) {
            return Err(Exception::GP0.into());
        }
        self.r.rip = target;
        Ok(())
    }

    fn run(&mut self) -> Result<Done, Stop> {
        let i = *self.insn;
        if i.lock && !lockable(&i) {
            return Err(Exception::UD.into());
        }
        let vector = i.map == Map::Two
            && matches!(
                i.op,
                0x10 | 0x11 | 0x28 | 0x29 | 0x2b | 0x6e | 0x6f | 0x7e | 0x7f | 0xd6 | 0xe7
            );
        if i.vex.is_some() && !vector {
            return Err(Stop::Unsupported(0xc4));
        }
        let w = i.opsize;
        let ext = i.reg & 7;
        let next = self.next_rip();
        match (i.map, i.op) {
            (Map::One, 0x00..=0x3f) if i.op & 7 < 6 => {
                let kind = i.op >> 3;
                let size = if i.op & 1 == 0 { 1 } else { w };
                match i.op & 7 {
                    0 | 1 => {
                        let a = if kind == 7 {
                            self.read_rm(size)?
                        } else {
                            self.read_rm_for_write(size)?
                        };
                        let b = self.reg(i.reg, size);
                        if let Some(r) = self.alu(kind, a, b, size) {
                            self.write_rm(size, r)?;
                        }
                    }
                    2 | 3 => {
                        let a = self.reg(i.reg, size);
                        let b = self.read_rm(size)?;
                        if let Some(r) = self.alu(kind, a, b, size) {
                            self.set_reg(i.reg, size, r);
                        }
                    }
                    _ => {
                        let a = self.reg(RAX, size);
                        if let Some(r) = self.alu(kind, a, i.imm, size) {
                            self.set_reg(RAX, size, r);
                        }
                    }
                }
            }
            (Map::One, 0x50..=0x57) => {
                let n = (i.op & 7) | if i.rex_b { 8 } else { 0 };
                let size = i.stack_opsize();
                let v = self.r.gpr[usize::from(n)];
                self.push(size, v)?;
            }
            (Map::One, 0x58..=0x5f) => {
                let n = (i.op & 7) | if i.rex_b { 8 } else { 0 };
                let size = i.stack_opsize();
                let v = self.pop(size)?;
                self.set_reg(n, size, v);
            }
            (Map::One, 0x63) => {
                // MOVSXD (64-bit mode): sign-extends a doubleword with REX.W.
                let v = self.read_rm(if w == 8 { 4 } else { w })?;
                let v = if w == 8 { sext(v, 4) } else { v };
                self.set_reg(i.reg, w, v);
            }
            (Map::One, 0x68 | 0x6a) => self.push(i.stack_opsize(), i.imm)?,
            (Map::One, 0x69 | 0x6b) => {
                let b = self.read_rm(w)?;
                let r = self.imul2(b, i.imm, w);
                self.set_reg(i.reg, w, r);
            }
            (Map::One, 0x80..=0x83) => {
                let size = if i.op & 1 == 0 { 1 } else { w };
                let a = if ext == 7 {
                    self.read_rm(size)?
                } else {
                    self.read_rm_for_write(size)?
                };
                if let Some(r) = self.alu(ext, a, i.imm, size) {
                    self.write_rm(size, r)?;
                }
            }
            (Map::One, 0x84 | 0x85) => {
                let size = if i.op == 0x84 { 1 } else { w };
                let a = self.read_rm(size)?;
                let b = self.reg(i.reg, size);
                self.alu(4, a, b, size);
            }
            (Map::One, 0x86 | 0x87) => {
                let size = if i.op == 0x86 { 1 } else { w };
                let a = self.read_rm_for_write(size)?;
                let b = self.reg(i.reg, size);
                self.write_rm(size, b)?;
                self.set_reg(i.reg, size, a);
            }
            (Map::One, 0x88 | 0x89) => {
                let size = if i.op == 0x88 { 1 } else { w };
                let v = self.reg(i.reg, size);
                self.write_rm(size, v)?;
            }
            (Map::One, 0x8a | 0x8b) => {
                let size = if i.op == 0x8a { 1 } else { w };
                let v = self.read_rm(size)?;
                self.set_reg(i.reg, size, v);
            }
            (Map::One, 0x8c) => {
                // MOV r/m, Sreg: a 16-bit store to memory; a register destination gets
                // the selector zero-extended to the operand size.
                let s = super::decode::SegReg::from_bits(ext).ok_or(Exception::UD)?;
                let sel = u64::from(self.env.segment(s).selector);
                match i.rm {
                    Some(Rm::Mem(_)) => self.write_rm(2, sel)?,
                    _ => self.write_rm(w, sel)?,
                }
            }
            (Map::One, 0x8f) if ext == 0 => {
                // POP r/m: RSP is incremented before the destination's address is
                // computed.
                let size = i.stack_opsize();
                let v = self.pop(size)?;
                self.write_rm(size, v)?;
            }
            (Map::One, 0xa0..=0xa3) => {
                let size = if i.op & 1 == 0 { 1 } else { w };
                if i.op < 0xa2 {
                    let v = self.read_rm(size)?;
                    self.set_reg(RAX, size, v);
                } else {
                    let v = self.reg(RAX, size);
                    self.write_rm(size, v)?;
                }
            }
            (Map::One, 0x6c..=0x6f | 0xa4..=0xa7 | 0xaa..=0xaf) => return self.string(),
            (Map::One, 0xc0 | 0xc1 | 0xd0..=0xd3) => {
                let size = if i.op & 1 == 0 { 1 } else { w };
                let count = match i.op {
                    0xc0 | 0xc1 => i.imm,
                    0xd0 | 0xd1 => 1,
                    _ => self.r.gpr[usize::from(RCX)] & 0xff,
                };
                let a = self.read_rm_for_write(size)?;
                if let Some(r) = self.shift(ext, a, count, size) {
                    self.write_rm(size, r)?;
                }
            }
            (Map::One, 0xc2 | 0xc3) => {
                let size = i.stack_opsize();
                let target = self.pop(size)?;
                if i.op == 0xc2 {
                    let sas = self.stack_addr_size();
                    let sp = self.r.gpr[usize::from(RSP)].wrapping_add(i.imm) & mask(sas);
                    self.set_reg(RSP, sas, sp);
                }
                self.branch(target, size)?;
                return Ok(Done::Next);
            }
            (Map::One, 0xc6 | 0xc7) if ext == 0 => {
                let size = if i.op == 0xc6 { 1 } else { w };
                self.write_rm(size, i.imm)?;
            }
            (Map::One, 0xe8) => {
                let size = if i.long { 8 } else { i.opsize };
                self.push(size, next)?;
                self.branch(next.wrapping_add(i.imm), size)?;
                return Ok(Done::Next);
            }
            (Map::One, 0xf6 | 0xf7) => {
                let size = if i.op == 0xf6 { 1 } else { w };
                self.group3(ext, size)?;
            }
            (Map::One, 0xfe | 0xff) if ext < 2 => {
                let size = if i.op == 0xfe { 1 } else { w };
                let a = self.read_rm_for_write(size)?;
                let (r, f) = if ext == 0 {
                    flags::add(a, 1, false, size)
                } else {
                    flags::sub(a, 1, false, size)
                };
                self.set_flags(STATUS - RFlags::FLAGS_CF, f);
                self.write_rm(size, r)?;
            }
            (Map::One, 0xff) if ext == 2 || ext == 4 => {
                // CALL/JMP near through r/m: 64-bit operands in 64-bit mode.
                let size = if i.long { 8 } else { w };
                let target = self.read_rm(size)?;
                if ext == 2 {
                    self.push(size, next)?;
                }
                self.branch(target, size)?;
                return Ok(Done::Next);
            }
            (Map::One, 0xff) if ext == 6 => {
                let size = i.stack_opsize();
                let v = self.read_rm(size)?;
                self.push(size, v)?;
            }
            (
                Map::Two,
                0x10 | 0x11 | 0x28 | 0x29 | 0x2b | 0x6e | 0x6f | 0x7e | 0x7f | 0xd6 | 0xe7,
            ) => self.vector_move()?,
            (Map::Two, 0x40..=0x4f) => {
                // CMOVcc reads its source whatever the condition; a 32-bit destination
                // is zero-extended even when nothing moves.
                let v = self.read_rm(w)?;
                let cur = self.reg(i.reg, w);
                let take = flags::condition(i.op & 15, self.flags());
                self.set_reg(i.reg, w, if take { v } else { cur });
            }
            (Map::Two, 0x90..=0x9f) => {
                let v = u64::from(flags::condition(i.op & 15, self.flags()));
                self.write_rm(1, v)?;
            }
            (Map::Two, 0xa3 | 0xab | 0xb3 | 0xbb | 0xba) => self.bit_test()?,
            (Map::Two, 0xa4 | 0xa5 | 0xac | 0xad) => {
                let count = if i.op & 1 == 0 {
                    i.imm
                } else {
                    self.r.gpr[usize::from(RCX)]
                };
                let a = self.read_rm_for_write(w)?;
                let b = self.reg(i.reg, w);
                if let Some(r) = self.double_shift(i.op >= 0xac, a, b, count, w) {
                    self.write_rm(w, r)?;
                }
            }
            (Map::Two, 0xaf) => {
                let b = self.read_rm(w)?;
                let a = self.reg(i.reg, w);
                let r = self.imul2(a, b, w);
                self.set_reg(i.reg, w, r);
            }
            (Map::Two, 0xb0 | 0xb1) => {
                let size = if i.op == 0xb0 { 1 } else { w };
                let dst = self.read_rm_for_write(size)?;
                let acc = self.reg(RAX, size);
                let (_, f) = flags::sub(acc, dst, false, size);
                self.set_flags(STATUS, f);
                if acc & mask(size) == dst {
                    let src = self.reg(i.reg, size);
                    self.write_rm(size, src)?;
                } else {
                    self.set_reg(RAX, size, dst);
                }
            }
            (Map::Two, 0xb6 | 0xb7 | 0xbe | 0xbf) => {
                let size = if i.op & 1 == 0 { 1 } else { 2 };
                let v = self.read_rm(size)?;
                let v = if i.op >= 0xbe { sext(v, size) } else { v };
                self.set_reg(i.reg, w, v);
            }
            (Map::Two, 0xc0 | 0xc1) => {
                let size = if i.op == 0xc0 { 1 } else { w };
                let a = self.read_rm_for_write(size)?;
                let b = self.reg(i.reg, size);
                let (r, f) = flags::add(a, b, false, size);
                self.set_flags(STATUS, f);
                self.write_rm(size, r)?;
                self.set_reg(i.reg, size, a);
            }
            (Map::Two, 0xc7) if ext == 1 => self.cmpxchg8b16b()?,
            (Map::Three38, 0xf0 | 0xf1) if i.rep == Rep::None => {
                // MOVBE: memory operands only.
                let m = self.mem_only()?;
                let ea = self.ea(&m);
                let swap = |v: u64| v.swap_bytes() >> (64 - 8 * u32::from(w));
                if i.op == 0xf0 {
                    let v = self.read_at(m.seg, ea, w)?;
                    self.set_reg(i.reg, w, swap(v));
                } else {
                    let v = self.reg(i.reg, w);
                    self.write_at(m.seg, ea, w, swap(v))?;
                }
            }
            _ => return self.run_control(next),
        }
        self.r.rip = next;
        Ok(Done::Next)
    }

    /// ALU operation `kind` (ADD, OR, ADC, SBB, AND, SUB, XOR, CMP: the ModRM.reg order
    /// of group 1): sets the status flags, returns the result to store (none for CMP).
    fn alu(&mut self, kind: u8, a: u64, b: u64, size: u8) -> Option<u64> {
        let cf = self.flags().contains(RFlags::FLAGS_CF);
        let (r, f) = match kind & 7 {
            0 => flags::add(a, b, false, size),
            1 => flags::logic(a | b, size),
            2 => flags::add(a, b, cf, size),
            3 => flags::sub(a, b, cf, size),
            4 => flags::logic(a & b, size),
            5 | 7 => flags::sub(a, b, false, size),
            _ => flags::logic(a ^ b, size),
        };
        self.set_flags(STATUS, f);
        (kind & 7 != 7).then_some(r)
    }

    /// Two- and three-operand IMUL: the truncated product; CF = OF = it does not
    /// equal the full product. SF, ZF and PF follow the truncated product (they are
    /// undefined), AF clears.
    fn imul2(&mut self, a: u64, b: u64, size: u8) -> u64 {
        let full = i128::from(sext(a, size) as i64) * i128::from(sext(b, size) as i64);
        let r = full as u64 & mask(size);
        let over = i128::from(sext(r, size) as i64) != full;
        let mut f = flags::szp(r, size);
        f.set(RFlags::FLAGS_CF | RFlags::FLAGS_OF, over);
        self.set_flags(STATUS, f);
        r
    }

    /// Group 3: TEST, NOT, NEG, MUL, IMUL, DIV, IDIV.
    fn group3(&mut self, ext: u8, size: u8) -> Result<(), Stop> {
        match ext {
            0 | 1 => {
                let a = self.read_rm(size)?;
                self.alu(4, a, self.insn.imm, size);
            }
            2 => {
                let a = self.read_rm_for_write(size)?;
                self.write_rm(size, !a)?;
            }
            3 => {
                let a = self.read_rm_for_write(size)?;
                let (r, mut f) = flags::sub(0, a, false, size);
                f.set(RFlags::FLAGS_CF, a & mask(size) != 0);
                self.set_flags(STATUS, f);
                self.write_rm(size, r)?;
            }
            4 | 5 => {
                let b = self.read_rm(size)?;
                let a = self.reg(RAX, size);
                let (lo, hi, over) = if ext == 4 {
                    let p = u128::from(a) * u128::from(b);
                    let (lo, hi) = (p as u64 & mask(size), (p >> (8 * size)) as u64 & mask(size));
                    (lo, hi, hi != 0)
                } else {
                    let p = i128::from(sext(a, size) as i64) * i128::from(sext(b, size) as i64);
                    let lo = p as u64 & mask(size);
                    let hi = (p >> (8 * size)) as u64 & mask(size);
                    (lo, hi, i128::from(sext(lo, size) as i64) != p)
                };
                if size == 1 {
                    self.set_reg(RAX, 2, lo | hi << 8);
                } else {
                    self.set_reg(RAX, size, lo);
                    self.set_reg(RDX, size, hi);
                }
                let mut f = flags::szp(lo, size);
                f.set(RFlags::FLAGS_CF | RFlags::FLAGS_OF, over);
                self.set_flags(STATUS, f);
            }
            _ => {
                let d = self.read_rm(size)?;
                let bits = 8 * u32::from(size);
                let (lo_reg, hi) = if size == 1 {
                    (self.reg(RAX, 2) & 0xff, self.reg(RAX, 2) >> 8)
                } else {
                    (self.reg(RAX, size), self.reg(RDX, size))
                };
                let dividend = (u128::from(hi) << bits) | u128::from(lo_reg);
                let (q, r) = if ext == 6 {
                    let (q, r) = div_wide(dividend, d).ok_or(Exception::DE)?;
                    if q > mask(size) {
                        return Err(Exception::DE.into());
                    }
                    (q, r)
                } else {
                    // The dividend is 2 * size bytes wide: sign-extend it from there.
                    let shift = 128 - 2 * bits;
                    let n = ((dividend << shift) as i128) >> shift;
                    let d = sext(d, size) as i64;
                    let (q, r) =
                        div_wide(n.unsigned_abs(), d.unsigned_abs()).ok_or(Exception::DE)?;
                    let q = if (n < 0) != (d < 0) {
                        -i128::from(q)
                    } else {
                        i128::from(q)
                    };
                    let r = if n < 0 { -i128::from(r) } else { i128::from(r) };
                    let lim = 1i128 << (bits - 1);
                    if q >= lim || q < -lim {
                        return Err(Exception::DE.into());
                    }
                    (q as u64 & mask(size), r as u64 & mask(size))
                };
                if size == 1 {
                    self.set_reg(RAX, 2, q | r << 8);
                } else {
                    self.set_reg(RAX, size, q);
                    self.set_reg(RDX, size, r);
                }
            }
        }
        Ok(())
    }

    /// Group 2 shifts and rotates (ROL, ROR, RCL, RCR, SHL, SHR, SAL, SAR). A masked
    /// count of 0 changes nothing. OF is set as for a count of 1 (it is undefined for
    /// other counts); AF clears (undefined).
    fn shift(&mut self, ext: u8, a: u64, count: u64, size: u8) -> Option<u64> {
        let bits = 8 * u32::from(size);
        let count = (count & if size == 8 { 0x3f } else { 0x1f }) as u32;
        if count == 0 {
            return None;
        }
        let a = a & mask(size);
        let cf_in = self.flags().contains(RFlags::FLAGS_CF);
        let mut f = self.flags();
        let (r, cf) = match ext {
            0 | 1 => {
                let c = count % bits;
                let r = if ext == 0 {
                    ((a << c) | (a >> ((bits - c) % bits))) & mask(size)
                } else {
                    ((a >> c) | (a << ((bits - c) % bits))) & mask(size)
                };
                let r = if c == 0 { a } else { r };
                let cf = if ext == 0 { r & 1 != 0 } else { sign(r, size) };
                (r, cf)
            }
            2 | 3 => {
                // Through CF: a (bits + 1)-bit rotation.
                let c = count % (bits + 1);
                let wide = u128::from(a) | (u128::from(cf_in) << bits);
                let n = bits + 1;
                let m = (1u128 << n) - 1;
                let rot = if c == 0 {
                    wide
                } else if ext == 2 {
                    ((wide << c) | (wide >> (n - c))) & m
                } else {
                    ((wide >> c) | (wide << (n - c))) & m
                };
                (rot as u64 & mask(size), rot >> bits & 1 != 0)
            }
            4 | 6 => {
                let wide = u128::from(a) << count;
                (wide as u64 & mask(size), wide >> bits & 1 != 0)
            }
            5 => (a >> count, (a >> (count - 1)) & 1 != 0),
            _ => {
                let s = sext(a, size) as i64;
                let r = (s >> count.min(63)) as u64 & mask(size);
                (r, (s >> (count - 1).min(63)) & 1 != 0)
            }
        };
        f.set(RFlags::FLAGS_CF, cf);
        let of = match ext {
            0 | 2 | 4 | 6 => sign(r, size) != cf,
            1 | 3 => sign(r, size) != sign(r << 1, size),
            5 => sign(a, size),
            _ => false,
        };
        f.set(RFlags::FLAGS_OF, of);
        if ext >= 4 {
            let szp = flags::szp(r, size);
            f = (f - (RFlags::FLAGS_SF | RFlags::FLAGS_ZF | RFlags::FLAGS_PF | RFlags::FLAGS_AF))
                | szp;
        }
        self.r.rflags = flags::merge(self.r.rflags, STATUS, f);
        Some(r)
    }

    /// SHLD (`right` false) / SHRD: shifts `a` by `count`, filling from `b`.
    fn double_shift(&mut self, right: bool, a: u64, b: u64, count: u64, size: u8) -> Option<u64> {
        let bits = 8 * u32::from(size);
        let count = (count & if size == 8 { 0x3f } else { 0x1f }) as u32;
        if count == 0 {
            return None;
        }
        let (a, b) = (u128::from(a & mask(size)), u128::from(b & mask(size)));
        let (r, cf) = if right {
            // b:a >> count (counts past the size give undefined results).
            let wide = (b << bits) | a;
            (
                (wide >> count) as u64 & mask(size),
                (wide >> (count - 1)) & 1 != 0,
            )
        } else {
            let wide = (a << bits) | b;
            let sh = wide << count;
            // CF: the last bit shifted out of `a` (undefined past the size).
            let cf = count <= bits && (a >> (bits - count)) & 1 != 0;
            ((sh >> bits) as u64 & mask(size), cf)
        };
        let mut f = flags::szp(r, size);
        f.set(RFlags::FLAGS_CF, cf);
        f.set(RFlags::FLAGS_OF, sign(r, size) != sign(a as u64, size));
        self.set_flags(STATUS, f);
        Some(r)
    }

    /// BT, BTS, BTR, BTC. With a register bit offset and a memory operand the offset
    /// is signed and may address outside the operand (SDM Vol. 2A, BT).
    fn bit_test(&mut self) -> Result<(), Stop> {
        let i = *self.insn;
        let w = i.opsize;
        let bits = 8 * u64::from(w);
        let (kind, offset) = if i.op == 0xba {
            if i.reg & 7 < 4 {
                return Err(Exception::UD.into());
            }
            (i.reg & 3, i.imm & (bits - 1))
        } else {
            ((i.op >> 3) & 3, self.reg(i.reg, w))
        };
        let write = kind != 0;
        let (value, bit, at) = match i.rm {
            Some(Rm::Mem(m)) if i.op != 0xba => {
                let off = sext(offset, w) as i64;
                let word = off.div_euclid(bits as i64);
                let ea = self
                    .ea(&m)
                    .wrapping_add((word as u64).wrapping_mul(u64::from(w)))
                    & mask(i.addrsize);
                if write {
                    self.linear(m.seg, ea, w, true)?;
                }
                (
                    self.read_at(m.seg, ea, w)?,
                    off.rem_euclid(bits as i64) as u64,
                    Some((m.seg, ea)),
                )
            }
            _ => {
                let v = if write {
                    self.read_rm_for_write(w)?
                } else {
                    self.read_rm(w)?
                };
                (v, offset & (bits - 1), None)
            }
        };
        self.set_flags(
            RFlags::FLAGS_CF,
            RFlags::from_bits_truncate(value >> bit & 1),
        );
        let r = match kind {
            1 => value | 1 << bit,
            2 => value & !(1 << bit),
            3 => value ^ 1 << bit,
            _ => return Ok(()),
        };
        match at {
            Some((seg, ea)) => self.write_at(seg, ea, w, r),
            None => self.write_rm(w, r),
        }
    }

    /// The SSE and AVX moves between a vector register and memory. Legacy SSE loads
    /// keep bits 255:128 of the YMM register; VEX loads clear them; scalar loads (MOVSS,
    /// MOVSD, MOVD, MOVQ) clear the bits above their size. The aligned forms raise
    /// #GP(0) on a misaligned operand.
    fn vector_move(&mut self) -> Result<(), Stop> {
        let i = *self.insn;
        let m = i.mem().ok_or(Stop::Unsupported(0x0f00 | u32::from(i.op)))?;
        if i.lock {
            return Err(Exception::UD.into());
        }
        let vex = i.vex;
        if match vex {
            Some(v) => !self.mode.avx || v.vvvv != 0,
            None => !self.mode.sse,
        } {
            return Err(Exception::UD.into());
        }
        if self.mode.ts {
            return Err(Exception::NM.into());
        }
        let wide = vex.is_some_and(|v| v.l);
        let full = if wide { 32u8 } else { 16 };
        // (size, load, aligned) by opcode and mandatory prefix.
        let (none, p66, f3, f2) = (
            !i.p66 && i.rep == Rep::None,
            i.p66 && i.rep == Rep::None,
            i.rep == Rep::Rep,
            i.rep == Rep::Repne,
        );
        let scalar = |size: u8| -> Result<u8, Stop> {
            if wide {
                Err(Exception::UD.into())
            } else {
                Ok(size)
            }
        };
        let q = if i.rex_w { 8 } else { 4 };
        let (size, load, aligned) = match i.op {
            0x10 | 0x11 if none || p66 => (full, i.op == 0x10, false),
            0x10 | 0x11 if f3 => (4, i.op == 0x10, false),
            0x10 | 0x11 if f2 => (8, i.op == 0x10, false),
            0x28 | 0x29 if none || p66 => (full, i.op == 0x28, true),
            0x2b if none || p66 => (full, false, true),
            0x6e if p66 => (scalar(q)?, true, false),
            0x7e if p66 => (scalar(q)?, false, false),
            0x7e if f3 => (scalar(8)?, true, false),
            0x6f | 0x7f if p66 => (full, i.op == 0x6f, true),
            0x6f | 0x7f if f3 => (full, i.op == 0x6f, false),
            0xd6 if p66 => (scalar(8)?, false, false),
            0xe7 if p66 => (full, false, true),
            _ => return Err(Stop::Unsupported(0x0f00 | u32::from(i.op))),
        };
        let ea = self.ea(&m);
        let la = self.linear(m.seg, ea, size, !load)?;
        if aligned && la & (u64::from(size) - 1) != 0 {
            return Err(Self::gp_or_ss(m.seg).into());
        }
        let n = usize::from(size);
        let mut reg = self.env.vreg(i.reg & 15);
        if load {
            let mut b = [0u8; 32];
            self.env.read(la, &mut b[..n])?;
            // Cleared above the load: up to bit 127 (scalar loads), and bits 255:128
            // with VEX.
            let keep_from = if vex.is_some() { 32 } else { 16 };
            reg[..n].copy_from_slice(&b[..n]);
            for byte in reg.iter_mut().take(keep_from).skip(n) {
                *byte = 0;
            }
            self.env.set_vreg(i.reg & 15, reg);
        } else {
            self.env.write(la, &reg[..n])?;
        }
        Ok(())
    }

    /// CMPXCHG8B / CMPXCHG16B (REX.W): 16 bytes need 16-byte alignment.
    fn cmpxchg8b16b(&mut self) -> Result<(), Stop> {
        let m = self.mem_only()?;
        let ea = self.ea(&m);
        let wide = self.insn.rex_w;
        let half = if wide { 8 } else { 4 };
        let la = self.linear(m.seg, ea, if wide { 16 } else { 8 }, true)?;
        if wide && la & 15 != 0 {
            return Err(Exception::GP0.into());
        }
        let mut b = [0u8; 16];
        let n = usize::from(2 * half);
        self.env.read(la, &mut b[..n])?;
        let lo = u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]));
        let hi = u64::from_le_bytes(b[8..].try_into().unwrap_or([0; 8]));
        let (mem_lo, mem_hi) = if wide {
            (lo, hi)
        } else {
            (lo & 0xffff_ffff, lo >> 32)
        };
        let eq = mem_lo == self.reg(RAX, half) && mem_hi == self.reg(RDX, half);
        self.set_flags(
            RFlags::FLAGS_ZF,
            if eq {
                RFlags::FLAGS_ZF
            } else {
                RFlags::empty()
            },
        );
        if eq {
            let (nlo, nhi) = (self.reg(3, half), self.reg(RCX, half));
            let mut out = [0u8; 16];
            if wide {
                out[..8].copy_from_slice(&nlo.to_le_bytes());
                out[8..].copy_from_slice(&nhi.to_le_bytes());
            } else {
                out[..8].copy_from_slice(&(nlo | nhi << 32).to_le_bytes());
            }
            self.env.write(la, &out[..n])?;
        } else {
            self.set_reg(RAX, half, mem_lo);
            self.set_reg(RDX, half, mem_hi);
        }
        Ok(())
    }

    /// INS, OUTS, MOVS, CMPS, STOS, LODS, SCAS: one iteration; with REP,
    /// `Done::Repeat` while the count and the REPE/REPNE condition say go on. (The
    /// I/O permission checks of INS and OUTS come before their VM exit.)
    fn string(&mut self) -> Result<Done, Stop> {
        let i = *self.insn;
        let size = match i.op {
            0x6c | 0x6e => 1,
            0x6d | 0x6f => i.opsize.min(4),
            _ if i.op & 1 == 0 => 1,
            _ => i.opsize,
        };
        let asz = i.addrsize;
        let am = mask(asz);
        let rep = i.rep != Rep::None;
        if rep && self.r.gpr[usize::from(RCX)] & am == 0 {
            self.r.rip = self.next_rip();
            return Ok(Done::Next);
        }
        let src_seg = i.seg.unwrap_or(SegReg::Ds);
        let (si, di) = (
            self.r.gpr[usize::from(RSI)] & am,
            self.r.gpr[usize::from(RDI)] & am,
        );
        let (mut step_si, mut step_di) = (false, false);
        let mut compared = false;
        let port = self.r.gpr[usize::from(RDX)] as u16;
        match i.op {
            0x6c | 0x6d => {
                // The destination's segment checks come before the port read.
                self.linear(SegReg::Es, di, size, true)?;
                let v = self.env.port_in(port, size)?;
                self.write_at(SegReg::Es, di, size, v)?;
                step_di = true;
            }
            0x6e | 0x6f => {
                let v = self.read_at(src_seg, si, size)?;
                self.env.port_out(port, size, v)?;
                step_si = true;
            }
            0xa4 | 0xa5 => {
                let v = self.read_at(src_seg, si, size)?;
                self.write_at(SegReg::Es, di, size, v)?;
                (step_si, step_di) = (true, true);
            }
            0xa6 | 0xa7 => {
                let a = self.read_at(src_seg, si, size)?;
                let b = self.read_at(SegReg::Es, di, size)?;
                self.alu(7, a, b, size);
                (step_si, step_di, compared) = (true, true, true);
            }
            0xaa | 0xab => {
                let v = self.reg(RAX, size);
                self.write_at(SegReg::Es, di, size, v)?;
                step_di = true;
            }
            0xac | 0xad => {
                let v = self.read_at(src_seg, si, size)?;
                self.set_reg(RAX, size, v);
                step_si = true;
            }
            _ => {
                let b = self.read_at(SegReg::Es, di, size)?;
                let a = self.reg(RAX, size);
                self.alu(7, a, b, size);
                (step_di, compared) = (true, true);
            }
        }
        let delta = if self.r.rflags & RFlags::FLAGS_DF.bits() != 0 {
            0u64.wrapping_sub(u64::from(size))
        } else {
            u64::from(size)
        };
        if step_si {
            self.set_reg(RSI, asz, si.wrapping_add(delta) & am);
        }
        if step_di {
            self.set_reg(RDI, asz, di.wrapping_add(delta) & am);
        }
        if !rep {
            self.r.rip = self.next_rip();
            return Ok(Done::Next);
        }
        let count = (self.r.gpr[usize::from(RCX)] & am).wrapping_sub(1) & am;
        self.set_reg(RCX, asz, count);
        let zf = self.flags().contains(RFlags::FLAGS_ZF);
        let stop =
            count == 0 || (compared && ((i.rep == Rep::Rep && !zf) || (i.rep == Rep::Repne && zf)));
        if stop {
            self.r.rip = self.next_rip();
            Ok(Done::Next)
        } else {
            Ok(Done::Repeat)
        }
    }
}
