// SPDX-License-Identifier: GPL-2.0

//! The instruction decoder: legacy and REX prefixes, the one-byte, 0F and 0F 38 opcode
//! maps, ModRM, SIB, displacement and immediate (SDM Vol. 2A, chapter 2). It decodes
//! the forms [`super::execute`] carries out: every general-purpose instruction that
//! can touch memory through a ModRM operand, a moffs or a string operand. Anything else
//! is [`DecodeError::Unsupported`].
//!
//! Why not yaxpeax-x86: its num-traits dependency implements `Num` for `f32`/`f64`
//! through `str::parse`, which the kernel's `core` (built with `no_fp_fmt_parse`) does
//! not have, so the module build fails; and its three mode decoders add about 470 KB
//! of text to a module of 340 KB. It is the host tests' oracle instead.

/// The longest x86 instruction (SDM Vol. 2A, 2.3.11): longer ones raise #GP.
pub const MAX_INSN_LEN: usize = 15;

/// Why decoding failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end before the instruction does.
    Truncated,
    /// More than 15 bytes: #GP(0).
    TooLong,
    /// An encoding the CPU rejects with #UD (a legacy prefix or REX before VEX, an
    /// opcode map VEX does not define).
    Invalid,
    /// An instruction the emulator does not carry out: its opcode (0F xx as 0x0fxx,
    /// 0F 38 xx as 0x0f38xx).
    Unsupported(u32),
}

/// A segment register, in the SDM's encoding order (ModRM.reg of MOV Sreg).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegReg {
    /// ES.
    Es = 0,
    /// CS.
    Cs = 1,
    /// SS.
    Ss = 2,
    /// DS.
    Ds = 3,
    /// FS.
    Fs = 4,
    /// GS.
    Gs = 5,
}

impl SegReg {
    /// From the 3-bit encoding (6 and 7 are reserved).
    pub const fn from_bits(n: u8) -> Option<Self> {
        Some(match n {
            0 => Self::Es,
            1 => Self::Cs,
            2 => Self::Ss,
            3 => Self::Ds,
            4 => Self::Fs,
            5 => Self::Gs,
            _ => return None,
        })
    }
}

/// Opcode map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Map {
    /// One-byte opcodes.
    One,
    /// 0F xx.
    Two,
    /// 0F 38 xx.
    Three38,
}

/// REP prefix in effect (the last of F2/F3 wins).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rep {
    /// None.
    None,
    /// F3: REP / REPE.
    Rep,
    /// F2: REPNE.
    Repne,
}

/// A memory operand: `seg:[base + index * scale + disp]`, or RIP-relative.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mem {
    /// Base register (0 = rAX ... 15 = r15).
    pub base: Option<u8>,
    /// Index register and scale (1, 2, 4, 8).
    pub index: Option<(u8, u8)>,
    /// Displacement, sign-extended.
    pub disp: u64,
    /// RIP-relative: the address is the next instruction's RIP plus `disp`.
    pub rip_rel: bool,
    /// Segment: the override, else the default for the base register.
    pub seg: SegReg,
}

/// The ModRM r/m operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rm {
    /// A register (0..15; for byte operands see [`Insn::byte_reg`]).
    Reg(u8),
    /// Memory.
    Mem(Mem),
}

/// The VEX prefix's fields that the moves use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vex {
    /// VEX.L: 256-bit operation.
    pub l: bool,
    /// VEX.vvvv (un-inverted): the moves to and from memory need 0.
    pub vvvv: u8,
}

/// A decoded instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    /// Length in bytes.
    pub len: u8,
    /// Opcode map and opcode byte.
    pub map: Map,
    /// Opcode byte within its map.
    pub op: u8,
    /// Operand size of a word operation: 2, 4 or 8 bytes.
    pub opsize: u8,
    /// Address size: 2, 4 or 8 bytes.
    pub addrsize: u8,
    /// ModRM.reg with REX.R (or the opcode extension, 0..7, in its low 3 bits).
    pub reg: u8,
    /// The r/m operand (ModRM, or a moffs as memory without base).
    pub rm: Option<Rm>,
    /// Immediate, sign-extended to 64 bits (moffs and imm16 zero-extended).
    pub imm: u64,
    /// LOCK.
    pub lock: bool,
    /// REP prefix.
    pub rep: Rep,
    /// Operand-size prefix 66 present.
    pub p66: bool,
    /// A REX prefix is present (byte registers 4..7 are SPL..DIL, not AH..BH).
    pub rex: bool,
    /// REX.W.
    pub rex_w: bool,
    /// REX.B (extends the register in the opcode of PUSH/POP r).
    pub rex_b: bool,
    /// Segment override prefix.
    pub seg: Option<SegReg>,
    /// 64-bit mode.
    pub long: bool,
    /// The VEX prefix (its pp field shows as `p66` and `rep`, its W as `rex_w`).
    pub vex: Option<Vex>,
    /// The selector of a far pointer immediate (JMP/CALL ptr16:16/32).
    pub sel: u16,
}

impl Insn {
    /// A byte register operand `n`: the 64-bit register it lives in and the bit
    /// position (AH, CH, DH and BH are bits 15:8 of 0..3 when there is no REX).
    pub const fn byte_reg(&self, n: u8) -> (u8, u32) {
        if !self.rex && n >= 4 && n < 8 {
            (n - 4, 8)
        } else {
            (n, 0)
        }
    }

    /// The memory operand, if the r/m operand is one.
    pub const fn mem(&self) -> Option<Mem> {
        match self.rm {
            Some(Rm::Mem(m)) => Some(m),
            _ => None,
        }
    }

    /// The operand size of stack operations (PUSH, POP, CALL, RET): 64 bits in 64-bit
    /// mode unless 66 makes it 16.
    pub const fn stack_opsize(&self) -> u8 {
        if self.long {
            if self.p66 {
                2
            } else {
                8
            }
        } else {
            self.opsize
        }
    }
}

/// What follows the opcode.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Imm {
    None,
    /// 1 byte, sign-extended.
    B,
    /// 2 bytes for 16-bit operands, else 4, sign-extended.
    Z,
    /// 2 bytes, zero-extended (RET imm16).
    W,
    /// An address-size offset (MOV moffs).
    Moffs,
    /// The operand size's bytes, up to 8 (MOV r, imm64 with REX.W).
    V,
    /// A far pointer: an operand-size offset, then a 16-bit selector (in `Insn::sel`).
    Far,
}

/// Whether (map, op) takes a ModRM byte, what immediate follows it, and whether the
/// emulator carries it out. `reg` is ModRM.reg for group opcodes, read by the caller
/// after ModRM (the F6/F7 immediate depends on it).
fn shape(map: Map, op: u8, long: bool) -> Option<(bool, Imm)> {
    use Imm::*;
    Some(match map {
        Map::One => match op {
            // ALU r/m,reg / reg,r/m / AL,imm8 / rAX,imm.
            0x00..=0x3f if op & 7 < 4 => (true, None),
            0x00..=0x3f if op & 7 == 4 => (false, B),
            0x00..=0x3f if op & 7 == 5 => (false, Z),
            // PUSH/POP ES, CS, SS, DS (POP CS does not exist: 0F is the escape).
            0x06 | 0x07 | 0x0e | 0x16 | 0x17 | 0x1e | 0x1f if !long => (false, None),
            // INC/DEC r (REX prefixes in 64-bit mode).
            0x40..=0x4f if !long => (false, None),
            0x50..=0x5f => (false, None),
            // PUSHA/POPA.
            0x60 | 0x61 if !long => (false, None),
            0x70..=0x7f => (false, B),
            0x63 if long => (true, None),
            0x68 => (false, Z),
            0x69 => (true, Z),
            0x6a => (false, B),
            0x6b => (true, B),
            0x80 | 0x83 => (true, B),
            0x82 if !long => (true, B),
            0x81 => (true, Z),
            0x84..=0x8f => (true, None),
            0x6c..=0x6f => (false, None),
            // XCHG rAX, r / NOP; CBW, CWD; PUSHF, POPF, SAHF, LAHF.
            0x90..=0x99 | 0x9c..=0x9f => (false, None),
            0x9a | 0xea if !long => (false, Far),
            0xa0..=0xa3 => (false, Moffs),
            0xa4..=0xa7 | 0xaa..=0xaf => (false, None),
            0xa8 => (false, B),
            0xa9 => (false, Z),
            0xb0..=0xb7 => (false, B),
            0xb8..=0xbf => (false, V),
            0xc0 | 0xc1 => (true, B),
            0xc2 | 0xca => (false, W),
            0xc3 | 0xc9 | 0xcb | 0xcc | 0xcf => (false, None),
            // LES, LDS (outside 64-bit mode, where C4/C5 with a register operand
            // are VEX, taken above).
            0xc4 | 0xc5 if !long => (true, None),
            0xc6 => (true, B),
            0xc7 => (true, Z),
            0xcd => (false, B),
            0xce if !long => (false, None),
            0xd0..=0xd3 => (true, None),
            0xd7 => (false, None),
            // LOOPNE, LOOPE, LOOP, JCXZ; IN/OUT with an immediate port; JMP rel8.
            0xe0..=0xe7 | 0xeb => (false, B),
            0xe8 | 0xe9 => (false, Z),
            0xec..=0xef | 0xf4 | 0xf5 | 0xf8..=0xfd => (false, None),
            0xf6 | 0xf7 | 0xfe | 0xff => (true, None),
            _ => return Option::None,
        },
        Map::Two => match op {
            // Group 7 (LGDT, LIDT, SGDT, SIDT, SMSW, LMSW, INVLPG); MOV from and to
            // CR0-CR4 (ModRM.mod is ignored: always registers).
            0x01 | 0x20 | 0x22 => (true, None),
            // CLTS, INVD, WBINVD, WRMSR, RDMSR, CPUID, PUSH/POP FS and GS, BSWAP.
            0x06 | 0x08 | 0x09 | 0x30 | 0x32 | 0xa2 | 0xa0 | 0xa1 | 0xa8 | 0xa9 => (false, None),
            0xc8..=0xcf => (false, None),
            0x80..=0x8f => (false, Z),
            // LSS, LFS, LGS.
            0xb2 | 0xb4 | 0xb5 => (true, None),
            // SSE moves: MOVUPS/MOVSS/MOVSD, MOVAPS, MOVNTPS, MOVD/MOVQ, MOVDQA/MOVDQU,
            // MOVQ, MOVNTDQ (and their 66 and VEX forms).
            0x10 | 0x11 | 0x28 | 0x29 | 0x2b | 0x6e | 0x6f | 0x7e | 0x7f | 0xd6 | 0xe7 => {
                (true, None)
            }
            0x40..=0x4f | 0x90..=0x9f => (true, None),
            0xa3 | 0xa5 | 0xab | 0xad | 0xaf => (true, None),
            0xa4 | 0xac | 0xba => (true, B),
            0xb0 | 0xb1 | 0xb3 | 0xb6 | 0xb7 | 0xbb | 0xbe | 0xbf => (true, None),
            0xc0 | 0xc1 | 0xc7 => (true, None),
            _ => return Option::None,
        },
        Map::Three38 => match op {
            0xf0 | 0xf1 => (true, None),
            _ => return Option::None,
        },
    })
}

/// Decodes the instruction at the start of `code`. `long`: 64-bit mode; `def32`: the
/// code segment's D bit (ignored in 64-bit mode).
pub fn decode(code: &[u8], long: bool, def32: bool) -> Result<Insn, DecodeError> {
    let mut i = 0usize;
    let at = |i: usize| -> Result<u8, DecodeError> {
        if i >= MAX_INSN_LEN {
            return Err(DecodeError::TooLong);
        }
        code.get(i).copied().ok_or(DecodeError::Truncated)
    };
    let (mut p66, mut p67, mut lock, mut rep, mut seg) = (false, false, false, Rep::None, None);
    let mut rex = 0u8;
    loop {
        let b = at(i)?;
        match b {
            0x66 => p66 = true,
            0x67 => p67 = true,
            0xf0 => lock = true,
            0xf2 => rep = Rep::Repne,
            0xf3 => rep = Rep::Rep,
            // In 64-bit mode ES, CS, SS and DS overrides are ignored (their bases are 0
            // and their limits unchecked), but not FS and GS.
            0x26 => seg = if long { seg } else { Some(SegReg::Es) },
            0x2e => seg = if long { seg } else { Some(SegReg::Cs) },
            0x36 => seg = if long { seg } else { Some(SegReg::Ss) },
            0x3e => seg = if long { seg } else { Some(SegReg::Ds) },
            0x64 => seg = Some(SegReg::Fs),
            0x65 => seg = Some(SegReg::Gs),
            0x40..=0x4f if long => {
                // REX counts only right before the opcode; a legacy prefix after it
                // cancels it.
                rex = b;
                i += 1;
                match at(i)? {
                    0x40..=0x4f => continue,
                    0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3 | 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => {
                        rex = 0;
                        continue;
                    }
                    _ => break,
                }
            }
            _ => break,
        }
        i += 1;
    }
    // VEX (C4 3-byte, C5 2-byte): outside 64-bit mode only when the next byte has
    // its top bits set (otherwise C4/C5 are LES/LDS with a memory operand).
    let mut vex = None;
    let mut vex_map = None;
    if let b @ (0xc4 | 0xc5) = at(i)? {
        let b1 = at(i + 1)?;
        if long || b1 >> 6 == 3 {
            if p66 || rep != Rep::None || lock || rex != 0 {
                return Err(DecodeError::Invalid);
            }
            let (r, x, bb, mmmmm, w, b_last) = if b == 0xc5 {
                (!b1 >> 7 & 1, 0, 0, 1, 0, b1)
            } else {
                let b2 = at(i + 2)?;
                (
                    !b1 >> 7 & 1,
                    !b1 >> 6 & 1,
                    !b1 >> 5 & 1,
                    b1 & 0x1f,
                    b2 >> 7,
                    b2,
                )
            };
            i += if b == 0xc5 { 2 } else { 3 };
            // Outside 64-bit mode VEX.W is ignored by the moves, and R, X, B are 1.
            if long {
                rex = 0x40 | w << 3 | r << 2 | x << 1 | bb;
            }
            match b_last & 3 {
                1 => p66 = true,
                2 => rep = Rep::Rep,
                3 => rep = Rep::Repne,
                _ => {}
            }
            let vvvv = !b_last >> 3 & if long { 15 } else { 7 };
            vex = Some(Vex {
                l: b_last >> 2 & 1 != 0,
                vvvv,
            });
            vex_map = Some(match mmmmm {
                1 => Map::Two,
                2 => Map::Three38,
                3 => return Err(DecodeError::Unsupported(0x0f_3a00 | u32::from(at(i)?))),
                _ => return Err(DecodeError::Invalid),
            });
        }
    }
    let rex_w = rex & 8 != 0;
    let opsize = if long && rex_w {
        8
    } else if p66 == (long || def32) {
        2
    } else {
        4
    };
    let addrsize = match (long, def32 != p67) {
        (true, _) => {
            if p67 {
                4
            } else {
                8
            }
        }
        (false, true) => 4,
        (false, false) => 2,
    };
    let mut op = at(i)?;
    i += 1;
    let mut map = Map::One;
    if let Some(m) = vex_map {
        map = m;
    } else if op == 0x0f {
        op = at(i)?;
        i += 1;
        map = Map::Two;
        if op == 0x38 {
            op = at(i)?;
            i += 1;
            map = Map::Three38;
        }
    }
    let code_of = |map: Map, op: u8| match map {
        Map::One => u32::from(op),
        Map::Two => 0x0f00 | u32::from(op),
        Map::Three38 => 0x0f_3800 | u32::from(op),
    };
    let Some((has_modrm, mut imm_kind)) = shape(map, op, long) else {
        return Err(DecodeError::Unsupported(code_of(map, op)));
    };
    let (mut reg, mut rm) = (0u8, None);
    if has_modrm {
        let modrm = at(i)?;
        i += 1;
        let (mut md, r, m) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
        if map == Map::Two && (op == 0x20 || op == 0x22) {
            md = 3;
        }
        reg = r | ((rex >> 2 & 1) << 3);
        rm = Some(if md == 3 {
            Rm::Reg(m | ((rex & 1) << 3))
        } else if addrsize == 2 {
            let (base, index, bp) = match m {
                0 => (Some(3), Some(6), false),
                1 => (Some(3), Some(7), false),
                2 => (Some(5), Some(6), true),
                3 => (Some(5), Some(7), true),
                4 => (Some(6), None, false),
                5 => (Some(7), None, false),
                6 if md == 0 => (None, None, false),
                6 => (Some(5), None, true),
                _ => (Some(3), None, false),
            };
            let disp = match (md, m) {
                (0, 6) | (2, _) => {
                    let d = u16::from_le_bytes([at(i)?, at(i + 1)?]);
                    i += 2;
                    d as i16 as i64 as u64
                }
                (1, _) => {
                    let d = at(i)?;
                    i += 1;
                    d as i8 as i64 as u64
                }
                _ => 0,
            };
            Rm::Mem(Mem {
                base,
                index: index.map(|x| (x, 1)),
                disp,
                rip_rel: false,
                seg: seg.unwrap_or(if bp { SegReg::Ss } else { SegReg::Ds }),
            })
        } else {
            let (mut base, mut index, mut rip_rel) = (None, None, false);
            let mut no_base_disp32 = false;
            if m == 4 {
                let sib = at(i)?;
                i += 1;
                let (ss, x, b) = (sib >> 6, (sib >> 3) & 7 | ((rex >> 1 & 1) << 3), sib & 7);
                if x != 4 {
                    index = Some((x, 1u8 << ss));
                }
                if b == 5 && md == 0 {
                    no_base_disp32 = true;
                } else {
                    base = Some(b | ((rex & 1) << 3));
                }
            } else if m == 5 && md == 0 {
                no_base_disp32 = true;
                rip_rel = long;
            } else {
                base = Some(m | ((rex & 1) << 3));
            }
            let disp = if md == 1 {
                let d = at(i)?;
                i += 1;
                d as i8 as i64 as u64
            } else if md == 2 || no_base_disp32 {
                let d = u32::from_le_bytes([at(i)?, at(i + 1)?, at(i + 2)?, at(i + 3)?]);
                i += 4;
                d as i32 as i64 as u64
            } else {
                0
            };
            let stack = matches!(base, Some(4) | Some(5));
            Rm::Mem(Mem {
                base,
                index,
                disp,
                rip_rel,
                seg: seg.unwrap_or(if stack { SegReg::Ss } else { SegReg::Ds }),
            })
        });
    }
    // TEST r/m, imm (F6 /0 /1, F7 /0 /1) is the only group member with an immediate.
    if map == Map::One && (op == 0xf6 || op == 0xf7) && reg & 7 < 2 {
        imm_kind = if op == 0xf6 { Imm::B } else { Imm::Z };
    }
    let mut imm = 0u64;
    let take = |n: usize, i: &mut usize| -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for k in 0..n {
            v |= u64::from(at(*i + k)?) << (8 * k);
        }
        *i += n;
        Ok(v)
    };
    // Near CALL, JMP and Jcc rel in 64-bit mode: a 32-bit displacement and a 64-bit
    // operand size whatever 66 says (Intel; SDM Vol. 2A, CALL, JMP, Jcc).
    let near64 = long
        && ((map == Map::One && (op == 0xe8 || op == 0xe9))
            || (map == Map::Two && (0x80..=0x8f).contains(&op)));
    let mut sel = 0u16;
    match imm_kind {
        Imm::None => {}
        Imm::Z if near64 => imm = take(4, &mut i)? as u32 as i32 as i64 as u64,
        Imm::B => imm = take(1, &mut i)? as u8 as i8 as i64 as u64,
        Imm::W => imm = take(2, &mut i)?,
        Imm::Z if opsize == 2 => imm = take(2, &mut i)? as u16 as i16 as i64 as u64,
        Imm::Z => imm = take(4, &mut i)? as u32 as i32 as i64 as u64,
        Imm::V => imm = take(usize::from(opsize), &mut i)?,
        Imm::Far => {
            imm = take(usize::from(opsize), &mut i)?;
            sel = take(2, &mut i)? as u16;
        }
        Imm::Moffs => {
            let off = take(usize::from(addrsize), &mut i)?;
            rm = Some(Rm::Mem(Mem {
                base: None,
                index: None,
                disp: off,
                rip_rel: false,
                seg: seg.unwrap_or(SegReg::Ds),
            }));
        }
    }
    Ok(Insn {
        len: i as u8,
        map,
        op,
        opsize,
        addrsize,
        reg,
        rm,
        imm,
        lock,
        rep,
        p66,
        rex: rex != 0,
        rex_w,
        rex_b: rex & 1 != 0,
        seg,
        long,
        vex,
        sel,
    })
}
