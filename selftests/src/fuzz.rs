// SPDX-License-Identifier: GPL-2.0

//! A fuzzer for rvmm, as one kselftest (`fuzz_ioctls_and_guests`).
//!
//! A forked fuzzing process keeps three VMs and runs six worker threads on them, each
//! picking random operations until the time budget is spent:
//!
//! - every ioctl of the ABI on VM fds, fresh fds and closed ones: right and wrong sizes
//!   and directions, unknown numbers, structures with values on and past every limit,
//!   and bad pointers (NULL, kernel and non-canonical addresses, unmapped, read-only,
//!   unaligned, straddling a guard page, the run page itself);
//! - mmap of the run page with wrong offsets and sizes, PROT_EXEC, MAP_PRIVATE, then
//!   mprotect, madvise (DONTNEED, DOFORK), mremap, the page as an ioctl buffer and as
//!   guest memory;
//! - memory regions created, moved, overlapped and deleted, and their backing unmapped,
//!   while other threads run the VM's vCPUs;
//! - random guests: code (instruction snippets or raw bytes), page tables (32-bit, PAE,
//!   4-level, corrupted), CR0/CR4/EFER and segments through RVMM_SET_SREGS, registers,
//!   injected interrupts and exceptions, MSIs (with an irqchip), MSR writes, CPUID;
//!   exits answered with random data;
//! - the VM fd closed (and the VM replaced) while other threads run its vCPUs, and
//!   fork() with the fds open, the child using and closing them (bounded by an interval
//!   timer, killed after 3 s).
//!
//! Every RVMM_RUN is bounded: a kicker thread sends SIGUSR1 (a no-op handler without
//! SA_RESTART) to every worker every 2-30 ms, children have a 10-ms ITIMER_REAL, and
//! the test kills the fuzzing process if it outlives its budget by two minutes.
//!
//! Failures (host errors): an ioctl or mmap errno outside the documented set
//! ([`ops::ALLOWED_ERRNOS`]), a success value outside the ABI, the fuzzing process or
//! a child dying from a signal it was not sent, a hang, a kernel log line with a
//! BUG/WARNING/Oops/lockdep/... marker, or a fresh VM that no longer runs OUT + HLT.
//!
//! Reproducing: the seed is printed first (`# fuzz: seed 0x...`). Each thread's and
//! child's stream is derived from it, so the same seed makes the same operations,
//! though their interleaving differs:
//!
//!   rvmm_test --only fuzz_ioctls_and_guests --fuzz-seed 0x1234 --fuzz-seconds 600
//!
//! In the test VM, the kernel command line gives the same through init's environment:
//! `rvmm_only=fuzz_ioctls_and_guests rvmm_fuzz_seed=0x1234 rvmm_fuzz_seconds=600`.

mod engine;
mod gen;
mod ops;
mod rng;

use crate::ktap::{diag, Outcome};
use crate::{sys, Ctx};
use ops::{Counters, EXIT_BUCKETS};
use rvmm::guest::{setup, EntryMode, GuestMem};
use rvmm::{Exit, Rvmm};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// The default time budget of the fuzz loop, in seconds.
pub const DEFAULT_SECONDS: u64 = 45;

static SECONDS: AtomicU64 = AtomicU64::new(0);
static SEED: AtomicU64 = AtomicU64::new(0);
static SEED_SET: AtomicBool = AtomicBool::new(false);

/// Kernel log markers of a bug.
const BAD_LOG: &[&str] = &[
    "BUG:",
    "WARNING:",
    "Oops",
    "general protection",
    "Kernel panic",
    "lockdep",
    "possible recursive locking",
    "INFO: task",
    "UBSAN",
    "KASAN",
    "rcu_sched self-detected stall",
    "soft lockup",
    "hard LOCKUP",
];

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Command-line options: `--fuzz-seconds N`, `--fuzz-seed S` (decimal or 0x-hex).
pub fn set_option(flag: &str, value: Option<String>) -> Result<(), String> {
    let v = value.as_deref().and_then(parse_u64);
    match (flag, v) {
        ("--fuzz-seconds", Some(n)) if n > 0 => SECONDS.store(n, Relaxed),
        ("--fuzz-seed", Some(s)) => {
            SEED.store(s, Relaxed);
            SEED_SET.store(true, Relaxed);
        }
        _ => return Err(format!("{flag} needs a number (decimal or 0x-hex)")),
    }
    Ok(())
}

/// An option from the environment (the kernel passes unknown `name=value` command-line
/// parameters to init's environment).
fn env_option(name: &str) -> Option<u64> {
    std::env::var(name)
        .or_else(|_| std::env::var(name.to_uppercase()))
        .ok()
        .and_then(|v| parse_u64(&v))
}

/// The seed and the budget: the command line, else the environment, else a fresh seed
/// and [`DEFAULT_SECONDS`].
fn config() -> (u64, u64) {
    let seconds = match SECONDS.load(Relaxed) {
        0 => env_option("rvmm_fuzz_seconds")
            .filter(|&s| s > 0)
            .unwrap_or(DEFAULT_SECONDS),
        s => s,
    };
    let seed = if SEED_SET.load(Relaxed) {
        SEED.load(Relaxed)
    } else if let Some(s) = env_option("rvmm_fuzz_seed") {
        s
    } else {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut s = t ^ (u64::from(std::process::id()) << 32);
        rng::splitmix64(&mut s)
    };
    (seed, seconds)
}

/// One /dev/kmsg record: facility, sequence number, message.
fn parse_record(rec: &[u8]) -> Option<(u64, u64, String)> {
    let text = String::from_utf8_lossy(rec);
    let (header, rest) = text.split_once(';')?;
    let mut fields = header.split(',');
    let pri: u64 = fields.next()?.parse().ok()?;
    let seq: u64 = fields.next()?.parse().ok()?;
    let msg = rest.lines().next().unwrap_or("").to_string();
    Some((pri >> 3, seq, msg))
}

/// The kernel log from now on: kernel lines (facility 0; the tests' own output goes to
/// /dev/kmsg too, as user lines), records lost to overwriting, lines with bug markers.
struct KmsgWatch {
    fd: i32,
    last_seq: Option<u64>,
    kernel_lines: u64,
    lost: u64,
    bad_lines: u64,
    bad: Vec<String>,
}

impl KmsgWatch {
    fn open_at_end() -> Result<Self, String> {
        // SAFETY: a NUL-terminated path.
        let fd = unsafe {
            libc::open(
                c"/dev/kmsg".as_ptr(),
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(format!("/dev/kmsg: {}", sys::strerror(sys::errno())));
        }
        // SAFETY: our descriptor.
        unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
        Ok(Self {
            fd,
            last_seq: None,
            kernel_lines: 0,
            lost: 0,
            bad_lines: 0,
            bad: Vec::new(),
        })
    }

    fn poll(&mut self) {
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: reads into our buffer.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                self.record(&buf[..n as usize]);
                continue;
            }
            // EPIPE: records were overwritten; the next read goes on after them.
            if n < 0 && matches!(sys::errno(), libc::EPIPE | libc::EINTR) {
                continue;
            }
            break;
        }
    }

    fn record(&mut self, rec: &[u8]) {
        let Some((facility, seq, msg)) = parse_record(rec) else {
            return;
        };
        if let Some(last) = self.last_seq {
            self.lost += seq.saturating_sub(last + 1);
        }
        self.last_seq = Some(seq);
        if facility != 0 {
            return;
        }
        self.kernel_lines += 1;
        if BAD_LOG.iter().any(|p| msg.contains(p)) {
            self.bad_lines += 1;
            if self.bad.len() < 10 {
                self.bad.push(msg);
            }
        }
    }
}

impl Drop for KmsgWatch {
    fn drop(&mut self) {
        // SAFETY: our descriptor.
        unsafe { libc::close(self.fd) };
    }
}

/// The counters, in a shared anonymous page: the fuzzing process and its children
/// count there, and this process reads them even if they die.
struct SharedCounters(*mut Counters);

impl SharedCounters {
    fn new() -> Result<Self, String> {
        const _: () = assert!(std::mem::size_of::<Counters>() <= 4096);
        // SAFETY: a fresh shared anonymous page; zeroes are valid atomics.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", sys::strerror(sys::errno())));
        }
        Ok(Self(p.cast()))
    }

    /// The counters, for the life of the process (the page is unmapped only by the
    /// parent, after the children are gone).
    fn get(&self) -> &'static Counters {
        // SAFETY: the page stays mapped in every process that uses this reference
        // (children exit without unmapping; the parent unmaps on drop, last).
        unsafe { &*self.0 }
    }
}

impl Drop for SharedCounters {
    fn drop(&mut self) {
        // SAFETY: our page.
        unsafe { libc::munmap(self.0.cast(), 4096) };
    }
}

/// Waits for `pid` while draining the kernel log; SIGKILL at `limit`. Returns the wait
/// status and whether this function killed it, or None if it could not be reaped.
fn wait_child(pid: libc::pid_t, limit: Instant, kmsg: &mut KmsgWatch) -> Option<(i32, bool)> {
    let mut killed = false;
    loop {
        kmsg.poll();
        let mut status = 0;
        // SAFETY: waits for our child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Some((status, killed));
        }
        if r < 0 && sys::errno() != libc::EINTR {
            return None;
        }
        let now = Instant::now();
        if !killed && now > limit {
            // SAFETY: our child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed = true;
        }
        if now > limit + Duration::from_secs(15) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// After the fuzz, a fresh VM runs OUT then HLT as `io_and_hlt_exits` does (in a child,
/// so that a hang cannot take the suite with it).
fn tiny_guest() -> Result<(), String> {
    const CODE: u64 = 0x1000;
    let mut mem = GuestMem::new(2 << 20).map_err(|e| e.to_string())?;
    mem.write(CODE, &[0xb0, 0x5a, 0xe6, 0xf4, 0xf4, 0x90])?;
    let (regs, sregs) = setup(&mut mem, EntryMode::Protected, CODE, 0x1f_fff0)?;
    let vm = Rvmm::open(crate::DEV)
        .and_then(Rvmm::create_vm)
        .map_err(|e| e.to_string())?;
    // SAFETY: `mem` outlives the VM (dropped after it, at the end of this function).
    unsafe { vm.set_memory_region(0, 0, mem.size() as u64, mem.host_addr(), false) }
        .map_err(|e| e.to_string())?;
    let vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    vcpu.set_sregs(&sregs).map_err(|e| e.to_string())?;
    vcpu.set_regs(&regs).map_err(|e| e.to_string())?;
    let e = vcpu.run().map_err(|e| e.to_string())?;
    crate::check(
        e == Exit::IoOut {
            port: 0xf4,
            size: 1,
            data: 0x5a,
        },
        || format!("first exit {e:?}, want OUT 0x5a to port 0xf4"),
    )?;
    let e = vcpu.run().map_err(|e| e.to_string())?;
    crate::check(e == Exit::Hlt, || format!("second exit {e:?}, want HLT"))?;
    let rip = vcpu.regs().map_err(|e| e.to_string())?.rip;
    crate::check(rip == CODE + 5, || {
        format!("RIP {rip:#x} after HLT, want {:#x}", CODE + 5)
    })
}

fn sanity_after(kmsg: &mut KmsgWatch) -> Result<(), String> {
    let _ = std::io::stdout().flush();
    let pid = sys::fork_child(tiny_guest)?;
    match wait_child(pid, Instant::now() + Duration::from_secs(30), kmsg) {
        Some((st, false)) if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0 => {}
        Some((_, true)) | None => return Err("a fresh VM's OUT + HLT guest hung".into()),
        Some(_) => return Err("a fresh VM no longer runs OUT + HLT (see the child's line)".into()),
    }
    let s = Rvmm::open(crate::DEV)
        .and_then(|d| d.status())
        .map_err(|e| e.to_string())?;
    crate::status_all_ok(&s)
}

fn exit_name(reason: usize) -> &'static str {
    match reason as u32 {
        rvmm::uapi::RVMM_EXIT_UNKNOWN => "unknown",
        rvmm::uapi::RVMM_EXIT_IO => "io",
        rvmm::uapi::RVMM_EXIT_HYPERCALL => "hypercall",
        rvmm::uapi::RVMM_EXIT_HLT => "hlt",
        rvmm::uapi::RVMM_EXIT_MMIO => "mmio",
        rvmm::uapi::RVMM_EXIT_IRQ_WINDOW_OPEN => "irq_window",
        rvmm::uapi::RVMM_EXIT_SHUTDOWN => "shutdown",
        rvmm::uapi::RVMM_EXIT_FAIL_ENTRY => "fail_entry",
        rvmm::uapi::RVMM_EXIT_INTR => "intr",
        rvmm::uapi::RVMM_EXIT_INTERNAL_ERROR => "internal",
        _ if reason == EXIT_BUCKETS - 1 => "other",
        _ => "?",
    }
}

/// The kselftest: fuzz for the configured time, then check the kernel log and a fresh
/// VM.
pub fn fuzz_default(ctx: &Ctx) -> Outcome {
    ctx.load_rvmm()?;
    let (seed, seconds) = config();
    let shared = SharedCounters::new()?;
    let c = shared.get();
    let mut kmsg = KmsgWatch::open_at_end()?;
    diag(&format!(
        "fuzz: seed {seed:#x}, {seconds} s, {} threads on {} VMs (reproduce: rvmm_test --only fuzz_ioctls_and_guests --fuzz-seed {seed:#x} --fuzz-seconds {seconds})",
        engine::WORKERS,
        engine::WORLDS
    ));
    let _ = std::io::stdout().flush();
    let mut errors: Vec<String> = Vec::new();
    // SAFETY: this process is single-threaded here; the child runs the fuzzer and
    // leaves through _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", sys::strerror(sys::errno())));
    }
    if pid == 0 {
        let code = engine::run(seed, seconds, c);
        let _ = std::io::stdout().flush();
        // SAFETY: leaves without running the test process's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let limit = Instant::now() + Duration::from_secs(seconds + 120);
    match wait_child(pid, limit, &mut kmsg) {
        None => errors.push(format!(
            "the fuzzing process {pid} could not be reaped (stuck in the kernel?)"
        )),
        Some((_, true)) => errors.push(format!(
            "the fuzzing process did not finish within {} s: killed",
            seconds + 120
        )),
        Some((st, false)) if libc::WIFSIGNALED(st) => errors.push(format!(
            "the fuzzing process died from signal {}",
            libc::WTERMSIG(st)
        )),
        Some((st, false)) if libc::WEXITSTATUS(st) != 0 => errors.push(format!(
            "the fuzzing process exited with status {}",
            libc::WEXITSTATUS(st)
        )),
        Some(_) => {}
    }
    if let Err(e) = sanity_after(&mut kmsg) {
        errors.push(format!("after the fuzz: {e}"));
    }
    kmsg.poll();
    for l in &kmsg.bad {
        errors.push(format!("kernel log: {l}"));
    }
    let host =
        c.host_errors.load(Relaxed) + errors.len() as u64 + kmsg.bad_lines - kmsg.bad.len() as u64;
    let reasons: Vec<String> = c
        .exit_reasons
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            let n = n.load(Relaxed);
            (n != 0).then(|| format!("{}={n}", exit_name(i)))
        })
        .collect();
    diag(&format!(
        "fuzz: exits {}; EINTR {}; {} VMs; {} forks ({} killed at timeout); {} kernel log records lost",
        if reasons.is_empty() { "none".into() } else { reasons.join(" ") },
        c.eintr.load(Relaxed),
        c.vms.load(Relaxed),
        c.forks.load(Relaxed),
        c.child_kills.load(Relaxed),
        kmsg.lost
    ));
    for e in &errors {
        diag(&format!("fuzz: host error: {e}"));
    }
    diag(&format!(
        "fuzz: seed {seed:#x}, {} calls, {} guest runs, {} exits seen, {host} host errors, {} kernel log lines",
        c.calls.load(Relaxed),
        c.guest_runs.load(Relaxed),
        c.exits.load(Relaxed),
        kmsg.kernel_lines
    ));
    crate::check(host == 0, || {
        format!(
            "{host} host errors with seed {seed:#x}; first: {}",
            errors
                .first()
                .cloned()
                .unwrap_or_else(|| "see the fuzz diag lines above".into())
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_numbers() {
        assert_eq!(parse_u64("42"), Some(42));
        assert_eq!(parse_u64("0x2a"), Some(42));
        assert_eq!(parse_u64(" 0XFF "), Some(255));
        assert_eq!(parse_u64("x"), None);
        assert!(set_option("--fuzz-seconds", Some("0".into())).is_err());
        assert!(set_option("--fuzz-seed", None).is_err());
    }

    #[test]
    fn kmsg_records() {
        let (f, seq, msg) =
            parse_record(b"4,1234,5678,-;WARNING: CPU: 0 PID: 1 at foo\n SUBSYSTEM=x\n").unwrap();
        assert_eq!(
            (f, seq, msg.as_str()),
            (0, 1234, "WARNING: CPU: 0 PID: 1 at foo")
        );
        let (f, _, _) = parse_record(b"14,1235,5679,-;# fuzz: seed 0x1\n").unwrap();
        assert_eq!(f, 1);
        assert!(parse_record(b"garbage").is_none());
    }

    #[test]
    fn kmsg_counts_kernel_lines_and_gaps() {
        let mut w = KmsgWatch {
            fd: -1,
            last_seq: None,
            kernel_lines: 0,
            lost: 0,
            bad_lines: 0,
            bad: Vec::new(),
        };
        w.record(b"6,10,0,-;rvmm: memory region 3: unknown flags 0x2\n");
        w.record(b"14,11,0,-;not ok 1 BUG: in a test name\n");
        w.record(b"4,15,0,-;BUG: unable to handle page fault\n");
        assert_eq!((w.kernel_lines, w.lost, w.bad_lines), (2, 3, 1));
        assert_eq!(w.bad, vec!["BUG: unable to handle page fault".to_string()]);
    }
}
