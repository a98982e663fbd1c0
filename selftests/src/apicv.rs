// SPDX-License-Identifier: GPL-2.0

//! The xAPIC page under VMX's APIC virtualization: a guest reads APIC registers 3,000
//! times, writes some, reads what it wrote, sends itself an IPI and reads the IRR, then
//! switches its APIC to x2APIC mode and reads the page again. The results must be the
//! APIC's, with the module's APIC virtualization on (where the CPU has it: the reads
//! take no exit) and off (`apicv=0`: every access exits to the APIC model), in long
//! mode (the page inside a 2-MiB guest page) and with paging off; in x2APIC mode the
//! page is device memory again (an MMIO exit to userspace).

use crate::adversarial::{new_vcpu, run, Machine};
use crate::ktap::{self, Outcome};
use crate::{check, sys, Ctx};
use rvmm::guest::EntryMode;
use rvmm::uapi::{Regs, VmStats};
use rvmm::{Exit, Rvmm};

/// The guest's code (the same bytes run in 32-bit and 64-bit mode: RDI holds the base,
/// every access is RDI-relative). Each OUT to port 0x10 reports a 32-bit result.
#[rustfmt::skip]
const CODE: &[u8] = &[
    0xfa,                                     // cli
    0xbf, 0x00, 0x00, 0xe0, 0xfe,             // mov edi, 0xfee00000
    0xbe, 0xe8, 0x03, 0x00, 0x00,             // mov esi, 1000
    0x31, 0xdb,                               // xor ebx, ebx
    0x8b, 0x47, 0x30,                         // l: mov eax, [rdi+0x30] (version)
    0x01, 0xc3,                               // add ebx, eax
    0x8b, 0x47, 0x20,                         // mov eax, [rdi+0x20] (ID)
    0x01, 0xc3,                               // add ebx, eax
    0x8b, 0x87, 0x50, 0x03, 0x00, 0x00,       // mov eax, [rdi+0x350] (LVT LINT0)
    0x01, 0xc3,                               // add ebx, eax
    0xff, 0xce,                               // dec esi
    0x75, 0xea,                               // jnz l
    0x89, 0xd8,                               // mov eax, ebx
    0xe7, 0x10,                               // out 0x10, eax            (1)
    0xc7, 0x87, 0xf0, 0x00, 0x00, 0x00, 0xff, 0x01, 0x00, 0x00, // SVR = 0x1ff
    0xc7, 0x87, 0xe0, 0x03, 0x00, 0x00, 0x0b, 0x00, 0x00, 0x00, // divide by 1
    0xc7, 0x87, 0x20, 0x03, 0x00, 0x00, 0x30, 0x00, 0x00, 0x00, // LVT timer = 0x30
    0xc7, 0x87, 0x80, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x40, // initial count
    0x8b, 0x87, 0x20, 0x03, 0x00, 0x00,       // mov eax, [rdi+0x320]
    0xe7, 0x10,                               // out                      (2)
    0x8b, 0x87, 0xf0, 0x00, 0x00, 0x00,       // mov eax, [rdi+0xf0]
    0xe7, 0x10,                               // out                      (3)
    0x8b, 0x87, 0x80, 0x03, 0x00, 0x00,       // mov eax, [rdi+0x380]
    0xe7, 0x10,                               // out                      (4)
    0x8b, 0x87, 0x90, 0x03, 0x00, 0x00,       // mov eax, [rdi+0x390] (current count)
    0x3d, 0x00, 0x00, 0x00, 0x40,             // cmp eax, 0x40000000
    0x0f, 0x96, 0xc0,                         // setbe al
    0x0f, 0xb6, 0xc0,                         // movzx eax, al
    0xe7, 0x10,                               // out                      (5)
    0xc7, 0x87, 0x10, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x05, // ICR high = 5 << 24
    0x8b, 0x87, 0x10, 0x03, 0x00, 0x00,       // mov eax, [rdi+0x310]
    0xe7, 0x10,                               // out                      (6)
    0xc7, 0x87, 0x80, 0x00, 0x00, 0x00, 0x20, 0x00, 0x00, 0x00, // TPR = 0x20
    0x8b, 0x87, 0x80, 0x00, 0x00, 0x00,       // mov eax, [rdi+0x80]
    0xe7, 0x10,                               // out                      (7)
    0x8b, 0x87, 0xa0, 0x00, 0x00, 0x00,       // mov eax, [rdi+0xa0] (PPR)
    0xe7, 0x10,                               // out                      (8)
    0xc7, 0x87, 0x00, 0x03, 0x00, 0x00, 0x50, 0x40, 0x04, 0x00, // ICR: self, vector 0x50
    0x8b, 0x87, 0x20, 0x02, 0x00, 0x00,       // mov eax, [rdi+0x220] (IRR 0x40-0x5f)
    0xe7, 0x10,                               // out                      (9)
    0x8b, 0x87, 0x10, 0x03, 0x00, 0x00,       // mov eax, [rdi+0x310]
    0xe7, 0x10,                               // out                      (10)
    0x8a, 0x47, 0x30,                         // mov al, [rdi+0x30]
    0x0f, 0xb6, 0xc0,                         // movzx eax, al
    0xe7, 0x10,                               // out                      (11)
    0xb9, 0x1b, 0x00, 0x00, 0x00,             // mov ecx, 0x1b (IA32_APIC_BASE)
    0xb8, 0x00, 0x0d, 0xe0, 0xfe,             // mov eax, 0xfee00d00 (x2APIC, BSP)
    0x31, 0xd2,                               // xor edx, edx
    0x0f, 0x30,                               // wrmsr
    0x8b, 0x47, 0x30,                         // mov eax, [rdi+0x30]: device memory now
    0xe7, 0x10,                               // out                      (12)
    0xf4,                                     // hlt
];

/// What the guest reports, in order.
const WANT: [u32; 11] = [
    // 1000 x (version 0x50014 + ID 0 + LINT0 masked 0x10000).
    1000 * 0x6_0014,
    0x30,
    0x1ff,
    0x4000_0000,
    1,
    0x0500_0000,
    0x20,
    // PPR: the TPR (nothing in service).
    0x20,
    // Vector 0x50 waits in the IRR (interrupts are off).
    1 << 16,
    // The ICR's high half is what was written.
    0x0500_0000,
    // The version's low byte.
    0x14,
];

/// What the userspace device answers for the read of the page in x2APIC mode.
const DEVICE: u32 = 0x1234_5678;

fn out(data: u32) -> Exit {
    Exit::IoOut {
        port: 0x10,
        size: 4,
        data,
    }
}

/// Runs the guest in `mode` on a VM with an irqchip; returns the VM's counters.
fn run_guest(mode: EntryMode) -> Result<VmStats, String> {
    let mut m = Machine::new(mode, 2 << 20)?;
    m.mem.write(crate::adversarial::CODE, CODE)?;
    m.vm.create_irqchip().map_err(|e| e.to_string())?;
    let v = new_vcpu(
        &m.vm,
        0,
        &Regs {
            rip: crate::adversarial::CODE,
            ..m.regs
        },
        &m.sregs,
    )?;
    for (i, &w) in WANT.iter().enumerate() {
        let e = run(&v)?;
        check(e == out(w), || {
            format!("{mode:?}, result {}: {e:?}, want {:?}", i + 1, out(w))
        })?;
    }
    let e = run(&v)?;
    check(
        matches!(
            e,
            Exit::Mmio {
                addr: 0xfee0_0030,
                len: 4,
                is_write: false,
                ..
            }
        ),
        || format!("{mode:?}: in x2APIC mode the xAPIC page read gave {e:?}, not an MMIO exit"),
    )?;
    v.set_mmio_data(DEVICE.into());
    let e = run(&v)?;
    check(e == out(DEVICE), || {
        format!("{mode:?}: after the MMIO answer: {e:?}")
    })?;
    let e = run(&v)?;
    check(e == Exit::Hlt, || format!("{mode:?}: ended with {e:?}"))?;
    m.vm.stats().map_err(|e| e.to_string())
}

/// Both entry modes; returns the counters of each run.
fn run_both() -> Result<Vec<(EntryMode, VmStats)>, String> {
    [EntryMode::Long, EntryMode::Protected]
        .into_iter()
        .map(|mode| run_guest(mode).map(|s| (mode, s)))
        .collect()
}

fn report(what: &str, runs: &[(EntryMode, VmStats)]) {
    for (mode, s) in runs {
        ktap::diag(&format!(
            "{what}, {mode:?}: APIC accesses by the model {}, exits: APIC access {}, \
             APIC write {}, exception {}",
            s.apic_accesses, s.exits[44], s.exits[56], s.exits[0]
        ));
    }
}

/// xAPIC reads without VM exits where the CPU virtualizes them, and the same results
/// as the APIC model gives through the emulator (module parameter `apicv=0`).
pub fn xapic_reads_without_exits(ctx: &Ctx) -> Outcome {
    let caps = Rvmm::open(crate::DEV)
        .and_then(|r| r.vmx_caps())
        .map_err(|e| e.to_string())?;
    let hw = rvmm_core::caps::apic_virtualization(caps.procbased, caps.procbased2);
    // Virtual-interrupt delivery (module parameter `vid=1`) where the CPU has it.
    let vid = hw && (caps.procbased2 >> 32) & (1 << 9) != 0;
    ktap::diag(&format!(
        "the CPU virtualizes xAPIC accesses: {hw}, virtual-interrupt delivery: {vid}"
    ));
    let on = run_both()?;
    report("defaults", &on);
    check_virtualized(&on, hw, false)?;
    // With virtual-interrupt delivery (module parameter `vid=1`; off by default), then
    // without APIC virtualization (`apicv=0`: every access exits to the APIC model):
    // the same results. With `vid=1` the CPU also delivers apic64's interrupts (timers,
    // self-IPIs, nesting by priority, TPR) and ends them at EOIs without rvmm.
    for param in [c"vid=1", c"apicv=0"] {
        ctx.unload_rvmm()?;
        sys::insmod_with(&ctx.ko("rvmm.ko"), param)
            .map_err(|e| format!("insmod rvmm.ko {param:?}: {e}"))?;
        let runs = run_both().and_then(|r| {
            if param != c"vid=1" {
                return Ok((r, None));
            }
            let (serial, _, st) = crate::vm_tests::run_apic_guest(1)?;
            Ok((r, Some((serial, st))))
        });
        ctx.unload_rvmm()?;
        ctx.load_rvmm()?;
        let (runs, apic64) = runs?;
        report(&format!("{param:?}"), &runs);
        if let Some((serial, st)) = apic64 {
            for l in serial.lines() {
                ktap::diag(&format!("vid=1: {l}"));
            }
            ktap::diag(&format!(
                "vid=1: apic64: interrupts delivered {}, timer interrupts {}, APIC-write exits {}, interrupt-window exits {}",
                st.apic_injections, st.apic_timer_irqs, st.exits[56], st.exits[7]
            ));
            check(serial.contains("apic64: all ok"), || {
                format!("apic64 with vid=1: {serial}")
            })?;
            if vid {
                // The xAPIC half's EOIs (about 40) take no exit.
                check(st.exits[56] < 30, || {
                    format!(
                        "{} APIC-write exits with virtual-interrupt delivery",
                        st.exits[56]
                    )
                })?;
            }
        }
        if param == c"vid=1" {
            check_virtualized(&runs, hw, vid)?;
            continue;
        }
        for (mode, s) in &runs {
            check(
                s.apic_accesses >= 3000 && s.exits[44] + s.exits[56] == 0,
                || {
                    format!(
                        "{mode:?} with apicv=0: {} APIC accesses, {} APIC-access and {} APIC-write exits",
                        s.apic_accesses, s.exits[44], s.exits[56]
                    )
                },
            )?;
        }
    }
    Ok(())
}

/// The counters of runs with APIC virtualization (where the CPU has it, `hw`) and
/// virtual-interrupt delivery (`vid`).
fn check_virtualized(runs: &[(EntryMode, VmStats)], hw: bool, vid: bool) -> Outcome {
    for (mode, s) in runs {
        if !hw {
            check(s.apic_accesses >= 3000, || {
                format!("{mode:?}: only {} APIC accesses", s.apic_accesses)
            })?;
            continue;
        }
        // 3,000 reads in the loop and seven more served from the virtual-APIC page;
        // what reaches the model: the writes that exit as APIC writes (SVR, divide, LVT
        // timer, initial count, and the ICR unless virtual-interrupt delivery takes the
        // self-IPI; the TPR and the ICR's high half take none) and the two reads VMX
        // does not virtualize (current count, PPR).
        let writes = if vid { 4 } else { 5 };
        check(s.apic_accesses == writes + 2, || {
            format!(
                "{mode:?}: {} accesses reached the APIC model, want {}",
                s.apic_accesses,
                writes + 2
            )
        })?;
        check(s.exits[56] == writes && s.exits[44] == 2, || {
            format!(
                "{mode:?}: {} APIC-write and {} APIC-access exits, want {writes} and 2",
                s.exits[56], s.exits[44]
            )
        })?;
    }
    Ok(())
}
