//! The oracle of the `snapshot_decode` fuzz target: what must hold for any byte string given to the
//! snapshot decoder. Shared, as the one definition, by the fuzz target and by
//! `snapshot/tests/fuzz_regressions.rs` (which includes this file with `#[path]`), so it uses only
//! `kmesh_snapshot`, `kmesh_common` and `std`.
//!
//! A panic here is a finding: either the decoder panicked, or one of these properties failed:
//! - `Snapshot::decode` and `peek_header` return (accept or refuse) and never panic, and every
//!   refusal renders as a message;
//! - an accepted input is canonical: `encode(decode(b)) == b`, in the input's format (2, 3 or 4);
//! - `Delta::decode` returns and never panics on any input either (a delta's framing is read by
//!   the same readers), and its refusals render as messages;
//! - limits only refuse: what decodes under the node's limits decodes identically without limits,
//!   and what decodes without limits and fits the limits decodes under them;
//! - `peek_header` agrees with the decoder on every input the decoder accepts;
//! - every accepted route is one the kernel can use: it is exactly `RouteValue::from_weights` of
//!   its own weights, and its pick lands on an existing backend set for any random draw;
//! - every accepted authorization table is one the kernel can use: a connection to any of its
//!   workloads, from a source of any class, to any port, finds a verdict through
//!   `resolve_verdict`, and the source class of any source address is never a reserved one.
//!
//! A mutated snapshot almost always fails the content hash before anything else is looked at, so
//! [`check_bytes`] decodes each input twice: as given, and with `total_len` and the hash recomputed
//! (as `fixed_up`), so the fuzzer reaches the section framing and the content rules.

use kmesh_common::RouteValue;
use kmesh_common::authz::{ANY_CLASS, AuthzVerdictKey, resolve_verdict, source_class};
use kmesh_snapshot::{
    DecodeError, FIXED_HEADER_LEN, Limits, Snapshot, computed_content_hash, content_hash,
    peek_header,
};

/// Offsets of the two header fields [`fixed_up`] rewrites (see `kmesh_snapshot::format`).
const OFF_CONTENT_HASH: usize = 24;
const OFF_TOTAL_LEN: usize = 32;

/// Small limits, so that the capacity checks are reached with inputs of a few hundred bytes.
const TIGHT: Limits = Limits {
    max_bytes: 4096,
    max_services: 3,
    max_routes: 3,
    max_backend_sets: 3,
    max_endpoints: 4,
    max_workloads: 2,
    max_authz_workloads: 2,
    max_authz_sources: 3,
    max_authz_verdicts: 4,
    max_authz_policies: 2,
    max_name_bytes: 64,
    max_workload_names: 2,
    max_service_names: 2,
};

/// Checks `data` as given and, when it is long enough to have a header, with its length and hash
/// made right.
pub fn check_bytes(data: &[u8]) {
    check_one(data);
    if let Some(fixed) = fixed_up(data)
        && fixed != data
    {
        check_one(&fixed);
    }
}

/// `data` with `total_len` and the content hash set to match it, or `None` if it is shorter than
/// the fixed header.
pub fn fixed_up(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < FIXED_HEADER_LEN {
        return None;
    }
    let mut fixed = data.to_vec();
    let len = fixed.len() as u64;
    fixed[OFF_TOTAL_LEN..OFF_TOTAL_LEN + 8].copy_from_slice(&len.to_le_bytes());
    // The hash of the input's format; format 2's when the header is refused before hashing.
    let hash =
        computed_content_hash(&fixed).unwrap_or_else(|_| content_hash(&fixed[FIXED_HEADER_LEN..]));
    fixed[OFF_CONTENT_HASH..OFF_CONTENT_HASH + 8].copy_from_slice(&hash.to_le_bytes());
    Some(fixed)
}

/// Every property of the module documentation, for one input.
pub fn check_one(bytes: &[u8]) {
    if let Err(e) = kmesh_snapshot::delta_format::Delta::decode(bytes, &Limits::default()) {
        assert!(
            !e.to_string().is_empty(),
            "{e:?} renders as an empty message"
        );
    }
    let header = peek_header(bytes);
    let unlimited = Snapshot::decode(bytes, &Limits::UNLIMITED);
    for limits in [Limits::default(), TIGHT] {
        check_limits(bytes, &unlimited, &limits);
    }
    let decoded = match unlimited {
        Ok(decoded) => decoded,
        Err(e) => {
            assert!(
                !e.to_string().is_empty(),
                "{e:?} renders as an empty message"
            );
            return;
        }
    };
    let snapshot = &decoded.snapshot;
    let again = snapshot.encode_as(decoded.format);
    assert_eq!(
        again.as_deref(),
        Ok(bytes),
        "an accepted snapshot does not re-encode to its own bytes"
    );
    let header = header.unwrap_or_else(|e| panic!("decode accepts what peek_header refuses: {e}"));
    assert_eq!(
        header.node_name, snapshot.node_name,
        "peek_header node name"
    );
    assert_eq!(
        header.generation, snapshot.generation,
        "peek_header generation"
    );
    assert_eq!(
        header.content_hash, decoded.content_hash,
        "peek_header hash"
    );
    assert_eq!(
        header.total_len,
        bytes.len() as u64,
        "peek_header total_len"
    );
    check_routes(snapshot);
    check_authz(snapshot);
    check_names(snapshot);
}

/// Every name of an accepted snapshot reads back: each record's lookup finds it, and every field is
/// no name or a string of the table.
fn check_names(snapshot: &Snapshot) {
    let names = snapshot.names();
    for w in &snapshot.names.workloads {
        assert!(
            names.workload(&w.ip).is_some(),
            "a named address is not found"
        );
        for offset in [w.workload, w.namespace, w.service_account, w.app, w.version] {
            assert!(
                offset == kmesh_common::names::NO_NAME || names.string(offset).is_some(),
                "an accepted workload name refers to no string"
            );
        }
    }
    for s in &snapshot.names.services {
        let found = names.service_by_id(s.service_id);
        assert!(
            found.is_some_and(|n| !n.host.is_empty()),
            "an accepted service name has no host"
        );
    }
}

/// A decode under `limits` must equal the unlimited decode, or be refused for a limit the
/// snapshot actually exceeds.
fn check_limits(
    bytes: &[u8],
    unlimited: &Result<kmesh_snapshot::Decoded, DecodeError>,
    limits: &Limits,
) {
    let limited = Snapshot::decode(bytes, limits);
    match (unlimited, &limited) {
        (Ok(u), Ok(l)) => assert_eq!(u, l, "limits changed what was decoded"),
        (Ok(u), Err(e)) => {
            let s = &u.snapshot;
            let fits = bytes.len() as u64 <= limits.max_bytes
                && s.services.len() as u64 <= u64::from(limits.max_services)
                && s.routes.len() as u64 <= u64::from(limits.max_routes)
                && s.backend_sets.len() as u64 <= u64::from(limits.max_backend_sets)
                && s.endpoints.len() as u64 <= u64::from(limits.max_endpoints)
                && s.workloads.len() as u64 <= u64::from(limits.max_workloads)
                && s.authz.workloads.len() as u64 <= u64::from(limits.max_authz_workloads)
                && s.authz.sources.len() as u64 <= u64::from(limits.max_authz_sources)
                && s.authz.verdicts.len() as u64 <= u64::from(limits.max_authz_verdicts)
                && s.authz.policies.len() as u64 <= u64::from(limits.max_authz_policies)
                && s.names.strings.len() as u64 <= u64::from(limits.max_name_bytes)
                && s.names.workloads.len() as u64 <= u64::from(limits.max_workload_names)
                && s.names.services.len() as u64 <= u64::from(limits.max_service_names);
            assert!(
                !fits,
                "a snapshot within {limits:?} was refused under them: {e}"
            );
            assert!(
                matches!(
                    e,
                    DecodeError::TooLarge { .. }
                        | DecodeError::OverCapacity { .. }
                        | DecodeError::NameBytesOverCapacity { .. }
                ),
                "a valid snapshot was refused under limits for another reason: {e}"
            );
        }
        (Err(_), Ok(_)) => panic!("limits made an invalid snapshot valid"),
        (Err(_), Err(e)) => assert!(!e.to_string().is_empty()),
    }
}

/// The kernel's view of each accepted route: its weights rebuild it exactly, and every draw picks a
/// backend set that exists.
fn check_routes(snapshot: &Snapshot) {
    for route in &snapshot.routes {
        let value = &route.value;
        let rebuilt = RouteValue::from_weights(value.weights());
        assert_eq!(
            rebuilt,
            Ok(*value),
            "route {} is not from_weights of its own weights",
            route.route_id
        );
        let last = value.total_weight.saturating_sub(1);
        let draws = [0, 1, last / 2, last, value.total_weight, u32::MAX];
        for random in draws {
            let set = value
                .pick(random)
                .unwrap_or_else(|| panic!("route {} picks nothing for {random}", route.route_id));
            assert!(
                snapshot
                    .backend_sets
                    .binary_search_by_key(&set, |s| s.set_id)
                    .is_ok(),
                "route {} picks backend set {set}, which does not exist",
                route.route_id
            );
        }
    }
}

/// The kernel's view of the authorization tables: every connection to an authorization workload
/// finds a verdict (the chain never falls through to "inconsistent", which the kernel denies), and
/// no source address gets the wildcard class. Classes tried: those of the sources, the unknown
/// source and one no source has; ports: those of the verdicts and two others.
fn check_authz(snapshot: &Snapshot) {
    let authz = &snapshot.authz;
    let lookup = |k: &AuthzVerdictKey| {
        let i = authz.verdicts.binary_search_by_key(k, |v| v.key).ok()?;
        Some(authz.verdicts[i].value)
    };
    // The verdict depends on (policy set, class, port) only: each distinct triple is tried once
    // (the product over records, with repeats, made this check most of a fuzz execution).
    let distinct = |mut v: Vec<_>| {
        v.sort_unstable();
        v.dedup();
        v
    };
    let sets = distinct(authz.workloads.iter().map(|w| w.value.policy_set).collect());
    let mut classes: Vec<u32> = authz.sources.iter().map(|s| s.value.source_class).collect();
    classes.extend([0, u32::MAX - 1]);
    let classes = distinct(classes);
    let mut ports: Vec<u32> = authz
        .verdicts
        .iter()
        .map(|v| u32::from(v.key.port))
        .collect();
    ports.extend([1, u32::from(u16::MAX)]);
    let ports = distinct(ports);
    for &set in &sets {
        for &class in &classes {
            for &port in &ports {
                assert!(
                    resolve_verdict(set, class, port as u16, lookup).is_some(),
                    "a connection to a workload of policy set {set} from class {class} to port {port} finds no verdict"
                );
            }
        }
    }
    for s in &authz.sources {
        let class = source_class(&authz.sources, &s.key.ip);
        assert_ne!(
            class, ANY_CLASS,
            "source {:?} gets the wildcard class",
            s.key
        );
    }
}
