//! Istio's standard TCP labels for one finished [`Connection`], named exactly as Istio and ztunnel
//! name them (ztunnel's `CommonTrafficLabels`), so that Istio's dashboards and alerts read them.
//!
//! Every value comes from the snapshot's names (a [`NameLookup`]) or from a fixed enum; a name the
//! snapshot lacks is `unknown`, as ztunnel's `DefaultedUnknown`. No address or port ever becomes a
//! label value, so the number of label sets is bounded by the snapshot's workloads and services,
//! not by the traffic.
use std::fmt::Write as _;

use prometheus_client::encoding::{
    EncodeLabel as _, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder,
};

use crate::connection::{Connection, Direction, NameLookup, Outcome, ServiceNames, WorkloadNames};

/// The value Istio writes for a name it does not know.
pub const UNKNOWN: &str = "unknown";

/// The trust domain of the SPIFFE principals (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`): Istio's
/// default. The snapshot does not carry the mesh's trust domain.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// Which end's agent reports: the client's node (`source`) or the server's (`destination`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub fn of(direction: Direction) -> Reporter {
        match direction {
            Direction::Outbound => Reporter::Source,
            Direction::Inbound => Reporter::Destination,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Istio's `response_flags` for how a connection ended. Envoy's flags where one fits (`UR`, `UF`,
/// `UH`), ztunnel's `DENY` for an authorization denial; ztunnel's `CONNECT` (no upstream
/// connection) is split here into `UF` (refused or timed out) and `UH` (no endpoint), as the
/// kernel tells them apart.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum ResponseFlags {
    /// `-`: established and closed in order.
    None,
    /// `UR`: established, then reset.
    Reset,
    /// `UF`: the upstream refused the connection or did not answer.
    ConnectFailed,
    /// `UH`: a mesh service with no endpoint.
    NoHealthyUpstream,
    /// `DENY`: the destination's authorization policy refused it.
    Denied,
}

impl ResponseFlags {
    pub const ALL: [ResponseFlags; 5] = [
        ResponseFlags::None,
        ResponseFlags::Reset,
        ResponseFlags::ConnectFailed,
        ResponseFlags::NoHealthyUpstream,
        ResponseFlags::Denied,
    ];

    pub fn of(outcome: Outcome) -> ResponseFlags {
        match outcome {
            Outcome::Closed => ResponseFlags::None,
            Outcome::Reset => ResponseFlags::Reset,
            Outcome::ConnectFailed => ResponseFlags::ConnectFailed,
            Outcome::NoEndpoint => ResponseFlags::NoHealthyUpstream,
            Outcome::Denied { .. } => ResponseFlags::Denied,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Reset => "UR",
            ResponseFlags::ConnectFailed => "UF",
            ResponseFlags::NoHealthyUpstream => "UH",
            ResponseFlags::Denied => "DENY",
        }
    }
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// One workload's labels (the `source_*` or the `destination_*` half).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct WorkloadLabels {
    pub workload: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
    pub cluster: String,
}

impl WorkloadLabels {
    fn unknown() -> WorkloadLabels {
        WorkloadLabels::of(None)
    }

    /// The labels of a workload the snapshot names (`None`: all `unknown`). As ztunnel, the
    /// canonical service and revision are the app and version names (the names section already
    /// applies Istio's fallbacks to them). The cluster is not in the snapshot: `unknown`.
    pub fn of(names: Option<WorkloadNames<'_>>) -> WorkloadLabels {
        let names = names.unwrap_or_default();
        WorkloadLabels {
            workload: or_unknown(names.workload),
            canonical_service: or_unknown(names.app),
            canonical_revision: or_unknown(names.version),
            namespace: or_unknown(names.namespace),
            principal: principal(names.namespace, names.service_account),
            app: or_unknown(names.app),
            version: or_unknown(names.version),
            cluster: UNKNOWN.to_string(),
        }
    }
}

/// The `destination_service*` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ServiceLabels {
    pub host: String,
    pub namespace: String,
    pub name: String,
}

impl ServiceLabels {
    pub fn of(names: Option<ServiceNames<'_>>) -> ServiceLabels {
        let names = names.unwrap_or_default();
        ServiceLabels {
            host: or_unknown(names.host),
            namespace: or_unknown(names.namespace),
            name: or_unknown(names.name),
        }
    }
}

/// Istio's standard TCP label set, in ztunnel's order (its `CommonTrafficLabels` without the
/// optional locality labels, which the snapshot does not carry).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TrafficLabels {
    pub reporter: Reporter,
    pub source: WorkloadLabels,
    pub destination_service: ServiceLabels,
    pub destination: WorkloadLabels,
    pub response_flags: ResponseFlags,
}

impl TrafficLabels {
    /// The labels of `connection`, named through `names`.
    pub fn of(connection: &Connection, names: &dyn NameLookup) -> TrafficLabels {
        TrafficLabels {
            reporter: Reporter::of(connection.direction),
            source: WorkloadLabels::of(names.workload(connection.source.ip())),
            destination_service: ServiceLabels::of(destination_service(connection, names)),
            destination: WorkloadLabels::of(names.workload(connection.destination.ip())),
            response_flags: ResponseFlags::of(connection.outcome),
        }
    }

    /// Labels with every name unknown (for tests and documentation).
    pub fn unknown(reporter: Reporter, response_flags: ResponseFlags) -> TrafficLabels {
        TrafficLabels {
            reporter,
            source: WorkloadLabels::unknown(),
            destination_service: ServiceLabels::of(None),
            destination: WorkloadLabels::unknown(),
            response_flags,
        }
    }
}

/// The destination service of `connection`. Outbound: the service at the address connect4
/// rewrote, else at the address dialed (a connection refused for want of an endpoint was never
/// rewritten; a direct connection to a pod names no service, as the lookup finds none). Inbound:
/// the server never sees the address the client dialed (the client's node rewrote it), so the
/// service is the one the destination, an endpoint of this node, is a backend of (as Kmesh names
/// it, by the workload's services and the target port).
pub fn destination_service<'n>(
    connection: &Connection,
    names: &'n dyn NameLookup,
) -> Option<ServiceNames<'n>> {
    match connection.direction {
        Direction::Outbound => names.service(connection.service.unwrap_or(connection.destination)),
        Direction::Inbound => names.service_of_endpoint(connection.destination),
    }
}

fn or_unknown(name: &str) -> String {
    if name.is_empty() {
        UNKNOWN.to_string()
    } else {
        name.to_string()
    }
}

/// Istio's principal for a namespace and service account, `unknown` without both. Not an
/// authenticated identity here (no mTLS): the service account the snapshot gives the address.
fn principal(namespace: &str, service_account: &str) -> String {
    if namespace.is_empty() || service_account.is_empty() {
        return UNKNOWN.to_string();
    }
    let mut principal = String::with_capacity(64);
    let _ = write!(
        principal,
        "spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"
    );
    principal
}

/// The `source_*` label names, in ztunnel's order (the `destination_*` ones are the same).
const SOURCE_KEYS: [&str; 8] = [
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
];
const DESTINATION_KEYS: [&str; 8] = [
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
];

/// The labels in Prometheus, with the fixed values (`request_protocol="tcp"`,
/// `connection_security_policy="unknown"`: there is no mTLS on this data plane) in their places.
impl EncodeLabelSet for TrafficLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("reporter", self.reporter).encode(encoder.encode_label())?;
        encode_workload(encoder, &SOURCE_KEYS, &self.source)?;
        let service = &self.destination_service;
        for (key, value) in [
            ("destination_service", &service.host),
            ("destination_service_namespace", &service.namespace),
            ("destination_service_name", &service.name),
        ] {
            (key, value.as_str()).encode(encoder.encode_label())?;
        }
        encode_workload(encoder, &DESTINATION_KEYS, &self.destination)?;
        ("request_protocol", "tcp").encode(encoder.encode_label())?;
        ("response_flags", self.response_flags).encode(encoder.encode_label())?;
        ("connection_security_policy", UNKNOWN).encode(encoder.encode_label())
    }
}

fn encode_workload(
    encoder: &mut LabelSetEncoder,
    keys: &[&'static str; 8],
    w: &WorkloadLabels,
) -> Result<(), std::fmt::Error> {
    let values = [
        &w.workload,
        &w.canonical_service,
        &w.canonical_revision,
        &w.namespace,
        &w.principal,
        &w.app,
        &w.version,
        &w.cluster,
    ];
    for (key, value) in keys.iter().zip(values) {
        (*key, value.as_str()).encode(encoder.encode_label())?;
    }
    Ok(())
}
