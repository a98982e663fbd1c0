// SPDX-License-Identifier: GPL-2.0

//! The shadow page store: every shadow page's metadata, found by guest frame and role
//! through a hash, kept in least-recently-used order, handed out from the free list (or
//! the untouched pages above the high-water mark) and reclaimed, the least recently
//! used first, when the pool is full; zapped pages wait for a remote flush before they
//! are used again.

use super::*;

impl<T: Tables> Pool<'_, T> {
    /// Makes every page free and forgets every shadow (the tables must be zero, as
    /// after creation).
    pub fn init(&mut self) {
        for sp in self.sps.iter_mut() {
            *sp = Sp::default();
        }
        self.buckets.fill(None);
        self.rbuckets.fill(None);
        self.st.free_sp = None;
        self.st.zapped = None;
        self.st.free_link = None;
        self.st.free_rmap = None;
        self.st.sp_hwm = 0;
        self.st.link_hwm = 0;
        self.st.rmap_hwm = 0;
        self.st.lru_head = None;
        self.st.lru_tail = None;
        self.st.n_unsync = 0;
        self.st.n_unsync_mid = 0;
        self.st.maybe_orphans = false;
        self.st.n_orphans = 0;
        self.st.n_roots = 0;
        self.st.stats.pages_in_use = 0;
    }

    /// Drops every shadow, roots included; vCPUs must load their roots again (the
    /// generation changes). Costs what the pool used, not its size (this runs with the
    /// pool lock held and interrupts off).
    pub fn reset(&mut self) {
        // Every page handed out so far waits for the remote flush before it is used
        // again (a vCPU still in guest mode may be walking it); their tables are zeroed
        // now, so that such a vCPU sees not-present entries.
        self.st.zapped = None;
        for i in (0..self.st.sp_hwm).rev().map(SpId::new) {
            if self.sps[i.index()].valid {
                self.tables.table(i).fill(0);
                self.st.stats.zaps += 1;
            }
            self.sps[i.index()] = Sp {
                hash_next: self.st.zapped,
                ..Sp::default()
            };
            self.st.zapped = Some(i);
        }
        self.st.free_sp = None;
        // Metadata is the pool's alone: reused at once.
        for i in 0..self.st.rmap_hwm as usize {
            let b = hash(self.rmaps[i].hpa >> 12, self.rbuckets.len());
            self.rbuckets[b] = None;
        }
        self.buckets.fill(None);
        self.st.free_link = None;
        self.st.free_rmap = None;
        self.st.link_hwm = 0;
        self.st.rmap_hwm = 0;
        self.st.lru_head = None;
        self.st.lru_tail = None;
        self.st.n_unsync = 0;
        self.st.n_unsync_mid = 0;
        self.st.maybe_orphans = false;
        self.st.n_orphans = 0;
        self.st.n_roots = 0;
        self.st.stats.pages_in_use = 0;
        self.st.generation = self.st.generation.wrapping_add(1);
        self.st.tlb_dirty = true;
        self.st.stats.resets += 1;
    }

    /// The remote flush that lets zapped pages be used again: every vCPU leaves guest
    /// mode (and its next entry checks the generation), then the zapped pages join the
    /// free list. Also settles `tlb_dirty`: nothing changed before it is cached anywhere.
    pub fn commit_zapped(&mut self) {
        self.tables.flush_remote(self.st.generation);
        self.st.tlb_dirty = false;
        while let Some(i) = self.st.zapped {
            self.st.zapped = self.sps[i.index()].hash_next;
            self.sps[i.index()].hash_next = self.st.free_sp;
            self.st.free_sp = Some(i);
        }
    }

    /// A vCPU whose guest memory map has generation `map` is about to use the pool:
    /// whether it may. Shadow entries hold host frames of the map they were made from,
    /// so a vCPU with an older map may not use them (it takes the new map first), and a
    /// newer map drops every shadow (the pool resets, as when the map changed).
    pub fn take_map(&mut self, map: u64) -> MapCheck {
        if map == self.st.slots_generation {
            MapCheck::Current
        } else if map < self.st.slots_generation {
            MapCheck::Older
        } else {
            self.reset();
            self.st.slots_generation = map;
            MapCheck::Reset
        }
    }

    /// Makes every other vCPU drop the translations it may hold from entries that lost
    /// rights or went away (a remote flush, if there are any): from then on the pool
    /// may rely on the change, e.g. read a table it write-protected knowing that a
    /// store into it faults. The module calls it before it drops the pool lock.
    pub fn flush_tlbs(&mut self) {
        if self.st.tlb_dirty {
            self.commit_zapped();
        }
    }

    pub(super) fn find(&self, gfn: u64, role: Role) -> Option<SpId> {
        let mut next = self.buckets[hash(gfn, self.buckets.len())];
        while let Some(i) = next {
            let sp = &self.sps[i.index()];
            if sp.gfn == gfn && sp.role == role {
                return Some(i);
            }
            next = sp.hash_next;
        }
        None
    }

    /// The shadows of guest table `gfn` (not the direct ones), through `f`.
    pub(super) fn for_gfn(&self, gfn: u64, mut f: impl FnMut(SpId, &Sp)) {
        let mut next = self.buckets[hash(gfn, self.buckets.len())];
        while let Some(i) = next {
            let sp = &self.sps[i.index()];
            next = sp.hash_next;
            if sp.gfn == gfn && !sp.role.direct() {
                f(i, sp);
            }
        }
    }

    /// Calls `f` on each shadow of guest table `gfn` in turn; `f` may zap the one it is
    /// given (and no other).
    pub(super) fn each_shadow(&mut self, gfn: u64, mut f: impl FnMut(&mut Self, SpId)) {
        let mut next = self.buckets[hash(gfn, self.buckets.len())];
        while let Some(i) = next {
            let sp = &self.sps[i.index()];
            next = sp.hash_next;
            if sp.gfn == gfn && !sp.role.direct() {
                f(self, i);
            }
        }
    }

    pub(super) fn lru_unlink(&mut self, i: SpId) {
        let (p, n) = {
            let sp = &self.sps[i.index()];
            (sp.lru_prev, sp.lru_next)
        };
        match p {
            Some(p) => self.sps[p.index()].lru_next = n,
            None => self.st.lru_head = n,
        }
        match n {
            Some(n) => self.sps[n.index()].lru_prev = p,
            None => self.st.lru_tail = p,
        }
    }

    fn lru_push(&mut self, i: SpId) {
        let h = self.st.lru_head;
        {
            let sp = &mut self.sps[i.index()];
            sp.lru_prev = None;
            sp.lru_next = h;
        }
        match h {
            Some(h) => self.sps[h.index()].lru_prev = Some(i),
            None => self.st.lru_tail = Some(i),
        }
        self.st.lru_head = Some(i);
    }

    /// Marks sp `i` as just used.
    pub(super) fn touch(&mut self, i: SpId) {
        if self.st.lru_head != Some(i) {
            self.lru_unlink(i);
            self.lru_push(i);
        }
    }

    /// Takes a free sp off the free list.
    fn pop_free(&mut self) -> Option<SpId> {
        let i = self.st.free_sp?;
        self.st.free_sp = self.sps[i.index()].hash_next;
        Some(i)
    }

    pub(super) fn alloc_sp(&mut self, gfn: u64, role: Role) -> Result<SpId, Full> {
        let i = if let Some(i) = self.pop_free() {
            i
        } else if self.st.sp_hwm < self.st.sp_cap && (self.st.sp_hwm as usize) < self.sps.len() {
            // Never used (its table is zero).
            self.st.sp_hwm += 1;
            SpId::new(self.st.sp_hwm - 1)
        } else {
            if self.st.zapped.is_none() {
                self.reclaim()?;
            }
            self.commit_zapped();
            // A reclaim zaps at least one sp, and the remote flush frees what is zapped.
            self.pop_free().ok_or(Full)?
        };
        let b = hash(gfn, self.buckets.len());
        self.sps[i.index()] = Sp {
            gfn,
            role,
            valid: true,
            hash_next: self.buckets[b],
            ..Sp::default()
        };
        self.buckets[b] = Some(i);
        self.lru_push(i);
        let s = &mut self.st.stats;
        s.pages_in_use += 1;
        s.pages_peak = s.pages_peak.max(s.pages_in_use);
        Ok(i)
    }

    /// Zaps the least recently used sps that nothing pins, a batch of them (a
    /// sixteenth of the pool): each reclaim costs a remote flush before the pages are
    /// used again.
    fn reclaim(&mut self) -> Result<(), Full> {
        let batch = (self.st.sp_cap.min(self.sps.len() as u32) as usize / 16).max(1);
        let mut done = 0;
        let mut next = self.st.lru_tail;
        while let Some(i) = next.filter(|_| done < batch) {
            next = self.sps[i.index()].lru_prev;
            if self.sps[i.index()].pins == 0 {
                self.zap(i);
                self.st.stats.reclaimed += 1;
                done += 1;
            }
        }
        if done == 0 {
            return Err(Full);
        }
        Ok(())
    }
}
