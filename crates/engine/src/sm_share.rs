//! Which SM partition an embedder's batches run on for a share of the GPU's SMs: the rule
//! behind `sm_percent` of `/admin/compute-share` (issue 18's run-time lever). An embedder
//! started with `--device cuda --sm-partitions 16,32,64` makes one CUDA green context per
//! size at start (`backend::cuda::lanes`); a share then picks the smallest partition with at
//! least that share of the SMs, and the whole GPU where none is large enough. One rule, used
//! by the CUDA executor and tested here without a GPU.

use serde::{Deserialize, Serialize};

/// The partitions an engine has: the GPU's SMs and each partition's (as the driver made
/// them, rounded up to its granularity), smallest first, no size twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmPartitions {
    /// SMs of the whole GPU (or of the MPS client).
    pub total: u32,
    /// SMs of each partition, ascending.
    pub sizes: Vec<u32>,
}

impl SmPartitions {
    /// The partitions of `sizes` (any order, repeats allowed) on a GPU of `total` SMs; a
    /// size of the whole GPU or more is no partition (the whole GPU is always there).
    pub fn new(total: u32, sizes: impl IntoIterator<Item = u32>) -> Self {
        let mut sizes: Vec<u32> = sizes.into_iter().filter(|&s| s < total).collect();
        sizes.sort_unstable();
        sizes.dedup();
        Self { total, sizes }
    }

    /// The partition for `percent` of the SMs: the index of the smallest with at least
    /// `ceil(percent x total / 100)` SMs; `None` for the whole GPU (no share, 100 or more,
    /// or more SMs than the largest partition has).
    pub fn pick(&self, percent: Option<u32>) -> Option<usize> {
        let p = percent.filter(|p| *p < 100)?;
        let want = (u64::from(p) * u64::from(self.total)).div_ceil(100);
        self.sizes.iter().position(|&s| u64::from(s) >= want)
    }

    /// SMs the kernels may use with `pick` ([`Self::pick`]'s answer).
    pub fn sms(&self, pick: Option<usize>) -> u32 {
        pick.and_then(|i| self.sizes.get(i).copied())
            .unwrap_or(self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h200() -> SmPartitions {
        SmPartitions::new(132, [64, 16, 32, 32, 132, 200])
    }

    #[test]
    fn sizes_are_sorted_without_repeats_or_the_whole_gpu() {
        assert_eq!(h200().sizes, vec![16, 32, 64]);
    }

    #[test]
    fn a_share_picks_the_smallest_partition_with_enough_sms() {
        let p = h200();
        // 132 SMs: 12% is 16 SMs (15.84 rounded up), 13% is 18.
        let cases = [
            (None, None, 132),
            (Some(1), Some(0), 16),
            (Some(12), Some(0), 16),
            (Some(13), Some(1), 32),
            (Some(24), Some(1), 32),
            (Some(25), Some(2), 64),
            (Some(48), Some(2), 64),
            (Some(49), None, 132),
            (Some(99), None, 132),
            (Some(100), None, 132),
            (Some(150), None, 132),
        ];
        for (percent, pick, sms) in cases {
            assert_eq!(p.pick(percent), pick, "{percent:?}");
            assert_eq!(p.sms(p.pick(percent)), sms, "{percent:?}");
        }
    }

    #[test]
    fn without_partitions_every_share_is_the_whole_gpu() {
        let p = SmPartitions::new(132, []);
        assert_eq!(p.pick(Some(10)), None);
        assert_eq!(p.sms(None), 132);
    }

    proptest! {
        /// More share never means fewer SMs, and the SMs picked cover the share unless
        /// the whole GPU is what it gets.
        #[test]
        fn the_pick_is_monotone_and_covers_the_share(
            total in 8u32..256,
            sizes in proptest::collection::vec(1u32..300, 0..6),
            a in 1u32..=100,
            b in 1u32..=100,
        ) {
            let p = SmPartitions::new(total, sizes);
            let (lo, hi) = (a.min(b), a.max(b));
            prop_assert!(p.sms(p.pick(Some(lo))) <= p.sms(p.pick(Some(hi))));
            let sms = p.sms(p.pick(Some(lo)));
            prop_assert!(u64::from(sms) * 100 >= u64::from(lo) * u64::from(total) || sms == total);
        }
    }
}
