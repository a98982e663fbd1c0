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
    /// RFLAGS bit 1 clear, or reserved bits set.
    BadRflags = 7,
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
            Self::BadRflags => "RFLAGS bit 1 must be 1 and reserved bits 0",
        }
    }
}

/// CR4 bits rvmm lets a guest set (VMXE is not among them: VMX is not exposed).
pub const CR4_ALLOWED: u64 = 0x0037_0fff;
/// EFER bits a guest may set: SCE, LME, LMA, NXE.
pub const EFER_ALLOWED: u64 = (1 << 0) | EFER_LME | EFER_LMA | (1 << 11);

/// Checks the state a vCPU is about to enter with. `cs_ar` is CS's VMX access rights.
pub fn check(cr0: u64, cr4: u64, efer: u64, cs_ar: u32, rflags: u64) -> Result<(), Check> {
    if cr0 >> 32 != 0 || cr4 & !CR4_ALLOWED != 0 {
        return Err(Check::ReservedCrBits);
    }
    if efer & !EFER_ALLOWED != 0 {
        return Err(Check::ReservedEferBits);
    }
    if rflags & 2 == 0 || rflags & !0x003f_7fd7 != 0 {
        return Err(Check::BadRflags);
    }
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
    use crate::mmu::mode::CR0_WP;

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
}
