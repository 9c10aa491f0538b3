//! The authorization part of a [`crate::snapshot_plan::SnapshotPlan`]: tables that are valid by
//! construction (added through `kmesh_snapshot::builder`), and the edits that may break one rule of
//! sections 7-10 afterwards.
//!
//! Building leaves out what would break a rule: repeated keys, and reasons that need a policy of a
//! kind the plan has none of (those become the no-policy reason of the same action). Every verdict
//! set gets its default entry, and source blocks are masked to their network address and kept to
//! one address family.

use std::collections::BTreeSet;

use arbitrary::Arbitrary;
use kmesh_common::authz::{
    ANY_CLASS, ANY_PORT, MAX_POLICY_NAME_LEN, authz_action, authz_policy_kind, authz_reason,
};
use kmesh_common::{ip16, ipv4_mapped};
use kmesh_snapshot::Snapshot;
use kmesh_snapshot::builder::SnapshotBuilder;

use crate::snapshot_plan::{Addr, label};

/// Authorization tables to build.
#[derive(Arbitrary, Debug)]
pub struct AuthzPlan {
    policies: Vec<PolicyPlan>,
    /// Each set: the entries besides its default, which comes first.
    sets: Vec<(VerdictPlan, Vec<VerdictPlan>)>,
    /// `(address, pick of the set)`.
    workloads: Vec<(Addr, u8)>,
    /// `(address, CIDR prefix length, class)`.
    sources: Vec<(Addr, u8, u8)>,
}

#[derive(Arbitrary, Debug)]
struct PolicyPlan {
    id: u32,
    peer_authentication: bool,
    namespace: Vec<u8>,
    /// Labels of the object name.
    name: Vec<Vec<u8>>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct VerdictPlan {
    /// `None`: any class.
    class: Option<u8>,
    /// 0: any port.
    port: u16,
    /// Taken modulo the reasons.
    reason: u8,
    /// Picks the deciding policy among those of the kind the reason needs.
    pick: u8,
}

/// One change to the authorization tables of a built snapshot; `index` picks a record modulo the
/// table's length.
#[derive(Arbitrary, Debug, Clone)]
pub enum AuthzEdit {
    WorkloadSet {
        index: usize,
        policy_set: u32,
    },
    WorkloadPad {
        index: usize,
        pad: u32,
    },
    SourcePrefixLen {
        index: usize,
        prefix_len: u32,
    },
    SourceByte {
        index: usize,
        byte: u8,
        value: u8,
    },
    SourceClass {
        index: usize,
        class: u32,
    },
    VerdictKey {
        index: usize,
        class: u32,
        port: u16,
        pad: u16,
    },
    VerdictValue {
        index: usize,
        policy: u32,
        action: u8,
        reason: u8,
        pad: u16,
    },
    Policy {
        index: usize,
        policy: u32,
        kind: u8,
        pad: u8,
    },
    PolicyName {
        index: usize,
        name_len: u16,
        at: u16,
        value: u8,
    },
    /// Removes every workload, leaving the other tables orphaned.
    ClearWorkloads,
}

impl AuthzPlan {
    /// Adds the plan's tables to `b`.
    pub fn add_to(&self, b: &mut SnapshotBuilder) {
        // Tables without a workload are refused: a plan with no workload or no set adds nothing.
        if self.workloads.is_empty() || self.sets.is_empty() {
            return;
        }
        let (authorization, peer) = self.add_policies(b);
        let mut keys = BTreeSet::new();
        for (set, (default, entries)) in (1u32..).zip(&self.sets) {
            let default = VerdictPlan {
                class: None,
                port: ANY_PORT,
                ..*default
            };
            for v in std::iter::once(&default).chain(entries) {
                let class = v.class.map_or(ANY_CLASS, |c| u32::from(c) + 1);
                if !keys.insert((set, class, v.port)) {
                    continue;
                }
                let (action, reason, policy) = verdict(v, &authorization, &peer);
                b.authz_verdict(set, class, v.port, action, reason, policy);
            }
        }
        let sets = self.sets.len();
        let mut seen = BTreeSet::new();
        for &(addr, pick) in &self.workloads {
            let ip = addr.ip();
            if seen.insert(ip16(ip)) {
                b.authz_workload(ip, 1 + (usize::from(pick) % sets) as u32);
            }
        }
        let mut seen = BTreeSet::new();
        for &(addr, prefix_len, class) in &self.sources {
            let (ip, prefix_len, stored) = canonical_block(addr, u32::from(prefix_len));
            if seen.insert((ip16(ip), stored)) {
                b.authz_source(ip, prefix_len, u32::from(class) + 1);
            }
        }
    }

    /// Adds the policies with valid names and distinct IDs; returns the IDs of each kind.
    fn add_policies(&self, b: &mut SnapshotBuilder) -> (Vec<u32>, Vec<u32>) {
        let (mut authorization, mut peer) = (Vec::new(), Vec::new());
        let mut ids = BTreeSet::new();
        for p in &self.policies {
            if p.id == 0 || !ids.insert(p.id) {
                continue;
            }
            let labels: Vec<String> = p.name.iter().take(4).map(|l| label(l, 40)).collect();
            let object = if labels.is_empty() {
                "p".to_string()
            } else {
                labels.join(".")
            };
            let name = format!("{}/{object}", label(&p.namespace, 63));
            let kind = if p.peer_authentication {
                peer.push(p.id);
                authz_policy_kind::PEER_AUTHENTICATION
            } else {
                authorization.push(p.id);
                authz_policy_kind::AUTHORIZATION_POLICY
            };
            b.authz_policy(p.id, kind, &name);
        }
        (authorization, peer)
    }
}

/// The action, reason and deciding policy of `v`: a reason needing a policy of a kind there is
/// none of becomes the no-policy reason of the same action.
fn verdict(v: &VerdictPlan, authorization: &[u32], peer: &[u32]) -> (u8, u8, u32) {
    use authz_reason::*;
    let reason = 1 + v.reason % (COUNT - 1);
    let allow = matches!(reason, NO_ALLOW_POLICY | ALLOW_MATCHED);
    let action = if allow {
        authz_action::ALLOW
    } else {
        authz_action::DENY
    };
    let candidates = match reason {
        NO_ALLOW_POLICY | NO_ALLOW_MATCHED => return (action, reason, 0),
        STRICT_MTLS => peer,
        _ => authorization,
    };
    match candidates.get(usize::from(v.pick) % candidates.len().max(1)) {
        Some(&policy) => (action, reason, policy),
        None if allow => (action, NO_ALLOW_POLICY, 0),
        None => (action, NO_ALLOW_MATCHED, 0),
    }
}

/// `addr/prefix_len` as a valid block: the CIDR length capped to the family, the address masked
/// to its network address; an IPv6 block shorter than 96 bits that would hold the IPv4-mapped
/// range becomes the host route of the address. Returns the address, the CIDR length, and the
/// stored length (IPv4 + 96).
fn canonical_block(addr: Addr, prefix_len: u32) -> (std::net::IpAddr, u32, u32) {
    match addr {
        Addr::V4(o) => {
            let len = prefix_len.min(32);
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            let net = u32::from_be_bytes(o) & mask;
            (std::net::IpAddr::from(net.to_be_bytes()), len, len + 96)
        }
        Addr::V6(o) => {
            let len = prefix_len.min(128);
            let mask = |len: u32| u128::MAX.checked_shl(128 - len).unwrap_or(0);
            let mapped = u128::from_be_bytes(ipv4_mapped([0, 0, 0, 0]));
            let net = u128::from_be_bytes(o) & mask(len);
            if len < 96 && net == mapped & mask(len) {
                return (std::net::IpAddr::from(o), 128, 128);
            }
            (std::net::IpAddr::from(net.to_be_bytes()), len, len)
        }
    }
}

/// Index `index` of a table of `len` records, or `None` for an empty table.
fn pick(index: usize, len: usize) -> Option<usize> {
    index.checked_rem(len)
}

/// Applies `edit` to the authorization tables of `s`.
pub fn apply(s: &mut Snapshot, edit: &AuthzEdit) {
    let a = &mut s.authz;
    match *edit {
        AuthzEdit::WorkloadSet { index, policy_set } => {
            if let Some(i) = pick(index, a.workloads.len()) {
                a.workloads[i].value.policy_set = policy_set;
            }
        }
        AuthzEdit::WorkloadPad { index, pad } => {
            if let Some(i) = pick(index, a.workloads.len()) {
                a.workloads[i].value.pad = pad;
            }
        }
        AuthzEdit::SourcePrefixLen { index, prefix_len } => {
            if let Some(i) = pick(index, a.sources.len()) {
                a.sources[i].key.prefix_len = prefix_len;
            }
        }
        AuthzEdit::SourceByte { index, byte, value } => {
            if let Some(i) = pick(index, a.sources.len()) {
                a.sources[i].key.ip[usize::from(byte) % 16] = value;
            }
        }
        AuthzEdit::SourceClass { index, class } => {
            if let Some(i) = pick(index, a.sources.len()) {
                a.sources[i].value.source_class = class;
            }
        }
        AuthzEdit::VerdictKey {
            index,
            class,
            port,
            pad,
        } => {
            if let Some(i) = pick(index, a.verdicts.len()) {
                let key = &mut a.verdicts[i].key;
                (key.source_class, key.port, key.pad) = (class, port, pad);
            }
        }
        AuthzEdit::VerdictValue {
            index,
            policy,
            action,
            reason,
            pad,
        } => {
            if let Some(i) = pick(index, a.verdicts.len()) {
                let v = &mut a.verdicts[i].value;
                (v.policy, v.action, v.reason, v.pad) = (policy, action, reason, pad);
            }
        }
        AuthzEdit::Policy {
            index,
            policy,
            kind,
            pad,
        } => {
            if let Some(i) = pick(index, a.policies.len()) {
                let p = &mut a.policies[i];
                (p.policy, p.kind, p.pad) = (policy, kind, pad);
            }
        }
        AuthzEdit::PolicyName {
            index,
            name_len,
            at,
            value,
        } => {
            if let Some(i) = pick(index, a.policies.len()) {
                let p = &mut a.policies[i];
                p.name_len = name_len;
                p.name[usize::from(at) % MAX_POLICY_NAME_LEN] = value;
            }
        }
        AuthzEdit::ClearWorkloads => a.workloads.clear(),
    }
}
