// SPDX-License-Identifier: GPL-2.0

//! The instruction emulator against the CPU: every instruction form runs twice in the
//! same guest, once on RAM (the CPU executes it) and once on device memory that this
//! test backs with the same bytes (rvmm emulates it, with MMIO exits), from the same
//! random registers and flags. Registers, the flags the SDM defines, memory and the
//! exception raised must agree.

use crate::adversarial::CODE;
use crate::check;
use crate::ktap::Outcome;
use rvmm::backend::{Backend, KvmBackend, RvmmBackend};
use rvmm::guest::{setup, EntryMode, GuestMem};
use rvmm::uapi::Regs;
use rvmm::Exit;

/// Guest RAM size.
const RAM: usize = 8 << 20;
/// The operand region in RAM, and at a guest-physical address outside RAM (the
/// 4-GiB identity map covers both).
const RAM_BUF: u64 = 0x40_0000;
const MMIO_BUF: u64 = 0xc000_0000;
const BUF_LEN: usize = 0x200;
/// RDI and RSI point here into the region.
const PTR: u64 = 0x100;
/// The IDT and its handlers: vector n runs `mov al, n; out 0xe0, al; hlt`.
const IDT: u64 = 0x30_0000;
const HANDLERS: u64 = 0x31_0000;
const EXC_PORT: u16 = 0xe0;
/// Where CALL and JMP through memory go: a HLT.
const TARGET: u64 = CODE + 0x800;
/// YMM1 before and after a vector move.
const VEC_IN: u64 = 0x32_0000;
const VEC_OUT: u64 = 0x32_0100;
/// CR4.OSFXSR, OSXMMEXCPT and OSXSAVE.
const CR4_SSE_AVX: u64 = (1 << 9) | (1 << 10) | (1 << 18);

const CF: u64 = 1;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;
const DF: u64 = 1 << 10;
const STATUS: u64 = CF | PF | AF | ZF | SF | OF;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Plain,
    /// A moffs form: the operand's address follows the opcode (8 bytes).
    Moffs,
    /// A shift with an imm8 count (the last byte), at most this.
    ShiftImm(u8),
    /// A shift by CL, at most this.
    ShiftCl(u8),
    /// DIV or IDIV: RDX clear, so that the quotient usually fits.
    Div,
    /// BT* with a register bit offset: a small signed offset in EAX.
    BitReg,
    /// CMPXCHG16B: the operand 16-byte aligned.
    Cx16,
    /// CALL or JMP through memory: the operand holds `TARGET`.
    Branch,
    /// A string instruction: RCX small, DF random.
    Str,
    /// An SSE/AVX move with YMM1: loaded from `VEC_IN` before, stored to `VEC_OUT`
    /// after (both in RAM, natively).
    Vector,
}

struct Form {
    bytes: Vec<u8>,
    /// Flags the SDM leaves undefined after it.
    undef: u64,
    kind: Kind,
}

fn forms() -> Vec<Form> {
    let mut v = Vec::new();
    let mut add = |bytes: &[u8], undef: u64, kind: Kind| {
        v.push(Form {
            bytes: bytes.to_vec(),
            undef,
            kind,
        })
    };
    // ModRM [rdi] with reg = r; with a disp8 of -8 for a second addressing form.
    let m = |r: u8| (r << 3) | 7;
    let md8 = |r: u8| 0x40 | (r << 3) | 7;
    for kind in 0..8u8 {
        let undef = if matches!(kind, 1 | 4 | 6) { AF } else { 0 };
        let base = kind * 8;
        // Byte forms with AH (no REX) and with BL (REX); word forms in 16, 32 and 64 bits.
        add(&[base, m(4)], undef, Kind::Plain);
        add(&[0x40, base, m(3)], undef, Kind::Plain);
        add(&[base + 2, md8(4), 0xf8], undef, Kind::Plain);
        for p in [&[][..], &[0x66], &[0x48]] {
            let mut b = p.to_vec();
            b.extend_from_slice(&[base + 1, m(0)]);
            add(&b, undef, Kind::Plain);
            let mut b = p.to_vec();
            b.extend_from_slice(&[base + 3, m(3)]);
            add(&b, undef, Kind::Plain);
            let mut b = p.to_vec();
            b.extend_from_slice(&[0x81, m(kind), 0x78, 0x56, 0x34, 0x92]);
            if p == [0x66] {
                b.truncate(b.len() - 2);
            }
            add(&b, undef, Kind::Plain);
            let mut b = p.to_vec();
            b.extend_from_slice(&[0x83, m(kind), 0x85]);
            add(&b, undef, Kind::Plain);
        }
        add(&[0x80, m(kind), 0x5a], undef, Kind::Plain);
        if kind != 7 {
            add(&[0xf0, base + 1, m(0)], undef, Kind::Plain);
        }
    }
    for p in [&[][..], &[0x66], &[0x48]] {
        let word = |op: &[u8]| {
            let mut b = p.to_vec();
            b.extend_from_slice(op);
            b
        };
        add(&word(&[0x85, m(0)]), AF, Kind::Plain); // test
        add(&word(&[0x87, m(0)]), 0, Kind::Plain); // xchg
        add(&word(&[0x89, m(0)]), 0, Kind::Plain); // mov
        add(&word(&[0x8b, m(3)]), 0, Kind::Plain);
        add(&word(&[0xf7, m(2)]), 0, Kind::Plain); // not
        add(&word(&[0xf7, m(3)]), 0, Kind::Plain); // neg
        add(&word(&[0xf7, m(4)]), SF | ZF | AF | PF, Kind::Plain); // mul
        add(&word(&[0xf7, m(5)]), SF | ZF | AF | PF, Kind::Plain); // imul
        add(&word(&[0xf7, m(6)]), STATUS, Kind::Div); // div
        add(&word(&[0xf7, m(7)]), STATUS, Kind::Div); // idiv
        add(&word(&[0xff, m(0)]), 0, Kind::Plain); // inc
        add(&word(&[0xff, m(1)]), 0, Kind::Plain); // dec
        add(&word(&[0x0f, 0xaf, m(0)]), SF | ZF | AF | PF, Kind::Plain); // imul r, r/m
        add(&word(&[0x6b, m(0), 0x83]), SF | ZF | AF | PF, Kind::Plain);
        add(&word(&[0x0f, 0xb1, m(3)]), 0, Kind::Plain); // cmpxchg
        add(&word(&[0x0f, 0xc1, m(3)]), 0, Kind::Plain); // xadd
        add(&word(&[0xf0, 0x0f, 0xc1, m(3)]), 0, Kind::Plain);
        add(&word(&[0x0f, 0xb6, m(0)]), 0, Kind::Plain); // movzx
        add(&word(&[0x0f, 0xbf, m(0)]), 0, Kind::Plain); // movsx
        add(&word(&[0x0f, 0x38, 0xf0, m(0)]), 0, Kind::Plain); // movbe
        add(&word(&[0x0f, 0x38, 0xf1, m(0)]), 0, Kind::Plain);
        for g in 0..8u8 {
            let bits = if p == [0x66] {
                16
            } else if p == [0x48] {
                64
            } else {
                32
            };
            add(&word(&[0xc1, m(g), 0]), OF | AF, Kind::ShiftImm(bits));
            add(&word(&[0xd3, m(g)]), OF | AF, Kind::ShiftCl(bits));
            add(&word(&[0xd1, m(g)]), AF, Kind::Plain);
        }
        for (op, r) in [(0xa3u8, 0u8), (0xab, 0), (0xb3, 0), (0xbb, 0)] {
            add(&word(&[0x0f, op, m(r)]), OF | SF | AF | PF, Kind::BitReg);
        }
        for r in 4..8u8 {
            add(
                &word(&[0x0f, 0xba, m(r), 0x25]),
                OF | SF | AF | PF,
                Kind::Plain,
            );
        }
        let bits = if p == [0x66] {
            16
        } else if p == [0x48] {
            64
        } else {
            32
        };
        add(
            &word(&[0x0f, 0xa4, m(3), 0]),
            OF | AF,
            Kind::ShiftImm(bits - 1),
        ); // shld imm
        add(&word(&[0x0f, 0xad, m(3)]), OF | AF, Kind::ShiftCl(bits - 1)); // shrd cl
        for cc in 0..16u8 {
            add(&word(&[0x0f, 0x40 + cc, m(0)]), 0, Kind::Plain); // cmovcc
        }
    }
    // Byte-only and other forms.
    add(&[0x86, m(4)], 0, Kind::Plain);
    add(&[0x88, m(4)], 0, Kind::Plain);
    add(&[0x8a, m(4)], 0, Kind::Plain);
    add(&[0xc6, m(0), 0xa5], 0, Kind::Plain);
    add(&[0xc7, m(0), 0x11, 0x22, 0x33, 0x84], 0, Kind::Plain);
    add(&[0x48, 0xc7, m(0), 0x11, 0x22, 0x33, 0x84], 0, Kind::Plain);
    add(&[0x48, 0x63, m(0)], 0, Kind::Plain); // movsxd
    add(&[0x8c, m(3)], 0, Kind::Plain); // mov [rdi], ds
    add(&[0xf6, m(0), 0x81], AF, Kind::Plain); // test byte
    add(&[0xf6, m(3)], 0, Kind::Plain); // neg byte
    add(&[0xf6, m(4)], SF | ZF | AF | PF, Kind::Plain); // mul byte
    add(&[0xf6, m(6)], STATUS, Kind::Div); // div byte
    add(&[0xfe, m(0)], 0, Kind::Plain);
    add(&[0xfe, m(1)], 0, Kind::Plain);
    add(&[0x0f, 0xb0, m(3)], 0, Kind::Plain);
    add(&[0x0f, 0xc0, m(3)], 0, Kind::Plain);
    add(&[0x0f, 0xbe, m(0)], 0, Kind::Plain);
    for g in 0..8u8 {
        add(&[0xc0, m(g), 0], OF | AF, Kind::ShiftImm(8));
        add(&[0xd2, m(g)], OF | AF, Kind::ShiftCl(8));
    }
    for cc in 0..16u8 {
        add(&[0x0f, 0x90 + cc, m(0)], 0, Kind::Plain); // setcc
    }
    add(&[0x0f, 0xc7, m(1)], 0, Kind::Plain); // cmpxchg8b
    add(&[0xf0, 0x0f, 0xc7, m(1)], 0, Kind::Plain);
    add(&[0x48, 0x0f, 0xc7, m(1)], 0, Kind::Cx16);
    add(&[0xff, m(6)], 0, Kind::Plain); // push
    add(&[0x8f, 0x47, 0x08], 0, Kind::Plain); // pop [rdi+8]
    add(&[0xff, m(2)], 0, Kind::Branch); // call
    add(&[0xff, m(4)], 0, Kind::Branch); // jmp
                                         // Moffs: mov al/eax/rax and back, with a 64-bit offset.
    for op in [0xa0u8, 0xa1, 0xa2, 0xa3] {
        add(&[op], 0, Kind::Moffs);
        add(&[0x48, op], 0, Kind::Moffs);
    }
    // Strings, with and without REP, bytes and words.
    for op in [0xa4u8, 0xa5, 0xa6, 0xa7, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf] {
        add(&[op], 0, Kind::Str);
        add(&[0xf3, op], 0, Kind::Str);
        add(&[0x48, op], 0, Kind::Str);
        if matches!(op, 0xa6 | 0xa7 | 0xae | 0xaf) {
            add(&[0xf2, op], 0, Kind::Str);
        }
    }
    add(&[0xf3, 0x67, 0xab], 0, Kind::Str);
    // SSE moves (YMM1 and [rdi]; [rdi+1] for the misaligned cases), and their VEX forms.
    let x = m(1);
    for b in [
        &[0x0f, 0x10, x][..],
        &[0x0f, 0x11, x],
        &[0x66, 0x0f, 0x10, x],
        &[0x66, 0x0f, 0x11, x],
        &[0xf3, 0x0f, 0x10, x],
        &[0xf3, 0x0f, 0x11, x],
        &[0xf2, 0x0f, 0x10, x],
        &[0xf2, 0x0f, 0x11, x],
        &[0x0f, 0x28, x],
        &[0x0f, 0x29, x],
        &[0x66, 0x0f, 0x28, x],
        &[0x0f, 0x2b, x],
        &[0x66, 0x0f, 0x6e, x],
        &[0x66, 0x0f, 0x7e, x],
        &[0x66, 0x48, 0x0f, 0x6e, x],
        &[0x66, 0x48, 0x0f, 0x7e, x],
        &[0xf3, 0x0f, 0x7e, x],
        &[0x66, 0x0f, 0x6f, x],
        &[0x66, 0x0f, 0x7f, x],
        &[0xf3, 0x0f, 0x6f, x],
        &[0xf3, 0x0f, 0x7f, x],
        &[0x66, 0x0f, 0xd6, x],
        &[0x66, 0x0f, 0xe7, x],
        &[0x0f, 0x28, 0x4f, 0x01],
        &[0x66, 0x0f, 0x7f, 0x4f, 0x01],
        &[0xf3, 0x0f, 0x6f, 0x4f, 0x01],
        &[0xc5, 0xf8, 0x10, x],
        &[0xc5, 0xfc, 0x10, x],
        &[0xc5, 0xf8, 0x11, x],
        &[0xc5, 0xfc, 0x11, x],
        &[0xc5, 0xfe, 0x6f, x],
        &[0xc5, 0xfd, 0x7f, x],
        &[0xc5, 0xfd, 0x6f, 0x4f, 0x10],
        &[0xc5, 0xf9, 0x6e, x],
        &[0xc4, 0xe1, 0xf9, 0x6e, x],
        &[0xc5, 0xf9, 0xd6, x],
        &[0xc5, 0xfa, 0x10, x],
        &[0xc5, 0xfb, 0x11, x],
        &[0xc5, 0xfd, 0xe7, x],
        &[0xc5, 0xfe, 0x7f, 0x4f, 0x03],
    ] {
        add(b, 0, Kind::Vector);
    }
    v
}

/// `vmovdqu ymm1, [rip + disp]` (store: `vmovdqu [rip + disp], ymm1`) at `at`, for
/// the operand at `target`.
fn ymm1_rip(store: bool, at: u64, target: u64) -> Vec<u8> {
    let disp = target.wrapping_sub(at + 8) as u32;
    let mut b = vec![0xc5, 0xfe, if store { 0x7f } else { 0x6f }, 0x0d];
    b.extend_from_slice(&disp.to_le_bytes());
    b
}

/// xorshift64*: deterministic operands, so that a failure repeats.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// What one run of a form ended with.
#[derive(Debug, PartialEq)]
struct Outcome1 {
    regs: Regs,
    /// The exception vector, and CR2 relative to the region, if one was raised.
    exception: Option<(u8, u64)>,
    mem: Vec<u8>,
    /// YMM1 after the instruction (vector moves).
    vec: Vec<u8>,
}

/// One run of a form from one starting state.
struct Case {
    form: usize,
    /// Code with the operand region at `RAM_BUF`; `moffs_at`: where its 8-byte moffs
    /// address is, to point it at the region run.
    code: Vec<u8>,
    moffs_at: Option<usize>,
    regs: Regs,
    mem: Vec<u8>,
    ymm: Vec<u8>,
}

/// Runs `code` from `regs` with the operand region at `base` (RAM or MMIO backed by
/// this test with the bytes `mem`).
fn run_form(
    b: &mut dyn Backend,
    gm: &mut GuestMem,
    c: &Case,
    base: u64,
) -> Result<Outcome1, String> {
    let mut code = c.code.clone();
    if let Some(at) = c.moffs_at {
        code[at..at + 8].copy_from_slice(&(base + PTR).to_le_bytes());
    }
    let mut regs = c.regs;
    regs.rdi = regs.rdi.wrapping_add(base);
    regs.rsi = regs.rsi.wrapping_add(base);
    gm.write(CODE, &code)?;
    gm.write(RAM_BUF, &c.mem)?;
    gm.write(VEC_IN, &c.ymm)?;
    gm.write(VEC_OUT, &[0; 32])?;
    let mut dev = c.mem.clone();
    b.set_regs(&regs)?;
    let mut exception = None;
    for _ in 0..64 {
        match b.run()? {
            Exit::Hlt => break,
            Exit::IoOut {
                port: EXC_PORT,
                data,
                ..
            } => {
                // CR2 means something after a #PF only.
                let cr2 = match data as u8 {
                    14 => b.sregs()?.cr2.wrapping_sub(base),
                    _ => 0,
                };
                exception = Some((data as u8, cr2));
                break;
            }
            Exit::Mmio {
                addr,
                len,
                is_write,
                data,
            } => {
                let off = addr.wrapping_sub(MMIO_BUF) as usize;
                let len = len as usize;
                if base != MMIO_BUF || off + len > BUF_LEN || len > 8 {
                    return Err(format!(
                        "MMIO exit at {addr:#x} ({len} bytes), outside the region"
                    ));
                }
                if is_write {
                    dev[off..off + len].copy_from_slice(&data.to_le_bytes()[..len]);
                } else {
                    let mut v = [0u8; 8];
                    v[..len].copy_from_slice(&dev[off..off + len]);
                    b.set_mmio_data(u64::from_le_bytes(v));
                }
            }
            e => return Err(format!("unexpected exit {e:?}")),
        }
    }
    let mut regs = b.regs()?;
    regs.rdi = regs.rdi.wrapping_sub(base);
    regs.rsi = regs.rsi.wrapping_sub(base);
    let mem = if base == MMIO_BUF {
        dev
    } else {
        let mut v = vec![0u8; BUF_LEN];
        gm.read(RAM_BUF, &mut v)?;
        v
    };
    let mut vec = vec![0u8; 32];
    gm.read(VEC_OUT, &mut vec)?;
    Ok(Outcome1 {
        regs,
        exception,
        mem,
        vec,
    })
}

/// Every form from 3 random starting states: the same cases for every backend.
fn cases(all: &[Form], base_regs: &Regs) -> Vec<Case> {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut out = Vec::new();
    for (form, f) in all.iter().enumerate() {
        for _ in 0..3 {
            let mut mem: Vec<u8> = (0..BUF_LEN).map(|_| rng.next() as u8).collect();
            let mut r = *base_regs;
            for slot in [
                &mut r.rax, &mut r.rbx, &mut r.rcx, &mut r.rdx, &mut r.rbp, &mut r.r8, &mut r.r9,
                &mut r.r10, &mut r.r11, &mut r.r12, &mut r.r13, &mut r.r14, &mut r.r15,
            ] {
                *slot = rng.next();
            }
            r.rip = CODE;
            r.rflags = 2 | (rng.next() & STATUS);
            r.rdi = PTR;
            r.rsi = PTR - 0x40;
            let mut code = f.bytes.clone();
            let mut moffs_at = None;
            let mut ymm = vec![0u8; 32];
            match f.kind {
                Kind::Plain => {}
                Kind::Moffs => {
                    moffs_at = Some(code.len());
                    code.extend_from_slice(&PTR.to_le_bytes());
                }
                Kind::ShiftImm(max) => {
                    if let Some(last) = code.last_mut() {
                        *last = (rng.next() % (u64::from(max) + 1)) as u8;
                    }
                }
                Kind::ShiftCl(max) => {
                    r.rcx = (r.rcx & !0xff) | (rng.next() % (u64::from(max) + 1));
                }
                Kind::Div => r.rdx = 0,
                Kind::BitReg => r.rax = (rng.next() % 0x400).wrapping_sub(0x200),
                Kind::Cx16 => {
                    r.rdi = PTR & !15;
                    if rng.next() & 1 == 0 {
                        // Make the compare succeed half the time.
                        let at = (PTR & !15) as usize;
                        r.rax = u64::from_le_bytes(mem[at..at + 8].try_into().unwrap_or([0; 8]));
                        r.rdx =
                            u64::from_le_bytes(mem[at + 8..at + 16].try_into().unwrap_or([0; 8]));
                    }
                }
                Kind::Branch => {
                    mem[PTR as usize..PTR as usize + 8].copy_from_slice(&TARGET.to_le_bytes())
                }
                Kind::Str => {
                    r.rcx = rng.next() % 5;
                    if rng.next() & 1 == 0 {
                        r.rflags |= DF;
                    }
                }
                Kind::Vector => {
                    ymm = (0..32).map(|_| rng.next() as u8).collect();
                    let mut c = ymm1_rip(false, CODE, VEC_IN);
                    c.extend_from_slice(&code);
                    let at = CODE + c.len() as u64;
                    c.extend_from_slice(&ymm1_rip(true, at, VEC_OUT));
                    moffs_at = None;
                    code = c;
                }
            }
            code.push(0xf4);
            out.push(Case {
                form,
                code,
                moffs_at,
                regs: r,
                mem,
                ymm,
            });
        }
    }
    out
}

/// What one backend did with one case: (on RAM, on MMIO), or why a run failed.
type CaseResult = Result<(Outcome1, Outcome1), String>;

/// What one backend did with every case.
fn run_cases(
    b: &mut dyn Backend,
    gm: &mut GuestMem,
    sregs: &rvmm::uapi::Sregs,
    cases: &[Case],
) -> Result<Vec<CaseResult>, String> {
    b.set_sregs(sregs)?;
    // XCR0 = x87 | SSE | AVX: xor ecx, ecx; mov eax, 7; xor edx, edx; xsetbv; hlt.
    gm.write(
        CODE,
        &[
            0x31, 0xc9, 0xb8, 7, 0, 0, 0, 0x31, 0xd2, 0x0f, 0x01, 0xd1, 0xf4,
        ],
    )?;
    let mut r = b.regs()?;
    r.rip = CODE;
    b.set_regs(&r)?;
    let e = b.run()?;
    check(e == Exit::Hlt, || {
        format!("{}: XSETBV to enable AVX: exit {e:?}", b.name())
    })?;
    Ok(cases
        .iter()
        .map(|c| Ok((run_form(b, gm, c, RAM_BUF)?, run_form(b, gm, c, MMIO_BUF)?)))
        .collect())
}

/// The differences between the CPU (on RAM) and the emulator (on MMIO) of one backend:
/// (how many, the first few described), and (exceptions raised, vector moves done).
fn differences(
    all: &[Form],
    cases: &[Case],
    results: &[CaseResult],
) -> (Vec<String>, usize, usize) {
    let (mut differ, mut faulted, mut vector_done) = (Vec::new(), 0, 0);
    for (c, r) in cases.iter().zip(results) {
        let f = &all[c.form];
        let (native, emulated) = match r {
            Ok((n, e)) => (n, e),
            Err(e) => {
                differ.push(format!("{:02x?} from {:x?}: {e}", f.bytes, c.regs));
                continue;
            }
        };
        if native.exception.is_some() {
            faulted += 1;
        } else if f.kind == Kind::Vector {
            vector_done += 1;
        }
        let mut e = emulated.regs;
        e.rflags = (e.rflags & !f.undef) | (native.regs.rflags & f.undef);
        if e != native.regs
            || native.exception != emulated.exception
            || native.mem != emulated.mem
            || native.vec != emulated.vec
        {
            differ.push(format!(
                "{:02x?} from {:x?}:\n  cpu      {:x?} exc {:?}\n  emulated {:x?} exc {:?}{}{}",
                f.bytes,
                c.regs,
                native.regs,
                native.exception,
                emulated.regs,
                emulated.exception,
                if native.mem != emulated.mem {
                    " (memory differs)"
                } else {
                    ""
                },
                if native.vec != emulated.vec {
                    " (YMM1 differs)"
                } else {
                    ""
                }
            ));
        }
    }
    (differ, faulted, vector_done)
}

/// Every form, from several random starting states, on RAM and on MMIO: on rvmm, and
/// for reference on KVM ept=0 (its own emulator) in the same boot.
pub fn emulator_matches_the_cpu(ctx: &crate::Ctx) -> Outcome {
    let mut mem = GuestMem::new(RAM).map_err(|e| e.to_string())?;
    let (base_regs, mut sregs) = setup(&mut mem, EntryMode::Long, CODE, RAM as u64 - 16)?;
    // IDT: 32 interrupt gates to the handlers, in the 64-bit code segment.
    let cs = sregs.cs.selector;
    for n in 0..32u64 {
        let h = HANDLERS + 16 * n;
        mem.write(h, &[0xb0, n as u8, 0xe6, EXC_PORT as u8, 0xf4])?;
        let lo =
            (h & 0xffff) | (u64::from(cs) << 16) | (0x8e00u64 << 32) | ((h >> 16 & 0xffff) << 48);
        mem.write_u64(IDT + 16 * n, lo)?;
        mem.write_u64(IDT + 16 * n + 8, h >> 32)?;
    }
    mem.write(TARGET, &[0xf4])?;
    sregs.idt.base = IDT;
    sregs.idt.limit = 32 * 16 - 1;
    sregs.cr4 |= CR4_SSE_AVX;
    let all = forms();
    let cases = cases(&all, &base_regs);
    let on_rvmm = {
        let mut b = RvmmBackend::new(crate::DEV, &mem, 0, 0, false, 1)?.remove(0);
        b.set_regs(&base_regs)?;
        run_cases(&mut b, &mut mem, &sregs, &cases)?
    };
    let (differ, faulted, vector_done) = differences(&all, &cases, &on_rvmm);
    let runs = cases.len();
    crate::ktap::diag(&format!(
        "rvmm: {} forms, {runs} runs each on RAM and MMIO, {} differ; {faulted} raised an exception, {vector_done} vector moves completed",
        all.len(),
        differ.len(),
    ));
    // KVM ept=0 for reference: what its emulator does with the same cases.
    crate::vm_tests::load_kvm_ept0(ctx)?;
    let on_kvm = KvmBackend::new(&mem, false, 1).and_then(|mut v| {
        let mut b = v.remove(0);
        b.set_regs(&base_regs)?;
        run_cases(&mut b, &mut mem, &sregs, &cases)
    });
    crate::vm_tests::unload_kvm()?;
    match on_kvm {
        Ok(r) => {
            let (kvm_differ, _, _) = differences(&all, &cases, &r);
            // The forms KVM's emulator does not run as the CPU does, once each.
            let mut forms_differ: Vec<&str> = Vec::new();
            for d in &kvm_differ {
                let form = d.split(" from ").next().unwrap_or("");
                if !forms_differ.contains(&form) {
                    forms_differ.push(form);
                }
            }
            crate::ktap::diag(&format!(
                "KVM ept=0: {} of {runs} runs differ, in {} forms: {}",
                kvm_differ.len(),
                forms_differ.len(),
                forms_differ.join(" ")
            ));
            // The CPU's own results must not depend on the hypervisor.
            let native_differ = on_rvmm
                .iter()
                .zip(&r)
                .filter(|(a, b)| match (a, b) {
                    (Ok((x, _)), Ok((y, _))) => x != y,
                    _ => false,
                })
                .count();
            check(native_differ == 0, || {
                format!("{native_differ} runs on RAM differ between rvmm and KVM ept=0")
            })?;
        }
        Err(e) => crate::ktap::diag(&format!("KVM ept=0 not run: {e}")),
    }
    check(faulted * 10 < runs && vector_done >= 3 * 30, || {
        format!("{faulted} of {runs} runs faulted, {vector_done} vector moves completed: the forms do not reach device memory")
    })?;
    check(differ.is_empty(), || {
        format!(
            "{} of {runs} runs differ:\n{}",
            differ.len(),
            differ
                .iter()
                .take(8)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}
