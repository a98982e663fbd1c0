// SPDX-License-Identifier: GPL-2.0

//! Real-mode code under VMX without "unrestricted guest": rvmm runs it in virtual-8086
//! mode with IOPL 0, so every instruction that is IOPL-sensitive or privileged raises
//! #GP, which exits; this module decodes those instructions (16-bit code: operand- and
//! address-size prefixes, segment overrides, 16-bit ModRM addressing) for the vCPU to
//! carry out. The same decoder serves the few instructions a guest runs between setting
//! CR0.PE and loading CS (a near or far JMP), which VMX cannot run in either mode.

/// Segment registers in their encoding order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Seg {
    Es = 0,
    Cs = 1,
    Ss = 2,
    Ds = 3,
    Fs = 4,
    Gs = 5,
}

/// A 16-bit memory operand: `seg:[base + index + disp]`, each register a GPR number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mem {
    /// Segment (default or override).
    pub seg: Seg,
    /// Base register (BX, BP, SI or DI).
    pub base: Option<u8>,
    /// Index register (SI or DI).
    pub index: Option<u8>,
    /// Displacement.
    pub disp: u16,
}

/// An operand of LMSW.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rm {
    /// A register.
    Reg(u8),
    /// Memory.
    Mem(Mem),
}

/// The instructions rvmm carries out for real-mode code (named as in the SDM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Insn {
    Cli,
    Sti,
    Pushf {
        o32: bool,
    },
    Popf {
        o32: bool,
    },
    Int(u8),
    Iret {
        o32: bool,
    },
    Hlt,
    /// IN/OUT: `size` bytes, the port an immediate or DX.
    In {
        size: u8,
        port: Option<u8>,
    },
    Out {
        size: u8,
        port: Option<u8>,
    },
    Lgdt {
        mem: Mem,
        o32: bool,
    },
    Lidt {
        mem: Mem,
        o32: bool,
    },
    MovToCr {
        cr: u8,
        gpr: u8,
    },
    MovFromCr {
        cr: u8,
        gpr: u8,
    },
    Lmsw(Rm),
    Smsw(u8),
    Rdmsr,
    Wrmsr,
    JmpFar {
        sel: u16,
        off: u32,
    },
    JmpNear {
        rel: i32,
    },
}

/// A decoded instruction and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// The instruction.
    pub insn: Insn,
    /// Its length in bytes.
    pub len: u8,
}

/// Why an instruction cannot be carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsupported;

// GPR numbers (the VMX/ModRM order).
const BX: u8 = 3;
const BP: u8 = 5;
const SI: u8 = 6;
const DI: u8 = 7;

fn modrm16(b: &[u8], seg_override: Option<Seg>) -> Result<(Rm, u8, usize), Unsupported> {
    let m = *b.first().ok_or(Unsupported)?;
    let (md, reg, rm) = (m >> 6, (m >> 3) & 7, m & 7);
    if md == 3 {
        return Ok((Rm::Reg(rm), reg, 1));
    }
    let (base, index) = match rm {
        0 => (Some(BX), Some(SI)),
        1 => (Some(BX), Some(DI)),
        2 => (Some(BP), Some(SI)),
        3 => (Some(BP), Some(DI)),
        4 => (Some(SI), None),
        5 => (Some(DI), None),
        6 if md == 0 => (None, None),
        6 => (Some(BP), None),
        _ => (Some(BX), None),
    };
    let (disp, n) = match (md, rm) {
        (0, 6) => (
            u16::from_le_bytes([*b.get(1).ok_or(Unsupported)?, *b.get(2).ok_or(Unsupported)?]),
            3,
        ),
        (0, _) => (0, 1),
        (1, _) => (*b.get(1).ok_or(Unsupported)? as i8 as i16 as u16, 2),
        _ => (
            u16::from_le_bytes([*b.get(1).ok_or(Unsupported)?, *b.get(2).ok_or(Unsupported)?]),
            3,
        ),
    };
    let default = if base == Some(BP) { Seg::Ss } else { Seg::Ds };
    let mem = Mem {
        seg: seg_override.unwrap_or(default),
        base,
        index,
        disp,
    };
    Ok((Rm::Mem(mem), reg, n))
}

/// Decodes 16-bit code at `b` (up to 15 bytes: the architectural limit; bytes past it
/// are not looked at, so an instruction that would need them is refused).
pub fn decode(b: &[u8]) -> Result<Decoded, Unsupported> {
    let b = b.get(..15).unwrap_or(b);
    let mut i = 0;
    let mut o32 = false;
    let mut seg = None;
    loop {
        match *b.get(i).ok_or(Unsupported)? {
            0x66 => o32 = true,
            0x26 => seg = Some(Seg::Es),
            0x2e => seg = Some(Seg::Cs),
            0x36 => seg = Some(Seg::Ss),
            0x3e => seg = Some(Seg::Ds),
            0x64 => seg = Some(Seg::Fs),
            0x65 => seg = Some(Seg::Gs),
            // Address-size override (32-bit addressing), LOCK, REP: not for these.
            0x67 | 0xf0 | 0xf2 | 0xf3 => return Err(Unsupported),
            _ => break,
        }
        i += 1;
        if i >= 15 {
            return Err(Unsupported);
        }
    }
    let op = *b.get(i).ok_or(Unsupported)?;
    let imm8 = |k: usize| b.get(k).copied().ok_or(Unsupported);
    let imm16 = |k: usize| Ok::<u16, Unsupported>(u16::from_le_bytes([imm8(k)?, imm8(k + 1)?]));
    let size = if o32 { 4 } else { 2 };
    let (insn, n) = match op {
        0xfa => (Insn::Cli, 1),
        0xfb => (Insn::Sti, 1),
        0x9c => (Insn::Pushf { o32 }, 1),
        0x9d => (Insn::Popf { o32 }, 1),
        0xcc => (Insn::Int(3), 1),
        0xcd => (Insn::Int(imm8(i + 1)?), 2),
        0xcf => (Insn::Iret { o32 }, 1),
        0xf4 => (Insn::Hlt, 1),
        0xe4 => (
            Insn::In {
                size: 1,
                port: Some(imm8(i + 1)?),
            },
            2,
        ),
        0xe5 => (
            Insn::In {
                size,
                port: Some(imm8(i + 1)?),
            },
            2,
        ),
        0xe6 => (
            Insn::Out {
                size: 1,
                port: Some(imm8(i + 1)?),
            },
            2,
        ),
        0xe7 => (
            Insn::Out {
                size,
                port: Some(imm8(i + 1)?),
            },
            2,
        ),
        0xec => (
            Insn::In {
                size: 1,
                port: None,
            },
            1,
        ),
        0xed => (Insn::In { size, port: None }, 1),
        0xee => (
            Insn::Out {
                size: 1,
                port: None,
            },
            1,
        ),
        0xef => (Insn::Out { size, port: None }, 1),
        0xea => {
            if o32 {
                let off =
                    u32::from_le_bytes([imm8(i + 1)?, imm8(i + 2)?, imm8(i + 3)?, imm8(i + 4)?]);
                (
                    Insn::JmpFar {
                        sel: imm16(i + 5)?,
                        off,
                    },
                    7,
                )
            } else {
                (
                    Insn::JmpFar {
                        sel: imm16(i + 3)?,
                        off: imm16(i + 1)?.into(),
                    },
                    5,
                )
            }
        }
        0xeb => (
            Insn::JmpNear {
                rel: i32::from(imm8(i + 1)? as i8),
            },
            2,
        ),
        0xe9 if !o32 => (
            Insn::JmpNear {
                rel: i32::from(imm16(i + 1)? as i16),
            },
            3,
        ),
        0x0f => {
            let op2 = imm8(i + 1)?;
            match op2 {
                0x01 => {
                    let (rm, reg, n) = modrm16(b.get(i + 2..).ok_or(Unsupported)?, seg)?;
                    let insn = match (reg, rm) {
                        (2, Rm::Mem(mem)) => Insn::Lgdt { mem, o32 },
                        (3, Rm::Mem(mem)) => Insn::Lidt { mem, o32 },
                        (4, Rm::Reg(r)) => Insn::Smsw(r),
                        (6, rm) => Insn::Lmsw(rm),
                        _ => return Err(Unsupported),
                    };
                    (insn, 2 + n)
                }
                0x20 | 0x22 => {
                    let m = imm8(i + 2)?;
                    let (cr, gpr) = ((m >> 3) & 7, m & 7);
                    let insn = if op2 == 0x22 {
                        Insn::MovToCr { cr, gpr }
                    } else {
                        Insn::MovFromCr { cr, gpr }
                    };
                    (insn, 3)
                }
                0x30 => (Insn::Wrmsr, 2),
                0x32 => (Insn::Rdmsr, 2),
                _ => return Err(Unsupported),
            }
        }
        _ => return Err(Unsupported),
    };
    Ok(Decoded {
        insn,
        len: u8::try_from(i + n).map_err(|_| Unsupported)?,
    })
}

/// The 16-bit effective address of `m` (wraps at 64 KiB), given the GPRs.
pub fn effective(m: &Mem, gpr: impl Fn(u8) -> u64) -> u16 {
    let mut ea = m.disp;
    if let Some(r) = m.base {
        ea = ea.wrapping_add(gpr(r) as u16);
    }
    if let Some(r) = m.index {
        ea = ea.wrapping_add(gpr(r) as u16);
    }
    ea
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(b: &[u8]) -> Insn {
        decode(b).unwrap().insn
    }

    #[test]
    fn trampoline_instructions() {
        // cli; lgdt cs:[0x20]; lgdtl [bx+si+4]; mov eax, cr0; mov cr0, eax; lmsw ax
        assert_eq!(decode(&[0xfa]).unwrap().len, 1);
        let g = decode(&[0x2e, 0x0f, 0x01, 0x16, 0x20, 0x00]).unwrap();
        assert_eq!(
            g,
            Decoded {
                insn: Insn::Lgdt {
                    mem: Mem {
                        seg: Seg::Cs,
                        base: None,
                        index: None,
                        disp: 0x20
                    },
                    o32: false
                },
                len: 6
            }
        );
        assert_eq!(
            d(&[0x66, 0x0f, 0x01, 0x50, 0x04]),
            Insn::Lgdt {
                mem: Mem {
                    seg: Seg::Ds,
                    base: Some(BX),
                    index: Some(SI),
                    disp: 4
                },
                o32: true
            }
        );
        assert_eq!(d(&[0x0f, 0x20, 0xc0]), Insn::MovFromCr { cr: 0, gpr: 0 });
        assert_eq!(d(&[0x0f, 0x22, 0xc0]), Insn::MovToCr { cr: 0, gpr: 0 });
        assert_eq!(d(&[0x0f, 0x01, 0xf0]), Insn::Lmsw(Rm::Reg(0)));
        // ljmp 0x18:0x8040 and ljmpl 0x10:0x100000
        assert_eq!(
            decode(&[0xea, 0x40, 0x80, 0x18, 0x00]).unwrap(),
            Decoded {
                insn: Insn::JmpFar {
                    sel: 0x18,
                    off: 0x8040
                },
                len: 5
            }
        );
        assert_eq!(
            decode(&[0x66, 0xea, 0x00, 0x00, 0x10, 0x00, 0x10, 0x00]).unwrap(),
            Decoded {
                insn: Insn::JmpFar {
                    sel: 0x10,
                    off: 0x10_0000
                },
                len: 8
            }
        );
        assert_eq!(d(&[0xeb, 0xfe]), Insn::JmpNear { rel: -2 });
    }

    #[test]
    fn sensitive_instructions() {
        assert_eq!(d(&[0x9c]), Insn::Pushf { o32: false });
        assert_eq!(d(&[0x66, 0x9d]), Insn::Popf { o32: true });
        assert_eq!(d(&[0xcd, 0x10]), Insn::Int(0x10));
        assert_eq!(d(&[0xcf]), Insn::Iret { o32: false });
        assert_eq!(
            d(&[0xe6, 0x80]),
            Insn::Out {
                size: 1,
                port: Some(0x80)
            }
        );
        assert_eq!(
            d(&[0x66, 0xef]),
            Insn::Out {
                size: 4,
                port: None
            }
        );
        assert_eq!(
            d(&[0xed]),
            Insn::In {
                size: 2,
                port: None
            }
        );
        assert_eq!(d(&[0x0f, 0x30]), Insn::Wrmsr);
        assert_eq!(d(&[0xf4]), Insn::Hlt);
    }

    #[test]
    fn modrm_addressing_and_unsupported() {
        let Insn::Lidt { mem, .. } = d(&[0x0f, 0x01, 0x5e, 0xfe]) else {
            panic!()
        };
        assert_eq!(
            mem,
            Mem {
                seg: Seg::Ss,
                base: Some(BP),
                index: None,
                disp: 0xfffe
            }
        );
        assert_eq!(effective(&mem, |r| if r == BP { 0x10 } else { 0 }), 0x0e);
        let Insn::Lgdt { mem, .. } = d(&[0x0f, 0x01, 0x97, 0x34, 0x12]) else {
            panic!()
        };
        assert_eq!(
            mem,
            Mem {
                seg: Seg::Ds,
                base: Some(BX),
                index: None,
                disp: 0x1234
            }
        );
        assert_eq!(effective(&mem, |_| 0xf000), 0x0234);
        assert_eq!(decode(&[0x67, 0x0f, 0x01, 0x10]), Err(Unsupported));
        assert_eq!(decode(&[0x0f, 0x01, 0xd0]), Err(Unsupported)); // lgdt with a register
        assert_eq!(decode(&[0x90]), Err(Unsupported));
        assert_eq!(decode(&[0x66]), Err(Unsupported));
    }

    /// xorshift64.
    fn rng(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut s = 0x2545_f491_4f6c_dd1d;
        let mut b = [0u8; 24];
        for _ in 0..200_000 {
            for x in b.iter_mut() {
                *x = rng(&mut s) as u8;
            }
            if rng(&mut s) & 1 == 0 {
                let ops = [0x0f, 0xea, 0xe9, 0xeb, 0xcd, 0xe5, 0x66, 0x2e];
                let k = (rng(&mut s) % 15) as usize;
                b[k] = ops[(rng(&mut s) % ops.len() as u64) as usize];
            }
            let n = (rng(&mut s) % 25) as usize;
            if let Ok(d) = decode(&b[..n]) {
                assert!(usize::from(d.len) <= n.min(15), "{:x?}", &b[..n]);
                let regs = rng(&mut s);
                if let Insn::Lgdt { mem, .. } | Insn::Lidt { mem, .. } | Insn::Lmsw(Rm::Mem(mem)) =
                    d.insn
                {
                    effective(&mem, |r| regs.rotate_left(u32::from(r)));
                    effective(&mem, |_| u64::MAX);
                }
            }
        }
    }

    #[test]
    fn no_instruction_longer_than_15_bytes() {
        // 14 segment prefixes, then a 7-byte JMP FAR ptr16:32 (with its 0x66): the
        // bytes are there, but the instruction would be 22 bytes long.
        let mut b = [0x2eu8; 22];
        b[13] = 0x66;
        b[14] = 0xea;
        assert_eq!(decode(&b), Err(Unsupported));
        // 15 bytes exactly is fine.
        let mut b = [0x2eu8; 15];
        b[7] = 0x66;
        b[8] = 0xea;
        assert_eq!(decode(&b).map(|d| d.len), Ok(15));
    }
}
