// SPDX-License-Identifier: GPL-2.0

//! PAE paging's PDPTE registers (SDM Vol. 3A, 4.4.1): MOV CR3, and the CR0/CR4 writes
//! that change paging, load the four PDPTEs from memory into the vCPU; every walk uses
//! those, never the PDPT in memory, until the next load. Each vCPU has its own.

use super::pool::GuestPhys;
use super::walker::GuestMemory;

/// Guest memory as a vCPU under PAE paging walks it: the 32 bytes of its PDPT read as
/// the vCPU's PDPTE registers.
pub struct WithPdptes<M> {
    /// Guest memory.
    pub mem: M,
    /// The PDPT's guest-physical address (CR3 bits 31:5); `None` outside PAE paging
    /// (memory as it is).
    pub pdpt: Option<u64>,
    /// The registers, as the last load read them.
    pub regs: [u64; 4],
}

impl<M: GuestMemory> WithPdptes<M> {
    /// Register `i` if `gpa` is the place of PDPTE `i` (8 bytes).
    fn reg(&self, gpa: u64, size: u8) -> Option<u64> {
        let off = gpa.wrapping_sub(self.pdpt?);
        (size == 8 && off < 32 && off % 8 == 0).then(|| self.regs[(off / 8) as usize])
    }

    /// Loads the registers from memory (MOV CR3 and the other loads); an entry outside
    /// guest RAM reads as not present.
    pub fn load(mem: &mut M, pdpt: u64) -> [u64; 4] {
        let mut regs = [0; 4];
        for (i, r) in regs.iter_mut().enumerate() {
            *r = mem.read_entry(pdpt + 8 * i as u64, 8).unwrap_or(0);
        }
        regs
    }
}

impl<M: GuestMemory> GuestMemory for WithPdptes<M> {
    fn read_entry(&mut self, gpa: u64, size: u8) -> Option<u64> {
        match self.reg(gpa, size) {
            Some(v) => Some(v),
            None => self.mem.read_entry(gpa, size),
        }
    }

    fn read_entries(&mut self, gpa: u64, out: &mut [u64]) -> bool {
        let end = gpa.wrapping_add(8 * out.len() as u64);
        match self.pdpt {
            Some(p) if gpa < p.wrapping_add(32) && p < end => {
                for (i, o) in out.iter_mut().enumerate() {
                    match self.read_entry(gpa.wrapping_add(8 * i as u64), 8) {
                        Some(v) => *o = v,
                        None => return false,
                    }
                }
                true
            }
            _ => self.mem.read_entries(gpa, out),
        }
    }

    fn update_entry(&mut self, gpa: u64, size: u8, old: u64, new: u64) -> bool {
        // PDPTEs have no accessed flag: a walk never updates them.
        self.mem.update_entry(gpa, size, old, new)
    }
}

impl<M: GuestPhys> GuestPhys for WithPdptes<M> {
    fn host_pa(&mut self, gpa: u64) -> Option<(u64, bool)> {
        self.mem.host_pa(gpa)
    }
}
