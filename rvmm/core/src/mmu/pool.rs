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

use super::spte::{self, SPTE_ADDR, SPTE_NX, SPTE_P, SPTE_RW, SPTE_US};
use super::walker::{self, Access, GuestMemory, PermCtx, Walk, WalkFault};
use super::PagingMode;

/// No index.
pub const NIL: u32 = u32::MAX;
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

/// Guest paging modes the pool shadows (in `Role`): 4-level paging.
pub const MODE_LONG4: u8 = 0;
/// PAE paging: a PAE shadow, table for table.
pub const MODE_PAE: u8 = 1;
/// 32-bit paging: a PAE-format shadow in which a guest page directory is split into four
/// shadow PDs (quadrants of 1 GiB) and a guest page table into two shadow PTs (2 MiB).
pub const MODE_BITS32: u8 = 2;
/// Paging off: a direct PAE-format map of the low 4 GiB, identity.
pub const MODE_NONE: u8 = 3;

/// What a shadow page shadows, besides the guest frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Role(pub u32);

impl Role {
    const LEVEL: u32 = 7;
    const DIRECT: u32 = 1 << 3;
    const W: u32 = 1 << 4;
    const U: u32 = 1 << 5;
    const NX: u32 = 1 << 6;
    const WP: u32 = 1 << 7;
    const SMEP: u32 = 1 << 8;
    const SMAP: u32 = 1 << 9;
    const NXE: u32 = 1 << 10;
    const MODE_SHIFT: u32 = 11;
    const MODE: u32 = 3 << 11;
    const QUAD_SHIFT: u32 = 13;
    const QUAD: u32 = 3 << 13;
    const PSE: u32 = 1 << 15;
    const PDPT_SHIFT: u32 = 16;
    const PDPT: u32 = 0x7f << 16;

    /// The role of a root under `ctx`, for guest paging `mode`: level 4 for 4-level
    /// paging; else the 4-entry PAE PDPT the CPU loads, level 3 - for a PAE guest a copy
    /// of its PDPTE registers (not a shadow of memory: direct, keyed by the PDPT's place
    /// in its page), for a 32-bit guest the four quadrants of its page directory.
    pub fn root(ctx: &PermCtx, mode: u8, pse: bool, cr3: u64) -> Self {
        let mut r = Self::W | Self::U | (u32::from(mode) << Self::MODE_SHIFT);
        r |= match mode {
            MODE_LONG4 => 4,
            MODE_PAE => 3 | Self::DIRECT | ((((cr3 >> 5) & 0x7f) as u32) << Self::PDPT_SHIFT),
            MODE_NONE => 3 | Self::DIRECT,
            _ => 3 | if pse { Self::PSE } else { 0 },
        };
        for (on, bit) in [
            (ctx.wp, Self::WP),
            (ctx.smep, Self::SMEP),
            (ctx.smap, Self::SMAP),
            (
                ctx.nxe && mode != MODE_BITS32 && mode != MODE_NONE,
                Self::NXE,
            ),
        ] {
            if on {
                r |= bit;
            }
        }
        Self(r)
    }

    /// The paging controls this shadow was built under (CR0.WP, CR4.SMEP/SMAP,
    /// EFER.NXE), with the CPU's properties (MAXPHYADDR, 1-GiB pages) from `cpu`: a
    /// shadow is kept up to date under its own controls, whoever's flush or write
    /// reaches it.
    pub fn perm_ctx(self, cpu: &PermCtx) -> PermCtx {
        PermCtx {
            wp: self.0 & Self::WP != 0,
            smep: self.0 & Self::SMEP != 0,
            smap: self.0 & Self::SMAP != 0,
            nxe: self.0 & Self::NXE != 0,
            ..*cpu
        }
    }

    /// Level of the shadowed table (1 = page table).
    pub const fn level(self) -> u8 {
        (self.0 & Self::LEVEL) as u8
    }

    /// Shadows a piece of a guest large page (or a PAE guest's PDPTE registers), not a
    /// guest table.
    pub const fn direct(self) -> bool {
        self.0 & Self::DIRECT != 0
    }

    /// The guest paging mode.
    pub const fn mode(self) -> u8 {
        ((self.0 & Self::MODE) >> Self::MODE_SHIFT) as u8
    }

    /// Which part of a 32-bit guest table this shadows.
    pub const fn quadrant(self) -> u32 {
        (self.0 & Self::QUAD) >> Self::QUAD_SHIFT
    }

    /// The role of a child reached through guest entry `pte` of a table with this role
    /// (the PDPTEs of a PAE root and the quadrants of a 32-bit root carry no rights).
    fn child(self, pte: u64, direct: bool, quadrant: u32) -> Self {
        let mut r = (self.0 & !(Self::LEVEL | Self::DIRECT | Self::QUAD | Self::PDPT))
            | u32::from(self.level() - 1)
            | (quadrant << Self::QUAD_SHIFT);
        if direct {
            r |= Self::DIRECT;
        }
        let rights = !(self.level() == 3 && self.mode() != MODE_LONG4);
        if rights {
            if pte & PTE_RW == 0 {
                r &= !Self::W;
            }
            if pte & PTE_US == 0 {
                r &= !Self::U;
            }
            if pte & PTE_XD != 0 && self.0 & Self::NXE != 0 {
                r |= Self::NX;
            }
        }
        Self(r)
    }

    /// The role of the next piece down inside a direct shadow (same rights).
    fn piece(self) -> Self {
        Self((self.0 & !Self::LEVEL) | u32::from(self.level() - 1))
    }
}

/// A large page's entry as its direct shadow's rights see it: a clean page (D clear)
/// is not writable, so that the first write faults and the walk sets D (KVM's rule;
/// its role then differs from the dirty page's, whose pieces may be writable).
fn clean_read_only(pte: u64) -> u64 {
    if pte & PTE_D == 0 {
        pte & !PTE_RW
    } else {
        pte
    }
}

/// The top shadow level for a guest mode.
const fn top_level(mode: u8) -> u8 {
    if mode == MODE_LONG4 {
        4
    } else {
        3
    }
}

/// Index of `gva` in a shadow table of `level` for `mode`.
fn sindex(gva: u64, level: u8, mode: u8) -> usize {
    if level == 3 && mode != MODE_LONG4 {
        ((gva >> 30) & 3) as usize
    } else {
        index_of(gva, level)
    }
}

/// Whether guest entry `pte` at guest `level` maps a large page.
fn large(pte: u64, level: u8, role: Role, ctx: &PermCtx) -> bool {
    pte & PTE_PS != 0
        && match (role.mode(), level) {
            (MODE_LONG4, 3) => ctx.gbpages,
            (MODE_BITS32, 2) => role.0 & Role::PSE != 0,
            (_, 2) => true,
            _ => false,
        }
}

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
    parents: u32,
    hash_next: u32,
    lru_prev: u32,
    lru_next: u32,
}

impl Default for Sp {
    fn default() -> Self {
        Self {
            gfn: 0,
            role: Role(0),
            valid: false,
            unsync: false,
            flood: 0,
            pins: 0,
            cached: false,
            stamp: 0,
            visit: 0,
            parents: NIL,
            hash_next: NIL,
            lru_prev: NIL,
            lru_next: NIL,
        }
    }
}

/// A parent link: entry `at` (sp << 9 | index) points at the sp owning the list.
#[derive(Clone, Copy, Debug, Default)]
pub struct Link {
    at: u32,
    next: u32,
}

/// An rmap node: leaf entry `at` (sp << 9 | index) maps host frame `hpa`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rmap {
    hpa: u64,
    at: u32,
    next: u32,
}

/// Counters, cumulative over the pool's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// #PF exits fixed by syncing the missing entry.
    pub faults_fixed: u64,
    /// Guest writes to write-protected page tables.
    pub pt_writes: u64,
    /// Shadow pages that went out of sync.
    pub unsyncs: u64,
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
}

/// The pool's scalar state.
#[derive(Clone, Copy, Debug)]
pub struct State {
    free_sp: u32,
    /// Sps zapped since the last remote flush (chained by `hash_next`): another vCPU may
    /// still translate through their tables, so they go to `free_sp` only after
    /// [`Tables::flush_remote`].
    zapped: u32,
    lru_head: u32,
    lru_tail: u32,
    free_link: u32,
    free_rmap: u32,
    /// Sps, links and rmap nodes below these were handed out since the pool was made
    /// (or, for links and rmaps, reset): the rest are untouched and free. A reset costs
    /// what was used, not the pool's size.
    sp_hwm: u32,
    link_hwm: u32,
    rmap_hwm: u32,
    /// Table pages that exist ([`Tables`] grows them up to `sps.len()` outside the
    /// pool's lock): sps at or above it are not handed out.
    pub sp_cap: u32,
    n_unsync: usize,
    roots: [u32; MAX_ROOTS],
    n_roots: usize,
    clock: u64,
    /// The current parent-link search (see [`Pool::rooted`]).
    visit: u32,
    /// How many roots the cache keeps (at most [`MAX_ROOTS`]).
    pub max_roots: usize,
    /// Bumped by [`Pool::reset`]: a vCPU whose root is older must load it again.
    pub generation: u64,
    /// The generation of the guest memory map the shadow entries were made from: a
    /// change of the map resets the pool.
    pub slots_generation: u64,
    /// Make MMIO entries ([`SPTE_MMIO`]): only where bit 51 is reserved.
    pub mmio_sptes: bool,
    /// Some shadow entry lost rights or went away since the flag was last taken: other
    /// CPUs running this VM's vCPUs must leave guest mode before the change is relied on.
    pub tlb_dirty: bool,
    /// Writes to upper-level tables are emulated ([`Fix::WriteProtected`]) rather than
    /// unsynced.
    pub emulate_writes: bool,
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
            free_sp: NIL,
            zapped: NIL,
            lru_head: NIL,
            lru_tail: NIL,
            free_link: NIL,
            free_rmap: NIL,
            sp_hwm: 0,
            link_hwm: 0,
            rmap_hwm: 0,
            sp_cap: 0,
            n_unsync: 0,
            roots: [NIL; MAX_ROOTS],
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
            emulate_writes: false,
            tlb_dirty: false,
            stats: PoolStats {
                faults_fixed: 0,
                pt_writes: 0,
                unsyncs: 0,
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
            },
        }
    }
}

/// The shadow table pages: one per sp index.
pub trait Tables {
    /// The table of sp `i`.
    fn table(&mut self, i: u32) -> &mut [u64; 512];
    /// Its host-physical address.
    fn pa(&self, i: u32) -> u64;
    /// The sp whose table is at host-physical `pa` (one that `pa` returned).
    fn index(&self, pa: u64) -> u32;
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
/// parent links and leaf entries may exist, `unsync` one per table page.
pub struct Pool<'a, T: Tables> {
    /// Shadow page metadata, one per table page.
    pub sps: &'a mut [Sp],
    /// Hash of shadow pages by guest frame.
    pub buckets: &'a mut [u32],
    /// Parent-link nodes.
    pub links: &'a mut [Link],
    /// Rmap nodes (leaf entries by host frame).
    pub rmaps: &'a mut [Rmap],
    /// Hash of rmap nodes by host frame.
    pub rbuckets: &'a mut [u32],
    /// The out-of-sync shadow pages.
    pub unsync: &'a mut [u32],
    /// Scalar state and counters.
    pub st: &'a mut State,
    /// The table pages.
    pub tables: &'a mut T,
}

fn hash(v: u64, len: usize) -> usize {
    (v.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as usize & (len - 1)
}

const fn at(sp: u32, index: usize) -> u32 {
    (sp << 9) | index as u32
}

fn index_of(gva: u64, level: u8) -> usize {
    ((gva >> (12 + 9 * (u32::from(level) - 1))) & 511) as usize
}

impl<T: Tables> Pool<'_, T> {
    /// Makes every page free and forgets every shadow (the tables must be zero, as
    /// after creation).
    pub fn init(&mut self) {
        for sp in self.sps.iter_mut() {
            *sp = Sp::default();
        }
        self.buckets.fill(NIL);
        self.rbuckets.fill(NIL);
        self.st.free_sp = NIL;
        self.st.zapped = NIL;
        self.st.free_link = NIL;
        self.st.free_rmap = NIL;
        self.st.sp_hwm = 0;
        self.st.link_hwm = 0;
        self.st.rmap_hwm = 0;
        self.st.lru_head = NIL;
        self.st.lru_tail = NIL;
        self.st.n_unsync = 0;
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
        self.st.zapped = NIL;
        for i in (0..self.st.sp_hwm).rev() {
            if self.sps[i as usize].valid {
                self.tables.table(i).fill(0);
                self.st.stats.zaps += 1;
            }
            self.sps[i as usize] = Sp {
                hash_next: self.st.zapped,
                ..Sp::default()
            };
            self.st.zapped = i;
        }
        self.st.free_sp = NIL;
        // Metadata is the pool's alone: reused at once.
        for i in 0..self.st.rmap_hwm as usize {
            let b = hash(self.rmaps[i].hpa >> 12, self.rbuckets.len());
            self.rbuckets[b] = NIL;
        }
        self.buckets.fill(NIL);
        self.st.free_link = NIL;
        self.st.free_rmap = NIL;
        self.st.link_hwm = 0;
        self.st.rmap_hwm = 0;
        self.st.lru_head = NIL;
        self.st.lru_tail = NIL;
        self.st.n_unsync = 0;
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
        while self.st.zapped != NIL {
            let i = self.st.zapped;
            self.st.zapped = self.sps[i as usize].hash_next;
            self.sps[i as usize].hash_next = self.st.free_sp;
            self.st.free_sp = i;
        }
    }

    // ---- hash, LRU, free lists ----

    fn find(&self, gfn: u64, role: Role) -> u32 {
        let mut i = self.buckets[hash(gfn, self.buckets.len())];
        while i != NIL {
            let sp = &self.sps[i as usize];
            if sp.gfn == gfn && sp.role == role {
                return i;
            }
            i = sp.hash_next;
        }
        NIL
    }

    /// The shadows of guest table `gfn` (not the direct ones), through `f`.
    fn for_gfn(&self, gfn: u64, mut f: impl FnMut(u32, &Sp)) {
        let mut i = self.buckets[hash(gfn, self.buckets.len())];
        while i != NIL {
            let sp = &self.sps[i as usize];
            let next = sp.hash_next;
            if sp.gfn == gfn && !sp.role.direct() {
                f(i, sp);
            }
            i = next;
        }
    }

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

    /// Calls `f` on each shadow of guest table `gfn` in turn; `f` may zap the one it is
    /// given (and no other).
    fn each_shadow(&mut self, gfn: u64, mut f: impl FnMut(&mut Self, u32)) {
        let mut i = self.buckets[hash(gfn, self.buckets.len())];
        while i != NIL {
            let sp = &self.sps[i as usize];
            let next = sp.hash_next;
            if sp.gfn == gfn && !sp.role.direct() {
                f(self, i);
            }
            i = next;
        }
    }

    /// Whether guest table `gfn` has been written over and over without a walk through
    /// it (and nothing pins its shadows): write flooding.
    fn flooded(&self, gfn: u64) -> bool {
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
    fn flooding_pinned(&self, gfn: u64) -> bool {
        let mut flooding = false;
        self.for_gfn(gfn, |_, sp| {
            flooding |= sp.flood >= FLOOD_LIMIT && sp.pins > 0
        });
        flooding
    }

    /// A guest write reached shadow `i` of a table: counts it towards flooding, and
    /// unshadows it if the table floods. Returns whether `i` is gone.
    fn written(&mut self, i: u32, flooded: bool) -> bool {
        let sp = &mut self.sps[i as usize];
        sp.flood = sp.flood.saturating_add(1);
        if flooded && sp.pins == 0 {
            self.zap(i);
            self.st.stats.flood_unshadows += 1;
            return true;
        }
        false
    }

    fn lru_unlink(&mut self, i: u32) {
        let (p, n) = {
            let sp = &self.sps[i as usize];
            (sp.lru_prev, sp.lru_next)
        };
        if p != NIL {
            self.sps[p as usize].lru_next = n;
        } else {
            self.st.lru_head = n;
        }
        if n != NIL {
            self.sps[n as usize].lru_prev = p;
        } else {
            self.st.lru_tail = p;
        }
    }

    fn lru_push(&mut self, i: u32) {
        let h = self.st.lru_head;
        {
            let sp = &mut self.sps[i as usize];
            sp.lru_prev = NIL;
            sp.lru_next = h;
        }
        if h != NIL {
            self.sps[h as usize].lru_prev = i;
        } else {
            self.st.lru_tail = i;
        }
        self.st.lru_head = i;
    }

    /// Marks sp `i` as just used.
    fn touch(&mut self, i: u32) {
        if self.st.lru_head != i {
            self.lru_unlink(i);
            self.lru_push(i);
        }
    }

    fn alloc_sp(&mut self, gfn: u64, role: Role) -> Result<u32, Full> {
        let i = if self.st.free_sp != NIL {
            let i = self.st.free_sp;
            self.st.free_sp = self.sps[i as usize].hash_next;
            i
        } else if self.st.sp_hwm < self.st.sp_cap && (self.st.sp_hwm as usize) < self.sps.len() {
            // Never used (its table is zero).
            self.st.sp_hwm += 1;
            self.st.sp_hwm - 1
        } else {
            if self.st.zapped == NIL {
                self.reclaim()?;
            }
            self.commit_zapped();
            let i = self.st.free_sp;
            self.st.free_sp = self.sps[i as usize].hash_next;
            i
        };
        let b = hash(gfn, self.buckets.len());
        self.sps[i as usize] = Sp {
            gfn,
            role,
            valid: true,
            hash_next: self.buckets[b],
            ..Sp::default()
        };
        self.buckets[b] = i;
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
        let mut i = self.st.lru_tail;
        while i != NIL && done < batch {
            let prev = self.sps[i as usize].lru_prev;
            if self.sps[i as usize].pins == 0 {
                self.zap(i);
                self.st.stats.reclaimed += 1;
                done += 1;
            }
            i = prev;
        }
        if done == 0 {
            return Err(Full);
        }
        Ok(())
    }

    fn link_add(&mut self, child: u32, parent_at: u32) -> Result<(), Full> {
        let n = self.st.free_link;
        let n = if n != NIL {
            self.st.free_link = self.links[n as usize].next;
            n
        } else if (self.st.link_hwm as usize) < self.links.len() {
            self.st.link_hwm += 1;
            self.st.link_hwm - 1
        } else {
            return Err(Full);
        };
        self.links[n as usize] = Link {
            at: parent_at,
            next: self.sps[child as usize].parents,
        };
        self.sps[child as usize].parents = n;
        Ok(())
    }

    fn link_remove(&mut self, child: u32, parent_at: u32) {
        let mut prev = NIL;
        let mut n = self.sps[child as usize].parents;
        while n != NIL {
            let l = self.links[n as usize];
            if l.at == parent_at {
                if prev == NIL {
                    self.sps[child as usize].parents = l.next;
                } else {
                    self.links[prev as usize].next = l.next;
                }
                self.links[n as usize].next = self.st.free_link;
                self.st.free_link = n;
                return;
            }
            prev = n;
            n = l.next;
        }
    }

    fn rmap_add(&mut self, hpa: u64, leaf_at: u32) -> Result<(), Full> {
        let n = self.st.free_rmap;
        let n = if n != NIL {
            self.st.free_rmap = self.rmaps[n as usize].next;
            n
        } else if (self.st.rmap_hwm as usize) < self.rmaps.len() {
            self.st.rmap_hwm += 1;
            self.st.rmap_hwm - 1
        } else {
            return Err(Full);
        };
        let b = hash(hpa >> 12, self.rbuckets.len());
        self.rmaps[n as usize] = Rmap {
            hpa,
            at: leaf_at,
            next: self.rbuckets[b],
        };
        self.rbuckets[b] = n;
        Ok(())
    }

    fn rmap_remove(&mut self, hpa: u64, leaf_at: u32) {
        let b = hash(hpa >> 12, self.rbuckets.len());
        let mut prev = NIL;
        let mut n = self.rbuckets[b];
        while n != NIL {
            let r = self.rmaps[n as usize];
            if r.at == leaf_at && r.hpa == hpa {
                if prev == NIL {
                    self.rbuckets[b] = r.next;
                } else {
                    self.rmaps[prev as usize].next = r.next;
                }
                self.rmaps[n as usize].next = self.st.free_rmap;
                self.st.free_rmap = n;
                return;
            }
            prev = n;
            n = r.next;
        }
    }

    /// Clears R/W in every leaf that maps host frame `hpa`.
    fn write_protect_hpa(&mut self, hpa: u64) {
        let mut n = self.rbuckets[hash(hpa >> 12, self.rbuckets.len())];
        while n != NIL {
            let r = self.rmaps[n as usize];
            if r.hpa == hpa {
                let e = &mut self.tables.table(r.at >> 9)[(r.at & 511) as usize];
                if *e & SPTE_RW != 0 {
                    *e &= !SPTE_RW;
                    self.st.tlb_dirty = true;
                }
            }
            n = r.next;
        }
    }

    fn write_protect(&mut self, guest: &mut impl GuestPhys, gfn: u64) {
        if let Some((hpa, _)) = guest.host_pa(gfn << 12) {
            self.write_protect_hpa(hpa & SPTE_ADDR);
        }
    }

    // ---- entries ----

    fn is_leaf(&self, sp: u32) -> bool {
        self.sps[sp as usize].role.level() == 1
    }

    /// Forgets what entry `index` of `sp` (value `e`, present) links or maps.
    fn drop_entry(&mut self, sp: u32, index: usize, e: u64) {
        if e & SPTE_MMIO != 0 {
            return;
        }
        if self.is_leaf(sp) {
            self.rmap_remove(e & SPTE_ADDR, at(sp, index));
        } else {
            let child = self.tables.index(e & SPTE_ADDR);
            self.link_remove(child, at(sp, index));
        }
    }

    /// Sets entry `index` of `sp` to `new`, keeping links and the rmap right.
    fn set_entry(&mut self, sp: u32, index: usize, new: u64) -> Result<(), Full> {
        let old = self.tables.table(sp)[index];
        if old == new {
            return Ok(());
        }
        if old & SPTE_P != 0 {
            self.st.tlb_dirty = true;
            if self.is_leaf(sp)
                && new & SPTE_P != 0
                && (old ^ new) & (SPTE_ADDR | SPTE_MMIO) == 0
                && new & SPTE_MMIO == 0
            {
                // Same frame, other rights.
                self.tables.table(sp)[index] = new;
                return Ok(());
            }
            self.drop_entry(sp, index, old);
        }
        self.tables.table(sp)[index] = 0;
        if new & SPTE_P != 0 {
            if new & SPTE_MMIO != 0 {
                // No host frame: nothing to write-protect.
            } else if self.is_leaf(sp) {
                self.rmap_add(new & SPTE_ADDR, at(sp, index))?;
            } else {
                let child = self.tables.index(new & SPTE_ADDR);
                self.link_add(child, at(sp, index))?;
            }
            self.tables.table(sp)[index] = new;
        }
        Ok(())
    }

    fn clear_entries(&mut self, sp: u32) {
        for index in 0..512 {
            let e = self.tables.table(sp)[index];
            if e & SPTE_P != 0 {
                self.drop_entry(sp, index, e);
                self.tables.table(sp)[index] = 0;
                self.st.tlb_dirty = true;
            }
        }
    }

    /// Unshadows sp `i`: unlinked from every parent, its entries dropped, its page
    /// freed. Not for pinned sps.
    fn zap(&mut self, i: u32) {
        let mut n = self.sps[i as usize].parents;
        while n != NIL {
            let l = self.links[n as usize];
            self.tables.table(l.at >> 9)[(l.at & 511) as usize] = 0;
            self.st.tlb_dirty = true;
            self.links[n as usize].next = self.st.free_link;
            self.st.free_link = n;
            n = l.next;
        }
        self.sps[i as usize].parents = NIL;
        self.clear_entries(i);
        // Out of the hash chain.
        let gfn = self.sps[i as usize].gfn;
        let b = hash(gfn, self.buckets.len());
        if self.buckets[b] == i {
            self.buckets[b] = self.sps[i as usize].hash_next;
        } else {
            let mut p = self.buckets[b];
            while p != NIL {
                let next = self.sps[p as usize].hash_next;
                if next == i {
                    self.sps[p as usize].hash_next = self.sps[i as usize].hash_next;
                    break;
                }
                p = next;
            }
        }
        if self.sps[i as usize].unsync {
            if let Some(k) = self.unsync[..self.st.n_unsync].iter().position(|&u| u == i) {
                self.st.n_unsync -= 1;
                self.unsync[k] = self.unsync[self.st.n_unsync];
            }
        }
        self.lru_unlink(i);
        self.sps[i as usize] = Sp {
            hash_next: self.st.zapped,
            ..Sp::default()
        };
        self.st.zapped = i;
        self.st.stats.pages_in_use -= 1;
        self.st.stats.zaps += 1;
    }

    // ---- sync ----

    fn mark_unsync(&mut self, i: u32) {
        let sp = &mut self.sps[i as usize];
        if !sp.unsync {
            sp.unsync = true;
            self.unsync[self.st.n_unsync] = i;
            self.st.n_unsync += 1;
            self.st.stats.unsyncs += 1;
        }
    }

    /// The guest wrote (or is about to write) its table at `gfn`: its shadows go out
    /// of sync, or are unshadowed if the table is written over and over without use.
    fn unsync_gfn(&mut self, gfn: u64) {
        self.st.stats.pt_writes += 1;
        let flooded = self.flooded(gfn);
        self.each_shadow(gfn, |pool, i| {
            if !pool.written(i, flooded) {
                pool.mark_unsync(i);
            }
        });
    }

    /// The shadow leaf for guest PTE `pte` in a table whose role is `role`, or `None`
    /// where the entry cannot be cached (not present, not accessed, reserved bits, not
    /// RAM). Dirty pages and pages that are not page tables in sync may be writable.
    fn leaf_from_pte(
        &mut self,
        guest: &mut impl GuestPhys,
        role: Role,
        pte: u64,
        ctx: &PermCtx,
    ) -> Option<u64> {
        let phys = ctx.phys_mask();
        let bits32 = role.mode() == MODE_BITS32;
        let reserved = if bits32 {
            0
        } else {
            (pte & !phys & ((1 << 52) - 1) & !PTE_XD) | if ctx.nxe { 0 } else { pte & PTE_XD }
        };
        if pte & PTE_P == 0 || pte & PTE_A == 0 || reserved != 0 {
            return None;
        }
        let gpa = if bits32 {
            pte & 0xffff_f000
        } else {
            pte & phys & !0xfff
        };
        let (hpa, ro) = guest.host_pa(gpa)?;
        let writable = role.0 & Role::W != 0
            && pte & PTE_RW != 0
            && pte & PTE_D != 0
            && !ro
            && !self.protected(gpa >> 12);
        let user = role.0 & Role::U != 0 && pte & PTE_US != 0;
        let nx = role.0 & Role::NX != 0 || (!bits32 && ctx.nxe && pte & PTE_XD != 0);
        Some(
            SPTE_P
                | spte::SPTE_A
                | spte::SPTE_D
                | (hpa & SPTE_ADDR)
                | if writable { SPTE_RW } else { 0 }
                | if user { SPTE_US } else { 0 }
                | if nx { SPTE_NX } else { 0 },
        )
    }

    /// The guest entry behind entry `j` of sp `sp`: its guest-physical address and size;
    /// `None` for direct shadows and for roots that are not a guest table's shadow.
    fn gentry(sp: &Sp, j: usize) -> Option<(u64, u8)> {
        if sp.role.direct() {
            return None;
        }
        let base = sp.gfn << 12;
        let q = u64::from(sp.role.quadrant());
        match (sp.role.mode(), sp.role.level()) {
            (MODE_LONG4, _) => Some((base + 8 * j as u64, 8)),
            (MODE_PAE, 3) | (MODE_BITS32, 3) => None,
            (MODE_PAE, _) => Some((base + 8 * j as u64, 8)),
            (_, 2) => Some((base + 4 * (q * 256 + j as u64 / 2), 4)),
            _ => Some((base + 4 * (q * 512 + j as u64), 4)),
        }
    }

    /// The shadow that entry `j` of sp `sp` must point at, given the guest entry `pte`
    /// behind it (ignored where there is none): the guest frame and role; `None` where
    /// the entry leads nowhere (not present, reserved bits).
    fn expected_child(sp: &Sp, j: usize, pte: u64, ctx: &PermCtx) -> Option<(u64, Role)> {
        let level = sp.role.level();
        let mode = sp.role.mode();
        let phys = ctx.phys_mask();
        if sp.role.direct() {
            if level == 3 && mode == MODE_PAE {
                // A PDPTE register: its page directory (bits 2:1, 8:5 and 63 reserved).
                if pte & PTE_P == 0 || pte & (0x1e6 | PTE_XD | (!phys & ((1 << 63) - 1))) != 0 {
                    return None;
                }
                return Some(((pte & phys & !0xfff) >> 12, sp.role.child(0, false, 0)));
            }
            // A piece of a large page: the next piece down.
            let span = 1u64 << (9 * u32::from(level - 1));
            return Some((sp.gfn + j as u64 * span, sp.role.piece()));
        }
        if level == 3 && mode == MODE_BITS32 {
            // Quadrant j of the guest page directory.
            return Some((sp.gfn, sp.role.child(0, false, j as u32)));
        }
        // Not present, or not accessed: no link (a walk sets A first, as the CPU does
        // before it caches an entry; a guest that clears A sees it set again).
        if pte & PTE_P == 0 || pte & PTE_A == 0 {
            return None;
        }
        if mode != MODE_BITS32 {
            // Reserved bits: address bits above MAXPHYADDR, XD without NXE, PS in a
            // PML4E, and the low bits of a large page's frame.
            let mut reserved = pte & !phys & ((1 << 52) - 1) & !PTE_XD;
            if !ctx.nxe {
                reserved |= pte & PTE_XD;
            }
            if pte & PTE_PS != 0 {
                reserved |= match level {
                    4 if mode == MODE_LONG4 => PTE_PS,
                    3 if mode == MODE_LONG4 && !ctx.gbpages => PTE_PS,
                    3 if large(pte, level, sp.role, ctx) => pte & 0x3fff_e000,
                    2 => pte & 0x1f_e000,
                    _ => 0,
                };
            }
            if reserved != 0 {
                return None;
            }
        }
        if mode == MODE_BITS32 {
            let pte = pte & 0xffff_ffff;
            if large(pte, level, sp.role, ctx) {
                // PSE-36: bits 20:13 are physical bits 39:32; each shadow PT maps half.
                let frame = (pte & 0xffc0_0000) | (((pte >> 13) & 0xff) << 32);
                return Some((
                    (frame >> 12) + 512 * (j as u64 & 1),
                    sp.role.child(clean_read_only(pte), true, 0),
                ));
            }
            return Some((
                (pte & 0xffff_f000) >> 12,
                sp.role.child(pte, false, j as u32 & 1),
            ));
        }
        if large(pte, level, sp.role, ctx) {
            let span = (1u64 << (12 + 9 * u32::from(level - 1))) - 1;
            return Some((
                (pte & phys & !span) >> 12,
                sp.role.child(clean_read_only(pte), true, 0),
            ));
        }
        Some(((pte & phys & !0xfff) >> 12, sp.role.child(pte, false, 0)))
    }

    /// Brings sp `i` back in sync with the guest table: leaves are recomputed in place
    /// from the guest's entries (or dropped), links to children whose guest entry
    /// changed are dropped.
    fn resync(&mut self, guest: &mut impl GuestPhys, i: u32, ctx: &PermCtx) -> Result<(), Full> {
        for index in 0..512 {
            self.resync_entry(guest, i, index, ctx)?;
        }
        self.st.stats.resyncs += 1;
        Ok(())
    }

    /// Entry `index` of sp `i` from the guest's entry: a leaf recomputed (or dropped), a
    /// link kept while the guest entry still leads to the same shadow (else dropped).
    fn resync_entry(
        &mut self,
        guest: &mut impl GuestPhys,
        i: u32,
        index: usize,
        ctx: &PermCtx,
    ) -> Result<(), Full> {
        let e = self.tables.table(i)[index];
        if e & SPTE_P == 0 {
            return Ok(());
        }
        let sp = self.sps[i as usize];
        let Some((gpa, size)) = Self::gentry(&sp, index) else {
            // Root quadrants and PDPTE copies do not follow guest memory.
            return Ok(());
        };
        // Its own controls, not the caller's (a global flush or a table write reaches
        // shadows of every role).
        let ctx = &sp.role.perm_ctx(ctx);
        let pte = guest.read_entry(gpa, size).unwrap_or(0);
        let new = if sp.role.level() == 1 {
            self.leaf_from_pte(guest, sp.role, pte, ctx).unwrap_or(0)
        } else {
            // Keep the link while the guest entry still leads to the same shadow.
            let child = self.sps[self.tables.index(e & SPTE_ADDR) as usize];
            match Self::expected_child(&sp, index, pte, ctx) {
                Some((gfn, role)) if gfn == child.gfn && role == child.role => e,
                _ => 0,
            }
        };
        self.set_entry(i, index, new)
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
        i: u32,
        lo: u64,
        hi: u64,
        ctx: &PermCtx,
    ) -> Result<(), Full> {
        // The shadow entries that the written guest entries stand behind.
        let role = self.sps[i as usize].role;
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

    /// The vCPU could not emulate a write to a protected table: let the guest write it
    /// (its shadows go out of sync).
    pub fn unprotect(&mut self, gfn: u64) {
        self.unsync_gfn(gfn);
    }

    /// Whether a shadow of guest table `gfn` is an upper-level one (whose writes are
    /// emulated rather than unsynced).
    fn upper_shadow(&self, gfn: u64) -> bool {
        let mut upper = false;
        self.for_gfn(gfn, |_, sp| upper |= sp.role.level() > 1);
        upper
    }

    /// Starts a search up the parent links: each sp is visited at most once per search,
    /// so a search costs at most the pool's sps and links, whatever the guest's tables'
    /// fan-in (page directories whose 512 entries all point at one table would make the
    /// paths up from a leaf 512^3).
    fn new_visit(&mut self) {
        self.st.visit = self.st.visit.wrapping_add(1);
        if self.st.visit == 0 {
            for sp in self.sps.iter_mut() {
                sp.visit = 0;
            }
            self.st.visit = 1;
        }
    }

    /// Marks sp `i` visited by the current search; false if it already was. (An sp is
    /// always reached at the same distance from where the search started: a parent is
    /// one level up.)
    fn first_visit(&mut self, i: u32) -> bool {
        self.st.stats.parent_visits += 1;
        let sp = &mut self.sps[i as usize];
        if sp.visit == self.st.visit {
            return false;
        }
        sp.visit = self.st.visit;
        true
    }

    /// Whether a pinned sp is sp `i` or above it (through parent links, at most `depth`
    /// levels up; deeper counts as yes).
    fn rooted(&mut self, i: u32, depth: u8) -> bool {
        self.new_visit();
        self.rooted_from(i, depth)
    }

    fn rooted_from(&mut self, i: u32, depth: u8) -> bool {
        let sp = &self.sps[i as usize];
        if sp.pins > 0 || depth == 0 {
            return true;
        }
        if !self.first_visit(i) {
            // Searched already, found nothing.
            return false;
        }
        let mut n = self.sps[i as usize].parents;
        while n != NIL {
            let l = self.links[n as usize];
            if self.rooted_from(l.at >> 9, depth - 1) {
                return true;
            }
            n = l.next;
        }
        false
    }

    /// Whether sp `i` is `top` or linked below it (through parent links, at most
    /// `depth` levels up).
    fn under(&mut self, i: u32, top: u32, depth: u8) -> bool {
        self.new_visit();
        self.under_from(i, top, depth)
    }

    fn under_from(&mut self, i: u32, top: u32, depth: u8) -> bool {
        if i == top {
            return true;
        }
        if depth == 0 || !self.first_visit(i) {
            return false;
        }
        let mut n = self.sps[i as usize].parents;
        while n != NIL {
            let l = self.links[n as usize];
            if self.under_from(l.at >> 9, top, depth - 1) {
                return true;
            }
            n = l.next;
        }
        false
    }

    /// Resyncs the unsync shadows under `top` (NIL: every one), or only the upper-level
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
    fn sync_some(
        &mut self,
        guest: &mut impl GuestPhys,
        ctx: &PermCtx,
        upper_only: bool,
        top: u32,
        budget: u32,
    ) -> Result<bool, Full> {
        if self.st.n_unsync == 0 {
            return Ok(true);
        }
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
            let i = self.unsync[k];
            if upper_only && self.sps[i as usize].role.level() == 1 {
                k += 1;
                continue;
            }
            // Under `top` (one walk up the parent links; such an sp is rooted: `top`
            // is pinned), else an orphan, else another address space's.
            let in_scope = top == NIL || self.under(i, top, 4);
            let orphan = (top == NIL || !in_scope) && !self.rooted(i, 4);
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
            self.sps[i as usize].unsync = false;
            self.st.n_unsync -= 1;
            self.unsync[k] = self.unsync[self.st.n_unsync];
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
        for d in 0..done {
            let i = self.unsync[self.sps.len() - 1 - d];
            if self.sps[i as usize].valid {
                self.resync(guest, i, ctx)?;
            }
        }
        for d in 0..done {
            let i = self.unsync[self.sps.len() - 1 - d];
            let sp = self.sps[i as usize];
            if sp.valid && !sp.unsync {
                self.write_protect(guest, sp.gfn);
            }
        }
        Ok(complete)
    }

    /// Present entries of sp `i` (what its resync costs).
    fn present_entries(&mut self, i: u32) -> u32 {
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
    fn child(
        &mut self,
        guest: &mut impl GuestPhys,
        parent: u32,
        index: usize,
        gfn: u64,
        role: Role,
        ctx: &PermCtx,
        budget: u32,
    ) -> Result<Option<u32>, Full> {
        let e = self.tables.table(parent)[index];
        if e & SPTE_P != 0 {
            let c = self.tables.index(e & SPTE_ADDR);
            let sp = &self.sps[c as usize];
            if sp.gfn == gfn && sp.role == role {
                return Ok(Some(c));
            }
        }
        let mut c = self.find(gfn, role);
        if c == NIL {
            c = self.alloc_sp(gfn, role)?;
            if !role.direct() {
                self.protect_new(guest, c);
            }
        } else if !role.direct() {
            // An existing shadow joins this tree: what went out of sync under it
            // before this address space's last flush must not show through it. Synced
            // before the link (pinned meanwhile: a sync unshadows orphans), so that a
            // sync in steps never exposes a half-synced tree.
            self.sps[c as usize].pins += 1;
            let synced = self.sync_some(guest, ctx, false, c, budget);
            self.sps[c as usize].pins -= 1;
            if !synced? {
                self.st.stats.sync_steps += 1;
                return Ok(None);
            }
        }
        let prole = self.sps[parent as usize].role;
        let pa = self.tables.pa(c);
        // The CPU loads a PAE-format root's four entries as PDPTEs: P and address only.
        let e = if prole.level() == 3 && prole.mode() != MODE_LONG4 {
            spte::pae_pdpte(pa)
        } else {
            spte::table(pa)
        };
        self.set_entry(parent, index, e)?;
        Ok(Some(c))
    }

    /// A new shadow of a guest table: in sync and write-protected, unless the table's
    /// other shadows are out of sync (then it joins them).
    fn protect_new(&mut self, guest: &mut impl GuestPhys, c: u32) {
        let gfn = self.sps[c as usize].gfn;
        let mut others_unsync = false;
        self.for_gfn(gfn, |i, sp| others_unsync |= i != c && sp.unsync);
        if others_unsync {
            self.mark_unsync(c);
            self.st.stats.unsyncs -= 1;
        } else {
            self.write_protect(guest, gfn);
        }
    }

    // ---- the operations the vCPU calls ----

    /// MOV CR3: returns the root for `cr3` under `ctx`, from the pool if it is there;
    /// with `flush` (any MOV CR3 without PCIDs, or with bit 63 clear) out-of-sync
    /// shadows are brought up to date first (with PCIDs and bit 63 set, the TLB may keep
    /// stale entries, and so may the shadow). `prev` is the vCPU's current root
    /// (unpinned), or NIL.
    ///
    /// The sync stops after `budget` ([`SYNC_BUDGET`], or `u32::MAX` for all of it):
    /// `None` then, with the vCPU still on `prev`; it runs the instruction again.
    #[allow(clippy::too_many_arguments)]
    pub fn load_root(
        &mut self,
        guest: &mut impl GuestPhys,
        mode: PagingMode,
        cr3: u64,
        ctx: &PermCtx,
        prev: u32,
        flush: bool,
        budget: u32,
    ) -> Result<Option<u32>, Full> {
        let (m, pse, cr3) = match mode {
            PagingMode::Long4 => (MODE_LONG4, false, cr3 & (ctx.phys_mask())),
            PagingMode::Pae => (MODE_PAE, false, cr3 & 0xffff_ffe0),
            PagingMode::Bits32 { pse } => (MODE_BITS32, pse, cr3 & 0xffff_f000),
            PagingMode::None => (MODE_NONE, false, 0),
        };
        let gfn = cr3 >> 12;
        let role = Role::root(ctx, m, pse, cr3);
        let mut r = self.find(gfn, role);
        if r != NIL {
            self.st.stats.root_hits += 1;
        } else {
            self.st.stats.root_misses += 1;
            r = self.alloc_sp(gfn, role)?;
            if !role.direct() {
                self.protect_new(guest, r);
            }
        }
        if !self.sps[r as usize].cached {
            // Cached roots are pinned: their place in the LRU list matters only once
            // they leave the cache.
            self.touch(r);
        }
        if flush {
            // What this root reaches comes up to date (pinned meanwhile: a sync
            // unshadows orphans). The previous root keeps its pin until the sync is
            // done: the vCPU runs on it if the sync takes more than one call.
            self.sps[r as usize].pins += 1;
            let synced = self.sync_some(guest, ctx, false, r, budget);
            self.sps[r as usize].pins -= 1;
            if !synced? {
                self.st.stats.sync_steps += 1;
                return Ok(None);
            }
        }
        // The vCPU's reference moves to the new root.
        self.sps[r as usize].pins += 1;
        if prev != NIL && self.sps[prev as usize].valid {
            let p = &mut self.sps[prev as usize].pins;
            *p = p.saturating_sub(1);
        }
        if m == MODE_PAE {
            // MOV CR3 loads the four PDPTEs: the root is their copy.
            for j in 0..4 {
                let pdpte = guest.read_entry(cr3 + 8 * j as u64, 8).unwrap_or(0);
                let sp = self.sps[r as usize];
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
        let sp = &mut self.sps[r as usize];
        sp.stamp = self.st.clock;
        if !sp.cached {
            sp.cached = true;
            sp.pins += 1;
            let n = self.st.n_roots;
            if n < self.st.max_roots {
                self.st.roots[n] = r;
                self.st.n_roots += 1;
            } else {
                let mut k = 0;
                for j in 1..n {
                    if self.sps[self.st.roots[j] as usize].stamp
                        < self.sps[self.st.roots[k] as usize].stamp
                    {
                        k = j;
                    }
                }
                let old = &mut self.sps[self.st.roots[k] as usize];
                old.cached = false;
                old.pins -= 1;
                self.st.roots[k] = r;
            }
        }
        Ok(Some(r))
    }

    /// Takes a reference on sp `i` (a vCPU's cache of recent roots): it is not reclaimed
    /// while referenced.
    pub fn pin(&mut self, i: u32) {
        if i != NIL && self.sps[i as usize].valid {
            self.sps[i as usize].pins += 1;
        }
    }

    /// Drops a reference [`Pool::pin`] took.
    pub fn unpin(&mut self, i: u32) {
        if i != NIL && self.sps[i as usize].valid && self.sps[i as usize].pins > 0 {
            self.sps[i as usize].pins -= 1;
        }
    }

    /// Drops the vCPU's reference to its root (it leaves 4-level paging, or goes away).
    pub fn put_root(&mut self, root: u32) {
        if root != NIL && self.sps[root as usize].valid && self.sps[root as usize].pins > 0 {
            self.sps[root as usize].pins -= 1;
        }
    }

    /// The host-physical address of a root's table (the real CR3).
    pub fn root_pa(&self, root: u32) -> u64 {
        self.tables.pa(root)
    }

    /// A #PF exit at `gva` under root `root`: walks the guest's tables and syncs the
    /// missing entry (building the shadows on the way, prefetching neighbours), or
    /// says what else it is.
    pub fn page_fault(
        &mut self,
        guest: &mut impl GuestPhys,
        root: u32,
        cr3: u64,
        gva: u64,
        access: Access,
        ctx: &PermCtx,
    ) -> Result<Fix, Full> {
        let role = self.sps[root as usize].role;
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
        let mut path = [NIL; 5];
        let r = self.fault_path(guest, root, gva, access, ctx, &w, &mut path);
        for &i in path.iter().filter(|&&i| i != NIL) {
            self.sps[i as usize].pins -= 1;
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn fault_path(
        &mut self,
        guest: &mut impl GuestPhys,
        root: u32,
        gva: u64,
        access: Access,
        ctx: &PermCtx,
        w: &Walk,
        path: &mut [u32; 5],
    ) -> Result<Fix, Full> {
        let mut sp = root;
        let mut n = 0;
        let mut pin = |pool: &mut Self, i: u32| {
            pool.sps[i as usize].pins += 1;
            pool.sps[i as usize].flood = 0;
            pool.touch(i);
            path[n] = i;
            n += 1;
        };
        pin(self, sp);
        // From the root down to the shadow page table: guest tables, then the pieces of
        // a large page.
        let mode = self.sps[root as usize].role.mode();
        for level in (2..=top_level(mode)).rev() {
            let cur = self.sps[sp as usize];
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
                    && self.sps[c as usize].role.direct()
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
            // A walk that succeeded always leads somewhere.
            let (gfn, role) = Self::expected_child(&cur, j, pte, ctx).ok_or(Full)?;
            let Some(c) = self.child(guest, sp, j, gfn, role, ctx, SYNC_BUDGET)? else {
                return Ok(Fix::Retry);
            };
            sp = c;
            pin(self, sp);
        }
        let Some((hpa, ro)) = guest.host_pa(w.gpa) else {
            if self.st.mmio_sptes && w.gpa < SPTE_MMIO {
                let e = SPTE_P
                    | SPTE_MMIO
                    | (w.gpa & SPTE_ADDR)
                    | if w.rw_all { MMIO_W } else { 0 }
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
        self.prefetch(guest, sp, index, w, ctx)?;
        Ok(Fix::Mapped)
    }

    /// Fills the empty entries of `index`'s aligned group in leaf sp `sp` from the
    /// guest's table (or, for a large page, from the same large entry).
    fn prefetch(
        &mut self,
        guest: &mut impl GuestPhys,
        sp: u32,
        index: usize,
        w: &Walk,
        ctx: &PermCtx,
    ) -> Result<(), Full> {
        let s = self.sps[sp as usize];
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
                match guest.host_pa(gpa) {
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

    /// INVLPG `gva` under root `root`: the upper-level shadows under it come back in
    /// sync (the paging-structure caches are flushed) and `gva`'s shadow entry is refreshed from
    /// the guest's PTE (dropped where it cannot be cached). False: the sync took
    /// `budget` (see [`Pool::load_root`]) and the entry is not refreshed yet; the vCPU
    /// runs the instruction again.
    pub fn invlpg(
        &mut self,
        guest: &mut impl GuestPhys,
        root: u32,
        gva: u64,
        ctx: &PermCtx,
        budget: u32,
    ) -> Result<bool, Full> {
        // INVLPG acts on the current address space: the upper-level shadows its root
        // reaches (others, a root being filled for a new process included, wait for
        // their own flush).
        if !self.sync_some(guest, ctx, true, root, budget)? {
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
        root: u32,
        gva: u64,
        ctx: &PermCtx,
    ) -> Result<(), Full> {
        let mut sp = root;
        let mode = self.sps[root as usize].role.mode();
        for level in (1..=top_level(mode)).rev() {
            let index = sindex(gva, level, mode);
            let e = self.tables.table(sp)[index];
            if e & SPTE_P == 0 {
                return Ok(());
            }
            if level == 1 {
                // The entry comes back from the guest's current PTE (the path down to
                // it is in sync), as KVM's invlpg does: no fault to refill it.
                let s = self.sps[sp as usize];
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

    /// A #PF with the RSVD bit: the guest-physical address of `gva` if its shadow entry
    /// is an MMIO entry whose cached guest rights allow `access` (else the slow path
    /// decides, with a full walk).
    pub fn mmio_fast(&mut self, root: u32, gva: u64, access: Access, ctx: &PermCtx) -> Option<u64> {
        let mut sp = root;
        let mode = self.sps[root as usize].role.mode();
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
                let denied = if access.user {
                    !u || (access.write && !w) || (access.fetch && nx)
                } else if access.fetch {
                    nx || (u && ctx.smep)
                } else {
                    (u && ctx.smap && !ctx.ac) || (access.write && !w && ctx.wp)
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

    /// Flushes every TLB entry (INVPCID of all contexts, a single context): every
    /// out-of-sync shadow is brought up to date. False: the sync took `budget` (see
    /// [`Pool::load_root`]); the vCPU runs the instruction again.
    pub fn flush_all(
        &mut self,
        guest: &mut impl GuestPhys,
        ctx: &PermCtx,
        budget: u32,
    ) -> Result<bool, Full> {
        let done = self.sync_some(guest, ctx, false, NIL, budget)?;
        if !done {
            self.st.stats.sync_steps += 1;
        }
        Ok(done)
    }

    /// Number of shadows out of sync now.
    pub fn unsync_count(&self) -> usize {
        self.st.n_unsync
    }
}

#[cfg(test)]
mod tests;
