//! The fake kubelet of one node: a tokio task watching the pods bound to its node
//! (`spec.nodeName`), making each one's sandbox and running it, and tearing it down when it goes.
//!
//! | kubelet duty | here |
//! | --- | --- |
//! | pod sandbox | a network namespace on the cluster bridge ([`crate::TestNetwork`]) with the next IP of the node's pod CIDR and no default route; a cgroup `pod<uid>` below the node's cgroup |
//! | containers of application images | [`super::app_pod`]: a real server per `containerPort` answering with the pod's name |
//! | containers of the project's images | [`super::container`]: the real binaries as host processes, honouring the spec |
//! | status | strategic-merge patches of the status subresource: phase, podIP(s), hostIP(s), conditions, container statuses ([`super::status`]) |
//! | deletion | a pod with a deletionTimestamp is stopped (containers SIGTERM then SIGKILL, cgroup killed, namespace removed), then deleted with grace period 0, as a kubelet finalises it |
//!
//! The kubelet uses the admin credentials (a real one has its node's, under the Node authorizer).
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::{sync::watch, task::JoinHandle};

use super::{
    app_pod, container,
    image::{Catalog, Stage},
    nodes::NodeResources,
    services::{self, ServiceNames},
    status::{self, ContainerState, ContainerStatus},
    volumes::namespace_of,
};
use crate::{TcpServer, TestNetwork, cgroup::remove_cgroup_tree, progress};

/// What every node's kubelet shares.
pub struct Shared {
    pub client: Client,
    pub network: Arc<TestNetwork>,
    pub images: Catalog,
    pub names: Arc<ServiceNames>,
    /// Pods' directories (volumes, kubelet files, plans, logs): `<dir>/<ns>_<name>_<uid>`.
    pub pods_dir: PathBuf,
    /// The `kubernetes` Service (ClusterIP:port), as the kubelet tells containers.
    pub kubernetes_service: SocketAddrV4,
}

/// One running pod, as its workers see it.
pub struct PodContext {
    pub shared: Arc<Shared>,
    pub node: Arc<NodeResources>,
    pub pod: Pod,
    pub ip: Ipv4Addr,
    /// `/run/netns/<name>`.
    pub netns: PathBuf,
    /// The pod's cgroup directory.
    pub cgroup: PathBuf,
    pub dir: PathBuf,
    pub start_time: String,
}

impl PodContext {
    pub fn name(&self) -> &str {
        self.pod.metadata.name.as_deref().unwrap_or_default()
    }

    /// `namespace/name`.
    pub fn label(&self) -> String {
        format!("{}/{}", namespace_of(&self.pod), self.name())
    }

    pub fn spec_containers(&self) -> Vec<Container> {
        self.pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default()
    }

    /// Where a container's stdout and stderr go.
    pub fn log_path(&self, container: &str) -> PathBuf {
        self.dir.join(format!("{container}.log"))
    }
}

/// Reports the pod's status; a pod already gone is not an error.
pub async fn report_status(ctx: &PodContext, containers: &[ContainerStatus]) {
    let patch = status::pod_status(ctx.ip, ctx.node.internal_ip, &ctx.start_time, containers);
    let api: Api<Pod> = Api::namespaced(ctx.shared.client.clone(), namespace_of(&ctx.pod));
    match api
        .patch_status(
            ctx.name(),
            &PatchParams::default(),
            &Patch::Strategic(patch),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => progress!(
            "kubelet {}: pod {}: status update failed: {e}",
            ctx.node.name,
            ctx.label()
        ),
    }
}

/// What the kubelet made for a pod, released when the pod stops.
#[derive(Default)]
pub struct Sandbox {
    pub ip: Option<Ipv4Addr>,
    /// The pod's name in the [`TestNetwork`].
    net_name: Option<String>,
    /// The network namespace's name.
    pub netns: Option<String>,
    pub cgroup: Option<PathBuf>,
    servers: Vec<TcpServer>,
}

struct PodEntry {
    namespace: String,
    name: String,
    cancel: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    sandbox: Arc<Mutex<Sandbox>>,
    dir: PathBuf,
}

pub struct Kubelet {
    pub node: Arc<NodeResources>,
    shared: Arc<Shared>,
    pods: Mutex<BTreeMap<String, PodEntry>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Kubelet {
    /// Starts the node's kubelet; the task runs until aborted.
    pub fn start(node: Arc<NodeResources>, shared: Arc<Shared>) -> (Arc<Kubelet>, JoinHandle<()>) {
        let kubelet = Arc::new(Kubelet {
            node,
            shared,
            pods: Mutex::new(BTreeMap::new()),
        });
        let task = tokio::spawn(kubelet.clone().watch());
        (kubelet, task)
    }

    async fn watch(self: Arc<Self>) {
        let api: Api<Pod> = Api::all(self.shared.client.clone());
        let config =
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.node.name));
        let mut events = watcher(api, config).default_backoff().boxed();
        let mut listed: BTreeSet<String> = BTreeSet::new();
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    progress!("kubelet {}: pod watch: {e} (retrying)", self.node.name);
                    continue;
                }
            };
            match event {
                watcher::Event::Init => listed.clear(),
                watcher::Event::InitApply(pod) => {
                    listed.insert(uid(&pod));
                    self.on_pod(pod);
                }
                watcher::Event::InitDone => {
                    let gone: Vec<String> = lock(&self.pods)
                        .keys()
                        .filter(|u| !listed.contains(*u))
                        .cloned()
                        .collect();
                    for u in gone {
                        tokio::spawn(self.clone().stop_owned(u));
                    }
                }
                watcher::Event::Apply(pod) => self.on_pod(pod),
                watcher::Event::Delete(pod) => {
                    tokio::spawn(self.clone().stop_owned(uid(&pod)));
                }
            }
        }
    }

    fn on_pod(self: &Arc<Self>, pod: Pod) {
        let uid = uid(&pod);
        if pod.metadata.deletion_timestamp.is_some() {
            tokio::spawn(self.clone().terminate(pod));
            return;
        }
        let mut pods = lock(&self.pods);
        if pods.contains_key(&uid) {
            return;
        }
        let namespace = namespace_of(&pod).to_string();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let dir = self
            .shared
            .pods_dir
            .join(format!("{namespace}_{name}_{uid}"));
        let (cancel, cancelled) = watch::channel(false);
        let sandbox = Arc::new(Mutex::new(Sandbox::default()));
        let task = tokio::spawn(
            self.clone()
                .run_pod(pod, sandbox.clone(), dir.clone(), cancelled),
        );
        pods.insert(
            uid,
            PodEntry {
                namespace,
                name,
                cancel,
                task: Some(task),
                sandbox,
                dir,
            },
        );
    }

    async fn run_pod(
        self: Arc<Self>,
        pod: Pod,
        sandbox: Arc<Mutex<Sandbox>>,
        dir: PathBuf,
        cancel: watch::Receiver<bool>,
    ) {
        let label = format!(
            "{}/{}",
            namespace_of(&pod),
            pod.metadata.name.as_deref().unwrap_or_default()
        );
        if let Err(e) = self.start_pod(pod, &sandbox, dir, cancel).await {
            progress!("kubelet {}: pod {label}: {e}", self.node.name);
        }
    }

    /// Makes the sandbox, then runs the containers (returning at once for application pods).
    async fn start_pod(
        &self,
        pod: Pod,
        sandbox: &Arc<Mutex<Sandbox>>,
        dir: PathBuf,
        cancel: watch::Receiver<bool>,
    ) -> io::Result<()> {
        let (ctx, net_pod) = self.make_sandbox(pod, sandbox, dir).await?;
        let stages: Result<Vec<Option<Stage>>, String> = ctx
            .spec_containers()
            .iter()
            .map(|c| {
                self.shared
                    .images
                    .stage_for(c.image.as_deref().unwrap_or_default())
                    .map(|s| s.cloned())
            })
            .collect();
        let stages = match stages {
            Ok(s) => s,
            Err(message) => {
                self.report_image_error(&ctx, &message).await;
                return Ok(());
            }
        };
        if stages.iter().all(Option::is_none) {
            return self.run_application(&ctx, net_pod, sandbox, cancel).await;
        }
        let Some(stages) = stages.into_iter().collect::<Option<Vec<Stage>>>() else {
            return Err(io::Error::other(
                "mixes the project's images with others (not supported by the test kubelet)",
            ));
        };
        // The kubernetes Service and the forwarded mapped Services are all in the Service range.
        services::route_to_service_range(net_pod.netns_name())?;
        progress!(
            "kubelet {}: pod {} sandbox at {}; starting {} container(s)",
            self.node.name,
            ctx.label(),
            ctx.ip,
            stages.len()
        );
        container::run(ctx, stages, cancel).await
    }

    /// The pod's IP, cgroup and network namespace, recorded in `sandbox` as they are made (so
    /// that stopping the pod releases whatever exists).
    async fn make_sandbox(
        &self,
        pod: Pod,
        sandbox: &Arc<Mutex<Sandbox>>,
        dir: PathBuf,
    ) -> io::Result<(Arc<PodContext>, crate::Pod)> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        std::fs::create_dir_all(&dir)?;
        let ip = self.node.allocate_ip()?;
        let cgroup = self.node.cgroup.path().join(format!("pod{}", uid(&pod)));
        std::fs::create_dir_all(&cgroup)
            .map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", cgroup.display())))?;
        lock(sandbox).cgroup = Some(cgroup.clone());
        let network = self.shared.network.clone();
        let net_name = name.clone();
        let net_pod =
            tokio::task::spawn_blocking(move || network.add_pod(&net_name, ip, None)).await??;
        {
            let mut sb = lock(sandbox);
            sb.net_name = Some(name);
            sb.netns = Some(net_pod.netns_name().to_string());
            sb.ip = Some(ip);
        }
        let ctx = Arc::new(PodContext {
            shared: self.shared.clone(),
            node: self.node.clone(),
            pod,
            ip,
            netns: net_pod.netns_path(),
            cgroup,
            dir,
            start_time: status::now(),
        });
        Ok((ctx, net_pod))
    }

    /// An image that cannot be run: `ErrImagePull`, as for an image that cannot be pulled.
    async fn report_image_error(&self, ctx: &PodContext, message: &str) {
        progress!("kubelet {}: pod {}: {message}", self.node.name, ctx.label());
        let waiting: Vec<ContainerStatus> = ctx
            .spec_containers()
            .iter()
            .map(|c| ContainerStatus {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                ready: false,
                restart_count: 0,
                state: ContainerState::Waiting {
                    reason: "ErrImagePull".into(),
                    message: message.into(),
                },
                last_state: None,
            })
            .collect();
        report_status(ctx, &waiting).await;
    }

    /// An application pod: its servers, then Running, and Ready at once or once its readiness
    /// probes pass (probed until the pod stops).
    async fn run_application(
        &self,
        ctx: &PodContext,
        net_pod: crate::Pod,
        sandbox: &Arc<Mutex<Sandbox>>,
        mut cancel: watch::Receiver<bool>,
    ) -> io::Result<()> {
        let pod = ctx.pod.clone();
        let servers =
            tokio::task::spawn_blocking(move || app_pod::start_servers(&net_pod, &pod)).await??;
        let ports = servers.len();
        lock(sandbox).servers = servers;
        let readiness = app_pod::readiness(ctx);
        report_status(ctx, &app_pod::statuses(&ctx.pod, &readiness)).await;
        progress!(
            "kubelet {}: pod {} running at {} ({ports} port(s) served)",
            self.node.name,
            ctx.label(),
            ctx.ip
        );
        app_pod::probe_until_stopped(ctx, readiness, &mut cancel).await;
        Ok(())
    }

    /// A pod being deleted: stop it, then finalise the deletion (grace period 0).
    async fn terminate(self: Arc<Self>, pod: Pod) {
        let uid = uid(&pod);
        let label = format!(
            "{}/{}",
            namespace_of(&pod),
            pod.metadata.name.as_deref().unwrap_or_default()
        );
        if self.stop(&uid).await.is_some() {
            progress!("kubelet {}: pod {label} deleted; stopped", self.node.name);
        }
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), namespace_of(&pod));
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api
            .delete(pod.metadata.name.as_deref().unwrap_or_default(), &params)
            .await
        {
            Ok(_) => progress!(
                "kubelet {}: pod {label}: deletion finalised (grace period 0)",
                self.node.name
            ),
            // Gone already: deleted with grace period 0, or finalised by a concurrent event.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => progress!("kubelet {}: deleting pod {label}: {e}", self.node.name),
        }
    }

    /// A pod gone from the API (deleted at once, or missed while the watch was down).
    async fn stop_owned(self: Arc<Self>, uid: String) {
        if let Some(label) = self.stop(&uid).await {
            progress!("kubelet {}: pod {label} gone; stopped", self.node.name);
        }
    }

    /// Stops a pod's containers and releases its sandbox; returns the pod's `namespace/name`,
    /// or `None` if the pod is unknown.
    pub async fn stop(&self, uid: &str) -> Option<String> {
        let mut entry = lock(&self.pods).remove(uid)?;
        let _ = entry.cancel.send(true);
        if let Some(task) = entry.task.take()
            && tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
        {
            progress!(
                "kubelet {}: pod {}/{} did not stop within 10 s; killing its cgroup",
                self.node.name,
                entry.namespace,
                entry.name
            );
        }
        self.shared.names.remove_files_under(&entry.dir);
        let network = self.shared.network.clone();
        let sandbox = entry.sandbox.clone();
        let label = format!("{}/{}", entry.namespace, entry.name);
        let node = self.node.name.clone();
        let pod = label.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for e in release(&mut lock(&sandbox), &network) {
                progress!("kubelet {node}: pod {pod}: cleanup: {e}");
            }
        })
        .await;
        Some(label)
    }

    /// Stops every pod (the cluster is going away).
    pub async fn shutdown(&self) {
        let uids: Vec<String> = lock(&self.pods).keys().cloned().collect();
        for u in uids {
            self.stop(&u).await;
        }
    }

    /// The sandbox of pod `namespace/name`, if this kubelet runs it: (netns name, cgroup, IP).
    pub fn sandbox(&self, namespace: &str, name: &str) -> Option<(String, PathBuf, Ipv4Addr)> {
        let pods = lock(&self.pods);
        let e = pods
            .values()
            .find(|e| e.namespace == namespace && e.name == name)?;
        let sb = lock(&e.sandbox);
        Some((sb.netns.clone()?, sb.cgroup.clone()?, sb.ip?))
    }
}

/// Releases a sandbox: servers, processes (the cgroup is killed), network namespace. Returns the
/// errors (the rest is still released).
fn release(sb: &mut Sandbox, network: &TestNetwork) -> Vec<io::Error> {
    let mut errors = Vec::new();
    sb.servers.clear();
    if let Some(cg) = sb.cgroup.take()
        && let Err(e) = remove_cgroup_tree(&cg)
    {
        errors.push(e);
    }
    if let Some(name) = sb.net_name.take()
        && let Err(e) = network.remove_pod(&name)
    {
        errors.push(e);
    }
    errors
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}
