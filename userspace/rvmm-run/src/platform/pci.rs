// SPDX-License-Identifier: GPL-2.0

//! PCI configuration mechanism #1 (CONFIG_ADDRESS at 0xcf8, CONFIG_DATA at 0xcfc-0xcff)
//! with one device: a host bridge at 00:00.0 (Intel 440FX ids, class 06/00). Every other
//! function reads as absent (all ones).

#[derive(Debug, Default)]
pub struct PciConfig {
    address: u32,
}

const HOST_BRIDGE: [u32; 4] = [
    0x1237_8086, // device, vendor
    0x0000_0006, // status, command (memory + bus master)
    0x0600_0002, // class 06 (bridge) 00 (host), revision 2
    0x0000_0000, // header type 0
];

impl PciConfig {
    pub fn new() -> Self {
        Self::default()
    }

    fn dword(&self) -> u32 {
        let a = self.address;
        if a & (1 << 31) == 0 {
            return u32::MAX;
        }
        let (bus, dev, func, reg) = ((a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 7, a & 0xfc);
        if (bus, dev, func) != (0, 0, 0) {
            return u32::MAX;
        }
        HOST_BRIDGE.get((reg / 4) as usize).copied().unwrap_or(0)
    }

    /// A read of `size` bytes at `port`.
    pub fn read(&self, port: u16, size: u8) -> u32 {
        match port {
            0xcf8..=0xcfb if size == 4 && port == 0xcf8 => self.address,
            0xcfc..=0xcff => {
                let shift = 8 * u32::from(port - 0xcfc);
                let v = self.dword() >> shift;
                match size {
                    1 => v & 0xff,
                    2 => v & 0xffff,
                    _ => v,
                }
            }
            _ => u32::MAX,
        }
    }

    /// A write of `size` bytes at `port` (only the address register takes writes).
    pub fn write(&mut self, port: u16, size: u8, v: u32) {
        if port == 0xcf8 && size == 4 {
            self.address = v & 0x80ff_fffc;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bridge_and_absent_devices() {
        let mut p = PciConfig::new();
        p.write(0xcf8, 4, 0x8000_0000);
        assert_eq!(p.read(0xcf8, 4), 0x8000_0000);
        assert_eq!(p.read(0xcfc, 4), 0x1237_8086);
        assert_eq!(p.read(0xcfe, 2), 0x1237);
        p.write(0xcf8, 4, 0x8000_0008);
        assert_eq!(p.read(0xcff, 1), 0x06);
        p.write(0xcf8, 4, 0x8000_0800); // device 1
        assert_eq!(p.read(0xcfc, 4), u32::MAX);
        assert_eq!(p.read(0xcfc, 2), 0xffff);
        p.write(0xcf8, 4, 0x0000_0000); // disabled
        assert_eq!(p.read(0xcfc, 4), u32::MAX);
    }
}
