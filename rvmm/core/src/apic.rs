// SPDX-License-Identifier: GPL-2.0

//! The local APIC of a vCPU (SDM Vol. 3A, chapter 11 "Advanced Programmable Interrupt
//! Controller"): the register file in xAPIC (4-KiB MMIO page) and x2APIC (MSRs
//! 0x800-0x8ff) form, interrupt acceptance with IRR/ISR/TMR and the priority rules
//! (TPR/PPR), EOI, the LVT, the timer (one-shot, periodic, TSC-deadline) and the ICR,
//! whose writes become [`Ipi`]s for the caller to deliver ([`Apic::matches`] tells which
//! APICs a destination names).
//!
//! Time is the guest's TSC. The timer's input clock (the "bus" or crystal clock) runs
//! at the TSC rate: a count of 1 with divide-by-1 lasts one TSC tick. The vCPU reports
//! that in CPUID leaf 0x15 (TSC/crystal ratio 1/1), which is where Linux reads its
//! APIC timer period from.
//!
//! The model is plain data: the module keeps one per vCPU, behind that vCPU's lock, and
//! delivers interrupts from other vCPUs and devices through [`Apic::accept`].

/// Register offsets in the xAPIC page (the x2APIC MSR is 0x800 + offset / 16).
pub mod reg {
    /// Local APIC ID.
    pub const ID: u32 = 0x20;
    /// Version.
    pub const VERSION: u32 = 0x30;
    /// Task priority.
    pub const TPR: u32 = 0x80;
    /// Arbitration priority (xAPIC only).
    pub const APR: u32 = 0x90;
    /// Processor priority.
    pub const PPR: u32 = 0xa0;
    /// End of interrupt.
    pub const EOI: u32 = 0xb0;
    /// Remote read (xAPIC only).
    pub const RRD: u32 = 0xc0;
    /// Logical destination.
    pub const LDR: u32 = 0xd0;
    /// Destination format (xAPIC only).
    pub const DFR: u32 = 0xe0;
    /// Spurious interrupt vector.
    pub const SVR: u32 = 0xf0;
    /// In-service register, 8 x 32 bits.
    pub const ISR: u32 = 0x100;
    /// Trigger mode register.
    pub const TMR: u32 = 0x180;
    /// Interrupt request register.
    pub const IRR: u32 = 0x200;
    /// Error status.
    pub const ESR: u32 = 0x280;
    /// LVT corrected machine check (not implemented: reads as absent).
    pub const LVT_CMCI: u32 = 0x2f0;
    /// Interrupt command, low half.
    pub const ICR: u32 = 0x300;
    /// Interrupt command, high half (xAPIC only).
    pub const ICR2: u32 = 0x310;
    /// LVT timer.
    pub const LVT_TIMER: u32 = 0x320;
    /// LVT thermal sensor.
    pub const LVT_THERMAL: u32 = 0x330;
    /// LVT performance counters.
    pub const LVT_PERF: u32 = 0x340;
    /// LVT LINT0.
    pub const LVT_LINT0: u32 = 0x350;
    /// LVT LINT1.
    pub const LVT_LINT1: u32 = 0x360;
    /// LVT error.
    pub const LVT_ERROR: u32 = 0x370;
    /// Timer initial count.
    pub const TIMER_INIT: u32 = 0x380;
    /// Timer current count.
    pub const TIMER_CUR: u32 = 0x390;
    /// Timer divide configuration.
    pub const TIMER_DIV: u32 = 0x3e0;
    /// Self IPI (x2APIC only).
    pub const SELF_IPI: u32 = 0x3f0;
}

/// IA32_APIC_BASE (MSR 0x1b) bits.
pub mod base {
    /// This is the bootstrap processor.
    pub const BSP: u64 = 1 << 8;
    /// x2APIC mode.
    pub const EXTD: u64 = 1 << 10;
    /// APIC globally enabled.
    pub const EN: u64 = 1 << 11;
    /// The architectural default base address.
    pub const DEFAULT_ADDR: u64 = 0xfee0_0000;
}

/// First x2APIC MSR.
pub const X2APIC_MSR_BASE: u32 = 0x800;
/// Last x2APIC MSR.
pub const X2APIC_MSR_END: u32 = 0x8ff;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;

/// The shortest period of a periodic timer, in microseconds (KVM's
/// `min_timer_period_us`): a guest that programs a shorter one (down to a count of 1 at
/// divide-by-1, one TSC tick) gets this, so that its timer cannot keep the vCPU exiting
/// without running.
pub const MIN_TIMER_PERIOD_US: u64 = 200;

/// The TSC rate the timer's minimum period assumes until [`Apic::set_tsc_khz`] gives
/// the real one (1 GHz).
pub const DEFAULT_TSC_KHZ: u32 = 1_000_000;

const fn min_period_ticks(tsc_khz: u32) -> u64 {
    // At most 2^32 * 200: no overflow.
    tsc_khz as u64 * MIN_TIMER_PERIOD_US / 1000
}

/// Version register: version 0x14 (integrated APIC), 6 LVT entries (max index 5).
pub const VERSION: u32 = 0x0005_0014;

const LVT_MASKED: u32 = 1 << 16;
const LVT_COUNT: usize = 6;
/// Writable bits of each LVT entry, in the order TIMER, THERMAL, PERF, LINT0, LINT1,
/// ERROR (vector, delivery mode, mask; LINTs add polarity and trigger; the timer its
/// mode).
const LVT_WRITABLE: [u32; LVT_COUNT] = [
    0x0007_00ff,
    0x0001_07ff,
    0x0001_07ff,
    0x0001_a7ff,
    0x0001_a7ff,
    0x0001_00ff,
];
const SVR_WRITABLE: u32 = 0x1ff;

/// Timer modes (LVT timer bits 18:17).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    /// Counts down once.
    OneShot,
    /// Counts down and reloads.
    Periodic,
    /// Fires at an absolute TSC value (IA32_TSC_DEADLINE).
    TscDeadline,
}

/// Delivery modes of an ICR write or an MSI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// To the vector.
    Fixed,
    /// To the vector, on one of the destinations.
    LowestPriority,
    /// SMI (not supported: dropped).
    Smi,
    /// NMI.
    Nmi,
    /// INIT (or INIT level de-assert, which the caller drops).
    Init,
    /// Start-up IPI with the vector's page.
    StartUp,
    /// ExtINT (from a PIC; dropped for IPIs).
    ExtInt,
    /// Reserved encoding.
    Reserved,
}

impl Delivery {
    /// Decodes bits 10:8 of an ICR or MSI data word.
    pub const fn decode(bits: u32) -> Self {
        match (bits >> 8) & 7 {
            0 => Self::Fixed,
            1 => Self::LowestPriority,
            2 => Self::Smi,
            4 => Self::Nmi,
            5 => Self::Init,
            6 => Self::StartUp,
            7 => Self::ExtInt,
            _ => Self::Reserved,
        }
    }
}

/// Destination shorthand of an ICR write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shorthand {
    /// The destination field names the targets.
    None,
    /// The sender only.
    SelfOnly,
    /// Every APIC.
    AllIncludingSelf,
    /// Every APIC but the sender.
    AllButSelf,
}

/// An interrupt message: from an ICR write (an IPI) or an MSI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipi {
    /// Vector.
    pub vector: u8,
    /// Delivery mode.
    pub delivery: Delivery,
    /// Logical (true) or physical destination.
    pub logical: bool,
    /// Level (assert: true); only INIT de-assert has it clear.
    pub level: bool,
    /// Level-triggered.
    pub trigger_level: bool,
    /// Destination shorthand.
    pub shorthand: Shorthand,
    /// Destination: 8 bits in xAPIC messages, 32 in x2APIC ones.
    pub dest: u32,
    /// The message came from an x2APIC-mode sender (32-bit destinations, 0xffffffff is
    /// the broadcast).
    pub x2apic: bool,
}

impl Ipi {
    /// Decodes an MSI (address bits 19:12 destination, 2 logical; data bits 7:0 vector,
    /// 10:8 delivery mode, 14 level, 15 trigger). `None` for an address outside the
    /// 0xfeexxxxx window.
    pub const fn from_msi(address: u64, data: u32) -> Option<Self> {
        if address >> 20 != 0xfee {
            return None;
        }
        Some(Self {
            vector: data as u8,
            delivery: Delivery::decode(data),
            logical: address & (1 << 2) != 0,
            level: true,
            trigger_level: data & (1 << 15) != 0,
            shorthand: Shorthand::None,
            dest: ((address >> 12) & 0xff) as u32,
            x2apic: false,
        })
    }

    /// Whether the message is a broadcast (by its destination).
    pub const fn is_broadcast(&self) -> bool {
        if self.x2apic {
            self.dest == 0xffff_ffff
        } else {
            self.dest == 0xff
        }
    }
}

/// What a register write asks the caller to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing beyond the register change.
    None,
    /// Deliver this message (from an ICR or SELF_IPI write).
    Send(Ipi),
    /// An EOI of a level-triggered vector: broadcast it to the I/O APICs.
    LevelEoi(u8),
}

/// Why an access faults (x2APIC MSRs: #GP; IA32_APIC_BASE: #GP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gp;

/// 256-bit vector register (IRR, ISR, TMR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VecReg(pub [u64; 4]);

impl VecReg {
    /// Sets bit `v`.
    pub fn set(&mut self, v: u8) {
        self.0[usize::from(v >> 6)] |= 1 << (v & 63);
    }
    /// Clears bit `v`.
    pub fn clear(&mut self, v: u8) {
        self.0[usize::from(v >> 6)] &= !(1 << (v & 63));
    }
    /// Bit `v`.
    pub fn test(&self, v: u8) -> bool {
        self.0[usize::from(v >> 6)] & (1 << (v & 63)) != 0
    }
    /// The highest set bit.
    pub fn highest(&self) -> Option<u8> {
        (0..4)
            .rev()
            .find(|&i| self.0[i] != 0)
            .map(|i| (i * 64 + 63 - self.0[i].leading_zeros() as usize) as u8)
    }
    /// The register from its eight 32-bit words, as the register file shows them.
    pub fn from_words(w: [u32; 8]) -> Self {
        let mut r = Self::default();
        for (i, q) in r.0.iter_mut().enumerate() {
            *q = u64::from(w[2 * i]) | u64::from(w[2 * i + 1]) << 32;
        }
        r
    }
    /// The 32-bit word `i` (0..8) as the register file shows it (0 beyond).
    pub fn word(&self, i: usize) -> u32 {
        self.0
            .get(i / 2)
            .map_or(0, |w| (w >> (32 * (i % 2))) as u32)
    }
}

/// Where an interrupt comes from, for the TMR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Edge-triggered.
    Edge,
    /// Level-triggered (the EOI goes to the I/O APIC).
    Level,
}

/// An APIC's addressing state: what a message's destination is matched against. The
/// module publishes it per vCPU, so that other vCPUs and devices can address an APIC
/// without taking its vCPU's lock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Addressing {
    /// APIC ID.
    pub id: u32,
    /// Logical destination (x2APIC: derived from the ID).
    pub ldr: u32,
    /// Destination format (xAPIC).
    pub dfr: u32,
    /// IA32_APIC_BASE.EN.
    pub hw_enabled: bool,
    /// x2APIC mode.
    pub x2apic: bool,
}

impl Addressing {
    /// Packs the state into two words (for atomics).
    pub fn pack(&self) -> [u64; 2] {
        [
            u64::from(self.id) | u64::from(self.ldr) << 32,
            u64::from(self.dfr) | u64::from(self.hw_enabled) << 32 | u64::from(self.x2apic) << 33,
        ]
    }

    /// The inverse of [`Addressing::pack`].
    pub fn unpack(w: [u64; 2]) -> Self {
        Self {
            id: w[0] as u32,
            ldr: (w[0] >> 32) as u32,
            dfr: w[1] as u32,
            hw_enabled: w[1] & (1 << 32) != 0,
            x2apic: w[1] & (1 << 33) != 0,
        }
    }

    /// Whether a message with this destination reaches the APIC (the shorthand is the
    /// caller's business: it knows who sent it). Lowest-priority messages match as
    /// fixed ones do; the caller picks one of the matches.
    pub fn matches(&self, ipi: &Ipi) -> bool {
        if !self.hw_enabled {
            return false;
        }
        if ipi.is_broadcast() {
            return true;
        }
        if self.x2apic {
            if !ipi.logical {
                return ipi.dest == self.id;
            }
            if !ipi.x2apic {
                // An 8-bit logical destination from an xAPIC-format source (an MSI):
                // flat-model bits against the cluster-0 LDR bits.
                return self.ldr >> 16 == 0 && ipi.dest & self.ldr & 0xff != 0;
            }
            return ipi.dest >> 16 == self.ldr >> 16 && ipi.dest & self.ldr & 0xffff != 0;
        }
        if !ipi.logical {
            return ipi.dest & 0xff == self.id & 0xff;
        }
        let ldr = self.ldr >> 24;
        let dest = ipi.dest & 0xff;
        if self.dfr >> 28 == 0xf {
            // Flat model: one bit per APIC.
            dest & ldr != 0
        } else {
            // Cluster model: cluster in bits 7:4, one of four APICs in bits 3:0.
            dest >> 4 == ldr >> 4 && dest & ldr & 0xf != 0
        }
    }
}

/// A local APIC.
#[derive(Clone, Debug)]
pub struct Apic {
    id: u32,
    base: u64,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    /// Errors since the last ESR write, and what that write latched.
    esr_pending: u32,
    esr: u32,
    icr: u64,
    lvt: [u32; LVT_COUNT],
    timer_init: u32,
    timer_div: u32,
    /// Guest TSC at which the timer fires next (one-shot and periodic: armed while
    /// counting; TSC-deadline: the deadline MSR while not yet fired).
    deadline: Option<u64>,
    /// Periodic: the period in TSC ticks.
    period: u64,
    /// The shortest periodic-timer period in TSC ticks ([`MIN_TIMER_PERIOD_US`]).
    min_period: u64,
    tsc_deadline: u64,
    /// Interrupt request, in-service and trigger mode registers.
    pub irr: VecReg,
    /// In service.
    pub isr: VecReg,
    /// Trigger mode (level).
    pub tmr: VecReg,
    /// Timer interrupts raised (for statistics).
    pub timer_fired: u64,
    /// A register that [`Apic::page_words`] shows may have changed since
    /// [`Apic::take_page_stale`] last said so.
    page_stale: bool,
}

/// The register offsets whose reads APIC-register virtualization serves from the
/// virtual-APIC page (SDM Vol. 3C, 30.4.2): ID, version, TPR, EOI, LDR, DFR, SVR, ISR,
/// TMR, IRR, ESR, ICR, the LVT (not CMCI), initial count, divide configuration.
pub const VIRTUALIZED_READS: [u32; 43] = {
    let mut r = [0u32; 43];
    let fixed = [0x20, 0x30, 0x80, 0xb0, 0xd0, 0xe0, 0xf0];
    let mut n = 0;
    while n < fixed.len() {
        r[n] = fixed[n];
        n += 1;
    }
    let mut i = 0;
    while i < 24 {
        // ISR, TMR and IRR: 0x100-0x270.
        r[n] = 0x100 + 0x10 * i;
        n += 1;
        i += 1;
    }
    let rest = [
        0x280, 0x300, 0x310, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370, 0x380, 0x3e0,
    ];
    let mut j = 0;
    while j < rest.len() {
        r[n] = rest[j];
        n += 1;
        j += 1;
    }
    r
};

const LVT_TIMER_I: usize = 0;
const LVT_ERROR_I: usize = 5;

impl Apic {
    /// The reset state of the APIC with ID `id` (the BSP if `bsp`): xAPIC mode at the
    /// default base, software-disabled, every LVT entry masked.
    pub fn new(id: u32, bsp: bool) -> Self {
        Self {
            id,
            base: base::DEFAULT_ADDR | base::EN | if bsp { base::BSP } else { 0 },
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            esr_pending: 0,
            esr: 0,
            icr: 0,
            lvt: [LVT_MASKED; LVT_COUNT],
            timer_init: 0,
            timer_div: 0,
            deadline: None,
            period: 0,
            min_period: min_period_ticks(DEFAULT_TSC_KHZ),
            tsc_deadline: 0,
            irr: VecReg::default(),
            isr: VecReg::default(),
            tmr: VecReg::default(),
            timer_fired: 0,
            page_stale: true,
        }
    }

    /// The guest's TSC rate (kHz), which the timer's input clock runs at: sets the
    /// shortest periodic-timer period, [`MIN_TIMER_PERIOD_US`]. 0 (unknown) keeps what
    /// was there. Takes effect at the next start of the count.
    pub fn set_tsc_khz(&mut self, khz: u32) {
        if khz != 0 {
            self.min_period = min_period_ticks(khz);
        }
    }

    /// The APIC ID.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// IA32_APIC_BASE.
    pub fn base_msr(&self) -> u64 {
        self.base
    }

    /// Guest-physical address of the xAPIC page, if the APIC is in xAPIC mode.
    pub fn mmio_base(&self) -> Option<u64> {
        (self.base & (base::EN | base::EXTD) == base::EN).then_some(self.base & !0xfff)
    }

    /// Globally enabled (IA32_APIC_BASE.EN).
    pub fn hw_enabled(&self) -> bool {
        self.base & base::EN != 0
    }

    /// Software-enabled (SVR bit 8) and globally enabled.
    pub fn enabled(&self) -> bool {
        self.hw_enabled() && self.svr & (1 << 8) != 0
    }

    /// In x2APIC mode.
    pub fn x2apic(&self) -> bool {
        self.base & (base::EN | base::EXTD) == base::EN | base::EXTD
    }

    /// The logical destination register as destinations match it.
    pub fn ldr(&self) -> u32 {
        if self.x2apic() {
            Self::x2apic_ldr(self.id)
        } else {
            self.ldr
        }
    }

    /// The destination format register (xAPIC).
    pub fn dfr(&self) -> u32 {
        self.dfr
    }

    fn x2apic_ldr(id: u32) -> u32 {
        ((id >> 4) << 16) | (1 << (id & 0xf))
    }

    /// WRMSR IA32_APIC_BASE, with the architectural #GP cases: reserved bits (the base
    /// must fit `maxphyaddr`), x2APIC without EN, and x2APIC back to xAPIC without a
    /// disable in between.
    pub fn set_base_msr(&mut self, v: u64, maxphyaddr: u8) -> Result<(), Gp> {
        let phys = 1u64
            .checked_shl(u32::from(maxphyaddr))
            .map_or(u64::MAX, |b| b - 1);
        let reserved = !(phys & !0xfff | base::BSP | base::EXTD | base::EN);
        if v & reserved != 0 {
            return Err(Gp);
        }
        if v & (base::EN | base::EXTD) == base::EXTD {
            return Err(Gp);
        }
        self.page_stale = true;
        let was_x2 = self.x2apic();
        let now_x2 = v & (base::EN | base::EXTD) == base::EN | base::EXTD;
        if was_x2 && !now_x2 && v & base::EN != 0 {
            return Err(Gp);
        }
        let was_en = self.hw_enabled();
        // BSP is read-only for the guest.
        self.base = (v & !base::BSP) | (self.base & base::BSP);
        if was_en && !self.hw_enabled() {
            // A global disable is a reset of the register state (the ID stays).
            let keep = (self.id, self.base, self.timer_fired, self.min_period);
            *self = Self::new(keep.0, false);
            self.base = keep.1;
            self.timer_fired = keep.2;
            self.min_period = keep.3;
        }
        if !was_x2 && now_x2 {
            self.ldr = Self::x2apic_ldr(self.id);
        }
        Ok(())
    }

    /// The processor priority: TPR or the class of the highest in-service vector.
    pub fn ppr(&self) -> u32 {
        let isrv = u32::from(self.isr.highest().unwrap_or(0));
        if (self.tpr & 0xf0) >= (isrv & 0xf0) {
            self.tpr & 0xff
        } else {
            isrv & 0xf0
        }
    }

    /// TPR (CR8 is its bits 7:4).
    pub fn tpr(&self) -> u32 {
        self.tpr
    }

    /// MOV to CR8 / TPR writes.
    pub fn set_tpr(&mut self, v: u32) {
        if self.tpr != v & 0xff {
            self.tpr = v & 0xff;
            self.page_stale = true;
        }
    }

    /// Takes an interrupt request (fixed or lowest-priority delivery) into the IRR.
    /// Dropped while the APIC is disabled (software-disabled APICs take none, SDM
    /// 11.4.7.2); vectors 0-15 are illegal and set the receive-illegal-vector error.
    pub fn accept(&mut self, vector: u8, trigger: Trigger) -> bool {
        if !self.enabled() {
            return false;
        }
        self.page_stale = true;
        if vector < 16 {
            self.error(1 << 6);
            return false;
        }
        self.irr.set(vector);
        match trigger {
            Trigger::Level => self.tmr.set(vector),
            Trigger::Edge => self.tmr.clear(vector),
        }
        true
    }

    fn error(&mut self, bit: u32) {
        self.esr_pending |= bit;
        let lvt = self.lvt[LVT_ERROR_I];
        if lvt & LVT_MASKED == 0 {
            let v = lvt as u8;
            if v >= 16 && self.enabled() {
                self.irr.set(v);
                self.tmr.clear(v);
            }
        }
    }

    /// The vector the CPU would take now, if any: the highest IRR vector whose priority
    /// class is above the PPR's.
    pub fn pending(&self) -> Option<u8> {
        if !self.hw_enabled() {
            return None;
        }
        let v = self.irr.highest()?;
        (u32::from(v) & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    /// Whether any vector waits in the IRR at all (a halted CPU wakes for a pending
    /// interrupt only; this is for statistics and tests).
    pub fn has_irr(&self) -> bool {
        self.irr.highest().is_some()
    }

    /// The CPU takes `vector` (from [`Apic::pending`]): IRR to ISR.
    pub fn ack(&mut self, vector: u8) {
        self.page_stale = true;
        self.irr.clear(vector);
        self.isr.set(vector);
    }

    /// EOI: ends the highest in-service vector; a level-triggered one is reported for
    /// the I/O APICs.
    pub fn eoi(&mut self) -> Effect {
        self.page_stale = true;
        let Some(v) = self.isr.highest() else {
            return Effect::None;
        };
        self.isr.clear(v);
        if self.tmr.test(v) {
            Effect::LevelEoi(v)
        } else {
            Effect::None
        }
    }

    /// The timer's divisor (divide configuration bits 3, 1:0).
    pub fn divisor(&self) -> u64 {
        let v = ((self.timer_div & 8) >> 1) | (self.timer_div & 3);
        1 << ((v + 1) & 7)
    }

    /// The timer mode.
    pub fn timer_mode(&self) -> TimerMode {
        match (self.lvt[LVT_TIMER_I] >> 17) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    /// Guest TSC at which the timer fires next.
    pub fn timer_deadline(&self) -> Option<u64> {
        self.deadline
    }

    fn start_count(&mut self, now: u64) {
        if self.timer_init == 0 {
            self.deadline = None;
            return;
        }
        // At most 2^32 * 128: no overflow.
        self.period = u64::from(self.timer_init) * self.divisor();
        if self.timer_mode() == TimerMode::Periodic {
            // As KVM: no periodic interrupt storm (a count of 1 at divide-by-1 would
            // fire at every entry).
            self.period = self.period.max(self.min_period).max(1);
        }
        self.deadline = Some(now.saturating_add(self.period));
    }

    /// Fires the timer if its time has come by `now` (guest TSC); returns whether it
    /// raised an interrupt. Periodic timers reload (a timer that fell more than one
    /// period behind skips the periods it missed).
    pub fn tick(&mut self, now: u64) -> bool {
        let Some(d) = self.deadline else {
            return false;
        };
        if now < d {
            return false;
        }
        match self.timer_mode() {
            TimerMode::Periodic if self.period != 0 => {
                let next = d.saturating_add(self.period);
                self.deadline = Some(if next <= now {
                    now.saturating_add(self.period)
                } else {
                    next
                });
            }
            TimerMode::TscDeadline => {
                self.deadline = None;
                self.tsc_deadline = 0;
            }
            _ => self.deadline = None,
        }
        let lvt = self.lvt[LVT_TIMER_I];
        if lvt & LVT_MASKED != 0 {
            return false;
        }
        self.timer_fired = self.timer_fired.wrapping_add(1);
        self.accept(lvt as u8, Trigger::Edge)
    }

    /// IA32_TSC_DEADLINE (reads 0 outside TSC-deadline mode).
    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TimerMode::TscDeadline {
            self.tsc_deadline
        } else {
            0
        }
    }

    /// WRMSR IA32_TSC_DEADLINE: arms (or with 0 disarms) the timer in TSC-deadline
    /// mode; ignored in the other modes.
    pub fn set_tsc_deadline(&mut self, v: u64) {
        if self.timer_mode() != TimerMode::TscDeadline {
            return;
        }
        self.tsc_deadline = v;
        self.deadline = (v != 0).then_some(v);
    }

    fn current_count(&self, now: u64) -> u32 {
        match (self.deadline, self.timer_mode()) {
            (Some(d), TimerMode::OneShot | TimerMode::Periodic) if d > now => {
                // Never above the initial count (a clamped period or a divide
                // configuration changed while counting would give more).
                ((d - now) / self.divisor()).min(u64::from(self.timer_init)) as u32
            }
            _ => 0,
        }
    }

    fn lvt_index(offset: u32) -> Option<usize> {
        match offset {
            reg::LVT_TIMER..=reg::LVT_ERROR => Some(((offset - reg::LVT_TIMER) >> 4) as usize),
            _ => None,
        }
    }

    /// Reads register `offset` (16-byte aligned); `None` if there is no such register
    /// in the current mode, or it is write-only.
    fn read_reg(&self, offset: u32, now: u64) -> Option<u32> {
        let x2 = self.x2apic();
        Some(match offset {
            reg::ID => {
                if x2 {
                    self.id
                } else {
                    self.id << 24
                }
            }
            reg::VERSION => VERSION,
            reg::TPR => self.tpr,
            reg::APR if !x2 => 0,
            reg::PPR => self.ppr(),
            reg::EOI if !x2 => 0,
            reg::RRD if !x2 => 0,
            reg::LDR => self.ldr(),
            reg::DFR if !x2 => self.dfr,
            reg::SVR => self.svr,
            0x100..=0x170 => self.isr.word(((offset - reg::ISR) >> 4) as usize),
            0x180..=0x1f0 => self.tmr.word(((offset - reg::TMR) >> 4) as usize),
            0x200..=0x270 => self.irr.word(((offset - reg::IRR) >> 4) as usize),
            reg::ESR => self.esr,
            reg::ICR => self.icr as u32,
            reg::ICR2 if !x2 => (self.icr >> 32) as u32,
            o if Self::lvt_index(o).is_some() => self.lvt[Self::lvt_index(o)?],
            reg::TIMER_INIT => self.timer_init,
            reg::TIMER_CUR => self.current_count(now),
            reg::TIMER_DIV => self.timer_div,
            _ => return None,
        })
    }

    /// Writes register `offset`. `Err` where x2APIC mode faults (read-only or absent
    /// registers, reserved bits); in xAPIC mode the caller ignores it, as the page does.
    fn write_reg(&mut self, offset: u32, v: u32, now: u64) -> Result<Effect, Gp> {
        self.page_stale = true;
        let x2 = self.x2apic();
        match offset {
            reg::ID if !x2 => self.id = v >> 24,
            reg::TPR => {
                if x2 && v & !0xff != 0 {
                    return Err(Gp);
                }
                self.tpr = v & 0xff;
            }
            reg::EOI => {
                if x2 && v != 0 {
                    return Err(Gp);
                }
                return Ok(self.eoi());
            }
            reg::LDR if !x2 => self.ldr = v & 0xff00_0000,
            reg::DFR if !x2 => self.dfr = v | 0x0fff_ffff,
            reg::SVR => {
                if x2 && v & !SVR_WRITABLE != 0 {
                    return Err(Gp);
                }
                self.svr = v & SVR_WRITABLE;
                if self.svr & (1 << 8) == 0 {
                    for l in self.lvt.iter_mut() {
                        *l |= LVT_MASKED;
                    }
                }
            }
            reg::ESR => {
                if x2 && v != 0 {
                    return Err(Gp);
                }
                self.esr = core::mem::take(&mut self.esr_pending);
            }
            reg::ICR => {
                // Low half: vector, delivery and destination modes, level, trigger,
                // shorthand (the delivery-status bit reads 0: delivery is immediate).
                let lo = u64::from(v & 0x000c_cfff);
                if x2 {
                    return Err(Gp); // 64-bit writes go through `wrmsr`
                }
                self.icr = (self.icr & !0xffff_ffff) | lo;
                return Ok(self.send_icr());
            }
            reg::ICR2 if !x2 => {
                self.icr = (self.icr & 0xffff_ffff) | (u64::from(v & 0xff00_0000) << 32)
            }
            o if Self::lvt_index(o).is_some() => {
                let i = Self::lvt_index(o).ok_or(Gp)?;
                let mut val = v & LVT_WRITABLE[i];
                if x2 && v & !LVT_WRITABLE[i] != 0 {
                    return Err(Gp);
                }
                if self.svr & (1 << 8) == 0 {
                    val |= LVT_MASKED;
                }
                if i == LVT_TIMER_I {
                    if (val >> 17) & 3 == 3 {
                        // Reserved timer mode: treated as one-shot.
                        val &= !(3 << 17);
                    }
                    let old_mode = self.timer_mode();
                    self.lvt[i] = val;
                    if self.timer_mode() != old_mode {
                        self.deadline = None;
                        self.tsc_deadline = 0;
                        self.timer_init = 0;
                    }
                } else {
                    self.lvt[i] = val;
                }
            }
            reg::TIMER_INIT => {
                if self.timer_mode() == TimerMode::TscDeadline {
                    return Ok(Effect::None);
                }
                self.timer_init = v;
                self.start_count(now);
            }
            reg::TIMER_DIV => {
                if x2 && v & !0xb != 0 {
                    return Err(Gp);
                }
                self.timer_div = v & 0xb;
            }
            reg::SELF_IPI if x2 => {
                if v & !0xff != 0 {
                    return Err(Gp);
                }
                return Ok(Effect::Send(Ipi {
                    vector: v as u8,
                    delivery: Delivery::Fixed,
                    logical: false,
                    level: true,
                    trigger_level: false,
                    shorthand: Shorthand::SelfOnly,
                    dest: self.id,
                    x2apic: true,
                }));
            }
            _ => return Err(Gp),
        }
        Ok(Effect::None)
    }

    fn send_icr(&mut self) -> Effect {
        let lo = self.icr as u32;
        let x2 = self.x2apic();
        let ipi = Ipi {
            vector: lo as u8,
            delivery: Delivery::decode(lo),
            logical: lo & (1 << 11) != 0,
            level: lo & (1 << 14) != 0,
            trigger_level: lo & (1 << 15) != 0,
            shorthand: match (lo >> 18) & 3 {
                0 => Shorthand::None,
                1 => Shorthand::SelfOnly,
                2 => Shorthand::AllIncludingSelf,
                _ => Shorthand::AllButSelf,
            },
            dest: if x2 {
                (self.icr >> 32) as u32
            } else {
                (self.icr >> 56) as u32
            },
            x2apic: x2,
        };
        if matches!(ipi.delivery, Delivery::Fixed | Delivery::LowestPriority) && ipi.vector < 16 {
            self.error(1 << 5);
            return Effect::None;
        }
        Effect::Send(ipi)
    }

    /// A read of the xAPIC page at `offset` (`len` bytes). Registers are 32 bits wide
    /// at 16-byte alignment; other reads give 0, as do reads in x2APIC mode.
    pub fn mmio_read(&self, offset: u32, len: u8, now: u64) -> u64 {
        if self.x2apic() || len > 4 {
            return 0;
        }
        let r = self.read_reg(offset & 0xff0, now).unwrap_or(0);
        let shift = 8 * (offset & 3);
        if (offset & 0xf) + u32::from(len) > 4 {
            return 0;
        }
        u64::from(r >> shift) & ((1u64 << (8 * u32::from(len))) - 1)
    }

    /// A write to the xAPIC page: only aligned 32-bit writes to registers take effect.
    pub fn mmio_write(&mut self, offset: u32, len: u8, v: u64, now: u64) -> Effect {
        if self.x2apic() || len != 4 || offset & 0xf != 0 {
            return Effect::None;
        }
        self.write_reg(offset, v as u32, now)
            .unwrap_or(Effect::None)
    }

    /// RDMSR of an x2APIC MSR (0x800-0x8ff). `Err`: #GP (not in x2APIC mode, no such
    /// register, or write-only).
    pub fn rdmsr(&self, msr: u32, now: u64) -> Result<u64, Gp> {
        if !self.x2apic() || !(X2APIC_MSR_BASE..=X2APIC_MSR_END).contains(&msr) {
            return Err(Gp);
        }
        let offset = (msr - X2APIC_MSR_BASE) << 4;
        if offset == reg::ICR {
            return Ok(self.icr);
        }
        if offset == reg::SELF_IPI || offset == reg::EOI {
            return Err(Gp);
        }
        self.read_reg(offset, now).map(u64::from).ok_or(Gp)
    }

    /// WRMSR of an x2APIC MSR. `Err`: #GP.
    pub fn wrmsr(&mut self, msr: u32, v: u64, now: u64) -> Result<Effect, Gp> {
        if !self.x2apic() || !(X2APIC_MSR_BASE..=X2APIC_MSR_END).contains(&msr) {
            return Err(Gp);
        }
        self.page_stale = true;
        let offset = (msr - X2APIC_MSR_BASE) << 4;
        if offset == reg::ICR {
            // Reserved: bits 31:20, 17:16 and 13 of the low half.
            if v & 0x000c_cfff != v & 0xffff_ffff {
                return Err(Gp);
            }
            self.icr = v;
            return Ok(self.send_icr());
        }
        if v >> 32 != 0 {
            return Err(Gp);
        }
        self.write_reg(offset, v as u32, now)
    }

    /// The registers VMX's APIC-register virtualization reads from the virtual-APIC
    /// page (SDM Vol. 3C, 30.4.2), as (offset, value), for the page to show them. The
    /// others (PPR, APR, the timer's current count, ...) exit, and this model answers.
    pub fn page_words(&self, mut f: impl FnMut(u32, u32)) {
        for offset in VIRTUALIZED_READS {
            f(offset, self.read_reg(offset, 0).unwrap_or(0));
        }
    }

    /// Whether a register [`Apic::page_words`] shows may have changed since the last
    /// call (true once after every change; true at first).
    pub fn take_page_stale(&mut self) -> bool {
        core::mem::take(&mut self.page_stale)
    }

    /// The IRR and ISR as the CPU's virtual-interrupt delivery left them in the
    /// virtual-APIC page (it delivers from the IRR into the ISR and ends the in-service
    /// vector at an EOI without exits). The page shows them already: not stale.
    pub fn load_vectors(&mut self, irr: VecReg, isr: VecReg) {
        self.irr = irr;
        self.isr = isr;
    }

    /// The ICR's low half as the guest wrote it without the APIC's involvement: a
    /// self-IPI that virtual-interrupt delivery took itself (SDM Vol. 3C, 30.1.5; the
    /// vector is in the IRR the page shows). Nothing is sent.
    pub fn record_icr_low(&mut self, v: u32) {
        self.icr = (self.icr & !0xffff_ffff) | u64::from(v & 0x000c_cfff);
        self.page_stale = true;
    }

    /// The guest interrupt status for virtual-interrupt delivery (SDM Vol. 3C, 24.4.2):
    /// SVI, the highest in-service vector, in bits 15:8, and with `request` RVI, the
    /// highest requested one, in bits 7:0.
    pub fn interrupt_status(&self, request: bool) -> u16 {
        let svi = u16::from(self.isr.highest().unwrap_or(0));
        let rvi = if request && self.hw_enabled() {
            u16::from(self.irr.highest().unwrap_or(0))
        } else {
            0
        };
        svi << 8 | rvi
    }

    /// Makes the next [`Apic::take_page_stale`] true: the page was written behind the
    /// APIC's back (a write the CPU stored there for it to take).
    pub fn set_page_stale(&mut self) {
        self.page_stale = true;
    }

    /// What destinations are matched against (see [`Addressing::matches`]).
    pub fn addressing(&self) -> Addressing {
        Addressing {
            id: self.id,
            ldr: self.ldr(),
            dfr: self.dfr,
            hw_enabled: self.hw_enabled(),
            x2apic: self.x2apic(),
        }
    }

    /// Whether a message with this destination reaches this APIC.
    pub fn matches(&self, ipi: &Ipi) -> bool {
        self.addressing().matches(ipi)
    }

    /// The LVT entry of LINT0 or LINT1 (`pin` 0 or 1).
    pub fn lint(&self, pin: usize) -> u32 {
        self.lvt[3 + pin.min(1)]
    }
}

mod vid;
pub use vid::interrupted_event;

#[cfg(test)]
mod tests;
