// SPDX-License-Identifier: GPL-2.0

//! Real-mode code, mode switches and system instructions: the interrupt vector table,
//! far transfers in real and protected mode, segment loads with their checks, the
//! control registers and descriptor tables, and the privilege checks.

use super::*;

const REAL: Mode = Mode {
    protected: false,
    cpl: 0,
    ..M16
};
/// 16-bit protected mode at CPL 0 (the instructions right after CR0.PE is set).
const PM16: Mode = Mode {
    protected: true,
    cpl: 0,
    ..M16
};
const VM86: Mode = Mode {
    protected: false,
    cpl: 3,
    ..M16
};

/// Real-mode segments (selector 0, 64 KiB, data read/write; CS code) and an IVT at 0.
fn real_env() -> TestEnv {
    let mut e = TestEnv::default();
    for s in e.segs.iter_mut() {
        *s = Seg {
            selector: 0,
            base: 0,
            limit: 0xffff,
            ar: 0x93,
        };
    }
    e.segs[SegReg::Cs as usize].ar = 0x9b;
    e.ctl.idtr = (0, 0x3ff);
    e
}

fn set_seg(e: &mut TestEnv, s: SegReg, sel: u16) {
    let seg = &mut e.segs[s as usize];
    seg.selector = sel;
    seg.base = u64::from(sel) << 4;
}

#[test]
fn int_and_iret_through_the_ivt() {
    let mut env = real_env();
    set_seg(&mut env, SegReg::Cs, 0x100);
    // IVT entry 0x10: 1234:5678.
    env.put(0x40, &[0x78, 0x56, 0x34, 0x12]);
    let mut r = regs(&[(4, 0x8000)]);
    r.rip = 0x20;
    r.rflags = 0x2 | 0x200 | 0x100 | CF;
    run(&[0xcd, 0x10], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(r.rip, 0x5678);
    assert_eq!(env.segs[SegReg::Cs as usize].selector, 0x1234);
    assert_eq!(env.segs[SegReg::Cs as usize].base, 0x12340);
    assert_eq!(r.rflags, 0x2 | CF, "IF and TF cleared, CF kept");
    assert_eq!(r.gpr[4], 0x7ffa);
    assert_eq!(env.get(0x7ffa, 2), 0x22, "return IP past INT");
    assert_eq!(env.get(0x7ffc, 2), 0x100);
    assert_eq!(env.get(0x7ffe, 2), 0x302 | CF);
    // IRET: back at 0100:0022 with the flags.
    run(&[0xcf], &REAL, &mut r, &mut env).unwrap();
    assert_eq!((r.rip, r.gpr[4]), (0x22, 0x8000));
    assert_eq!(env.segs[SegReg::Cs as usize].selector, 0x100);
    assert_eq!(r.rflags, 0x302 | CF);
    // INT3 and INTO (with OF; without it INTO does nothing).
    env.put(0xc, &[0x00, 0x01, 0x00, 0x02]);
    r.rflags = 2;
    run(&[0xce], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(r.rip, 0x23);
    run(&[0xcc], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(
        (r.rip, env.segs[SegReg::Cs as usize].selector),
        (0x100, 0x200)
    );
    assert_eq!(env.get(u64::from(r.gpr[4] as u16), 2), 0x24);
    // A vector beyond the IVT's limit: #GP(0), nothing pushed.
    env.ctl.idtr = (0, 0x3f);
    let sp = r.gpr[4];
    assert_eq!(
        run(&[0xcd, 0x10], &REAL, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
    assert_eq!(r.gpr[4], sp);
}

#[test]
fn real_mode_interrupt_delivers_an_event() {
    let mut env = real_env();
    env.put(0x20 * 4, &[0x00, 0x10, 0x00, 0xf0]);
    let mut r = regs(&[(4, 0x100)]);
    r.rip = 0x1234;
    r.rflags = 0x202;
    real_mode_interrupt(0x20, &REAL, &mut r, &mut env).unwrap();
    env.commit();
    assert_eq!((r.rip, r.gpr[4], r.rflags), (0x1000, 0xfa, 2));
    assert_eq!(env.segs[SegReg::Cs as usize].base, 0xf0000);
    assert_eq!(
        env.get(0xfa, 2),
        0x1234,
        "returns to the interrupted instruction"
    );
}

#[test]
fn unreal_mode_keeps_the_limit() {
    // A 4-GiB DS limit set in protected mode stays through real-mode loads of DS.
    let mut env = real_env();
    env.segs[SegReg::Ds as usize].limit = 0xffff_ffff;
    let mut r = regs(&[(0, 0x2000)]);
    run(&[0x8e, 0xd8], &REAL, &mut r, &mut env).unwrap(); // mov ds, ax
    let ds = env.segs[SegReg::Ds as usize];
    assert_eq!(
        (ds.selector, ds.base, ds.limit),
        (0x2000, 0x20000, 0xffff_ffff)
    );
    // mov eax, [esi] with ESI = 0x100000 (67 prefix): beyond 64 KiB.
    env.put(0x120000, &[1, 2, 3, 4]);
    r.gpr[6] = 0x10_0000;
    run(&[0x67, 0x66, 0x8b, 0x06], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(r.gpr[0], 0x0403_0201);
    // With a 64-KiB limit the same access is #GP(0).
    env.segs[SegReg::Ds as usize].limit = 0xffff;
    assert_eq!(
        run(&[0x67, 0x66, 0x8b, 0x06], &REAL, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
    // In virtual-8086 mode a load gives 64 KiB, DPL 3.
    let mut env = real_env();
    env.segs[SegReg::Ds as usize].limit = 0xffff_ffff;
    run(&[0x8e, 0xd8], &VM86, &mut r, &mut env).unwrap();
    let ds = env.segs[SegReg::Ds as usize];
    assert_eq!((ds.limit, ds.ar), (0xffff, 0xf3));
    // MOV SS blocks interrupts for one instruction; MOV CS is #UD.
    run(&[0x8e, 0xd0], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(env.shadow, Some(true));
    assert_eq!(
        run(&[0x8e, 0xc8], &REAL, &mut r, &mut env),
        Err(Stop::Exception(Exception::UD))
    );
}

/// A GDT at 0x800: null, 16-bit code (base 0x10000), 32-bit flat code, flat data,
/// a DPL-3 data segment, a not-present code segment, a TSS.
fn gdt(env: &mut TestEnv) {
    let descs: [u64; 7] = [
        0,
        0x0000_9a01_0000_ffff,
        0x00cf_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00cf_f200_0000_ffff,
        0x00cf_1a00_0000_ffff,
        0x0000_8900_1000_0067,
    ];
    for (k, d) in descs.iter().enumerate() {
        env.put(0x800 + 8 * k as u64, &d.to_le_bytes());
    }
    env.ctl.gdtr = (0x800, 8 * descs.len() as u16 - 1);
}

#[test]
fn protected_mode_far_jump_and_segment_loads() {
    let mut env = real_env();
    gdt(&mut env);
    set_seg(&mut env, SegReg::Cs, 0x1000);
    // jmp 0x10:0x12345678 (66 EA, from 16-bit code): CS from the GDT, accessed.
    let mut r = regs(&[]);
    run(
        &[0x66, 0xea, 0x78, 0x56, 0x34, 0x12, 0x10, 0x00],
        &PM16,
        &mut r,
        &mut env,
    )
    .unwrap();
    let cs = env.segs[SegReg::Cs as usize];
    assert_eq!(
        (cs.selector, cs.base, cs.limit, cs.ar),
        (0x10, 0, 0xffff_ffff, 0xc09b)
    );
    assert_eq!(r.rip, 0x1234_5678);
    assert_eq!(
        env.get(0x800 + 0x10 + 5, 1),
        0x9b,
        "accessed bit set in the GDT"
    );
    // A far jump to a data segment: #GP(sel); not present: #NP(sel); null: #GP(0);
    // beyond the GDT: #GP(sel); to a TSS (a task switch): not emulated.
    let jmp = |sel: u16| [0xea, 0, 0, sel as u8, (sel >> 8) as u8];
    let cases = [
        (0x18, Stop::Exception(Exception::gp(0x18))),
        (0x28, Stop::Exception(Exception::np(0x28))),
        (0x0, Stop::Exception(Exception::GP0)),
        (0x40, Stop::Exception(Exception::gp(0x40))),
        (0x30, Stop::Unsupported(0xea)),
    ];
    for (sel, want) in cases {
        let mut r = regs(&[]);
        assert_eq!(
            run(&jmp(sel), &PM16, &mut r, &mut env),
            Err(want),
            "sel {sel:#x}"
        );
    }
    // Beyond the 16-bit code segment's limit: #GP(0).
    let mut r = regs(&[]);
    assert_eq!(
        run(&[0x66, 0xea, 0, 0, 1, 0, 0x08, 0], &PM16, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
    // mov ds, ax: flat data; DPL-3 data at CPL 0 is fine for DS, not for SS; a null
    // selector makes DS unusable and SS #GP(0); code for DS: not readable = #GP.
    let mut r = regs(&[(0, 0x18)]);
    run(&[0x8e, 0xd8], &PM16, &mut r, &mut env).unwrap();
    assert_eq!(env.segs[SegReg::Ds as usize].ar, 0xc093);
    r.gpr[0] = 0x20;
    run(&[0x8e, 0xd8], &PM16, &mut r, &mut env).unwrap();
    assert_eq!(
        run(&[0x8e, 0xd0], &PM16, &mut r, &mut env),
        Err(Stop::Exception(Exception::gp(0x20)))
    );
    r.gpr[0] = 0;
    run(&[0x8e, 0xe0], &PM16, &mut r, &mut env).unwrap();
    assert_eq!(env.segs[SegReg::Fs as usize].ar, 1 << 16);
    assert_eq!(
        run(&[0x8e, 0xd0], &PM16, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
    // RPL 3 selector of a DPL-0 segment: #GP(sel).
    r.gpr[0] = 0x1b;
    assert_eq!(
        run(&[0x8e, 0xd8], &PM16, &mut r, &mut env),
        Err(Stop::Exception(Exception::gp(0x18)))
    );
}

#[test]
fn real_mode_far_transfers() {
    let mut env = real_env();
    set_seg(&mut env, SegReg::Cs, 0x1000);
    let mut r = regs(&[(4, 0x8000)]);
    r.rip = 0x10;
    // call 0x2000:0x0030, then retf.
    run(&[0x9a, 0x30, 0x00, 0x00, 0x20], &REAL, &mut r, &mut env).unwrap();
    assert_eq!((r.rip, env.segs[SegReg::Cs as usize].base), (0x30, 0x20000));
    assert_eq!(env.get(0x7ffc, 4), 0x1000_0015);
    run(&[0xcb], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(
        (r.rip, r.gpr[4], env.segs[SegReg::Cs as usize].selector),
        (0x15, 0x8000, 0x1000)
    );
    // jmp far [bx]: m16:16.
    env.put(0x500, &[0x40, 0x00, 0x00, 0x30]);
    r.gpr[3] = 0x500;
    run(&[0xff, 0x2f], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(
        (r.rip, env.segs[SegReg::Cs as usize].selector),
        (0x40, 0x3000)
    );
    // lds si, [bx]
    run(&[0xc5, 0x37], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(
        (r.gpr[6], env.segs[SegReg::Ds as usize].base),
        (0x40, 0x30000)
    );
}

#[test]
fn control_registers_and_tables() {
    let mut env = real_env();
    env.ctl.cr[0] = 0x10;
    let mut r = regs(&[(0, 0x8000_0011)]);
    // mov cr0, eax (0F 22 C0); mov ebx, cr0 (0F 20 C3): mod bits ignored (0F 20 03).
    run(&[0x0f, 0x22, 0xc0], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(env.sys, std::vec![SysWrite::Cr(0, 0x8000_0011)]);
    run(&[0x0f, 0x20, 0x03], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(r.gpr[3], 0x8000_0011);
    // mov cr1 and cr5: #UD.
    assert_eq!(
        run(&[0x0f, 0x22, 0xc8], &REAL, &mut r, &mut env),
        Err(Stop::Exception(Exception::UD))
    );
    // lmsw ax cannot clear PE; clts clears TS.
    r.gpr[0] = 0xfff0;
    run(&[0x0f, 0x01, 0xf0], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(env.ctl.cr[0], 0x8000_0011);
    env.ctl.cr[0] = 0x19;
    run(&[0x0f, 0x06], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(env.ctl.cr[0], 0x11);
    // lgdt [bx] with a 16-bit operand: a 24-bit base; with 66, 32 bits.
    env.put(0x600, &[0x27, 0x00, 0x11, 0x22, 0x33, 0x44]);
    r.gpr[3] = 0x600;
    run(&[0x0f, 0x01, 0x17], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(env.ctl.gdtr, (0x33_2211, 0x27));
    run(&[0x66, 0x0f, 0x01, 0x1f], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(env.ctl.idtr, (0x4433_2211, 0x27));
    // sidt [bx+si] stores the limit and a 32-bit base.
    r.gpr[6] = 0x100;
    run(&[0x0f, 0x01, 0x08], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(env.get(0x700, 6), 0x4433_2211_0027);
    // At CPL 3 (protected mode) they are #GP(0); SGDT and SMSW are not privileged.
    let pm3 = Mode { cpl: 3, ..M32 };
    let mut env = TestEnv::flat32();
    env.ctl.cr[0] = 0x8000_0033;
    let mut r = regs(&[(3, 0x600)]);
    for code in [
        &[0x0f, 0x22, 0xc0][..],
        &[0x0f, 0x01, 0x13],
        &[0x0f, 0x06],
        &[0xf4],
        &[0x0f, 0x30],
        &[0x0f, 0x32],
        &[0x0f, 0x09],
    ] {
        assert_eq!(
            run(code, &pm3, &mut r, &mut env),
            Err(Stop::Exception(Exception::GP0)),
            "{code:x?}"
        );
    }
    run(&[0x0f, 0x01, 0x03], &pm3, &mut r, &mut env).unwrap();
    run(&[0x0f, 0x01, 0xe0], &pm3, &mut r, &mut env).unwrap();
    assert_eq!(r.gpr[0], 0x8000_0033);
    assert!(env.sys.is_empty());
}

#[test]
fn msrs_cpuid_halt_and_ports() {
    let mut env = real_env();
    env.msrs.insert(0x1b, 0xfee0_0900);
    let mut r = regs(&[(1, 0x1b)]);
    run(&[0x0f, 0x32], &REAL, &mut r, &mut env).unwrap();
    assert_eq!((r.gpr[0], r.gpr[2]), (0xfee0_0900, 0));
    r.gpr[1] = 0x10;
    assert_eq!(
        run(&[0x0f, 0x32], &REAL, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
    r.gpr[0] = 0x1122_3344;
    r.gpr[2] = 0x55;
    run(&[0x0f, 0x30], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(env.msrs.get(&0x10), Some(&0x55_1122_3344));
    r.gpr[0] = 7;
    r.gpr[1] = 1;
    run(&[0x0f, 0xa2], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(
        (r.gpr[0], r.gpr[3], r.gpr[1], r.gpr[2]),
        (7, 1, 0xffff_fff8, 0xffff_fffe)
    );
    run(&[0xf4], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(env.sys.last(), Some(&SysWrite::Halt));
    // in al, 0x60; out dx, ax; in eax, dx.
    env.ins = std::vec![0xab, 0x1234_5678];
    r.gpr[0] = 0xffff_ffff;
    run(&[0xe4, 0x60], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(r.gpr[0], 0xffff_ffab);
    r.gpr[2] = 0x3f8;
    run(&[0xef], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(env.outs, std::vec![(0x3f8, 2, 0xffab)]);
    run(&[0x66, 0xed], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(r.gpr[0], 0x1234_5678);
    // Protected mode above IOPL: the CPU would read the TSS's I/O bitmap; not emulated.
    let pm3 = Mode { cpl: 3, ..M32 };
    assert_eq!(
        run(&[0xe4, 0x60], &pm3, &mut r, &mut env),
        Err(Stop::Unsupported(0xe4))
    );
}

#[test]
fn flags_instructions_and_privilege() {
    let mut env = real_env();
    let mut r = regs(&[(4, 0x8000)]);
    r.rflags = 2;
    run(&[0xfb], &REAL, &mut r, &mut env).unwrap(); // sti
    assert_eq!((r.rflags, env.shadow), (0x202, Some(false)));
    run(&[0xfb], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(env.shadow, None, "STI with IF set blocks nothing");
    run(&[0xfa, 0xf9], &REAL, &mut r, &mut env).unwrap(); // cli
    run(&[0xf9], &REAL, &mut r, &mut env).unwrap(); // stc
    run(&[0xfd], &REAL, &mut r, &mut env).unwrap(); // std
    assert_eq!(r.rflags, 0x403);
    // pushf; popf of 0x3fff: IOPL and NT are changeable in real mode at CPL 0.
    run(&[0x9c], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(env.get(0x7ffe, 2), 0x403);
    env.put(0x7ffe, &[0xff, 0x7f]);
    run(&[0x9d], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(r.rflags, 0x7fd7);
    // In protected mode at CPL 3 with IOPL 0: CLI is #GP, POPF keeps IF and IOPL.
    let pm3 = Mode { cpl: 3, ..M32 };
    let mut env = TestEnv::flat32();
    let mut r = regs(&[(4, 0x8000)]);
    r.rflags = 0x202;
    assert_eq!(
        run(&[0xfa], &pm3, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
    env.put(0x7ffc, &0x3000u32.to_le_bytes());
    r.gpr[4] = 0x7ffc;
    run(&[0x9d], &pm3, &mut r, &mut env).unwrap();
    assert_eq!(r.rflags, 0x202);
    // Virtual-8086 mode with IOPL < 3: PUSHF, POPF, CLI, STI, INT and IRET are #GP.
    let mut env = real_env();
    let mut r = regs(&[(4, 0x8000)]);
    for code in [&[0x9c][..], &[0x9d], &[0xfa], &[0xfb], &[0xcf]] {
        assert_eq!(
            run(code, &VM86, &mut r, &mut env),
            Err(Stop::Exception(Exception::GP0)),
            "{code:x?}"
        );
    }
    // SAHF/LAHF.
    let mut r = regs(&[(0, 0xd700)]);
    run(&[0x9e], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(r.rflags, 0xd7);
    r.gpr[0] = 0;
    run(&[0x9f], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(r.gpr[0], 0xd700);
}

#[test]
fn branches_loops_and_register_forms() {
    let mut env = real_env();
    let mut r = regs(&[(1, 3)]);
    r.rip = 0xfff0;
    // loop -2 with a 16-bit IP: wraps inside the segment.
    run(&[0xe2, 0x20], &REAL, &mut r, &mut env).unwrap();
    assert_eq!((r.rip, r.gpr[1]), (0x12, 2));
    // jcxz taken when CX is 0 (ECX's upper half ignored with a 16-bit address size).
    r.gpr[1] = 0x1_0000;
    r.rip = 0x100;
    run(&[0xe3, 0x10], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(r.rip, 0x112);
    // jz rel16 (0F 84) not taken, then jnz rel8 taken backwards.
    r.rflags = 2;
    run(&[0x0f, 0x84, 0x00, 0x10], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(r.rip, 0x116);
    run(&[0x75, 0xfe], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(r.rip, 0x116);
    // jmp rel16 beyond CS's limit: #GP(0).
    env.segs[SegReg::Cs as usize].limit = 0x1000;
    assert_eq!(
        run(&[0xe9, 0x00, 0x20], &REAL, &mut r, &mut env),
        Err(Stop::Exception(Exception::GP0))
    );
    // mov ax, imm16; mov ah, imm8; mov ebx, imm32; lea si, [bx+di+4]; xchg ax, cx.
    let mut r = regs(&[(7, 0x10)]);
    run(&[0xb8, 0x34, 0x12], &REAL, &mut r, &mut env).unwrap();
    run(&[0xb4, 0x56], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(r.gpr[0], 0x5634);
    run(
        &[0x66, 0xbb, 0x78, 0x56, 0x34, 0x12],
        &REAL,
        &mut r,
        &mut env,
    )
    .unwrap();
    run(&[0x8d, 0x71, 0x04], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(r.gpr[6], 0x568c);
    run(&[0x91], &REAL, &mut r, &mut env).unwrap();
    assert_eq!((r.gpr[0], r.gpr[1]), (0, 0x5634));
    // inc ax with ZF from the wrap, CF kept; cwd; cbw.
    r.gpr[0] = 0xffff;
    r.rflags = 2 | CF;
    run(&[0x40], &REAL, &mut r, &mut env).unwrap();
    assert_eq!((r.gpr[0], r.rflags & (ZF | CF)), (0, ZF | CF));
    r.gpr[0] = 0x80;
    run(&[0x98], &REAL, &mut r, &mut env).unwrap();
    run(&[0x99], &REAL, &mut r, &mut env).unwrap();
    assert_eq!((r.gpr[0], r.gpr[2]), (0xff80, 0xffff));
    // pusha / popa round trip; leave; xlat.
    let mut r = regs(&[
        (0, 1),
        (1, 2),
        (2, 3),
        (3, 4),
        (4, 0x8000),
        (5, 6),
        (6, 7),
        (7, 8),
    ]);
    let before = r;
    run(&[0x60], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(env.get(0x7ff6, 2), 0x8000, "the SP before PUSHA");
    r.gpr[0] = 0;
    run(&[0x61], &REAL, &mut r, &mut env).unwrap();
    assert_eq!((r.gpr, r.rip), (before.gpr, before.rip + 2));
    env.put(0x105, &[0x42]);
    r.gpr[3] = 0x100;
    r.gpr[0] = 5;
    run(&[0xd7], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(r.gpr[0], 0x42);
    env.put(0x7000, &[0x99, 0x88]);
    r.gpr[5] = 0x7000;
    run(&[0xc9], &REAL, &mut r, &mut env).unwrap();
    assert_eq!((r.gpr[4], r.gpr[5]), (0x7002, 0x8899));
    // push es / pop ds.
    set_seg(&mut env, SegReg::Es, 0x1234);
    run(&[0x06], &REAL, &mut r, &mut env).unwrap();
    run(&[0x1f], &REAL, &mut r, &mut env).unwrap();
    assert_eq!(env.segs[SegReg::Ds as usize].base, 0x12340);
}

/// A GDT at 0x800 with flat code (0x08) and data (0x10) and two 32-bit TSSs: A at
/// 0x2000 (0x18, busy: the current task) and B at 0x3000 (0x20, available), with B's
/// state filled in; TR is A.
fn two_tasks() -> TestEnv {
    let mut env = TestEnv::flat32();
    let descs: [u64; 5] = [
        0,
        0x00cf_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x0000_8b00_2000_0067,
        0x0000_8900_3000_0067,
    ];
    for (k, d) in descs.iter().enumerate() {
        env.put(0x800 + 8 * k as u64, &d.to_le_bytes());
    }
    env.ctl.gdtr = (0x800, 8 * descs.len() as u16 - 1);
    env.segs[SegReg::Cs as usize].selector = 0x08;
    env.ctl.tr = Seg {
        selector: 0x18,
        base: 0x2000,
        limit: 0x67,
        ar: 0x8b,
    };
    let b = 0x3000u64;
    let fields: [(u64, u32); 12] = [
        (0x1c, 0x0012_3000),
        (0x20, 0x5000),
        (0x24, 0x202),
        (0x28, 0xaaaa),
        (0x38, 0x9000),
        (0x44, 0xdddd),
        (0x48, 0x10),
        (0x4c, 0x08),
        (0x50, 0x10),
        (0x54, 0x10),
        (0x58, 0),
        (0x5c, 0),
    ];
    for (off, v) in fields {
        env.put(b + off, &v.to_le_bytes());
    }
    env
}

fn tss_type(env: &TestEnv, sel: u64) -> u64 {
    env.get(0x800 + sel + 5, 1) & 0xf
}

#[test]
fn task_call_and_iret_back() {
    let mut env = two_tasks();
    let mut r = regs(&[(3, 0x1111), (4, 0x7000)]);
    r.rip = 0x10_0007; // past the CALL
    r.rflags = 0x246;
    let load = task_switch(0x20, TaskSource::Call, &M32, &mut r, &mut env).unwrap();
    env.commit();
    // The old task's state in TSS A; B linked back to A, busy, and running with NT.
    assert_eq!(env.get(0x2000 + 0x20, 4), 0x10_0007);
    assert_eq!(env.get(0x2000 + 0x24, 4), 0x246);
    assert_eq!(env.get(0x2000 + 0x34, 4), 0x1111, "EBX");
    assert_eq!(env.get(0x2000 + 0x38, 4), 0x7000, "ESP");
    assert_eq!(env.get(0x2000 + 0x4c, 4), 0x08, "CS");
    assert_eq!(env.get(0x2000 + 0x50, 4), 0x10, "SS");
    assert_eq!(env.get(0x3000, 2), 0x18, "back link");
    assert_eq!((tss_type(&env, 0x18), tss_type(&env, 0x20)), (0xb, 0xb));
    assert_eq!(
        (r.rip, r.rflags, r.gpr[0], r.gpr[4], r.gpr[7]),
        (0x5000, 0x4202, 0xaaaa, 0x9000, 0xdddd)
    );
    assert_eq!(
        (load.tr.selector, load.tr.base, load.tr.ar & 0xf),
        (0x20, 0x3000, 0xb)
    );
    assert_eq!(load.cr3, 0x12_3000);
    assert_eq!(load.ldtr.ar, 1 << 16);
    assert_eq!(env.segs[SegReg::Cs as usize].selector, 0x08);
    assert_eq!(
        env.segs[SegReg::Fs as usize].ar,
        1 << 16,
        "null FS: unusable"
    );
    // IRET in B (NT set): back to A; B no longer busy, its saved EFLAGS without NT.
    env.ctl.tr = load.tr;
    r.rip = 0x5001;
    let load = task_switch(0x18, TaskSource::Iret, &M32, &mut r, &mut env).unwrap();
    env.commit();
    assert_eq!((tss_type(&env, 0x18), tss_type(&env, 0x20)), (0xb, 0x9));
    assert_eq!(env.get(0x3000 + 0x24, 4), 0x202);
    assert_eq!(env.get(0x3000 + 0x20, 4), 0x5001);
    assert_eq!(
        (r.rip, r.rflags, r.gpr[3], r.gpr[4]),
        (0x10_0007, 0x246, 0x1111, 0x7000)
    );
    assert_eq!(load.tr.selector, 0x18);
}

#[test]
fn task_jmp_gate_and_faults() {
    // JMP: the old task is no longer busy.
    let mut env = two_tasks();
    let mut r = regs(&[(4, 0x7000)]);
    task_switch(0x20, TaskSource::Jmp, &M32, &mut r, &mut env).unwrap();
    env.commit();
    assert_eq!((tss_type(&env, 0x18), tss_type(&env, 0x20)), (0x9, 0xb));
    assert_eq!(r.rflags & (1 << 14), 0, "no NT after JMP");
    // A JMP to a busy TSS and an IRET to an available one: #GP(sel).
    let mut env = two_tasks();
    let mut r = regs(&[]);
    assert_eq!(
        task_switch(0x18, TaskSource::Jmp, &M32, &mut r, &mut env),
        Err(Stop::Exception(Exception::gp(0x18)))
    );
    assert_eq!(
        task_switch(0x20, TaskSource::Iret, &M32, &mut r, &mut env),
        Err(Stop::Exception(Exception::gp(0x20)))
    );
    // From CPL 3 to a DPL-0 TSS: #GP(sel); through a gate (an interrupt) it goes.
    let pm3 = Mode { cpl: 3, ..M32 };
    assert_eq!(
        task_switch(0x20, TaskSource::Call, &pm3, &mut r, &mut env),
        Err(Stop::Exception(Exception::gp(0x20)))
    );
    assert!(env.pending.is_empty(), "nothing written");
    // An exception through a task gate: its error code on the new task's stack.
    task_switch(0x20, TaskSource::Gate(Some(0x1234)), &pm3, &mut r, &mut env).unwrap();
    env.commit();
    assert_eq!(r.gpr[4], 0x8ffc);
    assert_eq!(env.get(0x8ffc, 4), 0x1234);
    assert_eq!(r.rflags & (1 << 14), 1 << 14, "NT after a gate");
    // Not present: #NP(sel); a limit below 0x67: #TS(sel).
    let mut env = two_tasks();
    env.put(0x800 + 0x20 + 5, &[0x09]);
    assert_eq!(
        task_switch(0x20, TaskSource::Jmp, &M32, &mut r, &mut env),
        Err(Stop::Exception(Exception::np(0x20)))
    );
    let mut env = two_tasks();
    env.put(0x800 + 0x20, &[0x60, 0]);
    assert_eq!(
        task_switch(0x20, TaskSource::Jmp, &M32, &mut r, &mut env),
        Err(Stop::Exception(Exception {
            vector: 10,
            error_code: Some(0x20),
            cr2: None
        }))
    );
    // A new task whose CS is a data segment: #TS(CS).
    let mut env = two_tasks();
    env.put(0x3000 + 0x4c, &0x10u32.to_le_bytes());
    assert_eq!(
        task_switch(0x20, TaskSource::Jmp, &M32, &mut r, &mut env),
        Err(Stop::Exception(Exception {
            vector: 10,
            error_code: Some(0x10),
            cr2: None
        }))
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(5_000))]
    /// A switch to a task whose TSS, LDT and descriptors the guest filled with anything:
    /// no panic, and a refused switch changes no register and commits nothing.
    #[test]
    fn task_switch_to_a_hostile_tss(
        tss in proptest::collection::vec(proptest::num::u8::ANY, 0x68),
        descs in proptest::collection::vec(proptest::num::u64::ANY, 8),
        tr_limit in proptest::num::u32::ANY,
        which in 0usize..4,
        cpl in 0u8..4,
        gpr in proptest::array::uniform16(proptest::num::u64::ANY),
    ) {
        let mut env = two_tasks();
        env.put(0x3000, &tss);
        for (k, d) in descs.iter().enumerate() {
            env.put(0x800 + 0x28 + 8 * k as u64, &d.to_le_bytes());
        }
        env.ctl.gdtr.1 = 0x28 + 8 * 8 - 1;
        env.ctl.tr.limit = tr_limit;
        let source = [TaskSource::Call, TaskSource::Iret, TaskSource::Jmp, TaskSource::Gate(Some(7))][which];
        let mode = Mode { cpl, ..M32 };
        let mut r = Regs { gpr, rip: gpr[3], rflags: gpr[5] };
        let before = r;
        match task_switch(0x20, source, &mode, &mut r, &mut env) {
            Ok(_) => env.commit(),
            Err(_) => {
                proptest::prop_assert_eq!(r, before);
                env.pending.clear();
                env.pending_segs.clear();
            }
        }
    }
}

#[test]
fn null_ss_and_long_code_segments() {
    // MOV SS, 1 at CPL 1 in 64-bit mode: a null SS that keeps DPL 1.
    let mut env = TestEnv::flat64();
    gdt(&mut env);
    let m64cpl1 = Mode { cpl: 1, ..M64 };
    let mut r = regs(&[(0, 1)]);
    run(&[0x8e, 0xd0], &m64cpl1, &mut r, &mut env).unwrap();
    assert_eq!(env.segs[SegReg::Ss as usize].ar, 1 << 16 | 1 << 5);
    // A far JMP to a code segment with L and D set: #GP(sel).
    env.put(0x800 + 0x38, &0x00ef_9a00_0000_ffffu64.to_le_bytes());
    env.ctl.gdtr.1 = 0x3f;
    let mut r = regs(&[]);
    assert_eq!(
        run(&[0xea, 0, 0, 0, 0, 0x38, 0], &M32, &mut r, &mut env),
        Err(Stop::Exception(Exception::gp(0x38)))
    );
}
