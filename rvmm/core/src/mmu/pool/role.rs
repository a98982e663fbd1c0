// SPDX-License-Identifier: GPL-2.0

//! The role of a shadow page: what it shadows besides the guest frame (level, the
//! rights the levels above grant, the permission context, the guest paging mode, the
//! part of a 32-bit guest table, or "direct" for the pieces of a guest large page), and
//! the guest paging modes and index arithmetic that go with it.

use super::*;

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
    pub(super) const W: u32 = 1 << 4;
    pub(super) const U: u32 = 1 << 5;
    pub(super) const NX: u32 = 1 << 6;
    const WP: u32 = 1 << 7;
    const SMEP: u32 = 1 << 8;
    const SMAP: u32 = 1 << 9;
    const NXE: u32 = 1 << 10;
    const MODE_SHIFT: u32 = 11;
    const MODE: u32 = 3 << 11;
    const QUAD_SHIFT: u32 = 13;
    const QUAD: u32 = 3 << 13;
    pub(super) const PSE: u32 = 1 << 15;
    const PDPT_SHIFT: u32 = 16;
    const PDPT: u32 = 0x7f << 16;
    const VCPU_SHIFT: u32 = 23;
    const VCPU: u32 = 0xff << 23;
    /// A direct shadow of a clean large page (D clear in the guest's entry).
    const CLEAN: u32 = 1 << 31;

    /// The role of a root under `ctx`, for guest paging `mode`: level 4 for 4-level
    /// paging; else the 4-entry PAE PDPT the CPU loads, level 3 - for a PAE guest a copy
    /// of its PDPTE registers (not a shadow of memory: direct, keyed by the PDPT's place
    /// in its page and by the vCPU `vcpu` whose registers they are: another vCPU's MOV
    /// CR3 to the same PDPT loads its own), for a 32-bit guest the four quadrants of its
    /// page directory.
    pub fn root(ctx: &PermCtx, mode: u8, pse: bool, cr3: u64, vcpu: u32) -> Self {
        let mut r = Self::W | Self::U | (u32::from(mode) << Self::MODE_SHIFT);
        r |= match mode {
            MODE_LONG4 => 4,
            MODE_PAE => {
                3 | Self::DIRECT
                    | ((((cr3 >> 5) & 0x7f) as u32) << Self::PDPT_SHIFT)
                    | ((vcpu & 0xff) << Self::VCPU_SHIFT)
            }
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

    /// A root's level (what a CR3 load finds; never below another shadow).
    pub const fn root_level(self) -> bool {
        self.level() == top_level(self.mode())
    }

    /// An upper-level table below a root (not a leaf, not a root): what INVLPG must
    /// find in sync (it flushes the paging-structure caches).
    pub const fn mid_level(self) -> bool {
        let l = self.level();
        l > 1 && l < top_level(self.mode())
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
    pub(super) fn child(self, pte: u64, direct: bool, quadrant: u32) -> Self {
        let mut r = (self.0
            & !(Self::LEVEL | Self::DIRECT | Self::QUAD | Self::PDPT | Self::VCPU | Self::CLEAN))
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
    pub(super) fn piece(self) -> Self {
        Self((self.0 & !Self::LEVEL) | u32::from(self.level() - 1))
    }
}

impl Role {
    /// The role of the direct shadow of large page `pte` under a table of this role: a
    /// clean page (D clear) is not writable, so that the first write faults and the walk
    /// sets D (KVM's rule), and its role differs from the dirty page's whatever the
    /// other bits (a read-only page that a supervisor wrote under CR0.WP = 0 has
    /// writable pieces once dirty: a guest that cleans it again must fault again).
    pub(super) fn large_page(self, pte: u64) -> Self {
        if pte & PTE_D == 0 {
            Self(self.child(pte & !PTE_RW, true, 0).0 | Self::CLEAN)
        } else {
            self.child(pte, true, 0)
        }
    }
}

/// The top shadow level for a guest mode.
pub(super) const fn top_level(mode: u8) -> u8 {
    if mode == MODE_LONG4 {
        4
    } else {
        3
    }
}

/// Index of `gva` in a shadow table of `level` for `mode`.
pub(super) fn sindex(gva: u64, level: u8, mode: u8) -> usize {
    if level == 3 && mode != MODE_LONG4 {
        ((gva >> 30) & 3) as usize
    } else {
        index_of(gva, level)
    }
}

/// Whether guest entry `pte` at guest `level` maps a large page.
pub(super) fn large(pte: u64, level: u8, role: Role, ctx: &PermCtx) -> bool {
    pte & PTE_PS != 0
        && match (role.mode(), level) {
            (MODE_LONG4, 3) => ctx.gbpages,
            (MODE_BITS32, 2) => role.0 & Role::PSE != 0,
            (_, 2) => true,
            _ => false,
        }
}
