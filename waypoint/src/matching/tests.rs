use std::{collections::BTreeMap, net::IpAddr};

use kmesh_snapshot::waypoint::{
    HeaderMatch, PathMatch, QueryParamMatch, RequestMatch, StringMatch,
};

use super::*;
use crate::table::{
    RouteTable,
    tests::{REVIEWS, config_with, route, workload},
};

/// A GET of `target` (path and query, or absolute form) with these headers.
fn request(target: &str, headers: &[(&str, &str)]) -> Parts {
    let mut builder = http::Request::builder().uri(target);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).unwrap().into_parts().0
}

/// The index of the route of `routes` that takes the request, from an unknown client.
fn taken(routes: Vec<kmesh_snapshot::waypoint::HttpRoute>, parts: &Parts) -> Option<usize> {
    taken_from(routes, parts, "192.0.2.1")
}

fn taken_from(
    routes: Vec<kmesh_snapshot::waypoint::HttpRoute>,
    parts: &Parts,
    source: &str,
) -> Option<usize> {
    let mut config = config_with(routes);
    config.workloads = vec![
        workload("productpage", &["10.0.0.9"]),
        kmesh_snapshot::waypoint::Workload {
            namespace: "other".into(),
            ..workload("stranger", &["10.0.0.8"])
        },
    ];
    let table = RouteTable::new(config).unwrap();
    let client = Client::identify(&table, source.parse::<IpAddr>().unwrap());
    first_match(
        table.port(REVIEWS)?,
        &RequestHead::from_parts(parts),
        &client,
    )
    .map(|m| m.index)
}

fn on_path(path: PathMatch) -> RequestMatch {
    RequestMatch {
        path: Some(path),
        ..RequestMatch::default()
    }
}

fn with_header(name: &str, value: Option<StringMatch>, invert: bool) -> RequestMatch {
    RequestMatch {
        headers: vec![HeaderMatch {
            name: name.into(),
            value,
            invert,
        }],
        ..RequestMatch::default()
    }
}

fn with_query(name: &str, value: Option<StringMatch>) -> RequestMatch {
    RequestMatch {
        query_params: vec![QueryParamMatch {
            name: name.into(),
            value,
        }],
        ..RequestMatch::default()
    }
}

fn exact(s: &str) -> Option<StringMatch> {
    Some(StringMatch::Exact(s.into()))
}

fn regex(s: &str) -> Option<StringMatch> {
    Some(StringMatch::Regex(s.into()))
}

#[test]
fn the_first_matching_route_wins_and_none_is_no_route() {
    let jason = with_header("end-user", exact("jason"), false);
    let routes = || {
        vec![
            route(vec![jason.clone()], 1),
            route(vec![on_path(PathMatch::Prefix("/reviews".into()))], 2),
            route(vec![], 0),
        ]
    };
    let both = request("/reviews/1", &[("end-user", "jason")]);
    assert_eq!(taken(routes(), &both), Some(0));
    assert_eq!(taken(routes(), &request("/reviews/1", &[])), Some(1));
    assert_eq!(taken(routes(), &request("/other", &[])), Some(2));
    // Without the catch-all, nothing takes `/other`: the proxy's 404.
    let mut without_catch_all = routes();
    without_catch_all.pop();
    assert_eq!(taken(without_catch_all, &request("/other", &[])), None);
}

#[test]
fn matches_are_ored_and_an_empty_match_takes_everything() {
    let two = vec![
        on_path(PathMatch::Exact("/a".into())),
        on_path(PathMatch::Exact("/b".into())),
    ];
    assert_eq!(
        taken(vec![route(two.clone(), 0)], &request("/b", &[])),
        Some(0)
    );
    assert_eq!(taken(vec![route(two, 0)], &request("/c", &[])), None);
    let no_conditions = vec![RequestMatch::default()];
    assert_eq!(
        taken(vec![route(no_conditions, 0)], &request("/c", &[])),
        Some(0)
    );
}

#[test]
fn conditions_of_one_match_are_anded() {
    let both = RequestMatch {
        path: Some(PathMatch::Prefix("/r".into())),
        method: exact("POST"),
        ..RequestMatch::default()
    };
    assert_eq!(
        taken(vec![route(vec![both.clone()], 0)], &request("/r", &[])),
        None
    );
    let mut post = request("/r", &[]);
    post.method = Method::POST;
    assert_eq!(taken(vec![route(vec![both], 0)], &post), Some(0));
}

#[test]
fn paths_exact_prefix_segment_prefix_and_regex() {
    let one =
        |m: PathMatch, path: &str| taken(vec![route(vec![on_path(m)], 0)], &request(path, &[]));
    let prefix = || PathMatch::Prefix("/reviews".into());
    let segment = || PathMatch::SegmentPrefix("/reviews".into());
    assert_eq!(one(prefix(), "/reviewsX"), Some(0));
    assert_eq!(one(segment(), "/reviewsX"), None);
    assert_eq!(one(segment(), "/reviews"), Some(0));
    assert_eq!(one(segment(), "/reviews/"), Some(0));
    assert_eq!(one(segment(), "/reviews/1"), Some(0));
    assert_eq!(
        one(PathMatch::SegmentPrefix("/reviews/".into()), "/reviews"),
        Some(0)
    );
    assert_eq!(
        one(PathMatch::SegmentPrefix("/reviews/".into()), "/reviewsX"),
        None
    );
    assert_eq!(
        one(PathMatch::SegmentPrefix("/".into()), "/anything"),
        Some(0)
    );
    assert_eq!(one(prefix(), "/review"), None);
    assert_eq!(
        one(PathMatch::Exact("/reviews".into()), "/reviews"),
        Some(0)
    );
    assert_eq!(one(PathMatch::Exact("/reviews".into()), "/reviews/"), None);
    // The query string is not part of the path.
    assert_eq!(
        one(PathMatch::Exact("/reviews".into()), "/reviews?u=1"),
        Some(0)
    );
    assert_eq!(
        one(PathMatch::Regex("/reviews/[0-9]+".into()), "/reviews/12"),
        Some(0)
    );
    assert_eq!(
        one(PathMatch::Regex("/reviews/[0-9]+".into()), "/reviews/12/x"),
        None
    );
    assert_eq!(
        one(PathMatch::Regex("/[0-9]+".into()), "/reviews/12"),
        None,
        "anchored"
    );
    assert_eq!(
        one(
            PathMatch::Regex("/reviews/[0-9]+".into()),
            "/reviews/12?a=b"
        ),
        Some(0)
    );
}

#[test]
fn ignore_path_case_applies_to_exact_and_prefixes_not_to_regex() {
    let one = |m: PathMatch, path: &str| {
        let m = RequestMatch {
            ignore_path_case: true,
            ..on_path(m)
        };
        taken(vec![route(vec![m], 0)], &request(path, &[]))
    };
    assert_eq!(
        one(PathMatch::Exact("/Reviews".into()), "/rEVIEWS"),
        Some(0)
    );
    assert_eq!(
        one(PathMatch::Prefix("/Reviews".into()), "/rEVIEWSx"),
        Some(0)
    );
    assert_eq!(
        one(PathMatch::SegmentPrefix("/Reviews".into()), "/REVIEWS/1"),
        Some(0)
    );
    assert_eq!(
        one(PathMatch::SegmentPrefix("/Reviews".into()), "/REVIEWSx"),
        None
    );
    assert_eq!(one(PathMatch::Regex("/reviews".into()), "/REVIEWS"), None);
    // And without the flag, case counts.
    let exact = on_path(PathMatch::Exact("/Reviews".into()));
    assert_eq!(
        taken(vec![route(vec![exact], 0)], &request("/reviews", &[])),
        None
    );
}

#[test]
fn the_matched_prefix_is_reported_for_prefix_kinds_only() {
    let table = RouteTable::new(config_with(vec![
        route(vec![on_path(PathMatch::Exact("/e".into()))], 0),
        route(vec![on_path(PathMatch::SegmentPrefix("/seg/".into()))], 0),
        route(vec![on_path(PathMatch::Prefix("/str".into()))], 0),
    ]))
    .unwrap();
    let port = table.port(REVIEWS).unwrap();
    let client = Client::identify(&table, "192.0.2.1".parse().unwrap());
    let prefix_of = |path: &str| {
        let parts = request(path, &[]);
        first_match(port, &RequestHead::from_parts(&parts), &client).map(|m| m.matched_prefix)
    };
    assert_eq!(prefix_of("/e"), Some(None));
    assert_eq!(
        prefix_of("/seg/x"),
        Some(Some(MatchedPrefix {
            len: 4,
            kind: PrefixKind::Segment
        }))
    );
    assert_eq!(
        prefix_of("/strx"),
        Some(Some(MatchedPrefix {
            len: 4,
            kind: PrefixKind::String
        }))
    );
}

#[test]
fn method_and_authority() {
    let on = |m: RequestMatch, parts: &Parts| taken(vec![route(vec![m], 0)], parts);
    let method = RequestMatch {
        method: regex("GET|HEAD"),
        ..RequestMatch::default()
    };
    assert_eq!(on(method.clone(), &request("/", &[])), Some(0));
    let mut put = request("/", &[]);
    put.method = Method::PUT;
    assert_eq!(on(method, &put), None);

    let authority = |m| RequestMatch {
        authority: Some(m),
        ..RequestMatch::default()
    };
    let host = request("/", &[("host", "reviews:9080")]);
    // The whole `:authority`, port included.
    assert_eq!(
        on(authority(StringMatch::Exact("reviews".into())), &host),
        None
    );
    assert_eq!(
        on(authority(StringMatch::Exact("reviews:9080".into())), &host),
        Some(0)
    );
    assert_eq!(
        on(authority(StringMatch::Prefix("reviews".into())), &host),
        Some(0)
    );
    assert_eq!(on(authority(StringMatch::Regex("rev".into())), &host), None);
    // An absolute-form target's authority is the request's, whatever Host says.
    let absolute = request("http://ratings:9080/x", &[("host", "reviews:9080")]);
    assert_eq!(
        on(authority(StringMatch::Prefix("ratings".into())), &absolute),
        Some(0)
    );
    // No authority at all: no authority condition holds.
    assert_eq!(
        on(
            authority(StringMatch::Prefix("".into())),
            &request("/", &[])
        ),
        None
    );
}

#[test]
fn headers_present_exact_prefix_regex_and_inverted() {
    let on = |m: RequestMatch, headers: &[(&str, &str)]| {
        taken(vec![route(vec![m], 0)], &request("/", headers))
    };
    let jason = [("end-user", "jason")];
    assert_eq!(on(with_header("end-user", None, false), &jason), Some(0));
    assert_eq!(on(with_header("end-user", None, false), &[]), None);
    assert_eq!(
        on(with_header("end-user", exact("jason"), false), &jason),
        Some(0)
    );
    assert_eq!(
        on(with_header("end-user", exact("jaso"), false), &jason),
        None
    );
    assert_eq!(
        on(
            with_header("end-user", Some(StringMatch::Prefix("ja".into())), false),
            &jason
        ),
        Some(0)
    );
    // A regex matches the whole value: `ja` is not `jason`.
    assert_eq!(
        on(with_header("end-user", regex("ja"), false), &jason),
        None
    );
    assert_eq!(
        on(with_header("end-user", regex("ja.*"), false), &jason),
        Some(0)
    );
    // Inverted: holds when the comparison does not, an absent header included.
    assert_eq!(
        on(with_header("end-user", exact("jason"), true), &jason),
        None
    );
    assert_eq!(
        on(
            with_header("end-user", exact("jason"), true),
            &[("end-user", "mike")]
        ),
        Some(0)
    );
    assert_eq!(
        on(with_header("end-user", exact("jason"), true), &[]),
        Some(0)
    );
    assert_eq!(on(with_header("end-user", None, true), &jason), None);
    assert_eq!(on(with_header("end-user", None, true), &[]), Some(0));
}

#[test]
fn a_header_sent_twice_is_compared_joined_with_a_comma() {
    let on = |m: RequestMatch, headers: &[(&str, &str)]| {
        taken(vec![route(vec![m], 0)], &request("/", headers))
    };
    let twice = [("x-tag", "a"), ("x-tag", "b")];
    assert_eq!(
        on(with_header("x-tag", exact("a,b"), false), &twice),
        Some(0)
    );
    assert_eq!(on(with_header("x-tag", exact("a"), false), &twice), None);
    assert_eq!(on(with_header("x-tag", exact("b"), false), &twice), None);
}

#[test]
fn a_header_that_is_not_utf8_fails_every_comparison_but_presence() {
    let mut parts = request("/", &[]);
    parts
        .headers
        .insert("x-raw", http::HeaderValue::from_bytes(b"caf\xe9").unwrap());
    let on = |m| taken(vec![route(vec![m], 0)], &parts);
    assert_eq!(on(with_header("x-raw", None, false)), Some(0));
    assert_eq!(on(with_header("x-raw", regex(".*"), false)), None);
    assert_eq!(on(with_header("x-raw", regex(".*"), true)), Some(0));
}

#[test]
fn pseudo_headers_name_parts_of_the_request() {
    let on = |m| {
        taken(
            vec![route(vec![m], 0)],
            &request("/p?q=1", &[("host", "reviews")]),
        )
    };
    assert_eq!(
        on(with_header(":authority", exact("reviews"), false)),
        Some(0)
    );
    assert_eq!(on(with_header(":method", exact("GET"), false)), Some(0));
    assert_eq!(on(with_header(":path", exact("/p?q=1"), false)), Some(0));
    assert_eq!(on(with_header(":scheme", exact("http"), false)), Some(0));
    assert_eq!(on(with_header(":scheme", exact("https"), false)), None);
}

#[test]
fn query_params_present_exact_regex_decoded_first_value() {
    let on = |m: RequestMatch, target: &str| taken(vec![route(vec![m], 0)], &request(target, &[]));
    assert_eq!(on(with_query("debug", None), "/?debug"), Some(0));
    assert_eq!(on(with_query("debug", None), "/?debugging=1"), None);
    assert_eq!(on(with_query("debug", None), "/"), None);
    assert_eq!(on(with_query("debug", exact("")), "/?debug"), Some(0));
    assert_eq!(
        on(with_query("u", exact("jason")), "/?a=1&u=jason"),
        Some(0)
    );
    assert_eq!(on(with_query("u", exact("jason")), "/?a=1&u=jasonx"), None);
    assert_eq!(
        on(with_query("u", regex("ja")), "/?u=jason"),
        None,
        "anchored"
    );
    assert_eq!(on(with_query("u", regex("ja.*")), "/?u=jason"), Some(0));
    // Names and values are percent-decoded; `+` is not a space.
    assert_eq!(
        on(
            with_query("user name", exact("jo/e")),
            "/?user%20name=jo%2Fe"
        ),
        Some(0)
    );
    assert_eq!(on(with_query("u", exact("a+b")), "/?u=a+b"), Some(0));
    assert_eq!(on(with_query("u", exact("100%")), "/?u=100%"), Some(0));
    // Names are case-sensitive; the first value counts.
    assert_eq!(on(with_query("U", None), "/?u=1"), None);
    assert_eq!(on(with_query("u", exact("1")), "/?u=1&u=2"), Some(0));
    assert_eq!(on(with_query("u", exact("2")), "/?u=1&u=2"), None);
}

#[test]
fn the_port_condition_is_the_dialled_service_port() {
    let on_port = |port| RequestMatch {
        port: Some(port),
        ..RequestMatch::default()
    };
    assert_eq!(
        taken(vec![route(vec![on_port(9080)], 0)], &request("/", &[])),
        Some(0)
    );
    assert_eq!(
        taken(vec![route(vec![on_port(9081)], 0)], &request("/", &[])),
        None
    );
}

#[test]
fn source_namespace_and_labels_need_a_known_client() {
    let from = |m: RequestMatch, source: &str| {
        taken_from(vec![route(vec![m], 0)], &request("/", &[]), source)
    };
    let namespace = RequestMatch {
        source_namespace: Some("default".into()),
        ..RequestMatch::default()
    };
    assert_eq!(from(namespace.clone(), "10.0.0.9"), Some(0));
    assert_eq!(from(namespace.clone(), "::ffff:10.0.0.9"), Some(0));
    assert_eq!(
        from(namespace.clone(), "10.0.0.8"),
        None,
        "another namespace"
    );
    assert_eq!(from(namespace, "192.0.2.1"), None, "not a workload");
    let labels = |pairs: &[(&str, &str)]| RequestMatch {
        source_labels: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        ..RequestMatch::default()
    };
    assert_eq!(from(labels(&[("app", "productpage")]), "10.0.0.9"), Some(0));
    assert_eq!(from(labels(&[("app", "reviews")]), "10.0.0.9"), None);
    assert_eq!(
        from(labels(&[("app", "productpage"), ("v", "1")]), "10.0.0.9"),
        None,
        "all of them"
    );
    assert_eq!(from(labels(&[("app", "productpage")]), "192.0.2.1"), None);
}

#[test]
fn percent_decoding_never_panics_on_odd_input() {
    for text in [
        "%",
        "%%",
        "%4",
        "%zz",
        "a%e9b",
        "%E2%82",
        "%F0%9F%98%80",
        "é%41",
    ] {
        let _ = percent_decode(text);
    }
    assert_eq!(percent_decode("%41%2f"), "A/");
    assert_eq!(percent_decode("é%41"), "éA");
    assert_eq!(percent_decode("%e9"), "\u{fffd}");
}
