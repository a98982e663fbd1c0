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

/// Why decoding failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end before the instruction does.
    Truncated,
    /// An instruction the decoder does not handle (yet): its first opcode byte.
    Unsupported(u8),
}

/// Decodes `code` (the bytes at the guest's RIP). `long` is 64-bit mode, `default32`
/// the code segment's D bit (ignored in 64-bit mode).
pub fn decode(code: &[u8], long: bool, default32: bool) -> Result<Decoded, DecodeError> {
    let mut i = 0;
    let at = |i: usize| code.get(i).copied().ok_or(DecodeError::Truncated);
    let (mut opsize16, mut addr_override, mut rex) = (false, false, 0u8);
    loop {
        match at(i)? {
            0x66 => opsize16 = true,
            0x67 => addr_override = true,
            0xf0 | 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => {}
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
