// SPDX-License-Identifier: GPL-2.0

//! Reverse maps: the parent links, which say which entries of which shadows point at a
//! shadow page (to unlink it everywhere, and to search up from it for a pinned root or
//! a given root), and the rmap, which says which leaf entries map a host frame (to
//! write-protect a shadowed guest table wherever it is mapped).

use super::*;

impl<T: Tables> Pool<'_, T> {
    pub(super) fn link_add(&mut self, child: u32, parent_at: u32) -> Result<(), Full> {
        let n = self.st.free_link;
        let n = if n != NIL {
            self.st.free_link = self.links[n as usize].next;
            n
        } else if (self.st.link_hwm as usize) < self.links.len() {
            self.st.link_hwm += 1;
            self.st.link_hwm - 1
        } else {
            return Err(Full);
        };
        self.links[n as usize] = Link {
            at: parent_at,
            next: self.sps[child as usize].parents,
        };
        self.sps[child as usize].parents = n;
        Ok(())
    }

    pub(super) fn link_remove(&mut self, child: u32, parent_at: u32) {
        let mut prev = NIL;
        let mut n = self.sps[child as usize].parents;
        while n != NIL {
            let l = self.links[n as usize];
            if l.at == parent_at {
                if prev == NIL {
                    self.sps[child as usize].parents = l.next;
                } else {
                    self.links[prev as usize].next = l.next;
                }
                self.links[n as usize].next = self.st.free_link;
                self.st.free_link = n;
                return;
            }
            prev = n;
            n = l.next;
        }
    }

    pub(super) fn rmap_add(&mut self, hpa: u64, leaf_at: u32) -> Result<(), Full> {
        let n = self.st.free_rmap;
        let n = if n != NIL {
            self.st.free_rmap = self.rmaps[n as usize].next;
            n
        } else if (self.st.rmap_hwm as usize) < self.rmaps.len() {
            self.st.rmap_hwm += 1;
            self.st.rmap_hwm - 1
        } else {
            return Err(Full);
        };
        let b = hash(hpa >> 12, self.rbuckets.len());
        self.rmaps[n as usize] = Rmap {
            hpa,
            at: leaf_at,
            next: self.rbuckets[b],
        };
        self.rbuckets[b] = n;
        Ok(())
    }

    pub(super) fn rmap_remove(&mut self, hpa: u64, leaf_at: u32) {
        let b = hash(hpa >> 12, self.rbuckets.len());
        let mut prev = NIL;
        let mut n = self.rbuckets[b];
        while n != NIL {
            let r = self.rmaps[n as usize];
            if r.at == leaf_at && r.hpa == hpa {
                if prev == NIL {
                    self.rbuckets[b] = r.next;
                } else {
                    self.rmaps[prev as usize].next = r.next;
                }
                self.rmaps[n as usize].next = self.st.free_rmap;
                self.st.free_rmap = n;
                return;
            }
            prev = n;
            n = r.next;
        }
    }

    /// Clears R/W in every leaf that maps host frame `hpa`.
    fn write_protect_hpa(&mut self, hpa: u64) {
        let mut n = self.rbuckets[hash(hpa >> 12, self.rbuckets.len())];
        while n != NIL {
            let r = self.rmaps[n as usize];
            if r.hpa == hpa {
                let e = &mut self.tables.table(r.at >> 9)[(r.at & 511) as usize];
                if *e & SPTE_RW != 0 {
                    *e &= !SPTE_RW;
                    self.st.tlb_dirty = true;
                }
            }
            n = r.next;
        }
    }

    pub(super) fn write_protect(&mut self, guest: &mut impl GuestPhys, gfn: u64) {
        if let Some((hpa, _)) = guest.host_pa(gfn << 12) {
            self.write_protect_hpa(hpa & SPTE_ADDR);
        }
    }

    /// Starts a search up the parent links: each sp is visited at most once per search,
    /// so a search costs at most the pool's sps and links, whatever the guest's tables'
    /// fan-in (page directories whose 512 entries all point at one table would make the
    /// paths up from a leaf 512^3).
    fn new_visit(&mut self) {
        self.st.visit = self.st.visit.wrapping_add(1);
        if self.st.visit == 0 {
            for sp in self.sps.iter_mut() {
                sp.visit = 0;
            }
            self.st.visit = 1;
        }
    }

    /// Marks sp `i` visited by the current search; false if it already was. (An sp is
    /// always reached at the same distance from where the search started: a parent is
    /// one level up.)
    fn first_visit(&mut self, i: u32) -> bool {
        self.st.stats.parent_visits += 1;
        let sp = &mut self.sps[i as usize];
        if sp.visit == self.st.visit {
            return false;
        }
        sp.visit = self.st.visit;
        true
    }

    /// Whether a pinned sp is sp `i` or above it (through parent links, at most `depth`
    /// levels up; deeper counts as yes).
    pub(super) fn rooted(&mut self, i: u32, depth: u8) -> bool {
        self.new_visit();
        self.rooted_from(i, depth)
    }

    fn rooted_from(&mut self, i: u32, depth: u8) -> bool {
        let sp = &self.sps[i as usize];
        if sp.pins > 0 || depth == 0 {
            return true;
        }
        if !self.first_visit(i) {
            // Searched already, found nothing.
            return false;
        }
        let mut n = self.sps[i as usize].parents;
        while n != NIL {
            let l = self.links[n as usize];
            if self.rooted_from(l.at >> 9, depth - 1) {
                return true;
            }
            n = l.next;
        }
        false
    }

    /// Whether sp `i` is `top` or linked below it (through parent links, at most
    /// `depth` levels up).
    pub(super) fn under(&mut self, i: u32, top: u32, depth: u8) -> bool {
        self.new_visit();
        self.under_from(i, top, depth)
    }

    fn under_from(&mut self, i: u32, top: u32, depth: u8) -> bool {
        if i == top {
            return true;
        }
        if depth == 0 || !self.first_visit(i) {
            return false;
        }
        let mut n = self.sps[i as usize].parents;
        while n != NIL {
            let l = self.links[n as usize];
            if self.under_from(l.at >> 9, top, depth - 1) {
                return true;
            }
            n = l.next;
        }
        false
    }
}
