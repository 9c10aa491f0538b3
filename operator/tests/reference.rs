//! The compiler over Istio's validation fixtures (../shared/reference): every dataset object parses,
//! valid CRD cases compile without rejections, and each invalid case of a kind the compiler reads
//! is rejected for the reason the API server gives (the same field, the same rule), while nothing
//! panics on any of them.
use std::path::{Path, PathBuf};

use kmesh_operator::{
    compile::{CompileOptions, compile},
    diagnostics::{Diagnostic, Severity},
    inputs::Inputs,
};

fn reference(dir: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/reference/istio/pkg")
        .join(dir);
    assert!(
        path.is_dir(),
        "{} is missing (../shared next to the checkout)",
        path.display()
    );
    path
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Parses and compiles `text`; returns every diagnostic.
fn compile_text(text: &str, origin: &str) -> Vec<Diagnostic> {
    let mut inputs = Inputs::default();
    let mut diagnostics = inputs.add_yaml(text, origin, "default");
    diagnostics.extend(
        compile(
            &inputs,
            &["node-1".to_string()],
            1,
            &CompileOptions::default(),
        )
        .diagnostics,
    );
    diagnostics
}

/// Documents of a multi-document file (commented-out ones are left out by YAML itself).
fn documents(text: &str) -> Vec<String> {
    text.split("\n---")
        .map(str::to_string)
        .filter(|d| d.lines().any(|l| l.starts_with("kind:")))
        .collect()
}

#[test]
fn every_validation_dataset_object_parses() {
    for file in yaml_files(&reference("test/datasets/validation/dataset")) {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut inputs = Inputs::default();
        let parse = inputs.add_yaml(&text, &file.display().to_string(), "default");
        assert!(parse.is_empty(), "{}: {parse:?}", file.display());
        // Compiling must not panic, whatever the object refers to.
        compile(
            &inputs,
            &["node-1".to_string()],
            1,
            &CompileOptions::default(),
        );
    }
}

#[test]
fn valid_crd_cases_are_not_rejected() {
    for file in yaml_files(&reference("config/validation/testdata/crds")) {
        if !file.to_string_lossy().ends_with("-valid.yaml") {
            continue;
        }
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, doc) in documents(&text).iter().enumerate() {
            let rejected: Vec<Diagnostic> = compile_text(doc, &format!("{name}#{i}"))
                .into_iter()
                .filter(|d| {
                    d.severity == Severity::Rejected && !d.reason.contains("is not a known service")
                })
                .collect();
            if KNOWN_YAML_GAPS.contains(&(name.as_str(), i)) {
                // Still a clear error, not a panic or a silent drop.
                assert!(
                    rejected
                        .iter()
                        .any(|d| d.reason.starts_with("not valid YAML")),
                    "{name}#{i} is listed as a known YAML gap but did not fail as one: {rejected:#?}"
                );
                continue;
            }
            assert!(rejected.is_empty(), "{name}#{i}: {rejected:#?}");
        }
    }
}

/// Valid documents the YAML reader refuses: `[1.2.3.4, 001:db8::]` is a flow sequence whose
/// second item contains ':', which YAML 1.2 allows and libyaml (serde_yaml) does not. Objects from
/// the API server arrive as JSON and are unaffected; YAML files need the address quoted.
const KNOWN_YAML_GAPS: &[(&str, usize)] = &[("serviceentry-valid.yaml", 0)];

/// What the API server says about an invalid case (its `_err:` line): `[field path: ]rule`.
#[derive(Debug)]
struct ApiServerError {
    /// The field path, when the message starts with one.
    field: Option<String>,
    rule: Rule,
}

/// The rule an invalid case breaks, as the compiler's reason must state it.
#[derive(Debug)]
enum Rule {
    /// The API server's "Required value": the compiler says the field "is required", or (from
    /// its schema) "missing field".
    Required,
    /// Any other message ("Invalid value", "Duplicate value", Istio's own wording): the
    /// compiler's reason carries these words.
    Words(String),
}

impl ApiServerError {
    fn parse(message: &str) -> ApiServerError {
        let (field, rule) = match message.split_once(": ") {
            Some((field, rule)) if is_field_path(field) => (Some(field.to_string()), rule),
            _ => (None, message),
        };
        let rule = match rule {
            "Required value" => Rule::Required,
            words => Rule::Words(words.to_string()),
        };
        ApiServerError { field, rule }
    }
}

fn is_field_path(text: &str) -> bool {
    text.starts_with("spec")
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._[]".contains(c))
}

/// The field each invalid case is about, where the API server's message names none: read from
/// the case's YAML, so that a reason with the right words on the wrong field fails (two cases
/// share "port must be between 1-65535": `number` and `targetPort`).
const FIELDS_OF_MESSAGE_ONLY_CASES: &[(&str, &str)] = &[
    ("bad-selector-value", "spec.workloadSelector.labels"),
    ("selector-and-endpoints", "spec"),
    ("bad-host-wildcard", "spec.hosts[0]"),
    ("bad-cidr-resolution", "spec.addresses[0]"),
    ("duplicate-ports-name", "spec.ports[1].name"),
    ("duplicate-ports-number", "spec.ports[1].number"),
    ("bad-port", "spec.ports[0].number"),
    ("bad-port-target", "spec.ports[0].targetPort"),
    ("none-with-endpoints", "spec.endpoints"),
    ("dns-rr-with-multiple-endpoints", "spec.endpoints"),
];

/// Whether `d` rejects the field `field` for breaking `rule`. A document the compiler cannot read
/// into its schema is rejected as a whole (no field path); its reason names the field instead.
fn states(d: &Diagnostic, field: &str, rule: &Rule) -> bool {
    let last_segment = field.rsplit('.').next().unwrap_or(field);
    let names_field =
        d.field == field || (d.field.is_empty() && d.reason.contains(&format!("`{last_segment}`")));
    let states_rule = match rule {
        Rule::Required => {
            let reason = d.reason.to_lowercase();
            reason.contains("required") || reason.contains("missing field")
        }
        Rule::Words(words) => d.reason.contains(words.as_str()),
    };
    names_field && states_rule
}

fn metadata_name(doc: &str) -> String {
    let metadata = doc
        .split_once("\nmetadata:")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    metadata
        .lines()
        .find_map(|l| l.trim().strip_prefix("name:"))
        .map(|n| n.trim().to_string())
        .unwrap_or_default()
}

#[test]
fn invalid_cases_of_compiled_kinds_are_rejected_for_the_api_servers_reason() {
    let mut checked = 0;
    for file in yaml_files(&reference("config/validation/testdata/crds")) {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with("-invalid.yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let compiled_kind = name.starts_with("serviceentry") || name.starts_with("destinationrule");
        for (i, doc) in documents(&text).iter().enumerate() {
            let diagnostics = compile_text(doc, &format!("{name}#{i}"));
            if !compiled_kind {
                continue; // kinds the compiler does not read yet: it only must not panic
            }
            let message = doc
                .lines()
                .find_map(|l| l.strip_prefix("_err:"))
                .map(|e| e.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
                .unwrap_or_else(|| panic!("{name}#{i} has no _err: line"));
            let expected = ApiServerError::parse(&message);
            let object = metadata_name(doc);
            let field = expected
                .field
                .clone()
                .or_else(|| {
                    FIELDS_OF_MESSAGE_ONLY_CASES
                        .iter()
                        .find(|(case, _)| *case == object)
                        .map(|(_, field)| field.to_string())
                })
                .unwrap_or_else(|| {
                    panic!(
                        "{name}#{i} ({object}): the API server's {message:?} names no field; \
                         add the field it is about to FIELDS_OF_MESSAGE_ONLY_CASES"
                    )
                });
            let rejected: Vec<&Diagnostic> = diagnostics
                .iter()
                .filter(|d| d.severity == Severity::Rejected)
                .collect();
            println!(
                "{name}#{i}: the API server says {message:?}; the compiler: {:?}",
                rejected.iter().map(|d| d.to_string()).collect::<Vec<_>>()
            );
            assert!(
                rejected
                    .iter()
                    .any(|d| d.object.name == object && states(d, &field, &expected.rule)),
                "{name}#{i}: the API server rejects {object} with {message:?} (field {field}, rule \
                 {:?}); the compiler's rejections do not state that: {diagnostics:#?}",
                expected.rule
            );
            checked += 1;
        }
    }
    // Every uncommented invalid case of the two compiled kinds (3 DestinationRule, 12 ServiceEntry).
    assert_eq!(checked, 15, "invalid cases checked");
}
