//! The compiler over real Istio YAML (../shared/reference) and the bookinfo cluster fixture:
//! golden summaries, determinism, stable IDs, and bad objects.
//!
//! Regenerate the goldens after an intended change with
//! `KMESH_UPDATE_GOLDEN=1 cargo test -p kmesh-operator --test compile` and review the diff.
use std::path::{Path, PathBuf};

use kmesh_operator::{
    compile::{CompileOptions, Compiled, compile},
    diagnostics::Severity,
    inputs::Inputs,
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
        std::fs::write(&path, actual).unwrap();
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
        check_golden(case, &summary(&compiled.snapshots[NODE], &compiled));
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
    let bytes = |c: &Compiled| c.snapshots[NODE].encode().unwrap();
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
    let a = compile_node(&base).snapshots[NODE].clone();
    let b = compile_node(&more).snapshots[NODE].clone();
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
    let s = &compiled.snapshots[NODE];
    assert_eq!(s.services.len(), 4, "{s:?}");
    let text = summary(s, &compiled);
    assert!(
        text.contains("10.244.77.21:9080 10.244.77.22:9080 10.244.77.23:9080"),
        "{text}"
    );
    s.encode().expect("the snapshot is valid");
}
