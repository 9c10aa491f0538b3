//! The compiler over real Istio YAML (../shared/reference) and the bookinfo cluster fixture:
//! golden summaries, determinism, stable IDs, and bad objects.
//!
//! Regenerate the goldens after an intended change with
//! `KMESH_UPDATE_GOLDEN=1 cargo test -p kmesh-operator --test compile` and review the diff. A run
//! with `CI` set refuses to rewrite them (and scripts/test.sh refuses to start with the variable
//! set): in CI a golden is a check, never an output.
use std::path::{Path, PathBuf};

use kmesh_common::{access_log, log_level};
use kmesh_operator::{
    compile::{CompileOptions, Compiled, compile},
    diagnostics::Severity,
    inputs::Inputs,
    kinds::Kind,
    render::summary,
};

const NODE: &str = "node-1";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bookinfo_networking(file: &str) -> PathBuf {
    let path = repo()
        .join("../shared/reference/istio/samples/bookinfo/networking")
        .join(file);
    assert!(
        path.exists(),
        "{} is missing: the reference fixtures live in ../shared next to the checkout",
        path.display()
    );
    path
}

fn read(inputs: &mut Inputs, path: &Path) -> Vec<kmesh_operator::diagnostics::Diagnostic> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let origin = path.file_name().unwrap().to_string_lossy().to_string();
    inputs.add_yaml(&text, &origin, "default")
}

fn bookinfo_with(files: &[&str]) -> Inputs {
    let mut inputs = Inputs::default();
    assert!(
        read(
            &mut inputs,
            &repo().join("tests/fixtures/bookinfo/cluster.yaml")
        )
        .is_empty()
    );
    for f in files {
        let d = read(&mut inputs, &bookinfo_networking(f));
        assert!(d.is_empty(), "{f}: {d:?}");
    }
    inputs
}

fn compile_node(inputs: &Inputs) -> Compiled {
    compile(inputs, &[NODE.to_string()], 1, &CompileOptions::default())
}

fn check_golden(case: &str, actual: &str) {
    let path = repo()
        .join("operator/tests/golden")
        .join(format!("{case}.txt"));
    if std::env::var_os("KMESH_UPDATE_GOLDEN").is_some() {
        assert!(
            std::env::var_os("CI").is_none(),
            "KMESH_UPDATE_GOLDEN is set in CI (CI is set): goldens are checked in CI, never \
             rewritten; unset KMESH_UPDATE_GOLDEN"
        );
        std::fs::write(&path, actual).unwrap();
        eprintln!(
            "KMESH_UPDATE_GOLDEN: rewrote {}; review the diff",
            path.display()
        );
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{}: {e}; create it with KMESH_UPDATE_GOLDEN=1 cargo test -p kmesh-operator --test compile", path.display())
    });
    assert_eq!(
        actual,
        expected,
        "{case}: the compiled summary differs from {}; if the change is intended, regenerate with KMESH_UPDATE_GOLDEN=1",
        path.display()
    );
}

/// Each bookinfo networking sample with destination-rule-all, as a golden summary.
#[test]
fn bookinfo_samples_match_their_goldens() {
    let cases = [
        ("reviews-90-10", "virtual-service-reviews-90-10.yaml"),
        ("reviews-80-20", "virtual-service-reviews-80-20.yaml"),
        ("reviews-50-v3", "virtual-service-reviews-50-v3.yaml"),
        ("reviews-v3", "virtual-service-reviews-v3.yaml"),
        ("reviews-v2-v3", "virtual-service-reviews-v2-v3.yaml"),
        (
            "reviews-jason-v2-v3",
            "virtual-service-reviews-jason-v2-v3.yaml",
        ),
        ("reviews-test-v2", "virtual-service-reviews-test-v2.yaml"),
        ("all-v1", "virtual-service-all-v1.yaml"),
        (
            "ratings-test-delay",
            "virtual-service-ratings-test-delay.yaml",
        ),
        (
            "ratings-test-abort",
            "virtual-service-ratings-test-abort.yaml",
        ),
        ("details-v2", "virtual-service-details-v2.yaml"),
        ("egress-google-apis", "egress-rule-google-apis.yaml"),
    ];
    for (case, vs) in cases {
        let compiled = compile_node(&bookinfo_with(&["destination-rule-all.yaml", vs]));
        check_golden(case, &summary(&compiled.snapshot(NODE).unwrap(), &compiled));
    }
}

#[test]
fn header_matches_and_faults_are_reported_not_dropped() {
    let compiled = compile_node(&bookinfo_with(&[
        "destination-rule-all.yaml",
        "virtual-service-reviews-jason-v2-v3.yaml",
    ]));
    let unenforced: Vec<String> = compiled
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Unenforced)
        .map(|d| format!("{} {}", d.object, d.field))
        .collect();
    assert!(
        unenforced.contains(&"VirtualService default/reviews spec.http[0].match".to_string()),
        "{unenforced:?}"
    );

    let compiled = compile_node(&bookinfo_with(&[
        "destination-rule-all.yaml",
        "virtual-service-ratings-test-delay.yaml",
    ]));
    assert!(
        compiled
            .diagnostics
            .iter()
            .any(|d| d.field.ends_with(".fault") && d.severity == Severity::Unenforced),
        "{:?}",
        compiled.diagnostics
    );
}

#[test]
fn same_input_gives_the_same_bytes_whatever_the_order() {
    let files = [
        "destination-rule-all.yaml",
        "virtual-service-reviews-80-20.yaml",
    ];
    let a = compile_node(&bookinfo_with(&files));
    let mut reversed = bookinfo_with(&files);
    reversed.pods.reverse();
    reversed.services.reverse();
    reversed.destination_rules.reverse();
    let b = compile_node(&reversed);
    let bytes = |c: &Compiled| c.snapshot(NODE).unwrap().encode().unwrap();
    assert_eq!(bytes(&a), bytes(&a.clone()));
    assert_eq!(bytes(&a), bytes(&b), "input order changed the snapshot");
}

#[test]
fn ids_are_stable_when_an_unrelated_service_is_added() {
    let base = bookinfo_with(&[
        "destination-rule-all.yaml",
        "virtual-service-reviews-90-10.yaml",
    ]);
    let mut more = base.clone();
    let extra = r#"
apiVersion: v1
kind: Service
metadata: {name: zzz-extra, namespace: default}
spec:
  clusterIP: 10.96.77.99
  ports: [{port: 80}]
  selector: {app: nothing}
"#;
    assert!(more.add_yaml(extra, "extra", "default").is_empty());
    let a = compile_node(&base).snapshot(NODE).unwrap().clone();
    let b = compile_node(&more).snapshot(NODE).unwrap().clone();
    for r in &a.services {
        assert!(b.services.contains(r), "service record changed: {r:?}");
    }
    for r in &a.routes {
        assert!(b.routes.contains(r), "route changed: {r:?}");
    }
    assert_eq!(b.services.len(), a.services.len() + 1);
}

#[test]
fn a_bad_virtual_service_is_rejected_and_the_rest_still_compiles() {
    let mut inputs = bookinfo_with(&["destination-rule-all.yaml"]);
    let bad = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-bad}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 0
    - destination: {host: reviews, subset: v2}
      weight: 0
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings-unknown-subset}
spec:
  hosts: [ratings]
  tcp:
  - route:
    - destination: {host: ratings, subset: v9}
---
this: is: not: yaml
"#;
    let parse = inputs.add_yaml(bad, "bad.yaml", "default");
    assert_eq!(parse.len(), 1, "{parse:?}");
    assert_eq!(parse[0].severity, Severity::Rejected);
    let compiled = compile_node(&inputs);
    let rejected: Vec<String> = compiled
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Rejected)
        .map(|d| d.to_string())
        .collect();
    assert!(
        rejected
            .iter()
            .any(|d| d.contains("reviews-bad") && d.contains("add up to 0")),
        "{rejected:?}"
    );
    assert!(
        rejected
            .iter()
            .any(|d| d.contains("ratings-unknown-subset") && d.contains("v9")),
        "{rejected:?}"
    );
    // The rejected VirtualServices are left out: reviews and ratings keep their default routing
    // (all their endpoints), and the other services are untouched.
    let s = &compiled.snapshot(NODE).unwrap();
    assert_eq!(s.services.len(), 4, "{s:?}");
    let text = summary(s, &compiled);
    assert!(
        text.contains("10.244.77.21:9080 10.244.77.22:9080 10.244.77.23:9080"),
        "{text}"
    );
    s.encode().expect("the snapshot is valid");
}

// ---- Gateway API mesh routes (GAMMA) ----

fn reference(path: &str) -> PathBuf {
    let path = repo().join("../shared/reference").join(path);
    assert!(
        path.exists(),
        "{} is missing: the reference fixtures live in ../shared next to the checkout",
        path.display()
    );
    path
}

/// A cluster fixture of `tests/fixtures/gamma` (it must read cleanly).
fn gamma_cluster(fixture: &str) -> Inputs {
    let mut inputs = Inputs::default();
    let d = read(
        &mut inputs,
        &repo().join("tests/fixtures/gamma").join(fixture),
    );
    assert!(d.is_empty(), "{fixture}: {d:?}");
    inputs
}

/// Adds YAML text that must read cleanly.
fn add(inputs: &mut Inputs, text: &str, origin: &str, namespace: &str) {
    let d = inputs.add_yaml(text, origin, namespace);
    assert!(d.is_empty(), "{origin}: {d:?}");
}

/// Rewrites the spec of every route of a YAML text with `rewrite`, leaving other documents as they
/// are: the reference files stay verbatim on disk, the test says what it changed.
fn rewrite_routes(text: &str, rewrite: impl Fn(&mut serde_yaml::Mapping)) -> String {
    use serde::Deserialize as _;
    let mut out = String::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let mut value = serde_yaml::Value::deserialize(document).unwrap();
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or("").to_string();
        if kind.ends_with("Route")
            && let Some(spec) = value.get_mut("spec").and_then(|s| s.as_mapping_mut())
        {
            rewrite(spec);
        }
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&value).unwrap());
    }
    out
}

fn service_parent(name: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&format!("{{group: \"\", kind: Service, name: {name}}}")).unwrap()
}

/// Routes attached to Gateways re-attached to the Service of the same name in the route's
/// namespace: the same rules, compiled as mesh routes.
fn gateway_parents_as_services(text: &str) -> String {
    rewrite_routes(text, |spec| {
        if let Some(parents) = spec.get_mut("parentRefs").and_then(|p| p.as_sequence_mut()) {
            for parent in parents.iter_mut() {
                if parent.get("kind").is_none() {
                    let name = parent["name"].as_str().unwrap().to_string();
                    *parent = service_parent(&name);
                }
            }
        }
    })
}

/// Routes without parentRefs attached to Service `service`.
fn attach_to_service(text: &str, service: &str) -> String {
    rewrite_routes(text, |spec| {
        spec.entry("parentRefs".into())
            .or_insert_with(|| serde_yaml::Value::Sequence(vec![service_parent(service)]));
    })
}

fn diagnostics_text(compiled: &Compiled) -> Vec<String> {
    compiled.diagnostics.iter().map(|d| d.to_string()).collect()
}

/// Istio's ambient Argo CD sample: reviews split 90/10 over reviews-v1 and reviews-v2 by an
/// HTTPRoute with a Service parent; the ingress route and the waypoints are not node business.
#[test]
fn ambient_argo_http_route_matches_its_golden() {
    let mut inputs = gamma_cluster("ambient-bookinfo.yaml");
    // The Services of bookinfo.yaml and bookinfo-versions.yaml are in the fixture with their
    // cluster IPs; the rest of the directory is read as it is.
    for file in [
        "application.yaml",
        "route-reviews-90-10.yaml",
        "ingress-gateway.yaml",
        "details-waypoint.yaml",
        "reviews-waypoint.yaml",
    ] {
        // Argo CD applies the directory to namespace `ambient` (application.yaml).
        let path = reference(&format!("istio/samples/ambient-argo/application/{file}"));
        let text = std::fs::read_to_string(&path).unwrap();
        add(&mut inputs, &text, file, "ambient");
    }
    let compiled = compile_node(&inputs);
    let text = summary(&compiled.snapshot(NODE).unwrap(), &compiled);
    check_golden("gamma-ambient-reviews-90-10", &text);
    assert!(
        text.contains(
            " 90.0%  reviews-v1.ambient.svc.cluster.local:9080 (v4) [random]  10.244.78.21:9080"
        ) && text.contains(
            " 10.0%  reviews-v2.ambient.svc.cluster.local:9080 (v4) [random]  10.244.78.22:9080"
        ),
        "{text}"
    );
}

/// The mesh routes of Istio's gateway converter inputs, as goldens.
#[test]
fn istio_gateway_testdata_mesh_routes_match_their_goldens() {
    let testdata = "istio/pilot/pkg/config/kube/gateway/testdata";
    for (case, fixture, file) in [
        ("gamma-istio-mesh", "istio-mesh.yaml", "mesh.yaml"),
        (
            "gamma-istio-route-precedence",
            "istio-precedence.yaml",
            "route-precedence.yaml",
        ),
    ] {
        let mut inputs = gamma_cluster(fixture);
        let d = read(&mut inputs, &reference(&format!("{testdata}/{file}")));
        assert!(d.is_empty(), "{file}: {d:?}");
        let compiled = compile_node(&inputs);
        check_golden(case, &summary(&compiled.snapshot(NODE).unwrap(), &compiled));
    }
    // weighted, zero and tcp attach their routes to Gateways only: as they are, nothing of them
    // is for the node, and they are noted. Re-attached to Services, their rules are compiled.
    for (case, file) in [
        ("gamma-istio-weighted", "weighted.yaml"),
        ("gamma-istio-zero", "zero.yaml"),
        ("gamma-istio-tcp", "tcp.yaml"),
    ] {
        let path = reference(&format!("{testdata}/{file}"));
        let text = std::fs::read_to_string(&path).unwrap();
        let base = gamma_cluster("istio-weighted.yaml");
        let mut as_is = base.clone();
        add(&mut as_is, &text, file, "default");
        let compiled = compile_node(&as_is);
        assert_eq!(
            compiled.snapshot(NODE).unwrap().encode().unwrap(),
            compile_node(&base)
                .snapshot(NODE)
                .unwrap()
                .encode()
                .unwrap(),
            "{file}: Gateway routes changed the node's snapshot"
        );
        assert!(
            compiled
                .diagnostics
                .iter()
                .all(|d| d.severity == Severity::Note && d.field.starts_with("spec.parentRefs")),
            "{file}: {:?}",
            diagnostics_text(&compiled)
        );
        let mut mesh = base.clone();
        add(
            &mut mesh,
            &gateway_parents_as_services(&text),
            file,
            "default",
        );
        let compiled = compile_node(&mesh);
        check_golden(case, &summary(&compiled.snapshot(NODE).unwrap(), &compiled));
    }
}

/// The Gateway API traffic-splitting examples, attached to Service foo (they have no parentRefs).
#[test]
fn gateway_api_traffic_splitting_examples_match_their_goldens() {
    for (case, file) in [
        ("gamma-simple-split", "simple-split.yaml"),
        ("gamma-traffic-split-1", "traffic-split-1.yaml"),
        ("gamma-traffic-split-2", "traffic-split-2.yaml"),
        ("gamma-traffic-split-3", "traffic-split-3.yaml"),
        ("gamma-grpc-traffic-split-2", "grpc-traffic-split-2.yaml"),
    ] {
        let path = reference(&format!(
            "gateway-api/examples/standard/traffic-splitting/{file}"
        ));
        let text = std::fs::read_to_string(&path).unwrap();
        // As they are: attached to nothing, noted, the snapshot untouched.
        let base = gamma_cluster("foo.yaml");
        let mut as_is = base.clone();
        add(&mut as_is, &text, file, "default");
        let compiled = compile_node(&as_is);
        assert_eq!(
            compiled.snapshot(NODE).unwrap().encode().unwrap(),
            compile_node(&base)
                .snapshot(NODE)
                .unwrap()
                .encode()
                .unwrap(),
            "{file}"
        );
        let mut attached = base.clone();
        add(
            &mut attached,
            &attach_to_service(&text, "foo"),
            file,
            "default",
        );
        let compiled = compile_node(&attached);
        check_golden(case, &summary(&compiled.snapshot(NODE).unwrap(), &compiled));
    }
}

/// The route of Service foo's port 8080: (weight, backend set name) per destination.
fn foo_route(compiled: &Compiled) -> Vec<(u32, String)> {
    let s = &compiled.snapshot(NODE).unwrap();
    let service = s
        .services
        .iter()
        .find(|r| compiled.names.services[&r.value.service_id] == "foo.default.svc.cluster.local")
        .expect("foo is a service");
    let route = s
        .routes
        .iter()
        .find(|r| r.route_id == service.value.route_id)
        .unwrap();
    let mut previous = 0;
    (0..route.value.destination_count as usize)
        .map(|i| {
            let weight = route.value.cumulative_weight[i] - previous;
            previous = route.value.cumulative_weight[i];
            (
                weight,
                compiled.names.backend_sets[&route.value.backend_set[i]].clone(),
            )
        })
        .collect()
}

/// Endpoints of the backend set named `name`.
fn set_endpoints(compiled: &Compiled, name: &str) -> usize {
    let s = &compiled.snapshot(NODE).unwrap();
    let set = s
        .backend_sets
        .iter()
        .find(|b| compiled.names.backend_sets[&b.set_id] == name)
        .unwrap_or_else(|| panic!("no backend set {name}"));
    assert_eq!(
        set.value.endpoint_count as usize,
        s.endpoints
            .iter()
            .filter(|e| e.key.set_id == set.set_id)
            .count()
    );
    set.value.endpoint_count as usize
}

fn foo_route_with(backend_refs: &str) -> Compiled {
    let mut inputs = gamma_cluster("foo.yaml");
    let route = format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: foo}}
spec:
  parentRefs: [{{group: "", kind: Service, name: foo}}]
  rules:
  - backendRefs: {backend_refs}
"#
    );
    add(&mut inputs, &route, "route.yaml", "default");
    compile_node(&inputs)
}

const V1: &str = "foo-v1.default.svc.cluster.local:8080 (v4)";
const V2: &str = "foo-v2.default.svc.cluster.local:8080 (v4)";

#[test]
fn an_omitted_weight_is_one() {
    let compiled =
        foo_route_with("[{name: foo-v1, port: 8080}, {name: foo-v2, port: 8080, weight: 3}]");
    assert_eq!(
        foo_route(&compiled),
        vec![(1, V1.to_string()), (3, V2.to_string())]
    );
    assert!(
        compiled.diagnostics.is_empty(),
        "{:?}",
        diagnostics_text(&compiled)
    );
    // A single backend without weight gets everything too.
    let compiled = foo_route_with("[{name: foo-v2, port: 8080}]");
    assert_eq!(foo_route(&compiled), vec![(1, V2.to_string())]);
}

#[test]
fn weight_zero_gets_no_connection() {
    let compiled = foo_route_with(
        "[{name: foo-v1, port: 8080, weight: 0}, {name: foo-v2, port: 8080, weight: 5}]",
    );
    assert_eq!(foo_route(&compiled), vec![(5, V2.to_string())]);
    assert!(
        compiled.diagnostics.is_empty(),
        "{:?}",
        diagnostics_text(&compiled)
    );
}

#[test]
fn all_zero_weights_are_rejected_and_refuse_connections() {
    let compiled = foo_route_with(
        "[{name: foo-v1, port: 8080, weight: 0}, {name: foo-v2, port: 8080, weight: 0}]",
    );
    let rejected: Vec<String> = compiled
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Rejected)
        .map(|d| d.to_string())
        .collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0].contains("HTTPRoute default/foo spec.rules[0].backendRefs")
            && rejected[0].contains("weight 0"),
        "{rejected:?}"
    );
    // As Gateway API requires (Istio answers HTTP 500): nothing gets through.
    let refused = "foo.default.svc.cluster.local:8080 no backends (v4)";
    assert_eq!(foo_route(&compiled), vec![(1, refused.to_string())]);
    assert_eq!(set_endpoints(&compiled, refused), 0);
    compiled
        .snapshot(NODE)
        .unwrap()
        .encode()
        .expect("the snapshot is valid");
}

#[test]
fn an_invalid_backend_keeps_its_share_with_no_endpoints() {
    let compiled = foo_route_with(
        "[{name: foo-v1, port: 8080, weight: 3}, {name: nothing, port: 8080, weight: 1}]",
    );
    let unresolved = "nothing.default.svc.cluster.local:8080 unresolved (v4)";
    assert_eq!(
        foo_route(&compiled),
        vec![(3, V1.to_string()), (1, unresolved.to_string())]
    );
    assert_eq!(set_endpoints(&compiled, unresolved), 0);
    assert_eq!(set_endpoints(&compiled, V1), 1);
    let d = &compiled.diagnostics;
    assert!(
        d.len() == 1
            && d[0].severity == Severity::Note
            && d[0].field == "spec.rules[0].backendRefs[1]"
            && d[0].reason.contains("HTTP 500"),
        "{d:?}"
    );
}

#[test]
fn a_backend_without_port_rejects_the_rule() {
    let compiled = foo_route_with("[{name: foo-v1, port: 8080}, {name: foo-v2}]");
    assert_eq!(
        foo_route(&compiled),
        vec![(1, "foo.default.svc.cluster.local:8080 (v4)".to_string())],
        "default routing"
    );
    assert!(
        compiled
            .diagnostics
            .iter()
            .any(|d| d.severity == Severity::Rejected
                && d.field == "spec.rules[0].backendRefs[1].port"),
        "{:?}",
        diagnostics_text(&compiled)
    );
}

#[test]
fn cross_namespace_backends_need_a_reference_grant() {
    let mut inputs = gamma_cluster("foo.yaml");
    let other = r#"
apiVersion: v1
kind: Service
metadata: {name: bar, namespace: other}
spec:
  clusterIP: 10.96.83.10
  ports: [{port: 8080, name: http}]
  selector: {app: bar}
---
apiVersion: v1
kind: Pod
metadata: {name: bar, namespace: other, labels: {app: bar}}
spec: {nodeName: node-1, containers: [{name: bar, image: bar}]}
status:
  podIP: 10.244.83.10
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: foo, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: foo}]
  rules:
  - backendRefs:
    - {name: foo-v1, port: 8080}
    - {name: bar, namespace: other, port: 8080}
"#;
    add(&mut inputs, other, "other.yaml", "default");
    let compiled = compile_node(&inputs);
    let unresolved = "bar.other.svc.cluster.local:8080 unresolved (v4)";
    assert_eq!(
        foo_route(&compiled),
        vec![(1, V1.to_string()), (1, unresolved.to_string())]
    );
    assert!(
        compiled
            .diagnostics
            .iter()
            .any(|d| d.severity == Severity::Rejected
                && d.field == "spec.rules[0].backendRefs[1].namespace"
                && d.reason.contains("ReferenceGrant")),
        "{:?}",
        diagnostics_text(&compiled)
    );

    let grant = r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-default, namespace: other}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}]
  to: [{group: "", kind: Service, name: bar}]
"#;
    add(&mut inputs, grant, "grant.yaml", "default");
    let compiled = compile_node(&inputs);
    let bar = "bar.other.svc.cluster.local:8080 (v4)";
    assert_eq!(
        foo_route(&compiled),
        vec![(1, V1.to_string()), (1, bar.to_string())]
    );
    assert_eq!(set_endpoints(&compiled, bar), 1);
    assert!(
        compiled.diagnostics.is_empty(),
        "{:?}",
        diagnostics_text(&compiled)
    );
}

#[test]
fn an_http_route_beats_a_virtual_service_for_the_same_host() {
    let mut inputs = gamma_cluster("foo.yaml");
    let objects = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: foo}
spec:
  hosts: [foo]
  http:
  - route:
    - destination: {host: foo-v2}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: foo-split}
spec:
  parentRefs: [{group: "", kind: Service, name: foo}]
  rules:
  - backendRefs:
    - {name: foo-v1, port: 8080, weight: 90}
    - {name: foo-v2, port: 8080, weight: 10}
"#;
    add(&mut inputs, objects, "objects.yaml", "default");
    let compiled = compile_node(&inputs);
    assert_eq!(
        foo_route(&compiled),
        vec![(90, V1.to_string()), (10, V2.to_string())]
    );
    let d = &compiled.diagnostics;
    assert!(
        d.len() == 1
            && d[0].severity == Severity::Note
            && d[0].object.to_string() == "VirtualService default/foo"
            && d[0].reason.contains("HTTPRoute default/foo-split"),
        "{d:?}"
    );
}

#[test]
fn the_oldest_http_route_with_a_catch_all_wins() {
    let mut inputs = gamma_cluster("foo.yaml");
    // `a-newer` sorts first by name but is younger: age decides before name.
    let routes = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a-newer, creationTimestamp: "2026-02-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: foo, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: foo-v2, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: z-older, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: foo}]
  rules:
  - matches: [{path: {type: Exact, value: /v2}}]
    backendRefs: [{name: foo-v2, port: 8080}]
  - backendRefs: [{name: foo-v1, port: 8080}]
"#;
    add(&mut inputs, routes, "routes.yaml", "default");
    let compiled = compile_node(&inputs);
    assert_eq!(foo_route(&compiled), vec![(1, V1.to_string())]);
    let d = diagnostics_text(&compiled);
    assert!(
        d.iter().any(
            |d| d.starts_with("note: HTTPRoute default/a-newer spec.rules[0]:")
                && d.contains("HTTPRoute default/z-older spec.rules[1] takes precedence")
        ),
        "{d:?}"
    );
    assert!(
        d.iter().any(|d| d.starts_with(
            "not enforced: HTTPRoute default/z-older spec.rules[0].matches: request matching needs L7; not enforced in KernelNative"
        )),
        "{d:?}"
    );
}

#[test]
fn tcp_routes_of_both_versions_are_compiled() {
    let mut inputs = gamma_cluster("foo.yaml");
    let routes = r#"
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: a}
spec:
  parentRefs: [{group: "", kind: Service, name: foo}]
  rules:
  - backendRefs: [{name: foo-v1, port: 8080, weight: 1}, {name: foo-v2, port: 8080, weight: 4}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: TCPRoute
metadata: {name: b}
spec:
  parentRefs: [{group: "", kind: Service, name: foo}]
  rules:
  - backendRefs: [{name: foo-v2, port: 8080}]
"#;
    add(&mut inputs, routes, "routes.yaml", "default");
    // foo's port is named http: TCPRoutes do not apply to it.
    let compiled = compile_node(&inputs);
    assert_eq!(
        foo_route(&compiled),
        vec![(1, "foo.default.svc.cluster.local:8080 (v4)".to_string())]
    );
    assert_eq!(
        compiled.diagnostics.len(),
        2,
        "{:?}",
        diagnostics_text(&compiled)
    );
    // Undeclared: they do, the older (then by name) wins.
    for svc in inputs.services.iter_mut() {
        for port in svc.spec.as_mut().unwrap().ports.iter_mut().flatten() {
            port.name = None;
        }
    }
    let compiled = compile_node(&inputs);
    assert_eq!(
        foo_route(&compiled),
        vec![(1, V1.to_string()), (4, V2.to_string())]
    );
    let d = diagnostics_text(&compiled);
    assert!(
        d.len() == 1 && d[0].starts_with("note: TCPRoute default/b spec.parentRefs:"),
        "{d:?}"
    );
}

fn with_mode(mode: &str) -> Compiled {
    let mut inputs = gamma_cluster("foo.yaml");
    let objects = format!(
        r#"
apiVersion: kmesh.net/v1alpha1
kind: KmeshConfig
metadata: {{name: default}}
spec: {{mode: {mode}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: foo}}
spec:
  parentRefs: [{{group: "", kind: Service, name: foo}}]
  rules:
  - matches: [{{headers: [{{name: x-canary, value: "true"}}]}}]
    backendRefs: [{{name: foo-v2, port: 8080}}]
  - filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{add: [{{name: a, value: b}}]}}}}]
    backendRefs: [{{name: foo-v1, port: 8080}}]
"#
    );
    add(&mut inputs, &objects, "objects.yaml", "default");
    compile_node(&inputs)
}

#[test]
fn unenforced_l7_wording_follows_the_mode() {
    let unenforced = |c: &Compiled| -> Vec<String> {
        c.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Unenforced)
            .map(|d| d.to_string())
            .collect()
    };
    let kernel = with_mode("KernelNative");
    assert_eq!(
        unenforced(&kernel),
        [
            "not enforced: HTTPRoute default/foo spec.rules[0].matches: request matching needs L7; not enforced in KernelNative; connections to foo.default.svc.cluster.local:8080 follow HTTPRoute default/foo spec.rules[1]",
            "not enforced: HTTPRoute default/foo spec.rules[1].filters[0]: filter RequestHeaderModifier needs L7 (an HTTP proxy); not enforced in KernelNative",
        ]
    );
    let dual = with_mode("DualEngine");
    assert_eq!(
        unenforced(&dual),
        [
            "not enforced: HTTPRoute default/foo spec.rules[0].matches: request matching needs L7; enforced only by a waypoint, and the service is bound to none (label istio.io/use-waypoint); connections to foo.default.svc.cluster.local:8080 follow HTTPRoute default/foo spec.rules[1]",
            "not enforced: HTTPRoute default/foo spec.rules[1].filters[0]: filter RequestHeaderModifier needs L7 (an HTTP proxy); enforced only by a waypoint, and the service is bound to none (label istio.io/use-waypoint)",
        ]
    );
    assert_eq!(foo_route(&dual), vec![(1, V1.to_string())]);
    let disabled = with_mode("Disabled");
    assert_eq!(
        unenforced(&disabled),
        [
            "not enforced: HTTPRoute default/foo spec.rules[0].matches: request matching needs L7; the mesh is disabled (mode Disabled): nothing is enforced",
            "not enforced: HTTPRoute default/foo spec.rules[1].filters[0]: filter RequestHeaderModifier needs L7 (an HTTP proxy); the mesh is disabled (mode Disabled): nothing is enforced",
        ]
    );
    assert!(
        disabled
            .diagnostics
            .iter()
            .any(|d| d.severity == Severity::Note && d.object.kind == Kind::KmeshConfig),
        "{:?}",
        diagnostics_text(&disabled)
    );

    // VirtualService features use the same wording.
    let mut inputs = bookinfo_with(&[
        "destination-rule-all.yaml",
        "virtual-service-ratings-test-delay.yaml",
    ]);
    add(
        &mut inputs,
        "apiVersion: kmesh.net/v1alpha1\nkind: KmeshConfig\nmetadata: {name: default}\nspec: {mode: DualEngine}\n",
        "config.yaml",
        "default",
    );
    let compiled = compile_node(&inputs);
    assert!(
        compiled
            .diagnostics
            .iter()
            .all(|d| d.severity != Severity::Unenforced
                || d.reason.contains("enforced only by a waypoint")),
        "{:?}",
        diagnostics_text(&compiled)
    );
}

#[test]
fn kmeshconfig_capacity_is_reported() {
    let mut inputs = bookinfo_with(&["destination-rule-all.yaml"]);
    let config = r#"
apiVersion: kmesh.net/v1alpha1
kind: KmeshConfig
metadata: {name: default}
spec:
  mode: KernelNative
  rollout: {strategy: Rolling, maxUnavailable: 1}
  accessLog: true
  capacity: {maxServices: 2}
"#;
    assert!(inputs.add_yaml(config, "config.yaml", "default").is_empty());
    let compiled = compile_node(&inputs);
    assert!(
        !compiled.nodes.contains_key(NODE),
        "an over-capacity snapshot must not be produced"
    );
    let text: Vec<String> = compiled.diagnostics.iter().map(|d| d.to_string()).collect();
    let has = |needle: &str| text.iter().any(|d| d.contains(needle));
    assert!(
        has("spec.capacity: node node-1's snapshot holds 4 services, capacity is 2"),
        "{text:#?}"
    );
    assert!(
        !has("spec.accessLog"),
        "the access log is enforced: {text:#?}"
    );
}

#[test]
fn kmeshconfig_access_log_and_log_level_reach_every_node_config_and_are_enforced() {
    let with_config = |spec: &str| {
        let mut inputs = bookinfo_with(&["destination-rule-all.yaml"]);
        let config = format!(
            "apiVersion: kmesh.net/v1alpha1\nkind: KmeshConfig\nmetadata: {{name: default}}\nspec: {spec}\n"
        );
        assert!(
            inputs
                .add_yaml(&config, "config.yaml", "default")
                .is_empty()
        );
        compile_node(&inputs)
    };
    let config_of = |compiled: &Compiled| {
        let text: Vec<String> = compiled.diagnostics.iter().map(|d| d.to_string()).collect();
        assert!(
            !text
                .iter()
                .any(|d| d.contains("spec.accessLog") || d.contains("spec.logLevel")),
            "{text:#?}"
        );
        compiled.snapshot(NODE).unwrap().config
    };
    let on = config_of(&with_config("{accessLog: true, logLevel: debug}"));
    assert_eq!(
        (on.access_log, on.log_level),
        (access_log::ON, log_level::DEBUG)
    );
    let off = config_of(&with_config("{accessLog: false, logLevel: error}"));
    assert_eq!(
        (off.access_log, off.log_level),
        (access_log::OFF, log_level::ERROR)
    );
    // Without a KmeshConfig: its defaults.
    let none = compile_node(&bookinfo_with(&["destination-rule-all.yaml"]));
    let none = none.snapshot(NODE).unwrap().config;
    assert_eq!(
        (none.access_log, none.log_level),
        (access_log::OFF, log_level::INFO)
    );
}

#[test]
fn a_client_namespace_destination_rule_is_reported_not_dropped() {
    let mut inputs = bookinfo_with(&["destination-rule-all.yaml"]);
    let dr = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-for-team-a, namespace: team-a}
spec:
  host: reviews.default.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
"#;
    assert!(inputs.add_yaml(dr, "dr.yaml", "default").is_empty());
    let compiled = compile_node(&inputs);
    assert!(
        compiled
            .diagnostics
            .iter()
            .any(|d| d.severity == Severity::Unenforced
                && d.object.name == "reviews-for-team-a"
                && d.reason.contains("only to clients in namespace team-a")),
        "{:#?}",
        compiled.diagnostics
    );
}

#[test]
fn compile_json_shows_the_names_of_pods_and_services() {
    let compiled = compile_node(&bookinfo_with(&[]));
    let json = kmesh_operator::render::json(&compiled.snapshot(NODE).unwrap(), &compiled);
    let names = &json["names"];
    let productpage = names["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["workload"] == "productpage-v1")
        .unwrap_or_else(|| panic!("{names:#}"));
    assert_eq!(productpage["namespace"], "default");
    assert_eq!(productpage["serviceAccount"], "bookinfo-productpage");
    assert_eq!(
        (&productpage["app"], &productpage["version"]),
        (&"productpage".into(), &"v1".into())
    );
    let services = names["services"].as_array().unwrap();
    assert!(
        services
            .iter()
            .any(|s| s["host"] == "reviews.default.svc.cluster.local"
                && s["name"] == "reviews"
                && s["namespace"] == "default"),
        "{names:#}"
    );
    assert!(names["stringBytes"].as_u64().unwrap() > 0);
}
