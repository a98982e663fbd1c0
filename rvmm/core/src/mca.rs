// SPDX-License-Identifier: GPL-2.0

//! Machine-check architecture MSRs as a guest sees them: CPUID shows MCE and MCA, so
//! IA32_MCG_CAP, IA32_MCG_STATUS, IA32_MCG_CTL and the banks' MCi_CTL, MCi_STATUS,
//! MCi_ADDR and MCi_MISC exist, with no error ever logged (rvmm never injects #MC: a
//! machine check belongs to the host). The values follow the SDM (Vol. 3B, 16.3) and
//! what KVM lets a guest write: MCi_CTL all zeros or all ones, MCi_STATUS zero.

/// Error-reporting banks.
pub const BANKS: usize = 10;
/// IA32_MCG_CAP: the bank count, and MCG_CTL_P (IA32_MCG_CTL exists). No CMCI, no
/// extended state, no software error recovery.
pub const MCG_CAP: u64 = BANKS as u64 | MCG_CTL_P;
const MCG_CTL_P: u64 = 1 << 8;

/// IA32_MCG_CAP.
pub const MSR_MCG_CAP: u32 = 0x179;
/// IA32_MCG_STATUS.
pub const MSR_MCG_STATUS: u32 = 0x17a;
/// IA32_MCG_CTL.
pub const MSR_MCG_CTL: u32 = 0x17b;
/// IA32_MC0_CTL; bank i's MSRs are MC0_CTL + 4 i + (CTL, STATUS, ADDR, MISC).
pub const MSR_MC0_CTL: u32 = 0x400;
const MSR_MC_END: u32 = MSR_MC0_CTL + 4 * BANKS as u32;

/// A write the CPU refuses with #GP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused;

/// The MCA state of a vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mca {
    status: u64,
    ctl: u64,
    /// Per bank: CTL, STATUS, ADDR, MISC.
    banks: [[u64; 4]; BANKS],
}

/// Whether `index` is one of the MCA MSRs this model has.
pub const fn is_mca_msr(index: u32) -> bool {
    matches!(index, MSR_MCG_CAP | MSR_MCG_STATUS | MSR_MCG_CTL)
        || (index >= MSR_MC0_CTL && index < MSR_MC_END)
}

impl Mca {
    /// RDMSR; `None` for an MSR outside the model (#GP).
    pub fn rdmsr(&self, index: u32) -> Option<u64> {
        Some(match index {
            MSR_MCG_CAP => MCG_CAP,
            MSR_MCG_STATUS => self.status,
            MSR_MCG_CTL => self.ctl,
            MSR_MC0_CTL..MSR_MC_END => {
                let k = (index - MSR_MC0_CTL) as usize;
                self.banks[k / 4][k % 4]
            }
            _ => return None,
        })
    }

    /// WRMSR; `Err` where the CPU raises #GP: IA32_MCG_CAP (read-only), a control
    /// register neither all zeros nor all ones, a non-zero MCi_STATUS, an MSR outside
    /// the model.
    pub fn wrmsr(&mut self, index: u32, v: u64) -> Result<(), Refused> {
        let all_or_nothing = v == 0 || v == u64::MAX;
        match index {
            MSR_MCG_STATUS => self.status = v,
            MSR_MCG_CTL if all_or_nothing => self.ctl = v,
            MSR_MC0_CTL..MSR_MC_END => {
                let k = (index - MSR_MC0_CTL) as usize;
                let ok = match k % 4 {
                    0 => all_or_nothing,
                    1 => v == 0,
                    _ => true,
                };
                if !ok {
                    return Err(Refused);
                }
                self.banks[k / 4][k % 4] = v;
            }
            _ => return Err(Refused),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banks_like_a_cpu_without_errors() {
        let mut m = Mca::default();
        assert_eq!(m.rdmsr(MSR_MCG_CAP), Some(0x10a));
        assert_eq!(m.wrmsr(MSR_MCG_CAP, 0), Err(Refused));
        // What Linux does at boot: every bank enabled, its status cleared.
        for i in 0..BANKS as u32 {
            m.wrmsr(MSR_MC0_CTL + 4 * i, u64::MAX).unwrap();
            m.wrmsr(MSR_MC0_CTL + 4 * i + 1, 0).unwrap();
        }
        m.wrmsr(MSR_MCG_CTL, u64::MAX).unwrap();
        assert_eq!(m.rdmsr(MSR_MC0_CTL + 4 * 9), Some(u64::MAX));
        assert_eq!(m.rdmsr(MSR_MCG_CTL), Some(u64::MAX));
        assert_eq!(m.rdmsr(MSR_MC0_CTL + 1), Some(0));
        // A status with bits set, a partial control: #GP; ADDR and MISC keep anything.
        assert_eq!(m.wrmsr(MSR_MC0_CTL + 1, 1 << 63), Err(Refused));
        assert_eq!(m.wrmsr(MSR_MC0_CTL, 0xff), Err(Refused));
        assert_eq!(m.wrmsr(MSR_MCG_CTL, 1), Err(Refused));
        m.wrmsr(MSR_MC0_CTL + 2, 0x1234).unwrap();
        assert_eq!(m.rdmsr(MSR_MC0_CTL + 2), Some(0x1234));
        // Beyond the last bank, and the CMCI controls (no MCG_CMCI_P): #GP.
        assert_eq!(m.rdmsr(MSR_MC0_CTL + 4 * BANKS as u32), None);
        assert_eq!(m.wrmsr(MSR_MC0_CTL + 4 * BANKS as u32, 0), Err(Refused));
        assert!(!is_mca_msr(0x280));
        assert!(is_mca_msr(0x179) && is_mca_msr(0x427) && !is_mca_msr(0x428));
    }
}
