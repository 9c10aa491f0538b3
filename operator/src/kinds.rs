//! Object kinds as a type: the one table of every kind the operator knows, with its API group,
//! versions, plural, scope, whether it comes from a CRD, what the operator does with its objects
//! (compiles them, reads and reports them, or skips them) and whether the kube source watches it.
//!
//! [`Kind`] is what diagnostics, [`Inputs`](crate::inputs::Inputs) and the kube source name kinds
//! by. Kinds missing from the table are still represented, explicitly: [`Kind::Other`] keeps their
//! group and name (an unlisted Istio kind is read and reported, any other one is irrelevant), and
//! [`Kind::Document`] names a YAML document whose kind or name could not be read.
//!
//! Promise: kinds order by their name, exactly as the `kind` strings they replace did, so sorted
//! diagnostics (and the goldens that lock them) keep their order. Adding a kind is one row here
//! (the kube source and the YAML reader follow it); a compiled kind also needs its field and its
//! arm in `Inputs::add_compiled`, and its compile logic.
use std::{cmp::Ordering, fmt};

use serde::{Serialize, Serializer};

/// Whether objects of a kind live in a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Cluster,
    Namespaced,
}

/// Where a kind's definition comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Definition {
    /// Served by every API server.
    BuiltIn,
    /// Defined by a CRD, which a cluster may not have installed.
    Crd,
}

/// What the operator does with objects of a kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handling {
    /// Read and compiled into the snapshots.
    Compiled,
    /// Read but not compiled yet: every object is reported as not enforced, never dropped silently.
    NotCompiled,
    /// No bearing on the data plane: skipped.
    Irrelevant,
}

/// What missing objects of a kind would do to traffic: whether the operator may compile without
/// them while the kind cannot be read (see `kube_source::gate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfUnread {
    /// Compiling without its objects loses routes or steering, never a refusal: the operator
    /// compiles and publishes without them (and reports the kind unread).
    CompileWithout,
    /// Authorization is compiled from its objects: the policies (whose objects refuse traffic),
    /// and the Pods and Namespaces they bind (without them no workload is bound or enrolled).
    /// Snapshots compiled without them would let through what policies deny. The operator
    /// publishes nothing new until it has read the kind.
    HoldPublishing,
}

/// What the operator knows about one kind: a row of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindInfo {
    /// The API group; empty for the core group.
    pub group: &'static str,
    /// The versions whose shape the compiler's types read, preferred first. YAML of any version
    /// is read alike; from the API server, the kube source watches one of these, chosen by
    /// discovery among those served (see `kube_source::discovery`), and never another.
    pub versions: &'static [&'static str],
    /// The kind, as in an object's `kind` field.
    pub name: &'static str,
    /// The resource name in URLs.
    pub plural: &'static str,
    pub scope: Scope,
    pub definition: Definition,
    pub handling: Handling,
    /// Whether the kube source watches it. A kind read only from YAML is not (its RBAC rule in
    /// `config/operator/rbac.yaml` has to come first).
    pub watched: bool,
    /// What the operator does while it cannot read the kind.
    pub if_unread: IfUnread,
}

impl KindInfo {
    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self, version: &str) -> String {
        match self.group {
            "" => version.to_string(),
            group => format!("{group}/{version}"),
        }
    }

    /// The preferred version (`versions[0]`): the one named where no API server says which is
    /// served (Events' object references, tests).
    pub fn preferred_version(&self) -> &'static str {
        self.versions[0]
    }
}

/// Unlisted kinds of these groups are read and reported as not compiled, not skipped: they are
/// Istio policy that would otherwise be ignored without a word.
const NOT_COMPILED_GROUPS: [&str; 2] = ["networking.istio.io", "security.istio.io"];

/// Declares [`Kind`] with one variant per row, [`Kind::KNOWN`] and [`Kind::info`], so that a
/// kind is added in one place.
macro_rules! kind_table {
    ($($variant:ident => $info:expr,)+) => {
        /// A kind of object, as diagnostics, the compiler's inputs and the kube source name it.
        /// Ordered by name (see the module documentation).
        #[derive(Clone, Debug, PartialEq, Eq, Hash)]
        pub enum Kind {
            $($variant,)+
            /// A kind missing from the table, kept by group and name.
            Other { group: String, name: String },
            /// A YAML document whose kind or name could not be read.
            Document,
        }

        impl Kind {
            /// Every kind of the table, in table order.
            pub const KNOWN: &'static [Kind] = &[$(Kind::$variant,)+];

            /// The kind's row of the table; `None` for [`Kind::Other`] and [`Kind::Document`].
            pub fn info(&self) -> Option<&'static KindInfo> {
                match self {
                    $(Kind::$variant => Some(&$info),)+
                    Kind::Other { .. } | Kind::Document => None,
                }
            }
        }
    };
}

use Definition::{BuiltIn, Crd};
use Handling::{Compiled, NotCompiled};
use IfUnread::{CompileWithout, HoldPublishing};
use Scope::{Cluster, Namespaced};

kind_table! {
    Namespace => KindInfo {
        group: "", versions: &["v1"], name: "Namespace", plural: "namespaces",
        scope: Cluster, definition: BuiltIn, handling: Compiled, watched: true,
        if_unread: HoldPublishing,
    },
    Node => KindInfo {
        group: "", versions: &["v1"], name: "Node", plural: "nodes",
        scope: Cluster, definition: BuiltIn, handling: Compiled, watched: true,
        if_unread: CompileWithout,
    },
    Pod => KindInfo {
        group: "", versions: &["v1"], name: "Pod", plural: "pods",
        scope: Namespaced, definition: BuiltIn, handling: Compiled, watched: true,
        if_unread: HoldPublishing,
    },
    Service => KindInfo {
        group: "", versions: &["v1"], name: "Service", plural: "services",
        scope: Namespaced, definition: BuiltIn, handling: Compiled, watched: true,
        if_unread: CompileWithout,
    },
    EndpointSlice => KindInfo {
        group: "discovery.k8s.io", versions: &["v1"], name: "EndpointSlice",
        plural: "endpointslices",
        scope: Namespaced, definition: BuiltIn, handling: Compiled, watched: true,
        if_unread: CompileWithout,
    },
    KmeshConfig => KindInfo {
        group: "kmesh.net", versions: &["v1alpha1"], name: "KmeshConfig", plural: "kmeshconfigs",
        scope: Cluster, definition: Crd, handling: Compiled, watched: true,
        if_unread: CompileWithout,
    },
    VirtualService => KindInfo {
        group: "networking.istio.io", versions: &["v1", "v1beta1", "v1alpha3"],
        name: "VirtualService", plural: "virtualservices",
        scope: Namespaced, definition: Crd, handling: Compiled, watched: true,
        if_unread: CompileWithout,
    },
    DestinationRule => KindInfo {
        group: "networking.istio.io", versions: &["v1", "v1beta1", "v1alpha3"],
        name: "DestinationRule", plural: "destinationrules",
        scope: Namespaced, definition: Crd, handling: Compiled, watched: true,
        if_unread: CompileWithout,
    },
    ServiceEntry => KindInfo {
        group: "networking.istio.io", versions: &["v1", "v1beta1", "v1alpha3"],
        name: "ServiceEntry", plural: "serviceentries",
        scope: Namespaced, definition: Crd, handling: Compiled, watched: true,
        if_unread: CompileWithout,
    },
    AuthorizationPolicy => KindInfo {
        group: "security.istio.io", versions: &["v1", "v1beta1"],
        name: "AuthorizationPolicy", plural: "authorizationpolicies",
        scope: Namespaced, definition: Crd, handling: Compiled, watched: true,
        if_unread: HoldPublishing,
    },
    PeerAuthentication => KindInfo {
        group: "security.istio.io", versions: &["v1", "v1beta1"],
        name: "PeerAuthentication", plural: "peerauthentications",
        scope: Namespaced, definition: Crd, handling: Compiled, watched: true,
        if_unread: HoldPublishing,
    },
    HttpRoute => KindInfo {
        group: "gateway.networking.k8s.io", versions: &["v1", "v1beta1"],
        name: "HTTPRoute", plural: "httproutes",
        scope: Namespaced, definition: Crd, handling: Compiled, watched: true,
        if_unread: CompileWithout,
    },
    // Only Gateways of class `istio-waypoint` (ambient's waypoints) are compiled; others are
    // ingress or egress gateways, which the mesh does not serve.
    Gateway => KindInfo {
        group: "gateway.networking.k8s.io", versions: &["v1", "v1beta1"],
        name: "Gateway", plural: "gateways",
        scope: Namespaced, definition: Crd, handling: Compiled, watched: true,
        if_unread: CompileWithout,
    },
    // v1 from Gateway API v1.6 (which serves v1 only), v1alpha2 before: the same shape.
    TcpRoute => KindInfo {
        group: "gateway.networking.k8s.io", versions: &["v1", "v1alpha2"],
        name: "TCPRoute", plural: "tcproutes",
        scope: Namespaced, definition: Crd, handling: Compiled, watched: true,
        if_unread: CompileWithout,
    },
    GrpcRoute => KindInfo {
        group: "gateway.networking.k8s.io", versions: &["v1"],
        name: "GRPCRoute", plural: "grpcroutes",
        scope: Namespaced, definition: Crd, handling: NotCompiled, watched: false,
        if_unread: CompileWithout,
    },
    TlsRoute => KindInfo {
        group: "gateway.networking.k8s.io", versions: &["v1", "v1alpha3", "v1alpha2"],
        name: "TLSRoute", plural: "tlsroutes",
        scope: Namespaced, definition: Crd, handling: NotCompiled, watched: false,
        if_unread: CompileWithout,
    },
    // v1 from Gateway API v1.5, v1beta1 in every release that has ReferenceGrant: the same shape.
    ReferenceGrant => KindInfo {
        group: "gateway.networking.k8s.io", versions: &["v1", "v1beta1"],
        name: "ReferenceGrant", plural: "referencegrants",
        scope: Namespaced, definition: Crd, handling: Compiled, watched: true,
        if_unread: CompileWithout,
    },
}

impl Kind {
    /// The kind of an object of API group `group` (empty for the core group) whose `kind` field
    /// is `name`: its row of the table, else [`Kind::Other`].
    pub fn of(group: &str, name: &str) -> Kind {
        Kind::KNOWN
            .iter()
            .find(|k| k.info().is_some_and(|i| i.group == group && i.name == name))
            .cloned()
            .unwrap_or_else(|| Kind::Other {
                group: group.to_string(),
                name: name.to_string(),
            })
    }

    /// The kind of an object with this `apiVersion` and `kind`.
    pub fn of_api_version(api_version: &str, name: &str) -> Kind {
        Kind::of(group_of(api_version), name)
    }

    /// The kinds the kube source watches (see [`KindInfo::watched`]), in table order.
    pub fn watched() -> impl Iterator<Item = &'static Kind> {
        Kind::KNOWN
            .iter()
            .filter(|k| k.info().is_some_and(|i| i.watched))
    }

    /// The name, as in an object's `kind` field (`Document` for [`Kind::Document`]).
    pub fn name(&self) -> &str {
        match self {
            Kind::Other { name, .. } => name,
            Kind::Document => "Document",
            known => known.info().map_or("", |i| i.name),
        }
    }

    /// The API group; empty for the core group and for [`Kind::Document`].
    pub fn group(&self) -> &str {
        match self {
            Kind::Other { group, .. } => group,
            Kind::Document => "",
            known => known.info().map_or("", |i| i.group),
        }
    }

    /// Where its objects live; kinds missing from the table are taken as namespaced, as
    /// `kubectl apply` of an unknown kind would.
    pub fn scope(&self) -> Scope {
        self.info().map_or(Scope::Namespaced, |i| i.scope)
    }

    /// What the operator does with its objects.
    pub fn handling(&self) -> Handling {
        match self {
            Kind::Other { group, .. } if NOT_COMPILED_GROUPS.contains(&group.as_str()) => {
                Handling::NotCompiled
            }
            Kind::Other { .. } | Kind::Document => Handling::Irrelevant,
            known => known.info().map_or(Handling::Irrelevant, |i| i.handling),
        }
    }

    /// Whether the kind comes from a CRD, and so may be absent from a cluster.
    pub fn is_custom(&self) -> bool {
        self.info().is_some_and(|i| i.definition == Definition::Crd)
    }

    /// Breaks ties between kinds of the same name (a listed kind and an unlisted one from
    /// another group, say); see the `Ord` implementation.
    fn rank(&self) -> u8 {
        match self {
            Kind::Other { .. } => 1,
            Kind::Document => 2,
            _ => 0,
        }
    }
}

/// The group of an `apiVersion`: `networking.istio.io/v1` → `networking.istio.io`, `v1` → ``.
pub fn group_of(api_version: &str) -> &str {
    api_version.split_once('/').map_or("", |(group, _)| group)
}

/// By name first, as the `kind` strings this type replaces were ordered; kinds of equal name
/// (which only an unlisted kind can share with another) by rank and group, so that the order
/// agrees with `Eq`.
impl Ord for Kind {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.name(), self.rank(), self.group()).cmp(&(other.name(), other.rank(), other.group()))
    }
}

impl PartialOrd for Kind {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// As its name, the `kind` string of the JSON output.
impl Serialize for Kind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        let names: BTreeSet<&str> = Kind::KNOWN.iter().map(Kind::name).collect();
        assert_eq!(names.len(), Kind::KNOWN.len(), "two rows share a name");
        for kind in Kind::KNOWN {
            let info = kind.info().unwrap();
            assert_eq!(&Kind::of(info.group, info.name), kind);
            for version in info.versions {
                assert_eq!(
                    &Kind::of_api_version(&info.api_version(version), info.name),
                    kind
                );
            }
            assert!(!info.versions.is_empty(), "{kind} has no version");
        }
    }

    #[test]
    fn order_is_the_order_of_names() {
        let mut kinds: Vec<Kind> = Kind::KNOWN.to_vec();
        kinds.push(Kind::Document);
        kinds.push(Kind::of("networking.istio.io", "Sidecar"));
        kinds.push(Kind::of("apps", "Deployment"));
        let mut by_kind = kinds.clone();
        by_kind.sort();
        let mut by_name: Vec<String> = kinds.iter().map(ToString::to_string).collect();
        by_name.sort();
        let sorted: Vec<String> = by_kind.iter().map(ToString::to_string).collect();
        assert_eq!(sorted, by_name);
        // A same-named kind of another group is another kind, ordered after the listed one.
        let knative = Kind::of("serving.knative.dev", "Service");
        assert_ne!(knative, Kind::Service);
        assert_eq!(Kind::Service.cmp(&knative), Ordering::Less);
        assert_eq!(
            Kind::Document.cmp(&Kind::of("example.com", "Document")),
            Ordering::Greater
        );
    }

    #[test]
    fn lookups() {
        assert_eq!(
            Kind::of("gateway.networking.k8s.io", "HTTPRoute"),
            Kind::HttpRoute
        );
        assert_eq!(Kind::of_api_version("v1", "Pod"), Kind::Pod);
        let info = Kind::TcpRoute.info().unwrap();
        assert_eq!(
            info.api_version(info.preferred_version()),
            "gateway.networking.k8s.io/v1"
        );
        assert_eq!(Kind::Pod.info().unwrap().api_version("v1"), "v1");
        assert!(!Kind::EndpointSlice.is_custom());
        assert!(Kind::KmeshConfig.is_custom());
        assert_eq!(Kind::Namespace.scope(), Scope::Cluster);
        assert_eq!(Kind::of("apps", "Deployment").scope(), Scope::Namespaced);
        assert_eq!(Kind::TlsRoute.to_string(), "TLSRoute");
        assert_eq!(
            serde_json::to_value(Kind::HttpRoute).unwrap(),
            serde_json::json!("HTTPRoute")
        );
    }

    #[test]
    fn handling() {
        assert_eq!(Kind::VirtualService.handling(), Handling::Compiled);
        assert_eq!(Kind::AuthorizationPolicy.handling(), Handling::Compiled);
        assert_eq!(Kind::PeerAuthentication.handling(), Handling::Compiled);
        assert_eq!(Kind::GrpcRoute.handling(), Handling::NotCompiled);
        // Unlisted Istio kinds are reported, other unlisted kinds skipped.
        assert_eq!(
            Kind::of("networking.istio.io", "Sidecar").handling(),
            Handling::NotCompiled
        );
        assert_eq!(
            Kind::of("security.istio.io", "RequestAuthentication").handling(),
            Handling::NotCompiled
        );
        assert_eq!(
            Kind::of("gateway.networking.k8s.io", "Gateway").handling(),
            Handling::Compiled
        );
        assert_eq!(
            Kind::of("gateway.networking.k8s.io", "GatewayClass").handling(),
            Handling::Irrelevant
        );
        assert_eq!(
            Kind::of("apps", "Deployment").handling(),
            Handling::Irrelevant
        );
    }

    #[test]
    fn watched_kinds_are_the_ones_read_from_the_api_server() {
        let watched: Vec<&str> = Kind::watched().map(Kind::name).collect();
        assert_eq!(
            watched,
            [
                "Namespace",
                "Node",
                "Pod",
                "Service",
                "EndpointSlice",
                "KmeshConfig",
                "VirtualService",
                "DestinationRule",
                "ServiceEntry",
                "AuthorizationPolicy",
                "PeerAuthentication",
                "HTTPRoute",
                "Gateway",
                "TCPRoute",
                "ReferenceGrant",
            ]
        );
    }
}
