// SPDX-License-Identifier: GPL-2.0

//! The #PF exit: a guest walk, then the shadow path from the root down built or
//! followed and the missing leaf set (its neighbours prefetched); and the fast path for
//! MMIO entries.

use super::*;

impl<T: Tables> Pool<'_, T> {
    /// A #PF exit at `gva` under root `root`: walks the guest's tables and syncs the
    /// missing entry (building the shadows on the way, prefetching neighbours), or
    /// says what else it is.
    pub fn page_fault(
        &mut self,
        guest: &mut impl GuestPhys,
        root: SpId,
        cr3: u64,
        gva: u64,
        access: Access,
        ctx: &PermCtx,
    ) -> Result<Fix, Full> {
        let role = self.sps[root.index()].role;
        let mode = match role.mode() {
            MODE_LONG4 => PagingMode::Long4,
            MODE_PAE => PagingMode::Pae,
            MODE_NONE => PagingMode::None,
            _ => PagingMode::Bits32 {
                pse: role.0 & Role::PSE != 0,
            },
        };
        let w = match walker::walk(guest, mode, cr3, gva, access, ctx) {
            Ok(w) => w,
            // Other vCPUs keep changing the entries: the access faults again.
            Err(f) if f.raced => return Ok(Fix::Retry),
            Err(f) => return Ok(Fix::GuestFault(f)),
        };
        let mut path = [None; 5];
        let writes = self.st.entry_writes;
        let r = self.fault_path(guest, root, gva, access, ctx, &w, &mut path);
        for i in path.into_iter().flatten() {
            self.sps[i.index()].pins -= 1;
        }
        if r == Ok(Fix::Mapped) && self.st.entry_writes == writes {
            // The shadow already allowed the access: the CPU faulted on entries the
            // pool holds to be right (a stale TLB entry, once; over and over, a bug).
            self.st.stats.spurious_faults += 1;
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn fault_path(
        &mut self,
        guest: &mut impl GuestPhys,
        root: SpId,
        gva: u64,
        access: Access,
        ctx: &PermCtx,
        w: &Walk,
        path: &mut [Option<SpId>; 5],
    ) -> Result<Fix, Full> {
        let mut sp = root;
        let mut n = 0;
        let mut pin = |pool: &mut Self, i: SpId| {
            pool.sps[i.index()].pins += 1;
            pool.sps[i.index()].flood = 0;
            pool.touch(i);
            path[n] = Some(i);
            n += 1;
        };
        pin(self, sp);
        // Whether `sp` was made by this fault (its table protected after the walk).
        let mut fresh = false;
        // From the root down to the shadow page table: guest tables, then the pieces of
        // a large page.
        let mode = self.sps[root.index()].role.mode();
        for level in (2..=top_level(mode)).rev() {
            let cur = self.sps[sp.index()];
            let j = sindex(gva, level, mode);
            // An in-sync table cannot have changed since its links were made: follow
            // an existing link without recomputing it.
            let e = self.tables.table(sp)[j];
            if e & SPTE_P != 0 && !cur.unsync {
                let c = self.tables.index(e & SPTE_ADDR);
                // Except, on a write, into the large page's shadow the walk ended in:
                // its rights follow the entry's D, which this walk may just have set
                // (in guest memory, without a write the pool sees).
                let large_written = access.write
                    && level == w.level
                    && self.sps[c.index()].role.direct()
                    && !cur.role.direct();
                if !large_written {
                    sp = c;
                    pin(self, sp);
                    continue;
                }
            }
            // The guest entry behind shadow entry j, from the walk.
            let pte = match (mode, level) {
                _ if cur.role.direct() && !(level == 3 && mode == MODE_PAE) => 0,
                (MODE_BITS32, 3) => 0,
                (MODE_BITS32, _) => w.path.pte[1],
                (_, l) => w.path.pte[usize::from(l) - 1],
            };
            if fresh && !self.gpte_unchanged(guest, sp, j, pte) {
                return Ok(Fix::Retry);
            }
            // A walk that succeeded always leads somewhere.
            let (gfn, role) = Self::expected_child(&cur, j, pte, ctx).ok_or(Full)?;
            let Some((c, new)) = self.child(guest, sp, j, gfn, role, ctx, SYNC_BUDGET)? else {
                return Ok(Fix::Retry);
            };
            sp = c;
            fresh = new;
            pin(self, sp);
        }
        if fresh && !self.gpte_unchanged(guest, sp, index_of(gva, 1), w.path.pte[0]) {
            return Ok(Fix::Retry);
        }
        let Some((hpa, ro)) = guest
            .host_pa(w.gpa)
            .or_else(|| self.apic_access_frame(w.gpa))
        else {
            if self.st.mmio_sptes && w.gpa < SPTE_MMIO {
                let e = SPTE_P
                    | SPTE_MMIO
                    | (w.gpa & SPTE_ADDR)
                    // Writable without a walk only once the leaf is dirty: the
                    // first write walks and sets D, as the CPU's does.
                    | if w.rw_all && w.dirty { MMIO_W } else { 0 }
                    | if w.user { MMIO_U } else { 0 }
                    | if w.nx { MMIO_NX } else { 0 };
                self.set_entry(sp, index_of(gva, 1), e)?;
            }
            return Ok(Fix::Mmio {
                gpa: w.gpa,
                walk: *w,
            });
        };
        if ro && access.write {
            return Ok(Fix::Mmio {
                gpa: w.gpa,
                walk: *w,
            });
        }
        let mut leaf = spte::leaf(w, access, ctx, hpa);
        if ro {
            leaf &= !SPTE_RW;
        }
        let gfn = w.gpa >> 12;
        let mut emulate = false;
        if leaf & SPTE_RW != 0 && self.protected(gfn) {
            if access.write
                && self.st.emulate_writes
                && self.upper_shadow(gfn)
                && !self.flooding_pinned(gfn)
            {
                // Upper-level tables stay in sync: the vCPU emulates the write and the
                // shadow entries follow (pt_written). The page stays read-only.
                leaf &= !SPTE_RW;
                emulate = true;
                self.st.stats.pt_writes += 1;
            } else if access.write {
                self.unsync_gfn(gfn);
            } else {
                leaf &= !SPTE_RW;
            }
        }
        let index = index_of(gva, 1);
        self.set_entry(sp, index, leaf)?;
        if emulate {
            return Ok(Fix::WriteProtected {
                gpa: w.gpa,
                walk: *w,
            });
        }
        self.st.stats.faults_fixed += 1;
        if self.sps[sp.index()].role.direct() {
            self.st.stats.faults_direct += 1;
        }
        self.prefetch(guest, sp, index, w, ctx)?;
        Ok(Fix::Mapped)
    }

    /// Fills the empty entries of `index`'s aligned group in leaf sp `sp` from the
    /// guest's table (or, for a large page, from the same large entry).
    fn prefetch(
        &mut self,
        guest: &mut impl GuestPhys,
        sp: SpId,
        index: usize,
        w: &Walk,
        ctx: &PermCtx,
    ) -> Result<(), Full> {
        let s = self.sps[sp.index()];
        let first = index & !(PREFETCH - 1);
        let mut ptes = [0u64; PREFETCH];
        match Self::gentry(&s, first) {
            Some((gpa, 8)) if !guest.read_entries(gpa, &mut ptes) => return Ok(()),
            Some((_, 8)) => {}
            Some((gpa, _)) => {
                // 4-byte entries: half as many 8-byte reads.
                let mut pairs = [0u64; PREFETCH / 2];
                if !guest.read_entries(gpa, &mut pairs) {
                    return Ok(());
                }
                for (k, p) in pairs.iter().enumerate() {
                    ptes[2 * k] = p & 0xffff_ffff;
                    ptes[2 * k + 1] = p >> 32;
                }
            }
            None => {}
        }
        for j in first..first + PREFETCH {
            if j == index || self.tables.table(sp)[j] & SPTE_P != 0 {
                continue;
            }
            let leaf = if s.role.direct() {
                let gpa = (s.gfn + j as u64) << 12;
                match guest.host_pa(gpa).or_else(|| self.apic_access_frame(gpa)) {
                    Some((hpa, ro)) => {
                        let mut l = spte::leaf(w, Access::default(), ctx, hpa);
                        if ro || self.protected(gpa >> 12) {
                            l &= !SPTE_RW;
                        }
                        Some(l)
                    }
                    None => None,
                }
            } else {
                let pte = ptes[j - first];
                // Cheap test first: most misses are entries never accessed.
                if pte & (PTE_P | PTE_A) != PTE_P | PTE_A {
                    continue;
                }
                self.leaf_from_pte(guest, s.role, pte, ctx)
            };
            if let Some(l) = leaf {
                self.set_entry(sp, j, l)?;
                self.st.stats.prefetched += 1;
            }
        }
        Ok(())
    }

    /// A #PF with the RSVD bit: the guest-physical address of `gva` if its shadow entry
    /// is an MMIO entry whose cached guest rights allow `access` (else the slow path
    /// decides, with a full walk).
    pub fn mmio_fast(
        &mut self,
        root: SpId,
        gva: u64,
        access: Access,
        ctx: &PermCtx,
    ) -> Option<u64> {
        let mut sp = root;
        let mode = self.sps[root.index()].role.mode();
        for level in (1..=top_level(mode)).rev() {
            let e = self.tables.table(sp)[sindex(gva, level, mode)];
            if e & SPTE_P == 0 {
                return None;
            }
            if level == 1 {
                if e & SPTE_MMIO == 0 {
                    return None;
                }
                let (w, u, nx) = (e & MMIO_W != 0, e & MMIO_U != 0, e & MMIO_NX != 0);
                // A write needs the cached right whatever CR0.WP says: without it the
                // walk decides (and sets D).
                let denied = (access.write && !w)
                    || if access.user {
                        !u || (access.fetch && nx)
                    } else if access.fetch {
                        nx || (u && ctx.smep)
                    } else {
                        u && ctx.smap && !ctx.ac
                    };
                if denied {
                    return None;
                }
                self.st.stats.mmio_fast += 1;
                return Some((e & SPTE_ADDR & !SPTE_MMIO) | (gva & 0xfff));
            }
            sp = self.tables.index(e & SPTE_ADDR);
        }
        None
    }
}
