// SPDX-License-Identifier: GPL-2.0

//! Tests that run guests on rvmm: the guest images (through rvmm-run, against the
//! outputs the host's KVM produced), and small guests built here through the library.

use crate::ktap::Outcome;
use crate::{check, sys, Ctx};
use rvmm::guest::{setup, EntryMode, GuestMem};
use rvmm::{Exit, Rvmm};
use std::path::Path;
use std::process::Command;

const CODE: u64 = 0x1000;
/// Where the initramfs keeps the guest images and their expected outputs.
const GUESTS: &str = "/lib/rvmm/guests";

/// A VM with 2 MiB of memory holding `code` at 0x1000, vCPUs in flat 32-bit protected
/// mode with paging off.
struct TinyVm {
    vm: rvmm::Vm,
    _mem: GuestMem,
    regs: rvmm::uapi::Regs,
    sregs: rvmm::uapi::Sregs,
}

impl TinyVm {
    fn new(code: &[u8]) -> Result<Self, String> {
        let mut mem = GuestMem::new(2 << 20).map_err(|e| e.to_string())?;
        mem.write(CODE, code)?;
        let (regs, sregs) = setup(&mut mem, EntryMode::Protected, CODE, 0x1f_fff0)?;
        let vm = Rvmm::open(crate::DEV)
            .and_then(Rvmm::create_vm)
            .map_err(|e| e.to_string())?;
        // SAFETY: `mem` lives as long as the VM (both in this struct; the VM drops first).
        unsafe { vm.set_memory_region(0, 0, mem.size() as u64, mem.host_addr(), false) }
            .map_err(|e| e.to_string())?;
        Ok(Self {
            vm,
            _mem: mem,
            regs,
            sregs,
        })
    }

    fn vcpu(&self, id: u32) -> Result<rvmm::Vcpu<'_>, String> {
        let vcpu = self.vm.create_vcpu(id).map_err(|e| e.to_string())?;
        vcpu.set_sregs(&self.sregs).map_err(|e| e.to_string())?;
        vcpu.set_regs(&self.regs).map_err(|e| e.to_string())?;
        Ok(vcpu)
    }
}

/// Every image in the guests directory against its expected serial output and status.
pub fn guest_images(_: &Ctx) -> Outcome {
    let dir = Path::new(GUESTS);
    let mut n = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_none_or(|e| e != "elf") {
            continue;
        }
        let want_out = std::fs::read_to_string(path.with_extension("out"))
            .map_err(|e| format!("{}.out: {e}", path.display()))?;
        let want_rc: i32 = std::fs::read_to_string(path.with_extension("rc"))
            .map_err(|e| e.to_string())?
            .trim()
            .parse()
            .map_err(|e| format!("{e}"))?;
        let out = Command::new("rvmm-run")
            .arg("run")
            .arg(&path)
            .output()
            .map_err(|e| format!("rvmm-run: {e}"))?;
        let got = String::from_utf8_lossy(&out.stdout);
        if got != want_out {
            crate::ktap::diag(&format!(
                "{} on rvmm:\n{got}\nexpected (KVM on the host):\n{want_out}",
                path.display()
            ));
            return Err(format!(
                "{}: serial output differs from KVM's",
                path.display()
            ));
        }
        check(out.status.code() == Some(want_rc), || {
            format!(
                "{}: exit status {:?}, want {want_rc}; stderr: {}",
                path.display(),
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        n += 1;
    }
    check(n >= 2, || {
        format!("only {n} guest images found in {}", dir.display())
    })?;
    crate::ktap::diag(&format!("{n} guest images gave KVM's output and status"));
    Ok(())
}

/// OUT of a byte to 0xf4, then HLT.
fn out_hlt(byte: u8) -> [u8; 6] {
    [0xb0, byte, 0xe6, 0xf4, 0xf4, 0x90]
}

pub fn io_and_hlt_exits(_: &Ctx) -> Outcome {
    let vm = TinyVm::new(&out_hlt(0x5a))?;
    let vcpu = vm.vcpu(0)?;
    let e = vcpu.run().map_err(|e| e.to_string())?;
    check(
        e == Exit::IoOut {
            port: 0xf4,
            size: 1,
            data: 0x5a,
        },
        || format!("first exit {e:?}"),
    )?;
    let e = vcpu.run().map_err(|e| e.to_string())?;
    check(e == Exit::Hlt, || format!("second exit {e:?}"))?;
    let rip = vcpu.regs().map_err(|e| e.to_string())?.rip;
    check(rip == CODE + 5, || {
        format!("RIP {rip:#x} after HLT, want {:#x}", CODE + 5)
    })
}

pub fn io_in_round_trip(_: &Ctx) -> Outcome {
    // in al, 0x60; out 0xf4, al; hlt
    let vm = TinyVm::new(&[0xe4, 0x60, 0xe6, 0xf4, 0xf4])?;
    let vcpu = vm.vcpu(0)?;
    let e = vcpu.run().map_err(|e| e.to_string())?;
    check(
        e == Exit::IoIn {
            port: 0x60,
            size: 1,
        },
        || format!("first exit {e:?}"),
    )?;
    vcpu.set_io_in(0xa7);
    let e = vcpu.run().map_err(|e| e.to_string())?;
    check(
        e == Exit::IoOut {
            port: 0xf4,
            size: 1,
            data: 0xa7,
        },
        || format!("the guest did not get the IN value back: {e:?}"),
    )
}

pub fn mmio_round_trip(_: &Ctx) -> Outcome {
    let code = [
        0xc7, 0x05, 0x00, 0x00, 0x00, 0xd0, 0x78, 0x56, 0x34,
        0x12, // mov dword [0xd0000000], 0x12345678
        0x8b, 0x05, 0x04, 0x00, 0x00, 0xd0, // mov eax, [0xd0000004]
        0x88, 0x25, 0x08, 0x00, 0x00, 0xd0, // mov [0xd0000008], ah
        0xf4, // hlt
    ];
    let vm = TinyVm::new(&code)?;
    let vcpu = vm.vcpu(0)?;
    let run = || vcpu.run().map_err(|e| e.to_string());
    let e = run()?;
    check(
        e == Exit::Mmio {
            addr: 0xd000_0000,
            len: 4,
            is_write: true,
            data: 0x1234_5678,
        },
        || format!("store: {e:?}"),
    )?;
    let e = run()?;
    check(
        matches!(
            e,
            Exit::Mmio {
                addr: 0xd000_0004,
                len: 4,
                is_write: false,
                ..
            }
        ),
        || format!("load: {e:?}"),
    )?;
    vcpu.set_mmio_data(0xcafe_a55a);
    let e = run()?;
    check(
        e == Exit::Mmio {
            addr: 0xd000_0008,
            len: 1,
            is_write: true,
            data: 0xa5,
        },
        || format!("the load's value did not reach EAX: {e:?}"),
    )?;
    check(run()? == Exit::Hlt, || "HLT".into())?;
    let rax = vcpu.regs().map_err(|e| e.to_string())?.rax;
    check(rax == 0xcafe_a55a, || format!("EAX {rax:#x}"))?;
    let stats = vm.vm.stats().map_err(|e| e.to_string())?;
    check(
        stats.mmio_exits == 3 && stats.exits[12] == 1 && stats.user_exits == 4,
        || {
            format!(
                "counters: mmio {}, HLT {}, to user {}",
                stats.mmio_exits, stats.exits[12], stats.user_exits
            )
        },
    )
}

pub fn triple_fault_is_shutdown(_: &Ctx) -> Outcome {
    // ud2 with an empty IDT: #UD -> #GP -> #DF -> shutdown.
    let vm = TinyVm::new(&[0x0f, 0x0b])?;
    let vcpu = vm.vcpu(0)?;
    let e = vcpu.run().map_err(|e| e.to_string())?;
    check(e == Exit::Shutdown, || {
        format!("exit {e:?}, want a shutdown")
    })?;
    crate::status_all_ok(
        &Rvmm::open(crate::DEV)
            .and_then(|d| d.status())
            .map_err(|e| e.to_string())?,
    )
}

pub fn bad_guest_state_fails_entry(_: &Ctx) -> Outcome {
    let vm = TinyVm::new(&out_hlt(1))?;
    let vcpu = vm.vcpu(0)?;
    let mut s = vcpu.sregs().map_err(|e| e.to_string())?;
    s.cr0 = (s.cr0 & !1) | (1 << 31); // PG without PE
    vcpu.set_sregs(&s).map_err(|e| e.to_string())?;
    let e = vcpu.run().map_err(|e| e.to_string())?;
    match e {
        Exit::FailEntry {
            reason: 0x8000_0021,
            vmfail: false,
            check: 1,
        } => Ok(()),
        other => Err(format!(
            "exit {other:?}, want a failed entry (invalid guest state, check 1)"
        )),
    }
}

extern "C" fn on_sigusr1(_: i32) {}

pub fn signal_interrupts_spinning_guest(_: &Ctx) -> Outcome {
    // SAFETY: installs a no-op handler without SA_RESTART.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigusr1 as *const () as usize;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    // sti; jmp . (IF = 1: Bochs 2.7 takes no external-interrupt exit from a guest with
    // IF = 0, though the SDM says it should; see vcpu/exit.rs.)
    let vm = TinyVm::new(&[0xfb, 0xeb, 0xfe])?;
    let vcpu = vm.vcpu(0)?;
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() } as usize;
    for round in 0..2 {
        let kicker = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            // SAFETY: `me` is the test thread, alive until we join.
            unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR1) };
        });
        let e = vcpu.run().map_err(|e| e.to_string());
        kicker.join().map_err(|_| "kicker thread panicked")?;
        check(e == Ok(Exit::Interrupted), || {
            format!("round {round}: {e:?}, want EINTR")
        })?;
    }
    let rip = vcpu.regs().map_err(|e| e.to_string())?.rip;
    check(rip == CODE + 1, || {
        format!("RIP {rip:#x} of the spinning guest")
    })
}

pub fn two_vms_two_vcpus(_: &Ctx) -> Outcome {
    let a = TinyVm::new(&out_hlt(0xa))?;
    let b = TinyVm::new(&out_hlt(0xb))?;
    let a0 = a.vcpu(0)?;
    let b0 = b.vcpu(0)?;
    // Two VMs interleaved on one thread...
    check(
        a0.run().ok()
            == Some(Exit::IoOut {
                port: 0xf4,
                size: 1,
                data: 0xa,
            }),
        || "VM a".into(),
    )?;
    check(
        b0.run().ok()
            == Some(Exit::IoOut {
                port: 0xf4,
                size: 1,
                data: 0xb,
            }),
        || "VM b".into(),
    )?;
    check(
        a0.run().ok() == Some(Exit::Hlt) && b0.run().ok() == Some(Exit::Hlt),
        || "HLT".into(),
    )?;
    drop((a0, b0));
    // ...and two vCPUs of one VM on two threads at once.
    let c = TinyVm::new(&out_hlt(0xc))?;
    let vcpus = [c.vcpu(0)?, c.vcpu(1)?];
    let results: Vec<Result<Vec<Exit>, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = vcpus
            .iter()
            .map(|v| {
                s.spawn(move || -> Result<Vec<Exit>, String> {
                    Ok(vec![
                        v.run().map_err(|e| e.to_string())?,
                        v.run().map_err(|e| e.to_string())?,
                    ])
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or(Err("thread panicked".into())))
            .collect()
    });
    for (i, r) in results.into_iter().enumerate() {
        let r = r?;
        check(
            r == vec![
                Exit::IoOut {
                    port: 0xf4,
                    size: 1,
                    data: 0xc,
                },
                Exit::Hlt,
            ],
            || format!("vcpu {i}: {r:?}"),
        )?;
    }
    Ok(())
}

pub fn kill_mid_run_frees_everything(_: &Ctx) -> Outcome {
    let before = sys::meminfo_kb("MemFree").unwrap_or(0);
    for _ in 0..3 {
        let pid = sys::fork_child(|| {
            let vm = TinyVm::new(&[0xfb, 0xeb, 0xfe])?;
            let vcpu = vm.vcpu(0)?;
            let _ = vcpu.run();
            Err("the spinning guest returned".into())
        })?;
        std::thread::sleep(std::time::Duration::from_millis(300));
        // SAFETY: our child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let mut status = 0;
        // SAFETY: waits for our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        check(libc::WIFSIGNALED(status), || {
            format!("child status {status:#x}")
        })?;
    }
    let after = sys::meminfo_kb("MemFree").unwrap_or(0);
    crate::ktap::diag(&format!(
        "MemFree {before} kB before, {after} kB after 3 killed VMs"
    ));
    // Each VM pins 2 MiB and holds a 1 MiB shadow pool: three leaked VMs would be ~9 MiB.
    check(after + 4096 >= before, || {
        format!("{} kB less free memory after the VMs died", before - after)
    })?;
    crate::status_all_ok(
        &Rvmm::open(crate::DEV)
            .and_then(|d| d.status())
            .map_err(|e| e.to_string())?,
    )
}
