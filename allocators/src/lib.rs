//! ClusterIP and NodePort allocation: range arithmetic, bitmaps, the allocation policy and the
//! stored form, all pure; the etcd-backed store builds on these.

pub mod allocation;
pub mod bitmap;
pub mod etcd;
pub mod range;
pub mod repair;
pub mod stored;

pub use allocation::{AllocError, Allocation};
pub use bitmap::Bitmap;
pub use range::{IpRange, NotInRange, PortRange, Range, RangeError};
