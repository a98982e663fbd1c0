// SPDX-License-Identifier: GPL-2.0

//! `VmStats::counters` is the one list of the VM's counters by name: it must name every
//! field but the exits, in the structure's order, each with its own field's value.

use rvmm_uapi::*;

#[test]
fn counters_name_every_field_with_its_value() {
    let mut s = VmStats::default();
    let names: Vec<&str> = VmStats::C_FIELDS
        .iter()
        .map(|&(_, name)| name)
        .filter(|&n| n != "exits")
        .collect();
    let offsets: Vec<usize> = VmStats::C_FIELDS
        .iter()
        .zip(VmStats::offsets())
        .filter(|((_, n), _)| *n != "exits")
        .map(|(_, &o)| o)
        .collect();
    // A distinct value in each field, written at its offset.
    let base = &mut s as *mut VmStats as *mut u8;
    for (k, &o) in offsets.iter().enumerate() {
        // SAFETY: `o` is the offset of a u64 field of `s`.
        unsafe { (base.add(o) as *mut u64).write_unaligned(1000 + k as u64) };
    }
    let c = s.counters();
    let got: Vec<&str> = c.iter().map(|c| c.name).collect();
    assert_eq!(got, names);
    for (k, c) in c.iter().enumerate() {
        assert_eq!(c.value, 1000 + k as u64, "{}", c.name);
        assert_eq!(c.monotonic, c.name != "pool_pages_in_use", "{}", c.name);
    }
}
