// SPDX-License-Identifier: GPL-2.0

//! The guest page-table walker (SDM Vol. 3A, 4.3-4.7).
//!
//! A walk translates one linear address for one access (read, write or fetch, by user
//! or supervisor code), checks the access rights of SDM 4.6 and, when the access is
//! allowed, sets the guest's accessed flags (and the dirty flag of the leaf on a
//! write) as the processor would. A refused access yields the #PF error code.

use super::mode::PagingMode;

/// Page-fault error code bits (SDM Vol. 3A, 4.7).
pub mod pferr {
    /// The fault was a protection violation (else: a not-present entry).
    pub const PRESENT: u32 = 1 << 0;
    /// The access was a write.
    pub const WRITE: u32 = 1 << 1;
    /// The access was a user-mode access.
    pub const USER: u32 = 1 << 2;
    /// A reserved bit was set in a paging-structure entry.
    pub const RSVD: u32 = 1 << 3;
    /// The access was an instruction fetch.
    pub const FETCH: u32 = 1 << 4;
}

/// Bits of a guest paging-structure entry (SDM Vol. 3A, 4.3-4.5).
pub mod pte {
    /// Present.
    pub const P: u64 = 1 << 0;
    /// Read/write.
    pub const RW: u64 = 1 << 1;
    /// User/supervisor.
    pub const US: u64 = 1 << 2;
    /// Accessed.
    pub const A: u64 = 1 << 5;
    /// Dirty.
    pub const D: u64 = 1 << 6;
    /// Page size (a large page).
    pub const PS: u64 = 1 << 7;
    /// Execute-disable.
    pub const XD: u64 = 1 << 63;
}
use pte::*;

/// An access to translate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// A write (else a read or a fetch).
    pub write: bool,
    /// By user-mode code (CPL 3).
    pub user: bool,
    /// An instruction fetch.
    pub fetch: bool,
}

impl Access {
    /// The access a #PF error code describes.
    pub const fn from_error_code(ec: u32) -> Self {
        Self {
            write: ec & pferr::WRITE != 0,
            user: ec & pferr::USER != 0,
            fetch: ec & pferr::FETCH != 0,
        }
    }
}

/// The processor state that decides access rights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PermCtx {
    /// CR0.WP: supervisor writes honour read-only pages.
    pub wp: bool,
    /// CR4.SMEP.
    pub smep: bool,
    /// CR4.SMAP.
    pub smap: bool,
    /// EFLAGS.AC (SMAP does not apply to explicit supervisor accesses when set).
    pub ac: bool,
    /// EFER.NXE.
    pub nxe: bool,
    /// 1-GiB pages are supported (CPUID.80000001H:EDX[26]).
    pub gbpages: bool,
    /// MAXPHYADDR.
    pub maxphyaddr: u8,
}

impl PermCtx {
    /// The physical-address bits below MAXPHYADDR (MAXPHYADDR comes from CPUID: 64 or
    /// more means every bit).
    pub fn phys_mask(&self) -> u64 {
        1u64.checked_shl(u32::from(self.maxphyaddr))
            .map_or(u64::MAX, |b| b - 1)
    }
}

impl Default for PermCtx {
    fn default() -> Self {
        Self {
            wp: true,
            smep: false,
            smap: false,
            ac: false,
            nxe: true,
            gbpages: true,
            maxphyaddr: 46,
        }
    }
}

/// Guest-physical memory as the walker sees it.
pub trait GuestMemory {
    /// Reads a paging-structure entry of `size` bytes (4 or 8); `None` if the address
    /// is not backed by guest RAM.
    fn read_entry(&mut self, gpa: u64, size: u8) -> Option<u64>;
    /// Sets the accessed/dirty flags the walk set in an entry: writes `new` only if the
    /// entry still holds `old`, atomically (another vCPU may have changed it since the
    /// walk read it, as hardware's locked update allows for); false if it did not.
    fn update_entry(&mut self, gpa: u64, size: u8, old: u64, new: u64) -> bool;
    /// Reads `out.len()` consecutive 8-byte entries from `gpa` (within one page);
    /// false if the page is not guest RAM.
    fn read_entries(&mut self, gpa: u64, out: &mut [u64]) -> bool {
        for (i, o) in out.iter_mut().enumerate() {
            match self.read_entry(gpa.wrapping_add(8 * i as u64), 8) {
                Some(v) => *o = v,
                None => return false,
            }
        }
        true
    }
}

impl<M: GuestMemory + ?Sized> GuestMemory for &mut M {
    fn read_entry(&mut self, gpa: u64, size: u8) -> Option<u64> {
        (**self).read_entry(gpa, size)
    }
    fn update_entry(&mut self, gpa: u64, size: u8, old: u64, new: u64) -> bool {
        (**self).update_entry(gpa, size, old, new)
    }
    fn read_entries(&mut self, gpa: u64, out: &mut [u64]) -> bool {
        (**self).read_entries(gpa, out)
    }
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    /// The guest-physical address the linear address maps to.
    pub gpa: u64,
    /// Level of the leaf: 1 for a 4-KiB page, 2 for 2/4 MiB, 3 for 1 GiB.
    pub level: u8,
    /// Writable for the accessing mode (all levels R/W; or supervisor with WP=0).
    pub writable: bool,
    /// User-accessible (all levels U/S).
    pub user: bool,
    /// Execute-disabled (some level XD, with NXE).
    pub nx: bool,
    /// The leaf's dirty flag after the walk.
    pub dirty: bool,
    /// Raw permission bits: all levels R/W.
    pub rw_all: bool,
    /// The tables the walk went through: `table[l - 1]` is the guest-physical address of
    /// the level-`l` table, `pte[l - 1]` the entry it used there (after the A/D update),
    /// for the levels from the top down to `level`.
    pub path: Path,
}

/// The guest tables of a walk, by level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Path {
    /// Guest-physical address of the table at each level.
    pub table: [u64; 4],
    /// The entry used at each level.
    pub pte: [u64; 4],
}

/// A refused access: the guest sees a #PF with this error code and CR2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkFault {
    /// The #PF error code.
    pub error_code: u32,
    /// Guest-physical address of a paging entry outside guest RAM (the walk could not
    /// read it); the hypervisor decides what that means.
    pub unbacked_table: Option<u64>,
    /// No fault: entries kept changing under the walk's accessed/dirty updates (other
    /// vCPUs writing the tables), [`WALK_TRIES`] times. The access must be retried
    /// (the instruction run again), never reported to the guest.
    pub raced: bool,
}

/// Walks made before a walk whose accessed/dirty update keeps losing the race gives up
/// ([`WalkFault::raced`]).
pub const WALK_TRIES: usize = 4;

/// Bits 62:52 of a PAE paging entry: reserved (IA-32e paging ignores them).
pub const PAE_HIGH_RESERVED: u64 = 0x7ff0_0000_0000_0000;

/// Walks the guest's tables for `gva` and `access`, as hardware does: an entry whose
/// accessed/dirty update finds it changed is walked again from the top.
pub fn walk(
    mem: &mut impl GuestMemory,
    mode: PagingMode,
    cr3: u64,
    gva: u64,
    access: Access,
    ctx: &PermCtx,
) -> Result<Walk, WalkFault> {
    for _ in 0..WALK_TRIES {
        match walk_once(mem, mode, cr3, gva, access, ctx) {
            Err(f) if f.raced => continue,
            r => return r,
        }
    }
    Err(WalkFault {
        error_code: 0,
        unbacked_table: None,
        raced: true,
    })
}

/// One walk; `raced` if an accessed/dirty update found its entry changed.
fn walk_once(
    mem: &mut impl GuestMemory,
    mode: PagingMode,
    cr3: u64,
    gva: u64,
    access: Access,
    ctx: &PermCtx,
) -> Result<Walk, WalkFault> {
    let fetch_bit = matches!(mode, PagingMode::Pae | PagingMode::Long4) && ctx.nxe || ctx.smep;
    let base_ec = (if access.write { pferr::WRITE } else { 0 })
        | (if access.user { pferr::USER } else { 0 })
        | (if access.fetch && fetch_bit {
            pferr::FETCH
        } else {
            0
        });
    let not_present = WalkFault {
        error_code: base_ec,
        unbacked_table: None,
        raced: false,
    };
    let rsvd = WalkFault {
        error_code: base_ec | pferr::PRESENT | pferr::RSVD,
        unbacked_table: None,
        raced: false,
    };
    let phys_mask = ctx.phys_mask();

    let (levels, size, mut table) = match mode {
        PagingMode::None => {
            return Ok(Walk {
                gpa: gva & 0xffff_ffff,
                level: 1,
                writable: true,
                user: true,
                nx: false,
                dirty: true,
                rw_all: true,
                path: Path::default(),
            });
        }
        PagingMode::Bits32 { .. } => (2u8, 4u8, cr3 & 0xffff_f000),
        PagingMode::Pae => (3, 8, cr3 & 0xffff_ffe0),
        PagingMode::Long4 => (4, 8, cr3 & phys_mask & !0xfff),
    };
    // Linear addresses beyond 32 bits do not exist outside IA-32e mode.
    let gva = if mode == PagingMode::Long4 {
        gva
    } else {
        gva & 0xffff_ffff
    };

    let mut entries = [(0u64, 0u64); 4]; // (gpa of entry, value), top level first
    let mut n = 0;
    let mut path = Path::default();
    let (mut rw, mut us, mut nx) = (true, true, false);
    let mut level = levels;
    let leaf_level;
    let page_base;
    loop {
        let (shift, index_bits) = match (mode, level) {
            (PagingMode::Bits32 { .. }, 2) => (22, 10),
            (PagingMode::Bits32 { .. }, _) => (12, 10),
            (PagingMode::Pae, 3) => (30, 2),
            (_, l) => (12 + 9 * (u32::from(l) - 1), 9),
        };
        let index = (gva >> shift) & ((1 << index_bits) - 1);
        let egpa = table + index * u64::from(size);
        let Some(e) = mem.read_entry(egpa, size) else {
            return Err(WalkFault {
                error_code: base_ec,
                unbacked_table: Some(egpa),
                raced: false,
            });
        };
        if e & P == 0 {
            return Err(not_present);
        }
        // Reserved bits (SDM 4.3-4.5, tables 4-4 to 4-20).
        let mut reserved = if size == 8 {
            e & !phys_mask & !XD & ((1 << 52) - 1)
        } else {
            0
        };
        if size == 8 && !ctx.nxe && e & XD != 0 {
            reserved |= XD;
        }
        if mode == PagingMode::Pae {
            // PAE paging has no ignored high bits: 62:MAXPHYADDR are reserved at every
            // level (SDM Vol. 3A, tables 4-8 to 4-11), where IA-32e paging ignores
            // 62:52.
            reserved |= e & PAE_HIGH_RESERVED;
        }
        let pae_pdpte = mode == PagingMode::Pae && level == 3;
        if pae_pdpte {
            // PAE PDPTEs: bits 2:1, 8:5 and 63:MAXPHYADDR are reserved (SDM Vol. 3A,
            // table 4-8: no ignored high bits, unlike the other levels' 62:52).
            reserved |= e & (0x6 | 0x1e0 | !phys_mask);
        }
        let large = !pae_pdpte
            && e & PS != 0
            && match (mode, level) {
                (PagingMode::Bits32 { pse }, 2) => pse,
                (PagingMode::Long4, 4) => {
                    reserved |= PS;
                    false
                }
                (PagingMode::Long4, 3) => {
                    if !ctx.gbpages {
                        reserved |= PS;
                    }
                    ctx.gbpages
                }
                (_, 2) => true,
                _ => false,
            };
        if large {
            reserved |= match (mode, level) {
                (PagingMode::Bits32 { .. }, _) => e & (1 << 21),
                (_, 3) => e & 0x3fff_e000,
                _ => e & 0x1f_e000,
            };
        }
        if reserved != 0 {
            return Err(rsvd);
        }
        entries[n] = (egpa, e);
        n += 1;
        path.table[usize::from(level) - 1] = table;
        if !pae_pdpte {
            rw &= e & RW != 0;
            us &= e & US != 0;
            nx |= ctx.nxe && e & XD != 0;
        }
        if large || level == 1 {
            leaf_level = level;
            let offset_bits = match (mode, level) {
                (PagingMode::Bits32 { .. }, 2) => 22,
                _ => 12 + 9 * (u32::from(level) - 1),
            };
            let frame = if let (PagingMode::Bits32 { .. }, 2) = (mode, level) {
                // PSE-36: bits 20:13 give physical bits 39:32.
                (e & 0xffc0_0000) | (((e >> 13) & 0xff) << 32)
            } else {
                e & phys_mask & !((1u64 << offset_bits) - 1)
            };
            page_base = frame | (gva & ((1u64 << offset_bits) - 1));
            break;
        }
        table = if size == 4 {
            e & 0xffff_f000
        } else {
            e & phys_mask & !0xfff
        };
        level -= 1;
    }

    // Access rights (SDM 4.6).
    let prot = WalkFault {
        error_code: base_ec | pferr::PRESENT,
        unbacked_table: None,
        raced: false,
    };
    if access.user {
        if !us || (access.write && !rw) || (access.fetch && nx) {
            return Err(prot);
        }
    } else if access.fetch {
        if nx || (us && ctx.smep) {
            return Err(prot);
        }
    } else {
        if us && ctx.smap && !ctx.ac {
            return Err(prot);
        }
        if access.write && !rw && ctx.wp {
            return Err(prot);
        }
    }

    // Accessed flags on every entry used, dirty on the leaf for a write.
    let mut dirty = false;
    for (i, &(egpa, e)) in entries[..n].iter().enumerate() {
        let is_leaf = i == n - 1;
        let mut new = e;
        if !(mode == PagingMode::Pae && i == 0) {
            new |= A;
        }
        if is_leaf {
            if access.write {
                new |= D;
            }
            dirty = new & D != 0;
        }
        if new != e && !mem.update_entry(egpa, size, e, new) {
            // Changed since it was read (another vCPU cleared it, say): what it maps
            // now decides, as for hardware, whose update is a locked operation.
            return Err(WalkFault {
                error_code: 0,
                unbacked_table: None,
                raced: true,
            });
        }
        path.pte[usize::from(leaf_level) + n - 2 - i] = new;
    }
    let writable = rw || (!access.user && !ctx.wp);
    Ok(Walk {
        gpa: page_base,
        level: leaf_level,
        writable,
        user: us,
        nx,
        dirty,
        rw_all: rw,
        path,
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// Guest memory as a sparse map of 8-byte words.
    #[derive(Default)]
    struct Mem(BTreeMap<u64, u64>);

    impl GuestMemory for Mem {
        fn read_entry(&mut self, gpa: u64, size: u8) -> Option<u64> {
            if gpa >= 0x1000_0000 {
                return None;
            }
            let word = self.0.get(&(gpa & !7)).copied().unwrap_or(0);
            Some(if size == 4 {
                (word >> ((gpa & 4) * 8)) & 0xffff_ffff
            } else {
                word
            })
        }
        fn update_entry(&mut self, gpa: u64, size: u8, old: u64, new: u64) -> bool {
            if self.read_entry(gpa, size) != Some(old) {
                return false;
            }
            self.set(gpa, size, new);
            true
        }
    }

    impl Mem {
        fn set(&mut self, gpa: u64, size: u8, v: u64) {
            let w = self.0.entry(gpa & !7).or_insert(0);
            if size == 4 {
                let sh = (gpa & 4) * 8;
                *w = (*w & !(0xffff_ffffu64 << sh)) | (v << sh);
            } else {
                *w = v;
            }
        }
        fn get(&mut self, gpa: u64, size: u8) -> u64 {
            self.read_entry(gpa, size).unwrap()
        }
    }

    const R: Access = Access {
        write: false,
        user: false,
        fetch: false,
    };
    const W: Access = Access {
        write: true,
        user: false,
        fetch: false,
    };
    const UR: Access = Access {
        write: false,
        user: true,
        fetch: false,
    };
    const UW: Access = Access {
        write: true,
        user: true,
        fetch: false,
    };
    const F: Access = Access {
        write: false,
        user: false,
        fetch: true,
    };

    /// A 4-level map of `gva` through tables at 0x1000.. with leaf flags `flags` at the
    /// given level (1 = 4K).
    fn long4(mem: &mut Mem, gva: u64, leaf_level: u8, frame: u64, upper: u64, leaf: u64) -> u64 {
        let cr3 = 0x1000;
        let mut table = cr3;
        for level in (1..=4u8).rev() {
            let idx = (gva >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff;
            if level == leaf_level {
                mem.set(
                    table + idx * 8,
                    8,
                    frame | leaf | if level > 1 { PS } else { 0 },
                );
                break;
            }
            let next = 0x1000 * (6 - u64::from(level));
            mem.set(table + idx * 8, 8, next | upper);
            table = next;
        }
        cr3
    }

    #[test]
    fn long4_4k_2m_1g_and_accessed_dirty() {
        let ctx = PermCtx::default();
        for (level, frame, gva) in [
            (1u8, 0x0040_0000u64, 0x7f12_3456_7abcu64),
            (2, 0x0060_0000, 0x4012_3456),
            (3, 0x4000_0000, 0x8_1234_5678),
        ] {
            let mut m = Mem::default();
            let cr3 = long4(&mut m, gva, level, frame, P | RW | US, P | RW | US);
            let w = walk(&mut m, PagingMode::Long4, cr3, gva, R, &ctx).unwrap();
            let mask = (1u64 << (12 + 9 * (u32::from(level) - 1))) - 1;
            assert_eq!(w.gpa, frame | (gva & mask), "level {level}");
            assert_eq!(w.level, level);
            assert!(!w.dirty);
            // A read sets A everywhere, D nowhere.
            let pml4e = m.get(cr3 + ((gva >> 39) & 0x1ff) * 8, 8);
            assert_ne!(pml4e & A, 0);
            let w = walk(&mut m, PagingMode::Long4, cr3, gva, W, &ctx).unwrap();
            assert!(w.dirty && w.writable);
        }
    }

    #[test]
    fn not_present_error_codes() {
        let mut m = Mem::default();
        let ctx = PermCtx::default();
        let cr3 = long4(&mut m, 0x1000_0000, 1, 0x5000, P | RW | US, RW | US); // leaf not present
        let e = walk(&mut m, PagingMode::Long4, cr3, 0x1000_0000, UW, &ctx).unwrap_err();
        assert_eq!(e.error_code, pferr::WRITE | pferr::USER);
        let e = walk(&mut m, PagingMode::Long4, cr3, 0x1000_0000, F, &ctx).unwrap_err();
        assert_eq!(e.error_code, pferr::FETCH);
        // Without NXE or SMEP, fetches do not report I/D.
        let e = walk(
            &mut m,
            PagingMode::Long4,
            cr3,
            0x1000_0000,
            F,
            &PermCtx { nxe: false, ..ctx },
        )
        .unwrap_err();
        assert_eq!(e.error_code, 0);
        // An empty PML4.
        let e = walk(&mut m, PagingMode::Long4, 0x9000, 0x1000_0000, R, &ctx).unwrap_err();
        assert_eq!(e.error_code, 0);
    }

    #[test]
    fn reserved_bits() {
        let ctx = PermCtx::default();
        let rsvd = pferr::PRESENT | pferr::RSVD;
        // PS in a PML4E.
        let mut m = Mem::default();
        m.set(0x1000, 8, 0x2000 | P | PS);
        assert_eq!(
            walk(&mut m, PagingMode::Long4, 0x1000, 0, R, &ctx)
                .unwrap_err()
                .error_code,
            rsvd
        );
        // XD without NXE.
        let mut m = Mem::default();
        let cr3 = long4(&mut m, 0, 1, 0x5000, P | RW, P | RW | XD);
        assert_eq!(
            walk(
                &mut m,
                PagingMode::Long4,
                cr3,
                0,
                W,
                &PermCtx { nxe: false, ..ctx }
            )
            .unwrap_err()
            .error_code,
            rsvd | pferr::WRITE
        );
        assert!(walk(&mut m, PagingMode::Long4, cr3, 0, W, &ctx).is_ok());
        // Address bits beyond MAXPHYADDR.
        let mut m = Mem::default();
        let cr3 = long4(&mut m, 0, 1, 1 << 47, P | RW, P | RW);
        assert_eq!(
            walk(&mut m, PagingMode::Long4, cr3, 0, R, &ctx)
                .unwrap_err()
                .error_code,
            rsvd
        );
        // 2-MiB page with bit 13 set; 1-GiB pages unsupported.
        let mut m = Mem::default();
        let cr3 = long4(&mut m, 0, 2, 0x20_0000 | (1 << 13), P | RW, P | RW);
        assert_eq!(
            walk(&mut m, PagingMode::Long4, cr3, 0, R, &ctx)
                .unwrap_err()
                .error_code,
            rsvd
        );
        let mut m = Mem::default();
        let cr3 = long4(&mut m, 0, 3, 0x4000_0000, P | RW, P | RW);
        assert_eq!(
            walk(
                &mut m,
                PagingMode::Long4,
                cr3,
                0,
                R,
                &PermCtx {
                    gbpages: false,
                    ..ctx
                }
            )
            .unwrap_err()
            .error_code,
            rsvd
        );
    }

    #[test]
    fn bits32_with_and_without_pse() {
        let ctx = PermCtx {
            nxe: false,
            ..PermCtx::default()
        };
        let mut m = Mem::default();
        // PDE 1 (4 MiB at 0x0040_0000..): a 4-MiB page at 0x0c00_0000 with PSE-36 bits.
        m.set(0x1000 + 4, 4, 0x0c00_0000 | (0x3 << 13) | P | RW | US | PS);
        let w = walk(
            &mut m,
            PagingMode::Bits32 { pse: true },
            0x1000,
            0x0041_2345,
            UR,
            &ctx,
        )
        .unwrap();
        assert_eq!(w.gpa, 0x3_0c01_2345);
        assert_eq!(w.level, 2);
        assert_ne!(m.get(0x1004, 4) & A, 0);
        // Without CR4.PSE the PS bit is ignored: the PDE points at a page table.
        let mut m = Mem::default();
        m.set(0x1000 + 4, 4, 0x3000 | P | RW | US | PS);
        m.set(0x3000 + 0x12 * 4, 4, 0x7000 | P | US);
        let w = walk(
            &mut m,
            PagingMode::Bits32 { pse: false },
            0x1000,
            0x0041_2345,
            UR,
            &ctx,
        )
        .unwrap();
        assert_eq!(w.gpa, 0x7345);
        assert_eq!(
            walk(
                &mut m,
                PagingMode::Bits32 { pse: false },
                0x1000,
                0x0041_2345,
                UW,
                &ctx
            )
            .unwrap_err()
            .error_code,
            pferr::PRESENT | pferr::WRITE | pferr::USER
        );
        // The upper half of the entry word is the next PDE, untouched by A/D updates.
        assert_eq!(m.get(0x1000, 4), 0);
    }

    #[test]
    fn pae_pdpte_rules() {
        let ctx = PermCtx::default();
        let mut m = Mem::default();
        let cr3 = 0x1020; // 32-byte aligned PDPT
        m.set(cr3 + 8 * 2, 8, 0x3000 | P); // gva bits 31:30 = 2
        m.set(0x3000 + 8, 8, 0x4000 | P | RW | US);
        m.set(0x4000 + 8 * 2, 8, 0x9000 | P | RW | US | XD);
        let gva = 0x8020_2123;
        let w = walk(&mut m, PagingMode::Pae, cr3, gva, UW, &ctx).unwrap();
        assert_eq!(w.gpa, 0x9123);
        assert!(w.nx);
        // The PDPTE gets no accessed flag (it has none in PAE).
        assert_eq!(m.get(cr3 + 16, 8), 0x3000 | P);
        assert_eq!(
            walk(
                &mut m,
                PagingMode::Pae,
                cr3,
                gva,
                Access {
                    fetch: true,
                    user: true,
                    write: false
                },
                &ctx
            )
            .unwrap_err()
            .error_code,
            pferr::PRESENT | pferr::USER | pferr::FETCH
        );
        // R/W in a PDPTE is reserved, and so are bits 62:52.
        for bad in [RW, 1 << 52, 1 << 57, 1 << 62] {
            m.set(cr3 + 16, 8, 0x3000 | P | bad);
            assert_eq!(
                walk(&mut m, PagingMode::Pae, cr3, gva, R, &ctx)
                    .unwrap_err()
                    .error_code,
                pferr::PRESENT | pferr::RSVD,
                "PDPTE bit {:#x}",
                bad
            );
        }
        m.set(cr3 + 16, 8, 0x3000 | P);
        // PAE paging has no ignored high bits: 62:52 of a PDE or PTE are reserved too
        // (IA-32e paging ignores them).
        for (at, good) in [
            (0x3000 + 8, 0x4000 | P | RW | US),
            (0x4000 + 8 * 2, 0x9000 | P | RW | US),
        ] {
            for bad in [1u64 << 52, 1 << 62] {
                m.set(at, 8, good | bad);
                assert_eq!(
                    walk(&mut m, PagingMode::Pae, cr3, gva, R, &ctx)
                        .unwrap_err()
                        .error_code,
                    pferr::PRESENT | pferr::RSVD,
                    "entry at {at:#x}, bit {bad:#x}"
                );
            }
            m.set(at, 8, good);
        }
        assert!(walk(&mut m, PagingMode::Pae, cr3, gva, R, &ctx).is_ok());
    }

    #[test]
    fn unbacked_table_is_reported() {
        let mut m = Mem::default();
        m.set(0x1000, 8, 0x2000_0000 | P | RW);
        let e = walk(&mut m, PagingMode::Long4, 0x1000, 0, R, &PermCtx::default()).unwrap_err();
        assert_eq!(e.unbacked_table, Some(0x2000_0000));
    }

    /// The access-rights rules of SDM Vol. 3A 4.6.1, stated on the combined flags.
    fn sdm_allows(us: bool, rw: bool, nx: bool, a: Access, c: &PermCtx) -> bool {
        let nx = nx && c.nxe;
        if a.user {
            us && (!a.write || rw) && !(a.fetch && nx)
        } else if a.fetch {
            !(nx || c.smep && us)
        } else {
            let smap_blocks = c.smap && us && !c.ac;
            !smap_blocks && (!a.write || rw || !c.wp)
        }
    }

    /// For every combination of U/S, R/W and XD at the four levels, every access and
    /// every WP/SMEP/SMAP/AC/NXE setting (2^20 cases, exhaustively), the walker allows
    /// exactly what the SDM allows and reports the error code the SDM gives.
    #[test]
    fn long4_access_rights_exhaustive() {
        let gva = 0x0000_7123_4567_8000u64;
        let mut m = Mem::default();
        for bits in 0u32..(1 << 20) {
            let bit = |i: u32| bits & (1 << i) != 0;
            let (write, user, fetch) = (bit(12), bit(13), bit(14));
            if write && fetch {
                continue;
            }
            let access = Access { write, user, fetch };
            let ctx = PermCtx {
                wp: bit(15),
                smep: bit(16),
                smap: bit(17),
                ac: bit(18),
                nxe: bit(19),
                ..PermCtx::default()
            };
            let mut table = 0x1000;
            let (mut us_all, mut rw_all, mut nx_any) = (true, true, false);
            for i in 0..4u32 {
                let (us, rw, xd) = (bit(3 * i), bit(3 * i + 1), bit(3 * i + 2) && ctx.nxe);
                let level = 4 - i;
                let idx = (gva >> (12 + 9 * (level - 1))) & 0x1ff;
                let next = 0x10_0000 + 0x1000 * u64::from(i);
                m.set(
                    table + idx * 8,
                    8,
                    next | P
                        | if us { US } else { 0 }
                        | if rw { RW } else { 0 }
                        | if xd { XD } else { 0 },
                );
                us_all &= us;
                rw_all &= rw;
                nx_any |= xd;
                table = next;
            }
            let allowed = sdm_allows(us_all, rw_all, nx_any, access, &ctx);
            match walk(&mut m, PagingMode::Long4, 0x1000, gva, access, &ctx) {
                Ok(w) => {
                    assert!(allowed, "case {bits:#x}: allowed, SDM refuses");
                    assert_eq!(w.user, us_all);
                    assert_eq!(w.nx, nx_any);
                    assert_eq!(w.dirty, write, "case {bits:#x}");
                }
                Err(e) => {
                    assert!(!allowed, "case {bits:#x}: refused, SDM allows");
                    let want = pferr::PRESENT
                        | if write { pferr::WRITE } else { 0 }
                        | if user { pferr::USER } else { 0 }
                        | if fetch && (ctx.nxe || ctx.smep) {
                            pferr::FETCH
                        } else {
                            0
                        };
                    assert_eq!(e.error_code, want, "case {bits:#x}");
                }
            }
        }
    }

    proptest! {
        /// Any 4-KiB mapping translates to its frame plus the page offset.
        #[test]
        fn long4_translation(gva in 0u64..(1 << 47), frame in 0u64..(1 << 34)) {
            let mut m = Mem::default();
            let frame = frame << 12;
            let cr3 = long4(&mut m, gva, 1, frame, P | RW | US, P | RW | US);
            // Tables live at 0x1000..0x5000: skip addresses whose indexes collide there.
            let w = walk(&mut m, PagingMode::Long4, cr3, gva, R, &PermCtx::default()).unwrap();
            prop_assert_eq!(w.gpa, frame | (gva & 0xfff));
        }
    }

    /// Guest memory where every address holds a pseudo-random (hostile) entry, mostly
    /// present, and writes are dropped.
    struct Noise(u64);

    impl GuestMemory for Noise {
        fn read_entry(&mut self, gpa: u64, size: u8) -> Option<u64> {
            let mut x = gpa ^ self.0;
            x ^= x >> 33;
            x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
            x ^= x >> 33;
            if x & 0xf00 == 0x100 {
                return None; // now and then an unbacked table
            }
            let e = x | P;
            Some(if size == 4 { e & 0xffff_ffff } else { e })
        }
        fn update_entry(&mut self, gpa: u64, size: u8, old: u64, _: u64) -> bool {
            self.read_entry(gpa, size) == Some(old)
        }
    }

    /// Memory where another vCPU changes entry `at` to `to` right after the walk read
    /// it (before the walk's accessed/dirty update), `times` times; `to` = `u64::MAX`:
    /// flips an ignored bit of it instead.
    struct Racing {
        mem: Mem,
        at: u64,
        to: u64,
        times: usize,
    }

    impl GuestMemory for Racing {
        fn read_entry(&mut self, gpa: u64, size: u8) -> Option<u64> {
            self.mem.read_entry(gpa, size)
        }
        fn update_entry(&mut self, gpa: u64, size: u8, old: u64, new: u64) -> bool {
            if gpa == self.at && self.times > 0 {
                self.times -= 1;
                let to = if self.to == u64::MAX {
                    self.mem.get(gpa, size) ^ (1 << 9)
                } else {
                    self.to
                };
                self.mem.set(gpa, size, to);
            }
            self.mem.update_entry(gpa, size, old, new)
        }
    }

    /// Long-mode tables mapping 0x40_0000 (4 KiB) with every accessed flag clear; the
    /// PTE's address.
    fn racing_tables(m: &mut Mem) -> u64 {
        m.set(0x1000, 8, 0x2000 | P | RW);
        m.set(0x2000, 8, 0x3000 | P | RW);
        m.set(0x3000 + 8 * 2, 8, 0x4000 | P | RW);
        m.set(0x4000, 8, 0x9000 | P | RW);
        0x4000
    }

    #[test]
    fn a_pte_cleared_under_the_walk_is_not_brought_back() {
        let mut m = Mem::default();
        let pte = racing_tables(&mut m);
        // Another vCPU clears the PTE (munmap) between the walk's read and its update.
        let mut r = Racing {
            mem: m,
            at: pte,
            to: 0,
            times: 1,
        };
        let long = PagingMode::Long4;
        let f = walk(&mut r, long, 0x1000, 0x40_0000, W, &PermCtx::default()).unwrap_err();
        assert!(!f.raced);
        assert_eq!(
            f.error_code & pferr::PRESENT,
            0,
            "the walk saw the cleared PTE"
        );
        assert_eq!(r.mem.get(pte, 8), 0, "the cleared PTE stays cleared");
        // Changed to another page instead: the walk maps that one, with A and D.
        let mut m = Mem::default();
        let pte = racing_tables(&mut m);
        let mut r = Racing {
            mem: m,
            at: pte,
            to: 0xa000 | P | RW,
            times: 1,
        };
        let w = walk(&mut r, long, 0x1000, 0x40_0000, W, &PermCtx::default()).unwrap();
        assert_eq!(w.gpa, 0xa000);
        assert_eq!(r.mem.get(pte, 8), 0xa000 | P | RW | A | D);
        // An entry that never holds still: the walk gives up, for the access to be
        // retried, and reports no fault.
        let mut m = Mem::default();
        let pte = racing_tables(&mut m);
        let mut r = Racing {
            mem: m,
            at: pte,
            to: u64::MAX,
            times: usize::MAX,
        };
        let f = walk(&mut r, long, 0x1000, 0x40_0000, W, &PermCtx::default()).unwrap_err();
        assert!(f.raced);
    }

    #[test]
    fn hostile_tables_addresses_and_maxphyaddr() {
        let mut s = 0x853c_49e6_748f_ea9bu64;
        let mut rng = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let modes = [
            PagingMode::None,
            PagingMode::Bits32 { pse: false },
            PagingMode::Bits32 { pse: true },
            PagingMode::Pae,
            PagingMode::Long4,
        ];
        let edges = [
            0,
            1,
            0xfff,
            0xffff_ffff,
            1 << 47,
            u64::MAX - 0xfff,
            u64::MAX,
        ];
        for i in 0..100_000 {
            let pick = |r: u64| {
                if r & 3 == 0 {
                    edges[(r >> 2) as usize % edges.len()]
                } else {
                    r
                }
            };
            let (cr3, gva) = (pick(rng()), pick(rng()));
            let r = rng();
            let ctx = PermCtx {
                wp: r & 1 != 0,
                smep: r & 2 != 0,
                smap: r & 4 != 0,
                ac: r & 8 != 0,
                nxe: r & 16 != 0,
                gbpages: r & 32 != 0,
                maxphyaddr: [0, 1, 12, 36, 46, 52, 63, 64, 65, 255][(r >> 8) as usize % 10],
            };
            let access = Access::from_error_code((r >> 16) as u32);
            let mode = modes[i % modes.len()];
            let mut mem = Noise(rng());
            if let Ok(w) = walk(&mut mem, mode, cr3, gva, access, &ctx) {
                assert!(w.level >= 1 && w.level <= mode.levels().max(1));
                if mode != PagingMode::Long4 && mode != PagingMode::Pae {
                    assert_eq!(w.gpa >> 40, 0, "32-bit paging reaches 40 bits at most");
                }
            }
            let mut out = [0u64; 4];
            mem.read_entries(u64::MAX - 8, &mut out);
        }
    }
}
