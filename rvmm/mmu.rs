// SPDX-License-Identifier: GPL-2.0

//! The kernel side of the MMU: guest memory slots (the VMM's pages, pinned while
//! mapped), guest-physical memory access for the walker, and the pool of shadow table
//! pages. The walker, shadow entries and shadow tree are in `rvmm_core::mmu`.

use core::ffi::c_void;
use core::ptr;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use kernel::{prelude::*, sync::Arc};
use rvmm_core::mmu::GuestMemory;
use rvmm_uapi as uapi;

use crate::ffi::*;

const PAGE_SIZE: u64 = 4096;

/// One guest memory region: the VMM's pages, pinned for the slot's lifetime.
pub(crate) struct Slot {
    pub(crate) id: u32,
    pub(crate) gpa: u64,
    pub(crate) size: u64,
    pub(crate) readonly: bool,
    pages: KVVec<*mut c_void>,
    host_pa: KVVec<u64>,
    /// The user whose RLIMIT_MEMLOCK the pins are charged to (a reference on it).
    charged: *mut c_void,
}

// SAFETY: the raw pointers are `struct page`s pinned by this slot; the slot only passes
// them back to the kernel (unpin) and reads their physical addresses, from any thread.
unsafe impl Send for Slot {}
// SAFETY: as above; nothing is mutated through a shared reference.
unsafe impl Sync for Slot {}

impl Slot {
    /// Pins the VMM's memory for `r` (already validated by [`MemSlots::validate`]).
    fn pin(r: &uapi::MemoryRegion) -> Result<Self> {
        let n = (r.memory_size / PAGE_SIZE) as usize;
        let readonly = r.flags & uapi::RVMM_MEM_READONLY != 0;
        // Up to 4M entries (16 GiB): virtually contiguous, not one physical block.
        let mut pages = KVVec::with_capacity(n, crate::vm_gfp())?;
        pages.resize(n, ptr::null_mut(), crate::vm_gfp())?;
        let mut err = 0;
        // SAFETY: a query and charge of the current user.
        let charged = unsafe { rvmm_account_pinned(n, &mut err) };
        if charged.is_null() {
            user_pr!(
                pr_info,
                "memory region {}: pinning {} pages goes over RLIMIT_MEMLOCK\n",
                r.slot,
                n
            );
            return Err(Error::from_errno(err));
        }
        // SAFETY: `pages` has room for `n` pointers; the helper pins at most `n` pages
        // and unpins what it pinned on failure.
        let pinned = unsafe {
            rvmm_pin_user_pages(r.userspace_addr as usize, n, !readonly, pages.as_mut_ptr())
        };
        if pinned < 0 {
            user_pr!(
                pr_warn,
                "memory region {}: cannot pin {} pages at {:#x} ({}): is the range mapped{}?\n",
                r.slot,
                n,
                r.userspace_addr,
                pinned,
                if readonly { "" } else { " and writable" }
            );
            // SAFETY: charged above, for `n` pages.
            unsafe { rvmm_unaccount_pinned(charged, n) };
            return Err(Error::from_errno(pinned as i32));
        }
        let mut slot = Self {
            id: r.slot,
            gpa: r.guest_phys_addr,
            size: r.memory_size,
            readonly,
            pages,
            host_pa: KVVec::new(),
            charged,
        };
        let mut host_pa = KVVec::with_capacity(n, crate::vm_gfp())?;
        for &p in slot.pages.iter() {
            // SAFETY: `p` is a page pinned above.
            host_pa.push(unsafe { rvmm_page_to_phys(p) }, crate::vm_gfp())?;
        }
        slot.host_pa = host_pa;
        Ok(slot)
    }

    /// Host-physical address of the page holding `gpa` (inside this slot).
    fn host_pa(&self, gpa: u64) -> u64 {
        self.host_pa[((gpa - self.gpa) / PAGE_SIZE) as usize] | (gpa & (PAGE_SIZE - 1))
    }

    fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.size
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // SAFETY: every pointer was pinned by `pin` and is unpinned once, here.
        unsafe { rvmm_unpin_user_pages(self.pages.as_mut_ptr(), self.pages.len(), !self.readonly) };
        // SAFETY: charged by `pin` for as many pages, once.
        unsafe { rvmm_unaccount_pinned(self.charged, self.pages.len()) };
    }
}

/// A VM's memory map. Replaced as a whole on every change, so a running vCPU keeps the
/// (still pinned) map it started with until it returns to userspace.
pub(crate) struct MemSlots {
    slots: KVec<Arc<Slot>>,
    /// Bumped on every change: vCPUs drop their shadows when it moves.
    pub(crate) generation: u64,
}

impl MemSlots {
    pub(crate) fn new() -> Self {
        Self {
            slots: KVec::new(),
            generation: 0,
        }
    }

    /// Checks a region request against the ABI's rules.
    fn validate(r: &uapi::MemoryRegion) -> Result {
        if r.slot >= uapi::RVMM_MAX_MEMSLOTS {
            user_pr!(
                pr_info,
                "memory region: slot {} out of range (max {})\n",
                r.slot,
                uapi::RVMM_MAX_MEMSLOTS - 1
            );
            return Err(EINVAL);
        }
        if r.flags & !uapi::RVMM_MEM_READONLY != 0 {
            user_pr!(
                pr_info,
                "memory region {}: unknown flags {:#x}\n",
                r.slot,
                r.flags
            );
            return Err(EINVAL);
        }
        if r.memory_size == 0 {
            return Ok(());
        }
        let aligned = (r.guest_phys_addr | r.memory_size | r.userspace_addr) & (PAGE_SIZE - 1) == 0;
        let gpa_end = r.guest_phys_addr.checked_add(r.memory_size);
        let ua_end = r.userspace_addr.checked_add(r.memory_size);
        if !aligned
            || gpa_end.is_none()
            || ua_end.is_none()
            || gpa_end > Some(1 << 46)
            || ua_end > Some(1 << 47)
        {
            user_pr!(pr_info,
                "memory region {}: gpa {:#x} size {:#x} uaddr {:#x}: must be 4 KiB aligned, non-empty and not wrap\n",
                r.slot,
                r.guest_phys_addr,
                r.memory_size,
                r.userspace_addr
            );
            return Err(EINVAL);
        }
        if r.memory_size > (16 << 30) {
            user_pr!(
                pr_info,
                "memory region {}: {} bytes is over the 16 GiB per-slot limit\n",
                r.slot,
                r.memory_size
            );
            return Err(EINVAL);
        }
        Ok(())
    }

    /// The map after applying `r`: create, move, delete (pins before anything changes).
    pub(crate) fn with_region(&self, r: &uapi::MemoryRegion) -> Result<Self> {
        Self::validate(r)?;
        let old = self.slots.iter().find(|s| s.id == r.slot);
        let mut slots = KVec::with_capacity(self.slots.len() + 1, crate::vm_gfp())?;
        for s in self.slots.iter().filter(|s| s.id != r.slot) {
            slots.push(s.clone(), crate::vm_gfp())?;
        }
        if r.memory_size != 0 {
            // No overflow: `validate` bounded both ends below 2^46.
            let end = r.guest_phys_addr + r.memory_size;
            if let Some(other) = slots
                .iter()
                .find(|s| r.guest_phys_addr < s.gpa + s.size && s.gpa < end)
            {
                user_pr!(
                    pr_info,
                    "memory region {}: [{:#x}, {:#x}) overlaps slot {}\n",
                    r.slot,
                    r.guest_phys_addr,
                    end,
                    other.id
                );
                return Err(EEXIST);
            }
            // Create, or replace (a move): the new backing is pinned before the old
            // one is released, when the last vCPU still running on the old map returns.
            let slot = Slot::pin(r)?;
            slots.push(Arc::new(slot, crate::vm_gfp())?, crate::vm_gfp())?;
        } else if old.is_none() {
            user_pr!(
                pr_info,
                "memory region {}: deleting a slot that does not exist\n",
                r.slot
            );
            return Err(EINVAL);
        }
        Ok(Self {
            slots,
            generation: self.generation + 1,
        })
    }

    /// The slot holding `gpa`.
    pub(crate) fn find(&self, gpa: u64) -> Option<&Slot> {
        self.slots.iter().map(|s| &**s).find(|s| s.contains(gpa))
    }

    /// Host-physical address for `gpa` and whether the slot is read-only.
    pub(crate) fn host_pa(&self, gpa: u64) -> Option<(u64, bool)> {
        self.find(gpa).map(|s| (s.host_pa(gpa), s.readonly))
    }

    /// A kernel pointer to read `len` bytes at `gpa`, if they lie in one guest page of
    /// RAM.
    pub(crate) fn ptr(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        if (gpa & (PAGE_SIZE - 1)).checked_add(len)? > PAGE_SIZE {
            return None;
        }
        let (pa, _) = self.host_pa(gpa)?;
        // SAFETY: `pa` is a pinned page of this map; the direct map covers it.
        Some(unsafe { direct_map(pa) }.cast())
    }

    /// A kernel pointer to write `len` bytes at `gpa`, if they lie in one guest page of
    /// writable RAM. A read-only slot's pages were pinned without FOLL_WRITE (a file's
    /// page cache, a ROM image shared with other processes): rvmm never writes them.
    pub(crate) fn ptr_mut(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        match self.host_pa(gpa) {
            Some((_, false)) => self.ptr(gpa, len),
            _ => None,
        }
    }
}

/// The kernel's direct-map address of physical address `pa` (`__va`), without a call:
/// the direct map's base, taken once from the C helper.
///
/// # Safety
/// `pa` must be RAM (in the direct map) for the result to be dereferenced.
pub(crate) unsafe fn direct_map(pa: u64) -> *mut core::ffi::c_void {
    use core::sync::atomic::{AtomicU64, Ordering};
    static BASE: AtomicU64 = AtomicU64::new(0);
    let mut base = BASE.load(Ordering::Relaxed);
    if base == 0 {
        // SAFETY: `__va(0)`: plain arithmetic on the direct map's base.
        base = unsafe { rvmm_pa_to_va(0) } as u64;
        BASE.store(base, Ordering::Relaxed);
    }
    base.wrapping_add(pa) as *mut core::ffi::c_void
}

/// Guest-physical memory for the walker.
pub(crate) struct GuestMem<'a>(pub(crate) &'a MemSlots);

impl rvmm_core::mmu::pool::GuestPhys for GuestMem<'_> {
    fn host_pa(&mut self, gpa: u64) -> Option<(u64, bool)> {
        self.0.host_pa(gpa)
    }
}

impl GuestMemory for GuestMem<'_> {
    fn read_entry(&mut self, gpa: u64, size: u8) -> Option<u64> {
        let p = self.0.ptr(gpa, u64::from(size))?;
        // SAFETY: `p` points at `size` bytes of a pinned guest page; the guest may change
        // them concurrently, hence a volatile read.
        Some(unsafe {
            if size == 4 {
                u64::from(ptr::read_volatile(p.cast::<u32>()))
            } else {
                ptr::read_volatile(p.cast::<u64>())
            }
        })
    }

    fn read_entries(&mut self, gpa: u64, out: &mut [u64]) -> bool {
        let Some(p) = self.0.ptr(gpa, 8 * out.len() as u64) else {
            return false;
        };
        for (i, o) in out.iter_mut().enumerate() {
            // SAFETY: `p` points at `out.len()` naturally aligned entries of a pinned
            // guest page (`ptr` checked the range); the guest may change them
            // concurrently, hence volatile reads.
            *o = unsafe { ptr::read_volatile(p.cast::<u64>().add(i)) };
        }
        true
    }

    fn update_entry(&mut self, gpa: u64, size: u8, old: u64, new: u64) -> bool {
        // Accessed/dirty updates of a table in a read-only slot are dropped, as a ROM
        // drops them.
        let Some(p) = self.0.ptr_mut(gpa, u64::from(size)) else {
            return true;
        };
        // A compare-exchange, as the CPU's locked update: another vCPU (or the VMM) may
        // have changed the entry since the walk read it.
        // SAFETY: `p` points at `size` bytes of a pinned, writable guest page, naturally
        // aligned (entries are); every access to guest memory from the host is volatile
        // or atomic, and the guest's own are the CPU's.
        unsafe {
            if size == 4 {
                AtomicU32::from_ptr(p.cast::<u32>())
                    .compare_exchange(old as u32, new as u32, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            } else {
                AtomicU64::from_ptr(p.cast::<u64>())
                    .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            }
        }
    }
}

/// A zeroed page below 4 GiB, freed on drop.
pub(crate) struct Dma32Page(ptr::NonNull<c_void>);

impl Dma32Page {
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: no preconditions; returns a fresh order-0 page or NULL.
        ptr::NonNull::new(unsafe { rvmm_alloc_page_dma32() })
            .map(Self)
            .ok_or(ENOMEM)
    }
}

impl Drop for Dma32Page {
    fn drop(&mut self) {
        // SAFETY: the page came from `rvmm_alloc_page_dma32` and is freed once.
        unsafe { rvmm_free_page(self.0.as_ptr()) };
    }
}

// SAFETY: the page is owned exclusively; freeing it from any thread is fine.
unsafe impl Send for Dma32Page {}
// SAFETY: no interior access through `&Dma32Page`.
unsafe impl Sync for Dma32Page {}

impl Dma32Page {
    /// Host-physical address of the page.
    pub(crate) fn pa(&self) -> u64 {
        // SAFETY: a page we own.
        unsafe { rvmm_page_to_phys(self.0.as_ptr()) }
    }
}
