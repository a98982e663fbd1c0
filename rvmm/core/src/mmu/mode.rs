// SPDX-License-Identifier: GPL-2.0

//! The guest's paging mode, from CR0, CR4 and EFER (SDM Vol. 3A, 4.1.1).

/// CR0.PE.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.EM: x87 emulation (SSE instructions are #UD).
pub const CR0_EM: u64 = 1 << 2;
/// CR0.TS: task switched (x87, SSE and AVX instructions raise #NM).
pub const CR0_TS: u64 = 1 << 3;
/// CR0.AM: alignment checking at CPL 3 with RFLAGS.AC.
pub const CR0_AM: u64 = 1 << 18;
/// CR0.WP.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.PG.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.DE: DR4 and DR5 are reserved (#UD) rather than aliases of DR6 and DR7.
pub const CR4_DE: u64 = 1 << 3;
/// CR4.PSE.
pub const CR4_PSE: u64 = 1 << 4;
/// CR4.PAE.
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.PGE.
pub const CR4_PGE: u64 = 1 << 7;
/// CR4.OSFXSR: the OS supports FXSAVE/FXRSTOR (SSE instructions run).
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4.OSXSAVE: XSAVE and XCR0 enabled.
pub const CR4_OSXSAVE: u64 = 1 << 18;
/// CR4.PCIDE.
pub const CR4_PCIDE: u64 = 1 << 17;
/// The CR4 bits whose change flushes the TLB (SDM Vol. 3A, 4.10.4.1; PCIDE from 1
/// to 0 does, and a change to 1 costs nothing extra here).
pub const CR4_FLUSH: u64 = CR4_PGE | CR4_PSE | CR4_PAE | CR4_PCIDE | CR4_SMEP | CR4_SMAP;
/// CR4.SMEP.
pub const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP.
pub const CR4_SMAP: u64 = 1 << 21;
/// EFER.LME.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE.
pub const EFER_NXE: u64 = 1 << 11;

/// How the guest translates linear addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingMode {
    /// CR0.PG = 0: linear = physical.
    None,
    /// 32-bit paging; `pse` allows 4 MiB pages.
    Bits32 {
        /// CR4.PSE.
        pse: bool,
    },
    /// PAE paging.
    Pae,
    /// 4-level paging (IA-32e mode).
    Long4,
}

impl PagingMode {
    /// The mode the guest's control registers select.
    pub const fn from_regs(cr0: u64, cr4: u64, efer: u64) -> Self {
        if cr0 & CR0_PG == 0 {
            Self::None
        } else if efer & EFER_LMA != 0 {
            Self::Long4
        } else if cr4 & CR4_PAE != 0 {
            Self::Pae
        } else {
            Self::Bits32 {
                pse: cr4 & CR4_PSE != 0,
            }
        }
    }

    /// Levels of the guest's tables (0 without paging).
    pub const fn levels(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Bits32 { .. } => 2,
            Self::Pae => 3,
            Self::Long4 => 4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(
            PagingMode::from_regs(CR0_PE, CR4_PAE, EFER_LME),
            PagingMode::None
        );
        assert_eq!(
            PagingMode::from_regs(CR0_PE | CR0_PG, 0, 0),
            PagingMode::Bits32 { pse: false }
        );
        assert_eq!(
            PagingMode::from_regs(CR0_PE | CR0_PG, CR4_PSE, 0),
            PagingMode::Bits32 { pse: true }
        );
        assert_eq!(
            PagingMode::from_regs(CR0_PE | CR0_PG, CR4_PAE, EFER_LME),
            PagingMode::Pae
        );
        assert_eq!(
            PagingMode::from_regs(CR0_PE | CR0_PG, CR4_PAE, EFER_LME | EFER_LMA),
            PagingMode::Long4
        );
        assert_eq!(PagingMode::Long4.levels(), 4);
    }
}
