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
                "{}: serial output differs from the expected one",
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
    crate::ktap::diag(&format!(
        "{n} guest images gave the expected output and status"
    ));
    Ok(())
}

/// Loads KVM with ept=0 (shadow paging, as rvmm), for runs to compare with.
pub(crate) fn load_kvm_ept0(ctx: &Ctx) -> Result<(), String> {
    for (ko, name, params) in [
        ("irqbypass.ko", "irqbypass", c""),
        ("kvm.ko", "kvm", c""),
        ("kvm-intel.ko", "kvm_intel", c"ept=0"),
    ] {
        if !sys::module_loaded(name) {
            sys::insmod_with(&ctx.ko(ko), params).map_err(|e| format!("insmod {ko}: {e}"))?;
        }
    }
    Ok(())
}

/// Unloads what `load_kvm_ept0` loaded.
pub(crate) fn unload_kvm() -> Result<(), String> {
    for name in ["kvm_intel", "kvm", "irqbypass"] {
        sys::rmmod(name).map_err(|e| format!("rmmod {name}: {e}"))?;
    }
    Ok(())
}

/// Images KVM with ept=0 cannot run in Bochs, with the exit status it ends with and
/// what stops it. The differential checks that KVM still ends so (an entry that no
/// longer holds must go) and compares rvmm with the recorded final state alone.
const KVM_EPT0_CANNOT: &[(&str, i32, &str)] = &[(
    "realmode32.elf",
    5,
    "at its first real-mode INT n it ends with KVM_INTERNAL_ERROR_SIMUL_EX (suberror \
     2): Bochs reports the #GP that INT n raises in virtual-8086 mode as an exit during \
     the interrupt's delivery (rvmm ignores that information in its vm86)",
)];

/// One run of an image through rvmm-run: serial output, exit status, final state line
/// (and, for a run that failed, rvmm-run's error line after it).
fn run_image(path: &Path, kvm: bool) -> Result<(String, Option<i32>, String), String> {
    let mut cmd = Command::new("rvmm-run");
    cmd.args(["run", "--dump-regs"]);
    if kvm {
        cmd.arg("--kvm");
    }
    let out = cmd
        .arg(path)
        .output()
        .map_err(|e| format!("rvmm-run: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut state = stderr
        .lines()
        .find_map(|l| l.strip_prefix("rvmm-run: final state: "))
        .ok_or_else(|| format!("{}: no final state from rvmm-run: {stderr}", path.display()))?
        .to_owned();
    if let Some(err) = stderr.lines().find(|l| l.contains("cannot handle an exit")) {
        state = format!("{state}\n{err}");
    }
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code(),
        state,
    ))
}

/// Differential run: every guest image on rvmm and on KVM with ept=0 (shadow paging),
/// in this same machine: serial output, exit status and the final architectural state
/// (general registers, RIP, RFLAGS, CR0/CR3/CR4/EFER) must be identical, and equal to
/// the state recorded in expected/NAME.state (which the host's KVM checks too, where it
/// can run the image).
pub fn guest_images_differential(ctx: &Ctx) -> Outcome {
    load_kvm_ept0(ctx)?;
    let ept = std::fs::read_to_string("/sys/module/kvm_intel/parameters/ept")
        .map_err(|e| format!("kvm_intel ept parameter: {e}"))?;
    let result = (|| {
        check(ept.trim() == "N", || {
            format!("kvm_intel has ept={}", ept.trim())
        })?;
        let dir = Path::new(GUESTS);
        let mut n = 0;
        let mut bad = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.extension().is_none_or(|e| e != "elf") {
                continue;
            }
            n += 1;
            let rvmm = run_image(&path, false)?;
            let kvm = run_image(&path, true)?;
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let known = KVM_EPT0_CANNOT.iter().find(|k| k.0 == name);
            if let Some((_, status, why)) = known {
                if kvm.1 != Some(*status) {
                    bad.push(format!(
                        "{}: KVM ept=0 ended with {:?}, not the {status} recorded ({why})",
                        path.display(),
                        kvm.1
                    ));
                    continue;
                }
                crate::ktap::diag(&format!(
                    "{}: KVM ept=0 cannot run it ({why}: {}); rvmm against the recorded state",
                    path.display(),
                    kvm.2.replace('\n', "; ")
                ));
            } else if rvmm != kvm {
                crate::ktap::diag(&format!(
                    "{}:\n-- rvmm (status {:?}):\n{}\n{}\n-- KVM ept=0 (status {:?}):\n{}\n{}",
                    path.display(),
                    rvmm.1,
                    rvmm.0,
                    rvmm.2,
                    kvm.1,
                    kvm.0,
                    kvm.2
                ));
                bad.push(format!("{}: rvmm and KVM ept=0 differ", path.display()));
                continue;
            }
            let want = std::fs::read_to_string(path.with_extension("state"))
                .map_err(|e| format!("{}.state: {e}", path.display()))?;
            if want.trim() != rvmm.2 {
                crate::ktap::diag(&format!(
                    "{}: final state {}\n  differs from the recorded {}",
                    path.display(),
                    rvmm.2,
                    want.trim()
                ));
                bad.push(format!(
                    "{}: final state differs from the recorded one",
                    path.display()
                ));
            }
        }
        check(n >= 2, || {
            format!("only {n} guest images found in {}", dir.display())
        })?;
        check(bad.is_empty(), || bad.join("; "))?;
        crate::ktap::diag(&format!(
            "{n} guest images: rvmm and KVM ept=0 gave the same output, status and final state"
        ));
        Ok(())
    })();
    unload_kvm()?;
    result
}

/// Where the initramfs keeps the benchmark guests.
const BENCH: &str = "/lib/rvmm/bench";

/// Per scenario of a benchmark run: its name and its counters per operation.
type BenchResults = Vec<(String, Vec<(String, f64)>)>;

/// `rvmm-run bench run IMAGE`: per scenario, the counters per operation.
fn bench_counters(image: &str) -> Result<BenchResults, String> {
    let out = Command::new("rvmm-run")
        .args(["bench", "run"])
        .arg(Path::new(BENCH).join(image))
        .output()
        .map_err(|e| format!("rvmm-run: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    check(out.status.success(), || {
        format!(
            "rvmm-run bench run {image}: {:?}: {}{text}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let mut v = Vec::new();
    for line in text.lines() {
        crate::ktap::diag(line);
        // "rvmm SCENARIO ticks/op N ops N per op: k=v k=v ..."
        let mut words = line.split_whitespace();
        let (Some(_), Some(scenario)) = (words.next(), words.next()) else {
            continue;
        };
        let counters = line
            .split_once("per op:")
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .filter_map(|kv| {
                        let (k, x) = kv.split_once('=')?;
                        Some((k.to_owned(), x.parse().ok()?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.push((scenario.to_owned(), counters));
    }
    Ok(v)
}

fn counter(c: &[(String, f64)], name: &str) -> f64 {
    c.iter().find(|(k, _)| k == name).map_or(0.0, |(_, x)| *x)
}

/// The CR3 cache: after a warm-up, a switch among 1, 4, 16 and 64 address spaces is
/// one exit (the MOV CR3), a root-cache hit, no shadow fault and no new root.
pub fn cr3_cache_warm_switch(_: &Ctx) -> Outcome {
    let results = bench_counters("cr3_64.elf")?;
    check(results.len() == 4, || {
        format!("{} results, want 4", results.len())
    })?;
    for (scenario, c) in &results {
        check(
            counter(c, "exits") == 1.0
                && counter(c, "exit:CR_access") == 1.0
                && counter(c, "root_hits") == 1.0
                && counter(c, "root_misses") == 0.0
                && counter(c, "shadow_faults") == 0.0,
            || format!("{scenario}: per switch {c:?}; want 1 exit (CR), 1 root hit, no fault"),
        )?;
    }
    Ok(())
}

/// Fork-like copy and write-protect of 4 MiB: the guest's writes to shadowed tables
/// unsync them (no emulation), CR3 loads resync them, the roots are cache hits, and the
/// guest sees its own 128 copy-on-write faults per fork.
pub fn pool_fork_unsync_resync(_: &Ctx) -> Outcome {
    let results = bench_counters("fork64.elf")?;
    let (_, c) = results.first().ok_or("no result")?;
    check(
        counter(c, "pt_writes") >= 1.0
            && counter(c, "unsyncs") >= 1.0
            && counter(c, "resyncs") >= 1.0
            && counter(c, "root_hits") >= 2.0
            && counter(c, "root_misses") == 0.0
            && counter(c, "guest_page_faults") == 128.0,
        || format!("per fork {c:?}"),
    )
}

/// Page tables reused as data are unshadowed (write flooding) and the guest still sees
/// exactly what it wrote; a data page turned back into a table is shadowed again.
pub fn pool_table_reuse(_: &Ctx) -> Outcome {
    let out = Command::new("rvmm-run")
        .args(["run", "--stats"])
        .arg(Path::new(GUESTS).join("ptreuse64.elf"))
        .output()
        .map_err(|e| format!("rvmm-run: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    check(stdout.ends_with("page-directory entry: ok\n"), || {
        format!("ptreuse64 printed {stdout:?}")
    })?;
    let pool = stderr
        .lines()
        .find(|l| l.starts_with("rvmm-run: pool:"))
        .ok_or_else(|| format!("no pool counters in {stderr}"))?;
    crate::ktap::diag(pool);
    let field = |name: &str| -> u64 {
        pool.split(name)
            .nth(1)
            .and_then(|r| r.trim_start().split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    check(
        field("flood unshadows") >= 1 && field("page-table writes") >= 1,
        || format!("want flood unshadows and page-table writes: {pool}"),
    )
}

/// Two vCPUs of one VM on two threads share the VM's shadow page pool: one remaps a page
/// 200 times through a write to a shadowed page table (emulated or unsynced), the other
/// flushes with MOV CR3 after each and must read the new page (smp64.bin checks it).
pub fn smp_shared_page_tables(_: &Ctx) -> Outcome {
    let code = std::fs::read(Path::new(GUESTS).join("smp64.bin"))
        .map_err(|e| format!("smp64.bin: {e}"))?;
    let mut mem = GuestMem::new(16 << 20).map_err(|e| e.to_string())?;
    mem.write(0x10_0000, &code)?;
    let (regs, sregs) = setup(&mut mem, EntryMode::Long, 0x10_0000, 0xff_fff0)?;
    let vm = Rvmm::open(crate::DEV)
        .and_then(Rvmm::create_vm)
        .map_err(|e| e.to_string())?;
    // SAFETY: `mem` outlives the VM (dropped after it, below).
    unsafe { vm.set_memory_region(0, 0, mem.size() as u64, mem.host_addr(), false) }
        .map_err(|e| e.to_string())?;
    let mut vcpus = Vec::new();
    for i in 0..2u32 {
        let v = vm.create_vcpu(i).map_err(|e| e.to_string())?;
        v.set_sregs(&sregs).map_err(|e| e.to_string())?;
        let mut r = regs;
        r.rdi = u64::from(i);
        r.rsp = 0xff_fff0 - 0x10_0000 * u64::from(i);
        v.set_regs(&r).map_err(|e| e.to_string())?;
        vcpus.push(v);
    }
    let results: Vec<Result<Exit, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = vcpus
            .iter()
            .map(|v| {
                s.spawn(move || -> Result<Exit, String> {
                    loop {
                        match v.run().map_err(|e| e.to_string())? {
                            // Serial output, if any: ignored.
                            Exit::IoOut { port, .. } if port != 0xf4 => {}
                            e => return Ok(e),
                        }
                    }
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or(Err("thread panicked".into())))
            .collect()
    });
    let stats = vm.stats().map_err(|e| e.to_string())?;
    crate::ktap::diag(&format!(
        "pool: page-table writes {} ({} emulated), unsyncs {}, resyncs {}, root hits {}, \
         misses {}; shadow faults {}, whole-shadow drops {}, exits {}",
        stats.pt_writes,
        stats.pt_emulated,
        stats.unsyncs,
        stats.resyncs,
        stats.root_hits,
        stats.root_misses,
        stats.shadow_faults,
        stats.shadow_resets,
        stats.exits.iter().sum::<u64>()
    ));
    let writer = results[0].clone()?;
    let reader = results[1].clone()?;
    check(
        writer
            == Exit::IoOut {
                port: 0xf4,
                size: 1,
                data: 0x2a,
            },
        || format!("vCPU 0 ended with {writer:?} (0x2b: vCPU 1 read a stale page)"),
    )?;
    check(reader == Exit::Hlt, || {
        format!("vCPU 1 ended with {reader:?}")
    })?;
    check(stats.pt_writes >= 20, || {
        format!("only {} page-table writes trapped", stats.pt_writes)
    })?;
    drop(vcpus);
    drop(vm);
    drop(mem);
    Ok(())
}

/// RVMM_SET_SHADOW_LIMITS: checked, only before the first vCPU; a 64-page pool with 2
/// cached roots still runs 64 address spaces right (reclaiming), and cr3_64 ends well.
pub fn shadow_limits(_: &Ctx) -> Outcome {
    let vm = Rvmm::open(crate::DEV)
        .and_then(Rvmm::create_vm)
        .map_err(|e| e.to_string())?;
    let errno = |r: rvmm::Result<()>| match r {
        Ok(()) => 0,
        Err(rvmm::Error::Ioctl { source, .. }) => source.raw_os_error().unwrap_or(-1),
        Err(_) => -1,
    };
    check(errno(vm.set_shadow_limits(63, 0)) == libc::EINVAL, || {
        "63 pages accepted".into()
    })?;
    check(errno(vm.set_shadow_limits(0, 65)) == libc::EINVAL, || {
        "65 roots accepted".into()
    })?;
    check(errno(vm.set_shadow_limits(64, 2)) == 0, || {
        "64 pages, 2 roots refused".into()
    })?;
    let _v = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    check(errno(vm.set_shadow_limits(128, 0)) == libc::EBUSY, || {
        "limits changed after a vCPU exists".into()
    })?;
    let out = Command::new("rvmm-run")
        .args([
            "run",
            "--stats",
            "--shadow-pages",
            "64",
            "--shadow-roots",
            "2",
        ])
        .arg(Path::new(BENCH).join("cr3_64.elf"))
        .output()
        .map_err(|e| format!("rvmm-run: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let pool = stderr
        .lines()
        .find(|l| l.starts_with("rvmm-run: pool:"))
        .ok_or_else(|| format!("no pool counters: {stderr}"))?;
    crate::ktap::diag(pool);
    check(out.status.code() == Some(1), || {
        format!(
            "cr3_64 with a 64-page pool: status {:?}: {stderr}",
            out.status.code()
        )
    })?;
    let reclaimed = pool
        .split("reclaimed ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    check(reclaimed > 0, || format!("nothing reclaimed: {pool}"))
}

/// A multiboot kernel gets the bootloader magic, the command line after its path, its
/// modules' contents and a memory map, and switches itself to long mode from paging off.
pub fn multiboot_modules_and_cmdline(_: &Ctx) -> Outcome {
    let dir = Path::new(GUESTS);
    let out = Command::new("rvmm-run")
        .args(["run", "--append", "x=1 y", "--module"])
        .arg(dir.join("hello64.out"))
        .arg("--initrd")
        .arg(dir.join("pcid64.out"))
        .arg(dir.join("mboot32.elf"))
        .output()
        .map_err(|e| format!("rvmm-run: {e}"))?;
    let got = String::from_utf8_lossy(&out.stdout);
    let want = "mboot32: multiboot magic ok\nmem_upper: 15360 KiB\nargs: x=1 y\nmodules: 2\n\
                module: hello from a 64-bit guest\nmodule: pcid64: CR4.PCIDE on\n\
                mmap entries: 4\nlong mode: ok\n";
    check(got == want && out.status.code() == Some(93), || {
        format!(
            "status {:?}, output {got:?}; stderr {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    // A module for an image without a multiboot header is refused, with a reason.
    let out = Command::new("rvmm-run")
        .args(["run", "--module"])
        .arg(dir.join("hello64.out"))
        .arg(dir.join("hello64.elf"))
        .output()
        .map_err(|e| format!("rvmm-run: {e}"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    check(
        out.status.code() == Some(2) && err.contains("need a multiboot image"),
        || format!("status {:?}: {err}", out.status.code()),
    )
}

/// rvmm-run's --append reaches the guest (hello64 echoes it).
pub fn command_line_reaches_guest(_: &Ctx) -> Outcome {
    let out = Command::new("rvmm-run")
        .args(["--append", "console=ttyS0 rvmm=1"])
        .arg(Path::new(GUESTS).join("hello64.elf"))
        .output()
        .map_err(|e| format!("rvmm-run: {e}"))?;
    let got = String::from_utf8_lossy(&out.stdout);
    check(
        got.starts_with("console=ttyS0 rvmm=1\nhello from a 64-bit guest\n"),
        || format!("guest printed {got:?}"),
    )
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

pub fn cpuid_values_as_set(_: &Ctx) -> Outcome {
    // cpuid with eax=1, then eax=0x4000_1234, then hlt.
    let code = [
        0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0xa2, 0x89, 0xce, // mov eax,1; cpuid; mov esi,ecx
        0xb8, 0x34, 0x12, 0x00, 0x40, 0x0f, 0xa2, 0xf4, // mov eax,0x40001234; cpuid; hlt
    ];
    let vm = TinyVm::new(&code)?;
    let vcpu = vm.vcpu(0)?;
    let e = rvmm::uapi::CpuidEntry {
        function: 0x4000_1234,
        eax: 0x1111,
        ebx: 0x2222,
        ecx: 0x3333,
        edx: 0x4444,
        ..Default::default()
    };
    vcpu.set_cpuid(&[e]).map_err(|e| e.to_string())?;
    check(vcpu.run().map_err(|e| e.to_string())? == Exit::Hlt, || {
        "no HLT".into()
    })?;
    let r = vcpu.regs().map_err(|e| e.to_string())?;
    check(r.rsi & (1 << 5) == 0 && r.rsi & (1 << 31) != 0, || {
        format!(
            "leaf 1 ECX {:#x}: VMX must be hidden, hypervisor bit set",
            r.rsi
        )
    })?;
    check(
        (r.rax, r.rbx, r.rcx, r.rdx) == (0x1111, 0x2222, 0x3333, 0x4444),
        || {
            format!(
                "leaf 0x40001234 gave {:#x} {:#x} {:#x} {:#x}",
                r.rax, r.rbx, r.rcx, r.rdx
            )
        },
    )
}

pub fn msrs_get_set(_: &Ctx) -> Outcome {
    // rdmsr LSTAR (0xc0000082); hlt
    let vm = TinyVm::new(&[0xb9, 0x82, 0x00, 0x00, 0xc0, 0x0f, 0x32, 0xf4])?;
    let vcpu = vm.vcpu(0)?;
    let set = [
        (0xc000_0082, 0xffff_8000_1234_5678u64),
        (0xc000_0081, 0x0023_0010_0000_0000),
        (0x277, 0x0007_0406_0007_0406),
    ];
    let n = vcpu.set_msrs(&set).map_err(|e| e.to_string())?;
    check(n == 3, || format!("{n} of 3 MSRs written"))?;
    let got = vcpu
        .get_msrs(&[0xc000_0082, 0xc000_0081, 0x277])
        .map_err(|e| e.to_string())?;
    check(
        got == vec![
            0xffff_8000_1234_5678,
            0x0023_0010_0000_0000,
            0x0007_0406_0007_0406,
        ],
        || format!("read back {got:x?}"),
    )?;
    // A non-canonical LSTAR and an MSR rvmm does not know stop the list there.
    check(
        vcpu.set_msrs(&[(0x277, 6), (0xc000_0082, 1 << 60)]).ok() == Some(1),
        || "non-canonical LSTAR accepted".into(),
    )?;
    check(
        vcpu.get_msrs(&[0xc000_0080, 0x1234_5678])
            .map_err(|e| e.to_string())?
            .len()
            == 1,
        || "unknown MSR read".into(),
    )?;
    check(vcpu.run().map_err(|e| e.to_string())? == Exit::Hlt, || {
        "no HLT".into()
    })?;
    let r = vcpu.regs().map_err(|e| e.to_string())?;
    check((r.rdx << 32 | r.rax) == 0xffff_8000_1234_5678, || {
        format!("guest RDMSR gave {:#x}:{:#x}", r.rdx, r.rax)
    })
}

/// A guest with an IDT whose vectors 6 and 0x40 report themselves on port 0xf4.
fn idt_guest(body: &[u8]) -> Result<TinyVm, String> {
    let mut code = vec![0u8; 0x200];
    // lidt [0x1180]
    code[..7].copy_from_slice(&[0x0f, 0x01, 0x1d, 0x80, 0x11, 0x00, 0x00]);
    code[7..7 + body.len()].copy_from_slice(body);
    // Handlers at 0x1100 (vector 6) and 0x1110 (vector 0x40): mov al, v; out 0xf4, al; hlt.
    code[0x100..0x105].copy_from_slice(&[0xb0, 0x06, 0xe6, 0xf4, 0xf4]);
    code[0x110..0x115].copy_from_slice(&[0xb0, 0x40, 0xe6, 0xf4, 0xf4]);
    // IDTR at 0x1180: limit, base 0x3000.
    code[0x180..0x186].copy_from_slice(&[0xff, 0x07, 0x00, 0x30, 0x00, 0x00]);
    let vm = TinyVm::new(&code)?;
    Ok(vm)
}

fn gate(vm: &mut TinyVm, vector: u64, handler: u32) -> Result<(), String> {
    let g: u64 = u64::from(handler & 0xffff)
        | (0x18 << 16)
        | (0x8e00u64 << 32)
        | (u64::from(handler >> 16) << 48);
    vm._mem.write_u64(0x3000 + 8 * vector, g)
}

pub fn interrupt_and_exception_injection(_: &Ctx) -> Outcome {
    // cli; out 0x10, al; sti; nop; jmp .
    let mut vm = idt_guest(&[0xfa, 0xe6, 0x10, 0xfb, 0x90, 0xeb, 0xfe])?;
    gate(&mut vm, 6, 0x1100)?;
    gate(&mut vm, 0x40, 0x1110)?;
    let vcpu = vm.vcpu(0)?;
    let run = || vcpu.run().map_err(|e| e.to_string());
    check(matches!(run()?, Exit::IoOut { port: 0x10, .. }), || {
        "no OUT".into()
    })?;
    check(!vcpu.ready_for_interrupt(), || {
        "ready for an interrupt with IF = 0".into()
    })?;
    vcpu.request_interrupt_window(true);
    let e = run()?;
    check(e == Exit::IrqWindowOpen, || {
        format!("{e:?}, want the interrupt window")
    })?;
    vcpu.request_interrupt_window(false);
    vcpu.interrupt(0x40).map_err(|e| e.to_string())?;
    let e = run()?;
    check(
        e == Exit::IoOut {
            port: 0xf4,
            size: 1,
            data: 0x40,
        },
        || format!("{e:?}: the interrupt did not reach its handler"),
    )?;
    check(vcpu.interrupt(7).is_err(), || {
        "vector 7 accepted as an external interrupt".into()
    })?;
    check(vcpu.inject_exception(13, None).is_err(), || {
        "#GP without an error code accepted".into()
    })?;
    vcpu.inject_exception(6, None).map_err(|e| e.to_string())?;
    let e = run()?;
    check(
        e == Exit::IoOut {
            port: 0xf4,
            size: 1,
            data: 6,
        },
        || format!("{e:?}: #UD did not reach its handler"),
    )
}

pub fn string_io(_: &Ctx) -> Outcome {
    let mut code = vec![
        0xbe, 0x00, 0x12, 0x00, 0x00, // mov esi, 0x1200
        0xb9, 0x04, 0x00, 0x00, 0x00, // mov ecx, 4
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xf3, 0x6e, // rep outsb
        0xbf, 0x00, 0x13, 0x00, 0x00, // mov edi, 0x1300
        0x6c, // insb
        0x6c, // insb
        0xf4, // hlt
    ];
    code.resize(0x200, 0);
    code.extend_from_slice(b"rvmm"); // at 0x1200
    let vm = TinyVm::new(&code)?;
    let vcpu = vm.vcpu(0)?;
    let (mut out, mut ins) = (Vec::new(), 0u32);
    loop {
        match vcpu.run().map_err(|e| e.to_string())? {
            Exit::IoOut {
                port: 0x3f8,
                size: 1,
                data,
            } => out.push(data as u8),
            Exit::IoIn {
                port: 0x3f8,
                size: 1,
            } => {
                ins += 1;
                vcpu.set_io_in(0x40 + ins);
            }
            Exit::Hlt => break,
            other => return Err(format!("unexpected exit {other:?}")),
        }
        check(out.len() <= 4 && ins <= 2, || {
            format!("too many exits: {out:?}, {ins} INs")
        })?;
    }
    check(out == b"rvmm", || format!("rep outsb sent {out:?}"))?;
    let r = vcpu.regs().map_err(|e| e.to_string())?;
    check(r.rcx == 0 && r.rsi == 0x1204 && r.rdi == 0x1302, || {
        format!("RCX {:#x} RSI {:#x} RDI {:#x}", r.rcx, r.rsi, r.rdi)
    })?;
    let mut got = [0u8; 2];
    vm._mem.read(0x1300, &mut got)?;
    check(got == [0x41, 0x42], || format!("insb stored {got:x?}"))
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
    // cli; jmp . : with interrupts off in the guest (Bochs 2.7 takes no external-interrupt
    // exit then; rvmm's VMX-preemption timer must give the CPU back).
    let vm = TinyVm::new(&[0xfa, 0xeb, 0xfe])?;
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
            let vm = TinyVm::new(&[0xfa, 0xeb, 0xfe])?;
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

/// kmemleak (when the kernel has it) finds no unreferenced object allocated by rvmm, after
/// every test before this one created and tore down VMs, vCPUs and memory slots.
pub fn no_kmemleak_reports(_: &Ctx) -> Outcome {
    let path = Path::new("/sys/kernel/debug/kmemleak");
    if !path.exists() {
        return Err(format!("{}this kernel has no kmemleak", crate::ktap::SKIP));
    }
    // Objects younger than 5 s are never reported.
    std::thread::sleep(std::time::Duration::from_secs(6));
    for _ in 0..2 {
        std::fs::write(path, "scan").map_err(|e| format!("kmemleak scan: {e}"))?;
    }
    let report = std::fs::read_to_string(path).map_err(|e| format!("kmemleak: {e}"))?;
    let total = report.matches("unreferenced object").count();
    let ours: Vec<&str> = report
        .split("unreferenced object")
        .filter(|r| r.contains("[rvmm]"))
        .collect();
    crate::ktap::diag(&format!(
        "kmemleak: {total} suspects in all, {} allocated by rvmm",
        ours.len()
    ));
    check(ours.is_empty(), || {
        format!(
            "kmemleak reports rvmm allocations:\nunreferenced object{}",
            ours[0]
        )
    })
}

/// Runs apic64.bin on `n` vCPUs of a VM with an irqchip: returns vCPU 0's serial output,
/// each vCPU's last exit, and the VM's counters. The harness answers vCPU 0's OUT to port
/// 0xf5 with an MSI (vector 0xd0 to APIC 0) through RVMM_SIGNAL_MSI.
pub(crate) fn run_apic_guest(n: u32) -> Result<(String, Vec<Exit>, rvmm::uapi::VmStats), String> {
    let code = std::fs::read(Path::new(GUESTS).join("apic64.bin"))
        .map_err(|e| format!("apic64.bin: {e}"))?;
    let mut mem = GuestMem::new(16 << 20).map_err(|e| e.to_string())?;
    mem.write(0x10_0000, &code)?;
    let (regs, sregs) = setup(&mut mem, EntryMode::Long, 0x10_0000, 0xff_fff0)?;
    let vm = Rvmm::open(crate::DEV)
        .and_then(Rvmm::create_vm)
        .map_err(|e| e.to_string())?;
    // SAFETY: `mem` outlives the VM (dropped after it, below).
    unsafe { vm.set_memory_region(0, 0, mem.size() as u64, mem.host_addr(), false) }
        .map_err(|e| e.to_string())?;
    vm.create_irqchip().map_err(|e| e.to_string())?;
    let again = vm.create_irqchip().map_err(|e| e.to_string());
    check(
        again.as_ref().is_err_and(|e| e.contains("File exists")),
        || format!("a second RVMM_CREATE_IRQCHIP gave {again:?}, not EEXIST"),
    )?;
    let mut vcpus = Vec::new();
    for i in 0..n {
        let v = vm.create_vcpu(i).map_err(|e| e.to_string())?;
        v.set_sregs(&sregs).map_err(|e| e.to_string())?;
        let mut r = regs;
        r.rdi = u64::from(i);
        r.rsi = u64::from(n);
        r.rsp = 0xff_fff0 - 0x10_0000 * u64::from(i);
        v.set_regs(&r).map_err(|e| e.to_string())?;
        vcpus.push(v);
    }
    // A watchdog: a guest that never ends is interrupted (SIGUSR1, no SA_RESTART) after
    // two minutes, so that the test fails with what the guest printed so far.
    // SAFETY: installs a no-op handler.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigusr1 as *const () as usize;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    let vm_ref = &vm;
    let threads = std::sync::Mutex::new(Vec::<usize>::new());
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let results: Vec<Result<(String, Exit), String>> = std::thread::scope(|s| {
        let threads = &threads;
        let hs: Vec<_> = vcpus
            .iter()
            .map(|v| {
                s.spawn(move || -> Result<(String, Exit), String> {
                    // SAFETY: pthread_self has no preconditions.
                    let me = unsafe { libc::pthread_self() } as usize;
                    threads.lock().unwrap().push(me);
                    let mut out = Vec::new();
                    loop {
                        match v.run().map_err(|e| e.to_string())? {
                            Exit::IoOut {
                                port: 0x3f8, data, ..
                            } => out.push(data as u8),
                            Exit::IoOut { port: 0xf5, .. } => {
                                let took = vm_ref
                                    .signal_msi(0xfee0_0000, 0xd0)
                                    .map_err(|e| e.to_string())?;
                                if took != 1 {
                                    return Err(format!("the MSI reached {took} APICs, not 1"));
                                }
                            }
                            e => return Ok((String::from_utf8_lossy(&out).into_owned(), e)),
                        }
                    }
                })
            })
            .collect();
        s.spawn(move || {
            if done_rx
                .recv_timeout(std::time::Duration::from_secs(120))
                .is_err()
            {
                for &t in threads.lock().unwrap().iter() {
                    // SAFETY: the vCPU threads live until the scope ends, after this one.
                    unsafe { libc::pthread_kill(t as libc::pthread_t, libc::SIGUSR1) };
                }
            }
        });
        let r = hs
            .into_iter()
            .map(|h| h.join().unwrap_or(Err("thread panicked".into())))
            .collect();
        let _ = done_tx.send(());
        r
    });
    for (i, v) in vcpus.iter().enumerate() {
        if let Ok(r) = v.regs() {
            crate::ktap::diag(&format!("vCPU {i} ends at RIP {:#x}", r.rip));
        }
    }
    let stats = vm.stats().map_err(|e| e.to_string())?;
    let mut serial = String::new();
    let mut exits = Vec::new();
    for r in results {
        let (s, e) = r?;
        if serial.is_empty() {
            serial = s;
        }
        exits.push(e);
    }
    drop(vcpus);
    drop(vm);
    drop(mem);
    Ok((serial, exits, stats))
}

/// The in-kernel local APIC: apic64 checks, in xAPIC and x2APIC mode, the timer's rates
/// (periodic, one-shot, TSC-deadline, within 5 % of the CPUID 0x15 clock), self-IPIs,
/// EOI order, TPR/CR8, an absent x2APIC register's #GP, an MSI from the host, and with
/// two vCPUs IPIs both ways; halted vCPUs sleep in the host.
pub fn apic_timer_ipi_eoi_tpr(_: &Ctx) -> Outcome {
    for n in [1u32, 2] {
        let (serial, exits, st) = run_apic_guest(n)?;
        for l in serial.lines() {
            crate::ktap::diag(&format!("{n} vCPU(s): {l}"));
        }
        crate::ktap::diag(&format!(
            "{n} vCPU(s): APIC injections {}, timer interrupts {}, messages {}, halt sleeps {}, \
             APIC accesses {}, exits: HLT {}, preemption timer {}, external interrupt {}, \
             exception/NMI {}, WRMSR {}, CR access {}, TPR below threshold {}, \
             NMI window {}",
            st.apic_injections,
            st.apic_timer_irqs,
            st.apic_messages,
            st.halt_sleeps,
            st.apic_accesses,
            st.exits[12],
            st.exits[52],
            st.exits[1],
            st.exits[0],
            st.exits[32],
            st.exits[28],
            st.exits[43],
            st.exits[8]
        ));
        check(
            exits[0]
                == Exit::IoOut {
                    port: 0xf4,
                    size: 1,
                    data: 0x2a,
                },
            || format!("vCPU 0 ended with {:?}: {serial}", exits[0]),
        )?;
        check(serial.contains("apic64: all ok"), || serial.clone())?;
        let want = if n == 2 { 2 } else { 0 };
        check(
            serial.matches("ipi to vcpu 1 and back").count() == want,
            || format!("{want} IPI checks expected: {serial}"),
        )?;
        if n == 2 {
            check(exits[1] == Exit::Hlt, || {
                format!("vCPU 1 ended with {:?}", exits[1])
            })?;
        }
        // 2 x 30 periodic + 2 one-shot + 2 deadline interrupts at least.
        check(st.apic_timer_irqs >= 64, || {
            format!("only {} timer interrupts", st.apic_timer_irqs)
        })?;
        check(st.halt_sleeps > 0, || "no HLT slept in the host".into())?;
    }
    Ok(())
}

/// RVMM_CREATE_IRQCHIP only before vCPUs (EBUSY); RVMM_SIGNAL_MSI needs an irqchip
/// (ENXIO) and an APIC message address (EINVAL).
pub fn irqchip_abi_errors(_: &Ctx) -> Outcome {
    let vm = Rvmm::open(crate::DEV)
        .and_then(Rvmm::create_vm)
        .map_err(|e| e.to_string())?;
    let r = vm.signal_msi(0xfee0_0000, 0x30).map_err(|e| e.to_string());
    check(
        r.as_ref()
            .is_err_and(|e| e.contains("No such device or address")),
        || format!("MSI without an irqchip: {r:?}"),
    )?;
    let _v = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    let r = vm.create_irqchip().map_err(|e| e.to_string());
    check(r.as_ref().is_err_and(|e| e.contains("busy")), || {
        format!("irqchip after a vCPU: {r:?}")
    })?;
    drop(_v);
    drop(vm);
    let vm = Rvmm::open(crate::DEV)
        .and_then(Rvmm::create_vm)
        .map_err(|e| e.to_string())?;
    vm.create_irqchip().map_err(|e| e.to_string())?;
    let r = vm.signal_msi(0xfed0_0000, 0x30).map_err(|e| e.to_string());
    check(
        r.as_ref().is_err_and(|e| e.contains("Invalid argument")),
        || format!("MSI to a non-APIC address: {r:?}"),
    )?;
    // No vCPU yet: the message reaches nobody.
    let r = vm.signal_msi(0xfee0_0000, 0x30).map_err(|e| e.to_string());
    check(r == Ok(0), || format!("MSI with no vCPUs: {r:?}"))?;
    Ok(())
}

/// The PC platform end to end: mbtimer32 (a multiboot kernel) masks the PICs, routes
/// the PIT through the I/O APIC to its local APIC and takes 100 timer interrupts with
/// HLT in between; rvmm-run's PIT thread sends them with RVMM_SIGNAL_MSI. Prints the
/// run's exit counts. Then 50 through the 8259s and LINT0 in ExtINT mode.
pub fn multiboot_timer_100_interrupts(_: &Ctx) -> Outcome {
    let out = Command::new("rvmm-run")
        .args(["--stats", "--append", "ticks=100 code=33"])
        .arg(Path::new(GUESTS).join("mbtimer32.elf"))
        .output()
        .map_err(|e| format!("rvmm-run: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for l in stdout.lines().chain(stderr.lines()) {
        crate::ktap::diag(l);
    }
    check(out.status.code() == Some(67), || {
        format!("exit status {:?}, want 67 (code 33)", out.status.code())
    })?;
    check(stdout.contains("cmdline args: ticks=100 code=33"), || {
        "the command line did not reach the guest".into()
    })?;
    check(stdout.contains("timer: 100 interrupts"), || {
        "the guest did not count 100 timer interrupts".into()
    })?;
    let injected: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("rvmm-run: apic: interrupts injected "))
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .ok_or("no APIC counters in rvmm-run --stats")?;
    check(injected >= 100, || {
        format!("only {injected} interrupts injected")
    })?;
    // With APIC virtualization (where the CPU has it), each EOI exits as an APIC write;
    // with virtual-interrupt delivery too (module parameter `vid=1`), the CPU takes the
    // 100 interrupts and their EOIs without rvmm.
    let caps = Rvmm::open(crate::DEV)
        .and_then(|r| r.vmx_caps())
        .map_err(|e| e.to_string())?;
    let apicv = rvmm_core::caps::apic_virtualization(caps.procbased, caps.procbased2);
    let vid_param = std::fs::read_to_string("/sys/module/rvmm/parameters/vid")
        .is_ok_and(|v| matches!(v.trim(), "Y" | "1" | "true"));
    let vid = apicv && vid_param && (caps.procbased2 >> 32) & (1 << 9) != 0;
    let apic_writes: u64 = stderr
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("56 APIC write"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    crate::ktap::diag(&format!(
        "APIC virtualization {apicv}, virtual-interrupt delivery {vid}: {apic_writes} APIC-write exits"
    ));
    if vid {
        check(apic_writes < 20, || {
            format!(
                "{apic_writes} APIC-write exits for 100 interrupts with virtual-interrupt delivery"
            )
        })?;
    } else if apicv {
        check(apic_writes >= 100, || {
            format!(
                "{apic_writes} APIC-write exits for 100 EOIs without virtual-interrupt delivery"
            )
        })?;
    }
    // The same through the 8259s: IRQ 0 at the master, acknowledged in rvmm-run, an
    // ExtINT message to LINT0 (virtual wire), EOI to the 8259.
    let out = Command::new("rvmm-run")
        .args(["--append", "ticks=50 code=34 pic=1"])
        .arg(Path::new(GUESTS).join("mbtimer32.elf"))
        .output()
        .map_err(|e| format!("rvmm-run: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    check(
        out.status.code() == Some(69) && stdout.contains("timer: 50 interrupts"),
        || {
            format!(
                "PIC mode: status {:?}: {stdout}{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            )
        },
    )
}

/// SMP start-up through rvmm-run --machine pc: smpwake64 (3 vCPUs) finds the MADT's
/// processors and its multiprocessor wake-up mailbox and wakes every AP there (each AP
/// a thread that waits, then enters the wake-up vector in long mode) and every AP writes
/// a marker; sipi64 (2 vCPUs) starts its AP with INIT and a start-up IPI in real mode,
/// which switches to protected mode. The same runs on KVM ept=0 must print the same.
pub fn smp_acpi_wakeup_mailbox(ctx: &Ctx) -> Outcome {
    let run = |image: &str, cpus: &str, kvm: bool| -> Result<(String, Option<i32>), String> {
        let mut cmd = Command::new("rvmm-run");
        cmd.args(["--machine", "pc", "--cpus", cpus]);
        if kvm {
            cmd.arg("--kvm");
        }
        let out = cmd
            .arg(Path::new(GUESTS).join(image))
            .output()
            .map_err(|e| format!("rvmm-run: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        crate::ktap::diag(&format!(
            "{image} on {}: {stdout}{}",
            if kvm { "KVM ept=0" } else { "rvmm" },
            String::from_utf8_lossy(&out.stderr)
        ));
        Ok((stdout, out.status.code()))
    };
    let cases = [
        ("smpwake64.bin", "3", 0x59, "ap 2: up"),
        ("sipi64.bin", "2", 0x55, "reached protected mode"),
    ];
    let mut rvmm = Vec::new();
    for (image, cpus, rc, line) in cases {
        let r = run(image, cpus, false)?;
        check(r.1 == Some(rc) && r.0.contains(line), || {
            format!("{image} on rvmm: status {:?}: {}", r.1, r.0)
        })?;
        rvmm.push(r);
    }
    load_kvm_ept0(ctx)?;
    let kvm: Result<Vec<_>, String> = cases
        .iter()
        .map(|(image, cpus, _, _)| run(image, cpus, true))
        .collect();
    unload_kvm()?;
    let kvm = kvm?;
    check(kvm == rvmm, || {
        format!("KVM ept=0 gave {kvm:?}, rvmm {rvmm:?}")
    })
}

/// Real mode runs in virtual-8086 mode where vm86 holds its state exactly, and in the
/// emulator only where it does not: realmode32's three rounds take vm86 exits (the #GP
/// of INT n, IRET, CLI/STI, PUSHF/POPF, LGDT/LIDT, MOV CR0...) and emulated steps (the
/// instructions right after CR0.PE is cleared, and the unreal-mode part), with the
/// same output as on the hardware.
pub fn real_mode_vm86_where_exact(_: &Ctx) -> Outcome {
    let out = Command::new("rvmm-run")
        .args(["run", "--stats"])
        .arg(Path::new(GUESTS).join("realmode32.elf"))
        .output()
        .map_err(|e| format!("rvmm-run: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    check(out.status.code() == Some(0x55), || {
        format!("realmode32: status {:?}: {stderr}", out.status.code())
    })?;
    let number_in = |key: &str, at_end: bool| {
        stderr.lines().find(|l| l.contains(key)).and_then(|l| {
            let mut words = l.split_whitespace().filter_map(|w| w.parse::<u64>().ok());
            if at_end {
                words.next_back()
            } else {
                words.next()
            }
        })
    };
    let emulated = number_in("instructions emulated", false).unwrap_or(0);
    let exceptions = number_in("exception/NMI", true).unwrap_or(0);
    crate::ktap::diag(&format!(
        "realmode32: {emulated} instructions emulated, {exceptions} exception exits"
    ));
    // Per round at least: 7 instructions from CR0.PE = 0 to the reloaded segments and
    // the unreal-mode loads and stores (emulated); INT n, three IRETs, INT3, two CLIs,
    // an STI, PUSHF/POPF pairs, LIDT, LGDT and two MOV CR0 (vm86 exits).
    check(emulated >= 3 * 10 && exceptions >= 3 * 12, || {
        format!("realmode32: {emulated} emulated steps, {exceptions} exception exits: {stderr}")
    })
}

/// A consistent virtual CPU: consist64 checks that CPUID hides what rvmm does not
/// virtualize, that CR4 bits of hidden features #GP, that VMXON/MONITOR/RDTSCP #UD,
/// that the machine-check MSRs follow CPUID and unknown MSRs #GP, each with RFLAGS.RF
/// set in the frame the guest's handler sees; it ends with a word-sized write to the
/// exit port.
pub fn consistent_cpu(_: &Ctx) -> Outcome {
    let out = Command::new("rvmm-run")
        .arg(Path::new(GUESTS).join("consist64.bin"))
        .output()
        .map_err(|e| format!("rvmm-run: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    for l in stdout.lines() {
        crate::ktap::diag(l);
    }
    check(
        out.status.code() == Some(0x5b) && stdout.contains("consist64: all ok"),
        || {
            format!(
                "status {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            )
        },
    )
}

/// INIT and start-up IPIs, and real mode: vCPU 1 waits for a SIPI (RVMM_SET_MP_STATE);
/// sipi64 on vCPU 0 sends INIT and SIPI through its xAPIC; vCPU 1 runs a real-mode
/// trampoline (vm86 with rvmm carrying out CLI, LGDT, MOV CR0), switches to protected
/// mode with a far JMP, writes its markers and halts.
pub fn init_sipi_real_mode_ap(_: &Ctx) -> Outcome {
    let code = std::fs::read(Path::new(GUESTS).join("sipi64.bin"))
        .map_err(|e| format!("sipi64.bin: {e}"))?;
    let mut mem = GuestMem::new(16 << 20).map_err(|e| e.to_string())?;
    mem.write(0x10_0000, &code)?;
    let (regs, sregs) = setup(&mut mem, EntryMode::Long, 0x10_0000, 0xff_fff0)?;
    let vm = Rvmm::open(crate::DEV)
        .and_then(Rvmm::create_vm)
        .map_err(|e| e.to_string())?;
    // SAFETY: `mem` outlives the VM (dropped after it, below).
    unsafe { vm.set_memory_region(0, 0, mem.size() as u64, mem.host_addr(), false) }
        .map_err(|e| e.to_string())?;
    vm.create_irqchip().map_err(|e| e.to_string())?;
    let bsp = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    bsp.set_sregs(&sregs).map_err(|e| e.to_string())?;
    bsp.set_regs(&regs).map_err(|e| e.to_string())?;
    let ap = vm.create_vcpu(1).map_err(|e| e.to_string())?;
    vm.set_mp_state(1, true).map_err(|e| e.to_string())?;
    let (b, a) = std::thread::scope(|s| {
        let a = s.spawn(|| ap.run().map_err(|e| e.to_string()));
        let mut out = Vec::new();
        let b = loop {
            match bsp.run().map_err(|e| e.to_string()) {
                Ok(Exit::IoOut {
                    port: 0x3f8, data, ..
                }) => out.push(data as u8),
                e => break (e, String::from_utf8_lossy(&out).into_owned()),
            }
        };
        (b, a.join().unwrap_or(Err("AP thread panicked".into())))
    });
    crate::ktap::diag(&format!("BSP: {b:?}; AP: {a:?}"));
    let ap_regs = ap.regs().map_err(|e| e.to_string())?;
    crate::ktap::diag(&format!("AP ends at RIP {:#x}", ap_regs.rip));
    check(
        b.0 == Ok(Exit::IoOut {
            port: 0xf4,
            size: 1,
            data: 0x2a,
        }),
        || format!("BSP: {:?}: {}", b.0, b.1),
    )?;
    check(a == Ok(Exit::Hlt), || format!("AP ended with {a:?}"))?;
    let mut m = [0u8; 2];
    mem.read(0x9000, &mut m)?;
    check(m == [0x5a, 0x5b], || format!("markers {m:x?}"))
}
