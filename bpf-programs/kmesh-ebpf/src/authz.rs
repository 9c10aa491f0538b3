//! `kmesh_authz` (`sk_lookup`): authorization of new inbound TCP connections to the node's mesh
//! workloads, and the maps it reads. Part of `programs.rs` (it shares `KM_ACTIVE`,
//! `KM_GENERATION` and `KM_COUNTERS` with the connect programs). A denial is reported as a
//! connection event (`events.rs`).
//!
//! Why `sk_lookup`: it runs in the destination's network namespace exactly when the kernel looks
//! for a listening socket for a SYN — established connections never reach it — for mesh and
//! non-mesh clients alike, from this node or any other. Returning `SK_DROP` makes the lookup fail
//! as if no socket listened: the kernel answers the SYN with a RST, the client's connect() fails at
//! once with ECONNREFUSED, and not one payload byte reaches the server (it never even sees an
//! accept). The agent attaches the program to every enrolled pod's network namespace with a
//! `bpf_link` (BPF_LINK_CREATE on the netns fd), pinned on bpffs and adopted across agent
//! restarts, so enforcement has no gap while the agent is away.
//!
//! The operator decided everything in advance: per connection the program does one LPM lookup
//! (the source's class) and at most four hash lookups (`kmesh_common::authz::resolve_verdict`),
//! whatever the number of policies. Bounded: no loop, no rule evaluated here.
use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    btf_maps::{ArrayOfMaps, HashMap, LpmTrie, PerCpuHashMap, lpm_trie::Key},
    macros::{btf_map, sk_lookup},
    programs::SkLookupContext,
};
use kmesh_common::{
    AuthzCounterKey, AuthzSourceValue, AuthzVerdict, AuthzVerdictKey, AuthzWorkloadValue,
    HostAddrValue, IPPROTO_TCP, Ip16, MAX_AUTHZ_COUNTERS, MAX_HOST_ADDRS,
    authz::{UNKNOWN_SOURCE, authz_action, resolve_verdict},
    counter, ipv4_mapped, mode,
};

use super::{INNER_FLAGS, KM_ACTIVE, KM_GENERATION, SLOTS, TEMPLATE_ENTRIES, count, events};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// Full-length prefix of an address in the sources trie: a lookup key matches every stored
/// prefix that holds it, and the trie returns the longest.
const FULL_PREFIX: u32 = 128;

/// Per generation: destination workload address → its verdict set.
#[btf_map]
static KM_AUTHZ_WORKLOADS: ArrayOfMaps<
    HashMap<Ip16, AuthzWorkloadValue, TEMPLATE_ENTRIES, INNER_FLAGS>,
    SLOTS,
> = ArrayOfMaps::new();
/// Per generation: source prefix → source class (an LPM trie; the kernel requires
/// BPF_F_NO_PREALLOC for it, the template's default flags). Key layout = `AuthzSourceKey`.
#[btf_map]
static KM_AUTHZ_SOURCES: ArrayOfMaps<LpmTrie<Ip16, AuthzSourceValue, TEMPLATE_ENTRIES>, SLOTS> =
    ArrayOfMaps::new();
/// Per generation: (set, class, port) → verdict, read through `resolve_verdict`.
#[btf_map]
static KM_AUTHZ_VERDICTS: ArrayOfMaps<
    HashMap<AuthzVerdictKey, AuthzVerdict, TEMPLATE_ENTRIES, INNER_FLAGS>,
    SLOTS,
> = ArrayOfMaps::new();
/// Not per generation: connections per (workload, policy, action, reason). Not preallocated
/// (BPF_F_NO_PREALLOC): a preallocated per-CPU hash costs capacity × CPUs × 8 bytes up front (64 MiB
/// on a 128-CPU node); this one costs what the node's triples use.
#[btf_map]
static KM_AUTHZ_COUNTERS: PerCpuHashMap<
    AuthzCounterKey,
    u64,
    { MAX_AUTHZ_COUNTERS as usize },
    INNER_FLAGS,
> = PerCpuHashMap::new();
/// Not per generation: the node's own addresses (exempt, so that kubelet probes keep working).
#[btf_map]
static KM_HOST_ADDRS: HashMap<Ip16, HostAddrValue, { MAX_HOST_ADDRS as usize }> = HashMap::new();

#[sk_lookup]
pub fn kmesh_authz(ctx: SkLookupContext) -> u32 {
    let Some(conn) = connection(&ctx) else {
        return SK_PASS;
    };
    match decide(&conn.local, &conn.remote, conn.port) {
        Decision::Pass => SK_PASS,
        Decision::Judged(verdict) => {
            count_verdict(&conn.local, &verdict);
            if verdict.action == authz_action::ALLOW {
                count(counter::AUTHZ_ALLOWED);
                SK_PASS
            } else {
                count(counter::AUTHZ_DENIED);
                events::denied(
                    &conn.local,
                    conn.port,
                    &conn.remote,
                    conn.remote_port,
                    verdict.policy,
                );
                SK_DROP
            }
        }
    }
}

/// A new inbound TCP connection, as the lookup describes it.
struct Connection {
    local: Ip16,
    remote: Ip16,
    /// Destination port, host byte order.
    port: u16,
    /// Source port, host byte order.
    remote_port: u16,
}

/// The connection of a TCP lookup; `None` for anything else.
///
/// Every context field is read first, each with a volatile load of its own, before any branch:
/// the verifier accepts only loads at a constant offset from the unmodified context pointer, and
/// reads inside the branches let the compiler share a `ctx + offset` register between them
/// (which the verifier refuses).
#[inline(always)]
fn connection(ctx: &SkLookupContext) -> Option<Connection> {
    let l = ctx.lookup;
    // SAFETY: the kernel hands us a valid bpf_sk_lookup for the program's lifetime; each read is
    // of one whole field, and every field may be read whatever the family.
    let (protocol, family, port, remote_port, local4, remote4, local6, remote6) = unsafe {
        (
            read_volatile(&raw const (*l).protocol),
            read_volatile(&raw const (*l).family),
            read_volatile(&raw const (*l).local_port),
            read_volatile(&raw const (*l).remote_port),
            read_volatile(&raw const (*l).local_ip4),
            read_volatile(&raw const (*l).remote_ip4),
            [
                read_volatile(&raw const (*l).local_ip6[0]),
                read_volatile(&raw const (*l).local_ip6[1]),
                read_volatile(&raw const (*l).local_ip6[2]),
                read_volatile(&raw const (*l).local_ip6[3]),
            ],
            [
                read_volatile(&raw const (*l).remote_ip6[0]),
                read_volatile(&raw const (*l).remote_ip6[1]),
                read_volatile(&raw const (*l).remote_ip6[2]),
                read_volatile(&raw const (*l).remote_ip6[3]),
            ],
        )
    };
    if protocol != IPPROTO_TCP as u32 {
        return None;
    }
    // local_port is in host byte order (unlike the addresses); remote_port in network byte order.
    let port = port as u16;
    let remote_port = u16::from_be(remote_port);
    match family {
        AF_INET => Some(Connection {
            local: ipv4_mapped(local4.to_ne_bytes()),
            remote: ipv4_mapped(remote4.to_ne_bytes()),
            port,
            remote_port,
        }),
        AF_INET6 => Some(Connection {
            local: words_to_ip(local6),
            remote: words_to_ip(remote6),
            port,
            remote_port,
        }),
        _ => None,
    }
}

/// What to do with a connection.
enum Decision {
    /// Not judged: mode Disabled, no policy binds the destination, or the node's own address.
    Pass,
    /// The verdict of the live generation (a missing verdict is a deny, counted INCONSISTENT).
    Judged(AuthzVerdict),
}

#[inline(always)]
fn decide(local: &Ip16, remote: &Ip16, port: u16) -> Decision {
    let Some(&slot) = KM_ACTIVE.get(0) else {
        return Decision::Pass;
    };
    let Some(generation) = KM_GENERATION.get_value_ptr_mut(slot, &0) else {
        return Decision::Pass;
    };
    // SAFETY: pointer from a successful lookup; read by copy.
    let generation = unsafe { *generation };
    if generation.config.mode == mode::DISABLED {
        return Decision::Pass;
    }
    let Some(workload) = KM_AUTHZ_WORKLOADS.get_value_ptr_mut(slot, local) else {
        return Decision::Pass;
    };
    // SAFETY: as above.
    let workload = unsafe { *workload };
    // SAFETY: value read by copy; the map is only written by the agent.
    if unsafe { KM_HOST_ADDRS.get(remote) }.is_some() {
        count(counter::AUTHZ_NODE_EXEMPT);
        return Decision::Pass;
    }
    let key = Key::new(FULL_PREFIX, *remote);
    let class = match KM_AUTHZ_SOURCES.get_value_ptr_mut(slot, &key) {
        // SAFETY: as above.
        Some(source) => unsafe { (*source).source_class },
        None => UNKNOWN_SOURCE,
    };
    let verdict = resolve_verdict(workload.policy_set, class, port, |k| {
        // SAFETY: as above.
        KM_AUTHZ_VERDICTS
            .get_value_ptr_mut(slot, k)
            .map(|v| unsafe { *v })
    });
    match verdict {
        Some(v) => Decision::Judged(v),
        None => {
            count(counter::INCONSISTENT);
            Decision::Judged(AuthzVerdict {
                policy: 0,
                action: authz_action::DENY,
                reason: 0,
                pad: 0,
            })
        }
    }
}

/// One more connection for (workload, policy, action, reason). A full map still decides the
/// connection; it is then counted in AUTHZ_COUNTERS_FULL.
#[inline(always)]
fn count_verdict(local: &Ip16, verdict: &AuthzVerdict) {
    let key = AuthzCounterKey {
        workload_ip: *local,
        policy: verdict.policy,
        action: verdict.action,
        reason: verdict.reason,
        pad: 0,
    };
    if let Some(c) = KM_AUTHZ_COUNTERS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value, written only by programs on this CPU.
        unsafe { *c += 1 };
        return;
    }
    // BPF_NOEXIST: another CPU may have created the entry meanwhile (EEXIST); then count in it.
    match KM_AUTHZ_COUNTERS.insert(&key, 1u64, BPF_NOEXIST) {
        Ok(()) => {}
        Err(_) => match KM_AUTHZ_COUNTERS.get_ptr_mut(&key) {
            // SAFETY: as above.
            Some(c) => unsafe { *c += 1 },
            None => count(counter::AUTHZ_COUNTERS_FULL),
        },
    }
}

const BPF_NOEXIST: u64 = 1;

/// The 16 bytes of an address given as four 32-bit words in memory order (the verifier only
/// allows full-word reads of the context's IPv6 fields).
#[inline(always)]
pub(super) fn words_to_ip(words: [u32; 4]) -> Ip16 {
    let (a, b, c, d) = (
        words[0].to_ne_bytes(),
        words[1].to_ne_bytes(),
        words[2].to_ne_bytes(),
        words[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}
