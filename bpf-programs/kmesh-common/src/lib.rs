//! The eBPF map layout of kmesh-rs: the single place where map keys and values are defined.
//!
//! The kernel programs (`kmesh-ebpf`), the snapshot codec (`kmesh-snapshot`) and the node agent all
//! use these records. A snapshot section is an array of exactly these records, and the agent copies
//! them into maps without translation, so a change here is a change of the wire format too: bump
//! [`LAYOUT_VERSION`] whenever a record changes.
//!
//! Rules every record follows, so that its bytes can be copied as they are:
//! - `#[repr(C)]`, only integer fields and integer arrays, every padding byte an explicit field
//!   (checked by the size assertions at the bottom);
//! - addresses are 16 bytes, IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`);
//! - ports and all other integers are in host byte order (the programs convert at the socket).
#![no_std]

pub mod authz;
mod choice;
pub mod events;
pub mod names;
pub mod shard;
pub mod waypoint_origin;
pub use authz::{
    AuthzCounterKey, AuthzPolicyRecord, AuthzSourceKey, AuthzSourceRecord, AuthzSourceValue,
    AuthzVerdict, AuthzVerdictKey, AuthzVerdictRecord, AuthzWorkloadRecord, AuthzWorkloadValue,
    HostAddrValue,
};
pub use choice::{RouteWeightError, source_hash};
pub use events::{ConnEvent, SockState};

/// Version of the map layout and of the snapshot records. Part of the snapshot header; the agent
/// refuses to adopt pinned maps or load snapshots of another layout.
pub const LAYOUT_VERSION: u16 = 3;

/// An IPv4 or IPv6 address in 16 bytes; IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`).
pub type Ip16 = [u8; 16];

/// Returns the IPv4-mapped form of an IPv4 address given as its four octets.
pub const fn ipv4_mapped(octets: [u8; 4]) -> Ip16 {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// Returns the four IPv4 octets if `ip` is IPv4-mapped.
pub const fn as_ipv4(ip: &Ip16) -> Option<[u8; 4]> {
    if ip[0] == 0
        && ip[1] == 0
        && ip[2] == 0
        && ip[3] == 0
        && ip[4] == 0
        && ip[5] == 0
        && ip[6] == 0
        && ip[7] == 0
        && ip[8] == 0
        && ip[9] == 0
        && ip[10] == 0xff
        && ip[11] == 0xff
    {
        Some([ip[12], ip[13], ip[14], ip[15]])
    } else {
        None
    }
}

/// The 16-byte form of an address (IPv4 as IPv4-mapped).
pub const fn ip16(ip: core::net::IpAddr) -> Ip16 {
    match ip {
        core::net::IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        core::net::IpAddr::V6(v6) => v6.octets(),
    }
}

/// IP protocol number of TCP, the only protocol the programs steer.
pub const IPPROTO_TCP: u8 = 6;

/// What the programs do on this node. Zero is `Disabled` so that an absent or zeroed record means
/// "pass everything through".
pub mod mode {
    /// Programs stay attached, traffic passes untouched.
    pub const DISABLED: u32 = 0;
    /// Everything the kernel can enforce is enforced in the kernel.
    pub const KERNEL_NATIVE: u32 = 1;
    /// As kernel-native, plus waypoint redirection for L7 (see [`super::service_flags::WAYPOINT`];
    /// the operator does not bind services to waypoints yet).
    pub const DUAL_ENGINE: u32 = 2;
}

/// How an endpoint is chosen inside a backend set.
pub mod lb_policy {
    /// Uniform random over the set's endpoints.
    pub const RANDOM: u32 = 0;
    /// A hash of the client's workload address: the same client reaches the same endpoint while the
    /// set is unchanged (DestinationRule `consistentHash.useSourceIp`).
    pub const SOURCE_IP_HASH: u32 = 1;
    /// One past the largest valid value.
    pub const COUNT: u32 = 2;
}

/// Key of the services table: a mesh service's virtual IP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub ip: Ip16,
    pub port: u16,
    pub protocol: u8,
    pub pad: u8,
}

/// Value of the services table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceValue {
    /// Stable service ID (assigned by the operator), for metrics and logs.
    pub service_id: u32,
    /// The route that chooses among backend sets for connections to this VIP:port.
    pub route_id: u32,
    /// Bits of [`service_flags`]; no other bit may be set.
    pub flags: u32,
}

/// What a service's connections get besides load balancing ([`ServiceValue::flags`]).
pub mod service_flags {
    /// Connections to this service go to its waypoint (DualEngine, docs/dual-engine.md): the
    /// route's backend sets hold the waypoint's ready replicas (at its listener port), and the
    /// client's SYN carries the origin option ([`crate::waypoint_origin`]) naming the service id
    /// and the port the client dialled, from which the waypoint learns the original destination.
    pub const WAYPOINT: u32 = 1;
    /// Every bit that has a meaning; a snapshot with another bit set is refused.
    pub const ALL: u32 = WAYPOINT;
}

/// The most backend sets one route may split over. The programs search the cumulative weights
/// linearly, so this bounds the search (design invariant 4: kernel code is bounded).
pub const MAX_ROUTE_DESTINATIONS: usize = 16;

/// Value of the routes table: a weighted list of backend sets.
///
/// `cumulative_weight[i]` is the sum of the weights of destinations `0..=i`; a connection draws
/// `r` in `0..total_weight` and takes the first destination whose cumulative weight exceeds `r`.
/// Destinations with weight 0 are left out by the compiler, so every weight is positive.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteValue {
    pub destination_count: u32,
    pub total_weight: u32,
    pub cumulative_weight: [u32; MAX_ROUTE_DESTINATIONS],
    pub backend_set: [u32; MAX_ROUTE_DESTINATIONS],
}

/// Value of the backend sets table of a snapshot: how many endpoints the set has and how to choose
/// one. The endpoints are `EndpointKey { set_id, index: 0..endpoint_count }`. The kernel's map
/// holds a [`BackendSetEntry`] made from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendSetValue {
    /// Zero means the set has no ready endpoint: a connection routed here is refused at once.
    pub endpoint_count: u32,
    /// One of [`lb_policy`].
    pub lb_policy: u32,
}

/// Value of the backend sets map: a snapshot's [`BackendSetValue`], and where the set's endpoints
/// start in its shard's endpoints array.
///
/// The endpoints map holds, per shard (`shard::shard_of_backend_set`, a set's endpoints share its
/// shard), one `ARRAY` of [`EndpointValue`]s: the shard's endpoints in the snapshot's order (by set
/// id, then index). A set's endpoint `i` is the array's element `first_endpoint + i`. An array
/// element costs its value alone (24 bytes), where a hash element costs a 48-byte header, its key
/// and a bucket besides. The agent computes `first_endpoint` (it is not on the wire) and always
/// rebuilds a shard's backend sets and endpoints together, so the two agree in every generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendSetEntry {
    pub endpoint_count: u32,
    pub lb_policy: u32,
    /// The set's first endpoint in its shard's endpoints array.
    pub first_endpoint: u32,
    pub pad: u32,
}

impl BackendSetEntry {
    pub const fn new(value: BackendSetValue, first_endpoint: u32) -> BackendSetEntry {
        BackendSetEntry {
            endpoint_count: value.endpoint_count,
            lb_policy: value.lb_policy,
            first_endpoint,
            pad: 0,
        }
    }

    /// The snapshot's value this entry was made from.
    pub const fn value(&self) -> BackendSetValue {
        BackendSetValue {
            endpoint_count: self.endpoint_count,
            lb_policy: self.lb_policy,
        }
    }
}

/// Key of the endpoints table of a snapshot (the kernel's endpoints arrays are indexed by
/// position: see [`BackendSetEntry`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointKey {
    pub set_id: u32,
    pub index: u32,
}

/// Value of the endpoints table: where a connection goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointValue {
    pub ip: Ip16,
    /// The target port, resolved per endpoint (named target ports differ between pods).
    pub port: u16,
    pub pad: u16,
    /// Stable ID of the endpoint's identity (service account), assigned by the operator.
    pub identity: u32,
}

/// Value of the enrolled map, keyed by network namespace cookie (`u64`). Only sockets of enrolled
/// network namespaces are steered.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EnrolledNetns {
    /// The workload's address; the source for [`lb_policy::SOURCE_IP_HASH`].
    pub workload_ip: Ip16,
    pub identity: u32,
    pub pad: u32,
}

/// Whether the agent writes an access log line per closed connection (`KmeshConfig.spec.accessLog`).
/// A user-space setting: the programs never read it.
pub mod access_log {
    pub const OFF: u8 = 0;
    pub const ON: u8 = 1;
}

/// The agent's log level (`KmeshConfig.spec.logLevel`), from least to most verbose. A user-space
/// setting: the programs never read it. Zero is not a level, so a zeroed record is refused rather
/// than read as some level.
pub mod log_level {
    pub const ERROR: u8 = 1;
    pub const WARN: u8 = 2;
    pub const INFO: u8 = 3;
    pub const DEBUG: u8 = 4;
    pub const TRACE: u8 = 5;

    /// The level's name as `tracing` and `KmeshConfig.spec.logLevel` write it (`info`), if
    /// `level` is one.
    pub const fn name(level: u8) -> Option<&'static str> {
        match level {
            ERROR => Some("error"),
            WARN => Some("warn"),
            INFO => Some("info"),
            DEBUG => Some("debug"),
            TRACE => Some("trace"),
            _ => None,
        }
    }

    /// The level named `name` (lowercase, as [`name`] writes it), if any.
    pub fn from_name(name: &str) -> Option<u8> {
        [ERROR, WARN, INFO, DEBUG, TRACE]
            .into_iter()
            .find(|&level| self::name(level) == Some(name))
    }
}

/// Per-node settings, part of each generation. The programs read `mode` only; the other fields
/// are settings of the agent, carried here so that one snapshot switches them on every node.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeConfig {
    /// One of [`mode`].
    pub mode: u32,
    /// One of [`access_log`].
    pub access_log: u8,
    /// One of [`log_level`].
    pub log_level: u8,
    /// Zero.
    pub reserved: [u8; 2],
}

impl NodeConfig {
    /// `mode` with the access log off and the log level `info`: the defaults of `KmeshConfig`.
    pub const fn with_mode(mode: u32) -> NodeConfig {
        NodeConfig {
            mode,
            access_log: access_log::OFF,
            log_level: log_level::INFO,
            reserved: [0; 2],
        }
    }
}

/// Which snapshot a generation holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotMeta {
    pub generation: u64,
    pub content_hash: u64,
}

/// Value of the generation table (one entry, key 0): the settings and identity of a generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GenerationValue {
    pub meta: SnapshotMeta,
    pub config: NodeConfig,
}

// Snapshot records: one per table entry. A snapshot section is an array of these, sorted by key.

/// A services table entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRecord {
    pub key: ServiceKey,
    pub value: ServiceValue,
}

/// A routes table entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteRecord {
    pub route_id: u32,
    pub value: RouteValue,
}

/// A backend sets table entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendSetRecord {
    pub set_id: u32,
    pub value: BackendSetValue,
}

/// An endpoints table entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointRecord {
    pub key: EndpointKey,
    pub value: EndpointValue,
}

/// A workload of this node that is in the mesh. The agent finds the network namespace holding
/// `ip` and enrols its cookie with an [`EnrolledNetns`] made from this record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadRecord {
    pub ip: Ip16,
    pub identity: u32,
    pub pad: u32,
}

/// Names of the maps, as declared by the programs and pinned by the agent.
pub mod map_names {
    /// `Array<u32, 1>`: the generation slot the programs read (0 or 1).
    pub const ACTIVE: &str = "KM_ACTIVE";
    /// `ArrayOfMaps<HashMap<u32, GenerationValue>>`, key 0.
    pub const GENERATION: &str = "KM_GENERATION";
    /// `ArrayOfMaps<HashMap<ServiceKey, ServiceValue>>`.
    pub const SERVICES: &str = "KM_SERVICES";
    /// `ArrayOfMaps<HashMap<u32, RouteValue>>`.
    pub const ROUTES: &str = "KM_ROUTES";
    /// `ArrayOfMaps<HashMap<u32, BackendSetEntry>>`.
    pub const BACKEND_SETS: &str = "KM_BACKEND_SETS";
    /// `ArrayOfMaps<Array<EndpointValue>>` (see [`BackendSetEntry`](crate::BackendSetEntry)).
    pub const ENDPOINTS: &str = "KM_ENDPOINTS";
    /// `HashMap<u64, EnrolledNetns>`, not per generation: enrolment follows namespaces, not snapshots.
    pub const ENROLLED: &str = "KM_ENROLLED";
    /// `PerCpuArray<u64>` indexed by [`super::counter`].
    pub const COUNTERS: &str = "KM_COUNTERS";
    /// `ArrayOfMaps<HashMap<Ip16, AuthzWorkloadValue>>`: see [`crate::authz`].
    pub const AUTHZ_WORKLOADS: &str = "KM_AUTHZ_WORKLOADS";
    /// `ArrayOfMaps<LpmTrie<AuthzSourceKey, AuthzSourceValue>>`.
    pub const AUTHZ_SOURCES: &str = "KM_AUTHZ_SOURCES";
    /// `ArrayOfMaps<HashMap<AuthzVerdictKey, AuthzVerdict>>`.
    pub const AUTHZ_VERDICTS: &str = "KM_AUTHZ_VERDICTS";
    /// `PerCpuHashMap<AuthzCounterKey, u64>`, not per generation.
    pub const AUTHZ_COUNTERS: &str = "KM_AUTHZ_COUNTERS";
    /// `HashMap<Ip16, HostAddrValue>`, not per generation: the node's own addresses.
    pub const HOST_ADDRS: &str = "KM_HOST_ADDRS";
    /// `RingBuf` of [`crate::ConnEvent`]s, not per generation; its size is set at load time.
    pub const EVENTS: &str = "KM_EVENTS";
    /// `PerCpuArray<u64>` indexed by [`crate::events::events_dropped`]: events lost to a full ring.
    pub const EVENTS_DROPPED: &str = "KM_EVENTS_DROPPED";
    /// `SkStorage<SockState>`: per-socket state of enrolled workloads' connections.
    pub const SOCK_STATE: &str = "KM_SOCK_STATE";
}

/// Number of generation slots in every per-generation outer map.
pub const GENERATION_SLOTS: u32 = 2;

/// Flags of every per-generation inner hash map (template and instances must agree).
/// `BPF_F_NO_PREALLOC`: a generation costs memory for what it holds, not for its capacity.
pub const INNER_MAP_FLAGS: u32 = 1;

/// Flags of the endpoints' inner arrays (template and instances must agree). `BPF_F_INNER_MAP`:
/// the arrays may differ in length from the template (each is sized to its shard).
pub const INNER_ARRAY_FLAGS: u32 = 1 << 12;

/// Capacity of the enrolled map: network namespaces on one node.
pub const MAX_ENROLLED_NETNS: u32 = 16_384;

/// Capacity of the authorization counters: (workload, policy, verdict) triples on one node. A
/// connection whose triple finds the map full is still decided, and counted in
/// [`counter::AUTHZ_COUNTERS_FULL`].
pub const MAX_AUTHZ_COUNTERS: u32 = 65_536;

/// Capacity of the host addresses map.
pub const MAX_HOST_ADDRS: u32 = 1_024;

/// Indexes of the per-CPU counters the programs keep.
pub mod counter {
    /// A connect to a service was rewritten to an endpoint.
    pub const REWRITTEN: u32 = 0;
    /// A connect to a known service was refused: the chosen backend set has no endpoint.
    pub const REFUSED_NO_ENDPOINT: u32 = 1;
    /// A connect was refused because the endpoint's address family cannot serve the socket.
    pub const REFUSED_FAMILY: u32 = 2;
    /// The snapshot referenced something missing (cannot happen with a verified snapshot). An
    /// authorization lookup that finds no verdict denies (fail closed) and counts here.
    pub const INCONSISTENT: u32 = 3;
    /// A new inbound connection to a workload bound by policy was allowed.
    pub const AUTHZ_ALLOWED: u32 = 4;
    /// A new inbound connection was denied.
    pub const AUTHZ_DENIED: u32 = 5;
    /// A new inbound connection from the node's own address passed without a policy check.
    pub const AUTHZ_NODE_EXEMPT: u32 = 6;
    /// A decided connection could not be counted per policy: the counters map is full.
    pub const AUTHZ_COUNTERS_FULL: u32 = 7;
    /// A SYN of a connection steered to a waypoint left without its origin option
    /// ([`crate::waypoint_origin`]): the option could not be reserved or written (no room left
    /// in the SYN's option space). The waypoint sees the connection without an origin.
    pub const WAYPOINT_ORIGIN_FAILED: u32 = 8;
    /// Number of counters.
    pub const COUNT: u32 = 9;
}

// The records' bytes are copied as they are: no implicit padding anywhere.
const _: () = {
    assert!(size_of::<ServiceKey>() == 20);
    assert!(size_of::<ServiceValue>() == 12);
    assert!(size_of::<RouteValue>() == 8 + 8 * MAX_ROUTE_DESTINATIONS);
    assert!(size_of::<BackendSetValue>() == 8);
    assert!(size_of::<BackendSetEntry>() == 16);
    assert!(size_of::<EndpointKey>() == 8);
    assert!(size_of::<EndpointValue>() == 24);
    assert!(size_of::<EnrolledNetns>() == 24);
    assert!(size_of::<NodeConfig>() == 8);
    assert!(size_of::<SnapshotMeta>() == 16);
    assert!(size_of::<GenerationValue>() == 24);
    assert!(size_of::<ServiceRecord>() == 32);
    assert!(size_of::<RouteRecord>() == 4 + size_of::<RouteValue>());
    assert!(size_of::<BackendSetRecord>() == 12);
    assert!(size_of::<EndpointRecord>() == 32);
    assert!(size_of::<WorkloadRecord>() == 24);
};

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: every record is repr(C), made of integers only, with no implicit padding (see the size
    // assertions above), so any bit pattern is valid and all bytes are initialized.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for RouteValue {}
    unsafe impl aya::Pod for BackendSetValue {}
    unsafe impl aya::Pod for BackendSetEntry {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointValue {}
    unsafe impl aya::Pod for EnrolledNetns {}
    unsafe impl aya::Pod for GenerationValue {}
    unsafe impl aya::Pod for AuthzWorkloadValue {}
    unsafe impl aya::Pod for AuthzSourceKey {}
    unsafe impl aya::Pod for AuthzSourceValue {}
    unsafe impl aya::Pod for AuthzVerdictKey {}
    unsafe impl aya::Pod for AuthzVerdict {}
    unsafe impl aya::Pod for AuthzCounterKey {}
    unsafe impl aya::Pod for HostAddrValue {}
    unsafe impl aya::Pod for ConnEvent {}
    unsafe impl aya::Pod for SockState {}
}

#[cfg(test)]
mod tests {
    use super::log_level;

    #[test]
    fn log_level_names_round_trip_and_nothing_else_is_a_level() {
        for level in 0..=u8::MAX {
            match log_level::name(level) {
                Some(name) => assert_eq!(log_level::from_name(name), Some(level)),
                None => assert!(!(log_level::ERROR..=log_level::TRACE).contains(&level)),
            }
        }
        assert_eq!(log_level::name(log_level::WARN), Some("warn"));
        assert_eq!(log_level::from_name("INFO"), None, "lowercase only");
        assert_eq!(log_level::from_name("off"), None);
    }
}
