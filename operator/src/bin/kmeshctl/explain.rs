//! `kmeshctl explain`: where a connection from a pod goes, and whether it is let in. This module
//! only gathers the snapshots and prints; the explanation is `kmesh_snapshot::explain` (pure).
//!
//! - Live (`--agent`): the agent's live snapshot (`/debug/config_dump.bin`, decoded and verified
//!   here). The client must be a pod of that agent's node; the verdict of a destination on another
//!   node is left to that node (its agent is not asked).
//! - Offline (`-f`): the YAML compiled for every node, as the operator would; the client's node
//!   decides where the connection goes and the destination's node gives the verdict.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use clap::ValueEnum;
use k8s_openapi::api::core::v1::Pod;
use kmesh_common::{Ip16, ServiceKey, ip16};
use kmesh_operator::{
    compile::{CompileOptions, Names as CompiledNames, address_owners, compile, pod_ips},
    dir_source::load,
    inputs::Inputs,
};
use kmesh_snapshot::{
    Limits, Snapshot,
    admin_contract::CONFIG_DUMP_BINARY_PATH,
    explain::{self, Explanation, Query, Snapshots},
    view::{Names, SectionNames},
};

use crate::agent_client::{AgentClient, ClientError, Listener, ListenerAddr};

/// How `explain` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExplainOutput {
    Text,
    Json,
}

/// Where the snapshots come from.
pub enum Origin<'a> {
    Live(&'a ListenerAddr),
    Offline {
        files: &'a [PathBuf],
        namespace: &'a str,
        root_namespace: String,
    },
}

#[derive(thiserror::Error, Debug)]
pub enum ExplainError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the agent at {addr} answered a snapshot that does not decode: {message}")]
    Decode { addr: ListenerAddr, message: String },
    #[error("reading the YAML: {0}")]
    Load(kmesh_operator::Error),
    #[error("--from {0:?}: expected a pod IP or namespace/pod")]
    BadFrom(String),
    #[error("--to {0:?}: expected IP:PORT or HOST:PORT")]
    BadTo(String),
    #[error("--from {from}: no pod in the YAML {what}")]
    NoPod { from: String, what: &'static str },
    #[error("--from {from}: the pod has no {what} in the YAML")]
    PodIncomplete { from: String, what: &'static str },
    #[error(
        "no snapshot for node {node} (over capacity? `kmeshctl compile --node {node}` says why)"
    )]
    NoSnapshot { node: String },
    #[error(
        "--to {host}: no service of that name listens on port {port} (tried {tried}); give IP:PORT"
    )]
    UnknownHost {
        host: String,
        port: u16,
        tried: String,
    },
    #[error(
        "{flag} {value}: the agent's snapshot carries no pod or service names yet; give an IP \
         (kubectl get pod -o wide, kubectl get svc), or explain offline with -f"
    )]
    NeedsNames { flag: &'static str, value: String },
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// The client as given: an address, or a pod by name.
enum From {
    Ip(IpAddr),
    Pod { namespace: String, name: String },
}

fn parse_from(text: &str) -> Result<From, ExplainError> {
    if let Ok(ip) = text.parse() {
        return Ok(From::Ip(ip));
    }
    match text.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => Ok(From::Pod {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }),
        _ => Err(ExplainError::BadFrom(text.to_string())),
    }
}

/// The destination as given: an address, or a host name and a port.
enum To {
    Addr(SocketAddr),
    Host { host: String, port: u16 },
}

fn parse_to(text: &str) -> Result<To, ExplainError> {
    if let Ok(addr) = text.parse() {
        return Ok(To::Addr(addr));
    }
    let bad = || ExplainError::BadTo(text.to_string());
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse().map_err(|_| bad())?;
    if host.is_empty() || host.contains(['[', ']', '/', ' ']) {
        return Err(bad());
    }
    Ok(To::Host {
        host: host.to_string(),
        port,
    })
}

/// Explains and renders as `output` asks.
pub fn run(
    origin: Origin<'_>,
    from: &str,
    to: &str,
    output: ExplainOutput,
) -> Result<Vec<u8>, ExplainError> {
    let explanation = match origin {
        Origin::Live(agent) => live(agent, parse_from(from)?, parse_to(to)?)?,
        Origin::Offline {
            files,
            namespace,
            root_namespace,
        } => offline(
            files,
            namespace,
            root_namespace,
            parse_from(from)?,
            parse_to(to)?,
        )?,
    };
    Ok(match output {
        ExplainOutput::Text => explain::text(&explanation).into_bytes(),
        ExplainOutput::Json => {
            let mut text = serde_json::to_string_pretty(&explanation)?;
            text.push('\n');
            text.into_bytes()
        }
    })
}

fn live(agent: &ListenerAddr, from: From, to: To) -> Result<Explanation, ExplainError> {
    let from = match from {
        From::Ip(ip) => ip,
        From::Pod { namespace, name } => {
            return Err(ExplainError::NeedsNames {
                flag: "--from",
                value: format!("{namespace}/{name}"),
            });
        }
    };
    let to = match to {
        To::Addr(addr) => addr,
        To::Host { host, port } => {
            return Err(ExplainError::NeedsNames {
                flag: "--to",
                value: format!("{host}:{port}"),
            });
        }
    };
    let bytes = AgentClient::new(Listener::Admin, agent.clone()).get(CONFIG_DUMP_BINARY_PATH)?;
    let snapshot = Snapshot::decode(&bytes, &Limits::UNLIMITED)
        .map_err(|e| ExplainError::Decode {
            addr: agent.clone(),
            message: e.to_string(),
        })?
        .snapshot;
    let snapshots = Snapshots {
        source: &snapshot,
        destinations: &[&snapshot],
        every_node: false,
    };
    // The snapshot's names section names services and workloads (pods are named by workload).
    let names = SectionNames(&snapshot);
    Ok(explain::explain(Query { from, to }, &snapshots, &names))
}

fn offline(
    files: &[PathBuf],
    namespace: &str,
    root_namespace: String,
    from: From,
    to: To,
) -> Result<Explanation, ExplainError> {
    let (inputs, _diagnostics) = load(files, namespace).map_err(ExplainError::Load)?;
    let (client_ip, client_pod) = client(&inputs, &from)?;
    let from_text = match &from {
        From::Ip(ip) => ip.to_string(),
        From::Pod { namespace, name } => format!("{namespace}/{name}"),
    };
    let node = client_pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .ok_or(ExplainError::PodIncomplete {
            from: from_text,
            what: "spec.nodeName (it is not scheduled)",
        })?;
    let nodes = node_names(&inputs);
    let options = CompileOptions {
        root_namespace,
        ..Default::default()
    };
    let compiled = compile(&inputs, &nodes, 1, &options);
    let all = compiled.snapshots();
    let source = all
        .get(&node)
        .ok_or_else(|| ExplainError::NoSnapshot { node: node.clone() })?;
    let names = OfflineNames {
        compiled: &compiled.names,
        pods: pods_by_ip(&inputs),
    };
    let client_namespace = client_pod
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(namespace);
    let to = match to {
        To::Addr(addr) => addr,
        To::Host { host, port } => resolve(source, &names, &host, port, client_namespace)?,
    };
    let destinations: Vec<&Snapshot> = all.values().collect();
    let snapshots = Snapshots {
        source,
        destinations: &destinations,
        every_node: true,
    };
    let query = Query {
        from: client_ip,
        to,
    };
    Ok(explain::explain(query, &snapshots, &names))
}

/// The client's address and pod.
fn client<'a>(inputs: &'a Inputs, from: &From) -> Result<(IpAddr, &'a Pod), ExplainError> {
    match from {
        From::Ip(ip) => address_owners(&inputs.pods)
            .remove(&ip16(*ip))
            .map(|p| (*ip, p))
            .ok_or(ExplainError::NoPod {
                from: ip.to_string(),
                what: "has this IP, so its node is unknown",
            }),
        From::Pod { namespace, name } => {
            let text = format!("{namespace}/{name}");
            let pod = inputs
                .pods
                .iter()
                .find(|p| {
                    p.metadata.namespace.as_deref() == Some(namespace)
                        && p.metadata.name.as_deref() == Some(name)
                })
                .ok_or(ExplainError::NoPod {
                    from: text.clone(),
                    what: "has this namespace and name",
                })?;
            let ip = pod_ips(pod)
                .first()
                .copied()
                .ok_or(ExplainError::PodIncomplete {
                    from: text,
                    what: "status.podIP",
                })?;
            Ok((ip, pod))
        }
    }
}

/// Every node the YAML names: its Nodes and the nodes its pods run on.
fn node_names(inputs: &Inputs) -> Vec<String> {
    let mut nodes: BTreeSet<String> = inputs
        .nodes
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    nodes.extend(
        inputs
            .pods
            .iter()
            .filter_map(|p| p.spec.as_ref()?.node_name.clone()),
    );
    nodes.into_iter().collect()
}

/// The pod that owns each address, as the compiler picks it.
fn pods_by_ip(inputs: &Inputs) -> BTreeMap<Ip16, String> {
    address_owners(&inputs.pods)
        .into_iter()
        .map(|(ip, pod)| {
            let name = format!(
                "{}/{}",
                pod.metadata.namespace.as_deref().unwrap_or("default"),
                pod.metadata.name.as_deref().unwrap_or_default()
            );
            (ip, name)
        })
        .collect()
}

/// A service host (`reviews`, `reviews.bookinfo`, `reviews.bookinfo.svc.cluster.local`, or a
/// ServiceEntry host) to its VIP on `port`, as the client's DNS search path would.
fn resolve(
    source: &Snapshot,
    names: &OfflineNames<'_>,
    host: &str,
    port: u16,
    client_namespace: &str,
) -> Result<SocketAddr, ExplainError> {
    let host = host.trim_end_matches('.');
    let tried = [
        host.to_string(),
        format!("{host}.{client_namespace}.svc.cluster.local"),
        format!("{host}.svc.cluster.local"),
        format!("{host}.cluster.local"),
    ];
    for candidate in &tried {
        let found = source.services.iter().find(|s| {
            s.key.port == port
                && names.service(s.value.service_id, &s.key).as_ref() == Some(candidate)
        });
        if let Some(s) = found {
            return Ok(SocketAddr::new(IpAddr::from(s.key.ip).to_canonical(), port));
        }
    }
    Err(ExplainError::UnknownHost {
        host: host.to_string(),
        port,
        tried: tried.join(", "),
    })
}

/// The compiler's names, and the YAML's pods by address.
struct OfflineNames<'a> {
    compiled: &'a CompiledNames,
    pods: BTreeMap<Ip16, String>,
}

impl Names for OfflineNames<'_> {
    fn service(&self, service_id: u32, _key: &ServiceKey) -> Option<String> {
        self.compiled.services.get(&service_id).cloned()
    }
    fn route(&self, route_id: u32) -> Option<String> {
        self.compiled.routes.get(&route_id).cloned()
    }
    fn backend_set(&self, set_id: u32) -> Option<String> {
        self.compiled.backend_sets.get(&set_id).cloned()
    }
    fn identity(&self, identity: u32) -> Option<String> {
        self.compiled.identities.get(&identity).cloned()
    }
    fn pod(&self, ip: &Ip16) -> Option<String> {
        self.pods.get(ip).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bookinfo fixture with Istio's own DestinationRules and 90/10 VirtualService.
    fn bookinfo() -> Vec<PathBuf> {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let istio = repo.join("../shared/reference/istio/samples/bookinfo/networking");
        vec![
            repo.join("tests/fixtures/bookinfo"),
            istio.join("destination-rule-all.yaml"),
            istio.join("virtual-service-reviews-90-10.yaml"),
        ]
    }

    fn offline(from: &str, to: &str) -> Result<serde_json::Value, ExplainError> {
        let files = bookinfo();
        let origin = Origin::Offline {
            files: &files,
            namespace: "default",
            root_namespace: "istio-system".into(),
        };
        let bytes = run(origin, from, to, ExplainOutput::Json)?;
        Ok(serde_json::from_slice(&bytes).expect("JSON"))
    }

    #[test]
    fn offline_names_the_pods_and_resolves_the_service_host() {
        let by_name = offline("default/productpage-v1", "reviews:9080").unwrap();
        let by_ip = offline("10.244.77.10", "reviews.default.svc.cluster.local:9080").unwrap();
        assert_eq!(by_name["to"], by_ip["to"], "one VIP by either name");
        assert_eq!(by_name["source"]["pod"], "default/productpage-v1");
        assert_eq!(
            by_name["service"]["service"],
            "reviews.default.svc.cluster.local"
        );
        let destinations = by_name["destinations"].as_array().unwrap();
        let shares: Vec<(f64, &str)> = destinations
            .iter()
            .map(|d| {
                (
                    d["percent"].as_f64().unwrap(),
                    d["endpoints"][0]["pod"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            shares,
            [(90.0, "default/reviews-v1"), (10.0, "default/reviews-v2")]
        );
        assert_eq!(
            destinations[0]["endpoints"][0]["verdict"]["verdict"],
            "not_bound"
        );
    }

    #[test]
    fn offline_says_what_it_cannot_find() {
        let e = offline("10.9.9.9", "reviews:9080").unwrap_err();
        assert!(
            e.to_string().contains("no pod in the YAML has this IP"),
            "{e}"
        );
        let e = offline("default/nope", "reviews:9080").unwrap_err();
        assert!(e.to_string().contains("--from default/nope"), "{e}");
        let e = offline("default/productpage-v1", "reviews:1").unwrap_err();
        assert!(
            e.to_string()
                .contains("no service of that name listens on port 1"),
            "{e}"
        );
    }

    #[test]
    fn live_needs_addresses_until_the_snapshot_carries_names() {
        let agent: ListenerAddr = "127.0.0.1:1".parse().unwrap();
        let e = run(
            Origin::Live(&agent),
            "default/pod",
            "10.0.0.1:80",
            ExplainOutput::Text,
        )
        .unwrap_err();
        assert!(
            matches!(e, ExplainError::NeedsNames { flag: "--from", .. }),
            "{e}"
        );
        let e = run(
            Origin::Live(&agent),
            "10.0.0.2",
            "reviews:80",
            ExplainOutput::Text,
        )
        .unwrap_err();
        assert!(
            matches!(e, ExplainError::NeedsNames { flag: "--to", .. }),
            "{e}"
        );
    }

    #[test]
    fn from_and_to_take_addresses_and_names() {
        assert!(matches!(parse_from("10.244.1.5"), Ok(From::Ip(_))));
        assert!(matches!(
            parse_from("bookinfo/productpage-v1"),
            Ok(From::Pod { .. })
        ));
        for bad in ["productpage", "/x", "ns/", "10.0.0.300"] {
            assert!(
                matches!(parse_from(bad), Err(ExplainError::BadFrom(_))),
                "{bad}"
            );
        }
        assert!(matches!(parse_to("10.96.0.10:9080"), Ok(To::Addr(_))));
        assert!(matches!(parse_to("[fd00::1]:80"), Ok(To::Addr(_))));
        assert!(matches!(
            parse_to("reviews:9080"),
            Ok(To::Host { port: 9080, .. })
        ));
        for bad in ["reviews", "reviews:http", ":80", "10.96.0.10"] {
            assert!(
                matches!(parse_to(bad), Err(ExplainError::BadTo(_))),
                "{bad}"
            );
        }
    }
}
