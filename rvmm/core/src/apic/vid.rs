// SPDX-License-Identifier: GPL-2.0

//! Virtual-interrupt delivery's bookkeeping (SDM Vol. 3C, 30.2): what the CPU did with
//! the APIC's vectors while the guest ran, read back from the virtual-APIC page, and
//! which event an exit interrupted when that may be a virtual delivery.

use super::{Apic, VecReg};
use crate::exit::intr;

impl Apic {
    /// How many vectors the CPU delivered since the page was written from this APIC,
    /// given the page's IRR and ISR now: a delivery clears a vector's IRR bit and sets
    /// its ISR bit, so a vector the APIC requested and the page no longer does was
    /// delivered (even if its handler already ended it, or the same vector was in
    /// service before), and so was one in service now that the APIC neither had in
    /// service nor requested (a self-IPI the CPU took itself and delivered).
    pub fn cpu_deliveries(&self, irr: &VecReg, isr: &VecReg) -> u32 {
        (0..4)
            .map(|i| {
                (self.irr.0[i] & !irr.0[i]).count_ones()
                    + (isr.0[i] & !self.isr.0[i] & !self.irr.0[i]).count_ones()
            })
            .sum()
    }
}

/// The event an exit interrupted, from its IDT-vectoring information `idt`, when the
/// CPU delivered a virtual interrupt during the run (`delivered`): if a vector is in
/// service (`svi`) and the guest still has interrupts on (a delivery not yet done; an
/// interrupt gate clears IF, and a handler that set it again has not ended the vector
/// in the guests this is written for), the interrupted event is that external
/// interrupt, which the VMM delivers again by injection. Real processors say so in the
/// field; Bochs 2.7 leaves it as an earlier event set it (an NMI, an exception with its
/// error code), which would lose the interrupt, inject a bogus exception, or fail the
/// entry.
pub const fn interrupted_event(idt: u32, delivered: bool, svi: u8, interrupts_on: bool) -> u32 {
    if idt & intr::VALID == 0 || !delivered || svi == 0 || !interrupts_on {
        return idt;
    }
    intr::VALID | intr::TYPE_EXT_INTR | svi as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apic::Trigger;

    fn apic() -> Apic {
        let mut a = Apic::new(0, true);
        a.mmio_write(crate::apic::reg::SVR, 4, 0x1ff, 0);
        a
    }

    fn reg(vs: &[u8]) -> VecReg {
        let mut r = VecReg::default();
        for &v in vs {
            r.set(v);
        }
        r
    }

    #[test]
    fn deliveries_seen_in_the_page() {
        let mut a = apic();
        a.accept(0xec, Trigger::Edge);
        a.accept(0x31, Trigger::Edge);
        // Nothing happened.
        assert_eq!(a.cpu_deliveries(&reg(&[0x31, 0xec]), &reg(&[])), 0);
        // 0xec delivered and still in service; 0x31 waits.
        assert_eq!(a.cpu_deliveries(&reg(&[0x31]), &reg(&[0xec])), 1);
        // Both delivered, 0xec already ended by its handler.
        assert_eq!(a.cpu_deliveries(&reg(&[]), &reg(&[0x31])), 2);
        // A self-IPI the CPU took (0x50: never requested through the APIC), delivered.
        assert_eq!(a.cpu_deliveries(&reg(&[0x31, 0xec]), &reg(&[0x50])), 1);
        // A self-IPI still waiting is no delivery.
        assert_eq!(a.cpu_deliveries(&reg(&[0x31, 0x50, 0xec]), &reg(&[])), 0);
        // 0xec in service at the last read and requested again: its handler ended it
        // and the CPU delivered it again, in one run.
        let mut b = apic();
        b.accept(0xec, Trigger::Edge);
        b.ack(0xec);
        b.accept(0xec, Trigger::Edge);
        assert_eq!(b.cpu_deliveries(&reg(&[]), &reg(&[0xec])), 1);
        // Only an EOI: no delivery.
        let mut c = apic();
        c.accept(0x40, Trigger::Edge);
        c.ack(0x40);
        assert_eq!(c.cpu_deliveries(&reg(&[]), &reg(&[])), 0);
    }

    #[test]
    fn interrupted_event_after_a_virtual_delivery() {
        let pf = intr::VALID | intr::TYPE_HW_EXCEPTION | intr::HAS_ERROR_CODE | 14;
        let nmi = intr::VALID | intr::TYPE_NMI | 2;
        let ext = intr::VALID | intr::TYPE_EXT_INTR | 0xec;
        // Bochs's stale field after a faulting delivery of 0xec: replaced.
        assert_eq!(interrupted_event(pf, true, 0xec, true), ext);
        assert_eq!(interrupted_event(nmi, true, 0xec, true), ext);
        assert_eq!(interrupted_event(ext, true, 0xec, true), ext);
        // Kept: no delivery in the run, nothing in service, IF clear (a handler runs),
        // or no event interrupted at all.
        assert_eq!(interrupted_event(pf, false, 0xec, true), pf);
        assert_eq!(interrupted_event(pf, true, 0, true), pf);
        assert_eq!(interrupted_event(pf, true, 0xec, false), pf);
        assert_eq!(interrupted_event(0, true, 0xec, true), 0);
    }
}
