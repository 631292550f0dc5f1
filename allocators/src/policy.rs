//! One range's bitmap under the allocation policy of KEP-3070 (IPs) and KEP-3668 (ports):
//! dynamic allocations start at a random offset in the upper band and scan (wrapping) through
//! it, falling back to the static band only when the upper band is full; values users choose
//! may be anywhere in the range.

use rand::Rng;

use crate::{
    bitmap::Bitmap,
    range::{NotInRange, Range},
};

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    #[error("range {range} is full")]
    Full { range: String },
    #[error("provided {what} {value} is already allocated")]
    Allocated { what: &'static str, value: String },
    #[error(transparent)]
    NotInRange(#[from] NotInRange),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation<R> {
    range: R,
    bitmap: Bitmap,
}

impl<R: Range> Allocation<R> {
    pub fn new(range: R) -> Self {
        let bitmap = Bitmap::new(range.size());
        Self { range, bitmap }
    }

    /// Takes over a stored bitmap; its size must be the range's (see `crate::stored`).
    pub fn from_bitmap(range: R, bitmap: Bitmap) -> Self {
        debug_assert_eq!(range.size(), bitmap.size());
        Self { range, bitmap }
    }

    pub fn range(&self) -> &R {
        &self.range
    }

    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }

    pub fn used(&self) -> u64 {
        self.bitmap.count()
    }

    pub fn free(&self) -> u64 {
        self.bitmap.free()
    }

    pub fn has(&self, value: R::Value) -> bool {
        self.range.offset_of(value).is_ok_and(|o| self.bitmap.get(o))
    }

    /// Allocates a value the user chose.
    pub fn allocate(&mut self, value: R::Value, what: &'static str) -> Result<(), AllocError> {
        let offset = self.range.offset_of(value)?;
        if self.bitmap.set(offset) {
            Ok(())
        } else {
            Err(AllocError::Allocated {
                what,
                value: value.to_string(),
            })
        }
    }

    /// Allocates a free value: upper band first, at a random start; then the static band.
    pub fn allocate_next(&mut self, rng: &mut impl Rng) -> Result<R::Value, AllocError> {
        let size = self.bitmap.size();
        let band = self.range.static_band().min(size);
        let full = || AllocError::Full {
            range: self.range.to_string(),
        };
        if self.bitmap.free() == 0 {
            return Err(full());
        }
        let pick = |lo: u64, hi: u64, rng: &mut dyn rand::RngCore| {
            if lo < hi {
                self.bitmap.first_free(lo..hi, rng.random_range(lo..hi))
            } else {
                None
            }
        };
        let offset = pick(band, size, rng)
            .or_else(|| pick(0, band, rng))
            .ok_or_else(full)?;
        let value = self.range.value_at(offset).ok_or_else(full)?;
        self.bitmap.set(offset);
        Ok(value)
    }

    /// Releases a value; `false` if it was not allocated (or not in the range).
    pub fn release(&mut self, value: R::Value) -> bool {
        self.range.offset_of(value).is_ok_and(|o| self.bitmap.clear(o))
    }

    /// Allocated values, in range order.
    pub fn values(&self) -> impl Iterator<Item = R::Value> + '_ {
        self.bitmap.iter().filter_map(|o| self.range.value_at(o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::{IpRange, PortRange};
    use proptest::prelude::*;
    use rand::{SeedableRng, rngs::StdRng};
    use std::{collections::HashSet, net::IpAddr};

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn dynamic_allocations_prefer_the_upper_band_until_it_is_full() {
        let r: IpRange = "10.96.0.0/24".parse().unwrap();
        let band = r.static_band();
        let mut a = Allocation::new(r.clone());
        let mut rng = rng();
        let upper = r.size() - band;
        let mut seen = HashSet::new();
        for _ in 0..upper {
            let ip = a.allocate_next(&mut rng).unwrap();
            assert!(
                r.offset_of(ip).unwrap() >= band,
                "{ip} in the static band too early"
            );
            assert!(seen.insert(ip), "{ip} twice");
        }
        for _ in 0..band {
            let ip = a.allocate_next(&mut rng).unwrap();
            assert!(r.offset_of(ip).unwrap() < band);
            assert!(seen.insert(ip));
        }
        assert_eq!(
            a.allocate_next(&mut rng),
            Err(AllocError::Full {
                range: "10.96.0.0/24".into()
            })
        );
        assert_eq!(a.free(), 0);
    }

    #[test]
    fn a_small_range_has_no_band_and_fills_exactly() {
        let r: IpRange = "10.96.0.0/28".parse().unwrap();
        let mut a = Allocation::new(r);
        let mut rng = rng();
        let got: HashSet<IpAddr> = (0..14).map(|_| a.allocate_next(&mut rng).unwrap()).collect();
        assert_eq!(got.len(), 14);
        let err = a.allocate_next(&mut rng).unwrap_err();
        assert_eq!(err.to_string(), "range 10.96.0.0/28 is full");
    }

    #[test]
    fn user_chosen_values_anywhere_in_range_exactly_once() {
        let r: PortRange = "30000-32767".parse().unwrap();
        let mut a = Allocation::new(r);
        assert_eq!(a.allocate(30001, "port"), Ok(()));
        assert_eq!(a.allocate(32767, "port"), Ok(()));
        assert_eq!(
            a.allocate(30001, "port").unwrap_err().to_string(),
            "provided port 30001 is already allocated"
        );
        assert_eq!(
            a.allocate(29999, "port").unwrap_err().to_string(),
            "29999 is not in the range 30000-32767"
        );
        assert!(a.has(30001) && !a.has(30002));
        assert!(a.release(30001) && !a.release(30001) && !a.release(1));
        assert_eq!(a.values().collect::<Vec<_>>(), [32767]);
    }

    #[test]
    fn ports_dynamic_allocation_avoids_the_static_band() {
        let r: PortRange = "30000-32767".parse().unwrap();
        let mut a = Allocation::new(r);
        let mut rng = rng();
        for _ in 0..1000 {
            assert!(a.allocate_next(&mut rng).unwrap() >= 30086);
        }
    }

    proptest! {
        #[test]
        fn never_hands_out_a_value_twice(seed in any::<u64>(), prefix in 24u8..=30, pre in proptest::collection::vec(0u64..256, 0..40)) {
            let r: IpRange = format!("10.0.0.0/{prefix}").parse().unwrap();
            let mut a = Allocation::new(r.clone());
            let mut taken = HashSet::new();
            for o in pre {
                if let Some(ip) = r.value_at(o % r.size()) && a.allocate(ip, "IP").is_ok() {
                    taken.insert(ip);
                }
            }
            let mut rng = StdRng::seed_from_u64(seed);
            loop {
                match a.allocate_next(&mut rng) {
                    Ok(ip) => prop_assert!(taken.insert(ip), "{} handed out twice", ip),
                    Err(AllocError::Full { .. }) => break,
                    Err(e) => prop_assert!(false, "{}", e),
                }
            }
            prop_assert_eq!(taken.len() as u64, r.size());
        }
    }
}
