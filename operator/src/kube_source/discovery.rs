//! At which version to watch each kind a CRD defines: the API server's answer to discovery
//! ([`ServedApis`], one request: aggregated discovery of the kinds' groups), and the choice made
//! from it ([`choose`], pure).
//!
//! The choice: the group's preferred version if it serves the kind and the compiler reads it
//! (the kind's versions in the [`kinds`](crate::kinds) table), else the first of the table's
//! versions that is served. A kind served only at versions the compiler does not read is
//! [`Served::OtherVersions`] — never watched at a shape the compiler has not been checked
//! against — and a kind served at no version is [`Served::NotInstalled`].
//!
//! Built-in kinds are not discovered: they are watched at their GA version (`v1`), which every
//! API server the operator supports serves, so a discovery failure cannot hold them back.
use std::collections::BTreeMap;

use kube::{Client, discovery::Discovery};
use tracing::debug;

use crate::kinds::{Kind, KindInfo};

/// Where a kind is served, as far as the operator is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Served {
    /// Discovery has not answered yet.
    Unknown,
    /// Served at this version, which the compiler reads: watch it there.
    At(String),
    /// No version is served: the CRD is not installed (or not established yet).
    NotInstalled,
    /// Served only at these versions, none of which the compiler reads.
    OtherVersions(Vec<String>),
}

/// What discovery found, for the groups asked about: per group, the preferred version and, per
/// served version, the resources (kind and plural) it serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServedApis {
    pub groups: BTreeMap<String, ServedGroup>,
}

/// One API group as discovery describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServedGroup {
    /// The version the API server prefers for the group.
    pub preferred: Option<String>,
    /// Each served version with its resources as (kind, plural), in the API server's order.
    pub versions: Vec<(String, Vec<(String, String)>)>,
}

impl ServedGroup {
    /// The versions that serve `info`'s kind under its plural.
    fn versions_serving(&self, info: &KindInfo) -> Vec<&str> {
        let serves = |resources: &Vec<(String, String)>| {
            resources
                .iter()
                .any(|(kind, plural)| kind == info.name && plural == info.plural)
        };
        let serving = self
            .versions
            .iter()
            .filter(|(_, resources)| serves(resources));
        serving.map(|(version, _)| version.as_str()).collect()
    }
}

/// Where `kind` should be watched, given what is served. A kind missing from the table is
/// [`Served::NotInstalled`]: nothing says how to read it.
pub fn choose(kind: &Kind, apis: &ServedApis) -> Served {
    let Some(info) = kind.info() else {
        return Served::NotInstalled;
    };
    let Some(group) = apis.groups.get(info.group) else {
        return Served::NotInstalled;
    };
    let serving = group.versions_serving(info);
    if serving.is_empty() {
        return Served::NotInstalled;
    }
    let readable = |version: &&str| info.versions.contains(version);
    let preferred = group.preferred.as_deref();
    if let Some(version) = preferred.filter(|p| serving.contains(p) && readable(p)) {
        return Served::At(version.to_string());
    }
    let first_readable = info.versions.iter().find(|v| serving.contains(v));
    match first_readable {
        Some(version) => Served::At(version.to_string()),
        None => Served::OtherVersions(serving.into_iter().map(String::from).collect()),
    }
}

/// The API groups of `kinds`, each once.
pub fn groups_of(kinds: &[Kind]) -> Vec<&'static str> {
    let mut groups: Vec<&'static str> = kinds
        .iter()
        .filter_map(|k| k.info().map(|i| i.group))
        .collect();
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// Asks the API server which versions of `groups` it serves: aggregated discovery (one request
/// for every group), or, from an API server without it, one request per group version.
pub async fn discover(client: &Client, groups: &[&str]) -> Result<ServedApis, kube::Error> {
    let aggregated = Discovery::new(client.clone())
        .filter(groups)
        .run_aggregated()
        .await;
    let discovery = match aggregated {
        Ok(discovery) => discovery,
        Err(error) => {
            debug!(%error, "aggregated discovery failed; asking group by group");
            Discovery::new(client.clone()).filter(groups).run().await?
        }
    };
    Ok(served_apis(&discovery))
}

fn served_apis(discovery: &Discovery) -> ServedApis {
    let groups = discovery.groups().map(|group| {
        let versions = group.versions().map(|version| {
            let resources = group.versioned_resources(version).into_iter();
            let resources = resources.map(|(resource, _)| (resource.kind, resource.plural));
            (version.to_string(), resources.collect())
        });
        let served = ServedGroup {
            preferred: group.preferred_version().map(String::from),
            versions: versions.collect(),
        };
        (group.name().to_string(), served)
    });
    ServedApis {
        groups: groups.collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATEWAY: &str = "gateway.networking.k8s.io";

    fn group(preferred: &str, versions: &[(&str, &[(&str, &str)])]) -> ServedGroup {
        let versions = versions.iter().map(|(version, resources)| {
            let resources = resources
                .iter()
                .map(|(k, p)| (k.to_string(), p.to_string()));
            (version.to_string(), resources.collect())
        });
        ServedGroup {
            preferred: Some(preferred.to_string()),
            versions: versions.collect(),
        }
    }

    fn apis(groups: Vec<(&str, ServedGroup)>) -> ServedApis {
        let groups = groups.into_iter().map(|(name, g)| (name.to_string(), g));
        ServedApis {
            groups: groups.collect(),
        }
    }

    fn at(version: &str) -> Served {
        Served::At(version.to_string())
    }

    #[test]
    fn gateway_api_v1_6_serves_tcp_route_at_v1() {
        // What Gateway API v1.6.1's standard CRDs serve: TCPRoute at v1 only (v1alpha2 has
        // served=false), ReferenceGrant at v1 and v1beta1.
        let served = apis(vec![(
            GATEWAY,
            group(
                "v1",
                &[
                    (
                        "v1",
                        &[
                            ("HTTPRoute", "httproutes"),
                            ("TCPRoute", "tcproutes"),
                            ("TCPRoute", "tcproutes/status"),
                            ("ReferenceGrant", "referencegrants"),
                        ],
                    ),
                    (
                        "v1beta1",
                        &[
                            ("HTTPRoute", "httproutes"),
                            ("ReferenceGrant", "referencegrants"),
                        ],
                    ),
                ],
            ),
        )]);
        assert_eq!(choose(&Kind::TcpRoute, &served), at("v1"));
        assert_eq!(choose(&Kind::HttpRoute, &served), at("v1"));
        assert_eq!(choose(&Kind::ReferenceGrant, &served), at("v1"));
        assert_eq!(choose(&Kind::VirtualService, &served), Served::NotInstalled);
    }

    #[test]
    fn older_gateway_api_serves_tcp_route_at_v1alpha2() {
        // Gateway API v1.2: TCPRoute at v1alpha2 only, ReferenceGrant at v1beta1 only, the
        // group preferring v1.
        let served = apis(vec![(
            GATEWAY,
            group(
                "v1",
                &[
                    ("v1", &[("HTTPRoute", "httproutes")]),
                    (
                        "v1beta1",
                        &[
                            ("HTTPRoute", "httproutes"),
                            ("ReferenceGrant", "referencegrants"),
                        ],
                    ),
                    ("v1alpha2", &[("TCPRoute", "tcproutes")]),
                ],
            ),
        )]);
        assert_eq!(choose(&Kind::TcpRoute, &served), at("v1alpha2"));
        assert_eq!(choose(&Kind::ReferenceGrant, &served), at("v1beta1"));
    }

    #[test]
    fn the_preferred_version_wins_when_the_compiler_reads_it() {
        let istio = "networking.istio.io";
        let vs = [("VirtualService", "virtualservices")];
        let versions: &[(&str, &[(&str, &str)])] =
            &[("v1", &vs), ("v1beta1", &vs), ("v1alpha3", &vs)];
        let served = apis(vec![(istio, group("v1beta1", versions))]);
        assert_eq!(choose(&Kind::VirtualService, &served), at("v1beta1"));
        // A preferred version the compiler does not read is passed over.
        let served = apis(vec![(
            istio,
            group("v2", &[("v2", &vs), ("v1alpha3", &vs)]),
        )]);
        assert_eq!(choose(&Kind::VirtualService, &served), at("v1alpha3"));
    }

    #[test]
    fn only_unread_versions_served() {
        let served = apis(vec![(
            GATEWAY,
            group(
                "v2",
                &[
                    ("v2", &[("TCPRoute", "tcproutes")]),
                    ("v3alpha1", &[("TCPRoute", "tcproutes")]),
                ],
            ),
        )]);
        assert_eq!(
            choose(&Kind::TcpRoute, &served),
            Served::OtherVersions(vec!["v2".into(), "v3alpha1".into()])
        );
    }

    #[test]
    fn a_kind_under_another_plural_is_not_ours() {
        let served = apis(vec![(
            GATEWAY,
            group("v1", &[("v1", &[("TCPRoute", "tcproutesx")])]),
        )]);
        assert_eq!(choose(&Kind::TcpRoute, &served), Served::NotInstalled);
        assert_eq!(choose(&Kind::Document, &served), Served::NotInstalled);
    }

    #[test]
    fn groups_are_listed_once() {
        let kinds = [Kind::TcpRoute, Kind::HttpRoute, Kind::KmeshConfig];
        assert_eq!(groups_of(&kinds), vec![GATEWAY, "kmesh.net"]);
    }
}
