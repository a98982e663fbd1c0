// SPDX-License-Identifier: GPL-2.0

//! `rvmm-workload`: the workload of rvmm's Linux guest (issue 7), run by the guest's init
//! inside a Linux kernel that runs on rvmm (or KVM). Each part stresses one side of a
//! shadow MMU and checks its own results; each prints one `RVMM-LINUX` marker line that
//! the selftest on the host side checks, and exits non-zero on any wrong result.
//!
//!   rvmm-workload forkexec N PROG   fork+exec PROG N times, every child must exit 0
//!   rvmm-workload mem MIB           map, touch, fork (copy-on-write), mprotect, unmap,
//!                                   remap; verify the data at every step
//!   rvmm-workload pingpong N        two processes pass a counter N times over pipes
//!   rvmm-workload tsc               print the TSC (marks guest time)

use std::ffi::CString;
use std::process::ExitCode;

const PAGE: usize = 4096;

fn fail(what: &str) -> ExitCode {
    println!("RVMM-LINUX FAIL {what}");
    ExitCode::FAILURE
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num =
        |i: usize, d: usize| -> usize { args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d) };
    match args.first().map(String::as_str) {
        Some("forkexec") => forkexec(num(1, 200), args.get(2).map_or("/bin/true", |s| s)),
        Some("mem") => mem(num(1, 16)),
        Some("pingpong") => pingpong(num(1, 2000)),
        Some("tsc") => {
            // SAFETY: RDTSC has no memory effects; every x86-64 CPU has it.
            println!("{}", unsafe { core::arch::x86_64::_rdtsc() });
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: rvmm-workload forkexec N PROG | mem MIB | pingpong N | tsc");
            ExitCode::from(2)
        }
    }
}

/// Waits for `pid`; true when it exited with status 0.
fn wait_ok(pid: libc::pid_t) -> bool {
    let mut status = 0;
    // SAFETY: waitpid writes only to `status`, a live local.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    r == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

fn forkexec(n: usize, prog: &str) -> ExitCode {
    let path = CString::new(prog).unwrap();
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    let mut ok = 0;
    for _ in 0..n {
        // SAFETY: this program is single-threaded, so the child may run anything; it
        // only calls execve and _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return fail(&format!("forkexec: fork: {}", errno()));
        }
        if pid == 0 {
            // SAFETY: argv and envp are NULL-terminated arrays of valid C strings that
            // outlive the call; _exit ends the child if execve fails.
            unsafe {
                libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
        if wait_ok(pid) {
            ok += 1;
        }
    }
    println!("RVMM-LINUX forkexec {ok}/{n} exited 0");
    if ok == n {
        ExitCode::SUCCESS
    } else {
        fail("forkexec: a child failed")
    }
}

/// The word every page holds at `offset`, in `generation`.
fn pattern(page: usize, word: usize, generation: u64) -> u64 {
    ((page as u64) << 32) ^ ((word as u64) << 8) ^ generation.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A private anonymous mapping of `len` bytes, unmapped on drop.
struct Map {
    ptr: *mut u64,
    len: usize,
}

impl Map {
    fn new(len: usize) -> Result<Map, std::io::Error> {
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses; it aliases
        // nothing in this program.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(errno());
        }
        Ok(Map { ptr: p.cast(), len })
    }
    fn pages(&self) -> usize {
        self.len / PAGE
    }
    /// Writes `generation`'s pattern into pages `range` (touching every 64th word).
    fn fill(&self, range: std::ops::Range<usize>, generation: u64) {
        for page in range {
            for word in (0..PAGE / 8).step_by(64) {
                // SAFETY: page < pages() and word < PAGE/8: inside the mapping, which is
                // readable and writable while fill is called.
                unsafe {
                    self.ptr
                        .add(page * PAGE / 8 + word)
                        .write_volatile(pattern(page, word, generation))
                };
            }
        }
    }
    /// Pages in `range` that do not hold `generation`'s pattern.
    fn wrong(&self, range: std::ops::Range<usize>, generation: u64) -> usize {
        let mut bad = 0;
        for page in range {
            for word in (0..PAGE / 8).step_by(64) {
                // SAFETY: inside the mapping, which is readable while wrong is called.
                let v = unsafe { self.ptr.add(page * PAGE / 8 + word).read_volatile() };
                if v != pattern(page, word, generation) {
                    bad += 1;
                    break;
                }
            }
        }
        bad
    }
    fn protect(&self, prot: libc::c_int) -> Result<(), std::io::Error> {
        // SAFETY: the range is this mapping, page-aligned.
        if unsafe { libc::mprotect(self.ptr.cast(), self.len, prot) } != 0 {
            return Err(errno());
        }
        Ok(())
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this Map owns; no reference into it remains.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn mem(mib: usize) -> ExitCode {
    match mem_steps(mib) {
        Ok(pages) => {
            println!("RVMM-LINUX mem ok pages={pages} (touch, fork+CoW, mprotect, munmap, remap)");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("mem: {e}")),
    }
}

fn mem_steps(mib: usize) -> Result<usize, String> {
    let map = Map::new(mib << 20).map_err(|e| format!("mmap: {e}"))?;
    let n = map.pages();
    // First touch of every page, then read it back.
    map.fill(0..n, 1);
    let bad = map.wrong(0..n, 1);
    if bad != 0 {
        return Err(format!("{bad} of {n} pages wrong after the first touch"));
    }
    // Copy-on-write: a child rewrites every page and checks its copy; the parent's data
    // must not change, and then the parent writes (its own copy-on-write faults).
    // SAFETY: single-threaded; the child only touches its own copy of the mapping.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", errno()));
    }
    if pid == 0 {
        map.fill(0..n, 2);
        let code = if map.wrong(0..n, 2) == 0 && map.wrong(0..n, 1) == n {
            0
        } else {
            1
        };
        // SAFETY: ends the child without running the parent's destructors twice.
        unsafe { libc::_exit(code) };
    }
    if !wait_ok(pid) {
        return Err("the forked child saw wrong data in its copy-on-write copy".into());
    }
    let bad = map.wrong(0..n, 1);
    if bad != 0 {
        return Err(format!(
            "{bad} of {n} pages changed in the parent by the child's writes"
        ));
    }
    map.fill(0..n, 3);
    // Read-only: the data stays readable, and a write must fault (checked in a child,
    // which must die of SIGSEGV).
    map.protect(libc::PROT_READ)
        .map_err(|e| format!("mprotect(PROT_READ): {e}"))?;
    if map.wrong(0..n, 3) != 0 {
        return Err("data wrong after mprotect(PROT_READ)".into());
    }
    // SAFETY: single-threaded; the child writes to a read-only page and must be killed.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: page 0 of the mapping: the write faults (that is the test).
        unsafe { map.ptr.write_volatile(0) };
        // SAFETY: only reached if the write did not fault.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waitpid writes only to `status`.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if !(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV) {
        return Err(format!(
            "a write to a PROT_READ page did not fault (wait status {status:#x})"
        ));
    }
    map.protect(libc::PROT_READ | libc::PROT_WRITE)
        .map_err(|e| format!("mprotect(PROT_READ|PROT_WRITE): {e}"))?;
    map.fill(0..n / 2, 4);
    if map.wrong(0..n / 2, 4) != 0 || map.wrong(n / 2..n, 3) != 0 {
        return Err("data wrong after mprotect back to read-write".into());
    }
    // Unmap the upper half and map fresh memory in its place: it must read as zeros (no
    // stale translation of the freed pages may survive).
    let half = n / 2 * PAGE;
    // SAFETY: unmaps the upper half of the mapping (page-aligned) and maps anonymous
    // memory at that same address (MAP_FIXED over a range this Map owns).
    let p = unsafe {
        let upper = map.ptr.cast::<u8>().add(half).cast::<libc::c_void>();
        if libc::munmap(upper, map.len - half) != 0 {
            return Err(format!("munmap: {}", errno()));
        }
        libc::mmap(
            upper,
            map.len - half,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap(MAP_FIXED): {}", errno()));
    }
    for page in n / 2..n {
        for word in (0..PAGE / 8).step_by(64) {
            // SAFETY: inside the remapped upper half.
            if unsafe { map.ptr.add(page * PAGE / 8 + word).read_volatile() } != 0 {
                return Err(format!("page {page} of the fresh mapping is not zero"));
            }
        }
    }
    map.fill(n / 2..n, 5);
    if map.wrong(0..n / 2, 4) != 0 || map.wrong(n / 2..n, 5) != 0 {
        return Err("data wrong after munmap + remap".into());
    }
    Ok(n)
}

fn pingpong(n: usize) -> ExitCode {
    let mut a = [0; 2];
    let mut b = [0; 2];
    // SAFETY: pipe writes two descriptors into each array.
    if unsafe { libc::pipe(a.as_mut_ptr()) } != 0 || unsafe { libc::pipe(b.as_mut_ptr()) } != 0 {
        return fail(&format!("pingpong: pipe: {}", errno()));
    }
    let rw = |fd: i32, v: Option<u64>| -> Option<u64> {
        let mut buf = v.unwrap_or(0).to_le_bytes();
        // SAFETY: buf is 8 writable/readable bytes that live across the call.
        let r = unsafe {
            match v {
                Some(_) => libc::write(fd, buf.as_ptr().cast(), 8),
                None => libc::read(fd, buf.as_mut_ptr().cast(), 8),
            }
        };
        (r == 8).then(|| u64::from_le_bytes(buf))
    };
    // SAFETY: single-threaded; the child only uses the pipes and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return fail(&format!("pingpong: fork: {}", errno()));
    }
    if pid == 0 {
        // Child: read a counter from a, send counter + 1 on b.
        let mut code = 0;
        for _ in 0..n {
            match rw(a[0], None) {
                Some(v) => {
                    if rw(b[1], Some(v + 1)).is_none() {
                        code = 1;
                        break;
                    }
                }
                None => {
                    code = 1;
                    break;
                }
            }
        }
        // SAFETY: ends the child.
        unsafe { libc::_exit(code) };
    }
    let mut v = 0;
    for i in 0..n {
        if rw(a[1], Some(v)).is_none() {
            return fail("pingpong: write");
        }
        match rw(b[0], None) {
            Some(w) if w == v + 1 => v = w + 1,
            Some(w) => return fail(&format!("pingpong: round {i}: sent {v}, got {w}")),
            None => return fail("pingpong: read"),
        }
    }
    if !wait_ok(pid) {
        return fail("pingpong: the child failed");
    }
    println!("RVMM-LINUX pingpong {n} round trips ok (counter {v})");
    ExitCode::SUCCESS
}
