use http::request::Parts;
use kmesh_snapshot::waypoint::{
    AbortFault, DelayFault, Header, HttpRoute, PathMatch, RegexRewrite, RequestMatch, Rewrite,
    RouteAction,
};

use super::*;
use crate::{
    identity::Client,
    matching::first_match,
    table::{
        RouteTable,
        tests::{REVIEWS, config_with, route},
    },
};

fn header(name: &str, value: &str) -> Header {
    Header {
        name: name.into(),
        value: value.into(),
    }
}

fn request(target: &str, headers: &[(&str, &str)]) -> Parts {
    let mut builder = http::Request::builder().uri(target);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).unwrap().into_parts().0
}

/// Runs `check` with the route `spec` compiled and matched against `target`.
fn with_route<T>(
    spec: HttpRoute,
    target: &str,
    check: impl FnOnce(&Route, &RequestHead<'_>, Option<MatchedPrefix>) -> T,
) -> T {
    let table = RouteTable::new(config_with(vec![spec])).unwrap();
    let port = table.port(REVIEWS).unwrap();
    let parts = request(target, &[("host", "reviews:9080")]);
    let head = RequestHead::from_parts(&parts);
    let client = Client::identify(&table, "10.0.0.1".parse().unwrap());
    let found = first_match(port, &head, &client).expect("the route matches");
    check(found.route, &head, found.matched_prefix)
}

fn on_path(path: PathMatch) -> Vec<RequestMatch> {
    vec![RequestMatch {
        path: Some(path),
        ..RequestMatch::default()
    }]
}

/// The path and query `target` is forwarded with, after a match `m` and the rewrite `rewrite`.
fn rewritten(m: Vec<RequestMatch>, rewrite: PathRewrite, target: &str) -> String {
    let mut spec = route(m, 0);
    spec.rewrite = Some(Rewrite {
        path: Some(rewrite),
        authority: None,
    });
    with_route(spec, target, |route, head, matched| {
        rewrite_request_path(route, head, matched)
            .expect("a rewrite")
            .expect("a valid path")
            .to_string()
    })
}

#[test]
fn header_operations_remove_then_set_then_add_route_then_destination() {
    let mut spec = route(vec![], 0);
    spec.request_headers = HeaderOps {
        remove: vec!["x-drop".into(), "x-set".into()],
        set: vec![header("x-set", "route"), header("x-new", "1")],
        add: vec![header("x-set", "added")],
    };
    if let RouteAction::Forward(destinations) = &mut spec.action {
        destinations[0].request_headers = HeaderOps {
            set: vec![header("x-new", "destination")],
            ..HeaderOps::default()
        };
        destinations[0].response_headers = HeaderOps {
            add: vec![header("x-served-by", "v1")],
            ..HeaderOps::default()
        };
    }
    spec.response_headers = HeaderOps {
        remove: vec!["server".into()],
        ..HeaderOps::default()
    };
    with_route(spec, "/", |route, _, _| {
        let mut headers = HeaderMap::new();
        headers.append("x-drop", HeaderValue::from_static("a"));
        headers.append("x-set", HeaderValue::from_static("old1"));
        headers.append("x-set", HeaderValue::from_static("old2"));
        edit_request_headers(route, Some(0), &mut headers);
        assert!(headers.get("x-drop").is_none());
        let set: Vec<_> = headers.get_all("x-set").iter().collect();
        // Set replaced both old values, then add appended: set before add.
        assert_eq!(set, ["route", "added"]);
        // The destination's set comes after the route's.
        assert_eq!(headers.get("x-new").unwrap(), "destination");

        let mut response = HeaderMap::new();
        response.insert("server", HeaderValue::from_static("envoy"));
        edit_response_headers(route, Some(0), &mut response);
        assert!(response.get("server").is_none());
        assert_eq!(response.get("x-served-by").unwrap(), "v1");
        // An unknown destination: the route's operations only.
        let mut only_route = HeaderMap::new();
        edit_request_headers(route, Some(9), &mut only_route);
        assert_eq!(only_route.get("x-new").unwrap(), "1");
    });
}

#[test]
fn header_operations_that_cannot_be_made_refuse_the_table() {
    let mut spec = route(vec![], 0);
    spec.request_headers.set = vec![header(":authority", "x")];
    let error = RouteTable::new(config_with(vec![spec])).unwrap_err();
    assert!(
        matches!(&error, TableError::Unusable { field, .. } if field == "services[0].ports[0].http[0].requestHeaders.set[0].name"),
        "{error}"
    );
    let mut spec = route(vec![], 0);
    spec.response_headers.add = vec![header("x-bell", "\u{7}")];
    let error = RouteTable::new(config_with(vec![spec])).unwrap_err();
    assert!(
        matches!(&error, TableError::Unusable { field, .. } if field == "services[0].ports[0].http[0].responseHeaders.add[0].value"),
        "{error}"
    );
}

#[test]
fn a_full_rewrite_keeps_the_query() {
    let full = || PathRewrite::Full("/v2/reviews".into());
    assert_eq!(
        rewritten(vec![], full(), "/reviews/1?u=jason"),
        "/v2/reviews?u=jason"
    );
    assert_eq!(rewritten(vec![], full(), "/"), "/v2/reviews");
}

#[test]
fn a_string_prefix_rewrite_replaces_exactly_the_matched_bytes() {
    let prefix = || on_path(PathMatch::Prefix("/reviews".into()));
    let to = |s: &str| PathRewrite::MatchedPrefix(s.into());
    assert_eq!(
        rewritten(prefix(), to("/v2"), "/reviews/1?x=1"),
        "/v2/1?x=1"
    );
    assert_eq!(rewritten(prefix(), to("/v2"), "/reviewsX"), "/v2X");
    // Envoy's prefix_rewrite: `/` + `/1` is `//1`; Istio users write `/reviews/` to avoid it.
    assert_eq!(rewritten(prefix(), to("/"), "/reviews/1"), "//1");
    // Case-insensitively matched: the request's own bytes are the prefix.
    let any_case = vec![RequestMatch {
        ignore_path_case: true,
        ..prefix()[0].clone()
    }];
    assert_eq!(rewritten(any_case, to("/v2"), "/REVIEWS/1"), "/v2/1");
}

#[test]
fn a_segment_prefix_rewrite_follows_the_gateway_api_table() {
    // Request path, prefix match, replacement, result: the ReplacePrefixMatch table.
    let rows = [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
        ("/foo/bar", "/", "/xyz", "/xyz/foo/bar"),
    ];
    for (path, prefix, replacement, expected) in rows {
        let m = on_path(PathMatch::SegmentPrefix(prefix.into()));
        let got = rewritten(m, PathRewrite::MatchedPrefix(replacement.into()), path);
        assert_eq!(got, expected, "{path} by {prefix} → {replacement}");
    }
}

#[test]
fn a_matched_prefix_rewrite_without_a_prefix_match_replaces_the_whole_path() {
    let exact = on_path(PathMatch::Exact("/reviews/1".into()));
    let to = PathRewrite::MatchedPrefix("/v2".into());
    assert_eq!(rewritten(exact, to.clone(), "/reviews/1?a"), "/v2?a");
    assert_eq!(rewritten(vec![], to, "/anything"), "/v2");
}

#[test]
fn a_regex_rewrite_replaces_every_match_with_re2_groups() {
    let rewrite = |pattern: &str, substitution: &str| {
        PathRewrite::Regex(RegexRewrite {
            pattern: pattern.into(),
            substitution: substitution.into(),
        })
    };
    assert_eq!(
        rewritten(
            vec![],
            rewrite("^/service/([^/]+)(/.*)$", "\\2/instance/\\1"),
            "/service/foo/v1/api?q=1"
        ),
        "/v1/api/instance/foo?q=1"
    );
    // Unanchored: every match, anywhere.
    assert_eq!(rewritten(vec![], rewrite("o", "0"), "/foo/boo"), "/f00/b00");
    // `$` is literal in RE2; `\\` a backslash (not valid in a path, so checked in the converter).
    assert_eq!(rewritten(vec![], rewrite("/a", "/$1"), "/a"), "/$1");
    assert_eq!(re2_substitution("\\\\x\\1$").unwrap(), "\\x${1}$$");
    assert!(re2_substitution("\\x").is_err());
    assert!(re2_substitution("\\").is_err());
    let mut spec = route(vec![], 0);
    spec.rewrite = Some(Rewrite {
        path: Some(rewrite("a", "\\q")),
        authority: None,
    });
    let error = RouteTable::new(config_with(vec![spec])).unwrap_err();
    assert!(
        matches!(&error, TableError::Unusable { field, .. } if field == "services[0].ports[0].http[0].rewrite.path.substitution"),
        "{error}"
    );
}

#[test]
fn a_rewrite_to_an_invalid_path_is_an_error_not_a_panic() {
    let mut spec = route(vec![], 0);
    spec.rewrite = Some(Rewrite {
        path: Some(PathRewrite::Regex(RegexRewrite {
            pattern: "x".into(),
            substitution: "a b".into(),
        })),
        authority: Some("ratings:9080".into()),
    });
    with_route(spec, "/x", |route, head, matched| {
        assert!(matches!(
            rewrite_request_path(route, head, matched),
            Some(Err(RewriteError::InvalidPath(_)))
        ));
        assert_eq!(rewrite_authority(route).unwrap(), "ratings:9080");
    });
}

fn redirect_route(redirect: Redirect, m: Vec<RequestMatch>) -> HttpRoute {
    HttpRoute {
        action: RouteAction::Redirect(redirect),
        ..route(m, 0)
    }
}

fn redirect_of(redirect: Redirect, m: Vec<RequestMatch>, target: &str) -> (u16, String) {
    let spec = redirect_route(redirect.clone(), m);
    with_route(spec, target, |route, head, matched| {
        let answer = super::redirect(route, &redirect, head, matched).unwrap();
        (
            answer.status.as_u16(),
            answer.location.to_str().unwrap().to_owned(),
        )
    })
}

fn plain_redirect(status: u16) -> Redirect {
    Redirect {
        scheme: None,
        authority: None,
        port: None,
        path: None,
        status,
    }
}

#[test]
fn a_redirect_keeps_what_it_does_not_set_and_always_the_query() {
    // The request is `Host: reviews:9080`.
    let same = plain_redirect(302);
    assert_eq!(
        redirect_of(same, vec![], "/a?b=c"),
        (302, "http://reviews:9080/a?b=c".into())
    );
    let host = Redirect {
        authority: Some("ratings".into()),
        ..plain_redirect(301)
    };
    assert_eq!(
        redirect_of(host, vec![], "/a"),
        (301, "http://ratings:9080/a".into())
    );
    // A new scheme means its default port: the request's is dropped.
    let https = Redirect {
        scheme: Some("https".into()),
        ..plain_redirect(308)
    };
    assert_eq!(
        redirect_of(https, vec![], "/a?q"),
        (308, "https://reviews/a?q".into())
    );
    let https_port = Redirect {
        scheme: Some("https".into()),
        port: Some(8443),
        ..plain_redirect(307)
    };
    assert_eq!(
        redirect_of(https_port, vec![], "/a"),
        (307, "https://reviews:8443/a".into())
    );
    // A scheme's default port is left out.
    let port_80 = Redirect {
        port: Some(80),
        ..plain_redirect(301)
    };
    assert_eq!(
        redirect_of(port_80, vec![], "/a"),
        (301, "http://reviews/a".into())
    );
    // The path is rewritten as a forwarded one would be, after the route's own match.
    let moved = Redirect {
        path: Some(PathRewrite::MatchedPrefix("/v2".into())),
        ..plain_redirect(301)
    };
    let m = on_path(PathMatch::SegmentPrefix("/v1".into()));
    assert_eq!(
        redirect_of(moved, m, "/v1/x?y"),
        (301, "http://reviews:9080/v2/x?y".into())
    );
}

#[test]
fn a_redirect_without_any_authority_is_an_error() {
    let redirect = plain_redirect(301);
    let table =
        RouteTable::new(config_with(vec![redirect_route(redirect.clone(), vec![])])).unwrap();
    let port = table.port(REVIEWS).unwrap();
    let parts = request("/a", &[]);
    let head = RequestHead::from_parts(&parts);
    let client = Client::identify(&table, "10.0.0.1".parse().unwrap());
    let found = first_match(port, &head, &client).unwrap();
    assert_eq!(
        super::redirect(found.route, &redirect, &head, None),
        Err(RewriteError::NoAuthority)
    );
    let bad_host = redirect_route(
        Redirect {
            authority: Some("ratings:80".into()),
            ..plain_redirect(301)
        },
        vec![],
    );
    assert!(matches!(
        RouteTable::new(config_with(vec![bad_host])),
        Err(TableError::Unusable { field, .. }) if field == "services[0].ports[0].http[0].action.redirect.authority"
    ));
}

/// The uniform draw `x / 2^32` closest below `fraction`.
fn draw_at(fraction: f64) -> u32 {
    (fraction * 4_294_967_296.0) as u32
}

#[test]
fn fault_percentages_have_a_per_million_resolution() {
    assert!(!happens(0.0, 0));
    assert!(happens(100.0, u32::MAX));
    assert!(happens(50.0, draw_at(0.4999)));
    assert!(!happens(50.0, draw_at(0.5)));
    // 0.0001 % is one in a million: the lowest draws only.
    assert!(happens(0.0001, 0));
    assert!(happens(0.0001, draw_at(0.0000009)));
    assert!(!happens(0.0001, draw_at(0.0000011)));
    assert!(!happens(0.00004, 0), "below the resolution: never");
}

#[test]
fn a_fault_delays_and_aborts_on_their_own_draws() {
    let fault = Fault {
        delay: Some(DelayFault {
            fixed_delay_ms: 5_000,
            percent: 100.0,
        }),
        abort: Some(AbortFault {
            status: 503,
            percent: 10.0,
        }),
    };
    let mut draws = [draw_at(0.99), draw_at(0.05)].into_iter();
    let decision = decide_fault(&fault, &mut || draws.next().unwrap());
    assert_eq!(
        decision,
        FaultDecision {
            delay: Some(Duration::from_secs(5)),
            abort: Some(StatusCode::SERVICE_UNAVAILABLE),
        }
    );
    let mut draws = [draw_at(0.0), draw_at(0.2)].into_iter();
    let decision = decide_fault(&fault, &mut || draws.next().unwrap());
    assert_eq!(decision.abort, None);
    assert_eq!(
        decide_fault(&Fault::default(), &mut || 0),
        FaultDecision::default()
    );
}

#[test]
fn mirrors_are_drawn_one_by_one() {
    let mirrors = [
        Mirror {
            cluster: 1,
            percent: 100.0,
        },
        Mirror {
            cluster: 2,
            percent: 0.0,
        },
        Mirror {
            cluster: 0,
            percent: 25.0,
        },
    ];
    let mut draws = [draw_at(0.9), 0, draw_at(0.2)].into_iter();
    assert_eq!(
        decide_mirrors(&mirrors, &mut || draws.next().unwrap()),
        [1, 0]
    );
    let mut draws = [0, 0, draw_at(0.3)].into_iter();
    assert_eq!(decide_mirrors(&mirrors, &mut || draws.next().unwrap()), [1]);
}
