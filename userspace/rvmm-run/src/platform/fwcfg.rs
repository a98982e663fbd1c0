// SPDX-License-Identifier: GPL-2.0

//! QEMU's firmware configuration interface, traditional (port) form: a 16-bit item
//! selector written to 0x510 and the item's bytes read from 0x511. Items: the signature
//! "QEMU", the interface ID (no DMA), the RAM size, the CPU count, the file directory,
//! and files (`etc/e820`, `opt/rvmm/cmdline`).

pub const SELECTOR: u16 = 0x510;
pub const DATA: u16 = 0x511;

const SIGNATURE: u16 = 0x00;
const ID: u16 = 0x01;
const RAM_SIZE: u16 = 0x03;
const NB_CPUS: u16 = 0x05;
const MAX_CPUS: u16 = 0x0f;
const FILE_DIR: u16 = 0x19;
const FILE_FIRST: u16 = 0x20;

#[derive(Debug, Default)]
pub struct FwCfg {
    items: Vec<(u16, Vec<u8>)>,
    files: Vec<(String, u16)>,
    selected: u16,
    offset: usize,
}

impl FwCfg {
    pub fn new(ram: u64, cpus: u16) -> Self {
        let mut f = Self::default();
        f.items.push((SIGNATURE, b"QEMU".to_vec()));
        f.items.push((ID, 1u32.to_le_bytes().to_vec()));
        f.items.push((RAM_SIZE, ram.to_le_bytes().to_vec()));
        f.items.push((NB_CPUS, cpus.to_le_bytes().to_vec()));
        f.items.push((MAX_CPUS, cpus.to_le_bytes().to_vec()));
        f.items.push((FILE_DIR, 0u32.to_be_bytes().to_vec()));
        f
    }

    /// Adds a file (named at most 55 bytes).
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) {
        let sel = FILE_FIRST + self.files.len() as u16;
        self.files.push((name.to_owned(), sel));
        self.items.push((sel, data));
        let mut dir = (self.files.len() as u32).to_be_bytes().to_vec();
        for (n, s) in &self.files {
            let len = self
                .items
                .iter()
                .find(|(k, _)| k == s)
                .map_or(0, |(_, d)| d.len() as u32);
            dir.extend_from_slice(&len.to_be_bytes());
            dir.extend_from_slice(&s.to_be_bytes());
            dir.extend_from_slice(&0u16.to_be_bytes());
            let mut name = [0u8; 56];
            let b = n.as_bytes();
            name[..b.len().min(55)].copy_from_slice(&b[..b.len().min(55)]);
            dir.extend_from_slice(&name);
        }
        if let Some(d) = self.items.iter_mut().find(|(k, _)| *k == FILE_DIR) {
            d.1 = dir;
        }
    }

    pub fn write_selector(&mut self, v: u16) {
        self.selected = v;
        self.offset = 0;
    }

    /// The next byte of the selected item (0 past its end or for an unknown item).
    pub fn read_data(&mut self) -> u8 {
        let b = self
            .items
            .iter()
            .find(|(k, _)| *k == self.selected)
            .and_then(|(_, d)| d.get(self.offset).copied())
            .unwrap_or(0);
        self.offset += 1;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(f: &mut FwCfg, sel: u16, n: usize) -> Vec<u8> {
        f.write_selector(sel);
        (0..n).map(|_| f.read_data()).collect()
    }

    #[test]
    fn standard_items_and_files() {
        let mut f = FwCfg::new(64 << 20, 2);
        f.add_file("etc/e820", vec![1, 2, 3]);
        f.add_file("opt/rvmm/cmdline", b"hi\0".to_vec());
        assert_eq!(read(&mut f, SIGNATURE, 4), b"QEMU");
        assert_eq!(read(&mut f, ID, 4), [1, 0, 0, 0]);
        assert_eq!(read(&mut f, RAM_SIZE, 8), (64u64 << 20).to_le_bytes());
        assert_eq!(read(&mut f, NB_CPUS, 2), [2, 0]);
        let dir = read(&mut f, FILE_DIR, 4 + 2 * 64);
        assert_eq!(&dir[..4], &[0, 0, 0, 2]);
        assert_eq!(&dir[4..8], &[0, 0, 0, 3]);
        assert_eq!(&dir[8..10], &[0, 0x20]);
        assert_eq!(&dir[12..20], b"etc/e820");
        assert_eq!(&dir[68 + 4..68 + 6], &[0, 0x21]);
        assert_eq!(read(&mut f, 0x21, 4), [b'h', b'i', 0, 0]);
        assert_eq!(read(&mut f, 0x1234, 2), [0, 0]);
    }
}
