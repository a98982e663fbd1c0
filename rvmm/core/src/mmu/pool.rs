// SPDX-License-Identifier: GPL-2.0

//! The shadow page pool and the CR3 (root) cache, for guests with 4-level paging.
//!
//! Every shadow page (sp) shadows one guest table, keyed by the table's guest frame
//! number (gfn) and its [`Role`]: level, the rights the levels above it grant, the
//! permission context (CR0.WP, CR4.SMEP/SMAP, EFER.NXE), or "direct" for the pieces of a
//! guest large page. A hash on the gfn finds an existing sp before a new one is built,
//! so a guest table used by many parents (the kernel half of every address space) has
//! one shadow, linked from all of them; parent links let an sp be unlinked everywhere.
//!
//! Roots survive CR3 loads: a root cache keeps the most recent roots pinned, and a CR3
//! load whose root is in the pool only brings out-of-sync shadows up to date.
//!
//! Coherence: the guest frame of every shadowed table is write-protected in every leaf
//! that maps it (the rmap, keyed by host frame, finds those leaves). A guest write to it
//! makes its shadows *unsync* and the frame writable again, with no emulation; an
//! unsync shadow is resynced on a flushing CR3 load whose root reaches it (and, for
//! upper levels, on INVLPG), where the architecture lets the TLB and paging-structure
//! caches be stale until then; linking a shadow into a tree first resyncs what is out
//! of sync under it, and an unsync shadow that no pinned root reaches is unshadowed.
//! A table unsynced again and again without being walked (write flooding: fork, a
//! table page reused as data) is unshadowed.
//!
//! All memory is fixed at creation (the module allocates it once per VM): the fault,
//! CR3 and INVLPG paths allocate nothing. When the pool is full, the least recently
//! used shadow that is not a root is reclaimed; [`Full`] asks the caller to start over
//! ([`Pool::reset`]).

mod apic_access;
mod entries;
mod fault;
mod gpte;
mod id;
mod invalidate;
mod rmap;
mod role;
mod root_cache;
mod state;
mod store;
mod sync;
mod write_track;

pub use apic_access::ApicAccess;
pub use id::{LinkId, RmapId, SpId};
pub use role::{Role, MODE_BITS32, MODE_LONG4, MODE_NONE, MODE_PAE};
pub use state::{PoolStats, State, SyncCause};

use id::EntryAt;
use role::{large, sindex, top_level};

use super::spte::{self, SPTE_ADDR, SPTE_NX, SPTE_P, SPTE_RW, SPTE_US};
use super::walker::{self, Access, GuestMemory, PermCtx, Walk, WalkFault, PAE_HIGH_RESERVED};
use super::PagingMode;

/// Most roots the cache can keep.
pub const MAX_ROOTS: usize = 64;
/// Unsyncs without a walk through the table before it is unshadowed.
pub const FLOOD_LIMIT: u8 = 3;
/// Neighbouring entries filled on a fault (an aligned group of this many).
pub const PREFETCH: usize = 8;
/// The work a flushing instruction's sync does per call (see [`Pool::load_root`]), in
/// shadow entries resynced, counting [`SYNC_SHADOW_COST`] more per shadow: about 50k
/// instructions. The vCPU runs the instruction again for the rest, so that a guest
/// with thousands of out-of-sync tables cannot hold the host CPU for the whole sync.
pub const SYNC_BUDGET: u32 = 256;
/// What bringing one shadow in sync costs besides its present entries (reading its
/// 512 entries, write-protecting its table).
pub const SYNC_SHADOW_COST: u32 = 16;

/// A shadow entry for a page that is not RAM: present with bit 51 set, reserved while
/// MAXPHYADDR < 52, so an access faults with the RSVD error-code bit and the hypervisor
/// finds the guest-physical address in the entry instead of walking the guest's tables.
pub const SPTE_MMIO: u64 = 1 << 51;
/// The guest rights of an MMIO entry (ignored bits): writable, user, execute-disable.
const MMIO_W: u64 = 1 << 52;
const MMIO_U: u64 = 1 << 53;
const MMIO_NX: u64 = 1 << 54;

use super::walker::pte::{
    A as PTE_A, D as PTE_D, P as PTE_P, PS as PTE_PS, RW as PTE_RW, US as PTE_US, XD as PTE_XD,
};

/// Metadata of one shadow page.
#[derive(Clone, Copy, Debug)]
pub struct Sp {
    /// Guest frame of the shadowed table (first frame covered, when direct).
    pub gfn: u64,
    /// What it shadows besides the frame.
    pub role: Role,
    /// In use (else on the free list).
    pub valid: bool,
    /// Out of sync with the guest table (the table is writable).
    pub unsync: bool,
    /// Something at or below it may be out of sync: set for a shadow that goes out of
    /// sync and everything above it, cleared by a complete sync under it. (Links bring
    /// no such thing along: a shadow that joins a tree is synced first.)
    pub unsync_below: bool,
    /// Unsyncs since the last walk through this table.
    pub flood: u8,
    /// Root-cache and vCPU references, and faults in progress: a pinned sp is never
    /// reclaimed or unshadowed.
    pub pins: u16,
    /// In the root cache.
    pub cached: bool,
    /// When it was last loaded as a root.
    pub stamp: u64,
    /// The parent-link search that last visited it ([`State::visit`]).
    visit: u32,
    /// The entries that link to it.
    parents: Option<LinkId>,
    /// The next sp in its hash chain, or on the free or zapped list.
    hash_next: Option<SpId>,
    lru_prev: Option<SpId>,
    lru_next: Option<SpId>,
}

impl Default for Sp {
    fn default() -> Self {
        Self {
            gfn: 0,
            role: Role(0),
            valid: false,
            unsync: false,
            unsync_below: false,
            flood: 0,
            pins: 0,
            cached: false,
            stamp: 0,
            visit: 0,
            parents: None,
            hash_next: None,
            lru_prev: None,
            lru_next: None,
        }
    }
}

/// A parent link: entry `at` points at the sp owning the list.
#[derive(Clone, Copy, Debug, Default)]
pub struct Link {
    at: EntryAt,
    next: Option<LinkId>,
}

/// An rmap node: leaf entry `at` maps host frame `hpa`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rmap {
    hpa: u64,
    at: EntryAt,
    next: Option<RmapId>,
}

/// The shadow table pages: one per sp.
pub trait Tables {
    /// The table of sp `i`.
    fn table(&mut self, i: SpId) -> &mut [u64; 512];
    /// Its host-physical address.
    fn pa(&self, i: SpId) -> u64;
    /// The sp whose table is at host-physical `pa` (one that `pa` returned: the pool
    /// asks only about the tables its entries link to).
    fn index(&self, pa: u64) -> SpId;
    /// Makes every vCPU that may translate through these tables leave guest mode,
    /// after making `generation` visible to their pre-entry checks: on return, no vCPU
    /// holds a translation (TLB or paging-structure cache) made from a table zapped
    /// before the call, and none enters again on a root older than `generation`.
    fn flush_remote(&mut self, generation: u64);
}

/// Guest-physical memory: the walker's view plus where each frame lives in the host.
pub trait GuestPhys: GuestMemory {
    /// Host-physical address of guest-physical `gpa`'s frame and whether the slot is
    /// read-only; `None` outside guest RAM (MMIO).
    fn host_pa(&mut self, gpa: u64) -> Option<(u64, bool)>;
}

impl<M: GuestPhys + ?Sized> GuestPhys for &mut M {
    fn host_pa(&mut self, gpa: u64) -> Option<(u64, bool)> {
        (**self).host_pa(gpa)
    }
}

/// What [`Pool::take_map`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapCheck {
    /// The shadow was made from this map.
    Current,
    /// The caller's map is older than the shadow's: it must take the new one first.
    Older,
    /// The caller's map is newer: the pool dropped every shadow and follows it now.
    Reset,
}

/// The pool ran out of pages, links or rmap nodes with nothing left to reclaim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full;

/// What a #PF exit comes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fix {
    /// The shadow now maps the page: re-enter the guest.
    Mapped,
    /// The guest's own tables refuse the access: inject this #PF.
    GuestFault(WalkFault),
    /// A write to an upper-level page table of the guest, write-protected: emulate the
    /// instruction, then report the write ([`Pool::pt_written`]); or, if it cannot be
    /// emulated, [`Pool::unprotect`] the table and retry.
    WriteProtected {
        /// The guest-physical address written.
        gpa: u64,
        /// The guest's translation.
        walk: Walk,
    },
    /// A table the path needs has more out of sync under it than one exit may sync:
    /// part of it is done; re-enter the guest, whose access faults again.
    Retry,
    /// The page is not RAM (or a write to read-only RAM): emulate the access.
    Mmio {
        /// The guest-physical address accessed.
        gpa: u64,
        /// The guest's translation.
        walk: Walk,
    },
}

/// The pool over its storage. The arrays are sized at creation: `sps` one per table
/// page, `buckets` and `rbuckets` powers of two, `links` and `rmaps` as many nodes as
/// parent links and leaf entries may exist, `unsync` one per table page. What they hold
/// at first does not matter: [`Pool::init`] sets what is read before it is written.
pub struct Pool<'a, T: Tables> {
    /// Shadow page metadata, one per table page.
    pub sps: &'a mut [Sp],
    /// Hash of shadow pages by guest frame: the head of each chain.
    pub buckets: &'a mut [Option<SpId>],
    /// Parent-link nodes.
    pub links: &'a mut [Link],
    /// Rmap nodes (leaf entries by host frame).
    pub rmaps: &'a mut [Rmap],
    /// Hash of rmap nodes by host frame: the head of each chain.
    pub rbuckets: &'a mut [Option<RmapId>],
    /// The out-of-sync shadow pages, the first [`Pool::unsync_count`] of them (the
    /// rest is scratch space for a sync).
    pub unsync: &'a mut [SpId],
    /// Scalar state and counters.
    pub st: &'a mut State,
    /// The table pages.
    pub tables: &'a mut T,
}

fn hash(v: u64, len: usize) -> usize {
    (v.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as usize & (len - 1)
}

fn index_of(gva: u64, level: u8) -> usize {
    ((gva >> (12 + 9 * (u32::from(level) - 1))) & 511) as usize
}

#[cfg(test)]
mod tests;
