// SPDX-License-Identifier: GPL-2.0

//! Out-of-sync shadows: a guest write to a shadowed table unsyncs its shadows; a flush
//! brings the ones it reaches back in sync (in steps, within a budget), and a shadow
//! that joins a tree is synced first; an unsync shadow that no pinned root reaches is
//! unshadowed.

use super::*;

impl<T: Tables> Pool<'_, T> {
    pub(super) fn mark_unsync(&mut self, i: SpId) {
        let sp = &mut self.sps[i.index()];
        if !sp.unsync {
            sp.unsync = true;
            self.unsync[self.st.n_unsync] = i;
            self.st.n_unsync += 1;
            if sp.role.mid_level() {
                self.st.n_unsync_mid += 1;
            }
            if sp.role.level() > 1 {
                self.st.stats.unsyncs_upper += 1;
            }
            self.st.stats.unsyncs += 1;
            if !self.flag_roots_above(i) {
                self.orphan_candidate(i);
            }
        }
    }

    /// The guest wrote (or is about to write) its table at `gfn`: its shadows go out
    /// of sync, or are unshadowed if the table is written over and over without use.
    pub(super) fn unsync_gfn(&mut self, gfn: u64) {
        self.st.stats.pt_writes += 1;
        let flooded = self.flooded(gfn);
        self.each_shadow(gfn, |pool, i| {
            if !pool.written(i, flooded) {
                pool.mark_unsync(i);
            }
        });
    }

    /// Brings sp `i` back in sync with the guest table: leaves are recomputed in place
    /// from the guest's entries (or dropped), links to children whose guest entry
    /// changed are dropped.
    fn resync(&mut self, guest: &mut impl GuestPhys, i: SpId, ctx: &PermCtx) -> Result<(), Full> {
        for index in 0..512 {
            if let Some(changed) = self.resync_entry(guest, i, index, ctx)? {
                self.st.stats.resync_entries += 1;
                self.st.stats.resync_changed += u64::from(changed);
            }
        }
        self.st.stats.resyncs += 1;
        Ok(())
    }

    /// Entry `index` of sp `i` from the guest's entry: a leaf recomputed (or dropped), a
    /// link kept while the guest entry still leads to the same shadow (else dropped).
    /// Returns, for a present entry that follows guest memory, whether it changed.
    pub(super) fn resync_entry(
        &mut self,
        guest: &mut impl GuestPhys,
        i: SpId,
        index: usize,
        ctx: &PermCtx,
    ) -> Result<Option<bool>, Full> {
        let e = self.tables.table(i)[index];
        if e & SPTE_P == 0 {
            return Ok(None);
        }
        let sp = self.sps[i.index()];
        let Some((gpa, size)) = Self::gentry(&sp, index) else {
            // Root quadrants and PDPTE copies do not follow guest memory.
            return Ok(None);
        };
        // Its own controls, not the caller's (a global flush or a table write reaches
        // shadows of every role).
        let ctx = &sp.role.perm_ctx(ctx);
        let pte = guest.read_entry(gpa, size).unwrap_or(0);
        let new = if sp.role.level() == 1 {
            self.leaf_from_pte(guest, sp.role, pte, ctx).unwrap_or(0)
        } else {
            // Keep the link while the guest entry still leads to the same shadow.
            let child = self.sps[self.tables.index(e & SPTE_ADDR).index()];
            match Self::expected_child(&sp, index, pte, ctx) {
                Some((gfn, role)) if gfn == child.gfn && role == child.role => e,
                _ => 0,
            }
        };
        self.set_entry(i, index, new)?;
        Ok(Some(new != e))
    }

    /// Resyncs the unsync shadows under `top` (`None`: every one), or only the upper-level
    /// ones (INVLPG flushes the paging-structure caches); then write-protects their
    /// tables. A flushing CR3 load syncs what its root reaches: tables only other
    /// address spaces use may stay out of sync (a dead process's are never synced
    /// again); linking a shadow into a tree syncs what it brings along ([`Pool::child`]).
    ///
    /// In steps: stops once what it looked at and the shadows it took on cost `budget`
    /// (see [`SYNC_BUDGET`]; at least one shadow per call, so that calls make
    /// progress; `u32::MAX`: all of it). Returns whether nothing it had to do is left.
    /// A shadow left out of sync stays as correct as before the call (its table
    /// writable, its entries stale).
    pub(super) fn sync_some(
        &mut self,
        guest: &mut impl GuestPhys,
        ctx: &PermCtx,
        upper_only: bool,
        top: Option<SpId>,
        budget: u32,
        cause: SyncCause,
    ) -> Result<bool, Full> {
        if self.st.n_unsync == 0 {
            self.st.n_orphans = 0;
            return Ok(true);
        }
        if let Some(orphans) = top.and_then(|t| self.nothing_below(t, upper_only)) {
            if orphans {
                self.unshadow_orphans();
            }
            return Ok(true);
        }
        self.st.stats.syncs[cause as usize] += 1;
        // Out of sync no more first, so that leaves computed below see every table
        // that must stay protected.
        let bounded = budget != u32::MAX;
        let mut k = 0;
        let mut done = 0;
        // Work so far: a unit per shadow looked at and per parent visited, and what
        // the shadows taken on cost.
        let mut spent = 0u32;
        let mut visits = self.st.stats.parent_visits;
        let mut progress = false;
        while k < self.st.n_unsync {
            if bounded && progress && spent > budget {
                break;
            }
            spent = spent.saturating_add(1);
            self.st.stats.sync_scanned += 1;
            let i = self.unsync[k];
            if upper_only && self.sps[i.index()].role.level() == 1 {
                k += 1;
                continue;
            }
            // Under `top` (one walk up the parent links; such an sp is rooted: `top`
            // is pinned), else an orphan, else another address space's.
            let in_scope = top.is_none_or(|top| self.under(i, top, 4));
            let orphan = (top.is_none() || !in_scope) && !self.rooted(i, 4);
            let v = self.st.stats.parent_visits;
            spent = spent.saturating_add(u32::try_from(v - visits).unwrap_or(u32::MAX));
            visits = v;
            if !in_scope && !orphan {
                k += 1;
                continue;
            }
            let cost = if bounded {
                SYNC_SHADOW_COST + self.present_entries(i)
            } else {
                0
            };
            if progress && spent.saturating_add(cost) > budget {
                // The rest in a later call.
                break;
            }
            spent = spent.saturating_add(cost);
            progress = true;
            self.sps[i.index()].unsync = false;
            self.st.n_unsync -= 1;
            self.unsync[k] = self.unsync[self.st.n_unsync];
            if self.sps[i.index()].role.mid_level() {
                self.st.n_unsync_mid -= 1;
            }
            if orphan {
                // An orphan (a dead process's table, whose tree dropped it): unshadowed
                // rather than synced. No pinned sp (a vCPU's root, a cached root, a
                // fault's path) reaches it, so no CPU's TLB can hold anything of it
                // now: no remote flush for this.
                let dirty = self.st.tlb_dirty;
                self.zap(i);
                self.st.tlb_dirty = dirty;
                self.st.stats.flood_unshadows += 1;
                continue;
            }
            // Keep the ones to resync after the live list.
            self.unsync[self.sps.len() - 1 - done] = i;
            done += 1;
        }
        let complete = k >= self.st.n_unsync;
        // Protected, the protection in every TLB, then read: another vCPU's store into
        // the table lands before the flush (and is read) or faults after it (and is
        // followed), never in between unseen.
        for d in 0..done {
            let i = self.unsync[self.sps.len() - 1 - d];
            let sp = self.sps[i.index()];
            if sp.valid && !sp.unsync {
                self.write_protect(guest, sp.gfn);
            }
        }
        self.flush_tlbs();
        for d in 0..done {
            let i = self.unsync[self.sps.len() - 1 - d];
            if self.sps[i.index()].valid {
                self.resync(guest, i, ctx)?;
            }
        }
        if complete && !upper_only {
            // Everything under `top` is in sync, and every orphan was unshadowed.
            if let Some(r) = top {
                self.sps[r.index()].unsync_below = false;
            }
            self.st.maybe_orphans = false;
            self.st.n_orphans = 0;
        }
        Ok(complete)
    }

    /// Present entries of sp `i` (what its resync costs).
    fn present_entries(&mut self, i: SpId) -> u32 {
        self.tables
            .table(i)
            .iter()
            .filter(|&&e| e & SPTE_P != 0)
            .count() as u32
    }

    /// The sp for guest table (or large-page piece) `gfn` with `role`, built if
    /// missing; linked from entry `index` of `parent`. `None` if an existing shadow
    /// has more out of sync under it than `budget` (see [`Pool::load_root`]) covers:
    /// not linked yet, and the fault is taken again.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn child(
        &mut self,
        guest: &mut impl GuestPhys,
        parent: SpId,
        index: usize,
        gfn: u64,
        role: Role,
        ctx: &PermCtx,
        budget: u32,
    ) -> Result<Option<(SpId, bool)>, Full> {
        let e = self.tables.table(parent)[index];
        if e & SPTE_P != 0 {
            let c = self.tables.index(e & SPTE_ADDR);
            let sp = &self.sps[c.index()];
            if sp.gfn == gfn && sp.role == role {
                return Ok(Some((c, false)));
            }
        }
        let found = self.find(gfn, role);
        let fresh = found.is_none();
        let c = match found {
            None => {
                let c = self.alloc_sp(gfn, role)?;
                if !role.direct() {
                    self.protect_new(guest, c);
                }
                c
            }
            Some(c) => {
                if !role.direct() {
                    // An existing shadow joins this tree: what went out of sync under
                    // it before this address space's last flush must not show through
                    // it. Synced before the link (pinned meanwhile: a sync unshadows
                    // orphans), so that a sync in steps never exposes a half-synced
                    // tree.
                    self.sps[c.index()].pins += 1;
                    let synced =
                        self.sync_some(guest, ctx, false, Some(c), budget, SyncCause::Link);
                    self.sps[c.index()].pins -= 1;
                    if !synced? {
                        self.st.stats.sync_steps += 1;
                        return Ok(None);
                    }
                }
                c
            }
        };
        let prole = self.sps[parent.index()].role;
        let pa = self.tables.pa(c);
        // The CPU loads a PAE-format root's four entries as PDPTEs: P and address only.
        let e = if prole.level() == 3 && prole.mode() != MODE_LONG4 {
            spte::pae_pdpte(pa)
        } else {
            spte::table(pa)
        };
        self.set_entry(parent, index, e)?;
        if self.sps[c.index()].unsync {
            // A new shadow that joined its table's shadows out of sync.
            self.flag_roots_above(c);
        }
        Ok(Some((c, fresh)))
    }

    /// Whether entry `j` of sp `sp`'s guest table still holds `pte`, what a walk read
    /// before the table was write-protected (a shadow made during this fault): checked
    /// once the protection is in every TLB, so that another vCPU's store that landed in
    /// between is not lost under a shadow that counts as in sync (the fault is taken
    /// again instead, as KVM's gpte_changed does).
    pub(super) fn gpte_unchanged(
        &mut self,
        guest: &mut impl GuestPhys,
        sp: SpId,
        j: usize,
        pte: u64,
    ) -> bool {
        let Some((gpa, size)) = Self::gentry(&self.sps[sp.index()], j) else {
            return true;
        };
        self.flush_tlbs();
        guest.read_entry(gpa, size) == Some(pte)
    }

    /// A new shadow of a guest table: in sync and write-protected, unless the table's
    /// other shadows are out of sync (then it joins them).
    pub(super) fn protect_new(&mut self, guest: &mut impl GuestPhys, c: SpId) {
        let gfn = self.sps[c.index()].gfn;
        let mut others_unsync = false;
        self.for_gfn(gfn, |i, sp| others_unsync |= i != c && sp.unsync);
        if others_unsync {
            self.mark_unsync(c);
            self.st.stats.unsyncs -= 1;
        } else {
            self.write_protect(guest, gfn);
        }
    }

    /// Whether [`Pool::sync_some`] under `top` (upper levels only for INVLPG) has a
    /// search to make, rather than returning at once: what a vCPU asks, under the pool
    /// lock, before it starts a sync step late in its run section.
    pub fn sync_needed(&self, top: SpId, upper_only: bool) -> bool {
        self.st.n_unsync != 0 && self.nothing_below(top, upper_only).is_none()
    }

    /// The O(1) answers of a sync under `top` with shadows out of sync somewhere:
    /// `Some` when it has nothing to search (`true`: it may unshadow orphan candidates
    /// instead), `None` when it must search.
    fn nothing_below(&self, top: SpId, upper_only: bool) -> Option<bool> {
        let t = &self.sps[top.index()];
        // INVLPG's check while the root and every upper-level shadow below a root are
        // in sync (their writes are emulated, or the shadows zapped: nearly always).
        // Other roots out of sync (dead processes' tables, still cached) are not under
        // this one.
        if upper_only && self.st.n_unsync_mid == 0 && !t.unsync {
            return Some(false);
        }
        // Nothing out of sync below `top` since its last complete sync (a CR3 load back
        // to an address space whose tables did not change; a table linked into another
        // tree), unless an orphan may wait to be unshadowed beyond the candidates. Such
        // a sync unshadows the candidates instead (bounded like a step; a search finds
        // the orphans itself).
        (!t.unsync_below && !self.st.maybe_orphans).then_some(true)
    }

    /// Sp `i`, out of sync, may reach no root any more (see [`State::orphans`]).
    pub(super) fn orphan_candidate(&mut self, i: SpId) {
        match self.st.orphans.get_mut(self.st.n_orphans) {
            Some(slot) => {
                *slot = Some(i);
                self.st.n_orphans += 1;
            }
            None => self.st.maybe_orphans = true,
        }
    }

    /// Unshadows the orphan candidates that are orphans: out of sync and reached by no
    /// pinned sp (a vCPU's root, a cached root, a fault's path), so that no CPU's TLB
    /// can hold anything of them: no remote flush for this. About a sync step's work
    /// per call (a dead process's tables come down over several syncs).
    fn unshadow_orphans(&mut self) {
        let mut spent = 0u32;
        while self.st.n_orphans > 0 && spent <= SYNC_BUDGET {
            self.st.n_orphans -= 1;
            let Some(i) = self.st.orphans[self.st.n_orphans] else {
                continue;
            };
            let sp = self.sps[i.index()];
            if sp.valid && sp.unsync && !self.rooted(i, 4) {
                spent = spent.saturating_add(SYNC_SHADOW_COST + self.present_entries(i));
                let dirty = self.st.tlb_dirty;
                // (What it links to that is out of sync becomes a candidate in turn.)
                self.zap(i);
                self.st.tlb_dirty = dirty;
                self.st.stats.flood_unshadows += 1;
            }
        }
    }

    /// Number of shadows out of sync now.
    pub fn unsync_count(&self) -> usize {
        self.st.n_unsync
    }
}
