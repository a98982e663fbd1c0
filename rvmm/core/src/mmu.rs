// SPDX-License-Identifier: GPL-2.0

//! Guest paging under shadow page tables, the parts that need no ring 0: the guest
//! page-table walker (32-bit, PAE and 4-level paging, SDM Vol. 3A chapter 4), the
//! computation of shadow entries from a walk, and the shadow tree itself over an
//! abstract page allocator.
//!
//! The first shadow MMU behaves like a TLB: a shadow entry is made from a successful
//! guest walk when a #PF exits, and the shadow is dropped where the architecture lets
//! a TLB entry be dropped (MOV CR3, INVLPG). Faults the guest must see are computed
//! here, with the architectural error code.

pub mod mode;
pub mod pool;
pub mod shadow;
pub mod spte;
pub mod walker;

pub use mode::PagingMode;
pub use walker::{Access, GuestMemory, PermCtx, Walk, WalkFault};
