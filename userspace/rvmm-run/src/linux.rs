// SPDX-License-Identifier: GPL-2.0

//! The Linux x86 boot protocol (Documentation/arch/x86/boot.rst), 64-bit entry: a bzImage's
//! protected-mode kernel loaded at its preferred address, the "zero page" (boot_params)
//! with the setup header, the command line, the initrd and the platform's e820 map, and
//! the CPU in long mode on an identity map with the GDT the protocol asks for (__BOOT_CS
//! 0x10, __BOOT_DS 0x18), RSI pointing at boot_params.
//!
//! The zero page's layout comes from rust-vmm's `linux-loader` (`boot_params`,
//! `setup_header`, `boot_e820_entry`, with their `ByteValued` byte views), and the command
//! line is checked with its `Cmdline` builder. The kernel goes into guest memory with
//! `GuestMem::write`: linux-loader's own `BzImage` loader wants a vm-memory `GuestMemory`,
//! which `GuestMem` is not.

use linux_loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, CAN_USE_HEAP, E820_MAX_ENTRIES_ZEROPAGE,
    LOADED_HIGH, XLF_KERNEL_64,
};
use linux_loader::cmdline::{Cmdline, Error as CmdlineError};
use rvmm::guest::GuestMem;
use rvmm::uapi::{Regs, Sregs};
use vm_memory::ByteValued;

/// Where boot_params, the command line and the kernel's GDT go.
pub const ZERO_PAGE: u64 = 0x7000;
const CMDLINE: u64 = 0x2_0000;
const GDT: u64 = 0x800;

/// Where the setup header starts, in the image and in boot_params.
const HDR_OFFSET: usize = 0x1f1;
/// "HdrS", the setup header's magic (`header`).
const HDR_MAGIC: u32 = u32::from_le_bytes(*b"HdrS");
/// The first boot protocol with the 64-bit entry point (and `xloadflags`).
const MIN_VERSION: u16 = 0x020c;
/// The first boot protocol with `acpi_rsdp_addr`.
const ACPI_RSDP_VERSION: u16 = 0x020e;
/// `type_of_loader` for a boot loader without an assigned id.
const LOADER_UNDEFINED: u8 = 0xff;
/// `heap_end_ptr`: the end of the setup heap, relative to the start of the setup code.
const HEAP_END: u16 = 0xfe00;
const MIB: u64 = 1 << 20;

/// The setup header of `data` if it is a bzImage's ("HdrS"): the bytes from 0x1f1 to the
/// header's end (0x202 plus the jump's byte at 0x201) as far as `setup_header` goes; the
/// fields the image's protocol version does not have stay zero.
fn read_header(data: &[u8]) -> Option<setup_header> {
    let full = std::mem::size_of::<setup_header>();
    let end = (0x202 + usize::from(*data.get(0x201)?)).min(HDR_OFFSET + full);
    let mut hdr = setup_header::default();
    hdr.as_mut_slice()
        .get_mut(..end - HDR_OFFSET)?
        .copy_from_slice(data.get(HDR_OFFSET..end)?);
    (hdr.header == HDR_MAGIC).then_some(hdr)
}

/// Whether `data` is a bzImage (the setup header's "HdrS").
pub fn is_bzimage(data: &[u8]) -> bool {
    read_header(data).is_some()
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

/// The command line as the kernel gets it, NUL-terminated, within `cmdline_size`.
fn build_cmdline(cmdline: &str, cmdline_size: u32) -> Result<Vec<u8>, String> {
    let max = cmdline_size as usize;
    // The capacity counts the terminating NUL; cmdline_size does not.
    let mut cl = Cmdline::new(max + 1).map_err(|e| format!("the command line: {e}"))?;
    cl.insert_str(cmdline).map_err(|e| match e {
        CmdlineError::TooLarge => format!(
            "the command line is too long: {} bytes, the kernel takes at most {max} \
             (cmdline_size)",
            cmdline.trim().len()
        ),
        CmdlineError::InvalidAscii => {
            "the command line has a byte that is not printable ASCII (a NUL, a control \
             character or non-ASCII text)"
                .into()
        }
        e => format!("the command line: {e}"),
    })?;
    let c = cl
        .as_cstring()
        .map_err(|e| format!("the command line: {e}"))?;
    Ok(c.into_bytes_with_nul())
}

/// Loads the bzImage `data`, `cmdline` and `initrd`; returns the entry state.
pub fn load(
    mem: &mut GuestMem,
    data: &[u8],
    cmdline: &str,
    initrd: Option<&[u8]>,
    acpi_rsdp: u64,
) -> Result<(Regs, Sregs), String> {
    let hdr = read_header(data).ok_or("not a bzImage: no \"HdrS\" setup header at 0x202")?;
    // Copies of the packed struct's fields (no references into it).
    let version = hdr.version;
    if version < MIN_VERSION {
        return Err(format!(
            "boot protocol {}.{:02} is too old: 64-bit entry needs 2.12",
            version >> 8,
            version & 0xff
        ));
    }
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err("the kernel has no 64-bit entry point (XLF_KERNEL_64)".into());
    }
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => usize::from(n),
    };
    let kernel_off = (setup_sects + 1) * 512;
    let kernel = data
        .get(kernel_off..)
        .ok_or("the file ends inside the setup code")?;
    let load_at = hdr.pref_address;
    let init_size = u64::from(hdr.init_size);
    let size = mem.size() as u64;
    // The kernel runs in [load_at, kernel_end): init_size covers its decompression.
    let kernel_end = load_at
        .checked_add(init_size.max(kernel.len() as u64))
        .ok_or_else(|| format!("the kernel's load address {load_at:#x} is out of range"))?;
    if kernel_end > size {
        return Err(format!(
            "the kernel does not fit in {} MiB of guest memory: it needs memory up to {} MiB \
             (loaded at {load_at:#x}, {} MiB while it runs); give --mem {} or more",
            size / MIB,
            mib(kernel_end),
            mib(init_size.max(kernel.len() as u64)),
            mib(kernel_end) + 16
        ));
    }
    let cmdline = build_cmdline(cmdline, hdr.cmdline_size)?;

    let mut bp = boot_params {
        hdr,
        ..Default::default()
    };
    bp.hdr.type_of_loader = LOADER_UNDEFINED;
    bp.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    bp.hdr.heap_end_ptr = HEAP_END;
    bp.hdr.cmd_line_ptr = CMDLINE as u32;
    if let Some(rd) = initrd {
        // As high as the kernel allows, page-aligned, above the kernel.
        let top = u64::from(hdr.initrd_addr_max).min(size - 1) + 1;
        let len = rd.len() as u64;
        let at = top.checked_sub(len).map(|a| a & !0xfff);
        let at = match at {
            Some(at) if at >= kernel_end => at,
            _ => {
                return Err(format!(
                    "the initrd ({} MiB) does not fit between the kernel (up to {} MiB) and \
                     the end of memory or initrd_addr_max ({} MiB); give more --mem",
                    mib(len),
                    mib(kernel_end),
                    mib(top)
                ))
            }
        };
        mem.write(at, rd)?;
        bp.hdr.ramdisk_image = at as u32;
        bp.hdr.ramdisk_size = len as u32;
    }
    let map = crate::platform::e820(size);
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(format!(
            "{} e820 entries do not fit the zero page",
            map.len()
        ));
    }
    for (e, &(addr, size, kind)) in bp.e820_table.iter_mut().zip(&map) {
        *e = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    bp.e820_entries = map.len() as u8;
    if version >= ACPI_RSDP_VERSION {
        bp.acpi_rsdp_addr = acpi_rsdp;
    }
    mem.write(load_at, kernel)?;
    mem.write(CMDLINE, &cmdline)?;
    mem.write(ZERO_PAGE, bp.as_slice())?;

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

    // Raw offsets from boot.rst, to check linux-loader's layout independently.
    fn u32_at(d: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(d[o..o + 4].try_into().unwrap())
    }

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
        assert_eq!(zp[0x211], LOADED_HIGH | CAN_USE_HEAP);
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
        // The last e820 entry (0x2d0 + 20 * 3): RAM from 1 MiB to the end.
        let e = &zp[0x2d0 + 60..0x2d0 + 80];
        assert_eq!(u64::from_le_bytes(e[..8].try_into().unwrap()), 0x10_0000);
        assert_eq!(
            u64::from_le_bytes(e[8..16].try_into().unwrap()),
            (8 << 20) - 0x10_0000
        );
        assert_eq!(u32_at(e, 16), 1);
        let mut c = [0u8; 14];
        mem.read(CMDLINE, &mut c).unwrap();
        assert_eq!(&c, b"console=ttyS0\0");
        let mut bytes = [0u8; 5000];
        mem.read(u64::from(rd), &mut bytes).unwrap();
        assert!(bytes.iter().all(|&b| b == 7));
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
        let e = load(&mut small, &fake(0x020f, 1), "", None, 0).unwrap_err();
        assert!(e.contains("--mem") && e.contains("MiB"), "{e}");
        assert!(!is_bzimage(&[0u8; 0x300]));
        assert!(load(&mut mem, &[0u8; 0x300], "", None, 0)
            .unwrap_err()
            .contains("not a bzImage"));
        // Too short to hold the setup header.
        let mut short = fake(0x020f, 1);
        short.truncate(0x260);
        assert!(!is_bzimage(&short));
    }

    #[test]
    fn command_line_limits() {
        let mut mem = GuestMem::new(8 << 20).unwrap();
        let mut d = fake(0x020f, 1);
        d[0x238..0x23c].copy_from_slice(&16u32.to_le_bytes());
        // Exactly cmdline_size bytes (plus the NUL) is allowed.
        load(&mut mem, &d, "console=ttyS0 ab", None, 0).unwrap();
        let mut c = [0u8; 17];
        mem.read(CMDLINE, &mut c).unwrap();
        assert_eq!(&c, b"console=ttyS0 ab\0");
        let e = load(&mut mem, &d, "console=ttyS0 abc", None, 0).unwrap_err();
        assert!(e.contains("too long") && e.contains("16"), "{e}");
        let e = load(&mut mem, &d, "a\0b", None, 0).unwrap_err();
        assert!(e.contains("printable"), "{e}");
    }

    #[test]
    fn initrd_must_fit() {
        let mut mem = GuestMem::new(8 << 20).unwrap();
        let d = fake(0x020f, 1);
        // Larger than all of memory, and larger than what is left above the kernel.
        for len in [9 << 20, 6 << 20] {
            let e = load(&mut mem, &d, "", Some(&vec![0u8; len]), 0).unwrap_err();
            assert!(e.contains("initrd"), "{e}");
        }
        // Below initrd_addr_max: 4 MiB - 1 puts it under 4 MiB.
        let mut low = fake(0x020f, 1);
        low[0x22c..0x230].copy_from_slice(&0x3f_ffffu32.to_le_bytes());
        load(&mut mem, &low, "", Some(&[1u8; 4096]), 0).unwrap();
        let mut zp = [0u8; 4096];
        mem.read(ZERO_PAGE, &mut zp).unwrap();
        assert_eq!(u32_at(&zp, 0x218), 0x3f_f000);
        // Protocol 2.12 has no acpi_rsdp_addr: it stays zero.
        load(&mut mem, &fake(0x020c, 1), "", None, 0xe0000).unwrap();
        mem.read(ZERO_PAGE, &mut zp).unwrap();
        assert_eq!(u64::from_le_bytes(zp[0x70..0x78].try_into().unwrap()), 0);
    }
}
