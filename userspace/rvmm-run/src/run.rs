// SPDX-License-Identifier: GPL-2.0

//! `rvmm-run run IMAGE`: load an image, start it in the chosen mode, serve its port I/O.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rvmm::Exit;
use vm_superio::{Serial, Trigger};

use rvmm::backend::{Backend, KvmBackend, RvmmBackend};
use rvmm::guest::{self as machine, GuestMem};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Guest image: an ELF64/ELF32 executable (loaded by its program headers, entered
    /// at its entry point), a multiboot kernel, a Linux bzImage (as --kernel) or a flat
    /// binary (loaded at --load-addr, entered there).
    #[arg(required_unless_present = "kernel", conflicts_with = "kernel")]
    pub image: Option<PathBuf>,
    /// A Linux kernel (bzImage), booted by the x86 boot protocol's 64-bit entry on the
    /// `pc` machine; --initrd is its initramfs, --append its command line.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Do not send stdin to the guest's serial port. Without it (`--machine pc`), stdin
    /// goes to COM1's receiver: on a terminal, in raw mode (keys such as Ctrl-C go to the
    /// guest), and Ctrl-A x quits.
    #[arg(long)]
    pub no_stdin: bool,
    /// A guest reset (port 0x92, 0xcf9, the keyboard controller) ends the run with
    /// status 0 instead of rebooting the machine (QEMU's -no-reboot).
    #[arg(long)]
    pub no_reboot: bool,
    /// Guest memory size, in MiB.
    #[arg(long, default_value_t = 16)]
    pub mem: u64,
    /// Where a flat binary is loaded (guest-physical).
    #[arg(long, default_value = "0x100000", value_parser = parse_u64)]
    pub load_addr: u64,
    /// CPU mode at entry [default: protected for ELF32 images, long otherwise].
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// A command line for the guest: a Linux kernel's, a multiboot kernel's, or else
    /// written NUL-terminated at guest-physical 0x9000, whose address the guest finds in
    /// RDI (EDI) at entry.
    #[arg(long)]
    pub append: Option<String>,
    /// Run on /dev/kvm instead of /dev/rvmm (to compare).
    #[arg(long)]
    pub kvm: bool,
    /// Print the final general registers to stderr.
    #[arg(long)]
    pub dump_regs: bool,
    /// Print the VM's exit counters (by reason) and shadow MMU counters to stderr at the end.
    #[arg(long)]
    pub stats: bool,
    /// Touch every page of guest memory in rvmm-run before the guest starts, so that
    /// host page allocation is not part of what the guest measures.
    #[arg(long)]
    pub prefault: bool,
    /// A multiboot module (repeatable): loaded page-aligned after the image and listed in
    /// the multiboot information, in order.
    #[arg(long)]
    pub module: Vec<PathBuf>,
    /// An initial ramdisk: for a multiboot image, one more module after the others.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Shadow page pool pages for this VM (64-65536; default: the module's
    /// shadow_pages parameter).
    #[arg(long, default_value_t = 0)]
    pub shadow_pages: u32,
    /// Roots (address spaces) the VM's CR3 cache keeps (1-64; default: the module's
    /// shadow_roots parameter).
    #[arg(long, default_value_t = 0)]
    pub shadow_roots: u32,
    /// The machine: `pc` has local APICs (in the kernel), an I/O APIC, 8259 PICs, an
    /// 8254 PIT, a CMOS RTC, ACPI tables (power-off ends the run with status 0), fw_cfg,
    /// PCI configuration ports, COM1 on IRQ 4; a HLT with interrupts on waits for an
    /// interrupt. `bare` has COM1 and the exit port only [default: pc for multiboot
    /// images, bare otherwise].
    #[arg(long, value_enum)]
    pub machine: Option<Machine>,
    /// vCPUs (1-8), each a host thread. With more than one (`--machine pc`), APs wait
    /// for INIT and a start-up IPI (then run real mode at the SIPI vector's page), or
    /// for the ACPI 6.4 multiprocessor wake-up mailbox that the MADT offers (then start
    /// at the wake-up vector in 64-bit mode).
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
}

/// The platform around the guest's CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Machine {
    /// A PC: interrupt controllers, timers, firmware tables.
    Pc,
    /// Serial port and exit port only.
    Bare,
}

/// What a run hands to its observer (the benchmark driver).
pub trait Observer {
    /// The guest wrote `value` to the benchmark marker port.
    fn mark(&mut self, cpu: &mut dyn Backend, value: u32) -> Result<(), String>;
    /// A byte the guest wrote to its serial port.
    fn serial(&mut self, byte: u8);
    /// The run ended (vCPU 0's backend, the VM's counters); `entry_tsc`: the guest's
    /// TSC before its first instruction.
    fn end(&mut self, _cpu: &mut dyn Backend, _entry_tsc: Option<u64>) -> Result<(), String> {
        Ok(())
    }
}

/// Where serial output goes: stdout, or the observer.
struct SerialOut(Option<Arc<Mutex<Vec<u8>>>>);

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.0 {
            Some(v) => {
                v.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(buf);
                Ok(buf.len())
            }
            None => std::io::stdout().write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let r = if let Some(h) = s.strip_prefix("0x") {
        u64::from_str_radix(h, 16)
    } else {
        s.parse()
    };
    r.map_err(|e| format!("{s}: {e}"))
}

/// CPU mode at entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// 64-bit long mode, paging on, the first 4 GiB identity-mapped (2 MiB pages).
    Long,
    /// 32-bit protected mode, paging off, flat segments.
    Protected,
}

/// The UART's interrupt output: noted here, raised on IRQ 4 after the access.
struct SerialIrq(Arc<AtomicBool>);

impl Trigger for SerialIrq {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// The devices every vCPU thread uses.
struct Shared {
    serial: Mutex<Serial<SerialIrq, vm_superio::serial::NoEvents, SerialOut>>,
    serial_irq: Arc<AtomicBool>,
    platform: Option<crate::platform::Platform>,
    /// The guest reset the machine: the run ends, and the machine boots again.
    reset: AtomicBool,
}

/// What survives a guest reset: the CMOS RAM (battery-backed on a PC), and where the
/// console sends stdin (the machine of the current boot).
#[derive(Default)]
struct Carry {
    cmos: Option<[u8; 128]>,
    console: Option<Arc<Mutex<Option<Arc<Shared>>>>>,
}

/// How one boot of the machine ended.
enum End {
    Exit(ExitCode),
    Reset,
}

impl Shared {
    fn raise_serial_irq(&self) {
        if self.serial_irq.swap(false, Ordering::Relaxed) {
            if let Some(p) = &self.platform {
                p.with(|d| d.pulse_irq(4));
            }
        }
    }

    /// A port write; `Some` when it ends the run (exit port, ACPI power-off).
    fn io_out(&self, port: u16, size: u8, data: u32) -> Option<ExitCode> {
        match port {
            COM1..=0x3ff => {
                let _ = self
                    .serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write((port - COM1) as u8, data as u8);
                self.raise_serial_irq();
            }
            // isa-debug-exit: byte, word or dword writes; the status is (v << 1) | 1.
            DEBUG_EXIT => return Some(ExitCode::from(((data as u8) << 1) | 1)),
            _ => {
                let r = self
                    .platform
                    .as_ref()
                    .and_then(|p| p.io_out(port, size, data));
                match r {
                    Some(Some(crate::platform::Event::PowerOff)) => {
                        eprintln!("rvmm-run: the guest powered off (ACPI S5)");
                        return Some(ExitCode::SUCCESS);
                    }
                    Some(Some(crate::platform::Event::Reset(how))) => {
                        eprintln!("rvmm-run: the guest reset the machine ({how})");
                        self.reset.store(true, Ordering::Release);
                        return Some(ExitCode::SUCCESS);
                    }
                    _ => {}
                }
            }
        }
        None
    }

    /// Input for the guest's serial port; returns how many bytes its receive FIFO took.
    fn serial_input(&self, bytes: &[u8]) -> usize {
        let n = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_raw_bytes(bytes)
            .unwrap_or(0);
        self.raise_serial_irq();
        n
    }

    /// A port read (absent ports read as all ones).
    fn io_in(&self, port: u16, size: u8) -> u32 {
        if (COM1..COM1 + 8).contains(&port) {
            let v = self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read((port - COM1) as u8)
                .into();
            self.raise_serial_irq();
            return v;
        }
        self.platform
            .as_ref()
            .and_then(|p| p.io_in(port, size))
            .unwrap_or(u32::MAX)
    }

    /// MMIO: the I/O APIC; elsewhere reads see all ones (an absent device) and writes
    /// vanish. Returns the data of a read.
    fn mmio(&self, addr: u64, is_write: bool, data: u64) -> Option<u64> {
        let r = self
            .platform
            .as_ref()
            .and_then(|p| p.mmio(addr, is_write.then_some(data as u32)));
        (!is_write).then(|| r.map_or(u64::MAX, u64::from))
    }
}

/// The ACPI multiprocessor wake-up mailbox in guest memory, and the AP threads it wakes.
struct Mailbox {
    command: &'static std::sync::atomic::AtomicU16,
    apic_id: &'static std::sync::atomic::AtomicU32,
    vector: &'static std::sync::atomic::AtomicU64,
    /// pthread_t of each AP's thread, by APIC ID (0: not started yet).
    threads: Vec<std::sync::atomic::AtomicUsize>,
}

extern "C" fn on_wake_signal(_: i32) {}

impl Mailbox {
    /// The mailbox at `WAKEUP_MAILBOX` of guest memory at host address `host`.
    ///
    /// # Safety
    /// Guest memory must stay mapped for the rest of the process (rvmm-run never unmaps
    /// it while vCPU threads run: the process exits with the BSP's run).
    unsafe fn new(host: usize, cpus: u32) -> Self {
        let base = (host + crate::platform::WAKEUP_MAILBOX as usize) as *const u8;
        // SAFETY: the caller's promise; the fields are naturally aligned, and the guest
        // accesses them with aligned 2-, 4- and 8-byte accesses too.
        unsafe {
            Self {
                command: &*(base as *const std::sync::atomic::AtomicU16),
                apic_id: &*(base.add(4) as *const std::sync::atomic::AtomicU32),
                vector: &*(base.add(8) as *const std::sync::atomic::AtomicU64),
                threads: (0..cpus).map(|_| Default::default()).collect(),
            }
        }
    }

    /// The wake-up vector, if the guest asks to wake `apic_id`.
    fn take(&self, apic_id: u32) -> Option<u64> {
        (self.command.load(Ordering::Acquire) == 1
            && self.apic_id.load(Ordering::Acquire) == apic_id)
            .then(|| self.vector.load(Ordering::Acquire))
    }

    /// Acknowledges a wake-up (the guest waits for the command to read 0).
    fn ack(&self) {
        self.command.store(0, Ordering::Release);
    }

    /// The mailbox thread: while a wake-up command waits, signals its AP's thread (once
    /// a millisecond, until it acknowledges), interrupting its wait for a SIPI.
    fn watch(&self) {
        loop {
            std::thread::sleep(std::time::Duration::from_millis(1));
            if self.command.load(Ordering::Acquire) != 1 {
                continue;
            }
            let id = self.apic_id.load(Ordering::Acquire) as usize;
            if let Some(t) = self.threads.get(id) {
                let t = t.load(Ordering::Acquire);
                if t != 0 {
                    // SAFETY: AP threads never exit before the process does (they park
                    // when done), so `t` names a live thread.
                    unsafe { libc::pthread_kill(t as libc::pthread_t, libc::SIGUSR1) };
                }
            }
        }
    }
}

/// An exit that ends the run with an error status.
fn fatal_exit(e: &Exit, backend: &str) -> ExitCode {
    match e {
        Exit::Shutdown => {
            eprintln!("rvmm-run: the guest triple-faulted (shutdown)");
            ExitCode::from(3)
        }
        Exit::FailEntry {
            reason,
            vmfail,
            check,
        } => {
            eprintln!(
                "rvmm-run: VM entry failed: {} {reason:#x}{}",
                if *vmfail {
                    "VM-instruction error"
                } else {
                    "exit reason"
                },
                if *check != 0 {
                    format!(" (rvmm check {check}; see dmesg)")
                } else {
                    String::new()
                }
            );
            ExitCode::from(4)
        }
        Exit::Internal { suberror, data } => {
            eprintln!(
                "rvmm-run: {backend} cannot handle an exit: suberror {suberror}, data {data:#x?}"
            );
            ExitCode::from(5)
        }
        Exit::Interrupted => {
            eprintln!("rvmm-run: interrupted");
            ExitCode::from(130)
        }
        e => {
            eprintln!("rvmm-run: unexpected exit {e:?}");
            ExitCode::from(5)
        }
    }
}

/// An AP. It waits for a start-up IPI in the kernel (rvmm's or KVM's), which starts it
/// in real mode at the SIPI vector's page; or for the guest to wake it through the ACPI
/// multiprocessor wake-up mailbox (ACPI 6.4 5.2.12.19), which the mailbox thread tells it
/// by a signal that interrupts its wait: then it enters the wake-up vector in long mode
/// with the firmware's identity map. It runs until it halts with interrupts off. The
/// exit port or an error on an AP ends the whole run.
fn run_ap(
    mut cpu: Box<dyn Backend>,
    apic_id: u32,
    shared: &Shared,
    mailbox: &Mailbox,
    sregs: &rvmm::uapi::Sregs,
) {
    mailbox.threads[apic_id as usize].store(
        // SAFETY: pthread_self has no preconditions.
        unsafe { libc::pthread_self() } as usize,
        Ordering::Release,
    );
    loop {
        if let Some(vector) = mailbox.take(apic_id) {
            let regs = rvmm::uapi::Regs {
                rip: vector,
                rflags: 2,
                ..Default::default()
            };
            let start = cpu
                .start_ap()
                .and_then(|_| cpu.set_sregs(sregs))
                .and_then(|_| cpu.set_regs(&regs));
            if let Err(e) = start {
                eprintln!("rvmm-run: AP {apic_id}: {e}");
                std::process::exit(2);
            }
            mailbox.ack();
        }
        let e = match cpu.run() {
            Ok(e) => e,
            Err(e) => {
                eprintln!("rvmm-run: AP {apic_id}: {e}");
                std::process::exit(2);
            }
        };
        match e {
            // The mailbox thread's signal: look at the mailbox again.
            Exit::Interrupted => {}
            Exit::IoOut { port, size, data } => {
                if let Some(code) = shared.io_out(port, size, data) {
                    let _ = std::io::stdout().flush();
                    std::process::exit(i32::from(u8::from(code == ExitCode::SUCCESS) ^ 1));
                }
            }
            Exit::IoIn { port, size } => cpu.set_io_in(shared.io_in(port, size)),
            Exit::Mmio {
                addr,
                is_write,
                data,
                ..
            } => {
                if let Some(v) = shared.mmio(addr, is_write, data) {
                    cpu.set_mmio_data(v);
                }
            }
            Exit::IrqWindowOpen | Exit::Hypercall { .. } => {}
            // Halted with interrupts off: this AP is done (its thread stays, parked:
            // the mailbox thread may still name it).
            Exit::Hlt => loop {
                std::thread::park();
            },
            e => {
                eprint!("rvmm-run: AP {apic_id}: ");
                let code = fatal_exit(&e, cpu.name());
                if let Ok(state) = final_state(cpu.as_mut()) {
                    eprintln!(
                        "rvmm-run: AP {apic_id}: {}",
                        state.trim_start_matches("rvmm-run: ")
                    );
                }
                if let Ok(s) = cpu.sregs() {
                    eprintln!(
                        "rvmm-run: AP {apic_id}: cs={:#x} (base {:#x}, l={} db={}) ss={:#x} cr2={:#x} \
                         gdt={:#x}/{:#x} idt={:#x}/{:#x}",
                        s.cs.selector, s.cs.base, s.cs.l, s.cs.db, s.ss.selector, s.cr2,
                        s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit
                    );
                }
                let _ = std::io::stdout().flush();
                std::process::exit(if code == ExitCode::from(3) { 3 } else { 5 });
            }
        }
    }
}

const COM1: u16 = 0x3f8;
const DEBUG_EXIT: u16 = 0xf4;
/// The benchmark guests' marker port: 1 = measured section begins, 2 = it ends (RCX =
/// operations in it). Ignored outside `rvmm-run bench`.
pub const BENCH_MARK: u16 = 0xf6;

/// Loads `image`; returns its entry point and the mode it wants by default.
fn load(
    mem: &mut GuestMem,
    args: &RunArgs,
    image: &std::path::Path,
    data: &[u8],
) -> Result<(u64, Mode), String> {
    if data.starts_with(b"\x7fELF") {
        let entry = load_elf(mem, data).map_err(|e| format!("{}: {e}", image.display()))?;
        return Ok((
            entry,
            if data[4] == 1 {
                Mode::Protected
            } else {
                Mode::Long
            },
        ));
    }
    mem.write(args.load_addr, data)
        .map_err(|e| format!("{}: {e}", image.display()))?;
    Ok((args.load_addr, Mode::Long))
}

fn load_elf(mem: &mut GuestMem, d: &[u8]) -> Result<u64, String> {
    load_elf_ranges(mem, d).map(|(entry, _)| entry)
}

/// Loads an ELF file by its program headers; returns the entry point and the
/// guest-physical ranges of the segments ([start, end) with their .bss).
pub fn load_elf_ranges(mem: &mut GuestMem, d: &[u8]) -> Result<(u64, Vec<(u64, u64)>), String> {
    let mut ranges = Vec::new();
    let u16_at = |o: usize| {
        d.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or("truncated ELF header")
    };
    let u32_at = |o: usize| {
        d.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .ok_or("truncated ELF header")
    };
    let u64_at = |o: usize| {
        d.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .ok_or("truncated ELF header")
    };
    let class64 = match d.get(4) {
        Some(2) => true,
        Some(1) => false,
        _ => return Err("not an ELF32/ELF64 file".into()),
    };
    let (entry, phoff, phentsize, phnum) = if class64 {
        (
            u64_at(24)?,
            u64_at(32)? as usize,
            u16_at(54)? as usize,
            u16_at(56)? as usize,
        )
    } else {
        (
            u32_at(24)?.into(),
            u32_at(28)? as usize,
            u16_at(42)? as usize,
            u16_at(44)? as usize,
        )
    };
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let (ptype, off, paddr, filesz, memsz) = if class64 {
            (
                u32_at(ph)?,
                u64_at(ph + 8)? as usize,
                u64_at(ph + 24)?,
                u64_at(ph + 32)? as usize,
                u64_at(ph + 40)?,
            )
        } else {
            (
                u32_at(ph)?,
                u32_at(ph + 4)? as usize,
                u32_at(ph + 12)?.into(),
                u32_at(ph + 16)? as usize,
                u32_at(ph + 20)?.into(),
            )
        };
        if ptype != 1 {
            continue;
        }
        let bytes = d
            .get(off..off + filesz)
            .ok_or(format!("segment {i} lies beyond the end of the file"))?;
        mem.write(paddr, bytes)
            .map_err(|e| format!("segment {i}: {e}"))?;
        let bss = memsz.saturating_sub(filesz as u64);
        mem.write(paddr + filesz as u64, &vec![0u8; bss as usize])
            .map_err(|e| format!("segment {i} .bss: {e}"))?;
        ranges.push((paddr, paddr + memsz.max(filesz as u64)));
    }
    Ok((entry, ranges))
}

pub fn run(device: &str, args: &RunArgs) -> ExitCode {
    match run_inner(device, args, None) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rvmm-run: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs the image (or kernel) to its end; returns the exit status rvmm-run would exit with.
/// A guest reset boots the machine again (the image loaded anew, the CMOS kept), unless
/// `--no-reboot`.
pub fn run_inner(
    device: &str,
    args: &RunArgs,
    mut observer: Option<&mut dyn Observer>,
) -> Result<ExitCode, String> {
    let mut carry = Carry::default();
    loop {
        let observer = observer.as_mut().map(|o| &mut **o as &mut dyn Observer);
        match boot(device, args, observer, &mut carry)? {
            End::Exit(code) => return Ok(code),
            End::Reset if args.no_reboot => return Ok(ExitCode::SUCCESS),
            End::Reset => eprintln!("rvmm-run: booting again"),
        }
    }
}

/// One boot of the machine, to the end of the run or a guest reset.
fn boot(
    device: &str,
    args: &RunArgs,
    mut observer: Option<&mut dyn Observer>,
    carry: &mut Carry,
) -> Result<End, String> {
    if args.mem < 2 || args.mem > 4096 {
        return Err(format!("--mem {} MiB: give 2 to 4096", args.mem));
    }
    let mut mem =
        GuestMem::new((args.mem << 20) as usize).map_err(|e| format!("guest memory: {e}"))?;
    if args.prefault {
        mem.prefault();
    }
    let image = args
        .kernel
        .as_ref()
        .or(args.image.as_ref())
        .ok_or("give an IMAGE or --kernel")?;
    let data = std::fs::read(image).map_err(|e| format!("{}: {e}", image.display()))?;
    if args.kernel.is_some() && !crate::linux::is_bzimage(&data) {
        return Err(format!(
            "--kernel {}: not a Linux bzImage (no \"HdrS\" boot-protocol header at 0x202; \
             give arch/x86/boot/bzImage, not vmlinux)",
            image.display()
        ));
    }
    let multiboot = if args.kernel.is_some() {
        None
    } else {
        crate::multiboot::find_header(&data)
            .transpose()
            .map_err(|e| format!("{}: {e}", image.display()))?
    };
    let linux = multiboot.is_none() && crate::linux::is_bzimage(&data);
    let mut modules = args.module.clone();
    if !linux {
        modules.extend(args.initrd.clone());
    }
    if linux && !args.module.is_empty() {
        return Err(format!(
            "{}: --module is for multiboot images; a Linux kernel takes one --initrd",
            image.display()
        ));
    }
    if multiboot.is_none() && !linux && !modules.is_empty() {
        return Err(format!(
            "{}: --module/--initrd need a multiboot image or a Linux kernel (no multiboot \
             header in its first 8 KiB, no Linux boot-protocol header)",
            image.display()
        ));
    }
    let (entry, default_mode) = match &multiboot {
        None if linux => (0, Mode::Long),
        Some(h) => (
            crate::multiboot::load(&mut mem, &data, h, image, args.append.as_deref(), &modules)
                .map_err(|e| format!("{}: {e}", image.display()))?,
            Mode::Protected,
        ),
        None => load(&mut mem, args, image, &data)?,
    };
    let stack = (args.mem << 20) - 16;
    let mode = match args.mode.unwrap_or(default_mode) {
        Mode::Long => machine::EntryMode::Long,
        Mode::Protected => machine::EntryMode::Protected,
    };
    let (mut regs, sregs) = if linux {
        let initrd = match &args.initrd {
            Some(p) => Some(std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?),
            None => None,
        };
        crate::linux::load(
            &mut mem,
            &data,
            args.append.as_deref().unwrap_or(""),
            initrd.as_deref(),
            crate::platform::ACPI_BASE.into(),
        )
        .map_err(|e| format!("{}: {e}", image.display()))?
    } else {
        machine::setup(&mut mem, mode, entry, stack)?
    };
    if linux {
        // The boot protocol's state is complete.
    } else if multiboot.is_some() {
        // Multiboot entry state: EAX = the bootloader magic, EBX = the information.
        regs.rax = crate::multiboot::BOOTLOADER_MAGIC.into();
        regs.rbx = crate::multiboot::MBI;
    } else if let Some(text) = &args.append {
        const CMDLINE: u64 = 0x9000;
        if text.len() >= 0x1000 || text.contains('\0') {
            return Err("--append: at most 4095 bytes, no NUL".into());
        }
        mem.write(CMDLINE, text.as_bytes())?;
        mem.write(CMDLINE + text.len() as u64, &[0])?;
        regs.rdi = CMDLINE;
    }
    let machine = args.machine.unwrap_or(if multiboot.is_some() || linux {
        Machine::Pc
    } else {
        Machine::Bare
    });
    let pc = machine == Machine::Pc;
    if !(1..=rvmm::uapi::RVMM_MAX_VCPUS).contains(&args.cpus) {
        return Err(format!(
            "--cpus {}: give 1 to {}",
            args.cpus,
            rvmm::uapi::RVMM_MAX_VCPUS
        ));
    }
    if args.cpus > 1 && !pc {
        return Err("--cpus above 1 needs --machine pc (APs start through its ACPI tables)".into());
    }
    if pc {
        let mailbox = (args.cpus > 1).then_some(crate::platform::WAKEUP_MAILBOX);
        let tables = crate::platform::Platform::acpi_tables(args.cpus, mailbox);
        mem.write(crate::platform::ACPI_BASE.into(), &tables)?;
        if args.cpus > 1 {
            crate::platform::write_ap_firmware(&mut mem)?;
        }
    }
    let mut cpus: Vec<Box<dyn Backend>> = if args.kvm {
        KvmBackend::new(&mem, pc, args.cpus)?
            .into_iter()
            .map(|b| Box::new(b) as Box<dyn Backend>)
            .collect()
    } else {
        RvmmBackend::new(
            device,
            &mem,
            args.shadow_pages,
            args.shadow_roots,
            pc,
            args.cpus,
        )?
        .into_iter()
        .map(|b| Box::new(b) as Box<dyn Backend>)
        .collect()
    };
    let mut cpu = cpus.remove(0);
    let platform = if pc {
        Some(crate::platform::Platform::new(
            &crate::platform::Config {
                mem: mem.size() as u64,
                cpus: args.cpus,
                cmdline: args.append.clone(),
                cmos: carry.cmos,
            },
            cpu.irq_sink()?,
        ))
    } else {
        None
    };
    cpu.set_sregs(&sregs)?;
    cpu.set_regs(&regs)?;
    let capture = observer.as_ref().map(|_| Arc::new(Mutex::new(Vec::new())));
    let serial_irq = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared {
        serial: Mutex::new(Serial::new(
            SerialIrq(serial_irq.clone()),
            SerialOut(capture.clone()),
        )),
        serial_irq,
        platform,
        reset: AtomicBool::new(false),
    });
    if pc && observer.is_none() && !args.no_stdin {
        // One console for every boot: it feeds the current machine's serial port.
        match &carry.console {
            Some(target) => {
                *target.lock().unwrap_or_else(|e| e.into_inner()) = Some(shared.clone())
            }
            None => {
                let target = Arc::new(Mutex::new(Some(shared.clone())));
                carry.console = Some(target.clone());
                crate::console::spawn(move |bytes| {
                    target
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .map_or(0, |s| s.serial_input(bytes))
                })?;
            }
        }
    }
    // The APs: each waits for the guest's wake-up through the ACPI mailbox, then starts
    // in long mode (the control and segment registers rvmm-run's long-mode entry uses,
    // on the firmware's page tables and GDT).
    let mut ap_sregs = {
        let mut scratch = GuestMem::new(1 << 20).map_err(|e| format!("scratch memory: {e}"))?;
        machine::setup(&mut scratch, machine::EntryMode::Long, 0, 0)?.1
    };
    crate::platform::ap_long_mode(&mut ap_sregs);
    if !cpus.is_empty() {
        // SAFETY: a no-op handler without SA_RESTART: the signal only interrupts an AP's
        // RVMM_RUN/KVM_RUN.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_wake_signal as *const () as usize;
            libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
        }
        // SAFETY: guest memory stays mapped until the process exits (`mem` lives to the
        // end of this function, which returns only when the run ends).
        let mailbox = Arc::new(unsafe { Mailbox::new(mem.host_addr() as usize, args.cpus) });
        {
            let mailbox = mailbox.clone();
            std::thread::Builder::new()
                .name("rvmm-mailbox".into())
                .spawn(move || mailbox.watch())
                .map_err(|e| format!("mailbox thread: {e}"))?;
        }
        for (i, mut ap) in cpus.into_iter().enumerate() {
            ap.wait_for_sipi()?;
            let shared = shared.clone();
            let mailbox = mailbox.clone();
            std::thread::Builder::new()
                .name(format!("rvmm-ap{}", i + 1))
                .spawn(move || run_ap(ap, i as u32 + 1, &shared, &mailbox, &ap_sregs))
                .map_err(|e| format!("AP thread: {e}"))?;
        }
    }
    let entry_tsc = if args.stats || observer.is_some() {
        cpu.guest_tsc().ok()
    } else {
        None
    };
    let code = loop {
        match cpu.run()? {
            Exit::IoOut {
                port: BENCH_MARK,
                data,
                ..
            } => {
                if let Some(o) = observer.as_deref_mut() {
                    o.mark(cpu.as_mut(), data)?;
                }
            }
            Exit::IoOut { port, size, data } => {
                let end = shared.io_out(port, size, data);
                if let (Some(o), Some(c), COM1) = (observer.as_deref_mut(), &capture, port) {
                    for b in c.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
                        o.serial(b);
                    }
                }
                if let Some(code) = end {
                    break code;
                }
            }
            Exit::IoIn { port, size } => cpu.set_io_in(shared.io_in(port, size)),
            Exit::Mmio {
                addr,
                is_write,
                data,
                ..
            } => {
                if let Some(v) = shared.mmio(addr, is_write, data) {
                    cpu.set_mmio_data(v);
                }
            }
            Exit::IrqWindowOpen => {}
            Exit::Hlt => {
                eprintln!("rvmm-run: the guest halted");
                break ExitCode::SUCCESS;
            }
            Exit::Hypercall { nr, .. } => {
                eprintln!("rvmm-run: hypercall {nr} is not implemented; returning -1");
            }
            Exit::Other(r) => return Err(format!("unexpected exit reason {r}")),
            e => break fatal_exit(&e, cpu.name()),
        }
    };
    let _ = std::io::stdout().flush();
    if let (Some(o), Some(c)) = (observer, &capture) {
        for b in c.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            o.serial(b);
        }
        o.end(cpu.as_mut(), entry_tsc)?;
    }
    // A reset: the next boot reports the end of the run.
    if shared.reset.load(Ordering::Acquire) {
        carry.cmos = shared.platform.as_ref().map(|p| p.with(|d| d.cmos.ram()));
        if args.cpus > 1 {
            std::mem::forget(mem);
        }
        return Ok(End::Reset);
    }
    if args.stats {
        if let (Some(t0), Ok(t1)) = (entry_tsc, cpu.guest_tsc()) {
            eprintln!(
                "rvmm-run: guest TSC at entry {t0}, at the end {t1} ({} ticks)",
                t1.wrapping_sub(t0)
            );
        }
        match cpu.stats() {
            Some(s) => print_stats(&s),
            None => match cpu.counters() {
                Ok(c) => {
                    eprintln!("rvmm-run: {} counters (vCPU 0 and the VM):", cpu.name());
                    for (name, v) in c.iter().filter(|(_, v)| *v != 0) {
                        eprintln!("  {name:<28} {v:>10}");
                    }
                }
                Err(e) => eprintln!("rvmm-run: the {} backend's counters: {e}", cpu.name()),
            },
        }
    }
    if args.dump_regs {
        eprintln!("{}", final_state(cpu.as_mut())?);
    }
    if args.cpus > 1 {
        // AP threads and the mailbox thread may still touch guest memory until the
        // process exits: it is not unmapped before.
        std::mem::forget(mem);
    }
    Ok(End::Exit(code))
}

fn print_stats(s: &rvmm::uapi::VmStats) {
    eprintln!("rvmm-run: VM exits by reason:");
    let mut total = 0;
    for (reason, &n) in s.exits.iter().enumerate() {
        if n != 0 {
            let name =
                rvmm_core::exit::ExitReason::from_basic(reason as u16).map_or("?", |r| r.name());
            eprintln!("  {reason:>3} {name:<22} {n:>10}");
            total += n;
        }
    }
    eprintln!("      {:<22} {total:>10}", "total");
    eprintln!(
        "rvmm-run: shadow faults fixed {}, guest page faults reflected {}, shadow resets {}",
        s.shadow_faults, s.guest_page_faults, s.shadow_resets
    );
    eprintln!("rvmm-run: exits to userspace {}", s.user_exits);
    eprintln!(
        "rvmm-run: pool: root cache hits {}, misses {}; page-table writes {} ({} emulated), unsyncs {}, \
         resyncs {}, flood unshadows {}, prefetched {}; pages in use {}, peak {}, \
         reclaimed {}; zaps {}, resets {}; MMIO exits {} ({} without a guest walk)",
        s.root_hits,
        s.root_misses,
        s.pt_writes,
        s.pt_emulated,
        s.unsyncs,
        s.resyncs,
        s.flood_unshadows,
        s.prefetched,
        s.pool_pages_in_use,
        s.pool_pages_peak,
        s.pool_reclaimed,
        s.zaps,
        s.pool_resets,
        s.mmio_exits,
        s.mmio_fast
    );
    eprintln!(
        "rvmm-run: syncs: CR3 {}, INVLPG {}, link {}, flush-all {}; out-of-sync shadows \
         looked at {}; entries resynced {} ({} changed); upper-level unsyncs {}; faults in \
         direct shadows {}",
        s.sync_cr3,
        s.sync_invlpg,
        s.sync_link,
        s.sync_flush_all,
        s.sync_scanned,
        s.resync_entries,
        s.resync_changed,
        s.unsyncs_upper,
        s.faults_direct
    );
    if s.remote_flushes + s.irq_kicks != 0 {
        eprintln!(
            "rvmm-run: remote flushes {} ({} IPIs, {} us waited); interrupt kicks {}",
            s.remote_flushes,
            s.flush_ipis,
            s.flush_wait_ns / 1000,
            s.irq_kicks
        );
    }
    if s.apic_accesses + s.apic_messages + s.apic_injections + s.halt_sleeps != 0 {
        eprintln!(
            "rvmm-run: apic: interrupts injected {}, timer interrupts {}, IPIs/MSIs delivered {}, \
             register accesses {}, HLT sleeps {}",
            s.apic_injections, s.apic_timer_irqs, s.apic_messages, s.apic_accesses, s.halt_sleeps
        );
    }
    if s.real_mode_emulated != 0 {
        eprintln!(
            "rvmm-run: real mode and mode switches: {} instructions emulated",
            s.real_mode_emulated
        );
    }
    eprintln!(
        "rvmm-run: longest interrupts-off section: {} us",
        s.longest_section_ns / 1000
    );
}

/// The architectural state a run ends in, on one line: the general registers, RIP,
/// RFLAGS and the control registers (what the differential tests compare).
pub fn final_state(cpu: &mut dyn Backend) -> Result<String, String> {
    let r = cpu.regs()?;
    let s = cpu.sregs()?;
    Ok(format!(
        "rvmm-run: final state: rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} \
         rsp={:#x} rbp={:#x} r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} \
         r14={:#x} r15={:#x} rip={:#x} rflags={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
        r.rax,
        r.rbx,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        r.rsp,
        r.rbp,
        r.r8,
        r.r9,
        r.r10,
        r.r11,
        r.r12,
        r.r13,
        r.r14,
        r.r15,
        r.rip,
        r.rflags,
        s.cr0,
        s.cr3,
        s.cr4,
        s.efer
    ))
}
