//! Errors of encoding, decoding and validating snapshots. Every message names the section, the record
//! index and the field, so that an operator reading an agent's log can find the fault.

use core::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kmesh_common::authz::{
    ANY_CLASS, MAX_POLICY_NAME_LEN, UNKNOWN_SOURCE, authz_action, authz_policy_kind, authz_reason,
};
use kmesh_common::{IPPROTO_TCP, Ip16, MAX_ROUTE_DESTINATIONS, ServiceKey, service_flags};

/// The tables (sections) of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    NodeConfig,
    Services,
    Routes,
    BackendSets,
    Endpoints,
    Workloads,
    AuthzWorkloads,
    AuthzSources,
    AuthzVerdicts,
    AuthzPolicies,
    NameStrings,
    WorkloadNames,
    ServiceNames,
}

impl Table {
    /// All tables in wire order.
    pub const ALL: [Table; 13] = [
        Table::NodeConfig,
        Table::Services,
        Table::Routes,
        Table::BackendSets,
        Table::Endpoints,
        Table::Workloads,
        Table::AuthzWorkloads,
        Table::AuthzSources,
        Table::AuthzVerdicts,
        Table::AuthzPolicies,
        Table::NameStrings,
        Table::WorkloadNames,
        Table::ServiceNames,
    ];

    /// The section kind on the wire.
    pub const fn kind(self) -> u32 {
        match self {
            Table::NodeConfig => 1,
            Table::Services => 2,
            Table::Routes => 3,
            Table::BackendSets => 4,
            Table::Endpoints => 5,
            Table::Workloads => 6,
            Table::AuthzWorkloads => 7,
            Table::AuthzSources => 8,
            Table::AuthzVerdicts => 9,
            Table::AuthzPolicies => 10,
            Table::NameStrings => 11,
            Table::WorkloadNames => 12,
            Table::ServiceNames => 13,
        }
    }

    /// Whether the agent loads the table into an eBPF map: every table but the names, which are
    /// for user space only.
    pub const fn is_map(self) -> bool {
        !matches!(
            self,
            Table::NameStrings | Table::WorkloadNames | Table::ServiceNames
        )
    }

    /// The table's name in metric labels and JSON: `services`, `backend_sets`, `authz_sources`.
    pub const fn label(self) -> &'static str {
        match self {
            Table::NodeConfig => "node_config",
            Table::Services => "services",
            Table::Routes => "routes",
            Table::BackendSets => "backend_sets",
            Table::Endpoints => "endpoints",
            Table::Workloads => "workloads",
            Table::AuthzWorkloads => "authz_workloads",
            Table::AuthzSources => "authz_sources",
            Table::AuthzVerdicts => "authz_verdicts",
            Table::AuthzPolicies => "authz_policies",
            Table::NameStrings => "name_strings",
            Table::WorkloadNames => "workload_names",
            Table::ServiceNames => "service_names",
        }
    }

    /// The name of one record of this table, as used in messages ("route 12 (route_id 7): ...").
    pub const fn record_name(self) -> &'static str {
        match self {
            Table::NodeConfig => "node config",
            Table::Services => "service",
            Table::Routes => "route",
            Table::BackendSets => "backend set",
            Table::Endpoints => "endpoint",
            Table::Workloads => "workload",
            Table::AuthzWorkloads => "authorization workload",
            Table::AuthzSources => "authorization source",
            Table::AuthzVerdicts => "authorization verdict",
            Table::AuthzPolicies => "authorization policy",
            Table::NameStrings => "name string chunk",
            Table::WorkloadNames => "workload name",
            Table::ServiceNames => "service name",
        }
    }
}

/// The section name: "services section holds ...".
impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Table::NodeConfig => "node config",
            Table::Services => "services",
            Table::Routes => "routes",
            Table::BackendSets => "backend sets",
            Table::Endpoints => "endpoints",
            Table::Workloads => "workloads",
            Table::AuthzWorkloads => "authorization workloads",
            Table::AuthzSources => "authorization sources",
            Table::AuthzVerdicts => "authorization verdicts",
            Table::AuthzPolicies => "authorization policies",
            Table::NameStrings => "name strings",
            Table::WorkloadNames => "workload names",
            Table::ServiceNames => "service names",
        })
    }
}

/// A rule of the snapshot's content is broken. Produced by [`crate::Snapshot::validate`], and
/// therefore by both the encoder and the decoder.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("node name {name:?} {reason}")]
    InvalidNodeName { name: String, reason: &'static str },

    #[error("node config: mode {mode} is unknown (0 disabled, 1 kernel-native, 2 dual-engine)")]
    UnknownMode { mode: u32 },

    #[error("node config: access_log is {access_log}, unknown (0 off, 1 on)")]
    UnknownAccessLog { access_log: u8 },

    #[error(
        "node config: log_level is {log_level}, unknown (1 error, 2 warn, 3 info, 4 debug, 5 trace)"
    )]
    UnknownLogLevel { log_level: u8 },

    #[error("node config: reserved is {reserved:?}, must be zero")]
    NodeConfigReserved { reserved: [u8; 2] },

    /// Two records with the same key. `record` describes the key.
    #[error(
        "{} {index} ({record}): same key as the previous record; keys in the {table} section must be unique",
        .table.record_name()
    )]
    DuplicateKey {
        table: Table,
        index: usize,
        record: String,
    },

    /// A record's key is smaller than the previous record's.
    #[error(
        "{} {index} ({record}): key is smaller than the previous record's ({previous}); the {table} section must be sorted by key",
        .table.record_name()
    )]
    OutOfOrder {
        table: Table,
        index: usize,
        record: String,
        previous: String,
    },

    #[error("{} {index} ({record}): {field} is {value}, must be zero", .table.record_name())]
    NonZeroPad {
        table: Table,
        index: usize,
        record: String,
        field: &'static str,
        value: u32,
    },

    #[error("{} {index} ({record}): port is 0", .table.record_name())]
    ZeroPort {
        table: Table,
        index: usize,
        record: String,
    },

    #[error(
        "service {index} ({record}): protocol is {protocol}, only TCP ({IPPROTO_TCP}) is supported"
    )]
    ServiceProtocol {
        index: usize,
        record: String,
        protocol: u8,
    },

    /// A service's flags have a bit `kmesh_common::service_flags` does not define: a snapshot of
    /// a newer layout, or a corrupt one.
    #[error(
        "service {index} ({record}): flags are {flags:#x}, unknown bits {:#x} (known: {:#x} waypoint)",
        .flags & !service_flags::ALL,
        service_flags::ALL
    )]
    UnknownServiceFlags {
        index: usize,
        record: String,
        flags: u32,
    },

    #[error(
        "service {index} ({record}): route_id {route_id} references a route which does not exist"
    )]
    ServiceRouteMissing {
        index: usize,
        record: String,
        route_id: u32,
    },

    #[error(
        "route {index} (route_id {route_id}): destination_count is {count}, must be 1..={MAX_ROUTE_DESTINATIONS}"
    )]
    RouteDestinationCount {
        index: usize,
        route_id: u32,
        count: u32,
    },

    /// `cumulative_weight[destination]` is not above the previous one (or is 0 for destination 0):
    /// the destination's own weight is not positive.
    #[error(
        "route {index} (route_id {route_id}): cumulative_weight[{destination}] is {weight}, must be greater than {previous} (every destination weight must be positive)"
    )]
    RouteWeightNotIncreasing {
        index: usize,
        route_id: u32,
        destination: usize,
        weight: u32,
        previous: u32,
    },

    #[error(
        "route {index} (route_id {route_id}): total_weight is {total_weight}, must equal the last cumulative weight {last}"
    )]
    RouteTotalWeight {
        index: usize,
        route_id: u32,
        total_weight: u32,
        last: u32,
    },

    /// An array entry at or beyond `destination_count` is not zero.
    #[error(
        "route {index} (route_id {route_id}): {field}[{slot}] is {value}, must be zero beyond destination_count {count}"
    )]
    RouteUnusedSlot {
        index: usize,
        route_id: u32,
        field: &'static str,
        slot: usize,
        value: u32,
        count: u32,
    },

    #[error(
        "route {index} (route_id {route_id}): destination {destination} references backend set {set_id} which does not exist"
    )]
    RouteBackendSetMissing {
        index: usize,
        route_id: u32,
        destination: usize,
        set_id: u32,
    },

    #[error(
        "backend set {index} (set_id {set_id}): lb_policy is {lb_policy}, unknown (0 random, 1 source-ip-hash)"
    )]
    UnknownLbPolicy {
        index: usize,
        set_id: u32,
        lb_policy: u32,
    },

    #[error(
        "endpoint {index} (set {set_id}, index {endpoint_index}): references backend set {set_id} which does not exist"
    )]
    EndpointSetMissing {
        index: usize,
        set_id: u32,
        endpoint_index: u32,
    },

    #[error(
        "endpoint {index} (set {set_id}, index {endpoint_index}): index is not below the set's endpoint_count {endpoint_count}"
    )]
    EndpointBeyondCount {
        index: usize,
        set_id: u32,
        endpoint_index: u32,
        endpoint_count: u32,
    },

    #[error(
        "backend set {index} (set_id {set_id}): endpoint_count is {endpoint_count} but endpoint index {missing} is missing"
    )]
    EndpointMissing {
        index: usize,
        set_id: u32,
        endpoint_count: u32,
        missing: u32,
    },
    // Authorization tables (see `kmesh_common::authz`).
    /// A workload's verdict set has no default verdict, so some connection to it would find no
    /// verdict at all.
    #[error(
        "authorization workload {index} ({record}): policy_set {policy_set} has no default verdict (set {policy_set}, any class, any port) in the authorization verdicts section"
    )]
    AuthzWorkloadSetMissing {
        index: usize,
        record: String,
        policy_set: u32,
    },

    #[error("authorization source {index} ({record}): prefix_len is {prefix_len}, must be 0..=128")]
    AuthzSourcePrefixLen {
        index: usize,
        record: String,
        prefix_len: u32,
    },

    /// A prefix shorter than 96 bits that holds the IPv4-mapped range `::ffff:0:0/96`: the kernel's
    /// trie would match IPv4 sources against it as if it were an IPv4 block.
    #[error(
        "authorization source {index} ({record}): prefix_len {prefix_len} is below 96 and the prefix holds IPv4-mapped addresses (::ffff:0:0/96), so it would match IPv4 and IPv6 sources alike, and the table has no entry for ::ffff:0:0/96 to keep IPv4 sources out of it; IPv4 blocks need prefix_len 96..=128"
    )]
    AuthzSourceMixesFamilies {
        index: usize,
        record: String,
        prefix_len: u32,
    },

    #[error(
        "authorization source {index} ({record}): address bits past prefix_len {prefix_len} are not zero"
    )]
    AuthzSourceNotCanonical {
        index: usize,
        record: String,
        prefix_len: u32,
    },

    #[error(
        "authorization source {index} ({record}): source_class is {source_class}, must be neither {UNKNOWN_SOURCE} (unknown source) nor {ANY_CLASS} (any class)"
    )]
    AuthzSourceClass {
        index: usize,
        record: String,
        source_class: u32,
    },

    #[error(
        "authorization verdict {index} ({record}): action is {action}, unknown (1 allow, 2 deny)"
    )]
    AuthzUnknownAction {
        index: usize,
        record: String,
        action: u8,
    },

    #[error(
        "authorization verdict {index} ({record}): reason is {reason}, must be 1..{}",
        authz_reason::COUNT
    )]
    AuthzUnknownReason {
        index: usize,
        record: String,
        reason: u8,
    },

    /// Allow only with reasons NO_ALLOW_POLICY and ALLOW_MATCHED, deny only with the others.
    #[error(
        "authorization verdict {index} ({record}): action {} does not go with reason {}",
        action_name(*.action),
        reason_name(*.reason)
    )]
    AuthzReasonAction {
        index: usize,
        record: String,
        action: u8,
        reason: u8,
    },

    /// NO_ALLOW_POLICY and NO_ALLOW_MATCHED have no deciding policy: their `policy` is 0.
    #[error(
        "authorization verdict {index} ({record}): policy is {policy}, must be 0 for reason {}",
        reason_name(*.reason)
    )]
    AuthzVerdictPolicyNotZero {
        index: usize,
        record: String,
        reason: u8,
        policy: u32,
    },

    /// Every reason but NO_ALLOW_POLICY and NO_ALLOW_MATCHED names its deciding policy.
    #[error(
        "authorization verdict {index} ({record}): policy is 0, reason {} needs the deciding policy",
        reason_name(*.reason)
    )]
    AuthzVerdictPolicyZero {
        index: usize,
        record: String,
        reason: u8,
    },

    #[error(
        "authorization verdict {index} ({record}): policy {policy} references an authorization policy which does not exist"
    )]
    AuthzVerdictPolicyMissing {
        index: usize,
        record: String,
        policy: u32,
    },

    /// STRICT_MTLS names a PeerAuthentication, every other reason an AuthorizationPolicy.
    #[error(
        "authorization verdict {index} ({record}): policy {policy} is of kind {}, reason {} needs kind {}",
        policy_kind_name(*.kind),
        reason_name(*.reason),
        policy_kind_name(*.expected)
    )]
    AuthzVerdictPolicyKind {
        index: usize,
        record: String,
        policy: u32,
        reason: u8,
        kind: u8,
        expected: u8,
    },

    #[error("authorization policy {index}: policy is 0, must be a non-zero ID")]
    AuthzPolicyIdZero { index: usize },

    #[error(
        "authorization policy {index} (policy {policy}): kind is {kind}, unknown (1 AuthorizationPolicy, 2 PeerAuthentication)"
    )]
    AuthzPolicyKind { index: usize, policy: u32, kind: u8 },

    #[error(
        "authorization policy {index} (policy {policy}): name_len is {name_len}, must be 1..={MAX_POLICY_NAME_LEN}"
    )]
    AuthzPolicyNameLen {
        index: usize,
        policy: u32,
        name_len: u16,
    },

    /// A byte of `name` at or past `name_len` is not zero.
    #[error(
        "authorization policy {index} (policy {policy}): name[{offset}] is {value}, must be zero beyond name_len {name_len}"
    )]
    AuthzPolicyNameTail {
        index: usize,
        policy: u32,
        name_len: u16,
        offset: usize,
        value: u8,
    },

    /// The name is not `namespace/name` with a DNS label and a DNS subdomain.
    #[error("authorization policy {index} (policy {policy}): name {name:?} {reason}")]
    AuthzPolicyName {
        index: usize,
        policy: u32,
        name: String,
        reason: &'static str,
    },

    /// Sources, verdicts or policies with no authorization workload to use them.
    #[error(
        "the authorization workloads section is empty but the {table} section holds {count} records; authorization tables are all empty or have a workload"
    )]
    AuthzWithoutWorkloads { table: Table, count: usize },

    // Names (see `kmesh_common::names`).
    #[error("name strings: the table is {len} bytes, must be a multiple of 8 below 4 GiB")]
    NameTableLength { len: usize },

    #[error(
        "name strings: the entry at offset {offset} has length {len}, must be 1..={}",
        kmesh_common::names::MAX_NAME_LEN
    )]
    NameLength { offset: u32, len: usize },

    #[error(
        "name strings: the entry at offset {offset} needs {len} bytes, only {remaining} remain in the table"
    )]
    NameOverrun {
        offset: u32,
        len: usize,
        remaining: usize,
    },

    #[error("name strings: the entry at offset {offset} is not UTF-8")]
    NameNotUtf8 { offset: u32 },

    #[error(
        "name strings: the entry at offset {offset} repeats the one at offset {first}; each string is stored once"
    )]
    NameDuplicate { offset: u32, first: u32 },

    /// A record's field is neither `NO_NAME` nor the offset of an entry of the string table.
    #[error(
        "{} {index} ({record}): {field} is offset {offset}, which is not the start of a string in the name strings section",
        .table.record_name()
    )]
    NameOffset {
        table: Table,
        index: usize,
        record: String,
        field: &'static str,
        offset: u32,
    },

    #[error("{} {index} ({record}): {field} is missing (NO_NAME)", .table.record_name())]
    NameMissing {
        table: Table,
        index: usize,
        record: String,
        field: &'static str,
    },

    #[error(
        "service name {index} (service_id {service_id}): no service of the services section has this service_id"
    )]
    ServiceNameWithoutService { index: usize, service_id: u32 },
}

/// The input is not a valid snapshot, or exceeds the node's limits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Checked before anything else, so an oversized input costs no hashing.
    #[error("snapshot is {len} bytes, the limit is {max} bytes")]
    TooLarge { len: u64, max: u64 },

    /// `found` holds the first (up to) eight bytes of the input.
    #[error(
        "not a kmesh snapshot: magic is {found:02x?}, expected {:02x?}",
        crate::MAGIC
    )]
    BadMagic { found: Vec<u8> },

    #[error("truncated: {len} bytes, shorter than the {min}-byte fixed header")]
    TooShort { len: u64, min: u64 },

    #[error("unsupported snapshot format version {found}, this build reads versions 2, 3 and 4")]
    UnsupportedFormatVersion { found: u16 },

    /// `found` holds the first (up to) eight bytes of the input.
    #[error(
        "not a kmesh snapshot delta: magic is {found:02x?}, expected {:02x?}",
        crate::delta_format::DELTA_MAGIC
    )]
    DeltaMagic { found: Vec<u8> },

    /// A delta's `node_part_len` is not a multiple of 8 at least as long as a node part's fixed
    /// fields, or runs past the end of the delta.
    #[error(
        "the delta's node part is {len} bytes: not a multiple of 8 of at least 16 within the {available} bytes after the header"
    )]
    DeltaNodePartLen { len: u64, available: u64 },

    /// A delta's string table section holds bytes, but its flags do not say the table is replaced.
    #[error("the delta's string table holds {bytes} bytes but its flags do not replace the table")]
    DeltaStrings { bytes: u64 },

    /// Format 3: `cluster_offset` is before the node name, not a multiple of 8, or past the end.
    #[error(
        "the cluster part's offset {offset} is not a multiple of 8 between 48 and the snapshot's length {len}"
    )]
    ClusterOffset { offset: u64, len: u64 },

    /// Format 3: the node part's sections do not end where the cluster part starts.
    #[error(
        "the node part's sections end at offset {end}, the cluster part starts at {cluster_offset}"
    )]
    NodePartEnd { end: u64, cluster_offset: u64 },

    #[error("snapshot layout version {found} differs from this build's layout version {expected}")]
    LayoutVersionMismatch { found: u16, expected: u16 },

    #[error("header flags is {flags:#x}, must be zero")]
    HeaderFlags { flags: u32 },

    #[error("truncated: header says {expected} bytes, got {got}")]
    Truncated { expected: u64, got: u64 },

    #[error("trailing bytes: header says {expected} bytes, got {got}")]
    TrailingBytes { expected: u64, got: u64 },

    #[error("content hash mismatch: header {header:#018x}, computed {computed:#018x}")]
    HashMismatch { header: u64, computed: u64 },

    /// A header, name or padding runs past the end of the input.
    #[error("{what} at offset {offset} needs {needed} bytes, only {remaining} remain")]
    Overrun {
        what: String,
        offset: u64,
        needed: u64,
        remaining: u64,
    },

    #[error("{what} at offset {offset}: padding is not zero")]
    NonZeroPadding { what: String, offset: u64 },

    /// Sections are missing, repeated or out of order.
    #[error("section at offset {offset}: kind is {found}, expected {expected} ({table} section)")]
    SectionKind {
        offset: u64,
        found: u32,
        expected: u32,
        table: Table,
    },

    #[error("{table} section: record_size is {found}, expected {expected}")]
    RecordSize {
        table: Table,
        found: u32,
        expected: u32,
    },

    #[error("{table} section: reserved is {value:#x}, must be zero")]
    SectionReserved { table: Table, value: u32 },

    #[error(
        "{table} section: {count} records of {record_size} bytes at offset {offset} need {needed} bytes, only {remaining} remain"
    )]
    SectionOverrun {
        table: Table,
        count: u32,
        record_size: u32,
        offset: u64,
        needed: u64,
        remaining: u64,
    },

    #[error("node config section holds {count} records, exactly 1 is required")]
    NodeConfigCount { count: u32 },

    /// The snapshot is well formed but larger than this node accepts ([`crate::Limits`]).
    #[error("{table} section holds {count} records, capacity is {capacity}")]
    OverCapacity {
        table: Table,
        count: u32,
        capacity: u32,
    },

    /// The names' string table is larger than this node accepts (`Limits::max_name_bytes`).
    #[error("name strings section holds {bytes} bytes, capacity is {capacity} bytes")]
    NameBytesOverCapacity { bytes: u64, capacity: u32 },

    #[error("{len} bytes after the last section at offset {offset}")]
    TrailingData { offset: u64, len: u64 },

    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

/// A snapshot cannot be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The snapshot breaks a rule the decoder would refuse it for.
    #[error(transparent)]
    Invalid(#[from] ValidationError),

    /// A table has more records than a section's `u32` count holds.
    #[error(
        "{table} table holds {count} records, a section holds at most {}",
        u32::MAX
    )]
    TooManyRecords { table: Table, count: usize },

    /// A node part asked for in a format that has none (format 2 is one piece).
    #[error("format {format} has no node and cluster parts")]
    NoParts { format: u16 },

    /// A delta's node part is not a format 4 node part as [`crate::NodeTables::encode`] writes it.
    #[error("not a format 4 node part: {0}")]
    NotANodePart(Box<DecodeError>),

    /// A delta's node part was encoded for another cluster part than the delta's result.
    #[error(
        "the node part's content hash {node_part:016x} is not that of the delta's result {delta:016x}"
    )]
    NodePartOfAnotherCluster { node_part: u64, delta: u64 },
}

/// An address for messages: dotted quad for IPv4-mapped addresses, IPv6 notation otherwise.
pub(crate) fn ip_to_addr(ip: &Ip16) -> IpAddr {
    match kmesh_common::as_ipv4(ip) {
        Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        None => IpAddr::V6(Ipv6Addr::from(*ip)),
    }
}

/// A service key for messages: `10.96.0.10:80/6`, `[fd00::1]:443/6`.
pub(crate) fn describe_service(key: &ServiceKey) -> String {
    match ip_to_addr(&key.ip) {
        IpAddr::V4(v4) => format!("{v4}:{}/{}", key.port, key.protocol),
        IpAddr::V6(v6) => format!("[{v6}]:{}/{}", key.port, key.protocol),
    }
}

/// An action of `authz_action` for messages: `allow`, `deny`, or the number.
pub(crate) fn action_name(action: u8) -> String {
    match action {
        authz_action::ALLOW => "allow".into(),
        authz_action::DENY => "deny".into(),
        other => other.to_string(),
    }
}

/// A reason of `authz_reason` for messages: its constant's name, or the number.
pub(crate) fn reason_name(reason: u8) -> String {
    match reason {
        authz_reason::NO_ALLOW_POLICY => "NO_ALLOW_POLICY".into(),
        authz_reason::ALLOW_MATCHED => "ALLOW_MATCHED".into(),
        authz_reason::DENY_MATCHED => "DENY_MATCHED".into(),
        authz_reason::NO_ALLOW_MATCHED => "NO_ALLOW_MATCHED".into(),
        authz_reason::STRICT_MTLS => "STRICT_MTLS".into(),
        authz_reason::UNCOMPILABLE => "UNCOMPILABLE".into(),
        other => other.to_string(),
    }
}

/// A kind of `authz_policy_kind` for messages: the Kubernetes kind, or the number.
pub(crate) fn policy_kind_name(kind: u8) -> String {
    match kind {
        authz_policy_kind::AUTHORIZATION_POLICY => "AuthorizationPolicy".into(),
        authz_policy_kind::PEER_AUTHENTICATION => "PeerAuthentication".into(),
        other => other.to_string(),
    }
}
