// SPDX-License-Identifier: GPL-2.0

//! Checks of guest state that rvmm makes before VM entry (a subset of SDM Vol. 3C,
//! 27.3.1, plus what rvmm cannot run without unrestricted guest), so that a bad state
//! set by userspace ends as a failed entry with a reason, never as a surprise.

use crate::mmu::mode::{CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME};

/// A failed check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Check {
    /// CR0.PG = 1 with CR0.PE = 0.
    PagingWithoutProtection = 1,
    /// CR0.PE = 0: real mode needs unrestricted guest, which rvmm does not use.
    RealMode = 2,
    /// IA-32e mode (EFER.LME and CR0.PG) without CR4.PAE.
    LongModeWithoutPae = 3,
    /// CS.L and CS.D both set in IA-32e mode.
    CsLongAndDefault32 = 4,
    /// Reserved bits set in CR0 (63:32) or CR4 (outside the architecture's).
    ReservedCrBits = 5,
    /// Reserved bits set in EFER.
    ReservedEferBits = 6,
    /// RFLAGS bit 1 clear, or reserved bits set, or VM set in IA-32e mode.
    BadRflags = 7,
    /// RIP not canonical (64-bit code) or above 4 GiB (other code).
    BadRip = 8,
    /// CS unusable, not an accessed code segment, not present, or S = 0.
    BadCs = 9,
    /// SS not a present, writable, accessed data segment, or SS.DPL != CS.RPL.
    BadSs = 10,
    /// DS, ES, FS or GS usable but not present, not accessed, S = 0, or execute-only code.
    BadDataSegment = 11,
    /// TR unusable, not a busy TSS of the right size, S = 1 or not present.
    BadTr = 12,
    /// LDTR usable but not a present LDT descriptor.
    BadLdtr = 13,
    /// A segment's limit and granularity disagree (SDM 27.3.1.2).
    BadLimitGranularity = 14,
    /// GDTR, IDTR, FS, GS, TR or LDTR base not canonical in IA-32e mode.
    BadBase = 15,
    /// Selector and descriptor privilege levels VMX refuses without unrestricted guest:
    /// SS.RPL != CS.RPL, SS.DPL != SS.RPL, CS.DPL against SS.DPL, or a data segment
    /// with DPL < RPL (SDM 27.3.1.2).
    BadPrivilege = 16,
}

impl Check {
    /// What is wrong, for the kernel log and the user.
    pub const fn explain(self) -> &'static str {
        match self {
            Self::PagingWithoutProtection => "CR0.PG=1 requires CR0.PE=1",
            Self::RealMode => "CR0.PE=0 (real mode) needs unrestricted guest; rvmm runs protected and long mode guests",
            Self::LongModeWithoutPae => "IA-32e mode (EFER.LME=1, CR0.PG=1) requires CR4.PAE=1",
            Self::CsLongAndDefault32 => "CS.L=1 and CS.D=1 together are invalid in IA-32e mode",
            Self::ReservedCrBits => "reserved bits set in CR0 or CR4",
            Self::ReservedEferBits => "reserved bits set in EFER",
            Self::BadRflags => "RFLAGS bit 1 must be 1, reserved bits 0, and VM 0 in IA-32e mode",
            Self::BadRip => "RIP must be canonical in 64-bit code and below 4 GiB otherwise",
            Self::BadCs => "CS must be a usable, present, accessed code segment (S=1)",
            Self::BadSs => "SS must be a present, writable, accessed data segment with DPL = CS.RPL",
            Self::BadDataSegment => "DS/ES/FS/GS, when usable, must be present, accessed, S=1 and readable",
            Self::BadTr => "TR must be a usable, present, busy TSS (type 11, or 3 outside IA-32e mode)",
            Self::BadLdtr => "LDTR, when usable, must be a present LDT descriptor (type 2)",
            Self::BadLimitGranularity => "a segment limit does not fit its granularity bit",
            Self::BadBase => "a descriptor-table or segment base is not canonical",
            Self::BadPrivilege => "segment privileges VMX refuses: SS.RPL must equal CS.RPL and SS.DPL, CS.DPL must match SS.DPL, data segments need DPL >= RPL",
        }
    }
}

/// CR4 bits rvmm lets a guest set (VMXE is not among them: VMX is not exposed).
pub const CR4_ALLOWED: u64 = 0x0037_0fff;
/// EFER bits a guest may set: SCE, LME, LMA, NXE.
pub const EFER_ALLOWED: u64 = (1 << 0) | EFER_LME | EFER_LMA | (1 << 11);

/// Segment access rights in the VMX format (SDM Vol. 3C, 25.4.1): the descriptor's
/// type, S, DPL, P, AVL, L, D/B and G bits, and "unusable".
pub mod ar {
    /// Type bit 0: accessed.
    pub const ACCESSED: u32 = 1 << 0;
    /// Type bit 1: writable (data) or readable (code).
    pub const RW: u32 = 1 << 1;
    /// Type bit 2: expand-down (data) or conforming (code).
    pub const DC: u32 = 1 << 2;
    /// Type bit 3: code.
    pub const CODE: u32 = 1 << 3;
    /// S: a code or data segment (not a system one).
    pub const S: u32 = 1 << 4;
    /// DPL, bits 6:5.
    pub const DPL_SHIFT: u32 = 5;
    /// P: present.
    pub const P: u32 = 1 << 7;
    /// L: 64-bit code.
    pub const L: u32 = 1 << 13;
    /// D/B: 32-bit default operand size or stack.
    pub const DB: u32 = 1 << 14;
    /// G: limit in 4-KiB units.
    pub const G: u32 = 1 << 15;
    /// The register holds no usable segment.
    pub const UNUSABLE: u32 = 1 << 16;
    /// A real-mode data segment after reset (present, read/write, accessed).
    pub const REAL_DATA: u32 = 0x93;
    /// A real-mode code segment after reset.
    pub const REAL_CODE: u32 = 0x9b;
    /// What every segment is in virtual-8086 mode (present, DPL 3, read/write data,
    /// accessed; SDM Vol. 3C, 27.3.1.2).
    pub const VM86: u32 = 0xf3;
}

/// A segment register as the VMCS holds it (access rights in the VMX format).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seg {
    /// Selector.
    pub selector: u16,
    /// Base.
    pub base: u64,
    /// Limit in bytes.
    pub limit: u32,
    /// Access rights: type 3:0, S 4, DPL 6:5, P 7, L 13, D/B 14, G 15, unusable 16.
    pub ar: u32,
}

impl Seg {
    const fn unusable(&self) -> bool {
        self.ar & ar::UNUSABLE != 0
    }
    const fn seg_type(&self) -> u32 {
        self.ar & 0xf
    }
    const fn s(&self) -> bool {
        self.ar & ar::S != 0
    }
    const fn present(&self) -> bool {
        self.ar & ar::P != 0
    }
    const fn dpl(&self) -> u32 {
        (self.ar >> ar::DPL_SHIFT) & 3
    }
    /// SDM 27.3.1.2: limit bits 11:0 not all ones need G = 0; bits 31:20 set need G = 1.
    const fn limit_fits_granularity(&self) -> bool {
        let g = self.ar & ar::G != 0;
        (self.limit & 0xfff == 0xfff || !g) && (self.limit & 0xfff0_0000 == 0 || g)
    }
}

/// The guest state rvmm checks before entry.
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestState {
    /// CR0 as the guest sees it.
    pub cr0: u64,
    /// CR4 as the guest sees it.
    pub cr4: u64,
    /// EFER as the guest sees it.
    pub efer: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// RIP.
    pub rip: u64,
    /// CS, SS, DS, ES, FS, GS, TR, LDTR.
    pub segs: [Seg; 8],
    /// GDTR base.
    pub gdtr_base: u64,
    /// IDTR base.
    pub idtr_base: u64,
}

const fn canonical(v: u64) -> bool {
    ((v as i64) << 16 >> 16) as u64 == v
}

/// Checks a whole guest state: control registers first, then RIP, RFLAGS and the
/// segment registers (a subset of SDM Vol. 3C, 27.3.1, the part a VMM without
/// unrestricted guest must hold; the processor's own checks catch the rest).
pub fn check_state(g: &GuestState) -> Result<(), Check> {
    let [cs, ss, ds, es, fs, gs, tr, ldtr] = g.segs;
    check(g.cr0, g.cr4, g.efer, cs.ar, g.rflags)?;
    let ia32e = g.efer & EFER_LME != 0 && g.cr0 & crate::mmu::mode::CR0_PG != 0;
    let long_code = ia32e && cs.ar & (1 << 13) != 0;
    if ia32e && g.rflags & (1 << 17) != 0 {
        return Err(Check::BadRflags);
    }
    if (long_code && !canonical(g.rip)) || (!long_code && g.rip >> 32 != 0) {
        return Err(Check::BadRip);
    }
    if cs.unusable() || !cs.s() || !cs.present() || cs.seg_type() & 0x9 != 0x9 {
        return Err(Check::BadCs);
    }
    if !ss.unusable()
        && (!ss.s()
            || !ss.present()
            || !matches!(ss.seg_type(), 3 | 7)
            || ss.dpl() != u32::from(cs.selector & 3))
    {
        return Err(Check::BadSs);
    }
    for d in [ds, es, fs, gs] {
        let exec_only = d.seg_type() & 0x8 != 0 && d.seg_type() & 0x2 == 0;
        if !d.unusable() && (!d.present() || !d.s() || d.seg_type() & 1 == 0 || exec_only) {
            return Err(Check::BadDataSegment);
        }
    }
    check_privileges(&g.segs)?;
    let tr_type_ok = tr.seg_type() == 11 || (!ia32e && tr.seg_type() == 3);
    if tr.unusable() || tr.s() || !tr.present() || !tr_type_ok || tr.selector & 4 != 0 {
        return Err(Check::BadTr);
    }
    if !ldtr.unusable() && (ldtr.s() || !ldtr.present() || ldtr.seg_type() != 2) {
        return Err(Check::BadLdtr);
    }
    for s in [cs, ds, es, fs, gs, tr, ldtr] {
        if !s.unusable() && !s.limit_fits_granularity() {
            return Err(Check::BadLimitGranularity);
        }
    }
    if !ss.unusable() && !ss.limit_fits_granularity() {
        return Err(Check::BadLimitGranularity);
    }
    if ia32e {
        let bases = [
            g.gdtr_base,
            g.idtr_base,
            fs.base,
            gs.base,
            tr.base,
            if ldtr.unusable() { 0 } else { ldtr.base },
        ];
        if bases.iter().any(|&b| !canonical(b)) {
            return Err(Check::BadBase);
        }
    }
    Ok(())
}

/// The privilege-level rules of SDM 27.3.1.2 for a guest outside virtual-8086 mode
/// without unrestricted guest (`segs` as in [`GuestState::segs`]).
pub fn check_privileges(segs: &[Seg; 8]) -> Result<(), Check> {
    let [cs, ss, ds, es, fs, gs, _, _] = *segs;
    let cs_rpl = u32::from(cs.selector & 3);
    if !ss.unusable()
        && (u32::from(ss.selector & 3) != cs_rpl || ss.dpl() != u32::from(ss.selector & 3))
    {
        return Err(Check::BadPrivilege);
    }
    let cs_ok = match cs.seg_type() {
        9 | 11 => cs.dpl() == ss.dpl(),
        _ => cs.dpl() <= ss.dpl(),
    };
    if !cs_ok {
        return Err(Check::BadPrivilege);
    }
    for d in [ds, es, fs, gs] {
        if !d.unusable() && d.seg_type() <= 11 && d.dpl() < u32::from(d.selector & 3) {
            return Err(Check::BadPrivilege);
        }
    }
    Ok(())
}

/// Reserved bits of CR0, CR4, EFER and RFLAGS (bit 1 of RFLAGS must be set).
fn check_reserved(cr0: u64, cr4: u64, efer: u64, rflags: u64) -> Result<(), Check> {
    if cr0 >> 32 != 0 || cr4 & !CR4_ALLOWED != 0 {
        return Err(Check::ReservedCrBits);
    }
    if efer & !EFER_ALLOWED != 0 {
        return Err(Check::ReservedEferBits);
    }
    if rflags & 2 == 0 || rflags & !0x003f_7fd7 != 0 {
        return Err(Check::BadRflags);
    }
    Ok(())
}

/// Checks a real-mode state, which rvmm runs itself (in virtual-8086 mode or the
/// emulator) from what userspace set: control registers, RFLAGS and RIP.
pub fn check_real(cr0: u64, cr4: u64, efer: u64, rflags: u64, rip: u64) -> Result<(), Check> {
    // (RFLAGS.VM is rvmm's while it runs the guest in vm86.)
    check_reserved(cr0, cr4, efer, rflags)?;
    if rip >> 32 != 0 {
        return Err(Check::BadRip);
    }
    Ok(())
}

/// Checks the control registers, EFER and RFLAGS. `cs_ar` is CS's VMX access rights.
pub fn check(cr0: u64, cr4: u64, efer: u64, cs_ar: u32, rflags: u64) -> Result<(), Check> {
    check_reserved(cr0, cr4, efer, rflags)?;
    if cr0 & CR0_PG != 0 && cr0 & CR0_PE == 0 {
        return Err(Check::PagingWithoutProtection);
    }
    if cr0 & CR0_PE == 0 {
        return Err(Check::RealMode);
    }
    let ia32e = efer & EFER_LME != 0 && cr0 & CR0_PG != 0;
    if ia32e && cr4 & CR4_PAE == 0 {
        return Err(Check::LongModeWithoutPae);
    }
    if ia32e && cs_ar & (1 << 13) != 0 && cs_ar & (1 << 14) != 0 {
        return Err(Check::CsLongAndDefault32);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmu::mode::{CR0_PG, CR0_WP};

    fn flat(selector: u16, ar: u32) -> Seg {
        Seg {
            selector,
            base: 0,
            limit: 0xffff_ffff,
            ar,
        }
    }

    fn long_state() -> GuestState {
        let data = flat(0x10, 0xc093);
        GuestState {
            cr0: CR0_PE | CR0_PG | CR0_WP,
            cr4: CR4_PAE,
            efer: EFER_LME | EFER_LMA,
            rflags: 2,
            rip: 0x10_0000,
            segs: [
                flat(8, 0xa09b),
                data,
                data,
                data,
                data,
                data,
                Seg {
                    selector: 0,
                    base: 0,
                    limit: 0x67,
                    ar: 0x8b,
                },
                Seg {
                    ar: 1 << 16,
                    ..Seg::default()
                },
            ],
            gdtr_base: 0x500,
            idtr_base: 0,
        }
    }

    #[test]
    fn real_mode_states() {
        assert_eq!(check_real(0x10, 0, 0, 0x2, 0xfff0), Ok(()));
        assert_eq!(check_real(0x10, 0, 0, 0x2 | 1 << 17, 0xfff0), Ok(()));
        assert_eq!(check_real(0x10, 0, 0, 0x0, 0), Err(Check::BadRflags));
        assert_eq!(
            check_real(0x10, 0, 0, 0x2 | 1 << 30, 0),
            Err(Check::BadRflags)
        );
        assert_eq!(check_real(0x10, 0, 0, 0x2, 1 << 32), Err(Check::BadRip));
        assert_eq!(
            check_real(1 << 32, 0, 0, 0x2, 0),
            Err(Check::ReservedCrBits)
        );
    }

    #[test]
    fn whole_state() {
        assert_eq!(check_state(&long_state()), Ok(()));
        let mut g = long_state();
        g.rip = 0x8000_0000_0000;
        assert_eq!(check_state(&g), Err(Check::BadRip));
        let mut g = long_state();
        g.segs[0].ar = 0xa093; // data in CS
        assert_eq!(check_state(&g), Err(Check::BadCs));
        let mut g = long_state();
        g.segs[1].ar = 0xc09b; // code in SS
        assert_eq!(check_state(&g), Err(Check::BadSs));
        let mut g = long_state();
        g.segs[0].selector = 0xb; // CS.RPL 3, SS.DPL 0
        assert_eq!(check_state(&g), Err(Check::BadSs));
        let mut g = long_state();
        g.segs[2].ar = 0xc092; // DS not accessed
        assert_eq!(check_state(&g), Err(Check::BadDataSegment));
        let mut g = long_state();
        g.segs[6].ar = 0x83; // 16-bit busy TSS in IA-32e mode
        assert_eq!(check_state(&g), Err(Check::BadTr));
        let mut g = long_state();
        g.segs[7] = Seg {
            selector: 0x18,
            base: 0,
            limit: 0xff,
            ar: 0x89,
        };
        assert_eq!(check_state(&g), Err(Check::BadLdtr));
        let mut g = long_state();
        g.segs[3].limit = 0xffe; // G=1 needs limit bits 11:0 all ones
        assert_eq!(check_state(&g), Err(Check::BadLimitGranularity));
        g.segs[3].ar &= !(1 << 15); // with G=0: fine up to 1 MiB - 1...
        g.segs[3].limit = 0xf_ffff;
        assert_eq!(check_state(&g), Ok(()));
        g.segs[3].limit = 0x10_0000; // ...not beyond
        assert_eq!(check_state(&g), Err(Check::BadLimitGranularity));
        let mut g = long_state();
        g.idtr_base = 0x8000_0000_0000;
        assert_eq!(check_state(&g), Err(Check::BadBase));
        // 32-bit protected mode with a 32-bit busy TSS.
        let mut g = long_state();
        g.cr0 = CR0_PE;
        g.efer = 0;
        g.segs[0].ar = 0xc09b;
        g.segs[6].ar = 0x8b;
        assert_eq!(check_state(&g), Ok(()));
    }

    const CS64: u32 = 0xa09b;
    const CS32: u32 = 0xc09b;

    #[test]
    fn good_states() {
        assert_eq!(check(CR0_PE, 0, 0, CS32, 2), Ok(()));
        assert_eq!(
            check(
                CR0_PE | CR0_PG | CR0_WP,
                CR4_PAE,
                EFER_LME | EFER_LMA,
                CS64,
                0x202
            ),
            Ok(())
        );
    }

    #[test]
    fn bad_states() {
        assert_eq!(
            check(CR0_PG, 0, 0, CS32, 2),
            Err(Check::PagingWithoutProtection)
        );
        assert_eq!(check(0, 0, 0, CS32, 2), Err(Check::RealMode));
        assert_eq!(
            check(CR0_PE | CR0_PG, 0, EFER_LME, CS64, 2),
            Err(Check::LongModeWithoutPae)
        );
        assert_eq!(
            check(CR0_PE | CR0_PG, CR4_PAE, EFER_LME, 0xe09b, 2),
            Err(Check::CsLongAndDefault32)
        );
        assert_eq!(
            check(CR0_PE | 1 << 40, 0, 0, CS32, 2),
            Err(Check::ReservedCrBits)
        );
        assert_eq!(
            check(CR0_PE, 1 << 13, 0, CS32, 2),
            Err(Check::ReservedCrBits)
        );
        assert_eq!(
            check(CR0_PE, 0, 1 << 9, CS32, 2),
            Err(Check::ReservedEferBits)
        );
        assert_eq!(check(CR0_PE, 0, 0, CS32, 0), Err(Check::BadRflags));
    }

    #[test]
    fn hostile_state_never_panics() {
        let mut x = 0xbb67_ae85_84ca_a73bu64;
        let mut rng = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let edge = [0, u64::MAX, 1 << 47, (1 << 47) - 1, 0xffff_ffff, 1 << 63];
        for i in 0..50_000 {
            let mut v = || {
                let r = rng();
                if r & 1 == 0 {
                    edge[(r >> 1) as usize % edge.len()]
                } else {
                    r
                }
            };
            let mut g = GuestState {
                cr0: v(),
                cr4: v(),
                efer: v(),
                rflags: v(),
                rip: v(),
                gdtr_base: v(),
                idtr_base: v(),
                ..Default::default()
            };
            for sg in g.segs.iter_mut() {
                let r = v();
                *sg = Seg {
                    selector: r as u16,
                    base: v(),
                    limit: (r >> 16) as u32,
                    ar: (r >> 32) as u32,
                };
            }
            if i % 2 == 0 {
                g.cr0 = (g.cr0 & 0xffff_ffff) | CR0_PE;
            }
            let _ = check_state(&g);
        }
    }
}
