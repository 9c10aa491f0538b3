//! Authorization compiled into each node's tables, checked the way the kernel reads them: the
//! source's class through the sources table (`kmesh_common::authz::source_class`), the verdict
//! through `resolve_verdict`. One small cluster, one rule of semantics §7-§9 per test, the
//! expected verdicts written by hand.
use kmesh_common::{
    authz::{authz_action, authz_reason, resolve_verdict, source_class},
    ip16,
};
use kmesh_operator::{
    compile::{CompileOptions, Compiled, compile},
    diagnostics::Severity,
    inputs::Inputs,
    render::summary,
};

const NODE: &str = "node-1";
const OTHER_NODE: &str = "node-2";

/// Namespaces foo and bar are in the mesh, `other` is not. On node-1: foo/server (10.0.1.1,
/// app=server, sa server) and foo/server2 (10.0.1.2, app=server2). On node-2: foo/client-a
/// (10.0.2.1, sa a), bar/client-b (10.0.2.2, sa b), other/plain (10.0.2.3, not in the mesh) and
/// foo/remote-server (10.0.2.9, app=server).
const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio.io/dataplane-mode: Kmesh}}
---
apiVersion: v1
kind: Namespace
metadata: {name: bar, labels: {istio.io/dataplane-mode: Kmesh}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
"#;

fn pod(ns: &str, name: &str, node: &str, ip: &str, sa: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: c}}]}}\n\
         status: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
    )
}

fn cluster() -> String {
    let pods = [
        pod("foo", "server", NODE, "10.0.1.1", "server", "server"),
        pod("foo", "server2", NODE, "10.0.1.2", "server2", "server2"),
        pod("foo", "client-a", OTHER_NODE, "10.0.2.1", "a", "client"),
        pod("bar", "client-b", OTHER_NODE, "10.0.2.2", "b", "client"),
        pod(
            "other", "plain", OTHER_NODE, "10.0.2.3", "default", "client",
        ),
        pod(
            "foo",
            "remote-server",
            OTHER_NODE,
            "10.0.2.9",
            "server",
            "server",
        ),
    ];
    let mut text = CLUSTER.to_string();
    for p in pods {
        text.push_str("---\n");
        text.push_str(&p);
    }
    text
}

const SERVER: &str = "10.0.1.1";
const SERVER2: &str = "10.0.1.2";
const A: &str = "10.0.2.1";
const B: &str = "10.0.2.2";
const PLAIN: &str = "10.0.2.3";

fn compile_with(policies: &str) -> Compiled {
    let mut inputs = Inputs::default();
    let read = inputs.add_yaml(&cluster(), "cluster.yaml", "default");
    assert!(read.is_empty(), "{read:?}");
    let read = inputs.add_yaml(policies, "policies.yaml", "default");
    assert!(read.is_empty(), "{read:?}");
    compile(
        &inputs,
        &[NODE.to_string(), OTHER_NODE.to_string()],
        1,
        &CompileOptions::default(),
    )
}

/// What a connection from `src` to `dst:port` gets on `node`: `None` when `dst` has no
/// authorization entry (allowed, not counted), else "ALLOW"/"DENY", the reason and the deciding
/// policy's name ("" for none).
fn decide_on(c: &Compiled, node: &str, src: &str, dst: &str, port: u16) -> Option<String> {
    let s = &c.snapshot(node).unwrap();
    let dst = ip16(dst.parse().unwrap());
    let w = s.authz.workloads.iter().find(|w| w.ip == dst)?;
    let class = source_class(&s.authz.sources, &ip16(src.parse().unwrap()));
    let v = resolve_verdict(w.value.policy_set, class, port, |k| {
        s.authz
            .verdicts
            .iter()
            .find(|r| r.key == *k)
            .map(|r| r.value)
    });
    let Some(v) = v else {
        return Some("NO VERDICT".to_string());
    };
    let action = match v.action {
        authz_action::ALLOW => "ALLOW",
        authz_action::DENY => "DENY",
        _ => "?",
    };
    let reason = match v.reason {
        authz_reason::NO_ALLOW_POLICY => "NO_ALLOW_POLICY",
        authz_reason::ALLOW_MATCHED => "ALLOW_MATCHED",
        authz_reason::DENY_MATCHED => "DENY_MATCHED",
        authz_reason::NO_ALLOW_MATCHED => "NO_ALLOW_MATCHED",
        authz_reason::STRICT_MTLS => "STRICT_MTLS",
        authz_reason::UNCOMPILABLE => "UNCOMPILABLE",
        _ => "?",
    };
    let policy = if v.policy == 0 {
        String::new()
    } else {
        let record = s.authz.policies.iter().find(|p| p.policy == v.policy);
        let name =
            record.map(|p| String::from_utf8_lossy(&p.name[..p.name_len as usize]).to_string());
        name.unwrap_or_else(|| format!("#{} (no record)", v.policy))
    };
    Some(format!("{action} {reason} {policy}").trim_end().to_string())
}

fn decide(c: &Compiled, src: &str, dst: &str, port: u16) -> Option<String> {
    decide_on(c, NODE, src, dst, port)
}

fn says(verdict: &str) -> Option<String> {
    Some(verdict.to_string())
}

fn diagnostics(c: &Compiled) -> Vec<String> {
    c.diagnostics.iter().map(ToString::to_string).collect()
}

fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n"
    )
}

fn peer(ns: &str, name: &str, created: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}, creationTimestamp: \"{created}\"}}\nspec:\n{spec}\n---\n"
    )
}

#[test]
fn allow_by_namespace() {
    let c = compile_with(&policy(
        "foo",
        "from-bar",
        "  selector: {matchLabels: {app: server}}\n  rules: [{from: [{source: {namespaces: [bar]}}]}]",
    ));
    assert_eq!(
        decide(&c, B, SERVER, 80),
        says("ALLOW ALLOW_MATCHED foo/from-bar")
    );
    assert_eq!(decide(&c, A, SERVER, 80), says("DENY NO_ALLOW_MATCHED"));
    assert_eq!(decide(&c, PLAIN, SERVER, 80), says("DENY NO_ALLOW_MATCHED"));
    assert_eq!(
        decide(&c, "192.0.2.1", SERVER, 80),
        says("DENY NO_ALLOW_MATCHED")
    );
    assert_eq!(
        decide(&c, A, SERVER2, 80),
        None,
        "the selector does not match server2"
    );
    assert!(diagnostics(&c).is_empty(), "{:?}", diagnostics(&c));
}

#[test]
fn deny_by_principal_overrides_allow() {
    let c = compile_with(&format!(
        "{}{}",
        policy(
            "foo",
            "deny-b",
            "  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/bar/sa/b]}}]}]"
        ),
        policy("foo", "allow-all", "  rules: [{}]"),
    ));
    assert_eq!(
        decide(&c, B, SERVER, 80),
        says("DENY DENY_MATCHED foo/deny-b")
    );
    assert_eq!(
        decide(&c, A, SERVER, 80),
        says("ALLOW ALLOW_MATCHED foo/allow-all")
    );
    assert_eq!(
        decide(&c, PLAIN, SERVER2, 80),
        says("ALLOW ALLOW_MATCHED foo/allow-all")
    );
}

#[test]
fn ip_blocks_ports_and_not_ports() {
    let c = compile_with(&format!(
        "{}{}",
        policy(
            "foo",
            "block",
            "  selector: {matchLabels: {app: server}}\n  rules: [{from: [{source: {ipBlocks: [10.0.2.0/24], notIpBlocks: [10.0.2.3]}}], to: [{operation: {ports: [\"8080\"]}}]}]"
        ),
        policy(
            "foo",
            "only-8080",
            "  selector: {matchLabels: {app: server2}}\n  action: DENY\n  rules: [{to: [{operation: {notPorts: [\"8080\"]}}]}]"
        ),
    ));
    assert_eq!(
        decide(&c, A, SERVER, 8080),
        says("ALLOW ALLOW_MATCHED foo/block")
    );
    assert_eq!(decide(&c, A, SERVER, 9090), says("DENY NO_ALLOW_MATCHED"));
    assert_eq!(
        decide(&c, PLAIN, SERVER, 8080),
        says("DENY NO_ALLOW_MATCHED"),
        "notIpBlocks"
    );
    assert_eq!(
        decide(&c, "10.0.2.200", SERVER, 8080),
        says("ALLOW ALLOW_MATCHED foo/block"),
        "an address of no pod, inside the block"
    );
    assert_eq!(
        decide(&c, "10.0.3.1", SERVER, 8080),
        says("DENY NO_ALLOW_MATCHED")
    );
    assert_eq!(decide(&c, A, SERVER2, 8080), says("ALLOW NO_ALLOW_POLICY"));
    assert_eq!(
        decide(&c, A, SERVER2, 8081),
        says("DENY DENY_MATCHED foo/only-8080")
    );
    assert_eq!(
        decide(&c, A, SERVER2, 1),
        says("DENY DENY_MATCHED foo/only-8080")
    );
}

#[test]
fn an_allow_whose_rules_are_all_l7_denies_everything() {
    let c = compile_with(&policy(
        "foo",
        "get-only",
        "  selector: {matchLabels: {app: server}}\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n  - from: [{source: {namespaces: [bar], requestPrincipals: [\"*\"]}}]",
    ));
    for src in [A, B, PLAIN] {
        assert_eq!(
            decide(&c, src, SERVER, 80),
            says("DENY NO_ALLOW_MATCHED"),
            "{src}"
        );
    }
    let d = diagnostics(&c);
    assert!(
        d.iter().any(|d| d.starts_with("not enforced: AuthorizationPolicy foo/get-only spec.rules[0]: uses L7 attributes (to[0].operation.methods)")),
        "{d:#?}"
    );
    assert!(
        d.iter()
            .any(|d| d.contains("spec.rules: every rule needs L7 and was dropped")),
        "{d:#?}"
    );
}

#[test]
fn an_allow_rule_with_l7_is_dropped_while_the_others_apply() {
    let c = compile_with(&policy(
        "foo",
        "mixed",
        "  selector: {matchLabels: {app: server}}\n  rules:\n  - from: [{source: {namespaces: [bar]}}]\n    to: [{operation: {ports: [\"80\"], methods: [GET]}}]\n  - from: [{source: {namespaces: [foo]}}]",
    ));
    assert_eq!(
        decide(&c, B, SERVER, 80),
        says("DENY NO_ALLOW_MATCHED"),
        "its rule was dropped"
    );
    assert_eq!(
        decide(&c, A, SERVER, 80),
        says("ALLOW ALLOW_MATCHED foo/mixed")
    );
}

#[test]
fn a_deny_keeps_its_l4_part_and_a_clause_left_empty_is_a_no_op() {
    let c = compile_with(&format!(
        "{}{}",
        policy(
            "foo",
            "deny-a-80",
            "  selector: {matchLabels: {app: server}}\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/foo/sa/a]}}], to: [{operation: {ports: [\"80\"], methods: [GET]}}]}]"
        ),
        policy(
            "foo",
            "deny-paths",
            "  selector: {matchLabels: {app: server2}}\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/admin]}}]\n  - when: [{key: source.namespace, values: [foo]}, {key: connection.sni, values: [x]}]"
        ),
    ));
    assert_eq!(
        decide(&c, A, SERVER, 80),
        says("DENY DENY_MATCHED foo/deny-a-80"),
        "any method"
    );
    assert_eq!(decide(&c, A, SERVER, 81), says("ALLOW NO_ALLOW_POLICY"));
    assert_eq!(decide(&c, B, SERVER, 80), says("ALLOW NO_ALLOW_POLICY"));
    for src in [A, B, PLAIN] {
        assert_eq!(
            decide(&c, src, SERVER2, 80),
            says("ALLOW NO_ALLOW_POLICY"),
            "{src}"
        );
    }
    let d = diagnostics(&c);
    assert!(
        d.iter().any(|d| d.contains(
            "foo/deny-paths spec.rules[1]: L7 attributes stripped (when[1] connection.sni)"
        ) && d.contains("when[1] left empty, so the rule can never match")),
        "{d:#?}"
    );
}

#[test]
fn rules_absent_never_match_and_an_empty_rule_always_does() {
    let c = compile_with(&format!(
        "{}{}",
        policy("foo", "nothing", "  selector: {matchLabels: {app: server}}"),
        policy(
            "foo",
            "everything",
            "  selector: {matchLabels: {app: server2}}\n  rules: [{}]"
        ),
    ));
    assert_eq!(decide(&c, A, SERVER, 80), says("DENY NO_ALLOW_MATCHED"));
    assert_eq!(
        decide(&c, A, SERVER2, 80),
        says("ALLOW ALLOW_MATCHED foo/everything")
    );
    assert_eq!(
        decide(&c, PLAIN, SERVER2, 80),
        says("ALLOW ALLOW_MATCHED foo/everything")
    );
    // `rules: []` is no rule at all: it matches nothing, like absent rules.
    let c = compile_with(&policy(
        "foo",
        "empty-list",
        "  selector: {matchLabels: {app: server}}\n  rules: []",
    ));
    assert_eq!(decide(&c, A, SERVER, 80), says("DENY NO_ALLOW_MATCHED"));
}

#[test]
fn strict_peer_authentication_denies_sources_without_identity() {
    let c = compile_with(&format!(
        "{}{}",
        peer(
            "foo",
            "strict-ns",
            "2024-01-01T00:00:00Z",
            "  mtls: {mode: STRICT}"
        ),
        peer(
            "foo",
            "server-8080",
            "2024-01-01T00:00:00Z",
            "  selector: {matchLabels: {app: server}}\n  portLevelMtls: {\"8080\": {mode: PERMISSIVE}}"
        ),
    ));
    assert_eq!(
        decide(&c, PLAIN, SERVER, 80),
        says("DENY STRICT_MTLS foo/strict-ns")
    );
    assert_eq!(
        decide(&c, "192.0.2.7", SERVER, 80),
        says("DENY STRICT_MTLS foo/strict-ns")
    );
    assert_eq!(
        decide(&c, PLAIN, SERVER, 8080),
        says("ALLOW NO_ALLOW_POLICY")
    );
    assert_eq!(decide(&c, A, SERVER, 80), says("ALLOW NO_ALLOW_POLICY"));
    assert_eq!(
        decide(&c, PLAIN, SERVER2, 8080),
        says("DENY STRICT_MTLS foo/strict-ns")
    );
    assert_eq!(
        decide_on(&c, OTHER_NODE, PLAIN, "10.0.2.9", 80),
        says("DENY STRICT_MTLS foo/strict-ns")
    );
    assert_eq!(
        decide_on(&c, OTHER_NODE, PLAIN, B, 80),
        None,
        "bar is not STRICT"
    );
}

#[test]
fn peer_authentication_precedence_and_the_oldest_wins() {
    let c = compile_with(&format!(
        "{}{}{}{}",
        peer(
            "istio-system",
            "mesh",
            "2024-01-01T00:00:00Z",
            "  mtls: {mode: STRICT}"
        ),
        peer(
            "foo",
            "ns",
            "2024-01-01T00:00:00Z",
            "  mtls: {mode: DISABLE}"
        ),
        peer(
            "foo",
            "newer",
            "2024-06-01T00:00:00Z",
            "  selector: {matchLabels: {app: server}}\n  mtls: {mode: PERMISSIVE}"
        ),
        peer(
            "foo",
            "older",
            "2024-02-01T00:00:00Z",
            "  selector: {matchLabels: {app: server}}\n  mtls: {mode: STRICT}"
        ),
    ));
    assert_eq!(
        decide(&c, PLAIN, SERVER, 80),
        says("DENY STRICT_MTLS foo/older"),
        "oldest workload policy"
    );
    assert_eq!(
        decide(&c, PLAIN, SERVER2, 80),
        None,
        "namespace DISABLE beats mesh STRICT"
    );
    assert_eq!(
        decide_on(&c, OTHER_NODE, PLAIN, B, 80),
        says("DENY STRICT_MTLS istio-system/mesh")
    );
}

#[test]
fn root_namespace_policies_bind_every_namespace() {
    let c = compile_with(&format!(
        "{}{}",
        policy(
            "istio-system",
            "mesh-deny-plain",
            "  action: DENY\n  rules: [{from: [{source: {notNamespaces: [\"*\"]}}]}]"
        ),
        policy(
            "istio-system",
            "servers",
            "  selector: {matchLabels: {app: server}}\n  rules: [{from: [{source: {namespaces: [foo]}}]}]"
        ),
    ));
    assert_eq!(
        decide(&c, PLAIN, SERVER2, 80),
        says("DENY DENY_MATCHED istio-system/mesh-deny-plain")
    );
    assert_eq!(decide(&c, B, SERVER2, 80), says("ALLOW NO_ALLOW_POLICY"));
    assert_eq!(decide(&c, B, SERVER, 80), says("DENY NO_ALLOW_MATCHED"));
    assert_eq!(
        decide(&c, A, SERVER, 80),
        says("ALLOW ALLOW_MATCHED istio-system/servers")
    );
    assert_eq!(
        decide_on(&c, OTHER_NODE, B, "10.0.2.9", 80),
        says("DENY NO_ALLOW_MATCHED")
    );
}

#[test]
fn a_plaintext_source_fails_principals_and_passes_not_principals() {
    let c = compile_with(&format!(
        "{}{}",
        policy(
            "foo",
            "deny-unauthenticated",
            "  selector: {matchLabels: {app: server}}\n  action: DENY\n  rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]"
        ),
        policy(
            "foo",
            "any-principal",
            "  selector: {matchLabels: {app: server2}}\n  rules: [{from: [{source: {principals: [\"*\"]}}]}]"
        ),
    ));
    assert_eq!(
        decide(&c, PLAIN, SERVER, 80),
        says("DENY DENY_MATCHED foo/deny-unauthenticated")
    );
    assert_eq!(decide(&c, A, SERVER, 80), says("ALLOW NO_ALLOW_POLICY"));
    assert_eq!(
        decide(&c, PLAIN, SERVER2, 80),
        says("DENY NO_ALLOW_MATCHED")
    );
    assert_eq!(
        decide(&c, A, SERVER2, 80),
        says("ALLOW ALLOW_MATCHED foo/any-principal")
    );
}

#[test]
fn service_accounts_and_l4_when_keys() {
    let c = compile_with(&format!(
        "{}{}",
        policy(
            "foo",
            "accounts",
            "  selector: {matchLabels: {app: server}}\n  rules: [{from: [{source: {serviceAccounts: [bar/b, a]}}], when: [{key: destination.port, notValues: [\"9000\"]}]}]"
        ),
        policy(
            "foo",
            "when",
            "  selector: {matchLabels: {app: server2}}\n  rules: [{when: [{key: source.namespace, values: [\"ba*\"]}, {key: source.ip, notValues: [10.0.2.1]}, {key: destination.ip, values: [10.0.1.0/24]}]}]"
        ),
    ));
    assert_eq!(
        decide(&c, B, SERVER, 80),
        says("ALLOW ALLOW_MATCHED foo/accounts")
    );
    assert_eq!(
        decide(&c, A, SERVER, 80),
        says("ALLOW ALLOW_MATCHED foo/accounts"),
        "bare name: the policy's namespace"
    );
    assert_eq!(decide(&c, A, SERVER, 9000), says("DENY NO_ALLOW_MATCHED"));
    assert_eq!(decide(&c, PLAIN, SERVER, 80), says("DENY NO_ALLOW_MATCHED"));
    assert_eq!(
        decide(&c, B, SERVER2, 80),
        says("ALLOW ALLOW_MATCHED foo/when")
    );
    assert_eq!(decide(&c, A, SERVER2, 80), says("DENY NO_ALLOW_MATCHED"));
}

#[test]
fn invalid_policies_fail_closed_for_the_workloads_they_bind() {
    let c = compile_with(&policy(
        "foo",
        "bad-port",
        "  selector: {matchLabels: {app: server}}\n  action: DENY\n  rules: [{to: [{operation: {ports: [\"http\"]}}]}]",
    ));
    assert_eq!(
        decide(&c, A, SERVER, 80),
        says("DENY UNCOMPILABLE foo/bad-port")
    );
    assert_eq!(decide(&c, A, SERVER2, 80), None);
    assert_eq!(
        diagnostics(&c),
        [
            "rejected: AuthorizationPolicy foo/bad-port spec.rules[0].to[0].operation.ports[0]: port \"http\" must be between 1-65535; fails closed: the mesh workloads of namespace foo its selector matches deny every inbound connection until it is fixed"
        ]
    );
    // Not even the selector can be read: every mesh workload of the namespace.
    let c = compile_with(&policy(
        "foo",
        "bad-selector",
        "  selector: {matchLabels: [app]}",
    ));
    assert_eq!(
        decide(&c, A, SERVER, 80),
        says("DENY UNCOMPILABLE foo/bad-selector")
    );
    assert_eq!(
        decide(&c, A, SERVER2, 80),
        says("DENY UNCOMPILABLE foo/bad-selector")
    );
    assert!(
        diagnostics(&c)[0]
            .contains("all mesh workloads of namespace foo (its selector cannot be read)")
    );
    let c = compile_with(&peer(
        "foo",
        "bad-mode",
        "2024-01-01T00:00:00Z",
        "  mtls: {mode: BLAH}",
    ));
    assert_eq!(
        decide(&c, A, SERVER, 80),
        says("DENY UNCOMPILABLE foo/bad-mode")
    );
}

#[test]
fn invalid_inputs_are_rejected_with_their_field() {
    let cases = [
        ("  action: MAYBE", "spec.action: unknown action \"MAYBE\""),
        (
            "  selector: {matchLabels: {app: server}}\n  targetRefs: [{kind: Service, name: x}]",
            "spec: only one of targetRefs or selector can be set",
        ),
        (
            "  selector: {matchLabels: {app: \"s*\"}}",
            "spec.selector.matchLabels[app]: wildcard not allowed in label value match",
        ),
        (
            "  rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]",
            "spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\" is not an IP address or CIDR block",
        ),
        (
            "  rules: [{from: [{source: {serviceAccounts: [\"foo/*\"]}}]}]",
            "spec.rules[0].from[0].source.serviceAccounts[0]: wildcard is not supported in serviceAccounts",
        ),
        (
            "  rules: [{from: [{source: {serviceAccounts: [a], principals: [b]}}]}]",
            "spec.rules[0].from[0].source: Cannot set serviceAccounts with namespaces or principals",
        ),
        (
            "  rules: [{from: [{source: {serviceAccounts: [a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q]}}]}]",
            "spec.rules[0].from[0].source.serviceAccounts: at most 16 service accounts, found 17",
        ),
        (
            "  rules: [{to: [{operation: {notPorts: [\"0\"]}}]}]",
            "spec.rules[0].to[0].operation.notPorts[0]: port \"0\" must be between 1-65535",
        ),
        (
            "  rules: [{when: [{key: source.ip, values: [nope]}]}]",
            "spec.rules[0].when[0].values[0]: \"nope\" is not an IP address or CIDR block",
        ),
        (
            "  rules: [{when: [{key: made.up, values: [x]}]}]",
            "spec.rules[0].when[0].key: unknown attribute \"made.up\"",
        ),
    ];
    for (spec, expected) in cases {
        let c = compile_with(&policy("foo", "p", spec));
        let d = diagnostics(&c);
        let want = format!("rejected: AuthorizationPolicy foo/p {expected}");
        assert!(
            d.len() == 1 && d[0].starts_with(&want),
            "{spec}\nwant {want}\ngot {d:#?}"
        );
    }
    let c = compile_with(&peer(
        "foo",
        "p",
        "2024-01-01T00:00:00Z",
        "  portLevelMtls: {\"80\": {mode: STRICT}}",
    ));
    assert!(diagnostics(&c)[0].starts_with(
        "rejected: PeerAuthentication foo/p spec.portLevelMtls: portLevelMtls requires selector"
    ));
}

#[test]
fn custom_audit_dry_run_and_target_refs_are_reported_not_enforced() {
    let dry_run = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: dry, namespace: foo, annotations: {istio.io/dry-run: \"true\"}}\nspec: {}\n---\n";
    let c = compile_with(&format!(
        "{}{}{}{}",
        policy(
            "foo",
            "custom",
            "  action: CUSTOM\n  provider: {name: x}\n  rules: [{}]"
        ),
        policy("foo", "audit", "  action: AUDIT\n  rules: [{}]"),
        policy(
            "foo",
            "waypoint",
            "  targetRefs: [{kind: Service, group: \"\", name: server}]"
        ),
        dry_run,
    ));
    for ip in [SERVER, SERVER2] {
        assert_eq!(decide(&c, A, ip, 80), None);
    }
    let s = &c.snapshot(NODE).unwrap().authz;
    assert!(
        s.workloads.is_empty()
            && s.sources.is_empty()
            && s.verdicts.is_empty()
            && s.policies.is_empty()
    );
    assert_eq!(
        diagnostics(&c),
        [
            "not enforced: AuthorizationPolicy foo/audit spec.action: action AUDIT is not enforced by the node (as in ztunnel): binds no workload",
            "not enforced: AuthorizationPolicy foo/custom spec.action: action CUSTOM is not enforced by the node (as in ztunnel): binds no workload",
            "not enforced: AuthorizationPolicy foo/dry metadata.annotations[istio.io/dry-run]: a dry-run policy is not enforced: binds no workload",
            "not enforced: AuthorizationPolicy foo/waypoint spec.targetRefs: applies to waypoints (targetRefs), not node-enforced yet: binds no workload",
        ]
    );
}

#[test]
fn only_the_nodes_of_bound_workloads_get_tables() {
    let c = compile_with(&policy(
        "foo",
        "p",
        "  selector: {matchLabels: {app: server2}}\n  rules: [{}]",
    ));
    let other = &c.snapshot(OTHER_NODE).unwrap().authz;
    assert!(
        other.workloads.is_empty()
            && other.sources.is_empty()
            && other.verdicts.is_empty()
            && other.policies.is_empty()
    );
    let here = &c.snapshot(NODE).unwrap().authz;
    assert_eq!(here.workloads.len(), 1);
    assert_eq!(here.policies.len(), 1);
    // Every mesh address of the cluster has a source entry (5 mesh pods; `plain` is not in the mesh).
    assert_eq!(here.sources.len(), 5);
}

#[test]
fn under_mode_disabled_the_status_says_authorization_is_not_enforced() {
    let config = "apiVersion: kmesh.net/v1alpha1\nkind: KmeshConfig\nmetadata: {name: default}\nspec: {mode: Disabled}\n---\n";
    let c = compile_with(&format!("{config}{}", policy("foo", "p", "  rules: [{}]")));
    let unenforced: Vec<_> = c
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Unenforced)
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        unenforced,
        [
            "not enforced: KmeshConfig default spec.mode: authorization policies are compiled but not enforced: the mesh is disabled (mode Disabled) and the node programs pass every connection"
        ]
    );
}

#[test]
fn workloads_with_the_same_verdicts_share_a_set_and_the_summary_shows_them() {
    let c = compile_with(&policy(
        "foo",
        "ns-wide",
        "  rules: [{from: [{source: {namespaces: [foo]}}], to: [{operation: {ports: [\"80\"], methods: [GET]}}]}, {from: [{source: {namespaces: [bar]}}]}]",
    ));
    let w = &c.snapshot(NODE).unwrap().authz.workloads;
    assert_eq!(w.len(), 2);
    assert_eq!(w[0].value.policy_set, w[1].value.policy_set);
    let text = summary(&c.snapshot(NODE).unwrap(), &c);
    assert!(
        text.contains("authorization on node-1 (2 workloads"),
        "{text}"
    );
    assert!(
        text.contains("AuthorizationPolicy foo/ns-wide ALLOW, 1 of 2 rules"),
        "{text}"
    );
}

#[test]
fn a_policy_whose_metadata_cannot_be_read_fails_closed_for_its_namespace() {
    let broken = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: broken, namespace: foo, labels: 5}\nspec: {action: DENY}\n---\n";
    let c = compile_with(broken);
    assert_eq!(
        decide(&c, A, SERVER, 80),
        says("DENY UNCOMPILABLE foo/broken")
    );
    assert_eq!(
        decide(&c, A, SERVER2, 80),
        says("DENY UNCOMPILABLE foo/broken")
    );
    assert_eq!(
        decide_on(&c, OTHER_NODE, A, B, 80),
        None,
        "bar is not bound"
    );
    let d = diagnostics(&c);
    assert!(
        d.len() == 1
            && d[0].starts_with(
                "rejected: AuthorizationPolicy foo/broken metadata: does not match its schema"
            )
            && d[0].contains("all mesh workloads of namespace foo (its selector cannot be read)"),
        "{d:#?}"
    );
}

#[test]
fn snapshots_do_not_depend_on_input_order_and_policy_ids_are_stable() {
    let policies = [
        policy(
            "foo",
            "a",
            "  rules: [{from: [{source: {ipBlocks: [10.0.2.0/24]}}]}]",
        ),
        policy(
            "foo",
            "b",
            "  action: DENY\n  rules: [{to: [{operation: {ports: [\"81\"]}}]}]",
        ),
        peer("foo", "c", "2024-01-01T00:00:00Z", "  mtls: {mode: STRICT}"),
    ];
    let forward = compile_with(&policies.concat());
    let mut reversed: Vec<&String> = policies.iter().collect();
    reversed.reverse();
    let backward = compile_with(&reversed.into_iter().cloned().collect::<String>());
    for node in [NODE, OTHER_NODE] {
        assert_eq!(
            forward.snapshot(node).unwrap().encode().unwrap(),
            backward.snapshot(node).unwrap().encode().unwrap(),
            "{node}"
        );
    }
    let ids = |c: &Compiled| -> Vec<u32> {
        c.snapshot(NODE)
            .unwrap()
            .authz
            .policies
            .iter()
            .map(|p| p.policy)
            .collect()
    };
    let more = compile_with(&format!(
        "{}{}",
        policies.concat(),
        policy("bar", "z", "  rules: [{}]")
    ));
    assert_eq!(ids(&forward), ids(&more), "another policy changes no ID");
    assert_eq!(ids(&forward).len(), 3);
}

#[test]
fn a_policy_defined_twice_differently_fails_closed_rather_than_open() {
    let mut inputs = Inputs::default();
    assert!(
        inputs
            .add_yaml(&cluster(), "cluster.yaml", "default")
            .is_empty()
    );
    let one = policy(
        "foo",
        "twice",
        "  action: DENY\n  rules: [{from: [{source: {namespaces: [bar]}}]}]",
    );
    let other = policy(
        "foo",
        "twice",
        "  action: DENY\n  rules: [{from: [{source: {namespaces: [baz]}}]}]",
    );
    assert!(inputs.add_yaml(&one, "a.yaml", "default").is_empty());
    assert!(inputs.add_yaml(&other, "b.yaml", "default").is_empty());
    let c = compile(&inputs, &[NODE.to_string()], 1, &CompileOptions::default());
    assert_eq!(
        decide(&c, A, SERVER, 80),
        says("DENY UNCOMPILABLE foo/twice")
    );
    let d = diagnostics(&c);
    assert!(
        d.iter().any(|d| d.starts_with("rejected: AuthorizationPolicy foo/twice metadata: defined 2 times with different contents")
            && d.contains("fails closed")),
        "{d:#?}"
    );
}
