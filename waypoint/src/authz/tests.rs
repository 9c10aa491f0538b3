use std::collections::BTreeMap;

use http::{HeaderMap, HeaderValue, Method};
use kmesh_snapshot::waypoint::Workload;

use super::*;

const SERVICE: u32 = 7;
const PORT: u16 = 9080;

fn productpage() -> Workload {
    Workload {
        addresses: vec!["10.0.0.9".parse().unwrap()],
        namespace: "default".into(),
        name: "productpage-1".into(),
        workload: "productpage".into(),
        service_account: "bookinfo-productpage".into(),
        labels: BTreeMap::new(),
    }
}

const PRODUCTPAGE: &str = "cluster.local/ns/default/sa/bookinfo-productpage";

/// A request or connection, as the tests vary it.
struct Case {
    workload: Option<Workload>,
    address: &'static str,
    service_id: u32,
    port: u16,
    /// `None`: TCP.
    http: Option<(Method, &'static str, Option<&'static str>, HeaderMap)>,
}

impl Case {
    /// `GET /reviews/1` from productpage (10.0.0.9) to reviews:9080, Host `reviews:9080`.
    fn get(path: &'static str) -> Case {
        Case {
            workload: Some(productpage()),
            address: "10.0.0.9",
            service_id: SERVICE,
            port: PORT,
            http: Some((Method::GET, path, Some("reviews:9080"), HeaderMap::new())),
        }
    }

    fn tcp() -> Case {
        Case {
            http: None,
            ..Case::get("/")
        }
    }

    fn stranger(mut self) -> Case {
        self.workload = None;
        self.address = "192.0.2.1";
        self
    }

    fn method(mut self, method: Method) -> Case {
        self.http.as_mut().unwrap().0 = method;
        self
    }

    fn host(mut self, host: Option<&'static str>) -> Case {
        self.http.as_mut().unwrap().2 = host;
        self
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Case {
        let headers = &mut self.http.as_mut().unwrap().3;
        headers.append(name, HeaderValue::from_static(value));
        self
    }

    fn decide(&self, policies: &[AuthorizationPolicy]) -> Decision {
        let client = Client {
            address: self.address.parse().unwrap(),
            workload: self.workload.as_ref(),
        };
        let principal = self
            .workload
            .as_ref()
            .map(|w| format!("cluster.local/ns/{}/sa/{}", w.namespace, w.service_account));
        let head = self
            .http
            .as_ref()
            .map(|(method, path, authority, headers)| RequestHead {
                method,
                path,
                query: None,
                authority: *authority,
                scheme: None,
                headers,
            });
        let subject = Subject {
            service_id: self.service_id,
            port: self.port,
            client: &client,
            principal: principal.as_deref(),
            request: head.as_ref(),
        };
        authorize(policies, &subject)
    }

    fn allowed(&self, policies: &[AuthorizationPolicy]) -> bool {
        self.decide(policies).allowed()
    }
}

fn policy(name: &str, action: PolicyAction, rules: Vec<Rule>) -> AuthorizationPolicy {
    AuthorizationPolicy {
        name: format!("default/{name}"),
        action,
        applies_to: PolicyTarget::Waypoint,
        rules,
    }
}

fn allow(rules: Vec<Rule>) -> AuthorizationPolicy {
    policy("allow", PolicyAction::Allow, rules)
}

fn deny(rules: Vec<Rule>) -> AuthorizationPolicy {
    policy("deny", PolicyAction::Deny, rules)
}

fn to(operation: Operation) -> Rule {
    Rule {
        to: vec![operation],
        ..Rule::default()
    }
}

fn from(source: Source) -> Rule {
    Rule {
        from: vec![source],
        ..Rule::default()
    }
}

fn when(key: ConditionKey, values: &[&str], not_values: &[&str]) -> Rule {
    Rule {
        when: vec![Condition {
            key,
            values: values.iter().map(|v| v.to_string()).collect(),
            not_values: not_values.iter().map(|v| v.to_string()).collect(),
        }],
        ..Rule::default()
    }
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

#[test]
fn no_policy_allows_and_an_empty_rule_matches_everything() {
    assert_eq!(Case::get("/").decide(&[]), Decision::Allow);
    assert!(!Case::get("/").allowed(&[deny(vec![Rule::default()])]));
    assert!(Case::get("/").allowed(&[allow(vec![Rule::default()])]));
    // An ALLOW policy without rules allows nothing; a DENY one denies nothing.
    assert_eq!(
        Case::get("/").decide(&[allow(vec![])]),
        Decision::NotAllowed
    );
    assert!(Case::get("/").allowed(&[deny(vec![])]));
}

#[test]
fn deny_wins_over_allow_whatever_the_order() {
    let admin = to(Operation {
        paths: strings(&["/admin*"]),
        ..Operation::default()
    });
    let policies = [allow(vec![Rule::default()]), deny(vec![admin])];
    assert_eq!(
        Case::get("/admin/x").decide(&policies),
        Decision::DeniedBy("default/deny".into())
    );
    assert!(Case::get("/public").allowed(&policies));
    let reversed = [policies[1].clone(), policies[0].clone()];
    assert!(!Case::get("/admin/x").allowed(&reversed));
}

#[test]
fn allow_policies_allow_only_what_one_of_their_rules_matches() {
    let get = to(Operation {
        methods: strings(&["GET"]),
        ..Operation::default()
    });
    let post_admin = to(Operation {
        methods: strings(&["POST"]),
        paths: strings(&["/admin"]),
        ..Operation::default()
    });
    let policies = [allow(vec![get]), allow(vec![post_admin])];
    assert!(Case::get("/x").allowed(&policies));
    assert!(Case::get("/admin").method(Method::POST).allowed(&policies));
    assert_eq!(
        Case::get("/x").method(Method::POST).decide(&policies),
        Decision::NotAllowed
    );
}

#[test]
fn policies_apply_to_their_services_only() {
    let mut other = deny(vec![Rule::default()]);
    other.applies_to = PolicyTarget::Services(vec![8]);
    assert!(Case::get("/").allowed(&[other.clone()]));
    let mut ours = other.clone();
    ours.applies_to = PolicyTarget::Services(vec![8, SERVICE]);
    assert!(!Case::get("/").allowed(&[ours]));
    // An ALLOW policy of another service does not make this one's requests need an ALLOW.
    other.action = PolicyAction::Allow;
    other.rules = vec![];
    assert!(Case::get("/").allowed(&[other]));
}

#[test]
fn operations_match_paths_methods_hosts_and_ports_and_exclude_their_not_forms() {
    let case = |operation: Operation, c: Case| c.allowed(&[allow(vec![to(operation)])]);
    let paths = |p: &[&str], n: &[&str]| Operation {
        paths: strings(p),
        not_paths: strings(n),
        ..Operation::default()
    };
    assert!(case(paths(&["/reviews*"], &[]), Case::get("/reviews/1")));
    assert!(case(paths(&["*/1"], &[]), Case::get("/reviews/1")));
    assert!(!case(paths(&["/ratings*"], &[]), Case::get("/reviews/1")));
    assert!(!case(paths(&[], &["/reviews*"]), Case::get("/reviews/1")));
    assert!(case(paths(&[], &["/admin"]), Case::get("/reviews/1")));
    assert!(!case(
        paths(&["/reviews*"], &["*/1"]),
        Case::get("/reviews/1")
    ));

    let methods = |m: &[&str], n: &[&str]| Operation {
        methods: strings(m),
        not_methods: strings(n),
        ..Operation::default()
    };
    assert!(case(methods(&["GET", "HEAD"], &[]), Case::get("/")));
    assert!(!case(methods(&["get"], &[]), Case::get("/")));
    assert!(!case(methods(&[], &["GET"]), Case::get("/")));
    assert!(case(methods(&[], &["DELETE"]), Case::get("/")));

    let hosts = |h: &[&str], n: &[&str]| Operation {
        hosts: strings(h),
        not_hosts: strings(n),
        ..Operation::default()
    };
    assert!(case(hosts(&["Reviews"], &[]), Case::get("/")));
    assert!(case(hosts(&["reviews:9080"], &[]), Case::get("/")));
    assert!(case(hosts(&["rev*"], &[]), Case::get("/")));
    assert!(!case(hosts(&["ratings"], &[]), Case::get("/")));
    assert!(!case(hosts(&["reviews"], &[]), Case::get("/").host(None)));
    assert!(!case(hosts(&[], &["reviews"]), Case::get("/")));
    assert!(case(hosts(&[], &["reviews"]), Case::get("/").host(None)));

    let ports = |p: &[u16], n: &[u16]| Operation {
        ports: p.to_vec(),
        not_ports: n.to_vec(),
        ..Operation::default()
    };
    assert!(case(ports(&[PORT], &[]), Case::get("/")));
    assert!(!case(ports(&[9090], &[]), Case::get("/")));
    assert!(!case(ports(&[], &[PORT]), Case::get("/")));
    // Fields of one entry are ANDed, entries of a list ORed.
    let both = Operation {
        ports: vec![PORT],
        paths: strings(&["/admin"]),
        ..Operation::default()
    };
    assert!(!case(both.clone(), Case::get("/reviews")));
    let either = Rule {
        to: vec![both, paths(&["/reviews"], &[])],
        ..Rule::default()
    };
    assert!(Case::get("/reviews").allowed(&[allow(vec![either])]));
}

#[test]
fn sources_match_principals_namespaces_and_addresses() {
    let case = |source: Source, c: Case| c.allowed(&[allow(vec![from(source)])]);
    let principals = |p: &[&str], n: &[&str]| Source {
        principals: strings(p),
        not_principals: strings(n),
        ..Source::default()
    };
    assert!(case(principals(&[PRODUCTPAGE], &[]), Case::get("/")));
    assert!(case(
        principals(&["cluster.local/ns/default/*"], &[]),
        Case::get("/")
    ));
    assert!(case(principals(&["*"], &[]), Case::get("/")));
    assert!(!case(
        principals(&["cluster.local/ns/other/sa/x"], &[]),
        Case::get("/")
    ));
    assert!(!case(principals(&[], &[PRODUCTPAGE]), Case::get("/")));

    let namespaces = |p: &[&str], n: &[&str]| Source {
        namespaces: strings(p),
        not_namespaces: strings(n),
        ..Source::default()
    };
    assert!(case(namespaces(&["default"], &[]), Case::get("/")));
    assert!(!case(namespaces(&["other"], &[]), Case::get("/")));
    assert!(!case(namespaces(&[], &["default"]), Case::get("/")));
    assert!(case(namespaces(&[], &["other"]), Case::get("/")));

    let blocks = |p: &[&str], n: &[&str]| Source {
        ip_blocks: strings(p),
        not_ip_blocks: strings(n),
        ..Source::default()
    };
    assert!(case(blocks(&["10.0.0.0/24"], &[]), Case::get("/")));
    assert!(case(blocks(&["10.0.0.9"], &[]), Case::get("/")));
    assert!(!case(blocks(&["10.1.0.0/16"], &[]), Case::get("/")));
    assert!(!case(
        blocks(&["10.0.0.0/8"], &["10.0.0.9/32"]),
        Case::get("/")
    ));
    assert!(case(blocks(&[], &["10.1.0.0/16"]), Case::get("/")));
}

/// A client that is no workload has no principal and no namespace: the positive forms never
/// match it, the negative forms always do; its address still matches.
#[test]
fn an_unknown_client_matches_no_principal_or_namespace_but_every_not_form() {
    let allowed = |source: Source| {
        Case::get("/")
            .stranger()
            .allowed(&[allow(vec![from(source)])])
    };
    for source in [
        Source {
            principals: strings(&["*"]),
            ..Source::default()
        },
        Source {
            namespaces: strings(&["*"]),
            ..Source::default()
        },
    ] {
        assert!(!allowed(source));
    }
    for source in [
        Source {
            not_principals: strings(&["*"]),
            ..Source::default()
        },
        Source {
            not_namespaces: strings(&["default"]),
            ..Source::default()
        },
        Source {
            ip_blocks: strings(&["192.0.2.0/24"]),
            ..Source::default()
        },
    ] {
        assert!(allowed(source));
    }
    let stranger = |rule: Rule| Case::get("/").stranger().allowed(&[allow(vec![rule])]);
    assert!(!stranger(when(ConditionKey::SourcePrincipal, &["*"], &[])));
    assert!(stranger(when(ConditionKey::SourcePrincipal, &[], &["*"])));
    assert!(!stranger(when(
        ConditionKey::SourceNamespace,
        &["default"],
        &[]
    )));
    assert!(stranger(when(
        ConditionKey::SourceNamespace,
        &[],
        &["default"]
    )));
    // Denying "everyone but productpage" denies the stranger.
    let not_productpage = deny(vec![from(Source {
        not_principals: strings(&[PRODUCTPAGE]),
        ..Source::default()
    })]);
    assert!(
        !Case::get("/")
            .stranger()
            .allowed(std::slice::from_ref(&not_productpage))
    );
    assert!(Case::get("/").allowed(&[not_productpage]));
}

#[test]
fn conditions_match_headers_addresses_identities_and_ports() {
    let allowed = |rule: Rule, c: Case| c.allowed(&[allow(vec![rule])]);
    let header = |v: &[&str], n: &[&str]| when(ConditionKey::RequestHeader("x-user".into()), v, n);
    assert!(allowed(
        header(&["jason"], &[]),
        Case::get("/").header("x-user", "jason")
    ));
    assert!(allowed(
        header(&["*"], &[]),
        Case::get("/").header("x-user", "")
    ));
    assert!(!allowed(header(&["*"], &[]), Case::get("/")));
    assert!(!allowed(
        header(&["jason"], &[]),
        Case::get("/").header("x-user", "bob")
    ));
    assert!(allowed(header(&[], &["jason"]), Case::get("/")));
    assert!(!allowed(
        header(&[], &["ja*"]),
        Case::get("/").header("x-user", "jason")
    ));
    // Values sent twice are compared joined.
    let twice = Case::get("/").header("x-user", "a").header("x-user", "b");
    assert!(allowed(header(&["a,b"], &[]), twice));

    let ip = |v: &[&str], n: &[&str]| when(ConditionKey::SourceIp, v, n);
    assert!(allowed(ip(&["10.0.0.0/8"], &[]), Case::get("/")));
    assert!(!allowed(ip(&["10.0.0.0/8"], &["10.0.0.9"]), Case::get("/")));
    let ns = |v: &[&str], n: &[&str]| when(ConditionKey::SourceNamespace, v, n);
    assert!(allowed(ns(&["def*"], &[]), Case::get("/")));
    assert!(!allowed(ns(&[], &["default"]), Case::get("/")));
    let principal = |v: &[&str], n: &[&str]| when(ConditionKey::SourcePrincipal, v, n);
    assert!(allowed(principal(&[PRODUCTPAGE], &[]), Case::get("/")));
    assert!(!allowed(principal(&["*/sa/other"], &[]), Case::get("/")));
    let port = |v: &[&str], n: &[&str]| when(ConditionKey::DestinationPort, v, n);
    assert!(allowed(port(&["9080"], &[]), Case::get("/")));
    assert!(!allowed(port(&["9090"], &[]), Case::get("/")));
    assert!(!allowed(port(&[], &["9080"]), Case::get("/")));
    // Every condition of a rule holds.
    let both = Rule {
        when: [ns(&["default"], &[]).when, port(&["9090"], &[]).when].concat(),
        ..Rule::default()
    };
    assert!(!allowed(both, Case::get("/")));
}

/// TCP: an ALLOW rule with an L7 attribute never matches; a DENY rule keeps its L4 remainder,
/// and an entry that had only L7 fields makes it a no-op.
#[test]
fn a_tcp_connection_is_judged_on_l4_attributes_only() {
    let paths_on_port = to(Operation {
        ports: vec![PORT],
        paths: strings(&["/admin"]),
        ..Operation::default()
    });
    let paths_only = to(Operation {
        paths: strings(&["/admin"]),
        ..Operation::default()
    });
    let header = when(ConditionKey::RequestHeader("x-user".into()), &["*"], &[]);
    // ALLOW with only L7 rules: TCP is denied; with an L4 rule too, allowed by it.
    for rule in [paths_on_port.clone(), paths_only.clone(), header.clone()] {
        assert_eq!(
            Case::tcp().decide(&[allow(vec![rule])]),
            Decision::NotAllowed
        );
    }
    let ports = to(Operation {
        ports: vec![PORT],
        ..Operation::default()
    });
    assert!(Case::tcp().allowed(&[allow(vec![paths_only.clone(), ports])]));
    // DENY: the L4 remainder denies; an L7-only entry or condition is a no-op.
    assert!(!Case::tcp().allowed(&[deny(vec![paths_on_port.clone()])]));
    assert!(Case::tcp().allowed(&[deny(vec![paths_only])]));
    assert!(Case::tcp().allowed(&[deny(vec![header])]));
    // Over HTTP the same DENY rule needs its path.
    assert!(Case::get("/reviews").allowed(&[deny(vec![paths_on_port.clone()])]));
    assert!(!Case::get("/admin").allowed(&[deny(vec![paths_on_port])]));
    // L4-only rules judge TCP as they judge HTTP.
    let from_default = from(Source {
        namespaces: strings(&["default"]),
        ..Source::default()
    });
    assert!(Case::tcp().allowed(&[allow(vec![from_default.clone()])]));
    assert!(!Case::tcp().stranger().allowed(&[allow(vec![from_default])]));
}
