// SPDX-License-Identifier: GPL-2.0

//! Single fuzz operations on `/dev/rvmm` file descriptors: random ioctls, mmaps of the
//! run page, memory regions, short runs, and what counts as a wrong answer.
//!
//! Nothing here allocates or takes a lock: forked children of the multithreaded fuzzer
//! run these too (they report through a pipe instead of the log).

use super::gen::{self, Templates};
use super::rng::Rng;
use crate::sys::errno;
use rvmm::uapi::{self, ioc};
use std::cell::Cell;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Bytes of a thread's scratch buffer for ioctl arguments.
pub const SCRATCH_LEN: usize = 16 << 10;
const PAGE: usize = 4096;

/// Exit reasons counted one by one (higher ones in the last bucket).
pub const EXIT_BUCKETS: usize = 32;

/// Counters of a run, in memory shared with the forked fuzzer and its children.
#[repr(C)]
pub struct Counters {
    pub calls: AtomicU64,
    pub guest_runs: AtomicU64,
    pub exits: AtomicU64,
    pub host_errors: AtomicU64,
    pub eintr: AtomicU64,
    pub forks: AtomicU64,
    pub child_kills: AtomicU64,
    pub vms: AtomicU64,
    pub exit_reasons: [AtomicU64; EXIT_BUCKETS],
}

impl Counters {
    pub fn add(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    pub fn exit_seen(&self, reason: u32) {
        Self::add(&self.exits);
        Self::add(&self.exit_reasons[(reason as usize).min(EXIT_BUCKETS - 1)]);
    }
}

/// The errnos rvmm (and the kernel around it) may answer an ioctl with: the argument is
/// wrong (EINVAL, EFAULT, E2BIG), the state is (EBUSY, EEXIST, ENOENT, ENXIO), no memory
/// (ENOMEM, ENOSPC), a signal (EINTR, EAGAIN), not an rvmm request (ENOTTY), or the CPU
/// lacks something (EOPNOTSUPP, ENODEV, EPERM).
pub const ALLOWED_ERRNOS: &[i32] = &[
    libc::ENOTTY,
    libc::EINVAL,
    libc::EFAULT,
    libc::EBUSY,
    libc::EEXIST,
    libc::ENOENT,
    libc::ENOMEM,
    libc::EINTR,
    libc::ENXIO,
    libc::EAGAIN,
    libc::EPERM,
    libc::E2BIG,
    libc::ENOSPC,
    libc::EOPNOTSUPP,
    libc::ENODEV,
];

/// What was called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Op {
    Ioctl = 0,
    Mmap = 1,
    Open = 2,
    /// RVMM_RUN from a task with an I/O permission bitmap (rvmm must refuse it).
    IopermRun = 3,
}

impl Op {
    fn from_u32(v: u32) -> Self {
        match v {
            1 => Op::Mmap,
            2 => Op::Open,
            3 => Op::IopermRun,
            _ => Op::Ioctl,
        }
    }
}

/// Whether `e` is an acceptable failure of `op` (`fd_gone`: the descriptor was closed
/// under the caller, by another thread or by the caller itself).
pub fn errno_expected(op: Op, e: i32, fd_gone: bool) -> bool {
    ALLOWED_ERRNOS.contains(&e)
        || (e == libc::EBADF && fd_gone)
        || (op == Op::Mmap && matches!(e, libc::EACCES | libc::EOVERFLOW))
        || (op == Op::Open && matches!(e, libc::EMFILE | libc::ENFILE))
}

/// Whether a successful ioctl's value is one the ABI allows.
pub fn value_expected(cmd: u32, arg: usize, v: isize) -> bool {
    match cmd {
        uapi::RVMM_GET_API_VERSION => v == uapi::RVMM_API_VERSION as isize,
        uapi::RVMM_CREATE_VCPU => v >= 0 && v as usize == arg,
        uapi::RVMM_GET_MSRS | uapi::RVMM_SET_MSRS => {
            (0..=uapi::RVMM_MAX_MSR_ENTRIES as isize).contains(&v)
        }
        uapi::RVMM_SIGNAL_MSI => (0..=uapi::RVMM_MAX_VCPUS as isize).contains(&v),
        c if uapi::IOCTLS.iter().any(|&(_, k, _)| k == c) => v == 0,
        // An ioctl number outside the ABI must not succeed.
        _ => false,
    }
}

/// The name of an ioctl number.
pub fn ioctl_name(cmd: u32) -> &'static str {
    uapi::IOCTLS
        .iter()
        .find(|&&(_, k, _)| k == cmd)
        .map_or("ioctl", |&(n, _, _)| n)
}

/// One failure, as text.
pub fn describe(op: Op, cmd: u32, arg: u64, value: i64, bad_value: bool) -> String {
    let what = match op {
        Op::Ioctl => format!("{}({cmd:#x}, arg {arg:#x})", ioctl_name(cmd)),
        Op::Mmap => format!("mmap of the VM fd (offset {arg:#x})"),
        Op::Open => "open /dev/rvmm".to_string(),
        Op::IopermRun => format!("RVMM_RUN({arg}) from a task with ioperm()"),
    };
    if bad_value {
        format!("{what} succeeded with the value {value}, outside the ABI")
    } else {
        format!(
            "{what} failed with errno {value} ({}), outside the documented set",
            crate::sys::strerror(value as i32)
        )
    }
}

/// Where failures go: the fuzzer's log (threads), or a pipe (forked children).
pub enum Out<'a> {
    Log(&'a Mutex<Vec<String>>),
    Pipe { fd: i32, sent: Cell<u32> },
}

/// A record a child writes to its pipe: op and ioctl number, errno or value, argument,
/// and whether it is a bad value.
pub const RECORD: usize = 32;

pub struct Sink<'a> {
    pub counters: &'a Counters,
    pub out: Out<'a>,
}

impl Sink<'_> {
    pub fn fail(&self, op: Op, cmd: u32, arg: u64, value: i64, bad_value: bool) {
        Counters::add(&self.counters.host_errors);
        match &self.out {
            Out::Log(log) => {
                let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
                if l.len() < 30 {
                    l.push(describe(op, cmd, arg, value, bad_value));
                }
            }
            Out::Pipe { fd, sent } => {
                if sent.get() >= 32 {
                    return;
                }
                sent.set(sent.get() + 1);
                let mut rec = [0u8; RECORD];
                rec[0..4].copy_from_slice(&(op as u32).to_le_bytes());
                rec[4..8].copy_from_slice(&cmd.to_le_bytes());
                rec[8..16].copy_from_slice(&value.to_le_bytes());
                rec[16..24].copy_from_slice(&arg.to_le_bytes());
                rec[24] = u8::from(bad_value);
                // SAFETY: writes our buffer to our pipe.
                unsafe { libc::write(*fd, rec.as_ptr().cast(), RECORD) };
            }
        }
    }
}

/// Decodes a child's record.
pub fn decode(rec: &[u8; RECORD]) -> String {
    let u32_at = |i: usize| u32::from_le_bytes(rec[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(rec[i..i + 8].try_into().unwrap());
    describe(
        Op::from_u32(u32_at(0)),
        u32_at(4),
        u64_at(16),
        u64_at(8) as i64,
        rec[24] != 0,
    )
}

/// A file descriptor an operation uses, and how to tell that it was closed meanwhile.
#[derive(Clone, Copy)]
pub struct Fd<'a> {
    pub fd: i32,
    /// The owner's slot (a VM's descriptor, -1 once closed).
    pub slot: Option<&'a AtomicI32>,
}

impl Fd<'_> {
    pub fn own(fd: i32) -> Fd<'static> {
        Fd { fd, slot: None }
    }

    /// Closed (or never opened), so EBADF, or another file's answers, are fine.
    pub fn gone(&self) -> bool {
        self.fd < 0 || self.slot.is_some_and(|s| s.load(Relaxed) != self.fd)
    }
}

/// An anonymous mapping followed by an inaccessible guard page (so that a memory
/// region starting in it cannot pin whatever lies after it), unmapped on drop.
pub struct Mapping {
    pub addr: usize,
    pub len: usize,
    total: usize,
}

impl Mapping {
    pub fn guarded(len: usize, prot: i32) -> Result<Self, String> {
        let total = len + PAGE;
        // SAFETY: a fresh anonymous reservation nothing else refers to.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap of {total} bytes: {}",
                crate::sys::strerror(errno())
            ));
        }
        let m = Self {
            addr: p as usize,
            len,
            total,
        };
        // SAFETY: the first `len` bytes of our reservation.
        if unsafe { libc::mprotect(p, len, prot) } != 0 {
            return Err(format!("mprotect: {}", crate::sys::strerror(errno())));
        }
        Ok(m)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly our mapping.
        unsafe { libc::munmap(self.addr as *mut _, self.total) };
    }
}

/// A thread's buffers for ioctl arguments: [scratch, writable][guard][read-only][guard].
pub struct ThreadMem {
    _map: Mapping,
    pub scratch: usize,
    /// First byte of the guard page after the scratch area.
    pub guard: usize,
    pub ro: usize,
}

impl ThreadMem {
    pub fn new(rng: &mut Rng) -> Result<Self, String> {
        let map = Mapping::guarded(SCRATCH_LEN + 2 * PAGE, libc::PROT_READ | libc::PROT_WRITE)?;
        let (scratch, guard, ro) = (
            map.addr,
            map.addr + SCRATCH_LEN,
            map.addr + SCRATCH_LEN + PAGE,
        );
        // SAFETY: pages of our mapping: fill the read-only one, then protect both.
        unsafe {
            let bytes = std::slice::from_raw_parts_mut(ro as *mut u8, PAGE);
            rng.fill(bytes);
            if libc::mprotect(guard as *mut _, PAGE, libc::PROT_NONE) != 0
                || libc::mprotect(ro as *mut _, PAGE, libc::PROT_READ) != 0
            {
                return Err(format!("mprotect: {}", crate::sys::strerror(errno())));
            }
        }
        Ok(Self {
            _map: map,
            scratch,
            guard,
            ro,
        })
    }
}

/// What an operation may point the kernel at.
pub struct Env<'a> {
    pub mem: &'a ThreadMem,
    /// A reserved, inaccessible range: addresses that are certainly unmapped.
    pub hole: (usize, usize),
    pub tpl: &'a Templates,
    /// A VM's guest RAM and ROM mappings (kept mapped while the operation runs).
    pub ram: (usize, usize),
    pub rom: (usize, usize),
}

/// Issues an ioctl and judges the answer.
pub fn ioctl(sink: &Sink, fd: Fd, cmd: u32, arg: usize) -> Result<isize, i32> {
    // SAFETY: the kernel validates every argument; pointers are into our own scratch,
    // RAM or run-page mappings, or addresses that are never mapped.
    let r = unsafe { libc::ioctl(fd.fd, cmd as _, arg) };
    Counters::add(&sink.counters.calls);
    if r < 0 {
        let e = errno();
        if !errno_expected(Op::Ioctl, e, fd.gone()) {
            sink.fail(Op::Ioctl, cmd, arg as u64, e.into(), false);
        }
        return Err(e);
    }
    let v = r as isize;
    if !fd.gone() && !value_expected(cmd, arg, v) {
        sink.fail(Op::Ioctl, cmd, arg as u64, v as i64, true);
    }
    Ok(v)
}

/// An ioctl with a structure argument built on the stack.
pub fn ioctl_with<T>(sink: &Sink, fd: Fd, cmd: u32, v: &mut T) -> Result<isize, i32> {
    ioctl(sink, fd, cmd, v as *mut T as usize)
}

/// Copies `v` to `addr` (in the caller's scratch area).
fn put<T: Copy>(addr: usize, v: &T) {
    // SAFETY: callers pass an address with `size_of::<T>()` bytes of scratch behind it.
    unsafe { std::ptr::write_unaligned(addr as *mut T, *v) };
}

/// An ioctl number: mostly one of the ABI, else one with the right number and the
/// wrong size or direction, an unknown number, or another driver's.
pub fn pick_cmd(rng: &mut Rng) -> u32 {
    let known = rng.pick(uapi::IOCTLS).1;
    let (dir, nr, size) = (
        uapi::ioc_dir(known),
        uapi::ioc_nr(known),
        uapi::ioc_size(known),
    );
    match rng.below(100) {
        0..=79 => known,
        80..=86 => ioc(rng.below(4) as u32, nr, rng.index(1 << 14)),
        87..=91 => {
            let delta = rng.pick(&[-8i64, -1, 1, 4, 8, 4096]);
            ioc(
                dir,
                nr,
                (size as i64 + delta).clamp(0, (1 << 14) - 1) as usize,
            )
        }
        92..=96 => ioc(rng.below(4) as u32, rng.u8().into(), rng.index(1 << 14)),
        _ => rng.pick(&[0u32, 0xae00, 0xae01, 0xae41, 0xb900, 0xb9ff]),
    }
}

/// The integer argument of RVMM_CREATE_VCPU or RVMM_RUN.
pub fn int_arg(rng: &mut Rng) -> usize {
    match rng.below(10) {
        0..=5 => rng.index(3),
        6 | 7 => rng.index(8),
        _ => rng.pick(&[8usize, 9, 255, 0xffff_ffff, 1 << 32, usize::MAX, 1 << 63]),
    }
}

/// A pointer into the scratch area (aligned or not) holding a generated argument for
/// `cmd`.
fn good_ptr(rng: &mut Rng, env: &Env, cmd: u32) -> usize {
    let size = uapi::ioc_size(cmd).min(SCRATCH_LEN);
    let mut off = rng.index(SCRATCH_LEN - size + 1);
    if rng.pct(70) {
        off &= !7;
    }
    let p = env.mem.scratch + off;
    let vcpu = gen::vcpu_index(rng);
    match cmd {
        uapi::RVMM_SET_MEMORY_REGION => put(p, &gen::memory_region(rng, env)),
        uapi::RVMM_GET_REGS | uapi::RVMM_SET_REGS => put(
            p,
            &uapi::VcpuRegs {
                vcpu,
                padding: if rng.pct(90) { 0 } else { rng.u32() },
                regs: gen::regs(rng),
            },
        ),
        uapi::RVMM_GET_SREGS | uapi::RVMM_SET_SREGS => put(
            p,
            &uapi::VcpuSregs {
                vcpu,
                padding: if rng.pct(90) { 0 } else { rng.u32() },
                sregs: gen::sregs(rng, env.tpl),
            },
        ),
        uapi::RVMM_INTERRUPT => put(p, &gen::interrupt(rng, vcpu)),
        uapi::RVMM_SET_SHADOW_LIMITS => put(p, &gen::shadow_limits(rng)),
        uapi::RVMM_SET_CPUID => put(p, &gen::cpuid(rng, vcpu)),
        uapi::RVMM_GET_MSRS | uapi::RVMM_SET_MSRS => put(p, &gen::msrs(rng, vcpu)),
        uapi::RVMM_SIGNAL_MSI => put(p, &gen::msi(rng)),
        uapi::RVMM_SET_MP_STATE => put(p, &gen::mp_state(rng, vcpu)),
        _ => {
            // SAFETY: `size` bytes of scratch from `p` (off <= SCRATCH_LEN - size).
            let bytes = unsafe { std::slice::from_raw_parts_mut(p as *mut u8, size) };
            if rng.bool() {
                bytes.fill(0);
            } else {
                rng.fill(bytes);
            }
        }
    }
    p
}

/// One random ioctl on `fd`: `bad_pct` percent of pointer arguments are bad ones.
pub fn abi_op(rng: &mut Rng, sink: &Sink, fd: Fd, env: &Env, bad_pct: u64) {
    let cmd = pick_cmd(rng);
    let arg = if cmd == uapi::RVMM_CREATE_VCPU || cmd == uapi::RVMM_RUN {
        int_arg(rng)
    } else if uapi::ioc_size(cmd) == 0 && rng.pct(50) {
        let any = rng.next_u64() as usize;
        rng.pick(&[0usize, 1, usize::MAX, any])
    } else if rng.pct(bad_pct) {
        gen::bad_addr(rng, env)
    } else if rng.pct(3) {
        // The read-only page: fine to read from, EFAULT to write to.
        env.mem.ro + rng.index(64)
    } else {
        good_ptr(rng, env, cmd)
    };
    let _ = ioctl(sink, fd, cmd, arg);
}

/// One ioctl on a vCPU's state with a well-formed argument (registers, events, MSRs,
/// CPUID, MP state, an MSI).
pub fn vcpu_op(rng: &mut Rng, sink: &Sink, fd: Fd, env: &Env) {
    const CMDS: &[u32] = &[
        uapi::RVMM_GET_REGS,
        uapi::RVMM_SET_REGS,
        uapi::RVMM_GET_SREGS,
        uapi::RVMM_SET_SREGS,
        uapi::RVMM_INTERRUPT,
        uapi::RVMM_SET_CPUID,
        uapi::RVMM_GET_MSRS,
        uapi::RVMM_SET_MSRS,
        uapi::RVMM_SET_MP_STATE,
        uapi::RVMM_SIGNAL_MSI,
        uapi::RVMM_GET_STATS,
        uapi::RVMM_CREATE_VCPU,
    ];
    let cmd = rng.pick(CMDS);
    let arg = if cmd == uapi::RVMM_CREATE_VCPU {
        int_arg(rng)
    } else {
        good_ptr(rng, env, cmd)
    };
    let _ = ioctl(sink, fd, cmd, arg);
}

/// RVMM_SET_MEMORY_REGION with a generated region (creates, moves, deletes, overlaps).
pub fn memslot_op(rng: &mut Rng, sink: &Sink, fd: Fd, env: &Env) {
    let mut r = gen::memory_region(rng, env);
    let _ = ioctl_with(sink, fd, uapi::RVMM_SET_MEMORY_REGION, &mut r);
}

/// Offsets of fields of the run page.
const RUN_REQUEST_WINDOW: usize = 0;
const RUN_IMMEDIATE_EXIT: usize = 1;
const RUN_EXIT_REASON: usize = 4;

/// Maps vCPU `vcpu`'s run page the normal way.
pub fn map_run(sink: &Sink, fd: Fd, vcpu: u64) -> Option<usize> {
    mmap_checked(
        sink,
        fd,
        PAGE,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
        (vcpu * PAGE as u64) as i64,
    )
}

fn mmap_checked(sink: &Sink, fd: Fd, len: usize, prot: i32, flags: i32, off: i64) -> Option<usize> {
    // SAFETY: a new mapping of the VM fd (or a failure); nothing else is replaced.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd.fd, off) };
    Counters::add(&sink.counters.calls);
    if p == libc::MAP_FAILED {
        let e = errno();
        if !errno_expected(Op::Mmap, e, fd.gone()) {
            sink.fail(Op::Mmap, 0, off as u64, e.into(), false);
        }
        return None;
    }
    Some(p as usize)
}

/// Sets `immediate_exit` of a run page mapped writable.
pub fn set_immediate_exit(run: usize, on: bool) {
    // SAFETY: the caller's own writable mapping of a run page.
    unsafe { std::ptr::write_volatile((run + RUN_IMMEDIATE_EXIT) as *mut u8, u8::from(on)) };
}

/// Sets `request_interrupt_window`.
pub fn set_request_window(run: usize, on: bool) {
    // SAFETY: as above.
    unsafe { std::ptr::write_volatile((run + RUN_REQUEST_WINDOW) as *mut u8, u8::from(on)) };
}

/// The exit reason of the last run.
pub fn exit_reason(run: usize) -> u32 {
    // SAFETY: the caller's own mapping of a run page.
    unsafe { std::ptr::read_volatile((run + RUN_EXIT_REASON) as *const u32) }
}

/// The run page as the `uapi::Run` it holds.
pub fn run_struct(run: usize) -> *mut uapi::Run {
    run as *mut uapi::Run
}

pub fn unmap(addr: usize, len: usize) {
    // SAFETY: the caller's own mapping.
    unsafe { libc::munmap(addr as *mut _, len) };
}

/// mmap of the VM fd with every kind of wrong offset, size, protection and flags; then,
/// on the mapping, accesses, an ioctl that writes into it, a memory region on it,
/// mprotect, madvise (MADV_DONTNEED zaps the inserted page, MADV_DOFORK undoes the
/// module's VM_DONTCOPY) or mremap, and munmap.
pub fn mmap_op(rng: &mut Rng, sink: &Sink, fd: Fd) {
    let len = rng.pick(&[
        PAGE,
        PAGE,
        PAGE,
        PAGE,
        0,
        1,
        PAGE - 1,
        PAGE + 1,
        2 * PAGE,
        1 << 20,
    ]);
    let off: i64 = match rng.below(10) {
        0..=6 => (rng.below(10) * PAGE as u64) as i64,
        7 => rng.pick(&[1, 4095, 4097]),
        8 => rng.pick(&[8 * 4096, 1000 * 4096, 1 << 40]),
        _ => rng.pick(&[-4096, i64::MAX & !0xfff]),
    };
    const R: i32 = libc::PROT_READ;
    const W: i32 = libc::PROT_WRITE;
    const X: i32 = libc::PROT_EXEC;
    let prot = rng.pick(&[R | W, R | W, R, W, R | W | X, X, libc::PROT_NONE, R | X]);
    let flags = rng.pick(&[
        libc::MAP_SHARED,
        libc::MAP_SHARED,
        libc::MAP_SHARED | libc::MAP_POPULATE,
        libc::MAP_PRIVATE,
        libc::MAP_PRIVATE | libc::MAP_POPULATE,
        libc::MAP_SHARED | libc::MAP_NORESERVE,
        libc::MAP_SHARED_VALIDATE,
        libc::MAP_SHARED | libc::MAP_LOCKED,
    ]);
    let Some(mut p) = mmap_checked(sink, fd, len, prot, flags, off) else {
        return;
    };
    let mut maplen = (len + PAGE - 1) & !(PAGE - 1);
    // rvmm maps exactly one page; anything else mapped is a bug on its side, but keep
    // the fuzzer's hands off it.
    let one_page = maplen == PAGE;
    if one_page && prot & R != 0 && rng.pct(50) {
        let _ = exit_reason(p);
    }
    if one_page && prot & W != 0 && rng.pct(50) {
        // A MAP_SHARED page is the vCPU's own, possibly running in another thread.
        set_immediate_exit(p, rng.pct(30));
        set_request_window(p, rng.pct(30));
    }
    if rng.pct(15) {
        // The kernel writes its answer into the run page mapping.
        let cmd = rng.pick(&[
            uapi::RVMM_GET_STATS,
            uapi::RVMM_GET_REGS,
            uapi::RVMM_GET_VMX_CAPS,
            uapi::RVMM_GET_STATUS,
        ]);
        let _ = ioctl(sink, fd, cmd, p);
    }
    if one_page && rng.pct(8) {
        // The run page as guest memory.
        let mut r = uapi::MemoryRegion {
            slot: rng.below(uapi::RVMM_MAX_MEMSLOTS.into()) as u32,
            flags: if rng.bool() {
                uapi::RVMM_MEM_READONLY
            } else {
                0
            },
            guest_phys_addr: rng.below(1 << 20) << 12,
            memory_size: PAGE as u64,
            userspace_addr: p as u64,
        };
        let _ = ioctl_with(sink, fd, uapi::RVMM_SET_MEMORY_REGION, &mut r);
    }
    // Changes to the mapping; it is not touched afterwards (a zapped page faults).
    match rng.below(8) {
        0 => {
            // SAFETY: our mapping.
            unsafe {
                libc::mprotect(
                    p as *mut _,
                    maplen,
                    rng.pick(&[R, R | W, R | W | X, libc::PROT_NONE]),
                )
            };
        }
        1 => {
            let advice = rng.pick(&[
                libc::MADV_DONTNEED,
                libc::MADV_DOFORK,
                libc::MADV_DONTFORK,
                libc::MADV_WILLNEED,
                libc::MADV_COLD,
                libc::MADV_PAGEOUT,
                libc::MADV_REMOVE,
                libc::MADV_FREE,
            ]);
            // SAFETY: our mapping.
            unsafe { libc::madvise(p as *mut _, maplen, advice) };
        }
        2 => {
            let new_len = rng.pick(&[PAGE, 2 * PAGE, maplen]);
            // SAFETY: our mapping, moved or resized (or not).
            let q = unsafe { libc::mremap(p as *mut _, maplen, new_len, libc::MREMAP_MAYMOVE) };
            if q != libc::MAP_FAILED {
                p = q as usize;
                maplen = new_len;
            }
        }
        _ => {}
    }
    unmap(p, maplen);
}

/// Runs vCPU `vcpu` a few times through its own run page (`immediate_exit` sometimes
/// set), counting exits. The caller bounds runs (a kicker thread or an interval timer).
pub fn short_runs(rng: &mut Rng, sink: &Sink, fd: Fd, vcpu: u64) {
    let run = map_run(sink, fd, vcpu);
    for _ in 0..rng.range(1, 4) {
        if let Some(run) = run {
            set_immediate_exit(run, rng.pct(30));
        }
        match ioctl(sink, fd, uapi::RVMM_RUN, vcpu as usize) {
            Ok(_) => sink.counters.exit_seen(run.map_or(0, exit_reason)),
            Err(libc::EINTR) => Counters::add(&sink.counters.eintr),
            Err(_) => break,
        }
    }
    if let Some(run) = run {
        unmap(run, PAGE);
    }
}

/// Opens /dev/rvmm.
pub fn open_dev(sink: &Sink) -> Option<i32> {
    // SAFETY: a NUL-terminated path.
    let fd = unsafe { libc::open(c"/dev/rvmm".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    Counters::add(&sink.counters.calls);
    if fd < 0 {
        let e = errno();
        if !errno_expected(Op::Open, e, false) {
            sink.fail(Op::Open, 0, 0, e.into(), false);
        }
        return None;
    }
    Some(fd)
}

pub fn close(fd: i32) {
    // SAFETY: closes a descriptor the caller owns.
    unsafe { libc::close(fd) };
}

/// A fresh /dev/rvmm file: ioctls before and after RVMM_CREATE_VM (twice), a vCPU, an
/// irqchip after it, a run with `immediate_exit`, mmaps; then close.
pub fn fresh_fd_op(rng: &mut Rng, sink: &Sink, env: &Env) {
    let Some(raw) = open_dev(sink) else {
        return;
    };
    let fd = Fd::own(raw);
    for _ in 0..rng.range(1, 12) {
        match rng.below(10) {
            0..=4 => abi_op(rng, sink, fd, env, 30),
            5 => mmap_op(rng, sink, fd),
            6 => {
                let _ = ioctl(sink, fd, uapi::RVMM_CREATE_VM, 0);
                if rng.pct(70) {
                    // A small shadow pool: many of these VMs live at once.
                    let mut l = uapi::ShadowLimits {
                        pages: 64,
                        roots: 4,
                    };
                    let _ = ioctl_with(sink, fd, uapi::RVMM_SET_SHADOW_LIMITS, &mut l);
                }
            }
            7 => {
                let _ = ioctl(sink, fd, uapi::RVMM_CREATE_VCPU, int_arg(rng));
            }
            8 => {
                let _ = ioctl(sink, fd, uapi::RVMM_CREATE_IRQCHIP, 0);
            }
            _ => {
                let vcpu = rng.below(3);
                if let Some(run) = map_run(sink, fd, vcpu) {
                    set_immediate_exit(run, true);
                    match ioctl(sink, fd, uapi::RVMM_RUN, vcpu as usize) {
                        Err(libc::EINTR) => Counters::add(&sink.counters.eintr),
                        Ok(_) => sink.counters.exit_seen(exit_reason(run)),
                        Err(_) => {}
                    }
                    unmap(run, PAGE);
                }
            }
        }
    }
    close(raw);
}

/// RVMM_RUN from a task with an I/O permission bitmap: rvmm refuses (EINVAL), it must
/// never run the guest. Only in a forked child (the bitmap stays with the task).
pub fn ioperm_run(rng: &mut Rng, sink: &Sink, fd: Fd) {
    // SAFETY: ioperm(2) on a port we never touch.
    if unsafe { libc::ioperm(0x80, 1, 1) } != 0 {
        return;
    }
    let vcpu = rng.index(3);
    if let Some(run) = map_run(sink, fd, vcpu as u64) {
        set_immediate_exit(run, false);
        // SAFETY: RVMM_RUN takes an integer.
        let r = unsafe { libc::ioctl(fd.fd, uapi::RVMM_RUN as _, vcpu) };
        Counters::add(&sink.counters.calls);
        if r >= 0 && !fd.gone() {
            sink.fail(Op::IopermRun, uapi::RVMM_RUN, vcpu as u64, r.into(), true);
        }
        unmap(run, PAGE);
    }
    // SAFETY: as above.
    unsafe { libc::ioperm(0x80, 1, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_rules() {
        assert!(errno_expected(Op::Ioctl, libc::EINVAL, false));
        assert!(!errno_expected(Op::Ioctl, libc::EBADF, false));
        assert!(errno_expected(Op::Ioctl, libc::EBADF, true));
        assert!(!errno_expected(Op::Ioctl, libc::EIO, false));
        assert!(errno_expected(Op::Mmap, libc::EACCES, false));
        assert!(!errno_expected(Op::Ioctl, libc::EACCES, false));
    }

    #[test]
    fn values() {
        assert!(value_expected(uapi::RVMM_CREATE_VCPU, 3, 3));
        assert!(!value_expected(uapi::RVMM_CREATE_VCPU, 3, 2));
        assert!(value_expected(
            uapi::RVMM_GET_API_VERSION,
            0,
            uapi::RVMM_API_VERSION as isize
        ));
        assert!(value_expected(uapi::RVMM_SET_MSRS, 0, 16));
        assert!(!value_expected(uapi::RVMM_SET_MSRS, 0, 17));
        assert!(value_expected(uapi::RVMM_RUN, 0, 0));
        assert!(!value_expected(uapi::RVMM_RUN, 0, 1));
        assert!(!value_expected(ioc(0, 0x7f, 0), 0, 0));
    }

    #[test]
    fn records_round_trip() {
        // SAFETY: the counters are plain integers; all zeros is a valid value.
        let counters = Box::new(unsafe { std::mem::zeroed::<Counters>() });
        let mut p = [0i32; 2];
        // SAFETY: a pipe into our array.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        let sink = Sink {
            counters: &counters,
            out: Out::Pipe {
                fd: p[1],
                sent: Cell::new(0),
            },
        };
        sink.fail(Op::Ioctl, uapi::RVMM_RUN, 2, libc::EIO.into(), false);
        let mut rec = [0u8; RECORD];
        // SAFETY: reads into our buffer.
        let n = unsafe { libc::read(p[0], rec.as_mut_ptr().cast(), RECORD) };
        assert_eq!(n, RECORD as isize);
        let text = decode(&rec);
        assert!(
            text.contains("RVMM_RUN") && text.contains(&format!("errno {}", libc::EIO)),
            "{text}"
        );
        assert_eq!(counters.host_errors.load(Relaxed), 1);
        close(p[0]);
        close(p[1]);
    }

    #[test]
    fn picked_commands_are_mostly_the_abi() {
        let mut rng = Rng::new(3);
        let known = (0..1000)
            .filter(|_| {
                let cmd = pick_cmd(&mut rng);
                uapi::IOCTLS.iter().any(|&(_, c, _)| c == cmd)
            })
            .count();
        assert!((700..950).contains(&known), "{known}");
    }

    #[test]
    fn generated_pointers_stay_in_scratch_or_are_bad() {
        let mut rng = Rng::new(8);
        let mem = ThreadMem::new(&mut rng).unwrap();
        let tpl = Templates::new().unwrap();
        let env = Env {
            mem: &mem,
            hole: (0x10_0000_0000, 1 << 20),
            tpl: &tpl,
            ram: (0, 0),
            rom: (0, 0),
        };
        for _ in 0..5000 {
            let cmd = pick_cmd(&mut rng);
            let p = good_ptr(&mut rng, &env, cmd);
            assert!(p >= mem.scratch && p + uapi::ioc_size(cmd).min(SCRATCH_LEN) <= mem.guard);
            let b = gen::bad_addr(&mut rng, &env);
            let in_scratch = b >= mem.scratch && b < mem.guard - 64;
            assert!(!in_scratch, "{b:#x}");
        }
    }
}
