// SPDX-License-Identifier: GPL-2.0

//! rvmm-run's PC platform: the devices a guest OS or test kernel expects beside its
//! CPUs and local APICs (which live in the kernel, rvmm's or KVM's).
//!
//! - interrupt controllers: an I/O APIC (24 pins at 0xfec00000) and a master/slave 8259
//!   pair; ISA IRQ n is GSI n, except IRQ 0 (the PIT), which is GSI 2 (as the MADT
//!   says). The I/O APIC's messages go to the local APICs in the MSI format (rvmm's
//!   `RVMM_SIGNAL_MSI`, KVM's `KVM_SIGNAL_MSI` with a split irqchip); the PICs' output
//!   goes to APIC 0 as an ExtINT message with the vector they give.
//! - timers: the 8254 PIT (IRQ 0, from a host thread at its programmed rate), the CMOS
//!   RTC, the ACPI PM timer.
//! - firmware: an e820 map, ACPI tables at 0xe0000 (RSDP, XSDT/RSDT, FADT, MADT, DSDT
//!   with \_S5), QEMU's fw_cfg on ports 0x510/0x511, PCI configuration ports with a host
//!   bridge, ACPI power-off through PM1a_CNT.
//! - the 16550 UART COM1 on IRQ 4, and isa-debug-exit on 0xf4.
//!
//! Why here and not in the kernel: these devices sit on no hot path that matters for a
//! guest that uses its local APIC (which is in the kernel, where KVM also keeps it),
//! they are plain Rust tested on the host, and the same code drives both backends, so a
//! guest's runs on rvmm and on KVM see the same platform.

pub mod acpi;
pub mod cmos;
pub mod fwcfg;
pub mod ioapic;
pub mod pci;
pub mod pic;
pub mod pit;

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where the ACPI tables go (the RSDP first, 16-byte aligned, in 0xe0000-0xfffff).
pub const ACPI_BASE: u32 = 0xe_0000;

/// The ACPI multiprocessor wake-up mailbox (4 KiB, in the reserved BIOS area).
pub const WAKEUP_MAILBOX: u64 = 0xe_f000;
/// The firmware's identity map (PML4, PDPT, four PDs of 2-MiB pages: 4 GiB) and GDT,
/// which woken APs start with.
const AP_PML4: u64 = 0xf_0000;
const AP_GDT: u64 = 0xf_6000;

/// Writes the page tables and GDT APs start with into the reserved BIOS area.
pub fn write_ap_firmware(mem: &mut rvmm::guest::GuestMem) -> Result<(), String> {
    mem.write_u64(AP_PML4, (AP_PML4 + 0x1000) | 3)?;
    for i in 0..4u64 {
        let pd = AP_PML4 + 0x2000 + 0x1000 * i;
        mem.write_u64(AP_PML4 + 0x1000 + 8 * i, pd | 3)?;
        for j in 0..512u64 {
            mem.write_u64(pd + 8 * j, ((i << 30) + (j << 21)) | 0x83)?;
        }
    }
    // Null, 64-bit code (0x08), data (0x10), 32-bit code (0x18), as for the BSP.
    for (i, d) in [
        0u64,
        0x00af_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00cf_9a00_0000_ffff,
    ]
    .iter()
    .enumerate()
    {
        mem.write_u64(AP_GDT + 8 * i as u64, *d)?;
    }
    Ok(())
}

/// An AP's long-mode state: the BSP's, on the firmware's page tables and GDT.
pub fn ap_long_mode(s: &mut rvmm::uapi::Sregs) {
    s.cr3 = AP_PML4;
    s.gdt.base = AP_GDT;
    s.gdt.limit = 4 * 8 - 1;
    // EFER.NXE on, as firmware that starts APs in 64-bit mode leaves it (TDX forces
    // it): Linux's trampoline_start64 loads its own page tables, whose entries for the
    // real-mode stack carry XD, before it writes EFER (with NXE 0, XD is a reserved bit
    // and the AP's first push faults into a zero IDT).
    s.efer |= EFER_NXE;
}

const EFER_NXE: u64 = 1 << 11;

/// The e820 map of `size` bytes of RAM at 0: (base, length, type 1 RAM / 2 reserved).
pub fn e820(size: u64) -> Vec<(u64, u64, u32)> {
    vec![
        (0, 0x9_fc00, 1),
        (0x9_fc00, 0x400, 2),
        (0xe_0000, 0x2_0000, 2),
        (0x10_0000, size - 0x10_0000, 1),
    ]
}

/// Where interrupt messages go: the local APICs of the backend's VM.
pub use rvmm::backend::IrqSink;

/// What a guest access asks rvmm-run to do beyond the device's own work.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// The guest powered off through ACPI (\_S5).
    PowerOff,
    /// The guest reset the machine (the way it did): port 0x92 bit 0, the reset
    /// control register at 0xcf9, or the keyboard controller's pulse (0xfe to 0x64).
    Reset(&'static str),
}

/// The devices, behind one lock (the vCPU threads and the PIT thread share them).
pub struct Devices {
    pub pit: pit::Pit,
    pub pics: pic::Pics,
    pub ioapic: ioapic::IoApic,
    pub cmos: cmos::Cmos,
    pub pci: pci::PciConfig,
    pub fwcfg: fwcfg::FwCfg,
    pm1_sts: u16,
    pm1_en: u16,
    pm1_cnt: u16,
    port61_written: bool,
    /// Port 0x92 (system control port A): bit 1 A20, bit 0 fast reset.
    port92: u8,
    /// The reset control register (0xcf9): bit 1 SYS_RST.
    rcr: u8,
    /// The PIT's last IRQ 0 (or programming), in ns since `start`.
    pit_last: u64,
    start: Instant,
    sink: Arc<dyn IrqSink>,
    /// PIT interrupts raised (statistics).
    pub pit_irqs: u64,
    /// Interrupt messages sent.
    pub messages: u64,
}

impl Devices {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// ISA IRQ `irq` goes high or low: to the PICs and to the I/O APIC.
    pub fn set_irq(&mut self, irq: u8, high: bool) {
        self.pics.set_irq(irq, high);
        let gsi = if irq == 0 { 2 } else { usize::from(irq) };
        if let Some((a, d)) = self.ioapic.set_irq(gsi, high) {
            self.send(a, d);
        }
        self.pic_output();
    }

    /// An edge on ISA IRQ `irq`.
    pub fn pulse_irq(&mut self, irq: u8) {
        self.set_irq(irq, true);
        self.set_irq(irq, false);
    }

    fn send(&mut self, address: u64, data: u32) {
        self.messages += 1;
        self.sink.msi(address, data);
    }

    /// The PICs' INTR: acknowledged here and sent to APIC 0 as an ExtINT message
    /// (the vector in the data's low byte), which the APIC takes where its LINT0 is in
    /// ExtINT mode (or it is disabled: the virtual-wire mode).
    fn pic_output(&mut self) {
        if self.pics.intr() {
            if let Some(v) = self.pics.ack() {
                self.send(0xfee0_0000, u32::from(v) | 7 << 8 | 1 << 14);
            }
        }
    }

    /// Fires the PIT's IRQ 0 if due; returns when it is due next.
    fn tick(&mut self) -> Option<u64> {
        let now = self.now_ns();
        let mut next = self.pit.next_irq0(self.pit_last);
        while let Some(t) = next {
            if t > now {
                break;
            }
            self.pit_irqs += 1;
            self.pulse_irq(0);
            self.pit_last = t;
            next = self.pit.next_irq0(t);
        }
        next
    }
}

/// The platform: its devices and the PIT's thread.
pub struct Platform {
    shared: Arc<(Mutex<Devices>, Condvar)>,
    timer: Option<std::thread::JoinHandle<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

/// Platform configuration.
pub struct Config {
    pub mem: u64,
    pub cpus: u32,
    pub cmdline: Option<String>,
    /// The CMOS RAM the machine had before a reset (else a fresh one).
    pub cmos: Option<[u8; 128]>,
}

impl Platform {
    /// The devices, and the firmware tables written into guest memory by the caller
    /// (`Platform::acpi_tables`).
    pub fn new(cfg: &Config, sink: Arc<dyn IrqSink>) -> Self {
        let mut fwcfg = fwcfg::FwCfg::new(cfg.mem, cfg.cpus as u16);
        let mut e = Vec::new();
        for (base, len, kind) in e820(cfg.mem) {
            e.extend_from_slice(&base.to_le_bytes());
            e.extend_from_slice(&len.to_le_bytes());
            e.extend_from_slice(&kind.to_le_bytes());
        }
        fwcfg.add_file("etc/e820", e);
        if let Some(c) = &cfg.cmdline {
            let mut b = c.as_bytes().to_vec();
            b.push(0);
            fwcfg.add_file("opt/rvmm/cmdline", b);
        }
        let devices = Devices {
            pit: pit::Pit::new(),
            pics: pic::Pics::new(),
            ioapic: ioapic::IoApic::new(cfg.cpus as u8),
            cmos: match cfg.cmos {
                Some(ram) => cmos::Cmos::with_ram(ram),
                None => cmos::Cmos::new(cfg.mem),
            },
            pci: pci::PciConfig::new(),
            fwcfg,
            pm1_sts: 0,
            pm1_en: 0,
            pm1_cnt: 1, // SCI_EN: ACPI mode from the start (no SMI_CMD)
            port61_written: false,
            port92: 0x02,
            rcr: 0,
            start: Instant::now(),
            sink,
            pit_irqs: 0,
            messages: 0,
            pit_last: 0,
        };
        let shared = Arc::new((Mutex::new(devices), Condvar::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let timer = {
            let shared = shared.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("rvmm-pit".into())
                .spawn(move || pit_thread(&shared, &stop))
                .ok()
        };
        Self {
            shared,
            timer,
            stop,
        }
    }

    /// The ACPI tables for `cpus` vCPUs, to be written at [`ACPI_BASE`].
    pub fn acpi_tables(cpus: u32, wakeup_mailbox: Option<u64>) -> Vec<u8> {
        acpi::build(
            ACPI_BASE,
            &acpi::Config {
                cpus,
                ioapic_id: cpus as u8,
                ioapic_addr: ioapic::IOAPIC_BASE as u32,
                wakeup_mailbox,
            },
        )
    }

    /// Runs `f` on the devices.
    pub fn with<R>(&self, f: impl FnOnce(&mut Devices) -> R) -> R {
        let mut d = self.shared.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut d)
    }

    /// A port write the platform handles: `Some` if it is one of its ports.
    pub fn io_out(&self, port: u16, size: u8, data: u32) -> Option<Option<Event>> {
        let r = self.with(|d| d.io_out(port, size, data));
        if matches!(port, 0x40..=0x43 | 0x61) {
            self.shared.1.notify_all();
        }
        r
    }

    /// A port read the platform handles.
    pub fn io_in(&self, port: u16, size: u8) -> Option<u32> {
        self.with(|d| d.io_in(port, size))
    }

    /// An MMIO access to the I/O APIC's page; `None` if the address is not its.
    pub fn mmio(&self, gpa: u64, write: Option<u32>) -> Option<u32> {
        if !(ioapic::IOAPIC_BASE..ioapic::IOAPIC_BASE + 0x1000).contains(&gpa) {
            return None;
        }
        let off = gpa - ioapic::IOAPIC_BASE;
        self.with(|d| match write {
            Some(v) => {
                for (a, m) in d.ioapic.write(off, v) {
                    d.send(a, m);
                }
                Some(0)
            }
            None => Some(d.ioapic.read(off)),
        })
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.shared.1.notify_all();
        if let Some(t) = self.timer.take() {
            let _ = t.join();
        }
    }
}

fn pit_thread(shared: &(Mutex<Devices>, Condvar), stop: &std::sync::atomic::AtomicBool) {
    let (lock, cv) = shared;
    let mut d = lock.lock().unwrap_or_else(|e| e.into_inner());
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        let next = d.tick();
        let now = d.now_ns();
        d = match next {
            Some(t) => {
                cv.wait_timeout(d, Duration::from_nanos(t.saturating_sub(now)))
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => cv.wait(d).unwrap_or_else(|e| e.into_inner()),
        };
    }
}

impl Devices {
    fn io_out(&mut self, port: u16, size: u8, data: u32) -> Option<Option<Event>> {
        let now = self.now_ns();
        let b = data as u8;
        match port {
            0x20 | 0x21 | 0xa0 | 0xa1 => {
                self.pics.write(port, b);
                self.pic_output();
            }
            0x40..=0x43 => {
                self.pit.write(port, b, now);
                if port == 0x40 || port == 0x43 {
                    self.pit_last = now;
                }
            }
            0x61 => {
                self.pit.write_61(b, now);
                self.port61_written = true;
            }
            0x70 | 0x71 => self.cmos.write(port, b),
            // As QEMU's PC: a reset on bit 0 going from 0 to 1 (port 0x92), on RST_CPU
            // (0xcf9, bit 2), and on the keyboard controller's reset pulse.
            0x92 => {
                let old = self.port92;
                self.port92 = b;
                if b & 1 != 0 && old & 1 == 0 {
                    return Some(Some(Event::Reset("port 0x92")));
                }
            }
            0xcf9 if size == 1 => {
                if b & 4 != 0 {
                    return Some(Some(Event::Reset("port 0xcf9")));
                }
                self.rcr = b & 2;
            }
            0x64 if b == 0xfe => return Some(Some(Event::Reset("keyboard controller"))),
            0xcf8..=0xcff => self.pci.write(port, size, data),
            fwcfg::SELECTOR => self.fwcfg.write_selector(data as u16),
            fwcfg::DATA => {}
            p if p == acpi::PM1A_EVT => self.pm1_sts &= !(data as u16),
            p if p == acpi::PM1A_EVT + 2 => self.pm1_en = data as u16,
            p if p == acpi::PM1A_CNT => {
                let v = data as u16;
                self.pm1_cnt = (v & !(1 << 13)) | 1;
                if v & (1 << 13) != 0 && (v >> 10) & 7 == acpi::S5_SLP_TYP {
                    return Some(Some(Event::PowerOff));
                }
            }
            // POST codes, the keyboard controller's other commands: accepted, ignored.
            0x80 | 0x60 | 0x64 => {}
            _ => return None,
        }
        Some(None)
    }

    fn io_in(&mut self, port: u16, size: u8) -> Option<u32> {
        let now = self.now_ns();
        Some(match port {
            0x20 | 0x21 | 0xa0 | 0xa1 => self.pics.read(port).into(),
            0x40..=0x42 => self.pit.read(port, now).into(),
            0x43 => 0xff,
            0x61 => self.pit.read_61(now).into(),
            0x70 | 0x71 => {
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                self.cmos.read(port, secs).into()
            }
            0xcf9 if size == 1 => self.rcr.into(),
            0xcf8..=0xcff => self.pci.read(port, size),
            fwcfg::SELECTOR => 0,
            fwcfg::DATA => {
                let mut v = 0u32;
                for i in 0..u32::from(size.min(4)) {
                    v |= u32::from(self.fwcfg.read_data()) << (8 * i);
                }
                v
            }
            p if p == acpi::PM1A_EVT => self.pm1_sts.into(),
            p if p == acpi::PM1A_EVT + 2 => self.pm1_en.into(),
            p if p == acpi::PM1A_CNT => self.pm1_cnt.into(),
            p if p == acpi::PM_TMR => {
                ((u128::from(now) * 3_579_545 / 1_000_000_000) as u32) & 0xff_ffff
            }
            0x92 => self.port92.into(),
            0x60 | 0x64 | 0x80 => 0xff,
            _ => return None,
        })
    }
}
