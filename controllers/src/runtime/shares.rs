//! Gauges that add up per-object figures (endpoints desired, slices, ...): each object's share is
//! replaced or removed as a whole, so the totals stay right however often objects are synced.

use std::{collections::HashMap, sync::Mutex};

use prometheus::IntGauge;

use crate::model::ObjectKey;

pub struct GaugeShares<const N: usize> {
    gauges: [IntGauge; N],
    shares: Mutex<HashMap<ObjectKey, [i64; N]>>,
}

impl<const N: usize> GaugeShares<N> {
    pub fn new(gauges: [IntGauge; N]) -> Self {
        Self {
            gauges,
            shares: Mutex::new(HashMap::new()),
        }
    }

    /// The gauges' current values, in the order given to [`Self::new`].
    pub fn totals(&self) -> [i64; N] {
        self.gauges.each_ref().map(IntGauge::get)
    }

    /// Sets `key`'s share (`None` removes it).
    pub fn set(&self, key: &ObjectKey, figures: Option<[usize; N]>) {
        let now = figures.map(|f| f.map(|n| i64::try_from(n).unwrap_or(i64::MAX)));
        let mut shares = self
            .shares
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = match now {
            Some(v) => shares.insert(key.clone(), v),
            None => shares.remove(key),
        };
        let (old, new) = (before.unwrap_or([0; N]), now.unwrap_or([0; N]));
        for (i, g) in self.gauges.iter().enumerate() {
            g.add(new[i] - old[i]);
        }
    }

    /// Forgets every share (a new leadership term starts from nothing).
    pub fn reset(&self) {
        self.shares
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        for g in &self.gauges {
            g.set(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_are_replaced_whole() {
        let (a, b) = (IntGauge::new("a", "a").unwrap(), IntGauge::new("b", "b").unwrap());
        let s = GaugeShares::new([a.clone(), b.clone()]);
        let (x, y) = (ObjectKey::new("ns", "x"), ObjectKey::new("ns", "y"));
        s.set(&x, Some([10, 1]));
        s.set(&y, Some([5, 2]));
        assert_eq!((a.get(), b.get()), (15, 3));
        s.set(&x, Some([7, 1]));
        assert_eq!((a.get(), b.get()), (12, 3));
        s.set(&y, None);
        s.set(&y, None);
        assert_eq!((a.get(), b.get()), (7, 1));
        s.reset();
        assert_eq!((a.get(), b.get()), (0, 0));
        s.set(&x, Some([1, 1]));
        assert_eq!(
            (a.get(), b.get()),
            (1, 1),
            "a reset share is not subtracted again"
        );
    }
}
