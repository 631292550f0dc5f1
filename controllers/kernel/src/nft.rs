//! Talks to nf_tables over netlink (no `nft` process): sends a sync's transactions as one batch,
//! which the kernel applies as one transaction or not at all, and names the ops it refused.
//!
//! The kernel handles a batch inside `sendmsg`: when it returns, every error is already queued
//! on the socket. A `GETGEN` sent after it is answered after those errors, so reading up to its
//! answer collects exactly the batch's errors, and gives the generation the ruleset is at.

use std::{fmt, io};

use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_NETFILTER};
use nix::sys::socket::{setsockopt, sockopt};
use svcplane_core::IpFamily;
use svcplane_dataplane::nft::{
    Op, TableId, Transaction,
    op::SetKind,
    readback::{self, Dump},
    table::Table,
    wire::{self, Reply},
};

/// How long a read waits for the kernel's next answer.
const RECEIVE_TIMEOUT_SECS: i64 = 10;

/// Errors of the batch beyond these are counted, not kept.
const KEEP_ERRORS: usize = 32;

pub struct NftSocket {
    socket: Socket,
    seq: u32,
}

/// One op the kernel refused.
#[derive(Debug)]
pub struct Refused {
    pub op: String,
    /// The Service port the op was for, if any.
    pub port: Option<String>,
    pub error: io::Error,
    /// The kernel's own explanation, when it gave one.
    pub detail: Option<String>,
}

/// A batch the kernel refused as a whole (nothing of it applied).
#[derive(Debug)]
pub struct BatchRefused {
    pub refused: Vec<Refused>,
    /// Refusals beyond those kept.
    pub more: usize,
    /// An error about the batch itself (its commit failed, or it could not be sent).
    pub batch: Option<io::Error>,
}

impl fmt::Display for BatchRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the kernel refused the nftables transaction")?;
        if let Some(e) = &self.batch {
            write!(f, ": {e}")?;
        }
        for r in &self.refused {
            write!(f, "; {}", r.op)?;
            if let Some(p) = &r.port {
                write!(f, " (Service port {p})")?;
            }
            write!(f, ": {}", r.error)?;
            if let Some(d) = &r.detail {
                write!(f, " ({d})")?;
            }
        }
        if self.more > 0 {
            write!(f, "; and {} more", self.more)?;
        }
        Ok(())
    }
}

impl std::error::Error for BatchRefused {}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl NftSocket {
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&NlAddr::new(0, 0))?;
        // Errors echo only the failing message's header, and carry the kernel's explanation.
        socket.set_cap_ack(true)?;
        socket.set_ext_ack(true)?;
        // Every answer is queued before `send` returns (the kernel works inside it) or made
        // inside `recv` (dumps), so waiting longer means a lost answer: an error, not a sync
        // loop stopped for ever.
        let limit = nix::sys::time::TimeVal::new(RECEIVE_TIMEOUT_SECS, 0);
        setsockopt(&socket, sockopt::ReceiveTimeout, &limit).map_err(io::Error::from)?;
        Ok(Self { socket, seq: 0 })
    }

    fn next_seq(&mut self, n: usize) -> u32 {
        let first = self.seq.wrapping_add(1);
        self.seq = self.seq.wrapping_add(u32::try_from(n).unwrap_or(u32::MAX));
        first
    }

    /// Makes room for `bytes` in one `sendmsg` (a batch must travel in one) and for `errors`
    /// error replies. The forced sizes need CAP_NET_ADMIN; without it the plain ones, capped by
    /// the sysctls, are the best there is.
    fn size_buffers(&self, bytes: usize, errors: usize) {
        let send = bytes.saturating_add(64 * 1024);
        if setsockopt(&self.socket, sockopt::SndBufForce, &send).is_err() {
            let _ = setsockopt(&self.socket, sockopt::SndBuf, &send);
        }
        let receive = errors.saturating_mul(256).clamp(256 * 1024, 64 << 20);
        if setsockopt(&self.socket, sockopt::RcvBufForce, &receive).is_err() {
            let _ = setsockopt(&self.socket, sockopt::RcvBuf, &receive);
        }
    }

    /// Applies the transactions as one kernel transaction; returns the ruleset's generation
    /// after it.
    pub fn apply(&mut self, transactions: &[Transaction]) -> Result<u32, BatchRefused> {
        self.apply_at(transactions, None)
    }

    /// As [`apply`](Self::apply), but only if the ruleset is still at `generation` (else the
    /// whole batch is refused with `ERESTART`).
    pub fn apply_at(
        &mut self,
        transactions: &[Transaction],
        generation: Option<u32>,
    ) -> Result<u32, BatchRefused> {
        let ops: Vec<(TableId, &Op)> = transactions
            .iter()
            .flat_map(|t| t.ops.iter().map(|op| (t.table, op)))
            .collect();
        let batch = wire::batch(transactions, self.next_seq(ops.len() + 2), generation);
        self.size_buffers(batch.bytes.len(), ops.len());
        let whole = |e: io::Error| BatchRefused {
            refused: vec![],
            more: 0,
            batch: Some(e),
        };
        self.socket.send(&batch.bytes, 0).map_err(whole)?;
        let gen_seq = self.next_seq(1);
        self.socket
            .send(&wire::get_generation(gen_seq), 0)
            .map_err(whole)?;
        let mut refused = BatchRefused {
            refused: vec![],
            more: 0,
            batch: None,
        };
        let mut count = 0;
        let generation = self
            .read_until(gen_seq, |reply| {
                if let Reply::Ack {
                    seq,
                    errno: Some(errno),
                    message,
                } = reply
                {
                    count += 1;
                    let error = io::Error::from_raw_os_error(errno);
                    match batch.op_at(seq) {
                        Some(i) if refused.refused.len() < KEEP_ERRORS => {
                            let op = ops.get(i);
                            refused.refused.push(Refused {
                                op: op
                                    .map_or_else(|| format!("op {i}"), |(t, op)| format!("{op} (table {t})")),
                                port: op.and_then(|(_, o)| o.port()).map(str::to_owned),
                                error,
                                detail: message,
                            });
                        }
                        Some(_) => refused.more += 1,
                        // The batch's own messages: its commit failed.
                        None => refused.batch = Some(error),
                    }
                }
            })
            .map_err(whole)?;
        if count == 0 { Ok(generation) } else { Err(refused) }
    }

    /// Reads replies, handing each to `each`, until the generation answering `seq`.
    fn read_until(&mut self, seq: u32, mut each: impl FnMut(Reply)) -> io::Result<u32> {
        self.receive(|reply| match reply {
            Reply::Generation { seq: s, id } if s == seq => Some(Ok(id)),
            Reply::Ack {
                seq: s,
                errno: Some(e),
                ..
            } if s == seq => Some(Err(io::Error::from_raw_os_error(e))),
            other => {
                each(other);
                None
            }
        })
    }

    /// Reads replies, handing each to `each`, until it returns the outcome.
    fn receive<T>(&mut self, mut each: impl FnMut(Reply) -> Option<io::Result<T>>) -> io::Result<T> {
        // Dumps come in datagrams the size of the reader's buffer: large ones, fewer calls.
        let mut rx = Vec::with_capacity(1 << 20);
        loop {
            rx.clear();
            let n = self.socket.recv(&mut rx, 0).map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer from the kernel within {RECEIVE_TIMEOUT_SECS} s"),
                ),
                _ => e,
            })?;
            for reply in wire::replies(&rx[..n]).map_err(invalid)? {
                if let Some(outcome) = each(reply) {
                    return outcome;
                }
            }
        }
    }

    /// The ruleset's generation: it changes with every committed transaction, of any table.
    pub fn generation(&mut self) -> io::Result<u32> {
        let seq = self.next_seq(1);
        self.socket.send(&wire::get_generation(seq), 0)?;
        self.read_until(seq, |_| {})
    }

    /// Sends a dump request and collects what answers it.
    fn dump(&mut self, request: impl FnOnce(u32) -> Vec<u8>) -> io::Result<Vec<Reply>> {
        let seq = self.next_seq(1);
        self.socket.send(&request(seq), 0)?;
        let mut out = Vec::new();
        self.receive(|reply| match reply {
            Reply::Done { seq: s, interrupted } if s == seq => Some(if interrupted {
                Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "the ruleset changed during the dump",
                ))
            } else {
                Ok(())
            }),
            Reply::Ack {
                seq: s,
                errno: Some(e),
                ..
            } if s == seq => Some(Err(io::Error::from_raw_os_error(e))),
            Reply::Object { seq: s, .. } if s == seq => {
                out.push(reply);
                None
            }
            _ => None,
        })?;
        Ok(out)
    }

    /// svcplane's table `id` of `family` as the kernel holds it, with the generation it was
    /// read at; `None` when there is no such table. Read again when the ruleset changed
    /// meanwhile.
    pub fn read_table(&mut self, family: IpFamily, id: TableId) -> io::Result<Option<(Table, u32)>> {
        let mut last = None;
        for _ in 0..3 {
            match self.read_table_once(family, id) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("the ruleset kept changing")))
    }

    fn read_table_once(&mut self, family: IpFamily, id: TableId) -> io::Result<Option<(Table, u32)>> {
        let before = self.generation()?;
        if !self.has_table(family, id)? {
            return Ok(None);
        }
        let mut table = Table::default();
        for what in [Dump::Chains, Dump::Rules, Dump::Sets] {
            for reply in self.dump(|seq| readback::dump(family, id, what, seq))? {
                if let Reply::Object { message, .. } = reply {
                    readback::absorb(&mut table, family, id, message);
                }
            }
        }
        // Elements of the sets svcplane fills (affinity sets fill from the packet path).
        let filled: Vec<String> = table
            .sets
            .iter()
            .filter(|(_, kind)| kind.is_some_and(|k| !matches!(k, SetKind::Affinity { .. })))
            .map(|(name, _)| name.clone())
            .collect();
        for set in filled {
            for reply in self.dump(|seq| readback::dump_elements(family, id, &set, seq))? {
                if let Reply::Object { message, .. } = reply {
                    readback::absorb(&mut table, family, id, message);
                }
            }
        }
        table.elements.retain(|_, e| !e.is_empty());
        if self.generation()? != before {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the ruleset changed during the read",
            ));
        }
        Ok(Some((table, before)))
    }

    /// Whether svcplane's table `id` of `family` exists.
    pub fn has_table(&mut self, family: IpFamily, id: TableId) -> io::Result<bool> {
        let seq = self.next_seq(1);
        self.socket.send(&wire::get_table(family, id, seq), 0)?;
        let mut found = false;
        self.receive(|reply| match reply {
            Reply::Table { seq: s } if s == seq => {
                found = true;
                None
            }
            Reply::Ack { seq: s, errno, .. } if s == seq => Some(match errno {
                None => Ok(found),
                Some(ENOENT) => Ok(false),
                Some(e) => Err(io::Error::from_raw_os_error(e)),
            }),
            _ => None,
        })
    }
}

/// What the kernel answers for a table that does not exist.
const ENOENT: i32 = 2;
