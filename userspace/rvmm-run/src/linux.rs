// SPDX-License-Identifier: GPL-2.0

//! The Linux x86 boot protocol (Documentation/arch/x86/boot.rst), 64-bit entry: a bzImage's
//! protected-mode kernel loaded at its preferred address, the "zero page" (boot_params)
//! with the setup header, the command line, the initrd and the platform's e820 map, and
//! the CPU in long mode on an identity map with the GDT the protocol asks for (__BOOT_CS
//! 0x10, __BOOT_DS 0x18), RSI pointing at boot_params.

use rvmm::guest::GuestMem;
use rvmm::uapi::{Regs, Sregs};

/// Where boot_params, the command line and the kernel's GDT go.
pub const ZERO_PAGE: u64 = 0x7000;
const CMDLINE: u64 = 0x2_0000;
const GDT: u64 = 0x800;

fn u16_at(d: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([d[o], d[o + 1]])
}

fn u32_at(d: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(d[o..o + 4].try_into().unwrap())
}

/// Whether `data` is a bzImage (the setup header's "HdrS").
pub fn is_bzimage(data: &[u8]) -> bool {
    data.len() > 0x264 && &data[0x202..0x206] == b"HdrS"
}

/// Loads the bzImage `data`, `cmdline` and `initrd`; returns the entry state.
pub fn load(
    mem: &mut GuestMem,
    data: &[u8],
    cmdline: &str,
    initrd: Option<&[u8]>,
    acpi_rsdp: u64,
) -> Result<(Regs, Sregs), String> {
    let version = u16_at(data, 0x206);
    if version < 0x020c {
        return Err(format!(
            "boot protocol {}.{:02} is too old: 64-bit entry needs 2.12",
            version >> 8,
            version & 0xff
        ));
    }
    if u16_at(data, 0x236) & 1 == 0 {
        return Err("the kernel has no 64-bit entry point (XLF_KERNEL_64)".into());
    }
    let setup_sects = match data[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let kernel_off = (setup_sects + 1) * 512;
    let kernel = data
        .get(kernel_off..)
        .ok_or("the file ends inside the setup code")?;
    let load_at = u64::from_le_bytes(data[0x258..0x260].try_into().unwrap());
    let init_size = u64::from(u32_at(data, 0x260));
    let size = mem.size() as u64;
    if load_at + init_size.max(kernel.len() as u64) > size {
        return Err(format!(
            "the kernel needs memory up to {:#x} (loaded at {load_at:#x}, {init_size:#x} bytes \
             while it runs); give --mem {} or more",
            load_at + init_size,
            (load_at + init_size).div_ceil(1 << 20) + 16
        ));
    }
    mem.write(load_at, kernel)?;

    let mut zp = vec![0u8; 4096];
    let hdr_end = 0x202 + usize::from(data[0x201]);
    zp[0x1f1..hdr_end].copy_from_slice(&data[0x1f1..hdr_end]);
    zp[0x210] = 0xff; // type_of_loader: undefined
    zp[0x211] |= 0x01 | 0x80; // LOADED_HIGH, CAN_USE_HEAP
    zp[0x224..0x226].copy_from_slice(&0xfe00u16.to_le_bytes());
    let max_cmdline = u32_at(data, 0x238) as usize;
    if cmdline.len() > max_cmdline || cmdline.contains('\0') {
        return Err(format!(
            "the command line is longer than the kernel takes ({max_cmdline} bytes) or has a NUL"
        ));
    }
    mem.write(CMDLINE, cmdline.as_bytes())?;
    mem.write(CMDLINE + cmdline.len() as u64, &[0])?;
    zp[0x228..0x22c].copy_from_slice(&(CMDLINE as u32).to_le_bytes());
    if let Some(rd) = initrd {
        // As high as the kernel allows, page-aligned, above the kernel.
        let max = u64::from(u32_at(data, 0x22c)).min(size - 1);
        let at = (max + 1 - rd.len() as u64) & !0xfff;
        if rd.len() as u64 > max || at < load_at + init_size {
            return Err(format!(
                "the initrd ({} bytes) does not fit between the kernel and the end of memory \
                 or initrd_addr_max; give more --mem",
                rd.len()
            ));
        }
        mem.write(at, rd)?;
        zp[0x218..0x21c].copy_from_slice(&(at as u32).to_le_bytes());
        zp[0x21c..0x220].copy_from_slice(&(rd.len() as u32).to_le_bytes());
    }
    let map = crate::platform::e820(size);
    zp[0x1e8] = map.len() as u8;
    for (i, (base, len, kind)) in map.iter().enumerate() {
        let e = 0x2d0 + 20 * i;
        zp[e..e + 8].copy_from_slice(&base.to_le_bytes());
        zp[e + 8..e + 16].copy_from_slice(&len.to_le_bytes());
        zp[e + 16..e + 20].copy_from_slice(&kind.to_le_bytes());
    }
    if version >= 0x020e {
        zp[0x70..0x78].copy_from_slice(&acpi_rsdp.to_le_bytes());
    }
    mem.write(ZERO_PAGE, &zp)?;

    // Long mode on rvmm-run's identity map, with the GDT the protocol wants.
    let (mut regs, mut sregs) =
        rvmm::guest::setup(mem, rvmm::guest::EntryMode::Long, load_at + 0x200, 0)?;
    for (i, d) in [0u64, 0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff]
        .iter()
        .enumerate()
    {
        mem.write_u64(GDT + 8 * i as u64, *d)?;
    }
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.cs.selector = 0x10;
    for s in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.ss,
        &mut sregs.fs,
        &mut sregs.gs,
    ] {
        s.selector = 0x18;
    }
    regs.rsi = ZERO_PAGE;
    regs.rflags = 2;
    Ok((regs, sregs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(version: u16, xlf: u16) -> Vec<u8> {
        let mut d = vec![0u8; 0x2000];
        d[0x1f1] = 1;
        d[0x201] = 0x66;
        d[0x202..0x206].copy_from_slice(b"HdrS");
        d[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        d[0x236..0x238].copy_from_slice(&xlf.to_le_bytes());
        d[0x258..0x260].copy_from_slice(&0x20_0000u64.to_le_bytes());
        d[0x260..0x264].copy_from_slice(&0x10_0000u32.to_le_bytes());
        d[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        d[0x238..0x23c].copy_from_slice(&0x7ffu32.to_le_bytes());
        d
    }

    #[test]
    fn zero_page_and_entry() {
        let mut mem = GuestMem::new(8 << 20).unwrap();
        let d = fake(0x020f, 1);
        assert!(is_bzimage(&d));
        let (regs, sregs) =
            load(&mut mem, &d, "console=ttyS0", Some(&[7u8; 5000]), 0xe0000).unwrap();
        assert_eq!(regs.rip, 0x20_0200);
        assert_eq!(regs.rsi, ZERO_PAGE);
        assert_eq!((sregs.cs.selector, sregs.ds.selector), (0x10, 0x18));
        let mut zp = [0u8; 4096];
        mem.read(ZERO_PAGE, &mut zp).unwrap();
        assert_eq!(&zp[0x202..0x206], b"HdrS");
        assert_eq!(zp[0x210], 0xff);
        assert_eq!(u32_at(&zp, 0x228), CMDLINE as u32);
        let rd = u32_at(&zp, 0x218);
        assert_eq!(u32_at(&zp, 0x21c), 5000);
        assert_eq!(rd & 0xfff, 0);
        assert!(u64::from(rd) + 5000 <= 8 << 20);
        assert_eq!(zp[0x1e8], 4);
        assert_eq!(
            u64::from_le_bytes(zp[0x70..0x78].try_into().unwrap()),
            0xe0000
        );
        let mut c = [0u8; 14];
        mem.read(CMDLINE, &mut c).unwrap();
        assert_eq!(&c, b"console=ttyS0\0");
    }

    #[test]
    fn bad_kernels_are_refused() {
        let mut mem = GuestMem::new(8 << 20).unwrap();
        assert!(load(&mut mem, &fake(0x0206, 1), "", None, 0)
            .unwrap_err()
            .contains("too old"));
        assert!(load(&mut mem, &fake(0x020f, 0), "", None, 0)
            .unwrap_err()
            .contains("64-bit"));
        let mut small = GuestMem::new(2 << 20).unwrap();
        assert!(load(&mut small, &fake(0x020f, 1), "", None, 0)
            .unwrap_err()
            .contains("--mem"));
        assert!(!is_bzimage(&[0u8; 0x300]));
    }
}
