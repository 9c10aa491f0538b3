//! The `KmeshConfig` CRD: the checked-in manifest matches the types (CI drift check), the CRD has
//! the shape the issue asks for, and sample objects deserialize as documented.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kmesh_operator::crd::{
    EnrollmentSpec, KmeshConfig, KmeshConfigSpec, LogLevel, Mode, REGENERATE_COMMAND,
    RolloutStrategy, SINGLETON_NAME, crd_yaml,
};
use kube::CustomResourceExt;

const CHECKED_IN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../crds/kmesh.net_kmeshconfigs.yaml"
);

#[test]
fn checked_in_crd_is_up_to_date() {
    let generated = crd_yaml();
    let checked_in = std::fs::read_to_string(CHECKED_IN).unwrap_or_else(|e| {
        panic!("cannot read {CHECKED_IN} ({e}); create it with `{REGENERATE_COMMAND}`")
    });
    if checked_in != generated {
        // Point at the first difference; the full diff is one `git diff` away after regenerating.
        let line = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| checked_in.lines().count().min(generated.lines().count()));
        panic!(
            "crds/kmesh.net_kmeshconfigs.yaml is out of date with operator/src/crd.rs (first \
             difference at line {}); regenerate it with `{REGENERATE_COMMAND}` and commit it",
            line + 1
        );
    }
}

#[test]
fn crd_names_scope_and_version() {
    let crd = KmeshConfig::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("kmeshconfigs.kmesh.net"));
    assert_eq!(crd.spec.group, "kmesh.net");
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(crd.spec.names.kind, "KmeshConfig");
    assert_eq!(crd.spec.names.plural, "kmeshconfigs");
    assert_eq!(crd.spec.names.short_names, Some(vec!["kmc".to_owned()]));

    let [version] = crd.spec.versions.as_slice() else {
        panic!("expected exactly one version");
    };
    assert_eq!(version.name, "v1alpha1");
    assert!(version.served && version.storage);
    let subresources = version.subresources.as_ref().expect("subresources");
    assert!(subresources.status.is_some(), "status subresource");
    assert!(subresources.scale.is_none());
}

#[test]
fn crd_has_singleton_rule() {
    let crd = KmeshConfig::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("openAPIV3Schema");
    let rules = schema
        .x_kubernetes_validations
        .as_ref()
        .expect("root x-kubernetes-validations");
    assert!(
        rules.iter().any(
            |r| r.rule == format!("self.metadata.name == '{SINGLETON_NAME}'")
                && r.message.as_deref() == Some("KmeshConfig is a singleton named default")
        ),
        "singleton rule missing: {rules:?}"
    );
}

#[test]
fn crd_printer_columns() {
    let crd = KmeshConfig::crd();
    let columns: Vec<(&str, &str, &str)> = crd.spec.versions[0]
        .additional_printer_columns
        .as_deref()
        .expect("printer columns")
        .iter()
        .map(|c| (c.name.as_str(), c.type_.as_str(), c.json_path.as_str()))
        .collect();
    assert_eq!(
        columns,
        [
            ("Mode", "string", ".spec.mode"),
            (
                "Ready",
                "string",
                r#".status.conditions[?(@.type=="Ready")].status"#
            ),
            ("Snapshot", "integer", ".status.snapshotGeneration"),
            ("Nodes Updated", "integer", ".status.rollout.nodesUpdated"),
            ("Age", "date", ".metadata.creationTimestamp"),
        ]
    );
}

/// Doc comments are the only documentation `kubectl explain` shows, so every property of the
/// spec and status schemas (including the embedded Kubernetes types) must have one.
#[test]
fn every_schema_property_is_described() {
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, prop) in props {
                let path = format!("{path}.{name}");
                if prop.get("description").is_none() {
                    missing.push(path.clone());
                }
                walk(&path, prop, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let crd = serde_json::to_value(KmeshConfig::crd()).unwrap();
    let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut missing = Vec::new();
    walk("", root, &mut missing);
    assert!(
        missing.is_empty(),
        "properties without a description: {missing:?}"
    );
}

/// Every `format` is one the API server knows: creating the CRD prints no `Warning: unrecognized
/// format "uint32"` (Kubernetes' supported formats, `apiextensions-apiserver`'s
/// `supportedFormats`). Unsigned integers keep their bounds as `minimum`/`maximum`.
#[test]
fn formats_are_ones_the_api_server_knows() {
    const KNOWN: [&str; 29] = [
        "bsonobjectid",
        "uri",
        "email",
        "hostname",
        "ipv4",
        "ipv6",
        "cidr",
        "mac",
        "uuid",
        "uuid3",
        "uuid4",
        "uuid5",
        "isbn",
        "isbn10",
        "isbn13",
        "creditcard",
        "ssn",
        "hexcolor",
        "rgbcolor",
        "byte",
        "password",
        "date",
        "duration",
        "datetime",
        "date-time",
        "int32",
        "int64",
        "float",
        "double",
    ];
    fn walk<'a>(
        path: String,
        schema: &'a serde_json::Value,
        found: &mut Vec<(String, &'a serde_json::Value)>,
    ) {
        match schema {
            serde_json::Value::Object(map) => {
                if map.contains_key("format") {
                    found.push((path.clone(), schema));
                }
                for (key, value) in map {
                    walk(format!("{path}.{key}"), value, found);
                }
            }
            serde_json::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(format!("{path}[{i}]"), item, found);
                }
            }
            _ => {}
        }
    }
    let crd = serde_json::to_value(KmeshConfig::crd()).unwrap();
    let mut found = Vec::new();
    walk(String::new(), &crd, &mut found);
    assert!(found.len() > 10, "{found:?}");
    for (path, schema) in &found {
        let format = schema["format"].as_str().unwrap_or_default();
        assert!(
            KNOWN.contains(&format),
            "{path}: format {format:?} is not one Kubernetes knows"
        );
    }
    let capacity = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["capacity"]["properties"];
    let max_services = &capacity["maxServices"];
    assert_eq!(max_services["format"], "int64");
    assert_eq!(
        max_services["minimum"].as_f64(),
        Some(1.0),
        "the range attribute is kept"
    );
    assert_eq!(
        max_services["maximum"].as_f64(),
        Some(f64::from(u32::MAX)),
        "a u32 stays a u32"
    );
    assert_eq!(capacity["maxSnapshotBytes"]["format"], "int64");
    assert_eq!(capacity["maxSnapshotBytes"]["minimum"].as_f64(), Some(1.0));
    let status = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
    assert_eq!(status["snapshotGeneration"]["minimum"].as_f64(), Some(0.0));
}

#[test]
fn minimal_spec_gets_defaults() {
    let kmc: KmeshConfig = serde_yaml::from_str(
        "apiVersion: kmesh.net/v1alpha1\n\
         kind: KmeshConfig\n\
         metadata:\n  name: default\n\
         spec:\n  mode: KernelNative\n",
    )
    .unwrap();
    assert_eq!(kmc.metadata.name.as_deref(), Some(SINGLETON_NAME));
    assert_eq!(kmc.spec, KmeshConfigSpec::default());
    assert_eq!(kmc.status, None);

    let spec = &kmc.spec;
    assert_eq!(spec.mode, Mode::KernelNative);
    assert_eq!(spec.enrollment.label, "istio.io/dataplane-mode");
    assert_eq!(spec.enrollment.value, "Kmesh");
    assert_eq!(spec.rollout.strategy, RolloutStrategy::AllAtOnce);
    assert_eq!(spec.rollout.max_unavailable, IntOrString::Int(1));
    assert_eq!(spec.rollout.canary, None);
    assert!(!spec.access_log);
    assert_eq!(spec.log_level, LogLevel::Info);
    assert_eq!(spec.capacity, None);

    // A partly given nested object keeps the defaults of the fields left out.
    let spec: KmeshConfigSpec =
        serde_yaml::from_str("enrollment:\n  label: example.com/mesh\n").unwrap();
    assert_eq!(spec.enrollment.label, "example.com/mesh");
    assert_eq!(spec.enrollment.value, "Kmesh");
}

#[test]
fn unknown_mode_is_rejected() {
    let err = serde_yaml::from_str::<KmeshConfigSpec>("mode: Ambient\n").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(
            "unknown variant `Ambient`, expected one of `KernelNative`, `DualEngine`, `Disabled`"
        ),
        "unexpected error: {msg}"
    );
    // Variants are case-sensitive, as the CRD's enum is.
    assert!(serde_yaml::from_str::<KmeshConfigSpec>("mode: kernelnative\n").is_err());
    assert!(serde_yaml::from_str::<KmeshConfigSpec>("logLevel: INFO\n").is_err());
}

#[test]
fn full_object_round_trips() {
    let yaml = r#"
apiVersion: kmesh.net/v1alpha1
kind: KmeshConfig
metadata:
  name: default
  generation: 3
spec:
  mode: DualEngine
  enrollment:
    label: example.com/mesh
    value: enabled
  rollout:
    strategy: Rolling
    maxUnavailable: 25%
    canary:
      nodeSelector:
        matchLabels:
          kmesh.net/canary: "true"
  accessLog: true
  logLevel: debug
  capacity:
    maxServices: 5000
    maxSnapshotBytes: 67108864
status:
  observedGeneration: 3
  snapshotGeneration: 42
  conditions:
  - type: Ready
    status: "False"
    reason: RollingOut
    message: 1 of 2 nodes run generation 42
    lastTransitionTime: "2025-01-01T00:00:00Z"
  rollout:
    nodesDesired: 2
    nodesUpdated: 1
    nodesReady: 1
    nodes:
    - name: node-a
      generation: 42
      ready: true
    - name: node-b
      generation: 41
      ready: true
  rejected:
  - kind: VirtualService
    namespace: shop
    name: reviews
    field: spec.http[0].match[0].uri.regex
    reason: regex URI matches are not supported
  unenforced:
  - kind: AuthorizationPolicy
    namespace: shop
    name: allow-get
    field: spec.rules[0].to[0].operation.methods
    reason: L7 rule; not enforced in KernelNative mode
"#;
    let kmc: KmeshConfig = serde_yaml::from_str(yaml).unwrap();
    assert_eq!(kmc.spec.mode.value(), kmesh_common::mode::DUAL_ENGINE);
    assert_eq!(
        kmc.spec.rollout.max_unavailable,
        IntOrString::String("25%".into())
    );
    assert_eq!(
        kmc.spec.capacity.as_ref().unwrap().limits().max_services,
        5000
    );
    let status = kmc.status.as_ref().unwrap();
    assert_eq!(status.rollout.nodes.len(), 2);
    assert_eq!(status.rejected[0].namespace.as_deref(), Some("shop"));

    let again: KmeshConfig = serde_yaml::from_str(&serde_yaml::to_string(&kmc).unwrap()).unwrap();
    assert_eq!(again, kmc);
}

#[test]
fn mode_values_match_the_node_programs() {
    use kmesh_common::mode;
    assert_eq!(Mode::KernelNative.value(), mode::KERNEL_NATIVE);
    assert_eq!(Mode::DualEngine.value(), mode::DUAL_ENGINE);
    assert_eq!(Mode::Disabled.value(), mode::DISABLED);
    assert_eq!(KmeshConfigSpec::default().mode.value(), mode::KERNEL_NATIVE);
}

#[test]
fn enrollment_matches_case_insensitively() {
    let enrollment = EnrollmentSpec::default();
    assert!(enrollment.matches("Kmesh"));
    assert!(enrollment.matches("kmesh"));
    assert!(enrollment.matches("KMESH"));
    assert!(!enrollment.matches("none"));
    assert!(!enrollment.matches("ambient"));
    assert!(!enrollment.matches(""));
}

#[test]
fn unset_capacity_keeps_snapshot_defaults() {
    let spec: KmeshConfigSpec = serde_yaml::from_str("capacity:\n  maxRoutes: 10\n").unwrap();
    let limits = spec.capacity.unwrap().limits();
    let defaults = kmesh_snapshot::Limits::default();
    assert_eq!(limits.max_routes, 10);
    assert_eq!(limits.max_services, defaults.max_services);
    assert_eq!(limits.max_bytes, defaults.max_bytes);
}
