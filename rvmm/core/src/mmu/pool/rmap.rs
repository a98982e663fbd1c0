// SPDX-License-Identifier: GPL-2.0

//! Reverse maps: the parent links, which say which entries of which shadows point at a
//! shadow page (to unlink it everywhere, and to search up from it for a pinned root or
//! a given root), and the rmap, which says which leaf entries map a host frame (to
//! write-protect a shadowed guest table wherever it is mapped).

use super::*;

impl<T: Tables> Pool<'_, T> {
    pub(super) fn link_add(&mut self, child: SpId, parent_at: EntryAt) -> Result<(), Full> {
        let n = if let Some(n) = self.st.free_link {
            self.st.free_link = self.links[n.index()].next;
            n
        } else if (self.st.link_hwm as usize) < self.links.len() {
            self.st.link_hwm += 1;
            LinkId::new(self.st.link_hwm - 1)
        } else {
            return Err(Full);
        };
        self.links[n.index()] = Link {
            at: parent_at,
            next: self.sps[child.index()].parents,
        };
        self.sps[child.index()].parents = Some(n);
        Ok(())
    }

    pub(super) fn link_remove(&mut self, child: SpId, parent_at: EntryAt) {
        let mut prev: Option<LinkId> = None;
        let mut next = self.sps[child.index()].parents;
        while let Some(n) = next {
            let l = self.links[n.index()];
            if l.at == parent_at {
                match prev {
                    None => self.sps[child.index()].parents = l.next,
                    Some(p) => self.links[p.index()].next = l.next,
                }
                self.links[n.index()].next = self.st.free_link;
                self.st.free_link = Some(n);
                return;
            }
            prev = Some(n);
            next = l.next;
        }
    }

    pub(super) fn rmap_add(&mut self, hpa: u64, leaf_at: EntryAt) -> Result<(), Full> {
        let n = if let Some(n) = self.st.free_rmap {
            self.st.free_rmap = self.rmaps[n.index()].next;
            n
        } else if (self.st.rmap_hwm as usize) < self.rmaps.len() {
            self.st.rmap_hwm += 1;
            RmapId::new(self.st.rmap_hwm - 1)
        } else {
            return Err(Full);
        };
        let b = hash(hpa >> 12, self.rbuckets.len());
        self.rmaps[n.index()] = Rmap {
            hpa,
            at: leaf_at,
            next: self.rbuckets[b],
        };
        self.rbuckets[b] = Some(n);
        Ok(())
    }

    pub(super) fn rmap_remove(&mut self, hpa: u64, leaf_at: EntryAt) {
        let b = hash(hpa >> 12, self.rbuckets.len());
        let mut prev: Option<RmapId> = None;
        let mut next = self.rbuckets[b];
        while let Some(n) = next {
            let r = self.rmaps[n.index()];
            if r.at == leaf_at && r.hpa == hpa {
                match prev {
                    None => self.rbuckets[b] = r.next,
                    Some(p) => self.rmaps[p.index()].next = r.next,
                }
                self.rmaps[n.index()].next = self.st.free_rmap;
                self.st.free_rmap = Some(n);
                return;
            }
            prev = Some(n);
            next = r.next;
        }
    }

    /// Clears R/W in every leaf that maps host frame `hpa`.
    fn write_protect_hpa(&mut self, hpa: u64) {
        let mut next = self.rbuckets[hash(hpa >> 12, self.rbuckets.len())];
        while let Some(n) = next {
            let r = self.rmaps[n.index()];
            if r.hpa == hpa {
                let e = &mut self.tables.table(r.at.sp())[r.at.index()];
                if *e & SPTE_RW != 0 {
                    *e &= !SPTE_RW;
                    self.st.tlb_dirty = true;
                }
            }
            next = r.next;
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
    fn first_visit(&mut self, i: SpId) -> bool {
        self.st.stats.parent_visits += 1;
        let sp = &mut self.sps[i.index()];
        if sp.visit == self.st.visit {
            return false;
        }
        sp.visit = self.st.visit;
        true
    }

    /// Whether a pinned sp is sp `i` or above it (through parent links, at most `depth`
    /// levels up; deeper counts as yes).
    pub(super) fn rooted(&mut self, i: SpId, depth: u8) -> bool {
        self.new_visit();
        self.rooted_from(i, depth)
    }

    fn rooted_from(&mut self, i: SpId, depth: u8) -> bool {
        let sp = &self.sps[i.index()];
        if sp.pins > 0 || depth == 0 {
            return true;
        }
        if !self.first_visit(i) {
            // Searched already, found nothing.
            return false;
        }
        let mut next = self.sps[i.index()].parents;
        while let Some(n) = next {
            let l = self.links[n.index()];
            if self.rooted_from(l.at.sp(), depth - 1) {
                return true;
            }
            next = l.next;
        }
        false
    }

    /// Marks sp `i` and everything above it (through parent links) as having something
    /// out of sync below it. Returns whether it reached a root or a pinned sp (else `i`
    /// is an orphan, for a sync to unshadow).
    pub(super) fn flag_roots_above(&mut self, i: SpId) -> bool {
        self.new_visit();
        self.flag_from(i, 4)
    }

    fn flag_from(&mut self, i: SpId, depth: u8) -> bool {
        if !self.first_visit(i) {
            // Its answer is in already.
            return false;
        }
        let sp = &mut self.sps[i.index()];
        sp.unsync_below = true;
        if sp.role.root_level() {
            return true;
        }
        let mut reached = sp.pins > 0;
        // A parent is one level up: a root is at most 3 links above a leaf.
        if depth == 0 {
            return reached;
        }
        let mut next = self.sps[i.index()].parents;
        while let Some(n) = next {
            let l = self.links[n.index()];
            reached |= self.flag_from(l.at.sp(), depth - 1);
            next = l.next;
        }
        reached
    }

    /// Whether sp `i` is `top` or linked below it (through parent links, at most
    /// `depth` levels up).
    pub(super) fn under(&mut self, i: SpId, top: SpId, depth: u8) -> bool {
        self.new_visit();
        self.under_from(i, top, depth)
    }

    fn under_from(&mut self, i: SpId, top: SpId, depth: u8) -> bool {
        if i == top {
            return true;
        }
        if depth == 0 || !self.first_visit(i) {
            return false;
        }
        let mut next = self.sps[i.index()].parents;
        while let Some(n) = next {
            let l = self.links[n.index()];
            if self.under_from(l.at.sp(), top, depth - 1) {
                return true;
            }
            next = l.next;
        }
        false
    }
}
