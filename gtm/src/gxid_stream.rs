//! The client's GXID stream: one long-lived NextGxidStream per client to the primary; a
//! driver task sends the queued callers' requests as one message, keeps up to a window
//! of messages in flight, hands each in-order answer out to the callers of its message,
//! and re-opens the stream on the new primary when it breaks (unanswered messages are
//! re-sent once).

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ha_common::proto::gtm as pb;
use tokio::sync::{mpsc, oneshot};
use tonic::Streaming;

use crate::client::{is_failover, ClientError, Inner, NO_PRIMARY};

/// Caller requests merged into one message at most (bounds the reply fan-out).
const MAX_BATCH: usize = 4096;
/// GXIDs asked for in one message at most (the GTM's per-request limit).
const MAX_BATCH_GXIDS: u64 = crate::node::MAX_GXIDS_PER_REQUEST;
/// A message is sent at most this often: once, and once more on a new stream when the
/// first one broke before answering it.
const MAX_SENDS: u8 = 2;

pub(crate) type GxidReply = oneshot::Sender<Result<Range<u64>, ClientError>>;
pub(crate) type Request = (u64, GxidReply);

/// Which method a stream carries: GXIDs, or the no-op the bench measures as a ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Gxid,
    Ping,
}

/// One message: the requests of the callers it merges, in their order.
pub(crate) struct Batch {
    parts: Vec<Request>,
    total: u64,
    sends: u8,
    sent_at: Option<Instant>,
}

impl Batch {
    fn new(first: Request) -> Batch {
        Batch {
            total: first.0,
            parts: vec![first],
            sends: 0,
            sent_at: None,
        }
    }

    /// Adds `r` unless the message would grow too large (then `r` is given back).
    fn try_add(&mut self, r: Request) -> Result<(), Request> {
        match self.total.checked_add(r.0) {
            Some(t) if t <= MAX_BATCH_GXIDS && self.parts.len() < MAX_BATCH => {
                self.total = t;
                self.parts.push(r);
                Ok(())
            }
            _ => Err(r),
        }
    }

    fn fail(self, e: &ClientError) {
        for (_, tx) in self.parts {
            let _ = tx.send(Err(e.clone()));
        }
    }
}

/// The messages of one client, in order: waiting to be sent (new, or given back by a
/// broken stream), and in flight on the current stream. Pure bookkeeping: no I/O.
#[derive(Default)]
pub(crate) struct Pipeline {
    waiting: VecDeque<Batch>,
    in_flight: VecDeque<Batch>,
}

impl Pipeline {
    pub(crate) fn push(&mut self, b: Batch) {
        self.waiting.push_back(b);
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.in_flight.is_empty()
    }

    pub(crate) fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// When the oldest unanswered message was sent.
    pub(crate) fn oldest_sent_at(&self) -> Option<Instant> {
        self.in_flight.front().and_then(|b| b.sent_at)
    }

    /// Moves the oldest waiting message onto the stream; returns its GXID count.
    pub(crate) fn send_next(&mut self, now: Instant) -> Option<u64> {
        let mut b = self.waiting.pop_front()?;
        b.sends += 1;
        b.sent_at = Some(now);
        let total = b.total;
        self.in_flight.push_back(b);
        Some(total)
    }

    /// The answer `[first, first + count)` to the oldest message in flight: split among
    /// its callers in their order. An answer to nothing, or of the wrong size, is an
    /// error (the stream cannot be trusted any more).
    pub(crate) fn answered(&mut self, first: u64, count: u64) -> Result<(), ClientError> {
        let Some(b) = self.in_flight.pop_front() else {
            return Err(ClientError::BadReply(format!(
                "an answer ({count} GXIDs at {first}) to no request"
            )));
        };
        if count != b.total || first.checked_add(count).is_none() {
            let e = ClientError::BadReply(format!(
                "asked for {} GXIDs, got {count} at {first}",
                b.total
            ));
            b.fail(&e);
            return Err(e);
        }
        let mut next = first;
        for (n, tx) in b.parts {
            let _ = tx.send(Ok(next..next + n));
            next += n;
        }
        Ok(())
    }

    /// The stream broke. With `refused`, the GTM refused the oldest message in flight
    /// (its callers get that error); every other message in flight was not answered
    /// and goes back to the front of the waiting ones, in order, unless it was sent
    /// [`MAX_SENDS`] times already (then its callers get `err`).
    pub(crate) fn broke(&mut self, refused: Option<&ClientError>, err: &ClientError) {
        if let Some(r) = refused {
            if let Some(b) = self.in_flight.pop_front() {
                b.fail(r);
            }
        }
        while let Some(mut b) = self.in_flight.pop_back() {
            if b.sends >= MAX_SENDS {
                b.fail(err);
            } else {
                b.sent_at = None;
                self.waiting.push_front(b);
            }
        }
    }

    /// Every message fails with `e` (no primary found in time).
    pub(crate) fn fail_all(&mut self, e: &ClientError) {
        for b in self.in_flight.drain(..).chain(self.waiting.drain(..)) {
            b.fail(e);
        }
    }
}

/// The client-side fence: an answer of a term older than the highest one this client
/// has seen comes from a deposed primary, and its GXIDs are not used. `Err` carries
/// the newer term seen.
pub(crate) fn fence(seen: &AtomicU64, term: u64) -> Result<(), u64> {
    let newest = seen.fetch_max(term, Ordering::Relaxed);
    if term < newest {
        return Err(newest);
    }
    Ok(())
}

/// Takes what callers queued without waiting: one message's worth at most.
fn take_queued(
    rx: &mut mpsc::UnboundedReceiver<Request>,
    carry: &mut Option<Request>,
) -> Option<Batch> {
    let first = match carry.take() {
        Some(r) => r,
        None => rx.try_recv().ok()?,
    };
    let mut b = Batch::new(first);
    fill(&mut b, rx, carry);
    Some(b)
}

fn fill(b: &mut Batch, rx: &mut mpsc::UnboundedReceiver<Request>, carry: &mut Option<Request>) {
    while carry.is_none() {
        let Ok(r) = rx.try_recv() else { return };
        if let Err(r) = b.try_add(r) {
            *carry = Some(r);
        }
    }
}

/// An open stream to one endpoint.
struct Conn {
    endpoint: usize,
    out: mpsc::UnboundedSender<pb::NextGxidRequest>,
    inbound: Streaming<pb::NextGxidResponse>,
}

/// Why [`serve`] stopped.
enum Stop {
    /// Every client handle is gone.
    Closed,
    /// The stream broke; `refused`: the GTM's error for the oldest message in flight.
    Broken {
        refused: Option<ClientError>,
        err: ClientError,
        move_on: bool,
    },
}

/// The task behind a client's stream of `method`: runs until every handle is dropped.
pub(crate) async fn drive(
    inner: Arc<Inner>,
    method: Method,
    mut rx: mpsc::UnboundedReceiver<Request>,
) {
    let mut pipe = Pipeline::default();
    let mut carry: Option<Request> = None;
    loop {
        if pipe.is_idle() {
            // Nothing to do: the stream (if any) was dropped; wait for a caller.
            let first = match carry.take() {
                Some(r) => r,
                None => match rx.recv().await {
                    Some(r) => r,
                    None => return,
                },
            };
            let mut b = Batch::new(first);
            fill(&mut b, &mut rx, &mut carry);
            pipe.push(b);
        }
        let mut conn = match open(&inner, method).await {
            Ok(c) => c,
            Err(e) => {
                // No primary within the failover timeout: everybody waiting is told.
                pipe.fail_all(&e);
                while let Some(b) = take_queued(&mut rx, &mut carry) {
                    b.fail(&e);
                }
                continue;
            }
        };
        match serve(&inner, method, &mut conn, &mut pipe, &mut rx, &mut carry).await {
            Stop::Closed => return,
            Stop::Broken {
                refused,
                err,
                move_on,
            } => {
                if move_on {
                    let _ = inner.primary.compare_exchange(
                        conn.endpoint,
                        NO_PRIMARY,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                tracing::debug!(
                    "GTM stream to {} broke: {err}",
                    inner.endpoints[conn.endpoint]
                );
                pipe.broke(refused.as_ref(), &err);
            }
        }
    }
}

/// Opens a stream on the primary, following failovers for at most the failover timeout.
async fn open(inner: &Inner, method: Method) -> Result<Conn, ClientError> {
    let (endpoint, (out, inbound)) = inner
        .call_primary_at(|mut c| async move {
            let (out, rx) = mpsc::unbounded_channel();
            let mut rx: mpsc::UnboundedReceiver<pb::NextGxidRequest> = rx;
            let requests = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
            let answers = match method {
                Method::Gxid => c.next_gxid_stream(requests).await?,
                Method::Ping => c.ping_stream(requests).await?,
            };
            Ok(answers.map(|inbound| (out, inbound)))
        })
        .await?;
    Ok(Conn {
        endpoint,
        out,
        inbound,
    })
}

/// Sends and answers messages on `conn` until it breaks or every handle is dropped.
async fn serve(
    inner: &Inner,
    method: Method,
    conn: &mut Conn,
    pipe: &mut Pipeline,
    rx: &mut mpsc::UnboundedReceiver<Request>,
    carry: &mut Option<Request>,
) -> Stop {
    let window = inner.opts.max_in_flight.max(1);
    let endpoint = &inner.endpoints[conn.endpoint];
    let transport = |code: tonic::Code, message: String| ClientError::Rpc {
        endpoint: endpoint.clone(),
        code,
        message,
    };
    let mut closed = false;
    loop {
        // Another primary was found (a promotion through this client, a discovery by
        // another call): leave this stream; what it did not answer is re-sent there.
        if inner.primary.load(Ordering::Relaxed) != conn.endpoint {
            return Stop::Broken {
                refused: None,
                err: transport(
                    tonic::Code::Unavailable,
                    "the client moved to another primary".into(),
                ),
                move_on: false,
            };
        }
        let now = Instant::now();
        while pipe.in_flight() < window {
            if !pipe.has_waiting() {
                match take_queued(rx, carry) {
                    Some(b) => pipe.push(b),
                    None => break,
                }
            }
            let Some(count) = pipe.send_next(now) else {
                break;
            };
            if conn.out.send(pb::NextGxidRequest { count }).is_err() {
                return Stop::Broken {
                    refused: None,
                    err: transport(tonic::Code::Unavailable, "stream closed".into()),
                    move_on: true,
                };
            }
        }
        if closed && pipe.is_idle() {
            return Stop::Closed;
        }
        let deadline = pipe
            .oldest_sent_at()
            .map(|t| t + inner.opts.rpc_timeout)
            .unwrap_or_else(|| now + inner.opts.rpc_timeout);
        let room = pipe.in_flight() < window && !closed;
        tokio::select! {
            biased;
            answer = conn.inbound.message() => match answer {
                Ok(Some(a)) => {
                    if method == Method::Gxid {
                        // Fence: an answer from a term older than one this client has
                        // seen comes from a deposed primary; its GXIDs are not used.
                        if let Err(seen) = fence(&inner.max_term, a.term) {
                            return Stop::Broken {
                                refused: None,
                                err: transport(
                                    tonic::Code::FailedPrecondition,
                                    format!("not primary: answered in term {}, after term {seen}", a.term),
                                ),
                                move_on: true,
                            };
                        }
                    }
                    if let Err(e) = pipe.answered(a.first, a.count) {
                        return Stop::Broken { refused: None, err: e, move_on: true };
                    }
                }
                Ok(None) => {
                    return Stop::Broken {
                        refused: None,
                        err: transport(tonic::Code::Unavailable, "stream ended".into()),
                        move_on: true,
                    }
                }
                Err(s) => {
                    let err = transport(s.code(), s.message().to_owned());
                    return if is_failover(&s) {
                        Stop::Broken { refused: None, err, move_on: true }
                    } else {
                        // The GTM refused the oldest message (standby lost, say).
                        Stop::Broken { refused: Some(err.clone()), err, move_on: false }
                    };
                }
            },
            req = rx.recv(), if room => match req {
                Some(r) => {
                    let mut b = Batch::new(r);
                    fill(&mut b, rx, carry);
                    pipe.push(b);
                }
                None => closed = true,
            },
            _ = tokio::time::sleep_until(deadline.into()), if pipe.in_flight() > 0 => {
                return Stop::Broken {
                    refused: None,
                    err: transport(
                        tonic::Code::DeadlineExceeded,
                        format!("no answer within {:?}", inner.opts.rpc_timeout),
                    ),
                    move_on: true,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Answer = oneshot::Receiver<Result<Range<u64>, ClientError>>;

    fn request(n: u64) -> (Request, Answer) {
        let (tx, rx) = oneshot::channel();
        ((n, tx), rx)
    }

    fn batch(ns: &[u64]) -> (Batch, Vec<Answer>) {
        let mut rxs = Vec::new();
        let (first, rx) = request(ns[0]);
        rxs.push(rx);
        let mut b = Batch::new(first);
        for &n in &ns[1..] {
            let (r, rx) = request(n);
            rxs.push(rx);
            assert!(b.try_add(r).is_ok());
        }
        (b, rxs)
    }

    fn err(m: &str) -> ClientError {
        ClientError::Rpc {
            endpoint: "e".into(),
            code: tonic::Code::Unavailable,
            message: m.into(),
        }
    }

    #[test]
    fn one_answer_is_split_among_the_callers_in_order() {
        let mut p = Pipeline::default();
        let (b, mut rxs) = batch(&[1, 3, 2]);
        p.push(b);
        assert_eq!(p.send_next(Instant::now()), Some(6));
        p.answered(100, 6).unwrap();
        let got: Vec<_> = rxs
            .iter_mut()
            .map(|r| r.try_recv().unwrap().unwrap())
            .collect();
        assert_eq!(got, vec![100..101, 101..104, 104..106]);
        assert!(p.is_idle());
    }

    #[test]
    fn answers_go_to_messages_in_send_order() {
        let mut p = Pipeline::default();
        let (a, mut ra) = batch(&[2]);
        let (b, mut rb) = batch(&[5]);
        p.push(a);
        p.push(b);
        assert_eq!(p.send_next(Instant::now()), Some(2));
        assert_eq!(p.send_next(Instant::now()), Some(5));
        assert_eq!(p.in_flight(), 2);
        p.answered(10, 2).unwrap();
        p.answered(12, 5).unwrap();
        assert_eq!(ra[0].try_recv().unwrap().unwrap(), 10..12);
        assert_eq!(rb[0].try_recv().unwrap().unwrap(), 12..17);
    }

    #[test]
    fn a_wrong_sized_answer_fails_its_callers_and_the_stream() {
        let mut p = Pipeline::default();
        let (a, mut ra) = batch(&[2, 2]);
        p.push(a);
        p.send_next(Instant::now());
        assert!(matches!(p.answered(10, 3), Err(ClientError::BadReply(_))));
        for r in &mut ra {
            assert!(matches!(
                r.try_recv().unwrap(),
                Err(ClientError::BadReply(_))
            ));
        }
        // An answer when nothing is in flight is an error too.
        assert!(p.answered(1, 1).is_err());
    }

    #[test]
    fn a_broken_stream_gives_unanswered_messages_back_in_order_once() {
        let mut p = Pipeline::default();
        let (a, mut ra) = batch(&[1]);
        let (b, mut rb) = batch(&[2]);
        let (c, _rc) = batch(&[3]);
        p.push(a);
        p.push(b);
        p.push(c);
        p.send_next(Instant::now());
        p.send_next(Instant::now());
        // c was never sent; a and b were in flight when the stream broke.
        p.broke(None, &err("gone"));
        assert_eq!(p.in_flight(), 0);
        assert!(ra[0].try_recv().is_err(), "a is retried, not answered");
        // Re-sent in the original order, before c.
        assert_eq!(p.send_next(Instant::now()), Some(1));
        assert_eq!(p.send_next(Instant::now()), Some(2));
        assert_eq!(p.send_next(Instant::now()), Some(3));
        // The second stream breaks too: a and b were sent twice and fail; c goes back.
        p.broke(None, &err("gone again"));
        assert!(matches!(
            ra[0].try_recv().unwrap(),
            Err(ClientError::Rpc { .. })
        ));
        assert!(matches!(
            rb[0].try_recv().unwrap(),
            Err(ClientError::Rpc { .. })
        ));
        assert_eq!(p.send_next(Instant::now()), Some(3));
    }

    #[test]
    fn a_refused_message_fails_alone_and_the_rest_are_retried() {
        let mut p = Pipeline::default();
        let (a, mut ra) = batch(&[1]);
        let (b, mut rb) = batch(&[2]);
        p.push(a);
        p.push(b);
        p.send_next(Instant::now());
        p.send_next(Instant::now());
        let refused = ClientError::Rpc {
            endpoint: "e".into(),
            code: tonic::Code::Unavailable,
            message: "standby did not acknowledge".into(),
        };
        p.broke(Some(&refused), &err("stream ended"));
        match ra[0].try_recv().unwrap() {
            Err(e) => assert!(e.to_string().contains("standby did not acknowledge"), "{e}"),
            Ok(r) => panic!("refused message answered {r:?}"),
        }
        assert!(rb[0].try_recv().is_err(), "b waits for its retry");
        assert_eq!(p.send_next(Instant::now()), Some(2));
    }

    #[test]
    fn fail_all_tells_every_caller() {
        let mut p = Pipeline::default();
        let (a, mut ra) = batch(&[1]);
        let (b, mut rb) = batch(&[2]);
        p.push(a);
        p.push(b);
        p.send_next(Instant::now());
        p.fail_all(&err("no primary"));
        assert!(ra[0].try_recv().unwrap().is_err());
        assert!(rb[0].try_recv().unwrap().is_err());
        assert!(p.is_idle());
    }

    #[test]
    fn answers_of_an_older_term_are_fenced() {
        let seen = AtomicU64::new(0);
        assert_eq!(fence(&seen, 0), Ok(()));
        assert_eq!(fence(&seen, 2), Ok(()));
        assert_eq!(fence(&seen, 2), Ok(()), "the same term again is fine");
        assert_eq!(fence(&seen, 1), Err(2), "a deposed primary's answer");
        assert_eq!(
            seen.load(Ordering::Relaxed),
            2,
            "a refused answer lowers nothing"
        );
    }

    #[test]
    fn batches_stop_growing_at_the_gxid_limit() {
        let (first, _r1) = request(MAX_BATCH_GXIDS - 1);
        let mut b = Batch::new(first);
        let (small, _r2) = request(1);
        assert!(b.try_add(small).is_ok());
        let (more, _r3) = request(1);
        assert!(b.try_add(more).is_err(), "the message would ask too much");
        assert_eq!(b.total, MAX_BATCH_GXIDS);
    }
}
