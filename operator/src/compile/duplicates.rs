//! Objects given more than once: two definitions of one kind, namespace and name. The API server
//! holds one object per name, but files can define one twice (`kmeshctl compile -f a -f b`,
//! `--source dir:` with a copied file), and whichever was read last would win, so the snapshot
//! would depend on the order the files are given in. The rule here does not depend on order:
//! - identical definitions (the same file given twice) are compiled once, with a note;
//! - differing definitions are all left out, with a rejection naming where each came from.
//!
//! Why none rather than one: `kubectl apply -f a -f b` makes the last one win, which is exactly
//! the order dependence to avoid, and no other rule (oldest, smallest) says which one the user
//! meant. A conflict that changes routing silently is worse than a rejected object the user sees
//! at once, in `kmeshctl`'s output or the KmeshConfig status, naming both files; this is what
//! kustomize does with a resource defined twice. The rest of the cluster compiles as usual.
//!
//! A security policy (AuthorizationPolicy, PeerAuthentication) left out would fail open: it is
//! replaced by a stand-in that cannot be read, so the workloads of its namespace fail closed.
//!
//! The `KmeshConfig` follows the same rule, applied as it is read (`Inputs::add_config`, since
//! the inputs hold one); here its conflict is reported.
use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{LookupSet, name_of, namespace_of};
use crate::{
    diagnostics::{Diagnostic, ObjectRef},
    inputs::{Inputs, config_ref},
    istio::SecurityObject,
    kinds::{Kind, Scope},
};

/// `inputs` with each object given more than once resolved by the rule of the module
/// documentation, and the diagnostics saying how. Borrowed, not copied, when there is none.
pub(super) fn distinct(inputs: &Inputs) -> (Cow<'_, Inputs>, Vec<Diagnostic>) {
    let mut diagnostics = config_conflict(inputs).into_iter().collect::<Vec<_>>();
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
        gateways,
        authorization_policies,
        peer_authentications,
        not_yet_supported: _, // only reported, once per definition: duplicates change nothing
        sources: _,
    } = inputs;
    let found = [
        groups(Kind::Namespace, namespaces, |o| &o.metadata),
        groups(Kind::Node, nodes, |o| &o.metadata),
        groups(Kind::Pod, pods, |o| &o.metadata),
        groups(Kind::Service, services, |o| &o.metadata),
        groups(Kind::EndpointSlice, endpoint_slices, |o| &o.metadata),
        groups(Kind::VirtualService, virtual_services, |o| &o.metadata),
        groups(Kind::DestinationRule, destination_rules, |o| &o.metadata),
        groups(Kind::ServiceEntry, service_entries, |o| &o.metadata),
        groups(Kind::HttpRoute, http_routes, |o| &o.metadata),
        groups(Kind::TcpRoute, tcp_routes, |o| &o.metadata),
        groups(Kind::ReferenceGrant, reference_grants, |o| &o.metadata),
        groups(Kind::Gateway, gateways, |o| &o.metadata),
        groups(Kind::AuthorizationPolicy, authorization_policies, |o| {
            &o.metadata
        }),
        groups(Kind::PeerAuthentication, peer_authentications, |o| {
            &o.metadata
        }),
    ];
    if found.iter().all(Vec::is_empty) {
        return (Cow::Borrowed(inputs), diagnostics);
    }
    for group in found.iter().flatten() {
        diagnostics.push(group.diagnostic(inputs));
    }
    let [ns, no, po, sv, es, vs, dr, se, hr, tr, rg, gw, ap, pa] = found;
    let mut out = inputs.clone();
    leave_out(&mut out.namespaces, &ns);
    leave_out(&mut out.nodes, &no);
    leave_out(&mut out.pods, &po);
    leave_out(&mut out.services, &sv);
    leave_out(&mut out.endpoint_slices, &es);
    leave_out(&mut out.virtual_services, &vs);
    leave_out(&mut out.destination_rules, &dr);
    leave_out(&mut out.service_entries, &se);
    leave_out(&mut out.http_routes, &hr);
    leave_out(&mut out.tcp_routes, &tr);
    leave_out(&mut out.reference_grants, &rg);
    leave_out(&mut out.gateways, &gw);
    leave_out(&mut out.authorization_policies, &ap);
    leave_out(&mut out.peer_authentications, &pa);
    // A security policy left out would fail open: in its place, one that fails closed.
    out.authorization_policies.extend(fail_closed(&ap));
    out.peer_authentications.extend(fail_closed(&pa));
    (Cow::Owned(out), diagnostics)
}

/// The definitions of one object, by position in its list.
struct Group {
    object: ObjectRef,
    /// Ascending, two or more.
    positions: Vec<usize>,
    identical: bool,
}

impl Group {
    /// The positions left out of the list: all but one of identical definitions, else all.
    fn left_out(&self) -> &[usize] {
        if self.identical {
            self.positions.get(1..).unwrap_or_default()
        } else {
            &self.positions
        }
    }

    fn diagnostic(&self, inputs: &Inputs) -> Diagnostic {
        let times = self.positions.len();
        let sources = sources(inputs, &self.object);
        if self.identical {
            Diagnostic::note(
                self.object.clone(),
                "",
                format!("defined {times} times identically{sources}; compiled once"),
            )
        } else {
            Diagnostic::rejected(
                self.object.clone(),
                "",
                format!(
                    "defined {times} times with different contents{sources}: none of them is \
                     compiled, since which one is meant cannot be told; keep one definition"
                ),
            )
        }
    }
}

/// How objects of one kind are told apart: namespace (`None` for a cluster-scoped kind) and name.
type Key<'a> = (Option<&'a str>, &'a str);

/// The objects of `kind` in `objects` defined more than once. One pass over a hash set of the
/// keys is all it costs when there is none (the usual case: the API server holds one object per
/// name); only then are the objects sorted by name, which costs several times more at 100,000
/// pods.
fn groups<T: PartialEq>(kind: Kind, objects: &[T], meta: impl Fn(&T) -> &ObjectMeta) -> Vec<Group> {
    let namespaced = kind.scope() == Scope::Namespaced;
    let mut keyed: Vec<(Key<'_>, usize, &T)> = objects
        .iter()
        .enumerate()
        .map(|(position, o)| {
            let m = meta(o);
            (
                (namespaced.then(|| namespace_of(m)), name_of(m)),
                position,
                o,
            )
        })
        .collect();
    let mut seen = LookupSet::with_capacity_and_hasher(keyed.len(), Default::default());
    if keyed.iter().all(|&(key, _, _)| seen.insert(key)) {
        return Vec::new();
    }
    keyed.sort_by_key(|&(key, position, _)| (key, position));
    let mut groups = Vec::new();
    for run in keyed.chunk_by(|a, b| a.0 == b.0) {
        let [((namespace, name), _, first), rest @ ..] = run else {
            continue;
        };
        if rest.is_empty() {
            continue;
        }
        groups.push(Group {
            object: ObjectRef::new(kind.clone(), *namespace, name),
            positions: run.iter().map(|&(_, position, _)| position).collect(),
            identical: rest.iter().all(|(_, _, o)| o == first),
        });
    }
    groups
}

/// For each security policy defined with different contents, a stand-in that cannot be read:
/// every mesh workload of its namespace (all, for the root namespace) denies until one
/// definition is kept.
fn fail_closed(groups: &[Group]) -> Vec<SecurityObject> {
    groups
        .iter()
        .filter(|g| !g.identical)
        .map(|g| {
            let namespace = g.object.namespace.as_deref().unwrap_or("default");
            let reason = format!(
                "defined {} times with different contents: which one is meant cannot be told",
                g.positions.len()
            );
            SecurityObject::unreadable(namespace, &g.object.name, reason)
        })
        .collect()
}

/// Removes from `objects` what `groups` leave out.
fn leave_out<T>(objects: &mut Vec<T>, groups: &[Group]) {
    let mut gone: Vec<usize> = groups.iter().flat_map(|g| g.left_out()).copied().collect();
    gone.sort_unstable();
    let mut position = 0;
    objects.retain(|_| {
        let keep = gone.binary_search(&position).is_err();
        position += 1;
        keep
    });
}

/// The `KmeshConfig` `default` read more than once: a note when the definitions agree (it is
/// used), a rejection when they differ (none is used).
fn config_conflict(inputs: &Inputs) -> Option<Diagnostic> {
    let object = config_ref();
    let times = inputs.sources.get(&object).map_or(0, Vec::len);
    if times < 2 {
        return None;
    }
    let sources = sources(inputs, &object);
    Some(match inputs.config {
        Some(_) => Diagnostic::note(
            object,
            "",
            format!("defined {times} times identically{sources}; used once"),
        ),
        None => Diagnostic::rejected(
            object,
            "",
            format!(
                "defined {times} times with different contents{sources}: none of them is used, \
                 since which one is meant cannot be told, so the default settings apply; keep one \
                 definition"
            ),
        ),
    })
}

/// ` (in a.yaml#0, b.yaml#2)`: where the definitions of `object` were read, sorted; empty when
/// they were not read from text.
fn sources(inputs: &Inputs, object: &ObjectRef) -> String {
    let mut sources: Vec<&str> = inputs
        .sources
        .get(object)
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if sources.is_empty() {
        return String::new();
    }
    sources.sort_unstable();
    format!(" (in {})", sources.join(", "))
}

#[cfg(test)]
mod tests {
    use super::super::{CompileOptions, Compiled, compile, testing::NODE};
    use crate::inputs::Inputs;

    /// Service `dup` in `default` with cluster IP `ip`, port 80.
    fn service(ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: dup, namespace: default}}\n\
             spec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
        )
    }

    /// Reads each of `files` (name, text) in the order given, then compiles for `NODE`.
    fn compile_files(files: &[(&str, &str)]) -> (Compiled, String) {
        let mut inputs = Inputs::default();
        for (name, text) in files {
            let read = inputs.add_yaml(text, name, "default");
            assert!(read.is_empty(), "{read:?}");
        }
        let compiled = compile(&inputs, &[NODE.to_string()], 1, &CompileOptions::default());
        let summary = super::super::testing::summary(&compiled);
        (compiled, summary)
    }

    fn diagnostics(compiled: &Compiled) -> Vec<String> {
        super::super::testing::diagnostics(compiled)
    }

    #[test]
    fn differing_definitions_are_all_left_out_in_either_order() {
        let (a, b) = (service("10.96.0.1"), service("10.96.0.2"));
        let other = "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: default}\n\
                     spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}\n";
        let b_and_other = format!("{other}---\n{b}");
        for files in [
            [("a.yaml", a.as_str()), ("b.yaml", b_and_other.as_str())],
            [("b.yaml", b_and_other.as_str()), ("a.yaml", a.as_str())],
        ] {
            let (compiled, summary) = compile_files(&files);
            assert_eq!(
                diagnostics(&compiled),
                [
                    "rejected: Service default/dup: defined 2 times with different contents \
                  (in a.yaml#0, b.yaml#1): none of them is compiled, since which one is meant \
                  cannot be told; keep one definition"
                ]
            );
            assert!(!summary.contains("10.96.0.1:80"), "{summary}");
            assert!(!summary.contains("10.96.0.2:80"), "{summary}");
            assert!(
                summary.contains("10.96.0.3:80  other.default.svc.cluster.local"),
                "the rest compiles: {summary}"
            );
        }
    }

    #[test]
    fn identical_definitions_compile_once_with_a_note() {
        let a = service("10.96.0.1");
        let (compiled, summary) = compile_files(&[("a.yaml", &a), ("copy/a.yaml", &a)]);
        assert_eq!(
            diagnostics(&compiled),
            [
                "note: Service default/dup: defined 2 times identically (in a.yaml#0, copy/a.yaml#0); \
              compiled once"
            ]
        );
        assert!(
            summary.contains("10.96.0.1:80  dup.default.svc.cluster.local"),
            "{summary}"
        );
        assert!(summary.contains("services (1 VIP:port)"), "{summary}");
    }

    /// A VirtualService `web` sending reviews to `subset`'s service `to`.
    fn route(to: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
             metadata: {{name: web, namespace: default}}\n\
             spec: {{hosts: [reviews], http: [{{route: [{{destination: {{host: {to}}}}}]}}]}}\n"
        )
    }

    #[test]
    fn differing_virtual_services_are_left_out_and_the_service_keeps_its_default_route() {
        let (to_reviews, to_other) = (route("reviews"), route("other"));
        let (compiled, _) = compile_files(&[
            ("cluster.yaml", super::super::testing::REVIEWS),
            ("a.yaml", &to_reviews),
            ("b.yaml", &to_other),
        ]);
        assert_eq!(
            diagnostics(&compiled),
            [
                "rejected: VirtualService default/web: defined 2 times with different contents \
              (in a.yaml#0, b.yaml#0): none of them is compiled, since which one is meant cannot \
              be told; keep one definition"
            ]
        );
    }

    fn config(mode: &str) -> String {
        format!(
            "apiVersion: kmesh.net/v1alpha1\nkind: KmeshConfig\nmetadata: {{name: default}}\n\
             spec: {{mode: {mode}}}\n"
        )
    }

    #[test]
    fn differing_kmesh_configs_default_leave_the_default_settings_in_either_order() {
        let (disabled, dual) = (config("Disabled"), config("DualEngine"));
        for files in [
            [("a.yaml", disabled.as_str()), ("b.yaml", dual.as_str())],
            [("b.yaml", dual.as_str()), ("a.yaml", disabled.as_str())],
        ] {
            let (compiled, summary) = compile_files(&files);
            assert_eq!(
                diagnostics(&compiled),
                [
                    "rejected: KmeshConfig default: defined 2 times with different contents \
                  (in a.yaml#0, b.yaml#0): none of them is used, since which one is meant \
                  cannot be told, so the default settings apply; keep one definition"
                ]
            );
            assert!(summary.contains("mode KernelNative"), "{summary}");
        }
    }

    #[test]
    fn identical_kmesh_configs_default_are_used_with_a_note() {
        let disabled = config("Disabled");
        let (compiled, summary) = compile_files(&[("a.yaml", &disabled), ("b.yaml", &disabled)]);
        let diagnostics = diagnostics(&compiled);
        assert!(
            diagnostics.contains(
                &"note: KmeshConfig default: defined 2 times identically (in a.yaml#0, \
                  b.yaml#0); used once"
                    .to_string()
            ),
            "{diagnostics:?}"
        );
        assert!(summary.contains("mode Disabled"), "{summary}");
    }
}
