//! Which shard of a cluster table a key lives in (`docs/incremental-snapshots.md`, section 1):
//! each of the services, routes, backend sets and endpoints tables is split by key into
//! [`CLUSTER_SHARDS`] inner maps per generation slot, so that a change rebuilds only the shards it
//! touches. Defined once, here, and used by the kernel programs (which look a key up in the inner
//! map at [`outer_index`]) and by the agent (which fills the shards); a key in the wrong shard is a
//! key the programs never find.
//!
//! A backend set's endpoints share its shard (both go by the set's id), so the rule that a set's
//! endpoints are exactly `0..endpoint_count` holds within one shard.
//!
//! No loops and no branches: the verifier accepts these inside any program.
use crate::{EndpointKey, ServiceKey};

/// log2 of [`CLUSTER_SHARDS`].
pub const SHARD_BITS: u32 = 6;

/// Shards per cluster table and generation slot.
pub const CLUSTER_SHARDS: u32 = 1 << SHARD_BITS;

/// The shard of a 32-bit id (a route or backend set id): the top bits of a multiplicative hash
/// (Knuth's, with the 32-bit golden ratio), so that consecutive or patterned ids spread evenly.
#[inline(always)]
pub const fn shard_of_id(id: u32) -> u32 {
    id.wrapping_mul(0x9E37_79B1) >> (32 - SHARD_BITS)
}

/// The shard of a route, by its id.
#[inline(always)]
pub const fn shard_of_route(route_id: u32) -> u32 {
    shard_of_id(route_id)
}

/// The shard of a backend set, by its id.
#[inline(always)]
pub const fn shard_of_backend_set(set_id: u32) -> u32 {
    shard_of_id(set_id)
}

/// The shard of an endpoint: its set's.
#[inline(always)]
pub const fn shard_of_endpoint(key: &EndpointKey) -> u32 {
    shard_of_id(key.set_id)
}

/// The shard of a service: its address's four 32-bit words and its port folded into one word,
/// each rotated differently so that addresses differing in one word only (IPv4-mapped ones differ
/// in the last) still spread, then hashed as an id.
#[inline(always)]
pub const fn shard_of_service(key: &ServiceKey) -> u32 {
    let ip = &key.ip;
    let w0 = u32::from_le_bytes([ip[0], ip[1], ip[2], ip[3]]);
    let w1 = u32::from_le_bytes([ip[4], ip[5], ip[6], ip[7]]);
    let w2 = u32::from_le_bytes([ip[8], ip[9], ip[10], ip[11]]);
    let w3 = u32::from_le_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let folded = w0
        ^ w1.rotate_left(8)
        ^ w2.rotate_left(16)
        ^ w3.rotate_left(24)
        ^ (key.port as u32).wrapping_mul(0x85EB_CA6B);
    shard_of_id(folded)
}

/// The entry of an outer map that holds `shard` of `slot`.
#[inline(always)]
pub const fn outer_index(slot: u32, shard: u32) -> u32 {
    slot * CLUSTER_SHARDS + shard
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IPPROTO_TCP, ipv4_mapped};

    fn service(octets: [u8; 4], port: u16) -> ServiceKey {
        ServiceKey {
            ip: ipv4_mapped(octets),
            port,
            protocol: IPPROTO_TCP,
            pad: 0,
        }
    }

    /// Every shard of `shards` holds between half and twice its share of `n` keys.
    fn assert_even(shards: impl Iterator<Item = u32>, n: usize, what: &str) {
        let mut counts = [0usize; CLUSTER_SHARDS as usize];
        for s in shards {
            assert!(s < CLUSTER_SHARDS, "{what}: shard {s} out of range");
            counts[s as usize] += 1;
        }
        let share = n / CLUSTER_SHARDS as usize;
        for (shard, &count) in counts.iter().enumerate() {
            assert!(
                count >= share / 2 && count <= share * 2,
                "{what}: shard {shard} holds {count} of {n} keys (share {share}): {counts:?}"
            );
        }
    }

    #[test]
    fn consecutive_ids_spread_evenly() {
        assert_even((0..64_000u32).map(shard_of_id), 64_000, "ids 0..64000");
        assert_even(
            (0..64_000u32).map(|i| shard_of_id(i << 12)),
            64_000,
            "ids with low bits zero",
        );
    }

    #[test]
    fn services_of_a_service_cidr_spread_evenly() {
        // 10.96.0.0/16, ports 80 and 443: the addresses differ in the last word only.
        let keys = (0..32_000u32).map(|i| {
            let [_, _, a, b] = i.to_be_bytes();
            service([10, 96, a, b], if i % 2 == 0 { 80 } else { 443 })
        });
        assert_even(keys.map(|k| shard_of_service(&k)), 32_000, "10.96.0.0/16");
        // One address, many ports.
        let keys = (1..=32_000u16).map(|port| service([10, 96, 0, 10], port));
        assert_even(
            keys.map(|k| shard_of_service(&k)),
            32_000,
            "one VIP, many ports",
        );
    }

    #[test]
    fn an_endpoint_is_in_its_sets_shard() {
        for set_id in [0, 1, 7, 0xdead_beef, u32::MAX] {
            for index in [0, 1, 99] {
                assert_eq!(
                    shard_of_endpoint(&EndpointKey { set_id, index }),
                    shard_of_backend_set(set_id)
                );
            }
        }
    }

    #[test]
    fn outer_indexes_of_the_two_slots_do_not_overlap() {
        assert_eq!(outer_index(0, CLUSTER_SHARDS - 1) + 1, outer_index(1, 0));
        assert_eq!(outer_index(1, CLUSTER_SHARDS - 1), 2 * CLUSTER_SHARDS - 1);
    }
}
