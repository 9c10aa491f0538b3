//! The benchmark's node: a client pod and a server pod of their own for every variant (so no
//! variant shares its sockets, ports, TIME_WAIT or accept queues with another), an outsider pod,
//! the real programs with `kmesh_authz` attached to every server namespace but the baseline's (as
//! the agent attaches it), and each variant's snapshot, applied right before it runs. It promises
//! that the tables do what the figures claim ([`Node::check_verdicts`]) before anything is measured.
use std::{collections::BTreeMap, fs::File, net::Ipv4Addr, sync::Arc};

use kmesh_agent::{loader, maps::GenerationMaps};
use kmesh_snapshot::Snapshot;
use kmesh_tests::{AgentDir, Pod, ProbeReport, TcpServer, TestCgroup, TestNetwork};

use crate::{
    Variant,
    http_server::HttpServer,
    tables::{self, Binding, Parties, TableSizes},
    wrk,
};

pub const PROBE_PORT: u16 = 8080;
pub const HTTP_PORT: u16 = 8081;
/// Addresses apart from the other kernel tests' and benchmarks' (agents of concurrent runs scan
/// every namespace of the machine). Variant `i` has client `.20 + i` and server `.1 + i`.
const OUTSIDER: Ipv4Addr = Ipv4Addr::new(10, 244, 180, 11);
const CLIENT_BASE: [u8; 4] = [10, 244, 180, 20];
const SERVER_BASE: [u8; 4] = [10, 244, 181, 1];

/// Pause after a swap, before measuring.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

/// One variant's client and server.
pub struct Pair {
    pub variant: Variant,
    pub client: Pod,
    pub server: Pod,
}

impl Pair {
    pub fn target(&self, port: u16) -> String {
        format!("{}:{port}", self.server.ipv4())
    }
}

pub struct Node {
    // Field order is drop order: servers and pods go before the pins they ran with.
    _tcp: Vec<TcpServer>,
    _http: Vec<HttpServer>,
    /// In the order of [`Variant::ALL`].
    pairs: Vec<Pair>,
    pub outsider: Pod,
    pub probes: TestCgroup,
    maps: GenerationMaps,
    snapshots: BTreeMap<Variant, Snapshot>,
    generation: u64,
    _net: TestNetwork,
    _programs: TestCgroup,
    _dir: AgentDir,
}

impl Node {
    pub fn new() -> Node {
        let net = TestNetwork::new("benchauthz").expect("test network");
        let outsider = net.add_pod("outsider", OUTSIDER, None).expect("pod");
        let pairs: Vec<Pair> = Variant::ALL.iter().map(|&v| add_pair(&net, v)).collect();
        let mut tcp = vec![];
        let mut http = vec![];
        for pair in &pairs {
            tcp.push(pair.server.serve_tcp(PROBE_PORT).expect("probe server"));
            http.push(HttpServer::start(&pair.server, HTTP_PORT).expect("http server"));
        }
        // The connect programs go to a cgroup no client runs in: only sk_lookup is measured.
        let programs = TestCgroup::new("benchauthzprog").expect("cgroup of the connect programs");
        let probes = TestCgroup::new("benchauthzprobe").expect("cgroup of the clients");
        let dir = AgentDir::new("benchauthz").expect("pin directory");
        let installation =
            loader::install_or_adopt(dir.path(), programs.path(), loader::BpfObject::Shipped)
                .expect("install programs");
        let maps = GenerationMaps::open(&installation).expect("generation maps");
        let measured: Vec<&Pod> = pairs
            .iter()
            .filter(|p| p.variant.has_program())
            .map(|p| &p.server)
            .collect();
        attach_authz(&installation, &measured);
        let snapshots = variant_snapshots(&pairs);
        Node {
            _tcp: tcp,
            _http: http,
            pairs,
            outsider,
            probes,
            maps,
            snapshots,
            generation: 0,
            _net: net,
            _programs: programs,
            _dir: dir,
        }
    }

    pub fn pair(&self, variant: Variant) -> &Pair {
        &self.pairs[variant.index()]
    }

    /// Makes the tables of `variant` live. The baseline's server has no program, but it gets a
    /// swap too, so that every measurement follows the same work (a swap frees the old tables in
    /// the kernel's background work, which must not weigh on some variants only), then a pause.
    pub fn prepare(&mut self, variant: Variant) {
        let snapshot = self.snapshots[&variant].clone();
        self.apply(snapshot);
    }

    fn apply(&mut self, mut snapshot: Snapshot) {
        self.generation += 1;
        snapshot.generation = self.generation;
        self.maps
            .apply(&snapshot, self.generation, None)
            .expect("apply the variant's snapshot");
        std::thread::sleep(SETTLE);
    }

    pub fn print_table_sizes(&self) {
        println!();
        println!("authorization tables (compile-shaped: one ALLOW policy per source namespace):");
        println!(
            "  {:<34} {:>10} {:>8} {:>9} {:>9}",
            "snapshot", "workloads", "sources", "verdicts", "policies"
        );
        for variant in Variant::ALL.into_iter().filter(|v| v.has_program()) {
            let s = TableSizes::of(&self.snapshots[&variant]);
            println!(
                "  {:<34} {:>10} {:>8} {:>9} {:>9}",
                variant.tables_label(),
                s.workloads,
                s.sources,
                s.verdicts,
                s.policies
            );
        }
    }

    /// The figures measure what they claim: the program judges every variant's server and not
    /// the baseline's (tables that deny everything to every server refuse the variants' clients
    /// and let the baseline's through), and each variant's tables do what they say (with 10 and
    /// 1,000 policies the outsider is refused and the variant's client allowed; unbound, the
    /// outsider passes).
    pub fn check_verdicts(&mut self) {
        let servers: Vec<Ipv4Addr> = self.pairs.iter().map(|p| p.server.ipv4()).collect();
        self.apply(tables::deny_all(0, &servers));
        for pair in &self.pairs {
            let report = probe(&pair.client, &self.probes, &pair.target(PROBE_PORT), 20);
            let refused = report.errors_of("ECONNREFUSED");
            let expected = if pair.variant.has_program() { 20 } else { 0 };
            assert!(
                refused == expected && report.ok + refused == 20,
                "{:?}: with every server denied, {expected} of 20 connects from its client to its \
                 server {} must be refused (is sk_lookup attached to exactly the measured servers' \
                 namespaces?): {report:?}",
                pair.variant,
                pair.server.ipv4()
            );
        }
        for variant in [Variant::Policies10, Variant::Policies1000] {
            self.prepare(variant);
            let pair = self.pair(variant);
            let report = probe(&self.outsider, &self.probes, &pair.target(PROBE_PORT), 20);
            assert_eq!(
                report.errors_of("ECONNREFUSED"),
                20,
                "{variant:?}: the outsider must be refused: {report:?}"
            );
            connects(&pair.client, &self.probes, &pair.target(PROBE_PORT), 20);
        }
        self.prepare(Variant::Unbound);
        let target = self.pair(Variant::Unbound).target(PROBE_PORT);
        connects(&self.outsider, &self.probes, &target, 20);
    }
}

fn add_pair(net: &TestNetwork, variant: Variant) -> Pair {
    let nth = |base: [u8; 4]| Ipv4Addr::from(u32::from_be_bytes(base) + variant.index() as u32);
    let name = variant.pod_name();
    let client = net
        .add_pod(&format!("cli{name}"), nth(CLIENT_BASE), None)
        .expect("client pod");
    wrk::reuse_time_wait_ports(&client);
    Pair {
        variant,
        client,
        server: net
            .add_pod(&format!("srv{name}"), nth(SERVER_BASE), None)
            .expect("server pod"),
    }
}

/// Each variant's tables, about its own client and server (the baseline swaps in the unbound
/// variant's tables, which do not name its server).
fn variant_snapshots(pairs: &[Pair]) -> BTreeMap<Variant, Snapshot> {
    let of = |variant: Variant, binding: Binding| {
        let pair = &pairs[variant.index()];
        let parties = Parties {
            server: pair.server.ipv4(),
            client: pair.client.ipv4(),
            outsider: OUTSIDER,
        };
        (variant, tables::snapshot(1, binding, &parties))
    };
    let unbound = of(Variant::Unbound, Binding::Unbound { policies: 1_000 });
    BTreeMap::from([
        (Variant::NoPrograms, unbound.1.clone()),
        unbound,
        of(Variant::Policies10, Binding::Bound { policies: 10 }),
        of(Variant::Policies1000, Binding::Bound { policies: 1_000 }),
    ])
}

/// Attaches the real `kmesh_authz` to each of `pods`' namespaces as the agent does (a pinned
/// bpf_link per namespace).
fn attach_authz(installation: &loader::Installation, pods: &[&Pod]) {
    let enrolled: BTreeMap<u64, Arc<File>> = pods
        .iter()
        .map(|pod| {
            let netns = File::open(pod.netns_path()).expect("open a server's netns");
            let cookie = pod.netns_cookie().expect("server netns cookie");
            (cookie, Arc::new(netns))
        })
        .collect();
    let stats = installation
        .netns_links()
        .sync(&enrolled)
        .expect("attach sk_lookup");
    assert_eq!(
        stats.attached,
        pods.len(),
        "one sk_lookup link per measured server: {stats:?}"
    );
}

pub fn probe(pod: &Pod, cgroup: &TestCgroup, target: &str, n: u32) -> ProbeReport {
    pod.run_probe(
        cgroup,
        &[
            "--target",
            target,
            "--count",
            &n.to_string(),
            "--connect-only",
        ],
    )
    .expect("probe")
}

/// Microseconds per connect()+close(), every one of which must connect.
pub fn connects(pod: &Pod, cgroup: &TestCgroup, target: &str, n: u32) -> f64 {
    let report = probe(pod, cgroup, target, n);
    assert_eq!(report.ok, u64::from(n), "connections failed: {report:?}");
    report.elapsed_us as f64 / f64::from(n)
}

/// Microseconds per refused connect(), every one of which must get ECONNREFUSED.
pub fn refusals(pod: &Pod, cgroup: &TestCgroup, target: &str, n: u32) -> f64 {
    let report = probe(pod, cgroup, target, n);
    assert_eq!(
        report.errors_of("ECONNREFUSED"),
        u64::from(n),
        "connects not refused: {report:?}"
    );
    report.elapsed_us as f64 / f64::from(n)
}
