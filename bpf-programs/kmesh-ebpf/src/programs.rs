//! The kernel programs and their maps, shared by the two objects this crate builds: `kmesh` (the
//! shipped one, `main.rs`) and `kmesh-test-layout` (`test_layout.rs`, a second map layout for the
//! upgrade tests). The including file defines `super::ENROLLED_CAPACITY`; nothing else differs.
//!
//! `cgroup/connect4` and `cgroup/connect6` run when a socket in the attached cgroup calls
//! connect(). For TCP sockets of an enrolled network namespace, a connect to a mesh service
//! VIP:port is rewritten to one endpoint's pod IP:target port. Everything else passes untouched.
//!
//! `sk_lookup` `kmesh_authz` (`authz.rs`, a child module of this one) authorizes new inbound TCP
//! connections to enrolled workloads, in each enrolled pod's network namespace.
//!
//! `sock_ops` `kmesh_sockops` (`events.rs`, a child module too) reports every finished connection of
//! an enrolled workload into a ring buffer; connect4/6 tell it the service they rewrote or refused.
//! For a connection connect4/6 steered to a waypoint (a service with
//! `kmesh_common::service_flags::WAYPOINT`), it also writes the origin option
//! (`kmesh_common::waypoint_origin`) on the SYN (`waypoint.rs`, a child module).
//!
//! Generations: every table below except `KM_ENROLLED` and `KM_COUNTERS` is an array of inner
//! maps per generation slot: one for `KM_GENERATION`, and `CLUSTER_SHARDS` for each cluster table
//! (services, routes, backend sets, endpoints), the key's shard (`kmesh_common::shard`) choosing
//! among them. A program reads the active slot from `KM_ACTIVE` once, then does every lookup in
//! that slot's maps, so it sees one whole snapshot (the agent fills the changed shards' maps,
//! installs them in the idle slot and flips `KM_ACTIVE` in one write; see node-agent/src/maps.rs
//! for the reuse rule).
use aya_ebpf::{
    btf_maps::{Array, ArrayOfMaps, HashMap, PerCpuArray},
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_set_retval},
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use kmesh_common::{
    BackendSetEntry, EndpointValue, EnrolledNetns, GENERATION_SLOTS, GenerationValue,
    INNER_ARRAY_FLAGS, INNER_MAP_FLAGS, IPPROTO_TCP, Ip16, RouteValue, ServiceKey, ServiceValue,
    counter, lb_policy, mode,
    shard::{CLUSTER_SHARDS, outer_index, shard_of_backend_set, shard_of_route, shard_of_service},
    source_hash,
};

#[path = "authz.rs"]
mod authz;
#[path = "events.rs"]
mod events;
#[path = "waypoint.rs"]
mod waypoint;

const SLOTS: usize = GENERATION_SLOTS as usize;
/// Entries of a cluster table's outer map: every shard of both slots.
const SHARDED_SLOTS: usize = SLOTS * CLUSTER_SHARDS as usize;
const INNER_FLAGS: usize = INNER_MAP_FLAGS as usize;
const ARRAY_FLAGS: usize = INNER_ARRAY_FLAGS as usize;
// The inner templates' max_entries only describe the template: the agent creates each
// generation's maps with the capacity that generation needs (hash inner maps may differ in
// max_entries, and arrays flagged BPF_F_INNER_MAP too; not in type, key/value size or flags).
const TEMPLATE_ENTRIES: usize = 1;

/// Allow the connect (possibly rewritten).
const ALLOW: i32 = 1;
/// Refuse the connect; the error returned to the caller is set with bpf_set_retval.
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[btf_map]
static KM_ACTIVE: Array<u32, 1> = Array::new();
#[btf_map]
static KM_GENERATION: ArrayOfMaps<
    HashMap<u32, GenerationValue, TEMPLATE_ENTRIES, INNER_FLAGS>,
    SLOTS,
> = ArrayOfMaps::new();
#[btf_map]
static KM_SERVICES: ArrayOfMaps<
    HashMap<ServiceKey, ServiceValue, TEMPLATE_ENTRIES, INNER_FLAGS>,
    SHARDED_SLOTS,
> = ArrayOfMaps::new();
#[btf_map]
static KM_ROUTES: ArrayOfMaps<
    HashMap<u32, RouteValue, TEMPLATE_ENTRIES, INNER_FLAGS>,
    SHARDED_SLOTS,
> = ArrayOfMaps::new();
#[btf_map]
static KM_BACKEND_SETS: ArrayOfMaps<
    HashMap<u32, BackendSetEntry, TEMPLATE_ENTRIES, INNER_FLAGS>,
    SHARDED_SLOTS,
> = ArrayOfMaps::new();
#[btf_map]
static KM_ENDPOINTS: ArrayOfMaps<
    Array<EndpointValue, TEMPLATE_ENTRIES, ARRAY_FLAGS>,
    SHARDED_SLOTS,
> = ArrayOfMaps::new();
#[btf_map]
static KM_ENROLLED: HashMap<u64, EnrolledNetns, { super::ENROLLED_CAPACITY as usize }> =
    HashMap::new();
#[btf_map]
static KM_COUNTERS: PerCpuArray<u64, { counter::COUNT as usize }> = PerCpuArray::new();

/// What to do with a connect to a destination.
enum Verdict {
    /// Not ours: leave the connect alone.
    Pass,
    /// Connect to this endpoint instead, for this service.
    Rewrite(EndpointValue, ServiceValue),
    /// A known service that cannot be served: fail the connect at once.
    Refuse(Refusal),
}

/// Who a refused connect came from, for its event.
struct Refusal {
    netns_cookie: u64,
    workload_ip: Ip16,
}

#[cgroup_sock_addr(connect4)]
pub fn kmesh_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP as u32 {
        return ALLOW;
    }
    // user_ip4 and user_port hold network byte order; their in-memory bytes are the octets.
    let octets = sa.user_ip4.to_ne_bytes();
    let port = u16::from_be(sa.user_port as u16);
    let service = kmesh_common::ipv4_mapped(octets);
    match decide(&ctx, service, port) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse(r) => {
            events::no_endpoint(&ctx, r.netns_cookie, &r.workload_ip, &service, port);
            refuse()
        }
        Verdict::Rewrite(ep, value) => match kmesh_common::as_ipv4(&ep.ip) {
            Some(v4) => {
                sa.user_ip4 = u32::from_ne_bytes(v4);
                sa.user_port = u32::from(ep.port.to_be());
                count(counter::REWRITTEN);
                events::remember_service(&ctx, &service, port, &value);
                ALLOW
            }
            // An IPv4 socket cannot reach an IPv6 endpoint.
            None => {
                count(counter::REFUSED_FAMILY);
                refuse()
            }
        },
    }
}

#[cgroup_sock_addr(connect6)]
pub fn kmesh_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP as u32 {
        return ALLOW;
    }
    // Read user_ip6 a 32-bit word at a time: the verifier only allows full-word access.
    let words = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let mut ip: Ip16 = [0; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        ip[i * 4] = b[0];
        ip[i * 4 + 1] = b[1];
        ip[i * 4 + 2] = b[2];
        ip[i * 4 + 3] = b[3];
        i += 1;
    }
    let port = u16::from_be(sa.user_port as u16);
    // An IPv4-mapped destination on an IPv6 socket is looked up as the IPv4 service it is (the
    // tables store IPv4 as IPv4-mapped); an IPv4 endpoint is written back IPv4-mapped. Both
    // families therefore rewrite the same way here.
    match decide(&ctx, ip, port) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse(r) => {
            events::no_endpoint(&ctx, r.netns_cookie, &r.workload_ip, &ip, port);
            refuse()
        }
        Verdict::Rewrite(ep, value) => {
            let dst_is_v4 = kmesh_common::as_ipv4(&ip).is_some();
            let ep_is_v4 = kmesh_common::as_ipv4(&ep.ip).is_some();
            if dst_is_v4 != ep_is_v4 {
                count(counter::REFUSED_FAMILY);
                return refuse();
            }
            let w =
                |i: usize| u32::from_ne_bytes([ep.ip[i], ep.ip[i + 1], ep.ip[i + 2], ep.ip[i + 3]]);
            sa.user_ip6[0] = w(0);
            sa.user_ip6[1] = w(4);
            sa.user_ip6[2] = w(8);
            sa.user_ip6[3] = w(12);
            sa.user_port = u32::from(ep.port.to_be());
            count(counter::REWRITTEN);
            events::remember_service(&ctx, &ip, port, &value);
            ALLOW
        }
    }
}

/// The policy decision shared by both programs.
#[inline(always)]
fn decide(ctx: &SockAddrContext, ip: Ip16, port: u16) -> Verdict {
    // SAFETY: the helper only reads the context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: value read by copy; the map is only written by the agent.
    let Some(enrolled) = (unsafe { KM_ENROLLED.get(&cookie) }).copied() else {
        return Verdict::Pass;
    };
    let Some(&slot) = KM_ACTIVE.get(0) else {
        return Verdict::Pass;
    };
    let Some(generation) = KM_GENERATION.get_value_ptr_mut(slot, &0) else {
        return Verdict::Pass;
    };
    // SAFETY: pointer from a successful lookup; read by copy.
    let generation = unsafe { *generation };
    if generation.config.mode == mode::DISABLED {
        return Verdict::Pass;
    }
    let key = ServiceKey {
        ip,
        port,
        protocol: IPPROTO_TCP,
        pad: 0,
    };
    let Some(service) =
        KM_SERVICES.get_value_ptr_mut(outer_index(slot, shard_of_service(&key)), &key)
    else {
        return Verdict::Pass;
    };
    // SAFETY: as above.
    let service = unsafe { *service };
    match choose_endpoint(slot, &service, &enrolled) {
        Ok(ep) => Verdict::Rewrite(ep, service),
        Err(reason) => {
            count(reason);
            Verdict::Refuse(Refusal {
                netns_cookie: cookie,
                workload_ip: enrolled.workload_ip,
            })
        }
    }
}

/// Route → backend set (weighted) → endpoint (uniform or source hash).
/// Errors carry the counter that explains the refusal.
#[inline(always)]
fn choose_endpoint(
    slot: u32,
    service: &ServiceValue,
    client: &EnrolledNetns,
) -> Result<EndpointValue, u32> {
    let route = KM_ROUTES
        .get_value_ptr_mut(
            outer_index(slot, shard_of_route(service.route_id)),
            &service.route_id,
        )
        .ok_or(counter::INCONSISTENT)?;
    // SAFETY: pointer from a successful lookup. Copied: map memory may change under us, and
    // the checked values below must be the values we use.
    let route = unsafe { *route };
    // SAFETY: helper without arguments.
    let set_id = route
        .pick(unsafe { bpf_get_prandom_u32() })
        .ok_or(counter::INCONSISTENT)?;
    let set = KM_BACKEND_SETS
        .get_value_ptr_mut(outer_index(slot, shard_of_backend_set(set_id)), &set_id)
        .ok_or(counter::INCONSISTENT)?;
    // SAFETY: pointer from a successful lookup; read by copy.
    let set = unsafe { *set };
    let pick = if set.lb_policy == lb_policy::SOURCE_IP_HASH {
        source_hash(&client.workload_ip)
    } else {
        // SAFETY: helper without arguments.
        unsafe { bpf_get_prandom_u32() }
    };
    let index = pick
        .checked_rem(set.endpoint_count)
        .ok_or(counter::REFUSED_NO_ENDPOINT)?;
    // The set's endpoints are its shard's array elements from `first_endpoint` on (see
    // `BackendSetEntry`); an element past the array's end is not found.
    let ep = KM_ENDPOINTS
        .get_value_ptr_mut(
            outer_index(slot, shard_of_backend_set(set_id)),
            &set.first_endpoint.wrapping_add(index),
        )
        .ok_or(counter::INCONSISTENT)?;
    // SAFETY: pointer from a successful lookup; read by copy.
    Ok(unsafe { *ep })
}

#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: sets the error the connect() syscall returns when the program denies it.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REFUSE
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = KM_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, written only by programs on this CPU.
        unsafe { *c += 1 };
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
