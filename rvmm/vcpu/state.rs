// SPDX-License-Identifier: GPL-2.0

//! The guest's architectural registers as rvmm keeps them: general registers, segments,
//! descriptor tables, and the control registers and EFER with the real values the guest
//! runs on (shadow paging forces some bits); the state the pre-entry checks see.

use x86::vmx::vmcs::control::EntryControls;
use x86::vmx::vmcs::{control, guest};

use super::*;

pub(super) fn seg_ar(s: &uapi::Segment) -> u64 {
    if s.unusable != 0 {
        return 1 << 16;
    }
    u64::from(s.seg_type & 0xf)
        | u64::from(s.s & 1) << 4
        | u64::from(s.dpl & 3) << 5
        | u64::from(s.present & 1) << 7
        | u64::from(s.avl & 1) << 12
        | u64::from(s.l & 1) << 13
        | u64::from(s.db & 1) << 14
        | u64::from(s.g & 1) << 15
}

pub(super) fn seg_from_ar(base: u64, limit: u32, selector: u16, ar: u64) -> uapi::Segment {
    uapi::Segment {
        base,
        limit,
        selector,
        seg_type: (ar & 0xf) as u8,
        s: (ar >> 4 & 1) as u8,
        dpl: (ar >> 5 & 3) as u8,
        present: (ar >> 7 & 1) as u8,
        avl: (ar >> 12 & 1) as u8,
        l: (ar >> 13 & 1) as u8,
        db: (ar >> 14 & 1) as u8,
        g: (ar >> 15 & 1) as u8,
        unusable: (ar >> 16 & 1) as u8,
        padding: 0,
    }
}

/// (selector, base, limit, access rights) VMCS fields of each segment, in the order of
/// `uapi::Sregs`.
pub(super) const SEGS: [(u32, u32, u32, u32); 8] = [
    (
        guest::CS_SELECTOR,
        guest::CS_BASE,
        guest::CS_LIMIT,
        guest::CS_ACCESS_RIGHTS,
    ),
    (
        guest::DS_SELECTOR,
        guest::DS_BASE,
        guest::DS_LIMIT,
        guest::DS_ACCESS_RIGHTS,
    ),
    (
        guest::ES_SELECTOR,
        guest::ES_BASE,
        guest::ES_LIMIT,
        guest::ES_ACCESS_RIGHTS,
    ),
    (
        guest::FS_SELECTOR,
        guest::FS_BASE,
        guest::FS_LIMIT,
        guest::FS_ACCESS_RIGHTS,
    ),
    (
        guest::GS_SELECTOR,
        guest::GS_BASE,
        guest::GS_LIMIT,
        guest::GS_ACCESS_RIGHTS,
    ),
    (
        guest::SS_SELECTOR,
        guest::SS_BASE,
        guest::SS_LIMIT,
        guest::SS_ACCESS_RIGHTS,
    ),
    (
        guest::TR_SELECTOR,
        guest::TR_BASE,
        guest::TR_LIMIT,
        guest::TR_ACCESS_RIGHTS,
    ),
    (
        guest::LDTR_SELECTOR,
        guest::LDTR_BASE,
        guest::LDTR_LIMIT,
        guest::LDTR_ACCESS_RIGHTS,
    ),
];

impl VcpuInner {
    pub(super) fn regs(&self, vmcs: &CurrentVmcs) -> uapi::Regs {
        let g = &self.gprs;
        uapi::Regs {
            rax: g.rax,
            rbx: g.rbx,
            rcx: g.rcx,
            rdx: g.rdx,
            rsi: g.rsi,
            rdi: g.rdi,
            rsp: vmcs.read(guest::RSP),
            rbp: g.rbp,
            r8: g.r8,
            r9: g.r9,
            r10: g.r10,
            r11: g.r11,
            r12: g.r12,
            r13: g.r13,
            r14: g.r14,
            r15: g.r15,
            rip: vmcs.read(guest::RIP),
            // rvmm's vm86 is not the guest's: it sees real mode.
            rflags: vmcs.read(guest::RFLAGS) & if self.real.vm86 { !RFLAGS_VM } else { !0 },
        }
    }

    pub(super) fn set_regs(&mut self, vmcs: &CurrentVmcs, r: &uapi::Regs) {
        self.gprs = Gprs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
        };
        vmcs.write(guest::RSP, r.rsp);
        vmcs.write(guest::RIP, r.rip);
        // A real-mode vCPU runs in virtual-8086 mode: RFLAGS.VM stays set (userspace
        // sees RFLAGS without it).
        let vm86 = if self.real.vm86 { RFLAGS_VM } else { 0 };
        vmcs.write(guest::RFLAGS, r.rflags | vm86);
        self.state_checked = false;
    }

    pub(super) fn sregs(&self, vmcs: &CurrentVmcs) -> uapi::Sregs {
        let seg = |i: usize| {
            let s = self.guest_seg(vmcs, i);
            seg_from_ar(s.base, s.limit, s.selector, s.ar.into())
        };
        uapi::Sregs {
            cs: seg(0),
            ds: seg(1),
            es: seg(2),
            fs: seg(3),
            gs: seg(4),
            ss: seg(5),
            tr: seg(6),
            ldt: seg(7),
            gdt: uapi::Dtable {
                base: vmcs.read(guest::GDTR_BASE),
                limit: vmcs.read(guest::GDTR_LIMIT) as u16,
                padding: [0; 3],
            },
            idt: uapi::Dtable {
                base: vmcs.read(guest::IDTR_BASE),
                limit: vmcs.read(guest::IDTR_LIMIT) as u16,
                padding: [0; 3],
            },
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: self.cr8,
            efer: self.efer,
            apic_base: 0xfee0_0900,
        }
    }

    pub(super) fn set_sregs(&mut self, vmcs: &CurrentVmcs, s: &uapi::Sregs) -> Result {
        // An instruction waiting for MMIO answers was decoded in the old mode.
        self.mmio_reads.clear();
        if self.real.active || self.real.emulating {
            // Userspace's segments replace the virtual-8086 ones (and its CR0 says the
            // mode, below).
            self.leave_real_mode(vmcs);
            self.real.emulating = false;
        }
        let segs = [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt];
        for (seg, (sel, base, limit, ar)) in segs.iter().zip(SEGS) {
            vmcs.write(sel, seg.selector.into());
            vmcs.write(base, seg.base);
            vmcs.write(limit, seg.limit.into());
            vmcs.write(ar, seg_ar(seg));
        }
        vmcs.write(guest::GDTR_BASE, s.gdt.base);
        vmcs.write(guest::GDTR_LIMIT, s.gdt.limit.into());
        vmcs.write(guest::IDTR_BASE, s.idt.base);
        vmcs.write(guest::IDTR_LIMIT, s.idt.limit.into());
        self.cr0 = s.cr0;
        self.cr2 = s.cr2;
        self.cr3 = s.cr3;
        self.cr4 = s.cr4;
        self.cr8 = s.cr8 & 0xf;
        self.efer = s.efer;
        self.pdptes = None;
        self.apply_paging_state(vmcs);
        self.state_checked = false;
        // Real mode (PG without PE is refused at entry, by the checks).
        if s.cr0 & (CR0_PE | CR0_PG) == 0 {
            self.enter_real_mode(vmcs);
        }
        Ok(())
    }

    /// Writes the real CR0/CR4/EFER and the read shadows from the guest's views, and
    /// drops the shadow (its shape or its permissions may have changed).
    pub(super) fn apply_paging_state(&mut self, vmcs: &CurrentVmcs) {
        let lma = self.efer & EFER_LME != 0 && self.cr0 & CR0_PG != 0;
        if lma {
            self.efer |= EFER_LMA;
        } else {
            self.efer &= !EFER_LMA;
        }
        const CR0_GUEST_BITS: u64 =
            (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 18);
        // CR0.AM has no effect in real mode (CPL 0); vm86 runs at CPL 3, where it would.
        let guest_bits = if self.cr0 & CR0_PE == 0 {
            CR0_GUEST_BITS & !CR0_AM
        } else {
            CR0_GUEST_BITS
        };
        let real_cr0 = (self.cr0 & guest_bits) | CR0_PE | CR0_PG | CR0_WP | (1 << 5);
        const CR4_GUEST_BITS: u64 = (1 << 2)
            | (1 << 3)
            | (1 << 8)
            | (1 << 9)
            | (1 << 10)
            | (1 << 16)
            | (1 << 18)
            | CR4_SMEP
            | CR4_SMAP;
        // SMEP and SMAP act on paging: with the guest's paging off they must not act on
        // the identity shadow (whose entries are all user entries).
        let guest_bits = if self.cr0 & CR0_PG != 0 {
            CR4_GUEST_BITS
        } else {
            CR4_GUEST_BITS & !(CR4_SMEP | CR4_SMAP)
        };
        let real_cr4 = (self.cr4 & guest_bits) | CR4_PAE | (1 << 13);
        let real_efer = EFER_NXE | if lma { EFER_LME | EFER_LMA } else { 0 } | (self.efer & 1);
        vmcs.write(guest::CR0, real_cr0);
        vmcs.write(control::CR0_READ_SHADOW, self.cr0);
        vmcs.write(guest::CR4, real_cr4);
        vmcs.write(control::CR4_READ_SHADOW, self.cr4);
        vmcs.write(guest::IA32_EFER_FULL, real_efer);
        let ia32e = if lma {
            EntryControls::IA32E_MODE_GUEST.bits()
        } else {
            0
        };
        vmcs.write(control::VMENTRY_CONTROLS, (self.entry_base | ia32e).into());
        let mode = PagingMode::from_regs(self.cr0, self.cr4, self.efer);
        if mode != self.mode {
            // Entering PAE paging loads the PDPTEs.
            self.pdptes = None;
        }
        self.mode = mode;
        self.need_reset = true;
    }

    /// The state the pre-entry checks look at (VMCS current).
    pub(super) fn guest_state(&self, vmcs: &CurrentVmcs) -> rvmm_core::guest_state::GuestState {
        let seg = |i: usize| {
            let (sel, base, limit, ar) = SEGS[i];
            rvmm_core::guest_state::Seg {
                selector: vmcs.read(sel) as u16,
                base: vmcs.read(base),
                limit: vmcs.read(limit) as u32,
                ar: vmcs.read(ar) as u32,
            }
        };
        rvmm_core::guest_state::GuestState {
            cr0: self.cr0,
            cr4: self.cr4,
            efer: self.efer,
            rflags: vmcs.read(guest::RFLAGS),
            rip: vmcs.read(guest::RIP),
            // SEGS is in uapi::Sregs order (CS DS ES FS GS SS TR LDTR).
            segs: [
                seg(0),
                seg(5),
                seg(1),
                seg(2),
                seg(3),
                seg(4),
                seg(6),
                seg(7),
            ],
            gdtr_base: vmcs.read(guest::GDTR_BASE),
            idtr_base: vmcs.read(guest::IDTR_BASE),
        }
    }
}
