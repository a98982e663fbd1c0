// SPDX-License-Identifier: GPL-2.0

//! The vCPU's shadow root from the VM's pool: MOV CR3 and paging changes, the recent
//! roots it holds a reference on (a CR3 load to one of them takes no lock), and remote
//! flushes after pool operations.

use core::sync::atomic::Ordering;

use rvmm_core::mmu::pdptes::WithPdptes;
use rvmm_core::mmu::pool::MapCheck;
use x86::vmx::vmcs::guest;

use crate::mmu::{GuestMem, MemSlots};

use super::*;

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
        let unsync = self.shadow.modes.unsync.load(Ordering::Acquire);
        let pae = self.mode == PagingMode::Pae;
        if let Some((root, pa)) =
            self.hints
                .fast_switch(self.cr3, self.root_key(), gen, flush, unsync, pae)
        {
            self.proot = Some(root);
            self.proot_gen = gen;
            vmcs.write(guest::CR3, pa);
            self.shadow.fast_root_hits.fetch_add(1, Ordering::Relaxed);
            self.on_pool = true;
            self.need_reset = false;
            return RootLoad::Done;
        }
        let ctx = self.perm_ctx(vmcs);
        let key = self.root_key();
        let (pdpt, regs) = self.pdpte_regs();
        // Fields only below (no `&mut self` calls): the guard borrows `self.shadow`.
        let mut guard = self.shadow.pool.lock();
        let Some(storage) = guard.as_deref_mut() else {
            return RootLoad::Failed;
        };
        let mut pool = storage.pool();
        // (`Shadow::memory_map_changed` resets the pool too when the ioctl gets the lock
        // first.)
        if pool.take_map(self.slots.generation) == MapCheck::Older {
            // No root until this vCPU has taken the new map (the pre-entry check sends
            // it to do so).
            self.on_pool = false;
            self.proot = None;
            self.need_reset = true;
            return RootLoad::Done;
        }
        let prev = if self.pinned_gen == pool.st.generation {
            self.pinned_active
        } else {
            None
        };
        let mut mem = WithPdptes {
            mem: GuestMem(&self.slots),
            pdpt,
            regs,
        };
        let root = match pool.load_root(
            &mut mem,
            self.mode,
            self.cr3,
            self.vcpu_id,
            &ctx,
            prev,
            flush,
            budget,
        ) {
            Ok(Some(r)) => r,
            Ok(None) => {
                // Part of the sync is done; the vCPU stays on its root meanwhile.
                self.shadow.settle(&mut pool);
                return RootLoad::Again;
            }
            Err(_) => {
                pool.reset();
                self.stats.shadow_resets.inc();
                // An empty pool has nothing out of sync: the sync is done at once.
                match pool.load_root(
                    &mut mem,
                    self.mode,
                    self.cr3,
                    self.vcpu_id,
                    &ctx,
                    None,
                    true,
                    u32::MAX,
                ) {
                    Ok(Some(r)) => r,
                    _ => {
                        self.shadow.settle(&mut pool);
                        return RootLoad::Failed;
                    }
                }
            }
        };
        let gen = pool.st.generation;
        self.pinned_active = Some(root);
        self.pinned_gen = gen;
        self.proot = Some(root);
        self.proot_gen = gen;
        let pa = pool.root_pa(root);
        vmcs.write(guest::CR3, pa);
        // Remember it, with a reference of its own, for the lock-free path.
        let vcpus = self.shadow.vcpus();
        self.hints.remember(&mut pool, self.cr3, key, root, vcpus);
        self.shadow.settle(&mut pool);
        drop(guard);
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

    /// Guest memory as this vCPU walks it: under PAE paging its PDPT reads as its PDPTE
    /// registers (loaded from memory here if a load left them to their next use).
    pub(super) fn walk_mem<'a>(&mut self, slots: &'a MemSlots) -> WithPdptes<GuestMem<'a>> {
        let (pdpt, regs) = self.pdpte_regs();
        WithPdptes {
            mem: GuestMem(slots),
            pdpt,
            regs,
        }
    }

    /// Under PAE paging, where the PDPT is and the PDPTE registers (see `walk_mem`).
    pub(super) fn pdpte_regs(&mut self) -> (Option<u64>, [u64; 4]) {
        if self.mode != PagingMode::Pae {
            return (None, [0; 4]);
        }
        let pdpt = self.cr3 & 0xffff_ffe0;
        let slots = &self.slots;
        let regs = *self
            .pdptes
            .get_or_insert_with(|| WithPdptes::load(&mut GuestMem(slots), pdpt));
        (Some(pdpt), regs)
    }

    /// What a root's role depends on besides CR3: paging mode and permission bits.
    pub(super) fn root_key(&self) -> u64 {
        (self.cr0 & (CR0_WP | CR0_PG))
            | (self.cr4 & (CR4_PSE | CR4_PAE | CR4_SMEP | CR4_SMAP))
            | ((self.efer & (EFER_LMA | EFER_NXE)) << 40)
    }
}
