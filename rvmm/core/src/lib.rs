// SPDX-License-Identifier: GPL-2.0

//! rvmm's logic that needs no ring 0, built into `rvmm.ko` from this same source (with
//! the kernel's rustc flags, see `Kbuild`) and tested on the host with `cargo test`.
//!
//! - [`apic`]: the local APIC model (registers, priorities, timer, IPIs).
//! - [`caps`]: VMX availability and capability MSR decoding, VM-execution control
//!   computation from the allowed-0/allowed-1 settings.
//! - [`mmu`]: the guest page-table walker, shadow entries and the shadow tree.
#![no_std]

pub mod apic;
pub mod caps;
pub mod cpuid;
pub mod debug;
pub mod emulate;
pub mod exit;
pub mod guest_state;
pub mod mca;
pub mod mmu;
pub mod realmode;
