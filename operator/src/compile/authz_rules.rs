//! The L4 form of an AuthorizationPolicy, and when it matches a connection: ztunnel's model
//! (`src/rbac.rs`, `Authorization::matches`) as istiod's ambient conversion feeds it.
//!
//! Promises:
//! - a policy matches when any of its rules matches; a policy with no rules matches nothing;
//! - a rule matches when all of its clauses hold (a rule with no clauses matches everything:
//!   `rules: [{}]`);
//! - a clause holds when one of its non-empty matches matches; empty matches are skipped, so a
//!   clause of only empty matches never holds (a `from`/`to`/`when` entry left empty by stripping
//!   L7 fields makes its rule a no-op);
//! - inside a match every non-empty field must hold; values of a field are ORed, a `not` field
//!   holds when none of its values matches;
//! - a source without identity has principal and namespace "": it fails `principals` and passes
//!   `notPrincipals`.
use std::collections::BTreeSet;

use kmesh_common::{
    Ip16,
    authz::{AuthzSourceKey, prefix_contains},
};

/// An address block (`ipBlocks`, `source.ip`, `destination.ip`), in the sources table's form:
/// IPv4 as IPv4-mapped with 96 added to its prefix length, canonical (no bits past the prefix).
pub(super) type Block = AuthzSourceKey;

/// Whether `ip` is an IPv4 address (IPv4-mapped).
fn is_v4(ip: &Ip16) -> bool {
    ip.starts_with(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff])
}

/// Whether `block` is an IPv4 block (IPv4-mapped, 96 added to its length).
pub(super) fn is_v4_block(block: &Block) -> bool {
    block.prefix_len >= 96 && is_v4(&block.ip)
}

/// Whether `block` holds `ip`, as Istio (Go's `netip.Prefix.Contains`) decides: only within one
/// address family, so `::/0` holds no IPv4 address.
pub(super) fn block_holds(block: &Block, ip: &Ip16) -> bool {
    is_v4_block(block) == is_v4(ip) && prefix_contains(block, ip)
}

/// A string match of Istio's: exact, `prefix*`, `*suffix`, or `*` (any non-empty string).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    pub(super) fn parse(value: &str) -> StringMatch {
        if value == "*" {
            StringMatch::Presence
        } else if let Some(prefix) = value.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_string())
        } else if let Some(suffix) = value.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_string())
        } else {
            StringMatch::Exact(value.to_string())
        }
    }

    fn matches(&self, s: &str) -> bool {
        match self {
            StringMatch::Exact(e) => s == e,
            StringMatch::Prefix(p) => s.starts_with(p.as_str()),
            StringMatch::Suffix(x) => s.ends_with(x.as_str()),
            StringMatch::Presence => !s.is_empty(),
        }
    }
}

/// One match: every non-empty field must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<Block>,
    pub not_source_ips: Vec<Block>,
    pub destination_ips: Vec<Block>,
    pub not_destination_ips: Vec<Block>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

/// ORed matches; see the module documentation for empty ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Clause(pub Vec<Match>);

/// ANDed clauses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Rule(pub Vec<Clause>);

/// What a policy may ask about a connection: the source (its class's facts), the destination
/// workload address and the destination port (`None`: a port no policy names).
#[derive(Clone, Copy, Debug)]
pub(super) struct Connection<'a> {
    /// `cluster.local/ns/<ns>/sa/<sa>`, or "" without identity.
    pub principal: &'a str,
    /// The source's namespace, or "" without identity.
    pub namespace: &'a str,
    /// The blocks (of those the node's policies name) holding the source address.
    pub source_blocks: &'a BTreeSet<Block>,
    pub destination_ip: &'a Ip16,
    pub port: Option<u16>,
}

impl Match {
    pub(super) fn is_empty(&self) -> bool {
        *self == Match::default()
    }

    fn matches(&self, c: &Connection<'_>) -> bool {
        let strings = |values: &[StringMatch], s: &str| values.iter().any(|v| v.matches(s));
        let in_blocks = |blocks: &[Block]| blocks.iter().any(|b| c.source_blocks.contains(b));
        let holds_destination =
            |blocks: &[Block]| blocks.iter().any(|b| block_holds(b, c.destination_ip));
        let port_in = |ports: &[u16]| c.port.is_some_and(|p| ports.contains(&p));
        (self.namespaces.is_empty() || strings(&self.namespaces, c.namespace))
            && !strings(&self.not_namespaces, c.namespace)
            && (self.principals.is_empty() || strings(&self.principals, c.principal))
            && !strings(&self.not_principals, c.principal)
            && (self.source_ips.is_empty() || in_blocks(&self.source_ips))
            && !in_blocks(&self.not_source_ips)
            && (self.destination_ips.is_empty() || holds_destination(&self.destination_ips))
            && !holds_destination(&self.not_destination_ips)
            && (self.destination_ports.is_empty() || port_in(&self.destination_ports))
            && !port_in(&self.not_destination_ports)
    }

    /// Every port the match names.
    fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.destination_ports
            .iter()
            .chain(&self.not_destination_ports)
            .copied()
    }

    /// Every source block the match names.
    fn source_blocks(&self) -> impl Iterator<Item = &Block> {
        self.source_ips.iter().chain(&self.not_source_ips)
    }
}

impl Clause {
    fn holds(&self, c: &Connection<'_>) -> bool {
        if self.0.is_empty() {
            return true;
        }
        self.0.iter().any(|m| !m.is_empty() && m.matches(c))
    }
}

impl Rule {
    pub(super) fn matches(&self, c: &Connection<'_>) -> bool {
        self.0.iter().all(|clause| clause.holds(c))
    }

    fn all_matches(&self) -> impl Iterator<Item = &Match> {
        self.0.iter().flat_map(|clause| &clause.0)
    }

    /// Whether the rule names the destination address (so its verdicts differ per workload).
    pub(super) fn uses_destination_ip(&self) -> bool {
        self.all_matches()
            .any(|m| !m.destination_ips.is_empty() || !m.not_destination_ips.is_empty())
    }
}

/// Whether any of `rules` matches: a policy with no rules matches nothing.
pub(super) fn any_rule_matches(rules: &[Rule], c: &Connection<'_>) -> bool {
    rules.iter().any(|r| r.matches(c))
}

/// Every port `rules` name.
pub(super) fn ports_named(rules: &[Rule]) -> impl Iterator<Item = u16> + '_ {
    rules
        .iter()
        .flat_map(Rule::all_matches)
        .flat_map(Match::ports)
}

/// Every source block `rules` name.
pub(super) fn source_blocks_named(rules: &[Rule]) -> impl Iterator<Item = &Block> {
    rules
        .iter()
        .flat_map(Rule::all_matches)
        .flat_map(Match::source_blocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmesh_common::ipv4_mapped;

    fn conn<'a>(principal: &'a str, blocks: &'a BTreeSet<Block>, ip: &'a Ip16) -> Connection<'a> {
        Connection {
            principal,
            namespace: principal.split('/').nth(2).unwrap_or(""),
            source_blocks: blocks,
            destination_ip: ip,
            port: Some(80),
        }
    }

    #[test]
    fn string_matches_follow_istio() {
        let m = |pattern: &str, s: &str| StringMatch::parse(pattern).matches(s);
        assert!(m("ns", "ns") && !m("ns", "ns2"));
        assert!(m("ns-*", "ns-a") && !m("ns-*", "a-ns"));
        assert!(m("*-a", "ns-a") && !m("*-a", "ns-b"));
        assert!(
            m("*", "x") && !m("*", ""),
            "`*` is presence: not the empty string"
        );
    }

    #[test]
    fn empty_matches_never_hold_and_no_rules_match_nothing() {
        let blocks = BTreeSet::new();
        let ip = ipv4_mapped([10, 0, 0, 1]);
        let c = conn("", &blocks, &ip);
        assert!(!any_rule_matches(&[], &c), "no rules: nothing");
        assert!(
            any_rule_matches(&[Rule::default()], &c),
            "[{{}}]: everything"
        );
        let only_empty = Rule(vec![Clause(vec![Match::default()])]);
        assert!(
            !only_empty.matches(&c),
            "a clause of empty matches never holds"
        );
        let not_principal = Match {
            not_principals: vec![StringMatch::Presence],
            ..Default::default()
        };
        let strict = Rule(vec![Clause(vec![Match::default(), not_principal])]);
        assert!(strict.matches(&c), "no identity passes notPrincipals [*]");
        let d = conn("cluster.local/ns/a/sa/b", &blocks, &ip);
        assert!(!strict.matches(&d));
    }
}
