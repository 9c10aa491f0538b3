//! Pods of the project's own images (the operator Deployment, the agent DaemonSet): the kubelet
//! runs the real binaries as host processes, honouring the pod spec:
//!
//! | pod spec | here |
//! | --- | --- |
//! | image | the Dockerfile stage of that name ([`super::image`]): its workspace binary bind-mounted at the image's path |
//! | `command`/`args` | `command`, else the image's `ENTRYPOINT`; then `args`; `$(VAR)` expanded |
//! | `env` | values; `fieldRef`, `secretKeyRef`, `configMapKeyRef`; plus `PATH`, `HOSTNAME` and `KUBERNETES_SERVICE_*` / `KUBERNETES_PORT*` |
//! | volumes and `volumeMounts` | bind mounts at `mountPath` (`readOnly`, `subPath`; `mountPropagation` `HostToContainer`; `Bidirectional` is treated as `HostToContainer`: no container here mounts anything for the host to see) |
//! | kubelet files | `/etc/hosts` (with the mapped Service names, see [`super::services`]), `/etc/resolv.conf` (no nameserver), `/etc/hostname` |
//! | `securityContext` | `runAsNonRoot` checked as the kubelet does (numeric image `USER` required), `runAsUser`/`runAsGroup`/image `USER` applied, `readOnlyRootFilesystem`, `allowPrivilegeEscalation: false` (no_new_privs); `privileged` is root with every capability; `capabilities` are not changed for root containers (a non-root user has none) |
//! | `readinessProbe` `httpGet` | polled from the node at the pod IP with the spec's period, timeout and thresholds; sets the container's `ready` |
//! | `restartPolicy: Always` | an exited container is restarted after 1 s, doubling to 10 s (a real kubelet starts at 10 s and caps at 5 min) |
//!
//! Not done (reported here, not silently dropped): liveness and startup probes, init and sidecar
//! containers, resource limits, service links other than `kubernetes`, token refresh.
use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{ConfigMap, Container, EnvVar, Probe, Secret},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::Api;
use tokio::sync::watch;

use super::{
    http,
    image::Stage,
    kubelet::{PodContext, report_status},
    nodes::HostMount,
    runtime::{ContainerPlan, Mount, MountSource, NodeKind, Propagation, User},
    status::{ContainerState, ContainerStatus, now},
    volumes::{self, Prepared},
};
use crate::{progress, workspace_bin};

/// PATH of the images (Debian's default).
const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often the supervisor looks at its processes.
const TICK: Duration = Duration::from_millis(100);

/// A container that cannot be started as specified: reported as `CreateContainerConfigError`.
#[derive(Debug)]
struct ConfigError(String);

/// Runs the pod's containers until `cancel` turns true; then stops them.
pub async fn run(
    ctx: Arc<PodContext>,
    stages: Vec<Stage>,
    mut cancel: watch::Receiver<bool>,
) -> io::Result<()> {
    let containers = ctx.spec_containers();
    let Some(volumes) = prepare_volumes(&ctx, &containers, &mut cancel).await else {
        return Ok(());
    };
    write_kubelet_files(&ctx)?;
    let mut runs = Vec::new();
    for (c, stage) in containers.iter().zip(&stages) {
        let run = match plan(&ctx, c, stage, &volumes).await {
            Ok(plan) => ContainerRun::new(&ctx, c, plan),
            Err(e) => Err(e),
        };
        match run {
            Ok(run) => runs.push(run),
            Err(ConfigError(message)) => {
                progress!(
                    "kubelet {}: pod {}: container {}: {message}",
                    ctx.node.name,
                    ctx.label(),
                    c.name
                );
                let statuses: Vec<ContainerStatus> = containers
                    .iter()
                    .map(|c| waiting(c, "CreateContainerConfigError", &message))
                    .collect();
                report_status(&ctx, &statuses).await;
                return Ok(());
            }
        }
    }
    supervise(&ctx, &mut runs, &mut cancel).await;
    Ok(())
}

fn waiting(c: &Container, reason: &str, message: &str) -> ContainerStatus {
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        ready: false,
        restart_count: 0,
        state: ContainerState::Waiting {
            reason: reason.into(),
            message: message.into(),
        },
        last_state: None,
    }
}

/// Prepares the volumes, retrying every second while something is missing (a Secret not created
/// yet, say), as a kubelet does; `None` when cancelled first.
async fn prepare_volumes(
    ctx: &PodContext,
    containers: &[Container],
    cancel: &mut watch::Receiver<bool>,
) -> Option<BTreeMap<String, Prepared>> {
    let mut last_error = String::new();
    loop {
        let vctx = volumes::VolumeContext {
            client: &ctx.shared.client,
            pod: &ctx.pod,
            node: &ctx.node,
            dir: &ctx.dir.join("volumes"),
        };
        match volumes::prepare(&vctx).await {
            Ok(v) => return Some(v),
            Err(e) => {
                let message = format!("MountVolume.SetUp failed: {e}");
                if message != last_error {
                    progress!(
                        "kubelet {}: pod {}: {message} (retrying)",
                        ctx.node.name,
                        ctx.label()
                    );
                    let statuses: Vec<ContainerStatus> = containers
                        .iter()
                        .map(|c| waiting(c, "ContainerCreating", &message))
                        .collect();
                    report_status(ctx, &statuses).await;
                    last_error = message;
                }
            }
        }
        tokio::select! {
            _ = cancel.changed() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The files a kubelet writes for every container: hosts, resolv.conf, hostname.
fn write_kubelet_files(ctx: &PodContext) -> io::Result<()> {
    let etc = ctx.dir.join("etc");
    fs::create_dir_all(&etc)?;
    fs::write(
        etc.join("resolv.conf"),
        "# No cluster DNS in the test cluster: Service names are mapped in /etc/hosts.\n\
         options ndots:5\n",
    )?;
    fs::write(etc.join("hostname"), format!("{}\n", ctx.name()))?;
    ctx.shared
        .names
        .add_file(&etc.join("hosts"), ctx.ip, ctx.name())
}

/// The container's plan: program, environment, mounts, user.
async fn plan(
    ctx: &PodContext,
    c: &Container,
    stage: &Stage,
    volumes: &BTreeMap<String, Prepared>,
) -> Result<ContainerPlan, ConfigError> {
    let user = user(ctx, c, stage)?;
    let env = environment(ctx, c).await?;
    let vars: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut argv: Vec<String> = match &c.command {
        Some(cmd) => cmd.iter().map(|a| expand(a, &vars)).collect(),
        None => stage.entrypoint.clone(),
    };
    argv.extend(c.args.iter().flatten().map(|a| expand(a, &vars)));
    let Some(program) = argv.first().cloned() else {
        return Err(ConfigError("no command and no image ENTRYPOINT".into()));
    };
    let mut mounts = standard_mounts();
    mounts.extend(volume_mounts(c, volumes)?);
    mounts.extend(kubelet_file_mounts(ctx));
    mounts.extend(binary_mounts(stage)?);
    let security = c.security_context.as_ref();
    let dir = ctx.dir.join(format!("container-{}", c.name));
    fs::create_dir_all(dir.join("scratch")).map_err(|e| ConfigError(e.to_string()))?;
    Ok(ContainerPlan {
        cgroup: ctx.cgroup.clone(),
        netns: ctx.netns.clone(),
        scratch: dir.join("scratch"),
        mounts,
        read_only_root: security
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false),
        program: PathBuf::from(program),
        argv,
        env,
        working_dir: PathBuf::from(c.working_dir.clone().unwrap_or_else(|| "/".into())),
        user,
        no_new_privs: security.and_then(|s| s.allow_privilege_escalation) == Some(false),
    })
}

/// The user to run as, with the kubelet's `runAsNonRoot` check.
fn user(ctx: &PodContext, c: &Container, stage: &Stage) -> Result<Option<User>, ConfigError> {
    let pod_sc = ctx
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref());
    let sc = c.security_context.as_ref();
    let run_as_user = sc
        .and_then(|s| s.run_as_user)
        .or(pod_sc.and_then(|s| s.run_as_user));
    let run_as_group = sc
        .and_then(|s| s.run_as_group)
        .or(pod_sc.and_then(|s| s.run_as_group));
    let non_root = sc
        .and_then(|s| s.run_as_non_root)
        .or(pod_sc.and_then(|s| s.run_as_non_root))
        == Some(true);
    let (image_uid, image_gid) = match stage.user.as_deref() {
        None => (Some(0), None),
        Some(u) => {
            let (uid, gid) = u.split_once(':').unwrap_or((u, ""));
            (uid.parse::<u32>().ok(), gid.parse::<u32>().ok())
        }
    };
    let uid = match (run_as_user, image_uid) {
        (Some(u), _) => Some(u as u32),
        (None, Some(u)) => Some(u),
        (None, None) if non_root => {
            // The kubelet's wording (kuberuntime_container_linux.go: verifyRunAsNonRoot).
            return Err(ConfigError(format!(
                "container has runAsNonRoot and image has non-numeric user ({}), cannot verify \
                 user is non-root",
                stage.user.as_deref().unwrap_or_default()
            )));
        }
        (None, None) => {
            return Err(ConfigError(format!(
                "image USER {:?} is a name; the test kubelet runs numeric users only",
                stage.user
            )));
        }
    };
    if non_root && uid == Some(0) {
        return Err(ConfigError(
            "container has runAsNonRoot and image will run as root".into(),
        ));
    }
    Ok(match uid {
        Some(0) | None => None,
        Some(uid) => Some(User {
            uid,
            gid: run_as_group.map(|g| g as u32).or(image_gid).unwrap_or(uid),
        }),
    })
}

/// The container's whole environment, in the kubelet's order: service links of `kubernetes`,
/// then the spec's `env` (later entries may refer to earlier ones with `$(VAR)`).
async fn environment(
    ctx: &PodContext,
    c: &Container,
) -> Result<Vec<(String, String)>, ConfigError> {
    let svc = ctx.shared.kubernetes_service;
    let (host, port) = (svc.ip().to_string(), svc.port().to_string());
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), IMAGE_PATH.into()),
        ("HOSTNAME".into(), ctx.name().into()),
        ("KUBERNETES_SERVICE_HOST".into(), host.clone()),
        ("KUBERNETES_SERVICE_PORT".into(), port.clone()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.clone()),
        ("KUBERNETES_PORT".into(), format!("tcp://{svc}")),
        (
            format!("KUBERNETES_PORT_{port}_TCP"),
            format!("tcp://{svc}"),
        ),
        (format!("KUBERNETES_PORT_{port}_TCP_PROTO"), "tcp".into()),
        (format!("KUBERNETES_PORT_{port}_TCP_PORT"), port.clone()),
        (format!("KUBERNETES_PORT_{port}_TCP_ADDR"), host),
    ];
    for var in c.env.iter().flatten() {
        let value = env_value(ctx, var).await?;
        let vars: BTreeMap<&str, &str> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let value = expand(&value, &vars);
        env.retain(|(k, _)| *k != var.name);
        env.push((var.name.clone(), value));
    }
    if c.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(ConfigError(
            "envFrom is not supported by the test kubelet".into(),
        ));
    }
    Ok(env)
}

async fn env_value(ctx: &PodContext, var: &EnvVar) -> Result<String, ConfigError> {
    let Some(from) = &var.value_from else {
        return Ok(var.value.clone().unwrap_or_default());
    };
    let ns = volumes::namespace_of(&ctx.pod);
    let client = ctx.shared.client.clone();
    let err = |e: String| ConfigError(format!("env {}: {e}", var.name));
    if let Some(f) = &from.field_ref {
        return volumes::field_value(&ctx.pod, &f.field_path).map_err(|e| err(e.to_string()));
    }
    if let Some(s) = &from.secret_key_ref {
        let secret = Api::<Secret>::namespaced(client, ns)
            .get(&s.name)
            .await
            .map_err(|e| err(e.to_string()))?;
        let v = secret.data.unwrap_or_default().remove(&s.key);
        return v
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .ok_or_else(|| err(format!("secret {} has no key {}", s.name, s.key)));
    }
    if let Some(m) = &from.config_map_key_ref {
        let cm = Api::<ConfigMap>::namespaced(client, ns)
            .get(&m.name)
            .await
            .map_err(|e| err(e.to_string()))?;
        return cm
            .data
            .unwrap_or_default()
            .remove(&m.key)
            .ok_or_else(|| err(format!("configmap {} has no key {}", m.name, m.key)));
    }
    Err(err(
        "resourceFieldRef is not supported by the test kubelet".into()
    ))
}

/// The kubelet's `$(VAR)` expansion: defined variables are replaced, `$$` is a literal `$`,
/// anything else stays as written.
pub fn expand(s: &str, vars: &BTreeMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('(')
            && let Some(end) = r.find(')')
            && let Some(v) = vars.get(&r[..end])
        {
            out.push_str(v);
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// What a container runtime mounts in every container: the host's `/proc` and `/dev` (no PID
/// namespaces here) and a sysfs of the pod's network namespace.
fn standard_mounts() -> Vec<Mount> {
    let bind = |p: &str| Mount {
        target: PathBuf::from(p),
        source: MountSource::Bind {
            host: PathBuf::from(p),
            recursive: true,
            kind: NodeKind::Directory,
        },
        read_only: false,
        propagation: Propagation::Private,
    };
    vec![
        bind("/proc"),
        bind("/dev"),
        Mount {
            target: PathBuf::from("/sys"),
            source: MountSource::Sysfs,
            read_only: false,
            propagation: Propagation::Private,
        },
    ]
}

fn volume_mounts(
    c: &Container,
    volumes: &BTreeMap<String, Prepared>,
) -> Result<Vec<Mount>, ConfigError> {
    let mut specs: Vec<_> = c.volume_mounts.iter().flatten().collect();
    // Parents before children, as container runtimes order mounts.
    specs.sort_by_key(|m| Path::new(&m.mount_path).components().count());
    let mut out = Vec::new();
    for m in specs {
        let v = volumes.get(&m.name).ok_or_else(|| {
            ConfigError(format!("volumeMount {:?}: no volume of that name", m.name))
        })?;
        let target = PathBuf::from(&m.mount_path);
        let read_only = m.read_only == Some(true);
        let propagation = match m.mount_propagation.as_deref() {
            None | Some("None") => Propagation::Private,
            Some("HostToContainer" | "Bidirectional") => Propagation::HostToContainer,
            Some(other) => {
                return Err(ConfigError(format!(
                    "volumeMount {:?}: mountPropagation {other}",
                    m.name
                )));
            }
        };
        let sub = |base: &Path| match m.sub_path.as_deref() {
            Some(s) if !s.is_empty() => base.join(s),
            _ => base.to_path_buf(),
        };
        let bind = |host: PathBuf, recursive: bool| {
            let kind = if host.is_file() {
                NodeKind::File
            } else {
                NodeKind::Directory
            };
            Mount {
                target: target.clone(),
                source: MountSource::Bind {
                    host,
                    recursive,
                    kind,
                },
                read_only,
                propagation,
            }
        };
        match v {
            Prepared::Dir(dir) => out.push(bind(sub(dir), false)),
            Prepared::Host(HostMount::Bind { path, recursive }) => {
                out.push(bind(sub(path), *recursive))
            }
            Prepared::Host(HostMount::CgroupParent { relative, cgroup }) => {
                out.push(Mount {
                    target: target.clone(),
                    source: MountSource::Tmpfs,
                    read_only: false,
                    propagation: Propagation::Private,
                });
                out.push(Mount {
                    target: target.join(relative),
                    source: MountSource::Bind {
                        host: cgroup.clone(),
                        recursive: false,
                        kind: NodeKind::Directory,
                    },
                    read_only,
                    propagation: Propagation::Private,
                });
            }
        }
    }
    Ok(out)
}

fn kubelet_file_mounts(ctx: &PodContext) -> Vec<Mount> {
    ["hosts", "resolv.conf", "hostname"]
        .iter()
        .map(|f| Mount {
            target: Path::new("/etc").join(f),
            source: MountSource::Bind {
                host: ctx.dir.join("etc").join(f),
                recursive: false,
                kind: NodeKind::File,
            },
            read_only: false,
            propagation: Propagation::Private,
        })
        .collect()
}

/// The image's binaries: the workspace builds, read-only at the image's paths.
fn binary_mounts(stage: &Stage) -> Result<Vec<Mount>, ConfigError> {
    stage
        .binaries
        .iter()
        .map(|(bin, path)| {
            let host = workspace_bin(bin).map_err(|e| ConfigError(e.to_string()))?;
            Ok(Mount {
                target: path.clone(),
                source: MountSource::Bind {
                    host,
                    recursive: false,
                    kind: NodeKind::File,
                },
                read_only: true,
                propagation: Propagation::Private,
            })
        })
        .collect()
}

/// A readiness probe's schedule and counters.
struct Readiness {
    probe: Option<HttpProbe>,
    next: Instant,
    successes: i32,
    failures: i32,
}

#[derive(Clone, Debug)]
struct HttpProbe {
    path: String,
    port: u16,
    period: Duration,
    timeout: Duration,
    success_threshold: i32,
    failure_threshold: i32,
    initial_delay: Duration,
}

fn http_probe(c: &Container, probe: &Probe) -> Result<HttpProbe, ConfigError> {
    let get = probe.http_get.as_ref().ok_or_else(|| {
        ConfigError("readinessProbe: only httpGet probes are run by the test kubelet".into())
    })?;
    let port = match &get.port {
        IntOrString::Int(p) => *p as u16,
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port as u16)
            .ok_or_else(|| ConfigError(format!("readinessProbe: no container port {name:?}")))?,
    };
    if get.scheme.as_deref().is_some_and(|s| s != "HTTP") || get.host.is_some() {
        return Err(ConfigError(
            "readinessProbe: only HTTP to the pod IP is run by the test kubelet".into(),
        ));
    }
    let secs = |v: Option<i32>, d: u64| Duration::from_secs(v.map_or(d, |s| s.max(0) as u64));
    Ok(HttpProbe {
        path: get.path.clone().unwrap_or_else(|| "/".into()),
        port,
        period: secs(probe.period_seconds, 10),
        timeout: secs(probe.timeout_seconds, 1),
        success_threshold: probe.success_threshold.unwrap_or(1),
        failure_threshold: probe.failure_threshold.unwrap_or(3),
        initial_delay: secs(probe.initial_delay_seconds, 0),
    })
}

/// One container under supervision.
struct ContainerRun {
    status: ContainerStatus,
    plan_file: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    started: Instant,
    next_start: Instant,
    backoff: Duration,
    readiness: Readiness,
}

impl ContainerRun {
    fn new(ctx: &PodContext, c: &Container, plan: ContainerPlan) -> Result<Self, ConfigError> {
        let io_err = |e: io::Error| ConfigError(e.to_string());
        let dir = ctx.dir.join(format!("container-{}", c.name));
        let plan_file = dir.join("plan.json");
        let json = serde_json::to_vec_pretty(&plan).map_err(|e| ConfigError(e.to_string()))?;
        fs::write(&plan_file, json).map_err(io_err)?;
        let probe = match &c.readiness_probe {
            Some(p) => Some(http_probe(c, p)?),
            None => None,
        };
        if c.liveness_probe.is_some() || c.startup_probe.is_some() {
            let mut log = log_file(&ctx.log_path(&c.name)).map_err(io_err)?;
            writeln!(
                log,
                "kmesh-tests kubelet: liveness/startup probes of {} are not run",
                c.name
            )
            .map_err(io_err)?;
        }
        Ok(ContainerRun {
            status: waiting(c, "ContainerCreating", ""),
            plan_file,
            log: ctx.log_path(&c.name),
            child: None,
            started: Instant::now(),
            next_start: Instant::now(),
            backoff: BACKOFF_START,
            readiness: Readiness {
                probe,
                next: Instant::now(),
                successes: 0,
                failures: 0,
            },
        })
    }

    /// Starts the container; returns whether its status changed.
    fn start(&mut self, ctx: &PodContext) -> bool {
        let spawned = log_file(&self.log).and_then(|out| {
            Command::new(workspace_bin("kmesh-container")?)
                .arg(&self.plan_file)
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
        });
        match spawned {
            Ok(child) => {
                progress!(
                    "kubelet {}: pod {}: container {} started (pid {}, log {})",
                    ctx.node.name,
                    ctx.label(),
                    self.status.name,
                    child.id(),
                    self.log.display()
                );
                self.child = Some(child);
                self.started = Instant::now();
                self.status.state = ContainerState::Running { started_at: now() };
                self.status.ready = self.readiness.probe.is_none();
                self.readiness.successes = 0;
                self.readiness.failures = 0;
                self.readiness.next = Instant::now()
                    + self
                        .readiness
                        .probe
                        .as_ref()
                        .map_or(Duration::ZERO, |p| p.initial_delay);
            }
            Err(e) => {
                self.status.state = ContainerState::Waiting {
                    reason: "RunContainerError".into(),
                    message: e.to_string(),
                };
                self.next_start = Instant::now() + self.backoff;
            }
        }
        true
    }

    /// Notices an exit; returns whether the status changed.
    fn check_exit(&mut self, ctx: &PodContext) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        let Ok(Some(exit)) = child.try_wait() else {
            return false;
        };
        self.child = None;
        if self.started.elapsed() > Duration::from_secs(30) {
            self.backoff = BACKOFF_START;
        }
        progress!(
            "kubelet {}: pod {}: container {} exited ({exit}) after {:.1?}; restarting in {:?}; \
             log ends:\n{}",
            ctx.node.name,
            ctx.label(),
            self.status.name,
            self.started.elapsed(),
            self.backoff,
            super::control_plane::tail(&self.log, 6)
        );
        self.status.last_state = Some(ContainerState::Terminated {
            exit_code: exit.code().unwrap_or(128 + 9),
            reason: "Error".into(),
        });
        self.status.restart_count += 1;
        self.status.ready = false;
        self.status.state = ContainerState::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: format!("back-off {:?} restarting failed container", self.backoff),
        };
        self.next_start = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        true
    }

    /// Runs the readiness probe if it is due; returns whether `ready` changed.
    async fn probe(&mut self, ctx: &PodContext) -> bool {
        let Some(p) = self.readiness.probe.clone() else {
            return false;
        };
        if self.child.is_none() || Instant::now() < self.readiness.next {
            return false;
        }
        self.readiness.next = Instant::now() + p.period;
        let netns = ctx.shared.network.node_netns_path();
        let addr = SocketAddr::V4(SocketAddrV4::new(ctx.ip, p.port));
        let path = p.path.clone();
        let ok = tokio::task::spawn_blocking(move || {
            http::get_in_netns(&netns, addr, &path, p.timeout)
                .is_ok_and(|(code, _)| (200..400).contains(&code))
        })
        .await
        .unwrap_or(false);
        if ok {
            self.readiness.successes += 1;
            self.readiness.failures = 0;
        } else {
            self.readiness.failures += 1;
            self.readiness.successes = 0;
        }
        let ready = if self.status.ready {
            self.readiness.failures < p.failure_threshold
        } else {
            self.readiness.successes >= p.success_threshold
        };
        let changed = ready != self.status.ready;
        self.status.ready = ready;
        if changed {
            progress!(
                "kubelet {}: pod {}: container {} {} (readiness probe GET {}:{}{})",
                ctx.node.name,
                ctx.label(),
                self.status.name,
                if ready { "ready" } else { "not ready" },
                ctx.ip,
                p.port,
                p.path
            );
        }
        changed
    }

    /// SIGTERM, a short grace period, then SIGKILL (tests should not wait 30 s).
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn log_file(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new().create(true).append(true).open(path)
}

/// Starts, restarts and probes the containers, reporting status changes, until cancelled.
async fn supervise(
    ctx: &PodContext,
    runs: &mut [ContainerRun],
    cancel: &mut watch::Receiver<bool>,
) {
    loop {
        let mut changed = false;
        for run in runs.iter_mut() {
            if run.child.is_none() && Instant::now() >= run.next_start {
                changed |= run.start(ctx);
            }
            changed |= run.check_exit(ctx);
            changed |= run.probe(ctx).await;
        }
        if changed {
            let statuses: Vec<ContainerStatus> = runs.iter().map(|r| r.status.clone()).collect();
            report_status(ctx, &statuses).await;
        }
        tokio::select! {
            _ = cancel.changed() => break,
            _ = tokio::time::sleep(TICK) => {}
        }
    }
    for run in runs.iter_mut() {
        run.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_the_kubelet() {
        let vars: BTreeMap<&str, &str> = [("NODE_NAME", "node-a")].into_iter().collect();
        assert_eq!(expand("--node=$(NODE_NAME)", &vars), "--node=node-a");
        assert_eq!(
            expand("$(UNDEFINED) $$(NODE_NAME)", &vars),
            "$(UNDEFINED) $(NODE_NAME)"
        );
        assert_eq!(expand("a$", &vars), "a$");
    }
}
