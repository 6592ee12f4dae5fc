//! The lease this agent grants a CMServer: the agent's vote in the CMServer pair's
//! election (a CMServer acts as primary only while a majority of agents grant it).
//!
//! A pure state machine, driven by the lease requests that CMServers put in their
//! report replies (`ReportReply.lease_request_term`) and by the clock:
//! - at most ONE holder at a time: a request from another CMServer is refused while
//!   the current lease is unexpired;
//! - a request is refused if its term is lower than the highest term this agent has
//!   seen (replies, orders, grants);
//! - a term is granted to one holder only: once (S, T) was granted, another CMServer
//!   needs a term above T (vote once per term, so two successive leaders never share
//!   a term);
//! - the holder renews (same holder, term >= the lease's term) on every heartbeat;
//!   each grant or renewal runs `cm_lease` from the moment the reply is processed;
//! - a freshly started agent grants nothing for `cm_lease`: before it restarted it
//!   may have granted a lease it has forgotten, which may still be running. Except
//!   to the last holder it ever granted, which it remembers on disk
//!   ([`LeaseRecord`], saved before any grant is reported): every lease it granted
//!   before the restart was that holder's, so renewing it at once gives nobody a
//!   second lease, and an agent restart no longer costs the CMServer primary a vote
//!   for `cm_lease` (which, with another host lost in that window, made it step down
//!   and restart every failover timer). The record also keeps the highest term
//!   granted, so "a term is granted to one holder only" holds across restarts;
//! - up-to-date rule (Raft's): a request from a CMServer whose cluster state is older
//!   than the newest state a primary showed this agent is refused, so a CMServer that
//!   missed a decision cannot lead before it has fetched it.
//!
//! The grant is reported to every CMServer in every heartbeat (`AgentReport.lease`),
//! with the time it has left, so each CMServer can count its majority.

use std::time::{Duration, Instant};

use std::path::Path;

use ha_common::durable::{self, Envelope};
use ha_common::proto::cm::LeaseGrant;

use crate::error::AgentError;

/// The lease currently granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub holder: String,
    pub term: u64,
    pub expires_at: Instant,
    /// The holder's id of the request that granted or last renewed it.
    pub request_id: u64,
}

/// What a lease request led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A new holder (or a new lease for the old holder after expiry).
    Granted,
    /// The current holder's lease was extended (possibly in a higher term).
    Renewed,
    Refused(String),
}

/// What an agent keeps on disk about its grants: the last holder it granted and the
/// highest term it granted. Saved before a grant is reported to any CMServer (a grant
/// is only counted once reported), so the file always names the newest holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub holder: String,
    pub granted_term: u64,
}

const RECORD_ENVELOPE: Envelope = Envelope {
    magic: *b"MLSE",
    version: 1,
    what: "agent lease record",
};

impl LeaseRecord {
    /// Reads `path`: None when there is none yet; an error naming the file when it is
    /// unreadable or corrupt.
    pub fn load(path: &Path) -> Result<Option<LeaseRecord>, AgentError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AgentError::io("read", path, e)),
        };
        let corrupt = |why: String| AgentError::CorruptState {
            path: path.to_owned(),
            why,
        };
        let payload = RECORD_ENVELOPE.open(path, &bytes).map_err(|e| {
            // The envelope's message starts with the path, which ours names already.
            let text = e.to_string();
            let prefix = format!("{}: ", path.display());
            corrupt(text.strip_prefix(&prefix).unwrap_or(&text).to_owned())
        })?;
        let (term, holder) = payload
            .split_first_chunk::<8>()
            .ok_or_else(|| corrupt("lease record shorter than its term".into()))?;
        let holder =
            std::str::from_utf8(holder).map_err(|_| corrupt("lease holder is not UTF-8".into()))?;
        if holder.is_empty() {
            return Err(corrupt("lease record names no holder".into()));
        }
        Ok(Some(LeaseRecord {
            holder: holder.to_owned(),
            granted_term: u64::from_le_bytes(*term),
        }))
    }

    /// Replaces `path` crash-safely (temp file, fsync, rename, fsync the directory).
    pub fn save(&self, path: &Path) -> Result<(), AgentError> {
        let mut payload = self.granted_term.to_le_bytes().to_vec();
        payload.extend_from_slice(self.holder.as_bytes());
        durable::write_atomic(path, &RECORD_ENVELOPE.seal(&payload))
            .map_err(|e| AgentError::io("write", path, e))
    }
}

/// The agent's lease state.
#[derive(Debug, Clone)]
pub struct LeaseState {
    lease: Duration,
    grace_until: Instant,
    grant: Option<Grant>,
    /// The record on disk (None: nothing saved yet).
    saved: Option<LeaseRecord>,
    /// Highest term seen anywhere (replies, grants).
    highest: u64,
    /// Highest term granted to anybody (a term is granted to one holder only).
    granted_term: u64,
    /// Newest cluster-state version seen in a primary's reply.
    newest_version: u64,
}

impl LeaseState {
    /// An agent started at `now`: grants nothing until `now + lease`.
    pub fn new(now: Instant, lease: Duration) -> LeaseState {
        LeaseState {
            lease,
            grace_until: now + lease,
            grant: None,
            saved: None,
            highest: 0,
            granted_term: 0,
            newest_version: 0,
        }
    }

    /// An agent restarted at `now` that finds `record` on disk: within its startup
    /// grace it grants the record's holder only (a lapsed lease of that holder, as if
    /// it had just expired), and never a term up to the record's to anyone else.
    pub fn restored(now: Instant, lease: Duration, record: LeaseRecord) -> LeaseState {
        let mut l = LeaseState::new(now, lease);
        l.grant = Some(Grant {
            holder: record.holder.clone(),
            term: record.granted_term,
            expires_at: now,
            request_id: 0,
        });
        l.highest = record.granted_term;
        l.granted_term = record.granted_term;
        l.saved = Some(record);
        l
    }

    /// The record that must be saved before the current grant may be reported (None
    /// when the one on disk is current: renewals in the same term change nothing).
    pub fn unsaved(&self) -> Option<LeaseRecord> {
        let g = self.grant.as_ref()?;
        let now = LeaseRecord {
            holder: g.holder.clone(),
            granted_term: self.granted_term,
        };
        (self.saved.as_ref() != Some(&now)).then_some(now)
    }

    /// Notes that `record` is on disk.
    pub fn saved(&mut self, record: LeaseRecord) {
        self.saved = Some(record);
    }

    /// Notes the state version of a primary's reply this agent applies.
    pub fn observe_version(&mut self, version: u64) {
        self.newest_version = self.newest_version.max(version);
    }

    /// The newest state version seen from a primary.
    pub fn newest_version(&self) -> u64 {
        self.newest_version
    }

    /// [`LeaseState::request`] from a CMServer whose state is at `version`: refused
    /// when that is older than a state a primary already showed this agent.
    pub fn request_versioned(
        &mut self,
        from: &str,
        term: u64,
        id: u64,
        version: u64,
        now: Instant,
    ) -> Decision {
        if version < self.newest_version {
            return Decision::Refused(format!(
                "{from}'s cluster state (version {version}) is older than version {} already seen from a primary",
                self.newest_version
            ));
        }
        self.request(from, term, id, now)
    }

    /// The highest term seen.
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Notes a term seen elsewhere (e.g. in a primary's reply).
    pub fn observe(&mut self, term: u64) {
        self.highest = self.highest.max(term);
    }

    /// The unexpired grant at `now`, if any.
    pub fn current(&self, now: Instant) -> Option<&Grant> {
        self.grant.as_ref().filter(|g| g.expires_at > now)
    }

    /// The grant as reported (empty holder when none).
    pub fn to_proto(&self, now: Instant) -> LeaseGrant {
        match self.current(now) {
            Some(g) => LeaseGrant {
                holder: g.holder.clone(),
                term: g.term,
                remaining_ms: u64::try_from(g.expires_at.duration_since(now).as_millis())
                    .unwrap_or(u64::MAX),
                request_id: g.request_id,
            },
            None => LeaseGrant::default(),
        }
    }

    /// CMServer `from` asks for the lease in `term` at `now` (its request `id`).
    pub fn request(&mut self, from: &str, term: u64, id: u64, now: Instant) -> Decision {
        if from.is_empty() || term == 0 {
            return Decision::Refused("empty request".into());
        }
        let last_holder = self.grant.as_ref().is_some_and(|g| g.holder == from);
        if now < self.grace_until && !last_holder {
            return Decision::Refused(format!(
                "agent started less than {:?} ago: it grants no lease yet",
                self.lease
            ));
        }
        if term < self.highest {
            return Decision::Refused(format!(
                "term {term} is older than term {} already seen",
                self.highest
            ));
        }
        let renewal = match self.current(now) {
            Some(g) if g.holder == from => {
                if term < g.term {
                    return Decision::Refused(format!(
                        "term {term} is older than {from}'s lease term {}",
                        g.term
                    ));
                }
                true
            }
            Some(g) => {
                return Decision::Refused(format!(
                    "lease held by {} (term {}) for {:?} more",
                    g.holder,
                    g.term,
                    g.expires_at.duration_since(now)
                ))
            }
            None => {
                let same_holder_again = self
                    .grant
                    .as_ref()
                    .is_some_and(|g| g.holder == from && term >= g.term);
                if term <= self.granted_term && !same_holder_again {
                    return Decision::Refused(format!(
                        "term {term} was already granted (granted up to term {})",
                        self.granted_term
                    ));
                }
                false
            }
        };
        self.grant = Some(Grant {
            holder: from.to_owned(),
            term,
            expires_at: now + self.lease,
            request_id: id,
        });
        self.highest = self.highest.max(term);
        self.granted_term = self.granted_term.max(term);
        if renewal {
            Decision::Renewed
        } else {
            Decision::Granted
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(3);

    /// An agent past its startup grace.
    fn ready() -> (LeaseState, Instant) {
        let t0 = Instant::now();
        (LeaseState::new(t0, LEASE), t0 + LEASE)
    }

    #[test]
    fn a_cmserver_with_an_older_state_gets_no_lease() {
        let (mut l, t) = ready();
        l.observe_version(12);
        l.observe_version(9);
        assert_eq!(l.newest_version(), 12);
        let d = l.request_versioned("cms2", 5, 1, 11, t);
        assert!(
            matches!(&d, Decision::Refused(why) if why.contains("older than version 12")),
            "{d:?}"
        );
        assert_eq!(l.to_proto(t), LeaseGrant::default());
        // Once it has fetched the newer state it may lead.
        assert_eq!(l.request_versioned("cms2", 5, 2, 12, t), Decision::Granted);
    }

    #[test]
    fn a_fresh_agent_grants_nothing_during_its_startup_grace() {
        let t0 = Instant::now();
        let mut l = LeaseState::new(t0, LEASE);
        assert!(matches!(l.request("cms1", 1, 7, t0), Decision::Refused(_)));
        let almost = t0 + LEASE - Duration::from_millis(1);
        assert!(matches!(
            l.request("cms1", 1, 7, almost),
            Decision::Refused(_)
        ));
        assert_eq!(l.to_proto(almost), LeaseGrant::default());
        assert_eq!(l.request("cms1", 1, 7, t0 + LEASE), Decision::Granted);
    }

    #[test]
    fn grant_then_renew_extends_the_lease() {
        let (mut l, t) = ready();
        assert_eq!(l.request("cms1", 2, 7, t), Decision::Granted);
        let g = l.to_proto(t + Duration::from_secs(1));
        assert_eq!(
            (g.holder.as_str(), g.term, g.remaining_ms, g.request_id),
            ("cms1", 2, 2000, 7)
        );
        let t2 = t + Duration::from_secs(2);
        assert_eq!(l.request("cms1", 2, 7, t2), Decision::Renewed);
        assert_eq!(
            l.current(t2 + LEASE - Duration::from_millis(1))
                .unwrap()
                .term,
            2
        );
        // The holder renews into a higher term (e.g. after a failover it decided).
        assert_eq!(l.request("cms1", 3, 7, t2), Decision::Renewed);
        assert_eq!(l.highest(), 3);
        assert!(matches!(l.request("cms1", 2, 7, t2), Decision::Refused(_)));
    }

    #[test]
    fn a_second_holder_is_refused_while_the_lease_runs() {
        let (mut l, t) = ready();
        assert_eq!(l.request("cms1", 2, 7, t), Decision::Granted);
        let d = l.request("cms2", 9, 7, t + LEASE - Duration::from_millis(1));
        assert!(
            matches!(&d, Decision::Refused(m) if m.contains("held by cms1")),
            "{d:?}"
        );
        assert_eq!(l.current(t).unwrap().holder, "cms1");
        assert_eq!(l.highest(), 2, "a refused request does not raise the term");
    }

    #[test]
    fn a_lower_term_is_refused() {
        let (mut l, t) = ready();
        l.observe(5);
        let d = l.request("cms2", 4, 7, t);
        assert!(
            matches!(&d, Decision::Refused(m) if m.contains("older")),
            "{d:?}"
        );
        assert_eq!(l.request("cms2", 5, 7, t), Decision::Granted);
    }

    #[test]
    fn after_expiry_another_holder_needs_a_higher_term() {
        let (mut l, t) = ready();
        assert_eq!(l.request("cms1", 2, 7, t), Decision::Granted);
        let later = t + LEASE;
        assert!(l.current(later).is_none(), "expired");
        assert_eq!(l.to_proto(later), LeaseGrant::default());
        let d = l.request("cms2", 2, 7, later);
        assert!(
            matches!(&d, Decision::Refused(m) if m.contains("already granted")),
            "{d:?}"
        );
        assert_eq!(l.request("cms2", 3, 7, later), Decision::Granted);
        assert_eq!(l.current(later).unwrap().holder, "cms2");
        // And the old holder is refused while cms2's lease runs.
        assert!(matches!(
            l.request("cms1", 4, 7, later),
            Decision::Refused(_)
        ));
    }

    #[test]
    fn the_old_holder_may_take_its_expired_lease_again() {
        let (mut l, t) = ready();
        assert_eq!(l.request("cms1", 2, 7, t), Decision::Granted);
        assert_eq!(l.request("cms1", 2, 7, t + LEASE), Decision::Granted);
    }

    fn record(holder: &str, term: u64) -> LeaseRecord {
        LeaseRecord {
            holder: holder.into(),
            granted_term: term,
        }
    }

    #[test]
    fn a_restarted_agent_renews_its_last_holder_at_once_and_nobody_else() {
        let t0 = Instant::now();
        let mut l = LeaseState::restored(t0, LEASE, record("cms1", 4));
        let d = l.request("cms2", 9, 1, t0);
        assert!(
            matches!(&d, Decision::Refused(m) if m.contains("grants no lease yet")),
            "another CMServer waits for the grace: {d:?}"
        );
        assert!(
            matches!(l.request("cms1", 3, 1, t0), Decision::Refused(_)),
            "not in a term below the one it was granted"
        );
        assert_eq!(l.request("cms1", 4, 1, t0), Decision::Granted);
        assert_eq!(l.current(t0).unwrap().holder, "cms1");
        assert!(matches!(
            l.request("cms2", 9, 1, t0 + LEASE - Duration::from_millis(1)),
            Decision::Refused(_)
        ));
    }

    #[test]
    fn a_term_granted_before_a_restart_is_not_granted_to_another_after_it() {
        let t0 = Instant::now();
        let mut l = LeaseState::restored(t0, LEASE, record("cms1", 4));
        let after_grace = t0 + LEASE;
        let d = l.request("cms2", 4, 1, after_grace);
        assert!(
            matches!(&d, Decision::Refused(m) if m.contains("already granted")),
            "{d:?}"
        );
        assert_eq!(l.request("cms2", 5, 1, after_grace), Decision::Granted);
    }

    #[test]
    fn a_grant_is_unsaved_until_saved_and_renewals_in_the_same_term_need_no_save() {
        let (mut l, t) = ready();
        assert_eq!(l.unsaved(), None, "nothing granted, nothing to save");
        assert_eq!(l.request("cms1", 2, 7, t), Decision::Granted);
        assert_eq!(l.unsaved(), Some(record("cms1", 2)));
        l.saved(record("cms1", 2));
        assert_eq!(l.unsaved(), None);
        assert_eq!(l.request("cms1", 2, 7, t), Decision::Renewed);
        assert_eq!(l.unsaved(), None, "a renewal changes nothing on disk");
        assert_eq!(l.request("cms1", 3, 7, t), Decision::Renewed);
        assert_eq!(
            l.unsaved(),
            Some(record("cms1", 3)),
            "a higher term is saved"
        );
        l.saved(record("cms1", 3));
        assert_eq!(l.request("cms2", 4, 7, t + LEASE), Decision::Granted);
        assert_eq!(
            l.unsaved(),
            Some(record("cms2", 4)),
            "a new holder is saved"
        );
    }

    #[test]
    fn the_record_survives_a_restart_and_a_corrupt_one_is_named_and_left_alone() {
        let dir = std::env::temp_dir().join(format!("lease-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cm_agent-h1.lease");
        assert_eq!(LeaseRecord::load(&path).unwrap(), None, "none yet");
        record("cms2", 17).save(&path).unwrap();
        assert_eq!(LeaseRecord::load(&path).unwrap(), Some(record("cms2", 17)));

        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let e = LeaseRecord::load(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("checksum"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "changes nothing");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
