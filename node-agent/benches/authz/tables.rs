//! Compile-shaped authorization tables for the benchmark: what the operator would emit for a node
//! whose local workloads are bound by `n` namespace-wide ALLOW policies, each allowing the
//! workloads of one other namespace (one source class per namespace). The benchmark's client is a
//! workload of the last namespace (allowed by the last policy), its "outsider" a workload of a
//! namespace no policy allows (denied at the end of the lookup chain).
use std::net::{IpAddr, Ipv4Addr};

use kmesh_common::{
    authz::{ANY_CLASS, ANY_PORT, authz_action, authz_policy_kind, authz_reason},
    mode,
};
use kmesh_snapshot::{Snapshot, builder::SnapshotBuilder};

/// The verdict set of every bound local workload.
const SET: u32 = 1;
/// Mesh workloads per namespace (each a full-length source entry).
const PODS_PER_NAMESPACE: u32 = 2;
/// Local workloads of the node bound by the policies, besides the benchmark's server.
const OTHER_LOCAL_WORKLOADS: u32 = 49;
/// Every tenth policy allows its namespace on this port only (the others on every port), so the
/// verdicts mix (class, ANY) and (class, port) entries as compiled tables do.
const PORT_SCOPED_PORT: u16 = 9090;
/// Where the generated (non-benchmark) source and workload addresses live: no pod of the
/// benchmark's test network has one.
const SOURCE_BASE: u32 = u32::from_be_bytes([10, 250, 0, 0]);
const LOCAL_BASE: u32 = u32::from_be_bytes([10, 251, 0, 0]);

/// Who the tables are about.
pub struct Parties {
    /// The destination workload.
    pub server: Ipv4Addr,
    /// Allowed by the last policy.
    pub client: Ipv4Addr,
    /// A mesh workload no policy allows.
    pub outsider: Ipv4Addr,
}

/// What the destination sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// The destination has no workload entry (no policy binds it); the other local workloads are
    /// bound by `policies` policies.
    Unbound { policies: u32 },
    /// The destination and the other local workloads are bound by `policies` policies.
    Bound { policies: u32 },
}

impl Binding {
    fn policies(self) -> u32 {
        match self {
            Binding::Unbound { policies } | Binding::Bound { policies } => policies,
        }
    }
}

/// Sizes of the authorization tables of a snapshot, for the report.
pub struct TableSizes {
    pub workloads: usize,
    pub sources: usize,
    pub verdicts: usize,
    pub policies: usize,
}

impl TableSizes {
    pub fn of(snapshot: &Snapshot) -> TableSizes {
        TableSizes {
            workloads: snapshot.authz.workloads.len(),
            sources: snapshot.authz.sources.len(),
            verdicts: snapshot.authz.verdicts.len(),
            policies: snapshot.authz.policies.len(),
        }
    }
}

/// The snapshot of generation `generation` with the tables `binding` describes.
pub fn snapshot(generation: u64, binding: Binding, parties: &Parties) -> Snapshot {
    let policies = binding.policies();
    assert!(
        policies >= 1 && policies % 10 != 5,
        "the client's namespace (the last) must be allowed on every port"
    );
    let mut b = SnapshotBuilder::new("bench-node", generation, mode::KERNEL_NATIVE);
    add_sources(&mut b, policies, parties);
    add_policies_and_verdicts(&mut b, policies);
    if matches!(binding, Binding::Bound { .. }) {
        b.authz_workload(IpAddr::V4(parties.server), SET);
    }
    for w in 0..OTHER_LOCAL_WORKLOADS {
        b.authz_workload(IpAddr::V4(Ipv4Addr::from(LOCAL_BASE + w)), SET);
    }
    b.build()
}

/// Tables that bind every one of `servers` and deny every connection to them: with these live, a
/// server whose namespace has the program refuses everything, one without accepts everything.
pub fn deny_all(generation: u64, servers: &[Ipv4Addr]) -> Snapshot {
    let mut b = SnapshotBuilder::new("bench-node", generation, mode::KERNEL_NATIVE);
    for server in servers {
        b.authz_workload(IpAddr::V4(*server), SET);
    }
    b.authz_verdict(
        SET,
        ANY_CLASS,
        ANY_PORT,
        authz_action::DENY,
        authz_reason::NO_ALLOW_MATCHED,
        0,
    );
    b.build()
}

/// Namespace `i` (1..=policies + 1) is source class `i`; the client is a pod of namespace
/// `policies`, the outsider of namespace `policies + 1`.
fn add_sources(b: &mut SnapshotBuilder, policies: u32, parties: &Parties) {
    let mut next = SOURCE_BASE;
    for class in 1..=policies + 1 {
        for pod in 0..PODS_PER_NAMESPACE {
            let ip = match (class, pod) {
                (c, 0) if c == policies => parties.client,
                (c, 0) if c == policies + 1 => parties.outsider,
                _ => {
                    next += 1;
                    Ipv4Addr::from(next)
                }
            };
            b.authz_source(IpAddr::V4(ip), 32, class);
        }
    }
}

/// Policy `i` allows class `i` (on every port, or on [`PORT_SCOPED_PORT`] for every tenth);
/// everything else is denied by the set's default entry.
fn add_policies_and_verdicts(b: &mut SnapshotBuilder, policies: u32) {
    b.authz_verdict(
        SET,
        ANY_CLASS,
        ANY_PORT,
        authz_action::DENY,
        authz_reason::NO_ALLOW_MATCHED,
        0,
    );
    for policy in 1..=policies {
        let name = format!("bench/allow-team-{policy}");
        b.authz_policy(policy, authz_policy_kind::AUTHORIZATION_POLICY, &name);
        let port = if policy % 10 == 5 {
            PORT_SCOPED_PORT
        } else {
            ANY_PORT
        };
        b.authz_verdict(
            SET,
            policy,
            port,
            authz_action::ALLOW,
            authz_reason::ALLOW_MATCHED,
            policy,
        );
    }
}
