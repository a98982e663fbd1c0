// SPDX-License-Identifier: GPL-2.0

//! TLB invalidation: INVLPG (upper-level shadows synced, the page's leaf entry
//! refreshed) and flushes of every context.

use super::*;

impl<T: Tables> Pool<'_, T> {
    /// INVLPG `gva` under root `root`: the upper-level shadows under it come back in
    /// sync (the paging-structure caches are flushed) and `gva`'s shadow entry is refreshed from
    /// the guest's PTE (dropped where it cannot be cached). False: the sync took
    /// `budget` (see [`Pool::load_root`]) and the entry is not refreshed yet; the vCPU
    /// runs the instruction again.
    pub fn invlpg(
        &mut self,
        guest: &mut impl GuestPhys,
        root: SpId,
        gva: u64,
        ctx: &PermCtx,
        budget: u32,
    ) -> Result<bool, Full> {
        // INVLPG acts on the current address space: the upper-level shadows its root
        // reaches (others, a root being filled for a new process included, wait for
        // their own flush).
        if !self.sync_some(guest, ctx, true, Some(root), budget, SyncCause::Invlpg)? {
            self.st.stats.sync_steps += 1;
            return Ok(false);
        }
        self.invlpg_entry(guest, root, gva, ctx)?;
        Ok(true)
    }

    /// INVLPG's refresh of `gva`'s leaf entry (the path down to it is in sync).
    fn invlpg_entry(
        &mut self,
        guest: &mut impl GuestPhys,
        root: SpId,
        gva: u64,
        ctx: &PermCtx,
    ) -> Result<(), Full> {
        let mut sp = root;
        let mode = self.sps[root.index()].role.mode();
        for level in (1..=top_level(mode)).rev() {
            let index = sindex(gva, level, mode);
            let e = self.tables.table(sp)[index];
            if e & SPTE_P == 0 {
                return Ok(());
            }
            if level == 1 {
                let s = self.sps[sp.index()];
                // The entry comes back from the guest's current PTE (the path down to
                // it is in sync), as KVM's invlpg does: no fault to refill it.
                let new = match Self::gentry(&s, index) {
                    None => 0,
                    Some((gpa, size)) => match guest.read_entry(gpa, size) {
                        Some(pte) => self.leaf_from_pte(guest, s.role, pte, ctx).unwrap_or(0),
                        None => 0,
                    },
                };
                return self.set_entry(sp, index, new);
            }
            sp = self.tables.index(e & SPTE_ADDR);
        }
        Ok(())
    }

    /// Flushes every TLB entry (INVPCID of all contexts, a single context): every
    /// out-of-sync shadow is brought up to date. False: the sync took `budget` (see
    /// [`Pool::load_root`]); the vCPU runs the instruction again.
    pub fn flush_all(
        &mut self,
        guest: &mut impl GuestPhys,
        ctx: &PermCtx,
        budget: u32,
    ) -> Result<bool, Full> {
        let done = self.sync_some(guest, ctx, false, None, budget, SyncCause::FlushAll)?;
        if !done {
            self.st.stats.sync_steps += 1;
        }
        Ok(done)
    }
}
