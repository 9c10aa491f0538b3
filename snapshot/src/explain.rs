//! Why a connection goes where it goes: for a client address and a destination `ip:port`, what the
//! kernel programs do with the node's snapshot — the service that matches, its route and each
//! destination's share, every endpoint with the share of this client's connections it gets (the
//! exact endpoint under a source-hash policy), and the authorization verdict the destination's
//! node gives this client. `kmeshctl explain` prints it; it is pure (snapshots in, explanation out).
//!
//! It follows the programs step by step, with the same shared code: the service lookup, the
//! route's weights ([`RouteValue::weights`](kmesh_common::RouteValue::weights)), the endpoint index
//! of `consistentHash.useSourceIp` ([`source_hash`]), the source's class
//! ([`kmesh_common::authz::source_class`]) and the verdict chain ([`resolve_verdict`]). What it
//! cannot know it says: a destination whose node's snapshot is not at hand is "decided on its
//! node"; the node's own addresses (kubelet probes) are exempt from authorization, which a pod
//! client never is.
use std::net::{IpAddr, SocketAddr};

use kmesh_common::{
    EndpointRecord, IPPROTO_TCP, Ip16, ServiceKey,
    authz::{AuthzVerdictKey, resolve_verdict, source_class},
    ip16, lb_policy, mode, source_hash,
};
use serde::Serialize;

use crate::{
    Snapshot,
    view::{self, Action, LbPolicy, Mode, Names, Reason, ServiceRow},
};

/// What to explain: a connection from `from` to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    pub from: IpAddr,
    pub to: SocketAddr,
}

/// The snapshots the explanation reads.
pub struct Snapshots<'a> {
    /// The snapshot of the client's node: it decides where the connection goes.
    pub source: &'a Snapshot,
    /// Snapshots of destination nodes (may include `source`): the node whose snapshot holds the
    /// destination address as a workload gives the verdict.
    pub destinations: &'a [&'a Snapshot],
    /// `destinations` holds every node's snapshot: an address none holds is outside the mesh.
    /// Otherwise it may be a workload of a node not at hand.
    pub every_node: bool,
}

/// The answer.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub from: IpAddr,
    pub to: SocketAddr,
    /// The client's node and the generation that decided.
    pub node: String,
    pub generation: u64,
    pub mode: Mode,
    pub source: SourceWorkload,
    pub steering: Steering,
    /// The service at `to`, when one matched.
    pub service: Option<ServiceRow>,
    /// Where connections go, when a service matched; empty otherwise.
    pub destinations: Vec<DestinationShare>,
    /// The verdict for `to` itself, when the connection is not rewritten.
    pub direct: Option<Judgement>,
}

/// The client as its node's snapshot knows it.
#[derive(Clone, Debug, Serialize)]
pub struct SourceWorkload {
    /// A mesh workload of the node: its connections are steered.
    pub enrolled: bool,
    pub identity_id: Option<u32>,
    pub identity: Option<String>,
    pub pod: Option<String>,
}

/// What the connect program does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Steering {
    /// A service matched: the connection is rewritten to an endpoint of its route.
    Service,
    /// A service matched but the chosen backend set has no endpoint: connect() is refused.
    ServiceWithoutEndpoints,
    /// No service at `to`: the connection goes to `to` as dialed.
    NoService,
    /// The node's mode is Disabled: nothing is steered.
    ModeDisabled,
    /// The client is not a mesh workload of the node: its connections are not steered.
    SourceNotEnrolled,
}

/// One destination of the route.
#[derive(Clone, Debug, Serialize)]
pub struct DestinationShare {
    pub backend_set_id: u32,
    pub backend_set: Option<String>,
    pub weight: u32,
    /// Of this route's connections.
    pub percent: f64,
    pub lb_policy: LbPolicy,
    /// Under a source-hash policy, the index of the endpoint this client always gets.
    pub source_hash_index: Option<u32>,
    pub endpoints: Vec<EndpointShare>,
}

/// One endpoint, with the share of this client's connections to the service it gets.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointShare {
    pub index: u32,
    pub address: SocketAddr,
    pub identity_id: u32,
    pub identity: Option<String>,
    pub pod: Option<String>,
    pub percent: f64,
    pub verdict: Judgement,
}

/// The authorization verdict for a new connection from the client to one address and port.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Judgement {
    /// The destination's node decides with its verdict table.
    Decided {
        node: String,
        action: Action,
        reason: Reason,
        policy_id: u32,
        policy: Option<String>,
        source_class: u32,
    },
    /// The table has no verdict (an inconsistent snapshot): the kernel denies.
    NoVerdict { node: String },
    /// A mesh workload no policy binds: allowed.
    NotBound { node: String },
    /// The destination's node is in mode Disabled: allowed, not judged.
    NodeDisabled { node: String },
    /// No node's snapshot holds the address as a workload: no mesh authorization applies.
    NotInMesh,
    /// Not a workload of the snapshots at hand: decided on the destination's node.
    DecidedOnItsNode,
}

impl Judgement {
    /// Whether a connection gets through authorization (`None`: not known here).
    pub fn allowed(&self) -> Option<bool> {
        match self {
            Judgement::Decided { action, .. } => Some(*action == Action::Allow),
            Judgement::NoVerdict { .. } => Some(false),
            Judgement::NotBound { .. } | Judgement::NodeDisabled { .. } | Judgement::NotInMesh => {
                Some(true)
            }
            Judgement::DecidedOnItsNode => None,
        }
    }
}

/// Explains `query` over `snapshots`.
pub fn explain(query: Query, snapshots: &Snapshots<'_>, names: &dyn Names) -> Explanation {
    let s = snapshots.source;
    let from = ip16(query.from);
    let source_record = s
        .workloads
        .binary_search_by_key(&from, |w| w.ip)
        .ok()
        .and_then(|at| s.workloads.get(at));
    let source = SourceWorkload {
        enrolled: source_record.is_some(),
        identity_id: source_record.map(|w| w.identity),
        identity: source_record.and_then(|w| names.identity(w.identity)),
        pod: names.pod(&from),
    };
    let service = find_service(s, query.to);
    let mut explanation = Explanation {
        from: query.from,
        to: query.to,
        node: s.node_name.clone(),
        generation: s.generation,
        mode: Mode::from_raw(s.config.mode),
        source,
        steering: Steering::NoService,
        service: service.map(|r| view::service(r, names)),
        destinations: Vec::new(),
        direct: None,
    };
    let direct = |explanation: &mut Explanation, steering| {
        explanation.steering = steering;
        explanation.direct = Some(judge(snapshots, &from, query.to));
    };
    if s.config.mode == mode::DISABLED {
        direct(&mut explanation, Steering::ModeDisabled);
    } else if !explanation.source.enrolled {
        direct(&mut explanation, Steering::SourceNotEnrolled);
    } else if let Some(service) = service {
        explanation.destinations = destinations(s, service.value.route_id, snapshots, &from, names);
        explanation.steering = if explanation
            .destinations
            .iter()
            .all(|d| d.endpoints.is_empty())
        {
            Steering::ServiceWithoutEndpoints
        } else {
            Steering::Service
        };
    } else {
        direct(&mut explanation, Steering::NoService);
    }
    explanation
}

fn find_service(s: &Snapshot, to: SocketAddr) -> Option<&kmesh_common::ServiceRecord> {
    let key = ServiceKey {
        ip: ip16(to.ip()),
        port: to.port(),
        protocol: IPPROTO_TCP,
        pad: 0,
    };
    let at = s.services.binary_search_by_key(&key, |r| r.key).ok()?;
    s.services.get(at)
}

/// The route's destinations, each with its endpoints and their shares for this client.
fn destinations(
    s: &Snapshot,
    route_id: u32,
    snapshots: &Snapshots<'_>,
    from: &Ip16,
    names: &dyn Names,
) -> Vec<DestinationShare> {
    let Some(route) = s
        .routes
        .binary_search_by_key(&route_id, |r| r.route_id)
        .ok()
        .and_then(|at| s.routes.get(at))
    else {
        return Vec::new();
    };
    view::route_destinations(route, names)
        .into_iter()
        .map(|d| {
            let set = s
                .backend_sets
                .binary_search_by_key(&d.backend_set_id, |b| b.set_id)
                .ok()
                .and_then(|at| s.backend_sets.get(at));
            let (policy, count) = set.map_or((lb_policy::RANDOM, 0), |b| {
                (b.value.lb_policy, b.value.endpoint_count)
            });
            let source_hash_index = (policy == lb_policy::SOURCE_IP_HASH)
                .then(|| source_hash(from).checked_rem(count))
                .flatten();
            let endpoints = set_endpoints(s, d.backend_set_id)
                .iter()
                .map(|e| {
                    let percent = match (policy, source_hash_index) {
                        (lb_policy::SOURCE_IP_HASH, Some(i)) if i == e.key.index => d.percent,
                        (lb_policy::SOURCE_IP_HASH, _) => 0.0,
                        _ => d.percent / f64::from(count.max(1)),
                    };
                    endpoint_share(e, percent, snapshots, from, names)
                })
                .collect();
            DestinationShare {
                backend_set_id: d.backend_set_id,
                backend_set: d.backend_set,
                weight: d.weight,
                percent: d.percent,
                lb_policy: LbPolicy::from_raw(policy),
                source_hash_index,
                endpoints,
            }
        })
        .collect()
}

/// The endpoints of set `set_id` (the table is sorted by `(set_id, index)`).
fn set_endpoints(s: &Snapshot, set_id: u32) -> &[EndpointRecord] {
    let start = s.endpoints.partition_point(|e| e.key.set_id < set_id);
    let end = s.endpoints.partition_point(|e| e.key.set_id <= set_id);
    s.endpoints.get(start..end).unwrap_or_default()
}

fn endpoint_share(
    e: &EndpointRecord,
    percent: f64,
    snapshots: &Snapshots<'_>,
    from: &Ip16,
    names: &dyn Names,
) -> EndpointShare {
    let address = SocketAddr::new(view::ip_addr(&e.value.ip), e.value.port);
    EndpointShare {
        index: e.key.index,
        address,
        identity_id: e.value.identity,
        identity: names.identity(e.value.identity),
        pod: names.pod(&e.value.ip),
        percent,
        verdict: judge(snapshots, from, address),
    }
}

/// The verdict the node holding `to` gives a new connection from `from` (the authorization
/// program sees the endpoint's address and port, after the connect program's rewrite).
pub fn judge(snapshots: &Snapshots<'_>, from: &Ip16, to: SocketAddr) -> Judgement {
    let dest = ip16(to.ip());
    let bound = snapshots.destinations.iter().find_map(|n| {
        let at = n
            .authz
            .workloads
            .binary_search_by_key(&dest, |w| w.ip)
            .ok()?;
        Some((*n, n.authz.workloads.get(at)?.value.policy_set))
    });
    if let Some((node, policy_set)) = bound {
        let name = node.node_name.clone();
        if node.config.mode == mode::DISABLED {
            return Judgement::NodeDisabled { node: name };
        }
        let class = source_class(&node.authz.sources, from);
        let verdicts = &node.authz.verdicts;
        let lookup = |key: &AuthzVerdictKey| {
            let at = verdicts.binary_search_by_key(key, |v| v.key).ok()?;
            verdicts.get(at).map(|v| v.value)
        };
        return match resolve_verdict(policy_set, class, to.port(), lookup) {
            Some(v) => Judgement::Decided {
                node: name,
                action: Action::from_raw(v.action),
                reason: Reason::from_raw(v.reason),
                policy_id: v.policy,
                policy: view::policy_name(&node.authz.policies, v.policy),
                source_class: class,
            },
            None => Judgement::NoVerdict { node: name },
        };
    }
    let holder = snapshots
        .destinations
        .iter()
        .find(|n| n.workloads.binary_search_by_key(&dest, |w| w.ip).is_ok());
    match holder {
        Some(node) if node.config.mode == mode::DISABLED => Judgement::NodeDisabled {
            node: node.node_name.clone(),
        },
        Some(node) => Judgement::NotBound {
            node: node.node_name.clone(),
        },
        None if snapshots.every_node => Judgement::NotInMesh,
        None => Judgement::DecidedOnItsNode,
    }
}

/// The explanation as text, for people.
pub fn text(e: &Explanation) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let who = match (&e.source.pod, &e.source.identity) {
        (Some(pod), _) => format!(" ({pod})"),
        (None, Some(identity)) => format!(" ({identity})"),
        (None, None) => String::new(),
    };
    let _ = writeln!(
        out,
        "from {}{who} on node {}, generation {}, mode {:?}",
        e.from, e.node, e.generation, e.mode
    );
    let _ = write!(out, "to {}: ", e.to);
    match e.steering {
        Steering::ModeDisabled => {
            let _ = writeln!(out, "not steered: the node's mode is Disabled");
        }
        Steering::SourceNotEnrolled => {
            let _ = writeln!(
                out,
                "not steered: {} is not a mesh workload of node {}",
                e.from, e.node
            );
        }
        Steering::NoService => {
            let _ = writeln!(out, "no service matched: a direct connection");
        }
        Steering::Service | Steering::ServiceWithoutEndpoints => {
            service_text(&mut out, e);
        }
    }
    if let Some(verdict) = &e.direct {
        let _ = writeln!(out, "  authorization: {}", judgement_text(verdict));
    }
    out
}

fn service_text(out: &mut String, e: &Explanation) {
    use std::fmt::Write as _;
    if let Some(s) = &e.service {
        let name = match &s.service {
            Some(name) => format!("{name} (#{})", s.service_id),
            None => format!("#{}", s.service_id),
        };
        let route = s
            .route
            .clone()
            .unwrap_or_else(|| format!("#{}", s.route_id));
        let waypoint = if s.waypoint { ", to its waypoint" } else { "" };
        let _ = writeln!(out, "service {name}, route {route}{waypoint}");
    }
    if e.steering == Steering::ServiceWithoutEndpoints {
        let _ = writeln!(out, "  no endpoint: connect() is refused (ECONNREFUSED)");
    }
    for d in &e.destinations {
        let set = d
            .backend_set
            .clone()
            .unwrap_or_else(|| format!("#{}", d.backend_set_id));
        let _ = write!(
            out,
            "  {:5.1}%  backend set {set}, {:?}, {} endpoint(s)",
            d.percent,
            d.lb_policy,
            d.endpoints.len()
        );
        match d.source_hash_index {
            Some(i) => {
                let _ = writeln!(out, "; this client always gets endpoint {i}");
            }
            None => out.push('\n'),
        }
        if d.endpoints.is_empty() {
            let _ = writeln!(
                out,
                "           no endpoint: connections routed here are refused"
            );
        }
        for ep in &d.endpoints {
            let pod = ep.pod.as_deref().unwrap_or("-");
            let _ = writeln!(
                out,
                "    {:5.1}%  {}  {pod}  {}",
                ep.percent,
                ep.address,
                judgement_text(&ep.verdict)
            );
        }
    }
}

/// One verdict in words.
pub fn judgement_text(j: &Judgement) -> String {
    match j {
        Judgement::Decided {
            node,
            action,
            reason,
            policy_id,
            policy,
            ..
        } => {
            let by = match (policy, policy_id) {
                (Some(name), _) => format!(" by {name}"),
                (None, 0) => String::new(),
                (None, id) => format!(" by policy #{id}"),
            };
            let action = match action {
                Action::Allow => "allow".to_string(),
                Action::Deny => "deny".to_string(),
                Action::Unknown(raw) => format!("action {raw}"),
            };
            format!("{action} ({reason:?}{by}; decided on node {node})")
        }
        Judgement::NoVerdict { node } => {
            format!("deny (node {node} has no verdict for it: an inconsistent snapshot)")
        }
        Judgement::NotBound { node } => format!("allow (no policy binds it on node {node})"),
        Judgement::NodeDisabled { node } => format!("allow (node {node} is in mode Disabled)"),
        Judgement::NotInMesh => "allow (not a mesh workload: no authorization)".to_string(),
        Judgement::DecidedOnItsNode => {
            "decided on the destination's node (its snapshot is not at hand)".to_string()
        }
    }
}

#[cfg(test)]
mod tests;
