//! The allocation soak (`svcplane_e2e::soak`) at a small size: every failure it stages happens,
//! over a few hundred creates and deletes. `hack/bench/soak.sh` runs it at 10,000.

use svcplane_e2e::soak::{Config, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_holds_through_kills_stops_etcd_restarts_and_refusals() {
    let report = run(Config {
        operations: 400,
        concurrency: 8,
    })
    .await;
    eprintln!("{report}");
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(report.chaos.len(), 7, "{report}");
    assert!(
        report.created > 0 && report.deleted > 0 && report.refused_after_webhook > 0,
        "{report}"
    );
}
