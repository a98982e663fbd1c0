// SPDX-License-Identifier: GPL-2.0

//! Hypercalls (VMCALL): only those userspace asked for leave the kernel.

use crate::adversarial::{new_vcpu, run, Machine, CODE};
use crate::check;
use crate::ktap::Outcome;
use rvmm::guest::EntryMode;
use rvmm::uapi::Regs;
use rvmm::Exit;

/// VMX exit reason of VMCALL.
const EXIT_VMCALL: usize = 18;

/// A guest makes 1000 VMCALLs of a hypercall nobody asked for: each returns -1000 in
/// RAX (KVM's -KVM_ENOSYS) without an exit to userspace (and without a log line);
/// then one of the hypercall userspace asked for (`RVMM_SET_HYPERCALL_EXITS`) exits
/// with its number, and the guest gets the result userspace set.
pub fn hypercalls_exit_only_when_asked(_: &crate::Ctx) -> Outcome {
    let mut m = Machine::new(EntryMode::Long, 8 << 20)?;
    #[rustfmt::skip]
    let code = [
        0xb9, 0xe8, 0x03, 0x00, 0x00,       // mov ecx, 1000
        0xb8, 0x07, 0x00, 0x00, 0x00,       // 5: mov eax, 7
        0x0f, 0x01, 0xc1,                   // vmcall
        0x48, 0x3d, 0x18, 0xfc, 0xff, 0xff, // cmp rax, -1000
        0x75, 0x0f,                         // jne 36
        0xff, 0xc9,                         // dec ecx
        0x75, 0xec,                         // jnz 5
        0xb8, 0x09, 0x00, 0x00, 0x00,       // mov eax, 9
        0x0f, 0x01, 0xc1,                   // vmcall (asked: exits)
        0xe7, 0x10,                         // out 0x10, eax
        0xf4,                               // hlt
        0xe7, 0x11,                         // 36: out 0x11, eax
        0xf4,                               // hlt
    ];
    m.mem.write(CODE, &code)?;
    m.vm.set_hypercall_exits(1 << 9)
        .map_err(|e| e.to_string())?;
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
    check(matches!(e, Exit::Hypercall { nr: 9, .. }), || {
        format!("after 1000 hypercalls nobody asked for: exit {e:?}, want hypercall 9 (a failed check OUTs to port 0x11)")
    })?;
    let s = m.vm.stats().map_err(|e| e.to_string())?;
    check(s.exits[EXIT_VMCALL] == 1001, || {
        format!("{} VMCALL exits, want 1001", s.exits[EXIT_VMCALL])
    })?;
    v.set_hypercall_ret(42);
    let e = run(&v)?;
    check(
        e == Exit::IoOut {
            port: 0x10,
            size: 4,
            data: 42,
        },
        || format!("after the asked-for hypercall: exit {e:?}, want OUT 42 to port 0x10"),
    )
}
