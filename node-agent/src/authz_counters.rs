//! What `/debug/authz` shows: the authorization counters (`KM_AUTHZ_COUNTERS`, per CPU, summed
//! here) per (workload, policy, action, reason), with the policy's name from the live snapshot's
//! policy table, and the global authorization counters of `KM_COUNTERS`.
use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::{Map, MapData, MapError, PerCpuHashMap};
use kmesh_common::{AuthzCounterKey, AuthzPolicyRecord, map_names};

use crate::{loader::Installation, maps::MapsError};

/// The kinds of a counter's key, defined once with the snapshot's rows.
pub use kmesh_snapshot::view::{Action, PolicyKind, Reason};

/// A policy's name, from the live snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PolicyName {
    /// `namespace/name`.
    pub name: String,
    pub kind: PolicyKind,
}

impl PolicyName {
    pub fn of(record: &AuthzPolicyRecord) -> PolicyName {
        let len = usize::from(record.name_len).min(record.name.len());
        PolicyName {
            name: String::from_utf8_lossy(&record.name[..len]).into_owned(),
            kind: PolicyKind::from_raw(record.kind),
        }
    }
}

/// Policy id → name, of the live snapshot.
pub type PolicyNames = BTreeMap<u32, PolicyName>;

/// The names of a snapshot's policies.
pub fn policy_names(records: &[AuthzPolicyRecord]) -> PolicyNames {
    records
        .iter()
        .map(|r| (r.policy, PolicyName::of(r)))
        .collect()
}

/// One counter, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AuthzCount {
    pub workload_ip: IpAddr,
    /// 0: no single policy decided.
    pub policy: u32,
    /// The policy's name, from the snapshots this agent applied since it started; `None` for 0,
    /// and for a policy no snapshot since the agent (re)started named.
    pub policy_name: Option<PolicyName>,
    pub action: Action,
    pub reason: Reason,
    pub connections: u64,
}

/// The pinned `KM_AUTHZ_COUNTERS`.
pub struct AuthzCounterMap {
    map: PerCpuHashMap<MapData, AuthzCounterKey, u64>,
}

fn map_err(e: MapError) -> MapsError {
    MapsError::Map {
        map: map_names::AUTHZ_COUNTERS,
        source: Box::new(e),
    }
}

impl AuthzCounterMap {
    pub fn open(installation: &Installation) -> Result<Self, MapsError> {
        let map = Map::from_map_data(installation.open_map(map_names::AUTHZ_COUNTERS)?)
            .and_then(PerCpuHashMap::try_from)
            .map_err(map_err)?;
        Ok(Self { map })
    }

    /// Every counter, sorted by (workload, policy, action, reason), named from `names`.
    pub fn read(&self, names: &PolicyNames) -> Result<Vec<AuthzCount>, MapsError> {
        let mut counts = Vec::new();
        for entry in self.map.iter() {
            let (key, per_cpu) = entry.map_err(map_err)?;
            counts.push(AuthzCount {
                workload_ip: IpAddr::from(key.workload_ip).to_canonical(),
                policy: key.policy,
                policy_name: names.get(&key.policy).cloned(),
                action: Action::from_raw(key.action),
                reason: Reason::from_raw(key.reason),
                connections: per_cpu.iter().sum(),
            });
        }
        counts.sort_by(|a, b| {
            (a.workload_ip, a.policy, a.action, a.reason).cmp(&(
                b.workload_ip,
                b.policy,
                b.action,
                b.reason,
            ))
        });
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use kmesh_common::authz::{MAX_POLICY_NAME_LEN, authz_action, authz_policy_kind};

    use super::*;

    #[test]
    fn names_and_kinds_come_from_the_records() {
        let mut name = [0u8; MAX_POLICY_NAME_LEN];
        name[..8].copy_from_slice(b"ns/allow");
        let record = AuthzPolicyRecord {
            policy: 42,
            name_len: 8,
            kind: authz_policy_kind::AUTHORIZATION_POLICY,
            pad: 0,
            name,
        };
        let names = policy_names(&[record]);
        assert_eq!(
            names.get(&42),
            Some(&PolicyName {
                name: "ns/allow".into(),
                kind: PolicyKind::AuthorizationPolicy
            })
        );
        assert_eq!(Reason::from_raw(0), Reason::NoVerdict);
        assert_eq!(Reason::from_raw(99), Reason::Unknown(99));
        assert_eq!(Action::from_raw(authz_action::DENY), Action::Deny);
    }
}
