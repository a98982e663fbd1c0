// SPDX-License-Identifier: GPL-2.0

//! From guest entries to shadow entries: the shadow leaf a guest PTE gives, the guest
//! entry behind a shadow entry, and the shadow (guest frame and role) a guest entry
//! leads to.

use super::*;

impl<T: Tables> Pool<'_, T> {
    /// The shadow leaf for guest PTE `pte` in a table whose role is `role`, or `None`
    /// where the entry cannot be cached (not present, not accessed, reserved bits, not
    /// RAM). Dirty pages and pages that are not page tables in sync may be writable.
    pub(super) fn leaf_from_pte(
        &mut self,
        guest: &mut impl GuestPhys,
        role: Role,
        pte: u64,
        ctx: &PermCtx,
    ) -> Option<u64> {
        let phys = ctx.phys_mask();
        let bits32 = role.mode() == MODE_BITS32;
        let reserved = if bits32 {
            0
        } else {
            let pae = if role.mode() == MODE_PAE {
                pte & PAE_HIGH_RESERVED
            } else {
                0
            };
            (pte & !phys & ((1 << 52) - 1) & !PTE_XD) | if ctx.nxe { 0 } else { pte & PTE_XD } | pae
        };
        if pte & PTE_P == 0 || pte & PTE_A == 0 || reserved != 0 {
            return None;
        }
        let gpa = if bits32 {
            pte & 0xffff_f000
        } else {
            pte & phys & !0xfff
        };
        let (hpa, ro) = guest.host_pa(gpa).or_else(|| self.apic_access_frame(gpa))?;
        let writable = role.0 & Role::W != 0
            && pte & PTE_RW != 0
            && pte & PTE_D != 0
            && !ro
            && !self.protected(gpa >> 12);
        let user = role.0 & Role::U != 0 && pte & PTE_US != 0;
        let nx = role.0 & Role::NX != 0 || (!bits32 && ctx.nxe && pte & PTE_XD != 0);
        Some(
            SPTE_P
                | spte::SPTE_A
                | spte::SPTE_D
                | (hpa & SPTE_ADDR)
                | if writable { SPTE_RW } else { 0 }
                | if user { SPTE_US } else { 0 }
                | if nx { SPTE_NX } else { 0 },
        )
    }

    /// The guest entry behind entry `j` of sp `sp`: its guest-physical address and size;
    /// `None` for direct shadows and for roots that are not a guest table's shadow.
    pub(super) fn gentry(sp: &Sp, j: usize) -> Option<(u64, u8)> {
        if sp.role.direct() {
            return None;
        }
        let base = sp.gfn << 12;
        let q = u64::from(sp.role.quadrant());
        match (sp.role.mode(), sp.role.level()) {
            (MODE_LONG4, _) => Some((base + 8 * j as u64, 8)),
            (MODE_PAE, 3) | (MODE_BITS32, 3) => None,
            (MODE_PAE, _) => Some((base + 8 * j as u64, 8)),
            (_, 2) => Some((base + 4 * (q * 256 + j as u64 / 2), 4)),
            _ => Some((base + 4 * (q * 512 + j as u64), 4)),
        }
    }

    /// The shadow that entry `j` of sp `sp` must point at, given the guest entry `pte`
    /// behind it (ignored where there is none): the guest frame and role; `None` where
    /// the entry leads nowhere (not present, reserved bits).
    pub(super) fn expected_child(
        sp: &Sp,
        j: usize,
        pte: u64,
        ctx: &PermCtx,
    ) -> Option<(u64, Role)> {
        let level = sp.role.level();
        let mode = sp.role.mode();
        let phys = ctx.phys_mask();
        if sp.role.direct() {
            if level == 3 && mode == MODE_PAE {
                // A PDPTE register: its page directory (bits 2:1, 8:5 and 63 reserved).
                if pte & PTE_P == 0 || pte & (0x1e6 | PTE_XD | (!phys & ((1 << 63) - 1))) != 0 {
                    return None;
                }
                return Some(((pte & phys & !0xfff) >> 12, sp.role.child(0, false, 0)));
            }
            // A piece of a large page: the next piece down.
            let span = 1u64 << (9 * u32::from(level - 1));
            return Some((sp.gfn + j as u64 * span, sp.role.piece()));
        }
        if level == 3 && mode == MODE_BITS32 {
            // Quadrant j of the guest page directory.
            return Some((sp.gfn, sp.role.child(0, false, j as u32)));
        }
        // Not present, or not accessed: no link (a walk sets A first, as the CPU does
        // before it caches an entry; a guest that clears A sees it set again).
        if pte & PTE_P == 0 || pte & PTE_A == 0 {
            return None;
        }
        if mode != MODE_BITS32 {
            // Reserved bits: address bits above MAXPHYADDR, XD without NXE, PS in a
            // PML4E, and the low bits of a large page's frame.
            let mut reserved = pte & !phys & ((1 << 52) - 1) & !PTE_XD;
            if mode == MODE_PAE {
                reserved |= pte & PAE_HIGH_RESERVED;
            }
            if !ctx.nxe {
                reserved |= pte & PTE_XD;
            }
            if pte & PTE_PS != 0 {
                reserved |= match level {
                    4 if mode == MODE_LONG4 => PTE_PS,
                    3 if mode == MODE_LONG4 && !ctx.gbpages => PTE_PS,
                    3 if large(pte, level, sp.role, ctx) => pte & 0x3fff_e000,
                    2 => pte & 0x1f_e000,
                    _ => 0,
                };
            }
            if reserved != 0 {
                return None;
            }
        }
        if mode == MODE_BITS32 {
            let pte = pte & 0xffff_ffff;
            if large(pte, level, sp.role, ctx) {
                // PSE-36: bits 20:13 are physical bits 39:32; each shadow PT maps half.
                let frame = (pte & 0xffc0_0000) | (((pte >> 13) & 0xff) << 32);
                return Some((
                    (frame >> 12) + 512 * (j as u64 & 1),
                    sp.role.large_page(pte),
                ));
            }
            return Some((
                (pte & 0xffff_f000) >> 12,
                sp.role.child(pte, false, j as u32 & 1),
            ));
        }
        if large(pte, level, sp.role, ctx) {
            let span = (1u64 << (12 + 9 * u32::from(level - 1))) - 1;
            return Some(((pte & phys & !span) >> 12, sp.role.large_page(pte)));
        }
        Some(((pte & phys & !0xfff) >> 12, sp.role.child(pte, false, 0)))
    }
}
