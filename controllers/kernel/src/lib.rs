//! The node agent's side of the kernel: sockets that carry what `svcplane-dataplane` computes.
//! Blocking calls (the kernel does its work inside the send); the agent runs them off its
//! async runtime. Kept apart from the pure crate so that it stays testable without a kernel,
//! and shared by the agent and the benchmarks.

pub mod nft;
