// SPDX-License-Identifier: GPL-2.0

//! The shadow tree: the page tables the CPU walks while the guest runs, built from
//! table pages that an allocator hands out (the module's per-VM pool; a vector in
//! tests). Guests with 32-bit or PAE paging, or none, run on a PAE shadow (its four
//! PDPTEs are fixed when the root is made, since VM entry loads them from CR3); 4-level
//! guests on a 4-level shadow.

use super::spte;

/// Where shadow table pages come from.
pub trait TableAlloc {
    /// A zeroed 4-KiB table; its host-physical address. `None` when the pool is empty.
    fn alloc(&mut self) -> Option<u64>;
    /// The table at host-physical address `pa` (one that `alloc` returned).
    fn table(&mut self, pa: u64) -> &mut [u64; 512];
}

/// Shape of a shadow tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// PAE: a 4-entry PDPT, then page directories and page tables (32-bit addresses).
    Pae,
    /// 4-level: PML4, PDPT, PD, PT.
    Long4,
}

/// The pool ran dry: drop the shadow and start again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfTables;

/// A shadow tree's root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Root {
    /// Host-physical address of the top table (what goes into the real CR3).
    pub pa: u64,
    /// Its shape.
    pub format: Format,
}

impl Root {
    /// A new, empty tree.
    pub fn new(alloc: &mut impl TableAlloc, format: Format) -> Result<Self, OutOfTables> {
        let pa = alloc.alloc().ok_or(OutOfTables)?;
        if format == Format::Pae {
            for i in 0..4 {
                let pd = alloc.alloc().ok_or(OutOfTables)?;
                alloc.table(pa)[i] = spte::pae_pdpte(pd);
            }
        }
        Ok(Self { pa, format })
    }

    fn top_level(&self) -> u8 {
        match self.format {
            Format::Pae => 3,
            Format::Long4 => 4,
        }
    }

    fn index(&self, gva: u64, level: u8) -> usize {
        match (self.format, level) {
            (Format::Pae, 3) => ((gva >> 30) & 3) as usize,
            _ => ((gva >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff) as usize,
        }
    }

    /// Installs `leaf` as the 4-KiB mapping of `gva`, making tables on the way.
    pub fn map(&self, alloc: &mut impl TableAlloc, gva: u64, leaf: u64) -> Result<(), OutOfTables> {
        let mut table = self.pa;
        for level in (2..=self.top_level()).rev() {
            let i = self.index(gva, level);
            let e = alloc.table(table)[i];
            table = if e & spte::SPTE_P != 0 {
                e & spte::SPTE_ADDR
            } else {
                // Only 4-level trees get here at the top: PAE PDPTEs are all present.
                let new = alloc.alloc().ok_or(OutOfTables)?;
                alloc.table(table)[i] = spte::table(new);
                new
            };
        }
        let i = self.index(gva, 1);
        alloc.table(table)[i] = leaf;
        Ok(())
    }

    /// The leaf entry for `gva`, if the tables down to it exist.
    pub fn lookup(&self, alloc: &mut impl TableAlloc, gva: u64) -> Option<u64> {
        let mut table = self.pa;
        for level in (2..=self.top_level()).rev() {
            let e = alloc.table(table)[self.index(gva, level)];
            if e & spte::SPTE_P == 0 {
                return None;
            }
            table = e & spte::SPTE_ADDR;
        }
        Some(alloc.table(table)[self.index(gva, 1)])
    }

    /// Drops the mapping of `gva` (INVLPG). Tables stay; an empty leaf costs nothing.
    pub fn unmap(&self, alloc: &mut impl TableAlloc, gva: u64) {
        let mut table = self.pa;
        for level in (2..=self.top_level()).rev() {
            let e = alloc.table(table)[self.index(gva, level)];
            if e & spte::SPTE_P == 0 {
                return;
            }
            table = e & spte::SPTE_ADDR;
        }
        let i = self.index(gva, 1);
        alloc.table(table)[i] = 0;
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    struct VecAlloc {
        pages: Vec<[u64; 512]>,
        limit: usize,
    }

    impl TableAlloc for VecAlloc {
        fn alloc(&mut self) -> Option<u64> {
            if self.pages.len() == self.limit {
                return None;
            }
            self.pages.push([0; 512]);
            Some(0x1000 * self.pages.len() as u64)
        }
        fn table(&mut self, pa: u64) -> &mut [u64; 512] {
            &mut self.pages[(pa / 0x1000 - 1) as usize]
        }
    }

    #[test]
    fn long4_map_lookup_unmap() {
        let mut a = VecAlloc {
            pages: Vec::new(),
            limit: 16,
        };
        let root = Root::new(&mut a, Format::Long4).unwrap();
        let leaf = 0xabc_d000 | spte::SPTE_P;
        root.map(&mut a, 0x7fff_ffff_f000, leaf).unwrap();
        assert_eq!(a.pages.len(), 4);
        assert_eq!(root.lookup(&mut a, 0x7fff_ffff_f000), Some(leaf));
        assert_eq!(root.lookup(&mut a, 0x7fff_ffff_e000), Some(0));
        assert_eq!(root.lookup(&mut a, 0x1000), None);
        // A neighbour shares every table.
        root.map(&mut a, 0x7fff_ffff_e000, leaf).unwrap();
        assert_eq!(a.pages.len(), 4);
        root.unmap(&mut a, 0x7fff_ffff_f000);
        assert_eq!(root.lookup(&mut a, 0x7fff_ffff_f000), Some(0));
    }

    #[test]
    fn pae_root_has_four_plain_pdptes() {
        let mut a = VecAlloc {
            pages: Vec::new(),
            limit: 16,
        };
        let root = Root::new(&mut a, Format::Pae).unwrap();
        for i in 0..4 {
            let e = a.table(root.pa)[i];
            assert_eq!(
                e & !spte::SPTE_ADDR,
                spte::SPTE_P,
                "PDPTE {i} has only P set"
            );
        }
        root.map(&mut a, 0xc000_1000, 0x5000 | spte::SPTE_P)
            .unwrap();
        assert_eq!(a.pages.len(), 6);
        assert_eq!(
            root.lookup(&mut a, 0xc000_1000),
            Some(0x5000 | spte::SPTE_P)
        );
    }

    #[test]
    fn out_of_tables() {
        let mut a = VecAlloc {
            pages: Vec::new(),
            limit: 2,
        };
        let root = Root::new(&mut a, Format::Long4).unwrap();
        assert_eq!(root.map(&mut a, 0, spte::SPTE_P), Err(OutOfTables));
    }
}
