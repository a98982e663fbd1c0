// SPDX-License-Identifier: GPL-2.0

//! The emulator over a table of encodings with expected results, and its decoder
//! against yaxpeax-x86 on random encodings of the forms it supports.

extern crate std;

#[cfg(target_arch = "x86_64")]
mod native;
mod system;

use super::*;
use crate::guest_state::Seg;
use std::collections::BTreeMap;
use std::vec::Vec;

/// Flat guest memory (linear = physical): bytes not set read as 0; pages listed in
/// `absent` raise #PF; writes are held until `commit`.
#[derive(Default)]
struct TestEnv {
    mem: BTreeMap<u64, u8>,
    absent: Vec<u64>,
    segs: [Seg; 6],
    pending: Vec<(u64, Vec<u8>)>,
    reads: usize,
    vregs: [[u8; 32]; 16],
    pending_vreg: Option<(u8, [u8; 32])>,
    /// Port reads answer from here (in order); port writes collect in `outs`.
    ins: Vec<u64>,
    outs: Vec<(u16, u8, u64)>,
    pending_out: Option<(u16, u8, u64)>,
    /// System state: the control registers, loads of segments and system writes held
    /// until `commit`, and the interrupt shadow the last instruction asked for.
    ctl: Control,
    pending_segs: Vec<(SegReg, Seg)>,
    pending_sys: Option<SysWrite>,
    sys: Vec<SysWrite>,
    msrs: BTreeMap<u32, u64>,
    shadow: Option<bool>,
}

impl TestEnv {
    fn flat64() -> Self {
        let mut e = Self::default();
        for s in e.segs.iter_mut() {
            *s = Seg {
                selector: 0x10,
                base: 0,
                limit: 0xffff_ffff,
                ar: 0xc093,
            };
        }
        e.segs[SegReg::Cs as usize].ar = 0xa09b;
        e
    }

    fn flat32() -> Self {
        let mut e = Self::flat64();
        e.segs[SegReg::Cs as usize].ar = 0xc09b;
        e
    }

    fn put(&mut self, la: u64, bytes: &[u8]) {
        for (k, b) in bytes.iter().enumerate() {
            self.mem.insert(la.wrapping_add(k as u64), *b);
        }
    }

    fn get(&self, la: u64, n: usize) -> u64 {
        let mut v = 0u64;
        for k in 0..n {
            v |= u64::from(*self.mem.get(&la.wrapping_add(k as u64)).unwrap_or(&0)) << (8 * k);
        }
        v
    }

    fn check(&self, la: u64, n: usize, write: bool) -> Result<(), Stop> {
        for k in 0..n as u64 {
            let a = la.wrapping_add(k);
            if self.absent.contains(&(a >> 12)) {
                return Err(Exception::page_fault(u32::from(write) << 1, a).into());
            }
        }
        Ok(())
    }

    fn commit(&mut self) {
        for (la, d) in core::mem::take(&mut self.pending) {
            self.put(la, &d);
        }
        if let Some((n, v)) = self.pending_vreg.take() {
            self.vregs[usize::from(n)] = v;
        }
        if let Some(o) = self.pending_out.take() {
            self.outs.push(o);
        }
        for (r, seg) in core::mem::take(&mut self.pending_segs) {
            self.segs[r as usize] = seg;
        }
        if let Some(w) = self.pending_sys.take() {
            match w {
                SysWrite::Cr(n, v) => self.ctl.cr[usize::from(n)] = v,
                SysWrite::Gdtr(b, l) => self.ctl.gdtr = (b, l),
                SysWrite::Idtr(b, l) => self.ctl.idtr = (b, l),
                SysWrite::Msr(i, v) => {
                    self.msrs.insert(i, v);
                }
                SysWrite::Halt => {}
            }
            self.sys.push(w);
        }
    }
}

impl Env for TestEnv {
    fn segment(&mut self, s: SegReg) -> Seg {
        self.segs[s as usize]
    }
    fn read(&mut self, la: u64, buf: &mut [u8]) -> Result<(), Stop> {
        self.check(la, buf.len(), false)?;
        self.reads += 1;
        for (k, b) in buf.iter_mut().enumerate() {
            *b = self.get(la.wrapping_add(k as u64), 1) as u8;
        }
        Ok(())
    }
    fn write(&mut self, la: u64, data: &[u8]) -> Result<(), Stop> {
        self.check(la, data.len(), true)?;
        self.pending.push((la, data.to_vec()));
        Ok(())
    }
    fn vreg(&mut self, n: u8) -> [u8; 32] {
        self.vregs[usize::from(n & 15)]
    }
    fn port_in(&mut self, _port: u16, _size: u8) -> Result<u64, Stop> {
        if self.ins.is_empty() {
            return Err(Stop::Retry);
        }
        Ok(self.ins.remove(0))
    }
    fn port_out(&mut self, port: u16, size: u8, value: u64) -> Result<(), Stop> {
        self.pending_out = Some((port, size, value));
        Ok(())
    }
    fn set_vreg(&mut self, n: u8, v: [u8; 32]) {
        self.pending_vreg = Some((n & 15, v));
    }
    fn load_segment(&mut self, s: SegReg, seg: Seg) -> Result<(), Stop> {
        self.pending_segs.push((s, seg));
        Ok(())
    }
    fn control(&mut self) -> Result<Control, Stop> {
        Ok(self.ctl)
    }
    fn sys_write(&mut self, w: SysWrite) -> Result<(), Stop> {
        assert!(
            self.pending_sys.is_none(),
            "two system writes in one instruction"
        );
        self.pending_sys = Some(w);
        Ok(())
    }
    fn rdmsr(&mut self, index: u32) -> Result<u64, Stop> {
        self.msrs
            .get(&index)
            .copied()
            .ok_or(Stop::Exception(Exception::GP0))
    }
    fn cpuid(&mut self, leaf: u32, sub: u32) -> Result<[u32; 4], Stop> {
        Ok([leaf, sub, !leaf, !sub])
    }
    fn interrupt_shadow(&mut self, mov_ss: bool) {
        self.shadow = Some(mov_ss);
    }
}

const M64: Mode = Mode {
    long: true,
    def32: false,
    stack32: false,
    protected: true,
    cpl: 0,
    align_check: false,
    la57: false,
    sse: true,
    avx: true,
    ts: false,
};
const M32: Mode = Mode {
    long: false,
    def32: true,
    stack32: true,
    ..M64
};
const M16: Mode = Mode {
    long: false,
    def32: false,
    stack32: false,
    protected: false,
    ..M64
};

const CF: u64 = 1;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;
const DATA: u64 = 0x1000;

fn regs(set: &[(usize, u64)]) -> Regs {
    let mut r = Regs {
        rip: 0x100,
        rflags: 2,
        ..Default::default()
    };
    r.gpr[4] = 0x8000;
    for &(n, v) in set {
        r.gpr[n] = v;
    }
    r
}

/// Runs `code` once; on success commits the writes.
fn run(code: &[u8], mode: &Mode, r: &mut Regs, env: &mut TestEnv) -> Result<Done, Stop> {
    env.shadow = None;
    let res = emulate(code, mode, r, env).map(|(_, d)| d);
    if res.is_ok() {
        env.commit();
    } else {
        env.pending.clear();
        env.pending_out = None;
        env.pending_vreg = None;
        env.pending_segs.clear();
        env.pending_sys = None;
    }
    res
}

#[test]
fn a_64_bit_instruction_run_in_real_mode_faults() {
    // mov rax, [rbx - 4] decoded in 64-bit mode, run in real mode with RBX = 0: the
    // 64-bit effective address is beyond the 64-KiB limit (no overflow on the way).
    let insn = decode(&[0x48, 0x8b, 0x43, 0xfc], true, false).unwrap();
    let mut env = TestEnv::flat32();
    env.segs[SegReg::Ds as usize].limit = 0xffff;
    let mut r = regs(&[]);
    let real = Mode {
        protected: false,
        ..M16
    };
    assert_eq!(
        execute(&insn, &real, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
}

#[test]
fn moffs_load_reads_the_apic_id() {
    // mov eax, [0xfee00020] (A1 moffs32), in 32-bit code.
    let mut env = TestEnv::flat32();
    env.put(0xfee0_0020, &0x0200_0000u32.to_le_bytes());
    let mut r = regs(&[(0, 0xdead_beef_1234_5678)]);
    let d = run(&[0xa1, 0x20, 0x00, 0xe0, 0xfe], &M32, &mut r, &mut env).unwrap();
    assert_eq!(d, Done::Next);
    assert_eq!(r.gpr[0], 0x0200_0000);
    assert_eq!(r.rip, 0x105);
    // 64-bit moffs64 store: mov [0x1000], al (A2) with an 8-byte offset.
    let mut env = TestEnv::flat64();
    let mut r = regs(&[(0, 0x99)]);
    run(&[0xa2, 0, 0x10, 0, 0, 0, 0, 0, 0], &M64, &mut r, &mut env).unwrap();
    assert_eq!(env.get(DATA, 1), 0x99);
    assert_eq!(r.rip, 0x109);
}

#[test]
fn alu_results_and_flags() {
    // (code, rax, rbx, memory, rflags in, expected memory, expected rax, expected flags)
    type Case = (&'static [u8], u64, u64, u64, u64, u64, u64, u64);
    let cases: &[Case] = &[
        // add [rdi], eax: 0x7fffffff + 1 overflows into the sign.
        (
            &[0x01, 0x07],
            1,
            0,
            0x7fff_ffff,
            2,
            0x8000_0000,
            1,
            2 | SF | OF | AF | PF,
        ),
        // add byte [rdi], al: 0xff + 1 = 0, carry.
        (&[0x00, 0x07], 1, 0, 0xff, 2, 0, 1, 2 | CF | ZF | AF | PF),
        // adc [rdi], eax with CF: 1 + 1 + 1.
        (&[0x11, 0x07], 1, 0, 1, 2 | CF, 3, 1, 2 | PF),
        // sub [rdi], eax: 0 - 1 borrows.
        (
            &[0x29, 0x07],
            1,
            0,
            0,
            2,
            0xffff_ffff,
            1,
            2 | CF | SF | AF | PF,
        ),
        // sbb eax, [rdi] with CF: 5 - 2 - 1.
        (&[0x1b, 0x07], 5, 0, 2, 2 | CF, 2, 2, 2),
        // cmp [rdi], eax leaves memory.
        (&[0x39, 0x07], 7, 0, 7, 2 | CF | SF, 7, 7, 2 | ZF | PF),
        // or/and/xor with memory: CF and OF clear.
        (
            &[0x09, 0x07],
            0xf0,
            0,
            0x0f,
            2 | CF | OF,
            0xff,
            0xf0,
            2 | PF,
        ),
        (&[0x21, 0x07], 0xf0, 0, 0x0f, 2, 0, 0xf0, 2 | ZF | PF),
        (
            &[0x31, 0x07],
            0x80000000,
            0,
            0x80000001,
            2,
            1,
            0x80000000,
            2,
        ),
        // rex.w add [rdi], rax.
        (
            &[0x48, 0x01, 0x07],
            u64::MAX,
            0,
            2,
            2,
            1,
            u64::MAX,
            2 | CF | AF,
        ),
        // add dword [rdi], 0x10 (83 /0 ib).
        (
            &[0x83, 0x07, 0x10],
            0,
            0,
            0xfffffff0,
            2,
            0,
            0,
            2 | CF | ZF | PF,
        ),
        // and dword [rdi], 0xffff00ff (81 /4 id).
        (
            &[0x81, 0x27, 0xff, 0x00, 0xff, 0xff],
            0,
            0,
            0x1234_5678,
            2,
            0x1234_0078,
            0,
            2 | PF,
        ),
        // test [rdi], eax sets flags only.
        (
            &[0x85, 0x07],
            0x8000_0000,
            0,
            0x8000_0000,
            2,
            0x8000_0000,
            0x8000_0000,
            2 | SF | PF,
        ),
        // inc dword [rdi] keeps CF; dec byte [rdi] to zero.
        (
            &[0xff, 0x07],
            0,
            0,
            0x7fff_ffff,
            2 | CF,
            0x8000_0000,
            0,
            2 | CF | SF | OF | AF | PF,
        ),
        (&[0xfe, 0x0f], 0, 0, 1, 2, 0, 0, 2 | ZF | PF),
        // neg dword [rdi]; not dword [rdi] (no flags).
        (
            &[0xf7, 0x1f],
            0,
            0,
            1,
            2,
            0xffff_ffff,
            0,
            2 | CF | SF | AF | PF,
        ),
        (
            &[0xf7, 0x17],
            0,
            0,
            0x0f0f_0f0f,
            2 | ZF,
            0xf0f0_f0f0,
            0,
            2 | ZF,
        ),
        // xadd [rdi], eax.
        (&[0x0f, 0xc1, 0x07], 5, 0, 10, 2, 15, 10, 2 | PF),
        // cmpxchg [rdi], ebx: equal stores rbx; unequal loads rax.
        (&[0x0f, 0xb1, 0x1f], 3, 9, 3, 2, 9, 3, 2 | ZF | PF),
        (&[0x0f, 0xb1, 0x1f], 4, 9, 3, 2, 3, 3, 2),
        // xchg [rdi], eax.
        (&[0x87, 0x07], 1, 0, 2, 2, 1, 2, 2),
        // shl dword [rdi], 1; shr dword [rdi], 4 (C1 /5 ib); sar byte [rdi], 1.
        (
            &[0xd1, 0x27],
            0,
            0,
            0xc000_0000,
            2,
            0x8000_0000,
            0,
            2 | CF | SF | PF,
        ),
        (&[0xc1, 0x2f, 4], 0, 0, 0x18, 2, 1, 0, 2 | CF),
        (&[0xd0, 0x3f], 0, 0, 0x81, 2, 0xc0, 0, 2 | CF | SF | PF),
        // rol dword [rdi], 1; rcr byte [rdi], 1 with CF.
        (&[0xd1, 0x07], 0, 0, 0x8000_0001, 2, 3, 0, 2 | CF | OF),
        (&[0xd0, 0x1f], 0, 0, 0x02, 2 | CF, 0x81, 0, 2 | OF),
        // bts dword [rdi], 3 (0F BA /5); btr [rdi], eax; btc; bt.
        (&[0x0f, 0xba, 0x2f, 3], 0, 0, 0, 2, 8, 0, 2),
        (&[0x0f, 0xb3, 0x07], 4, 0, 0x10, 2, 0, 4, 2 | CF),
        (&[0x0f, 0xbb, 0x07], 0, 0, 1, 2, 0, 0, 2 | CF),
        (&[0x0f, 0xa3, 0x07], 1, 0, 1, 2 | CF, 1, 1, 2),
        // setnz byte [rdi]; cmovz eax, [rdi] (not taken: still zero-extends).
        (&[0x0f, 0x95, 0x07], 0, 0, 0xff, 2 | ZF, 0, 0, 2 | ZF),
        (&[0x0f, 0x44, 0x07], 0xffff_ffff_0000_0001, 0, 5, 2, 5, 1, 2),
        // movzx eax, byte [rdi]; movsx eax, word [rdi]; movsxd rax, dword [rdi].
        (&[0x0f, 0xb6, 0x07], u64::MAX, 0, 0x80, 2, 0x80, 0x80, 2),
        (
            &[0x0f, 0xbf, 0x07],
            u64::MAX,
            0,
            0x8000,
            2,
            0x8000,
            0xffff_8000,
            2,
        ),
        (
            &[0x48, 0x63, 0x07],
            0,
            0,
            0x8000_0000,
            2,
            0x8000_0000,
            0xffff_ffff_8000_0000,
            2,
        ),
        // mov ax, [rdi] merges; mov al, [rdi]; mov ah, [rdi] (no REX: AH).
        (
            &[0x66, 0x8b, 0x07],
            0x1111_2222_3333_4444,
            0,
            0xabcd,
            2,
            0xabcd,
            0x1111_2222_3333_abcd,
            2,
        ),
        (&[0x8a, 0x27], 0x4444, 0, 0x99, 2, 0x99, 0x9944, 2),
        // movbe eax, [rdi].
        (
            &[0x0f, 0x38, 0xf0, 0x07],
            0,
            0,
            0x1122_3344,
            2,
            0x1122_3344,
            0x4433_2211,
            2,
        ),
        // shld [rdi], eax, 4; shrd [rdi], eax, 4.
        (
            &[0x0f, 0xa4, 0x07, 4],
            0xf000_0000,
            0,
            0x0123_4567,
            2,
            0x1234_567f,
            0xf000_0000,
            2,
        ),
        (
            &[0x0f, 0xac, 0x07, 4],
            0xf,
            0,
            0x0123_4567,
            2,
            0xf012_3456,
            0xf,
            2 | SF | PF | OF,
        ),
        // imul eax, [rdi], 3 (6B): overflow.
        (
            &[0x6b, 0x07, 3],
            0,
            0,
            0x6000_0000,
            2,
            0x6000_0000,
            0x2000_0000,
            2 | CF | OF | PF,
        ),
    ];
    for (k, &(code, rax, rbx, mem, fl, want_mem, want_rax, want_fl)) in cases.iter().enumerate() {
        let mut env = TestEnv::flat64();
        env.put(DATA, &mem.to_le_bytes());
        let mut r = regs(&[(0, rax), (3, rbx), (7, DATA)]);
        r.rflags = fl;
        run(code, &M64, &mut r, &mut env).unwrap_or_else(|e| panic!("case {k} {code:x?}: {e:?}"));
        assert_eq!(env.get(DATA, 8), want_mem, "case {k} {code:x?}: memory");
        assert_eq!(r.gpr[0], want_rax, "case {k} {code:x?}: rax");
        assert_eq!(r.rflags, want_fl, "case {k} {code:x?}: rflags");
        assert_eq!(r.rip, 0x100 + code.len() as u64, "case {k}: rip");
    }
}

#[test]
fn mul_div_and_divide_error() {
    let mut env = TestEnv::flat64();
    env.put(DATA, &7u64.to_le_bytes());
    // mul dword [rdi]: edx:eax = 0x8000_0000 * 7.
    let mut r = regs(&[(0, 0x8000_0000), (7, DATA)]);
    run(&[0xf7, 0x27], &M64, &mut r, &mut env).unwrap();
    assert_eq!((r.gpr[0], r.gpr[2]), (0x8000_0000, 3));
    assert_eq!(r.rflags & (CF | OF), CF | OF);
    // div dword [rdi]: (3:0x80000000) / 7.
    let mut r2 = r;
    r2.rip = 0x100;
    run(&[0xf7, 0x37], &M64, &mut r2, &mut env).unwrap();
    let n = (3u64 << 32) | 0x8000_0000;
    assert_eq!((r2.gpr[0], r2.gpr[2]), (n / 7, n % 7));
    // Quotient too big, and divide by zero: #DE, registers unchanged.
    let mut r3 = regs(&[(0, 0), (2, 7), (7, DATA)]);
    let before = r3;
    assert_eq!(
        run(&[0xf7, 0x37], &M64, &mut r3, &mut env),
        Err(Stop::Exception(Exception::DE))
    );
    assert_eq!(r3, before);
    env.put(DATA, &0u64.to_le_bytes());
    let mut r4 = regs(&[(7, DATA)]);
    assert_eq!(
        run(&[0xf7, 0x37], &M64, &mut r4, &mut env),
        Err(Stop::Exception(Exception::DE))
    );
    // idiv with i64::MIN / -1 (rex.w): #DE, not an overflow in the host.
    env.put(DATA, &u64::MAX.to_le_bytes());
    let mut r5 = regs(&[(0, 1 << 63), (2, u64::MAX), (7, DATA)]);
    assert_eq!(
        run(&[0x48, 0xf7, 0x3f], &M64, &mut r5, &mut env),
        Err(Stop::Exception(Exception::DE))
    );
    // idiv byte [rdi]: -7 / 2.
    env.put(DATA, &[2]);
    let mut r6 = regs(&[(0, (-7i16) as u16 as u64), (7, DATA)]);
    run(&[0xf6, 0x3f], &M64, &mut r6, &mut env).unwrap();
    assert_eq!(r6.gpr[0] & 0xffff, 0xfffd);
}

#[test]
fn lock_needs_a_memory_read_modify_write() {
    let mut env = TestEnv::flat64();
    // lock add [rdi], eax: fine. lock mov [rdi], eax, lock cmp and lock add eax, [rdi]: #UD.
    let mut r = regs(&[(7, DATA), (0, 1)]);
    run(&[0xf0, 0x01, 0x07], &M64, &mut r, &mut env).unwrap();
    assert_eq!(env.get(DATA, 4), 1);
    for code in [
        &[0xf0, 0x89, 0x07][..],
        &[0xf0, 0x39, 0x07],
        &[0xf0, 0x03, 0x07],
        &[0xf0, 0x01, 0xc0],
    ] {
        let mut r = regs(&[(7, DATA)]);
        assert_eq!(
            run(code, &M64, &mut r, &mut env),
            Err(Stop::Exception(Exception::UD)),
            "{code:x?}"
        );
    }
}

#[test]
fn bit_offsets_reach_outside_the_operand() {
    // bts [rdi], eax with eax = -1: bit 31 of the dword before.
    let mut env = TestEnv::flat64();
    let mut r = regs(&[(7, DATA), (0, 0xffff_ffff)]);
    run(&[0x0f, 0xab, 0x07], &M64, &mut r, &mut env).unwrap();
    assert_eq!(env.get(DATA - 4, 4), 0x8000_0000);
    // bt [rdi], rax with rax = 130 (rex.w): bit 2 of the qword at +16.
    env.put(DATA + 16, &[4]);
    let mut r = regs(&[(7, DATA), (0, 130)]);
    run(&[0x48, 0x0f, 0xa3, 0x07], &M64, &mut r, &mut env).unwrap();
    assert_eq!(r.rflags & CF, CF);
}

#[test]
fn cmpxchg8b_and_16b() {
    let mut env = TestEnv::flat64();
    env.put(DATA, &0x1111_2222_3333_4444u64.to_le_bytes());
    let mut r = regs(&[
        (7, DATA),
        (0, 0x3333_4444),
        (2, 0x1111_2222),
        (3, 5),
        (1, 6),
    ]);
    run(&[0x0f, 0xc7, 0x0f], &M64, &mut r, &mut env).unwrap();
    assert_eq!(env.get(DATA, 8), 0x6_0000_0005);
    assert_eq!(r.rflags & ZF, ZF);
    // Mismatch: EDX:EAX gets memory.
    let mut r = regs(&[(7, DATA)]);
    run(&[0x0f, 0xc7, 0x0f], &M64, &mut r, &mut env).unwrap();
    assert_eq!((r.gpr[0], r.gpr[2], r.rflags & ZF), (5, 6, 0));
    // cmpxchg16b needs 16-byte alignment.
    let mut r = regs(&[(7, DATA + 8)]);
    assert_eq!(
        run(&[0x48, 0x0f, 0xc7, 0x0f], &M64, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
    // Register operand: #UD.
    assert_eq!(
        run(&[0x0f, 0xc7, 0xc8], &M64, &mut r, &mut env),
        Err(Stop::Exception(Exception::UD))
    );
}

#[test]
fn string_instructions_iterate_once_per_run() {
    // rep stosd with ecx = 3: three runs, the last moves RIP.
    let mut env = TestEnv::flat64();
    let mut r = regs(&[(7, DATA), (1, 3), (0, 0xaabb_ccdd)]);
    for k in 0..3 {
        let d = run(&[0xf3, 0xab], &M64, &mut r, &mut env).unwrap();
        assert_eq!(d, if k < 2 { Done::Repeat } else { Done::Next });
    }
    assert_eq!((r.gpr[1], r.gpr[7], r.rip), (0, DATA + 12, 0x102));
    assert_eq!(env.get(DATA + 8, 4), 0xaabb_ccdd);
    // rep with ecx = 0 does nothing.
    let mut r = regs(&[(7, DATA)]);
    assert_eq!(run(&[0xf3, 0xab], &M64, &mut r, &mut env), Ok(Done::Next));
    assert_eq!(r.gpr[7], DATA);
    // std; movsb goes down; lodsw from fs.
    env.put(0x2000, &[0x5a]);
    let mut r = regs(&[(6, 0x2000), (7, DATA + 0x100)]);
    r.rflags |= 1 << 10;
    run(&[0xa4], &M64, &mut r, &mut env).unwrap();
    assert_eq!(
        (env.get(DATA + 0x100, 1), r.gpr[6], r.gpr[7]),
        (0x5a, 0x1fff, DATA + 0xff)
    );
    // repe cmpsb stops at the first difference.
    env.put(0x3000, b"abcX");
    env.put(0x4000, b"abcY");
    let mut r = regs(&[(6, 0x3000), (7, 0x4000), (1, 10)]);
    let mut runs = 0;
    while run(&[0xf3, 0xa6], &M64, &mut r, &mut env).unwrap() == Done::Repeat {
        runs += 1;
    }
    assert_eq!((runs, r.gpr[1], r.rflags & ZF), (3, 6, 0));
    // repne scasb finds the byte.
    let mut r = regs(&[(7, 0x3000), (1, 10), (0, u64::from(b'c'))]);
    while run(&[0xf2, 0xae], &M64, &mut r, &mut env).unwrap() == Done::Repeat {}
    assert_eq!((r.gpr[7], r.rflags & ZF), (0x3003, ZF));
    // 16-bit addressing (67 in 32-bit code): si and di wrap at 64 KiB.
    let mut r = regs(&[(6, 0x1_ffff), (7, 0x1_ffff)]);
    run(&[0x67, 0xa4], &M32, &mut r, &mut env).unwrap();
    assert_eq!((r.gpr[6], r.gpr[7]), (0x1_0000, 0x1_0000));
}

#[test]
fn stack_and_branches_through_memory() {
    let mut env = TestEnv::flat64();
    env.put(DATA, &0x5000u64.to_le_bytes());
    // push qword [rdi]; pop qword [rdi+8]
    let mut r = regs(&[(7, DATA)]);
    run(&[0xff, 0x37], &M64, &mut r, &mut env).unwrap();
    assert_eq!((r.gpr[4], env.get(0x7ff8, 8)), (0x7ff8, 0x5000));
    r.rip = 0x100;
    run(&[0x8f, 0x47, 0x08], &M64, &mut r, &mut env).unwrap();
    assert_eq!((r.gpr[4], env.get(DATA + 8, 8)), (0x8000, 0x5000));
    // call [rdi]: pushes the next RIP and jumps.
    r.rip = 0x100;
    run(&[0xff, 0x17], &M64, &mut r, &mut env).unwrap();
    assert_eq!(
        (r.rip, env.get(0x7ff8, 8), r.gpr[4]),
        (0x5000, 0x102, 0x7ff8)
    );
    // ret 8
    run(&[0xc2, 8, 0], &M64, &mut r, &mut env).unwrap();
    assert_eq!((r.rip, r.gpr[4]), (0x102, 0x8008));
    // jmp [rdi] to a non-canonical target: #GP(0).
    env.put(DATA, &0x8000_0000_0000_0000u64.to_le_bytes());
    let mut r = regs(&[(7, DATA)]);
    assert_eq!(
        run(&[0xff, 0x27], &M64, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
}

#[test]
fn segmentation_and_canonical_faults() {
    // 64-bit: a non-canonical address is #GP(0), through RSP or RBP #SS(0).
    let mut env = TestEnv::flat64();
    let nc = 0x0000_8000_0000_0000;
    let mut r = regs(&[(7, nc), (5, nc)]);
    assert_eq!(
        run(&[0x8b, 0x07], &M64, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
    assert_eq!(
        run(&[0x8b, 0x45, 0x00], &M64, &mut r, &mut env),
        Err(Stop::Exception(Exception::SS0))
    );
    // An 8-byte access ending past the canonical boundary.
    let mut r = regs(&[(7, 0x7fff_ffff_fffc)]);
    assert_eq!(
        run(&[0x48, 0x8b, 0x07], &M64, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
    // FS base counts in 64-bit mode; DS base does not.
    let mut env = TestEnv::flat64();
    env.segs[SegReg::Fs as usize].base = 0x10_0000;
    env.segs[SegReg::Ds as usize].base = 0x20_0000;
    env.put(0x10_0010, &[7]);
    let mut r = regs(&[(7, 0x10)]);
    run(&[0x64, 0x8a, 0x07], &M64, &mut r, &mut env).unwrap();
    assert_eq!(r.gpr[0], 7);
    // 32-bit: the limit of DS, a read-only segment, an unusable ES.
    let mut env = TestEnv::flat32();
    env.segs[SegReg::Ds as usize].limit = 0xfff;
    let mut r = regs(&[(7, 0xffe)]);
    assert_eq!(
        run(&[0x8b, 0x07], &M32, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
    let mut r = regs(&[(7, 0xffc)]);
    run(&[0x8b, 0x07], &M32, &mut r, &mut env).unwrap();
    env.segs[SegReg::Ds as usize].ar = 0xc091;
    assert_eq!(
        run(&[0x89, 0x07], &M32, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
    env.segs[SegReg::Es as usize].ar |= 1 << 16;
    assert_eq!(
        run(&[0xab], &M32, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
    // SS limit: #SS(0). Expand-down: offsets at or below the limit fault.
    let mut env = TestEnv::flat32();
    env.segs[SegReg::Ss as usize].limit = 0xfff;
    let mut r = regs(&[(5, 0x2000)]);
    assert_eq!(
        run(&[0x8b, 0x45, 0x00], &M32, &mut r, &mut env),
        Err(Stop::Exception(Exception::SS0))
    );
    env.segs[SegReg::Ss as usize].ar = 0xc097;
    run(&[0x8b, 0x45, 0x00], &M32, &mut r, &mut env).unwrap();
    let mut r = regs(&[(5, 0x800)]);
    assert_eq!(
        run(&[0x8b, 0x45, 0x00], &M32, &mut r, &mut env),
        Err(Stop::Exception(Exception::SS0))
    );
    // A segment base wraps the linear address at 4 GiB.
    let mut env = TestEnv::flat32();
    env.segs[SegReg::Ds as usize].base = 0xffff_f000;
    env.put(0x10, &[0x42]);
    let mut r = regs(&[(7, 0x1010)]);
    run(&[0x8a, 0x07], &M32, &mut r, &mut env).unwrap();
    assert_eq!(r.gpr[0], 0x42);
}

#[test]
fn alignment_check_at_cpl3() {
    let mut env = TestEnv::flat64();
    let mode = Mode {
        cpl: 3,
        align_check: true,
        ..M64
    };
    let mut r = regs(&[(7, DATA + 1)]);
    run(&[0x8b, 0x07], &mode, &mut r, &mut env).unwrap();
    r.rip = 0x100;
    r.rflags |= 1 << 18;
    assert_eq!(
        run(&[0x8b, 0x07], &mode, &mut r, &mut env),
        Err(Stop::Exception(Exception::AC0))
    );
    // Byte accesses are never misaligned.
    run(&[0x8a, 0x07], &mode, &mut r, &mut env).unwrap();
}

#[test]
fn page_faults_leave_no_partial_results() {
    // xchg [rdi], eax where the write faults: nothing changes, the fault comes back.
    let mut env = TestEnv::flat64();
    env.put(0x1ffe, &[1, 2, 3, 4]);
    env.absent.push(0x2);
    let mut r = regs(&[(7, 0x1ffe), (0, 9)]);
    let before = r;
    let e = run(&[0x87, 0x07], &M64, &mut r, &mut env);
    assert_eq!(e, Err(Stop::Exception(Exception::page_fault(0, 0x2000))));
    assert_eq!(r, before);
    assert_eq!(env.get(0x1ffe, 2), 0x0201);
    // movsb from a good page to a missing one: the write's fault, with W set.
    let mut r = regs(&[(6, 0x1000), (7, 0x2000)]);
    let e = run(&[0xa4], &M64, &mut r, &mut env);
    assert_eq!(e, Err(Stop::Exception(Exception::page_fault(2, 0x2000))));
}

#[test]
fn addressing_forms() {
    let mut env = TestEnv::flat64();
    // RIP-relative: mov eax, [rip+0x10] at 0x100 (6 bytes): 0x116.
    env.put(0x116, &[0x33]);
    let mut r = regs(&[]);
    run(&[0x8b, 0x05, 0x10, 0, 0, 0], &M64, &mut r, &mut env).unwrap();
    assert_eq!(r.gpr[0], 0x33);
    // SIB: mov [rbx + rcx*4 - 8], r9d (REX.R); r13 base needs a disp8.
    let mut r = regs(&[(3, 0x2000), (1, 2), (9, 0x77)]);
    run(&[0x44, 0x89, 0x4c, 0x8b, 0xf8], &M64, &mut r, &mut env).unwrap();
    assert_eq!(env.get(0x2000, 4), 0x77);
    let mut r = regs(&[(13, 0x3000), (0, 0x55)]);
    run(&[0x41, 0x88, 0x45, 0x01], &M64, &mut r, &mut env).unwrap();
    assert_eq!(env.get(0x3001, 1), 0x55);
    // SIB without base: [index*8 + disp32].
    let mut r = regs(&[(1, 1), (0, 0x66)]);
    run(
        &[0x88, 0x04, 0xcd, 0x00, 0x40, 0, 0],
        &M64,
        &mut r,
        &mut env,
    )
    .unwrap();
    assert_eq!(env.get(0x4008, 1), 0x66);
    // 16-bit: mov [bp+si+2], ax uses SS; mov [0x1234], al.
    let mut env = TestEnv::flat32();
    env.segs[SegReg::Ss as usize].base = 0x10000;
    let mut r = regs(&[(5, 0x100), (6, 0x10), (0, 0xbeef)]);
    run(&[0x89, 0x42, 0x02], &M16, &mut r, &mut env).unwrap();
    assert_eq!(env.get(0x10112, 2), 0xbeef);
    run(&[0xa2, 0x34, 0x12], &M16, &mut r, &mut env).unwrap();
    assert_eq!(env.get(0x1234, 1), 0xef);
    // 16-bit IP wraps.
    let mut r = regs(&[(7, 0x10), (0, 1)]);
    r.rip = 0xffff;
    run(&[0x88, 0x05], &M16, &mut r, &mut env).unwrap();
    assert_eq!(r.rip, 1);
}

#[test]
fn decode_limits() {
    // 15 bytes at most: 14 prefixes and a 2-byte MOV is #GP(0).
    let mut code = [0x66u8; 16];
    code[14] = 0x89;
    code[15] = 0x07;
    let mut env = TestEnv::flat64();
    let mut r = regs(&[(7, DATA)]);
    assert_eq!(
        run(&code, &M64, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
    // Truncated and unknown instructions stop, they do not guess.
    assert_eq!(
        run(&[0x89], &M64, &mut r, &mut env),
        Err(Stop::Unsupported(0))
    );
    assert_eq!(
        run(&[0x0f, 0x0b], &M64, &mut r, &mut env),
        Err(Stop::Unsupported(0x0f0b))
    );
    // REX then a legacy prefix: the REX is ignored (AH, not SPL).
    let mut r = regs(&[(7, DATA), (0, 0x1200)]);
    run(&[0x40, 0x66, 0x88, 0x27], &M64, &mut r, &mut env).unwrap();
    assert_eq!(env.get(DATA, 1), 0x12);
}

/// The supported opcodes, as (map, opcode) byte strings.
/// Every opcode: the property compares lengths wherever our decoder takes the bytes.
fn supported_opcodes() -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    for op in 0u8..=0xff {
        if op != 0x0f {
            v.push(std::vec![op]);
        }
        if op != 0x38 && op != 0x3a {
            v.push(std::vec![0x0f, op]);
        }
    }
    v.push(std::vec![0x0f, 0x38, 0xf0]);
    v.push(std::vec![0x0f, 0x38, 0xf1]);
    v
}

fn yax_len(code: &[u8], long: bool, def32: bool) -> Option<usize> {
    use yaxpeax_arch::LengthedInstruction;
    if long {
        let i = yaxpeax_x86::long_mode::InstDecoder::default()
            .decode_slice(code)
            .ok()?;
        Some(i.len().to_const() as usize)
    } else if def32 {
        let i = yaxpeax_x86::protected_mode::InstDecoder::default()
            .decode_slice(code)
            .ok()?;
        Some(i.len().to_const() as usize)
    } else {
        let i = yaxpeax_x86::real_mode::InstDecoder::default()
            .decode_slice(code)
            .ok()?;
        Some(i.len().to_const() as usize)
    }
}

proptest::proptest! {
    /// Random prefixes, a supported opcode, then random ModRM/SIB/displacement/
    /// immediate bytes: where yaxpeax-x86 decodes the bytes, the length agrees.
    #[test]
    fn lengths_agree_with_yaxpeax(
        prefixes in proptest::collection::vec(proptest::sample::select(
            &[0x66u8, 0x67, 0xf0, 0xf2, 0xf3, 0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65, 0x40, 0x48, 0x41, 0x4c, 0x45][..]), 0..4),
        which in 0usize..1000,
        tail in proptest::collection::vec(proptest::num::u8::ANY, 14),
        mode in 0u8..3,
    ) {
        let ops = supported_opcodes();
        let (long, def32) = [(true, false), (false, true), (false, false)][usize::from(mode)];
        let mut code: Vec<u8> = prefixes.into_iter().filter(|&p| long || !(0x40..=0x4f).contains(&p)).collect();
        let opcode = &ops[which % ops.len()];
        code.extend_from_slice(opcode);
        code.extend_from_slice(&tail);
        if let (Ok(i), Some(n)) = (decode(&code, long, def32), yax_len(&code, long, def32)) {
            // yaxpeax-x86 2.2 ignores 66 on E8 (and E9, Jcc) outside 64-bit mode: the
            // default size's rel; the SDM has the other (E8 cw / cd), and so do we.
            // (The opcode is the decoded one: a prefix drawn as the opcode moves it
            // into the tail.)
            let near_rel = (i.map == Map::One && (i.op == 0xe8 || i.op == 0xe9))
                || (i.map == Map::Two && (0x80..=0x8f).contains(&i.op));
            if !(near_rel && !long && i.opsize != if def32 { 4 } else { 2 }) {
                proptest::prop_assert_eq!(usize::from(i.len), n, "{:x?} long {} def32 {}", code, long, def32);
            }
        }
    }
}

#[test]
fn string_port_io() {
    // rep insw with cx = 2 into es:[di], 16-bit code; the second port read is not
    // answered yet: Retry, nothing changes.
    let mut env = TestEnv::flat32();
    env.ins = std::vec![0x1234];
    let mut r = regs(&[(7, 0x500), (1, 2), (2, 0x3f8)]);
    assert_eq!(run(&[0xf3, 0x6d], &M16, &mut r, &mut env), Ok(Done::Repeat));
    assert_eq!((env.get(0x500, 2), r.gpr[7], r.gpr[1]), (0x1234, 0x502, 1));
    let before = r;
    assert_eq!(run(&[0xf3, 0x6d], &M16, &mut r, &mut env), Err(Stop::Retry));
    assert_eq!(r, before);
    env.ins.push(0x5678);
    assert_eq!(run(&[0xf3, 0x6d], &M16, &mut r, &mut env), Ok(Done::Next));
    assert_eq!((env.get(0x502, 2), r.rip), (0x5678, 0x102));
    // outsb from fs:[esi] (64-bit mode), DF set: ESI goes down.
    let mut env = TestEnv::flat64();
    env.segs[SegReg::Fs as usize].base = 0x9000;
    env.put(0x9010, &[0x77]);
    let mut r = regs(&[(6, 0x10), (2, 0x80)]);
    r.rflags |= 1 << 10;
    run(&[0x64, 0x6e], &M64, &mut r, &mut env).unwrap();
    assert_eq!(env.outs, std::vec![(0x80, 1, 0x77)]);
    assert_eq!(r.gpr[6], 0xf);
    // insd into a read-only segment: #GP(0) before the port is read.
    let mut env = TestEnv::flat32();
    env.segs[SegReg::Es as usize].ar = 0xc091;
    env.ins = std::vec![1];
    let mut r = regs(&[(7, 0x500)]);
    assert_eq!(
        run(&[0x6d], &M32, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
    assert_eq!(env.ins.len(), 1);
}

#[test]
fn vector_moves() {
    let mut env = TestEnv::flat64();
    let bytes: Vec<u8> = (1..=32).collect();
    env.put(DATA, &bytes);
    env.vregs[1] = [0xee; 32];
    // movdqu xmm1, [rdi]: bits 255:128 stay.
    let mut r = regs(&[(7, DATA)]);
    run(&[0xf3, 0x0f, 0x6f, 0x0f], &M64, &mut r, &mut env).unwrap();
    assert_eq!(&env.vregs[1][..16], &bytes[..16]);
    assert_eq!(env.vregs[1][16..], [0xee; 16]);
    // movss xmm1, [rdi]: bits 127:32 clear.
    r.rip = 0x100;
    run(&[0xf3, 0x0f, 0x10, 0x0f], &M64, &mut r, &mut env).unwrap();
    assert_eq!(&env.vregs[1][..4], &bytes[..4]);
    assert_eq!(env.vregs[1][4..16], [0; 12]);
    assert_eq!(env.vregs[1][16..], [0xee; 16]);
    // vmovdqu ymm2, [rdi] (C5 FE 6F 17); vmovd xmm3, [rdi] (C5 F9 6E 1F) clears 255:32.
    env.vregs[3] = [0xee; 32];
    r.rip = 0x100;
    run(&[0xc5, 0xfe, 0x6f, 0x17], &M64, &mut r, &mut env).unwrap();
    assert_eq!(&env.vregs[2][..], &bytes[..]);
    r.rip = 0x100;
    run(&[0xc5, 0xf9, 0x6e, 0x1f], &M64, &mut r, &mut env).unwrap();
    assert_eq!(&env.vregs[3][..4], &bytes[..4]);
    assert_eq!(env.vregs[3][4..], [0; 28]);
    // movq [rdi+8], xmm2 (66 0F D6 57 08); movntdq needs 16-byte alignment.
    r.rip = 0x100;
    run(&[0x66, 0x0f, 0xd6, 0x57, 0x08], &M64, &mut r, &mut env).unwrap();
    assert_eq!(
        env.get(DATA + 8, 8),
        u64::from_le_bytes(bytes[..8].try_into().unwrap())
    );
    let mut r = regs(&[(7, DATA + 8)]);
    assert_eq!(
        run(&[0x66, 0x0f, 0xe7, 0x0f], &M64, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
    // SSE off: #UD; CR0.TS: #NM; VEX with vvvv != 1111b: #UD; VEX.L with MOVD: #UD.
    let no_sse = Mode { sse: false, ..M64 };
    assert_eq!(
        run(&[0x0f, 0x10, 0x0f], &no_sse, &mut r, &mut env),
        Err(Stop::Exception(Exception::UD))
    );
    let ts = Mode { ts: true, ..M64 };
    assert_eq!(
        run(&[0x0f, 0x10, 0x0f], &ts, &mut r, &mut env),
        Err(Stop::Exception(Exception::NM))
    );
    assert_eq!(
        run(&[0xc5, 0xf6, 0x6f, 0x17], &M64, &mut r, &mut env),
        Err(Stop::Exception(Exception::UD))
    );
    assert_eq!(
        run(&[0xc5, 0xfd, 0x6e, 0x1f], &M64, &mut r, &mut env),
        Err(Stop::Exception(Exception::UD))
    );
    // A legacy prefix before VEX: #UD.
    assert_eq!(
        run(&[0x66, 0xc5, 0xf9, 0x6e, 0x1f], &M64, &mut r, &mut env),
        Err(Stop::Exception(Exception::UD))
    );
    // In 32-bit code C5 with a memory ModRM is LDS, not VEX.
    let lds = decode(&[0xc5, 0x07], false, true).unwrap();
    assert_eq!((lds.op, lds.vex, lds.len), (0xc5, None, 2));
    assert!(lds.mem().is_some());
}

/// A hostile guest chooses every byte, register, segment and mode: the emulator
/// never panics (this crate is built with overflow checks in the kernel and in
/// tests), and a failed instruction changes no register and commits no write.
fn hostile_case(
    code: &[u8],
    gpr: [u64; 16],
    rflags: u64,
    rip: u64,
    segs: [(u64, u32, u32); 6],
    mode_bits: u8,
    absent: u64,
) {
    let mut env = TestEnv::flat64();
    for (s, &(base, limit, ar)) in env.segs.iter_mut().zip(segs.iter()) {
        s.base = base;
        s.limit = limit;
        s.ar = ar;
    }
    env.absent.push(absent >> 12);
    env.absent.push(gpr[7] >> 12);
    // Descriptor tables and an IVT where the guest says, holding guest-chosen bytes.
    let [(gb, gl, _), (ib, il, _), (lb, ll, la), (tb, tl, ta), ..] = segs;
    env.ctl.gdtr = (gb, gl as u16);
    env.ctl.idtr = (ib, il as u16);
    env.ctl.ldtr = Seg {
        selector: 4,
        base: lb,
        limit: ll,
        ar: la,
    };
    env.ctl.tr = Seg {
        selector: 8,
        base: tb,
        limit: tl,
        ar: ta,
    };
    for (k, base) in [gb, ib, lb, tb].into_iter().enumerate() {
        let bytes: Vec<u8> = code.iter().cycle().skip(k).take(0x68).copied().collect();
        env.put(base, &bytes);
        env.put(
            base.wrapping_add(u64::from(gpr[0] as u16 & !7)),
            &bytes[..8],
        );
    }
    let mode = Mode {
        long: mode_bits & 1 != 0,
        def32: mode_bits & 2 != 0,
        stack32: mode_bits & 4 != 0,
        protected: mode_bits & 8 != 0,
        cpl: mode_bits >> 4 & 3,
        align_check: mode_bits & 64 != 0,
        la57: mode_bits & 128 != 0,
        sse: absent & 1 != 0,
        avx: absent & 2 != 0,
        ts: absent & 4 != 0,
    };
    let mut r = Regs { gpr, rip, rflags };
    let before = r;
    match emulate(code, &mode, &mut r, &mut env) {
        Ok(_) => {}
        Err(_) => {
            assert_eq!(r, before);
        }
    }
    // An instruction decoded in another mode than it runs in (a replay after the mode
    // changed under it): no panic either.
    env.pending_sys = None;
    env.pending_segs.clear();
    if let Ok(insn) = decode(code, !mode.long, !mode.def32) {
        let mut r = before;
        if execute(&insn, &mode, &mut r, &mut env).is_err() {
            assert_eq!(r, before);
        }
    }
    // A task switch to the selector in AX, from every source, and real-mode event
    // delivery: never a panic, and nothing changed when they fail.
    let sources = [
        TaskSource::Call,
        TaskSource::Iret,
        TaskSource::Jmp,
        TaskSource::Gate(Some(gpr[1] as u32)),
    ];
    env.pending_sys = None;
    env.pending_segs.clear();
    let mut r = before;
    let source = sources[usize::from(mode_bits) % sources.len()];
    if task_switch(gpr[0] as u16, source, &mode, &mut r, &mut env).is_err() {
        assert_eq!(r, before);
    }
    let mut r = before;
    if real_mode_interrupt(code[0], &mode, &mut r, &mut env).is_err() {
        assert_eq!(r, before);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(20_000))]
    #[test]
    fn hostile_instructions_never_panic(
        prefix in proptest::collection::vec(proptest::sample::select(
            &[0x66u8, 0x67, 0xf0, 0xf2, 0xf3, 0x26, 0x64, 0x65, 0x48, 0x41, 0x4f, 0x0f, 0x38][..]), 0..5),
        op in proptest::num::u8::ANY,
        tail in proptest::collection::vec(proptest::num::u8::ANY, 0..16),
        gpr in proptest::array::uniform16(proptest::prop_oneof![
            proptest::num::u64::ANY, 0u64..0x10000, proptest::strategy::Just(u64::MAX),
            proptest::strategy::Just(1u64 << 63)]),
        rflags in proptest::num::u64::ANY,
        rip in proptest::num::u64::ANY,
        segs in proptest::array::uniform6((proptest::num::u64::ANY, proptest::num::u32::ANY, proptest::num::u32::ANY)),
        mode_bits in proptest::num::u8::ANY,
        absent in proptest::num::u64::ANY,
    ) {
        let mut code = prefix;
        code.push(op);
        code.extend_from_slice(&tail);
        hostile_case(&code, gpr, rflags, rip, segs, mode_bits, absent);
    }
}

proptest::proptest! {
    /// VEX-encoded moves (C5 and C4 prefixes, random fields): where yaxpeax-x86 decodes
    /// the bytes, the length agrees.
    #[test]
    fn vex_lengths_agree_with_yaxpeax(
        three in proptest::bool::ANY,
        b1 in proptest::num::u8::ANY,
        b2 in proptest::num::u8::ANY,
        op in proptest::sample::select(&[0x10u8, 0x11, 0x28, 0x29, 0x2b, 0x6e, 0x6f, 0x7e, 0x7f, 0xd6, 0xe7][..]),
        tail in proptest::collection::vec(proptest::num::u8::ANY, 12),
        long in proptest::bool::ANY,
    ) {
        let mut code = if three {
            std::vec![0xc4, (b1 & 0xe0) | 1, b2]
        } else {
            std::vec![0xc5, b1]
        };
        if !long {
            code[1] |= 0xc0;
        }
        code.push(op);
        code.extend_from_slice(&tail);
        if let (Ok(i), Some(n)) = (decode(&code, long, true), yax_len(&code, long, true)) {
            proptest::prop_assert_eq!(usize::from(i.len), n, "{:x?} long {}", code, long);
        }
    }
}

#[test]
fn the_vex_oracle_decodes_vex() {
    // The property above compares lengths only where both decode: make sure that is
    // not vacuous.
    let code = [0xc4, 0xe1, 0xfe, 0x6f, 0x84, 0x24, 0x00, 0x01, 0x00, 0x00];
    assert_eq!(yax_len(&code, true, false), Some(10));
    assert_eq!(decode(&code, true, false).map(|i| i.len), Ok(10));
}

/// For callgrind (`RVMM_EMU_LOOPS=n`): the instruction cost of decoding and carrying
/// out `mov eax, [rdi]` with a minimal environment (an MMIO load's work per run).
#[test]
#[ignore]
fn cost_probe_mmio_load() {
    struct Flat;
    impl Env for Flat {
        fn segment(&mut self, _: SegReg) -> Seg {
            Seg::default()
        }
        fn read(&mut self, _: u64, buf: &mut [u8]) -> Result<(), Stop> {
            buf.fill(7);
            Ok(())
        }
        fn write(&mut self, _: u64, _: &[u8]) -> Result<(), Stop> {
            Ok(())
        }
        fn port_in(&mut self, _: u16, _: u8) -> Result<u64, Stop> {
            Ok(0)
        }
        fn port_out(&mut self, _: u16, _: u8, _: u64) -> Result<(), Stop> {
            Ok(())
        }
        fn vreg(&mut self, _: u8) -> [u8; 32] {
            [0; 32]
        }
        fn set_vreg(&mut self, _: u8, _: [u8; 32]) {}
    }
    let loops: usize = std::env::var("RVMM_EMU_LOOPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let mut env = Flat;
    for _ in 0..loops {
        let mut r = regs(&[(7, DATA)]);
        let d = emulate(core::hint::black_box(&[0x8b, 0x07]), &M64, &mut r, &mut env);
        assert_eq!(d.map(|x| x.1), Ok(Done::Next));
    }
}
