//! The two Service paths the harness provides in place of kube-proxy and cluster DNS, and nothing
//! more (application traffic to Service VIPs is the mesh's own job, steered by the node programs):
//!
//! * **The `kubernetes` Service** (how in-cluster clients reach the API server): a userspace
//!   forwarder, as kube-proxy's old userspace mode did, listening on the Service's ClusterIP and
//!   port (10.96.0.1:443, an address on the cluster network namespace's loopback) and forwarding
//!   to kube-apiserver on the host's 127.0.0.1. Pods that run real containers get a host route to
//!   that one address via the bridge; the kubelet sets `KUBERNETES_SERVICE_HOST/PORT` to it.
//! * **Cluster DNS for [`MAPPED`] only**: each real container's `/etc/hosts` (written by the
//!   kubelet, as a kubelet does, and bind-mounted) maps `<svc>.<ns>.svc` and
//!   `<svc>.<ns>.svc.cluster.local` to the Service's ClusterIP once the VIP forwarder
//!   ([`forward_mapped_services`]) serves it (which relays each connection to a ready endpoint in
//!   turn, as kube-proxy), and until then to a ready endpoint address from its EndpointSlices;
//!   rewritten in place when that changes. Any other name is unresolvable (the containers'
//!   `resolv.conf` names no server), which fails locally.
use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use futures::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::task::JoinHandle;

use crate::{TestNetwork, progress, run_in_netns};

/// The Services whose names containers can resolve: (namespace, name).
pub const MAPPED: &[(&str, &str)] = &[("kmesh-system", "kmesh-operator")];

/// Starts the forwarder of the `kubernetes` Service: `service` in the cluster network namespace
/// to `target` on the host.
pub async fn forward_kubernetes_service(
    network: &TestNetwork,
    service: SocketAddr,
    target: SocketAddr,
) -> io::Result<JoinHandle<()>> {
    let IpAddr::V4(ip) = service.ip() else {
        return Err(io::Error::other("the kubernetes Service must be IPv4 here"));
    };
    network.ip_node(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
    let std_listener = run_in_netns(&network.node_netns_path(), move || {
        let l = std::net::TcpListener::bind(service)?;
        l.set_nonblocking(true)?;
        Ok(l)
    })?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((inbound, _)) = listener.accept().await else {
                continue;
            };
            if let Ok(inbound) = inbound.into_std() {
                std::thread::spawn(move || relay(inbound, target));
            }
        }
    }))
}

/// Copies both ways between `inbound` and a new connection to `target` until either side closes.
/// The thread never left the host's network namespace, so this dials the host.
pub fn relay(inbound: std::net::TcpStream, target: SocketAddr) {
    let Ok(outbound) = std::net::TcpStream::connect(target) else {
        return;
    };
    relay_streams(inbound, outbound);
}

/// Copies both ways between two connected streams until either side closes.
fn relay_streams(inbound: std::net::TcpStream, outbound: std::net::TcpStream) {
    let _ = inbound.set_nonblocking(false);
    let (Ok(mut in_read), Ok(mut out_write)) = (inbound.try_clone(), outbound.try_clone()) else {
        return;
    };
    let upstream = std::thread::spawn(move || {
        let _ = io::copy(&mut in_read, &mut out_write);
        let _ = out_write.shutdown(std::net::Shutdown::Write);
    });
    let (mut out_read, mut in_write) = (outbound, inbound);
    let _ = io::copy(&mut out_read, &mut in_write);
    let _ = in_write.shutdown(std::net::Shutdown::Both);
    let _ = upstream.join();
}

/// One container's hosts file.
#[derive(Clone, Debug)]
struct HostsFile {
    path: PathBuf,
    pod_ip: Ipv4Addr,
    hostname: String,
}

/// The mapped Services' addresses and the hosts files that show them.
#[derive(Default)]
pub struct ServiceNames {
    state: Mutex<NamesState>,
}

#[derive(Default)]
struct NamesState {
    /// (namespace, name) -> ready endpoint addresses, per EndpointSlice name.
    addresses: BTreeMap<(String, String), BTreeMap<String, Vec<IpAddr>>>,
    /// (namespace, name) -> the ClusterIP a forwarder serves ([`forward_mapped_services`]); the
    /// hosts files then map the name to it instead of to one endpoint.
    vips: BTreeMap<(String, String), IpAddr>,
    /// Connections forwarded per Service, for the round robin.
    forwarded: BTreeMap<(String, String), usize>,
    files: Vec<HostsFile>,
}

impl ServiceNames {
    /// Writes a hosts file for a container now, and keeps it current.
    pub fn add_file(&self, path: &Path, pod_ip: Ipv4Addr, hostname: &str) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let file = HostsFile {
            path: path.to_path_buf(),
            pod_ip,
            hostname: hostname.to_string(),
        };
        write_hosts(&file, &st.entries())?;
        st.files.push(file);
        Ok(())
    }

    /// Stops updating the hosts files under `dir` (a pod's directory).
    pub fn remove_files_under(&self, dir: &Path) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.files.retain(|f| !f.path.starts_with(dir));
    }

    fn set_slice(&self, service: (String, String), slice: String, ips: Option<Vec<IpAddr>>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let before = st.entries();
        let slices = st.addresses.entry(service).or_default();
        match ips {
            Some(ips) => slices.insert(slice, ips),
            None => slices.remove(&slice),
        };
        let after = st.entries();
        if after == before {
            return;
        }
        progress!("cluster DNS (hosts files): {}", describe(&after));
        for f in &st.files {
            if let Err(e) = write_hosts(f, &after) {
                progress!("cluster DNS: {}: {e}", f.path.display());
            }
        }
    }

    /// Makes `vip` the address of Service `service` in the hosts files.
    fn set_vip(&self, service: (String, String), vip: IpAddr) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.vips.insert(service, vip);
        let entries = st.entries();
        progress!("cluster DNS (hosts files): {}", describe(&entries));
        for f in &st.files {
            if let Err(e) = write_hosts(f, &entries) {
                progress!("cluster DNS: {}: {e}", f.path.display());
            }
        }
    }

    /// The Service's ready endpoints in round-robin order from the next one: each call starts one
    /// further, as kube-proxy spreads connections.
    fn endpoints_round_robin(&self, service: &(String, String)) -> Vec<IpAddr> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<IpAddr> = st
            .addresses
            .get(service)
            .map(|slices| slices.values().flatten().copied().collect())
            .unwrap_or_default();
        all.sort();
        all.dedup();
        let turn = st.forwarded.entry(service.clone()).or_insert(0);
        *turn += 1;
        if !all.is_empty() {
            let n = all.len();
            all.rotate_left(*turn % n);
        }
        all
    }

    /// Watches the mapped Services' EndpointSlices until the task is aborted.
    pub fn watch(self: Arc<Self>, client: Client) -> Vec<JoinHandle<()>> {
        MAPPED
            .iter()
            .map(|(ns, name)| {
                let names = self.clone();
                let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
                let config = watcher::Config::default()
                    .labels(&format!("kubernetes.io/service-name={name}"));
                let service = (ns.to_string(), name.to_string());
                tokio::spawn(async move {
                    let mut events = watcher(api, config).default_backoff().boxed();
                    while let Some(event) = events.next().await {
                        let Ok(event) = event else { continue };
                        match event {
                            watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                                let slice = s.metadata.name.clone().unwrap_or_default();
                                names.set_slice(service.clone(), slice, Some(ready_addresses(&s)));
                            }
                            watcher::Event::Delete(s) => {
                                let slice = s.metadata.name.clone().unwrap_or_default();
                                names.set_slice(service.clone(), slice, None);
                            }
                            watcher::Event::Init | watcher::Event::InitDone => {}
                        }
                    }
                })
            })
            .collect()
    }
}

impl NamesState {
    /// (names, address) for each mapped Service with a ready endpoint: the first, in order.
    fn entries(&self) -> Vec<(Vec<String>, IpAddr)> {
        self.addresses
            .iter()
            .filter_map(|((ns, name), slices)| {
                let vip = self.vips.get(&(ns.clone(), name.clone()));
                let ip = vip.or_else(|| slices.values().flatten().min())?;
                Some((
                    vec![
                        format!("{name}.{ns}.svc"),
                        format!("{name}.{ns}.svc.cluster.local"),
                    ],
                    *ip,
                ))
            })
            .collect()
    }
}

/// The VIP forwarder of the mapped Services: once a mapped Service has a ClusterIP, the harness
/// listens on it (in the cluster network namespace, as for the `kubernetes` Service) on each of its
/// ports, and relays each connection to one of its ready endpoints, in turn (the next one if that
/// one refuses), as kube-proxy would; the hosts files then map the Service's name to the ClusterIP.
/// A connection stays with its endpoint until either side closes it. Pods running the project's
/// images reach the ClusterIPs through their route to the Service range
/// ([`route_to_service_range`]).
pub fn forward_mapped_services(
    network: Arc<TestNetwork>,
    client: Client,
    names: Arc<ServiceNames>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        for (ns, name) in MAPPED {
            let service = (ns.to_string(), name.to_string());
            let api: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), ns);
            let (vip, ports) = loop {
                if let Ok(Some(svc)) = api.get_opt(name).await
                    && let Some(found) = cluster_ip_and_ports(&svc)
                {
                    break found;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            };
            if let Err(e) = serve_vip(&network, &names, &service, vip, &ports) {
                progress!("service forwarder {ns}/{name}: {e}");
                continue;
            }
            names.set_vip(service, IpAddr::V4(vip));
        }
    })
}

/// The Service's ClusterIP and its (port, target port) pairs; numeric target ports only (a named
/// one is taken to equal the port, as in the shipped manifests).
fn cluster_ip_and_ports(
    svc: &k8s_openapi::api::core::v1::Service,
) -> Option<(Ipv4Addr, Vec<(u16, u16)>)> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let spec = svc.spec.as_ref()?;
    let ip: Ipv4Addr = spec.cluster_ip.as_deref()?.parse().ok()?;
    let ports = spec
        .ports
        .iter()
        .flatten()
        .map(|p| {
            let target = match &p.target_port {
                Some(IntOrString::Int(t)) => *t as u16,
                _ => p.port as u16,
            };
            (p.port as u16, target)
        })
        .collect();
    Some((ip, ports))
}

/// Listens on `vip` at each port and relays to the endpoints (tasks on the cluster's runtime, so
/// they end with it; the relays hold only the namespace's path, not the network).
fn serve_vip(
    network: &Arc<TestNetwork>,
    names: &Arc<ServiceNames>,
    service: &(String, String),
    vip: Ipv4Addr,
    ports: &[(u16, u16)],
) -> io::Result<()> {
    network.ip_node(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
    let netns = network.node_netns_path();
    for &(port, target_port) in ports {
        let std_listener = run_in_netns(&netns, move || {
            let l = std::net::TcpListener::bind((vip, port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let (names, service, netns) = (names.clone(), service.clone(), netns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(inbound) = inbound.into_std() else {
                    continue;
                };
                let endpoints = names.endpoints_round_robin(&service);
                let netns = netns.clone();
                std::thread::spawn(move || {
                    let outbound = endpoints.into_iter().find_map(|ip| {
                        let addr = SocketAddr::new(ip, target_port);
                        run_in_netns(&netns, move || {
                            std::net::TcpStream::connect_timeout(
                                &addr,
                                std::time::Duration::from_secs(2),
                            )
                        })
                        .ok()
                    });
                    if let Some(outbound) = outbound {
                        relay_streams(inbound, outbound);
                    }
                });
            }
        });
    }
    progress!(
        "service forwarder: {}/{} at {vip} (ports {ports:?}) to its ready endpoints, in turn",
        service.0,
        service.1
    );
    Ok(())
}

/// Routes the whole Service range via the bridge, so that a pod reaches every forwarded ClusterIP
/// (the `kubernetes` Service's and the mapped Services').
pub fn route_to_service_range(pod_netns: &str) -> io::Result<()> {
    crate::ip_in(
        pod_netns,
        &[
            "route",
            "add",
            super::control_plane::SERVICE_CIDR,
            "via",
            &TestNetwork::BRIDGE_V4.to_string(),
        ],
    )
    .map(drop)
}

fn describe(entries: &[(Vec<String>, IpAddr)]) -> String {
    if entries.is_empty() {
        return "no mapped Service has a ready endpoint".into();
    }
    entries
        .iter()
        .map(|(names, ip)| format!("{} -> {ip}", names[0]))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ready_addresses(slice: &EndpointSlice) -> Vec<IpAddr> {
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
        .flat_map(|e| e.addresses.iter().filter_map(|a| a.parse().ok()))
        .collect()
}

/// The kubelet's hosts file: localhost, the pod's own name, then the mapped Services.
pub fn render_hosts(pod_ip: Ipv4Addr, hostname: &str, entries: &[(Vec<String>, IpAddr)]) -> String {
    let mut s = format!(
        "# Kubernetes-managed hosts file (kmesh-tests kubelet).\n127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n{pod_ip}\t{hostname}\n"
    );
    if !entries.is_empty() {
        s.push_str("# Services mapped by the harness (no cluster DNS here).\n");
    }
    for (names, ip) in entries {
        s.push_str(&format!("{ip}\t{}\n", names.join(" ")));
    }
    s
}

/// Rewrites the file in place: it is bind-mounted, so a rename would not be seen.
fn write_hosts(f: &HostsFile, entries: &[(Vec<String>, IpAddr)]) -> io::Result<()> {
    std::fs::write(&f.path, render_hosts(f.pod_ip, &f.hostname, entries))
        .map_err(|e| io::Error::new(e.kind(), format!("write {}: {e}", f.path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_maps_only_what_it_is_given() {
        let ip: IpAddr = "10.244.161.2".parse().unwrap();
        let s = render_hosts(
            Ipv4Addr::new(10, 244, 161, 3),
            "kmesh-agent-x",
            &[(vec!["a.b.svc".into(), "a.b.svc.cluster.local".into()], ip)],
        );
        assert!(s.contains("10.244.161.3\tkmesh-agent-x\n"), "{s}");
        assert!(
            s.contains("10.244.161.2\ta.b.svc a.b.svc.cluster.local\n"),
            "{s}"
        );
        let s = render_hosts(Ipv4Addr::new(10, 244, 161, 3), "x", &[]);
        assert_eq!(s.lines().filter(|l| !l.starts_with('#')).count(), 3, "{s}");
    }
}
