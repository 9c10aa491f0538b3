//! What the operator tells the cluster about a compile: the `KmeshConfig` status (conditions,
//! rejected and unenforced resources, kinds it cannot read, rollout progress, publishing held) and
//! a Warning Event on each newly rejected object, and on the KmeshConfig when publishing is held;
//! and the KmeshConfig `default` itself, created when absent.
//!
//! [`compute_status`] ([`status`]) is pure: facts in, status out. [`Reconciler`] does the I/O: a
//! server-side apply of the status subresource (skipped when nothing changed), Events
//! ([`events`]), at most once per rejection for as long as it stays rejected, and the creation of
//! a missing `default` ([`default_config`]). An Event that cannot be published does not fail the
//! reconcile: it is logged and retried on the next one.
pub mod default_config;
pub mod events;
pub mod status;

use std::collections::BTreeSet;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client, Resource as _,
    api::{Patch, PatchParams},
    runtime::events::Reporter,
};
use tracing::{debug, warn};

use default_config::DefaultConfig;
pub use default_config::{CREATED_BY, Creation};
use events::Rejection;
pub use events::{EventReport, MAX_EVENTS_PER_RECONCILE, object_reference};
pub use status::{MAX_LISTED, NodeRollout, RolloutFacts, StatusFacts, compute_status, condition};

use crate::{
    crd::{KmeshConfig, KmeshConfigStatus, SINGLETON_NAME, UnwatchedKind},
    diagnostics::{Diagnostic, ObjectRef},
    kinds::Kind,
    kube_source::{Publishing, Unread},
    leader::Leadership,
};

/// The field manager of the status writes (and the Events' reporting controller).
pub const FIELD_MANAGER: &str = "kmesh-operator";

/// Why a reconcile did not write the status.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// There is no KmeshConfig `default` (the operator then runs with the defaults, and creates
    /// it: see [`default_config`]).
    #[error(
        "KmeshConfig \"{SINGLETON_NAME}\" does not exist, so its status was not written; \
         the operator runs with the default settings until it exists"
    )]
    ConfigNotFound,
    /// The status write conflicted with another writer (HTTP 409).
    #[error(
        "status write of KmeshConfig \"{SINGLETON_NAME}\" conflicted (HTTP 409 {reason}): {message}"
    )]
    StatusConflict { reason: String, message: String },
    /// The API server refused the status write (RBAC, validation, a server error).
    #[error(
        "status write of KmeshConfig \"{SINGLETON_NAME}\" failed (HTTP {code} {reason}): {message}"
    )]
    StatusRefused {
        code: u16,
        reason: String,
        message: String,
    },
    /// The API server could not be reached, or its answer could not be read.
    #[error("status write of KmeshConfig \"{SINGLETON_NAME}\" failed: {0}")]
    StatusTransport(#[source] kube::Error),
    /// This replica does not lead: only the leader writes status and Events.
    #[error("not the leader: status and Events are the leader's to write")]
    NotLeader,
}

impl ReconcileError {
    /// Whether trying again soon may help (conflicts, server errors, transport errors). A
    /// missing KmeshConfig or a refusal such as 403/422 needs a change in the cluster first.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReconcileError::ConfigNotFound | ReconcileError::NotLeader => false,
            ReconcileError::StatusConflict { .. } | ReconcileError::StatusTransport(_) => true,
            ReconcileError::StatusRefused { code, .. } => *code >= 500 || *code == 429,
        }
    }

    fn from_status_write(error: kube::Error) -> Self {
        match error {
            kube::Error::Api(s) if s.code == 404 || s.reason == "NotFound" => {
                ReconcileError::ConfigNotFound
            }
            kube::Error::Api(s) if s.code == 409 || s.reason == "Conflict" => {
                ReconcileError::StatusConflict {
                    reason: s.reason,
                    message: s.message,
                }
            }
            kube::Error::Api(s) => ReconcileError::StatusRefused {
                code: s.code,
                reason: s.reason,
                message: s.message,
            },
            other => ReconcileError::StatusTransport(other),
        }
    }
}

/// What a successful reconcile did.
#[derive(Clone, Debug, PartialEq)]
pub struct ReconcileOutcome {
    pub status: KmeshConfigStatus,
    /// `false` when the stored status already was `status`.
    pub status_written: bool,
    pub events: EventReport,
}

/// Everything one reconcile reads.
#[derive(Clone, Copy)]
pub struct ReconcileInput<'a> {
    /// The KmeshConfig that was compiled (from the store); `None` when there is none.
    pub config: Option<&'a KmeshConfig>,
    pub diagnostics: &'a [Diagnostic],
    pub rollout: &'a RolloutFacts,
    /// See [`StatusFacts::unwatched`].
    pub unwatched: &'a [UnwatchedKind],
    /// See [`StatusFacts::publishing`].
    pub publishing: &'a Publishing,
    /// The uid of an object, so that its Events show in `kubectl describe` (e.g.
    /// `&|o| stores.uid_of(o)`).
    pub uid_of: &'a (dyn Fn(&ObjectRef) -> Option<String> + Sync),
}

/// Writes status and Events; remembers which rejections it has already announced.
pub struct Reconciler {
    client: Client,
    reporter: Reporter,
    /// Rejections an Event was published for, that are still current.
    announced: BTreeSet<Rejection>,
    /// The hold an Event was published for, while it lasts (empty: none).
    announced_hold: Vec<(Kind, Unread)>,
    /// The gate: only the leader writes (see [`Reconciler::gated_by`]).
    leadership: Leadership,
    /// Creates the KmeshConfig when it is missing.
    default_config: DefaultConfig,
}

impl Reconciler {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Reconciler {
            client,
            reporter,
            announced: BTreeSet::new(),
            announced_hold: Vec::new(),
            leadership: Leadership::always(),
            default_config: DefaultConfig::default(),
        }
    }

    /// Writes only while `leadership` leads: a reconcile of a replica that does not lead writes
    /// nothing and returns [`ReconcileError::NotLeader`]. (A new leader announces the rejections
    /// current when it takes over once more: it cannot know which Events the old one published.)
    pub fn gated_by(mut self, leadership: Leadership) -> Self {
        self.leadership = leadership;
        self
    }

    /// Publishes Events for new rejections, then writes the status if it changed. Event
    /// failures are logged and counted, never returned; a status write failure is returned
    /// (and logged here, so the caller need not log it again). A missing KmeshConfig is
    /// created ([`default_config`]; its failures logged there, once each) and reported as
    /// [`ReconcileError::ConfigNotFound`]: its status is written once the store sees it.
    pub async fn reconcile(
        &mut self,
        input: &ReconcileInput<'_>,
    ) -> Result<ReconcileOutcome, ReconcileError> {
        if !self.leadership.is_leader() {
            return Err(ReconcileError::NotLeader);
        }
        let mut events = self.publish_events(input).await;
        let Some(config) = input.config else {
            self.default_config.ensure(&self.client).await;
            return Err(ReconcileError::ConfigNotFound);
        };
        // Whole seconds, as the apiserver stores them: a status read back compares equal.
        let now = Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_default());
        self.announce_hold(input.publishing, config, &mut events)
            .await;
        let status = compute_status(&StatusFacts {
            observed_generation: config.metadata.generation,
            previous: config.status.as_ref(),
            diagnostics: input.diagnostics,
            rollout: input.rollout,
            unwatched: input.unwatched,
            publishing: input.publishing,
            now: &now,
        });
        if config.status.as_ref() == Some(&status) {
            debug!("status unchanged");
            return Ok(ReconcileOutcome {
                status,
                status_written: false,
                events,
            });
        }
        if let Err(error) = write_status(&self.client, &status).await {
            // A 404 means deleted since the store saw it: the store will catch up, and the next
            // reconcile creates it again.
            warn!(%error, retryable = error.is_retryable(), "KmeshConfig status not written");
            return Err(error);
        }
        Ok(ReconcileOutcome {
            status,
            status_written: true,
            events,
        })
    }
}

/// Server-side applies `status` to the status subresource of KmeshConfig `default`, as
/// [`FIELD_MANAGER`], forcing ownership.
pub async fn write_status(
    client: &Client,
    status: &KmeshConfigStatus,
) -> Result<(), ReconcileError> {
    let api = Api::<KmeshConfig>::all(client.clone());
    let patch = serde_json::json!({
        "apiVersion": KmeshConfig::api_version(&()),
        "kind": KmeshConfig::kind(&()),
        "metadata": { "name": SINGLETON_NAME },
        "status": status,
    });
    api.patch_status(
        SINGLETON_NAME,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(drop)
    .map_err(ReconcileError::from_status_write)
}
