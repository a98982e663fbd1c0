// SPDX-License-Identifier: GPL-2.0

//! The pool's scalar state: free lists, high-water marks, the LRU ends, the unsync
//! count, the root cache, the generations and flags the vCPUs read, and the counters.

use super::*;

/// Orphan candidates a pool remembers between syncs (see [`State::orphans`]).
pub(super) const ORPHAN_SLOTS: usize = 16;

/// Counters, cumulative over the pool's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// #PF exits fixed by syncing the missing entry.
    pub faults_fixed: u64,
    /// Of those, the ones after which the shadow was what it had been: nothing had to
    /// be written, the CPU faulted on entries the pool holds to allow the access. Only
    /// these, over and over at one address and instruction, are a fault loop.
    pub spurious_faults: u64,
    /// Guest writes to write-protected page tables.
    pub pt_writes: u64,
    /// Shadow pages that went out of sync.
    pub unsyncs: u64,
    /// Of those, upper-level ones (a write the pool could not emulate).
    pub unsyncs_upper: u64,
    /// Shadow pages brought back in sync.
    pub resyncs: u64,
    /// Tables unshadowed for write flooding.
    pub flood_unshadows: u64,
    /// Flushing instructions run again because their sync took its budget.
    pub sync_steps: u64,
    /// Entries filled ahead of a fault.
    pub prefetched: u64,
    /// Shadow pages in use now.
    pub pages_in_use: u64,
    /// Most shadow pages in use at once.
    pub pages_peak: u64,
    /// Shadow pages reclaimed (least recently used) to make room.
    pub reclaimed: u64,
    /// CR3 loads that found their root in the pool.
    pub root_hits: u64,
    /// CR3 loads that built a new root.
    pub root_misses: u64,
    /// Shadow pages zapped (reclaim, flooding, reset).
    pub zaps: u64,
    /// Whole-pool resets.
    pub resets: u64,
    /// MMIO accesses resolved from an MMIO entry, without a guest walk.
    pub mmio_fast: u64,
    /// Guest writes to upper-level tables emulated (entries updated in place).
    pub pt_emulated: u64,
    /// Sps visited by searches up the parent links (orphan and under-root checks).
    pub parent_visits: u64,
    /// Syncs that found shadows out of sync, by what asked for them (indexed by
    /// [`SyncCause`]).
    pub syncs: [u64; SyncCause::COUNT],
    /// Out-of-sync shadows those syncs looked at (synced, unshadowed, or passed over
    /// as not under the root).
    pub sync_scanned: u64,
    /// Present entries resyncs recomputed.
    pub resync_entries: u64,
    /// Of those, the ones that changed.
    pub resync_changed: u64,
    /// Faults fixed in a direct shadow (a guest large page, or paging off).
    pub faults_direct: u64,
}

/// What asked for a sync of out-of-sync shadows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncCause {
    /// A flushing CR3 load (the new root).
    Cr3 = 0,
    /// INVLPG (upper levels under the current root).
    Invlpg = 1,
    /// An existing shadow linked into a tree.
    Link = 2,
    /// A flush of every context (INVPCID all contexts, a reset of the TLB).
    FlushAll = 3,
}

impl SyncCause {
    /// How many causes there are.
    pub const COUNT: usize = 4;
}

/// The pool's scalar state.
#[derive(Clone, Copy, Debug)]
pub struct State {
    /// Free sps (chained by `hash_next`).
    pub(super) free_sp: Option<SpId>,
    /// Sps zapped since the last remote flush (chained by `hash_next`): another vCPU may
    /// still translate through their tables, so they go to `free_sp` only after
    /// [`Tables::flush_remote`].
    pub(super) zapped: Option<SpId>,
    pub(super) lru_head: Option<SpId>,
    pub(super) lru_tail: Option<SpId>,
    pub(super) free_link: Option<LinkId>,
    pub(super) free_rmap: Option<RmapId>,
    /// Sps, links and rmap nodes below these were handed out since the pool was made
    /// (or, for links and rmaps, reset): the rest are untouched and free. A reset costs
    /// what was used, not the pool's size.
    pub(super) sp_hwm: u32,
    pub(super) link_hwm: u32,
    pub(super) rmap_hwm: u32,
    /// Table pages that exist ([`Tables`] grows them up to `sps.len()` outside the
    /// pool's lock): sps at or above it are not handed out.
    pub sp_cap: u32,
    /// Shadows out of sync.
    pub(super) n_unsync: usize,
    /// Of those, the upper-level ones below a root (what INVLPG syncs, with the root:
    /// see [`Role::mid_level`]).
    pub(super) n_unsync_mid: usize,
    /// Shadows out of sync that may have become orphans (reaching no root: a dead
    /// process's tables) since the last sync, the first `n_orphans`: the next sync
    /// unshadows the ones that are. More than fit set `maybe_orphans`: the next
    /// complete sync looks at every shadow out of sync for them.
    pub(super) orphans: [Option<SpId>; ORPHAN_SLOTS],
    pub(super) n_orphans: usize,
    pub(super) maybe_orphans: bool,
    /// The root cache, the first `n_roots` of it.
    pub(super) roots: [Option<SpId>; MAX_ROOTS],
    pub(super) n_roots: usize,
    pub(super) clock: u64,
    /// The current parent-link search (see [`Pool::rooted`]).
    pub(super) visit: u32,
    /// How many roots the cache keeps (at most [`MAX_ROOTS`]).
    pub max_roots: usize,
    /// Bumped by [`Pool::reset`]: a vCPU whose root is older must load it again.
    pub generation: u64,
    /// The generation of the guest memory map the shadow entries were made from: a
    /// change of the map resets the pool.
    pub slots_generation: u64,
    /// Make MMIO entries ([`SPTE_MMIO`]): only where bit 51 is reserved.
    pub mmio_sptes: bool,
    /// The guest frame of the xAPIC page and the host frame that stands for it (VMX's
    /// APIC-access page): a fault there maps that frame, and the CPU virtualizes the
    /// accesses. Set with [`Pool::set_apic_access`].
    pub(super) apic_access: Option<ApicAccess>,
    /// Some shadow entry lost rights or went away since the flag was last taken: other
    /// CPUs running this VM's vCPUs must leave guest mode before the change is relied on.
    pub tlb_dirty: bool,
    /// Writes to upper-level tables are emulated ([`Fix::WriteProtected`]) rather than
    /// unsynced.
    pub emulate_writes: bool,
    /// Shadow entries changed so far (by `Pool::set_entry`): a fault that changed
    /// none is spurious.
    pub(super) entry_writes: u64,
    /// Counters.
    pub stats: PoolStats,
}

impl State {
    /// Table pages handed out since the pool was made (they stay in the pool's use):
    /// how many must exist, and, once near [`State::sp_cap`], time to add more.
    pub fn pages_used(&self) -> u32 {
        self.sp_hwm
    }

    /// A pool state whose root cache keeps `max_roots` roots (1 to [`MAX_ROOTS`]).
    pub const fn new(max_roots: usize) -> Self {
        Self {
            free_sp: None,
            zapped: None,
            lru_head: None,
            lru_tail: None,
            free_link: None,
            free_rmap: None,
            sp_hwm: 0,
            link_hwm: 0,
            rmap_hwm: 0,
            sp_cap: 0,
            n_unsync: 0,
            n_unsync_mid: 0,
            orphans: [None; ORPHAN_SLOTS],
            n_orphans: 0,
            maybe_orphans: false,
            roots: [None; MAX_ROOTS],
            n_roots: 0,
            clock: 0,
            visit: 0,
            max_roots: if max_roots > MAX_ROOTS {
                MAX_ROOTS
            } else if max_roots == 0 {
                1
            } else {
                max_roots
            },
            generation: 0,
            slots_generation: 0,
            mmio_sptes: false,
            apic_access: None,
            emulate_writes: false,
            tlb_dirty: false,
            entry_writes: 0,
            stats: PoolStats {
                faults_fixed: 0,
                spurious_faults: 0,
                pt_writes: 0,
                unsyncs: 0,
                unsyncs_upper: 0,
                resyncs: 0,
                flood_unshadows: 0,
                sync_steps: 0,
                prefetched: 0,
                pages_in_use: 0,
                pages_peak: 0,
                reclaimed: 0,
                root_hits: 0,
                root_misses: 0,
                zaps: 0,
                resets: 0,
                mmio_fast: 0,
                pt_emulated: 0,
                parent_visits: 0,
                syncs: [0; SyncCause::COUNT],
                sync_scanned: 0,
                resync_entries: 0,
                resync_changed: 0,
                faults_direct: 0,
            },
        }
    }
}
