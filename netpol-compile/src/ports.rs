//! Port ranges as port prefixes.
//!
//! POLICY is an LPM trie whose last 16 key bits are the destination port in network
//! byte order, so a range `port..=endPort` becomes the minimal set of aligned blocks
//! `value/bits` (the top `bits` bits fixed, the rest free), exactly like an address
//! range becomes a set of CIDRs.

/// A block of ports: every port whose top `bits` bits equal those of `value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortPrefix {
    /// First port of the block (its low `16 - bits` bits are zero).
    pub value: u16,
    /// Number of fixed leading bits, 0 (every port) ..= 16 (one port).
    pub bits: u32,
}

impl PortPrefix {
    /// Number of ports in the block (never zero).
    pub fn size(self) -> u32 {
        1 << (16 - self.bits)
    }

    /// Whether `port` lies in the block.
    pub fn contains(self, port: u16) -> bool {
        let shift = 16 - self.bits;
        (u32::from(port) >> shift) == (u32::from(self.value) >> shift)
    }
}

/// The minimal set of port prefixes covering exactly `lo..=hi`, in ascending order.
/// Empty when `lo > hi`.
pub fn port_prefixes(lo: u16, hi: u16) -> Vec<PortPrefix> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        // The largest aligned block starting at `lo` that does not pass `hi`.
        let mut size_log2 = if lo == 0 {
            16
        } else {
            lo.trailing_zeros().min(16)
        };
        while lo + (1 << size_log2) - 1 > hi {
            size_log2 -= 1;
        }
        out.push(PortPrefix {
            value: lo as u16,
            bits: 16 - size_log2,
        });
        lo += 1 << size_log2;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(value: u16, bits: u32) -> PortPrefix {
        PortPrefix { value, bits }
    }

    #[test]
    fn single_port() {
        assert_eq!(port_prefixes(80, 80), [p(80, 16)]);
        assert_eq!(port_prefixes(65535, 65535), [p(65535, 16)]);
        assert_eq!(port_prefixes(0, 0), [p(0, 16)]);
    }

    #[test]
    fn whole_space() {
        assert_eq!(port_prefixes(0, 65535), [p(0, 0)]);
    }

    #[test]
    fn one_to_max() {
        // 1, 2-3, 4-7, ..., 32768-65535: one block per bit.
        let expected: Vec<PortPrefix> = (0..16).map(|i| p(1 << i, 16 - i)).collect();
        assert_eq!(port_prefixes(1, 65535), expected);
    }

    #[test]
    fn aligned_blocks() {
        assert_eq!(port_prefixes(1024, 2047), [p(1024, 6)]);
        assert_eq!(port_prefixes(32768, 65535), [p(32768, 1)]);
        assert_eq!(port_prefixes(0, 32767), [p(0, 1)]);
        assert_eq!(port_prefixes(80, 81), [p(80, 15)]);
        assert_eq!(port_prefixes(81, 82), [p(81, 16), p(82, 16)]);
    }

    #[test]
    fn thousand_to_two_thousand() {
        // 1000 = 0b11_1110_1000: 1000-1007 (/13), 1008-1023 (/12), 1024-2047 would pass
        // 2000, so 1024-1535 (/7), 1536-1791 (/8), 1792-1919 (/9), 1920-1983 (/10),
        // 1984-1999 (/12), 2000 (/16).
        assert_eq!(
            port_prefixes(1000, 2000),
            [
                p(1000, 13),
                p(1008, 12),
                p(1024, 7),
                p(1536, 8),
                p(1792, 9),
                p(1920, 10),
                p(1984, 12),
                p(2000, 16),
            ]
        );
    }

    #[test]
    fn empty_when_reversed() {
        assert!(port_prefixes(81, 80).is_empty());
    }

    #[test]
    fn contains_and_len() {
        assert!(p(1024, 6).contains(1024));
        assert!(p(1024, 6).contains(2047));
        assert!(!p(1024, 6).contains(2048));
        assert!(!p(1024, 6).contains(1023));
        assert_eq!(p(1024, 6).size(), 1024);
        assert!(p(0, 0).contains(65535));
    }

    proptest! {
        #[test]
        fn decomposition_is_exact_and_aligned(a in any::<u16>(), b in any::<u16>(), probe in any::<u16>()) {
            let (lo, hi) = (a.min(b), a.max(b));
            let blocks = port_prefixes(lo, hi);
            // Exact cover, no overlap, blocks aligned.
            let total: u32 = blocks.iter().map(|b| b.size()).sum();
            prop_assert_eq!(total, u32::from(hi) - u32::from(lo) + 1);
            for b in &blocks {
                prop_assert_eq!(u32::from(b.value) % b.size(), 0);
            }
            let covering = blocks.iter().filter(|b| b.contains(probe)).count();
            prop_assert_eq!(covering, usize::from((lo..=hi).contains(&probe)));
            // Minimal: at most two blocks of each size, at most 2 * 16 - 2 in all.
            prop_assert!(blocks.len() <= 30);
            for w in blocks.windows(2) {
                // Two adjacent blocks of the same size that could merge would not be minimal.
                let mergeable = w[0].bits == w[1].bits
                    && w[0].bits > 0
                    && u32::from(w[0].value) % (2 * w[0].size()) == 0;
                prop_assert!(!mergeable, "{:?} not minimal", blocks);
            }
        }
    }
}
