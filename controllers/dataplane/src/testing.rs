//! Helpers of this crate's tests.

/// A small xorshift: reproducible "random" changes without a dependency.
pub struct Rng(pub u64);

impl Rng {
    /// The next draw, in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}
