//! The content rules of the authorization tables (sections 7-10, see [`crate::format`] and
//! `kmesh_common::authz`). They keep the tables exactly as the kernel and the agent read them:
//! every workload's verdict set has its default verdict, so [`kmesh_common::authz::resolve_verdict`]
//! always finds one; every source prefix is one the kernel's LPM trie holds as meant (canonical,
//! one address family); every verdict is a known action with a reason that fits it and names the
//! policy that decided it; policy names are `namespace/name`.
//!
//! Checks run table by table in wire order, then the references between tables, so the first error
//! is deterministic. Linear in the tables, apart from binary searches in sorted tables.

use kmesh_common::Ip16;
use kmesh_common::authz::{
    ANY_CLASS, ANY_PORT, AuthzPolicyRecord, AuthzSourceKey, AuthzVerdictKey, AuthzVerdictRecord,
    MAX_POLICY_NAME_LEN, UNKNOWN_SOURCE, authz_action, authz_policy_kind, authz_reason,
    prefix_contains, prefix_is_canonical,
};

use crate::error::{Table, ValidationError, ip_to_addr};
use crate::names;
use crate::parts::NodeView;
use crate::validate::check_order;

/// The first address of the IPv4-mapped range `::ffff:0:0/96`.
const IPV4_MAPPED_BASE: Ip16 = kmesh_common::ipv4_mapped([0, 0, 0, 0]);

impl NodeView<'_> {
    /// Every rule of the authorization tables. Called by `Snapshot::validate` after the other
    /// tables' rules.
    pub(crate) fn validate_authz(&self) -> Result<(), ValidationError> {
        self.validate_authz_presence()?;
        self.validate_authz_workloads()?;
        self.validate_authz_sources()?;
        self.validate_authz_verdicts()?;
        self.validate_authz_policies()?;
        // Lookups below rely on the tables being sorted, which the checks above established.
        self.validate_authz_workload_defaults()?;
        self.validate_authz_verdict_policies()
    }

    /// Sources, verdicts and policies exist only for workloads: a node no policy binds has all four
    /// tables empty, so its snapshot has one encoding.
    fn validate_authz_presence(&self) -> Result<(), ValidationError> {
        let a = &self.authz;
        if !a.workloads.is_empty() {
            return Ok(());
        }
        let others = [
            (Table::AuthzSources, a.sources.len()),
            (Table::AuthzVerdicts, a.verdicts.len()),
            (Table::AuthzPolicies, a.policies.len()),
        ];
        match others.into_iter().find(|&(_, count)| count > 0) {
            Some((table, count)) => Err(ValidationError::AuthzWithoutWorkloads { table, count }),
            None => Ok(()),
        }
    }

    fn validate_authz_workloads(&self) -> Result<(), ValidationError> {
        const T: Table = Table::AuthzWorkloads;
        let describe = |ip: &Ip16| ip_to_addr(ip).to_string();
        let workloads = &self.authz.workloads;
        for (index, w) in workloads.iter().enumerate() {
            if let Some(p) = index.checked_sub(1).and_then(|i| workloads.get(i)) {
                check_order(T, index, &p.ip, &w.ip, describe)?;
            }
            if w.value.pad != 0 {
                return Err(ValidationError::NonZeroPad {
                    table: T,
                    index,
                    record: describe(&w.ip),
                    field: "value.pad",
                    value: w.value.pad,
                });
            }
        }
        Ok(())
    }

    fn validate_authz_sources(&self) -> Result<(), ValidationError> {
        let sources = &self.authz.sources;
        // With an entry for all of IPv4 (`::ffff:0:0/96`), every IPv4 source matches it or a longer
        // prefix, so a shorter IPv6 prefix spanning the range is never an IPv4 source's match.
        let ipv4_shadowed = sources
            .iter()
            .any(|s| s.key.prefix_len == 96 && s.key.ip == IPV4_MAPPED_BASE);
        for (index, s) in sources.iter().enumerate() {
            if let Some(p) = index.checked_sub(1).and_then(|i| sources.get(i)) {
                check_order(Table::AuthzSources, index, &p.key, &s.key, describe_source)?;
            }
            validate_source_key(index, &s.key, ipv4_shadowed)?;
            let source_class = s.value.source_class;
            if source_class == UNKNOWN_SOURCE || source_class == ANY_CLASS {
                return Err(ValidationError::AuthzSourceClass {
                    index,
                    record: describe_source(&s.key),
                    source_class,
                });
            }
        }
        Ok(())
    }

    fn validate_authz_verdicts(&self) -> Result<(), ValidationError> {
        const T: Table = Table::AuthzVerdicts;
        let verdicts = &self.authz.verdicts;
        for (index, v) in verdicts.iter().enumerate() {
            if let Some(p) = index.checked_sub(1).and_then(|i| verdicts.get(i)) {
                check_order(T, index, &p.key, &v.key, describe_verdict_key)?;
            }
            let pads = [("key.pad", v.key.pad), ("value.pad", v.value.pad)];
            if let Some((field, value)) = pads.into_iter().find(|&(_, pad)| pad != 0) {
                return Err(ValidationError::NonZeroPad {
                    table: T,
                    index,
                    record: describe_verdict_key(&v.key),
                    field,
                    value: u32::from(value),
                });
            }
            validate_verdict_value(index, v)?;
        }
        Ok(())
    }

    fn validate_authz_policies(&self) -> Result<(), ValidationError> {
        let policies = &self.authz.policies;
        for (index, p) in policies.iter().enumerate() {
            if let Some(prev) = index.checked_sub(1).and_then(|i| policies.get(i)) {
                check_order(Table::AuthzPolicies, index, &prev.policy, &p.policy, |id| {
                    format!("policy {id}")
                })?;
            }
            validate_policy(index, p)?;
        }
        Ok(())
    }

    /// Every workload's set has its default `(set, ANY_CLASS, ANY_PORT)`, the last link of the
    /// lookup chain: with it, every connection to the workload finds a verdict.
    fn validate_authz_workload_defaults(&self) -> Result<(), ValidationError> {
        for (index, w) in self.authz.workloads.iter().enumerate() {
            let policy_set = w.value.policy_set;
            let default = AuthzVerdictKey {
                policy_set,
                source_class: ANY_CLASS,
                port: ANY_PORT,
                pad: 0,
            };
            if self
                .authz
                .verdicts
                .binary_search_by_key(&default, |v| v.key)
                .is_err()
            {
                return Err(ValidationError::AuthzWorkloadSetMissing {
                    index,
                    record: ip_to_addr(&w.ip).to_string(),
                    policy_set,
                });
            }
        }
        Ok(())
    }

    /// A verdict's policy is 0 exactly when no single policy decided; otherwise it names a policy
    /// record of the kind its reason needs.
    fn validate_authz_verdict_policies(&self) -> Result<(), ValidationError> {
        for (index, v) in self.authz.verdicts.iter().enumerate() {
            let record = || describe_verdict_key(&v.key);
            let (reason, policy) = (v.value.reason, v.value.policy);
            let decided_by_a_policy = !matches!(
                reason,
                authz_reason::NO_ALLOW_POLICY | authz_reason::NO_ALLOW_MATCHED
            );
            match (decided_by_a_policy, policy) {
                (false, 0) => continue,
                (false, _) => {
                    return Err(ValidationError::AuthzVerdictPolicyNotZero {
                        index,
                        record: record(),
                        reason,
                        policy,
                    });
                }
                (true, 0) => {
                    return Err(ValidationError::AuthzVerdictPolicyZero {
                        index,
                        record: record(),
                        reason,
                    });
                }
                (true, _) => {}
            }
            let policies = &self.authz.policies;
            let Ok(found) = policies.binary_search_by_key(&policy, |p| p.policy) else {
                return Err(ValidationError::AuthzVerdictPolicyMissing {
                    index,
                    record: record(),
                    policy,
                });
            };
            let kind = policies[found].kind;
            // A PeerAuthentication decides only as STRICT; an AuthorizationPolicy only by matching.
            // Either kind can fail its workloads closed when it cannot be compiled.
            let expected = match reason {
                authz_reason::STRICT_MTLS => authz_policy_kind::PEER_AUTHENTICATION,
                authz_reason::UNCOMPILABLE => kind,
                _ => authz_policy_kind::AUTHORIZATION_POLICY,
            };
            if kind != expected {
                return Err(ValidationError::AuthzVerdictPolicyKind {
                    index,
                    record: record(),
                    policy,
                    reason,
                    kind,
                    expected,
                });
            }
        }
        Ok(())
    }
}

/// A source prefix the kernel's LPM trie holds as meant: at most 128 bits, of one address family
/// (or shadowed for IPv4 by an entry for `::ffff:0:0/96`, `ipv4_shadowed`), with no address bit
/// set past its length.
fn validate_source_key(
    index: usize,
    key: &AuthzSourceKey,
    ipv4_shadowed: bool,
) -> Result<(), ValidationError> {
    let record = || describe_source(key);
    let prefix_len = key.prefix_len;
    if prefix_len > 128 {
        return Err(ValidationError::AuthzSourcePrefixLen {
            index,
            record: record(),
            prefix_len,
        });
    }
    // Checked before canonical form, so that `::ffff:10.0.0.0/80` is named for what it means.
    if prefix_len < 96 && prefix_contains(key, &IPV4_MAPPED_BASE) && !ipv4_shadowed {
        return Err(ValidationError::AuthzSourceMixesFamilies {
            index,
            record: record(),
            prefix_len,
        });
    }
    if !prefix_is_canonical(key) {
        return Err(ValidationError::AuthzSourceNotCanonical {
            index,
            record: record(),
            prefix_len,
        });
    }
    Ok(())
}

/// A known action, a known reason, and the two consistent: allowed only when no ALLOW policy binds
/// or one matched, denied for every other reason.
fn validate_verdict_value(index: usize, v: &AuthzVerdictRecord) -> Result<(), ValidationError> {
    let record = || describe_verdict_key(&v.key);
    let (action, reason) = (v.value.action, v.value.reason);
    if !matches!(action, authz_action::ALLOW | authz_action::DENY) {
        return Err(ValidationError::AuthzUnknownAction {
            index,
            record: record(),
            action,
        });
    }
    if reason == 0 || reason >= authz_reason::COUNT {
        return Err(ValidationError::AuthzUnknownReason {
            index,
            record: record(),
            reason,
        });
    }
    let allowing = matches!(
        reason,
        authz_reason::NO_ALLOW_POLICY | authz_reason::ALLOW_MATCHED
    );
    if allowing != (action == authz_action::ALLOW) {
        return Err(ValidationError::AuthzReasonAction {
            index,
            record: record(),
            action,
            reason,
        });
    }
    Ok(())
}

/// A policy record: a non-zero ID, a known kind, zero padding, and a `namespace/name` name whose
/// unused bytes are zero.
fn validate_policy(index: usize, p: &AuthzPolicyRecord) -> Result<(), ValidationError> {
    let policy = p.policy;
    if policy == 0 {
        return Err(ValidationError::AuthzPolicyIdZero { index });
    }
    if !matches!(
        p.kind,
        authz_policy_kind::AUTHORIZATION_POLICY | authz_policy_kind::PEER_AUTHENTICATION
    ) {
        return Err(ValidationError::AuthzPolicyKind {
            index,
            policy,
            kind: p.kind,
        });
    }
    if p.pad != 0 {
        return Err(ValidationError::NonZeroPad {
            table: Table::AuthzPolicies,
            index,
            record: format!("policy {policy}"),
            field: "pad",
            value: u32::from(p.pad),
        });
    }
    let name_len = usize::from(p.name_len);
    if name_len == 0 || name_len > MAX_POLICY_NAME_LEN {
        return Err(ValidationError::AuthzPolicyNameLen {
            index,
            policy,
            name_len: p.name_len,
        });
    }
    let (name, tail) = p.name.split_at(name_len);
    if let Some((offset, &value)) = tail.iter().enumerate().find(|&(_, &b)| b != 0) {
        return Err(ValidationError::AuthzPolicyNameTail {
            index,
            policy,
            name_len: p.name_len,
            offset: name_len + offset,
            value,
        });
    }
    if let Some(reason) = policy_name_problem(name) {
        return Err(ValidationError::AuthzPolicyName {
            index,
            policy,
            name: String::from_utf8_lossy(name).into_owned(),
            reason,
        });
    }
    Ok(())
}

/// What is wrong with a policy name, if anything: it must be `namespace/name`, the namespace a DNS
/// label and the name a DNS subdomain, as Kubernetes validates them ([`crate::names`]).
fn policy_name_problem(name: &[u8]) -> Option<&'static str> {
    let Some(slash) = name.iter().position(|&b| b == b'/') else {
        return Some("is not namespace/name (no '/')");
    };
    let (namespace, object) = (&name[..slash], &name[slash + 1..]);
    names::namespace_problem(namespace).or_else(|| names::object_name_problem(object))
}

/// A source prefix for messages: `10.1.2.0/24` for IPv4 blocks (prefix_len 96..=128 on an
/// IPv4-mapped address, shown in CIDR terms), `fd00::/8` otherwise (IPv4-mapped addresses with
/// another prefix length show as `::ffff:10.0.0.0/80`).
pub(crate) fn describe_source(key: &AuthzSourceKey) -> String {
    match kmesh_common::as_ipv4(&key.ip) {
        Some(v4) if (96..=128).contains(&key.prefix_len) => {
            format!("{}/{}", core::net::Ipv4Addr::from(v4), key.prefix_len - 96)
        }
        _ => format!("{}/{}", core::net::Ipv6Addr::from(key.ip), key.prefix_len),
    }
}

/// A verdict key for messages: `set 3, class 2, port 8080`, with `any class` and `any port` for the
/// wildcards.
pub(crate) fn describe_verdict_key(key: &AuthzVerdictKey) -> String {
    let class = match key.source_class {
        ANY_CLASS => "any class".to_string(),
        c => format!("class {c}"),
    };
    let port = match key.port {
        ANY_PORT => "any port".to_string(),
        p => format!("port {p}"),
    };
    format!("set {}, {class}, {port}", key.policy_set)
}
