//! The GTM client library (used by CNs, cm_agent, the CLI and the bench): finds the
//! primary among the pair's endpoints and follows it across failovers, streams
//! concurrent GXID requests to it over one long-lived stream (`gxid_stream`), and
//! probes/orders single instances.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ha_common::proto::gtm as pb;
use pb::gtm_client::GtmClient as RawClient;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

pub use crate::decisions::Decision;
use crate::gxid_stream::{self, Method, Request};
use crate::replication::lazy_channel;
use crate::server::NODE_HEADER;

pub(crate) const NO_PRIMARY: usize = usize::MAX;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("no GTM endpoints given")]
    NoEndpoints,
    #[error("bad GTM endpoint {0:?}: {1}")]
    BadEndpoint(String, String),
    #[error("unknown GTM endpoint {0:?} (not one this client was created with)")]
    UnknownEndpoint(String),
    #[error("no GTM primary found among {endpoints} within {waited_ms} ms: {last}")]
    NoPrimary {
        endpoints: String,
        waited_ms: u64,
        last: String,
    },
    #[error("GTM {endpoint}: {message} ({code:?})")]
    Rpc {
        endpoint: String,
        code: tonic::Code,
        message: String,
    },
    #[error("GTM answered an inconsistent reply: {0}")]
    BadReply(String),
    #[error("GTM client is shut down")]
    Closed,
}

impl ClientError {
    /// The gRPC code the GTM answered, if it answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Tuning of a [`GtmClient`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Messages in flight at once on the GXID stream (the window): callers that
    /// arrive while it is full are merged into the next message.
    pub max_in_flight: usize,
    /// How long a call keeps looking for a primary (across a failover) before failing.
    pub failover_timeout: Duration,
    /// Upper bound of one RPC (a reservation may wait the GTM's sync timeout).
    pub rpc_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            max_in_flight: DEFAULT_WINDOW,
            failover_timeout: Duration::from_secs(10),
            rpc_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_millis(500),
        }
    }
}

/// Default of [`ClientOptions::max_in_flight`].
pub const DEFAULT_WINDOW: usize = 8;

pub(crate) struct Inner {
    pub(crate) endpoints: Vec<String>,
    clients: Vec<RawClient<Channel>>,
    /// Index of the endpoint believed to be primary, or NO_PRIMARY.
    pub(crate) primary: AtomicUsize,
    /// The highest term a GXID answer carried: an answer of a lower term comes from a
    /// deposed primary and is not used.
    pub(crate) max_term: AtomicU64,
    pub(crate) opts: ClientOptions,
}

/// A handle to the GTM pair; cheap to clone (clones share connections and streams).
#[derive(Clone)]
pub struct GtmClient {
    inner: Arc<Inner>,
    gxids: mpsc::UnboundedSender<Request>,
    /// The no-op stream, opened on first use (the bench's ceiling).
    pings: Arc<OnceLock<mpsc::UnboundedSender<Request>>>,
}

impl GtmClient {
    /// Connects lazily to `endpoints` (`host:port`) and looks for the primary once; an
    /// unreachable pair is not an error here, calls retry until `failover_timeout`.
    pub async fn connect(endpoints: Vec<String>) -> Result<GtmClient, ClientError> {
        Self::connect_with(endpoints, ClientOptions::default()).await
    }

    pub async fn connect_with(
        endpoints: Vec<String>,
        opts: ClientOptions,
    ) -> Result<GtmClient, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let mut clients = Vec::with_capacity(endpoints.len());
        for e in &endpoints {
            let ch = lazy_channel(e, opts.connect_timeout)
                .map_err(|err| ClientError::BadEndpoint(e.clone(), err.to_string()))?;
            clients.push(RawClient::new(ch));
        }
        let inner = Arc::new(Inner {
            endpoints,
            clients,
            primary: AtomicUsize::new(NO_PRIMARY),
            max_term: AtomicU64::new(0),
            opts,
        });
        let _ = inner.discover().await;
        let (gxids, rx) = mpsc::unbounded_channel();
        tokio::spawn(gxid_stream::drive(inner.clone(), Method::Gxid, rx));
        Ok(GtmClient {
            inner,
            gxids,
            pings: Arc::default(),
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// The endpoint currently believed to be primary.
    pub fn primary(&self) -> Option<String> {
        let i = self.inner.primary.load(Ordering::Relaxed);
        self.inner.endpoints.get(i).cloned()
    }

    /// `count` contiguous GXIDs `[first, first + count)` over the client's stream:
    /// concurrent calls are merged into one message.
    pub async fn next_gxid(&self, count: u64) -> Result<Range<u64>, ClientError> {
        check_count(count)?;
        let (tx, rx) = oneshot::channel();
        self.gxids
            .send((count, tx))
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// The same with one NextGxid RPC of its own (tools that ask once: `gtm next`).
    pub async fn next_gxid_unary(&self, count: u64) -> Result<Range<u64>, ClientError> {
        check_count(count)?;
        let r = self
            .inner
            .call_primary(
                move |mut c| async move { c.next_gxid(pb::NextGxidRequest { count }).await },
            )
            .await?;
        if r.count != count || r.first.checked_add(count).is_none() {
            return Err(ClientError::BadReply(format!(
                "asked for {count} GXIDs, got {} at {}",
                r.count, r.first
            )));
        }
        if let Err(seen) = gxid_stream::fence(&self.inner.max_term, r.term) {
            return Err(ClientError::Rpc {
                endpoint: self.primary().unwrap_or_default(),
                code: tonic::Code::FailedPrecondition,
                message: format!(
                    "not primary: answered in term {}, after term {seen}",
                    r.term
                ),
            });
        }
        Ok(r.first..r.first + count)
    }

    /// The no-op over the same stream machinery as [`GtmClient::next_gxid`] (the
    /// bench's ceiling): the answer is `0..count`.
    pub async fn ping(&self, count: u64) -> Result<Range<u64>, ClientError> {
        check_count(count)?;
        let pings = self.pings.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(gxid_stream::drive(self.inner.clone(), Method::Ping, rx));
            tx
        });
        let (tx, rx) = oneshot::channel();
        pings.send((count, tx)).map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// The no-op as one unary RPC to the primary.
    pub async fn ping_unary(&self, count: u64) -> Result<u64, ClientError> {
        let r = self
            .inner
            .call_primary(move |mut c| async move { c.ping(pb::NextGxidRequest { count }).await })
            .await?;
        Ok(r.count)
    }

    /// Records a 2PC decision (idempotent; a conflicting one is ALREADY_EXISTS).
    pub async fn record_decision(&self, gxid: u64, decision: Decision) -> Result<(), ClientError> {
        let d = crate::node::decision_to_pb(decision) as i32;
        self.inner
            .call_primary(move |mut c| async move {
                c.record_decision(pb::RecordDecisionRequest { gxid, decision: d })
                    .await
            })
            .await
            .map(|_| ())
    }

    /// The recorded decision of `gxid`, if any.
    pub async fn get_decision(&self, gxid: u64) -> Result<Option<Decision>, ClientError> {
        let r = self
            .inner
            .call_primary(move |mut c| async move {
                c.get_decision(pb::GetDecisionRequest { gxid }).await
            })
            .await?;
        Ok(match pb::Decision::try_from(r.decision) {
            Ok(pb::Decision::Commit) => Some(Decision::Commit),
            Ok(pb::Decision::Abort) => Some(Decision::Abort),
            _ => None,
        })
    }

    /// Probes one instance (for cm_agent and `gtm status`); bounded by the RPC timeout.
    pub async fn status(&self, endpoint: &str) -> Result<pb::GtmStatus, ClientError> {
        self.call_one(endpoint, |mut c| async move {
            c.status(pb::StatusRequest {}).await
        })
        .await
    }

    /// Probes every instance concurrently, in endpoint order.
    pub async fn status_all(&self) -> Vec<(String, Result<pb::GtmStatus, ClientError>)> {
        let futs = self
            .inner
            .endpoints
            .iter()
            .map(|e| async move { (e.clone(), self.status(e).await) });
        futures::future::join_all(futs).await
    }

    /// Promotes the standby at `endpoint`; `term` 0 = its own term + 1.
    pub async fn promote(&self, endpoint: &str, term: u64) -> Result<pb::GtmStatus, ClientError> {
        self.promote_with(endpoint, term, false).await
    }

    /// Promotes, optionally ordering the new primary to run without a standby.
    pub async fn promote_with(
        &self,
        endpoint: &str,
        term: u64,
        run_alone: bool,
    ) -> Result<pb::GtmStatus, ClientError> {
        let s = self
            .call_one(endpoint, move |mut c| async move {
                c.promote(pb::PromoteRequest { term, run_alone }).await
            })
            .await?;
        if let Some(i) = self.inner.endpoints.iter().position(|e| e == endpoint) {
            self.inner.primary.store(i, Ordering::Relaxed);
        }
        Ok(s)
    }

    pub async fn demote(&self, endpoint: &str, term: u64) -> Result<pb::GtmStatus, ClientError> {
        self.call_one(endpoint, move |mut c| async move {
            c.demote(pb::DemoteRequest { term }).await
        })
        .await
    }

    pub async fn set_run_alone(
        &self,
        endpoint: &str,
        term: u64,
        run_alone: bool,
    ) -> Result<pb::GtmStatus, ClientError> {
        self.call_one(endpoint, move |mut c| async move {
            c.set_run_alone(pb::SetRunAloneRequest { term, run_alone })
                .await
        })
        .await
    }

    async fn call_one<T, F, Fut>(&self, endpoint: &str, op: F) -> Result<T, ClientError>
    where
        F: FnOnce(RawClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let i = self
            .inner
            .endpoints
            .iter()
            .position(|e| e == endpoint)
            .ok_or_else(|| ClientError::UnknownEndpoint(endpoint.to_owned()))?;
        self.inner.call_at(i, op).await
    }
}

fn check_count(count: u64) -> Result<(), ClientError> {
    if count == 0 || count > crate::node::MAX_GXIDS_PER_REQUEST {
        return Err(ClientError::Rpc {
            endpoint: String::new(),
            code: tonic::Code::InvalidArgument,
            message: format!(
                "count must be between 1 and {}, got {count}",
                crate::node::MAX_GXIDS_PER_REQUEST
            ),
        });
    }
    Ok(())
}

/// Whether an error means "try another endpoint": the GTM said it is not primary, or
/// it could not be reached at all (no GTM metadata on the status).
pub(crate) fn is_failover(s: &tonic::Status) -> bool {
    let from_gtm = s.metadata().get(NODE_HEADER).is_some();
    if from_gtm {
        return s.code() == tonic::Code::FailedPrecondition
            && s.message().starts_with("not primary");
    }
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}

impl Inner {
    async fn call_at<T, F, Fut>(&self, i: usize, op: F) -> Result<T, ClientError>
    where
        F: FnOnce(RawClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let endpoint = &self.endpoints[i];
        match tokio::time::timeout(self.opts.rpc_timeout, op(self.clients[i].clone())).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(ClientError::Rpc {
                endpoint: endpoint.clone(),
                code: s.code(),
                message: s.message().to_owned(),
            }),
            Err(_) => Err(ClientError::Rpc {
                endpoint: endpoint.clone(),
                code: tonic::Code::DeadlineExceeded,
                message: format!("no answer within {:?}", self.opts.rpc_timeout),
            }),
        }
    }

    /// Asks every endpoint's Status (concurrently, bounded) and remembers the primary
    /// with the highest term.
    async fn discover(&self) -> Result<usize, String> {
        let probe = self.opts.connect_timeout * 2;
        let futs = self.clients.iter().map(|c| {
            let mut c = c.clone();
            async move { tokio::time::timeout(probe, c.status(pb::StatusRequest {})).await }
        });
        let answers = futures::future::join_all(futs).await;
        let mut best: Option<(usize, u64)> = None;
        let mut seen = Vec::new();
        for (i, a) in answers.into_iter().enumerate() {
            match a {
                Ok(Ok(s)) => {
                    let s = s.into_inner();
                    if s.role == pb::Role::Primary as i32 && best.is_none_or(|(_, t)| s.term > t) {
                        best = Some((i, s.term));
                    }
                    let role = pb::Role::try_from(s.role)
                        .map(|r| r.as_str_name())
                        .unwrap_or("?");
                    seen.push(format!("{} is {role}", self.endpoints[i]));
                }
                Ok(Err(e)) => seen.push(format!("{}: {}", self.endpoints[i], e.message())),
                Err(_) => seen.push(format!("{}: no answer", self.endpoints[i])),
            }
        }
        match best {
            Some((i, _)) => {
                self.primary.store(i, Ordering::Relaxed);
                Ok(i)
            }
            None => Err(seen.join("; ")),
        }
    }

    /// Calls the primary, following "not primary" answers and unreachable endpoints to
    /// the new primary with backoff, for at most `failover_timeout`.
    async fn call_primary<T, F, Fut>(&self, op: F) -> Result<T, ClientError>
    where
        F: Fn(RawClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_primary_at(op).await.map(|(_, r)| r)
    }

    /// [`Inner::call_primary`], also saying which endpoint answered.
    pub(crate) async fn call_primary_at<T, F, Fut>(&self, op: F) -> Result<(usize, T), ClientError>
    where
        F: Fn(RawClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = Instant::now();
        let deadline = started + self.opts.failover_timeout;
        let mut backoff = Duration::from_millis(20);
        let mut last = String::from("not tried");
        loop {
            let mut i = self.primary.load(Ordering::Relaxed);
            if i == NO_PRIMARY {
                match self.discover().await {
                    Ok(found) => i = found,
                    Err(e) => last = e,
                }
            }
            if i != NO_PRIMARY {
                let call =
                    tokio::time::timeout(self.opts.rpc_timeout, op(self.clients[i].clone())).await;
                match call {
                    Ok(Ok(r)) => return Ok((i, r.into_inner())),
                    Ok(Err(s)) if is_failover(&s) => {
                        last = format!("{}: {}", self.endpoints[i], s.message());
                        let _ = self.primary.compare_exchange(
                            i,
                            NO_PRIMARY,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                    Ok(Err(s)) => {
                        return Err(ClientError::Rpc {
                            endpoint: self.endpoints[i].clone(),
                            code: s.code(),
                            message: s.message().to_owned(),
                        })
                    }
                    Err(_) => {
                        last = format!(
                            "{}: no answer within {:?}",
                            self.endpoints[i], self.opts.rpc_timeout
                        );
                        let _ = self.primary.compare_exchange(
                            i,
                            NO_PRIMARY,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                }
            }
            if Instant::now() + backoff >= deadline {
                return Err(ClientError::NoPrimary {
                    endpoints: self.endpoints.join(", "),
                    waited_ms: started.elapsed().as_millis() as u64,
                    last,
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(300));
        }
    }
}
