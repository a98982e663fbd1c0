// SPDX-License-Identifier: GPL-2.0

//! The xAPIC page in the shadow: while the VM's local APICs all sit in xAPIC mode at
//! one base, the guest frame of that base maps VMX's APIC-access page, a host frame the
//! CPU never reads or writes through a virtualized access: it serves reads from the
//! vCPU's virtual-APIC page and traps writes (SDM Vol. 3C, 30.4). Otherwise the frame is
//! device memory like any other, and accesses fault to the emulator.

use super::*;

/// Where the xAPIC page is mapped from and to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApicAccess {
    /// The guest frame (the APICs' base >> 12).
    pub gfn: u64,
    /// The host-physical address of the APIC-access page.
    pub hpa: u64,
}

impl<T: Tables> Pool<'_, T> {
    /// Maps the xAPIC page to the APIC-access page from now on (`Some`), or stops
    /// (`None`). A change drops every shadow entry (the pool resets: entries of the
    /// old choice, mapped or MMIO, are gone from every vCPU before it enters again);
    /// returns whether it changed. Guest RAM at the frame wins, as in the emulator.
    pub fn set_apic_access(&mut self, a: Option<ApicAccess>) -> bool {
        if self.st.apic_access == a {
            return false;
        }
        self.st.apic_access = a;
        self.reset();
        true
    }

    /// What is mapped.
    pub fn apic_access(&self) -> Option<ApicAccess> {
        self.st.apic_access
    }

    /// The frame a fault at guest-physical `gpa` outside RAM maps, if it is the xAPIC
    /// page: the APIC-access page, writable (the CPU traps the writes).
    pub(super) fn apic_access_frame(&self, gpa: u64) -> Option<(u64, bool)> {
        match self.st.apic_access {
            Some(a) if gpa >> 12 == a.gfn => Some((a.hpa, false)),
            _ => None,
        }
    }
}
