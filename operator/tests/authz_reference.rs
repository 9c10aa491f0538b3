//! A second, independent check of the authorization semantics: a small reference evaluator
//! written straight from semantics §7-§8 (one connection, the policies as raw JSON, a verdict),
//! compared with what the compiled tables give (`source_class` + `resolve_verdict`, as the
//! kernel reads them) for every workload, source and port of a synthetic cluster built around
//! each AuthorizationPolicy / PeerAuthentication fixture of ../shared/reference.
//!
//! The reference shares no code with the compiler: it reads the YAML as JSON values, matches
//! strings and address blocks with its own helpers, and evaluates rule by rule. What it takes
//! from the compiler is only which objects were rejected (validation is tested on its own in
//! tests/authz.rs), since a rejected policy fails closed.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use kmesh_common::{
    authz::{authz_action, authz_reason, resolve_verdict, source_class},
    ip16,
};
use kmesh_operator::{
    compile::{CompileOptions, Compiled, compile},
    diagnostics::Severity,
    inputs::Inputs,
};
use serde_json::Value;

const ROOT: &str = "istio-system";
const NODE: &str = "node-1";
const CLIENTS: &str = "node-2";

// ---------------------------------------------------------------------------------------------
// The reference evaluator.

/// One connection.
#[derive(Clone, Debug)]
struct Conn<'a> {
    src: IpAddr,
    /// (namespace, service account) of a mesh source.
    identity: Option<(&'a str, &'a str)>,
    dst: IpAddr,
    dst_namespace: &'a str,
    dst_labels: &'a BTreeMap<String, String>,
    port: u16,
}

impl Conn<'_> {
    fn principal(&self) -> String {
        self.identity
            .map(|(ns, sa)| format!("cluster.local/ns/{ns}/sa/{sa}"))
            .unwrap_or_default()
    }
    fn namespace(&self) -> &str {
        self.identity.map_or("", |(ns, _)| ns)
    }
}

/// A policy object: kind ("AuthorizationPolicy" / "PeerAuthentication"), namespace, name and
/// the raw object.
#[derive(Clone, Debug)]
struct Obj {
    kind: String,
    namespace: String,
    name: String,
    value: Value,
}

impl Obj {
    fn spec(&self) -> &Value {
        &self.value["spec"]
    }
    fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
    /// matchLabels, if the selector is a readable map of strings; `Err` if unreadable.
    fn selector(&self) -> Result<Option<BTreeMap<String, String>>, ()> {
        match self.spec().get("selector") {
            None | Some(Value::Null) => Ok(None),
            Some(sel) => {
                let labels = match sel.get("matchLabels") {
                    None | Some(Value::Null) => return Ok(Some(BTreeMap::new())),
                    Some(Value::Object(m)) => m,
                    Some(_) => return Err(()),
                };
                let mut out = BTreeMap::new();
                for (k, v) in labels {
                    out.insert(k.clone(), v.as_str().ok_or(())?.to_string());
                }
                Ok(Some(out))
            }
        }
    }
    /// Whether it applies to the connection's destination (root namespace: every namespace).
    fn binds(&self, c: &Conn<'_>) -> bool {
        if self.namespace != c.dst_namespace && self.namespace != ROOT {
            return false;
        }
        match self.selector() {
            Ok(Some(want)) => want.iter().all(|(k, v)| c.dst_labels.get(k) == Some(v)),
            Ok(None) | Err(()) => true,
        }
    }
    fn created(&self) -> String {
        self.value["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn non_empty(v: &Value, key: &str) -> bool {
    v.get(key)
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
}

fn string_matches(pattern: &str, s: &str) -> bool {
    if pattern == "*" {
        !s.is_empty()
    } else if let Some(p) = pattern.strip_suffix('*') {
        s.starts_with(p)
    } else if let Some(x) = pattern.strip_prefix('*') {
        s.ends_with(x)
    } else {
        pattern == s
    }
}

fn any_string(patterns: &[String], s: &str) -> bool {
    patterns
        .iter()
        .any(|p| string_matches(p.strip_prefix("spiffe://").unwrap_or(p), s))
}

fn in_block(block: &str, ip: IpAddr) -> bool {
    let (addr, len) = block.split_once('/').unwrap_or((block, ""));
    let Ok(net) = addr.parse::<IpAddr>() else {
        return false;
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let len: u32 = len.parse().unwrap_or(32);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            (u32::from(n) & mask) == (u32::from(i) & mask)
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let len: u32 = len.parse().unwrap_or(128);
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            (u128::from(n) & mask) == (u128::from(i) & mask)
        }
        _ => false,
    }
}

fn any_block(blocks: &[String], ip: IpAddr) -> bool {
    blocks.iter().any(|b| in_block(b, ip))
}

fn any_port(ports: &[String], port: u16) -> bool {
    ports.iter().any(|p| p.parse::<u16>() == Ok(port))
}

const L7_SOURCE: [&str; 6] = [
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "trustDomains",
    "notTrustDomains",
];
const L7_OPERATION: [&str; 6] = [
    "hosts",
    "notHosts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
];
const L4_KEYS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

fn rule_has_l7(rule: &Value) -> bool {
    let from = rule["from"].as_array().into_iter().flatten();
    let to = rule["to"].as_array().into_iter().flatten();
    let when = rule["when"].as_array().into_iter().flatten();
    from.clone()
        .any(|f| L7_SOURCE.iter().any(|k| non_empty(&f["source"], k)))
        || to
            .clone()
            .any(|t| L7_OPERATION.iter().any(|k| non_empty(&t["operation"], k)))
        || when
            .clone()
            .any(|w| !L4_KEYS.contains(&w["key"].as_str().unwrap_or("")))
}

/// A source entry: its L4 fields must all hold; one with no L4 field never matches.
fn source_matches(s: &Value, c: &Conn<'_>, policy_ns: &str) -> bool {
    let l4 = [
        "principals",
        "notPrincipals",
        "namespaces",
        "notNamespaces",
        "serviceAccounts",
        "notServiceAccounts",
        "ipBlocks",
        "notIpBlocks",
    ];
    if !l4.iter().any(|k| non_empty(s, k)) {
        return false;
    }
    let principal = c.principal();
    let accounts = |key: &str| -> Vec<String> {
        strs(&s[key])
            .into_iter()
            .map(|a| match a.split_once('/') {
                Some((ns, sa)) => format!("cluster.local/ns/{ns}/sa/{sa}"),
                None => format!("cluster.local/ns/{policy_ns}/sa/{a}"),
            })
            .collect()
    };
    let positive =
        |values: Vec<String>, test: &dyn Fn(&[String]) -> bool| values.is_empty() || test(&values);
    positive(strs(&s["principals"]), &|v| any_string(v, &principal))
        && !any_string(&strs(&s["notPrincipals"]), &principal)
        && positive(strs(&s["namespaces"]), &|v| any_string(v, c.namespace()))
        && !any_string(&strs(&s["notNamespaces"]), c.namespace())
        && positive(accounts("serviceAccounts"), &|v| v.contains(&principal))
        && !accounts("notServiceAccounts").contains(&principal)
        && positive(strs(&s["ipBlocks"]), &|v| any_block(v, c.src))
        && !any_block(&strs(&s["notIpBlocks"]), c.src)
}

fn operation_matches(o: &Value, c: &Conn<'_>) -> bool {
    if !non_empty(o, "ports") && !non_empty(o, "notPorts") {
        return false;
    }
    let ports = strs(&o["ports"]);
    (ports.is_empty() || any_port(&ports, c.port)) && !any_port(&strs(&o["notPorts"]), c.port)
}

fn condition_holds(w: &Value, c: &Conn<'_>) -> bool {
    let values = strs(&w["values"]);
    let not_values = strs(&w["notValues"]);
    let check = |test: &dyn Fn(&[String]) -> bool| {
        (values.is_empty() || test(&values)) && (not_values.is_empty() || !test(&not_values))
    };
    match w["key"].as_str().unwrap_or("") {
        "source.ip" => check(&|v| any_block(v, c.src)),
        "destination.ip" => check(&|v| any_block(v, c.dst)),
        "destination.port" => check(&|v| any_port(v, c.port)),
        "source.namespace" => check(&|v| any_string(v, c.namespace())),
        "source.principal" => check(&|v| any_string(v, &c.principal())),
        _ => false,
    }
}

fn rule_matches(rule: &Value, allow: bool, c: &Conn<'_>, policy_ns: &str) -> bool {
    if allow && rule_has_l7(rule) {
        return false;
    }
    let from_ok = match rule["from"].as_array() {
        None => true,
        Some(f) => f.iter().any(|f| source_matches(&f["source"], c, policy_ns)),
    };
    let to_ok = match rule["to"].as_array() {
        None => true,
        Some(t) => t.iter().any(|t| operation_matches(&t["operation"], c)),
    };
    let when_ok = rule["when"]
        .as_array()
        .is_none_or(|w| w.iter().all(|w| condition_holds(w, c)));
    from_ok && to_ok && when_ok
}

fn policy_matches(p: &Obj, allow: bool, c: &Conn<'_>) -> bool {
    p.spec()["rules"].as_array().is_some_and(|rules| {
        rules
            .iter()
            .any(|r| rule_matches(r, allow, c, &p.namespace))
    })
}

fn mode_of(v: &Value) -> &str {
    match v["mode"].as_str().unwrap_or("UNSET") {
        "DISABLE" => "PERMISSIVE",
        m => m,
    }
}

/// Whether the port is STRICT for the connection, and by which PeerAuthentication.
fn strict(peers: &[&Obj], c: &Conn<'_>) -> Option<String> {
    fn oldest<'o>(mut v: Vec<&&'o Obj>) -> Option<&'o Obj> {
        v.sort_by_key(|p| (p.created(), p.namespace.clone(), p.name.clone()));
        v.first().map(|p| **p)
    }
    let workload = oldest(
        peers
            .iter()
            .filter(|p| p.namespace == c.dst_namespace && p.namespace != ROOT)
            .filter(|p| matches!(p.selector(), Ok(Some(_))) && p.binds(c))
            .collect(),
    );
    let namespace = oldest(
        peers
            .iter()
            .filter(|p| p.namespace == c.dst_namespace && matches!(p.selector(), Ok(None)))
            .collect(),
    );
    let mesh = oldest(
        peers
            .iter()
            .filter(|p| p.namespace == ROOT && matches!(p.selector(), Ok(None)))
            .collect(),
    );
    if let Some(w) = workload {
        let port = &w.spec()["portLevelMtls"][c.port.to_string()];
        let m = mode_of(port);
        if !port.is_null() && m != "UNSET" {
            return (m == "STRICT").then(|| w.label());
        }
    }
    for p in [workload, namespace, mesh].into_iter().flatten() {
        let m = mode_of(&p.spec()["mtls"]);
        if m != "UNSET" {
            return (m == "STRICT").then(|| p.label());
        }
    }
    None
}

/// The reference verdict: "ALLOW reason policy" / "DENY reason policy".
fn reference(objs: &[Obj], rejected: &BTreeSet<(String, String, String)>, c: &Conn<'_>) -> String {
    let is_rejected =
        |o: &Obj| rejected.contains(&(o.kind.clone(), o.namespace.clone(), o.name.clone()));
    let mut aps: Vec<&Obj> = objs
        .iter()
        .filter(|o| o.kind == "AuthorizationPolicy")
        .collect();
    aps.sort_by_key(|o| (o.namespace.clone(), o.name.clone()));
    let enforced = |o: &&Obj| {
        let spec = o.spec();
        let targets = !spec["targetRef"].is_null() || non_empty(spec, "targetRefs");
        let action = spec["action"].as_str().unwrap_or("ALLOW");
        let dry = o.value["metadata"]["annotations"]["istio.io/dry-run"]
            .as_str()
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let has_selector = !spec["selector"].is_null();
        if targets && !has_selector {
            return false;
        }
        if is_rejected(o) {
            return true;
        }
        !(matches!(action, "CUSTOM" | "AUDIT") || dry)
    };
    let bound: Vec<&Obj> = aps
        .iter()
        .copied()
        .filter(enforced)
        .filter(|o| o.binds(c))
        .collect();
    let peers: Vec<&Obj> = objs
        .iter()
        .filter(|o| o.kind == "PeerAuthentication")
        .collect();
    let bad_peer = peers
        .iter()
        .filter(|p| is_rejected(p))
        .filter(|p| !(p.namespace == ROOT && matches!(p.selector(), Ok(Some(_)))))
        .filter(|p| p.binds(c))
        .map(|p| p.label())
        .min();
    if let Some(p) = bound.iter().find(|o| is_rejected(o)) {
        return format!("DENY UNCOMPILABLE {}", p.label());
    }
    if let Some(p) = bad_peer {
        return format!("DENY UNCOMPILABLE {p}");
    }
    let valid_peers: Vec<&Obj> = peers.into_iter().filter(|p| !is_rejected(p)).collect();
    if c.identity.is_none()
        && let Some(by) = strict(&valid_peers, c)
    {
        return format!("DENY STRICT_MTLS {by}");
    }
    let action = |o: &Obj| o.spec()["action"].as_str().unwrap_or("ALLOW").to_string();
    for p in bound.iter().filter(|o| action(o) == "DENY") {
        if policy_matches(p, false, c) {
            return format!("DENY DENY_MATCHED {}", p.label());
        }
    }
    let allows: Vec<&&Obj> = bound.iter().filter(|o| action(o) == "ALLOW").collect();
    if allows.is_empty() {
        return "ALLOW NO_ALLOW_POLICY".to_string();
    }
    for p in allows {
        if policy_matches(p, true, c) {
            return format!("ALLOW ALLOW_MATCHED {}", p.label());
        }
    }
    "DENY NO_ALLOW_MATCHED".to_string()
}

// ---------------------------------------------------------------------------------------------
// The compiled side: the tables, read as the kernel reads them.

fn compiled_verdict(c: &Compiled, src: IpAddr, dst: IpAddr, port: u16) -> String {
    let s = &c.snapshot(NODE).unwrap();
    let Some(w) = s.authz.workloads.iter().find(|w| w.ip == ip16(dst)) else {
        return "ALLOW NO_ALLOW_POLICY".to_string();
    };
    let class = source_class(&s.authz.sources, &ip16(src));
    let verdicts: BTreeMap<_, _> = s.authz.verdicts.iter().map(|r| (r.key, r.value)).collect();
    let Some(v) = resolve_verdict(w.value.policy_set, class, port, |k| {
        verdicts.get(k).copied()
    }) else {
        return "NO VERDICT".to_string();
    };
    let action = if v.action == authz_action::ALLOW {
        "ALLOW"
    } else {
        "DENY"
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
    let name = s
        .authz
        .policies
        .iter()
        .find(|p| p.policy == v.policy)
        .map(|p| String::from_utf8_lossy(&p.name[..p.name_len as usize]).to_string());
    match (v.policy, name) {
        (0, _) => format!("{action} {reason}"),
        (_, Some(n)) => format!("{action} {reason} {n}"),
        (id, None) => format!("{action} {reason} #{id} without a policy record"),
    }
}

/// The shape the kernel and the agent rely on: sorted unique tables, canonical prefixes, classes
/// that are neither UNKNOWN nor ANY, a default for every set a workload uses, a record for every
/// policy a verdict names, and reasons that agree with actions; and the snapshot round-trips.
fn check_tables(origin: &str, c: &Compiled) {
    use kmesh_common::authz::{ANY_CLASS, ANY_PORT, UNKNOWN_SOURCE, prefix_is_canonical};
    let s = &c.snapshot(NODE).unwrap();
    let t = &s.authz;
    assert!(
        t.workloads.windows(2).all(|w| w[0].ip < w[1].ip),
        "{origin}"
    );
    assert!(
        t.sources.windows(2).all(|w| w[0].key < w[1].key),
        "{origin}"
    );
    assert!(
        t.verdicts.windows(2).all(|w| w[0].key < w[1].key),
        "{origin}"
    );
    assert!(
        t.policies.windows(2).all(|w| w[0].policy < w[1].policy),
        "{origin}"
    );
    for r in &t.sources {
        assert!(prefix_is_canonical(&r.key), "{origin}: {r:?}");
        assert!(
            ![UNKNOWN_SOURCE, ANY_CLASS].contains(&r.value.source_class),
            "{origin}: {r:?}"
        );
    }
    let keys: BTreeSet<_> = t.verdicts.iter().map(|v| v.key).collect();
    for w in &t.workloads {
        let default = kmesh_common::authz::AuthzVerdictKey {
            policy_set: w.value.policy_set,
            source_class: ANY_CLASS,
            port: ANY_PORT,
            pad: 0,
        };
        assert!(
            keys.contains(&default),
            "{origin}: set {} has no default",
            w.value.policy_set
        );
    }
    for v in &t.verdicts {
        let expected_action = match v.value.reason {
            authz_reason::NO_ALLOW_POLICY | authz_reason::ALLOW_MATCHED => authz_action::ALLOW,
            _ => authz_action::DENY,
        };
        assert_eq!(v.value.action, expected_action, "{origin}: {v:?}");
        let no_policy = matches!(
            v.value.reason,
            authz_reason::NO_ALLOW_POLICY | authz_reason::NO_ALLOW_MATCHED
        );
        assert_eq!(v.value.policy == 0, no_policy, "{origin}: {v:?}");
        if v.value.policy != 0 {
            assert!(
                t.policies.iter().any(|p| p.policy == v.value.policy),
                "{origin}: policy {} has no record",
                v.value.policy
            );
        }
    }
    let bytes = s.encode().expect("encodes");
    let decoded = kmesh_snapshot::Snapshot::decode(&bytes, &kmesh_snapshot::Limits::default())
        .unwrap_or_else(|e| panic!("{origin}: {e}"));
    assert_eq!(&decoded.snapshot, s, "{origin}");
}

// ---------------------------------------------------------------------------------------------
// Fixtures and the synthetic cluster around them.

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/istio")
}

/// Every file of ../shared/reference holding AuthorizationPolicies or PeerAuthentications
/// (found by content, not listed), except the CRD bundle.
fn fixture_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![reference_dir()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml")
                && !path.ends_with("crd-all.gen.yaml")
            {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                if text.contains("kind: AuthorizationPolicy")
                    || text.contains("kind: PeerAuthentication")
                {
                    out.push(path);
                }
            }
        }
    }
    out.sort();
    out
}

/// The AuthorizationPolicies and PeerAuthentications of a YAML text, namespace defaulted.
fn policy_objects(text: &str) -> Vec<Obj> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let Ok(v) = serde_yaml::Value::deserialize(doc) else {
            break;
        };
        let Ok(mut v) = serde_json::to_value(&v) else {
            continue;
        };
        let kind = v["kind"].as_str().unwrap_or("").to_string();
        if !(kind == "AuthorizationPolicy" || kind == "PeerAuthentication") {
            continue;
        }
        if let Some(o) = v.as_object_mut() {
            o.remove("_err");
        }
        let Some(name) = v["metadata"]["name"].as_str().map(str::to_string) else {
            continue;
        };
        let namespace = v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        v["metadata"]["namespace"] = Value::String(namespace.clone());
        out.push(Obj {
            kind,
            namespace,
            name,
            value: v,
        });
    }
    out
}

/// A pod of the synthetic cluster.
struct TestPod {
    namespace: String,
    name: String,
    node: &'static str,
    ip: IpAddr,
    service_account: String,
    labels: BTreeMap<String, String>,
    mesh: bool,
}

impl TestPod {
    fn yaml(&self) -> String {
        let value = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels},
            "spec": {"nodeName": self.node, "serviceAccountName": self.service_account,
                     "containers": [{"name": "c"}]},
            "status": {"podIP": self.ip.to_string(), "conditions": [{"type": "Ready", "status": "True"}]},
        });
        serde_yaml::to_string(&value).unwrap()
    }
}

/// Every string a fixture holds under `key`, anywhere.
fn collect(v: &Value, key: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                if k == key {
                    out.extend(strs(child));
                }
                collect(child, key, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|c| collect(c, key, out)),
        _ => {}
    }
}

/// The addresses named by `blocks` (each block's first address, and one inside it).
fn addresses_in(blocks: &[String]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for b in blocks {
        let (addr, len) = b.split_once('/').unwrap_or((b, "32"));
        if let Ok(IpAddr::V4(a)) = addr.parse::<IpAddr>() {
            out.push(IpAddr::V4(a));
            if len.parse::<u32>().is_ok_and(|l| l < 31) {
                out.push(IpAddr::V4((u32::from(a) + 1).into()));
            }
        }
    }
    out
}

/// The cluster around `objs`: destinations on NODE (per policy namespace, one pod per distinct
/// selector plus one without labels), mesh clients on CLIENTS (each namespace and principal the
/// policies name, with service accounts `default` and `sa`), and addresses of no mesh pod.
fn cluster(objs: &[Obj]) -> (Vec<TestPod>, Vec<IpAddr>, Vec<u16>) {
    let mut namespaces: BTreeSet<String> = ["foo", "bar", "ns-1", "ns-2", "default", ROOT]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut selectors: BTreeMap<String, BTreeSet<BTreeMap<String, String>>> = BTreeMap::new();
    let mut identities: BTreeSet<(String, String)> = BTreeSet::new();
    let mut blocks = Vec::new();
    let mut ports = vec!["1".to_string(), "8080".to_string(), "65535".to_string()];
    for o in objs {
        namespaces.insert(o.namespace.clone());
        if let Ok(Some(labels)) = o.selector() {
            selectors
                .entry(o.namespace.clone())
                .or_default()
                .insert(labels);
        }
        let mut names = Vec::new();
        collect(&o.value, "namespaces", &mut names);
        collect(&o.value, "notNamespaces", &mut names);
        for n in names {
            let n = n.trim_matches('*');
            if !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                namespaces.insert(n.trim_matches('-').to_string());
            }
        }
        let mut principals = Vec::new();
        collect(&o.value, "principals", &mut principals);
        collect(&o.value, "values", &mut principals);
        for p in principals {
            let parts: Vec<&str> = p.trim_start_matches("spiffe://").split('/').collect();
            if let [_, "ns", ns, "sa", sa] = parts.as_slice()
                && !ns.contains('*')
                && !sa.contains('*')
            {
                identities.insert((ns.to_string(), sa.to_string()));
            }
        }
        for key in ["ipBlocks", "notIpBlocks", "values", "notValues"] {
            collect(&o.value, key, &mut blocks);
        }
        for key in ["ports", "notPorts", "values", "notValues"] {
            collect(&o.value, key, &mut ports);
        }
        if let Some(levels) = o.spec()["portLevelMtls"].as_object() {
            ports.extend(levels.keys().cloned());
        }
    }
    // Only names a cluster can hold (the operator refuses the others as the API server does):
    // `rule[0]` in a principal names no namespace any pod can be in.
    let holdable = |ns: &str| kmesh_snapshot::names::namespace_problem(ns.as_bytes()).is_none();
    namespaces.retain(|n| holdable(n));
    identities.retain(|(ns, sa)| {
        holdable(ns) && kmesh_snapshot::names::object_name_problem(sa.as_bytes()).is_none()
    });
    for ns in &namespaces {
        for sa in ["default", "sa"] {
            identities.insert((ns.clone(), sa.to_string()));
        }
    }
    let mut pods = Vec::new();
    let mut next = 0u32;
    let mut ip = || {
        next += 1;
        IpAddr::from([10, 200, (next / 250) as u8, (next % 250 + 1) as u8])
    };
    for ns in &namespaces {
        let mut labels: Vec<BTreeMap<String, String>> =
            selectors.get(ns).into_iter().flatten().cloned().collect();
        if ns == "foo" || ns == "default" {
            labels.extend(selectors.get(ROOT).into_iter().flatten().cloned());
        }
        labels.push(BTreeMap::new());
        for (i, l) in labels.into_iter().enumerate() {
            pods.push(TestPod {
                namespace: ns.clone(),
                name: format!("dst-{i}"),
                node: NODE,
                ip: ip(),
                service_account: "server".to_string(),
                labels: l,
                mesh: true,
            });
        }
    }
    for (i, (ns, sa)) in identities.iter().enumerate() {
        pods.push(TestPod {
            namespace: ns.clone(),
            name: format!("client-{i}"),
            node: CLIENTS,
            ip: ip(),
            service_account: sa.clone(),
            labels: BTreeMap::new(),
            mesh: true,
        });
    }
    // A mesh client at an address some block names, and a non-mesh pod.
    let named = addresses_in(&blocks);
    if let Some(first) = named.first() {
        pods.push(TestPod {
            namespace: "ns-1".to_string(),
            name: "client-in-block".to_string(),
            node: CLIENTS,
            ip: *first,
            service_account: "sa".to_string(),
            labels: BTreeMap::new(),
            mesh: true,
        });
    }
    pods.push(TestPod {
        namespace: "outside".to_string(),
        name: "plain".to_string(),
        node: CLIENTS,
        ip: "10.250.0.1".parse().unwrap(),
        service_account: "default".to_string(),
        labels: BTreeMap::new(),
        mesh: false,
    });
    let mut strangers = named;
    strangers.extend([
        "192.0.2.1".parse::<IpAddr>().unwrap(),
        "10.250.0.1".parse().unwrap(),
    ]);
    let mut ports: Vec<u16> = ports
        .iter()
        .filter_map(|p| p.parse().ok())
        .filter(|p| *p != 0)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    (pods, strangers, ports)
}

fn cluster_yaml(pods: &[TestPod]) -> String {
    let namespaces: BTreeSet<&str> = pods.iter().map(|p| p.namespace.as_str()).collect();
    let mut text = String::new();
    for ns in namespaces {
        let labels = if ns == "outside" {
            serde_json::json!({})
        } else {
            serde_json::json!({"istio.io/dataplane-mode": "Kmesh"})
        };
        let v = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}});
        text.push_str(&serde_yaml::to_string(&v).unwrap());
        text.push_str("---\n");
    }
    for p in pods {
        text.push_str(&p.yaml());
        text.push_str("---\n");
    }
    text
}

/// Compiles `policies` (a YAML text) in the synthetic cluster and compares every (destination,
/// source, port) with the reference; returns how many connections got each verdict (action and
/// reason).
fn compare(origin: &str, policies: &str) -> BTreeMap<String, usize> {
    let objs = policy_objects(policies);
    let (pods, strangers, ports) = cluster(&objs);
    let mut inputs = Inputs::default();
    let read = inputs.add_yaml(&cluster_yaml(&pods), "cluster.yaml", "default");
    assert!(read.is_empty(), "{read:?}");
    let mut policy_yaml = String::new();
    for o in &objs {
        policy_yaml.push_str(&serde_yaml::to_string(&o.value).unwrap());
        policy_yaml.push_str("---\n");
    }
    inputs.add_yaml(&policy_yaml, origin, "default");
    let compiled = compile(&inputs, &[NODE.to_string()], 1, &CompileOptions::default());
    check_tables(origin, &compiled);
    let rejected: BTreeSet<(String, String, String)> = compiled
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Rejected)
        .map(|d| {
            let o = &d.object;
            (
                o.kind.to_string(),
                o.namespace.clone().unwrap_or_default(),
                o.name.clone(),
            )
        })
        .collect();
    let mut sources: Vec<(IpAddr, Option<(&str, &str)>)> = pods
        .iter()
        .filter(|p| p.node == CLIENTS || p.mesh)
        .map(|p| {
            let identity = p
                .mesh
                .then_some((p.namespace.as_str(), p.service_account.as_str()));
            (p.ip, identity)
        })
        .collect();
    for s in &strangers {
        if !pods.iter().any(|p| p.ip == *s) {
            sources.push((*s, None));
        }
    }
    let mut compared: BTreeMap<String, usize> = BTreeMap::new();
    let mut mismatches = Vec::new();
    for dst in pods.iter().filter(|p| p.node == NODE) {
        for (src, identity) in &sources {
            for port in &ports {
                let conn = Conn {
                    src: *src,
                    identity: *identity,
                    dst: dst.ip,
                    dst_namespace: &dst.namespace,
                    dst_labels: &dst.labels,
                    port: *port,
                };
                let want = reference(&objs, &rejected, &conn);
                let got = compiled_verdict(&compiled, *src, dst.ip, *port);
                let kind = want.split(' ').take(2).collect::<Vec<_>>().join(" ");
                *compared.entry(kind).or_default() += 1;
                if want != got && mismatches.len() < 10 {
                    mismatches.push(format!(
                        "{src} ({identity:?}) -> {}/{} {}:{port}: reference {want}, compiled {got}",
                        dst.namespace, dst.name, dst.ip
                    ));
                }
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{origin}:\n{}",
        mismatches.join("\n")
    );
    compared
}

#[test]
fn compiled_tables_agree_with_the_reference_on_every_fixture() {
    let files = fixture_files();
    assert!(files.len() >= 20, "found only {files:?}");
    let mut total: BTreeMap<String, usize> = BTreeMap::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let origin = file
            .strip_prefix(reference_dir())
            .unwrap()
            .display()
            .to_string();
        for (kind, n) in compare(&origin, &text) {
            *total.entry(kind).or_default() += n;
        }
    }
    eprintln!(
        "{} fixtures, connections compared by verdict: {total:?}",
        files.len()
    );
    assert_every_verdict_seen(&total);
}

/// A comparison that never sees a kind of verdict cannot catch a mistake in it.
fn assert_every_verdict_seen(total: &BTreeMap<String, usize>) {
    for kind in [
        "ALLOW NO_ALLOW_POLICY",
        "ALLOW ALLOW_MATCHED",
        "DENY DENY_MATCHED",
        "DENY NO_ALLOW_MATCHED",
        "DENY STRICT_MTLS",
        "DENY UNCOMPILABLE",
    ] {
        assert!(
            total.get(kind).is_some_and(|n| *n > 0),
            "no {kind} among {total:?}"
        );
    }
}

/// Hand-made cases for the rules of §7/§8 and pitfalls 4-6 of §9, beside the fixtures.
#[test]
fn compiled_tables_agree_with_the_reference_on_hand_made_cases() {
    let ap = |name: &str, ns: &str, spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n---\n"
        )
    };
    let pa = |name: &str, ns: &str, created: &str, spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}, creationTimestamp: \"{created}\"}}\nspec: {spec}\n---\n"
        )
    };
    let cases = [
        // Pitfall 4: an ALLOW whose rules are all L7 still binds and allows nothing.
        ap(
            "l7-only",
            "foo",
            "{rules: [{to: [{operation: {methods: [GET]}}]}]}",
        ),
        // An ALLOW rule with L4 and L7 parts is dropped whole, not reduced to its L4 part.
        ap(
            "l7-mixed",
            "bar",
            "{rules: [{from: [{source: {namespaces: [foo]}}], to: [{operation: {ports: ['8080'], methods: [GET]}}]}, {from: [{source: {namespaces: [ns-1]}}]}]}",
        ),
        // Pitfall 5: DENY keeps its L4 remainder; a clause left empty is a no-op.
        ap(
            "deny-l4",
            "foo",
            "{action: DENY, rules: [{from: [{source: {namespaces: [bar]}}], to: [{operation: {ports: ['8080'], paths: [/x]}}]}, {from: [{source: {requestPrincipals: ['*']}}]}]}",
        ),
        // Pitfall 6: rules absent (never) vs [{}] (always).
        format!(
            "{}{}",
            ap("never", "foo", "{selector: {matchLabels: {app: a}}}"),
            ap("always", "bar", "{rules: [{}]}")
        ),
        // Deny before allow, first by name.
        format!(
            "{}{}",
            ap(
                "b-allow",
                "foo",
                "{rules: [{from: [{source: {namespaces: ['ns-*']}}]}]}"
            ),
            ap(
                "a-deny",
                "foo",
                "{action: DENY, rules: [{from: [{source: {namespaces: [ns-2]}}]}]}"
            )
        ),
        // Root namespace: selector-less is mesh-wide; a selector binds across namespaces.
        format!(
            "{}{}",
            ap(
                "mesh",
                "istio-system",
                "{action: DENY, rules: [{from: [{source: {notPrincipals: ['*']}}], to: [{operation: {ports: ['8080']}}]}]}"
            ),
            ap(
                "sel",
                "istio-system",
                "{selector: {matchLabels: {app: a}}, rules: [{from: [{source: {ipBlocks: [10.200.0.0/24], notIpBlocks: [10.200.0.5]}}]}]}"
            )
        ),
        // when keys, not-values, serviceAccounts, destination.ip.
        ap(
            "when",
            "foo",
            "{rules: [{from: [{source: {serviceAccounts: [bar/sa, default]}}], when: [{key: destination.port, notValues: ['1']}, {key: source.ip, notValues: [10.200.0.9]}, {key: destination.ip, values: [10.200.0.0/16]}]}]}",
        ),
        // PeerAuthentication: mesh STRICT, namespace UNSET inherits, workload port exception; DISABLE as PERMISSIVE; the oldest wins.
        format!(
            "{}{}{}{}{}",
            pa(
                "mesh",
                "istio-system",
                "2024-01-01T00:00:00Z",
                "{mtls: {mode: STRICT}}"
            ),
            pa("ns", "foo", "2024-01-01T00:00:00Z", "{mtls: {mode: UNSET}}"),
            pa(
                "w-old",
                "foo",
                "2024-01-01T00:00:00Z",
                "{selector: {matchLabels: {app: a}}, portLevelMtls: {'8080': {mode: DISABLE}, '1': {mode: UNSET}}}"
            ),
            pa(
                "w-new",
                "foo",
                "2025-01-01T00:00:00Z",
                "{selector: {matchLabels: {app: a}}, mtls: {mode: PERMISSIVE}}"
            ),
            pa(
                "bar",
                "bar",
                "2024-01-01T00:00:00Z",
                "{mtls: {mode: DISABLE}}"
            ),
        ),
        // Invalid policies fail closed for what they bind.
        format!(
            "{}{}",
            ap(
                "bad",
                "foo",
                "{selector: {matchLabels: {app: a}}, rules: [{to: [{operation: {ports: ['0']}}]}]}"
            ),
            pa(
                "bad-pa",
                "bar",
                "2024-01-01T00:00:00Z",
                "{mtls: {mode: NOPE}}"
            )
        ),
        // Blocks hold addresses of their own family only: `::/0` holds no IPv4 source.
        format!(
            "{}{}",
            ap(
                "v6-any",
                "foo",
                "{rules: [{from: [{source: {ipBlocks: ['::/0']}}]}, {from: [{source: {ipBlocks: [10.200.0.0/16], namespaces: [bar]}}]}]}"
            ),
            ap(
                "not-v6",
                "bar",
                "{action: DENY, rules: [{from: [{source: {notIpBlocks: ['::/0', 10.250.0.0/16]}}]}]}"
            )
        ),
        // STRICT with ALLOW: identity-less sources are refused even where a rule would allow them.
        format!(
            "{}{}",
            pa(
                "strict",
                "foo",
                "2024-01-01T00:00:00Z",
                "{mtls: {mode: STRICT}}"
            ),
            ap("open", "foo", "{rules: [{}]}")
        ),
    ];
    let mut total: BTreeMap<String, usize> = BTreeMap::new();
    for (i, case) in cases.iter().enumerate() {
        for (kind, n) in compare(&format!("case {i}"), case) {
            *total.entry(kind).or_default() += n;
        }
    }
    eprintln!(
        "{} cases, connections compared by verdict: {total:?}",
        cases.len()
    );
    assert_every_verdict_seen(&total);
}
