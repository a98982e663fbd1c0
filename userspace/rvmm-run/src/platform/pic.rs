// SPDX-License-Identifier: GPL-2.0

//! The master/slave 8259A pair (ports 0x20-0x21, 0xa0-0xa1; the slave on master IRQ 2):
//! initialization words, masks, edge- and level-triggered requests, priority with
//! nesting, specific and non-specific EOI, automatic EOI, IRR/ISR reads through OCW3.
//! [`Pics::ack`] is the CPU's interrupt acknowledge: it returns the vector and moves
//! the request in service.

#[derive(Clone, Copy, Debug, Default)]
struct Pic {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Line levels (for edge detection and level-triggered requests).
    lines: u8,
    /// Level-triggered (ICW1 bit 3).
    level: bool,
    base: u8,
    /// Initialization: the next ICW expected (0 = operating).
    icw_step: u8,
    icw4: bool,
    auto_eoi: bool,
    read_isr: bool,
    /// Lowest priority line (priority rotates after it).
    lowest: u8,
}

impl Pic {
    fn new() -> Self {
        Self {
            imr: 0xff,
            lowest: 7,
            ..Default::default()
        }
    }

    fn set_line(&mut self, line: u8, high: bool) {
        let bit = 1 << line;
        if high {
            if self.level || self.lines & bit == 0 {
                self.irr |= bit;
            }
            self.lines |= bit;
        } else {
            self.lines &= !bit;
            if self.level {
                self.irr &= !bit;
            }
        }
    }

    /// Lines in priority order, highest first.
    fn by_priority(&self) -> impl Iterator<Item = u8> {
        let first = (self.lowest + 1) & 7;
        (0..8).map(move |k| (first + k) & 7)
    }

    /// The highest-priority request that would interrupt now (beats every in-service
    /// line of higher priority).
    fn pending(&self) -> Option<u8> {
        let req = self.irr & !self.imr;
        for l in self.by_priority() {
            if self.isr & (1 << l) != 0 {
                return None;
            }
            if req & (1 << l) != 0 {
                return Some(l);
            }
        }
        None
    }

    fn ack(&mut self, line: u8) {
        let bit = 1 << line;
        if !self.level {
            self.irr &= !bit;
        }
        if !self.auto_eoi {
            self.isr |= bit;
        }
    }

    fn write(&mut self, a0: bool, v: u8) {
        if !a0 {
            if v & 0x10 != 0 {
                // ICW1.
                self.level = v & 8 != 0;
                self.icw4 = v & 1 != 0;
                self.icw_step = 2;
                self.imr = 0;
                self.isr = 0;
                self.irr = 0;
                self.lowest = 7;
                self.auto_eoi = false;
                self.read_isr = false;
            } else if v & 0x08 != 0 {
                // OCW3.
                if v & 2 != 0 {
                    self.read_isr = v & 1 != 0;
                }
            } else {
                // OCW2.
                let cmd = v >> 5;
                let highest_isr = self.by_priority().find(|&l| self.isr & (1 << l) != 0);
                match cmd {
                    1 => {
                        if let Some(l) = highest_isr {
                            self.isr &= !(1 << l);
                        }
                    }
                    3 => self.isr &= !(1 << (v & 7)),
                    5 => {
                        if let Some(l) = highest_isr {
                            self.isr &= !(1 << l);
                            self.lowest = l;
                        }
                    }
                    6 => self.lowest = v & 7,
                    7 => {
                        self.isr &= !(1 << (v & 7));
                        self.lowest = v & 7;
                    }
                    _ => {}
                }
            }
            return;
        }
        match self.icw_step {
            2 => {
                self.base = v & 0xf8;
                self.icw_step = 3;
            }
            3 => self.icw_step = if self.icw4 { 4 } else { 0 },
            4 => {
                self.auto_eoi = v & 2 != 0;
                self.icw_step = 0;
            }
            _ => self.imr = v,
        }
    }

    fn read(&self, a0: bool) -> u8 {
        if a0 {
            self.imr
        } else if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }
}

/// The cascaded pair.
#[derive(Clone, Debug)]
pub struct Pics {
    m: Pic,
    s: Pic,
}

impl Default for Pics {
    fn default() -> Self {
        Self::new()
    }
}

impl Pics {
    pub fn new() -> Self {
        Self {
            m: Pic::new(),
            s: Pic::new(),
        }
    }

    /// Sets ISA IRQ line `irq` (0-15) high or low.
    pub fn set_irq(&mut self, irq: u8, high: bool) {
        if irq >= 8 {
            self.s.set_line(irq - 8, high);
            self.cascade();
        } else if irq != 2 {
            self.m.set_line(irq, high);
        }
    }

    fn cascade(&mut self) {
        let want = self.s.pending().is_some();
        self.m.set_line(2, want);
    }

    /// Whether the pair asserts INTR.
    pub fn intr(&self) -> bool {
        self.m.pending().is_some()
    }

    /// Interrupt acknowledge: the vector of the highest request, now in service.
    pub fn ack(&mut self) -> Option<u8> {
        let l = self.m.pending()?;
        self.m.ack(l);
        if l == 2 {
            let Some(sl) = self.s.pending() else {
                // Spurious on the slave.
                return Some(self.s.base | 7);
            };
            self.s.ack(sl);
            self.cascade();
            return Some(self.s.base | sl);
        }
        Some(self.m.base | l)
    }

    /// A write to 0x20/0x21/0xa0/0xa1.
    pub fn write(&mut self, port: u16, v: u8) {
        let a0 = port & 1 != 0;
        if port & 0x80 != 0 {
            self.s.write(a0, v);
            self.cascade();
        } else {
            self.m.write(a0, v);
        }
    }

    /// A read of 0x20/0x21/0xa0/0xa1.
    pub fn read(&self, port: u16) -> u8 {
        let a0 = port & 1 != 0;
        if port & 0x80 != 0 {
            self.s.read(a0)
        } else {
            self.m.read(a0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's and BIOS's usual set-up: master at 0x20, slave at 0x28, cascade on 2.
    fn init(p: &mut Pics, mbase: u8, sbase: u8) {
        for (port, base, cas) in [(0x20u16, mbase, 4u8), (0xa0, sbase, 2)] {
            p.write(port, 0x11);
            p.write(port + 1, base);
            p.write(port + 1, cas);
            p.write(port + 1, 0x01);
        }
        p.write(0x21, 0);
        p.write(0xa1, 0);
    }

    #[test]
    fn edge_request_ack_eoi() {
        let mut p = Pics::new();
        init(&mut p, 0x20, 0x28);
        p.set_irq(0, true);
        assert!(p.intr());
        assert_eq!(p.ack(), Some(0x20));
        assert!(!p.intr());
        // No new request while the line stays high (edge).
        p.set_irq(0, true);
        assert!(!p.intr());
        p.set_irq(0, false);
        p.set_irq(0, true);
        assert!(!p.intr(), "IRQ 0 is in service");
        p.write(0x20, 0x20); // EOI
        assert!(p.intr());
        assert_eq!(p.ack(), Some(0x20));
    }

    #[test]
    fn priority_and_nesting() {
        let mut p = Pics::new();
        init(&mut p, 0x20, 0x28);
        p.set_irq(4, true);
        assert_eq!(p.ack(), Some(0x24));
        p.set_irq(1, true);
        assert_eq!(p.ack(), Some(0x21), "higher priority nests");
        p.set_irq(6, true);
        assert!(!p.intr(), "lower priority waits");
        p.write(0x20, 0x20); // ends 1
        assert!(!p.intr(), "4 still in service");
        p.write(0x20, 0x20); // ends 4
        assert_eq!(p.ack(), Some(0x26));
    }

    #[test]
    fn slave_through_cascade() {
        let mut p = Pics::new();
        init(&mut p, 0x20, 0x70);
        p.set_irq(12, true);
        assert_eq!(p.ack(), Some(0x74));
        p.write(0xa0, 0x0b); // OCW3: read ISR on the slave
        assert_eq!(p.read(0xa0), 1 << 4);
        p.write(0xa0, 0x20);
        p.write(0x20, 0x20);
        assert_eq!(p.read(0xa0), 0);
    }

    #[test]
    fn masks() {
        let mut p = Pics::new();
        assert!(!p.intr());
        p.set_irq(3, true);
        assert!(!p.intr(), "masked at reset");
        init(&mut p, 0x20, 0x28);
        p.write(0x21, 0xff);
        p.set_irq(3, false);
        p.set_irq(3, true);
        assert!(!p.intr());
        assert_eq!(p.read(0x21), 0xff);
        p.write(0x21, 0xf7);
        assert_eq!(p.ack(), Some(0x23));
    }
}
