// SPDX-License-Identifier: GPL-2.0

//! Write tracking of shadowed guest tables: which frames must stay write-protected,
//! write flooding, and the guest's writes to them, emulated (entries updated in place)
//! or let through (the shadows go out of sync).

use super::*;

impl<T: Tables> Pool<'_, T> {
    /// Whether guest frame `gfn` holds a table whose shadows are in sync (so writes
    /// to it must trap).
    pub fn protected(&self, gfn: u64) -> bool {
        let mut p = false;
        self.for_gfn(gfn, |_, sp| p |= !sp.unsync);
        p
    }

    /// Whether guest frame `gfn` holds a shadowed table.
    pub fn is_shadowed(&self, gfn: u64) -> bool {
        let mut p = false;
        self.for_gfn(gfn, |_, _| p = true);
        p
    }

    /// Whether guest table `gfn` has been written over and over without a walk through
    /// it (and nothing pins its shadows): write flooding.
    pub(super) fn flooded(&self, gfn: u64) -> bool {
        let mut flooded = false;
        self.for_gfn(gfn, |_, sp| {
            flooded |= sp.flood >= FLOOD_LIMIT && sp.pins == 0
        });
        flooded
    }

    /// Whether a pinned shadow of `gfn` (a cached root) has been written over and over
    /// without a walk through it: flooding, which cannot unshadow a pinned table. Its
    /// writes then unsync it rather than being emulated one by one (a dead process's
    /// page directory, still in the root cache, that the guest zeroes and fills for a
    /// new process).
    pub(super) fn flooding_pinned(&self, gfn: u64) -> bool {
        let mut flooding = false;
        self.for_gfn(gfn, |_, sp| {
            flooding |= sp.flood >= FLOOD_LIMIT && sp.pins > 0
        });
        flooding
    }

    /// A guest write reached shadow `i` of a table: counts it towards flooding, and
    /// unshadows it if the table floods. Returns whether `i` is gone.
    pub(super) fn written(&mut self, i: SpId, flooded: bool) -> bool {
        let sp = &mut self.sps[i.index()];
        sp.flood = sp.flood.saturating_add(1);
        if flooded && sp.pins == 0 {
            self.zap(i);
            self.st.stats.flood_unshadows += 1;
            return true;
        }
        false
    }

    /// The vCPU emulated a guest write of `size` bytes at `gpa`, a write-protected
    /// upper-level table ([`Fix::WriteProtected`]): the entries it covers are updated in
    /// place in every shadow of the table. A table written [`FLOOD_LIMIT`] times without
    /// a walk through it is unshadowed instead.
    pub fn pt_written(
        &mut self,
        guest: &mut impl GuestPhys,
        gpa: u64,
        size: u8,
        ctx: &PermCtx,
    ) -> Result<(), Full> {
        self.st.stats.pt_emulated += 1;
        let gfn = gpa >> 12;
        let lo = gpa & 0xfff;
        let hi = (lo + u64::from(size.max(1)) - 1).min(0xfff);
        let flooded = self.flooded(gfn);
        let mut result = Ok(());
        self.each_shadow(gfn, |pool, i| {
            if pool.written(i, flooded) || result.is_err() {
                return;
            }
            result = pool.rewrite_entries(guest, i, lo, hi, ctx);
        });
        result
    }

    /// Shadow `i` follows a guest write to bytes `lo..=hi` of its table: the entries
    /// those bytes stand behind come back from the guest's.
    fn rewrite_entries(
        &mut self,
        guest: &mut impl GuestPhys,
        i: SpId,
        lo: u64,
        hi: u64,
        ctx: &PermCtx,
    ) -> Result<(), Full> {
        // The shadow entries that the written guest entries stand behind.
        let role = self.sps[i.index()].role;
        let (first, last) = match (role.mode(), role.level()) {
            (MODE_BITS32, 3) => return Ok(()),
            (MODE_BITS32, 2) => {
                let q = u64::from(role.quadrant()) * 256;
                let (g0, g1) = ((lo / 4).max(q), (hi / 4).min(q + 255));
                if g0 > g1 {
                    return Ok(());
                }
                (2 * (g0 - q), 2 * (g1 - q) + 1)
            }
            (MODE_BITS32, _) => {
                let h = u64::from(role.quadrant()) * 512;
                let (g0, g1) = ((lo / 4).max(h), (hi / 4).min(h + 511));
                if g0 > g1 {
                    return Ok(());
                }
                (g0 - h, g1 - h)
            }
            _ => (lo / 8, hi / 8),
        };
        for index in first as usize..=last as usize {
            self.resync_entry(guest, i, index, ctx)?;
        }
        Ok(())
    }

    /// The vCPU could not emulate a write to a protected table (a string instruction
    /// zeroing a freed table, most often): let the guest write it. Its leaf shadows go
    /// out of sync; upper-level ones are unshadowed where nothing pins them, as KVM's
    /// unprotect does (out of sync, they would make every INVLPG and flush look for
    /// them), and only roots still cached go out of sync.
    pub fn unprotect(&mut self, gfn: u64) {
        self.st.stats.pt_writes += 1;
        self.each_shadow(gfn, |pool, i| {
            let upper = pool.sps[i.index()].role.level() > 1;
            if !pool.written(i, upper) {
                pool.mark_unsync(i);
            }
        });
    }

    /// Whether a shadow of guest table `gfn` is an upper-level one (whose writes are
    /// emulated rather than unsynced).
    pub(super) fn upper_shadow(&self, gfn: u64) -> bool {
        let mut upper = false;
        self.for_gfn(gfn, |_, sp| upper |= sp.role.level() > 1);
        upper
    }
}
