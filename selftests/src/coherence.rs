// SPDX-License-Identifier: GPL-2.0

//! Shadow MMU coherence: guests that change their page tables in the ways where a
//! shadow can lag behind, each checking that it sees what the architecture says (SDM
//! Vol. 3A, 4.10) after the flush it made.

use crate::adversarial::{new_vcpu, run, Machine, CODE, PW};
use crate::check;
use crate::ktap::Outcome;
use rvmm::guest::EntryMode;
use rvmm::uapi::Regs;
use rvmm::Exit;

/// Writes an interrupt gate for `vector` to `handler` into the IDT at `idt`: 16-byte
/// gates in long mode, 8-byte ones in 32-bit protected mode.
fn idt_gate(m: &mut Machine, idt: u64, vector: u64, handler: u64, long: bool) -> Outcome {
    let cs = u64::from(m.sregs.cs.selector);
    let lo = (handler & 0xffff) | (cs << 16) | (0x8e << 40) | ((handler >> 16 & 0xffff) << 48);
    if long {
        m.mem.write_u64(idt + 16 * vector, lo)?;
        m.mem.write_u64(idt + 16 * vector + 8, handler >> 32)
    } else {
        m.mem.write_u64(idt + 8 * vector, lo)
    }
}

/// A global flush reaches every PCID: with CR4.PCIDE on, the guest reads page X in
/// address space A (PCID 1), moves to B (PCID 2), rewrites A's page table for X
/// (through its identity map) so that X maps another page, toggles CR4.PGE (which
/// invalidates the TLB entries of every PCID) and returns to A with CR3 bit 63 set (no
/// flush). X must read the new page: a flush that synced only B's shadow left A's
/// stale, and X read the old page.
pub fn global_flush_reaches_every_pcid(_: &crate::Ctx) -> Outcome {
    const B: u64 = 0x10_0000;
    const PDPT_A: u64 = 0x10_1000;
    const PD_A: u64 = 0x10_2000;
    const PT_A: u64 = 0x10_3000;
    const PDPT_B: u64 = 0x10_4000;
    const PD_B: u64 = 0x10_5000;
    const PT_B: u64 = 0x10_6000;
    const D1: u64 = 0x20_0000;
    const D2: u64 = 0x20_1000;
    const D3: u64 = 0x20_2000;
    let mut m = Machine::new(EntryMode::Long, 8 << 20)?;
    let mem = &mut m.mem;
    let a = rvmm::guest::PML4;
    // Both address spaces keep `setup`'s identity map in entry 0; X = 512 GiB.
    mem.write_u64(B, rvmm::guest::PDPT | PW)?;
    for (pml4, pdpt, pd, pt, page) in [(a, PDPT_A, PD_A, PT_A, D1), (B, PDPT_B, PD_B, PT_B, D3)] {
        mem.write_u64(pml4 + 8, pdpt | PW)?;
        mem.write_u64(pdpt, pd | PW)?;
        mem.write_u64(pd, pt | PW)?;
        mem.write_u64(pt, page | PW)?;
    }
    mem.write_u64(D1, 0x1111)?;
    mem.write_u64(D2, 0x2222)?;
    mem.write_u64(D3, 0x3333)?;
    #[rustfmt::skip]
    let code = [
        0x0f, 0x20, 0xe0,                         // mov rax, cr4
        0x0d, 0x80, 0x00, 0x02, 0x00,             // or eax, PCIDE | PGE
        0x0f, 0x22, 0xe0,                         // mov cr4, rax
        0xb8, 0x01, 0x10, 0x00, 0x00,             // mov eax, A | PCID 1
        0x0f, 0x22, 0xd8,                         // mov cr3, rax
        0x48, 0xbb, 0, 0, 0, 0, 0x80, 0, 0, 0,    // mov rbx, X
        0x48, 0x8b, 0x0b,                         // mov rcx, [rbx] (A's X: D1)
        0xb8, 0x02, 0x00, 0x10, 0x00,             // mov eax, B | PCID 2
        0x0f, 0x22, 0xd8,                         // mov cr3, rax
        0x48, 0x8b, 0x0b,                         // mov rcx, [rbx] (B's X: D3)
        0xbf, 0x00, 0x30, 0x10, 0x00,             // mov edi, PT_A
        0x48, 0xc7, 0x07, 0x03, 0x10, 0x20, 0x00, // mov qword [rdi], D2 | P | RW
        0x0f, 0x20, 0xe0,                         // mov rax, cr4
        0x25, 0x7f, 0xff, 0xff, 0xff,             // and eax, ~PGE
        0x0f, 0x22, 0xe0,                         // mov cr4, rax (flushes every PCID)
        0x0d, 0x80, 0x00, 0x00, 0x00,             // or eax, PGE
        0x0f, 0x22, 0xe0,                         // mov cr4, rax
        0x48, 0xb8, 0x01, 0x10, 0, 0, 0, 0, 0, 0x80, // mov rax, A | PCID 1 | no flush
        0x0f, 0x22, 0xd8,                         // mov cr3, rax
        0x8b, 0x03,                               // mov eax, [rbx]
        0xe7, 0x10,                               // out 0x10, eax
        0xf4,                                     // hlt
    ];
    m.mem.write(CODE, &code)?;
    let v = new_vcpu(
        &m.vm,
        0,
        &Regs {
            rip: CODE,
            ..m.regs
        },
        &m.sregs,
    )?;
    let e = run(&v)?;
    let want = Exit::IoOut {
        port: 0x10,
        size: 4,
        data: 0x2222,
    };
    check(e == want, || {
        format!(
            "after a global flush and a no-flush MOV CR3 back to PCID 1, X read {e:?}, want {want:?} (0x1111: A's stale shadow)"
        )
    })
}

/// A write to a page table that rvmm emulates is fetched from CS.base + EIP outside
/// 64-bit mode: a 32-bit guest with CS.base = 64 KiB turns on paging (its page
/// directory maps 4 MiB pages, and itself) and writes a PDE with `mov [eax], ecx`.
/// At linear address EIP (what a fetch without the base reads) sits a decoy,
/// `mov [eax], ebx`. The PDE must hold ECX's value.
pub fn pt_write_fetches_at_cs_base(_: &crate::Ctx) -> Outcome {
    const PD: u64 = 0x20_0000;
    const CS_BASE: u64 = CODE;
    let mut m = Machine::new(EntryMode::Protected, 8 << 20)?;
    // PDE 0: 4 MiB at 0 (the code, the stack, the GDT); PDE 1 is what the guest writes.
    m.mem.write_u64(PD, 0x83)?;
    #[rustfmt::skip]
    let code: [u8; 50] = [
        0xb8, 0x00, 0x00, 0x20, 0x00, // mov eax, PD
        0x0f, 0x22, 0xd8,             // mov cr3, eax
        0x0f, 0x20, 0xe0,             // mov eax, cr4
        0x83, 0xc8, 0x10,             // or eax, PSE
        0x0f, 0x22, 0xe0,             // mov cr4, eax
        0x0f, 0x20, 0xc0,             // mov eax, cr0
        0x0d, 0x00, 0x00, 0x00, 0x80, // or eax, PG
        0x0f, 0x22, 0xc0,             // mov cr0, eax
        0xb8, 0x04, 0x00, 0x20, 0x00, // mov eax, PD + 4 (PDE 1)
        0xb9, 0x83, 0x00, 0x40, 0x00, // mov ecx, 4 MiB | PS | RW | P
        0xbb, 0x83, 0x00, 0x80, 0x00, // mov ebx, 8 MiB | PS | RW | P (the decoy's)
        0x89, 0x08,                   // mov [eax], ecx (a write to the page directory)
        0x8b, 0x00,                   // mov eax, [eax]
        0xe7, 0x10,                   // out 0x10, eax
        0xf4,                         // hlt
    ];
    // The write's EIP, and the decoy at that linear address.
    let store = 43u64;
    check(
        code[store as usize..store as usize + 2] == [0x89, 0x08],
        || "the store is not where the test expects it".into(),
    )?;
    m.mem.write(CS_BASE, &code)?;
    m.mem.write(store, &[0x89, 0x18])?;
    let mut sregs = m.sregs;
    sregs.cs.base = CS_BASE;
    let v = new_vcpu(&m.vm, 0, &Regs { rip: 0, ..m.regs }, &sregs)?;
    let e = run(&v)?;
    let want = Exit::IoOut {
        port: 0x10,
        size: 4,
        data: 0x40_0083,
    };
    check(e == want, || {
        format!(
            "the PDE read back {e:?}, want {want:?} (0x800083: the emulator ran the decoy at EIP without CS.base)"
        )
    })
}

/// INVPCID as the SDM defines it (Vol. 2A): a descriptor at any alignment, across a
/// page boundary too (m128 has no alignment rule), and #GP for a PCID other than 0 in
/// a single-context type while CR4.PCIDE = 0. The guest runs type 2 with a descriptor
/// that spans two pages (then OUT 0x11), then type 1 with PCID 5 (its #GP handler
/// OUTs 0x33 to port 0x13; going on would OUT 0x22).
pub fn invpcid_checks_like_hardware(_: &crate::Ctx) -> Outcome {
    const IDT: u64 = 0x20_2000;
    const HANDLER: u64 = 0x20_3000;
    const DESC_SPLIT: u64 = 0x20_0ffc;
    const DESC_PCID5: u64 = 0x20_1100;
    let mut m = Machine::new(EntryMode::Long, 8 << 20)?;
    // PCID 0, address 0 (type 2 ignores both), 4 bytes in each page.
    m.mem.write(DESC_SPLIT, &[0u8; 16])?;
    m.mem.write_u64(DESC_PCID5, 5)?;
    // The #GP gate (vector 13): a 64-bit interrupt gate to HANDLER.
    idt_gate(&mut m, IDT, 13, HANDLER, true)?;
    m.mem.write(HANDLER, &[0xb0, 0x33, 0xe6, 0x13, 0xf4])?; // mov al, 0x33; out 0x13, al; hlt
    #[rustfmt::skip]
    let code = [
        0xb8, 0x02, 0x00, 0x00, 0x00,       // mov eax, 2 (all contexts)
        0xbb, 0xfc, 0x0f, 0x20, 0x00,       // mov ebx, DESC_SPLIT
        0x66, 0x0f, 0x38, 0x82, 0x03,       // invpcid rax, [rbx]
        0xb0, 0x11,                         // mov al, 0x11
        0xe6, 0x10,                         // out 0x10, al
        0xb8, 0x01, 0x00, 0x00, 0x00,       // mov eax, 1 (one context)
        0xbb, 0x00, 0x11, 0x20, 0x00,       // mov ebx, DESC_PCID5
        0x66, 0x0f, 0x38, 0x82, 0x03,       // invpcid rax, [rbx] (#GP: PCIDE is 0)
        0xb0, 0x22,                         // mov al, 0x22
        0xe6, 0x10,                         // out 0x10, al
        0xf4,                               // hlt
    ];
    m.mem.write(CODE, &code)?;
    let mut sregs = m.sregs;
    sregs.idt.base = IDT;
    sregs.idt.limit = 16 * 14 - 1;
    let v = new_vcpu(
        &m.vm,
        0,
        &Regs {
            rip: CODE,
            ..m.regs
        },
        &sregs,
    )?;
    let out = |port, data| Exit::IoOut {
        port,
        size: 1,
        data,
    };
    let e = run(&v)?;
    check(e == out(0x10, 0x11), || {
        format!("INVPCID with a descriptor across two pages: exit {e:?}, want the OUT of 0x11")
    })?;
    let e = run(&v)?;
    check(e == out(0x13, 0x33), || {
        format!(
            "INVPCID type 1, PCID 5, CR4.PCIDE = 0: exit {e:?}, want the #GP handler's OUT of 0x33"
        )
    })
}

/// INVPCID's memory operand in 64-bit mode must be canonical: a #GP(0) before any
/// access (a walk of the non-canonical address would give a #PF instead). The #GP
/// handler OUTs 0x33 to port 0x13, the #PF handler 0x44 to port 0x14.
pub fn invpcid_noncanonical_operand_gp(_: &crate::Ctx) -> Outcome {
    const IDT: u64 = 0x20_2000;
    const GP_HANDLER: u64 = 0x20_3000;
    const PF_HANDLER: u64 = 0x20_3100;
    let mut m = Machine::new(EntryMode::Long, 8 << 20)?;
    idt_gate(&mut m, IDT, 13, GP_HANDLER, true)?;
    idt_gate(&mut m, IDT, 14, PF_HANDLER, true)?;
    m.mem.write(GP_HANDLER, &[0xb0, 0x33, 0xe6, 0x13, 0xf4])?;
    m.mem.write(PF_HANDLER, &[0xb0, 0x44, 0xe6, 0x14, 0xf4])?;
    #[rustfmt::skip]
    let code = [
        0xb8, 0x02, 0x00, 0x00, 0x00,                   // mov eax, 2 (all contexts)
        0x48, 0xbb, 0, 0, 0, 0, 0, 0x80, 0, 0,          // mov rbx, 1 << 47 (not canonical)
        0x66, 0x0f, 0x38, 0x82, 0x03,                   // invpcid rax, [rbx]
        0xb0, 0x22,                                     // mov al, 0x22
        0xe6, 0x10,                                     // out 0x10, al
        0xf4,                                           // hlt
    ];
    m.mem.write(CODE, &code)?;
    let mut sregs = m.sregs;
    sregs.idt.base = IDT;
    sregs.idt.limit = 16 * 15 - 1;
    let v = new_vcpu(
        &m.vm,
        0,
        &Regs {
            rip: CODE,
            ..m.regs
        },
        &sregs,
    )?;
    let e = run(&v)?;
    check(
        e == Exit::IoOut {
            port: 0x13,
            size: 1,
            data: 0x33,
        },
        || {
            format!("INVPCID of a non-canonical operand: exit {e:?}, want the #GP handler's OUT of 0x33")
        },
    )
}

/// 1-GiB pages only where the guest's CPUID has them (leaf 0x80000001, EDX bit 26):
/// with the bit clear, a PDPTE with PS set has a reserved bit, and an access through it
/// is a #PF with RSVD (the handler OUTs its error code to port 0x14), not a read of
/// the page.
pub fn gbpages_follow_cpuid(_: &crate::Ctx) -> Outcome {
    const PDPT1: u64 = 0x10_0000;
    const IDT: u64 = 0x20_2000;
    const HANDLER: u64 = 0x20_3000;
    let mut m = Machine::new(EntryMode::Long, 8 << 20)?;
    // X = 512 GiB: PML4 entry 1, a PDPTE mapping 1 GiB at 0.
    m.mem.write_u64(rvmm::guest::PML4 + 8, PDPT1 | PW)?;
    m.mem.write_u64(PDPT1, 0x83)?;
    idt_gate(&mut m, IDT, 14, HANDLER, true)?;
    // mov eax, [rsp] (the error code); out 0x14, eax; hlt
    m.mem
        .write(HANDLER, &[0x8b, 0x04, 0x24, 0xe7, 0x14, 0xf4])?;
    #[rustfmt::skip]
    let code = [
        0x48, 0xbb, 0, 0, 0, 0, 0x80, 0, 0, 0, // mov rbx, X
        0x8b, 0x03,                            // mov eax, [rbx]
        0xe7, 0x10,                            // out 0x10, eax
        0xf4,                                  // hlt
    ];
    m.mem.write(CODE, &code)?;
    let mut sregs = m.sregs;
    sregs.idt.base = IDT;
    sregs.idt.limit = 16 * 15 - 1;
    let v = new_vcpu(
        &m.vm,
        0,
        &Regs {
            rip: CODE,
            ..m.regs
        },
        &sregs,
    )?;
    // Long mode, NX, SYSCALL; no 1-GiB pages.
    v.set_cpuid(&[rvmm::uapi::CpuidEntry {
        function: 0x8000_0001,
        ecx: 1,
        edx: (1 << 29) | (1 << 20) | (1 << 11),
        ..Default::default()
    }])
    .map_err(|e| e.to_string())?;
    let e = run(&v)?;
    let want_ec = 0x9; // present, reserved bit
    check(
        matches!(e, Exit::IoOut { port: 0x14, size: 4, data } if data & 0x1f == want_ec),
        || {
            format!("a 1-GiB page without CPUID's Page1GB: exit {e:?}, want a #PF with error code {want_ec:#x} (port 0x14)")
        },
    )
}

/// MAXPHYADDR is what the guest's CPUID says (leaf 0x80000008, here 36 bits): a 2-MiB
/// page whose frame has bit 37 set is a reserved-bit #PF for the guest, as on a CPU of
/// 36 address bits, whatever the host's.
pub fn maxphyaddr_follows_cpuid(_: &crate::Ctx) -> Outcome {
    const PDPT1: u64 = 0x10_0000;
    const PD1: u64 = 0x10_1000;
    const IDT: u64 = 0x20_2000;
    const HANDLER: u64 = 0x20_3000;
    let mut m = Machine::new(EntryMode::Long, 8 << 20)?;
    // X = 512 GiB: PML4 entry 1 -> PDPT -> a 2-MiB page at 1 << 37.
    m.mem.write_u64(rvmm::guest::PML4 + 8, PDPT1 | PW)?;
    m.mem.write_u64(PDPT1, PD1 | PW)?;
    m.mem.write_u64(PD1, (1 << 37) | 0x83)?;
    idt_gate(&mut m, IDT, 14, HANDLER, true)?;
    // mov eax, [rsp] (the error code); out 0x14, eax; hlt
    m.mem
        .write(HANDLER, &[0x8b, 0x04, 0x24, 0xe7, 0x14, 0xf4])?;
    #[rustfmt::skip]
    let code = [
        0x48, 0xbb, 0, 0, 0, 0, 0x80, 0, 0, 0, // mov rbx, X
        0x8b, 0x03,                            // mov eax, [rbx]
        0xe7, 0x10,                            // out 0x10, eax
        0xf4,                                  // hlt
    ];
    m.mem.write(CODE, &code)?;
    let mut sregs = m.sregs;
    sregs.idt.base = IDT;
    sregs.idt.limit = 16 * 15 - 1;
    let v = new_vcpu(
        &m.vm,
        0,
        &Regs {
            rip: CODE,
            ..m.regs
        },
        &sregs,
    )?;
    // Long mode, NX, SYSCALL; 36 physical and 48 linear address bits.
    v.set_cpuid(&[
        rvmm::uapi::CpuidEntry {
            function: 0x8000_0001,
            ecx: 1,
            edx: (1 << 29) | (1 << 20) | (1 << 11),
            ..Default::default()
        },
        rvmm::uapi::CpuidEntry {
            function: 0x8000_0008,
            eax: 36 | (48 << 8),
            ..Default::default()
        },
    ])
    .map_err(|e| e.to_string())?;
    let e = run(&v)?;
    let want_ec = 0x9; // present, reserved bit
    check(
        matches!(e, Exit::IoOut { port: 0x14, size: 4, data } if data & 0x1f == want_ec),
        || {
            format!("a frame bit above CPUID's MAXPHYADDR: exit {e:?}, want a #PF with error code {want_ec:#x} (port 0x14)")
        },
    )
}

/// An instruction rvmm carries out completes as the CPU's would: with RFLAGS.TF the
/// single-step #DB comes right after it (here an MMIO read, which the CPU does not
/// complete: it faults on the shadow's MMIO entry and rvmm emulates it), not after the
/// next instruction. The #DB handler OUTs the RIP it was given.
pub fn single_step_traps_after_emulated_instructions(_: &crate::Ctx) -> Outcome {
    const PDPT1: u64 = 0x10_0000;
    const PD1: u64 = 0x10_1000;
    const IDT: u64 = 0x20_2000;
    const HANDLER: u64 = 0x20_3000;
    const DEVICE: u64 = 0x4000_0000;
    let mut m = Machine::new(EntryMode::Long, 8 << 20)?;
    // X = 512 GiB: PML4 entry 1 -> PDPT -> a 2-MiB page at 1 GiB, outside RAM.
    m.mem.write_u64(rvmm::guest::PML4 + 8, PDPT1 | PW)?;
    m.mem.write_u64(PDPT1, PD1 | PW)?;
    m.mem.write_u64(PD1, DEVICE | 0x83)?;
    idt_gate(&mut m, IDT, 1, HANDLER, true)?;
    // mov rax, [rsp] (the RIP pushed); out 0x14, eax; hlt
    m.mem
        .write(HANDLER, &[0x48, 0x8b, 0x04, 0x24, 0xe7, 0x14, 0xf4])?;
    #[rustfmt::skip]
    let code = [
        0x48, 0xbb, 0, 0, 0, 0, 0x80, 0, 0, 0,    // mov rbx, X
        0x9c,                                     // pushfq
        0x48, 0x81, 0x0c, 0x24, 0, 0x01, 0, 0,    // or qword [rsp], 0x100 (TF)
        0x9d,                                     // popfq
        0x8b, 0x03,                               // mov eax, [rbx] (MMIO: traps after it)
        0x90,                                     // nop
        0xe7, 0x10,                               // out 0x10, eax
        0xf4,                                     // hlt
    ];
    m.mem.write(CODE, &code)?;
    let mut sregs = m.sregs;
    sregs.idt.base = IDT;
    sregs.idt.limit = 16 * 15 - 1;
    let v = new_vcpu(
        &m.vm,
        0,
        &Regs {
            rip: CODE,
            ..m.regs
        },
        &sregs,
    )?;
    let e = run(&v)?;
    check(
        matches!(
            e,
            Exit::Mmio {
                addr: DEVICE,
                is_write: false,
                ..
            }
        ),
        || format!("the MMIO read: exit {e:?}"),
    )?;
    // The read completes with 0 (the run page's data).
    let e = run(&v)?;
    let want = (CODE + 22) as u32; // right after the MMIO read
    check(
        matches!(e, Exit::IoOut { port: 0x14, size: 4, data } if data == want),
        || {
            format!("single step over an emulated read: exit {e:?}, want the #DB handler to see RIP {want:#x} (port 0x14)")
        },
    )
}

/// MOV CR3 in IA-32e mode with a reserved bit is a #GP: bit 63 while CR4.PCIDE = 0,
/// and a bit above MAXPHYADDR (bit 62). Each in its own VM; the #GP handler OUTs 0x33
/// to port 0x13 (going on would OUT 0x22 to port 0x10).
pub fn mov_cr3_reserved_bits_gp(_: &crate::Ctx) -> Outcome {
    const IDT: u64 = 0x20_2000;
    const HANDLER: u64 = 0x20_3000;
    for bit in [63u8, 62] {
        let mut m = Machine::new(EntryMode::Long, 8 << 20)?;
        idt_gate(&mut m, IDT, 13, HANDLER, true)?;
        m.mem.write(HANDLER, &[0xb0, 0x33, 0xe6, 0x13, 0xf4])?;
        #[rustfmt::skip]
        let code = [
            0x0f, 0x20, 0xd8,             // mov rax, cr3
            0x48, 0x0f, 0xba, 0xe8, bit,  // bts rax, bit
            0x0f, 0x22, 0xd8,             // mov cr3, rax (#GP)
            0xb0, 0x22,                   // mov al, 0x22
            0xe6, 0x10,                   // out 0x10, al
            0xf4,                         // hlt
        ];
        m.mem.write(CODE, &code)?;
        let mut sregs = m.sregs;
        sregs.idt.base = IDT;
        sregs.idt.limit = 16 * 14 - 1;
        let v = new_vcpu(
            &m.vm,
            0,
            &Regs {
                rip: CODE,
                ..m.regs
            },
            &sregs,
        )?;
        let e = run(&v)?;
        let want = Exit::IoOut {
            port: 0x13,
            size: 1,
            data: 0x33,
        };
        check(e == want, || {
            format!("MOV CR3 with bit {bit} set (CR4.PCIDE = 0): exit {e:?}, want the #GP handler's {want:?}")
        })?;
    }
    Ok(())
}

/// Under PAE paging, MOV CR3 loads the four PDPTEs and raises #GP for a present one
/// with a reserved bit, before CR3 changes (SDM Vol. 3A, 4.4.1). The 32-bit guest turns
/// on PAE paging with good PDPTEs, then loads a PDPT whose entry 0 has R/W set
/// (reserved in a PDPTE): its #GP handler OUTs 0x33 to port 0x13, still under the
/// good tables. Loading the bad one would leave the guest without its code (a #PF
/// that cannot be delivered: shutdown).
pub fn pae_bad_pdpte_gp(_: &crate::Ctx) -> Outcome {
    const PDPT_OK: u64 = 0x20_0000;
    const PD: u64 = 0x20_1000;
    const PDPT_BAD: u64 = 0x20_2000;
    const IDT: u64 = 0x20_3000;
    const HANDLER: u64 = 0x20_4000;
    let mut m = Machine::new(EntryMode::Protected, 8 << 20)?;
    let mem = &mut m.mem;
    mem.write_u64(PDPT_OK, PD | 1)?;
    mem.write_u64(PDPT_BAD, PD | 1 | 2)?;
    for i in 0..4u64 {
        // 2-MiB pages: the first 8 MiB, identity.
        mem.write_u64(PD + 8 * i, (i << 21) | 0x83)?;
    }
    idt_gate(&mut m, IDT, 13, HANDLER, false)?;
    m.mem.write(HANDLER, &[0xb0, 0x33, 0xe6, 0x13, 0xf4])?; // mov al, 0x33; out 0x13, al; hlt
    #[rustfmt::skip]
    let code = [
        0x0f, 0x20, 0xe0,             // mov eax, cr4
        0x83, 0xc8, 0x20,             // or eax, PAE
        0x0f, 0x22, 0xe0,             // mov cr4, eax
        0xb8, 0x00, 0x00, 0x20, 0x00, // mov eax, PDPT_OK
        0x0f, 0x22, 0xd8,             // mov cr3, eax
        0x0f, 0x20, 0xc0,             // mov eax, cr0
        0x0d, 0x00, 0x00, 0x00, 0x80, // or eax, PG
        0x0f, 0x22, 0xc0,             // mov cr0, eax (PAE paging)
        0xb8, 0x00, 0x20, 0x20, 0x00, // mov eax, PDPT_BAD
        0x0f, 0x22, 0xd8,             // mov cr3, eax (#GP)
        0xb0, 0x22,                   // mov al, 0x22
        0xe6, 0x10,                   // out 0x10, al
        0xf4,                         // hlt
    ];
    m.mem.write(CODE, &code)?;
    let mut sregs = m.sregs;
    sregs.idt.base = IDT;
    sregs.idt.limit = 8 * 14 - 1;
    let v = new_vcpu(
        &m.vm,
        0,
        &Regs {
            rip: CODE,
            ..m.regs
        },
        &sregs,
    )?;
    let e = run(&v)?;
    let want = Exit::IoOut {
        port: 0x13,
        size: 1,
        data: 0x33,
    };
    check(e == want, || {
        format!("MOV CR3 to a PDPT with a reserved bit in a present PDPTE: exit {e:?}, want the #GP handler's {want:?}")
    })
}
