//! When discovery runs again, so that a CRD installed (or changed) after the operator started is
//! picked up without a restart, and what it costs.
//!
//! Triggers, the way istiod follows CRDs: a metadata-only watch of the CRDs of the watched kinds
//! ([`watch_crds`]; a change is followed by a run at once and one more [`FOLLOW_UP`] later,
//! because the API server updates its discovery document a moment after the CRD's status says
//! Established); a watch that gets 404 (its version stopped being served); and a periodic run,
//! every [`PERIODIC`], or every [`PERIODIC_BLIND`] while the CRD watch is refused (its RBAC rule
//! missing). [`Schedule`] (pure, the caller passes the time) bounds the cost: at most one run per
//! [`MIN_INTERVAL`], whatever the triggers, each run one aggregated discovery request; failures
//! back off from 1 s to 30 s.
//!
//! Each run's answer goes to every custom kind's watch task as a [`Served`] (sent only when it
//! changed), which moves its watch to the new version or stops it.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{Instant, sleep_until},
};
use tracing::{debug, info, warn};

use super::{
    discovery::{Served, ServedApis, choose, discover, groups_of},
    watch::{WatchErrorClass, classify_watch_error},
};
use crate::{kinds::Kind, watch_backoff::WatchBackoff};

/// At most one discovery run per this interval.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// After a CRD change, one more run this much later.
pub const FOLLOW_UP: Duration = Duration::from_secs(2);
/// A run at least this often while the CRD watch works.
pub const PERIODIC: Duration = Duration::from_secs(300);
/// A run at least this often while the CRD watch is refused.
pub const PERIODIC_BLIND: Duration = Duration::from_secs(30);
/// Retries of a failed run back off from 1 s, doubling, to this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why discovery should run again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// A CRD of a watched kind was created, changed or deleted (or the CRD watch relisted).
    CrdChanged,
    /// A kind's watch got 404: its version is no longer served.
    NotFound,
    /// The CRD watch works (`true`) or is refused (`false`): sets the periodic interval.
    CrdWatch(bool),
}

/// Asks for a discovery run; cheap, never blocks (requests coalesce).
#[derive(Clone, Debug)]
pub struct Rediscover(mpsc::Sender<Trigger>);

impl Rediscover {
    pub fn request(&self, trigger: Trigger) {
        // Full means runs are already pending: this one would coalesce with them anyway.
        let _ = self.0.try_send(trigger);
    }
}

/// When discovery runs next. Pure: the caller passes the time.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// The earliest pending request (a trigger, or the start).
    requested: Option<Instant>,
    /// The follow-up run after a CRD change.
    follow_up: Option<Instant>,
    /// The retry after a failed run.
    retry: Option<Instant>,
    last_run: Option<Instant>,
    created: Instant,
    failures: u32,
    crd_watch_works: bool,
}

impl Schedule {
    /// A schedule whose first run is due at `now`.
    pub fn new(now: Instant) -> Schedule {
        Schedule {
            requested: Some(now),
            follow_up: None,
            retry: None,
            last_run: None,
            created: now,
            failures: 0,
            crd_watch_works: false,
        }
    }

    /// Records a trigger at `now`.
    pub fn trigger(&mut self, trigger: Trigger, now: Instant) {
        match trigger {
            Trigger::CrdChanged => {
                self.request(now);
                self.follow_up = Some(now + FOLLOW_UP);
            }
            Trigger::NotFound => self.request(now),
            Trigger::CrdWatch(works) => self.crd_watch_works = works,
        }
    }

    fn request(&mut self, now: Instant) {
        self.requested = Some(self.requested.map_or(now, |r| r.min(now)));
    }

    /// When the next run is due: the earliest of the pending request, the follow-up, the retry
    /// and the periodic run, but not before [`MIN_INTERVAL`] after the last run.
    pub fn due(&self) -> Instant {
        let periodic = if self.crd_watch_works {
            PERIODIC
        } else {
            PERIODIC_BLIND
        };
        let last = self.last_run;
        let candidates = [
            self.requested,
            self.follow_up,
            self.retry,
            last.map(|l| l + periodic),
        ];
        // Never empty in practice: a request is pending until the first run, a periodic run
        // is due after each.
        let earliest = candidates.into_iter().flatten().min();
        let earliest = earliest.unwrap_or(self.created);
        match last {
            Some(last) => earliest.max(last + MIN_INTERVAL),
            None => earliest,
        }
    }

    /// Records a run that ended at `now`, and whether it succeeded.
    pub fn ran(&mut self, now: Instant, succeeded: bool) {
        self.last_run = Some(now);
        self.requested = None;
        self.follow_up = self.follow_up.filter(|f| *f > now);
        if succeeded {
            self.failures = 0;
            self.retry = None;
        } else {
            self.failures = self.failures.saturating_add(1);
            let backoff = Duration::from_secs(1 << self.failures.min(6).saturating_sub(1));
            self.retry = Some(now + backoff.min(MAX_BACKOFF));
        }
    }
}

/// Runs discovery for the custom kinds whenever the [`Schedule`] says, and sends each kind's
/// [`Served`] to its watch task.
pub(super) struct Discoverer {
    pub client: Client,
    /// The custom kinds, each with the channel to its watch task.
    pub served: BTreeMap<Kind, watch::Sender<Served>>,
    pub triggers: mpsc::Receiver<Trigger>,
}

/// The trigger channel of a [`Discoverer`]: the handle the watches use, and the receiving end.
pub(super) fn trigger_channel() -> (Rediscover, mpsc::Receiver<Trigger>) {
    let (tx, rx) = mpsc::channel(64);
    (Rediscover(tx), rx)
}

impl Discoverer {
    /// Runs until the trigger channel closes (the source is dropped).
    pub(super) async fn run(mut self) {
        let mut schedule = Schedule::new(Instant::now());
        let kinds: Vec<Kind> = self.served.keys().cloned().collect();
        let groups = groups_of(&kinds);
        let mut failed_before = false;
        loop {
            tokio::select! {
                trigger = self.triggers.recv() => match trigger {
                    Some(trigger) => schedule.trigger(trigger, Instant::now()),
                    None => return,
                },
                () = sleep_until(schedule.due()) => {
                    let succeeded = match discover(&self.client, &groups).await {
                        Ok(apis) => {
                            if std::mem::replace(&mut failed_before, false) {
                                info!("API discovery works again");
                            }
                            self.publish(&apis);
                            true
                        }
                        Err(error) => {
                            if !std::mem::replace(&mut failed_before, true) {
                                warn!(%error, "API discovery failed; retrying with backoff");
                            } else {
                                debug!(%error, "API discovery still failing");
                            }
                            false
                        }
                    };
                    schedule.ran(Instant::now(), succeeded);
                }
            }
        }
    }

    /// Sends each kind's new [`Served`] to its task, if it changed.
    fn publish(&self, apis: &ServedApis) {
        for (kind, sender) in &self.served {
            let served = choose(kind, apis);
            sender.send_if_modified(|current| {
                if *current == served {
                    return false;
                }
                debug!(%kind, from = ?current, to = ?served, "discovery");
                *current = served.clone();
                true
            });
        }
    }
}

/// Watches the metadata of the CRDs of `kinds` (named `<plural>.<group>`), and asks for a
/// discovery run when one changes. A refused watch (no RBAC rule for CRDs) is logged once and
/// reported, so that discovery falls back to running every [`PERIODIC_BLIND`].
pub(super) fn watch_crds(client: Client, kinds: &[Kind], rediscover: Rediscover) -> JoinHandle<()> {
    let names: Vec<String> = kinds
        .iter()
        .filter_map(|k| k.info().map(|i| format!("{}.{}", i.plural, i.group)))
        .collect();
    let names = Arc::new(names);
    // Metadata only: names and resource versions, not the (large) schemas.
    let api = Api::<PartialObjectMeta<CustomResourceDefinition>>::all(client);
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default()).backoff(WatchBackoff::default());
        let mut stream = std::pin::pin!(stream);
        let mut refused = false;
        while let Some(item) = stream.next().await {
            let ours = |name: Option<&String>| name.is_some_and(|n| names.contains(n));
            match item {
                Ok(watcher::Event::Apply(crd) | watcher::Event::Delete(crd)) => {
                    if ours(crd.metadata.name.as_ref()) {
                        rediscover.request(Trigger::CrdChanged);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    if std::mem::replace(&mut refused, false) {
                        info!("watching CRDs again");
                    }
                    rediscover.request(Trigger::CrdWatch(true));
                    // CRDs may have changed while the watch was down.
                    rediscover.request(Trigger::CrdChanged);
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Err(error) => {
                    let message = match classify_watch_error(&error) {
                        WatchErrorClass::Forbidden(m) => m,
                        _ => {
                            debug!(%error, "CRD watch failed; retrying");
                            continue;
                        }
                    };
                    if !std::mem::replace(&mut refused, true) {
                        warn!(
                            error = %message,
                            "cannot watch CRDs (RBAC); a CRD installed later is found by \
                             re-running discovery every {}s instead",
                            PERIODIC_BLIND.as_secs()
                        );
                    }
                    rediscover.request(Trigger::CrdWatch(false));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn runs_at_once_then_periodically() {
        let t0 = Instant::now();
        let mut schedule = Schedule::new(t0);
        assert_eq!(schedule.due(), t0);
        schedule.trigger(Trigger::CrdWatch(true), t0);
        schedule.ran(t0, true);
        assert_eq!(schedule.due(), t0 + PERIODIC);
        // Without the CRD watch, more often.
        schedule.trigger(Trigger::CrdWatch(false), t0);
        assert_eq!(schedule.due(), t0 + PERIODIC_BLIND);
    }

    #[test]
    fn a_crd_change_runs_now_and_once_more_later() {
        let t0 = Instant::now();
        let mut schedule = Schedule::new(t0);
        schedule.trigger(Trigger::CrdWatch(true), t0);
        schedule.ran(t0, true);
        let t = t0 + s(60);
        schedule.trigger(Trigger::CrdChanged, t);
        assert_eq!(schedule.due(), t);
        schedule.ran(t, true);
        assert_eq!(schedule.due(), t + FOLLOW_UP);
        schedule.ran(t + FOLLOW_UP, true);
        assert_eq!(
            schedule.due(),
            t + FOLLOW_UP + PERIODIC,
            "one follow-up only"
        );
    }

    #[test]
    fn at_most_one_run_per_interval_whatever_the_triggers() {
        let t0 = Instant::now();
        let mut schedule = Schedule::new(t0);
        schedule.trigger(Trigger::CrdWatch(true), t0);
        // A storm: a trigger every 10 ms for 10 s, a run whenever one is due.
        let mut runs = Vec::new();
        let mut t = t0;
        while t < t0 + s(10) {
            let trigger = if runs.len() % 2 == 0 {
                Trigger::CrdChanged
            } else {
                Trigger::NotFound
            };
            schedule.trigger(trigger, t);
            if schedule.due() <= t {
                schedule.ran(t, true);
                runs.push(t);
            }
            t += ms(10);
        }
        assert!(runs.len() <= 11, "{} runs in 10 s", runs.len());
        for pair in runs.windows(2) {
            assert!(pair[1] - pair[0] >= MIN_INTERVAL, "{pair:?}");
        }
    }

    #[test]
    fn failures_back_off_to_a_bound() {
        let t0 = Instant::now();
        let mut schedule = Schedule::new(t0);
        schedule.trigger(Trigger::CrdWatch(true), t0);
        let mut t = t0;
        let mut gaps = Vec::new();
        for _ in 0..8 {
            schedule.ran(t, false);
            let next = schedule.due();
            gaps.push((next - t).as_secs());
            t = next;
        }
        assert_eq!(gaps, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert!(gaps.iter().all(|g| s(*g) <= MAX_BACKOFF));
        schedule.ran(t, true);
        assert_eq!(schedule.due(), t + PERIODIC, "success resets the backoff");
    }
}
