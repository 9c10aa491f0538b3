use super::*;

/// bookinfo's `virtual-service-reviews-jason-v2-v3.yaml` as the compiler is to write it: `end-user:
/// jason` to v2, everything else to v3.
fn jason() -> WaypointConfig {
    let cluster = |subset: &str, ip: &str| Cluster {
        name: format!("outbound|9080|{subset}|reviews.default.svc.cluster.local"),
        hostname: "reviews.default.svc.cluster.local".into(),
        port: 9080,
        subset: Some(subset.into()),
        protocol: Protocol::Http,
        load_balancer: LoadBalancer::LeastRequest,
        endpoints: vec![Endpoint {
            address: format!("{ip}:9080").parse().unwrap(),
        }],
    };
    let forward = |cluster| {
        RouteAction::Forward(vec![WeightedCluster {
            cluster,
            weight: 100,
            ..WeightedCluster::default()
        }])
    };
    let route = |i: usize, matches, action| HttpRoute {
        origin: format!("VirtualService default/reviews spec.http[{i}]"),
        matches,
        action,
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        rewrite: None,
        timeout_ms: None,
        retries: None,
        fault: None,
        mirrors: vec![],
    };
    WaypointConfig {
        version: WAYPOINT_CONFIG_VERSION,
        waypoint: WaypointName {
            namespace: "default".into(),
            name: "waypoint".into(),
        },
        trust_domain: "cluster.local".into(),
        services: vec![Service {
            id: 7,
            hostname: "reviews.default.svc.cluster.local".into(),
            namespace: "default".into(),
            name: "reviews".into(),
            ports: vec![ServicePort {
                port: 9080,
                protocol: Protocol::Http,
                http: vec![
                    route(
                        0,
                        vec![RequestMatch {
                            headers: vec![HeaderMatch {
                                name: "end-user".into(),
                                value: Some(StringMatch::Exact("jason".into())),
                                invert: false,
                            }],
                            ..RequestMatch::default()
                        }],
                        forward(0),
                    ),
                    route(1, vec![], forward(1)),
                ],
                tcp: vec![],
            }],
        }],
        clusters: vec![cluster("v2", "10.0.0.2"), cluster("v3", "10.0.0.3")],
        workloads: vec![],
        policies: vec![],
    }
}

#[test]
fn a_configuration_reads_back_as_written() {
    let config = jason();
    let json = config.to_json();
    assert_eq!(WaypointConfig::from_json(&json), Ok(config.clone()));
    assert_eq!(
        config
            .service(7)
            .and_then(|s| s.port(9080))
            .map(|p| p.http.len()),
        Some(2)
    );
    assert!(config.service(8).is_none());
}

/// The wire form is part of the operator–waypoint contract: this locks its spelling.
#[test]
fn the_json_spells_fields_and_variants_in_camel_case() {
    let json = String::from_utf8(jason().to_json()).unwrap();
    for fragment in [
        r#""version":1,"waypoint":{"namespace":"default","name":"waypoint"},"trustDomain":"cluster.local""#,
        r#""headers":[{"name":"end-user","value":{"exact":"jason"}}]"#,
        r#""action":{"forward":[{"cluster":0,"weight":100}]}"#,
        r#""loadBalancer":"leastRequest""#,
        r#""endpoints":[{"address":"10.0.0.2:9080"}]"#,
    ] {
        assert!(json.contains(fragment), "{fragment} not in {json}");
    }
    let retry: RetryPolicy = serde_json::from_str(
        r#"{"attempts":3,"retryOn":["5xx","gateway-error","retriable-4xx","connect-failure"]}"#,
    )
    .unwrap();
    assert_eq!(
        retry.retry_on,
        [
            RetryOn::FiveXx,
            RetryOn::GatewayError,
            RetryOn::Retriable4xx,
            RetryOn::ConnectFailure
        ]
    );
    let lb: LoadBalancer =
        serde_json::from_str(r#"{"consistentHash":{"cookie":{"name":"user","ttlMs":10000}}}"#)
            .unwrap();
    assert_eq!(
        lb,
        LoadBalancer::ConsistentHash(HashKey::Cookie(HashCookie {
            name: "user".into(),
            path: None,
            ttl_ms: Some(10000)
        }))
    );
}

#[test]
fn unknown_fields_and_other_versions_are_refused() {
    let json = String::from_utf8(jason().to_json()).unwrap();
    let unknown = json.replacen(r#""trustDomain""#, r#""corsPolicy":{},"trustDomain""#, 1);
    assert!(matches!(
        WaypointConfig::from_json(unknown.as_bytes()),
        Err(WaypointConfigError::Json(e)) if e.contains("unknown field `corsPolicy`")
    ));
    let mut config = jason();
    config.version = 2;
    assert_eq!(
        WaypointConfig::from_json(&config.to_json()),
        Err(WaypointConfigError::Version {
            found: 2,
            expected: WAYPOINT_CONFIG_VERSION
        })
    );
    let big = vec![b' '; MAX_WAYPOINT_CONFIG_BYTES + 1];
    assert!(matches!(
        WaypointConfig::from_json(&big),
        Err(WaypointConfigError::TooLarge { .. })
    ));
}

/// Each broken configuration is refused with the field and the reason.
#[test]
fn invalid_values_are_refused_with_their_field() {
    fn r(config: &mut WaypointConfig) -> &mut HttpRoute {
        &mut config.services[0].ports[0].http[0]
    }
    type Break = fn(&mut WaypointConfig);
    let cases: Vec<(Break, &str, &str)> = vec![
        (
            |c| {
                r(c).action = RouteAction::Forward(vec![WeightedCluster {
                    cluster: 2,
                    weight: 1,
                    ..Default::default()
                }])
            },
            "services[0].ports[0].http[0].action.forward[0].cluster",
            "cluster 2 does not exist (2 clusters)",
        ),
        (
            |c| {
                r(c).action = RouteAction::Forward(vec![WeightedCluster {
                    cluster: 0,
                    weight: 0,
                    ..Default::default()
                }])
            },
            "services[0].ports[0].http[0].action.forward",
            "every weight is 0",
        ),
        (
            |c| r(c).action = RouteAction::Forward(vec![]),
            "services[0].ports[0].http[0].action.forward",
            "no destination",
        ),
        (
            |c| {
                r(c).action = RouteAction::Forward(vec![
                    WeightedCluster {
                        cluster: 0,
                        weight: u32::MAX,
                        ..Default::default()
                    },
                    WeightedCluster {
                        cluster: 1,
                        weight: 1,
                        ..Default::default()
                    },
                ])
            },
            "services[0].ports[0].http[0].action.forward",
            "the weights add up to 4294967296, more than 2^32 - 1",
        ),
        (
            |c| {
                r(c).action = RouteAction::Redirect(Redirect {
                    scheme: None,
                    authority: None,
                    port: None,
                    path: None,
                    status: 200,
                })
            },
            "services[0].ports[0].http[0].action.redirect.status",
            "200 is not a redirect status (301, 302, 303, 307, 308)",
        ),
        (
            |c| {
                r(c).fault = Some(Fault {
                    delay: None,
                    abort: Some(AbortFault {
                        status: 500,
                        percent: 100.5,
                    }),
                })
            },
            "services[0].ports[0].http[0].fault.abort.percent",
            "100.5 is not a percentage from 0 to 100",
        ),
        (
            |c| {
                r(c).fault = Some(Fault {
                    delay: None,
                    abort: Some(AbortFault {
                        status: 99,
                        percent: 1.0,
                    }),
                })
            },
            "services[0].ports[0].http[0].fault.abort.status",
            "99 is not an HTTP status from 200 to 599",
        ),
        (
            |c| {
                r(c).mirrors = vec![Mirror {
                    cluster: 9,
                    percent: 50.0,
                }]
            },
            "services[0].ports[0].http[0].mirrors[0].cluster",
            "cluster 9 does not exist (2 clusters)",
        ),
        (
            |c| {
                r(c).request_headers.set = vec![Header {
                    name: "X-Upper".into(),
                    value: "v".into(),
                }]
            },
            "services[0].ports[0].http[0].requestHeaders.set[0].name",
            "\"X-Upper\" is not a lowercase HTTP header name",
        ),
        (
            |c| {
                r(c).response_headers.add = vec![Header {
                    name: "x-a".into(),
                    value: "a\r\nb".into(),
                }]
            },
            "services[0].ports[0].http[0].responseHeaders.add[0].value",
            "a header value may not hold CR, LF or NUL",
        ),
        (
            |c| {
                r(c).rewrite = Some(Rewrite {
                    path: Some(PathRewrite::Full("v2".into())),
                    authority: None,
                })
            },
            "services[0].ports[0].http[0].rewrite.path",
            "\"v2\" does not start with /",
        ),
        (
            |c| c.services.push(c.services[0].clone()),
            "services[1].id",
            "service id 7 appears twice",
        ),
        (
            |c| {
                let port = c.services[0].ports[0].clone();
                c.services[0].ports.push(port)
            },
            "services[0].ports[1].port",
            "port 9080 appears twice",
        ),
        (
            |c| {
                c.clusters[1].load_balancer =
                    LoadBalancer::ConsistentHash(HashKey::Header(String::new()))
            },
            "clusters[1].loadBalancer.consistentHash",
            "the hash key's name is empty",
        ),
    ];
    for (i, (break_it, field, problem)) in cases.into_iter().enumerate() {
        let mut config = jason();
        break_it(&mut config);
        assert_eq!(
            WaypointConfig::from_json(&config.to_json()),
            Err(WaypointConfigError::Invalid {
                field: field.into(),
                problem: problem.into()
            }),
            "case {i}"
        );
    }
}

/// A port's `tcp` may be empty (it refuses non-HTTP connections); its destinations are checked.
#[test]
fn tcp_destinations_are_checked_like_routes() {
    let mut config = jason();
    config.services[0].ports[0].tcp = vec![WeightedCluster {
        cluster: 5,
        weight: 1,
        ..WeightedCluster::default()
    }];
    assert_eq!(
        config.validate(),
        Err(WaypointConfigError::Invalid {
            field: "services[0].ports[0].tcp[0].cluster".into(),
            problem: "cluster 5 does not exist (2 clusters)".into()
        })
    );
}

/// A policy that uses every field: DENY `GET /admin*` from outside `default`, for service 7.
fn policy() -> AuthorizationPolicy {
    AuthorizationPolicy {
        name: "default/deny-admin".into(),
        action: PolicyAction::Deny,
        applies_to: PolicyTarget::Services(vec![7]),
        rules: vec![Rule {
            from: vec![Source {
                not_namespaces: vec!["default".into()],
                ip_blocks: vec!["10.0.0.0/8".into()],
                ..Source::default()
            }],
            to: vec![Operation {
                methods: vec!["GET".into()],
                paths: vec!["/admin*".into()],
                ports: vec![9080],
                ..Operation::default()
            }],
            when: vec![Condition {
                key: ConditionKey::RequestHeader("x-user".into()),
                values: vec!["*".into()],
                not_values: vec![],
            }],
        }],
    }
}

#[test]
fn policies_read_back_and_spell_their_json_in_camel_case() {
    let mut config = jason();
    config.policies = vec![policy()];
    let json = config.to_json();
    assert_eq!(WaypointConfig::from_json(&json), Ok(config.clone()));
    let text = String::from_utf8(json).unwrap();
    for spelling in [
        r#""policies":[{"name":"default/deny-admin","action":"deny","appliesTo":{"services":[7]}"#,
        r#""notNamespaces":["default"],"ipBlocks":["10.0.0.0/8"]"#,
        r#""when":[{"key":{"requestHeader":"x-user"},"values":["*"]}]"#,
    ] {
        assert!(text.contains(spelling), "{spelling} not in {text}");
    }
    // No policy: the field is not written, and a configuration without it reads.
    assert!(
        !String::from_utf8(jason().to_json())
            .unwrap()
            .contains("policies")
    );
    // Unknown fields are refused in policies too.
    let unknown = text.replace(r#""ipBlocks""#, r#""remoteIpBlocks""#);
    assert!(matches!(
        WaypointConfig::from_json(unknown.as_bytes()),
        Err(WaypointConfigError::Json(_))
    ));
}

/// Each broken policy is refused with its field and the reason.
#[test]
fn invalid_policies_are_refused_with_their_field() {
    fn r(config: &mut WaypointConfig) -> &mut Rule {
        &mut config.policies[0].rules[0]
    }
    type Break = fn(&mut WaypointConfig);
    let cases: Vec<(Break, &str, &str)> = vec![
        (
            |c| c.policies[0].name.clear(),
            "policies[0].name",
            "the name is empty",
        ),
        (
            |c| c.policies[0].applies_to = PolicyTarget::Services(vec![7, 8]),
            "policies[0].appliesTo.services[1]",
            "service id 8 is not a service of this waypoint",
        ),
        (
            |c| c.policies[0].applies_to = PolicyTarget::Services(vec![]),
            "policies[0].appliesTo.services",
            "no service: a policy for no service is not written",
        ),
        (
            |c| r(c).from[0].not_ip_blocks = vec!["10.0.0.1/33".into()],
            "policies[0].rules[0].from[0].notIpBlocks[0]",
            "\"10.0.0.1/33\" is not an IP address or CIDR block",
        ),
        (
            |c| r(c).from[0].ip_blocks = vec!["10.0.0.0/8".into(), "ten".into()],
            "policies[0].rules[0].from[0].ipBlocks[1]",
            "\"ten\" is not an IP address or CIDR block",
        ),
        (
            |c| r(c).from.push(Source::default()),
            "policies[0].rules[0].from[1]",
            "a source sets no field",
        ),
        (
            |c| r(c).to[0] = Operation::default(),
            "policies[0].rules[0].to[0]",
            "an operation sets no field",
        ),
        (
            |c| r(c).to[0].not_ports = vec![0],
            "policies[0].rules[0].to[0].notPorts[0]",
            "port 0",
        ),
        (
            |c| r(c).when[0].key = ConditionKey::RequestHeader("X-User".into()),
            "policies[0].rules[0].when[0].key.requestHeader",
            "\"X-User\" is not a lowercase HTTP header name",
        ),
        (
            |c| r(c).when[0].values.clear(),
            "policies[0].rules[0].when[0]",
            "neither values nor notValues is set",
        ),
        (
            |c| {
                r(c).when[0] = Condition {
                    key: ConditionKey::SourceIp,
                    values: vec![],
                    not_values: vec!["fd00::/129".into()],
                }
            },
            "policies[0].rules[0].when[0].notValues[0]",
            "\"fd00::/129\" is not an IP address or CIDR block",
        ),
        (
            |c| {
                r(c).when[0] = Condition {
                    key: ConditionKey::DestinationPort,
                    values: vec!["9080".into(), "0".into()],
                    not_values: vec![],
                }
            },
            "policies[0].rules[0].when[0].values[1]",
            "\"0\" is not a port from 1 to 65535",
        ),
    ];
    for (i, (break_it, field, problem)) in cases.into_iter().enumerate() {
        let mut config = jason();
        config.policies = vec![policy()];
        assert_eq!(config.validate(), Ok(()), "case {i} before");
        break_it(&mut config);
        assert_eq!(
            WaypointConfig::from_json(&config.to_json()),
            Err(WaypointConfigError::Invalid {
                field: field.into(),
                problem: problem.into()
            }),
            "case {i}"
        );
    }
}

#[test]
fn cidrs_parse_and_contain_as_written() {
    let block = |t: &str| parse_cidr(t).unwrap();
    assert!(cidr_contains(
        block("10.1.0.0/16"),
        "10.1.200.3".parse().unwrap()
    ));
    assert!(!cidr_contains(
        block("10.1.0.0/16"),
        "10.2.0.3".parse().unwrap()
    ));
    assert!(cidr_contains(
        block("10.1.2.3"),
        "10.1.2.3".parse().unwrap()
    ));
    assert!(!cidr_contains(
        block("10.1.2.3"),
        "10.1.2.4".parse().unwrap()
    ));
    assert!(cidr_contains(
        block("0.0.0.0/0"),
        "192.0.2.1".parse().unwrap()
    ));
    assert!(cidr_contains(block("::/0"), "fd00::1".parse().unwrap()));
    assert!(cidr_contains(block("fd00::/8"), "fd12::1".parse().unwrap()));
    // One family never contains the other's addresses.
    assert!(!cidr_contains(
        block("0.0.0.0/0"),
        "fd00::1".parse().unwrap()
    ));
    for bad in [
        "10.0.0.0/33",
        "10.0.0/8",
        "10.0.0.0/",
        "10.0.0.0/+8",
        "x",
        "::/129",
    ] {
        assert_eq!(parse_cidr(bad), None, "{bad}");
    }
}

#[test]
fn istio_strings_match_exact_prefix_suffix_and_presence() {
    assert!(istio_string_match("*", ""));
    assert!(istio_string_match("/admin*", "/admin/users"));
    assert!(!istio_string_match("/admin*", "/public"));
    assert!(istio_string_match("*.local", "reviews.local"));
    assert!(!istio_string_match("*.local", "reviews.com"));
    assert!(istio_string_match("GET", "GET"));
    assert!(!istio_string_match("GET", "GETS"));
}
