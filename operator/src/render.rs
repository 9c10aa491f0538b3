//! Human and JSON renderings of a compiled snapshot, for `kmeshctl` and the golden tests.
use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use kmesh_snapshot::Snapshot;

use crate::compile::{Compiled, Names};

fn ip(bytes: &[u8; 16]) -> IpAddr {
    IpAddr::from(*bytes).to_canonical()
}

fn mode_name(mode: u32) -> &'static str {
    match mode {
        kmesh_common::mode::KERNEL_NATIVE => "KernelNative",
        kmesh_common::mode::DUAL_ENGINE => "DualEngine",
        _ => "Disabled",
    }
}

fn lb_name(lb: u32) -> &'static str {
    if lb == kmesh_common::lb_policy::SOURCE_IP_HASH {
        "source-ip hash"
    } else {
        "random"
    }
}

fn name(map: &BTreeMap<u32, String>, id: u32) -> String {
    map.get(&id).cloned().unwrap_or_else(|| format!("#{id}"))
}

/// Services, weights, endpoints and warnings in human terms.
pub fn summary(s: &Snapshot, compiled: &Compiled) -> String {
    let names: &Names = &compiled.names;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {}, generation {}, mode {}",
        s.node_name,
        s.generation,
        mode_name(s.config.mode)
    );
    let _ = writeln!(out, "services ({} VIP:port):", s.services.len());
    for svc in &s.services {
        let _ = writeln!(
            out,
            "  {}:{}  {}{}",
            ip(&svc.key.ip),
            svc.key.port,
            name(&names.services, svc.value.service_id),
            if svc.value.flags & kmesh_common::service_flags::WAYPOINT != 0 {
                "  (to its waypoint)"
            } else {
                ""
            }
        );
        let Some(route) = s.routes.iter().find(|r| r.route_id == svc.value.route_id) else {
            continue;
        };
        for (weight, set_id) in route.value.weights() {
            let share = 100.0 * f64::from(weight) / f64::from(route.value.total_weight);
            let set = s.backend_sets.iter().find(|b| b.set_id == set_id);
            let endpoints: Vec<String> = s
                .endpoints
                .iter()
                .filter(|e| e.key.set_id == set_id)
                .map(|e| format!("{}:{}", ip(&e.value.ip), e.value.port))
                .collect();
            let _ = writeln!(
                out,
                "    {share:5.1}%  {} [{}]  {}",
                name(&names.backend_sets, set_id),
                set.map(|b| lb_name(b.value.lb_policy)).unwrap_or("?"),
                if endpoints.is_empty() {
                    "no endpoints: connections refused".to_string()
                } else {
                    endpoints.join(" ")
                }
            );
        }
    }
    let _ = writeln!(
        out,
        "workloads enrolled on {} ({}):",
        s.node_name,
        s.workloads.len()
    );
    for w in &s.workloads {
        let _ = writeln!(
            out,
            "  {}  {}",
            ip(&w.ip),
            name(&names.identities, w.identity)
        );
    }
    authz_summary(&mut out, s, compiled);
    if !compiled.diagnostics.is_empty() {
        let _ = writeln!(out, "diagnostics ({}):", compiled.diagnostics.len());
        for d in &compiled.diagnostics {
            let _ = writeln!(out, "  {d}");
        }
    }
    out
}

/// Each workload's effective authorization: its policies (action, rules kept, what was dropped
/// and why) and its mTLS mode. Nothing when no workload of the node has an entry, so summaries
/// of policy-free clusters are unchanged.
fn authz_summary(out: &mut String, s: &Snapshot, compiled: &Compiled) {
    let Some(workloads) = compiled.authz.get(&s.node_name) else {
        return;
    };
    let classes: std::collections::BTreeSet<u32> = s
        .authz
        .sources
        .iter()
        .map(|r| r.value.source_class)
        .collect();
    let _ = writeln!(
        out,
        "authorization on {} ({} workloads, {} source classes + unknown, {} verdict entries):",
        s.node_name,
        workloads.len(),
        classes.len(),
        s.authz.verdicts.len()
    );
    for w in workloads {
        let _ = writeln!(out, "  {}  {}  verdict set {}", w.ip, w.pod, w.policy_set);
        for p in &w.policies {
            let _ = writeln!(
                out,
                "    {} {}, {} of {} rules",
                p.name, p.action, p.rules_kept, p.rules_total
            );
            let label = if p.action == crate::compile::EffectiveAction::Uncompilable {
                "rejected, fails closed"
            } else {
                "dropped"
            };
            for d in &p.dropped {
                let _ = writeln!(out, "      {label}: {d}");
            }
        }
        let mtls = match &w.mtls_other {
            Some((by, true)) => format!("STRICT ({by})"),
            Some((by, false)) => format!("PERMISSIVE ({by})"),
            None => "PERMISSIVE (no PeerAuthentication)".to_string(),
        };
        let ports: Vec<String> = w
            .mtls_ports
            .iter()
            .map(|(port, strict)| {
                format!(
                    "port {port} {}",
                    if *strict { "STRICT" } else { "PERMISSIVE" }
                )
            })
            .collect();
        if ports.is_empty() {
            let _ = writeln!(out, "    mTLS: {mtls}");
        } else {
            let _ = writeln!(out, "    mTLS: {mtls}; {}", ports.join(", "));
        }
    }
}

fn policy_name(record: &kmesh_common::authz::AuthzPolicyRecord) -> String {
    let len = usize::from(record.name_len).min(record.name.len());
    String::from_utf8_lossy(record.name.get(..len).unwrap_or_default()).into_owned()
}

/// The whole snapshot, with names beside the IDs.
pub fn json(s: &Snapshot, compiled: &Compiled) -> serde_json::Value {
    let names = &compiled.names;
    serde_json::json!({
        "nodeName": s.node_name,
        "generation": s.generation,
        "mode": mode_name(s.config.mode),
        "accessLog": s.config.access_log == kmesh_common::access_log::ON,
        "logLevel": kmesh_common::log_level::name(s.config.log_level),
        "contentHash": s.encode().ok().and_then(|b| kmesh_snapshot::peek_header(&b).ok()).map(|h| format!("{:016x}", h.content_hash)),
        "services": s.services.iter().map(|r| {
            let mut service = serde_json::json!({
                "vip": ip(&r.key.ip).to_string(), "port": r.key.port,
                "serviceId": r.value.service_id, "service": name(&names.services, r.value.service_id),
                "routeId": r.value.route_id,
            });
            // Only when set: the flag is rare, and its absence says the kernel path.
            if r.value.flags & kmesh_common::service_flags::WAYPOINT != 0 {
                service["waypoint"] = true.into();
            }
            service
        }).collect::<Vec<_>>(),
        "routes": s.routes.iter().map(|r| serde_json::json!({
            "routeId": r.route_id, "route": name(&names.routes, r.route_id),
            "totalWeight": r.value.total_weight,
            // Bounded by the arrays, whatever `destination_count` says.
            "destinations": r.value.cumulative_weight.iter().zip(&r.value.backend_set)
                .take(r.value.destination_count as usize)
                .map(|(cumulative, set)| serde_json::json!({
                    "cumulativeWeight": cumulative, "backendSetId": set,
                })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "backendSets": s.backend_sets.iter().map(|b| serde_json::json!({
            "setId": b.set_id, "backendSet": name(&names.backend_sets, b.set_id),
            "endpointCount": b.value.endpoint_count, "lbPolicy": lb_name(b.value.lb_policy),
        })).collect::<Vec<_>>(),
        "endpoints": s.endpoints.iter().map(|e| serde_json::json!({
            "setId": e.key.set_id, "index": e.key.index,
            "ip": ip(&e.value.ip).to_string(), "port": e.value.port,
            "identityId": e.value.identity, "identity": name(&names.identities, e.value.identity),
        })).collect::<Vec<_>>(),
        "workloads": s.workloads.iter().map(|w| serde_json::json!({
            "ip": ip(&w.ip).to_string(), "identityId": w.identity, "identity": name(&names.identities, w.identity),
        })).collect::<Vec<_>>(),
        "authorization": {
            "workloads": s.authz.workloads.iter().map(|w| serde_json::json!({
                "ip": ip(&w.ip).to_string(), "policySet": w.value.policy_set,
            })).collect::<Vec<_>>(),
            "sources": s.authz.sources.iter().map(|r| serde_json::json!({
                "prefix": format!("{}/{}", ip(&r.key.ip), if ip(&r.key.ip).is_ipv4() { r.key.prefix_len.saturating_sub(96) } else { r.key.prefix_len }),
                "sourceClass": r.value.source_class,
            })).collect::<Vec<_>>(),
            "verdicts": s.authz.verdicts.iter().map(|v| serde_json::json!({
                "policySet": v.key.policy_set,
                "sourceClass": if v.key.source_class == kmesh_common::authz::ANY_CLASS { serde_json::json!("any") } else { serde_json::json!(v.key.source_class) },
                "port": if v.key.port == kmesh_common::authz::ANY_PORT { serde_json::json!("any") } else { serde_json::json!(v.key.port) },
                "policyId": v.value.policy, "action": v.value.action, "reason": v.value.reason,
            })).collect::<Vec<_>>(),
            "policies": s.authz.policies.iter().map(|p| serde_json::json!({
                "policyId": p.policy, "kind": p.kind, "name": policy_name(p),
            })).collect::<Vec<_>>(),
        },
        "names": names_json(s),
        "diagnostics": compiled.diagnostics,
    })
}

/// The names sections, strings resolved (absent ones `null`), and the string table's size.
fn names_json(s: &Snapshot) -> serde_json::Value {
    let names = s.names();
    serde_json::json!({
        "stringBytes": s.names.strings.len(),
        "workloads": s.names.workloads.iter().map(|w| serde_json::json!({
            "ip": ip(&w.ip).to_string(),
            "workload": names.string(w.workload), "namespace": names.string(w.namespace),
            "serviceAccount": names.string(w.service_account),
            "app": names.string(w.app), "version": names.string(w.version),
        })).collect::<Vec<_>>(),
        "services": s.names.services.iter().map(|r| serde_json::json!({
            "serviceId": r.service_id, "host": names.string(r.host),
            "name": names.string(r.name), "namespace": names.string(r.namespace),
        })).collect::<Vec<_>>(),
    })
}
