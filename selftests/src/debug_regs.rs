// SPDX-License-Identifier: GPL-2.0

//! Debug registers as the SDM has them (Vol. 3B, 18.2): DR4/DR5 alias DR6/DR7 unless
//! CR4.DE (then #UD), and a data breakpoint raises a #DB trap with its B bit in DR6,
//! also when rvmm carries out the access (MMIO).

use crate::adversarial::{new_vcpu, run, Machine, CODE};
use crate::check;
use crate::ktap::Outcome;
use rvmm::guest::EntryMode;
use rvmm::uapi::Regs;
use rvmm::Exit;

const IDT: u64 = 0x30_0000;
const HANDLERS: u64 = 0x31_0000;
/// The #DB handler OUTs DR6 here; the others OUT their vector to `EXC_PORT`.
const DB_PORT: u16 = 0x20;
const EXC_PORT: u16 = 0xe0;
const RAM_ADDR: u64 = 0x40_0000;
const MMIO_ADDR: u64 = 0xc000_0000;
/// DR7: L0, R/W0 = 01 (writes), LEN0 = 11 (4 bytes).
const DR7_W4: u64 = 1 | (0b1101 << 16);
const CR4_DE: u64 = 1 << 3;
/// Where `rvmm::guest::setup` puts the long-mode PML4 (identity-mapped).
const PML4: u64 = rvmm::guest::PML4;

/// The guest's OUT (port, data) after `code`, or (0, 0) for a HLT, from registers
/// `set` (0 RAX, 1 RCX, 2 RDX, 3 RBX, else RDI) and CR4 | `cr4`; with the MMIO writes
/// it made before (MMIO reads read 0).
fn outcome(code: &[u8], set: &[(usize, u64)], cr4: u64) -> Result<((u16, u32), Vec<u64>), String> {
    let mut m = Machine::new(EntryMode::Long, 8 << 20)?;
    let cs = m.sregs.cs.selector;
    for n in 0..32u64 {
        let h = HANDLERS + 16 * n;
        let body: &[u8] = if n == 1 {
            // mov rax, dr6; out DB_PORT, eax; hlt
            &[0x0f, 0x21, 0xf0, 0xe7, DB_PORT as u8, 0xf4]
        } else {
            &[0xb0, n as u8, 0xe6, EXC_PORT as u8, 0xf4]
        };
        m.mem.write(h, body)?;
        let lo =
            (h & 0xffff) | (u64::from(cs) << 16) | (0x8e00u64 << 32) | ((h >> 16 & 0xffff) << 48);
        m.mem.write_u64(IDT + 16 * n, lo)?;
        m.mem.write_u64(IDT + 16 * n + 8, h >> 32)?;
    }
    m.mem.write(CODE, code)?;
    let mut sregs = m.sregs;
    sregs.idt.base = IDT;
    sregs.idt.limit = 32 * 16 - 1;
    sregs.cr4 |= cr4;
    let mut regs = Regs {
        rip: CODE,
        ..m.regs
    };
    for &(n, v) in set {
        match n {
            0 => regs.rax = v,
            1 => regs.rcx = v,
            2 => regs.rdx = v,
            3 => regs.rbx = v,
            _ => regs.rdi = v,
        }
    }
    let v = new_vcpu(&m.vm, 0, &regs, &sregs)?;
    let mut writes = Vec::new();
    for _ in 0..8 {
        match run(&v)? {
            Exit::IoOut { port, data, .. } => return Ok(((port, data), writes)),
            Exit::Hlt => return Ok(((0, 0), writes)),
            Exit::Mmio {
                is_write: true,
                data,
                ..
            } => writes.push(data),
            Exit::Mmio { .. } => v.set_mmio_data(0),
            e => return Err(format!("exit {e:?} after MMIO writes {writes:x?}")),
        }
    }
    Err("no OUT".into())
}

pub fn debug_registers_like_hardware(_: &crate::Ctx) -> Outcome {
    // mov rax, dr4; out 0x10, eax; hlt
    let dr4 = [0x0f, 0x21, 0xe0, 0xe7, 0x10, 0xf4];
    let (o, _) = outcome(&dr4, &[], 0)?;
    check(o == (0x10, 0xffff_0ff0), || {
        format!("MOV from DR4 with CR4.DE = 0 gave {o:x?}, want DR6 (0xffff0ff0)")
    })?;
    let (o, _) = outcome(&dr4, &[], CR4_DE)?;
    check(o == (EXC_PORT, 6), || {
        format!("MOV from DR4 with CR4.DE = 1 gave {o:x?}, want #UD")
    })?;
    // mov dr6, rdx (0); mov dr0, rax; mov dr7, rbx; mov [rdi], ecx; hlt
    let bp = [
        0x0f, 0x23, 0xf2, 0x0f, 0x23, 0xc0, 0x0f, 0x23, 0xfb, 0x89, 0x0f, 0xf4,
    ];
    for (what, addr) in [("RAM", RAM_ADDR), ("MMIO", MMIO_ADDR)] {
        let set = [(0, addr), (3, DR7_W4), (2, 0), (1, 0x5a5a), (7, addr)];
        let (o, writes) = outcome(&bp, &set, 0)?;
        check(o.0 == DB_PORT && o.1 & 0xf == 1, || {
            format!("a write to {what} under a write breakpoint: {o:x?}, want #DB with DR6.B0")
        })?;
        let want: &[u64] = if addr == MMIO_ADDR { &[0x5a5a] } else { &[] };
        check(writes == want, || {
            format!("the write to {what} before the #DB: {writes:x?}")
        })?;
        // A read does not hit a write breakpoint: mov ecx, [rdi] instead.
        let mut rd = bp;
        rd[9] = 0x8b;
        let (o, _) = outcome(&rd, &set, 0)?;
        check(o == (0, 0), || {
            format!("a read of {what} under a write breakpoint: {o:x?}, want HLT")
        })?;
    }
    // A store to the guest's own PML4 (write-protected by the shadow pool, so rvmm
    // carries it out) under an 8-byte write breakpoint on it: mov rcx, [rdi];
    // mov [rdi], rcx (the same value back).
    let pt = [
        0x0f, 0x23, 0xf2, 0x0f, 0x23, 0xc0, 0x0f, 0x23, 0xfb, 0x48, 0x8b, 0x0f, 0x48, 0x89, 0x0f,
        0xf4,
    ];
    let set = [(0, PML4), (3, 1 | (0b1001 << 16)), (2, 0), (7, PML4)];
    let (o, _) = outcome(&pt, &set, 0)?;
    check(o.0 == DB_PORT && o.1 & 0xf == 1, || {
        format!("a store to the PML4 under a write breakpoint: {o:x?}, want #DB with DR6.B0")
    })
}
