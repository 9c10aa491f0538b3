//! The oracle of the `operator_compile` fuzz target: what must hold for any text given to the
//! operator as YAML or JSON documents. Shared, as the one definition, by the fuzz target and by
//! `operator/tests/fuzz_regressions.rs` (which includes this file with `#[path]`), so it uses only
//! `kmesh_operator`, `kmesh_snapshot`, `k8s_openapi`, `serde_json` and `std`.
//!
//! The text is cut into documents at `---` lines. Each document is read the way the operator reads
//! it: one that parses as a JSON object goes through `Inputs::add_json` (the API server's path), any
//! other through `Inputs::add_yaml` (`kmeshctl` and `--source dir:`). The documents are then
//! compiled, in the order given and in reverse order, for the nodes [`NODES`]:
//! - reading and compiling never panic;
//! - every snapshot the compiler produces is valid: it encodes, and decodes to itself;
//! - compiling is deterministic: the same inputs compiled twice give byte-identical snapshots, equal
//!   diagnostics and equal names;
//! - document order does not matter: the documents taken in reverse order give byte-identical
//!   snapshots, equal diagnostics and equal names;
//! - `kmeshctl`'s renderings (diagnostics, summary and JSON) do not panic.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kmesh_operator::compile::{CompileOptions, Compiled, compile};
use kmesh_operator::diagnostics::Diagnostic;
use kmesh_operator::inputs::Inputs;
use kmesh_operator::render;
use kmesh_snapshot::{EncodeError, Limits, Snapshot, ValidationError};

/// The nodes compiled for: the bookinfo fixtures place pods on `node-1`.
pub const NODES: [&str; 2] = ["node-1", "node-2"];

/// The documents of `text`: the pieces between lines that are exactly `---`.
pub fn documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end_matches(['\r', '\n']) == "---" {
            docs.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    docs.push(&text[start..]);
    docs
}

/// How the oracle treats the findings that are known and not fixed yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Known {
    /// Every property holds, for every input: what the regression tests of known findings use
    /// (they fail until the finding is fixed).
    Strict,
    /// The known findings are stepped around, so the fuzzer keeps looking for new ones: objects
    /// of one kind with the same namespace and name are all left out (the compiler keeps
    /// whichever comes last, fuzz/README.md finding 1), and so are the `KmeshConfig`s when more
    /// than one document gives one (the last read wins, finding 2); a compiled snapshot refused
    /// only for a port of 0 counts as valid (finding 3).
    Skipped,
}

/// Reads each document on its own into an [`Inputs`], named `doc-{its position in the text}`, as
/// the operator reads it; returns them with the diagnostics of reading, sorted. Reading a document
/// depends on no other (the operator only appends objects, and replaces the `KmeshConfig`), so
/// each is parsed once and [`merge`]d in either order: parsing is most of the cost of a run.
pub fn read(docs: &[&str]) -> (Vec<Inputs>, Vec<Diagnostic>) {
    let mut read = Vec::with_capacity(docs.len());
    let mut diagnostics = Vec::new();
    for (index, doc) in docs.iter().enumerate() {
        let origin = format!("doc-{index}");
        let mut inputs = Inputs::default();
        let json = doc
            .trim_start()
            .starts_with('{')
            .then(|| serde_json::from_str::<serde_json::Value>(doc).ok())
            .flatten();
        match json {
            Some(value) => diagnostics.extend(inputs.add_json(value, &origin)),
            None => diagnostics.extend(inputs.add_yaml(doc, &origin, "default")),
        }
        read.push(inputs);
    }
    diagnostics.sort();
    (read, diagnostics)
}

/// The inputs of the documents taken in the order given, as the operator would hold them after
/// reading the documents in that order: every object appended, the last `KmeshConfig` kept.
pub fn merge<'a>(docs: impl Iterator<Item = &'a Inputs>, known: Known) -> Inputs {
    let mut all = Inputs::default();
    let mut configs = Vec::new();
    for doc in docs {
        // Exhaustive: a new field of Inputs must be merged here.
        let Inputs {
            config,
            namespaces,
            nodes,
            pods,
            services,
            endpoint_slices,
            virtual_services,
            destination_rules,
            service_entries,
            http_routes,
            tcp_routes,
            reference_grants,
            not_yet_supported,
        } = doc.clone();
        configs.extend(config);
        all.namespaces.extend(namespaces);
        all.nodes.extend(nodes);
        all.pods.extend(pods);
        all.services.extend(services);
        all.endpoint_slices.extend(endpoint_slices);
        all.virtual_services.extend(virtual_services);
        all.destination_rules.extend(destination_rules);
        all.service_entries.extend(service_entries);
        all.http_routes.extend(http_routes);
        all.tcp_routes.extend(tcp_routes);
        all.reference_grants.extend(reference_grants);
        all.not_yet_supported.extend(not_yet_supported);
    }
    match known {
        Known::Strict => all.config = configs.pop(),
        Known::Skipped => {
            all.config = if configs.len() == 1 {
                configs.pop()
            } else {
                None
            };
            drop_same_names(&mut all);
        }
    }
    all
}

/// Leaves out every object whose kind, namespace and name another object of the input shares.
fn drop_same_names(inputs: &mut Inputs) {
    // Exhaustive: a new kind in Inputs must be considered here.
    let Inputs {
        config: _,
        namespaces,
        nodes,
        pods,
        services,
        endpoint_slices,
        virtual_services,
        destination_rules,
        service_entries,
        http_routes,
        tcp_routes,
        reference_grants,
        not_yet_supported: _,
    } = inputs;
    unique(namespaces, |o| &o.metadata);
    unique(nodes, |o| &o.metadata);
    unique(pods, |o| &o.metadata);
    unique(services, |o| &o.metadata);
    unique(endpoint_slices, |o| &o.metadata);
    unique(virtual_services, |o| &o.metadata);
    unique(destination_rules, |o| &o.metadata);
    unique(service_entries, |o| &o.metadata);
    unique(http_routes, |o| &o.metadata);
    unique(tcp_routes, |o| &o.metadata);
    unique(reference_grants, |o| &o.metadata);
}

/// Keeps the objects whose namespace and name no other object of `objects` has. Both as the
/// compiler reads them: a missing namespace is `default`, a missing name empty.
fn unique<T>(objects: &mut Vec<T>, meta: impl Fn(&T) -> &ObjectMeta) {
    let key = |o: &T| {
        let m = meta(o);
        (
            m.namespace.clone().unwrap_or_else(|| "default".to_string()),
            m.name.clone().unwrap_or_default(),
        )
    };
    let mut count = std::collections::BTreeMap::new();
    for o in objects.iter() {
        *count.entry(key(o)).or_insert(0) += 1;
    }
    objects.retain(|o| count[&key(o)] == 1);
}

/// Every property of the module documentation, for one input (not UTF-8 is read lossily).
pub fn check_text(data: &[u8], known: Known) {
    let text = String::from_utf8_lossy(data);
    let docs = documents(&text);
    let (per_document, read_diagnostics) = read(&docs);
    let forward = merge(per_document.iter(), known);
    let backward = merge(per_document.iter().rev(), known);

    let nodes: Vec<String> = NODES.iter().map(|n| n.to_string()).collect();
    let options = CompileOptions::default();
    let first = compile(&forward, &nodes, 1, &options);
    let again = compile(&forward, &nodes, 1, &options);
    let reversed = compile(&backward, &nodes, 1, &options);
    let first_bytes = check_snapshots(&first, known);
    assert_same(
        &first,
        &first_bytes,
        &again,
        "compiling the same inputs twice",
    );
    assert_same(
        &first,
        &first_bytes,
        &reversed,
        "compiling the documents in reverse order",
    );
    // What kmeshctl prints.
    for d in read_diagnostics.iter().chain(&first.diagnostics) {
        let _ = d.to_string();
    }
    for snapshot in first.snapshots.values() {
        let _ = render::summary(snapshot, &first);
        let _ = render::json(snapshot, &first);
    }
}

/// Encodes every snapshot of `compiled` (the compiler must only produce valid ones) and checks it
/// decodes to itself; returns the bytes by node (empty for a snapshot `known` lets pass unencoded).
fn check_snapshots(compiled: &Compiled, known: Known) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (node, snapshot) in &compiled.snapshots {
        let bytes = match snapshot.encode() {
            Ok(bytes) => bytes,
            Err(EncodeError::Invalid(ValidationError::ZeroPort { .. }))
                if known == Known::Skipped =>
            {
                out.push((node.clone(), Vec::new()));
                continue;
            }
            Err(e) => panic!("the compiler produced an invalid snapshot for {node}: {e}"),
        };
        let decoded = Snapshot::decode(&bytes, &Limits::UNLIMITED)
            .unwrap_or_else(|e| panic!("a compiled snapshot does not decode: {e}"));
        assert_eq!(
            &decoded.snapshot, snapshot,
            "a compiled snapshot round trip"
        );
        out.push((node.clone(), bytes));
    }
    out
}

/// `other` must equal `first` (whose snapshots encode to `first_bytes`) in every respect.
fn assert_same(first: &Compiled, first_bytes: &[(String, Vec<u8>)], other: &Compiled, what: &str) {
    assert_eq!(
        first.snapshots, other.snapshots,
        "{what} changed the snapshots"
    );
    let other_bytes: Vec<(String, Vec<u8>)> = other
        .snapshots
        .iter()
        .map(|(node, s)| (node.clone(), s.encode().unwrap_or_default()))
        .collect();
    assert!(
        first_bytes == other_bytes.as_slice(),
        "{what} changed the snapshots' bytes"
    );
    assert_eq!(
        first.diagnostics, other.diagnostics,
        "{what} changed the diagnostics"
    );
    assert_eq!(
        format!("{:?}", first.names),
        format!("{:?}", other.names),
        "{what} changed the names"
    );
}
