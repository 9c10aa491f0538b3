//! One node for the connection-event tests (`conn_events`, `telemetry_traffic`): an enrolled client
//! and server pod, a pod that is not enrolled, a service to the server and one without endpoints,
//! and a policy that denies the client on [`DENIED_PORT`] of the server. The real `kmesh-agent`
//! runs the real programs on a test cgroup; `kmesh-peer` runs both ends of connections with exact
//! byte counts inside the pods and that cgroup.
//!
//! [`EventsWorld::snapshot`] gives the node's tables in a builder, so that a test adds what it
//! needs (names, agent settings) before [`EventsWorld::start_agent`] or
//! [`EventsWorld::write_snapshot`]. Everything is removed on drop (the snapshot file here; the
//! network, cgroup and pins by their own owners).
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use kmesh_agent::loader::BpfObject;
use kmesh_common::{
    authz::{ANY_CLASS, ANY_PORT, authz_action, authz_policy_kind, authz_reason},
    lb_policy, mode,
};
use kmesh_snapshot::{
    Snapshot,
    builder::{Endpoint, SnapshotBuilder},
};

use crate::{
    Agent, AgentDir, AgentOptions, AgentSource, Pod, TestCgroup, TestNetwork,
    peer::{Close, PeerConnection, PeerHandle},
    write_atomically,
};

pub const NODE: &str = "node-1";
const READY: Duration = Duration::from_secs(20);
/// The server's port.
pub const PORT: u16 = 8080;
/// A port nothing listens on.
pub const CLOSED_PORT: u16 = 7070;
/// The port the server's policy denies the client.
pub const DENIED_PORT: u16 = 9090;
/// The policy that denies the client on DENIED_PORT: its id and its name.
pub const DENY_POLICY: u32 = 42;
pub const DENY_POLICY_NAME: &str = "books/deny-sleep";
/// The port of both services.
pub const SERVICE_PORT: u16 = 80;
/// Byte counts of [`EventsWorld::exchange`], that cannot be mistaken for one another.
pub const SENT: u64 = 12_345;
pub const REPLY: u64 = 3_210;

/// The node. Pod addresses are 10.244.<subnet>.x: client .10, server .100, outsider .20; the
/// services are 10.96.<subnet>.1 (to the server) and .2 (no endpoint).
pub struct EventsWorld {
    pub net: TestNetwork,
    pub cgroup: TestCgroup,
    pub dir: AgentDir,
    pub client: Pod,
    pub server: Pod,
    pub outsider: Pod,
    pub vip: Ipv4Addr,
    pub vip_empty: Ipv4Addr,
    snapshot_file: PathBuf,
}

/// The node's tables in a builder, with the ids of its two services (to name them).
pub struct WorldSnapshot {
    pub builder: SnapshotBuilder,
    pub service: u32,
    pub empty_service: u32,
}

impl EventsWorld {
    /// The node of test `name`, its pods in 10.244.`subnet`.0/24.
    pub fn new(name: &str, subnet: u8) -> EventsWorld {
        let net = TestNetwork::new(name).expect("test network");
        let cgroup = TestCgroup::new(name).expect("test cgroup");
        let dir = AgentDir::new(name).expect("pin directory");
        let pod = |pod: &str, host: u8| {
            net.add_pod(pod, Ipv4Addr::new(10, 244, subnet, host), None)
                .expect("pod")
        };
        let (client, server, outsider) = (pod("client", 10), pod("server", 100), pod("out", 20));
        let snapshot_file =
            std::env::temp_dir().join(format!("kmt-{name}-{}.snap", std::process::id()));
        EventsWorld {
            vip: Ipv4Addr::new(10, 96, subnet, 1),
            vip_empty: Ipv4Addr::new(10, 96, subnet, 2),
            net,
            cgroup,
            dir,
            client,
            server,
            outsider,
            snapshot_file,
        }
    }

    /// Generation `generation` of the node's tables: client and server enrolled, the two
    /// services, and the server's policy (the client denied on DENIED_PORT, all else allowed).
    pub fn snapshot(&self, generation: u64) -> WorldSnapshot {
        let mut b = SnapshotBuilder::new(NODE, generation, mode::KERNEL_NATIVE);
        b.workload(IpAddr::V4(self.client.ipv4()), 1);
        b.workload(IpAddr::V4(self.server.ipv4()), 2);
        let set = b.backend_set(
            lb_policy::RANDOM,
            &[Endpoint::new(IpAddr::V4(self.server.ipv4()), PORT, 2)],
        );
        let service = b.service(self.vip.into(), SERVICE_PORT, &[(1, set)]);
        let empty = b.backend_set(lb_policy::RANDOM, &[]);
        let empty_service = b.service(self.vip_empty.into(), SERVICE_PORT, &[(1, empty)]);
        b.authz_workload(IpAddr::V4(self.server.ipv4()), 1);
        b.authz_source(IpAddr::V4(self.client.ipv4()), 32, 1);
        b.authz_verdict(
            1,
            1,
            DENIED_PORT,
            authz_action::DENY,
            authz_reason::DENY_MATCHED,
            DENY_POLICY,
        );
        b.authz_verdict(
            1,
            ANY_CLASS,
            ANY_PORT,
            authz_action::ALLOW,
            authz_reason::NO_ALLOW_POLICY,
            0,
        );
        b.authz_policy(
            DENY_POLICY,
            authz_policy_kind::AUTHORIZATION_POLICY,
            DENY_POLICY_NAME,
        );
        WorldSnapshot {
            builder: b,
            service,
            empty_service,
        }
    }

    /// Writes `snapshot` where the agent reads it (atomically: the agent sees all of it or none).
    pub fn write_snapshot(&self, snapshot: Snapshot) {
        write_atomically(&self.snapshot_file, &snapshot.encode().expect("encode"))
            .expect("write snapshot");
    }

    /// The agent on `snapshot`, ready with both pods enrolled and the server's authorization
    /// link attached.
    pub fn start_agent(&self, snapshot: Snapshot, extra_args: &[&str]) -> Agent {
        self.write_snapshot(snapshot);
        let mut agent = Agent::start(&AgentOptions {
            node_name: NODE,
            source: AgentSource::File(&self.snapshot_file),
            dir: &self.dir,
            cgroup: &self.cgroup,
            extra_args: [
                "--host-netns",
                &self.net.node_netns_path().display().to_string(),
            ]
            .iter()
            .chain(extra_args)
            .map(|s| s.to_string())
            .collect(),
        })
        .expect("start kmesh-agent");
        agent.wait_ready(READY).expect("agent ready");
        agent
            .wait_for(Duration::from_secs(10), "2 pods enrolled", |a| {
                let s = a.debug_snapshot()?;
                Ok(s["enrolled_netns"].as_u64() == Some(2)
                    && s["authz_links"].as_u64() == Some(2)
                    && s["host_addrs"].as_u64() > Some(0))
            })
            .expect("enrolment");
        agent
    }

    /// The pin directory of the shipped object's maps (the events ring and its counters).
    pub fn layout_dir(&self) -> PathBuf {
        self.dir.path().join(BpfObject::Shipped.layout().dir_name())
    }

    pub fn server_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server.ipv4().into(), port)
    }

    pub fn service_addr(&self, vip: Ipv4Addr) -> SocketAddr {
        SocketAddr::new(vip.into(), SERVICE_PORT)
    }

    /// One connection from `from` to `target` with a server on the server pod's PORT, sending
    /// [`SENT`] bytes and answered with [`REPLY`].
    pub fn exchange(&self, from: &Pod, target: SocketAddr, close: Close) -> PeerExchange {
        self.exchange_bytes(from, target, close, SENT, REPLY)
    }

    /// One connection from `from` to `target` with a server on the server pod's PORT: the client
    /// sends `sent` bytes, the server answers `reply` once it has read them all.
    pub fn exchange_bytes(
        &self,
        from: &Pod,
        target: SocketAddr,
        close: Close,
        sent: u64,
        reply: u64,
    ) -> PeerExchange {
        let server = PeerHandle::serve(&self.server, &self.cgroup, PORT, reply, 1).expect("serve");
        let client = PeerHandle::connect(from, &self.cgroup, target, sent, 1, close)
            .expect("client")
            .connections;
        let server = server
            .wait(Duration::from_secs(10))
            .expect("server")
            .connections;
        PeerExchange {
            client: client[0].clone(),
            server: server[0].clone(),
        }
    }
}

impl Drop for EventsWorld {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.snapshot_file);
    }
}

/// Both ends of one connection, as `kmesh-peer` saw them.
pub struct PeerExchange {
    pub client: PeerConnection,
    pub server: PeerConnection,
}
