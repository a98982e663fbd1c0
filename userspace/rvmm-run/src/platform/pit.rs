// SPDX-License-Identifier: GPL-2.0

//! The 8254 programmable interval timer (ports 0x40-0x43, and port 0x61's gate and
//! output bits of channel 2), counting at 1.193182 MHz of host monotonic time.
//! Channel 0 drives IRQ 0: the platform asks [`Pit::next_irq0`] when its next rising
//! edge is due and raises the line then.

/// The PIT's input clock.
pub const PIT_HZ: u64 = 1_193_182;

#[derive(Clone, Copy, Debug, Default)]
struct Channel {
    /// Operating mode 0-5.
    mode: u8,
    /// Access: 1 low byte, 2 high byte, 3 low then high.
    access: u8,
    /// The count loaded (0 = 65536).
    reload: u32,
    /// When counting started (ns), if it did.
    start: Option<u64>,
    /// Gate input (channels 0 and 1: always high; channel 2: port 0x61 bit 0).
    gate: bool,
    /// A latched count, and whether its high byte is next.
    latch: Option<u16>,
    latch_hi: bool,
    /// Reading a 16-bit count: the high byte is next.
    read_hi: bool,
    /// Writing a 16-bit count: the low byte written so far.
    write_lo: Option<u8>,
}

/// The 8254.
#[derive(Debug)]
pub struct Pit {
    ch: [Channel; 3],
    /// Port 0x61 bit 1 (speaker data enable), kept for reads.
    speaker: bool,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

fn ticks(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PIT_HZ) / 1_000_000_000) as u64
}

fn ns_of(ticks: u64) -> u64 {
    // Rounded up: the tick has happened by then.
    (u128::from(ticks) * 1_000_000_000).div_ceil(u128::from(PIT_HZ)) as u64
}

impl Pit {
    pub fn new() -> Self {
        let mut ch = [Channel::default(); 3];
        for c in ch.iter_mut().take(2) {
            c.gate = true;
        }
        Self { ch, speaker: false }
    }

    fn period(c: &Channel) -> u64 {
        if c.reload == 0 {
            65536
        } else {
            u64::from(c.reload)
        }
    }

    /// The count of channel `i` at `now`.
    fn count(&self, i: usize, now: u64) -> u16 {
        let c = &self.ch[i];
        let Some(start) = c.start else {
            return c.reload as u16;
        };
        let t = ticks(now.saturating_sub(start));
        let p = Self::period(c);
        let v = match c.mode {
            // Counts down once, then wraps (the count keeps going from 0xffff).
            0 | 1 | 4 | 5 => (p.wrapping_sub(t)) & 0xffff,
            // Square wave counts by two, twice a period.
            3 => (p - (2 * t) % p) & 0xffff,
            _ => p - t % p,
        };
        v as u16
    }

    /// The output of channel `i` at `now`.
    fn out(&self, i: usize, now: u64) -> bool {
        let c = &self.ch[i];
        let Some(start) = c.start else {
            return c.mode != 0;
        };
        let t = ticks(now.saturating_sub(start));
        let p = Self::period(c);
        match c.mode {
            0 | 1 => t >= p,
            2 => t % p != p - 1,
            3 => t % p < p.div_ceil(2),
            _ => t != p,
        }
    }

    /// An I/O write to ports 0x40-0x43.
    pub fn write(&mut self, port: u16, v: u8, now: u64) {
        match port {
            0x43 => {
                let sel = usize::from(v >> 6);
                if sel == 3 {
                    // Read-back: latch the counts of the selected channels.
                    for i in 0..3 {
                        if v & (2 << i) != 0 && v & 0x20 == 0 {
                            let cnt = self.count(i, now);
                            self.ch[i].latch = Some(cnt);
                            self.ch[i].latch_hi = false;
                        }
                    }
                    return;
                }
                let access = (v >> 4) & 3;
                if access == 0 {
                    let cnt = self.count(sel, now);
                    let c = &mut self.ch[sel];
                    if c.latch.is_none() {
                        c.latch = Some(cnt);
                        c.latch_hi = false;
                    }
                    return;
                }
                let c = &mut self.ch[sel];
                c.access = access;
                c.mode = match (v >> 1) & 7 {
                    6 => 2,
                    7 => 3,
                    m => m,
                };
                c.start = None;
                c.read_hi = false;
                c.write_lo = None;
                c.latch = None;
            }
            0x40..=0x42 => {
                let i = usize::from(port - 0x40);
                let c = &mut self.ch[i];
                let loaded = match c.access {
                    1 => Some(u32::from(v)),
                    2 => Some(u32::from(v) << 8),
                    _ => match c.write_lo.take() {
                        None => {
                            c.write_lo = Some(v);
                            None
                        }
                        Some(lo) => Some(u32::from(lo) | u32::from(v) << 8),
                    },
                };
                if let Some(r) = loaded {
                    c.reload = r;
                    if c.gate {
                        c.start = Some(now);
                    }
                }
            }
            _ => {}
        }
    }

    /// An I/O read of ports 0x40-0x42.
    pub fn read(&mut self, port: u16, now: u64) -> u8 {
        let i = usize::from(port.wrapping_sub(0x40));
        if i > 2 {
            return 0xff;
        }
        if let Some(l) = self.ch[i].latch {
            let c = &mut self.ch[i];
            let byte = match c.access {
                1 => {
                    c.latch = None;
                    l as u8
                }
                2 => {
                    c.latch = None;
                    (l >> 8) as u8
                }
                _ => {
                    if c.latch_hi {
                        c.latch = None;
                        c.latch_hi = false;
                        (l >> 8) as u8
                    } else {
                        c.latch_hi = true;
                        l as u8
                    }
                }
            };
            return byte;
        }
        let cnt = self.count(i, now);
        let c = &mut self.ch[i];
        match c.access {
            1 => cnt as u8,
            2 => (cnt >> 8) as u8,
            _ => {
                c.read_hi = !c.read_hi;
                if c.read_hi {
                    cnt as u8
                } else {
                    (cnt >> 8) as u8
                }
            }
        }
    }

    /// Port 0x61 read: bit 0 gate 2, bit 1 speaker, bit 4 refresh toggle (every 15 us),
    /// bit 5 channel 2's output.
    pub fn read_61(&self, now: u64) -> u8 {
        let refresh = (now / 15_000) & 1 == 1;
        u8::from(self.ch[2].gate)
            | u8::from(self.speaker) << 1
            | u8::from(refresh) << 4
            | u8::from(self.out(2, now)) << 5
    }

    /// Port 0x61 write: gate 2 (a rising edge restarts modes 1, 2, 3 and 5), speaker.
    pub fn write_61(&mut self, v: u8, now: u64) {
        let gate = v & 1 != 0;
        let c = &mut self.ch[2];
        if gate && !c.gate && (c.start.is_some() || c.mode != 0) {
            c.start = Some(now);
        }
        if gate && c.start.is_none() && c.reload != 0 {
            c.start = Some(now);
        }
        c.gate = gate;
        self.speaker = v & 2 != 0;
    }

    /// When channel 0's output next rises after `now` (IRQ 0), if it will.
    pub fn next_irq0(&self, now: u64) -> Option<u64> {
        let c = &self.ch[0];
        let start = c.start?;
        let p = Self::period(c);
        let t = ticks(now.saturating_sub(start));
        match c.mode {
            0 | 1 | 4 | 5 => (t < p).then(|| start + ns_of(p)),
            // Rate generator and square wave: a rising edge at each period's start.
            _ => Some(start + ns_of((t / p + 1) * p)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(p: &mut Pit, ch: u8, mode: u8, count: u16, now: u64) {
        p.write(0x43, ch << 6 | 0x30 | mode << 1, now);
        p.write(0x40 + u16::from(ch), count as u8, now);
        p.write(0x40 + u16::from(ch), (count >> 8) as u8, now);
    }

    #[test]
    fn rate_generator_irq_times() {
        let mut p = Pit::new();
        // 1193 ticks: ~1 ms.
        program(&mut p, 0, 2, 1193, 1000);
        let first = p.next_irq0(1000).unwrap();
        assert!((first - 1000).abs_diff(999_847) <= 1, "{first}");
        let second = p.next_irq0(first).unwrap();
        assert!((second - first).abs_diff(999_847) <= 1);
        assert_eq!(p.next_irq0(first - 1), Some(first));
    }

    #[test]
    fn one_shot_mode0() {
        let mut p = Pit::new();
        program(&mut p, 0, 0, 100, 0);
        let t = p.next_irq0(0).unwrap();
        assert_eq!(t, ns_of(100));
        assert_eq!(p.next_irq0(t + 1), None);
    }

    #[test]
    fn counts_down_and_latches() {
        let mut p = Pit::new();
        program(&mut p, 0, 2, 10000, 0);
        let now = ns_of(1000);
        p.write(0x43, 0x00, now); // latch channel 0
        let lo = p.read(0x40, now + 5_000_000);
        let hi = p.read(0x40, now + 5_000_000);
        assert_eq!(u16::from(lo) | u16::from(hi) << 8, 9000);
        // Unlatched reads follow time.
        let lo = p.read(0x40, ns_of(2500));
        let hi = p.read(0x40, ns_of(2500));
        assert_eq!(u16::from(lo) | u16::from(hi) << 8, 7500);
    }

    #[test]
    fn channel2_gate_and_output_on_port61() {
        let mut p = Pit::new();
        // Linux's PIT calibration: gate high, mode 0, count 0xffff, poll bit 5.
        p.write_61(0, 0);
        program(&mut p, 2, 0, 0xffff, 0);
        p.write_61(1, 100);
        assert_eq!(p.read_61(200) & 0x21, 0x01);
        assert_eq!(p.read_61(100 + ns_of(0xffff)) & 0x20, 0x20);
    }

    #[test]
    fn no_irq_before_programming() {
        let p = Pit::new();
        assert_eq!(p.next_irq0(0), None);
    }
}
