// SPDX-License-Identifier: GPL-2.0

//! The VM's shadow page pool and CR3 cache: the storage of `rvmm_core::mmu::pool`,
//! allocated once when the VM's first vCPU is created, behind a spinlock that the
//! vCPUs take with interrupts off (on #PF, MOV CR3 and INVLPG exits). Nothing on those
//! paths allocates.

use core::sync::atomic::{
    fence, AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};

use kernel::{new_mutex, new_spinlock, prelude::*, sync::Arc, sync::Mutex, sync::SpinLock};
use rvmm_core::mmu::pool::{
    ApicAccess, Link, Pool, PoolStats, Rmap, RmapId, Sp, SpId, State, Tables, MAX_ROOTS,
};
use rvmm_uapi as uapi;

use crate::ffi::{rvmm_kick_cpu, rvmm_pa_to_va};

const MAX_VCPUS: usize = uapi::RVMM_MAX_VCPUS as usize;
use crate::mmu::Dma32Page;

/// The pool's table pages: DMA32 pages (any host-physical address works for a 4-level
/// root, but the vCPU's PAE roots share the allocator), and a hash from host-physical
/// address back to the page index.
pub(crate) struct PoolTables {
    /// Who may be translating through the tables (for remote flushes).
    modes: Arc<GuestModes>,
    _pages: KVVec<Dma32Page>,
    pas: KVVec<u64>,
    /// Their direct-map addresses (no translation on the hot paths).
    vas: KVVec<usize>,
    /// Open addressing (linear probing) from host-physical address to page.
    by_pa: KVVec<Option<SpId>>,
}

impl PoolTables {
    /// Room for `n` table pages, `first` of them allocated now.
    fn new(n: usize, first: usize, modes: Arc<GuestModes>) -> Result<Self> {
        let mut by_pa = KVVec::new();
        by_pa.resize((2 * n).next_power_of_two(), None, crate::vm_gfp())?;
        let mut t = Self {
            modes,
            _pages: KVVec::with_capacity(n, crate::vm_gfp())?,
            pas: KVVec::with_capacity(n, crate::vm_gfp())?,
            vas: KVVec::with_capacity(n, crate::vm_gfp())?,
            by_pa,
        };
        for _ in 0..first {
            t.add(Dma32Page::new()?);
        }
        Ok(t)
    }

    /// How many table pages exist.
    fn len(&self) -> usize {
        self.pas.len()
    }

    /// Adds a table page (no allocation: the vectors have room for the pool's limit;
    /// callers check `len` against it).
    fn add(&mut self, p: Dma32Page) {
        let i = self.pas.len();
        let pa = p.pa();
        // The capacity is the limit: these pushes do not allocate.
        if self.pas.push(pa, GFP_NOWAIT).is_err()
            // SAFETY: `pa` is the page just allocated, in the direct map.
            || self.vas.push(unsafe { rvmm_pa_to_va(pa) } as usize, GFP_NOWAIT).is_err()
            || self._pages.push(p, GFP_NOWAIT).is_err()
        {
            self.pas.truncate(i);
            self.vas.truncate(i);
            return;
        }
        let mask = self.by_pa.len() - 1;
        let mut h = Self::slot(pa, mask);
        while self.by_pa[h].is_some() {
            h = (h + 1) & mask;
        }
        self.by_pa[h] = Some(SpId::new(i as u32));
    }

    fn slot(pa: u64, mask: usize) -> usize {
        ((pa >> 12).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as usize & mask
    }
}

/// The pool asked for the sp of an address that is not one of its table pages: a bug
/// (out of line, so that the lookup stays small enough to inline).
#[cold]
#[inline(never)]
fn not_a_table_page(pa: u64) -> ! {
    panic!("rvmm: {pa:#x} is not a shadow table page")
}

impl Tables for PoolTables {
    fn table(&mut self, i: SpId) -> &mut [u64; 512] {
        // SAFETY: `pas[i]` is a 4-KiB page this struct owns, reachable through the direct
        // map; `&mut self` makes the reference exclusive (the pool is behind a lock).
        unsafe { &mut *(self.vas[i.index()] as *mut [u64; 512]) }
    }
    fn pa(&self, i: SpId) -> u64 {
        self.pas[i.index()]
    }
    fn index(&self, pa: u64) -> SpId {
        let mask = self.by_pa.len() - 1;
        let mut h = Self::slot(pa, mask);
        loop {
            match self.by_pa[h] {
                Some(i) if self.pas[i.index()] == pa => return i,
                Some(_) => h = (h + 1) & mask,
                // Not a table page: the pool asks only about addresses `pa` gave it.
                None => not_a_table_page(pa),
            }
        }
    }
    fn flush_remote(&mut self, generation: u64) {
        self.modes.flush(generation);
    }
}

/// The pool's storage.
pub(crate) struct ShadowPool {
    sps: KVVec<Sp>,
    buckets: KVVec<Option<SpId>>,
    links: KVVec<Link>,
    rmaps: KVVec<Rmap>,
    rbuckets: KVVec<Option<RmapId>>,
    unsync: KVVec<SpId>,
    st: State,
    tables: PoolTables,
}

impl ShadowPool {
    fn new(pages: usize, roots: usize, modes: Arc<GuestModes>) -> Result<KBox<Self>> {
        let first = pages.min(POOL_FIRST_PAGES);
        let mut p = KBox::new(
            Self {
                sps: KVVec::from_elem(Sp::default(), pages, crate::vm_gfp())?,
                buckets: KVVec::from_elem(None, pages.next_power_of_two(), crate::vm_gfp())?,
                links: KVVec::from_elem(Link::default(), pages * 8, crate::vm_gfp())?,
                rmaps: KVVec::from_elem(Rmap::default(), pages * 64, crate::vm_gfp())?,
                rbuckets: KVVec::from_elem(
                    None,
                    (pages * 16).next_power_of_two(),
                    crate::vm_gfp(),
                )?,
                // Any sp: only the ones the pool counts as out of sync are read.
                unsync: KVVec::from_elem(SpId::new(0), pages, crate::vm_gfp())?,
                st: State::new(roots),
                tables: PoolTables::new(pages, first, modes)?,
            },
            crate::vm_gfp(),
        )?;
        p.pool().init();
        p.st.sp_cap = first as u32;
        // MMIO entries need bit 51 to be reserved: MAXPHYADDR below 52. They are present
        // entries with a reserved bit and the guest's physical address: on a CPU with
        // L1TF that is a speculative read of host memory, so none there (every MMIO
        // access walks the guest's tables instead).
        let maxphy = core::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff;
        // SAFETY: a query of the boot CPU's bug bits.
        p.st.mmio_sptes = maxphy < 52 && !unsafe { crate::ffi::rvmm_cpu_has_l1tf() };
        p.st.emulate_writes = true;
        Ok(p)
    }

    /// The pool over this storage.
    pub(crate) fn pool(&mut self) -> Pool<'_, PoolTables> {
        Pool {
            sps: &mut self.sps,
            buckets: &mut self.buckets,
            links: &mut self.links,
            rmaps: &mut self.rmaps,
            rbuckets: &mut self.rbuckets,
            unsync: &mut self.unsync,
            st: &mut self.st,
            tables: &mut self.tables,
        }
    }

    pub(crate) fn stats(&self) -> PoolStats {
        self.st.stats
    }
}

/// Table pages a pool starts with; it grows (doubling) up to its limit as its vCPUs
/// use them, so that a VM costs what it uses.
const POOL_FIRST_PAGES: usize = 64;

/// The pool grows when fewer than this many of its table pages were never used.
const POOL_SLACK: usize = 16;

/// Where a VM's vCPUs are: in a run section on some CPU, in guest mode or not. The
/// pool's remote flushes and the pre-entry checks meet here.
pub(crate) struct GuestModes {
    /// vCPUs of the VM.
    vcpus: AtomicU32,
    /// Bit `j`: vCPU `j` exists.
    created: AtomicU32,
    /// Per vCPU: the CPU its run section is on (-1: none), and how many times it has
    /// left guest mode.
    running: [AtomicI32; MAX_VCPUS],
    exits: [AtomicU64; MAX_VCPUS],
    /// Per vCPU: run sections ended.
    sections: [AtomicU64; MAX_VCPUS],
    /// Per vCPU: between "about to enter guest mode" (before its pre-entry check) and
    /// its next VM exit. A vCPU that is not is in the host, and its next VM entry
    /// checks the pool generation and flushes its TLB (no VPIDs): a remote flush need
    /// not wait for it (and must not: it may itself be waiting for this vCPU,
    /// interrupts off).
    in_guest: [AtomicBool; MAX_VCPUS],
    /// The pool's generation: a vCPU whose root is older loads it again before it
    /// enters. Stored before every remote flush that lets zapped pages be reused.
    pub(crate) generation: AtomicU64,
    /// The memory map's generation: a vCPU whose map is older takes the new one
    /// before it enters.
    pub(crate) slots_generation: AtomicU64,
    /// The pool's number of out-of-sync shadows, as of the last pool operation: a vCPU
    /// switches to a root it holds a reference on without the lock when the
    /// generation is the same and nothing needs a resync.
    pub(crate) unsync: AtomicUsize,
    /// Remote flushes that had vCPUs in guest mode to make leave it, the IPIs they
    /// sent, and the TSC ticks they waited for those vCPUs.
    pub(crate) remote_flushes: AtomicU64,
    pub(crate) flush_ipis: AtomicU64,
    pub(crate) flush_wait_ticks: AtomicU64,
    /// IPIs that made a vCPU leave guest mode for an interrupt posted to it.
    pub(crate) irq_kicks: AtomicU64,
}

impl GuestModes {
    fn new() -> Result<Arc<Self>> {
        Ok(Arc::new(
            Self {
                vcpus: AtomicU32::new(0),
                created: AtomicU32::new(0),
                running: [const { AtomicI32::new(-1) }; MAX_VCPUS],
                exits: [const { AtomicU64::new(0) }; MAX_VCPUS],
                sections: [const { AtomicU64::new(0) }; MAX_VCPUS],
                in_guest: [const { AtomicBool::new(false) }; MAX_VCPUS],
                generation: AtomicU64::new(0),
                slots_generation: AtomicU64::new(0),
                unsync: AtomicUsize::new(0),
                remote_flushes: AtomicU64::new(0),
                flush_ipis: AtomicU64::new(0),
                flush_wait_ticks: AtomicU64::new(0),
                irq_kicks: AtomicU64::new(0),
            },
            crate::vm_gfp(),
        )?)
    }

    /// Publishes `generation`, then makes every vCPU in guest mode leave it and waits
    /// until it has: on return no vCPU translates through a shadow table that was
    /// zapped before the call, and every vCPU checks `generation` before it enters
    /// again. Callable with interrupts off and the pool lock held: a vCPU in guest
    /// mode holds no lock, and one that is not is not waited for.
    pub(crate) fn flush(&self, generation: u64) {
        // Stored before `in_guest` is read; a vCPU stores `in_guest` before it reads
        // the generation (`pre_entry_ok`): one of the two sees the other.
        self.generation.store(generation, Ordering::SeqCst);
        self.kick_in_guest(u32::MAX);
    }

    /// Waits until every run section that started before the call has ended: exit
    /// handlers of vCPUs that hold an older memory map are done with it. Sections are
    /// bounded in time (`SECTION_BUDGET_US`) and never wait for this caller.
    fn wait_sections(&self) {
        for (j, running) in self.running.iter().enumerate() {
            let cpu = running.load(Ordering::SeqCst);
            if cpu < 0 {
                continue;
            }
            let n = self.sections[j].load(Ordering::SeqCst);
            while running.load(Ordering::Acquire) == cpu
                && self.sections[j].load(Ordering::Acquire) == n
            {
                core::hint::spin_loop();
            }
        }
    }

    /// Makes every vCPU but `me` that is in guest mode leave it, and waits until it
    /// has. Called with interrupts off.
    fn kick_in_guest(&self, me: u32) {
        // Only the vCPUs that exist (with one vCPU that calls this, none: no loop over
        // every possible vCPU on each pool operation that removed rights).
        let created = self.created.load(Ordering::Acquire) & !1u32.checked_shl(me).unwrap_or(0);
        if created == 0 {
            return;
        }
        // The entries changed before this point; a vCPU that enters after this read
        // enters with a flushed TLB.
        fence(Ordering::SeqCst);
        let mut seen = [(-1i32, 0u64); MAX_VCPUS];
        let mut ipis = 0;
        for (j, s) in seen.iter_mut().enumerate() {
            if created & (1 << j) == 0 {
                continue;
            }
            let cpu = self.running[j].load(Ordering::SeqCst);
            // The count before the mode: a vCPU seen in guest mode after its count was
            // read leaves it with a new count. One seen out of guest mode enters again
            // only after this point, with a flushed TLB: not waited for, so that two
            // vCPUs flushing at once (each in its run section, interrupts off) do not
            // wait for each other for ever.
            let n = self.exits[j].load(Ordering::SeqCst);
            if cpu >= 0 && self.in_guest[j].load(Ordering::SeqCst) {
                *s = (cpu, n);
                // SAFETY: `cpu` is an online CPU (a vCPU runs there with interrupts off,
                // so it cannot go offline under it); a reschedule IPI has no other effect.
                unsafe { rvmm_kick_cpu(cpu) };
                ipis += 1;
            }
        }
        if ipis == 0 {
            return;
        }
        // SAFETY: RDTSC has no side effects.
        let start = unsafe { core::arch::x86_64::_rdtsc() };
        for (j, &(cpu, n)) in seen.iter().enumerate() {
            if cpu < 0 {
                continue;
            }
            while self.running[j].load(Ordering::Acquire) == cpu
                && self.exits[j].load(Ordering::Acquire) == n
            {
                core::hint::spin_loop();
            }
        }
        // SAFETY: as above.
        let waited = unsafe { core::arch::x86_64::_rdtsc() }.wrapping_sub(start);
        self.remote_flushes.fetch_add(1, Ordering::Relaxed);
        self.flush_ipis.fetch_add(ipis, Ordering::Relaxed);
        self.flush_wait_ticks.fetch_add(waited, Ordering::Relaxed);
    }
}

/// A VM's shadow state: the pool (once a vCPU exists) and the limits it is made with.
#[pin_data]
pub(crate) struct Shadow {
    #[pin]
    pub(crate) pool: SpinLock<Option<KBox<ShadowPool>>>,
    #[pin]
    limits: Mutex<uapi::ShadowLimits>,
    /// Where the vCPUs are (shared with the pool's tables for its remote flushes).
    pub(crate) modes: Arc<GuestModes>,
    /// CR3 loads served without the lock.
    pub(crate) fast_root_hits: AtomicU64,
}

impl Shadow {
    pub(crate) fn new(pages: u32, roots: u32) -> Result<impl PinInit<Self>> {
        let modes = GuestModes::new()?;
        Ok(pin_init!(Self {
            pool <- new_spinlock!(None),
            limits <- new_mutex!(uapi::ShadowLimits { pages, roots }),
            modes,
            fast_root_hits: AtomicU64::new(0),
        }))
    }

    /// RVMM_SET_SHADOW_LIMITS: only before the pool exists.
    pub(crate) fn set_limits(&self, l: &uapi::ShadowLimits) -> Result {
        let mut limits = self.limits.lock();
        if self.pool.lock().is_some() {
            user_pr!(
                pr_info,
                "set shadow limits: the VM already has vCPUs; set limits before creating them\n"
            );
            return Err(EBUSY);
        }
        let pages = if l.pages == 0 { limits.pages } else { l.pages };
        let roots = if l.roots == 0 { limits.roots } else { l.roots };
        if !(64..=65536).contains(&pages) || !(1..=MAX_ROOTS as u32).contains(&roots) {
            user_pr!(
                pr_info,
                "set shadow limits: pages {} (64..65536) or roots {} (1..{}) out of range\n",
                pages,
                roots,
                MAX_ROOTS
            );
            return Err(EINVAL);
        }
        *limits = uapi::ShadowLimits { pages, roots };
        Ok(())
    }

    /// A vCPU is being created: make the pool if this is the first.
    pub(crate) fn vcpu_added(&self, id: u32) -> Result {
        let limits = self.limits.lock();
        if self.pool.lock().is_none() {
            let p = ShadowPool::new(
                limits.pages as usize,
                limits.roots as usize,
                self.modes.clone(),
            )?;
            *self.pool.lock() = Some(p);
        }
        self.modes.vcpus.fetch_add(1, Ordering::Relaxed);
        self.modes.created.fetch_or(1 << id, Ordering::Release);
        Ok(())
    }

    /// Maps the xAPIC page to the APIC-access page or not, as `decide` says under the
    /// pool lock (so that concurrent deciders are ordered, and the last one sees what
    /// every vCPU published before it asked). A change drops every shadow entry and
    /// makes every vCPU leave guest mode before it returns (see `Pool::set_apic_access`).
    pub(crate) fn set_apic_access(&self, decide: impl FnOnce() -> Option<ApicAccess>) {
        if let Some(storage) = self.pool.lock().as_deref_mut() {
            let mut pool = storage.pool();
            if pool.set_apic_access(decide()) {
                self.settle(&mut pool);
            }
        }
    }

    /// The end of a pool operation, under the pool lock: entries that lost rights are
    /// flushed from every other vCPU's TLB before anyone (the next holder of the lock
    /// included) relies on the change, then the pool's generation and unsync count are
    /// published for the lock-free root switch.
    pub(crate) fn settle(&self, pool: &mut Pool<'_, PoolTables>) {
        pool.flush_tlbs();
        self.modes
            .generation
            .store(pool.st.generation, Ordering::SeqCst);
        self.modes
            .unsync
            .store(pool.unsync_count(), Ordering::Release);
    }

    /// The memory map changed (to generation `slots_generation`): drops every shadow
    /// entry (they map the old map's pages), makes every vCPU leave guest mode and
    /// take the new map before it enters again. On return no vCPU can reach a page of
    /// the old map through the shadow, so the old map's pages may be unpinned.
    pub(crate) fn memory_map_changed(&self, slots_generation: u64) {
        // Before the flush below reads who is in guest mode (see `GuestModes::flush`).
        self.modes
            .slots_generation
            .store(slots_generation, Ordering::SeqCst);
        let had_pool = match self.pool.lock().as_deref_mut() {
            Some(storage) => {
                let mut pool = storage.pool();
                // (A vCPU that took the new map first has reset the pool already.)
                pool.take_map(slots_generation);
                self.settle(&mut pool);
                true
            }
            None => false,
        };
        if !had_pool {
            // No pool, no shadow entries: only make vCPUs in guest mode leave it (the
            // generation stays as it is).
            self.modes.kick_in_guest(u32::MAX);
        }
        // Without the pool lock: a section may be waiting for it.
        self.modes.wait_sections();
    }

    /// Before a run section (interrupts on, may sleep): gives the pool more table pages
    /// when its vCPUs have used nearly all it has, doubling up to its limit. Without
    /// memory (or over the memory cgroup's limit) the pool keeps working within what it
    /// has, reclaiming.
    pub(crate) fn top_up(&self) {
        let (have, want) = match self.pool.lock().as_deref() {
            Some(p) => {
                let have = p.tables.len();
                let used = p.st.pages_used() as usize;
                let limit = p.sps.len();
                if used + POOL_SLACK < have || have >= limit {
                    return;
                }
                (have, (have * 2).min(limit))
            }
            None => return,
        };
        let mut pages = KVec::new();
        for _ in have..want {
            match Dma32Page::new() {
                Ok(p) => {
                    if pages.push(p, crate::vm_gfp()).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        let mut guard = self.pool.lock();
        if let Some(p) = guard.as_deref_mut() {
            for page in pages.drain_all() {
                if p.tables.len() < p.sps.len() {
                    p.tables.add(page);
                }
            }
            p.st.sp_cap = p.tables.len() as u32;
        }
    }

    /// The VM's vCPUs so far.
    pub(crate) fn vcpus(&self) -> u32 {
        self.modes.vcpus.load(Ordering::Relaxed)
    }

    /// Whether vCPUs may use the pool (once it exists, always).
    pub(crate) fn usable(&self) -> bool {
        self.modes.vcpus.load(Ordering::Relaxed) != 0
    }

    /// vCPU `id` starts an interrupts-off run section on `cpu` (it stays there until
    /// `section_end`).
    pub(crate) fn section_start(&self, id: u32, cpu: i32) {
        self.modes.running[id as usize].store(cpu, Ordering::SeqCst);
    }

    /// vCPU `id` is about to enter guest mode (interrupts off, nothing between this
    /// and the VM entry instruction that could wait for another vCPU).
    pub(crate) fn entering(&self, id: u32) {
        self.modes.in_guest[id as usize].store(true, Ordering::SeqCst);
    }

    /// After `entering`: whether a vCPU with a root of pool generation `generation`
    /// (None: no pool root) and a memory map of `slots_generation` may enter. If not,
    /// the caller calls `exited` before anything else (a remote flush may be waiting
    /// for it) and brings what is stale up to date.
    pub(crate) fn pre_entry_ok(&self, generation: Option<u64>, slots_generation: u64) -> bool {
        self.modes.slots_generation.load(Ordering::SeqCst) == slots_generation
            && generation.is_none_or(|g| self.modes.generation.load(Ordering::SeqCst) == g)
    }

    /// vCPU `id` left the guest (one VM exit). Only the vCPU itself writes its count.
    pub(crate) fn exited(&self, id: u32) {
        // Out of guest mode first, then counted (see `GuestModes::kick_in_guest`).
        self.modes.in_guest[id as usize].store(false, Ordering::SeqCst);
        let n = &self.modes.exits[id as usize];
        n.store(n.load(Ordering::Relaxed).wrapping_add(1), Ordering::SeqCst);
    }

    /// vCPU `id` ends its run section.
    pub(crate) fn section_end(&self, id: u32) {
        let n = &self.modes.sections[id as usize];
        n.store(n.load(Ordering::Relaxed).wrapping_add(1), Ordering::SeqCst);
        self.modes.running[id as usize].store(-1, Ordering::SeqCst);
    }

    /// Makes vCPU `j` leave guest mode if it is in a run section (an interrupt was
    /// posted for it); does not wait. Callable with interrupts off.
    pub(crate) fn kick(&self, j: usize) {
        let cpu = self.modes.running[j].load(Ordering::SeqCst);
        if cpu >= 0 {
            // SAFETY: as in `GuestModes::kick_in_guest`: the CPU runs vCPU `j` with interrupts off and
            // cannot go offline under it; if the section ended meanwhile, the IPI only
            // makes that CPU check for rescheduling.
            unsafe { rvmm_kick_cpu(cpu) };
            self.modes.irq_kicks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The pool's counters (zero before a vCPU exists).
    pub(crate) fn stats(&self) -> PoolStats {
        self.pool
            .lock()
            .as_ref()
            .map_or(PoolStats::default(), |p| p.stats())
    }
}
