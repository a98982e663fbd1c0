// SPDX-License-Identifier: GPL-2.0

//! The VM's in-kernel interrupt fabric (`RVMM_CREATE_IRQCHIP`): one mailbox per vCPU
//! through which other vCPUs (IPIs) and userspace (`RVMM_SIGNAL_MSI`: the I/O APIC,
//! PIC and devices of rvmm-run) post interrupts for that vCPU's local APIC.
//!
//! The APIC itself (`rvmm_core::apic::Apic`: registers, priorities, timer) lives in the
//! vCPU, behind its lock, which a running vCPU holds for the whole `RVMM_RUN`. So a
//! sender never touches it: it sets the vector in the target's mailbox (posted
//! interrupt requests, like VT-x's PIR), then wakes the target if it sleeps in HLT, or
//! kicks it out of guest mode (a reschedule IPI) if it runs. The target merges its
//! mailbox into its IRR before every VM entry and in its HLT loop. Destinations are
//! matched against the addressing state (ID, LDR, DFR, mode) each vCPU publishes here
//! when it changes.
//!
//! The chip also owns VMX's APIC-access page: while every APIC is in xAPIC mode at the
//! default base, the shadow maps the guest's xAPIC page to it and the CPU virtualizes
//! the accesses (`Irqchip::update_apic_access`).
//!
//! Ordering: a sender sets the vector, then `posted` (SeqCst), then reads whether the
//! target runs (SeqCst); a target marks itself running (SeqCst, `Shadow::section_start`)
//! before it reads `posted` ahead of each entry. Either the sender sees it running and
//! kicks it (the IPI, pending while the target has interrupts off, makes the next entry
//! exit at once), or the target sees the vector.

use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering::*};

use kernel::{page::Page, prelude::*, sync::Arc};
use rvmm_core::apic::{base, Addressing, Delivery, Ipi, Shorthand};
use rvmm_core::mmu::pool::ApicAccess;
use rvmm_uapi as uapi;

use crate::ffi::*;
use crate::shadow::Shadow;

const MAX_VCPUS: usize = uapi::RVMM_MAX_VCPUS as usize;

/// What other vCPUs and devices posted for one vCPU's APIC.
pub(crate) struct Mailbox {
    /// Edge-triggered vectors.
    pir: [AtomicU64; 4],
    /// Level-triggered vectors.
    pir_level: [AtomicU64; 4],
    /// Something was posted since the vCPU last looked.
    posted: AtomicBool,
    nmi: AtomicBool,
    /// An ExtINT message (0x100 | vector): the 8259's output, delivered through LINT0.
    extint: AtomicU32,
    /// INIT, and the vector of a start-up IPI (0x100 | vector), kept for the AP start-up
    /// protocol.
    init: AtomicBool,
    sipi: AtomicU32,
    /// The vCPU's published `Addressing` (packed).
    addressing: [AtomicU64; 2],
    /// Its APIC is in xAPIC mode at the default base (published with the addressing).
    xapic_default: AtomicBool,
    present: AtomicBool,
    /// Its HLT sleep (a `struct rvmm_waiter`), owned by the mailbox.
    waiter: AtomicPtr<c_void>,
}

/// What a vCPU collects from its mailbox.
pub(crate) struct Posted {
    pub(crate) vectors: [(u64, u64); 4],
    pub(crate) nmi: bool,
    pub(crate) extint: Option<u8>,
}

impl Mailbox {
    const fn new() -> Self {
        Self {
            pir: [const { AtomicU64::new(0) }; 4],
            pir_level: [const { AtomicU64::new(0) }; 4],
            posted: AtomicBool::new(false),
            nmi: AtomicBool::new(false),
            extint: AtomicU32::new(0),
            init: AtomicBool::new(false),
            sipi: AtomicU32::new(0),
            addressing: [const { AtomicU64::new(0) }; 2],
            xapic_default: AtomicBool::new(false),
            present: AtomicBool::new(false),
            waiter: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    /// Publishes the vCPU's addressing state, and whether its xAPIC page is at the
    /// default base (`mmio_base`, the APIC's `Apic::mmio_base`).
    pub(crate) fn publish(&self, a: &Addressing, mmio_base: Option<u64>) {
        let [w0, w1] = a.pack();
        self.addressing[0].store(w0, Relaxed);
        self.addressing[1].store(w1, Relaxed);
        self.xapic_default
            .store(mmio_base == Some(base::DEFAULT_ADDR), SeqCst);
    }

    fn addressing(&self) -> Addressing {
        Addressing::unpack([
            self.addressing[0].load(Relaxed),
            self.addressing[1].load(Relaxed),
        ])
    }

    /// Takes what was posted, if anything (the vCPU itself, before an entry or in HLT).
    pub(crate) fn take(&self) -> Option<Posted> {
        if !self.posted.swap(false, SeqCst) {
            return None;
        }
        let mut p = Posted {
            vectors: [(0, 0); 4],
            nmi: self.nmi.swap(false, AcqRel),
            extint: match self.extint.swap(0, AcqRel) {
                0 => None,
                v => Some(v as u8),
            },
        };
        for (i, v) in p.vectors.iter_mut().enumerate() {
            *v = (
                self.pir[i].swap(0, AcqRel),
                self.pir_level[i].swap(0, AcqRel),
            );
        }
        Some(p)
    }

    /// Takes a pending INIT.
    pub(crate) fn take_init(&self) -> bool {
        self.init.swap(false, AcqRel)
    }

    /// Takes a pending start-up IPI's vector.
    pub(crate) fn take_sipi(&self) -> Option<u8> {
        match self.sipi.swap(0, AcqRel) {
            0 => None,
            v => Some(v as u8),
        }
    }

    /// Whether an INIT or SIPI waits.
    pub(crate) fn has_init_sipi(&self) -> bool {
        self.init.load(Acquire) || self.sipi.load(Acquire) != 0
    }

    /// The vCPU's HLT waiter.
    pub(crate) fn waiter(&self) -> *mut c_void {
        self.waiter.load(Acquire)
    }
}

/// The VM's mailboxes.
pub(crate) struct Irqchip {
    boxes: [Mailbox; MAX_VCPUS],
    shadow: Arc<Shadow>,
    /// VMX's APIC-access page (where rvmm virtualizes xAPIC accesses: see `apicv`) and
    /// its host-physical address. The CPU never writes it through a virtualized
    /// access; it is the VM's alone and freed with the chip, after every vCPU.
    apic_access: Option<(Page, u64)>,
    /// Messages delivered (one per destination).
    pub(crate) messages: AtomicU64,
}

impl Irqchip {
    /// A chip; with `apicv`, the vCPUs virtualize xAPIC accesses with VMX's APIC
    /// virtualization (the CPU has it and the module parameter allows it).
    pub(crate) fn new(shadow: Arc<Shadow>, apicv: bool) -> Result<Arc<Self>> {
        let apic_access = if apicv {
            let page = Page::alloc_page(crate::vm_gfp() | __GFP_ZERO)?;
            // SAFETY: a page we own.
            let pa = unsafe { rvmm_page_to_phys(page.as_ptr().cast()) };
            Some((page, pa))
        } else {
            None
        };
        Ok(Arc::new(
            Self {
                boxes: [const { Mailbox::new() }; MAX_VCPUS],
                shadow,
                apic_access,
                messages: AtomicU64::new(0),
            },
            crate::vm_gfp(),
        )?)
    }

    /// The APIC-access page's host-physical address, where the vCPUs virtualize xAPIC
    /// accesses.
    pub(crate) fn apic_access_pa(&self) -> Option<u64> {
        self.apic_access.as_ref().map(|&(_, pa)| pa)
    }

    /// After a vCPU published a change of its APIC's mode or base (or joined): the
    /// shadow maps the xAPIC page to the APIC-access page while every APIC is in xAPIC
    /// mode at the default base, and not otherwise. A vCPU whose APIC is elsewhere
    /// (x2APIC, disabled, relocated) must not reach the page, which its CPU does not
    /// virtualize for it: it sees device memory there, through the emulator.
    pub(crate) fn update_apic_access(&self) {
        let Some(hpa) = self.apic_access_pa() else {
            return;
        };
        self.shadow.set_apic_access(|| {
            let all = self
                .boxes
                .iter()
                .filter(|b| b.present.load(SeqCst))
                .all(|b| b.xapic_default.load(SeqCst));
            all.then_some(ApicAccess {
                gfn: base::DEFAULT_ADDR >> 12,
                hpa,
            })
        });
    }

    /// A vCPU with an APIC joins: its HLT waiter is made and its mailbox opens.
    pub(crate) fn add_vcpu(&self, id: u32, a: &Addressing, mmio_base: Option<u64>) -> Result {
        // (The VM checked the ID; an out-of-range one must not index past the array.)
        let b = self.boxes.get(id as usize).ok_or(EINVAL)?;
        if b.waiter.load(Acquire).is_null() {
            // SAFETY: plain allocation; freed in `drop`.
            let w = unsafe { rvmm_waiter_new() };
            if w.is_null() {
                return Err(ENOMEM);
            }
            b.waiter.store(w, Release);
        }
        b.publish(a, mmio_base);
        b.present.store(true, SeqCst);
        Ok(())
    }

    pub(crate) fn mailbox(&self, id: u32) -> &Mailbox {
        &self.boxes[id as usize]
    }

    /// Delivers a message from vCPU `from` (an IPI) or from userspace (`None`: an MSI).
    /// Returns how many APICs took it.
    pub(crate) fn deliver(&self, ipi: &Ipi, from: Option<u32>) -> u32 {
        let mut n = 0;
        for (j, b) in self.boxes.iter().enumerate() {
            if !b.present.load(Acquire) {
                continue;
            }
            let me = from == Some(j as u32);
            let a = b.addressing();
            let hit = match ipi.shorthand {
                Shorthand::None => a.matches(ipi),
                Shorthand::SelfOnly => me,
                Shorthand::AllIncludingSelf => a.hw_enabled,
                Shorthand::AllButSelf => !me && a.hw_enabled,
            };
            if !hit {
                continue;
            }
            match ipi.delivery {
                Delivery::Fixed | Delivery::LowestPriority => {
                    let (word, bit) = (usize::from(ipi.vector >> 6), 1u64 << (ipi.vector & 63));
                    if ipi.trigger_level {
                        b.pir_level[word].fetch_or(bit, SeqCst);
                    } else {
                        b.pir[word].fetch_or(bit, SeqCst);
                    }
                }
                Delivery::Nmi => b.nmi.store(true, SeqCst),
                Delivery::ExtInt => b.extint.store(0x100 | u32::from(ipi.vector), SeqCst),
                // An INIT level de-assert does nothing on this family of processors.
                Delivery::Init if ipi.level => b.init.store(true, SeqCst),
                Delivery::StartUp => b.sipi.store(0x100 | u32::from(ipi.vector), SeqCst),
                _ => continue,
            }
            b.posted.store(true, SeqCst);
            n += 1;
            if !me {
                // SAFETY: the waiter lives as long as the mailbox (see `drop`).
                unsafe { rvmm_waiter_wake(b.waiter()) };
                self.shadow.kick(j);
            }
            if ipi.delivery == Delivery::LowestPriority {
                break;
            }
        }
        self.messages.fetch_add(u64::from(n), Relaxed);
        n
    }

    /// `RVMM_SIGNAL_MSI`.
    pub(crate) fn signal_msi(&self, msi: &uapi::Msi) -> Result<isize> {
        let ipi = match Ipi::from_msi(msi.address, msi.data) {
            Some(i) if msi.flags == 0 => i,
            _ => {
                user_pr!(
                    pr_info,
                    "signal msi: address {:#x} is not an APIC message address (0xfeeXXXXX) or flags {:#x} are not 0\n",
                    msi.address,
                    msi.flags
                );
                return Err(EINVAL);
            }
        };
        Ok(self.deliver(&ipi, None) as isize)
    }
}

impl Drop for Irqchip {
    fn drop(&mut self) {
        for b in self.boxes.iter() {
            let w = b.waiter.swap(core::ptr::null_mut(), AcqRel);
            if !w.is_null() {
                // SAFETY: made by `rvmm_waiter_new`; the last reference to the chip is
                // gone, so nobody sleeps on it or wakes it.
                unsafe { rvmm_waiter_free(w) };
            }
        }
    }
}
