// SPDX-License-Identifier: GPL-2.0

//! Shadow page-table entries (sptes): what the CPU really walks while the guest runs.

use super::walker::{Access, PermCtx, Walk};

/// Present.
pub const SPTE_P: u64 = 1 << 0;
/// Writable.
pub const SPTE_RW: u64 = 1 << 1;
/// User-accessible.
pub const SPTE_US: u64 = 1 << 2;
/// Accessed (preset so the CPU never writes shadow entries).
pub const SPTE_A: u64 = 1 << 5;
/// Dirty (preset, same reason).
pub const SPTE_D: u64 = 1 << 6;
/// Execute-disable.
pub const SPTE_NX: u64 = 1 << 63;
/// Physical-address bits of an entry.
pub const SPTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// The shadow leaf for a successful guest walk, mapping the 4-KiB host frame `host_pa`.
///
/// - Permissions are the guest's effective ones (all levels combined), so the CPU
///   faults exactly where the guest's own tables would refuse the access.
/// - A page the guest has not dirtied yet is mapped read-only: its first write exits,
///   and the walk for it sets the guest's dirty flag, as the hardware would.
/// - CR0.WP = 0 lets supervisor code write read-only pages; such a page is mapped
///   writable but supervisor-only (and not executable under SMEP), so that a later
///   user access, or fetch, exits and is checked against the guest's tables again.
pub fn leaf(walk: &Walk, access: Access, ctx: &PermCtx, host_pa: u64) -> u64 {
    let mut user = walk.user;
    let mut writable = walk.rw_all && walk.dirty;
    let mut nx = walk.nx;
    if !ctx.wp && !walk.rw_all && access.write && !access.user {
        writable = walk.dirty;
        if user {
            user = false;
            nx |= ctx.smep;
        }
    }
    SPTE_P
        | SPTE_A
        | SPTE_D
        | (host_pa & SPTE_ADDR)
        | if writable { SPTE_RW } else { 0 }
        | if user { SPTE_US } else { 0 }
        | if nx { SPTE_NX } else { 0 }
}

/// A non-leaf shadow entry: all rights, the leaf decides.
pub const fn table(pa: u64) -> u64 {
    SPTE_P | SPTE_RW | SPTE_US | SPTE_A | (pa & SPTE_ADDR)
}

/// A PAE page-directory-pointer entry (only P and the address are allowed).
pub const fn pae_pdpte(pa: u64) -> u64 {
    SPTE_P | (pa & SPTE_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(rw: bool, us: bool, nx: bool, dirty: bool) -> Walk {
        Walk {
            gpa: 0x5000,
            level: 1,
            writable: rw,
            user: us,
            nx,
            dirty,
            rw_all: rw,
            path: Default::default(),
        }
    }

    #[test]
    fn clean_pages_are_mapped_read_only() {
        let ctx = PermCtx::default();
        let s = leaf(
            &walk(true, true, false, false),
            Access::default(),
            &ctx,
            0x1234_5000,
        );
        assert_eq!(s & SPTE_RW, 0);
        assert_eq!(s & SPTE_ADDR, 0x1234_5000);
        let s = leaf(
            &walk(true, true, false, true),
            Access::default(),
            &ctx,
            0x1234_5000,
        );
        assert_ne!(s & SPTE_RW, 0);
        assert_ne!(s & SPTE_US, 0);
    }

    #[test]
    fn wp0_supervisor_write_maps_supervisor_only() {
        let ctx = PermCtx {
            wp: false,
            smep: true,
            ..PermCtx::default()
        };
        let w = Access {
            write: true,
            user: false,
            fetch: false,
        };
        let s = leaf(&walk(false, true, false, true), w, &ctx, 0x9000);
        assert_ne!(s & SPTE_RW, 0);
        assert_eq!(s & SPTE_US, 0);
        assert_ne!(s & SPTE_NX, 0);
        // With WP = 1 the same page stays read-only and user.
        let s = leaf(
            &walk(false, true, false, true),
            w,
            &PermCtx::default(),
            0x9000,
        );
        assert_eq!(s & SPTE_RW, 0);
        assert_ne!(s & SPTE_US, 0);
    }
}
