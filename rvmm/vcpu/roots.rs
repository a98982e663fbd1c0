// SPDX-License-Identifier: GPL-2.0

//! The vCPU's shadow root from the VM's pool: MOV CR3 and paging changes, the recent
//! roots it holds a reference on (a CR3 load to one of them takes no lock), and remote
//! flushes after pool operations.

use core::sync::atomic::Ordering;

use x86::vmx::vmcs::guest;

use super::*;

/// Recent roots a vCPU keeps a reference on (as many as the default root cache).
pub(super) const HINTS: usize = 64;

/// The hint slot of a CR3 value (its page, and a PAE PDPT's place in it).
pub(super) fn hint_slot(cr3: u64) -> usize {
    (((cr3 >> 12) ^ (cr3 >> 5)) as usize) & (HINTS - 1)
}

/// A recent root of a vCPU: for CR3 `cr3` under the paging state `key`.
#[derive(Clone, Copy)]
pub(super) struct RootHint {
    cr3: u64,
    key: u64,
    root: u32,
    pa: u64,
    gen: u64,
}

impl RootHint {
    /// No root.
    pub(super) const EMPTY: Self = Self {
        cr3: 0,
        key: 0,
        root: NIL,
        pa: 0,
        gen: u64::MAX,
    };
}

/// What a root load did.
pub(super) enum RootLoad {
    /// The vCPU is on the root (GUEST_CR3 written).
    Done,
    /// The sync took its budget: the vCPU is still on its previous root, and the
    /// instruction must run again.
    Again,
    /// No root can be had.
    Failed,
}

impl VcpuInner {
    /// Drops the whole shadow and makes an empty root (a full TLB flush). The VMCS must
    /// be current.
    pub(crate) fn reset_shadow(&mut self, vmcs: &CurrentVmcs) -> bool {
        self.load_cr3_shadow(vmcs, true)
    }

    /// The shadow for a (new) CR3 or paging mode, from the VM's pool; `flush` says
    /// whether out-of-sync shadows must be brought up to date (MOV CR3 with PCIDs and
    /// bit 63 set does not flush).
    pub(crate) fn load_cr3_shadow(&mut self, vmcs: &CurrentVmcs, flush: bool) -> bool {
        matches!(self.load_cr3_step(vmcs, flush, u32::MAX), RootLoad::Done)
    }

    /// [`Self::load_cr3_shadow`] for an instruction that can run again: its sync takes
    /// at most `budget` (see `Pool::load_root`).
    pub(super) fn load_cr3_step(
        &mut self,
        vmcs: &CurrentVmcs,
        flush: bool,
        budget: u32,
    ) -> RootLoad {
        if !self.shadow.usable() {
            return RootLoad::Failed;
        }
        if flush
            && budget != u32::MAX
            && self.shadow.modes.unsync.load(Ordering::Acquire) != 0
            && self.sync_late()
        {
            return RootLoad::Again;
        }
        self.load_pool_root(vmcs, flush, budget)
    }

    /// MOV CR3 (or a paging change): the root for CR3 and the paging mode from the VM's
    /// pool. The VMCS must be current.
    pub(super) fn load_pool_root(
        &mut self,
        vmcs: &CurrentVmcs,
        flush: bool,
        budget: u32,
    ) -> RootLoad {
        // A root this vCPU holds a reference on (a recent one), while the pool has not
        // been reset and nothing needs a resync: no lock, no pool work.
        let gen = self.shadow.modes.generation.load(Ordering::Acquire);
        // Not under PAE paging: MOV CR3 loads the four PDPTEs, which the root copies
        // (`Pool::load_root` reads them again).
        if self.mode != PagingMode::Pae
            && (!flush || self.shadow.modes.unsync.load(Ordering::Acquire) == 0)
        {
            let key = self.root_key();
            let cr3 = self.cr3;
            let h = &self.hints[hint_slot(cr3) & self.hint_mask];
            if h.root != NIL && h.gen == gen && h.cr3 == cr3 && h.key == key {
                let (root, pa) = (h.root, h.pa);
                self.proot = root;
                self.proot_gen = gen;
                vmcs.write(guest::CR3, pa);
                self.shadow.fast_root_hits.fetch_add(1, Ordering::Relaxed);
                self.on_pool = true;
                self.need_reset = false;
                return RootLoad::Done;
            }
        }
        let ctx = self.perm_ctx(vmcs);
        let key = self.root_key();
        // Fields only below (no `&mut self` calls): the guard borrows `self.shadow`.
        let mut guard = self.shadow.pool.lock();
        let Some(storage) = guard.as_deref_mut() else {
            return RootLoad::Failed;
        };
        let mut pool = storage.pool();
        if self.slots.generation != pool.st.slots_generation {
            if self.slots.generation < pool.st.slots_generation {
                // This vCPU's memory map is older than the pool's entries: no root until
                // it has taken the new one (the pre-entry check sends it to do so).
                self.on_pool = false;
                self.proot = NIL;
                self.need_reset = true;
                return RootLoad::Done;
            }
            // The map changed under every shadow (`Shadow::memory_map_changed` does the
            // same when the ioctl gets the lock first).
            pool.reset();
            pool.st.slots_generation = self.slots.generation;
        }
        let prev = if self.pinned_gen == pool.st.generation {
            self.pinned_active
        } else {
            NIL
        };
        let mut mem = crate::mmu::GuestMem(&self.slots);
        let root = match pool.load_root(&mut mem, self.mode, self.cr3, &ctx, prev, flush, budget) {
            Ok(Some(r)) => r,
            Ok(None) => {
                // Part of the sync is done; the vCPU stays on its root meanwhile.
                let dirty = core::mem::take(&mut pool.st.tlb_dirty);
                let unsync = pool.unsync_count();
                self.shadow.publish(pool.st, unsync);
                drop(guard);
                self.flush_remote(dirty);
                return RootLoad::Again;
            }
            Err(_) => {
                pool.reset();
                self.stats.shadow_resets.inc();
                // An empty pool has nothing out of sync: the sync is done at once.
                match pool.load_root(&mut mem, self.mode, self.cr3, &ctx, NIL, true, u32::MAX) {
                    Ok(Some(r)) => r,
                    _ => return RootLoad::Failed,
                }
            }
        };
        let gen = pool.st.generation;
        self.pinned_active = root;
        self.pinned_gen = gen;
        self.proot = root;
        self.proot_gen = gen;
        let pa = pool.root_pa(root);
        vmcs.write(guest::CR3, pa);
        // Remember it, with a reference of its own, for the lock-free path.
        let cr3 = self.cr3;
        // As many hints as the root cache keeps roots (a power of two): their references
        // must leave the pool room to work in.
        let cap = 1usize << (usize::BITS - 1 - pool.st.max_roots.leading_zeros());
        self.hint_mask = cap.min(HINTS) - 1;
        let slot = &mut self.hints[hint_slot(cr3) & self.hint_mask];
        if !(slot.root == root && slot.gen == gen && slot.cr3 == cr3 && slot.key == key) {
            if slot.gen == gen {
                pool.unpin(slot.root);
            }
            pool.pin(root);
            *slot = RootHint {
                cr3,
                key,
                root,
                pa,
                gen,
            };
        }
        let dirty = core::mem::take(&mut pool.st.tlb_dirty);
        let unsync = pool.unsync_count();
        self.shadow.publish(pool.st, unsync);
        drop(guard);
        self.flush_remote(dirty);
        self.on_pool = true;
        self.need_reset = false;
        RootLoad::Done
    }

    /// Whether the run section is too far along to start a step of a sync (which may
    /// take a whole budget's work): the step waits for the next section, so that a
    /// section's interrupts-off time is at most half its budget plus one step.
    pub(super) fn sync_late(&self) -> bool {
        exit::rdtsc().wrapping_sub(self.section_tsc) >= self.section_budget / 2
    }

    /// Where an exit goes when a flushing instruction's sync is not done: on in the
    /// same section, or to the next one once this one is too far along.
    pub(super) fn sync_pause(&self) -> Next {
        if self.sync_late() {
            Next::Host
        } else {
            Next::Fast
        }
    }

    /// What a root's role depends on besides CR3: paging mode and permission bits.
    pub(super) fn root_key(&self) -> u64 {
        (self.cr0 & (CR0_WP | CR0_PG))
            | (self.cr4 & (CR4_PSE | CR4_PAE | CR4_SMEP | CR4_SMAP))
            | ((self.efer & (EFER_LMA | EFER_NXE)) << 40)
    }

    /// After a pool operation (lock released): if shadow entries lost rights, the
    /// VM's other vCPUs leave guest mode before this one relies on it.
    pub(super) fn flush_remote(&self, dirty: bool) {
        if dirty {
            self.shadow.kick_others(self.vcpu_id);
        }
    }
}
