// SPDX-License-Identifier: GPL-2.0

//! INVPCID (SDM Vol. 2A) over a shadow that every PCID shares: what the instruction
//! asks, the faults it raises, and what the shadow must do for it.

/// What an INVPCID comes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invpcid {
    /// #GP(0): a type above 3, descriptor bits 63:12 set, a non-canonical address for
    /// type 0, or a PCID other than 0 for types 0 and 1 while CR4.PCIDE = 0.
    Fault,
    /// One address of the current PCID: what INVLPG does.
    Address(u64),
    /// Everything out of sync is brought up to date: one address or one context of
    /// another PCID (the shadow does not tell PCIDs apart), every context, or every
    /// context but global pages.
    Flush,
}

/// Whether `addr` is canonical with 48-bit linear addresses.
pub const fn canonical(addr: u64) -> bool {
    ((addr as i64) << 16 >> 16) as u64 == addr
}

/// Whether INVPCID's 16-byte memory operand at linear `la` may be read: in 64-bit mode
/// its first and last bytes must be canonical (#GP(0), or #SS(0) through SS).
pub const fn operand_ok(la: u64, long: bool) -> bool {
    !long || (canonical(la) && canonical(la.wrapping_add(15)))
}

/// INVPCID of type `kind` (the register operand) with descriptor `desc` (PCID in bits
/// 11:0 of the first quadword, the linear address in the second), under CR4.PCIDE
/// `pcide` with the current PCID `current` (0 without PCIDs).
pub fn decide(kind: u64, desc: [u64; 2], pcide: bool, current: u64) -> Invpcid {
    let (pcid, addr) = (desc[0], desc[1]);
    let no_pcids = kind <= 1 && pcid != 0 && !pcide;
    if kind > 3 || pcid >> 12 != 0 || (kind == 0 && !canonical(addr)) || no_pcids {
        return Invpcid::Fault;
    }
    if kind == 0 && pcid == current {
        Invpcid::Address(addr)
    } else {
        Invpcid::Flush
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_as_the_sdm_lists() {
        // Type above 3.
        assert_eq!(decide(4, [0, 0], true, 0), Invpcid::Fault);
        assert_eq!(decide(u64::MAX, [0, 0], true, 0), Invpcid::Fault);
        // Reserved descriptor bits 63:12, whatever the type.
        for kind in 0..4 {
            assert_eq!(decide(kind, [1 << 12, 0], true, 0), Invpcid::Fault);
        }
        // A non-canonical address matters for type 0 only.
        assert_eq!(decide(0, [0, 1 << 47], true, 0), Invpcid::Fault);
        assert_eq!(decide(1, [0, 1 << 47], true, 0), Invpcid::Flush);
        // A PCID other than 0 without PCIDE: types 0 and 1 only.
        assert_eq!(decide(0, [5, 0], false, 0), Invpcid::Fault);
        assert_eq!(decide(1, [5, 0], false, 0), Invpcid::Fault);
        assert_eq!(decide(2, [5, 0], false, 0), Invpcid::Flush);
        assert_eq!(decide(3, [5, 0], false, 0), Invpcid::Flush);
    }

    #[test]
    fn one_address_of_the_current_pcid_is_an_invlpg() {
        let a = 0xffff_8000_1234_5000;
        assert_eq!(decide(0, [7, a], true, 7), Invpcid::Address(a));
        assert_eq!(decide(0, [0, a], false, 0), Invpcid::Address(a));
        // Another PCID's address: the shared shadow syncs everything.
        assert_eq!(decide(0, [8, a], true, 7), Invpcid::Flush);
        for kind in 1..4 {
            assert_eq!(decide(kind, [7, a], true, 7), Invpcid::Flush);
        }
    }

    #[test]
    fn the_operand_must_be_canonical_in_64_bit_mode() {
        assert!(operand_ok(0x1000, true));
        assert!(operand_ok(0xffff_8000_0000_0000, true));
        assert!(!operand_ok(1 << 47, true));
        // Its last byte crosses into the non-canonical hole.
        assert!(!operand_ok(0x7fff_ffff_fff8, true));
        assert!(operand_ok(0x7fff_ffff_fff0, true));
        // Outside 64-bit mode, no such rule.
        assert!(operand_ok(1 << 47, false));
    }
}
