//! A small cluster declared once and made real twice: as the Kubernetes objects the operator's
//! compiler reads (Namespaces, with or without the enrolment label; Pods with their node, service
//! account, `app` label and `status.podIP`), written as YAML into a directory of its own, and as
//! network namespaces of a [`TestNetwork`] at exactly those addresses. Policy YAML is written next
//! to the cluster's, and [`YamlCluster::compile`] runs `kmeshctl compile -o binary` over both, as a
//! GitOps pipeline would. The directory is removed on drop.
use std::{
    collections::BTreeMap,
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{Pod, TempPath, TestNetwork, workspace_bin};

/// The label (and value) that enrols a namespace in the mesh.
pub const ENROLMENT_LABEL: (&str, &str) = ("istio.io/dataplane-mode", "Kmesh");

/// A Namespace of the cluster.
#[derive(Clone, Copy, Debug)]
pub struct ClusterNamespace {
    pub name: &'static str,
    /// Whether it carries [`ENROLMENT_LABEL`].
    pub enrolled: bool,
}

/// A running, ready Pod of the cluster; `name` is also its network namespace's pod name (and what
/// its servers reply).
#[derive(Clone, Copy, Debug)]
pub struct ClusterPod {
    pub name: &'static str,
    pub namespace: &'static str,
    pub service_account: &'static str,
    /// The `app` label (what selectors match).
    pub app: &'static str,
    pub ip: Ipv4Addr,
}

/// What `kmeshctl compile -o binary` produced: the snapshot's bytes and its diagnostics (standard
/// error, one per line).
#[derive(Debug)]
pub struct Compiled {
    pub snapshot: Vec<u8>,
    pub diagnostics: String,
}

/// The cluster's YAML directory (`cluster.yaml` plus the policy files written next to it).
pub struct YamlCluster {
    node: &'static str,
    namespaces: Vec<ClusterNamespace>,
    pods: Vec<ClusterPod>,
    dir: TempPath,
}

impl YamlCluster {
    /// Writes `cluster.yaml` for pods all placed on `node`. Every pod's namespace must be declared.
    pub fn new(
        tag: &str,
        node: &'static str,
        namespaces: &[ClusterNamespace],
        pods: &[ClusterPod],
    ) -> io::Result<YamlCluster> {
        for pod in pods {
            if !namespaces.iter().any(|ns| ns.name == pod.namespace) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "pod {}: namespace {} is not declared",
                        pod.name, pod.namespace
                    ),
                ));
            }
        }
        let cluster = YamlCluster {
            node,
            namespaces: namespaces.to_vec(),
            pods: pods.to_vec(),
            dir: TempPath::new(tag),
        };
        std::fs::create_dir_all(cluster.dir())?;
        std::fs::write(cluster.cluster_file(), cluster.to_yaml())?;
        Ok(cluster)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn cluster_file(&self) -> PathBuf {
        self.dir().join("cluster.yaml")
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> &ClusterPod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the cluster"))
    }

    /// The cluster as the API server would return it.
    pub fn to_yaml(&self) -> String {
        let mut docs: Vec<String> = self.namespaces.iter().map(namespace_yaml).collect();
        docs.extend(self.pods.iter().map(|p| pod_yaml(p, self.node)));
        docs.join("---\n")
    }

    /// Every pod as a network namespace of `net` at its address, by name.
    pub fn add_pods_to(&self, net: &TestNetwork) -> io::Result<BTreeMap<&'static str, Pod>> {
        self.pods
            .iter()
            .map(|p| Ok((p.name, net.add_pod(p.name, p.ip, None)?)))
            .collect()
    }

    /// Writes `yaml` as `file_name` next to `cluster.yaml` and compiles both for the node.
    pub fn compile(&self, generation: u64, file_name: &str, yaml: &str) -> io::Result<Compiled> {
        let policies = self.dir().join(file_name);
        std::fs::write(&policies, yaml)?;
        kmeshctl_compile(self.node, generation, &[&self.cluster_file(), &policies])
    }
}

/// `kmeshctl compile --node NODE -o binary --generation N -f FILE...`; an error carries its
/// standard error.
pub fn kmeshctl_compile(node: &str, generation: u64, files: &[&Path]) -> io::Result<Compiled> {
    let mut cmd = Command::new(workspace_bin("kmeshctl")?);
    cmd.args(["compile", "--node", node, "-o", "binary", "--generation"])
        .arg(generation.to_string());
    for f in files {
        cmd.arg("-f").arg(f);
    }
    let out = cmd.output()?;
    let diagnostics = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "kmeshctl compile failed ({}): {diagnostics}",
            out.status
        )));
    }
    Ok(Compiled {
        snapshot: out.stdout,
        diagnostics,
    })
}

fn namespace_yaml(ns: &ClusterNamespace) -> String {
    let labels = if ns.enrolled {
        format!(
            "\n  labels:\n    {}: {}",
            ENROLMENT_LABEL.0, ENROLMENT_LABEL.1
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}{labels}\n",
        ns.name
    )
}

fn pod_yaml(pod: &ClusterPod, node: &str) -> String {
    let ClusterPod {
        name,
        namespace,
        service_account,
        app,
        ip,
    } = pod;
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
  labels:
    app: {app}
spec:
  nodeName: {node}
  serviceAccountName: {service_account}
  containers:
  - name: {app}
    image: registry.example/{app}:1
status:
  phase: Running
  podIP: {ip}
  podIPs:
  - ip: {ip}
  conditions:
  - type: Ready
    status: \"True\"
"
    )
}
