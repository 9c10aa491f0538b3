//! The incremental swap against the whole one, in this kernel's maps: random sequences of
//! snapshots, each applied to one installation as a change from the snapshot before it (only the
//! changed shards rebuilt, `kmesh_agent::maps`) and to another as a whole; after every step the
//! live slot of both holds exactly the snapshot's records, table by table, and the incremental
//! installation's two slots hold the same.
//!
//! The sequences come from a seeded generator (the seed is in every failure message): clusters of
//! up to 40 services whose backend sets grow, shrink, move their endpoints, change their balancing,
//! go empty and come back, services and routes that come and go, weights that change, and
//! authorization tables that change now and then, so that steps touch one shard, a few, or all.
use std::net::{IpAddr, Ipv4Addr};

use kmesh_agent::{
    loader::{self, BpfObject},
    maps::{GenerationMaps, Slot, SlotMaps, SlotTable},
};
use kmesh_common::{GenerationValue, NodeConfig, SnapshotMeta, authz, lb_policy, mode};
use kmesh_snapshot::{
    Snapshot,
    builder::{Endpoint, SnapshotBuilder},
};
use kmesh_tests::{AgentDir, TestCgroup};

/// xorshift64*: small, seeded, enough to draw test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A cluster as the generator varies it: per service, whether it exists, its backend sets'
/// endpoint counts and port, its balancing, and a weight.
#[derive(Clone)]
struct Cluster {
    services: Vec<Service>,
    authz_variant: u8,
}

#[derive(Clone)]
struct Service {
    present: bool,
    /// Endpoints of each of its (up to three) backend sets.
    sets: Vec<u8>,
    port: u16,
    source_hash: bool,
    weight: u32,
}

impl Cluster {
    fn new(rng: &mut Rng) -> Cluster {
        let services = (0..40)
            .map(|_| Service {
                present: rng.below(4) != 0,
                sets: (0..1 + rng.below(3)).map(|_| rng.below(5) as u8).collect(),
                port: 8000 + rng.below(3) as u16,
                source_hash: rng.below(2) == 0,
                weight: 1 + rng.below(9) as u32,
            })
            .collect();
        Cluster {
            services,
            authz_variant: 0,
        }
    }

    /// One step: a few services changed in one way each, or (now and then) most of them.
    fn step(&mut self, rng: &mut Rng) {
        let changes = if rng.below(8) == 0 {
            30
        } else {
            1 + rng.below(3)
        };
        for _ in 0..changes {
            let i = rng.below(self.services.len() as u64) as usize;
            let s = &mut self.services[i];
            match rng.below(7) {
                0 => s.present = !s.present,
                1 => {
                    let j = rng.below(s.sets.len() as u64) as usize;
                    s.sets[j] = rng.below(6) as u8; // grows, shrinks or empties a set
                }
                2 => s.port = 8000 + rng.below(3) as u16,
                3 => s.source_hash = !s.source_hash,
                4 => s.weight = 1 + rng.below(9) as u32,
                5 if s.sets.len() < 3 => s.sets.push(rng.below(5) as u8),
                _ => {
                    s.sets.pop();
                    if s.sets.is_empty() {
                        s.sets.push(1);
                    }
                }
            }
        }
        if rng.below(5) == 0 {
            self.authz_variant = (self.authz_variant + 1) % 3;
        }
    }

    fn snapshot(&self, generation: u64) -> Snapshot {
        let mut b = SnapshotBuilder::new("node-1", generation, mode::KERNEL_NATIVE);
        for (i, s) in self.services.iter().enumerate() {
            if !s.present {
                continue;
            }
            let i = i as u8;
            let destinations: Vec<(u32, u32)> = s
                .sets
                .iter()
                .enumerate()
                .map(|(j, &count)| {
                    let endpoints: Vec<Endpoint> = (0..count)
                        .map(|k| {
                            let ip = IpAddr::V4(Ipv4Addr::new(10, 244, i, 10 * j as u8 + k));
                            Endpoint::new(ip, s.port, 1 + u32::from(k % 2))
                        })
                        .collect();
                    let policy = if s.source_hash {
                        lb_policy::SOURCE_IP_HASH
                    } else {
                        lb_policy::RANDOM
                    };
                    (s.weight + j as u32, b.backend_set(policy, &endpoints))
                })
                .collect();
            b.service(IpAddr::V4(Ipv4Addr::new(10, 96, 1, i)), 80, &destinations);
        }
        // Authorization: none, one bound workload, or that and a source block.
        if self.authz_variant > 0 {
            b.authz_workload(IpAddr::V4(Ipv4Addr::new(10, 244, 200, 1)), 1);
            b.authz_verdict(
                1,
                authz::ANY_CLASS,
                authz::ANY_PORT,
                authz::authz_action::ALLOW,
                authz::authz_reason::NO_ALLOW_POLICY,
                0,
            );
        }
        if self.authz_variant > 1 {
            b.authz_source(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 8, 1);
        }
        let mut snapshot = b.build();
        snapshot.sort();
        snapshot
    }
}

/// Every table of the live slot of `maps`, read back.
fn live_tables<M: SlotMaps>(
    maps: &GenerationMaps<M>,
) -> Vec<Option<kmesh_agent::slots::TableRecords>> {
    let live = maps.live().expect("live").expect("a generation is live");
    tables_of(maps, live.slot)
}

fn tables_of<M: SlotMaps>(
    maps: &GenerationMaps<M>,
    slot: Slot,
) -> Vec<Option<kmesh_agent::slots::TableRecords>> {
    SlotTable::ALL
        .iter()
        .filter(|t| **t != SlotTable::Generation)
        .map(|&t| maps.slots().read(t, slot).expect("read"))
        .collect()
}

/// Fails with the first record where `left` and `right` differ (a whole table set printed is
/// thousands of records long).
fn assert_same<T: PartialEq + std::fmt::Debug>(left: &T, right: &T, context: &str) {
    if left == right {
        return;
    }
    let (l, r) = (format!("{left:#?}"), format!("{right:#?}"));
    let (l, r): (Vec<&str>, Vec<&str>) = (l.lines().collect(), r.lines().collect());
    let at = l
        .iter()
        .zip(&r)
        .position(|(a, b)| a != b)
        .unwrap_or(l.len().min(r.len()));
    let around =
        |lines: &[&str]| lines[at.saturating_sub(12)..(at + 4).min(lines.len())].join("\n");
    panic!(
        "{context}: first difference at line {at} of the printed tables\n--- left:\n{}\n--- right:\n{}",
        around(&l),
        around(&r)
    );
}

#[test]
fn incremental_swaps_serve_what_whole_ones_do() {
    let cgroup = TestCgroup::new("shardswap").expect("test cgroup");
    let (incremental_dir, whole_dir) = (
        AgentDir::new("shardswap-inc").expect("pin directory"),
        AgentDir::new("shardswap-whole").expect("pin directory"),
    );
    let install = |dir: &AgentDir| {
        let installation = loader::install_or_adopt(dir.path(), cgroup.path(), BpfObject::Shipped)
            .expect("install the programs");
        GenerationMaps::open(&installation).expect("generation maps")
    };
    let mut incremental = install(&incremental_dir);
    let mut whole = install(&whole_dir);
    let (mut steps, mut rebuilt_incremental, mut rebuilt_whole) = (0, 0usize, 0usize);
    // Time from the end of the fill to the end of the mirror writes: installs, flip, barrier,
    // mirror. Printed, not asserted (timing is the benchmarks' business): it shows whether the
    // kernel waits a grace period per batch or per inner map written.
    let (mut swap_micros_incremental, mut swap_micros_whole) = (0u64, 0u64);
    for seed in 1..=12u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut cluster = Cluster::new(&mut rng);
        let mut base: Option<Snapshot> = None;
        for step in 0..10u64 {
            let generation = seed * 100 + step;
            let snapshot = cluster.snapshot(generation);
            let hash = generation ^ 0xfeed;
            let stats = incremental
                .apply(&snapshot, hash, base.as_ref())
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: incremental apply: {e}"));
            rebuilt_incremental += stats.maps_rebuilt;
            swap_micros_incremental += stats.flip_micros;
            let stats = whole
                .apply(&snapshot, hash, None)
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: whole apply: {e}"));
            rebuilt_whole += stats.maps_rebuilt;
            swap_micros_whole += stats.flip_micros;

            let served = live_tables(&incremental);
            assert_same(
                &served,
                &live_tables(&whole),
                &format!(
                    "seed {seed} step {step}: the incremental swap serves other records than the whole one"
                ),
            );
            let expected: Vec<_> = SlotTable::ALL
                .iter()
                .filter(|t| **t != SlotTable::Generation)
                .map(|&t| {
                    // The header only fills the generation table, which is left out.
                    let header = GenerationValue {
                        meta: SnapshotMeta {
                            generation,
                            content_hash: hash,
                        },
                        config: NodeConfig::with_mode(mode::KERNEL_NATIVE),
                    };
                    Some(kmesh_agent::slots::TableRecords::of(t, header, &snapshot))
                })
                .collect();
            assert_same(
                &served,
                &expected,
                &format!("seed {seed} step {step}: not the snapshot's records"),
            );
            let live = incremental.live().unwrap().unwrap();
            assert_same(
                &tables_of(&incremental, live.slot.other()),
                &served,
                &format!("seed {seed} step {step}: the idle slot differs from the live one"),
            );
            assert_eq!(live.value.meta.generation, generation);
            base = Some(snapshot);
            cluster.step(&mut rng);
            steps += 1;
        }
    }
    println!(
        "{steps} steps: {rebuilt_incremental} inner maps rebuilt incrementally, {rebuilt_whole} \
         by whole swaps; install to mirror, mean per swap: {} us incremental, {} us whole",
        swap_micros_incremental / steps,
        swap_micros_whole / steps
    );
    assert!(
        rebuilt_incremental * 3 < rebuilt_whole,
        "the incremental swaps rebuilt {rebuilt_incremental} maps, the whole ones {rebuilt_whole}"
    );
}
