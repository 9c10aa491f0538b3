//! Authorization: the records of the per-generation authorization tables, and the one lookup chain
//! that turns (destination workload, source class, destination port) into a verdict.
//!
//! The operator evaluates every Istio AuthorizationPolicy and PeerAuthentication that binds a
//! workload of the node, for every source class and every port a policy mentions, and writes the
//! outcome as a table of verdicts. The kernel therefore evaluates no rule at connection time: it
//! does at most one LPM lookup (the source's class) and four hash lookups (the chain in
//! [`resolve_verdict`]), whatever the number of policies. That is what keeps denial fast and the
//! tables free of per-workload caps.
//!
//! - **Workloads** (`KM_AUTHZ_WORKLOADS`, keyed by the destination pod IP): which verdict set
//!   applies to connections to that address. No entry: no policy binds the workload; allow.
//! - **Sources** (`KM_AUTHZ_SOURCES`, an LPM trie): the source class of a remote address. Every
//!   mesh workload of the cluster has a full-length entry (its class carries its identity), every
//!   address block a policy names has an entry; the class of an address is the one of its longest
//!   matching prefix, [`UNKNOWN_SOURCE`] when none matches. A class stands for everything a policy
//!   can ask about a source (identity, namespace, the blocks holding it), so two sources of one
//!   class always get the same verdict.
//! - **Verdicts** (`KM_AUTHZ_VERDICTS`): `(set, class, port)` → verdict, compressed with the
//!   wildcards [`ANY_CLASS`] and [`ANY_PORT`] and read through [`resolve_verdict`].
//!
//! All of them are per generation, so a policy change flips with the routes that go with it.
use crate::Ip16;

/// Source class of an address no source entry covers: no mesh identity, in no named block.
pub const UNKNOWN_SOURCE: u32 = 0;
/// Source class of a verdict key that stands for every class without an entry of its own.
pub const ANY_CLASS: u32 = u32::MAX;
/// Port of a verdict key that stands for every port without an entry of its own. A TCP connection
/// never has destination port 0.
pub const ANY_PORT: u16 = 0;

/// What happens to a new inbound connection.
pub mod authz_action {
    /// The connection proceeds to the listening socket.
    pub const ALLOW: u8 = 1;
    /// The SYN finds no socket: the client gets a RST and connect() fails with ECONNREFUSED.
    pub const DENY: u8 = 2;
}

/// Why a verdict is what it is; with the verdict's `policy`, what the counters are keyed by.
pub mod authz_reason {
    /// Allowed: no ALLOW policy binds the workload and nothing denied.
    pub const NO_ALLOW_POLICY: u8 = 1;
    /// Allowed by the ALLOW policy `policy`.
    pub const ALLOW_MATCHED: u8 = 2;
    /// Denied by the DENY policy `policy`.
    pub const DENY_MATCHED: u8 = 3;
    /// Denied: ALLOW policies bind the workload and none matched (`policy` is 0).
    pub const NO_ALLOW_MATCHED: u8 = 4;
    /// Denied: the source has no mesh identity and the PeerAuthentication `policy` makes the port
    /// STRICT.
    pub const STRICT_MTLS: u8 = 5;
    /// Denied: `policy` binds the workload but could not be compiled, so the workload fails closed.
    pub const UNCOMPILABLE: u8 = 6;
    /// One past the largest valid value.
    pub const COUNT: u8 = 7;
}

/// The kind of object an [`AuthzPolicyRecord`] names.
pub mod authz_policy_kind {
    pub const AUTHORIZATION_POLICY: u8 = 1;
    pub const PEER_AUTHENTICATION: u8 = 2;
}

/// Value of the authorization workloads table, keyed by the workload's address ([`Ip16`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthzWorkloadValue {
    /// The verdict set of connections to this address. Workloads bound by the same policies with
    /// the same outcome share a set.
    pub policy_set: u32,
    pub pad: u32,
}

/// Key of the sources table. Its layout is the kernel's LPM trie key (`struct
/// bpf_lpm_trie_key_u8`): the prefix length in bits, then the address. IPv4 blocks are stored
/// IPv4-mapped, so their prefix length is 96 more than in CIDR notation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthzSourceKey {
    /// 0..=128; every address bit past it is zero.
    pub prefix_len: u32,
    pub ip: Ip16,
}

/// Value of the sources table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthzSourceValue {
    /// Never [`UNKNOWN_SOURCE`] nor [`ANY_CLASS`].
    pub source_class: u32,
}

/// Key of the verdicts table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthzVerdictKey {
    pub policy_set: u32,
    /// A source class, or [`ANY_CLASS`].
    pub source_class: u32,
    /// A destination (target) port, or [`ANY_PORT`].
    pub port: u16,
    pub pad: u16,
}

/// Value of the verdicts table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthzVerdict {
    /// The deciding policy's ID (an [`AuthzPolicyRecord`] of the snapshot), or 0 when no single
    /// policy decided ([`authz_reason::NO_ALLOW_POLICY`], [`authz_reason::NO_ALLOW_MATCHED`]).
    pub policy: u32,
    /// One of [`authz_action`].
    pub action: u8,
    /// One of [`authz_reason`].
    pub reason: u8,
    pub pad: u16,
}

/// Key of the authorization counters (a per-CPU hash, not per generation: IDs are stable hashes
/// of names, so counts carry across generations). The value is the number of connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthzCounterKey {
    /// The destination workload's address.
    pub workload_ip: Ip16,
    /// As in [`AuthzVerdict`].
    pub policy: u32,
    pub action: u8,
    pub reason: u8,
    pub pad: u16,
}

/// Value of the host addresses map (keyed by [`Ip16`]), which the agent fills with its node's own
/// addresses. Connections from them are exempt, as in Istio ambient, so that kubelet probes keep a
/// STRICT workload ready. Not per generation: these are facts of the node, not policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostAddrValue {
    /// Reserved; zero.
    pub flags: u32,
}

// Snapshot records.

/// An authorization workloads table entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthzWorkloadRecord {
    pub ip: Ip16,
    pub value: AuthzWorkloadValue,
}

/// A sources table entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthzSourceRecord {
    pub key: AuthzSourceKey,
    pub value: AuthzSourceValue,
}

/// A verdicts table entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthzVerdictRecord {
    pub key: AuthzVerdictKey,
    pub value: AuthzVerdict,
}

/// The longest policy name: a namespace (63), a slash and an object name (253), rounded up.
pub const MAX_POLICY_NAME_LEN: usize = 320;

/// The name of a policy a verdict can name, for counters, logs and `kmeshctl`. Not loaded into the
/// kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthzPolicyRecord {
    /// Non-zero; the stable ID verdicts refer to.
    pub policy: u32,
    /// Length of the name in `name`; the rest of `name` is zero.
    pub name_len: u16,
    /// One of [`authz_policy_kind`].
    pub kind: u8,
    pub pad: u8,
    /// `namespace/name`.
    pub name: [u8; MAX_POLICY_NAME_LEN],
}

/// The verdict for a new connection to a workload whose verdict set is `policy_set`, from a
/// source of class `source_class`, to destination port `port`.
///
/// The first entry found in this order wins:
/// 1. `(set, class, port)`
/// 2. `(set, class, ANY_PORT)`
/// 3. `(set, ANY_CLASS, port)`
/// 4. `(set, ANY_CLASS, ANY_PORT)`: the set's default, which a valid snapshot always has.
///
/// `None` only when even the default is missing; callers deny (fail closed). This is the only
/// definition of the chain: the kernel program runs it over its maps, the agent over a snapshot's
/// records, and the compiler checks its compression with it.
#[inline(always)]
pub fn resolve_verdict<F>(
    policy_set: u32,
    source_class: u32,
    port: u16,
    mut lookup: F,
) -> Option<AuthzVerdict>
where
    F: FnMut(&AuthzVerdictKey) -> Option<AuthzVerdict>,
{
    let key = |source_class, port| AuthzVerdictKey {
        policy_set,
        source_class,
        port,
        pad: 0,
    };
    if let Some(v) = lookup(&key(source_class, port)) {
        return Some(v);
    }
    if let Some(v) = lookup(&key(source_class, ANY_PORT)) {
        return Some(v);
    }
    if let Some(v) = lookup(&key(ANY_CLASS, port)) {
        return Some(v);
    }
    lookup(&key(ANY_CLASS, ANY_PORT))
}

/// Whether the prefix `key` holds `ip`.
pub fn prefix_contains(key: &AuthzSourceKey, ip: &Ip16) -> bool {
    if key.prefix_len > 128 {
        return false;
    }
    let full_bytes = (key.prefix_len / 8) as usize;
    let rest_bits = key.prefix_len % 8;
    if key.ip[..full_bytes] != ip[..full_bytes] {
        return false;
    }
    if rest_bits == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest_bits);
    (key.ip[full_bytes] & mask) == (ip[full_bytes] & mask)
}

/// Whether every address bit of `key` past its prefix length is zero (the one form of a prefix
/// the snapshot accepts).
pub fn prefix_is_canonical(key: &AuthzSourceKey) -> bool {
    if key.prefix_len > 128 {
        return false;
    }
    let mut masked = AuthzSourceKey {
        prefix_len: key.prefix_len,
        ip: [0; 16],
    };
    let mut i = 0;
    while i < 16 {
        let bit = (i as u32) * 8;
        masked.ip[i] = if bit + 8 <= key.prefix_len {
            key.ip[i]
        } else if bit >= key.prefix_len {
            0
        } else {
            key.ip[i] & (0xffu8 << (8 - (key.prefix_len - bit)))
        };
        i += 1;
    }
    masked.ip == key.ip
}

/// The source class of `ip` among `sources` (the user-space twin of the kernel's LPM lookup):
/// the class of the longest prefix that holds it, [`UNKNOWN_SOURCE`] when none does.
pub fn source_class(sources: &[AuthzSourceRecord], ip: &Ip16) -> u32 {
    let mut best: Option<&AuthzSourceRecord> = None;
    for s in sources {
        if prefix_contains(&s.key, ip) && best.is_none_or(|b| s.key.prefix_len > b.key.prefix_len) {
            best = Some(s);
        }
    }
    best.map_or(UNKNOWN_SOURCE, |s| s.value.source_class)
}

const _: () = {
    assert!(size_of::<AuthzWorkloadValue>() == 8);
    assert!(size_of::<AuthzSourceKey>() == 20);
    assert!(size_of::<AuthzSourceValue>() == 4);
    assert!(size_of::<AuthzVerdictKey>() == 12);
    assert!(size_of::<AuthzVerdict>() == 8);
    assert!(size_of::<AuthzCounterKey>() == 24);
    assert!(size_of::<HostAddrValue>() == 4);
    assert!(size_of::<AuthzWorkloadRecord>() == 24);
    assert!(size_of::<AuthzSourceRecord>() == 24);
    assert!(size_of::<AuthzVerdictRecord>() == 20);
    assert!(size_of::<AuthzPolicyRecord>() == 8 + MAX_POLICY_NAME_LEN);
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipv4_mapped;

    fn verdict(policy: u32, action: u8) -> AuthzVerdict {
        AuthzVerdict {
            policy,
            action,
            reason: authz_reason::DENY_MATCHED,
            pad: 0,
        }
    }

    #[test]
    fn the_chain_prefers_class_and_port_then_class_then_port_then_the_default() {
        let table = [
            ((7, 1, 80), verdict(1, authz_action::ALLOW)),
            ((7, 1, ANY_PORT), verdict(2, authz_action::DENY)),
            ((7, ANY_CLASS, 80), verdict(3, authz_action::ALLOW)),
            ((7, ANY_CLASS, ANY_PORT), verdict(4, authz_action::DENY)),
        ];
        let lookup = |k: &AuthzVerdictKey| {
            table
                .iter()
                .find(|((s, c, p), _)| (*s, *c, *p) == (k.policy_set, k.source_class, k.port))
                .map(|(_, v)| *v)
        };
        let policy = |class, port| resolve_verdict(7, class, port, lookup).map(|v| v.policy);
        assert_eq!(policy(1, 80), Some(1));
        assert_eq!(policy(1, 443), Some(2));
        assert_eq!(policy(2, 80), Some(3));
        assert_eq!(policy(2, 443), Some(4));
        assert_eq!(resolve_verdict(8, 1, 80, lookup), None);
    }

    #[test]
    fn the_longest_prefix_decides_the_class() {
        let rec = |prefix_len, ip, class| AuthzSourceRecord {
            key: AuthzSourceKey { prefix_len, ip },
            value: AuthzSourceValue {
                source_class: class,
            },
        };
        let sources = [
            rec(96 + 8, ipv4_mapped([10, 0, 0, 0]), 1),
            rec(96 + 24, ipv4_mapped([10, 1, 2, 0]), 2),
            rec(128, ipv4_mapped([10, 1, 2, 3]), 3),
        ];
        assert_eq!(source_class(&sources, &ipv4_mapped([10, 1, 2, 3])), 3);
        assert_eq!(source_class(&sources, &ipv4_mapped([10, 1, 2, 4])), 2);
        assert_eq!(source_class(&sources, &ipv4_mapped([10, 9, 2, 4])), 1);
        assert_eq!(
            source_class(&sources, &ipv4_mapped([11, 1, 2, 3])),
            UNKNOWN_SOURCE
        );
    }

    #[test]
    fn canonical_prefixes_have_no_bits_past_their_length() {
        let key = |prefix_len, ip| AuthzSourceKey { prefix_len, ip };
        assert!(prefix_is_canonical(&key(
            96 + 24,
            ipv4_mapped([10, 1, 2, 0])
        )));
        assert!(!prefix_is_canonical(&key(
            96 + 24,
            ipv4_mapped([10, 1, 2, 1])
        )));
        assert!(prefix_is_canonical(&key(
            96 + 23,
            ipv4_mapped([10, 1, 2, 0])
        )));
        assert!(!prefix_is_canonical(&key(
            96 + 22,
            ipv4_mapped([10, 1, 2, 0])
        )));
        assert!(prefix_is_canonical(&key(0, [0; 16])));
        assert!(!prefix_is_canonical(&key(129, [0; 16])));
    }
}
