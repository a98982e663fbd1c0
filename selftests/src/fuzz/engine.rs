// SPDX-License-Identifier: GPL-2.0

//! The fuzzing process: a few VMs ("worlds"), worker threads that pick random
//! operations on them, a kicker thread that interrupts every worker with SIGUSR1 every
//! few milliseconds (so that no RVMM_RUN, and no ioctl waiting for a running vCPU,
//! outlives the budget), and forked children that use and close the inherited fds.

use super::gen::{self, Templates, RAM_SIZE, ROM_SIZE};
use super::ops::{self, Counters, Env, Fd, Mapping, Out, Sink, ThreadMem};
use super::rng::{stream_seed, Rng};
use crate::sys::errno;
use rvmm::uapi;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// VMs alive at once.
pub const WORLDS: usize = 3;
/// Worker threads.
pub const WORKERS: usize = 6;
/// Held (read) across a fork so that the VM fds the child inherits are the ones it was
/// given: closing a VM takes it (write).
static CLOSE_LOCK: RwLock<()> = RwLock::new(());

/// A forked child gets this long before it is killed.
const CHILD_TIMEOUT: Duration = Duration::from_secs(3);

/// A VM and the memory it may be given.
pub struct World {
    /// The VM's descriptor; -1 once an operation closed it.
    pub fd: AtomicI32,
    pub ram: Mapping,
    pub rom: Mapping,
    /// A second region of RAM that operations unmap and map again (slots keep the old
    /// pages pinned).
    pub ram2: Mutex<Mapping>,
    pub irqchip: bool,
}

impl World {
    fn new(rng: &mut Rng, sink: &Sink, sh: &Shared) -> Result<Self, String> {
        let ram = Mapping::guarded(RAM_SIZE, libc::PROT_READ | libc::PROT_WRITE)?;
        gen::poke((ram.addr, ram.len), 0, &sh.tpl.image);
        let rom = Mapping::guarded(ROM_SIZE, libc::PROT_READ | libc::PROT_WRITE)?;
        // SAFETY: our mapping: fill it, then make it read-only.
        unsafe {
            rng.fill(std::slice::from_raw_parts_mut(
                rom.addr as *mut u8,
                ROM_SIZE,
            ));
            libc::mprotect(rom.addr as *mut _, ROM_SIZE, libc::PROT_READ);
        }
        let ram2 = Mutex::new(Mapping::guarded(
            64 << 10,
            libc::PROT_READ | libc::PROT_WRITE,
        )?);
        let raw = ops::open_dev(sink).unwrap_or(-1);
        let fd = Fd::own(raw);
        let mut irqchip = false;
        if raw >= 0 {
            Counters::add(&sink.counters.vms);
            if rng.pct(95) {
                let _ = ops::ioctl(sink, fd, uapi::RVMM_CREATE_VM, 0);
            }
            if rng.pct(50) {
                irqchip = ops::ioctl(sink, fd, uapi::RVMM_CREATE_IRQCHIP, 0).is_ok();
            }
            if rng.pct(30) {
                let mut l = gen::shadow_limits(rng);
                let _ = ops::ioctl_with(sink, fd, uapi::RVMM_SET_SHADOW_LIMITS, &mut l);
            }
            let mut r = uapi::MemoryRegion {
                slot: 0,
                flags: 0,
                guest_phys_addr: 0,
                memory_size: RAM_SIZE as u64,
                userspace_addr: ram.addr as u64,
            };
            let _ = ops::ioctl_with(sink, fd, uapi::RVMM_SET_MEMORY_REGION, &mut r);
            if rng.pct(40) {
                let mut r = uapi::MemoryRegion {
                    slot: 1,
                    flags: uapi::RVMM_MEM_READONLY,
                    guest_phys_addr: 0xffff_0000,
                    memory_size: ROM_SIZE as u64,
                    userspace_addr: rom.addr as u64,
                };
                let _ = ops::ioctl_with(sink, fd, uapi::RVMM_SET_MEMORY_REGION, &mut r);
            }
            for id in 0..rng.range(1, 3) {
                let _ = ops::ioctl(sink, fd, uapi::RVMM_CREATE_VCPU, id as usize);
            }
        }
        Ok(Self {
            fd: AtomicI32::new(raw),
            ram,
            rom,
            ram2,
            irqchip,
        })
    }

    fn fd(&self) -> Fd<'_> {
        Fd {
            fd: self.fd.load(Relaxed),
            slot: Some(&self.fd),
        }
    }

    /// Closes the VM's descriptor (other threads may be running its vCPUs).
    fn close(&self) {
        let _g = CLOSE_LOCK.write().unwrap_or_else(|e| e.into_inner());
        let fd = self.fd.swap(-1, Relaxed);
        if fd >= 0 {
            ops::close(fd);
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.close();
    }
}

/// State the workers share.
pub struct Shared {
    pub counters: &'static Counters,
    pub log: Mutex<Vec<String>>,
    pub deadline: Instant,
    pub tpl: Templates,
    pub worlds: Mutex<Vec<Arc<World>>>,
    /// Thread ids the kicker signals.
    tids: Mutex<Vec<i32>>,
    stop: AtomicBool,
    done: AtomicUsize,
    hole: Mapping,
    seed: u64,
}

impl Shared {
    fn sink(&self) -> Sink<'_> {
        Sink {
            counters: self.counters,
            out: Out::Log(&self.log),
        }
    }

    fn note(&self, msg: String) {
        let mut l = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() < 30 {
            l.push(msg);
        }
    }

    /// A host error found by the fuzzer itself (not an ioctl's answer).
    fn error(&self, msg: String) {
        Counters::add(&self.counters.host_errors);
        self.note(msg);
    }

    fn world(&self, rng: &mut Rng) -> Arc<World> {
        let w = self.worlds.lock().unwrap_or_else(|e| e.into_inner());
        w[rng.index(w.len())].clone()
    }

    fn env<'a>(&'a self, mem: &'a ThreadMem, w: &World) -> Env<'a> {
        Env {
            mem,
            hole: (self.hole.addr, self.hole.len),
            tpl: &self.tpl,
            ram: (w.ram.addr, w.ram.len),
            rom: (w.rom.addr, w.rom.len),
        }
    }
}

extern "C" fn on_signal(_: i32) {}

/// Installs a no-op handler without SA_RESTART: a blocked RVMM_RUN returns EINTR.
pub fn install_handler(sig: i32) {
    // SAFETY: a plain sigaction with a handler that does nothing.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

fn gettid() -> i32 {
    // SAFETY: no arguments.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Signals every registered worker every few milliseconds until told to stop.
fn kicker(sh: &Shared, mut rng: Rng) {
    // SAFETY: no arguments.
    let pid = unsafe { libc::getpid() };
    while !sh.stop.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(rng.range(2, 30)));
        let tids = sh.tids.lock().unwrap_or_else(|e| e.into_inner());
        for &tid in tids.iter() {
            // SAFETY: a registered thread of this process (deregistered before it
            // exits, under this lock).
            unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR1) };
        }
    }
}

/// A random guest on a vCPU of `w`: code, page tables, registers, events, MSRs, then
/// up to a dozen runs with the exits answered at random.
fn guest_op(rng: &mut Rng, sh: &Shared, mem: &ThreadMem, w: &World) {
    let sink = sh.sink();
    let env = sh.env(mem, w);
    let fd = w.fd();
    let id = if rng.pct(85) {
        rng.below(3)
    } else {
        rng.below(8)
    };
    if rng.pct(20) {
        let _ = ops::ioctl(&sink, fd, uapi::RVMM_CREATE_VCPU, id as usize);
    }
    let Some(run) = ops::map_run(&sink, fd, id) else {
        return;
    };
    Counters::add(&sh.counters.guest_runs);
    let vcpu = id as u32;
    if rng.pct(85) {
        let (_, regs, sregs) = gen::guest(rng, env.ram, vcpu, &sh.tpl);
        let mut s = uapi::VcpuSregs {
            vcpu,
            padding: 0,
            sregs,
        };
        let _ = ops::ioctl_with(&sink, fd, uapi::RVMM_SET_SREGS, &mut s);
        let mut r = uapi::VcpuRegs {
            vcpu,
            padding: 0,
            regs,
        };
        let _ = ops::ioctl_with(&sink, fd, uapi::RVMM_SET_REGS, &mut r);
    }
    if rng.pct(20) {
        let mut c = Box::new(gen::cpuid(rng, vcpu));
        let _ = ops::ioctl_with(&sink, fd, uapi::RVMM_SET_CPUID, &mut *c);
    }
    if rng.pct(30) {
        let mut m = gen::msrs(rng, vcpu);
        let _ = ops::ioctl_with(&sink, fd, uapi::RVMM_SET_MSRS, &mut m);
    }
    if rng.pct(5) {
        let mut m = gen::mp_state(rng, vcpu);
        let _ = ops::ioctl_with(&sink, fd, uapi::RVMM_SET_MP_STATE, &mut m);
    }
    let runs = rng.range(1, 12);
    for _ in 0..runs {
        if Instant::now() >= sh.deadline {
            break;
        }
        ops::set_immediate_exit(run, rng.pct(3));
        ops::set_request_window(run, rng.pct(15));
        if rng.pct(15) {
            let mut ev = gen::interrupt(rng, vcpu);
            let _ = ops::ioctl_with(&sink, fd, uapi::RVMM_INTERRUPT, &mut ev);
        }
        if w.irqchip && rng.pct(15) {
            let mut m = gen::msi(rng);
            let _ = ops::ioctl_with(&sink, fd, uapi::RVMM_SIGNAL_MSI, &mut m);
        }
        if rng.pct(5) {
            let mut r = uapi::VcpuRegs {
                vcpu,
                padding: 0,
                regs: gen::regs(rng),
            };
            let _ = ops::ioctl_with(&sink, fd, uapi::RVMM_SET_REGS, &mut r);
        }
        match ops::ioctl(&sink, fd, uapi::RVMM_RUN, id as usize) {
            Ok(_) => {
                let p = ops::run_struct(run);
                // SAFETY: our mapping of the run page; the kernel is done with it (a
                // concurrent run of the same vCPU only makes the fields random).
                let reason = unsafe { std::ptr::read_volatile(&raw const (*p).exit_reason) };
                sh.counters.exit_seen(reason);
                // SAFETY: as above; plain fields of the run page.
                unsafe {
                    match reason {
                        uapi::RVMM_EXIT_IO => (*p).io_data[0] = rng.interesting_u64(),
                        uapi::RVMM_EXIT_MMIO => (*p).mmio.data = rng.next_u64().to_le_bytes(),
                        uapi::RVMM_EXIT_HYPERCALL => (*p).hypercall.ret = rng.interesting_u64(),
                        _ => {}
                    }
                }
                if matches!(
                    reason,
                    uapi::RVMM_EXIT_SHUTDOWN
                        | uapi::RVMM_EXIT_FAIL_ENTRY
                        | uapi::RVMM_EXIT_INTERNAL_ERROR
                ) && rng.pct(60)
                {
                    break;
                }
            }
            Err(libc::EINTR) => Counters::add(&sh.counters.eintr),
            Err(_) => {
                if rng.pct(50) {
                    break;
                }
            }
        }
    }
    ops::unmap(run, 4096);
}

/// Maps the world's second RAM region again (the old pages stay pinned by any slot on
/// them) and gives it to the VM.
fn ram2_op(rng: &mut Rng, sh: &Shared, w: &World) {
    let sink = sh.sink();
    let mut m = w.ram2.lock().unwrap_or_else(|e| e.into_inner());
    if rng.pct(40) {
        match Mapping::guarded(64 << 10, libc::PROT_READ | libc::PROT_WRITE) {
            Ok(n) => *m = n,
            Err(e) => sh.error(format!("remapping RAM: {e}")),
        }
    }
    let pages = rng.range(1, 16);
    let mut r = uapi::MemoryRegion {
        slot: rng.range(2, 5) as u32,
        flags: if rng.pct(20) {
            uapi::RVMM_MEM_READONLY
        } else {
            0
        },
        guest_phys_addr: rng.pick(&[0x20_0000, 0x30_0000, 0x1000, 0xd000_0000, 0xfee0_0000]),
        memory_size: pages * 4096,
        userspace_addr: (m.addr + rng.index(16 - pages as usize + 1) * 4096) as u64,
    };
    let _ = ops::ioctl_with(&sink, w.fd(), uapi::RVMM_SET_MEMORY_REGION, &mut r);
}

/// Replaces world `i` with a new VM; the old one goes when its last user drops it
/// (its descriptor closed now, or then).
fn replace_world(rng: &mut Rng, sh: &Shared, close_now: bool) {
    let sink = sh.sink();
    let i = rng.index(WORLDS);
    let old = sh.worlds.lock().unwrap_or_else(|e| e.into_inner())[i].clone();
    if close_now {
        old.close();
        if rng.pct(30) {
            // Leave the closed VM in place for a while: EBADF for its users.
            return;
        }
    }
    match World::new(rng, &sink, sh) {
        Ok(w) => sh.worlds.lock().unwrap_or_else(|e| e.into_inner())[i] = Arc::new(w),
        Err(e) => sh.error(format!("new VM: {e}")),
    }
}

/// What a forked child does: random ioctls, runs (bounded by an interval timer),
/// memory regions and mmaps on the inherited VM fds, closes them, opens new ones; then
/// it exits. It allocates nothing (its parent is multithreaded).
#[allow(clippy::too_many_arguments)]
fn child_main(
    mut rng: Rng,
    mut fds: [i32; WORLDS],
    rams: [(usize, usize); WORLDS],
    roms: [(usize, usize); WORLDS],
    pipe: i32,
    counters: &Counters,
    mem: &ThreadMem,
    hole: (usize, usize),
    tpl: &Templates,
) -> ! {
    // SAFETY: plain system calls on this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        install_handler(libc::SIGALRM);
        let tick = libc::timeval {
            tv_sec: 0,
            tv_usec: 10_000,
        };
        let t = libc::itimerval {
            it_interval: tick,
            it_value: tick,
        };
        libc::setitimer(libc::ITIMER_REAL, &t, std::ptr::null_mut());
    }
    let sink = Sink {
        counters,
        out: Out::Pipe {
            fd: pipe,
            sent: Cell::new(0),
        },
    };
    let end = Instant::now() + Duration::from_millis(rng.range(20, 300));
    while Instant::now() < end {
        let i = rng.index(WORLDS);
        let env = Env {
            mem,
            hole,
            tpl,
            ram: rams[i],
            rom: roms[i],
        };
        let fd = Fd::own(fds[i]);
        match rng.below(100) {
            0..=44 => ops::abi_op(&mut rng, &sink, fd, &env, 25),
            45..=59 => {
                let vcpu = rng.below(3);
                ops::short_runs(&mut rng, &sink, fd, vcpu)
            }
            60..=67 => ops::memslot_op(&mut rng, &sink, fd, &env),
            68..=77 => ops::mmap_op(&mut rng, &sink, fd),
            78..=85 => {
                if fds[i] >= 0 {
                    ops::close(fds[i]);
                    fds[i] = -1;
                }
            }
            86..=94 => ops::fresh_fd_op(&mut rng, &sink, &env),
            _ => ops::ioperm_run(&mut rng, &sink, fd),
        }
    }
    // SAFETY: leaves without running anything of the parent's.
    unsafe { libc::_exit(0) }
}

/// Forks a child that uses (and closes) the VM fds, waits for it with a timeout, and
/// judges how it ended.
fn fork_op(rng: &mut Rng, sh: &Shared, mem: &ThreadMem) {
    // The worlds stay alive in this thread across the fork (the child has copies), and
    // their fds open.
    let worlds: Vec<Arc<World>> = sh.worlds.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let no_close = CLOSE_LOCK.read().unwrap_or_else(|e| e.into_inner());
    let mut fds = [-1; WORLDS];
    let mut rams = [(0, 0); WORLDS];
    let mut roms = [(0, 0); WORLDS];
    for (i, w) in worlds.iter().enumerate().take(WORLDS) {
        fds[i] = w.fd.load(Relaxed);
        rams[i] = (w.ram.addr, w.ram.len);
        roms[i] = (w.rom.addr, w.rom.len);
    }
    let mut p = [0i32; 2];
    // SAFETY: a pipe into our array.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        drop(no_close);
        return;
    }
    let child_rng = rng.fork();
    // SAFETY: the child only makes system calls and touches memory it inherited (see
    // `child_main`); it never returns.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        ops::close(p[0]);
        child_main(
            child_rng,
            fds,
            rams,
            roms,
            p[1],
            sh.counters,
            mem,
            (sh.hole.addr, sh.hole.len),
            &sh.tpl,
        );
    }
    drop(no_close);
    ops::close(p[1]);
    if pid < 0 {
        ops::close(p[0]);
        return;
    }
    Counters::add(&sh.counters.forks);
    let start = Instant::now();
    let mut killed = false;
    let mut status = 0;
    loop {
        // SAFETY: waits for our child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if r < 0 && errno() != libc::EINTR {
            sh.error(format!("waitpid({pid}): {}", crate::sys::strerror(errno())));
            break;
        }
        if !killed && start.elapsed() > CHILD_TIMEOUT {
            // SAFETY: our child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed = true;
            Counters::add(&sh.counters.child_kills);
        }
        if start.elapsed() > CHILD_TIMEOUT + Duration::from_secs(30) {
            sh.error(format!(
                "child {pid} did not die within 30 s of SIGKILL (stuck in the kernel?)"
            ));
            ops::close(p[0]);
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut rec = [0u8; ops::RECORD];
    loop {
        // SAFETY: reads into our buffer; the writer has exited, so this ends.
        let n = unsafe { libc::read(p[0], rec.as_mut_ptr().cast(), ops::RECORD) };
        if n == ops::RECORD as isize {
            sh.note(format!("in a forked child: {}", ops::decode(&rec)));
        } else if n < 0 && errno() == libc::EINTR {
            continue;
        } else {
            break;
        }
    }
    ops::close(p[0]);
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        if !(killed && sig == libc::SIGKILL) {
            sh.error(format!("forked child {pid} died from signal {sig}"));
        }
    } else if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) != 0 {
        sh.error(format!(
            "forked child {pid} exited with {}",
            libc::WEXITSTATUS(status)
        ));
    }
    drop(worlds);
}

/// One worker thread: random operations until the deadline.
fn worker(sh: &Shared, index: usize) {
    let tid = gettid();
    sh.tids.lock().unwrap_or_else(|e| e.into_inner()).push(tid);
    let mut rng = Rng::new(stream_seed(sh.seed, index as u64 + 1));
    match ThreadMem::new(&mut rng) {
        Ok(mem) => {
            while Instant::now() < sh.deadline {
                one_op(&mut rng, sh, &mem);
            }
        }
        Err(e) => sh.error(format!("worker {index}: {e}")),
    }
    sh.tids
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&t| t != tid);
    sh.done.fetch_add(1, Relaxed);
}

fn one_op(rng: &mut Rng, sh: &Shared, mem: &ThreadMem) {
    let sink = sh.sink();
    let w = sh.world(rng);
    let env = sh.env(mem, &w);
    match rng.below(100) {
        0..=27 => ops::abi_op(rng, &sink, w.fd(), &env, 30),
        28..=52 => guest_op(rng, sh, mem, &w),
        53..=62 => ops::memslot_op(rng, &sink, w.fd(), &env),
        63..=70 => ops::mmap_op(rng, &sink, w.fd()),
        71..=80 => ops::vcpu_op(rng, &sink, w.fd(), &env),
        81..=83 => ram2_op(rng, sh, &w),
        84..=86 => ops::fresh_fd_op(rng, &sink, &env),
        87..=89 => {
            drop(w);
            replace_world(rng, sh, true);
        }
        90 | 91 => {
            drop(w);
            replace_world(rng, sh, false);
        }
        92..=94 => {
            drop(w);
            fork_op(rng, sh, mem);
        }
        _ => {
            let vcpu = rng.below(3);
            ops::short_runs(rng, &sink, w.fd(), vcpu)
        }
    }
}

/// The fuzzing process's main: returns the exit status it should `_exit` with.
pub fn run(seed: u64, seconds: u64, counters: &'static Counters) -> i32 {
    install_handler(libc::SIGUSR1);
    let tpl = match Templates::new() {
        Ok(t) => t,
        Err(e) => {
            println!("# fuzz: templates: {e}");
            return 2;
        }
    };
    let hole = match Mapping::guarded(16 << 20, libc::PROT_NONE) {
        Ok(h) => h,
        Err(e) => {
            println!("# fuzz: {e}");
            return 2;
        }
    };
    let sh = Arc::new(Shared {
        counters,
        log: Mutex::new(Vec::new()),
        deadline: Instant::now() + Duration::from_secs(seconds),
        tpl,
        worlds: Mutex::new(Vec::new()),
        tids: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        done: AtomicUsize::new(0),
        hole,
        seed,
    });
    let mut rng = Rng::new(stream_seed(seed, 0));
    for _ in 0..WORLDS {
        match World::new(&mut rng, &sh.sink(), &sh) {
            Ok(w) => sh.worlds.lock().unwrap().push(Arc::new(w)),
            Err(e) => {
                println!("# fuzz: new VM: {e}");
                return 2;
            }
        }
    }
    let kick_rng = rng.fork();
    let k = {
        let sh = sh.clone();
        std::thread::spawn(move || kicker(&sh, kick_rng))
    };
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            let sh = sh.clone();
            std::thread::spawn(move || worker(&sh, i))
        })
        .collect();
    // Workers end at the deadline; the kicker keeps them from waiting long in the
    // kernel. Past a grace period, they are stuck there.
    let grace = sh.deadline + Duration::from_secs(60);
    while sh.done.load(Relaxed) < WORKERS {
        if Instant::now() > grace {
            let stuck = WORKERS - sh.done.load(Relaxed);
            sh.error(format!(
                "{stuck} worker thread(s) still in the kernel 60 s after the deadline"
            ));
            print_log(&sh);
            return 3;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for w in workers {
        if w.join().is_err() {
            sh.error("a worker thread panicked".into());
        }
    }
    sh.stop.store(true, Relaxed);
    let _ = k.join();
    // Closes the VMs (the kernel tears down what is left at exit too).
    sh.worlds.lock().unwrap_or_else(|e| e.into_inner()).clear();
    print_log(&sh);
    0
}

fn print_log(sh: &Shared) {
    for m in sh.log.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        crate::ktap::diag(&format!("fuzz: host error: {m}"));
    }
}
