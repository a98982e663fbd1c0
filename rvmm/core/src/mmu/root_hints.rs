// SPDX-License-Identifier: GPL-2.0

//! A vCPU's recent roots: each holds a reference (a pin) on a root of the pool, so that
//! a MOV CR3 back to one of them switches without the pool lock while the pool's
//! generation is the same and nothing is out of sync. The references of all the VM's
//! vCPUs together stay within what the root cache keeps, so that however many vCPUs
//! there are, their pins leave the pool room to work in.

use super::pool::{Pool, SpId, Tables};

/// Most recent roots a vCPU keeps (as many as the largest root cache).
pub const HINTS: usize = 64;

/// The hint slot of a CR3 value (its page, and a PAE PDPT's place in it).
fn slot(cr3: u64) -> usize {
    (((cr3 >> 12) ^ (cr3 >> 5)) as usize) & (HINTS - 1)
}

/// A recent root: for CR3 `cr3` under the paging state `key`, from pool generation
/// `gen`, with its table at host-physical `pa`.
#[derive(Clone, Copy, Debug)]
struct RootHint {
    cr3: u64,
    key: u64,
    /// `None`: an empty slot.
    root: Option<SpId>,
    pa: u64,
    gen: u64,
}

impl RootHint {
    const EMPTY: Self = Self {
        cr3: 0,
        key: 0,
        root: None,
        pa: 0,
        gen: u64::MAX,
    };
}

/// A vCPU's recent roots, direct-mapped by CR3.
#[derive(Clone, Copy, Debug)]
pub struct RootHints {
    hints: [RootHint; HINTS],
    /// Slots in use, minus one (a power of two minus one).
    mask: usize,
}

impl Default for RootHints {
    fn default() -> Self {
        Self::new()
    }
}

impl RootHints {
    /// No hints.
    pub const fn new() -> Self {
        Self {
            hints: [RootHint::EMPTY; HINTS],
            mask: 0,
        }
    }

    /// MOV CR3 without the pool lock: the root to switch to and its table's address, if
    /// this vCPU holds one for `cr3` under `key` from the pool's current generation
    /// `gen`, and the load needs nothing else: it flushes nothing out of sync (no
    /// `flush`, or `unsync`, the VM's out-of-sync shadows, is zero), and it loads no
    /// PDPTEs (`pae`: under PAE paging MOV CR3 loads them, which the root copies).
    pub fn fast_switch(
        &self,
        cr3: u64,
        key: u64,
        gen: u64,
        flush: bool,
        unsync: usize,
        pae: bool,
    ) -> Option<(SpId, u64)> {
        if pae || (flush && unsync != 0) {
            return None;
        }
        self.lookup(cr3, key, gen)
    }

    /// Without the pool lock: the root and its table's address for `cr3` under `key`,
    /// if this vCPU holds a reference on it from pool generation `gen`.
    pub fn lookup(&self, cr3: u64, key: u64, gen: u64) -> Option<(SpId, u64)> {
        let h = &self.hints[slot(cr3) & self.mask];
        let root = h.root?;
        (h.gen == gen && h.cr3 == cr3 && h.key == key).then_some((root, h.pa))
    }

    /// Under the pool lock, after `root` was loaded for `cr3` under `key`: remembered,
    /// with a reference of its own (replacing the slot's previous root). A vCPU of
    /// `vcpus` keeps at most the root cache's size divided among them (a power of two,
    /// at least one); when that changes, every hint is dropped first.
    pub fn remember<T: Tables>(
        &mut self,
        pool: &mut Pool<'_, T>,
        cr3: u64,
        key: u64,
        root: SpId,
        vcpus: u32,
    ) {
        let share = (pool.st.max_roots / vcpus.max(1) as usize).clamp(1, HINTS);
        let cap = 1usize << (usize::BITS - 1 - share.leading_zeros());
        if cap - 1 != self.mask {
            self.release(pool);
            self.mask = cap - 1;
        }
        let gen = pool.st.generation;
        let h = &mut self.hints[slot(cr3) & self.mask];
        if h.root == Some(root) && h.gen == gen && h.cr3 == cr3 && h.key == key {
            return;
        }
        if let Some(old) = h.root.filter(|_| h.gen == gen) {
            pool.unpin(old);
        }
        pool.pin(root);
        *h = RootHint {
            cr3,
            key,
            root: Some(root),
            pa: pool.root_pa(root),
            gen,
        };
    }

    /// Under the pool lock: drops every hint and the references of those from the
    /// pool's current generation (older ones went with the reset that ended it).
    pub fn release<T: Tables>(&mut self, pool: &mut Pool<'_, T>) {
        let gen = pool.st.generation;
        for h in self.hints.iter_mut() {
            if let Some(old) = h.root.filter(|_| h.gen == gen) {
                pool.unpin(old);
            }
            *h = RootHint::EMPTY;
        }
    }

    /// Roots held (of any generation).
    pub fn held(&self) -> usize {
        self.hints.iter().filter(|h| h.root.is_some()).count()
    }
}
