//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does it.
//!
//! Owns the Lease `kmesh-operator-leader` (by default) and promises: at most one replica believes
//! it leads at any moment, provided the replicas' clocks tick at the same rate (no clock needs to
//! agree with another: expiry is measured on the observer's own monotonic clock).
//!
//! - [`Elector`] is the pure state machine: given the Lease as read and the time (a fake clock in
//!   the tests), it says what to write ([`Step`]); writes are guarded by the resourceVersion read, so
//!   two candidates racing for an expired Lease cannot both win.
//! - A candidate takes a Lease held by another only after it has seen the same record, unchanged,
//!   for `leaseDurationSeconds` of its own clock; a released Lease (no holder) at once; its own
//!   Lease (a restarted process of the same pod) at once.
//! - A leader is leader until `renew_deadline` after the start of its last successful renewal
//!   ([`Leadership::is_leader`] checks the time at every call, so a leader whose API calls hang
//!   stops leading on time). `renew_deadline < lease_duration`, so the old leader has stopped
//!   before anyone else can take the Lease.
//! - On shutdown the leader releases the Lease (holder cleared), so another replica takes over
//!   within one retry period instead of a lease duration.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// How the election is run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElectionConfig {
    pub namespace: String,
    pub lease_name: String,
    /// This replica's identity: its pod name.
    pub identity: String,
    /// How long a Lease holds without renewal (`leaseDurationSeconds`, whole seconds).
    pub lease_duration: Duration,
    /// How long a leader keeps leading without a successful renewal; less than `lease_duration`.
    pub renew_deadline: Duration,
    /// How often candidates try and leaders renew.
    pub retry_period: Duration,
}

/// Why an election configuration is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ElectionConfigError {
    #[error(
        "the renew deadline ({renew_deadline:?}) must be shorter than the lease duration \
         ({lease_duration:?}), or two replicas could lead at once"
    )]
    DeadlineNotShorter {
        renew_deadline: Duration,
        lease_duration: Duration,
    },
    #[error(
        "the retry period ({retry_period:?}) must be shorter than the renew deadline ({renew_deadline:?})"
    )]
    RetryNotShorter {
        retry_period: Duration,
        renew_deadline: Duration,
    },
    #[error("the lease duration must be at least 1 s")]
    LeaseTooShort,
}

impl ElectionConfig {
    pub fn check(&self) -> Result<(), ElectionConfigError> {
        if self.lease_duration.as_secs() < 1 {
            return Err(ElectionConfigError::LeaseTooShort);
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(ElectionConfigError::DeadlineNotShorter {
                renew_deadline: self.renew_deadline,
                lease_duration: self.lease_duration,
            });
        }
        if self.retry_period >= self.renew_deadline {
            return Err(ElectionConfigError::RetryNotShorter {
                retry_period: self.retry_period,
                renew_deadline: self.renew_deadline,
            });
        }
        Ok(())
    }
}

/// The Lease as the elector reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// `None` or empty: released.
    pub holder: Option<String>,
    pub lease_duration: Duration,
    /// `renewTime` as written (compared for change only, never against this replica's clock).
    pub renew_time: Option<String>,
    pub transitions: i32,
    pub resource_version: Option<String>,
}

impl LeaseRecord {
    fn of(lease: &Lease) -> LeaseRecord {
        let spec = lease.spec.clone().unwrap_or_default();
        LeaseRecord {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            lease_duration: Duration::from_secs(
                spec.lease_duration_seconds.unwrap_or(0).max(0) as u64
            ),
            renew_time: spec.renew_time.map(|t| t.0.to_string()),
            transitions: spec.lease_transitions.unwrap_or(0),
            resource_version: lease.metadata.resource_version.clone(),
        }
    }

    /// Whether the record names the same holder and renewal (what "unchanged" means for expiry).
    fn same_term(&self, other: &LeaseRecord) -> bool {
        self.holder == other.holder
            && self.renew_time == other.renew_time
            && self.lease_duration == other.lease_duration
    }
}

/// What the elector writes next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// No Lease: create it, held by this replica.
    Create,
    /// Take a released or expired Lease (a new term: transitions + 1), guarded by its
    /// resourceVersion.
    Acquire { transitions: i32 },
    /// Renew this replica's own Lease, guarded by its resourceVersion.
    Renew { transitions: i32 },
    /// Another replica holds an unexpired Lease.
    Wait { holder: String },
}

/// The election's state machine; I/O-free. Times are the caller's monotonic clock.
#[derive(Debug)]
pub struct Elector {
    config: ElectionConfig,
    /// The last record seen, and when this replica first saw it (its own clock).
    observed: Option<(LeaseRecord, Instant)>,
    /// Leading until this instant (the start of the last successful write + renew deadline).
    leading_until: Option<Instant>,
}

impl Elector {
    pub fn new(config: ElectionConfig) -> Elector {
        Elector {
            config,
            observed: None,
            leading_until: None,
        }
    }

    /// What to do, given the Lease as just read at `now` (`None`: there is none).
    pub fn decide(&mut self, now: Instant, lease: Option<&LeaseRecord>) -> Step {
        let Some(lease) = lease else {
            self.observed = None;
            return Step::Create;
        };
        match &self.observed {
            Some((seen, _)) if seen.same_term(lease) => {
                // Keep the first sighting's time, but the newest resourceVersion.
                if let Some((seen, _)) = self.observed.as_mut() {
                    seen.resource_version = lease.resource_version.clone();
                }
            }
            _ => self.observed = Some((lease.clone(), now)),
        }
        let first_seen = self.observed.as_ref().map_or(now, |(_, at)| *at);
        match lease.holder.as_deref() {
            Some(holder) if holder == self.config.identity => Step::Renew {
                transitions: lease.transitions,
            },
            None => Step::Acquire {
                transitions: lease.transitions + 1,
            },
            Some(holder) if now.duration_since(first_seen) >= lease.lease_duration => {
                info!(
                    holder,
                    unchanged_for = ?now.duration_since(first_seen),
                    "the leader's lease expired; taking it"
                );
                Step::Acquire {
                    transitions: lease.transitions + 1,
                }
            }
            Some(holder) => Step::Wait {
                holder: holder.to_string(),
            },
        }
    }

    /// The write of a step that began at `started` succeeded: this replica leads until
    /// `started + renew_deadline`.
    pub fn written(&mut self, started: Instant, written: &LeaseRecord) {
        self.observed = Some((written.clone(), started));
        self.leading_until = Some(started + self.config.renew_deadline);
    }

    /// The Lease is not (or no longer) this replica's.
    pub fn lost(&mut self) {
        self.leading_until = None;
    }

    /// Until when this replica leads, if it does at `now`.
    pub fn leading_until(&self, now: Instant) -> Option<Instant> {
        self.leading_until.filter(|until| now < *until)
    }

    /// The Lease's spec for a write of `step` at wall-clock time `at`.
    pub fn spec(&self, step: &Step, at: Timestamp, acquired: Option<MicroTime>) -> LeaseSpec {
        let transitions = match step {
            Step::Acquire { transitions } | Step::Renew { transitions } => *transitions,
            Step::Create | Step::Wait { .. } => 0,
        };
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.config.lease_duration.as_secs() as i32),
            acquire_time: match step {
                Step::Renew { .. } => acquired.or(Some(MicroTime(at))),
                _ => Some(MicroTime(at)),
            },
            renew_time: Some(MicroTime(at)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }
}

/// Whether this replica leads, shared with everything that must only act as leader.
#[derive(Clone)]
pub struct Leadership {
    leading_until: Arc<Mutex<Option<Instant>>>,
    changed: watch::Receiver<bool>,
}

impl Leadership {
    /// A replica that always leads: no election (one replica, or a `dir:` source).
    pub fn always() -> Leadership {
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        Leadership {
            leading_until: Arc::new(Mutex::new(Some(far))),
            changed: watch::channel(true).1,
        }
    }

    /// A replica that never leads (it only serves).
    pub fn never() -> Leadership {
        Leadership {
            leading_until: Arc::new(Mutex::new(None)),
            changed: watch::channel(false).1,
        }
    }

    /// Whether this replica leads now. Checked at the moment of every leader-only write.
    pub fn is_leader(&self) -> bool {
        let until = *self.leading_until.lock().unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|until| Instant::now() < until)
    }

    /// Waits until leadership may have changed (gained, renewed past a deadline, or lost).
    pub async fn changed(&mut self) {
        if self.changed.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Runs the election until `shutdown` turns true; then releases the Lease if held.
pub fn start(
    client: Client,
    config: ElectionConfig,
    shutdown: watch::Receiver<bool>,
) -> (Leadership, tokio::task::JoinHandle<()>) {
    let leading_until = Arc::new(Mutex::new(None));
    let (tx, rx) = watch::channel(false);
    let leadership = Leadership {
        leading_until: leading_until.clone(),
        changed: rx,
    };
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let task = tokio::spawn(run(api, config, leading_until, tx, shutdown));
    (leadership, task)
}

async fn run(
    api: Api<Lease>,
    config: ElectionConfig,
    leading_until: Arc<Mutex<Option<Instant>>>,
    changed: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut elector = Elector::new(config.clone());
    let mut was_leader = false;
    info!(
        identity = config.identity,
        lease = config.lease_name,
        "leader election started"
    );
    loop {
        let started = Instant::now();
        let attempt = tokio::time::timeout(
            config.retry_period,
            try_once(&api, &config, &mut elector, started),
        );
        if let Err(e) = attempt.await.unwrap_or(Err(kube::Error::Service(
            "the Lease request timed out".into(),
        ))) {
            debug!(error = %e, "lease attempt failed");
        }
        let until = elector.leading_until(Instant::now());
        *leading_until.lock().unwrap_or_else(|p| p.into_inner()) = until;
        let leader = until.is_some();
        if leader != was_leader {
            if leader {
                info!(identity = config.identity, "became the leader");
            } else {
                warn!(identity = config.identity, "stopped leading");
            }
            was_leader = leader;
        }
        changed.send_replace(leader);
        // Wake at the next retry, or when leadership runs out, whichever is first, so that a
        // replica that stops leading says so on time.
        let next = started + config.retry_period;
        let wake = until.map_or(next, |u| u.min(next));
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = shutdown.changed() => {
                if leader {
                    release(&api, &config).await;
                }
                *leading_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
                changed.send_replace(false);
                return;
            }
        }
    }
}

/// One read and, if due, one write of the Lease.
async fn try_once(
    api: &Api<Lease>,
    config: &ElectionConfig,
    elector: &mut Elector,
    started: Instant,
) -> Result<(), kube::Error> {
    let current = api.get_opt(&config.lease_name).await?;
    let record = current.as_ref().map(LeaseRecord::of);
    let step = elector.decide(started, record.as_ref());
    let now = Timestamp::now();
    let acquired = current
        .as_ref()
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.acquire_time.clone());
    let spec = elector.spec(&step, now, acquired);
    let written = match (&step, current) {
        (Step::Wait { holder }, _) => {
            debug!(holder, "another replica leads");
            elector.lost();
            return Ok(());
        }
        (Step::Create, _) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.lease_name.clone()),
                    namespace: Some(config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            api.create(&PostParams::default(), &lease).await
        }
        (_, Some(mut lease)) => {
            // `replace` sends the resourceVersion read: a concurrent writer makes this a 409.
            lease.spec = Some(spec);
            api.replace(&config.lease_name, &PostParams::default(), &lease)
                .await
        }
        (_, None) => unreachable_lease(),
    };
    match written {
        Ok(lease) => {
            elector.written(started, &LeaseRecord::of(&lease));
            Ok(())
        }
        Err(e) => {
            if matches!(&e, kube::Error::Api(s) if s.code == 409) {
                debug!("another replica wrote the Lease first");
                elector.lost();
            }
            Err(e)
        }
    }
}

/// `decide` returns `Create` exactly when there is no Lease, so a write of another step always has
/// the Lease it read.
fn unreachable_lease() -> Result<Lease, kube::Error> {
    Err(kube::Error::Service("no Lease to update".into()))
}

/// Clears the holder (and shortens the duration to 1 s, as client-go does), so that another
/// replica takes over at once.
async fn release(api: &Api<Lease>, config: &ElectionConfig) {
    let result = tokio::time::timeout(Duration::from_secs(2), async {
        let Some(mut lease) = api.get_opt(&config.lease_name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        api.replace(&config.lease_name, &PostParams::default(), &lease)
            .await
            .map(drop)
    })
    .await;
    match result {
        Ok(Ok(())) => info!(identity = config.identity, "released the leader lease"),
        Ok(Err(e)) => warn!(error = %e, "releasing the leader lease failed; it expires instead"),
        Err(_) => warn!("releasing the leader lease timed out; it expires instead"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(identity: &str) -> ElectionConfig {
        ElectionConfig {
            namespace: "kmesh-system".into(),
            lease_name: "kmesh-operator-leader".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    fn held(holder: Option<&str>, renewed: &str, rv: &str) -> LeaseRecord {
        LeaseRecord {
            holder: holder.map(str::to_string),
            lease_duration: Duration::from_secs(15),
            renew_time: Some(renewed.into()),
            transitions: 3,
            resource_version: Some(rv.into()),
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn no_lease_is_created() {
        let mut e = Elector::new(config("a"));
        assert_eq!(e.decide(Instant::now(), None), Step::Create);
    }

    #[test]
    fn a_foreign_lease_is_taken_only_after_it_stays_unchanged_for_its_duration() {
        let t0 = Instant::now();
        let mut e = Elector::new(config("b"));
        let lease = held(Some("a"), "t1", "10");
        assert_eq!(
            e.decide(t0, Some(&lease)),
            Step::Wait { holder: "a".into() }
        );
        assert_eq!(
            e.decide(t0 + 14 * S, Some(&lease)),
            Step::Wait { holder: "a".into() }
        );
        // The holder renews: the clock starts again from this sighting.
        let renewed = held(Some("a"), "t2", "11");
        assert_eq!(
            e.decide(t0 + 14 * S, Some(&renewed)),
            Step::Wait { holder: "a".into() }
        );
        assert_eq!(
            e.decide(t0 + 28 * S, Some(&renewed)),
            Step::Wait { holder: "a".into() }
        );
        assert_eq!(
            e.decide(t0 + 29 * S, Some(&renewed)),
            Step::Acquire { transitions: 4 },
            "15 s unchanged on this replica's clock"
        );
        assert!(
            e.leading_until(t0 + 29 * S).is_none(),
            "not leading before the write"
        );
    }

    #[test]
    fn a_released_lease_is_taken_at_once_and_an_own_lease_is_renewed() {
        let t0 = Instant::now();
        let mut e = Elector::new(config("b"));
        let released = held(None, "t1", "10");
        assert_eq!(
            e.decide(t0, Some(&released)),
            Step::Acquire { transitions: 4 }
        );
        // A restarted process of the same pod finds its own Lease: it renews at once.
        let mut restarted = Elector::new(config("a"));
        let own = held(Some("a"), "t1", "10");
        assert_eq!(
            restarted.decide(t0, Some(&own)),
            Step::Renew { transitions: 3 }
        );
    }

    #[test]
    fn a_leader_leads_until_the_renew_deadline_after_its_last_write_began() {
        let t0 = Instant::now();
        let mut e = Elector::new(config("a"));
        assert_eq!(e.decide(t0, None), Step::Create);
        e.written(t0, &held(Some("a"), "t0", "1"));
        assert!(e.leading_until(t0 + 9 * S).is_some());
        // Renewals fail from here (say the API server is down): leadership ends at t0 + 10 s,
        // before any other replica can take the Lease (t0 + 15 s at the earliest).
        assert!(e.leading_until(t0 + 10 * S).is_none());
        let mut other = Elector::new(config("b"));
        let lease = held(Some("a"), "t0", "1");
        assert!(matches!(other.decide(t0, Some(&lease)), Step::Wait { .. }));
        assert!(matches!(
            other.decide(t0 + 14 * S, Some(&lease)),
            Step::Wait { .. }
        ));
        assert!(matches!(
            other.decide(t0 + 15 * S, Some(&lease)),
            Step::Acquire { .. }
        ));
        // A renewal that began at t0 + 8 s extends it to t0 + 18 s.
        e.written(t0 + 8 * S, &held(Some("a"), "t8", "2"));
        assert!(e.leading_until(t0 + 17 * S).is_some());
        e.lost();
        assert!(
            e.leading_until(t0 + 9 * S).is_none(),
            "a lost Lease ends leadership at once"
        );
    }

    #[test]
    fn specs_count_terms() {
        let e = Elector::new(config("a"));
        let at = Timestamp::from_second(1_700_000_000).unwrap();
        let spec = e.spec(&Step::Acquire { transitions: 4 }, at, None);
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.lease_transitions, Some(4));
        let earlier = MicroTime(Timestamp::from_second(1_600_000_000).unwrap());
        let renewal = e.spec(&Step::Renew { transitions: 4 }, at, Some(earlier.clone()));
        assert_eq!(
            renewal.acquire_time,
            Some(earlier),
            "a renewal keeps the acquire time"
        );
        assert_eq!(renewal.renew_time, Some(MicroTime(at)));
    }

    #[test]
    fn configurations_that_allow_two_leaders_are_refused() {
        assert_eq!(config("a").check(), Ok(()));
        let mut c = config("a");
        c.renew_deadline = c.lease_duration;
        assert!(matches!(
            c.check(),
            Err(ElectionConfigError::DeadlineNotShorter { .. })
        ));
        let mut c = config("a");
        c.retry_period = c.renew_deadline;
        assert!(matches!(
            c.check(),
            Err(ElectionConfigError::RetryNotShorter { .. })
        ));
    }
}
