// SPDX-License-Identifier: GPL-2.0

//! A vCPU's counters: written by the vCPU's own thread only, read by RVMM_GET_STATS and
//! debugfs at any time without the vCPU's lock (which a running or halted vCPU holds).

use core::sync::atomic::{AtomicU64, Ordering};

use rvmm_uapi as uapi;

/// A counter with one writer: a plain load and store, no locked instruction on the exit
/// path; readers see some recent value.
#[derive(Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    /// Adds one (the vCPU's thread only).
    #[inline]
    pub(crate) fn inc(&self) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
    }

    /// Adds `n` (the vCPU's thread only).
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Sets the value (the vCPU's thread only).
    pub(crate) fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Per-vCPU counters.
pub(crate) struct Stats {
    pub(crate) exits: [Counter; rvmm_core::exit::NR_EXIT_REASONS],
    pub(crate) shadow_faults: Counter,
    pub(crate) guest_faults: Counter,
    pub(crate) shadow_resets: Counter,
    pub(crate) user_exits: Counter,
    pub(crate) mmio_exits: Counter,
    pub(crate) apic_injections: Counter,
    pub(crate) halt_sleeps: Counter,
    pub(crate) apic_accesses: Counter,
    pub(crate) emulated_steps: Counter,
    /// The APIC timer's interrupts (copied from the APIC at the end of each section).
    pub(crate) apic_timer_irqs: Counter,
    /// The longest run section (interrupts off), in TSC ticks.
    pub(crate) longest_section: Counter,
    /// The TSC rate, for `longest_section` in nanoseconds.
    pub(crate) tsc_khz: u32,
}

impl Stats {
    pub(crate) fn new(tsc_khz: u32) -> Self {
        Self {
            exits: [const { Counter(AtomicU64::new(0)) }; rvmm_core::exit::NR_EXIT_REASONS],
            shadow_faults: Counter::default(),
            guest_faults: Counter::default(),
            shadow_resets: Counter::default(),
            user_exits: Counter::default(),
            mmio_exits: Counter::default(),
            apic_injections: Counter::default(),
            halt_sleeps: Counter::default(),
            apic_accesses: Counter::default(),
            emulated_steps: Counter::default(),
            apic_timer_irqs: Counter::default(),
            longest_section: Counter::default(),
            tsc_khz: tsc_khz.max(1),
        }
    }

    /// Adds these counters to `out`.
    pub(crate) fn add_to(&self, out: &mut uapi::VmStats) {
        for (o, n) in out.exits.iter_mut().zip(self.exits.iter()) {
            *o = o.wrapping_add(n.get());
        }
        let add = |o: &mut u64, c: &Counter| *o = o.wrapping_add(c.get());
        add(&mut out.shadow_faults, &self.shadow_faults);
        add(&mut out.guest_page_faults, &self.guest_faults);
        add(&mut out.shadow_resets, &self.shadow_resets);
        add(&mut out.user_exits, &self.user_exits);
        add(&mut out.mmio_exits, &self.mmio_exits);
        add(&mut out.apic_injections, &self.apic_injections);
        add(&mut out.halt_sleeps, &self.halt_sleeps);
        add(&mut out.apic_accesses, &self.apic_accesses);
        add(&mut out.real_mode_emulated, &self.emulated_steps);
        add(&mut out.apic_timer_irqs, &self.apic_timer_irqs);
        // Ticks to ns in two parts (no 128-bit division in the kernel).
        let (t, khz) = (self.longest_section.get(), u64::from(self.tsc_khz));
        let ns = (t / khz)
            .saturating_mul(1_000_000)
            .saturating_add((t % khz) * 1_000_000 / khz);
        out.longest_section_ns = out.longest_section_ns.max(ns);
    }
}
