// SPDX-License-Identifier: GPL-2.0

//! Indices into the pool's arrays, one type per array, so that a shadow page cannot be
//! taken for a parent link or an rmap node (or for a count): "none" is `None`, not a
//! sentinel value. Each is stored as its index plus one, so that an `Option` of it is
//! as small as the `u32` it replaces (the lists and hashes hold millions of them).

use core::num::NonZeroU32;

macro_rules! index_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name(NonZeroU32);

        impl $name {
            /// Element `i`.
            ///
            /// # Panics
            ///
            /// If `i` is `u32::MAX` (no array of the pool is that long).
            pub const fn new(i: u32) -> Self {
                match NonZeroU32::MIN.checked_add(i) {
                    Some(n) => Self(n),
                    None => panic!("pool index out of range"),
                }
            }

            /// The index, as a `u32`.
            pub const fn get(self) -> u32 {
                self.0.get() - 1
            }

            /// The index into its array.
            pub const fn index(self) -> usize {
                self.get() as usize
            }
        }

        const _: () = assert!(core::mem::size_of::<Option<$name>>() == 4);
    };
}

index_type!(
    /// A shadow page: its metadata in `Pool::sps`, its table in [`super::Tables`].
    SpId
);
index_type!(
    /// A parent-link node in `Pool::links`.
    LinkId
);
index_type!(
    /// An rmap node in `Pool::rmaps`.
    RmapId
);

/// An entry of a shadow table: the sp and the entry's index, packed in 32 bits
/// (`sp << 9 | index`) as the link and rmap nodes keep it (sp indices are below 2^23:
/// the module's pools have at most 65536 pages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct EntryAt(u32);

impl EntryAt {
    /// Entry `index` (below 512) of `sp`'s table.
    pub(super) const fn new(sp: SpId, index: usize) -> Self {
        Self((sp.get() << 9) | index as u32)
    }

    /// The sp whose table holds the entry.
    pub(super) const fn sp(self) -> SpId {
        SpId::new(self.0 >> 9)
    }

    /// The entry's index in the table.
    pub(super) const fn index(self) -> usize {
        (self.0 & 511) as usize
    }
}
