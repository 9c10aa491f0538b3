//! The table's tests, and the configurations the other modules' tests build on.
use std::collections::BTreeMap;

use kmesh_snapshot::waypoint::{
    Cluster, Endpoint, HeaderOps, HttpRoute, LoadBalancer, PathMatch, Protocol, RequestMatch,
    RouteAction, Service, ServicePort, StringMatch, WAYPOINT_CONFIG_VERSION, WaypointConfig,
    WaypointName, WeightedCluster, Workload,
};

use super::*;

/// The service port every test configuration serves: `reviews` (id 7), port 9080.
pub(crate) const REVIEWS: PortKey = PortKey {
    service_id: 7,
    port: 9080,
};

/// A cluster of `reviews`' `subset` with one endpoint per address, least request.
pub(crate) fn cluster(subset: &str, addresses: &[&str]) -> Cluster {
    Cluster {
        name: format!("outbound|9080|{subset}|reviews.default.svc.cluster.local"),
        hostname: "reviews.default.svc.cluster.local".into(),
        port: 9080,
        subset: Some(subset.into()),
        protocol: Protocol::Http,
        load_balancer: LoadBalancer::LeastRequest,
        endpoints: addresses
            .iter()
            .map(|a| Endpoint {
                address: a.parse().expect("a test address"),
            })
            .collect(),
    }
}

/// `reviews` with no route yet, clusters v1 (0), v2 (1), v3 (2), and no workloads.
pub(crate) fn config() -> WaypointConfig {
    WaypointConfig {
        version: WAYPOINT_CONFIG_VERSION,
        waypoint: WaypointName {
            namespace: "default".into(),
            name: "waypoint".into(),
        },
        trust_domain: "cluster.local".into(),
        services: vec![Service {
            id: REVIEWS.service_id,
            hostname: "reviews.default.svc.cluster.local".into(),
            namespace: "default".into(),
            name: "reviews".into(),
            ports: vec![ServicePort {
                port: REVIEWS.port,
                protocol: Protocol::Http,
                http: vec![],
                tcp: vec![],
            }],
        }],
        clusters: vec![
            cluster("v1", &["10.0.1.1:9080"]),
            cluster("v2", &["10.0.2.1:9080", "10.0.2.2:9080"]),
            cluster("v3", &["10.0.3.1:9080"]),
        ],
        workloads: vec![],
        policies: vec![],
    }
}

/// [`config`] with these routes on `reviews:9080`.
pub(crate) fn config_with(routes: Vec<HttpRoute>) -> WaypointConfig {
    let mut config = config();
    config.services[0].ports[0].http = routes;
    config
}

/// A route forwarding every request it matches to `cluster`.
pub(crate) fn route(matches: Vec<RequestMatch>, cluster: u32) -> HttpRoute {
    HttpRoute {
        origin: format!("test route to cluster {cluster}"),
        matches,
        action: RouteAction::Forward(vec![WeightedCluster {
            cluster,
            weight: 1,
            ..WeightedCluster::default()
        }]),
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        rewrite: None,
        timeout_ms: None,
        retries: None,
        fault: None,
        mirrors: vec![],
    }
}

/// A workload of namespace `default`, service account `bookinfo-{name}`, label `app: {name}`.
pub(crate) fn workload(name: &str, addresses: &[&str]) -> Workload {
    Workload {
        addresses: addresses
            .iter()
            .map(|a| a.parse().expect("a test address"))
            .collect(),
        namespace: "default".into(),
        name: name.into(),
        workload: String::new(),
        service_account: format!("bookinfo-{name}"),
        labels: BTreeMap::from([("app".into(), name.into())]),
    }
}

fn path_regex(pattern: &str) -> RequestMatch {
    RequestMatch {
        path: Some(PathMatch::Regex(pattern.into())),
        ..RequestMatch::default()
    }
}

#[test]
fn a_port_is_found_by_service_id_and_port() {
    let table = RouteTable::new(config_with(vec![route(vec![], 0)])).unwrap();
    let port = table.port(REVIEWS).expect("reviews:9080 is served");
    assert_eq!(port.service.hostname, "reviews.default.svc.cluster.local");
    assert_eq!(port.routes.len(), 1);
    assert!(
        table
            .port(PortKey {
                service_id: 7,
                port: 9081
            })
            .is_none()
    );
    assert!(
        table
            .port(PortKey {
                service_id: 8,
                port: 9080
            })
            .is_none()
    );
}

#[test]
fn an_invalid_configuration_is_refused() {
    let mut config = config_with(vec![route(vec![], 3)]);
    assert!(matches!(
        RouteTable::new(config.clone()),
        Err(TableError::Invalid(_))
    ));
    config.services[0].ports[0].http[0] = route(vec![], 0);
    config.version += 1;
    assert!(matches!(
        RouteTable::new(config),
        Err(TableError::Invalid(WaypointConfigError::Version { .. }))
    ));
}

#[test]
fn a_regex_that_does_not_compile_refuses_the_table_with_its_field() {
    let header = RequestMatch {
        headers: vec![kmesh_snapshot::waypoint::HeaderMatch {
            name: "end-user".into(),
            value: Some(StringMatch::Regex("(jason".into())),
            invert: false,
        }],
        ..RequestMatch::default()
    };
    let config = config_with(vec![
        route(vec![path_regex("/ok/.*")], 0),
        route(vec![path_regex("/fine"), header], 1),
    ]);
    let error = RouteTable::new(config).unwrap_err();
    let TableError::Regex { field, pattern, .. } = &error else {
        panic!("not a regex error: {error}");
    };
    assert_eq!(
        field,
        "services[0].ports[0].http[1].matches[1].headers[0].value"
    );
    assert_eq!(pattern, "(jason");
    assert!(error.to_string().starts_with(
        "services[0].ports[0].http[1].matches[1].headers[0].value: the regular expression \"(jason\""
    ));

    let error =
        RouteTable::new(config_with(vec![route(vec![path_regex("[z-a]")], 0)])).unwrap_err();
    assert!(
        matches!(&error, TableError::Regex { field, .. } if field == "services[0].ports[0].http[0].matches[0].path"),
        "{error}"
    );
}

#[test]
fn a_regex_is_anchored_and_cannot_escape_its_anchors() {
    let regex = compile_anchored("f", "ja").unwrap();
    assert!(regex.is_match("ja"));
    assert!(!regex.is_match("jason"));
    assert!(!regex.is_match("benja"));
    let regex = compile_anchored("f", "a|b").unwrap();
    assert!(regex.is_match("b"));
    assert!(
        !regex.is_match("ab"),
        "alternation stays inside the anchors"
    );
    // Balanced alone or not at all: `a)|(b` would unanchor both sides once wrapped.
    assert!(compile_anchored("f", "a)|(b").is_err());
}

#[test]
fn an_address_claimed_by_two_workloads_refuses_the_table_with_both_names() {
    let mut config = config();
    config.workloads = vec![
        workload("productpage", &["10.0.0.9", "10.0.0.9"]),
        workload("ratings", &["10.0.0.7"]),
        workload("details", &["fd00::1", "::ffff:10.0.0.9"]),
    ];
    let error = RouteTable::new(config).unwrap_err();
    assert_eq!(
        error,
        TableError::AddressClaimedTwice {
            address: "10.0.0.9".parse().unwrap(),
            first: 0,
            first_name: "default/productpage".into(),
            second: 2,
            second_name: "default/details".into(),
        }
    );
    assert!(error.to_string().contains("default/productpage"));
    assert!(error.to_string().contains("default/details"));
}
