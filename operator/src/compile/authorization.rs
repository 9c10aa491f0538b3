//! Authorization (issue #8): which AuthorizationPolicies and PeerAuthentications bind each mesh
//! workload of a node, the verdict of every (source class, port) under them, and the node's four
//! authorization tables. The kernel evaluates no rule: it looks up what is decided here.
//!
//! Decided here (semantics §7-§9, ztunnel's order):
//! - binding: a policy of the workload's namespace without selector, or with a selector matching
//!   the pod's labels; a root-namespace policy without selector (mesh-wide) or with one (pods of
//!   every namespace); `targetRefs`, CUSTOM, AUDIT and dry-run policies bind nothing (reported in
//!   `authz_convert.rs`);
//! - per connection: an uncompilable bound policy denies (UNCOMPILABLE, fail closed); a STRICT
//!   port denies sources without identity (STRICT_MTLS); the first matching DENY (by
//!   namespace/name) denies; no ALLOW bound allows; the first matching ALLOW allows; else deny;
//! - a workload gets an entry only when a policy binds it or one of its ports is STRICT; a node
//!   with none gets four empty tables (so pod churn does not change policy-free snapshots);
//! - policy IDs are stable hashes of `Kind/namespace/name` (as every ID in `tables.rs`); policy
//!   sets are numbered from 1 in the order of the first workload address using them.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::Pod;
use kmesh_common::{
    Ip16,
    authz::{
        AuthzPolicyRecord, AuthzVerdict, AuthzVerdictKey, AuthzVerdictRecord, AuthzWorkloadRecord,
        AuthzWorkloadValue, MAX_POLICY_NAME_LEN, authz_action, authz_policy_kind, authz_reason,
    },
};
use kmesh_snapshot::AuthzTables;

use super::{
    Compiler,
    authz_convert::{Action, AuthzPolicy, ReadPolicy},
    authz_grid::{Grid, compress},
    authz_rules::{Block, Connection, any_rule_matches, ports_named, source_blocks_named},
    authz_sources::{ClassFacts, Identity, mesh_identities, source_classes},
    name_of, namespace_of,
    peer_authentication::{PeerPolicy, WorkloadMtls, selects, workload_mtls},
    tables::with_ids,
    workloads::{address_owners, node_of, pod_ips},
};
use crate::{crd::Mode, diagnostics::ObjectRef, kinds::Kind};

/// What `kmeshctl` shows of one workload address: the policies in effect and the STRICT ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadAuthz {
    pub ip: IpAddr,
    /// `namespace/name` of the pod.
    pub pod: String,
    pub policy_set: u32,
    /// Bound policies, in evaluation order.
    pub policies: Vec<EffectivePolicy>,
    /// The PeerAuthentication deciding ports not listed in `ports`, and whether it makes them
    /// STRICT.
    pub mtls_other: Option<(String, bool)>,
    /// Ports with a port-level mode: (port, STRICT?).
    pub mtls_ports: Vec<(u16, bool)>,
}

/// A policy bound to a workload, as compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EffectivePolicy {
    /// `Kind namespace/name`.
    pub name: String,
    pub action: EffectiveAction,
    pub rules_kept: usize,
    pub rules_total: usize,
    /// What was dropped or stripped, and why.
    pub dropped: Vec<String>,
}

/// What a bound policy does; ordered as evaluated (uncompilable first, then DENY, then ALLOW).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum EffectiveAction {
    /// Invalid: the workload denies every connection.
    Uncompilable,
    Deny,
    Allow,
    /// Read but not node-enforced (never bound today).
    NotEnforced,
}

impl std::fmt::Display for EffectiveAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EffectiveAction::Uncompilable => "UNCOMPILABLE",
            EffectiveAction::Deny => "DENY",
            EffectiveAction::Allow => "ALLOW",
            EffectiveAction::NotEnforced => "NOT ENFORCED",
        })
    }
}

/// One node's authorization: its tables and what `kmeshctl` shows.
#[derive(Clone, Debug, Default)]
pub(super) struct NodeAuthz {
    pub tables: AuthzTables,
    pub workloads: Vec<WorkloadAuthz>,
}

/// A mesh pod of the node, with what binds it.
struct Bound<'p> {
    pod: &'p Pod,
    /// Indices into the policies, sorted by object (namespace/name).
    policies: Vec<usize>,
    /// An invalid PeerAuthentication binding the pod, if any.
    uncompilable_peer: Option<ObjectRef>,
    mtls: WorkloadMtls,
}

/// Everything the verdicts of one workload depend on: equal keys, equal grids.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct GridKey {
    policies: Vec<usize>,
    uncompilable_peer: Option<ObjectRef>,
    mtls: WorkloadMtls,
    /// Only when a bound policy names destination addresses.
    destination: Option<Ip16>,
}

/// The compile-wide facts the per-node step reads.
pub(super) struct AuthzInputs<'a> {
    policies: Vec<AuthzPolicy<'a>>,
    peers: Vec<PeerPolicy<'a>>,
    ids: BTreeMap<ObjectRef, u32>,
    /// The mesh pods of each node.
    pods_by_node: BTreeMap<&'a str, Vec<&'a Pod>>,
    identities: BTreeMap<Ip16, Identity>,
}

impl AuthzInputs<'_> {
    /// Every policy's ID.
    pub(super) fn ids(&self) -> &BTreeMap<ObjectRef, u32> {
        &self.ids
    }
}

impl<'a> Compiler<'a> {
    /// Reads every security policy once (reporting what is rejected or not enforced), and the
    /// identity of every mesh address.
    pub(super) fn authz_inputs(&mut self) -> AuthzInputs<'a> {
        let mut policies = self.authorization_policies();
        policies.sort_by(|a, b| a.object.cmp(&b.object));
        let peers = self.peer_authentications();
        let names: BTreeMap<String, ObjectRef> = policies
            .iter()
            .map(|p| &p.object)
            .chain(peers.iter().map(|p| &p.object))
            .map(|o| (policy_id_name(o), o.clone()))
            .collect();
        let ids = with_ids(names).map(|(id, _, o)| (o, id)).collect();
        // Without any policy no node gets a table: the identities are not needed.
        let mesh_pods = if policies.is_empty() && peers.is_empty() {
            Vec::new()
        } else {
            self.mesh_pods()
        };
        let identities = mesh_identities(&mesh_pods);
        let mut pods_by_node: BTreeMap<&'a str, Vec<&'a Pod>> = BTreeMap::new();
        for pod in &mesh_pods {
            if let Some(node) = node_of(pod) {
                pods_by_node.entry(node).or_default().push(pod);
            }
        }
        if self.mode == Mode::Disabled && !(policies.is_empty() && peers.is_empty()) {
            let object = self.config_object();
            self.unenforced(
                &object,
                "spec.mode",
                "authorization policies are compiled but not enforced: the mesh is disabled \
                 (mode Disabled) and the node programs pass every connection",
            );
        }
        AuthzInputs {
            policies,
            peers,
            ids,
            pods_by_node,
            identities,
        }
    }

    /// The authorization tables of `node`.
    pub(super) fn node_authz(&self, a: &AuthzInputs<'a>, node: &str) -> NodeAuthz {
        let root = self.options.root_namespace.as_str();
        let bound: Vec<Bound<'a>> = a
            .pods_by_node
            .get(node)
            .into_iter()
            .flatten()
            // A pod without an address (not started, or an unreadable podIP) has nothing to
            // enforce on; the node's tables must not hold sources for no workload.
            .filter(|pod| !pod_ips(pod).is_empty())
            .map(|pod| bind(a, root, pod))
            .filter(|b| {
                !b.policies.is_empty()
                    || b.uncompilable_peer.is_some()
                    || b.mtls.other.strict
                    || b.mtls.strict_ports().next().is_some()
            })
            .collect();
        // Each address for the pod that owns it among the node's pods (not the first bound pod
        // read: that made the tables depend on input order; fuzz finding 6).
        let node_pods = a.pods_by_node.get(node).into_iter().flatten().copied();
        let bound_by_pod: BTreeMap<*const Pod, &Bound<'a>> =
            bound.iter().map(|b| (b.pod as *const Pod, b)).collect();
        let by_ip: Vec<(Ip16, &Bound<'a>)> = address_owners(node_pods)
            .into_iter()
            .filter_map(|(ip, owner)| Some((ip, *bound_by_pod.get(&(owner as *const Pod))?)))
            .collect();
        // Only bound pods that own an address enforce anything: one whose every address another
        // pod owns has no workload, and the node's tables must not hold sources for no workload
        // (fuzz finding 8).
        if by_ip.is_empty() {
            return NodeAuthz::default();
        }
        let blocks: BTreeSet<Block> = by_ip
            .iter()
            .flat_map(|(_, b)| &b.policies)
            .filter_map(|i| a.policies.get(*i).and_then(enforced))
            .flat_map(|(_, rules)| source_blocks_named(rules))
            .copied()
            .collect();
        let sources = source_classes(&a.identities, &blocks);
        let mut out = NodeAuthz::default();
        out.tables.sources = sources.records.clone();
        let mut grids: BTreeMap<GridKey, super::authz_grid::Entries> = BTreeMap::new();
        let mut sets: BTreeMap<super::authz_grid::Entries, u32> = BTreeMap::new();
        let mut referenced: BTreeSet<u32> = BTreeSet::new();
        for (ip, b) in by_ip {
            let key = grid_key(a, b, ip);
            let entries = grids
                .entry(key)
                .or_insert_with(|| compress(&grid(a, b, &ip, &sources.classes)));
            let next = sets.len() as u32 + 1;
            let set = *sets.entry(entries.clone()).or_insert_with(|| {
                for ((class, port), verdict) in entries.iter() {
                    out.tables.verdicts.push(AuthzVerdictRecord {
                        key: AuthzVerdictKey {
                            policy_set: next,
                            source_class: *class,
                            port: *port,
                            pad: 0,
                        },
                        value: *verdict,
                    });
                }
                next
            });
            out.tables.workloads.push(AuthzWorkloadRecord {
                ip,
                value: AuthzWorkloadValue {
                    policy_set: set,
                    pad: 0,
                },
            });
            referenced.extend(bound_ids(a, b));
            out.workloads.push(workload_report(a, b, ip, set));
        }
        referenced.extend(out.tables.verdicts.iter().map(|v| v.value.policy));
        referenced.remove(&0);
        out.tables.policies = referenced
            .into_iter()
            .filter_map(|id| policy_record(a, id))
            .collect();
        out
    }
}

/// The name a policy's ID is the hash of.
fn policy_id_name(object: &ObjectRef) -> String {
    let namespace = object.namespace.as_deref().unwrap_or("");
    format!("{}/{namespace}/{}", object.kind, object.name)
}

/// The L4 form of a policy the node enforces.
fn enforced<'p>(p: &'p AuthzPolicy<'_>) -> Option<(Action, &'p [super::authz_rules::Rule])> {
    match &p.read {
        ReadPolicy::Enforced(l4) => Some((l4.action, l4.rules.as_slice())),
        _ => None,
    }
}

/// Whether a policy of `namespace` with `binding` binds `pod` (the root namespace widens it).
fn binds_pod(
    namespace: &str,
    binding: &super::authz_convert::Binding,
    root: &str,
    pod_namespace: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    (namespace == pod_namespace || namespace == root) && selects(binding, labels)
}

fn bind<'p>(a: &AuthzInputs<'_>, root: &str, pod: &'p Pod) -> Bound<'p> {
    let no_labels = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&no_labels);
    let pod_namespace = namespace_of(&pod.metadata);
    let policies = a
        .policies
        .iter()
        .enumerate()
        .filter(|(_, p)| !matches!(p.read, ReadPolicy::NotEnforced))
        .filter(|(_, p)| binds_pod(p.namespace, &p.binding, root, pod_namespace, labels))
        .map(|(i, _)| i)
        .collect();
    let uncompilable_peer = a
        .peers
        .iter()
        .filter(|p| !p.is_valid())
        .filter(|p| {
            let root_selector = p.namespace == root
                && matches!(p.binding, super::authz_convert::Binding::Selector(_));
            !root_selector && binds_pod(p.namespace, &p.binding, root, pod_namespace, labels)
        })
        .map(|p| p.object.clone())
        .min();
    let mtls = workload_mtls(&a.peers, root, pod_namespace, labels);
    Bound {
        pod,
        policies,
        uncompilable_peer,
        mtls,
    }
}

fn grid_key(a: &AuthzInputs<'_>, b: &Bound<'_>, ip: Ip16) -> GridKey {
    let uses_destination = b.policies.iter().any(|i| {
        a.policies
            .get(*i)
            .and_then(enforced)
            .is_some_and(|(_, rules)| rules.iter().any(|r| r.uses_destination_ip()))
    });
    GridKey {
        policies: b.policies.clone(),
        uncompilable_peer: b.uncompilable_peer.clone(),
        mtls: b.mtls.clone(),
        destination: uses_destination.then_some(ip),
    }
}

/// Every verdict of workload address `ip` bound as `b`.
fn grid(
    a: &AuthzInputs<'_>,
    b: &Bound<'_>,
    ip: &Ip16,
    classes: &BTreeMap<u32, ClassFacts>,
) -> Grid {
    let mut ports: BTreeSet<u16> = b.mtls.ports.keys().copied().collect();
    for i in &b.policies {
        if let Some((_, rules)) = a.policies.get(*i).and_then(enforced) {
            ports.extend(ports_named(rules));
        }
    }
    let ports: Vec<u16> = ports.into_iter().collect();
    let mut grid = Grid {
        classes: Vec::with_capacity(classes.len()),
        ports: ports.clone(),
        other: Vec::with_capacity(classes.len()),
        cells: Vec::with_capacity(classes.len()),
    };
    for (class, facts) in classes {
        let principal = facts.principal();
        let verdict = |port: Option<u16>| {
            let c = Connection {
                principal: &principal,
                namespace: facts.namespace(),
                source_blocks: &facts.blocks,
                destination_ip: ip,
                port,
            };
            verdict(a, b, &c, facts.identity.is_some())
        };
        grid.classes.push(*class);
        grid.other.push(verdict(None));
        grid.cells
            .push(ports.iter().map(|p| verdict(Some(*p))).collect());
    }
    grid
}

fn decided(policy: u32, action: u8, reason: u8) -> AuthzVerdict {
    AuthzVerdict {
        policy,
        action,
        reason,
        pad: 0,
    }
}

/// The verdict of one connection (ztunnel's order; see the module documentation).
fn verdict(
    a: &AuthzInputs<'_>,
    b: &Bound<'_>,
    c: &Connection<'_>,
    has_identity: bool,
) -> AuthzVerdict {
    let id = |o: &ObjectRef| a.ids.get(o).copied().unwrap_or(0);
    let bound = || b.policies.iter().filter_map(|i| a.policies.get(*i));
    let uncompilable = bound()
        .find(|p| matches!(p.read, ReadPolicy::Uncompilable(_)))
        .map(|p| &p.object)
        .into_iter()
        .chain(&b.uncompilable_peer)
        .min();
    if let Some(object) = uncompilable {
        return decided(id(object), authz_action::DENY, authz_reason::UNCOMPILABLE);
    }
    let mtls = b.mtls.on(c.port);
    if mtls.strict && !has_identity {
        let by = mtls.by.as_ref().map_or(0, id);
        return decided(by, authz_action::DENY, authz_reason::STRICT_MTLS);
    }
    let with_action = |action: Action| {
        bound().filter_map(move |p| match enforced(p) {
            Some((act, rules)) if act == action => Some((p, rules)),
            _ => None,
        })
    };
    if let Some((p, _)) = with_action(Action::Deny).find(|(_, rules)| any_rule_matches(rules, c)) {
        return decided(
            id(&p.object),
            authz_action::DENY,
            authz_reason::DENY_MATCHED,
        );
    }
    if with_action(Action::Allow).next().is_none() {
        return decided(0, authz_action::ALLOW, authz_reason::NO_ALLOW_POLICY);
    }
    if let Some((p, _)) = with_action(Action::Allow).find(|(_, rules)| any_rule_matches(rules, c)) {
        return decided(
            id(&p.object),
            authz_action::ALLOW,
            authz_reason::ALLOW_MATCHED,
        );
    }
    decided(0, authz_action::DENY, authz_reason::NO_ALLOW_MATCHED)
}

/// The IDs of every policy binding `b` (named by the node's policy records).
fn bound_ids(a: &AuthzInputs<'_>, b: &Bound<'_>) -> Vec<u32> {
    let objects = b
        .policies
        .iter()
        .filter_map(|i| a.policies.get(*i).map(|p| &p.object))
        .chain(&b.uncompilable_peer)
        .chain(b.mtls.other.by.iter())
        .chain(b.mtls.ports.values().filter_map(|s| s.by.as_ref()));
    objects.filter_map(|o| a.ids.get(o).copied()).collect()
}

fn policy_record(a: &AuthzInputs<'_>, id: u32) -> Option<AuthzPolicyRecord> {
    let object = a.ids.iter().find(|(_, i)| **i == id).map(|(o, _)| o)?;
    let kind = match object.kind {
        Kind::PeerAuthentication => authz_policy_kind::PEER_AUTHENTICATION,
        _ => authz_policy_kind::AUTHORIZATION_POLICY,
    };
    let full = format!(
        "{}/{}",
        object.namespace.as_deref().unwrap_or(""),
        object.name
    );
    // Names from a cluster fit; a longer one (from a file) is cut at a character boundary.
    let mut len = full.len().min(MAX_POLICY_NAME_LEN);
    while !full.is_char_boundary(len) {
        len -= 1;
    }
    let mut name = [0u8; MAX_POLICY_NAME_LEN];
    for (byte, from) in name.iter_mut().zip(full.bytes().take(len)) {
        *byte = from;
    }
    Some(AuthzPolicyRecord {
        policy: id,
        name_len: len as u16,
        kind,
        pad: 0,
        name,
    })
}

fn workload_report(a: &AuthzInputs<'_>, b: &Bound<'_>, ip: Ip16, policy_set: u32) -> WorkloadAuthz {
    let mut policies: Vec<EffectivePolicy> = b
        .policies
        .iter()
        .filter_map(|i| {
            let p = a.policies.get(*i)?;
            Some(match &p.read {
                ReadPolicy::Enforced(l4) => EffectivePolicy {
                    name: p.object.to_string(),
                    action: match l4.action {
                        Action::Allow => EffectiveAction::Allow,
                        Action::Deny => EffectiveAction::Deny,
                    },
                    rules_kept: l4.rules.len(),
                    rules_total: l4.rules_total,
                    dropped: l4.dropped.clone(),
                },
                ReadPolicy::Uncompilable(reason) => EffectivePolicy {
                    name: p.object.to_string(),
                    action: EffectiveAction::Uncompilable,
                    rules_kept: 0,
                    rules_total: 0,
                    dropped: vec![reason.clone()],
                },
                // Never bound; listed for completeness should that change.
                ReadPolicy::NotEnforced => EffectivePolicy {
                    name: p.object.to_string(),
                    action: EffectiveAction::NotEnforced,
                    rules_kept: 0,
                    rules_total: 0,
                    dropped: Vec::new(),
                },
            })
        })
        .collect();
    if let Some(peer) = &b.uncompilable_peer {
        policies.push(EffectivePolicy {
            name: peer.to_string(),
            action: EffectiveAction::Uncompilable,
            rules_kept: 0,
            rules_total: 0,
            dropped: Vec::new(),
        });
    }
    // Evaluation order: uncompilable, DENY, ALLOW; by name within each.
    policies.sort_by_key(|p| (p.action, p.name.clone()));
    WorkloadAuthz {
        ip: IpAddr::from(ip).to_canonical(),
        pod: format!(
            "{}/{}",
            namespace_of(&b.pod.metadata),
            name_of(&b.pod.metadata)
        ),
        policy_set,
        policies,
        mtls_other: b
            .mtls
            .other
            .by
            .as_ref()
            .map(|o| (o.to_string(), b.mtls.other.strict)),
        mtls_ports: b.mtls.ports.iter().map(|(p, s)| (*p, s.strict)).collect(),
    }
}
