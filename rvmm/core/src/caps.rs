// SPDX-License-Identifier: GPL-2.0

//! VMX capabilities: is VT-x usable, and what may the VMCS controls be?
//!
//! SDM Vol. 3C, 24.6-24.8 and Appendix A: each control MSR reports in its low half the
//! allowed-0 settings (a 1 there means the control must be 1) and in its high half the
//! allowed-1 settings (a 0 there means the control must be 0). When IA32_VMX_BASIC[55]
//! is set, the TRUE_* MSRs report the real allowed-0 settings of the default1 classes.

use bitflags::bitflags;
use x86::msr;

bitflags! {
    /// IA32_FEATURE_CONTROL (MSR 0x3a), the bits that govern VMXON.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct FeatureControl: u64 {
        /// Lock: the MSR is read-only until reset; VMXON #GPs while it is clear.
        const LOCKED = 1 << 0;
        /// VMXON allowed inside SMX operation.
        const VMXON_INSIDE_SMX = 1 << 1;
        /// VMXON allowed outside SMX operation (what a hypervisor needs).
        const VMXON_OUTSIDE_SMX = 1 << 2;
        const _ = !0;
    }
}

/// CPUID.01H:ECX bit that reports VMX.
pub const CPUID_1_ECX_VMX: u32 = 1 << 5;

/// Why VT-x cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxUnavailable {
    /// The CPU does not report VMX (CPUID.01H:ECX[5] = 0): not an Intel VT-x CPU, or an
    /// emulator/hypervisor that does not expose it.
    NoVmx,
    /// IA32_FEATURE_CONTROL could not be read although CPUID reports VMX.
    NoFeatureControl,
    /// The firmware locked IA32_FEATURE_CONTROL with VMX outside SMX disabled.
    DisabledByFirmware,
    /// IA32_FEATURE_CONTROL is not locked: VMXON would fault.
    NotLocked,
}

impl VmxUnavailable {
    /// A sentence a user can act on.
    pub const fn explain(self) -> &'static str {
        match self {
            Self::NoVmx => "the CPU has no VT-x (CPUID.1:ECX.VMX=0); rvmm needs an Intel CPU with VMX, or Bochs with a VMX CPU model",
            Self::NoFeatureControl => "IA32_FEATURE_CONTROL cannot be read although CPUID reports VMX",
            Self::DisabledByFirmware => "VT-x is disabled by the firmware (IA32_FEATURE_CONTROL locked without VMXON outside SMX); enable it in the BIOS/UEFI setup",
            Self::NotLocked => "IA32_FEATURE_CONTROL is not locked, so VMXON would fault; the kernel normally locks it at boot (CONFIG_X86_FEATURE_CONTROL)",
        }
    }

    /// Whether the hardware lacks VT-x (as opposed to having it switched off).
    pub const fn is_absent(self) -> bool {
        matches!(self, Self::NoVmx)
    }
}

/// Decides whether VMX can be used from CPUID.01H:ECX and IA32_FEATURE_CONTROL
/// (`None` when reading the MSR faulted).
pub fn check_vmx(cpuid_1_ecx: u32, feature_control: Option<u64>) -> Result<(), VmxUnavailable> {
    if cpuid_1_ecx & CPUID_1_ECX_VMX == 0 {
        return Err(VmxUnavailable::NoVmx);
    }
    let fc =
        FeatureControl::from_bits_retain(feature_control.ok_or(VmxUnavailable::NoFeatureControl)?);
    if !fc.contains(FeatureControl::LOCKED) {
        return Err(VmxUnavailable::NotLocked);
    }
    if !fc.contains(FeatureControl::VMXON_OUTSIDE_SMX) {
        return Err(VmxUnavailable::DisabledByFirmware);
    }
    Ok(())
}

/// IA32_VMX_BASIC, decoded (SDM Vol. 3D, A.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmxBasic(pub u64);

impl VmxBasic {
    /// VMCS revision identifier, written at the start of the VMXON and VMCS regions.
    pub const fn revision_id(self) -> u32 {
        (self.0 & 0x7fff_ffff) as u32
    }
    /// Bytes the CPU needs for a VMXON or VMCS region (at most 4096).
    pub const fn region_size(self) -> u32 {
        ((self.0 >> 32) & 0x1fff) as u32
    }
    /// Physical addresses of VMX regions are limited to 32 bits.
    pub const fn phys_addr_32bit(self) -> bool {
        self.0 & (1 << 48) != 0
    }
    /// Memory type for VMCS accesses (6 = write-back).
    pub const fn memory_type(self) -> u8 {
        ((self.0 >> 50) & 0xf) as u8
    }
    /// VM exits report INS/OUTS instruction information.
    pub const fn ins_outs_info(self) -> bool {
        self.0 & (1 << 54) != 0
    }
    /// The TRUE_* control MSRs exist.
    pub const fn true_controls(self) -> bool {
        self.0 & (1 << 55) != 0
    }
    /// VM entry may deliver hardware exceptions without an error code check.
    pub const fn no_err_code_check(self) -> bool {
        self.0 & (1 << 56) != 0
    }
}

/// Which control MSR to read for each control class, given IA32_VMX_BASIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlMsrs {
    /// Pin-based controls.
    pub pinbased: u32,
    /// Primary processor-based controls.
    pub procbased: u32,
    /// VM-exit controls.
    pub exit: u32,
    /// VM-entry controls.
    pub entry: u32,
}

impl ControlMsrs {
    /// The TRUE_* MSRs when IA32_VMX_BASIC[55] says they exist, else the legacy ones.
    pub const fn for_basic(basic: VmxBasic) -> Self {
        if basic.true_controls() {
            Self {
                pinbased: msr::IA32_VMX_TRUE_PINBASED_CTLS,
                procbased: msr::IA32_VMX_TRUE_PROCBASED_CTLS,
                exit: msr::IA32_VMX_TRUE_EXIT_CTLS,
                entry: msr::IA32_VMX_TRUE_ENTRY_CTLS,
            }
        } else {
            Self {
                pinbased: msr::IA32_VMX_PINBASED_CTLS,
                procbased: msr::IA32_VMX_PROCBASED_CTLS,
                exit: msr::IA32_VMX_EXIT_CTLS,
                entry: msr::IA32_VMX_ENTRY_CTLS,
            }
        }
    }
}

/// The allowed settings of one control field, from its capability MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowedControls(pub u64);

impl AllowedControls {
    /// Controls that must be 1.
    pub const fn must_be_one(self) -> u32 {
        self.0 as u32
    }
    /// Controls that may be 1.
    pub const fn may_be_one(self) -> u32 {
        (self.0 >> 32) as u32
    }
    /// Whether `bits` may all be set.
    pub const fn supports(self, bits: u32) -> bool {
        bits & !self.may_be_one() == 0
    }

    /// The control value to program: everything required, `required` (error if the CPU
    /// cannot set one of them), and as much of `optional` as the CPU allows.
    pub const fn adjust(self, required: u32, optional: u32) -> Result<u32, ControlError> {
        let missing = required & !self.may_be_one();
        if missing != 0 {
            return Err(ControlError { missing });
        }
        Ok((required | (optional & self.may_be_one())) | self.must_be_one())
    }
}

/// Whether the CPU can virtualize xAPIC accesses the way rvmm uses it: the TPR shadow,
/// and among the secondary controls "virtualize APIC accesses" and APIC-register
/// virtualization (reads served from the virtual-APIC page, writes as APIC-write
/// exits). `procbased` and `procbased2` are the capability MSRs (0 when absent).
pub const fn apic_virtualization(procbased: u64, procbased2: u64) -> bool {
    use x86::vmx::vmcs::control::{PrimaryControls, SecondaryControls};
    AllowedControls(procbased).supports(
        PrimaryControls::USE_TPR_SHADOW.bits() | PrimaryControls::SECONDARY_CONTROLS.bits(),
    ) && AllowedControls(procbased2).supports(
        SecondaryControls::VIRTUALIZE_APIC.bits()
            | SecondaryControls::VIRTUALIZE_APIC_REGISTER.bits(),
    )
}

/// Required VMX controls that the CPU does not support.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlError {
    /// The control bits that were required but may not be 1.
    pub missing: u32,
}

/// Checks a control register value against the VMX fixed-bit MSRs (SDM Vol. 3D, A.7
/// and A.8): bits set in FIXED0 must be 1, bits clear in FIXED1 must be 0. Returns the
/// offending bits: those that must be 1 but are 0, and those that must be 0 but are 1.
pub const fn fixed_bits_violation(value: u64, fixed0: u64, fixed1: u64) -> (u64, u64) {
    (fixed0 & !value, value & !fixed1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn vmx_availability() {
        let fc = (FeatureControl::LOCKED | FeatureControl::VMXON_OUTSIDE_SMX).bits();
        assert_eq!(check_vmx(0, Some(fc)), Err(VmxUnavailable::NoVmx));
        assert_eq!(
            check_vmx(CPUID_1_ECX_VMX, None),
            Err(VmxUnavailable::NoFeatureControl)
        );
        assert_eq!(check_vmx(CPUID_1_ECX_VMX, Some(fc)), Ok(()));
        assert_eq!(
            check_vmx(CPUID_1_ECX_VMX, Some(FeatureControl::LOCKED.bits())),
            Err(VmxUnavailable::DisabledByFirmware)
        );
        assert_eq!(
            check_vmx(
                CPUID_1_ECX_VMX,
                Some(FeatureControl::VMXON_OUTSIDE_SMX.bits())
            ),
            Err(VmxUnavailable::NotLocked)
        );
        // Only inside SMX: still unusable for a hypervisor.
        let smx_only = (FeatureControl::LOCKED | FeatureControl::VMXON_INSIDE_SMX).bits();
        assert_eq!(
            check_vmx(CPUID_1_ECX_VMX | 1, Some(smx_only)),
            Err(VmxUnavailable::DisabledByFirmware)
        );
        assert!(VmxUnavailable::NoVmx.is_absent());
        assert!(!VmxUnavailable::DisabledByFirmware.is_absent());
    }

    #[test]
    fn basic_decoding_bochs_haswell() {
        // IA32_VMX_BASIC as Bochs' corei7_haswell_4770 reports it (shared/PLATFORM.md).
        let b = VmxBasic(0x00d8_1000_0000_002b);
        assert_eq!(b.revision_id(), 0x2b);
        assert_eq!(b.region_size(), 0x1000);
        assert_eq!(b.memory_type(), 6);
        assert!(b.true_controls());
        assert!(b.ins_outs_info());
        assert!(!b.phys_addr_32bit());
        assert!(!b.no_err_code_check());
        assert_eq!(ControlMsrs::for_basic(b).pinbased, 0x48d);
        assert_eq!(ControlMsrs::for_basic(VmxBasic(0)).pinbased, 0x481);
    }

    #[test]
    fn adjust_reports_missing_bits() {
        let caps = AllowedControls(0x0000_00ff_0000_0016);
        assert_eq!(caps.adjust(0x1, 0), Ok(0x17));
        assert_eq!(caps.adjust(0x100, 0), Err(ControlError { missing: 0x100 }));
        assert_eq!(caps.adjust(0, 0xf00), Ok(0x16));
        assert!(caps.supports(0xff));
        assert!(!caps.supports(0x1ff));
    }

    #[test]
    fn apic_virtualization_needs_all_three_controls() {
        // TPR shadow (bit 21) and secondary controls (bit 31) in the primary MSR's
        // allowed-1 half; bits 0 and 8 in the secondary one.
        let primary = (((1u64 << 21) | (1 << 31)) << 32) | 0x16;
        let secondary = ((1u64 << 0) | (1 << 8)) << 32;
        assert!(apic_virtualization(primary, secondary));
        assert!(!apic_virtualization(primary, (1u64 << 8) << 32));
        assert!(!apic_virtualization(primary, 1u64 << 32));
        assert!(!apic_virtualization((1u64 << 31) << 32, secondary));
        assert!(!apic_virtualization(primary, 0));
    }

    #[test]
    fn fixed_bits() {
        // CR0 fixed bits as on typical hardware without unrestricted guest: PE, NE, PG.
        let (f0, f1) = (0x8000_0021, 0xffff_ffff);
        assert_eq!(fixed_bits_violation(0x8000_0031, f0, f1), (0, 0));
        assert_eq!(fixed_bits_violation(0x11, f0, f1), (0x8000_0020, 0));
        assert_eq!(fixed_bits_violation(1 << 40 | f0, f0, f1), (0, 1 << 40));
    }

    proptest! {
        /// The adjusted value honours both halves of the MSR and keeps what was asked.
        #[test]
        fn adjust_respects_allowed_settings(a0 in any::<u32>(), a1 in any::<u32>(), req in any::<u32>(), opt in any::<u32>()) {
            // Architecturally, a bit that must be 1 may be 1.
            let caps = AllowedControls(((a1 | a0) as u64) << 32 | a0 as u64);
            match caps.adjust(req, opt) {
                Ok(v) => {
                    prop_assert_eq!(v & a0, a0);
                    prop_assert_eq!(v & !(a1 | a0), 0);
                    prop_assert_eq!(v & req, req);
                    prop_assert_eq!(v & opt & (a1 | a0), opt & (a1 | a0));
                }
                Err(e) => {
                    prop_assert!(e.missing != 0);
                    prop_assert_eq!(e.missing, req & !(a1 | a0));
                }
            }
        }
    }
}
