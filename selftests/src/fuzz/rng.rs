// SPDX-License-Identifier: GPL-2.0

//! The fuzzer's random numbers: xoshiro256** seeded through SplitMix64. Every stream
//! (a worker thread, a forked child, the kicker) is derived from the run's seed and its
//! index, so that the operations a seed makes are reproducible.

/// SplitMix64 (Steele, Lea, Flood): one step.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of stream `index` of a run seeded with `seed`.
pub fn stream_seed(seed: u64, index: u64) -> u64 {
    let mut s = seed ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03);
    splitmix64(&mut s)
}

/// xoshiro256** (Blackman, Vigna).
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let mut s = [0u64; 4];
        for x in &mut s {
            *x = splitmix64(&mut sm);
        }
        if s == [0; 4] {
            s[0] = 1;
        }
        Self { s }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    pub fn u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    pub fn u16(&mut self) -> u16 {
        (self.next_u64() >> 48) as u16
    }

    pub fn u8(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `0..n` as a usize.
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `pct`/100.
    pub fn pct(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    pub fn bool(&mut self) -> bool {
        self.next_u64() & 1 != 0
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.index(xs.len())]
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// A new independent stream (for a thread or a forked child).
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }

    /// A value that often sits on a boundary: 0, all ones, sign bits, powers of two,
    /// small numbers, or anything.
    pub fn interesting_u64(&mut self) -> u64 {
        match self.below(10) {
            0 => 0,
            1 => u64::MAX,
            2 => self.pick(&[
                1,
                0x7f,
                0x80,
                0xff,
                0xffff,
                0x7fff_ffff,
                0x8000_0000,
                0xffff_ffff,
                0x1_0000_0000,
                0x7fff_ffff_ffff_ffff,
                0x8000_0000_0000_0000,
                0x0000_8000_0000_0000,
                0xffff_8000_0000_0000,
            ]),
            3 => 1u64 << self.below(64),
            4 => !(1u64 << self.below(64)),
            5 => self.below(64),
            6 => (1u64 << self.below(64)).wrapping_sub(1),
            _ => self.next_u64(),
        }
    }

    pub fn interesting_u32(&mut self) -> u32 {
        match self.below(8) {
            0 => 0,
            1 => u32::MAX,
            2 => self.pick(&[
                1,
                2,
                7,
                8,
                9,
                15,
                16,
                17,
                31,
                32,
                63,
                64,
                65,
                255,
                256,
                0x8000_0000,
            ]),
            3 => 1u32 << self.below(32),
            _ => self.u32(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_value() {
        // First output of SplitMix64 seeded with 0 (Vigna's reference implementation).
        let mut s = 0;
        assert_eq!(splitmix64(&mut s), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn same_seed_same_stream() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut c = Rng::new(43);
        assert_ne!(Rng::new(42).next_u64(), c.next_u64());
        assert_ne!(stream_seed(7, 1), stream_seed(7, 2));
        assert_eq!(stream_seed(7, 1), stream_seed(7, 1));
    }

    #[test]
    fn bounds_hold() {
        let mut r = Rng::new(1);
        let mut seen = [false; 10];
        for _ in 0..10_000 {
            let v = r.below(10);
            assert!(v < 10);
            seen[v as usize] = true;
            let w = r.range(5, 7);
            assert!((5..=7).contains(&w));
        }
        assert!(seen.iter().all(|&s| s), "below(10) misses values");
        assert_eq!(r.below(0), 0);
        assert_eq!(r.range(3, 3), 3);
        let mut buf = [0u8; 13];
        r.fill(&mut buf);
        assert!(buf.iter().any(|&b| b != 0));
    }

    #[test]
    fn pct_is_roughly_right() {
        let mut r = Rng::new(99);
        let hits = (0..10_000).filter(|_| r.pct(30)).count();
        assert!((2500..3500).contains(&hits), "{hits} hits of 10000 at 30%");
    }
}
