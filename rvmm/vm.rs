// SPDX-License-Identifier: GPL-2.0

//! A VM: its memory map and its vCPUs. One per open `/dev/rvmm` (after
//! `RVMM_CREATE_VM`); it lives until the file is closed and the last vCPU reference
//! goes.

use core::sync::atomic::{AtomicU64, Ordering};

use kernel::{new_mutex, new_spinlock, prelude::*, sync::Arc, sync::Mutex, sync::SpinLock};
use rvmm_uapi as uapi;

use crate::apic::Irqchip;
use crate::mmu::MemSlots;
use crate::shadow::Shadow;
use crate::vcpu::Vcpu;

#[pin_data]
pub(crate) struct Vm {
    /// One memory-map change at a time (pinning sleeps).
    #[pin]
    map_writer: Mutex<()>,
    /// The current memory map: vCPUs take it (holding their own lock) under a spinlock
    /// that nests in nothing, so that no lock order runs from a vCPU to the mm's lock
    /// that pinning takes.
    #[pin]
    slots: SpinLock<Arc<MemSlots>>,
    #[pin]
    vcpus: Mutex<[Option<Arc<Vcpu>>; uapi::RVMM_MAX_VCPUS as usize]>,
    /// The shadow page pool and CR3 cache.
    pub(crate) shadow: Arc<Shadow>,
    /// The in-kernel local APICs' mailboxes (`RVMM_CREATE_IRQCHIP`).
    #[pin]
    irqchip: Mutex<Option<Arc<Irqchip>>>,
    /// `RVMM_SET_HYPERCALL_EXITS`: bit n, VMCALL n exits to userspace (every vCPU reads
    /// it at its VMCALLs).
    hypercall_exits: Arc<AtomicU64>,
}

impl Vm {
    pub(crate) fn new() -> Result<Arc<Self>> {
        let slots = Arc::new(MemSlots::new(), crate::vm_gfp())?;
        let shadow = Arc::pin_init(
            Shadow::new(
                crate::module_parameters::shadow_pages.value(),
                crate::module_parameters::shadow_roots.value(),
            )?,
            crate::vm_gfp(),
        )?;
        let hypercall_exits = Arc::new(AtomicU64::new(0), crate::vm_gfp())?;
        Arc::pin_init(
            pin_init!(Self {
                map_writer <- new_mutex!(()),
                slots <- new_spinlock!(slots),
                vcpus <- new_mutex!([const { None }; uapi::RVMM_MAX_VCPUS as usize]),
                shadow,
                irqchip <- new_mutex!(None),
                hypercall_exits,
            }),
            crate::vm_gfp(),
        )
    }

    /// The current memory map (a vCPU takes it before it enters whenever it changed).
    pub(crate) fn slots(&self) -> Arc<MemSlots> {
        self.slots.lock().clone()
    }

    /// The current memory map's generation (without the lock).
    pub(crate) fn slots_generation(&self) -> u64 {
        self.shadow
            .modes
            .slots_generation
            .load(core::sync::atomic::Ordering::Acquire)
    }

    /// `RVMM_SET_MEMORY_REGION`. The new map is pinned first; once it is in place, no
    /// shadow entry maps the old one and no vCPU is in guest mode with a translation
    /// of it. The old map's pages are unpinned when the last vCPU that held the old map
    /// has taken the new one (each does before its next VM entry).
    pub(crate) fn set_memory_region(&self, r: &uapi::MemoryRegion) -> Result {
        let writer = self.map_writer.lock();
        let cur = self.slots();
        let new = Arc::new(cur.with_region(r)?, crate::vm_gfp())?;
        let generation = new.generation;
        let old = core::mem::replace(&mut *self.slots.lock(), new.clone());
        self.shadow.memory_map_changed(generation);
        drop(writer);
        drop(cur);
        // vCPUs outside RUN let go of the old map now; a running one does before it
        // enters the guest again (one asleep in HLT, when it wakes). Without the vCPU
        // list's lock: unpinning takes the mm's lock (RLIMIT_MEMLOCK), which mmap of a
        // run page holds while it looks a vCPU up.
        if let Ok(vcpus) = self.vcpu_list() {
            for vcpu in vcpus.iter() {
                drop(vcpu.offer_memory_map(&new));
            }
        }
        drop(old);
        Ok(())
    }

    /// `RVMM_CREATE_VCPU`. Not inlined: a new vCPU's state is built on the stack, and
    /// that frame must not be part of every other command's.
    #[inline(never)]
    pub(crate) fn create_vcpu(&self, id: usize) -> Result<isize> {
        if id >= uapi::RVMM_MAX_VCPUS as usize {
            user_pr!(
                pr_info,
                "create vcpu: id {} out of range (max {})\n",
                id,
                uapi::RVMM_MAX_VCPUS - 1
            );
            return Err(EINVAL);
        }
        let mut vcpus = self.vcpus.lock();
        if vcpus[id].is_some() {
            return Err(EEXIST);
        }
        let irqchip = self.irqchip.lock().clone();
        let vcpu = Vcpu::new(
            id as u32,
            self.shadow.clone(),
            irqchip.clone(),
            self.hypercall_exits.clone(),
        )?;
        self.shadow.vcpu_added(id as u32)?;
        vcpus[id] = Some(vcpu);
        if let Some(chip) = irqchip {
            // With the pool in place: the xAPIC page is mapped (or not) for the VM
            // as it now is.
            chip.update_apic_access();
        }
        Ok(id as isize)
    }

    /// `RVMM_SET_HYPERCALL_EXITS`: which hypercalls exit to userspace.
    pub(crate) fn set_hypercall_exits(&self, h: &uapi::HypercallExits) -> Result<isize> {
        self.hypercall_exits.store(h.mask, Ordering::Relaxed);
        Ok(0)
    }

    /// `RVMM_CREATE_IRQCHIP`: local APICs for the vCPUs created from now on.
    pub(crate) fn create_irqchip(&self) -> Result<isize> {
        let vcpus = self.vcpus.lock();
        let mut chip = self.irqchip.lock();
        if chip.is_some() {
            return Err(EEXIST);
        }
        if vcpus.iter().any(|v| v.is_some()) {
            user_pr!(
                pr_info,
                "create irqchip: the VM has vCPUs already; create the irqchip first\n"
            );
            return Err(EBUSY);
        }
        let caps = crate::vmx::read_caps();
        let apicv = crate::module_parameters::apicv.value()
            && rvmm_core::caps::apic_virtualization(caps.procbased, caps.procbased2);
        *chip = Some(Irqchip::new(self.shadow.clone(), apicv)?);
        Ok(0)
    }

    /// `RVMM_SIGNAL_MSI`.
    pub(crate) fn signal_msi(&self, msi: &uapi::Msi) -> Result<isize> {
        let Some(chip) = self.irqchip.lock().clone() else {
            user_pr!(
                pr_info,
                "signal msi: the VM has no irqchip (RVMM_CREATE_IRQCHIP)\n"
            );
            return Err(ENXIO);
        };
        chip.signal_msi(msi)
    }

    /// The vCPUs, outside the list's lock.
    fn vcpu_list(&self) -> Result<KVec<Arc<Vcpu>>> {
        let v = self.vcpus.lock();
        let mut list = KVec::new();
        for vcpu in v.iter().flatten() {
            list.push(vcpu.clone(), crate::vm_gfp())?;
        }
        Ok(list)
    }

    /// Counters summed over the vCPUs (never waits for a running vCPU).
    pub(crate) fn stats(&self) -> Result<uapi::VmStats> {
        let vcpus = self.vcpu_list()?;
        let mut out = uapi::VmStats::default();
        for v in vcpus.iter() {
            v.add_stats(&mut out);
        }
        let p = self.shadow.stats();
        out.pt_writes = p.pt_writes;
        out.unsyncs = p.unsyncs;
        out.resyncs = p.resyncs;
        out.flood_unshadows = p.flood_unshadows;
        out.prefetched = p.prefetched;
        out.pool_pages_in_use = p.pages_in_use;
        out.pool_pages_peak = p.pages_peak;
        out.pool_reclaimed = p.reclaimed;
        out.root_hits = p.root_hits
            + self
                .shadow
                .fast_root_hits
                .load(core::sync::atomic::Ordering::Relaxed);
        out.root_misses = p.root_misses;
        out.zaps = p.zaps;
        out.pool_resets = p.resets;
        out.mmio_fast = p.mmio_fast;
        out.pt_emulated = p.pt_emulated;
        use rvmm_core::mmu::pool::SyncCause;
        out.sync_cr3 = p.syncs[SyncCause::Cr3 as usize];
        out.sync_invlpg = p.syncs[SyncCause::Invlpg as usize];
        out.sync_link = p.syncs[SyncCause::Link as usize];
        out.sync_flush_all = p.syncs[SyncCause::FlushAll as usize];
        out.sync_scanned = p.sync_scanned;
        out.resync_entries = p.resync_entries;
        out.resync_changed = p.resync_changed;
        out.faults_direct = p.faults_direct;
        out.unsyncs_upper = p.unsyncs_upper;
        let m = &self.shadow.modes;
        let load =
            |a: &core::sync::atomic::AtomicU64| a.load(core::sync::atomic::Ordering::Relaxed);
        out.remote_flushes = load(&m.remote_flushes);
        out.flush_ipis = load(&m.flush_ipis);
        // SAFETY: reads a kernel variable.
        let khz = u64::from(unsafe { crate::ffi::rvmm_tsc_khz() }).max(1);
        let t = load(&m.flush_wait_ticks);
        // Ticks to ns in two parts (no 128-bit division in the kernel).
        out.flush_wait_ns = (t / khz)
            .saturating_mul(1_000_000)
            .saturating_add((t % khz) * 1_000_000 / khz);
        out.irq_kicks = load(&m.irq_kicks);
        if let Some(chip) = self.irqchip.lock().as_ref() {
            out.apic_messages = chip.messages.load(core::sync::atomic::Ordering::Relaxed);
        }
        Ok(out)
    }

    pub(crate) fn vcpu(&self, index: usize) -> Result<Arc<Vcpu>> {
        self.vcpus
            .lock()
            .get(index)
            .and_then(|v| v.clone())
            .ok_or(ENOENT)
    }
}
