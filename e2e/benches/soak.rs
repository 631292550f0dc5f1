//! The allocation soak at size (`hack/bench/soak.sh`): see `svcplane_e2e::soak`. Prints what
//! happened and fails when an invariant broke. Sizes: SOAK_OPERATIONS (10000), SOAK_CONCURRENCY
//! (16).

#![allow(clippy::unwrap_used)]

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let cfg = svcplane_e2e::soak::Config {
        operations: env("SOAK_OPERATIONS", 10_000),
        concurrency: env("SOAK_CONCURRENCY", 16),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(svcplane_e2e::soak::run(cfg));
    println!("{report}");
    if !report.violations.is_empty() {
        std::process::exit(1);
    }
}
