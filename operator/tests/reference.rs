//! The compiler over Istio's validation fixtures (../shared/reference): every dataset object parses,
//! valid CRD cases compile without rejections, and each invalid case of a kind the compiler reads
//! is rejected (as the API server would reject it) while nothing panics on any of them.
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

#[test]
fn invalid_cases_of_compiled_kinds_are_rejected_and_none_panics() {
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
            let expected = doc
                .lines()
                .find_map(|l| l.strip_prefix("_err:"))
                .map(|e| e.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
                .unwrap_or_default();
            let rejected: Vec<&Diagnostic> = diagnostics
                .iter()
                .filter(|d| d.severity == Severity::Rejected)
                .collect();
            println!(
                "{name}#{i}: expected {expected:?}; got {:?}",
                rejected.iter().map(|d| d.to_string()).collect::<Vec<_>>()
            );
            assert!(
                !rejected.is_empty(),
                "{name}#{i} (the API server says {expected:?}) was not rejected: {diagnostics:#?}"
            );
        }
    }
}
