//! Authorization tables for the kernel tests, written record by record: a destination workload's
//! verdict set, source classes of addresses and blocks, verdicts of (set, class, port) and the
//! policies' names. The tests build exactly the tables they mean (what the operator would compile
//! is the compiler's tests' business), then [`AuthzTablesBuilder::into_tables`] sorts them as a
//! snapshot requires.
use std::net::IpAddr;

use kmesh_common::{
    AuthzPolicyRecord, AuthzSourceKey, AuthzSourceRecord, AuthzSourceValue, AuthzVerdict,
    AuthzVerdictKey, AuthzVerdictRecord, AuthzWorkloadRecord, AuthzWorkloadValue,
    authz::{ANY_CLASS, ANY_PORT, MAX_POLICY_NAME_LEN, authz_action, authz_policy_kind},
    ip16,
};
use kmesh_snapshot::AuthzTables;

/// A verdict: its action, reason and deciding policy (0: none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub action: u8,
    pub reason: u8,
    pub policy: u32,
}

impl Verdict {
    pub fn allow(reason: u8, policy: u32) -> Verdict {
        Verdict {
            action: authz_action::ALLOW,
            reason,
            policy,
        }
    }

    pub fn deny(reason: u8, policy: u32) -> Verdict {
        Verdict {
            action: authz_action::DENY,
            reason,
            policy,
        }
    }
}

/// Which sources a verdict entry covers.
#[derive(Clone, Copy, Debug)]
pub enum Class {
    Any,
    Of(u32),
}

/// Which destination ports a verdict entry covers.
#[derive(Clone, Copy, Debug)]
pub enum Port {
    Any,
    Of(u16),
}

/// Collects the four authorization tables.
#[derive(Default)]
pub struct AuthzTablesBuilder {
    tables: AuthzTables,
}

impl AuthzTablesBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Connections to `ip` are judged by verdict set `set`.
    pub fn workload(&mut self, ip: IpAddr, set: u32) -> &mut Self {
        self.tables.workloads.push(AuthzWorkloadRecord {
            ip: ip16(ip),
            value: AuthzWorkloadValue {
                policy_set: set,
                pad: 0,
            },
        });
        self
    }

    /// Sources in `ip`/`cidr_len` (CIDR notation of the address's family) are of class `class`.
    pub fn source(&mut self, ip: IpAddr, cidr_len: u32, class: u32) -> &mut Self {
        let prefix_len = match ip {
            IpAddr::V4(_) => 96 + cidr_len,
            IpAddr::V6(_) => cidr_len,
        };
        self.tables.sources.push(AuthzSourceRecord {
            key: AuthzSourceKey {
                prefix_len,
                ip: ip16(ip),
            },
            value: AuthzSourceValue {
                source_class: class,
            },
        });
        self
    }

    /// The verdict of set `set` for `class` on `port`.
    pub fn verdict(&mut self, set: u32, class: Class, port: Port, verdict: Verdict) -> &mut Self {
        self.tables.verdicts.push(AuthzVerdictRecord {
            key: AuthzVerdictKey {
                policy_set: set,
                source_class: match class {
                    Class::Any => ANY_CLASS,
                    Class::Of(c) => c,
                },
                port: match port {
                    Port::Any => ANY_PORT,
                    Port::Of(p) => p,
                },
                pad: 0,
            },
            value: AuthzVerdict {
                policy: verdict.policy,
                action: verdict.action,
                reason: verdict.reason,
                pad: 0,
            },
        });
        self
    }

    /// Names the AuthorizationPolicy `policy` (`namespace/name`).
    pub fn policy(&mut self, policy: u32, name: &str) -> &mut Self {
        let mut bytes = [0u8; MAX_POLICY_NAME_LEN];
        let len = name.len().min(MAX_POLICY_NAME_LEN);
        bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        self.tables.policies.push(AuthzPolicyRecord {
            policy,
            name_len: len as u16,
            kind: authz_policy_kind::AUTHORIZATION_POLICY,
            pad: 0,
            name: bytes,
        });
        self
    }

    /// The tables, each sorted by key.
    pub fn into_tables(self) -> AuthzTables {
        let mut t = self.tables;
        t.workloads.sort_unstable();
        t.sources.sort_unstable();
        t.verdicts.sort_unstable();
        t.policies.sort_unstable();
        t
    }
}
