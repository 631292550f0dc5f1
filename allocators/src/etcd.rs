//! Range bitmaps persisted in etcd, changed only by compare-and-swap.
//!
//! Each range is one key. Every change is a single transaction that writes the new bitmap only if
//! the key's `mod_revision` is still the one the change was computed from; otherwise the
//! transaction returns the current value, which is reloaded and the change computed again. No
//! value can be handed out twice, however many replicas allocate at once, because two
//! transactions from the same revision cannot both succeed.
//!
//! Concurrent requests on one replica are committed together: whoever takes the commit lock
//! applies every queued operation to one copy and writes it in one transaction (group commit), so
//! throughput does not collapse into one etcd round trip per allocation.
//!
//! Several replicas committing flat out would starve one of them: the replica that just won learns
//! it first and sends its next transaction before the loser has recomputed, so the loser can lose
//! every round. A commit that follows directly on the same replica's previous one therefore waits
//! a short random time first (also letting more operations join its batch), which hands the next
//! round to a replica that is retrying; a lone commit does not wait.
//!
//! The leader's own writes (repair passes, releases) are fenced ([`Fence`]): each checks this
//! replica's claim on the Lease right before it is sent, and its transaction also compares the
//! leader-epoch key this replica wrote when its term began. A replica deposed while paused
//! between the check and the transaction still fails, because the new leader has written its own
//! epoch by then. Allocations are not leader-only (every replica's webhook allocates) and are not
//! fenced.
//!
//! Values handed out for a request are also recorded as reservations (`reservations/<range>/
//! <offset>`, see [`crate::reservation`]) in the same transaction as the bitmap, and a release
//! deletes the value's reservation in the same way, so the two never disagree.
//!
//! A result computed from this replica's cached bitmap is trusted only when it changed something
//! etcd then accepted: a no-op or a refusal ("already allocated", "full") computed from the cache
//! is computed again from a fresh read, since another replica may have changed the range since.
//!
//! A range whose key does not exist yet is *not* initialised here: only the repair controller,
//! which has compared the bitmap with every existing Service, creates it. Until then allocation
//! is refused. A stored value that does not decode for this range stops allocation with an error
//! and is never overwritten by this module.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex as SyncMutex},
    time::{Duration, Instant},
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions, Txn, TxnOp,
    TxnOpResponse, TxnResponse,
};
use rand::{SeedableRng, rngs::StdRng};
use tokio::sync::{Mutex, oneshot};
use tracing::debug;

use crate::{
    policy::{AllocError, Allocation},
    range::Range,
    reservation::{self, Listed, Requester},
    stored::{self, StoredError},
};

/// How many times a batch is recomputed after losing a compare-and-swap before giving up.
const MAX_CONFLICTS: usize = 32;
/// A commit starting within this of the previous one's end is back-to-back.
const BACK_TO_BACK: Duration = Duration::from_millis(1);
/// Upper bound of the pause before a back-to-back commit: a fraction of one etcd commit (fsync).
const MAX_YIELD: Duration = Duration::from_millis(3);
/// Operations committed in one transaction at most. Each adds up to one reservation write to the
/// bitmap's, and etcd refuses transactions of more than 128 operations (`--max-txn-ops`).
const MAX_BATCH: usize = 100;

#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// `--etcd-servers`
    pub endpoints: Vec<String>,
    /// `--etcd-prefix`: every key svcplane writes lives below it.
    pub prefix: String,
    /// `--etcd-cafile`, `--etcd-certfile`, `--etcd-keyfile`
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Bound on every request, so an unreachable etcd is an error, not a hang.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd is unreachable ({0}); cannot allocate until it is back")]
    Unavailable(String),
    #[error("reading etcd TLS file {path}: {source}")]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "range {range} is not initialized in etcd yet: the repair controller has not reconciled it with existing Services"
    )]
    NotInitialized { range: String },
    #[error(
        "the bitmap of range {range} in etcd is corrupt ({source}); allocation is stopped until an operator repairs or removes key {key}"
    )]
    Corrupt {
        range: String,
        key: String,
        #[source]
        source: StoredError,
    },
    #[error(
        "range {range} is changing too fast ({MAX_CONFLICTS} lost compare-and-swaps in a row); try again"
    )]
    Contention { range: String },
    #[error(
        "this replica no longer leads (its claim on the Lease lapsed, or another leader's term began in etcd); leader-only write not made"
    )]
    Deposed,
    #[error(transparent)]
    Alloc(#[from] AllocError),
}

impl StoreError {
    /// A copy for every request of a batch that failed as a whole.
    fn duplicate(&self) -> Self {
        match self {
            Self::Unavailable(m) => Self::Unavailable(m.clone()),
            Self::TlsFile { path, source } => {
                Self::Unavailable(format!("reading {}: {source}", path.display()))
            }
            Self::NotInitialized { range } => Self::NotInitialized { range: range.clone() },
            Self::Corrupt { range, key, source } => Self::Corrupt {
                range: range.clone(),
                key: key.clone(),
                source: source.clone(),
            },
            Self::Contention { range } => Self::Contention { range: range.clone() },
            Self::Deposed => Self::Deposed,
            Self::Alloc(e) => Self::Alloc(e.clone()),
        }
    }

    /// Whether this names a failure of the store rather than of the request (for metrics).
    pub fn is_store_failure(&self) -> bool {
        !matches!(self, Self::Alloc(_))
    }
}

pub async fn connect(opts: &EtcdOptions) -> Result<Client, StoreError> {
    let mut co = ConnectOptions::new()
        .with_connect_timeout(opts.timeout)
        .with_timeout(opts.timeout);
    if opts.ca_file.is_some() || opts.cert_file.is_some() {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| StoreError::TlsFile {
                path: p.clone(),
                source,
            })
        };
        let mut tls = TlsOptions::new();
        if let Some(ca) = &opts.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&opts.cert_file, &opts.key_file) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        co = co.with_tls(tls);
    }
    Client::connect(&opts.endpoints, Some(co))
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))
}

/// Whether this replica's claim on the Lease holds right now.
pub type ClaimCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// The key naming the current leader term, below `--etcd-prefix`.
#[derive(Clone)]
pub struct EpochKey {
    client: Client,
    key: String,
}

impl EpochKey {
    pub fn new(client: Client, prefix: &str) -> Self {
        Self {
            client,
            key: format!("{}/leader-epoch", prefix.trim_end_matches('/')),
        }
    }

    /// Begins a leader term: writes a value no other term has, so that every earlier term's
    /// fenced transaction fails from now on. Called by a replica that has just acquired the Lease,
    /// its claim checked right before.
    pub async fn begin(&self, identity: &str, claim: ClaimCheck) -> Result<Fence, StoreError> {
        if !claim() {
            return Err(StoreError::Deposed);
        }
        let value = format!("{identity}/{:016x}", rand::random::<u64>()).into_bytes();
        self.client
            .kv_client()
            .put(self.key.as_bytes(), value.clone(), None)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(Fence {
            key: self.key.clone(),
            value,
            claim,
        })
    }
}

/// What the leader's transactions carry: a claim check made right before each is sent, and the
/// epoch of this term, which the transaction compares.
#[derive(Clone)]
pub struct Fence {
    key: String,
    value: Vec<u8>,
    claim: ClaimCheck,
}

impl Fence {
    fn check(&self) -> Result<(), StoreError> {
        if (self.claim)() {
            Ok(())
        } else {
            Err(StoreError::Deposed)
        }
    }

    fn compare(&self) -> Compare {
        Compare::value(self.key.as_bytes(), CompareOp::Equal, self.value.clone())
    }

    fn read_back(&self) -> TxnOp {
        TxnOp::get(self.key.as_bytes(), None)
    }

    /// Whether a failed transaction's read-back shows another term's epoch.
    fn lost(&self, resp: &TxnResponse) -> bool {
        !resp.op_responses().into_iter().any(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .is_some_and(|kv| kv.key() == self.key.as_bytes() && kv.value() == self.value),
            _ => false,
        })
    }
}

/// One change to a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op<V> {
    /// Any free value, by the allocation policy.
    AllocateNext,
    /// This value, chosen by the user.
    Allocate(V),
    Release(V),
}

/// What an operation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Done<V> {
    Allocated(V),
    /// Released; `false` when it was not allocated (nothing written for it).
    Released(bool),
}

/// Applies one operation to an allocation (pure; the store commits the result).
pub fn apply<R: Range>(
    alloc: &mut Allocation<R>,
    op: Op<R::Value>,
    what: &'static str,
    rng: &mut StdRng,
) -> Result<Done<R::Value>, AllocError> {
    match op {
        Op::AllocateNext => alloc.allocate_next(rng).map(Done::Allocated),
        Op::Allocate(v) => alloc.allocate(v, what).map(|()| Done::Allocated(v)),
        Op::Release(v) => Ok(Done::Released(alloc.release(v))),
    }
}

type Reply<V> = oneshot::Sender<Result<Done<V>, StoreError>>;

/// An operation and, for the webhook's, whom what it allocates is reserved for.
#[derive(Clone, Debug)]
pub struct Queued<V> {
    pub op: Op<V>,
    pub requester: Option<Arc<Requester>>,
}

/// An operation waiting for the next commit, with where its result goes.
type Pending<V> = (Queued<V>, Reply<V>);

/// One range's bitmap in etcd.
pub struct RangeStore<R: Range> {
    client: Client,
    key: String,
    /// Prefix of this range's reservation records (ends with `/`).
    reservations: String,
    range: R,
    /// `"IP"` or `"port"`, for messages.
    what: &'static str,
    /// Operations waiting for the next commit.
    queue: SyncMutex<Vec<Pending<R::Value>>>,
    /// Held by the replica's one committer; also guards the cached bitmap and its revision.
    commit: Mutex<Option<(Allocation<R>, i64)>>,
    rng: SyncMutex<StdRng>,
    /// When this replica's last commit ended.
    last_commit: SyncMutex<Option<Instant>>,
}

impl<R> RangeStore<R>
where
    R: Range + Clone + Send + Sync + 'static,
    R::Value: Send + Sync + 'static,
{
    pub fn new(client: Client, prefix: &str, name: &str, range: R, what: &'static str) -> Arc<Self> {
        let prefix = prefix.trim_end_matches('/');
        Arc::new(Self {
            client,
            key: format!("{prefix}/ranges/{name}"),
            reservations: format!("{prefix}/reservations/{name}/"),
            range,
            what,
            queue: SyncMutex::new(Vec::new()),
            commit: Mutex::new(None),
            rng: SyncMutex::new(StdRng::from_os_rng()),
            last_commit: SyncMutex::new(None),
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn range(&self) -> &R {
        &self.range
    }

    /// Where `value`'s reservation is recorded (by its offset in the range).
    pub fn reservation_key(&self, value: R::Value) -> Option<String> {
        let offset = self.range.offset_of(value).ok()?;
        Some(format!("{}{offset}", self.reservations))
    }

    /// The reservations of this range as etcd holds them now.
    pub async fn reservations(&self) -> Result<Vec<Listed<R::Value>>, StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(
                self.reservations.as_bytes(),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(self.listed(resp.kvs()))
    }

    fn listed(&self, kvs: &[etcd_client::KeyValue]) -> Vec<Listed<R::Value>> {
        kvs.iter()
            .filter_map(|kv| {
                let key = String::from_utf8(kv.key().to_vec()).ok()?;
                let offset: u64 = key.strip_prefix(&self.reservations)?.parse().ok()?;
                Some(Listed {
                    value: self.range.value_at(offset)?,
                    key,
                    mod_revision: kv.mod_revision(),
                    reservation: reservation::decode(kv.value()),
                })
            })
            .collect()
    }

    /// Reads the bitmap and the reservations at one revision (for repair, which must not take a
    /// value reserved after its read of the bitmap for a leak, nor miss one reserved before).
    pub async fn read_with_reservations(
        &self,
    ) -> Result<(Option<(Allocation<R>, i64)>, Vec<Listed<R::Value>>), StoreError> {
        let txn = Txn::new().and_then([
            TxnOp::get(self.key.as_bytes(), None),
            TxnOp::get(
                self.reservations.as_bytes(),
                Some(GetOptions::new().with_prefix()),
            ),
        ]);
        let resp = self.txn(txn).await?;
        let mut gets = resp.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let bitmap = match gets
            .next()
            .and_then(|g| g.kvs().first().map(|kv| (kv.value().to_vec(), kv.mod_revision())))
        {
            Some((bytes, rev)) => Some((self.decode(&bytes)?, rev)),
            None => None,
        };
        let listed = gets.next().map(|g| self.listed(g.kvs())).unwrap_or_default();
        Ok((bitmap, listed))
    }

    /// Deletes the records of reservations their Service was seen to hold (leader only, fenced),
    /// each only if it is still the record listed (`listed`: key and mod_revision): a value
    /// freed and reserved again since keeps its new record. Records that changed are left.
    pub async fn confirm(&self, listed: &[(String, i64)], fence: &Fence) -> Result<(), StoreError> {
        let txn = |records: &[(String, i64)]| {
            let mut when = vec![fence.compare()];
            when.extend(
                records
                    .iter()
                    .map(|(k, rev)| Compare::mod_revision(k.as_bytes(), CompareOp::Equal, *rev)),
            );
            Txn::new()
                .when(when)
                .and_then(
                    records
                        .iter()
                        .map(|(k, _)| TxnOp::delete(k.as_bytes(), None))
                        .collect::<Vec<_>>(),
                )
                .or_else([fence.read_back()])
        };
        for chunk in listed.chunks(MAX_BATCH) {
            fence.check()?;
            let resp = self.txn(txn(chunk)).await?;
            if resp.succeeded() {
                continue;
            }
            if fence.lost(&resp) {
                return Err(StoreError::Deposed);
            }
            // Some record changed: the rest one by one.
            for record in chunk {
                fence.check()?;
                let resp = self.txn(txn(std::slice::from_ref(record))).await?;
                if !resp.succeeded() && fence.lost(&resp) {
                    return Err(StoreError::Deposed);
                }
            }
        }
        Ok(())
    }

    /// Frees the value of an expired reservation that no stored Service holds, and deletes the
    /// record, in one transaction fenced by the leader's term; only if the record is still the
    /// one listed (`listed.mod_revision`). `false`: the record changed or went meanwhile, and
    /// nothing was done.
    pub async fn expire(&self, listed: &Listed<R::Value>, fence: &Fence) -> Result<bool, StoreError> {
        let mut guard = self.commit.lock().await;
        for attempt in 0..MAX_CONFLICTS {
            // Always from a fresh read: a free is never computed from a cached bitmap.
            let Some((base, rev)) = self.read().await? else {
                return Err(StoreError::NotInitialized {
                    range: self.range.to_string(),
                });
            };
            let mut next = base.clone();
            next.release(listed.value);
            fence.check()?;
            let mut then = vec![TxnOp::delete(listed.key.as_bytes(), None)];
            if next.bitmap() != base.bitmap() {
                then.push(TxnOp::put(self.key.as_bytes(), stored::encode(&next), None));
            }
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(self.key.as_bytes(), CompareOp::Equal, rev),
                    Compare::mod_revision(listed.key.as_bytes(), CompareOp::Equal, listed.mod_revision),
                    fence.compare(),
                ])
                .and_then(then)
                .or_else([
                    TxnOp::get(self.key.as_bytes(), None),
                    TxnOp::get(listed.key.as_bytes(), None),
                    fence.read_back(),
                ]);
            let resp = self.txn(txn).await?;
            if resp.succeeded() {
                let new_rev = resp.header().map_or(0, |h| h.revision());
                *guard = Some((next, new_rev));
                return Ok(true);
            }
            *guard = None;
            if fence.lost(&resp) {
                return Err(StoreError::Deposed);
            }
            let record_now = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .filter(|kv| kv.key() == listed.key.as_bytes())
                    .map(etcd_client::KeyValue::mod_revision),
                _ => None,
            });
            if record_now != Some(listed.mod_revision) {
                return Ok(false);
            }
            debug!(key = %self.key, attempt, "compare-and-swap lost while expiring a reservation; reloading");
        }
        Err(StoreError::Contention {
            range: self.range.to_string(),
        })
    }

    /// Reads the stored bitmap and its revision; `None` when the key does not exist.
    pub async fn read(&self) -> Result<Option<(Allocation<R>, i64)>, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = kv
            .get(self.key.as_bytes(), None)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => Ok(Some((self.decode(kv.value())?, kv.mod_revision()))),
        }
    }

    fn decode(&self, bytes: &[u8]) -> Result<Allocation<R>, StoreError> {
        stored::decode(bytes, &self.range).map_err(|source| StoreError::Corrupt {
            range: self.range.to_string(),
            key: self.key.clone(),
            source,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.client
            .kv_client()
            .txn(txn)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    /// Writes `alloc` if the key is still at `revision` (0: the key must not exist) and this
    /// replica's leader term is still current. Used by the repair controller, which computed
    /// `alloc` from what it read at `revision`. Returns the new revision, or `None` when someone
    /// else wrote first.
    pub async fn replace(
        &self,
        alloc: &Allocation<R>,
        revision: i64,
        fence: &Fence,
    ) -> Result<Option<i64>, StoreError> {
        let mut guard = self.commit.lock().await;
        fence.check()?;
        let txn = Txn::new()
            .when([
                Compare::mod_revision(self.key.as_bytes(), CompareOp::Equal, revision),
                fence.compare(),
            ])
            .and_then([TxnOp::put(self.key.as_bytes(), stored::encode(alloc), None)])
            .or_else([fence.read_back()]);
        let resp = self.txn(txn).await?;
        if !resp.succeeded() {
            *guard = None;
            if fence.lost(&resp) {
                return Err(StoreError::Deposed);
            }
            return Ok(None);
        }
        let rev = resp.header().map_or(0, |h| h.revision());
        *guard = Some((alloc.clone(), rev));
        Ok(Some(rev))
    }

    /// Applies `op` and commits it, together with whatever else is queued (no reservation).
    pub async fn submit(&self, op: Op<R::Value>) -> Result<Done<R::Value>, StoreError> {
        self.submit_for(op, None).await
    }

    /// Applies `op` and commits it, together with whatever else is queued; what it allocates is
    /// reserved for `requester` in the same transaction.
    pub async fn submit_for(
        &self,
        op: Op<R::Value>,
        requester: Option<Arc<Requester>>,
    ) -> Result<Done<R::Value>, StoreError> {
        let abandoned = |_| Err(StoreError::Unavailable("commit abandoned".into()));
        let (tx, mut rx) = oneshot::channel();
        self.lock_queue().push((Queued { op, requester }, tx));
        // Whoever holds the commit lock commits what is queued, batch after batch until its own
        // operation is done; what remains is left to the next holder. A request whose operation
        // someone else committed returns at once instead of queueing for the lock.
        tokio::select! {
            biased;
            result = &mut rx => return result.unwrap_or_else(abandoned),
            mut guard = self.commit.lock() => loop {
                let batch: Vec<_> = {
                    let mut queue = self.lock_queue();
                    let n = queue.len().min(MAX_BATCH);
                    queue.drain(..n).collect()
                };
                if batch.is_empty() {
                    break;
                }
                if let Some(pause) = self.back_to_back_pause() {
                    tokio::time::sleep(pause).await;
                }
                self.commit_batch(&mut guard, batch).await;
                *self.last_commit.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(Instant::now());
                match rx.try_recv() {
                    Ok(result) => return result,
                    Err(oneshot::error::TryRecvError::Closed) => {
                        return Err(StoreError::Unavailable("commit abandoned".into()));
                    }
                    Err(oneshot::error::TryRecvError::Empty) => {}
                }
            }
        }
        rx.await.unwrap_or_else(abandoned)
    }

    /// Applies `op` for the leader (a release that follows the stored Services), in a transaction
    /// of its own that is fenced by this replica's term.
    pub async fn submit_as_leader(
        &self,
        op: Op<R::Value>,
        fence: &Fence,
    ) -> Result<Done<R::Value>, StoreError> {
        let mut guard = self.commit.lock().await;
        let queued = [Queued { op, requester: None }];
        let results = self.commit_ops(&mut guard, &queued, Some(fence)).await?;
        // One result per operation.
        match results.into_iter().next() {
            Some(result) => result.map_err(StoreError::from),
            None => Err(StoreError::Unavailable("the commit returned no result".into())),
        }
    }

    /// A random pause before a commit that follows directly on this replica's previous one.
    fn back_to_back_pause(&self) -> Option<Duration> {
        let last = *self
            .last_commit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last?.elapsed() > BACK_TO_BACK {
            return None;
        }
        let mut rng = self.rng.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(MAX_YIELD.mul_f64(rand::Rng::random_range(&mut *rng, 0.0..1.0)))
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<Pending<R::Value>>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn commit_batch(&self, cache: &mut Option<(Allocation<R>, i64)>, batch: Vec<Pending<R::Value>>) {
        let (queued, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        match self.commit_ops(cache, &queued, None).await {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result.map_err(StoreError::from));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.duplicate()));
                }
            }
        }
    }

    /// The reservation writes that go with `results` of `queued`: a record for each value
    /// allocated for a requester, a deletion for each value released.
    fn reservation_ops(
        &self,
        queued: &[Queued<R::Value>],
        results: &[Result<Done<R::Value>, AllocError>],
    ) -> Vec<TxnOp> {
        let at_ms = reservation::now_ms();
        queued
            .iter()
            .zip(results)
            .filter_map(|(q, result)| match (result, &q.op, &q.requester) {
                (Ok(Done::Allocated(v)), _, Some(requester)) => {
                    let key = self.reservation_key(*v)?;
                    let record = reservation::encode(&requester.reserve(v, at_ms));
                    Some(TxnOp::put(key.as_bytes(), record, None))
                }
                (Ok(Done::Released(true)), Op::Release(v), _) => {
                    let key = self.reservation_key(*v)?;
                    Some(TxnOp::delete(key.as_bytes(), None))
                }
                _ => None,
            })
            .collect()
    }

    async fn commit_ops(
        &self,
        cache: &mut Option<(Allocation<R>, i64)>,
        queued: &[Queued<R::Value>],
        fence: Option<&Fence>,
    ) -> Result<Vec<Result<Done<R::Value>, AllocError>>, StoreError> {
        for attempt in 0..MAX_CONFLICTS {
            // `fresh`: read from etcd during this call (directly, or as the winner of a lost
            // compare-and-swap), rather than left in the cache by an earlier one.
            let (base, rev, fresh) = match cache.take() {
                Some((a, rev)) => (a, rev, attempt > 0),
                None => {
                    let (a, rev) = self.read().await?.ok_or_else(|| StoreError::NotInitialized {
                        range: self.range.to_string(),
                    })?;
                    (a, rev, true)
                }
            };
            let mut next = base.clone();
            let results: Vec<_> = {
                let mut rng = self.rng.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                queued
                    .iter()
                    .map(|q| apply(&mut next, q.op, self.what, &mut rng))
                    .collect()
            };
            let unchanged = next.bitmap() == base.bitmap();
            if !fresh && (unchanged || results.iter().any(Result::is_err)) {
                // A no-op or a refusal may only reflect how stale the cache is: decide again
                // from what etcd holds now.
                continue;
            }
            if unchanged {
                // Nothing changed (failures, or releases of free values): nothing to write.
                *cache = Some((base, rev));
                return Ok(results);
            }
            let mut when = vec![Compare::mod_revision(self.key.as_bytes(), CompareOp::Equal, rev)];
            let mut or_else = vec![TxnOp::get(self.key.as_bytes(), None)];
            if let Some(fence) = fence {
                fence.check()?;
                when.push(fence.compare());
                or_else.push(fence.read_back());
            }
            let mut then = vec![TxnOp::put(self.key.as_bytes(), stored::encode(&next), None)];
            then.extend(self.reservation_ops(queued, &results));
            let txn = Txn::new().when(when).and_then(then).or_else(or_else);
            let resp = self.txn(txn).await?;
            if resp.succeeded() {
                let new_rev = resp.header().map_or(0, |h| h.revision());
                *cache = Some((next, new_rev));
                return Ok(results);
            }
            if fence.is_some_and(|f| f.lost(&resp)) {
                return Err(StoreError::Deposed);
            }
            // Lost the race: recompute from what won.
            debug!(key = %self.key, attempt, "compare-and-swap lost; reloading");
            let current = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .filter(|kv| kv.key() == self.key.as_bytes())
                    .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
                _ => None,
            });
            *cache = match current {
                Some((bytes, rev)) => Some((self.decode(&bytes)?, rev)),
                None => {
                    return Err(StoreError::NotInitialized {
                        range: self.range.to_string(),
                    });
                }
            };
        }
        Err(StoreError::Contention {
            range: self.range.to_string(),
        })
    }

    /// The bitmap as last committed or read, without a round trip (for metrics and status).
    pub async fn cached(&self) -> Option<Allocation<R>> {
        self.commit.lock().await.as_ref().map(|(a, _)| a.clone())
    }
}
