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
            "  {}:{}  {}",
            ip(&svc.key.ip),
            svc.key.port,
            name(&names.services, svc.value.service_id)
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
    if !compiled.diagnostics.is_empty() {
        let _ = writeln!(out, "diagnostics ({}):", compiled.diagnostics.len());
        for d in &compiled.diagnostics {
            let _ = writeln!(out, "  {d}");
        }
    }
    out
}

/// The whole snapshot, with names beside the IDs.
pub fn json(s: &Snapshot, compiled: &Compiled) -> serde_json::Value {
    let names = &compiled.names;
    serde_json::json!({
        "nodeName": s.node_name,
        "generation": s.generation,
        "mode": mode_name(s.config.mode),
        "contentHash": s.encode().ok().and_then(|b| kmesh_snapshot::peek_header(&b).ok()).map(|h| format!("{:016x}", h.content_hash)),
        "services": s.services.iter().map(|r| serde_json::json!({
            "vip": ip(&r.key.ip).to_string(), "port": r.key.port,
            "serviceId": r.value.service_id, "service": name(&names.services, r.value.service_id),
            "routeId": r.value.route_id,
        })).collect::<Vec<_>>(),
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
        "diagnostics": compiled.diagnostics,
    })
}
