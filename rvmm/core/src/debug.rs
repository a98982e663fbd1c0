// SPDX-License-Identifier: GPL-2.0

//! Debug registers (SDM Vol. 3B, 18.2): which data breakpoints an access hits, for the
//! instructions the host carries out on the guest's behalf (the CPU checks those it
//! runs itself).

/// Pending-debug-exceptions / DR6 bit: an enabled breakpoint matched (bits 3:0 say
/// which).
pub const ENABLED_BREAKPOINT: u64 = 1 << 12;

/// One data access: linear address, length in bytes, and whether it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataAccess {
    /// Linear address.
    pub la: u64,
    /// Bytes.
    pub len: u8,
    /// A write (else a read).
    pub write: bool,
}

/// The breakpoints (bit n for DRn) of DR7 that `accesses` hit: enabled (L or G), a
/// data condition (R/W 01: writes; 11: reads and writes), and the access overlapping
/// the breakpoint's naturally aligned 1, 2, 4 or 8 bytes.
pub fn data_breakpoints_hit(dr7: u64, drs: &[u64; 4], accesses: &[DataAccess]) -> u64 {
    let mut hit = 0;
    for (n, &addr) in drs.iter().enumerate() {
        if dr7 >> (2 * n) & 3 == 0 {
            continue;
        }
        let rw = dr7 >> (16 + 4 * n) & 3;
        let len: u64 = match dr7 >> (18 + 4 * n) & 3 {
            0 => 1,
            1 => 2,
            2 => 8,
            _ => 4,
        };
        let start = addr & !(len - 1);
        let end = start.wrapping_add(len - 1);
        for a in accesses {
            let wanted = match rw {
                1 => a.write,
                3 => true,
                _ => false,
            };
            let last = a.la.wrapping_add(u64::from(a.len.max(1)) - 1);
            // An access that wraps at the top of the address space is two ranges.
            let overlaps = |lo: u64, hi: u64| lo <= end && start <= hi;
            let any = if last < a.la {
                overlaps(a.la, u64::MAX) || overlaps(0, last)
            } else {
                overlaps(a.la, last)
            };
            if wanted && any {
                hit |= 1 << n;
            }
        }
    }
    hit
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: DataAccess = DataAccess {
        la: 0x1002,
        len: 4,
        write: true,
    };

    #[test]
    fn conditions_lengths_and_overlap() {
        // DR0 at 0x1004, write-only, 4 bytes (L0, R/W0 = 01, LEN0 = 11): a 4-byte write
        // at 0x1002 overlaps it; a read does not hit.
        let dr7 = 1 | (0b1101 << 16);
        let drs = [0x1004, 0, 0, 0];
        assert_eq!(data_breakpoints_hit(dr7, &drs, &[W]), 1);
        let r = DataAccess { write: false, ..W };
        assert_eq!(data_breakpoints_hit(dr7, &drs, &[r]), 0);
        // R/W = 11 hits reads too; disabled (no L/G) hits nothing; R/W 00 (execution)
        // and 10 (I/O) are not data breakpoints.
        let rw = 1 | (0b1111 << 16);
        assert_eq!(data_breakpoints_hit(rw, &drs, &[r]), 1);
        assert_eq!(data_breakpoints_hit(0b1111 << 16, &drs, &[W]), 0);
        assert_eq!(data_breakpoints_hit(1 | (0b1100 << 16), &drs, &[W]), 0);
        assert_eq!(data_breakpoints_hit(1 | (0b1110 << 16), &drs, &[W]), 0);
        // LEN is naturally aligned: DR1 = 0x1007 with 8 bytes covers 0x1000..=0x1007;
        // G1 enables it. A write ending at 0x0fff misses.
        let dr7 = (1 << 3) | (0b1001 << 20);
        let drs = [0, 0x1007, 0, 0];
        assert_eq!(data_breakpoints_hit(dr7, &drs, &[W]), 2);
        let below = DataAccess {
            la: 0xffc,
            len: 4,
            write: true,
        };
        assert_eq!(data_breakpoints_hit(dr7, &drs, &[below]), 0);
        // Wrapping at the top of the address space does not overflow.
        let top = DataAccess {
            la: u64::MAX - 1,
            len: 8,
            write: true,
        };
        assert_eq!(data_breakpoints_hit(dr7, &[0, u64::MAX, 0, 0], &[top]), 2);
    }
}
