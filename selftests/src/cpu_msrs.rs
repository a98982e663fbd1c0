// SPDX-License-Identifier: GPL-2.0

//! MSRs every x86 kernel touches, as a guest sees them.

use crate::adversarial::{new_vcpu, run, Machine, CODE};
use crate::check;
use crate::ktap::Outcome;
use rvmm::guest::EntryMode;
use rvmm::uapi::Regs;
use rvmm::Exit;

/// IA32_MISC_ENABLE starts with fast strings on and BTS/PEBS unavailable and reads back
/// what the guest writes (kvm-unit-tests' msr test writes 0x400c50809). (The
/// machine-check MSRs stay #GP while CPUID hides MCE/MCA: consist64 checks that.)
pub fn misc_enable_reads_back(_: &crate::Ctx) -> Outcome {
    let mut m = Machine::new(EntryMode::Long, 8 << 20)?;
    #[rustfmt::skip]
    let code = [
        0xb9, 0xa0, 0x01, 0x00, 0x00,       // mov ecx, 0x1a0 (IA32_MISC_ENABLE)
        0x0f, 0x32,                         // rdmsr
        0xe7, 0x10,                         // out 0x10, eax
        0xb8, 0x09, 0x08, 0xc5, 0x00,       // mov eax, 0xc50809
        0xba, 0x04, 0x00, 0x00, 0x00,       // mov edx, 4
        0x0f, 0x30,                         // wrmsr
        0x31, 0xc0,                         // xor eax, eax
        0x31, 0xd2,                         // xor edx, edx
        0x0f, 0x32,                         // rdmsr
        0xe7, 0x11,                         // out 0x11, eax
        0x89, 0xd0,                         // mov eax, edx
        0xe7, 0x12,                         // out 0x12, eax
        0xf4,                               // hlt
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
    for (port, want, what) in [
        (0x10, 0x1801, "IA32_MISC_ENABLE at reset"),
        (
            0x11,
            0x00c5_0809,
            "IA32_MISC_ENABLE bits 31:0 after writing 0x400c50809",
        ),
        (
            0x12,
            0x4,
            "IA32_MISC_ENABLE bits 63:32 after writing 0x400c50809",
        ),
    ] {
        let e = run(&v)?;
        check(
            e == Exit::IoOut {
                port,
                size: 4,
                data: want,
            },
            || format!("{what}: exit {e:?}, want OUT {want:#x} to port {port:#x}"),
        )?;
    }
    Ok(())
}
