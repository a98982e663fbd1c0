// SPDX-License-Identifier: GPL-2.0

//! The `/dev/rvmm` ioctl ABI: the one definition that the module (compiled by Kbuild
//! with the kernel's flags) and userspace (through cargo) share.
//!
//! Every structure is `#[repr(C)]`, has no implicit padding and is declared through
//! [`abi_struct!`], which also records its C declaration: `uapi/include/linux/rvmm.h`
//! is generated from these tables, and a host test fails when the committed header, a
//! C compiler's view of it, and this crate disagree.
#![no_std]

/// ioctl "magic" of rvmm (unused in the kernel's ioctl-number registry).
pub const RVMM_IOCTL_TYPE: u32 = 0xB9;

/// Version of this ABI. Bumped on any incompatible change.
pub const RVMM_API_VERSION: u32 = 1;

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;
/// Direction bits of an ioctl number (asm-generic encoding, as on x86).
pub const IOC_NONE: u32 = 0;
/// Userspace writes, the kernel reads.
pub const IOC_WRITE: u32 = 1;
/// The kernel writes, userspace reads.
pub const IOC_READ: u32 = 2;

/// Encodes an ioctl number like the kernel's `_IOC`.
pub const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << IOC_DIRSHIFT)
        | (RVMM_IOCTL_TYPE << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}

/// The "nr" field of an ioctl number.
pub const fn ioc_nr(cmd: u32) -> u32 {
    (cmd >> IOC_NRSHIFT) & ((1 << IOC_NRBITS) - 1)
}

/// The "type" field of an ioctl number.
pub const fn ioc_type(cmd: u32) -> u32 {
    (cmd >> IOC_TYPESHIFT) & ((1 << IOC_TYPEBITS) - 1)
}

/// The "size" field of an ioctl number.
pub const fn ioc_size(cmd: u32) -> usize {
    ((cmd >> IOC_SIZESHIFT) & ((1 << IOC_SIZEBITS) - 1)) as usize
}

/// The direction field of an ioctl number.
pub const fn ioc_dir(cmd: u32) -> u32 {
    cmd >> IOC_DIRSHIFT
}

/// One field of a C declaration: C type, name.
pub type CField = (&'static str, &'static str);

/// A structure of the ABI with its C declaration.
pub trait AbiStruct {
    /// `struct <C_NAME>` in the header.
    const C_NAME: &'static str;
    /// Fields in order, with their C types.
    const C_FIELDS: &'static [CField];
    /// Field offsets as Rust lays them out (same order as `C_FIELDS`).
    fn offsets() -> &'static [usize];
}

/// Declares a `#[repr(C)]` ABI structure and records its C declaration.
macro_rules! abi_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident as $cname:literal {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty => $cty:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl AbiStruct for $name {
            const C_NAME: &'static str = $cname;
            const C_FIELDS: &'static [CField] = &[ $( ($cty, stringify!($field)), )* ];
            fn offsets() -> &'static [usize] {
                const OFFSETS: &[usize] = &[ $( core::mem::offset_of!($name, $field), )* ];
                OFFSETS
            }
        }

        // No implicit padding: the sum of the field sizes is the structure size.
        const _: () = assert!(0 $( + core::mem::size_of::<$ty>() )* == core::mem::size_of::<$name>());
    };
}

abi_struct! {
    /// VMX capabilities as the CPU reports them (`RVMM_GET_VMX_CAPS`). Control MSRs are
    /// the "true" ones where IA32_VMX_BASIC[55] says they exist: low 32 bits are the
    /// allowed-0 settings (bits that must be 1), high 32 bits the allowed-1 settings.
    pub struct VmxCaps as "rvmm_vmx_caps" {
        /// IA32_VMX_BASIC.
        pub basic: u64 => "__u64",
        /// (TRUE_)PINBASED_CTLS.
        pub pinbased: u64 => "__u64",
        /// (TRUE_)PROCBASED_CTLS.
        pub procbased: u64 => "__u64",
        /// PROCBASED_CTLS2 (0 when secondary controls are not available).
        pub procbased2: u64 => "__u64",
        /// (TRUE_)EXIT_CTLS.
        pub exit: u64 => "__u64",
        /// (TRUE_)ENTRY_CTLS.
        pub entry: u64 => "__u64",
        /// IA32_VMX_MISC.
        pub misc: u64 => "__u64",
        /// IA32_VMX_EPT_VPID_CAP (0 when absent).
        pub ept_vpid_cap: u64 => "__u64",
        /// IA32_VMX_CR0_FIXED0.
        pub cr0_fixed0: u64 => "__u64",
        /// IA32_VMX_CR0_FIXED1.
        pub cr0_fixed1: u64 => "__u64",
        /// IA32_VMX_CR4_FIXED0.
        pub cr4_fixed0: u64 => "__u64",
        /// IA32_VMX_CR4_FIXED1.
        pub cr4_fixed1: u64 => "__u64",
        /// VMCS revision identifier (IA32_VMX_BASIC[30:0]).
        pub vmcs_revision: u32 => "__u32",
        /// VMCS region size in bytes (IA32_VMX_BASIC[44:32]).
        pub vmcs_size: u32 => "__u32",
    }
}

abi_struct! {
    /// State of VMX operation on the host (`RVMM_GET_STATUS`). Reading it runs a check
    /// on every online CPU: CR4.VMXE must be set in both the register and the kernel's
    /// CR4 shadow, and a VMCS must load, take a VMWRITE, read back and be cleared, with
    /// the CPU's previous current-VMCS pointer restored afterwards.
    pub struct Status as "rvmm_status" {
        /// CPUs online now.
        pub online_cpus: u32 => "__u32",
        /// CPUs on which rvmm holds a reference on the kernel's VMX enable.
        pub vmx_cpus: u32 => "__u32",
        /// CPUs with CR4.VMXE set in the register and in the CR4 shadow.
        pub vmxe_cpus: u32 => "__u32",
        /// CPUs on which the VMCS check passed.
        pub vmcs_ok_cpus: u32 => "__u32",
        /// CPUs on which VMX was already on when rvmm took its reference (KVM had it).
        pub shared_cpus: u32 => "__u32",
        /// CPUs whose current-VMCS pointer was found changed after the check (must be 0).
        pub vmcs_ptr_clobbered: u32 => "__u32",
        /// Sum over the checks of CPUs that had a current VMCS (another user's) loaded.
        pub foreign_vmcs_cpus: u32 => "__u32",
        /// Reserved, zero.
        pub reserved: u32 => "__u32",
    }
}

/// `RVMM_GET_API_VERSION`: returns [`RVMM_API_VERSION`] as the ioctl's value.
pub const RVMM_GET_API_VERSION: u32 = ioc(IOC_NONE, 0x00, 0);
/// `RVMM_GET_VMX_CAPS`: fills a [`VmxCaps`].
pub const RVMM_GET_VMX_CAPS: u32 = ioc(IOC_READ, 0x01, core::mem::size_of::<VmxCaps>());
/// `RVMM_GET_STATUS`: checks VMX on every CPU and fills a [`Status`].
pub const RVMM_GET_STATUS: u32 = ioc(IOC_READ, 0x02, core::mem::size_of::<Status>());

/// Every ioctl of the ABI: C name, number. The header lists them in this order.
pub const IOCTLS: &[(&str, u32, &str)] = &[
    (
        "RVMM_GET_API_VERSION",
        RVMM_GET_API_VERSION,
        "_IO(RVMM_IOCTL_TYPE, 0x00)",
    ),
    (
        "RVMM_GET_VMX_CAPS",
        RVMM_GET_VMX_CAPS,
        "_IOR(RVMM_IOCTL_TYPE, 0x01, struct rvmm_vmx_caps)",
    ),
    (
        "RVMM_GET_STATUS",
        RVMM_GET_STATUS,
        "_IOR(RVMM_IOCTL_TYPE, 0x02, struct rvmm_status)",
    ),
];
