// SPDX-License-Identifier: GPL-2.0

//! Shadow entries: setting an entry keeps the parent links and the rmap right; zapping
//! a shadow page unlinks it from every parent, drops its entries and puts the page on
//! the zapped list.

use super::*;

impl<T: Tables> Pool<'_, T> {
    fn is_leaf(&self, sp: SpId) -> bool {
        self.sps[sp.index()].role.level() == 1
    }

    /// Forgets what entry `index` of `sp` (value `e`, present) links or maps.
    fn drop_entry(&mut self, sp: SpId, index: usize, e: u64) {
        if e & SPTE_MMIO != 0 {
            return;
        }
        if self.is_leaf(sp) {
            self.rmap_remove(e & SPTE_ADDR, EntryAt::new(sp, index));
        } else {
            let child = self.tables.index(e & SPTE_ADDR);
            self.link_remove(child, EntryAt::new(sp, index));
            if self.sps[child.index()].unsync {
                // It may have lost its last way to a root.
                self.orphan_candidate(child);
            }
        }
    }

    /// Sets entry `index` of `sp` to `new`, keeping links and the rmap right.
    pub(super) fn set_entry(&mut self, sp: SpId, index: usize, new: u64) -> Result<(), Full> {
        let old = self.tables.table(sp)[index];
        if old == new {
            return Ok(());
        }
        self.st.entry_writes = self.st.entry_writes.wrapping_add(1);
        if old & SPTE_P != 0 {
            self.st.tlb_dirty = true;
            if self.is_leaf(sp)
                && new & SPTE_P != 0
                && (old ^ new) & (SPTE_ADDR | SPTE_MMIO) == 0
                && new & SPTE_MMIO == 0
            {
                // Same frame, other rights.
                self.tables.table(sp)[index] = new;
                return Ok(());
            }
            self.drop_entry(sp, index, old);
        }
        self.tables.table(sp)[index] = 0;
        if new & SPTE_P != 0 {
            if new & SPTE_MMIO != 0 {
                // No host frame: nothing to write-protect.
            } else if self.is_leaf(sp) {
                self.rmap_add(new & SPTE_ADDR, EntryAt::new(sp, index))?;
            } else {
                let child = self.tables.index(new & SPTE_ADDR);
                self.link_add(child, EntryAt::new(sp, index))?;
            }
            self.tables.table(sp)[index] = new;
        }
        Ok(())
    }

    fn clear_entries(&mut self, sp: SpId) {
        for index in 0..512 {
            let e = self.tables.table(sp)[index];
            if e & SPTE_P != 0 {
                self.drop_entry(sp, index, e);
                self.tables.table(sp)[index] = 0;
                self.st.tlb_dirty = true;
            }
        }
    }

    /// Unshadows sp `i`: unlinked from every parent, its entries dropped, its page
    /// freed. Not for pinned sps.
    pub(super) fn zap(&mut self, i: SpId) {
        let mut next = self.sps[i.index()].parents;
        while let Some(n) = next {
            let l = self.links[n.index()];
            self.tables.table(l.at.sp())[l.at.index()] = 0;
            self.st.tlb_dirty = true;
            self.links[n.index()].next = self.st.free_link;
            self.st.free_link = Some(n);
            next = l.next;
        }
        self.sps[i.index()].parents = None;
        self.clear_entries(i);
        // Out of the hash chain.
        let gfn = self.sps[i.index()].gfn;
        let b = hash(gfn, self.buckets.len());
        if self.buckets[b] == Some(i) {
            self.buckets[b] = self.sps[i.index()].hash_next;
        } else {
            let mut at = self.buckets[b];
            while let Some(p) = at {
                let next = self.sps[p.index()].hash_next;
                if next == Some(i) {
                    self.sps[p.index()].hash_next = self.sps[i.index()].hash_next;
                    break;
                }
                at = next;
            }
        }
        if self.sps[i.index()].unsync {
            if let Some(k) = self.unsync[..self.st.n_unsync].iter().position(|&u| u == i) {
                self.st.n_unsync -= 1;
                self.unsync[k] = self.unsync[self.st.n_unsync];
                if self.sps[i.index()].role.mid_level() {
                    self.st.n_unsync_mid -= 1;
                }
            }
        }
        self.lru_unlink(i);
        self.sps[i.index()] = Sp {
            hash_next: self.st.zapped,
            ..Sp::default()
        };
        self.st.zapped = Some(i);
        self.st.stats.pages_in_use -= 1;
        self.st.stats.zaps += 1;
    }
}
