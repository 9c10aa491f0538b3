//! PeerAuthentication (semantics §8): the effective mTLS mode of each workload and port, and the
//! object that decided it. Decided here:
//! - precedence: workload (a selector, outside the root namespace) over namespace (no selector)
//!   over mesh (root namespace, no selector); on a tie the oldest wins;
//! - `portLevelMtls` needs a selector (the CRD refuses it otherwise); a port's UNSET inherits the
//!   workload's effective mode; top-level UNSET inherits the next level; nothing set is
//!   PERMISSIVE;
//! - DISABLE behaves as PERMISSIVE (ambient: HBONE is always mTLS);
//! - a selector policy in the root namespace is ignored (reported), as in Istio;
//! - an invalid policy is rejected, and the workloads it binds fail closed.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{
    Compiler, age_order,
    authz_convert::{Binding, from_spec, read_binding},
};
use crate::{
    diagnostics::ObjectRef,
    istio::{MutualTls, PeerAuthentication, PeerAuthenticationSpec},
    kinds::Kind,
    validate::Invalid,
};

/// A mode as set: DISABLE is read as PERMISSIVE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Unset,
    Permissive,
    Strict,
}

/// A valid PeerAuthentication's settings.
#[derive(Clone, Debug)]
struct Settings {
    mode: Mode,
    ports: BTreeMap<u16, Mode>,
}

/// A PeerAuthentication and what the node does with it.
#[derive(Clone, Debug)]
pub(super) struct PeerPolicy<'a> {
    pub object: ObjectRef,
    pub namespace: &'a str,
    pub binding: Binding,
    meta: &'a ObjectMeta,
    /// `None`: invalid (rejected); the workloads it binds fail closed.
    settings: Option<Settings>,
}

impl PeerPolicy<'_> {
    pub(super) fn is_valid(&self) -> bool {
        self.settings.is_some()
    }
}

/// Whether connections without identity are refused on a port, and which PeerAuthentication says
/// so.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Strictness {
    pub strict: bool,
    /// The deciding object; `None` when no PeerAuthentication applies.
    pub by: Option<ObjectRef>,
}

/// The effective mTLS of one workload: on ports named by its workload policy, and on the others.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct WorkloadMtls {
    pub other: Strictness,
    pub ports: BTreeMap<u16, Strictness>,
}

impl WorkloadMtls {
    pub(super) fn on(&self, port: Option<u16>) -> &Strictness {
        port.and_then(|p| self.ports.get(&p)).unwrap_or(&self.other)
    }

    pub(super) fn strict_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports.iter().filter(|(_, s)| s.strict).map(|(p, _)| *p)
    }
}

impl<'a> Compiler<'a> {
    /// Every PeerAuthentication, read and reported once for all nodes.
    pub(super) fn peer_authentications(&mut self) -> Vec<PeerPolicy<'a>> {
        let inputs: &'a crate::inputs::Inputs = self.inputs;
        inputs
            .peer_authentications
            .iter()
            .map(|p| self.read_peer_authentication(p))
            .collect()
    }

    fn read_peer_authentication(&mut self, p: &'a PeerAuthentication) -> PeerPolicy<'a> {
        let object = ObjectRef::new(Kind::PeerAuthentication, Some(p.namespace()), p.name());
        let root = p.namespace() == self.options.root_namespace;
        let (binding, settings) = match read(p) {
            Ok((binding, settings)) => (binding, Some(settings)),
            Err((binding, i)) => {
                let whom = match (&binding, root) {
                    (Binding::Selector(_), true) => None,
                    (_, true) => Some("all mesh workloads of all namespaces".to_string()),
                    (Binding::Selector(_), false) => Some(format!(
                        "the mesh workloads of namespace {} its selector matches",
                        p.namespace()
                    )),
                    (_, false) => {
                        Some(format!("all mesh workloads of namespace {}", p.namespace()))
                    }
                };
                let reason = match whom {
                    Some(w) => format!(
                        "{}; fails closed: {w} deny every inbound connection until it is fixed",
                        i.reason
                    ),
                    None => format!(
                        "{}; a selector policy in the root namespace is ignored anyway",
                        i.reason
                    ),
                };
                self.reject(&object, &i.field, reason);
                (binding, None)
            }
        };
        if root && matches!(binding, Binding::Selector(_)) && settings.is_some() {
            self.unenforced(
                &object,
                "spec.selector",
                "a PeerAuthentication with a selector in the root namespace is ignored (as in Istio)",
            );
        }
        PeerPolicy {
            object,
            namespace: p.namespace(),
            binding,
            meta: &p.metadata,
            settings,
        }
    }
}

/// The binding and settings of `p`; on error, the binding (as far as it can be read) and why.
fn read(p: &PeerAuthentication) -> Result<(Binding, Settings), (Binding, Invalid)> {
    if let Some(reason) = &p.unreadable {
        let i = Invalid {
            field: "metadata".to_string(),
            reason: reason.clone(),
        };
        return Err((Binding::Unreadable, i));
    }
    let (binding, _) = read_binding(&p.spec).map_err(|i| (Binding::Unreadable, i))?;
    let spec: PeerAuthenticationSpec = from_spec(&p.spec).map_err(|i| (binding.clone(), i))?;
    let settings = settings(&spec, &binding).map_err(|i| (binding.clone(), i))?;
    Ok((binding, settings))
}

fn settings(spec: &PeerAuthenticationSpec, binding: &Binding) -> Result<Settings, Invalid> {
    let top = mode("spec.mtls.mode", spec.mtls.as_ref())?;
    let mut ports = BTreeMap::new();
    if let Some(levels) = &spec.port_level_mtls {
        let selected = matches!(binding, Binding::Selector(labels) if !labels.is_empty());
        if !selected {
            return Err(Invalid {
                field: "spec.portLevelMtls".to_string(),
                reason: "portLevelMtls requires selector".to_string(),
            });
        }
        if levels.is_empty() {
            return Err(Invalid {
                field: "spec.portLevelMtls".to_string(),
                reason: "should have at least 1 properties".to_string(),
            });
        }
        for (port, mtls) in levels {
            let field = format!("spec.portLevelMtls[{port}]");
            let number = match port.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => {
                    return Err(Invalid {
                        field,
                        reason: format!("port {port:?} must be between 1-65535"),
                    });
                }
            };
            ports.insert(number, mode(&format!("{field}.mode"), Some(mtls))?);
        }
    }
    Ok(Settings { mode: top, ports })
}

fn mode(field: &str, mtls: Option<&MutualTls>) -> Result<Mode, Invalid> {
    match mtls.and_then(|m| m.mode.as_deref()) {
        None | Some("UNSET") => Ok(Mode::Unset),
        Some("PERMISSIVE" | "DISABLE") => Ok(Mode::Permissive),
        Some("STRICT") => Ok(Mode::Strict),
        Some(other) => Err(Invalid {
            field: field.to_string(),
            reason: format!("Unsupported value: {other:?} (UNSET, DISABLE, PERMISSIVE or STRICT)"),
        }),
    }
}

/// Whether `binding` of a policy in `namespace` selects a pod of `pod_namespace` with `labels`
/// (root-namespace widening is the caller's).
pub(super) fn selects(binding: &Binding, labels: &BTreeMap<String, String>) -> bool {
    match binding {
        Binding::Namespace | Binding::Unreadable => true,
        Binding::Selector(want) => want.iter().all(|(k, v)| labels.get(k) == Some(v)),
    }
}

/// The effective mTLS of a workload in `namespace` with `labels`, given every valid policy.
pub(super) fn workload_mtls(
    policies: &[PeerPolicy<'_>],
    root: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> WorkloadMtls {
    fn oldest<'p, 'a>(candidates: Vec<&'p PeerPolicy<'a>>) -> Option<&'p PeerPolicy<'a>> {
        candidates.into_iter().min_by_key(|p| age_order(p.meta))
    }
    let valid = policies.iter().filter(|p| p.settings.is_some());
    let workload = oldest(
        valid
            .clone()
            .filter(|p| p.namespace == namespace && p.namespace != root)
            .filter(|p| matches!(p.binding, Binding::Selector(_)) && selects(&p.binding, labels))
            .collect(),
    );
    let namespace_level = oldest(
        valid
            .clone()
            .filter(|p| p.namespace == namespace && p.binding == Binding::Namespace)
            .collect(),
    );
    let mesh = oldest(
        valid
            .filter(|p| p.namespace == root && p.binding == Binding::Namespace)
            .collect(),
    );
    let levels = [workload, namespace_level, mesh];
    let top = levels.iter().flatten().find_map(|p| {
        let s = p.settings.as_ref()?;
        (s.mode != Mode::Unset).then_some((s.mode, &p.object))
    });
    let other = match top {
        Some((mode, by)) => Strictness {
            strict: mode == Mode::Strict,
            by: Some(by.clone()),
        },
        None => Strictness::default(),
    };
    let mut ports = BTreeMap::new();
    if let Some(p) = workload
        && let Some(s) = &p.settings
    {
        for (port, mode) in &s.ports {
            let strictness = match mode {
                Mode::Unset => other.clone(),
                m => Strictness {
                    strict: *m == Mode::Strict,
                    by: Some(p.object.clone()),
                },
            };
            ports.insert(*port, strictness);
        }
    }
    WorkloadMtls { other, ports }
}
