// SPDX-License-Identifier: GPL-2.0

//! The I/O APIC (82093AA-style, version 0x20, 24 pins) at 0xfec00000: IOREGSEL at
//! +0x00, IOWIN at +0x10, EOI at +0x40. A pin's redirection entry turns an assertion
//! into an interrupt message in the MSI format, which the platform hands to the local
//! APICs (rvmm's `RVMM_SIGNAL_MSI`, KVM's `KVM_SIGNAL_MSI`).
//!
//! Level-triggered entries set Remote IRR when they send; it clears on an EOI (the EOI
//! register, or a write to the entry) and a line still high sends again. rvmm's local
//! APICs do not broadcast EOIs to userspace, so guests with level-triggered ISA/PCI
//! interrupts must use the EOI register (I/O APIC version 0x20); the platform's own
//! devices are all edge-triggered.

pub const IOAPIC_BASE: u64 = 0xfec0_0000;
pub const PINS: usize = 24;
const VERSION: u32 = 0x20 | ((PINS as u32 - 1) << 16);

const MASKED: u64 = 1 << 16;
const LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
const DELIVERY_STATUS: u64 = 1 << 12;

/// An interrupt message: (address, data) in the MSI format.
pub type Message = (u64, u32);

#[derive(Debug)]
pub struct IoApic {
    id: u32,
    sel: u32,
    redir: [u64; PINS],
    lines: u32,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new(0)
    }
}

impl IoApic {
    pub fn new(id: u8) -> Self {
        Self {
            id: u32::from(id) << 24,
            sel: 0,
            redir: [MASKED; PINS],
            lines: 0,
        }
    }

    fn message(e: u64) -> Message {
        let dest = (e >> 56) & 0xff;
        let logical = (e >> 11) & 1;
        let addr = 0xfee0_0000 | dest << 12 | logical << 2;
        // Vector, delivery mode, level assert, trigger mode.
        let data = (e & 0x7ff) as u32 | 1 << 14 | ((e & LEVEL) as u32);
        (addr, data)
    }

    fn try_send(&mut self, pin: usize) -> Option<Message> {
        let e = self.redir[pin];
        if e & MASKED != 0 {
            return None;
        }
        if e & LEVEL != 0 {
            if e & REMOTE_IRR != 0 {
                return None;
            }
            self.redir[pin] |= REMOTE_IRR;
        }
        Some(Self::message(e))
    }

    /// Sets pin `pin` (a GSI below 24) high or low; returns the message to send, if any.
    pub fn set_irq(&mut self, pin: usize, high: bool) -> Option<Message> {
        if pin >= PINS {
            return None;
        }
        let bit = 1 << pin;
        let was = self.lines & bit != 0;
        if high {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
            return None;
        }
        let level = self.redir[pin] & LEVEL != 0;
        if level || !was {
            return self.try_send(pin);
        }
        None
    }

    /// An EOI for `vector`: clears Remote IRR of level entries with it; lines still high
    /// send again.
    pub fn eoi(&mut self, vector: u8) -> Vec<Message> {
        let mut out = Vec::new();
        for pin in 0..PINS {
            let e = self.redir[pin];
            if e & LEVEL != 0 && e & REMOTE_IRR != 0 && e as u8 == vector {
                self.redir[pin] &= !REMOTE_IRR;
                if self.lines & (1 << pin) != 0 {
                    out.extend(self.try_send(pin));
                }
            }
        }
        out
    }

    /// An MMIO read at `offset` in the I/O APIC's page.
    pub fn read(&self, offset: u64) -> u32 {
        match offset {
            0x00 => self.sel,
            0x10 => match self.sel {
                0 => self.id,
                1 => VERSION,
                2 => self.id,
                r @ 0x10..=0x3f => {
                    let e = self.redir[((r - 0x10) / 2) as usize] & !DELIVERY_STATUS;
                    if r & 1 == 0 {
                        e as u32
                    } else {
                        (e >> 32) as u32
                    }
                }
                _ => 0xffff_ffff,
            },
            _ => 0,
        }
    }

    /// An MMIO write; returns messages to send (an entry unmasked while its level line
    /// is high, or an EOI that re-arms one).
    pub fn write(&mut self, offset: u64, v: u32) -> Vec<Message> {
        match offset {
            0x00 => self.sel = v & 0xff,
            0x10 => match self.sel {
                0 => self.id = v & 0x0f00_0000,
                r @ 0x10..=0x3f => {
                    let pin = ((r - 0x10) / 2) as usize;
                    let old = self.redir[pin];
                    let new = if r & 1 == 0 {
                        // Remote IRR and delivery status are read-only.
                        (old & !0xffff_ffff)
                            | (u64::from(v) & !(REMOTE_IRR | DELIVERY_STATUS))
                            | (old & REMOTE_IRR)
                    } else {
                        (old & 0xffff_ffff) | u64::from(v) << 32
                    };
                    self.redir[pin] = if new & LEVEL == 0 {
                        new & !REMOTE_IRR
                    } else {
                        new
                    };
                    if new & LEVEL != 0 && new & MASKED == 0 && self.lines & (1 << pin) != 0 {
                        return self.try_send(pin).into_iter().collect();
                    }
                }
                _ => {}
            },
            0x40 => return self.eoi(v as u8),
            _ => {}
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(io: &mut IoApic, pin: u32, lo: u32, hi: u32) {
        io.write(0, 0x10 + 2 * pin);
        io.write(0x10, lo);
        io.write(0, 0x11 + 2 * pin);
        io.write(0x10, hi);
    }

    #[test]
    fn version_and_reset() {
        let mut io = IoApic::new(2);
        io.write(0, 1);
        assert_eq!(io.read(0x10), 0x0017_0020);
        io.write(0, 0);
        assert_eq!(io.read(0x10), 2 << 24);
        io.write(0, 0x10);
        assert_eq!(io.read(0x10), 1 << 16, "masked at reset");
        assert_eq!(io.set_irq(0, true), None);
    }

    #[test]
    fn edge_pin_sends_on_rising_edge() {
        let mut io = IoApic::new(0);
        program(&mut io, 2, 0x30, 1 << 24);
        assert_eq!(io.set_irq(2, true), Some((0xfee0_1000, 0x4030)));
        assert_eq!(io.set_irq(2, true), None, "no edge");
        assert_eq!(io.set_irq(2, false), None);
        assert_eq!(io.set_irq(2, true), Some((0xfee0_1000, 0x4030)));
    }

    #[test]
    fn logical_lowest_priority_message() {
        let mut io = IoApic::new(0);
        program(&mut io, 4, 0x0931, 0x03 << 24);
        assert_eq!(io.set_irq(4, true), Some((0xfee0_3004, 0x4131)));
    }

    #[test]
    fn level_pin_remote_irr_and_eoi() {
        let mut io = IoApic::new(0);
        program(&mut io, 9, 0x8000 | 0x41, 0);
        assert_eq!(io.set_irq(9, true), Some((0xfee0_0000, 0xc041)));
        assert_eq!(io.set_irq(9, true), None, "remote IRR");
        io.write(0, 0x10 + 18);
        assert_ne!(io.read(0x10) & (1 << 14), 0);
        // EOI with the line still high: sent again.
        assert_eq!(io.write(0x40, 0x41), vec![(0xfee0_0000, 0xc041)]);
        io.set_irq(9, false);
        assert_eq!(io.write(0x40, 0x41), vec![]);
        io.write(0, 0x10 + 18);
        assert_eq!(io.read(0x10) & (1 << 14), 0);
    }

    #[test]
    fn out_of_range_pins_and_registers() {
        let mut io = IoApic::new(0);
        assert_eq!(io.set_irq(24, true), None);
        io.write(0, 0x40);
        assert_eq!(io.read(0x10), 0xffff_ffff);
    }
}
