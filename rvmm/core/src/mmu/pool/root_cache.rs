// SPDX-License-Identifier: GPL-2.0

//! The root cache: MOV CR3 finds or builds the root for a CR3 and keeps the most
//! recently loaded roots pinned; vCPUs hold references on their roots.

use super::*;

impl<T: Tables> Pool<'_, T> {
    /// MOV CR3: returns the root for `cr3` under `ctx`, from the pool if it is there;
    /// with `flush` (any MOV CR3 without PCIDs, or with bit 63 clear) out-of-sync
    /// shadows are brought up to date first (with PCIDs and bit 63 set, the TLB may keep
    /// stale entries, and so may the shadow). `vcpu` is the loading vCPU's index (a PAE
    /// root is its PDPTE registers), `prev` its current root (unpinned), if any.
    ///
    /// The sync stops after `budget` ([`SYNC_BUDGET`], or `u32::MAX` for all of it):
    /// `None` then, with the vCPU still on `prev`; it runs the instruction again.
    #[allow(clippy::too_many_arguments)]
    pub fn load_root(
        &mut self,
        guest: &mut impl GuestPhys,
        mode: PagingMode,
        cr3: u64,
        vcpu: u32,
        ctx: &PermCtx,
        prev: Option<SpId>,
        flush: bool,
        budget: u32,
    ) -> Result<Option<SpId>, Full> {
        let (m, pse, cr3) = match mode {
            PagingMode::Long4 => (MODE_LONG4, false, cr3 & (ctx.phys_mask())),
            PagingMode::Pae => (MODE_PAE, false, cr3 & 0xffff_ffe0),
            PagingMode::Bits32 { pse } => (MODE_BITS32, pse, cr3 & 0xffff_f000),
            PagingMode::None => (MODE_NONE, false, 0),
        };
        let gfn = cr3 >> 12;
        let role = Role::root(ctx, m, pse, cr3, vcpu);
        let r = match self.find(gfn, role) {
            Some(r) => {
                self.st.stats.root_hits += 1;
                r
            }
            None => {
                self.st.stats.root_misses += 1;
                let r = self.alloc_sp(gfn, role)?;
                if !role.direct() {
                    self.protect_new(guest, r);
                }
                r
            }
        };
        if !self.sps[r.index()].cached {
            // Cached roots are pinned: their place in the LRU list matters only once
            // they leave the cache.
            self.touch(r);
        }
        if flush {
            // What this root reaches comes up to date (pinned meanwhile: a sync
            // unshadows orphans). The previous root keeps its pin until the sync is
            // done: the vCPU runs on it if the sync takes more than one call.
            self.sps[r.index()].pins += 1;
            let synced = self.sync_some(guest, ctx, false, Some(r), budget, SyncCause::Cr3);
            self.sps[r.index()].pins -= 1;
            if !synced? {
                self.st.stats.sync_steps += 1;
                return Ok(None);
            }
        }
        // The vCPU's reference moves to the new root.
        self.sps[r.index()].pins += 1;
        if let Some(prev) = prev.filter(|p| self.sps[p.index()].valid) {
            let p = &mut self.sps[prev.index()].pins;
            *p = p.saturating_sub(1);
        }
        if m == MODE_PAE {
            // MOV CR3 loads the four PDPTEs: the root is their copy.
            for j in 0..4 {
                let pdpte = guest.read_entry(cr3 + 8 * j as u64, 8).unwrap_or(0);
                let sp = self.sps[r.index()];
                match Self::expected_child(&sp, j, pdpte, ctx) {
                    Some((gfn, role)) => {
                        // The vCPU is on this root already: all of it now.
                        self.child(guest, r, j, gfn, role, ctx, u32::MAX)?;
                    }
                    None => self.set_entry(r, j, 0)?,
                }
            }
        }
        // The root cache: a hit only refreshes the root's stamp; a new root takes a free
        // place or the least recently loaded one's.
        self.st.clock += 1;
        let sp = &mut self.sps[r.index()];
        sp.stamp = self.st.clock;
        if !sp.cached {
            sp.cached = true;
            sp.pins += 1;
            let n = self.st.n_roots;
            if n < self.st.max_roots {
                self.st.roots[n] = Some(r);
                self.st.n_roots += 1;
            } else {
                // The first `n_roots` places all hold a root.
                let stamp = |root: Option<SpId>| root.map_or(0, |i| self.sps[i.index()].stamp);
                let mut k = 0;
                for j in 1..n {
                    if stamp(self.st.roots[j]) < stamp(self.st.roots[k]) {
                        k = j;
                    }
                }
                if let Some(i) = self.st.roots[k] {
                    let old = &mut self.sps[i.index()];
                    old.cached = false;
                    old.pins -= 1;
                }
                self.st.roots[k] = Some(r);
            }
        }
        Ok(Some(r))
    }

    /// Takes a reference on sp `i` (a vCPU's cache of recent roots): it is not reclaimed
    /// while referenced.
    pub fn pin(&mut self, i: SpId) {
        if self.sps[i.index()].valid {
            self.sps[i.index()].pins += 1;
        }
    }

    /// Drops a reference [`Pool::pin`] took.
    pub fn unpin(&mut self, i: SpId) {
        if self.sps[i.index()].valid && self.sps[i.index()].pins > 0 {
            self.sps[i.index()].pins -= 1;
        }
    }

    /// Drops the vCPU's reference to its root (it leaves 4-level paging, or goes away).
    pub fn put_root(&mut self, root: SpId) {
        if self.sps[root.index()].valid && self.sps[root.index()].pins > 0 {
            self.sps[root.index()].pins -= 1;
        }
    }

    /// The host-physical address of a root's table (the real CR3).
    pub fn root_pa(&self, root: SpId) -> u64 {
        self.tables.pa(root)
    }
}
