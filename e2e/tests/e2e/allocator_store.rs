//! The etcd-backed range store against the control plane's real etcd: compare-and-swap under
//! concurrent writers, the range-full message, refusal before initialization, a corrupt bitmap
//! that stops allocation instead of being reset, the leader-epoch fence of the leader's own
//! writes, reservations written and removed with the bitmap, and a replica's stale cache.

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use svcplane_allocators::{
    Allocation, IpRange,
    etcd::{ClaimCheck, Done, EpochKey, EtcdOptions, Fence, Op, RangeStore, StoreError, connect},
    reservation::Requester,
};
use svcplane_e2e::control_plane;

async fn client() -> etcd_client::Client {
    let opts = EtcdOptions {
        endpoints: vec![format!("http://127.0.0.1:{}", control_plane().etcd_port)],
        prefix: String::new(),
        ca_file: None,
        cert_file: None,
        key_file: None,
        timeout: Duration::from_secs(5),
    };
    connect(&opts).await.unwrap()
}

fn unique_prefix() -> String {
    format!("/svcplane-test-{:08x}", rand::random::<u32>())
}

fn holds() -> ClaimCheck {
    Arc::new(|| true)
}

/// A leader term of its own under `prefix`, as the repair controller begins one.
async fn term(prefix: &str) -> Fence {
    EpochKey::new(client().await, prefix)
        .begin("test", holds())
        .await
        .unwrap()
}

async fn initialized(client: etcd_client::Client, prefix: &str, cidr: &str) -> Arc<RangeStore<IpRange>> {
    let range: IpRange = cidr.parse().unwrap();
    let store = RangeStore::new(client, prefix, "clusterip", range.clone(), "IP");
    let fence = term(prefix).await;
    assert!(
        store
            .replace(&Allocation::new(range), 0, &fence)
            .await
            .unwrap()
            .is_some()
    );
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_allocating_concurrently_never_share_an_ip() {
    let prefix = unique_prefix();
    let a = initialized(client().await, &prefix, "10.100.0.0/22").await;
    // A second replica: its own connection and cache, the same key.
    let b = RangeStore::new(client().await, &prefix, "clusterip", a.range().clone(), "IP");
    let mut tasks = Vec::new();
    for i in 0..500 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move { store.submit(Op::AllocateNext).await }));
    }
    let mut got = HashSet::new();
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Done::Allocated(ip) => assert!(got.insert(ip), "{ip} handed out twice"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got.len(), 500);
    // What etcd holds is exactly what was handed out.
    let (stored, _) = a.read().await.unwrap().unwrap();
    let in_etcd: HashSet<IpAddr> = stored.values().collect();
    assert_eq!(in_etcd, got);
}

/// Two replicas each keeping 64 allocations in flight for a while: neither starves (a replica
/// that lost every compare-and-swap would fail its requests with a contention error), and every
/// value is handed out once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_under_sustained_load_both_make_progress() {
    use futures::StreamExt;
    let prefix = unique_prefix();
    let a = initialized(client().await, &prefix, "10.101.0.0/20").await;
    let b = RangeStore::new(client().await, &prefix, "clusterip", a.range().clone(), "IP");
    let run = |store: Arc<RangeStore<IpRange>>| async move {
        futures::stream::iter(0..1500)
            .map(|_| {
                let store = store.clone();
                async move { store.submit(Op::AllocateNext).await }
            })
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await
    };
    let (ra, rb) = tokio::join!(run(a.clone()), run(b));
    let mut got = HashSet::new();
    for r in ra.into_iter().chain(rb) {
        match r {
            Ok(Done::Allocated(ip)) => assert!(got.insert(ip), "{ip} handed out twice"),
            other => panic!("a replica failed under contention: {other:?}"),
        }
    }
    let (stored, _) = a.read().await.unwrap().unwrap();
    assert_eq!(stored.values().collect::<HashSet<IpAddr>>(), got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_before_initialization_and_reports_a_full_range() {
    let prefix = unique_prefix();
    let range: IpRange = "10.101.0.0/28".parse().unwrap();
    let store = RangeStore::new(client().await, &prefix, "clusterip", range.clone(), "IP");
    let err = store.submit(Op::AllocateNext).await.unwrap_err();
    assert!(matches!(err, StoreError::NotInitialized { .. }), "{err}");
    let fence = term(&prefix).await;
    assert!(
        store
            .replace(&Allocation::new(range), 0, &fence)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .replace(&Allocation::new("10.101.0.0/28".parse().unwrap()), 0, &fence)
            .await
            .unwrap()
            .is_none(),
        "create-only"
    );
    for _ in 0..14 {
        store.submit(Op::AllocateNext).await.unwrap();
    }
    let err = store.submit(Op::AllocateNext).await.unwrap_err();
    assert_eq!(err.to_string(), "range 10.101.0.0/28 is full");
    let ip: IpAddr = "10.101.0.5".parse().unwrap();
    assert_eq!(
        store.submit(Op::Allocate(ip)).await.unwrap_err().to_string(),
        "provided IP 10.101.0.5 is already allocated"
    );
    assert_eq!(store.submit(Op::Release(ip)).await.unwrap(), Done::Released(true));
    assert_eq!(store.submit(Op::Allocate(ip)).await.unwrap(), Done::Allocated(ip));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_bitmap_stops_allocation_and_is_left_alone() {
    let prefix = unique_prefix();
    let mut raw = client().await;
    let store = initialized(client().await, &prefix, "10.102.0.0/24").await;
    store.submit(Op::AllocateNext).await.unwrap();
    raw.put(store.key(), "not a bitmap", None).await.unwrap();
    // The cached copy is stale now; the next write loses its compare-and-swap and reloads.
    let err = store.submit(Op::AllocateNext).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(store.key()), "{err}");
    let stored = raw.get(store.key(), None).await.unwrap();
    assert_eq!(stored.kvs()[0].value(), b"not a bitmap", "never reset");
    // Another range's data under this key is refused too.
    let other = initialized(client().await, &unique_prefix(), "10.103.0.0/24").await;
    let bytes = svcplane_allocators::stored::encode(&other.read().await.unwrap().unwrap().0);
    raw.put(store.key(), bytes, None).await.unwrap();
    let err = store.submit(Op::AllocateNext).await.unwrap_err();
    assert!(
        err.to_string().contains("belongs to range 10.103.0.0/24"),
        "{err}"
    );
}

/// A deposed leader's repair and release transactions fail once a new term has begun, even when
/// its own claim check still passes (it was paused after the check), and they change nothing; a
/// lapsed claim stops the write before it is sent. Allocations, which every replica's webhook
/// makes, are not fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_terms_writes_fail_and_change_nothing() {
    let prefix = unique_prefix();
    let old_term = term(&prefix).await;
    let range: IpRange = "10.104.0.0/24".parse().unwrap();
    let store = RangeStore::new(client().await, &prefix, "clusterip", range.clone(), "IP");
    store
        .replace(&Allocation::new(range.clone()), 0, &old_term)
        .await
        .unwrap()
        .expect("the first write creates the range");
    let ip: IpAddr = "10.104.0.7".parse().unwrap();
    assert_eq!(store.submit(Op::Allocate(ip)).await.unwrap(), Done::Allocated(ip));
    assert_eq!(
        store.submit_as_leader(Op::Release(ip), &old_term).await.unwrap(),
        Done::Released(true),
        "the current term releases"
    );
    store.submit(Op::Allocate(ip)).await.unwrap();

    // Another replica takes over and begins its term.
    let new_term = EpochKey::new(client().await, &prefix)
        .begin("other", holds())
        .await
        .unwrap();
    let (_, before) = store.read().await.unwrap().unwrap();
    let err = store
        .submit_as_leader(Op::Release(ip), &old_term)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Deposed), "{err}");
    let err = store
        .replace(&Allocation::new(range.clone()), before, &old_term)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Deposed), "{err}");
    let (held, after) = store.read().await.unwrap().unwrap();
    assert_eq!(after, before, "nothing written");
    assert!(held.values().any(|v| v == ip), "{ip} still held");

    // The new term's writes go through; webhook allocations never needed a term.
    assert_eq!(
        store.submit_as_leader(Op::Release(ip), &new_term).await.unwrap(),
        Done::Released(true)
    );
    assert!(matches!(
        store.submit(Op::AllocateNext).await.unwrap(),
        Done::Allocated(_)
    ));

    // The current term, but its claim on the Lease has lapsed: refused before anything is sent.
    let leading = Arc::new(AtomicBool::new(true));
    let flag = leading.clone();
    let lapsing = EpochKey::new(client().await, &prefix)
        .begin("lapsing", Arc::new(move || flag.load(Ordering::SeqCst)))
        .await
        .unwrap();
    store.submit(Op::Allocate(ip)).await.unwrap();
    leading.store(false, Ordering::SeqCst);
    let (_, before) = store.read().await.unwrap().unwrap();
    let err = store
        .submit_as_leader(Op::Release(ip), &lapsing)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Deposed), "{err}");
    assert_eq!(store.read().await.unwrap().unwrap().1, before, "nothing written");
    let refused: ClaimCheck = Arc::new(|| false);
    let err = EpochKey::new(client().await, &prefix)
        .begin("never", refused)
        .await
        .err()
        .expect("a replica that does not lead cannot begin a term");
    assert!(matches!(err, StoreError::Deposed), "{err}");
}

fn web() -> Option<Arc<Requester>> {
    Some(Arc::new(Requester {
        namespace: "ns".into(),
        name: "web".into(),
    }))
}

async fn allocated(store: &RangeStore<IpRange>, op: Op<IpAddr>, requester: Option<Arc<Requester>>) -> IpAddr {
    match store.submit_for(op, requester).await.unwrap() {
        Done::Allocated(ip) => ip,
        other => panic!("{other:?}"),
    }
}

async fn held(store: &RangeStore<IpRange>, ip: IpAddr) -> bool {
    store.read().await.unwrap().unwrap().0.has(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_go_with_the_bitmap_and_end_by_release_confirmation_or_expiry() {
    let prefix = unique_prefix();
    let store = initialized(client().await, &prefix, "10.105.0.0/24").await;
    let fence = term(&prefix).await;

    // Allocated for a request: reserved for it in the same transaction.
    let ip = allocated(&store, Op::AllocateNext, web()).await;
    let listed = store.reservations().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].value, ip);
    let record = listed[0].reservation.clone().expect("a readable record");
    assert_eq!((record.namespace.as_str(), record.name.as_str()), ("ns", "web"));
    assert_eq!(record.value, ip.to_string());
    // Without a requester (the leader's own writes, tests): nothing reserved.
    let plain = allocated(&store, Op::AllocateNext, None).await;
    assert_eq!(store.reservations().await.unwrap().len(), 1);

    // A release (the webhook rolling back a failed request) takes the reservation with it.
    store.submit(Op::Release(ip)).await.unwrap();
    assert!(store.reservations().await.unwrap().is_empty());

    // Confirmed: the record goes, the value stays.
    let ip = allocated(&store, Op::AllocateNext, web()).await;
    let keys: Vec<(String, i64)> = store
        .reservations()
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.key, l.mod_revision))
        .collect();
    store.confirm(&keys, &fence).await.unwrap();
    assert!(store.reservations().await.unwrap().is_empty());
    assert!(held(&store, ip).await);

    // Expired: value and record go together.
    let ip = allocated(&store, Op::AllocateNext, web()).await;
    let listed = store.reservations().await.unwrap().remove(0);
    assert!(store.expire(&listed, &fence).await.unwrap());
    assert!(!held(&store, ip).await);
    assert!(store.reservations().await.unwrap().is_empty());

    // A record rewritten since it was listed (the value freed and handed out again) is left
    // alone, and so is its value.
    let ip = allocated(&store, Op::Allocate(ip), web()).await;
    let stale = store.reservations().await.unwrap().remove(0);
    store.submit(Op::Release(ip)).await.unwrap();
    allocated(&store, Op::Allocate(ip), web()).await;
    assert!(!store.expire(&stale, &fence).await.unwrap());
    assert!(held(&store, ip).await);
    assert_eq!(store.reservations().await.unwrap().len(), 1);
    // Nor does a confirmation computed from the old record remove the new one.
    store
        .confirm(&[(stale.key.clone(), stale.mod_revision)], &fence)
        .await
        .unwrap();
    assert_eq!(store.reservations().await.unwrap().len(), 1);

    // Repair reads both at one revision.
    let (bitmap, reservations) = store.read_with_reservations().await.unwrap();
    let (bitmap, _) = bitmap.unwrap();
    assert!(bitmap.has(ip) && bitmap.has(plain));
    assert_eq!(reservations.iter().map(|l| l.value).collect::<Vec<_>>(), [ip]);

    // A deposed term confirms and expires nothing.
    let _new_term = term(&prefix).await;
    let listed = store.reservations().await.unwrap().remove(0);
    assert!(matches!(
        store.expire(&listed, &fence).await,
        Err(StoreError::Deposed)
    ));
    assert!(matches!(
        store
            .confirm(&[(listed.key.clone(), listed.mod_revision)], &fence)
            .await,
        Err(StoreError::Deposed)
    ));
    assert!(held(&store, ip).await);
    assert_eq!(store.reservations().await.unwrap().len(), 1);
}

/// Many requests at once on one replica: batches stay within etcd's 128 operations per
/// transaction, bitmap and reservation records together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_reserved_allocations_fits_etcds_transaction_limit() {
    let prefix = unique_prefix();
    let store = initialized(client().await, &prefix, "10.106.0.0/22").await;
    let tasks: Vec<_> = (0..400)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.submit_for(Op::AllocateNext, web()).await })
        })
        .collect();
    let mut got = HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(Done::Allocated(ip)) => assert!(got.insert(ip)),
            other => panic!("{other:?}"),
        }
    }
    let reserved: HashSet<IpAddr> = store
        .reservations()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.value)
        .collect();
    assert_eq!(reserved, got);
}

/// A replica decides from its cached bitmap only what etcd then accepts: a release or a
/// user-chosen value that its stale cache calls a no-op or a conflict is decided again from etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cache_neither_loses_a_release_nor_refuses_a_free_value() {
    let prefix = unique_prefix();
    let a = initialized(client().await, &prefix, "10.107.0.0/24").await;
    let b = RangeStore::new(client().await, &prefix, "clusterip", a.range().clone(), "IP");
    let fence = term(&prefix).await;
    // b's cache is taken now; a allocates afterwards.
    allocated(&b, Op::AllocateNext, None).await;
    let ip = allocated(&a, Op::AllocateNext, web()).await;
    // The leader (b) releases what a allocated: not a no-op, though b's cache says it is free.
    assert_eq!(
        b.submit_as_leader(Op::Release(ip), &fence).await.unwrap(),
        Done::Released(true)
    );
    assert!(!held(&a, ip).await);
    // a's cache still has ip taken: a user asking for it exactly gets it.
    assert_eq!(a.submit(Op::Allocate(ip)).await.unwrap(), Done::Allocated(ip));
    // And a value truly taken is still refused, from a fresh read.
    let err = b.submit(Op::Allocate(ip)).await.unwrap_err();
    assert!(err.to_string().contains("already allocated"), "{err}");
}
