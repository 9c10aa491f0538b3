//! A real Kubernetes control plane for the tests, with fake kubelets that run pods in network
//! namespaces and the project's own pods as host processes.
//!
//! [`Cluster::start`] brings up etcd, kube-apiserver, kube-controller-manager and kube-scheduler
//! ([`control_plane`], binaries from `scripts/control-plane-bins.sh`, see [`bins`]), one flat
//! cluster bridge ([`crate::TestNetwork`]), the Node objects, and one [`kubelet`] per node. The
//! tests then drive it as a user does, with kubectl ([`Cluster::kubectl`]).
//!
//! How the kubelet's duties and the cluster's plumbing are mapped onto this machine:
//!
//! | in a real cluster | here |
//! | --- | --- |
//! | a node | a cgroup (its pods' processes; its agent attaches there) and a bpffs directory ([`nodes`]) |
//! | pod networking | one bridge in a namespace of its own; pods get IPs from their node's `10.244.<n>.0/24`, on-link routes only (no way out) |
//! | application containers | a server per `containerPort` answering with the pod name ([`app_pod`]) |
//! | the project's containers | the real binaries, with the spec's command, env, volumes, user ([`container`], [`runtime`]) |
//! | test instruments (images `kmesh-tests/<bin>`, e.g. `kmesh-echo`) | the workspace's test binary, run as the project's are ([`image`]) |
//! | `kubectl exec` | [`Cluster::spawn_probe`]: `kmesh-probe` in the pod's namespace and cgroup |
//! | kube-proxy for the `kubernetes` Service | a userspace forwarder ([`services`]) |
//! | kube-proxy for the operator's Service | a forwarder on its ClusterIP, relaying each connection to a ready endpoint in turn ([`services::forward_mapped_services`]) |
//! | cluster DNS | `/etc/hosts` entries for `kmesh-operator.kmesh-system.svc` only ([`services::MAPPED`]), to its ClusterIP |
//! | cert-manager | [`Cluster::create_tls_secret`]: a CA and a leaf, in a `kubernetes.io/tls` Secret (optional: the operator makes its own) |
//!
//! What the tests observe of the mesh (each agent's live generation, mode and flip times, the
//! KmeshConfig status) is read by [`observe`]; their access logs by [`access_log`].
//!
//! Everything is named `kmt-<name>[-<node>][-<pid>]` and removed when the [`Cluster`] is dropped,
//! also when a test panics (the pods' logs and the control plane's are printed first); what a
//! killed test process leaves behind is removed by the next run's sweep ([`crate::sweep_leftovers`]):
//! the control plane runs in a cgroup named with the pid, like the nodes.
pub mod access_log;
pub mod app_pod;
pub mod bins;
pub mod container;
pub mod container_spec;
pub mod control_plane;
pub mod http;
pub mod image;
pub mod kubectl;
pub mod kubelet;
pub mod nodes;
pub mod observe;
pub mod pki;
pub mod process;
pub mod progress;
pub mod readiness;
pub mod runtime;
pub mod scenario;
pub mod services;
pub mod status;
pub mod sys;
pub mod volumes;

use std::{
    collections::BTreeMap,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Secret, Service};
use kube::{Api, Client, api::PostParams};
use tokio::task::JoinHandle;

use self::{
    bins::Binaries,
    control_plane::{ControlPlane, KUBERNETES_SERVICE_IP},
    image::Catalog,
    kubectl::Kubectl,
    kubelet::{Kubelet, Shared},
    nodes::NodeResources,
    pki::ServingCert,
    services::ServiceNames,
};
use crate::{
    ProbeHandle, ProbeReport, TempPath, TestNetwork, http_probe::HttpReport, probe::workspace_bin,
    progress,
};

/// The workspace binaries a cluster runs; checked before anything starts.
const WORKSPACE_BINS: [&str; 4] = [
    "kmesh-agent",
    "kmesh-operator",
    "kmesh-container",
    "kmesh-probe",
];

/// A node to create: its name and the third octet of its pod CIDR (`10.244.<subnet>.0/24`).
/// Pick subnets no other test uses: agents enrol namespaces by IP, machine-wide.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub subnet: u8,
}

pub struct Cluster {
    runtime: Option<tokio::runtime::Runtime>,
    client: Client,
    kubectl: Kubectl,
    kubelets: Vec<Arc<Kubelet>>,
    tasks: Vec<JoinHandle<()>>,
    shared: Option<Arc<Shared>>,
    control_plane: Option<ControlPlane>,
    nodes: Vec<Arc<NodeResources>>,
    dir: Option<TempPath>,
    /// How long [`Cluster::start`] took.
    pub start_time: Duration,
}

/// The repository root (where `config/` is).
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

impl Cluster {
    /// Starts the control plane, registers `nodes` and starts their kubelets. `name` (letters,
    /// digits, dashes; no all-digit part) names everything created.
    pub fn start(name: &str, nodes: &[NodeSpec]) -> io::Result<Cluster> {
        progress::start_clock();
        let started = Instant::now();
        crate::init();
        let bins = Binaries::locate()?;
        for b in WORKSPACE_BINS {
            workspace_bin(b)?;
        }
        let images = Catalog::from_repository()?;
        let mut cluster = Cluster::start_control_plane(name, &bins)?;
        // From here on, Drop cleans up whatever was made.
        let network = Arc::new(TestNetwork::new(name)?);
        let kubernetes_service = cluster.block_on(kubernetes_service(&cluster.client))?;
        let api = SocketAddr::from(([127, 0, 0, 1], cluster.control_plane().api_port));
        let forwarder = cluster.block_on(services::forward_kubernetes_service(
            &network,
            SocketAddr::V4(kubernetes_service),
            api,
        ))?;
        cluster.tasks.push(forwarder);
        cluster.add_nodes(name, nodes, &bins.versions.kubernetes)?;
        let shared = Arc::new(Shared {
            client: cluster.client(),
            network,
            images,
            names: Arc::new(ServiceNames::default()),
            pods_dir: cluster.dir().join("pods"),
            kubernetes_service,
        });
        cluster.start_kubelets(&shared);
        cluster.shared = Some(shared);
        cluster.start_time = started.elapsed();
        progress!(
            "cluster up after {:.1?}: nodes {}",
            cluster.start_time,
            cluster
                .nodes
                .iter()
                .map(|n| format!(
                    "{} (pods {}, cgroup {})",
                    n.name,
                    n.pod_cidr(),
                    n.cgroup.path().display()
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(cluster)
    }

    /// The runtime, the temporary directory and the control plane: a cluster without nodes.
    fn start_control_plane(name: &str, bins: &Binaries) -> io::Result<Cluster> {
        let dir = TempPath::new(name);
        std::fs::create_dir_all(dir.path().join("pods"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (control_plane, client) =
            runtime.block_on(ControlPlane::start(name, bins, dir.path()))?;
        let kubectl = Kubectl::new(
            bins.path("kubectl"),
            control_plane.kubeconfig.clone(),
            repository(),
        );
        Ok(Cluster {
            runtime: Some(runtime),
            client,
            kubectl,
            kubelets: Vec::new(),
            tasks: Vec::new(),
            shared: None,
            control_plane: Some(control_plane),
            nodes: Vec::new(),
            dir: Some(dir),
            start_time: Duration::ZERO,
        })
    }

    /// Each node's cgroup and pin directory, and its Node object (InternalIP 192.0.2.<n>).
    fn add_nodes(&mut self, name: &str, nodes: &[NodeSpec], version: &str) -> io::Result<()> {
        for (i, spec) in nodes.iter().enumerate() {
            let node = Arc::new(NodeResources::new(
                &spec.name,
                spec.subnet,
                Ipv4Addr::new(192, 0, 2, 1 + i as u8),
                &format!("{name}-{}", spec.name),
            )?);
            self.block_on(node.register(&self.client, version))?;
            self.nodes.push(node);
        }
        Ok(())
    }

    /// The cluster DNS watch and one kubelet per node.
    fn start_kubelets(&mut self, shared: &Arc<Shared>) {
        let handle = self.runtime().handle().clone();
        let _guard = handle.enter();
        self.tasks
            .extend(shared.names.clone().watch(self.client.clone()));
        self.tasks.push(services::forward_mapped_services(
            shared.network.clone(),
            self.client.clone(),
            shared.names.clone(),
        ));
        for node in &self.nodes {
            let (kubelet, task) = Kubelet::start(node.clone(), shared.clone());
            self.kubelets.push(kubelet);
            self.tasks.push(task);
        }
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("runtime lives until drop")
    }

    fn control_plane(&self) -> &ControlPlane {
        self.control_plane
            .as_ref()
            .expect("control plane lives until drop")
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir lives until drop").path()
    }

    fn shared(&self) -> &Arc<Shared> {
        self.shared.as_ref().expect("started")
    }

    /// Runs a future on the cluster's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime().block_on(f)
    }

    /// An admin client.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// kubectl v1.36.3 with the admin kubeconfig, run from the repository root.
    pub fn kubectl(&self) -> &Kubectl {
        &self.kubectl
    }

    /// The cluster bridge.
    pub fn network(&self) -> &TestNetwork {
        &self.shared().network
    }

    /// The node `name`'s resources (cgroup, bpffs directory).
    pub fn node(&self, name: &str) -> Option<&NodeResources> {
        self.nodes.iter().find(|n| n.name == name).map(|n| &**n)
    }

    /// Stops kube-apiserver (etcd and everything else keep running): an API server outage.
    pub fn stop_apiserver(&mut self) -> io::Result<()> {
        self.control_plane
            .as_mut()
            .expect("control plane lives until drop")
            .stop_apiserver()
    }

    /// Starts kube-apiserver again on the same etcd, port and certificates; returns once it
    /// serves.
    pub fn restart_apiserver(&mut self) -> io::Result<()> {
        let mut cp = self
            .control_plane
            .take()
            .expect("control plane lives until drop");
        let result = self.block_on(cp.restart_apiserver());
        self.control_plane = Some(cp);
        result
    }

    /// The processes of pod `namespace/name` (its cgroup's), as `crictl` would list them: for a
    /// pod of the project's images, its containers' own processes.
    pub fn pod_pids(&self, namespace: &str, name: &str) -> io::Result<Vec<i32>> {
        let (_, cgroup, _) = self.sandbox(namespace, name)?;
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs"))?;
        Ok(procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    /// The cluster network's namespace (`/run/netns/...`), where Service VIPs and pods are
    /// reachable, as from a node.
    pub fn cluster_netns(&self) -> PathBuf {
        self.network().node_netns_path()
    }

    /// Creates Secret `namespace/name` of type `kubernetes.io/tls` for Service `service`, as
    /// cert-manager issues one: `tls.crt`, `tls.key` and `ca.crt` of a fresh CA.
    pub fn create_tls_secret(
        &self,
        namespace: &str,
        name: &str,
        service: &str,
    ) -> io::Result<ServingCert> {
        let cert = ServingCert::for_service(namespace, service)?;
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": cert.cert_pem, "tls.key": cert.key_pem, "ca.crt": cert.ca_pem},
        }))
        .map_err(io::Error::other)?;
        let api: Api<Secret> = Api::namespaced(self.client(), namespace);
        self.block_on(api.create(&PostParams::default(), &secret))
            .map_err(|e| io::Error::other(format!("create secret {namespace}/{name}: {e}")))?;
        progress!(
            "secret {namespace}/{name} created (CA and leaf for {service}.{namespace}.svc, as cert-manager issues them)"
        );
        Ok(cert)
    }

    /// Where pod `namespace/name` runs: (netns name, cgroup, IP).
    pub fn sandbox(&self, namespace: &str, name: &str) -> io::Result<(String, PathBuf, Ipv4Addr)> {
        self.kubelets
            .iter()
            .find_map(|k| k.sandbox(namespace, name))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no kubelet runs pod {namespace}/{name}"),
                )
            })
    }

    /// Starts `kmesh-probe ARGS...` in pod `namespace/name` (its network namespace and cgroup),
    /// as `kubectl exec` would.
    pub fn spawn_probe(
        &self,
        namespace: &str,
        name: &str,
        args: &[&str],
    ) -> io::Result<ProbeHandle> {
        let (netns, cgroup, _) = self.sandbox(namespace, name)?;
        crate::probe::spawn_in_cgroup_dir(&netns, &cgroup, args)
    }

    /// Runs `kmesh-http ARGS...` in pod `namespace/name` (its network namespace and cgroup, so
    /// that its connects go through its node's kernel programs), as `kubectl exec` would, and
    /// returns its report.
    pub fn run_http(&self, namespace: &str, name: &str, args: &[&str]) -> io::Result<HttpReport> {
        let (netns, cgroup, _) = self.sandbox(namespace, name)?;
        crate::http_probe::run_http_in_cgroup_dir(&netns, &cgroup, args)
    }

    /// [`spawn_probe`](Self::spawn_probe), then wait for its report.
    pub fn run_probe(&self, namespace: &str, name: &str, args: &[&str]) -> io::Result<ProbeReport> {
        self.spawn_probe(namespace, name, args)?.wait()
    }

    /// `GET path` on pod `namespace/name`'s `port`, from the cluster network (as the kubelet
    /// probes): (status, body).
    pub fn pod_get(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
        path: &str,
    ) -> io::Result<(u16, String)> {
        let (netns, _, ip) = self.sandbox(namespace, name)?;
        http::get_in_netns(
            &self.network().node_netns_path(),
            SocketAddr::V4(SocketAddrV4::new(ip, port)),
            path,
            Duration::from_secs(2),
        )
        .map_err(|e| {
            if e.kind() != io::ErrorKind::TimedOut {
                return e;
            }
            // An unanswered SYN: say where it may have gone (this found the bridge MAC change that
            // `TestNetwork::BRIDGE_MAC` now prevents).
            let diagnostics = self.unanswered_connect(&netns, ip, port);
            io::Error::new(
                e.kind(),
                format!("{namespace}/{name} {ip}:{port}: {e}\n{diagnostics}"),
            )
        })
    }

    /// What the kernel says about a connect to `ip`:`port` in pod netns `netns` that timed out:
    /// the listeners and half-open connections there, its drop counters, and the cluster
    /// network's neighbour entry for the address.
    fn unanswered_connect(&self, netns: &str, ip: Ipv4Addr, port: u16) -> String {
        let run = |args: &[&str]| {
            let mut cmd = std::process::Command::new(args[0]);
            cmd.args(&args[1..]);
            crate::cmd::run(&mut cmd).unwrap_or_else(|e| format!("({e})"))
        };
        let sport = format!("sport = :{port}");
        let node = self.network().node_netns_name().to_string();
        let ip_text = ip.to_string();
        [
            (
                "listeners",
                run(&["ip", "netns", "exec", netns, "ss", "-Htln", &sport]),
            ),
            (
                "half-open",
                run(&[
                    "ip", "netns", "exec", netns, "ss", "-Htn", "state", "syn-recv",
                ]),
            ),
            (
                "counters",
                run(&[
                    "ip",
                    "netns",
                    "exec",
                    netns,
                    "nstat",
                    "-asz",
                    "TcpExtListenOverflows",
                    "TcpExtListenDrops",
                    "TcpExtTCPReqQFullDrop",
                    "TcpInSegs",
                    "TcpOutSegs",
                    "IpInDiscards",
                    "TcpExtTCPBacklogDrop",
                ]),
            ),
            (
                "neighbour",
                run(&["ip", "-n", &node, "neigh", "show", &ip_text]),
            ),
            ("route", run(&["ip", "-n", &node, "route", "get", &ip_text])),
            // Where the pod sends its answers: its neighbour entries (the bridge's address and
            // MAC), the bridge's MAC now and its own forwarding entries, and the pod's link
            // counters (a half-open connection means the SYN came in and the SYN-ACK got lost).
            ("pod neighbours", run(&["ip", "-n", netns, "neigh", "show"])),
            (
                "pod link",
                run(&["ip", "-n", netns, "-s", "link", "show", "eth0"]),
            ),
            (
                "bridge",
                run(&["ip", "-n", &node, "-br", "link", "show", "br0"]),
            ),
            (
                "bridge's own fdb entries",
                run(&[
                    "bridge",
                    "-n",
                    &node,
                    "fdb",
                    "show",
                    "br",
                    "br0",
                    "permanent",
                ]),
            ),
        ]
        .iter()
        .map(|(what, out)| format!("--- {what}:\n{}", out.trim_end()))
        .collect::<Vec<_>>()
        .join("\n")
    }

    /// Connects to pod `namespace/name`'s `port` from the cluster network and returns the first
    /// line it sends (an application pod's server answers with the pod's name).
    pub fn pod_reply(&self, namespace: &str, name: &str, port: u16) -> io::Result<String> {
        use std::io::BufRead as _;
        let (_, _, ip) = self.sandbox(namespace, name)?;
        let addr = SocketAddr::V4(SocketAddrV4::new(ip, port));
        crate::run_in_netns(&self.network().node_netns_path(), move || {
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut line = String::new();
            std::io::BufReader::new(s).read_line(&mut line)?;
            Ok(line.trim_end().to_string())
        })
    }

    /// Every pod's container logs so far, by `<ns>_<pod>_<uid>/<container>`.
    pub fn pod_logs(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Ok(pods) = std::fs::read_dir(self.dir().join("pods")) else {
            return out;
        };
        for pod in pods.flatten() {
            let Ok(files) = std::fs::read_dir(pod.path()) else {
                continue;
            };
            for f in files.flatten() {
                let path = f.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let key = format!(
                        "{}/{}",
                        pod.file_name().to_string_lossy(),
                        path.file_stem().unwrap_or_default().to_string_lossy()
                    );
                    out.insert(key, std::fs::read_to_string(&path).unwrap_or_default());
                }
            }
        }
        out
    }

    /// Deletes every operator pod (kubectl waits until they are gone); their Deployment starts
    /// new ones, which read the cluster from scratch.
    pub fn restart_operators(&self) -> io::Result<()> {
        let operator = "app.kubernetes.io/name=kmesh-operator";
        let delete = ["delete", "pod", "-n", "kmesh-system", "-l", operator];
        self.kubectl()
            .run(&[&delete[..], &[scenario::TIMEOUT]].concat())
            .map(drop)
    }

    /// Each operator pod logged a line holding every one of `needles` at most once, at error
    /// level, and some pod did: a condition logged once when it starts, not on every retry.
    /// Panics naming the pod and the lines otherwise.
    pub fn assert_operators_logged_once(&self, needles: &[&str]) {
        let logs = self.pod_logs();
        let mut total = 0;
        for (pod, log) in logs
            .iter()
            .filter(|(key, _)| key.starts_with("kmesh-system_kmesh-operator-"))
        {
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| needles.iter().all(|n| l.contains(n)))
                .collect();
            assert!(
                lines.len() <= 1,
                "{pod} logs {needles:?} {} times:\n{}",
                lines.len(),
                lines.join("\n")
            );
            if let Some(l) = lines.first() {
                assert!(l.contains("ERROR"), "logged at error level: {l}");
            }
            total += lines.len();
        }
        assert!(total >= 1, "no operator logged {needles:?}");
    }

    /// The log of the container whose key (see [`pod_logs`](Self::pod_logs)) starts with `prefix`.
    pub fn pod_log(&self, prefix: &str) -> String {
        self.pod_logs()
            .into_iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| format!("--- {k}\n{v}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// What to print when a test fails: the tails of every log.
    pub fn diagnostics(&self) -> String {
        let mut s = String::from("==== pod logs (last 40 lines each)\n");
        for (k, v) in self.pod_logs() {
            let lines: Vec<&str> = v.lines().collect();
            s.push_str(&format!(
                "--- {k}\n{}\n",
                lines[lines.len().saturating_sub(40)..].join("\n")
            ));
        }
        if let Some(cp) = &self.control_plane {
            s.push_str("==== control plane (last 15 lines each)\n");
            s.push_str(&cp.log_tails(15));
        }
        s
    }
}

/// What a dropped [`Cluster`] named `name` of this process left behind: network namespaces,
/// cgroups (a cgroup that is gone has no processes), pin directories, the temporary directory.
/// Empty when the cleanup worked.
pub fn leftovers(name: &str) -> Vec<String> {
    let pid = std::process::id();
    let ours = |entry: &str| {
        entry.starts_with(&format!("{}{name}-", crate::names::PREFIX))
            && crate::names::owner_pid(entry) == Some(pid as i32)
    };
    let list = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| ours(n))
                    .map(|n| dir.join(n).display().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut left = list(Path::new(crate::netns::NETNS_RUN_DIR));
    if let Ok(root) = crate::cgroup2_root() {
        left.extend(list(&root));
    }
    left.extend(list(Path::new(crate::agent::BPFFS_ROOT)));
    left.extend(list(&std::env::temp_dir()));
    left
}

/// The `kubernetes` Service's ClusterIP and port, as the kubelet passes them to containers.
async fn kubernetes_service(client: &Client) -> io::Result<SocketAddrV4> {
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc = api
        .get("kubernetes")
        .await
        .map_err(|e| io::Error::other(format!("service default/kubernetes: {e}")))?;
    let spec = svc.spec.unwrap_or_default();
    let ip: Ipv4Addr = spec
        .cluster_ip
        .as_deref()
        .unwrap_or_default()
        .parse()
        .map_err(|e| io::Error::other(format!("service default/kubernetes ClusterIP: {e}")))?;
    if ip != KUBERNETES_SERVICE_IP {
        return Err(io::Error::other(format!(
            "service default/kubernetes has ClusterIP {ip}, the API server's certificate names \
             {KUBERNETES_SERVICE_IP}"
        )));
    }
    let port = spec
        .ports
        .unwrap_or_default()
        .first()
        .map_or(443, |p| p.port as u16);
    Ok(SocketAddrV4::new(ip, port))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        let stop_started = Instant::now();
        if let Some(runtime) = self.runtime.take() {
            let kubelets = std::mem::take(&mut self.kubelets);
            runtime.block_on(async {
                let stop_all = async {
                    for k in &kubelets {
                        k.shutdown().await;
                    }
                };
                if tokio::time::timeout(Duration::from_secs(60), stop_all)
                    .await
                    .is_err()
                {
                    eprintln!("kmesh-tests: the kubelets did not stop their pods within 60 s");
                }
            });
            for t in &self.tasks {
                t.abort();
            }
            self.tasks.clear();
            drop(kubelets);
            runtime.shutdown_timeout(Duration::from_secs(10));
        }
        // The last reference to the network (with any pod left in it) goes here.
        if let Some(shared) = self.shared.take()
            && Arc::strong_count(&shared) > 1
        {
            eprintln!("kmesh-tests: cluster network still referenced; the sweep will remove it");
        }
        drop(self.control_plane.take());
        // Pins before cgroups (NodeResources' field order), after every agent stopped.
        self.nodes.clear();
        drop(self.dir.take());
        progress!("cluster removed in {:.1?}", stop_started.elapsed());
    }
}
