//! A fixed-size bitmap of allocated offsets, and its byte form.
//!
//! The byte form is the one kube-apiserver stores for its service ranges (Go's `big.Int.Bytes()`):
//! big-endian, without leading zero bytes, bit `i` of the number is offset `i`, so offset 0 is the
//! lowest bit of the last byte. Keeping it means a bitmap can be compared with, or seeded from,
//! upstream's `/registry/ranges/*` data byte for byte.

use std::ops::Range;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("bitmap marks offset {offset}, beyond the range's {size} addresses")]
    BeyondRange { offset: u64, size: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    size: u64,
    count: u64,
}

impl Bitmap {
    pub fn new(size: u64) -> Self {
        let words = usize::try_from(size.div_ceil(64)).unwrap_or(usize::MAX);
        Self {
            words: vec![0; words],
            size,
            count: 0,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Offsets marked.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn free(&self) -> u64 {
        self.size - self.count
    }

    fn index(offset: u64) -> (usize, u64) {
        (
            usize::try_from(offset / 64).unwrap_or(usize::MAX),
            1u64 << (offset % 64),
        )
    }

    pub fn get(&self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        let (w, bit) = Self::index(offset);
        self.words[w] & bit != 0
    }

    /// Marks `offset`; `false` if it was marked already or is out of range.
    pub fn set(&mut self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        let (w, bit) = Self::index(offset);
        if self.words[w] & bit != 0 {
            return false;
        }
        self.words[w] |= bit;
        self.count += 1;
        true
    }

    /// Unmarks `offset`; `false` if it was not marked.
    pub fn clear(&mut self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        let (w, bit) = Self::index(offset);
        if self.words[w] & bit == 0 {
            return false;
        }
        self.words[w] &= !bit;
        self.count -= 1;
        true
    }

    /// Marked offsets in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let base = i as u64 * 64;
            let mut rest = w;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let b = u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                Some(base + b)
            })
        })
    }

    /// The first unmarked offset in `within`, scanning from `start` and wrapping around inside
    /// `within`, a word at a time.
    pub fn first_free(&self, within: Range<u64>, start: u64) -> Option<u64> {
        let within = within.start..within.end.min(self.size);
        if within.is_empty() {
            return None;
        }
        let start = start.clamp(within.start, within.end - 1);
        self.scan(start..within.end)
            .or_else(|| self.scan(within.start..start))
    }

    fn scan(&self, r: Range<u64>) -> Option<u64> {
        let mut off = r.start;
        while off < r.end {
            let (w, _) = Self::index(off);
            let bit = off % 64;
            // Unmarked bits of this word at or above `bit`.
            let free = !self.words[w] & (u64::MAX << bit);
            if free != 0 {
                let found = (off - bit) + u64::from(free.trailing_zeros());
                return (found < r.end).then_some(found);
            }
            off = off - bit + 64;
        }
        None
    }

    /// The byte form: big-endian, no leading zero bytes (empty when nothing is marked).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.words.iter().rev().flat_map(|w| w.to_be_bytes()).collect();
        let leading = out.iter().take_while(|b| **b == 0).count();
        out.drain(..leading);
        out
    }

    /// Reads the byte form for a range of `size` offsets. Marks beyond the range mean the data
    /// belongs to another (larger) range: an error, never silently dropped.
    pub fn from_bytes(size: u64, bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut bm = Self::new(size);
        for (i, byte) in bytes.iter().rev().enumerate() {
            let mut rest = *byte;
            while rest != 0 {
                let b = u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                let offset = i as u64 * 8 + b;
                if offset >= size {
                    return Err(DecodeError::BeyondRange { offset, size });
                }
                bm.set(offset);
            }
        }
        Ok(bm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_clear_count() {
        let mut b = Bitmap::new(100);
        assert!(b.set(0) && b.set(63) && b.set(64) && b.set(99));
        assert!(!b.set(64), "already set");
        assert!(!b.set(100), "out of range");
        assert_eq!((b.count(), b.free()), (4, 96));
        assert_eq!(b.iter().collect::<Vec<_>>(), [0, 63, 64, 99]);
        assert!(b.clear(63) && !b.clear(63));
        assert!(!b.get(63) && b.get(64) && !b.get(1000));
        assert_eq!(b.count(), 3);
    }

    #[test]
    fn byte_form_matches_go_big_int() {
        let mut b = Bitmap::new(20);
        assert_eq!(b.to_bytes(), Vec::<u8>::new());
        b.set(0);
        assert_eq!(b.to_bytes(), [0x01]);
        b.set(9);
        // 2^9 + 2^0 = 0x0201
        assert_eq!(b.to_bytes(), [0x02, 0x01]);
        let mut big = Bitmap::new(1 << 20);
        big.set((1 << 20) - 1);
        let bytes = big.to_bytes();
        assert_eq!(bytes.len(), 131_072, "a full /12 bitmap is 128 KiB");
        assert_eq!(bytes[0], 0x80);
        assert_eq!(Bitmap::from_bytes(1 << 20, &bytes).unwrap(), big);
    }

    #[test]
    fn decoding_rejects_marks_beyond_the_range() {
        assert_eq!(
            Bitmap::from_bytes(8, &[0x01, 0x00]),
            Err(DecodeError::BeyondRange { offset: 8, size: 8 })
        );
        assert_eq!(
            Bitmap::from_bytes(9, &[0x01, 0x00]).map(|b| b.iter().collect::<Vec<_>>()),
            Ok(vec![8])
        );
        // Leading zero bytes are harmless.
        assert_eq!(Bitmap::from_bytes(8, &[0, 0, 0, 0x80]).map(|b| b.count()), Ok(1));
    }

    #[test]
    fn first_free_scans_and_wraps_within_bounds() {
        let mut b = Bitmap::new(200);
        for i in 10..150 {
            b.set(i);
        }
        assert_eq!(b.first_free(10..200, 10), Some(150));
        assert_eq!(b.first_free(10..150, 70), None, "all taken inside the bounds");
        assert_eq!(
            b.first_free(0..150, 70),
            Some(0),
            "wraps to the start of the bounds"
        );
        assert_eq!(
            b.first_free(100..500, 120),
            Some(150),
            "bounds are clipped to the size"
        );
        assert_eq!(b.first_free(5..5, 0), None);
        b.clear(63);
        assert_eq!(b.first_free(10..150, 11), Some(63));
        assert_eq!(b.first_free(10..150, 64), Some(63), "found after wrapping");
    }

    proptest! {
        #[test]
        fn bytes_round_trip(size in 1u64..5000, marks in proptest::collection::vec(0u64..5000, 0..200)) {
            let mut b = Bitmap::new(size);
            for m in &marks {
                b.set(*m);
            }
            let back = Bitmap::from_bytes(size, &b.to_bytes()).unwrap();
            prop_assert_eq!(&back, &b);
            prop_assert_eq!(back.count(), b.iter().count() as u64);
        }

        #[test]
        fn first_free_finds_an_unmarked_offset_in_bounds(
            size in 1u64..1000, marks in proptest::collection::vec(0u64..1000, 0..1000),
            lo in 0u64..1000, len in 0u64..1000, start in 0u64..2000,
        ) {
            let mut b = Bitmap::new(size);
            for m in &marks {
                b.set(*m);
            }
            let within = lo..(lo + len);
            match b.first_free(within.clone(), start) {
                Some(f) => {
                    prop_assert!(within.contains(&f) && f < size);
                    prop_assert!(!b.get(f));
                }
                None => {
                    let hi = within.end.min(size);
                    prop_assert!((within.start..hi).all(|o| b.get(o)));
                }
            }
        }
    }
}
