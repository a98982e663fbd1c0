// SPDX-License-Identifier: GPL-2.0

//! Multiboot (version 1) images, loaded the way QEMU's -kernel loads them: a header in
//! the first 8 KiB; the image placed by the header's address fields (flag 16) or else by
//! its ELF program headers (ELF32 containers of 64-bit code included); modules after the
//! image, page-aligned; the multiboot information at 0x9000 with the memory sizes, a
//! memory map, the command line (the image path, then the `--append` text) and the
//! modules; entry in 32-bit protected mode, paging off, EAX = 0x2BADB002, EBX = the
//! information's address.

use std::path::{Path, PathBuf};

use rvmm::guest::GuestMem;

/// The header's magic.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// What EAX holds at entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// Where the multiboot information goes (as QEMU places it).
pub const MBI: u64 = 0x9000;
const CMDLINE: u64 = MBI + 0x100;
const MMAP: u64 = MBI + 0x400;
const MODS: u64 = MBI + 0x600;
const MOD_STRINGS: u64 = MBI + 0x800;

/// A multiboot header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Its offset in the file.
    pub offset: usize,
    pub flags: u32,
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

fn u32_at(d: &[u8], o: usize) -> Option<u32> {
    d.get(o..o + 4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
}

/// The multiboot header of `data`, if it has one (4-byte aligned, in the first 8 KiB);
/// an error for a header whose checksum is wrong.
pub fn find_header(data: &[u8]) -> Option<Result<Header, String>> {
    let end = data.len().min(8192);
    (0..end.saturating_sub(11)).step_by(4).find_map(|o| {
        if u32_at(data, o)? != HEADER_MAGIC {
            return None;
        }
        let flags = u32_at(data, o + 4)?;
        let sum = u32_at(data, o + 8)?;
        if HEADER_MAGIC.wrapping_add(flags).wrapping_add(sum) != 0 {
            return Some(Err(format!(
                "multiboot header at offset {o:#x}: bad checksum {sum:#x}"
            )));
        }
        let field = |k: usize| u32_at(data, o + 12 + 4 * k).unwrap_or(0);
        Some(Ok(Header {
            offset: o,
            flags,
            header_addr: field(0),
            load_addr: field(1),
            load_end_addr: field(2),
            bss_end_addr: field(3),
            entry_addr: field(4),
        }))
    })
}

/// Loads a multiboot image and its modules and writes the multiboot information.
/// Returns the entry point.
pub fn load(
    mem: &mut GuestMem,
    data: &[u8],
    h: &Header,
    image: &Path,
    append: Option<&str>,
    modules: &[PathBuf],
) -> Result<u64, String> {
    let size = mem.size() as u64;
    let (entry, image_end) = if h.flags & (1 << 16) != 0 {
        // The header's address fields: the file from (header - (header_addr - load_addr)).
        let start = (h.offset as u64)
            .checked_sub(u64::from(h.header_addr.wrapping_sub(h.load_addr)))
            .ok_or("multiboot header: load_addr above header_addr")?;
        let len = if h.load_end_addr == 0 {
            data.len() as u64 - start
        } else {
            u64::from(h.load_end_addr.wrapping_sub(h.load_addr))
        };
        let bytes = data
            .get(start as usize..(start + len) as usize)
            .ok_or("multiboot header: the load range lies beyond the end of the file")?;
        let at = u64::from(h.load_addr);
        if at + len > size {
            return Err(format!(
                "multiboot image [{at:#x}, {:#x}) lies beyond guest memory ({size:#x})",
                at + len
            ));
        }
        mem.write(at, bytes)?;
        let mut end = at + len;
        if h.bss_end_addr != 0 {
            let bss_end = u64::from(h.bss_end_addr);
            if bss_end > size || bss_end < end {
                return Err(format!("multiboot header: bad bss_end_addr {bss_end:#x}"));
            }
            mem.write(end, &vec![0u8; (bss_end - end) as usize])?;
            end = bss_end;
        }
        (u64::from(h.entry_addr), end)
    } else {
        if !data.starts_with(b"\x7fELF") {
            return Err("multiboot image: neither address fields (flag 16) nor an ELF file".into());
        }
        let (entry, ranges) = crate::run::load_elf_ranges(mem, data)?;
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[i + 1..] {
                if a.0 < b.1 && b.0 < a.1 {
                    return Err(format!(
                        "multiboot image: segments [{:#x}, {:#x}) and [{:#x}, {:#x}) overlap",
                        a.0, a.1, b.0, b.1
                    ));
                }
            }
        }
        (entry, ranges.iter().map(|r| r.1).max().unwrap_or(0))
    };
    // Command line: the image path first (argv[0], as QEMU passes it).
    let mut cmdline = image.display().to_string();
    if let Some(a) = append {
        cmdline.push(' ');
        cmdline.push_str(a);
    }
    if cmdline.len() >= 0x300 || cmdline.contains('\0') {
        return Err("multiboot command line: at most 767 bytes, no NUL".into());
    }
    mem.write(CMDLINE, cmdline.as_bytes())?;
    mem.write(CMDLINE + cmdline.len() as u64, &[0])?;
    // Modules, page-aligned after the image.
    let mut at = image_end.max(0x10_0000).next_multiple_of(4096);
    let mut strings = MOD_STRINGS;
    for (i, m) in modules.iter().enumerate() {
        let bytes = std::fs::read(m).map_err(|e| format!("module {}: {e}", m.display()))?;
        let end = at + bytes.len() as u64;
        if end > size {
            return Err(format!(
                "module {} ({} bytes) does not fit in guest memory",
                m.display(),
                bytes.len()
            ));
        }
        mem.write(at, &bytes)?;
        let name = m.display().to_string();
        if strings + name.len() as u64 + 1 > MBI + 0x1000 {
            return Err("multiboot modules: their names take more than 2 KiB".into());
        }
        mem.write(strings, name.as_bytes())?;
        mem.write(strings + name.len() as u64, &[0])?;
        let entry = MODS + 16 * i as u64;
        for (k, v) in [at as u32, end as u32, strings as u32, 0]
            .iter()
            .enumerate()
        {
            mem.write(entry + 4 * k as u64, &v.to_le_bytes())?;
        }
        strings += name.len() as u64 + 1;
        at = end.next_multiple_of(4096);
    }
    if modules.len() > 32 {
        return Err("at most 32 multiboot modules".into());
    }
    // Memory map: the platform's e820 map (low RAM, the EBDA, the BIOS area with the
    // ACPI tables, RAM from 1 MiB).
    let map = crate::platform::e820(size);
    for (k, (base, len, kind)) in map.iter().enumerate() {
        let e = MMAP + 24 * k as u64;
        mem.write(e, &20u32.to_le_bytes())?;
        mem.write(e + 4, &base.to_le_bytes())?;
        mem.write(e + 12, &len.to_le_bytes())?;
        mem.write(e + 20, &kind.to_le_bytes())?;
    }
    // The information block: memory (0), command line (2), modules (3), memory map (6).
    let fields: [(u64, u32); 8] = [
        (0, 1 | (1 << 2) | (1 << 3) | (1 << 6)),
        (4, 639),
        (8, ((size - 0x10_0000) / 1024) as u32),
        (16, CMDLINE as u32),
        (20, modules.len() as u32),
        (24, MODS as u32),
        (44, 24 * map.len() as u32),
        (48, MMAP as u32),
    ];
    for (off, v) in fields {
        mem.write(MBI + off, &v.to_le_bytes())?;
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u32) -> Vec<u8> {
        let mut d = vec![0u8; 64];
        d[16..20].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        d[20..24].copy_from_slice(&flags.to_le_bytes());
        d[24..28]
            .copy_from_slice(&(0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)).to_le_bytes());
        d
    }

    #[test]
    fn finds_the_header_and_checks_its_checksum() {
        let d = header(3);
        let h = find_header(&d).unwrap().unwrap();
        assert_eq!((h.offset, h.flags), (16, 3));
        let mut bad = d.clone();
        bad[24] ^= 1;
        assert!(find_header(&bad).unwrap().is_err());
        assert!(find_header(&[0u8; 100]).is_none());
    }

    #[test]
    fn address_fields_load_and_the_information_block() {
        // Header at offset 16 of a 4-KiB file loaded at 1 MiB: header_addr = 1 MiB + 16.
        let mut d = header(1 << 16);
        d.resize(4096, 0x90);
        let f = |k: usize, v: u32, d: &mut Vec<u8>| {
            d[28 + 4 * k..32 + 4 * k].copy_from_slice(&v.to_le_bytes())
        };
        f(0, 0x10_0010, &mut d);
        f(1, 0x10_0000, &mut d);
        f(2, 0, &mut d);
        f(3, 0x10_2000, &mut d);
        f(4, 0x10_0040, &mut d);
        let h = find_header(&d).unwrap().unwrap();
        let mut mem = GuestMem::new(4 << 20).unwrap();
        let module = std::env::temp_dir().join("rvmm-mb-module");
        std::fs::write(&module, b"module text").unwrap();
        let entry = load(
            &mut mem,
            &d,
            &h,
            Path::new("/boot/k.elf"),
            Some("a=1"),
            std::slice::from_ref(&module),
        )
        .unwrap();
        assert_eq!(entry, 0x10_0040);
        let rd = |mem: &GuestMem, a: u64, n: usize| {
            let mut b = vec![0u8; n];
            mem.read(a, &mut b).unwrap();
            b
        };
        let rd32 = |mem: &GuestMem, a: u64| u32::from_le_bytes(rd(mem, a, 4).try_into().unwrap());
        assert_eq!(rd32(&mem, 0x10_0000 + 16), HEADER_MAGIC);
        assert_eq!(rd32(&mem, 0x10_0ffc), 0x9090_9090);
        assert_eq!(rd32(&mem, 0x10_1000), 0, "bss zeroed up to bss_end");
        assert_eq!(rd32(&mem, MBI + 8), (3 << 20) / 1024);
        assert_eq!(rd(&mem, CMDLINE, 15), b"/boot/k.elf a=1");
        // The module after the bss, page-aligned.
        assert_eq!(rd32(&mem, MBI + 20), 1);
        assert_eq!(rd32(&mem, MODS), 0x10_2000);
        assert_eq!(rd(&mem, 0x10_2000, 11), b"module text");
        // Too much: beyond guest memory.
        f(3, 0x50_0000, &mut d);
        let h = find_header(&d).unwrap().unwrap();
        assert!(load(&mut mem, &d, &h, Path::new("k"), None, &[]).is_err());
        // Neither address fields nor ELF.
        let plain = header(3);
        let h = find_header(&plain).unwrap().unwrap();
        assert!(load(&mut mem, &plain, &h, Path::new("k"), None, &[])
            .unwrap_err()
            .contains("neither"));
    }
}
