//! ClusterIP and NodePort allocation: range arithmetic, bitmaps, and their persistence in etcd.
//!
//! Filled by the allocation work (ClusterIP/NodePort bitmaps, KEP-3070/3668 bands, etcd CAS store).
