// SPDX-License-Identifier: GPL-2.0

//! The system calls the tests need: module load/unload, fork, affinity, prctl, mmap,
//! /dev/kmsg.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

pub fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

pub fn strerror(e: i32) -> String {
    io::Error::from_raw_os_error(e).to_string()
}

pub fn online_cpus() -> u32 {
    // SAFETY: sysconf has no memory-safety preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) as u32 }
}

/// finit_module(2).
pub fn insmod(path: &Path) -> io::Result<()> {
    insmod_with(path, c"")
}

/// finit_module(2) with module parameters ("name=value ...").
pub fn insmod_with(path: &Path, params: &std::ffi::CStr) -> io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: valid fd and NUL-terminated parameter string.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// delete_module(2), non-blocking (fails with EWOULDBLOCK/EBUSY while in use).
pub fn rmmod(name: &str) -> io::Result<()> {
    let c = CString::new(name).unwrap();
    // SAFETY: NUL-terminated module name.
    let r = unsafe { libc::syscall(libc::SYS_delete_module, c.as_ptr(), libc::O_NONBLOCK) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn module_loaded(name: &str) -> bool {
    std::fs::read_to_string("/proc/modules")
        .map(|m| m.lines().any(|l| l.split_whitespace().next() == Some(name)))
        .unwrap_or(false)
}

/// Forks a child that runs `f` and exits 0 on success (1 with a message otherwise).
pub fn fork_child(f: impl FnOnce() -> Result<(), String>) -> Result<libc::pid_t, String> {
    // SAFETY: the test binary is single-threaded here; the child only runs `f` and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        let code = match f() {
            Ok(()) => 0,
            Err(e) => {
                println!("# child {}: {e}", std::process::id());
                1
            }
        };
        // SAFETY: leave without running the parent's atexit handlers twice.
        unsafe { libc::_exit(code) };
    }
    Ok(pid)
}

/// Waits for a child; true if it exited with status 0.
pub fn wait_ok(pid: libc::pid_t) -> bool {
    let mut status = 0;
    // SAFETY: valid pointer to an int.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    r == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

pub fn pin_to_cpu(cpu: u32) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "sched_setaffinity({cpu}): {}",
                io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// PR_SET_TSC(PR_TSC_SIGSEGV): sets CR4.TSD whenever this task runs.
pub fn set_tsc_sigsegv() -> Result<(), String> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_TSC, libc::PR_TSC_SIGSEGV, 0, 0, 0) } != 0 {
        return Err(format!("prctl(PR_SET_TSC): {}", io::Error::last_os_error()));
    }
    Ok(())
}

pub fn sched_yield() {
    // SAFETY: no preconditions.
    unsafe { libc::sched_yield() };
}

/// An anonymous mapping for pointer tests, unmapped on drop.
pub struct MappedPage {
    addr: usize,
    len: usize,
}

impl MappedPage {
    pub fn new(prot: i32) -> Result<Self, String> {
        Self::map(4096, prot)
    }

    /// A writable page followed by an inaccessible one.
    pub fn new_guarded() -> Result<Self, String> {
        let m = Self::map(8192, libc::PROT_READ | libc::PROT_WRITE)?;
        // SAFETY: the second page is part of our mapping.
        if unsafe { libc::mprotect((m.addr + 4096) as *mut _, 4096, libc::PROT_NONE) } != 0 {
            return Err(format!("mprotect: {}", io::Error::last_os_error()));
        }
        Ok(m)
    }

    fn map(len: usize, prot: i32) -> Result<Self, String> {
        // SAFETY: a fresh anonymous mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", io::Error::last_os_error()));
        }
        Ok(Self {
            addr: p as usize,
            len,
        })
    }

    pub fn addr(&self) -> usize {
        self.addr
    }
}

impl Drop for MappedPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly our mapping.
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}

/// The kernel log, read record by record.
pub struct Kmsg(File);

impl Kmsg {
    pub fn open() -> Result<Self, String> {
        let path = c"/dev/kmsg";
        // SAFETY: NUL-terminated path.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(format!("/dev/kmsg: {}", io::Error::last_os_error()));
        }
        // SAFETY: we own the new fd.
        Ok(Self(unsafe { File::from_raw_fd(fd) }))
    }

    /// Reads every record not read yet; returns their messages.
    pub fn drain(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    out.push(
                        rec.split_once(';')
                            .map_or(rec.to_string(), |(_, m)| m.trim_end().to_string()),
                    );
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        out
    }
}

/// A field of /proc/meminfo, in kB.
pub fn meminfo_kb(field: &str) -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    m.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
