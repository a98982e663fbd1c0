// SPDX-License-Identifier: GPL-2.0

//! ACPI tables for the platform (ACPI 6.4): RSDP, RSDT and XSDT, FADT (with FACS), MADT
//! and a DSDT that only defines `\_S5` (so that an OS can power off through PM1a_CNT),
//! laid out from a base address in the BIOS area (0xe0000), where OSes look for the
//! RSDP.

/// The PM register block: PM1a event (status, enable), PM1a control, PM timer.
pub const PM1A_EVT: u16 = 0x600;
pub const PM1A_CNT: u16 = 0x604;
pub const PM_TMR: u16 = 0x608;
/// The SCI's ISA IRQ.
pub const SCI_IRQ: u8 = 9;
/// Sleep type \_S5 asks for (SLP_TYP in PM1a_CNT).
pub const S5_SLP_TYP: u16 = 5;

/// What the tables describe.
pub struct Config {
    /// APIC IDs of the vCPUs (the first is the BSP).
    pub cpus: u32,
    pub ioapic_id: u8,
    pub ioapic_addr: u32,
    /// An ACPI 6.4 multiprocessor wakeup mailbox, if the platform offers one.
    pub wakeup_mailbox: Option<u64>,
}

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, &x| a.wrapping_add(x)))
}

/// A table: the standard 36-byte header, then `body`; length and checksum filled in.
fn table(sig: &[u8; 4], rev: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(sig);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(rev);
    t.push(0);
    t.extend_from_slice(b"RVMM  ");
    t.extend_from_slice(b"RVMMPLAT");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"RVMM");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A generic address structure for a system I/O port.
fn gas_io(port: u16, bits: u8, access: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1;
    g[1] = bits;
    g[3] = access;
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// `Name (_S5, Package () { 5, 5, 0, 0 })`.
const DSDT_AML: [u8; 14] = [
    0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0x00, 0x00,
];

fn fadt(facs: u32, dsdt: u32) -> Vec<u8> {
    let mut b = vec![0u8; 276 - 36];
    let put32 = |b: &mut Vec<u8>, off: usize, v: u32| {
        b[off - 36..off - 32].copy_from_slice(&v.to_le_bytes())
    };
    put32(&mut b, 36, facs);
    put32(&mut b, 40, dsdt);
    b[46 - 36..48 - 36].copy_from_slice(&u16::from(SCI_IRQ).to_le_bytes());
    put32(&mut b, 56, PM1A_EVT.into());
    put32(&mut b, 64, PM1A_CNT.into());
    put32(&mut b, 76, PM_TMR.into());
    b[88 - 36] = 4; // PM1_EVT_LEN
    b[89 - 36] = 2; // PM1_CNT_LEN
    b[91 - 36] = 4; // PM_TMR_LEN
    b[96 - 36..98 - 36].copy_from_slice(&101u16.to_le_bytes()); // no C2
    b[98 - 36..100 - 36].copy_from_slice(&1001u16.to_le_bytes()); // no C3
    b[108 - 36] = 0x32; // CMOS century register
                        // IAPC_BOOT_ARCH: legacy devices; no 8042, no VGA.
    b[109 - 36..111 - 36].copy_from_slice(&(1u16 | 1 << 2).to_le_bytes());
    // WBINVD, PROC_C1, no power button, no sleep button (as fixed features).
    put32(&mut b, 112, 1 | 1 << 2 | 1 << 4 | 1 << 5);
    b[131 - 36] = 4; // FADT minor version: ACPI 6.4
    b[132 - 36..140 - 36].copy_from_slice(&u64::from(facs).to_le_bytes());
    b[140 - 36..148 - 36].copy_from_slice(&u64::from(dsdt).to_le_bytes());
    b[148 - 36..160 - 36].copy_from_slice(&gas_io(PM1A_EVT, 32, 2));
    b[172 - 36..184 - 36].copy_from_slice(&gas_io(PM1A_CNT, 16, 2));
    b[208 - 36..220 - 36].copy_from_slice(&gas_io(PM_TMR, 32, 3));
    b[268 - 36..276 - 36].copy_from_slice(b"RVMMRVMM");
    table(b"FACP", 6, &b)
}

fn madt(c: &Config) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0xfee0_0000u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: 8259s present
    for id in 0..c.cpus {
        b.extend_from_slice(&[0, 8, id as u8, id as u8]);
        b.extend_from_slice(&1u32.to_le_bytes());
    }
    b.extend_from_slice(&[1, 12, c.ioapic_id, 0]);
    b.extend_from_slice(&c.ioapic_addr.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    // ISA IRQ 0 is GSI 2 (the PIT on the I/O APIC, as on PCs); the SCI is level, low.
    b.extend_from_slice(&[2, 10, 0, 0]);
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&[2, 10, 0, SCI_IRQ]);
    b.extend_from_slice(&u32::from(SCI_IRQ).to_le_bytes());
    b.extend_from_slice(&0x000fu16.to_le_bytes());
    // LINT1 is NMI on every processor.
    b.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    if let Some(mb) = c.wakeup_mailbox {
        b.extend_from_slice(&[0x10, 16, 0, 0]);
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&mb.to_le_bytes());
    }
    table(b"APIC", 5, &b)
}

/// The tables, laid out at guest-physical `base` (16-byte aligned, below 4 GiB); the
/// RSDP comes first.
pub fn build(base: u32, c: &Config) -> Vec<u8> {
    let align = |v: &mut Vec<u8>| v.resize(v.len().next_multiple_of(16), 0);
    let mut out = vec![0u8; 48]; // RSDP (36 bytes), padded
    let facs_at = base + out.len() as u32;
    let mut facs = vec![0u8; 64];
    facs[0..4].copy_from_slice(b"FACS");
    facs[4..8].copy_from_slice(&64u32.to_le_bytes());
    facs[32] = 2; // version
    out.extend_from_slice(&facs);
    let dsdt_at = base + out.len() as u32;
    out.extend_from_slice(&table(b"DSDT", 2, &DSDT_AML));
    align(&mut out);
    let fadt_at = base + out.len() as u32;
    out.extend_from_slice(&fadt(facs_at, dsdt_at));
    align(&mut out);
    let madt_at = base + out.len() as u32;
    out.extend_from_slice(&madt(c));
    align(&mut out);
    let rsdt_at = base + out.len() as u32;
    let mut rsdt = Vec::new();
    for t in [fadt_at, madt_at] {
        rsdt.extend_from_slice(&t.to_le_bytes());
    }
    out.extend_from_slice(&table(b"RSDT", 1, &rsdt));
    align(&mut out);
    let xsdt_at = base + out.len() as u32;
    let mut xsdt = Vec::new();
    for t in [fadt_at, madt_at] {
        xsdt.extend_from_slice(&u64::from(t).to_le_bytes());
    }
    out.extend_from_slice(&table(b"XSDT", 1, &xsdt));
    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0);
    rsdp.extend_from_slice(b"RVMM  ");
    rsdp.push(2);
    rsdp.extend_from_slice(&rsdt_at.to_le_bytes());
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&u64::from(xsdt_at).to_le_bytes());
    rsdp.extend_from_slice(&[0, 0, 0, 0]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);
    out[..36].copy_from_slice(&rsdp);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    /// Finds table `sig` through the XSDT, as an OS would, and checks every checksum.
    fn find<'a>(t: &'a [u8], base: u32, sig: &[u8; 4]) -> &'a [u8] {
        assert_eq!(&t[..8], b"RSD PTR ");
        assert_eq!(t[..20].iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0);
        assert_eq!(t[..36].iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0);
        let xsdt = u64::from_le_bytes(t[24..32].try_into().unwrap()) as usize - base as usize;
        let len = u32_at(t, xsdt + 4) as usize;
        for e in t[xsdt + 36..xsdt + len].chunks(8) {
            let at = u64::from_le_bytes(e.try_into().unwrap()) as usize - base as usize;
            let l = u32_at(t, at + 4) as usize;
            let tab = &t[at..at + l];
            assert_eq!(tab.iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0);
            if &tab[..4] == sig {
                return tab;
            }
        }
        panic!("no {sig:?}");
    }

    #[test]
    fn tables_are_found_and_sum_to_zero() {
        let base = 0xe0000;
        let t = build(
            base,
            &Config {
                cpus: 2,
                ioapic_id: 2,
                ioapic_addr: 0xfec0_0000,
                wakeup_mailbox: Some(0x8000),
            },
        );
        let fadt = find(&t, base, b"FACP");
        assert_eq!(fadt.len(), 276);
        assert_eq!(u32_at(fadt, 64), u32::from(PM1A_CNT));
        let dsdt = u32_at(fadt, 40) as usize - base as usize;
        assert_eq!(&t[dsdt..dsdt + 4], b"DSDT");
        assert_eq!(&t[dsdt + 36..dsdt + 41], b"\x08_S5_");
        let madt = find(&t, base, b"APIC");
        // Two processor entries, an I/O APIC, two overrides, an NMI, a wakeup mailbox.
        let mut types = Vec::new();
        let mut o = 44;
        while o < madt.len() {
            types.push(madt[o]);
            o += usize::from(madt[o + 1]);
        }
        assert_eq!(types, vec![0, 0, 1, 2, 2, 4, 0x10]);
        assert_eq!(madt[44 + 8 + 3], 1, "second APIC ID");
    }
}
