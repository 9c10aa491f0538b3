//! What the compiler could not compile or cannot enforce, as data: the operator turns it into
//! status entries and Events, `kmeshctl` prints it.
use std::fmt;

use serde::Serialize;

use crate::kinds::Kind;

/// The object a diagnostic is about. Ordered by kind (that is, by kind name), namespace, name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: Kind, namespace: Option<&str>, name: &str) -> Self {
        ObjectRef {
            kind,
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
        }
    }

    /// A YAML document that could not be identified: named by file and position.
    pub fn document(origin: &str, index: usize) -> Self {
        ObjectRef {
            kind: Kind::Document,
            namespace: None,
            name: format!("{origin}#{index}"),
        }
    }

    /// The kind (from `apiVersion` and `kind`), namespace and name of a raw object, or its
    /// position when it has no kind or no name (or an empty one).
    pub fn from_value(value: &serde_json::Value, origin: &str, index: usize) -> Self {
        let api_version = text(value.get("apiVersion")).unwrap_or("");
        let kind = text(value.get("kind")).filter(|k| !k.is_empty());
        let meta = value.get("metadata");
        let name = text(meta.and_then(|m| m.get("name"))).filter(|n| !n.is_empty());
        let namespace = text(meta.and_then(|m| m.get("namespace")));
        match (kind, name) {
            (Some(kind), Some(name)) => {
                ObjectRef::new(Kind::of_api_version(api_version, kind), namespace, name)
            }
            _ => ObjectRef::document(origin, index),
        }
    }
}

/// A JSON string, if `value` is one.
fn text(value: Option<&serde_json::Value>) -> Option<&str> {
    value.and_then(|v| v.as_str())
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// How serious a diagnostic is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Severity {
    /// The object (or the part named by `field`) was left out of the snapshot.
    Rejected,
    /// The object compiled, but a feature it uses is not enforced in this mode.
    Unenforced,
    /// Worth knowing; nothing was lost (an approximation, a conflict resolved by rule).
    Note,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub object: ObjectRef,
    /// The field path inside the object (`spec.http[0].retries`), empty for the whole object.
    pub field: String,
    pub reason: String,
}

impl Diagnostic {
    pub fn rejected(object: ObjectRef, field: &str, reason: impl Into<String>) -> Self {
        Self::new(Severity::Rejected, object, field, reason)
    }
    pub fn unenforced(object: ObjectRef, field: &str, reason: impl Into<String>) -> Self {
        Self::new(Severity::Unenforced, object, field, reason)
    }
    pub fn note(object: ObjectRef, field: &str, reason: impl Into<String>) -> Self {
        Self::new(Severity::Note, object, field, reason)
    }
    fn new(severity: Severity, object: ObjectRef, field: &str, reason: impl Into<String>) -> Self {
        Diagnostic {
            severity,
            object,
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Rejected => "rejected",
            Severity::Unenforced => "not enforced",
            Severity::Note => "note",
        };
        if self.field.is_empty() {
            write!(f, "{severity}: {}: {}", self.object, self.reason)
        } else {
            write!(
                f,
                "{severity}: {} {}: {}",
                self.object, self.field, self.reason
            )
        }
    }
}
