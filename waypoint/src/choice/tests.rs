use std::collections::HashMap;

use http::request::Parts;
use kmesh_snapshot::waypoint::HashCookie;

use super::*;
use crate::{
    table::tests::config,
    table::{RouteTable, tests::cluster},
};

/// A deterministic uniform `u32` source (xorshift64*).
fn draws(seed: u64) -> impl FnMut() -> u32 {
    let mut state = seed | 1;
    move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
    }
}

fn weighted(weights: &[u32]) -> Vec<WeightedCluster> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| WeightedCluster {
            cluster: i as u32,
            weight,
            ..WeightedCluster::default()
        })
        .collect()
}

fn counts(n: usize, mut choose: impl FnMut() -> Option<usize>, times: usize) -> Vec<usize> {
    let mut counts = vec![0; n];
    for _ in 0..times {
        counts[choose().expect("a choice")] += 1;
    }
    counts
}

fn balanced(lb: LoadBalancer, endpoints: usize) -> ClusterTable {
    let addresses: Vec<String> = (0..endpoints).map(|i| format!("10.0.9.{i}:9080")).collect();
    let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let mut spec = cluster("v1", &addresses);
    spec.load_balancer = lb;
    ClusterTable::new(spec)
}

fn request(target: &str, headers: &[(&str, &str)]) -> Parts {
    let mut builder = http::Request::builder().uri(target);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).unwrap().into_parts().0
}

/// The endpoint `cluster` chooses for `parts` from `source`, with `draw`.
fn choose(
    cluster: &ClusterTable,
    parts: &Parts,
    source: &str,
    draw: &mut impl FnMut() -> u32,
) -> EndpointChoice {
    let client = Client {
        address: source.parse().unwrap(),
        workload: None,
    };
    cluster
        .choose_endpoint(&RequestHead::from_parts(parts), &client, draw)
        .expect("an endpoint")
}

#[test]
fn weights_80_20_over_10000_draws_are_within_1_percent() {
    let destinations = weighted(&[80, 20]);
    let mut draw = draws(7);
    let counts = counts(2, || choose_destination(&destinations, &mut draw), 10_000);
    assert!((7_900..=8_100).contains(&counts[0]), "{counts:?}");
    assert!((1_900..=2_100).contains(&counts[1]), "{counts:?}");
}

#[test]
fn a_zero_weight_is_never_chosen_and_the_extremes_stay_in_range() {
    let destinations = weighted(&[0, 3, 0, 1, 0]);
    let mut draw = draws(3);
    let counts = counts(5, || choose_destination(&destinations, &mut draw), 4_000);
    assert_eq!((counts[0], counts[2], counts[4]), (0, 0, 0), "{counts:?}");
    assert_eq!(choose_destination(&destinations, &mut || 0), Some(1));
    assert_eq!(choose_destination(&destinations, &mut || u32::MAX), Some(3));
    let max = weighted(&[u32::MAX]);
    assert_eq!(choose_destination(&max, &mut || u32::MAX), Some(0));
    assert_eq!(choose_destination(&weighted(&[0, 0]), &mut || 5), None);
    assert_eq!(choose_destination(&[], &mut || 5), None);
}

#[test]
fn no_endpoint_is_no_choice() {
    let cluster = balanced(LoadBalancer::RoundRobin, 0);
    let client = Client {
        address: "10.0.0.1".parse().unwrap(),
        workload: None,
    };
    let parts = request("/", &[]);
    let head = RequestHead::from_parts(&parts);
    assert_eq!(cluster.choose_endpoint(&head, &client, &mut || 1), None);
}

#[test]
fn random_and_round_robin() {
    let parts = request("/", &[]);
    let random = balanced(LoadBalancer::Random, 4);
    let mut draw = draws(11);
    let spread = counts(
        4,
        || Some(choose(&random, &parts, "10.0.0.1", &mut draw).index),
        8_000,
    );
    assert!(
        spread.iter().all(|&c| (1_800..=2_200).contains(&c)),
        "{spread:?}"
    );
    let round_robin = balanced(LoadBalancer::RoundRobin, 3);
    let order: Vec<usize> = (0..7)
        .map(|_| choose(&round_robin, &parts, "10.0.0.1", &mut || 0).index)
        .collect();
    assert_eq!(order, [0, 1, 2, 0, 1, 2, 0]);
}

#[test]
fn least_request_takes_the_less_loaded_of_two() {
    let parts = request("/", &[]);
    let cluster = balanced(LoadBalancer::LeastRequest, 2);
    let busy = cluster.loads[0].start();
    let _busier = cluster.loads[0].start();
    assert_eq!(cluster.loads[0].in_flight(), 2);
    // Whatever the draws, of two endpoints both are compared: the idle one wins.
    let mut draw = draws(5);
    for _ in 0..50 {
        assert_eq!(choose(&cluster, &parts, "10.0.0.1", &mut draw).index, 1);
    }
    drop(busy);
    assert_eq!(
        cluster.loads[0].in_flight(),
        1,
        "a guard's drop ends its count"
    );
    let _a = cluster.loads[1].start();
    let _b = cluster.loads[1].start();
    assert_eq!(choose(&cluster, &parts, "10.0.0.1", &mut draw).index, 0);
    // One endpoint: always it.
    let single = balanced(LoadBalancer::LeastRequest, 1);
    assert_eq!(
        choose(&single, &parts, "10.0.0.1", &mut || u32::MAX).index,
        0
    );
}

fn by_header() -> LoadBalancer {
    LoadBalancer::ConsistentHash(HashKey::Header("x-user".into()))
}

/// The endpoint address each of `keys` reaches through `cluster`, by header `x-user`.
fn placement(cluster: &ClusterTable, keys: usize) -> Vec<std::net::SocketAddr> {
    (0..keys)
        .map(|key| {
            let parts = request("/", &[("x-user", &format!("user-{key}"))]);
            let index = choose(cluster, &parts, "10.0.0.1", &mut || panic!("no draw")).index;
            cluster.spec.endpoints[index].address
        })
        .collect()
}

#[test]
fn consistent_hash_sends_one_key_to_one_endpoint_and_spreads_keys() {
    let cluster = balanced(by_header(), 4);
    let first = placement(&cluster, 10_000);
    assert_eq!(
        first,
        placement(&cluster, 10_000),
        "the same key, the same endpoint"
    );
    // A ring built anew (another replica, a restart) agrees.
    assert_eq!(first, placement(&balanced(by_header(), 4), 10_000));
    let mut per_endpoint: HashMap<_, usize> = HashMap::new();
    for address in &first {
        *per_endpoint.entry(*address).or_default() += 1;
    }
    assert_eq!(per_endpoint.len(), 4);
    for (address, count) in per_endpoint {
        assert!(
            (1_750..=3_250).contains(&count),
            "{address}: {count} of 10,000"
        );
    }
}

#[test]
fn removing_an_endpoint_moves_only_its_keys() {
    let four = balanced(by_header(), 4);
    let mut spec = four.spec.clone();
    let removed = spec.endpoints.remove(2).address;
    let three = ClusterTable::new(spec);
    let before = placement(&four, 10_000);
    let after = placement(&three, 10_000);
    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        if *b != removed {
            assert_eq!(b, a, "a key not on the removed endpoint moved");
        } else {
            moved += 1;
        }
    }
    assert!(moved > 1_000, "the removed endpoint held {moved} keys");
}

#[test]
fn a_request_without_the_key_goes_to_a_random_endpoint() {
    let cluster = balanced(by_header(), 4);
    let parts = request("/", &[]);
    let mut draw = draws(9);
    let spread = counts(
        4,
        || Some(choose(&cluster, &parts, "10.0.0.1", &mut draw).index),
        4_000,
    );
    assert!(spread.iter().all(|&c| c > 800), "{spread:?}");
}

#[test]
fn source_ip_and_query_parameter_keys() {
    let by_source = balanced(LoadBalancer::ConsistentHash(HashKey::SourceIp), 8);
    let parts = request("/", &[]);
    let no_draw = &mut || panic!("no draw");
    let a = choose(&by_source, &parts, "10.0.0.1", no_draw).index;
    for _ in 0..10 {
        assert_eq!(choose(&by_source, &parts, "10.0.0.1", no_draw).index, a);
    }
    // A mapped client is its IPv4 self once identified.
    let table = RouteTable::new(config()).unwrap();
    let mapped = Client::identify(&table, "::ffff:10.0.0.1".parse().unwrap());
    let head = RequestHead::from_parts(&parts);
    assert_eq!(
        by_source
            .choose_endpoint(&head, &mapped, no_draw)
            .unwrap()
            .index,
        a
    );
    let sources: std::collections::HashSet<usize> = (0..50)
        .map(|i| choose(&by_source, &parts, &format!("10.1.0.{i}"), no_draw).index)
        .collect();
    assert!(sources.len() > 4, "sources spread: {sources:?}");

    let by_query = balanced(
        LoadBalancer::ConsistentHash(HashKey::QueryParameter("u".into())),
        8,
    );
    let one = choose(&by_query, &request("/?u=jason", &[]), "10.0.0.1", no_draw).index;
    let again = choose(
        &by_query,
        &request("/x?a=1&u=jason", &[]),
        "10.0.0.2",
        no_draw,
    )
    .index;
    assert_eq!(one, again);
}

#[test]
fn a_hash_cookie_is_read_and_set_when_missing_with_a_ttl() {
    let cookie = |ttl_ms| {
        LoadBalancer::ConsistentHash(HashKey::Cookie(HashCookie {
            name: "session".into(),
            path: Some("/".into()),
            ttl_ms,
        }))
    };
    let cluster = balanced(cookie(Some(60_000)), 8);
    let no_draw = &mut || panic!("no draw");
    let fresh = choose(&cluster, &request("/", &[]), "10.0.0.1", no_draw);
    let set = fresh
        .set_cookie
        .clone()
        .expect("the response sets the cookie");
    assert_eq!(set.name, "session");
    assert_eq!(set.max_age_seconds, Some(60));
    assert_eq!(
        set.header_value(),
        format!("session={}; Max-Age=60; Path=/; HttpOnly", set.value)
    );
    // The client comes back with it: same endpoint, nothing to set.
    let header = format!("other=1; session={}", set.value);
    let back = choose(
        &cluster,
        &request("/", &[("cookie", &header)]),
        "10.0.0.1",
        no_draw,
    );
    assert_eq!(
        back,
        EndpointChoice {
            index: fresh.index,
            set_cookie: None
        }
    );
    // Without a ttl the waypoint sets nothing, and a request without the cookie is random.
    let no_ttl = balanced(cookie(None), 8);
    let mut draw = draws(1);
    let random = choose(&no_ttl, &request("/", &[]), "10.0.0.1", &mut draw);
    assert_eq!(random.set_cookie, None);
    // A ttl under a second is a session cookie (Envoy rounds it down to 0 s).
    let short = balanced(cookie(Some(999)), 8);
    let session = choose(&short, &request("/", &[]), "10.0.0.1", no_draw)
        .set_cookie
        .unwrap();
    assert_eq!(session.max_age_seconds, None);
    assert!(!session.header_value().contains("Max-Age"));
}

#[test]
fn the_stable_hash_does_not_change() {
    // Replicas and releases must agree: pinned values.
    assert_eq!(stable_hash(b""), stable_hash(b""));
    assert_ne!(stable_hash(b"a"), stable_hash(b"b"));
    assert_eq!(
        stable_hash(b"10.0.0.1"),
        0xc879_e56d_dc6c_5c88_u64,
        "{:#x}",
        stable_hash(b"10.0.0.1")
    );
}
