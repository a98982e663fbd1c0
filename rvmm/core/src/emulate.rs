// SPDX-License-Identifier: GPL-2.0

//! The instruction decoder for MMIO: enough x86 to turn a faulting access to a guest
//! physical address outside RAM into an MMIO exit. It decodes the data-movement forms
//! compilers and drivers use for device registers: MOV r/m<->reg (88, 89, 8A, 8B),
//! MOV r/m<-imm (C6, C7), MOVZX (0F B6, 0F B7), with operand-size, address-size,
//! segment, LOCK and REX prefixes. The memory operand's address needs no decoding (the
//! fault gave it); only its length does.

/// Where a store's data comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// General register (0 = RAX ... 15 = R15).
    Reg(u8),
    /// AH, CH, DH or BH: bits 15:8 of register 0..3.
    HighByte(u8),
    /// An immediate, already sign-extended to the operand size.
    Imm(u64),
}

/// A decoded MMIO access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioOp {
    /// Write `size` bytes from `src`.
    Store {
        /// Bytes.
        size: u8,
        /// Data.
        src: Source,
    },
    /// Read `size` bytes into register `dst` (`high_byte`: AH..BH), extended to
    /// `dst_size` bytes with zeros (MOVZX), or merged as MOV does.
    Load {
        /// Bytes read.
        size: u8,
        /// Destination register.
        dst: u8,
        /// AH, CH, DH or BH.
        high_byte: bool,
        /// Destination size in bytes.
        dst_size: u8,
    },
}

/// A decoded instruction: the access and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// The access.
    pub op: MmioOp,
    /// Instruction length in bytes.
    pub len: u8,
}

/// The longest x86 instruction (SDM Vol. 2A, 2.3.11): longer ones raise #GP. The
/// decoders look at no more than this many bytes, so a decoded length always fits.
pub const MAX_INSN_LEN: usize = 15;

/// Why decoding failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end before the instruction does.
    Truncated,
    /// An instruction the decoder does not handle (yet): its first opcode byte.
    Unsupported(u8),
}

/// An instruction's prefixes, opcode and memory operand, as far as the decoders need.
struct Parsed {
    /// Operand size in bytes (2, 4 or 8) of a word-sized operation.
    word: u8,
    rex: u8,
    /// Opcode (the second byte of a 0F xx opcode).
    op: u8,
    two_byte: bool,
    /// ModRM reg field, with REX.R.
    reg: u8,
    /// Index of the first byte after ModRM, SIB and displacement.
    next: usize,
    rep: bool,
}

fn parse(code: &[u8], long: bool, default32: bool) -> Result<Parsed, DecodeError> {
    let code = code.get(..MAX_INSN_LEN).unwrap_or(code);
    let mut i = 0;
    let at = |i: usize| code.get(i).copied().ok_or(DecodeError::Truncated);
    let (mut opsize16, mut addr_override, mut rex) = (false, false, 0u8);
    let mut rep = false;
    loop {
        match at(i)? {
            0x66 => opsize16 = true,
            0x67 => addr_override = true,
            0xf0 => {} // LOCK: the emulation is atomic for the guest (its vCPU waits)
            0xf2 | 0xf3 => rep = true,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => {}
            b @ 0x40..=0x4f if long => {
                rex = b;
                i += 1;
                break;
            }
            _ => break,
        }
        i += 1;
    }
    let rex_w = rex & 8 != 0;
    let rex_r = (rex >> 2) & 1;
    let word = if long && rex_w {
        8
    } else if opsize16 == (long || default32) {
        2
    } else {
        4
    };
    let addr32 = if long {
        !addr_override
    } else {
        default32 != addr_override
    };
    let addr16 = !long && !addr32;
    let mut op = at(i)?;
    i += 1;
    let two_byte = op == 0x0f;
    if two_byte {
        op = at(i)?;
        i += 1;
    }
    // ModRM, SIB and displacement: only their length matters.
    let modrm = at(i)?;
    i += 1;
    let (md, reg, rm) = (modrm >> 6, ((modrm >> 3) & 7) | (rex_r << 3), modrm & 7);
    if md == 3 {
        return Err(DecodeError::Unsupported(op));
    }
    if addr16 {
        i += match (md, rm) {
            (0, 6) => 2,
            (1, _) => 1,
            (2, _) => 2,
            _ => 0,
        };
    } else {
        let mut base = rm;
        if rm == 4 {
            base = at(i)? & 7;
            i += 1;
        }
        i += match md {
            0 if base == 5 => 4,
            1 => 1,
            2 => 4,
            _ => 0,
        };
    }
    // The displacement was skipped, not read: it must be there all the same.
    if i > code.len() {
        return Err(DecodeError::Truncated);
    }
    Ok(Parsed {
        word,
        rex,
        op,
        two_byte,
        reg,
        next: i,
        rep,
    })
}

/// Decodes `code` (the bytes at the guest's RIP). `long` is 64-bit mode, `default32`
/// the code segment's D bit (ignored in 64-bit mode).
pub fn decode(code: &[u8], long: bool, default32: bool) -> Result<Decoded, DecodeError> {
    let code = code.get(..MAX_INSN_LEN).unwrap_or(code);
    let at = |i: usize| code.get(i).copied().ok_or(DecodeError::Truncated);
    let Parsed {
        word,
        rex,
        op,
        two_byte,
        reg,
        next,
        ..
    } = parse(code, long, default32)?;
    let mut i = next;
    let reg8 = |r: u8| {
        if rex == 0 && (4..8).contains(&r) {
            Source::HighByte(r - 4)
        } else {
            Source::Reg(r)
        }
    };
    let imm = |i: usize, n: u8| -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for k in 0..usize::from(n) {
            v |= u64::from(at(i + k)?) << (8 * k);
        }
        Ok(v)
    };
    let decoded = match (two_byte, op) {
        (false, 0x88) => MmioOp::Store {
            size: 1,
            src: reg8(reg),
        },
        (false, 0x89) => MmioOp::Store {
            size: word,
            src: Source::Reg(reg),
        },
        (false, 0x8a) => match reg8(reg) {
            Source::HighByte(r) => MmioOp::Load {
                size: 1,
                dst: r,
                high_byte: true,
                dst_size: 1,
            },
            _ => MmioOp::Load {
                size: 1,
                dst: reg,
                high_byte: false,
                dst_size: 1,
            },
        },
        (false, 0x8b) => MmioOp::Load {
            size: word,
            dst: reg,
            high_byte: false,
            dst_size: word,
        },
        (false, 0xc6) if reg & 7 == 0 => {
            let v = imm(i, 1)?;
            i += 1;
            MmioOp::Store {
                size: 1,
                src: Source::Imm(v),
            }
        }
        (false, 0xc7) if reg & 7 == 0 => {
            let n = word.min(4);
            let mut v = imm(i, n)?;
            i += usize::from(n);
            if word == 8 {
                v = v as u32 as i32 as i64 as u64;
            }
            MmioOp::Store {
                size: word,
                src: Source::Imm(v),
            }
        }
        (true, 0xb6) => MmioOp::Load {
            size: 1,
            dst: reg,
            high_byte: false,
            dst_size: word,
        },
        (true, 0xb7) => MmioOp::Load {
            size: 2,
            dst: reg,
            high_byte: false,
            dst_size: word,
        },
        _ => return Err(DecodeError::Unsupported(op)),
    };
    Ok(Decoded {
        op: decoded,
        len: i as u8,
    })
}

/// The new value of a register after a load of `data` as `op` describes (`old` is the
/// register before; `long`: 32-bit results zero-extend to 64 bits).
pub fn load_result(old: u64, data: u64, op: &MmioOp, long: bool) -> u64 {
    let MmioOp::Load {
        size,
        high_byte,
        dst_size,
        ..
    } = *op
    else {
        return old;
    };
    let mask = |n: u8| {
        if n >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * u32::from(n))) - 1
        }
    };
    let data = data & mask(size);
    if high_byte {
        return (old & !0xff00) | (data << 8);
    }
    match dst_size {
        4 if long => data,
        8 => data,
        n => (old & !mask(n)) | data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d64(b: &[u8]) -> Decoded {
        decode(b, true, false).unwrap()
    }

    #[test]
    fn stores() {
        // mov %eax, (%rdi)
        assert_eq!(
            d64(&[0x89, 0x07]),
            Decoded {
                op: MmioOp::Store {
                    size: 4,
                    src: Source::Reg(0)
                },
                len: 2
            }
        );
        // mov %r9, 0x10(%rbx)
        assert_eq!(
            d64(&[0x4c, 0x89, 0x4b, 0x10]),
            Decoded {
                op: MmioOp::Store {
                    size: 8,
                    src: Source::Reg(9)
                },
                len: 4
            }
        );
        // mov %ax, (%rdx)
        assert_eq!(
            d64(&[0x66, 0x89, 0x02]),
            Decoded {
                op: MmioOp::Store {
                    size: 2,
                    src: Source::Reg(0)
                },
                len: 3
            }
        );
        // mov %ah, (%rdi) / mov %spl, (%rdi)
        assert_eq!(
            d64(&[0x88, 0x27]).op,
            MmioOp::Store {
                size: 1,
                src: Source::HighByte(0)
            }
        );
        assert_eq!(
            d64(&[0x40, 0x88, 0x27]).op,
            MmioOp::Store {
                size: 1,
                src: Source::Reg(4)
            }
        );
        // movl $0x12345678, 0x300(%rip)
        assert_eq!(
            d64(&[0xc7, 0x05, 0, 3, 0, 0, 0x78, 0x56, 0x34, 0x12]),
            Decoded {
                op: MmioOp::Store {
                    size: 4,
                    src: Source::Imm(0x1234_5678)
                },
                len: 10
            }
        );
        // movq $-1, (%rax,%rcx,8) sign-extends
        assert_eq!(
            d64(&[0x48, 0xc7, 0x04, 0xc8, 0xff, 0xff, 0xff, 0xff]),
            Decoded {
                op: MmioOp::Store {
                    size: 8,
                    src: Source::Imm(u64::MAX)
                },
                len: 8
            }
        );
        // movb $7, 0x12345678 (absolute, 32-bit mode)
        assert_eq!(
            decode(&[0xc6, 0x05, 0x78, 0x56, 0x34, 0x12, 7], false, true).unwrap(),
            Decoded {
                op: MmioOp::Store {
                    size: 1,
                    src: Source::Imm(7)
                },
                len: 7
            }
        );
    }

    #[test]
    fn loads_and_results() {
        // mov (%rsi), %ecx
        let d = d64(&[0x8b, 0x0e]);
        assert_eq!(
            d.op,
            MmioOp::Load {
                size: 4,
                dst: 1,
                high_byte: false,
                dst_size: 4
            }
        );
        assert_eq!(load_result(u64::MAX, 0xaabb_ccdd, &d.op, true), 0xaabb_ccdd);
        assert_eq!(
            load_result(u64::MAX, 0xaabb_ccdd, &d.op, false),
            0xffff_ffff_aabb_ccdd
        );
        // movzbl 0x8(%rdi), %eax
        let d = d64(&[0x0f, 0xb6, 0x47, 0x08]);
        assert_eq!(
            d,
            Decoded {
                op: MmioOp::Load {
                    size: 1,
                    dst: 0,
                    high_byte: false,
                    dst_size: 4
                },
                len: 4
            }
        );
        assert_eq!(load_result(u64::MAX, 0x1ff, &d.op, true), 0xff);
        // mov (%rdi), %ah merges into bits 15:8
        let d = d64(&[0x8a, 0x27]);
        assert_eq!(load_result(0x1234_5678, 0xab, &d.op, true), 0x1234_ab78);
        // mov (%rdi), %al keeps the rest
        let d = d64(&[0x8a, 0x07]);
        assert_eq!(load_result(0x1234_5678, 0xab, &d.op, true), 0x1234_56ab);
        // 16-bit code in a 32-bit segment: mov (%bx), %ax with 0x67 0x66? -> here 32-bit: mov (%ebx),%ax
        assert_eq!(
            decode(&[0x66, 0x8b, 0x03], false, true).unwrap().op,
            MmioOp::Load {
                size: 2,
                dst: 0,
                high_byte: false,
                dst_size: 2
            }
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(decode(&[0x89], true, false), Err(DecodeError::Truncated));
        assert_eq!(
            decode(&[0x89, 0xc0], true, false),
            Err(DecodeError::Unsupported(0x89))
        );
        assert_eq!(
            decode(&[0xa5, 0x00], true, false),
            Err(DecodeError::Unsupported(0xa5))
        );
        assert_eq!(
            decode(&[0xc7, 0x05, 0, 0, 0, 0, 1, 2], true, false),
            Err(DecodeError::Truncated)
        );
    }
}

/// A decoded write to a guest page table: what the guest writes and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// MOV: the memory gets `src`.
    Mov,
    /// XCHG: the memory gets `src`, the register the old value.
    Xchg,
    /// CMPXCHG: if rAX equals the memory, the memory gets `src` (ZF = 1), else rAX gets
    /// the memory (ZF = 0); flags as CMP.
    Cmpxchg,
    /// OR, AND: the memory gets the result; CF = OF = 0, SF, ZF, PF from the result.
    Or,
    /// See `Or`.
    And,
    /// BTS, BTR: bit `src` (modulo the operand width) set or cleared; CF = its old value.
    Bts,
    /// See `Bts`.
    Btr,
    /// CMPXCHG8B: if EDX:EAX equals the 8-byte memory, it gets ECX:EBX (ZF = 1), else
    /// EDX:EAX gets the memory (ZF = 0). How PAE guests write their 8-byte entries.
    Cmpxchg8b,
}

/// A decoded page-table write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOp {
    /// What it does.
    pub kind: WriteKind,
    /// Operand size in bytes.
    pub size: u8,
    /// The data (register, or immediate) - for XCHG and CMPXCHG always a register.
    pub src: Source,
    /// Instruction length.
    pub len: u8,
}

/// Decodes a store to memory the way guests write page tables: MOV (88, 89, C6, C7),
/// XCHG (86, 87), CMPXCHG (0F B0, 0F B1), OR (08, 09, 80/1, 81/1, 83/1), AND (20, 21,
/// 80/4, 81/4, 83/4), BTS/BTR (0F AB, 0F B3, 0F BA /5 /6), CMPXCHG8B (0F C7 /1), with or
/// without LOCK. REP string stores and CMPXCHG16B are not handled (yet).
pub fn decode_write(code: &[u8], long: bool, default32: bool) -> Result<WriteOp, DecodeError> {
    let code = code.get(..MAX_INSN_LEN).unwrap_or(code);
    let at = |i: usize| code.get(i).copied().ok_or(DecodeError::Truncated);
    let p = parse(code, long, default32)?;
    if p.rep {
        return Err(DecodeError::Unsupported(p.op));
    }
    let mut i = p.next;
    let reg8 = |r: u8| {
        if p.rex == 0 && (4..8).contains(&r) {
            Source::HighByte(r - 4)
        } else {
            Source::Reg(r)
        }
    };
    let mut imm = |n: u8, sext_to: u8| -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for k in 0..usize::from(n) {
            v |= u64::from(at(i + k)?) << (8 * k);
        }
        i += usize::from(n);
        // Sign-extend from n bytes to the operand size.
        let shift = 64 - 8 * u32::from(n);
        let v = ((v << shift) as i64 >> shift) as u64;
        Ok(if sext_to >= 8 {
            v
        } else {
            v & ((1u64 << (8 * sext_to)) - 1)
        })
    };
    let w = p.word;
    let sub = p.reg & 7;
    use WriteKind::*;
    let (kind, size, src) = match (p.two_byte, p.op) {
        (false, 0x88) => (Mov, 1, reg8(p.reg)),
        (false, 0x89) => (Mov, w, Source::Reg(p.reg)),
        (false, 0xc6) if sub == 0 => (Mov, 1, Source::Imm(imm(1, 1)?)),
        (false, 0xc7) if sub == 0 => (Mov, w, Source::Imm(imm(w.min(4), w)?)),
        (false, 0x86) => (Xchg, 1, reg8(p.reg)),
        (false, 0x87) => (Xchg, w, Source::Reg(p.reg)),
        (true, 0xb0) => (Cmpxchg, 1, reg8(p.reg)),
        (true, 0xb1) => (Cmpxchg, w, Source::Reg(p.reg)),
        (false, 0x08) => (Or, 1, reg8(p.reg)),
        (false, 0x09) => (Or, w, Source::Reg(p.reg)),
        (false, 0x20) => (And, 1, reg8(p.reg)),
        (false, 0x21) => (And, w, Source::Reg(p.reg)),
        (false, 0x80) if sub == 1 || sub == 4 => {
            (if sub == 1 { Or } else { And }, 1, Source::Imm(imm(1, 1)?))
        }
        (false, 0x81) if sub == 1 || sub == 4 => (
            if sub == 1 { Or } else { And },
            w,
            Source::Imm(imm(w.min(4), w)?),
        ),
        (false, 0x83) if sub == 1 || sub == 4 => {
            (if sub == 1 { Or } else { And }, w, Source::Imm(imm(1, w)?))
        }
        (true, 0xab) => (Bts, w, Source::Reg(p.reg)),
        (true, 0xb3) => (Btr, w, Source::Reg(p.reg)),
        (true, 0xc7) if sub == 1 && p.rex & 8 == 0 => (Cmpxchg8b, 8, Source::Reg(0)),
        (true, 0xba) if sub == 5 || sub == 6 => {
            (if sub == 5 { Bts } else { Btr }, w, Source::Imm(imm(1, 1)?))
        }
        (two, op) => return Err(DecodeError::Unsupported(if two { 0x0f } else { op })),
    };
    Ok(WriteOp {
        kind,
        size,
        src,
        len: i as u8,
    })
}

/// RFLAGS bits the write emulation sets.
pub mod flags {
    /// Carry.
    pub const CF: u64 = 1 << 0;
    /// Parity (of the low byte).
    pub const PF: u64 = 1 << 2;
    /// Auxiliary carry.
    pub const AF: u64 = 1 << 4;
    /// Zero.
    pub const ZF: u64 = 1 << 6;
    /// Sign.
    pub const SF: u64 = 1 << 7;
    /// Overflow.
    pub const OF: u64 = 1 << 11;
}

/// The effect of a page-table write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteEffect {
    /// The new memory value (`size` bytes).
    pub mem: u64,
    /// A register to update (XCHG: the source; CMPXCHG: rAX on a mismatch) and its new
    /// value for the operand size (merged by the caller as a MOV of that size would).
    pub reg: Option<(u8, u64)>,
    /// The new RFLAGS.
    pub rflags: u64,
}

/// Operand width in bits of a `size`-byte operand (the decoders give 1, 2, 4 or 8;
/// anything else is clamped into 1..=8 bytes, so that no shift or modulo below can
/// fault).
fn width(size: u8) -> u32 {
    8 * u32::from(size.clamp(1, 8))
}

fn szp(v: u64, size: u8) -> u64 {
    use flags::*;
    let bits = width(size);
    let mask = if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let v = v & mask;
    let mut f = 0;
    if v == 0 {
        f |= ZF;
    }
    if v >> (bits - 1) & 1 != 0 {
        f |= SF;
    }
    if (v as u8).count_ones().is_multiple_of(2) {
        f |= PF;
    }
    f
}

/// CMPXCHG8B on memory holding `old`, with EDX:EAX = `expected` and ECX:EBX = `new`:
/// the memory after, EDX:EAX after (when it changes) and RFLAGS (only ZF changes).
pub fn apply_cmpxchg8b(old: u64, expected: u64, new: u64, rflags: u64) -> (u64, Option<u64>, u64) {
    if old == expected {
        (new, None, rflags | flags::ZF)
    } else {
        (old, Some(old), rflags & !flags::ZF)
    }
}

/// What `op` does to memory holding `old`, given the source value `src` (the register or
/// immediate, not yet masked), rAX and RFLAGS. (CMPXCHG8B: see [`apply_cmpxchg8b`].)
pub fn apply_write(op: &WriteOp, old: u64, src: u64, rax: u64, rflags: u64) -> WriteEffect {
    use flags::*;
    let bits = width(op.size);
    let mask = if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let (old, src, acc) = (old & mask, src & mask, rax & mask);
    let arith = CF | PF | AF | ZF | SF | OF;
    match op.kind {
        WriteKind::Cmpxchg8b => WriteEffect {
            mem: old,
            reg: None,
            rflags,
        },
        WriteKind::Mov => WriteEffect {
            mem: src,
            reg: None,
            rflags,
        },
        WriteKind::Xchg => WriteEffect {
            mem: src,
            reg: match op.src {
                Source::Reg(r) => Some((r, old)),
                Source::HighByte(r) => Some((r.wrapping_add(4), old)),
                Source::Imm(_) => None,
            },
            rflags,
        },
        WriteKind::Cmpxchg => {
            // Flags of CMP rAX, old: rAX - old.
            let diff = acc.wrapping_sub(old) & mask;
            let sign = |v: u64| v >> (bits - 1) & 1;
            let mut f = szp(diff, op.size);
            if acc < old {
                f |= CF;
            }
            if sign(acc) != sign(old) && sign(diff) != sign(acc) {
                f |= OF;
            }
            if (acc ^ old ^ diff) & 0x10 != 0 {
                f |= AF;
            }
            let rflags = (rflags & !arith) | f;
            if acc == old {
                WriteEffect {
                    mem: src,
                    reg: None,
                    rflags,
                }
            } else {
                WriteEffect {
                    mem: old,
                    reg: Some((0, old)),
                    rflags,
                }
            }
        }
        WriteKind::Or | WriteKind::And => {
            let r = if op.kind == WriteKind::Or {
                old | src
            } else {
                old & src
            };
            WriteEffect {
                mem: r,
                reg: None,
                rflags: (rflags & !(CF | OF | SF | ZF | PF)) | szp(r, op.size),
            }
        }
        WriteKind::Bts | WriteKind::Btr => {
            let bit = src % u64::from(bits);
            let was = old >> bit & 1;
            let mem = if op.kind == WriteKind::Bts {
                old | 1 << bit
            } else {
                old & !(1 << bit)
            };
            WriteEffect {
                mem,
                reg: None,
                rflags: (rflags & !CF) | if was != 0 { CF } else { 0 },
            }
        }
    }
}

#[cfg(test)]
mod write_tests {
    use super::*;

    fn d(code: &[u8]) -> WriteOp {
        decode_write(code, true, false).unwrap()
    }

    #[test]
    fn decodes_the_page_table_writes_linux_makes() {
        // mov [rdi], rax (set_pte, set_pmd)
        assert_eq!(
            d(&[0x48, 0x89, 0x07]),
            WriteOp {
                kind: WriteKind::Mov,
                size: 8,
                src: Source::Reg(0),
                len: 3
            }
        );
        // mov qword [rdi], 0 (pmd_clear)
        assert_eq!(
            d(&[0x48, 0xc7, 0x07, 0, 0, 0, 0]),
            WriteOp {
                kind: WriteKind::Mov,
                size: 8,
                src: Source::Imm(0),
                len: 7
            }
        );
        // xchg [rdi], rax (ptep_get_and_clear)
        assert_eq!(d(&[0x48, 0x87, 0x07]).kind, WriteKind::Xchg);
        // lock cmpxchg [rdi], rdx
        assert_eq!(
            d(&[0xf0, 0x48, 0x0f, 0xb1, 0x17]),
            WriteOp {
                kind: WriteKind::Cmpxchg,
                size: 8,
                src: Source::Reg(2),
                len: 5
            }
        );
        // lock bts qword [rdi], 1 ; lock btr qword [rdi], 1 (set_bit/clear_bit)
        assert_eq!(
            d(&[0xf0, 0x48, 0x0f, 0xba, 0x2f, 0x01]),
            WriteOp {
                kind: WriteKind::Bts,
                size: 8,
                src: Source::Imm(1),
                len: 6
            }
        );
        assert_eq!(
            d(&[0xf0, 0x48, 0x0f, 0xba, 0x37, 0x01]).kind,
            WriteKind::Btr
        );
        // lock or qword [rdi], 2 ; lock and [rdi], rax ; or dword [rdi+8], 0x80000000
        assert_eq!(
            d(&[0xf0, 0x48, 0x83, 0x0f, 0x02]),
            WriteOp {
                kind: WriteKind::Or,
                size: 8,
                src: Source::Imm(2),
                len: 5
            }
        );
        assert_eq!(d(&[0xf0, 0x48, 0x21, 0x07]).kind, WriteKind::And);
        assert_eq!(
            d(&[0x81, 0x4f, 0x08, 0, 0, 0, 0x80]),
            WriteOp {
                kind: WriteKind::Or,
                size: 4,
                src: Source::Imm(0x8000_0000),
                len: 7
            }
        );
        // mov [r8 + rcx*8], r9 (REX.B, REX.X, REX.R)
        assert_eq!(
            d(&[0x4f, 0x89, 0x0c, 0xc8]),
            WriteOp {
                kind: WriteKind::Mov,
                size: 8,
                src: Source::Reg(9),
                len: 4
            }
        );
        // 32-bit code: mov [edi], eax
        assert_eq!(decode_write(&[0x89, 0x07], false, true).unwrap().size, 4);
        // lock cmpxchg8b [edi] (32-bit code, PAE set_pte_atomic)
        assert_eq!(
            decode_write(&[0xf0, 0x0f, 0xc7, 0x0f], false, true).unwrap(),
            WriteOp {
                kind: WriteKind::Cmpxchg8b,
                size: 8,
                src: Source::Reg(0),
                len: 4
            }
        );
        assert_eq!(apply_cmpxchg8b(5, 5, 9, 0x2), (9, None, 0x2 | flags::ZF));
        assert_eq!(apply_cmpxchg8b(6, 5, 9, 0x2 | flags::ZF), (6, Some(6), 0x2));
        // rep stosq and cmpxchg16b: not (yet)
        assert!(decode_write(&[0xf3, 0x48, 0xab], true, false).is_err());
        assert!(decode_write(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f], true, false).is_err());
        assert_eq!(
            decode_write(&[0x48, 0x89], true, false),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn write_semantics() {
        use flags::*;
        let op = |kind, size, src| WriteOp {
            kind,
            size,
            src,
            len: 3,
        };
        let e = apply_write(
            &op(WriteKind::Xchg, 8, Source::Reg(3)),
            0x1003,
            0x2003,
            0,
            0x2,
        );
        assert_eq!((e.mem, e.reg, e.rflags), (0x2003, Some((3, 0x1003)), 0x2));
        // CMPXCHG: equal -> store, ZF; different -> rAX loaded, ZF clear.
        let c = op(WriteKind::Cmpxchg, 8, Source::Reg(2));
        let e = apply_write(&c, 0x1003, 0x2003, 0x1003, 0x2);
        assert_eq!((e.mem, e.reg), (0x2003, None));
        assert_ne!(e.rflags & ZF, 0);
        let e = apply_write(&c, 0x1003, 0x2003, 0x1007, 0x2 | ZF);
        assert_eq!((e.mem, e.reg), (0x1003, Some((0, 0x1003))));
        assert_eq!(e.rflags & ZF, 0);
        // LOCK BTR of the R/W bit: CF = old bit.
        let e = apply_write(&op(WriteKind::Btr, 8, Source::Imm(1)), 0x1003, 1, 0, 0x2);
        assert_eq!((e.mem, e.rflags & CF), (0x1001, CF));
        let e = apply_write(
            &op(WriteKind::Bts, 8, Source::Imm(65)),
            0x1001,
            65,
            0,
            0x2 | CF,
        );
        assert_eq!((e.mem, e.rflags & CF), (0x1003, 0));
        // AND to zero sets ZF, clears CF/OF.
        let e = apply_write(
            &op(WriteKind::And, 8, Source::Reg(0)),
            0x1003,
            0,
            0,
            CF | OF,
        );
        assert_eq!((e.mem, e.rflags & (ZF | CF | OF | PF)), (0, ZF | PF));
        // 32-bit OR keeps only 32 bits.
        let e = apply_write(
            &op(WriteKind::Or, 4, Source::Imm(0x8000_0000)),
            0x1_0000_0001,
            0x8000_0000,
            0,
            0,
        );
        assert_eq!((e.mem, e.rflags & SF), (0x8000_0001, SF));
    }
}

#[cfg(test)]
mod hostile_tests {
    use super::*;

    /// xorshift64: deterministic pseudo-random bytes.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
    }

    const MODES: [(bool, bool); 3] = [(true, false), (false, true), (false, false)];

    fn check_all(code: &[u8], rng: &mut Rng) {
        for (long, d32) in MODES {
            if let Ok(d) = decode(code, long, d32) {
                assert!(
                    usize::from(d.len) <= MAX_INSN_LEN.min(code.len()),
                    "{code:x?}"
                );
                let (old, data) = (rng.next(), rng.next());
                load_result(old, data, &d.op, long);
            }
            if let Ok(w) = decode_write(code, long, d32) {
                assert!(
                    usize::from(w.len) <= MAX_INSN_LEN.min(code.len()),
                    "{code:x?}"
                );
                assert!(matches!(w.size, 1 | 2 | 4 | 8));
                let (old, src, rax, fl) = (rng.next(), rng.next(), rng.next(), rng.next());
                apply_write(&w, old, src, rax, fl);
                apply_cmpxchg8b(old, src, rax, fl);
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut code = [0u8; 32];
        for _ in 0..200_000 {
            for b in code.iter_mut() {
                *b = rng.next() as u8;
            }
            // Bias towards the opcodes the decoders know, behind random prefixes.
            if rng.next() & 1 == 0 {
                let ops = [
                    0x88, 0x89, 0x8a, 0x8b, 0xc6, 0xc7, 0x0f, 0x86, 0x87, 0x81, 0x83,
                ];
                let k = (rng.next() % 16) as usize;
                code[k] = ops[(rng.next() % ops.len() as u64) as usize];
            }
            let n = (rng.next() % 33) as usize;
            check_all(&code[..n], &mut rng);
        }
    }

    #[test]
    fn prefixes_and_displacements_past_15_bytes() {
        // 12 prefixes, MOV [EAX+disp32], EAX: the displacement lies beyond byte 15.
        let mut code = [0x3eu8; 18];
        code[12] = 0x89;
        code[13] = 0x80;
        for (long, d32) in MODES {
            assert_eq!(decode(&code, long, d32), Err(DecodeError::Truncated));
            assert_eq!(decode_write(&code, long, d32), Err(DecodeError::Truncated));
        }
        // ModRM wanting a displacement the bytes do not have.
        assert_eq!(
            decode(&[0x89, 0x80], true, false),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode(&[0x89, 0x87, 1], false, false),
            Err(DecodeError::Truncated)
        );
        // Hundreds of prefixes before a valid MOV: not an instruction (its length
        // would not even fit in a u8).
        let mut long = [0x66u8; 302];
        long[300] = 0x89;
        long[301] = 0x07;
        for (l, d32) in MODES {
            assert!(decode(&long, l, d32).is_err());
            assert!(decode_write(&long, l, d32).is_err());
        }
        // 13 prefixes + MOV [RDI], EAX is 15 bytes: still fine.
        let mut ok = [0x66u8; 15];
        ok[13] = 0x89;
        ok[14] = 0x07;
        assert_eq!(decode(&ok, true, false).map(|d| d.len), Ok(15));
    }

    #[test]
    fn write_semantics_with_any_size() {
        for size in [0, 3, 5, 9, 255] {
            for kind in [
                WriteKind::Mov,
                WriteKind::Xchg,
                WriteKind::Cmpxchg,
                WriteKind::Or,
                WriteKind::And,
                WriteKind::Bts,
                WriteKind::Btr,
                WriteKind::Cmpxchg8b,
            ] {
                let op = WriteOp {
                    kind,
                    size,
                    src: Source::HighByte(u8::MAX),
                    len: 3,
                };
                apply_write(&op, u64::MAX, u64::MAX, 0, u64::MAX);
                apply_write(&op, 0, u64::MAX, u64::MAX, 0);
            }
            let op = MmioOp::Load {
                size,
                dst: 0,
                high_byte: false,
                dst_size: size,
            };
            load_result(u64::MAX, u64::MAX, &op, false);
        }
    }
}
