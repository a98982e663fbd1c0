// SPDX-License-Identifier: GPL-2.0

//! Linux as a guest (issue 7): the repo's guest kernel and initramfs (built by
//! scripts/guest-kernel.sh and scripts/guest-initramfs.sh, in /lib/rvmm/linux of the
//! test initramfs) booted by `rvmm-run --kernel`, with as many vCPUs as this machine has
//! CPUs, on rvmm and on KVM ept=0; and an interactive session on its serial console.

use crate::ktap::{diag, Outcome};
use crate::{check, Ctx};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KERNEL: &str = "/lib/rvmm/linux/bzImage";
const INITRD: &str = "/lib/rvmm/linux/initrd.gz";
/// A run that has not powered off by then has hung (this clock is the emulated machine's: a workload run took 3.1 G guest-TSC ticks).
const TIMEOUT: Duration = Duration::from_secs(1800);

/// A run whose guest prints nothing for this long is stuck (its init prints every few
/// seconds of guest time; the kernel's boot, faster).
const QUIET: Duration = Duration::from_secs(60);

/// The newest rvmm VM's debugfs counters, on one line (read in a thread: a read waits
/// for running vCPUs, and gives up after 10 s).
fn vm_stats() -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let newest = std::fs::read_dir("/sys/kernel/debug")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_prefix("rvmm-vm")?
                    .parse::<u64>()
                    .ok()
                    .map(|id| (id, e.path()))
            })
            .max();
        let text = match newest {
            Some((_, dir)) => std::fs::read_to_string(dir.join("stats"))
                .map(|t| t.lines().collect::<Vec<_>>().join("; "))
                .unwrap_or_else(|e| format!("stats: {e}")),
            None => "no rvmm VM in debugfs".into(),
        };
        let _ = tx.send(text);
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| "reading the VM's debugfs stats did not return in 10 s".into())
}

/// What a run of rvmm-run printed and how it ended.
struct Run {
    stdout: String,
    stderr: String,
    status: Option<i32>,
}

/// Boots the guest kernel with `append`, `cpus` vCPUs, on rvmm or KVM. `script`: pairs
/// of (text to wait for in the output, after what was waited for before; bytes to type
/// then). The run ends when rvmm-run exits, or is killed at TIMEOUT.
/// The guest's console lines are printed as diagnostics as they come, prefixed with `on`.
fn boot(
    on: &'static str,
    cpus: usize,
    kvm: bool,
    append: &str,
    script: &[(&str, &str)],
) -> Result<Run, String> {
    let mut cmd = Command::new("rvmm-run");
    cmd.args(["--stats", "--mem", "96", "--cpus", &cpus.to_string()])
        .args(["--kernel", KERNEL, "--initrd", INITRD, "--append"])
        .arg(format!("console=ttyS0 {append}"));
    if kvm {
        cmd.arg("--kvm");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("rvmm-run: {e}"))?;
    let collect = |mut r: Box<dyn Read + Send>, echo: bool| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        let t = std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            let mut line = Vec::new();
            while let Ok(n) = r.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                b.lock().unwrap().extend_from_slice(&chunk[..n]);
                for &c in chunk[..n].iter().filter(|_| echo) {
                    if c == b'\n' {
                        diag(&format!(
                            "{on}: {}",
                            String::from_utf8_lossy(&line).trim_end()
                        ));
                        line.clear();
                    } else {
                        line.push(c);
                    }
                }
            }
        });
        (buf, t)
    };
    let (out, out_t) = collect(Box::new(child.stdout.take().unwrap()), true);
    let (err, err_t) = collect(Box::new(child.stderr.take().unwrap()), false);
    let mut stdin = child.stdin.take();
    let start = Instant::now();
    let mut step = 0;
    let mut from = 0;
    let (mut seen, mut quiet_since) = (0, Instant::now());
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s.code();
        }
        let len = out.lock().unwrap().len();
        if len != seen {
            (seen, quiet_since) = (len, Instant::now());
        }
        let quiet = quiet_since.elapsed() > QUIET;
        if start.elapsed() > TIMEOUT || quiet {
            if quiet && !kvm {
                // Hung or stuck: what the VM's exit counters say, twice (still exiting?).
                for _ in 0..2 {
                    diag(&format!(
                        "{on}: no output for {}s; {}",
                        QUIET.as_secs(),
                        vm_stats()
                    ));
                    std::thread::sleep(Duration::from_secs(5));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
            diag(&format!(
                "{on}: rvmm-run killed after {}s",
                start.elapsed().as_secs()
            ));
            break None;
        }
        if let (Some((wait, send)), Some(input)) = (script.get(step), stdin.as_mut()) {
            let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
            if let Some(at) = text.get(from..).and_then(|t| t.find(wait)) {
                from += at + wait.len();
                input
                    .write_all(send.as_bytes())
                    .map_err(|e| format!("typing {send:?}: {e}"))?;
                step += 1;
            }
        }
        if step == script.len() {
            // Nothing more to type: the guest sees the end of its input.
            stdin = None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = (out_t.join(), err_t.join());
    let text = |b: Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&b.lock().unwrap()).into_owned();
    Ok(Run {
        stdout: text(out),
        stderr: text(err),
        status,
    })
}

/// The guest's markers, without the TSC readings (which differ run to run).
fn markers(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.starts_with("RVMM-LINUX"))
        .map(|l| {
            l.split(' ')
                .filter(|w| !w.starts_with("tsc="))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Checks one workload run; returns its markers.
fn check_workload(r: &Run, cpus: usize, on: &str) -> Result<Vec<String>, String> {
    for l in r.stderr.lines() {
        diag(&format!("{on}: {l}"));
    }
    let m = markers(&r.stdout);
    let tail = || "(the guest's console is above)".to_string();
    check(r.status == Some(0), || {
        format!(
            "{on}: rvmm-run ended with status {:?}; the guest's last lines:\n{}",
            r.status,
            tail()
        )
    })?;
    check(r.stderr.contains("the guest powered off (ACPI S5)"), || {
        format!("{on}: no ACPI power-off")
    })?;
    let want = [
        format!("RVMM-LINUX init cpus={cpus} "),
        "RVMM-LINUX forkexec 200/200 exited 0".into(),
        "RVMM-LINUX mem ok pages=4096 ".into(),
        "RVMM-LINUX pingpong 2000 round trips ok".into(),
        format!("RVMM-LINUX proc cpuinfo processors={cpus} meminfo MemTotal="),
        "RVMM-LINUX done rc=0".into(),
    ];
    for w in &want {
        check(m.iter().any(|l| l.starts_with(w.as_str())), || {
            format!("{on}: no marker {w:?}; the guest's last lines:\n{}", tail())
        })?;
    }
    check(!m.iter().any(|l| l.contains("FAIL")), || {
        format!("{on}: a workload failed: {m:?}")
    })?;
    if on == "rvmm" && cpus >= 2 {
        // The workload unmaps and write-protects memory that the other vCPU may cache:
        // remote flushes, each at least one IPI.
        let n = |l: &str, key: &str| -> Option<u64> {
            l.split(key)
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        let line = r
            .stderr
            .lines()
            .find(|l| l.starts_with("rvmm-run: remote flushes "))
            .ok_or_else(|| format!("{on}: no 'remote flushes' line from rvmm-run --stats"))?;
        let (flushes, ipis) = (n(line, "remote flushes "), n(line, " ("));
        check(
            matches!((flushes, ipis), (Some(f), Some(i)) if f > 0 && i >= f),
            || format!("{on}: want remote flushes, each with an IPI: {line}"),
        )?;
    }
    Ok(m)
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The guest kernel on rvmm with one vCPU per CPU of this machine: it boots to its init,
/// which runs the shadow-MMU workload (200 fork+exec'd processes that all exit 0; 16 MiB
/// touched, copied on write in a child, made read-only - a write must fault - and back,
/// half unmapped and remapped, the data verified at every step; 2000 pipe round trips
/// between two processes), reads /proc/cpuinfo and /proc/meminfo and powers off through
/// ACPI. Then the same on KVM ept=0: the same markers.
pub fn linux_boot_workload(ctx: &Ctx) -> Outcome {
    let n = cpus();
    let r = boot("rvmm", n, false, "rvmm_linux=workload", &[])?;
    let on_rvmm = check_workload(&r, n, "rvmm")?;
    crate::vm_tests::load_kvm_ept0(ctx)?;
    let r = boot("KVM ept=0", n, true, "rvmm_linux=workload", &[]);
    crate::vm_tests::unload_kvm()?;
    let on_kvm = check_workload(&r?, n, "KVM ept=0")?;
    // rvmm-run gives both the same platform (e820 map, ACPI tables, CPUs): the markers
    // must match word for word.
    let (a, b) = (on_rvmm, on_kvm);
    check(a == b, || format!("rvmm printed {a:?}, KVM ept=0 {b:?}"))
}

/// An interactive session on the guest's serial console through rvmm-run's stdin: at
/// the shell's prompt, type `uname -a` and read its answer, then `poweroff`, which ends
/// the run with status 0.
pub fn linux_console_session(_: &Ctx) -> Outcome {
    let r = boot(
        "console",
        1,
        false,
        "rvmm_linux=shell",
        &[
            ("RVMM-LINUX shell", ""),
            ("# ", "uname -a\n"),
            ("# ", "poweroff\n"),
        ],
    )?;
    let release = r
        .stdout
        .lines()
        .find_map(|l| l.split("kernel=").nth(1))
        .and_then(|t| t.split(' ').next())
        .ok_or("the guest's init did not print its kernel release")?
        .to_owned();
    check(r.status == Some(0), || {
        format!("rvmm-run ended with status {:?}: {}", r.status, r.stderr)
    })?;
    check(
        r.stdout
            .lines()
            .any(|l| l.starts_with("Linux ") && l.contains(&release) && l.contains("x86_64")),
        || {
            format!(
                "no `uname -a` answer (Linux ... {release} ... x86_64) in:\n{}",
                r.stdout
            )
        },
    )?;
    check(r.stderr.contains("the guest powered off (ACPI S5)"), || {
        format!("`poweroff` did not power the guest off: {}", r.stderr)
    })
}
