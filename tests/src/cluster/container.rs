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
//! | `readinessProbe` `httpGet`, `tcpSocket` | polled from the node at the pod IP with the spec's period, timeout and thresholds (`readiness.rs`); sets the container's `ready` |
//! | `restartPolicy: Always` | an exited container is restarted after 1 s, doubling to 10 s (a real kubelet starts at 10 s and caps at 5 min) |
//!
//! Not done (reported here, not silently dropped): liveness and startup probes, init and sidecar
//! containers, resource limits, service links other than `kubernetes`, token refresh.
use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Container;
use tokio::sync::watch;

use super::{
    container_spec::{ConfigError, plan},
    image::Stage,
    kubelet::{PodContext, report_status},
    readiness::{Readiness, readiness_probe},
    runtime::ContainerPlan,
    status::{ContainerState, ContainerStatus, now},
    volumes::{self, Prepared},
};
use crate::{progress, workspace_bin};

const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often the supervisor looks at its processes.
const TICK: Duration = Duration::from_millis(100);

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
            Some(p) => Some(readiness_probe(c, p)?),
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
            readiness: Readiness::new(probe),
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
                self.readiness.restart();
                self.status.ready = self.readiness.ready;
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
        if self.child.is_none() {
            return false;
        }
        let Some(p) = self.readiness.due() else {
            return false;
        };
        let netns = ctx.shared.network.node_netns_path();
        let ip = ctx.ip;
        let what = p.describe(ip);
        let ok = tokio::task::spawn_blocking(move || p.run(&netns, ip))
            .await
            .unwrap_or(false);
        let changed = self.readiness.record(ok);
        self.status.ready = self.readiness.ready;
        if changed {
            progress!(
                "kubelet {}: pod {}: container {} {} (readiness probe {what})",
                ctx.node.name,
                ctx.label(),
                self.status.name,
                if self.status.ready {
                    "ready"
                } else {
                    "not ready"
                },
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
