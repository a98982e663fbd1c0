// SPDX-License-Identifier: GPL-2.0

//! The emulator against the host CPU: each instruction form runs natively (in a small
//! trampoline, on a buffer of this process) and in the emulator, from the same random
//! registers, flags and memory; registers, the flags the SDM defines, and memory must
//! agree. Forms that use the stack are left to the Bochs selftest
//! (`emulator_matches_the_cpu`), which also covers Intel's behaviour; this one runs
//! thousands of operand values per form in a second. `RVMM_NATIVE_CASES` sets how
//! many per form (default 100; `make test-long` runs more).

use super::*;
use std::vec::Vec;

const STATUS: u64 = CF | PF | AF | ZF | SF | OF;

/// What the trampoline loads and stores: RAX..R15 (RSP unused) and RFLAGS.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct State {
    gpr: [u64; 16],
    rflags: u64,
}

#[rustfmt::skip]
const PROLOGUE: &[u8] = &[
    0x53, 0x55, 0x41, 0x54, 0x41, 0x55, 0x41, 0x56, 0x41, 0x57, // push rbx, rbp, r12-r15
    0x57,                                                       // push rdi (the state)
    0xff, 0xb7, 0x80, 0x00, 0x00, 0x00,                         // push qword [rdi+0x80]
    0x9d,                                                       // popfq
    0x48, 0x8b, 0x07, 0x48, 0x8b, 0x4f, 0x08, 0x48, 0x8b, 0x57, 0x10, 0x48, 0x8b, 0x5f, 0x18,
    0x48, 0x8b, 0x6f, 0x28, 0x48, 0x8b, 0x77, 0x30,
    0x4c, 0x8b, 0x47, 0x40, 0x4c, 0x8b, 0x4f, 0x48, 0x4c, 0x8b, 0x57, 0x50, 0x4c, 0x8b, 0x5f, 0x58,
    0x4c, 0x8b, 0x67, 0x60, 0x4c, 0x8b, 0x6f, 0x68, 0x4c, 0x8b, 0x77, 0x70, 0x4c, 0x8b, 0x7f, 0x78,
    0x48, 0x8b, 0x7f, 0x38,                                     // mov rdi, [rdi+0x38]
];

#[rustfmt::skip]
const EPILOGUE: &[u8] = &[
    0x9c, 0x57,                                                 // pushfq; push rdi
    0x48, 0x8b, 0x7c, 0x24, 0x10,                               // mov rdi, [rsp+0x10]
    0x48, 0x89, 0x07, 0x48, 0x89, 0x4f, 0x08, 0x48, 0x89, 0x57, 0x10, 0x48, 0x89, 0x5f, 0x18,
    0x48, 0x89, 0x6f, 0x28, 0x48, 0x89, 0x77, 0x30,
    0x4c, 0x89, 0x47, 0x40, 0x4c, 0x89, 0x4f, 0x48, 0x4c, 0x89, 0x57, 0x50, 0x4c, 0x89, 0x5f, 0x58,
    0x4c, 0x89, 0x67, 0x60, 0x4c, 0x89, 0x6f, 0x68, 0x4c, 0x89, 0x77, 0x70, 0x4c, 0x89, 0x7f, 0x78,
    0x58, 0x48, 0x89, 0x47, 0x38,                               // pop rax; mov [rdi+0x38], rax
    0x58, 0x48, 0x89, 0x87, 0x80, 0x00, 0x00, 0x00,             // pop rax; mov [rdi+0x80], rax
    0x5f,                                                       // pop rdi
    0x41, 0x5f, 0x41, 0x5e, 0x41, 0x5d, 0x41, 0x5c, 0x5d, 0x5b, // pop r15-r12, rbp, rbx
    0xfc, 0xc3,                                                 // cld; ret
];

/// An executable page with the trampoline around one instruction.
struct Trampoline {
    page: *mut u8,
}

impl Trampoline {
    fn new() -> Self {
        // SAFETY: a fresh private anonymous mapping, owned by the struct.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of an executable page");
        Self { page: p.cast() }
    }

    fn run(&self, insn: &[u8], state: &mut State) {
        let mut code = PROLOGUE.to_vec();
        code.extend_from_slice(insn);
        code.extend_from_slice(EPILOGUE);
        assert!(code.len() <= 4096);
        // SAFETY: the page is ours, writable and executable; the code is the
        // trampoline (it saves and restores what the C ABI needs) around one
        // instruction that touches only registers and the buffer the state points at.
        unsafe {
            core::ptr::copy_nonoverlapping(code.as_ptr(), self.page, code.len());
            let f: extern "C" fn(*mut State) = core::mem::transmute(self.page);
            f(state);
        }
    }
}

impl Drop for Trampoline {
    fn drop(&mut self) {
        // SAFETY: exactly our mapping.
        unsafe { libc::munmap(self.page.cast(), 4096) };
    }
}

/// A form: its bytes (ModRM operand [rdi]), the flags left undefined after it, and
/// what its operands need.
struct Form {
    bytes: Vec<u8>,
    undef: u64,
    /// The last byte is a shift count, below this.
    imm_count: Option<u8>,
    /// CL is a shift count, below this.
    cl_count: Option<u8>,
    /// DIV/IDIV: a dividend whose quotient fits (or #DE: skipped natively).
    div: bool,
    /// A string instruction (RSI into the buffer too; REP: RCX small).
    string: bool,
    /// A register bit offset in RAX, small and signed.
    bit_reg: bool,
}

fn form(b: &[u8], undef: u64) -> Form {
    Form {
        bytes: b.to_vec(),
        undef,
        imm_count: None,
        cl_count: None,
        div: false,
        string: false,
        bit_reg: false,
    }
}

fn forms() -> Vec<Form> {
    let mut v = Vec::new();
    let m = |r: u8| (r << 3) | 7;
    let sizes: [&[u8]; 3] = [&[], &[0x66], &[0x48]];
    for kind in 0..8u8 {
        let undef = if matches!(kind, 1 | 4 | 6) { AF } else { 0 };
        for op in [kind * 8, kind * 8 + 2] {
            v.push(form(&[op, m(4)], undef));
            v.push(form(&[0x40, op, m(3)], undef));
        }
        for p in sizes {
            for op in [kind * 8 + 1, kind * 8 + 3] {
                v.push(form(&[p, &[op, m(3)]].concat(), undef));
            }
            v.push(form(&[p, &[0x83, m(kind), 0x85]].concat(), undef));
        }
        v.push(form(&[0x80, m(kind), 0x5a], undef));
        v.push(form(&[0x81, m(kind), 0x78, 0x56, 0x34, 0x92], undef));
    }
    let mut shifts = Vec::new();
    for (p, bits) in [(&[][..], 32u8), (&[0x66][..], 16), (&[0x48][..], 64)] {
        let w = |op: &[u8]| [p, op].concat();
        for (op, undef) in [
            (&[0x85, m(3)][..], AF),
            (&[0x87, m(3)], 0),
            (&[0x89, m(3)], 0),
            (&[0x8b, m(3)], 0),
            (&[0xf7, m(2)], 0),
            (&[0xf7, m(3)], 0),
            (&[0xf7, m(4)], SF | ZF | AF | PF),
            (&[0xf7, m(5)], SF | ZF | AF | PF),
            (&[0xff, m(0)], 0),
            (&[0xff, m(1)], 0),
            (&[0x0f, 0xaf, m(3)], SF | ZF | AF | PF),
            (&[0x6b, m(3), 0x83], SF | ZF | AF | PF),
            (&[0x0f, 0xb1, m(3)], 0),
            (&[0x0f, 0xc1, m(3)], 0),
            (&[0x0f, 0xb6, m(3)], 0),
            (&[0x0f, 0xbf, m(3)], 0),
            (&[0x0f, 0x38, 0xf0, m(3)], 0),
            (&[0x0f, 0x38, 0xf1, m(3)], 0),
        ] {
            v.push(form(&w(op), undef));
        }
        let imm = if bits == 16 { 2 } else { 4 };
        v.push(form(
            &w(&[0x69, m(3), 0x11, 0x22, 0x33, 0x84][..2 + imm]),
            SF | ZF | AF | PF,
        ));
        for op in [&[0xf7, m(6)][..], &[0xf7, m(7)]] {
            v.push(Form {
                div: true,
                ..form(&w(op), STATUS)
            });
        }
        for cc in 0..16u8 {
            v.push(form(&w(&[0x0f, 0x40 + cc, m(3)]), 0));
        }
        for op in [0xa3u8, 0xab, 0xb3, 0xbb] {
            v.push(Form {
                bit_reg: true,
                ..form(&w(&[0x0f, op, m(0)]), OF | SF | AF | PF)
            });
        }
        for r in 4..8u8 {
            v.push(form(&w(&[0x0f, 0xba, m(r), 0x25]), OF | SF | AF | PF));
        }
        for g in 0..8u8 {
            shifts.push((w(&[0xc1, m(g), 0]), Some(bits), None));
            shifts.push((w(&[0xd3, m(g)]), None, Some(bits)));
        }
        shifts.push((w(&[0x0f, 0xa4, m(3), 0]), Some(bits - 1), None));
        shifts.push((w(&[0x0f, 0xad, m(3)]), None, Some(bits - 1)));
    }
    for g in 0..8u8 {
        shifts.push((std::vec![0xc0, m(g), 0], Some(8), None));
        shifts.push((std::vec![0xd2, m(g)], None, Some(8)));
    }
    for (b, imm_count, cl_count) in shifts {
        v.push(Form {
            imm_count,
            cl_count,
            ..form(&b, OF | AF)
        });
    }
    for (op, undef) in [
        (&[0x86, m(4)][..], 0u64),
        (&[0x88, m(4)], 0),
        (&[0x8a, m(4)], 0),
        (&[0xc6, m(0), 0xa5], 0),
        (&[0x48, 0xc7, m(0), 0x11, 0x22, 0x33, 0x84], 0),
        (&[0x48, 0x63, m(3)], 0),
        (&[0xf6, m(0), 0x81], AF),
        (&[0xf6, m(3)], 0),
        (&[0xf6, m(4)], SF | ZF | AF | PF),
        (&[0xfe, m(0)], 0),
        (&[0xfe, m(1)], 0),
        (&[0x0f, 0xb0, m(3)], 0),
        (&[0x0f, 0xc0, m(3)], 0),
        (&[0x0f, 0xbe, m(3)], 0),
        (&[0x0f, 0xc7, m(1)], 0),
        (&[0xf0, 0x0f, 0xc1, m(3)], 0),
        (&[0xf0, 0x09, m(3)], AF),
    ] {
        v.push(form(op, undef));
    }
    v.push(Form {
        div: true,
        ..form(&[0xf6, m(6)], STATUS)
    });
    for cc in 0..16u8 {
        v.push(form(&[0x0f, 0x90 + cc, m(0)], 0));
    }
    for op in [0xa4u8, 0xa5, 0xa6, 0xa7, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf] {
        for p in [&[][..], &[0xf3], &[0x48], &[0xf3, 0x48], &[0x66]] {
            v.push(Form {
                string: true,
                ..form(&[p, &[op]].concat(), 0)
            });
        }
    }
    v
}

#[test]
fn emulator_matches_the_host_cpu() {
    let per_form: usize = std::env::var("RVMM_NATIVE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let t = Trampoline::new();
    let mut rng = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut buf = std::vec![0u8; 0x200];
    let base = buf.as_mut_ptr() as u64;
    let (mut runs, mut failures) = (0, Vec::new());
    for f in forms() {
        for _ in 0..per_form {
            let mem: Vec<u8> = (0..buf.len()).map(|_| next() as u8).collect();
            let mut s = State::default();
            for g in s.gpr.iter_mut() {
                *g = next();
            }
            s.gpr[4] = 0;
            // Status flags random; DF random for strings (the trampoline clears it).
            s.rflags = 2 | (next() & STATUS);
            s.gpr[7] = base + 0x100;
            s.gpr[6] = base + 0x80;
            let mut code = f.bytes.clone();
            if let Some(max) = f.imm_count {
                *code.last_mut().unwrap() = (next() % (u64::from(max) + 1)) as u8;
            }
            if let Some(max) = f.cl_count {
                s.gpr[1] = (s.gpr[1] & !0xff) | (next() % (u64::from(max) + 1));
            }
            if f.div {
                s.gpr[2] = 0;
            }
            if f.bit_reg {
                s.gpr[0] = (next() % 0x600).wrapping_sub(0x300);
            }
            if f.string {
                s.gpr[1] = next() % 6;
                if next() & 1 == 0 {
                    s.rflags |= 1 << 10;
                }
            }
            // The whole byte string is one instruction (the trampoline runs what follows).
            assert_eq!(
                decode(&code, true, false).map(|i| usize::from(i.len)),
                Ok(code.len()),
                "{code:02x?}"
            );
            // The emulator first: a #DE or a fault is not run natively.
            let mut env = TestEnv::flat64();
            env.put(base, &mem);
            let mut r = Regs {
                gpr: s.gpr,
                rip: 0x1000,
                rflags: s.rflags,
            };
            let mut done = None;
            for _ in 0..8 {
                match run(&code, &M64, &mut r, &mut env) {
                    Ok(Done::Repeat) => continue,
                    d => {
                        done = Some(d);
                        break;
                    }
                }
            }
            match done {
                Some(Ok(Done::Next)) => {}
                Some(Err(Stop::Exception(e))) if e == Exception::DE => continue,
                other => {
                    failures.push(std::format!("{code:02x?}: emulator {other:?}"));
                    continue;
                }
            }
            buf.copy_from_slice(&mem);
            let mut native = s;
            t.run(&code, &mut native);
            runs += 1;
            let mut got = r.gpr;
            got[4] = 0;
            native.gpr[4] = 0;
            let fl = |v: u64| v & (STATUS | (1 << 10)) & !f.undef;
            let emu_mem: Vec<u8> = (0..buf.len() as u64)
                .map(|k| env.get(base + k, 1) as u8)
                .collect();
            if got != native.gpr || fl(r.rflags) != fl(native.rflags) || emu_mem != buf {
                if failures.len() < 10 {
                    failures.push(std::format!(
                        "{code:02x?} from {:x?} flags {:#x}: cpu {:x?} flags {:#x}, emulator {:x?} flags {:#x}{}",
                        s.gpr,
                        s.rflags,
                        native.gpr,
                        native.rflags,
                        got,
                        r.rflags,
                        if emu_mem != buf { " (memory differs)" } else { "" }
                    ));
                } else {
                    failures.push(std::string::String::new());
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {runs} runs differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
