// SPDX-License-Identifier: GPL-2.0

//! The CMOS RAM and real-time clock (ports 0x70/0x71): the time (BCD, 24-hour, from the
//! host's clock in UTC), status registers A-D, and the memory-size bytes PC firmware
//! keeps there (base, extended, and above 16 MiB in 64-KiB units).

#[derive(Debug)]
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
}

fn bcd(v: u64) -> u8 {
    ((v / 10) << 4 | (v % 10)) as u8
}

/// Days since 1970-01-01 to (year, month, day) (proleptic Gregorian).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl Cmos {
    /// A CMOS for `mem` bytes of guest RAM.
    pub fn new(mem: u64) -> Self {
        let mut ram = [0u8; 128];
        ram[0x0a] = 0x26; // 32.768 kHz time base, 1024 Hz rate
        ram[0x0b] = 0x02; // 24-hour, BCD
        ram[0x0d] = 0x80; // battery good
                          // Base memory 640 KiB; extended memory 1-64 MiB in KiB; above 16 MiB in 64 KiB.
        ram[0x15] = 0x80;
        ram[0x16] = 0x02;
        let ext_kib = (mem.saturating_sub(1 << 20) >> 10).min(0xfc00);
        ram[0x17] = ext_kib as u8;
        ram[0x18] = (ext_kib >> 8) as u8;
        ram[0x30] = ram[0x17];
        ram[0x31] = ram[0x18];
        let above16 = (mem.saturating_sub(16 << 20) >> 16).min(0xffff);
        ram[0x34] = above16 as u8;
        ram[0x35] = (above16 >> 8) as u8;
        ram[0x32] = 0x20; // century (BCD)
        Self { index: 0, ram }
    }

    /// A CMOS holding `ram` (what it held before a reset: a reset keeps it).
    pub fn with_ram(ram: [u8; 128]) -> Self {
        Self { index: 0, ram }
    }

    /// What it holds now.
    pub fn ram(&self) -> [u8; 128] {
        self.ram
    }

    /// Port 0x70 (index; bit 7 is NMI disable) or 0x71 (data) written.
    pub fn write(&mut self, port: u16, v: u8) {
        if port == 0x70 {
            self.index = v & 0x7f;
        } else {
            match self.index {
                0x0a => self.ram[0x0a] = v & 0x7f, // UIP is read-only
                0x0c | 0x0d => {}
                i => self.ram[usize::from(i)] = v,
            }
        }
    }

    /// Port 0x71 read; the clock registers read the host's time (`unix_secs`).
    pub fn read(&mut self, port: u16, unix_secs: u64) -> u8 {
        if port == 0x70 {
            return 0xff;
        }
        let binary = self.ram[0x0b] & 4 != 0;
        let enc = |v: u64| if binary { v as u8 } else { bcd(v) };
        let (y, mo, d) = civil((unix_secs / 86_400) as i64);
        let secs = unix_secs % 86_400;
        match self.index {
            0x00 => enc(secs % 60),
            0x02 => enc(secs / 60 % 60),
            0x04 => enc(secs / 3600),
            0x06 => enc((unix_secs / 86_400 + 4) % 7 + 1),
            0x07 => enc(u64::from(d)),
            0x08 => enc(u64::from(mo)),
            0x09 => enc((y % 100) as u64),
            0x32 => enc((y / 100) as u64),
            0x0c => {
                let v = self.ram[0x0c];
                self.ram[0x0c] = 0;
                v
            }
            i => self.ram[usize::from(i)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_in_bcd() {
        let mut c = Cmos::new(64 << 20);
        // 2026-12-02 10:56:24 UTC, a Wednesday
        let t = 1_796_208_984;
        let mut rd = |i: u8| {
            c.write(0x70, i);
            c.read(0x71, t)
        };
        assert_eq!(
            [rd(0), rd(2), rd(4), rd(7), rd(8), rd(9), rd(0x32)],
            [0x24, 0x56, 0x10, 0x02, 0x12, 0x26, 0x20]
        );
        assert_eq!(rd(0x0d), 0x80);
        assert_eq!(rd(6), 4, "day of week, Sunday = 1");
    }

    #[test]
    fn memory_sizes() {
        let mut c = Cmos::new(64 << 20);
        let mut rd = |i: u8| {
            c.write(0x70, i | 0x80);
            c.read(0x71, 0)
        };
        assert_eq!(u16::from(rd(0x15)) | u16::from(rd(0x16)) << 8, 640);
        assert_eq!(u16::from(rd(0x17)) | u16::from(rd(0x18)) << 8, 63 * 1024);
        assert_eq!(u16::from(rd(0x34)) | u16::from(rd(0x35)) << 8, 48 * 16);
    }

    #[test]
    fn nvram_and_binary_mode() {
        let mut c = Cmos::new(16 << 20);
        c.write(0x70, 0x40);
        c.write(0x71, 0x5a);
        assert_eq!(c.read(0x71, 0), 0x5a);
        c.write(0x70, 0x0b);
        c.write(0x71, 0x06);
        c.write(0x70, 0x04);
        assert_eq!(c.read(0x71, 13 * 3600), 13);
    }
}
