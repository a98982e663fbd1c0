// SPDX-License-Identifier: GPL-2.0

//! Guest paging under shadow page tables, the parts that need no ring 0: the guest
//! page-table walker (32-bit, PAE and 4-level paging, SDM Vol. 3A chapter 4), the
//! computation of shadow entries from a walk, and the shadow page pool with its CR3
//! cache (`pool`), which the module runs over memory it allocates once per VM.
//! Faults the guest must see are computed here, with the architectural error code.

pub mod invpcid;
pub mod mode;
pub mod pdptes;
pub mod pool;
pub mod root_hints;
pub mod spte;
pub mod walker;

pub use mode::PagingMode;
pub use walker::{Access, GuestMemory, PermCtx, Walk, WalkFault};
