// SPDX-License-Identifier: GPL-2.0

use super::*;

extern crate std;

const SVR_ON: u64 = 0x1ff;

fn enabled(id: u32) -> Apic {
    let mut a = Apic::new(id, id == 0);
    a.mmio_write(reg::SVR, 4, SVR_ON, 0);
    a
}

fn x2(id: u32) -> Apic {
    let mut a = enabled(id);
    a.set_base_msr(base::DEFAULT_ADDR | base::EN | base::EXTD, 46)
        .unwrap();
    a
}

fn msr(offset: u32) -> u32 {
    X2APIC_MSR_BASE + (offset >> 4)
}

#[test]
fn reset_state() {
    let a = Apic::new(3, false);
    assert_eq!(a.base_msr(), 0xfee0_0800);
    assert_eq!(Apic::new(0, true).base_msr(), 0xfee0_0900);
    assert_eq!(a.mmio_read(reg::ID, 4, 0), 3 << 24);
    assert_eq!(a.mmio_read(reg::VERSION, 4, 0), 0x50014);
    assert_eq!(a.mmio_read(reg::SVR, 4, 0), 0xff);
    assert_eq!(a.mmio_read(reg::DFR, 4, 0), 0xffff_ffff);
    for r in [reg::LVT_TIMER, reg::LVT_LINT0, reg::LVT_ERROR] {
        assert_eq!(a.mmio_read(r, 4, 0), 1 << 16);
    }
    assert_eq!(a.mmio_base(), Some(0xfee0_0000));
    assert!(!a.enabled());
}

#[test]
fn software_disabled_apic_takes_no_interrupt() {
    let mut a = Apic::new(0, true);
    assert!(!a.accept(0x40, Trigger::Edge));
    assert_eq!(a.pending(), None);
    a.mmio_write(reg::SVR, 4, SVR_ON, 0);
    assert!(a.accept(0x40, Trigger::Edge));
    assert_eq!(a.pending(), Some(0x40));
}

#[test]
fn highest_irr_first_and_eoi_clears_highest_isr() {
    let mut a = enabled(0);
    a.accept(0x31, Trigger::Edge);
    a.accept(0x85, Trigger::Edge);
    a.accept(0x52, Trigger::Edge);
    assert_eq!(a.pending(), Some(0x85));
    a.ack(0x85);
    // Lower classes wait while 0x85 is in service.
    assert_eq!(a.pending(), None);
    assert_eq!(a.mmio_read(reg::PPR, 4, 0), 0x80);
    a.accept(0x91, Trigger::Edge);
    assert_eq!(a.pending(), Some(0x91));
    a.ack(0x91);
    // ISR word 4 holds vectors 0x80-0x9f: 0x85 and 0x91.
    assert_eq!(a.mmio_read(reg::ISR + 0x40, 4, 0), (1 << 0x11) | (1 << 5));
    // EOI ends the highest in-service vector (0x91), then 0x85.
    a.mmio_write(reg::EOI, 4, 0, 0);
    assert!(!a.isr.test(0x91) && a.isr.test(0x85));
    assert_eq!(a.pending(), None);
    a.mmio_write(reg::EOI, 4, 0, 0);
    assert_eq!(a.isr.highest(), None);
    assert_eq!(a.pending(), Some(0x52));
    // Same class as in service: not taken (needs a higher class).
    a.ack(0x52);
    a.accept(0x5f, Trigger::Edge);
    assert_eq!(a.pending(), None);
}

#[test]
fn tpr_masks_lower_classes() {
    let mut a = enabled(0);
    a.accept(0x45, Trigger::Edge);
    a.mmio_write(reg::TPR, 4, 0x50, 0);
    assert_eq!(a.pending(), None);
    assert_eq!(a.mmio_read(reg::PPR, 4, 0), 0x50);
    a.mmio_write(reg::TPR, 4, 0x40, 0);
    assert_eq!(a.pending(), None, "same class as TPR is masked");
    a.mmio_write(reg::TPR, 4, 0x3f, 0);
    assert_eq!(a.pending(), Some(0x45));
    a.set_tpr(0xf0);
    a.accept(0xf8, Trigger::Edge);
    assert_eq!(a.pending(), None);
}

#[test]
fn level_eoi_is_reported() {
    let mut a = enabled(0);
    a.accept(0x60, Trigger::Level);
    assert!(a.tmr.test(0x60));
    a.ack(0x60);
    assert_eq!(a.mmio_write(reg::EOI, 4, 0, 0), Effect::LevelEoi(0x60));
    assert_eq!(a.mmio_write(reg::EOI, 4, 0, 0), Effect::None);
}

#[test]
fn illegal_vectors_set_esr() {
    let mut a = enabled(0);
    assert!(!a.accept(7, Trigger::Edge));
    assert_eq!(
        a.mmio_read(reg::ESR, 4, 0),
        0,
        "ESR shows errors after a write"
    );
    a.mmio_write(reg::ESR, 4, 0, 0);
    assert_eq!(a.mmio_read(reg::ESR, 4, 0), 1 << 6);
    assert_eq!(a.mmio_write(reg::ICR, 4, 0x0000_4005, 0), Effect::None);
    a.mmio_write(reg::ESR, 4, 0, 0);
    assert_eq!(a.mmio_read(reg::ESR, 4, 0), 1 << 5);
    a.mmio_write(reg::ESR, 4, 0, 0);
    assert_eq!(a.mmio_read(reg::ESR, 4, 0), 0);
}

#[test]
fn one_shot_timer() {
    let mut a = enabled(0);
    a.mmio_write(reg::TIMER_DIV, 4, 0x3, 0); // divide by 16
    a.mmio_write(reg::LVT_TIMER, 4, 0x40, 0);
    a.mmio_write(reg::TIMER_INIT, 4, 1000, 100);
    assert_eq!(a.timer_deadline(), Some(100 + 16_000));
    assert_eq!(a.mmio_read(reg::TIMER_CUR, 4, 100 + 1600), 900);
    assert!(!a.tick(100 + 15_999));
    assert!(a.tick(100 + 16_000));
    assert_eq!(a.pending(), Some(0x40));
    assert_eq!(a.timer_deadline(), None);
    assert_eq!(a.mmio_read(reg::TIMER_CUR, 4, 20_000), 0);
    assert!(!a.tick(1 << 40));
}

#[test]
fn periodic_timer_reloads_and_catches_up() {
    let mut a = enabled(0);
    a.set_tsc_khz(100); // a 100-kHz TSC: periods down to 20 ticks
    a.mmio_write(reg::TIMER_DIV, 4, 0xb, 0); // divide by 1
    a.mmio_write(reg::LVT_TIMER, 4, (1 << 17) | 0x41, 0);
    a.mmio_write(reg::TIMER_INIT, 4, 500, 0);
    let mut fired = 0;
    for t in (0..5_000).step_by(10) {
        if a.tick(t) {
            fired += 1;
            a.ack(0x41);
            a.eoi();
        }
    }
    assert_eq!(fired, 9, "fires at 500, 1000, ..., 4500");
    assert_eq!(a.timer_deadline(), Some(5_000));
    // Far behind: one interrupt, and the next period starts from now.
    assert!(a.tick(1_000_000));
    assert_eq!(a.timer_deadline(), Some(1_000_500));
    // Writing 0 stops it.
    a.mmio_write(reg::TIMER_INIT, 4, 0, 1_000_100);
    assert_eq!(a.timer_deadline(), None);
}

#[test]
fn masked_timer_counts_but_does_not_interrupt() {
    let mut a = enabled(0);
    a.set_tsc_khz(100);
    a.mmio_write(reg::TIMER_DIV, 4, 0xb, 0);
    a.mmio_write(reg::LVT_TIMER, 4, (1 << 16) | (1 << 17) | 0x41, 0);
    a.mmio_write(reg::TIMER_INIT, 4, 100, 0);
    assert!(!a.tick(100));
    assert_eq!(a.timer_deadline(), Some(200));
    assert_eq!(a.pending(), None);
}

#[test]
fn tsc_deadline_timer() {
    let mut a = enabled(0);
    a.set_tsc_deadline(5000);
    assert_eq!(
        a.timer_deadline(),
        None,
        "ignored outside TSC-deadline mode"
    );
    a.mmio_write(reg::LVT_TIMER, 4, (2 << 17) | 0x42, 0);
    a.mmio_write(reg::TIMER_INIT, 4, 10, 0);
    assert_eq!(
        a.timer_deadline(),
        None,
        "initial count ignored in TSC-deadline mode"
    );
    a.set_tsc_deadline(5000);
    assert_eq!(a.tsc_deadline(), 5000);
    assert!(!a.tick(4999));
    assert!(a.tick(5000));
    assert_eq!(a.tsc_deadline(), 0);
    assert_eq!(a.pending(), Some(0x42));
    // A deadline in the past fires at the next check.
    a.set_tsc_deadline(10);
    assert!(a.tick(6000));
    // Leaving the mode disarms.
    a.set_tsc_deadline(9000);
    a.mmio_write(reg::LVT_TIMER, 4, 0x42, 0);
    assert_eq!(a.timer_deadline(), None);
}

#[test]
fn svr_disable_masks_lvts() {
    let mut a = enabled(0);
    a.mmio_write(reg::LVT_TIMER, 4, 0x40, 0);
    a.mmio_write(reg::SVR, 4, 0xff, 0);
    assert_eq!(a.mmio_read(reg::LVT_TIMER, 4, 0), 0x10040);
    a.mmio_write(reg::LVT_TIMER, 4, 0x40, 0);
    assert_eq!(
        a.mmio_read(reg::LVT_TIMER, 4, 0),
        0x10040,
        "stays masked while disabled"
    );
}

#[test]
fn icr_xapic_and_self_ipi() {
    let mut a = enabled(0);
    a.mmio_write(reg::ICR2, 4, 0x0300_0000, 0);
    let e = a.mmio_write(reg::ICR, 4, 0x0000_4050, 0);
    assert_eq!(
        e,
        Effect::Send(Ipi {
            vector: 0x50,
            delivery: Delivery::Fixed,
            logical: false,
            level: true,
            trigger_level: false,
            shorthand: Shorthand::None,
            dest: 3,
            x2apic: false,
        })
    );
    let Effect::Send(i) = a.mmio_write(reg::ICR, 4, 0x0004_4051, 0) else {
        panic!()
    };
    assert_eq!(i.shorthand, Shorthand::SelfOnly);
    let Effect::Send(i) = a.mmio_write(reg::ICR, 4, 0x000c_4500, 0) else {
        panic!()
    };
    assert_eq!(
        (i.delivery, i.shorthand),
        (Delivery::Init, Shorthand::AllButSelf)
    );
    let Effect::Send(i) = a.mmio_write(reg::ICR, 4, 0x0000_4608, 0) else {
        panic!()
    };
    assert_eq!((i.delivery, i.vector), (Delivery::StartUp, 8));
    // Unaligned and narrow writes do nothing.
    assert_eq!(a.mmio_write(reg::ICR + 4, 4, 0x4050, 0), Effect::None);
    assert_eq!(a.mmio_write(reg::ICR, 2, 0x4050, 0), Effect::None);
    // Byte reads of a register.
    assert_eq!(a.mmio_read(reg::VERSION + 2, 1, 0), 5);
}

#[test]
fn x2apic_msrs() {
    let mut a = x2(5);
    assert_eq!(a.rdmsr(msr(reg::ID), 0), Ok(5));
    assert_eq!(a.rdmsr(msr(reg::LDR), 0), Ok(1 << 5));
    assert_eq!(x2(0x13).rdmsr(msr(reg::LDR), 0), Ok((1 << 16) | (1 << 3)));
    assert_eq!(a.mmio_base(), None);
    // Absent in x2APIC mode, or write-only.
    for r in [
        reg::DFR,
        reg::APR,
        reg::RRD,
        reg::ICR2,
        reg::EOI,
        reg::SELF_IPI,
        0x2f0,
        0x400,
    ] {
        assert_eq!(a.rdmsr(msr(r), 0), Err(Gp), "read {r:#x}");
    }
    // Read-only.
    for r in [
        reg::ID,
        reg::VERSION,
        reg::PPR,
        reg::LDR,
        reg::ISR,
        reg::IRR,
        reg::TMR,
        reg::TIMER_CUR,
    ] {
        assert_eq!(a.wrmsr(msr(r), 0, 0), Err(Gp), "write {r:#x}");
    }
    // Reserved bits.
    assert_eq!(a.wrmsr(msr(reg::EOI), 1, 0), Err(Gp));
    assert_eq!(a.wrmsr(msr(reg::SELF_IPI), 0x100, 0), Err(Gp));
    assert_eq!(a.wrmsr(msr(reg::TPR), 0x100, 0), Err(Gp));
    assert_eq!(a.wrmsr(msr(reg::ESR), 1, 0), Err(Gp));
    assert_eq!(a.wrmsr(msr(reg::ICR), 1 << 13, 0), Err(Gp));
    assert_eq!(a.wrmsr(msr(reg::SVR), 1 << 12, 0), Err(Gp));
    assert_eq!(a.wrmsr(msr(reg::TPR), 1 << 32, 0), Err(Gp));
    // ICR is one 64-bit register with a 32-bit destination.
    let Ok(Effect::Send(i)) = a.wrmsr(msr(reg::ICR), (7u64 << 32) | 0x4055, 0) else {
        panic!()
    };
    assert_eq!((i.dest, i.vector, i.x2apic), (7, 0x55, true));
    assert_eq!(a.rdmsr(msr(reg::ICR), 0), Ok((7u64 << 32) | 0x4055));
    let Ok(Effect::Send(i)) = a.wrmsr(msr(reg::SELF_IPI), 0x66, 0) else {
        panic!()
    };
    assert_eq!((i.shorthand, i.vector), (Shorthand::SelfOnly, 0x66));
    // The MSRs fault in xAPIC mode.
    assert_eq!(enabled(0).rdmsr(msr(reg::ID), 0), Err(Gp));
    assert_eq!(enabled(0).wrmsr(msr(reg::TPR), 0, 0), Err(Gp));
    // And the page reads nothing in x2APIC mode.
    assert_eq!(a.mmio_read(reg::ID, 4, 0), 0);
}

#[test]
fn apic_base_transitions() {
    let mut a = enabled(1);
    // EXTD without EN.
    assert_eq!(a.set_base_msr(base::DEFAULT_ADDR | base::EXTD, 46), Err(Gp));
    // Reserved bits (beyond MAXPHYADDR, bit 9).
    assert_eq!(
        a.set_base_msr((1 << 46) | base::DEFAULT_ADDR | base::EN, 46),
        Err(Gp)
    );
    assert_eq!(
        a.set_base_msr(base::DEFAULT_ADDR | base::EN | (1 << 9), 46),
        Err(Gp)
    );
    // Relocation.
    a.set_base_msr(0xfed0_0000 | base::EN, 46).unwrap();
    assert_eq!(a.mmio_base(), Some(0xfed0_0000));
    a.set_base_msr(base::DEFAULT_ADDR | base::EN | base::EXTD, 46)
        .unwrap();
    assert!(a.x2apic());
    // x2APIC -> xAPIC directly faults; through disabled it works, and resets state.
    assert_eq!(a.set_base_msr(base::DEFAULT_ADDR | base::EN, 46), Err(Gp));
    a.set_base_msr(base::DEFAULT_ADDR, 46).unwrap();
    assert!(!a.hw_enabled());
    assert!(!a.accept(0x40, Trigger::Edge));
    a.set_base_msr(base::DEFAULT_ADDR | base::EN, 46).unwrap();
    assert_eq!(a.mmio_read(reg::SVR, 4, 0), 0xff, "disable reset the SVR");
    assert_eq!(a.mmio_read(reg::ID, 4, 0), 1 << 24, "the ID survives");
}

#[test]
fn destinations() {
    let ipi = |dest, logical, x2apic| Ipi {
        vector: 0x40,
        delivery: Delivery::Fixed,
        logical,
        level: true,
        trigger_level: false,
        shorthand: Shorthand::None,
        dest,
        x2apic,
    };
    let mut a = enabled(2);
    assert!(a.matches(&ipi(2, false, false)));
    assert!(!a.matches(&ipi(3, false, false)));
    assert!(a.matches(&ipi(0xff, false, false)));
    // Flat logical.
    a.mmio_write(reg::LDR, 4, 0x0400_0000, 0);
    assert!(a.matches(&ipi(0x06, true, false)));
    assert!(!a.matches(&ipi(0x03, true, false)));
    // Cluster logical: cluster 1, member bit 2.
    a.mmio_write(reg::DFR, 4, 0x0fff_ffff, 0);
    a.mmio_write(reg::LDR, 4, 0x1400_0000, 0);
    assert!(a.matches(&ipi(0x14, true, false)));
    assert!(a.matches(&ipi(0x1c, true, false)));
    assert!(!a.matches(&ipi(0x24, true, false)));
    // x2APIC: 32-bit physical, cluster logical.
    let b = x2(0x12);
    assert!(b.matches(&ipi(0x12, false, true)));
    assert!(!b.matches(&ipi(0x2, false, true)));
    assert!(b.matches(&ipi((1 << 16) | (1 << 2), true, true)));
    assert!(!b.matches(&ipi((2 << 16) | (1 << 2), true, true)));
    assert!(b.matches(&ipi(0xffff_ffff, false, true)));
    // The packed form round-trips.
    assert_eq!(Addressing::unpack(b.addressing().pack()), b.addressing());
    assert_eq!(Addressing::unpack(a.addressing().pack()), a.addressing());
    // A disabled APIC matches nothing.
    let mut c = enabled(0);
    c.set_base_msr(base::DEFAULT_ADDR, 46).unwrap();
    assert!(!c.matches(&ipi(0xff, false, false)));
}

#[test]
fn msi_decoding() {
    let i = Ipi::from_msi(0xfee0_3000, 0x4031).unwrap();
    assert_eq!(
        (i.dest, i.vector, i.logical, i.delivery),
        (3, 0x31, false, Delivery::Fixed)
    );
    let i = Ipi::from_msi(0xfee0_1004, 0x8431).unwrap();
    assert!(i.logical && i.trigger_level);
    assert_eq!(i.delivery, Delivery::Nmi);
    assert_eq!(Ipi::from_msi(0xfed0_0000, 0x31), None);
}

#[test]
fn vecreg_words() {
    let mut r = VecReg::default();
    r.set(0x21);
    r.set(0xff);
    assert_eq!(r.word(1), 2);
    assert_eq!(r.word(7), 1 << 31);
    assert_eq!(r.highest(), Some(0xff));
    r.clear(0xff);
    assert_eq!(r.highest(), Some(0x21));
}

#[test]
fn apic64_sequence() {
    let mut a = Apic::new(0, true);
    let mut now = 0;
    a.mmio_write(reg::SVR, 4, 0x1ff, now);
    // periodic
    a.mmio_write(reg::TIMER_DIV, 4, 3, now);
    a.mmio_write(reg::LVT_TIMER, 4, (1 << 17) | 0x40, now);
    a.mmio_write(reg::TIMER_INIT, 4, 5000, now);
    let mut n = 0;
    while n < 11 {
        now += 1000;
        a.tick(now);
        if let Some(v) = a.pending() {
            a.ack(v);
            a.mmio_write(reg::EOI, 4, 0, now);
            n += 1;
        }
    }
    a.mmio_write(reg::TIMER_INIT, 4, 0, now);
    // one-shot
    a.mmio_write(reg::TIMER_DIV, 4, 0xb, now);
    a.mmio_write(reg::LVT_TIMER, 4, 0x40, now);
    a.mmio_write(reg::TIMER_INIT, 4, 1_000_000, now);
    now += 1_000_000;
    assert!(a.tick(now) || a.irr.test(0x40));
    let v = a.pending().unwrap();
    a.ack(v);
    a.mmio_write(reg::EOI, 4, 0, now);
    // deadline
    a.mmio_write(reg::LVT_TIMER, 4, (2 << 17) | 0x42, now);
    a.set_tsc_deadline(now + 100);
    now += 200;
    assert!(a.tick(now));
    let v = a.pending().unwrap();
    a.ack(v);
    a.mmio_write(reg::EOI, 4, 0, now);
    a.mmio_write(reg::LVT_TIMER, 4, 1 << 16, now);
    assert_eq!(a.isr.highest(), None);
    a.set_tpr(0);
    assert!(a.accept(0xd0, Trigger::Edge));
    assert_eq!(a.pending(), Some(0xd0));
}

/// Guest entries every `step` ticks from `from` to `to`: how many timer interrupts.
fn fires(a: &mut Apic, from: u64, to: u64, step: u64) -> u32 {
    let mut n = 0;
    let mut t = from;
    while t < to {
        if a.tick(t) {
            n += 1;
            if let Some(v) = a.pending() {
                a.ack(v);
                a.eoi();
            }
        }
        t += step;
    }
    n
}

#[test]
fn periodic_timer_has_a_minimum_period() {
    // A 2-GHz TSC: 200 us are 400_000 ticks.
    let mut a = enabled(0);
    a.set_tsc_khz(2_000_000);
    a.mmio_write(reg::TIMER_DIV, 4, 0xb, 0); // divide by 1
    a.mmio_write(reg::LVT_TIMER, 4, (1 << 17) | 0x41, 0);
    a.mmio_write(reg::TIMER_INIT, 4, 1, 1000);
    assert_eq!(a.timer_deadline(), Some(1000 + 400_000));
    // An entry every 100 ticks for 10 ms: interrupts at 401_000, 801_000, ...,
    // 19_601_000 (49), not one per entry (200_000).
    assert_eq!(fires(&mut a, 1000, 1000 + 20_000_000, 100), 49);
    assert!(
        a.mmio_read(reg::TIMER_CUR, 4, 1000) <= 1,
        "never above the initial count"
    );
    // Longer periods are the guest's own.
    a.mmio_write(reg::TIMER_INIT, 4, 1_000_000, 0);
    assert_eq!(a.timer_deadline(), Some(1_000_000));
    // One-shot is not clamped (as KVM): one interrupt per count the guest writes.
    a.mmio_write(reg::LVT_TIMER, 4, 0x41, 0);
    a.mmio_write(reg::TIMER_INIT, 4, 1, 0);
    assert_eq!(a.timer_deadline(), Some(1));
    assert_eq!(fires(&mut a, 0, 1_000_000, 1), 1);
    // A global disable and enable keeps the clamp.
    a.set_base_msr(base::DEFAULT_ADDR, 46).unwrap();
    a.set_base_msr(base::DEFAULT_ADDR | base::EN, 46).unwrap();
    a.mmio_write(reg::SVR, 4, SVR_ON, 0);
    a.mmio_write(reg::TIMER_DIV, 4, 0xb, 0);
    a.mmio_write(reg::LVT_TIMER, 4, (1 << 17) | 0x41, 0);
    a.mmio_write(reg::TIMER_INIT, 4, 1, 0);
    assert_eq!(a.timer_deadline(), Some(400_000));
    // Without a TSC rate, the default (1 GHz) applies: never a period of one tick.
    let mut b = enabled(1);
    b.set_tsc_khz(0);
    b.mmio_write(reg::TIMER_DIV, 4, 0xb, 0);
    b.mmio_write(reg::LVT_TIMER, 4, (1 << 17) | 0x41, 0);
    b.mmio_write(reg::TIMER_INIT, 4, 1, 0);
    assert_eq!(b.timer_deadline(), Some(200_000));
}

#[test]
fn hostile_timer_values() {
    for mode in [0u64, 1 << 17] {
        for now in [0, 1, u64::MAX / 2, u64::MAX - 1, u64::MAX] {
            let mut a = enabled(0);
            a.set_tsc_khz(u32::MAX);
            a.mmio_write(reg::TIMER_DIV, 4, 0xa, now); // divide by 128
            a.mmio_write(reg::LVT_TIMER, 4, mode | 0x41, now);
            a.mmio_write(reg::TIMER_INIT, 4, 0xffff_ffff, now);
            let period = 0xffff_ffffu64 * 128;
            assert_eq!(a.timer_deadline(), Some(now.saturating_add(period)));
            assert!(a.mmio_read(reg::TIMER_CUR, 4, now) <= 0xffff_ffff);
            // The divisor changed while counting: the count stays within the initial.
            a.mmio_write(reg::TIMER_DIV, 4, 0xb, now);
            a.mmio_read(reg::TIMER_CUR, 4, now);
            a.mmio_read(reg::TIMER_CUR, 4, 0);
            for t in [now, now.saturating_add(period), u64::MAX, 0] {
                a.tick(t);
                a.mmio_read(reg::TIMER_CUR, 4, t);
            }
        }
    }
    // TSC deadlines at the ends of time.
    let mut a = enabled(0);
    a.mmio_write(reg::LVT_TIMER, 4, (2 << 17) | 0x42, 0);
    for d in [1, u64::MAX - 1, u64::MAX] {
        a.set_tsc_deadline(d);
        assert!(!a.tick(0));
        assert!(a.tick(u64::MAX));
        assert_eq!(a.timer_deadline(), None);
    }
    // A TSC rate of 0xffff_ffff kHz: the minimum period still fits.
    let mut a = enabled(0);
    a.set_tsc_khz(u32::MAX);
    a.mmio_write(reg::LVT_TIMER, 4, (1 << 17) | 0x41, 0);
    a.mmio_write(reg::TIMER_INIT, 4, 1, u64::MAX - 5);
    assert_eq!(a.timer_deadline(), Some(u64::MAX));
    assert!(a.tick(u64::MAX));
    assert_eq!(a.timer_deadline(), Some(u64::MAX));
    // MAXPHYADDR from a strange CPUID.
    for m in [0, 12, 52, 63, 64, 255] {
        let mut a = enabled(0);
        let _ = a.set_base_msr(base::DEFAULT_ADDR | base::EN, m);
        let _ = a.set_base_msr(u64::MAX, m);
    }
}

#[test]
fn register_sweep_with_hostile_values() {
    let r = VecReg([u64::MAX; 4]);
    assert_eq!((r.word(8), r.word(usize::MAX)), (0, 0));
    let mut s = 0x6a09_e667_f3bc_c908u64;
    let mut rng = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let values = [0, 1, 0xff, 0xffff_ffff, u64::MAX, 1 << 63];
    for now in [0, 1 << 40, u64::MAX] {
        let mut a = enabled(0);
        for off in 0..0x1000u32 {
            for len in 0..=8 {
                a.mmio_read(off, len, now);
                a.mmio_write(off, len, values[off as usize % values.len()], now);
            }
            a.mmio_write(off & !0xf, 4, rng(), now);
            a.tick(rng());
        }
        a.mmio_read(u32::MAX, 4, now);
        a.mmio_write(!0xf, 4, u64::MAX, now);
        let mut x = x2(0);
        for msr in (0..=u32::MAX).step_by(0x10_0001).chain(0x7ff..=0x900) {
            for v in values.into_iter().chain([rng()]) {
                let _ = x.rdmsr(msr, now);
                let _ = x.wrmsr(msr, v, now);
            }
            x.tick(rng());
        }
        for v in values {
            x.set_tsc_deadline(v);
            let _ = x.set_base_msr(v, 46);
        }
        assert!(a.lint(usize::MAX) & !0x1_ffff == 0);
    }
}

fn page_of(a: &Apic) -> std::vec::Vec<(u32, u32)> {
    let mut v = std::vec::Vec::new();
    a.page_words(|o, w| v.push((o, w)));
    v
}

#[test]
fn page_words_are_the_virtualized_reads() {
    let mut a = enabled(5);
    a.accept(0x41, Trigger::Level);
    a.accept(0x90, Trigger::Edge);
    a.ack(0x90);
    a.mmio_write(reg::LVT_TIMER, 4, 0x2_0030, 0);
    a.mmio_write(reg::TIMER_INIT, 4, 1000, 0);
    let words = page_of(&a);
    // Exactly the SDM's list, each as an xAPIC read shows it.
    assert_eq!(words.len(), VIRTUALIZED_READS.len());
    for &(o, w) in &words {
        assert_eq!(o & 0xf, 0);
        let read = if o == reg::EOI {
            0
        } else {
            a.mmio_read(o, 4, 0)
        };
        assert_eq!(u64::from(w), read, "offset {o:#x}");
    }
    for o in [reg::PPR, reg::APR, reg::TIMER_CUR, reg::LVT_CMCI, reg::RRD] {
        assert!(
            words.iter().all(|&(x, _)| x != o),
            "{o:#x} is not virtualized"
        );
    }
    let at = |o| words.iter().find(|&&(x, _)| x == o).unwrap().1;
    assert_eq!(at(reg::ID), 5 << 24);
    assert_eq!(at(reg::IRR + 0x20), 1 << 1); // vector 0x41
    assert_eq!(at(reg::TMR + 0x20), 1 << 1);
    assert_eq!(at(reg::ISR + 0x40), 1 << 16); // vector 0x90
    assert_eq!(at(reg::TIMER_INIT), 1000);
}

/// Every change of a register the page shows is reported by `take_page_stale`: after
/// each of many random operations, either the page words are what they were, or the
/// APIC says they may have changed.
#[test]
fn page_staleness_follows_every_change() {
    let mut s = 0x243f_6a88_85a3_08d3u64;
    let mut rng = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let offsets = [
        reg::ID,
        reg::TPR,
        reg::EOI,
        reg::LDR,
        reg::DFR,
        reg::SVR,
        reg::ESR,
        reg::ICR,
        reg::ICR2,
        reg::LVT_TIMER,
        reg::LVT_ERROR,
        reg::TIMER_INIT,
        reg::TIMER_DIV,
    ];
    let mut a = enabled(1);
    assert!(a.take_page_stale());
    let mut page = page_of(&a);
    let mut now = 0u64;
    for _ in 0..200_000 {
        let r = rng();
        now = now.wrapping_add(r % 5000);
        let v = rng();
        match r % 11 {
            0 | 1 => {
                a.mmio_write(offsets[(v % offsets.len() as u64) as usize], 4, v >> 8, now);
            }
            2 => {
                a.accept(
                    (v >> 8) as u8,
                    if v & 1 == 0 {
                        Trigger::Edge
                    } else {
                        Trigger::Level
                    },
                );
            }
            3 => {
                if let Some(p) = a.pending() {
                    a.ack(p);
                }
            }
            4 => {
                a.eoi();
            }
            5 => a.set_tpr((v & 0xff) as u32),
            6 => {
                a.tick(now);
            }
            7 => {
                let _ = a.set_base_msr(
                    [
                        base::DEFAULT_ADDR | base::EN,
                        base::DEFAULT_ADDR,
                        base::DEFAULT_ADDR | base::EN | base::EXTD,
                    ][(v % 3) as usize],
                    46,
                );
            }
            8 => {
                let _ = a.wrmsr(
                    msr(offsets[(v % offsets.len() as u64) as usize]),
                    v >> 40,
                    now,
                );
            }
            9 => a.set_tsc_deadline(v),
            _ => {
                a.mmio_write(reg::SVR, 4, SVR_ON, now);
            }
        }
        let now_page = page_of(&a);
        if a.take_page_stale() {
            page = now_page;
        } else {
            assert_eq!(now_page, page, "a change the page missed (op {})", r % 11);
        }
    }
}

#[test]
fn vectors_from_the_page_and_interrupt_status() {
    let mut a = enabled(0);
    assert_eq!(a.interrupt_status(true), 0);
    a.accept(0x31, Trigger::Edge);
    a.accept(0x62, Trigger::Edge);
    a.ack(0x62);
    assert_eq!(a.interrupt_status(true), 0x6231);
    assert_eq!(a.interrupt_status(false), 0x6200);
    // The CPU delivered 0x31 and the guest ended 0x62: the page says so.
    let mut irr = [0u32; 8];
    let mut isr = [0u32; 8];
    isr[1] = 1 << 17;
    let _ = a.take_page_stale();
    a.load_vectors(VecReg::from_words(irr), VecReg::from_words(isr));
    assert!(!a.take_page_stale());
    assert_eq!(a.interrupt_status(true), 0x3100);
    assert_eq!(a.ppr(), 0x30);
    assert_eq!(a.eoi(), Effect::None);
    assert_eq!(a.interrupt_status(true), 0);
    irr[7] = 1 << 31;
    a.load_vectors(VecReg::from_words(irr), VecReg::default());
    assert_eq!(a.irr.highest(), Some(0xff));
    for (i, w) in irr.iter().enumerate() {
        assert_eq!(a.irr.word(i), *w);
    }
}
