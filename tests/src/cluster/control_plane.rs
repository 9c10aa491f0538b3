//! The control plane: etcd, kube-apiserver, kube-controller-manager and kube-scheduler as real
//! processes on 127.0.0.1 free ports, in a temporary directory and in a cgroup of their own
//! (`kmt-<name>-cp-<pid>`), so that dropping the [`ControlPlane`] — or the sweep of a later run,
//! if this process died — kills every one of them. The flags are the proven recipe of
//! `../shared/docs/envtest.md`, with the ServiceAccount admission plugin left on (the pods get
//! their `kube-api-access` volumes, as in a real cluster) and these controllers:
//! [`CONTROLLERS`].
use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

use super::{bins::Binaries, pki::ClusterPki, process};
use crate::{TestCgroup, progress};

/// The Service ClusterIP range; its first address is the `kubernetes` Service's.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The `kubernetes` Service's ClusterIP.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

/// kube-controller-manager's controllers: what Deployments, DaemonSets, Services, namespaces,
/// service accounts and garbage collection need. No node lifecycle (nodes would turn NotReady
/// without kubelet heartbeats) and no pod garbage collector.
pub const CONTROLLERS: &[&str] = &[
    "deployment-controller",
    "replicaset-controller",
    "daemonset-controller",
    "endpointslice-controller",
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
    "namespace-controller",
    "garbage-collector-controller",
];

/// How long each component may take to become ready (2 shared cores, other tests beside).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// A control-plane process and its log.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

pub struct ControlPlane {
    processes: Vec<Process>,
    /// How kube-apiserver was started, to start it again ([`ControlPlane::restart_apiserver`]).
    apiserver: Option<(PathBuf, Vec<String>, PathBuf)>,
    cgroup: TestCgroup,
    /// The admin kubeconfig (token user, CA file).
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub api_url: String,
    pub api_port: u16,
    /// The cluster CA (PEM): kube-apiserver's issuer, published as `kube-root-ca.crt`.
    pub ca_pem: String,
}

/// A loopback port outside the ephemeral range: kube-apiserver binds its port only after etcd
/// is up (and again when restarted), and a port from the ephemeral range may be taken by any
/// connection in between (see `crate::ports`).
fn free_port() -> io::Result<u16> {
    crate::ports::free_loopback_port()
}

fn write(dir: &Path, name: &str, contents: &str) -> io::Result<PathBuf> {
    let p = dir.join(name);
    fs::write(&p, contents)
        .map_err(|e| io::Error::new(e.kind(), format!("write {}: {e}", p.display())))?;
    Ok(p)
}

/// The files the components read: certificates, keys, tokens, the admin kubeconfig.
struct Files {
    ca: PathBuf,
    api_cert: PathBuf,
    api_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
    tokens: PathBuf,
    kubeconfig: PathBuf,
}

impl Files {
    fn write(dir: &Path, pki: &ClusterPki, api_url: &str) -> io::Result<Files> {
        let ca = write(dir, "ca.crt", &pki.ca.cert_pem)?;
        Ok(Files {
            api_cert: write(dir, "apiserver.crt", &pki.apiserver_cert_pem)?,
            api_key: write(dir, "apiserver.key", &pki.apiserver_key_pem)?,
            sa_key: write(dir, "sa.key", &pki.service_account_key_pem)?,
            sa_pub: write(dir, "sa.pub", &pki.service_account_pub_pem)?,
            tokens: write(
                dir,
                "tokens.csv",
                &format!("{},admin,admin,system:masters\n", pki.admin_token),
            )?,
            kubeconfig: write(
                dir,
                "admin.kubeconfig",
                &kubeconfig_yaml(api_url, &ca, &pki.admin_token),
            )?,
            ca,
        })
    }
}

fn arg(p: &Path) -> String {
    p.display().to_string()
}

impl ControlPlane {
    /// Starts all four components under `dir` (which must exist) and returns once the API server
    /// serves the `default` namespace. `name` names the cgroup.
    pub async fn start(name: &str, bins: &Binaries, dir: &Path) -> io::Result<(Self, Client)> {
        let started = Instant::now();
        let pki = ClusterPki::new(IpAddr::V4(KUBERNETES_SERVICE_IP))?;
        let api_port = free_port()?;
        let api_url = format!("https://127.0.0.1:{api_port}");
        let files = Files::write(dir, &pki, &api_url)?;
        let mut cp = ControlPlane {
            processes: Vec::new(),
            apiserver: None,
            cgroup: TestCgroup::new(&format!("{name}-cp"))?,
            kubeconfig: files.kubeconfig.clone(),
            api_url,
            api_port,
            ca_pem: pki.ca.cert_pem.clone(),
        };
        let etcd_url = cp.start_etcd(bins, dir).await?;
        progress!("etcd healthy after {:.1?}", started.elapsed());
        let client = cp.start_apiserver(bins, dir, &files, &etcd_url).await?;
        progress!(
            "kube-apiserver ready at {} after {:.1?}",
            cp.api_url,
            started.elapsed()
        );
        cp.start_controllers(bins, dir, &files)?;
        progress!(
            "control plane up (etcd v{}, Kubernetes v{}) after {:.1?}",
            bins.versions.etcd,
            bins.versions.kubernetes,
            started.elapsed()
        );
        Ok((cp, client))
    }

    /// etcd on two free ports, data in `dir/etcd`; returns its client URL once healthy.
    async fn start_etcd(&mut self, bins: &Binaries, dir: &Path) -> io::Result<String> {
        let (etcd_port, peer_port) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        self.spawn(
            bins,
            dir,
            "etcd",
            &[
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--unsafe-no-fsync=true".into(),
            ],
        )?;
        self.wait("etcd", || etcd_healthy(etcd_port)).await?;
        Ok(etcd_url)
    }

    /// kube-apiserver; returns an admin client once the bootstrap made the `default` namespace
    /// and the `kubernetes` Service.
    async fn start_apiserver(
        &mut self,
        bins: &Binaries,
        dir: &Path,
        files: &Files,
        etcd_url: &str,
    ) -> io::Result<Client> {
        let args = [
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={}", self.api_port),
            format!("--tls-cert-file={}", arg(&files.api_cert)),
            format!("--tls-private-key-file={}", arg(&files.api_key)),
            // The built-in `kubernetes` Endpoints may not name a loopback address.
            "--endpoint-reconciler-type=none".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--allow-privileged=true".into(),
            "--authorization-mode=RBAC".into(),
            format!("--token-auth-file={}", arg(&files.tokens)),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", arg(&files.sa_pub)),
            format!("--service-account-signing-key-file={}", arg(&files.sa_key)),
        ];
        self.spawn(bins, dir, "kube-apiserver", &args)?;
        self.apiserver = Some((
            bins.path("kube-apiserver"),
            args.to_vec(),
            dir.to_path_buf(),
        ));
        let client = client_for(&self.kubeconfig).await?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        self.wait("kube-apiserver", || {
            let (namespaces, services) = (namespaces.clone(), services.clone());
            async move {
                namespaces.get("default").await.is_ok() && services.get("kubernetes").await.is_ok()
            }
        })
        .await?;
        Ok(client)
    }

    /// kube-controller-manager ([`CONTROLLERS`]) and kube-scheduler, with the admin kubeconfig.
    fn start_controllers(&mut self, bins: &Binaries, dir: &Path, files: &Files) -> io::Result<()> {
        let kubeconfig = format!("--kubeconfig={}", arg(&files.kubeconfig));
        self.spawn(
            bins,
            dir,
            "kube-controller-manager",
            &[
                kubeconfig.clone(),
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
                format!("--controllers={}", CONTROLLERS.join(",")),
                format!("--root-ca-file={}", arg(&files.ca)),
            ],
        )?;
        self.spawn(
            bins,
            dir,
            "kube-scheduler",
            &[
                kubeconfig,
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
            ],
        )
    }

    fn spawn(
        &mut self,
        bins: &Binaries,
        dir: &Path,
        name: &'static str,
        args: &[String],
    ) -> io::Result<()> {
        let log = dir.join(format!("{name}.log"));
        let out = fs::File::create(&log)?;
        let mut cmd = Command::new(bins.path(name));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = process::spawn_in_cgroup(&mut cmd, self.cgroup.path())?;
        self.processes.push(Process { name, child, log });
        Ok(())
    }

    /// Polls `ready` every 100 ms until it holds; fails if any component exits or time runs out.
    async fn wait<F, Fut>(&mut self, what: &str, mut ready: F) -> io::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_running()?;
            if ready().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{what} not ready within {READY_TIMEOUT:?}; logs:\n{}",
                        self.log_tails(30)
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops kube-apiserver (SIGKILL), as an outage of the API server: etcd and the other
    /// components keep running.
    pub fn stop_apiserver(&mut self) -> io::Result<()> {
        let p = self
            .processes
            .iter_mut()
            .find(|p| p.name == "kube-apiserver")
            .ok_or_else(|| io::Error::other("no kube-apiserver running"))?;
        p.child.kill()?;
        p.child.wait()?;
        self.processes.retain(|p| p.name != "kube-apiserver");
        progress!("kube-apiserver stopped");
        Ok(())
    }

    /// Starts kube-apiserver again with the same flags (port, certificates, etcd), and waits
    /// until it serves the `default` namespace.
    pub async fn restart_apiserver(&mut self) -> io::Result<()> {
        let (bin, args, dir) = self
            .apiserver
            .clone()
            .ok_or_else(|| io::Error::other("kube-apiserver was never started"))?;
        let log = dir.join("kube-apiserver.log");
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = Command::new(bin);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = process::spawn_in_cgroup(&mut cmd, self.cgroup.path())?;
        self.processes.push(Process {
            name: "kube-apiserver",
            child,
            log,
        });
        let client = client_for(&self.kubeconfig).await?;
        let namespaces: Api<Namespace> = Api::all(client);
        self.wait("kube-apiserver (restarted)", || {
            let namespaces = namespaces.clone();
            async move { namespaces.get("default").await.is_ok() }
        })
        .await?;
        progress!("kube-apiserver serving again");
        Ok(())
    }

    /// An error naming the first component that exited, with its log.
    pub fn check_running(&mut self) -> io::Result<()> {
        for p in &mut self.processes {
            if let Some(status) = p.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "{} exited ({status}); its log ends:\n{}",
                    p.name,
                    tail(&p.log, 40)
                )));
            }
        }
        Ok(())
    }

    /// The last `lines` lines of every component's log.
    pub fn log_tails(&self, lines: usize) -> String {
        self.processes
            .iter()
            .map(|p| {
                format!(
                    "--- {} ({})\n{}",
                    p.name,
                    p.log.display(),
                    tail(&p.log, lines)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Err(e) = self.cgroup.kill_all() {
            eprintln!("kmesh-tests: stopping the control plane: {e}");
        }
        for p in &mut self.processes {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn kubeconfig_yaml(server: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kmesh-test\n  cluster:\n    server: {server}\n    \
         certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- \
         name: kmesh-test\n  context:\n    cluster: kmesh-test\n    user: admin\ncurrent-context: \
         kmesh-test\n",
        ca.display()
    )
}

/// A client with the admin kubeconfig at `path`.
pub async fn client_for(path: &Path) -> io::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path)
        .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
    Client::try_from(config).map_err(|e| io::Error::other(format!("kube client: {e}")))
}

/// etcd answers `GET /health` with `"health":"true"`.
async fn etcd_healthy(port: u16) -> bool {
    tokio::task::spawn_blocking(move || -> io::Result<bool> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            s,
            "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body.contains(r#""health":"true""#))
    })
    .await
    .is_ok_and(|r| r.unwrap_or(false))
}
