// SPDX-License-Identifier: GPL-2.0

//! Real mode under VMX without "unrestricted guest": which real-mode states
//! virtual-8086 mode holds exactly, and how a segment register looks in each.
//!
//! A real-mode guest runs in virtual-8086 mode when each of its six segment registers
//! is what a real-mode load gives with the power-on limits: base = selector << 4, a
//! 64-KiB limit, 16-bit, present, and read/write data (CS: code or data). There VMX
//! enters with the vm86 access rights (0xf3) and the CPU's results are real mode's
//! (the instructions that differ raise #GP and are emulated). Any other state (right
//! after CR0.PE is cleared, until the guest has reloaded its segments; "unreal" 4-GiB
//! limits; a 32-bit CS) is run by the instruction emulator, as KVM does without
//! unrestricted guest.

use crate::guest_state::ar::{
    CODE as AR_TYPE_CODE, DB as AR_DB, DC as AR_DC, G as AR_G, P as AR_P, RW as AR_TYPE_RW_DATA,
    S as AR_S, UNUSABLE as AR_UNUSABLE,
};
use crate::guest_state::Seg;

/// Whether virtual-8086 mode holds segment `s` exactly (`code`: it is CS).
pub fn vm86_holds(s: &Seg, code: bool) -> bool {
    let kind_ok = if code {
        true
    } else {
        s.ar & (AR_TYPE_CODE | AR_TYPE_RW_DATA | AR_DC) == AR_TYPE_RW_DATA
    };
    s.base == u64::from(s.selector) << 4
        && s.limit == 0xffff
        && s.ar & (AR_UNUSABLE | AR_DB | AR_G) == 0
        && s.ar & (AR_S | AR_P) == AR_S | AR_P
        && kind_ok
}

/// Whether virtual-8086 mode holds all six segment registers (CS first).
pub fn vm86_holds_all(cs: &Seg, others: &[Seg; 5]) -> bool {
    vm86_holds(cs, true) && others.iter().all(|s| vm86_holds(s, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(selector: u16, base: u64, limit: u32, ar: u32) -> Seg {
        Seg {
            selector,
            base,
            limit,
            ar,
        }
    }

    #[test]
    fn what_vm86_holds() {
        let data = seg(0x1234, 0x12340, 0xffff, 0x93);
        let code = seg(0xf000, 0xf0000, 0xffff, 0x9b);
        assert!(vm86_holds(&data, false));
        assert!(vm86_holds(&code, true));
        // A base that is not selector << 4 (a protected-mode selector after PE is
        // cleared), a 4-GiB limit, a 32-bit segment, an unusable or expand-down one,
        // a code segment in a data register: emulated.
        assert!(!vm86_holds(&seg(0x10, 0, 0xffff, 0x93), false));
        assert!(!vm86_holds(&seg(0x1234, 0x12340, 0xffff_ffff, 0x93), false));
        assert!(!vm86_holds(&seg(0x1234, 0x12340, 0xffff, 0x4093), false));
        assert!(!vm86_holds(&seg(0, 0, 0xffff, 0x1_0000), false));
        assert!(!vm86_holds(&seg(0, 0, 0xffff, 0x97), false));
        assert!(!vm86_holds(&seg(0, 0, 0xffff, 0x9b), false));
        assert!(!vm86_holds(&seg(0, 0, 0xffff, 0x13), false), "not present");
        // Read-only data is not what vm86 loads either.
        assert!(!vm86_holds(&seg(0, 0, 0xffff, 0x91), false));
        let all = [data; 5];
        assert!(vm86_holds_all(&code, &all));
        let mut unreal = all;
        unreal[2].limit = 0xffff_ffff;
        assert!(!vm86_holds_all(&code, &unreal));
    }
}
