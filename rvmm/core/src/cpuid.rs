// SPDX-License-Identifier: GPL-2.0

//! The CPUID a guest sees: the host's, restricted to what rvmm virtualizes (SDM Vol. 2A,
//! CPUID), and the CR4 bits that follow from it: a feature CPUID hides has its CR4 bit
//! reserved, so that a guest that sets it anyway gets the architectural #GP.

/// What the vCPU offers beyond the host's bits.
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// x87/SSE/AVX state switched with XSAVE (XSAVE, AVX and leaf 0xd shown).
    pub xsave: bool,
    /// The guest's CR4.OSXSAVE.
    pub osxsave: bool,
    /// The guest's XCR0.
    pub xcr0: u64,
    /// XCR0 bits rvmm supports.
    pub xcr0_supported: u64,
    /// An in-kernel local APIC (APIC, x2APIC, TSC-deadline, leaf 0x15).
    pub apic: bool,
    /// The initial APIC ID.
    pub apic_id: u32,
    /// INVPCID exits to rvmm.
    pub invpcid: bool,
    /// The "enable RDTSCP" VM-execution control is on: RDTSCP (and RDPID, where the
    /// host has it) run, reading the guest's IA32_TSC_AUX.
    pub rdtscp: bool,
    /// The TSC (and APIC timer) frequency in kHz.
    pub tsc_khz: u32,
    /// The host's highest basic leaf.
    pub host_max_basic: u32,
}

/// Leaf "time stamp counter and nominal core crystal clock".
pub const TSC_LEAF: u32 = 0x15;

/// CPUID.80000001H:EDX.Page1GB: 1-GiB pages.
pub const EXT_EDX_PAGE1GB: u32 = 1 << 26;

/// Leaf 1 ECX bits hidden: DTES64, MONITOR, DS-CPL, VMX, SMX, EST, TM2, SDBG, xTPR,
/// PDCM, DCA (their instructions exit or their MSRs are not virtualized), x2APIC and
/// TSC-deadline (shown with an APIC), XSAVE, OSXSAVE, AVX (shown with rvmm's XSAVE).
const L1_ECX_HIDDEN: u32 = (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 11)
    | (1 << 14)
    | (1 << 15)
    | (1 << 18)
    | (1 << 21)
    | (1 << 24)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28);
/// Leaf 1 EDX bits hidden: APIC (shown with one), MTRR, PSN, DS, ACPI (thermal), HTT,
/// TM, PBE: their MSRs or registers are not virtualized. (MCE and MCA show: see
/// `crate::mca`.)
const L1_EDX_HIDDEN: u32 =
    (1 << 9) | (1 << 12) | (1 << 18) | (1 << 21) | (1 << 22) | (1 << 28) | (1 << 29) | (1 << 31);
/// Leaf 7 EBX bits shown: FSGSBASE, BMI1, SMEP, BMI2, ERMS, ADX, SMAP.
const L7_EBX_SHOWN: u32 =
    (1 << 0) | (1 << 3) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 19) | (1 << 20);
/// CPUID.(EAX=7,ECX=0):EBX.TSC_ADJUST: IA32_TSC_ADJUST (rvmm emulates it, always).
pub const L7_EBX_TSC_ADJUST: u32 = 1 << 1;
/// CPUID.(EAX=7,ECX=0):ECX.RDPID.
pub const L7_ECX_RDPID: u32 = 1 << 22;
/// CPUID.80000001H:EDX.RDTSCP.
pub const EXT_EDX_RDTSCP: u32 = 1 << 27;

/// The guest's CPUID leaf `leaf`/`sub`, from the host's answer `host` ([eax, ebx, ecx,
/// edx]).
#[inline]
pub fn guest(leaf: u32, sub: u32, host: [u32; 4], c: &Config) -> [u32; 4] {
    let [mut a, mut b, mut cx, mut d] = host;
    if c.apic && leaf <= TSC_LEAF && leaf > c.host_max_basic {
        (a, b, cx, d) = (0, 0, 0, 0);
    }
    match leaf {
        0 if c.apic => a = a.max(TSC_LEAF),
        1 => {
            cx &= !L1_ECX_HIDDEN;
            d &= !L1_EDX_HIDDEN;
            // PCID is the shadow MMU's business (the real CR3 has none): always.
            cx |= 1 << 17;
            if c.xsave {
                cx |= (1 << 26) | (host[2] & (1 << 28));
                if c.osxsave {
                    cx |= 1 << 27;
                }
            }
            if c.apic {
                d |= 1 << 9;
                cx |= (1 << 21) | (1 << 24);
            }
            // "Hypervisor present".
            cx |= 1 << 31;
            // CLFLUSH size kept; one logical processor; the initial APIC ID.
            b = (b & 0xffff) | (1 << 16) | (c.apic_id << 24);
        }
        // Cache parameters: no sharing, one core per package.
        4 => a &= 0x3fff,
        7 if sub == 0 => {
            b = (b & L7_EBX_SHOWN) | L7_EBX_TSC_ADJUST;
            if c.invpcid {
                b |= 1 << 10;
            }
            cx &= if c.rdtscp { L7_ECX_RDPID } else { 0 };
            (a, d) = (0, 0);
        }
        7 => (a, b, cx, d) = (0, 0, 0, 0),
        0xd if c.xsave => {
            // x87, SSE and AVX in the standard format; no XSAVEOPT/XSAVEC/XSAVES.
            let enabled = if c.xcr0 & 4 != 0 { 832 } else { 576 };
            (a, b, cx, d) = match sub {
                0 => (c.xcr0_supported as u32, enabled, 832, 0),
                2 => (256, 576, 0, 0),
                _ => (0, 0, 0, 0),
            };
        }
        TSC_LEAF if c.apic => {
            // TSC / crystal = 1 / 1; the crystal (the APIC timer's input) in Hz.
            (a, b, cx, d) = (1, 1, c.tsc_khz.saturating_mul(1000), 0);
        }
        5 | 6 | 0xa | 0xb | 0xd | 0x1f => (a, b, cx, d) = (0, 0, 0, 0),
        0x4000_0000 => {
            // "rvmmrvmmrvmm"
            a = 0x4000_0000;
            b = u32::from_le_bytes(*b"rvmm");
            cx = b;
            d = b;
        }
        0x8000_0001 if !c.rdtscp => d &= !EXT_EDX_RDTSCP,
        _ => {}
    }
    [a, b, cx, d]
}

/// CR4 bits a guest may set, given the leaves 1 and 7 it sees.
pub fn cr4_allowed(leaf1: [u32; 4], leaf7: [u32; 4]) -> u64 {
    let (ecx1, edx1, ebx7, ecx7) = (leaf1[2], leaf1[3], leaf7[1], leaf7[2]);
    let has = |reg: u32, bit: u32| reg & (1 << bit) != 0;
    let mut m = (1 << 2) | (1 << 8); // TSD, PCE
    for (cr4_bit, present) in [
        (0, has(edx1, 1)),   // VME
        (1, has(edx1, 1)),   // PVI
        (3, has(edx1, 2)),   // DE
        (4, has(edx1, 3)),   // PSE
        (5, has(edx1, 6)),   // PAE
        (6, has(edx1, 7)),   // MCE
        (7, has(edx1, 13)),  // PGE
        (9, has(edx1, 24)),  // OSFXSR
        (10, has(edx1, 25)), // OSXMMEXCPT
        (11, has(ecx7, 2)),  // UMIP
        (16, has(ebx7, 0)),  // FSGSBASE
        (17, has(ecx1, 17)), // PCIDE
        (18, has(ecx1, 26)), // OSXSAVE
        (20, has(ebx7, 7)),  // SMEP
        (21, has(ebx7, 20)), // SMAP
    ] {
        if present {
            m |= 1u64 << cr4_bit;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERYTHING: [u32; 4] = [u32::MAX; 4];

    fn cfg() -> Config {
        Config {
            xsave: true,
            xcr0: 7,
            xcr0_supported: 7,
            host_max_basic: 0xd,
            tsc_khz: 2_000_000,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_hides_what_rvmm_does_not_virtualize() {
        let [_, b, c, d] = guest(1, 0, EVERYTHING, &cfg());
        for bit in [3, 5, 6, 15, 21, 24, 27] {
            assert_eq!(c & (1 << bit), 0, "ECX bit {bit}");
        }
        for bit in [9, 12, 22, 28] {
            assert_eq!(d & (1 << bit), 0, "EDX bit {bit}");
        }
        assert_eq!(d & (1 << 7 | 1 << 14), 1 << 7 | 1 << 14, "MCE and MCA");
        assert_ne!(c & (1 << 17), 0, "PCID");
        assert_ne!(c & (1 << 31), 0, "hypervisor");
        assert_ne!(c & (1 << 26), 0, "XSAVE");
        assert_eq!(b >> 16, 1, "one logical processor, APIC ID 0");
        let osx = guest(
            1,
            0,
            EVERYTHING,
            &Config {
                osxsave: true,
                ..cfg()
            },
        );
        assert_ne!(osx[2] & (1 << 27), 0);
        let no_xsave = guest(
            1,
            0,
            EVERYTHING,
            &Config {
                xsave: false,
                ..cfg()
            },
        );
        assert_eq!(no_xsave[2] & ((1 << 26) | (1 << 28)), 0);
    }

    #[test]
    fn apic_features_and_tsc_leaf() {
        let c = Config {
            apic: true,
            apic_id: 3,
            ..cfg()
        };
        let [_, b, cx, d] = guest(1, 0, EVERYTHING, &c);
        assert_ne!(d & (1 << 9), 0);
        assert_ne!(cx & (1 << 21), 0);
        assert_ne!(cx & (1 << 24), 0);
        assert_eq!(b >> 24, 3);
        assert_eq!(guest(0, 0, [0xd, 0, 0, 0], &c)[0], TSC_LEAF);
        // Leaves between the host's last and 0x15 read as zeros, 0x15 as rvmm's.
        assert_eq!(guest(0x14, 0, EVERYTHING, &c), [0; 4]);
        assert_eq!(guest(TSC_LEAF, 0, EVERYTHING, &c), [1, 1, 2_000_000_000, 0]);
        // Without an APIC, leaf 0 is the host's.
        assert_eq!(guest(0, 0, [0xd, 0, 0, 0], &cfg())[0], 0xd);
    }

    #[test]
    fn cr4_follows_cpuid() {
        let l1 = guest(1, 0, EVERYTHING, &cfg());
        let l7 = guest(7, 0, EVERYTHING, &cfg());
        let m = cr4_allowed(l1, l7);
        // UMIP (leaf 7 ECX hidden), LA57, VMXE, SMXE, PKE: reserved.
        for bit in [11, 12, 13, 14, 22] {
            assert_eq!(m & (1 << bit), 0, "CR4 bit {bit}");
        }
        for bit in [5, 6, 7, 9, 10, 16, 17, 18, 20, 21] {
            assert_ne!(m & (1 << bit), 0, "CR4 bit {bit}");
        }
        let no_smep = cr4_allowed(l1, [0; 4]);
        assert_eq!(no_smep & ((1 << 20) | (1 << 21) | (1 << 16)), 0);
    }

    #[test]
    fn leaf7_and_extended() {
        let l7 = guest(
            7,
            0,
            EVERYTHING,
            &Config {
                invpcid: true,
                ..cfg()
            },
        );
        assert_eq!(l7[1], L7_EBX_SHOWN | L7_EBX_TSC_ADJUST | (1 << 10));
        assert_eq!([l7[0], l7[2], l7[3]], [0, 0, 0]);
        assert_eq!(
            guest(0x8000_0001, 0, EVERYTHING, &cfg())[3] & EXT_EDX_RDTSCP,
            0
        );
        // With the RDTSCP control: RDTSCP, and RDPID where the host has it.
        let on = Config {
            rdtscp: true,
            ..cfg()
        };
        assert_ne!(
            guest(0x8000_0001, 0, EVERYTHING, &on)[3] & EXT_EDX_RDTSCP,
            0
        );
        assert_eq!(guest(7, 0, EVERYTHING, &on)[2], L7_ECX_RDPID);
        assert_eq!(guest(7, 0, [0; 4], &on)[2], 0);
        assert_eq!(guest(4, 0, EVERYTHING, &cfg())[0], 0x3fff);
    }
}
