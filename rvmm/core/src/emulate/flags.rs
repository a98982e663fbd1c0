// SPDX-License-Identifier: GPL-2.0

//! RFLAGS arithmetic: the status flags that ALU results set (SDM Vol. 1, 3.4.3.1 and
//! Appendix A), and condition codes (Vol. 2, Appendix B.1.4).

pub use x86::bits64::rflags::RFlags;

/// The six status flags.
pub const STATUS: RFlags = RFlags::from_bits_truncate(
    RFlags::FLAGS_CF.bits()
        | RFlags::FLAGS_PF.bits()
        | RFlags::FLAGS_AF.bits()
        | RFlags::FLAGS_ZF.bits()
        | RFlags::FLAGS_SF.bits()
        | RFlags::FLAGS_OF.bits(),
);

/// All ones in the low `size` bytes (1, 2, 4 or 8).
pub const fn mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * size as u32)) - 1
    }
}

/// The sign bit of a `size`-byte value.
pub const fn sign(v: u64, size: u8) -> bool {
    let bits = 8 * (if size >= 8 { 8 } else { size }) as u32;
    v >> (bits - 1) & 1 != 0
}

/// Sign-extends the low `size` bytes of `v`.
pub const fn sext(v: u64, size: u8) -> u64 {
    let shift = 64 - 8 * (if size >= 8 { 8 } else { size }) as u32;
    ((v << shift) as i64 >> shift) as u64
}

/// SF, ZF and PF of a `size`-byte result.
pub fn szp(r: u64, size: u8) -> RFlags {
    let r = r & mask(size);
    let mut f = RFlags::empty();
    f.set(RFlags::FLAGS_ZF, r == 0);
    f.set(RFlags::FLAGS_SF, sign(r, size));
    f.set(RFlags::FLAGS_PF, (r as u8).count_ones().is_multiple_of(2));
    f
}

/// ADD/ADC: result and status flags.
pub fn add(a: u64, b: u64, carry: bool, size: u8) -> (u64, RFlags) {
    let m = mask(size);
    let (a, b) = (a & m, b & m);
    let wide = u128::from(a) + u128::from(b) + u128::from(carry);
    let r = wide as u64 & m;
    let mut f = szp(r, size);
    f.set(RFlags::FLAGS_CF, wide > u128::from(m));
    f.set(RFlags::FLAGS_AF, (a ^ b ^ r) & 0x10 != 0);
    f.set(RFlags::FLAGS_OF, sign((a ^ r) & (b ^ r), size));
    (r, f)
}

/// SUB/SBB/CMP (`a - b - borrow`): result and status flags.
pub fn sub(a: u64, b: u64, borrow: bool, size: u8) -> (u64, RFlags) {
    let m = mask(size);
    let (a, b) = (a & m, b & m);
    let r = a.wrapping_sub(b).wrapping_sub(u64::from(borrow)) & m;
    let mut f = szp(r, size);
    f.set(
        RFlags::FLAGS_CF,
        u128::from(a) < u128::from(b) + u128::from(borrow),
    );
    f.set(RFlags::FLAGS_AF, (a ^ b ^ r) & 0x10 != 0);
    f.set(RFlags::FLAGS_OF, sign((a ^ b) & (a ^ r), size));
    (r, f)
}

/// AND/OR/XOR/TEST: CF and OF clear, AF undefined (left clear).
pub fn logic(r: u64, size: u8) -> (u64, RFlags) {
    let r = r & mask(size);
    (r, szp(r, size))
}

/// Condition code `cc` (the low nibble of Jcc/SETcc/CMOVcc) under `f`.
pub fn condition(cc: u8, f: RFlags) -> bool {
    let (cf, zf, sf, of, pf) = (
        f.contains(RFlags::FLAGS_CF),
        f.contains(RFlags::FLAGS_ZF),
        f.contains(RFlags::FLAGS_SF),
        f.contains(RFlags::FLAGS_OF),
        f.contains(RFlags::FLAGS_PF),
    );
    let base = match cc >> 1 {
        0 => of,
        1 => cf,
        2 => zf,
        3 => cf || zf,
        4 => sf,
        5 => pf,
        6 => sf != of,
        _ => zf || sf != of,
    };
    base != (cc & 1 != 0)
}

/// Replaces the flags in `which` of `rflags` by those of `f`.
pub fn merge(rflags: u64, which: RFlags, f: RFlags) -> u64 {
    (rflags & !which.bits()) | (f & which).bits()
}
