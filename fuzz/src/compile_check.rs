//! The oracle of the `operator_compile` fuzz target: what must hold for any text given to the
//! operator as YAML or JSON documents. Shared, as the one definition, by the fuzz target and by
//! `operator/tests/fuzz_regressions.rs` (which includes this file with `#[path]`), so it uses only
//! `kmesh_operator`, `kmesh_snapshot`, `serde_json` and `std`.
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

use kmesh_operator::compile::{CompileOptions, Compiled, compile};
use kmesh_operator::diagnostics::Diagnostic;
use kmesh_operator::inputs::Inputs;
use kmesh_operator::render;
use kmesh_snapshot::{Limits, Snapshot};

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

/// Reads each document on its own into an [`Inputs`], named `doc-{its position in the text}`, as
/// the operator reads it; returns them with the diagnostics of reading, sorted. Reading does not
/// depend on order (`Inputs::extend` is the operator's own rule for combining what was read), so
/// each document is parsed once and [`merge`]d in either order: parsing is most of the cost of a
/// run.
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

/// The inputs of the documents taken in the order given, as the operator holds them after reading
/// the documents in that order.
pub fn merge<'a>(docs: impl Iterator<Item = &'a Inputs>) -> Inputs {
    let mut all = Inputs::default();
    for doc in docs {
        all.extend(doc.clone());
    }
    all
}

/// Every property of the module documentation, for one input (not UTF-8 is read lossily).
pub fn check_text(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let docs = documents(&text);
    let (per_document, read_diagnostics) = read(&docs);
    let forward = merge(per_document.iter());
    let backward = merge(per_document.iter().rev());

    let nodes: Vec<String> = NODES.iter().map(|n| n.to_string()).collect();
    let options = CompileOptions::default();
    let first = compile(&forward, &nodes, 1, &options);
    let again = compile(&forward, &nodes, 1, &options);
    let reversed = compile(&backward, &nodes, 1, &options);
    let first_bytes = check_snapshots(&first);
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
    for snapshot in first.snapshots().values() {
        let _ = render::summary(snapshot, &first);
        let _ = render::json(snapshot, &first);
    }
}

/// Encodes every snapshot of `compiled` (the compiler must only produce valid ones) and checks it
/// decodes to itself, and that its parts encoded apart, as the operator serves them, are the same
/// bytes; returns the bytes by node.
fn check_snapshots(compiled: &Compiled) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let cluster = compiled
        .cluster
        .encode()
        .unwrap_or_else(|e| panic!("the compiler produced invalid cluster tables: {e}"));
    for (node, snapshot) in compiled.snapshots() {
        let bytes = snapshot.encode().unwrap_or_else(|e| {
            panic!("the compiler produced an invalid snapshot for {node}: {e}")
        });
        let decoded = Snapshot::decode(&bytes, &Limits::UNLIMITED)
            .unwrap_or_else(|e| panic!("a compiled snapshot does not decode: {e}"));
        assert_eq!(decoded.snapshot, snapshot, "a compiled snapshot round trip");
        let mut joined = compiled.nodes[&node]
            .encode(compiled.generation, cluster.summary())
            .unwrap_or_else(|e| panic!("{node}'s own tables are invalid: {e}"));
        joined.extend_from_slice(cluster.bytes());
        assert!(joined == bytes, "the parts joined are not the snapshot");
        out.push((node, bytes));
    }
    out
}

/// `other` must equal `first` (whose snapshots encode to `first_bytes`) in every respect.
fn assert_same(first: &Compiled, first_bytes: &[(String, Vec<u8>)], other: &Compiled, what: &str) {
    assert_eq!(
        first.snapshots(),
        other.snapshots(),
        "{what} changed the snapshots"
    );
    let other_bytes: Vec<(String, Vec<u8>)> = other
        .snapshots()
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
