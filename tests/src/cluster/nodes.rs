//! The cluster's nodes: a Node object each, and the node's share of this machine.
//!
//! A node is not a machine here. What makes it a node for the data plane is its **cgroup** (every
//! process of its pods lives under it, and its agent attaches the programs there, so a node's
//! programs see only its own pods) and its **bpffs directory** (its agent's pins). Its pods are on
//! the one flat cluster bridge, with IPs from the node's pod CIDR `10.244.<subnet>.0/24`. Its
//! "host paths", as seen by hostPath volumes, are [`NodeResources::host_path`].
//!
//! The Node object gets what a kubelet would report: the Ready condition, capacity and
//! allocatable, addresses (a TEST-NET-1 InternalIP: data only, never dialled), and the
//! `node.kubernetes.io/not-ready` taint removed (no node lifecycle controller runs).
use std::{
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU8, Ordering},
};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::{AgentDir, TestCgroup, agent::BPFFS_ROOT, cgroup2_root};

/// Where the host keeps named network namespaces (shared by every node: agents enrol by IP).
pub const NETNS_DIR: &str = "/run/netns";

/// A node's own resources on this machine.
pub struct NodeResources {
    pub name: String,
    /// The third octet of the node's pod CIDR, `10.244.<subnet>.0/24`.
    pub subnet: u8,
    pub internal_ip: Ipv4Addr,
    // Field order is drop order: pins (detaching the programs) before the cgroup.
    pub bpffs: AgentDir,
    pub cgroup: TestCgroup,
    next_host: AtomicU8,
}

/// What a hostPath volume of a pod on this node mounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMount {
    /// Bind this path (with its submounts when `recursive`).
    Bind { path: PathBuf, recursive: bool },
    /// An empty tmpfs with the node's cgroup bound at `relative` inside it: the layout of a
    /// host whose cgroup v2 hierarchy is mounted below the requested path.
    CgroupParent { relative: PathBuf, cgroup: PathBuf },
}

impl NodeResources {
    /// `tag` makes the cgroup and pin names unique (`kmt-<tag>-<pid>`).
    pub fn new(name: &str, subnet: u8, internal_ip: Ipv4Addr, tag: &str) -> io::Result<Self> {
        Ok(NodeResources {
            name: name.to_string(),
            subnet,
            internal_ip,
            bpffs: AgentDir::new(tag)?,
            cgroup: TestCgroup::new(tag)?,
            next_host: AtomicU8::new(2),
        })
    }

    /// `10.244.<subnet>.0/24`.
    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.subnet)
    }

    /// The next free pod IP (addresses are not reused within a run).
    pub fn allocate_ip(&self) -> io::Result<Ipv4Addr> {
        let host = self.next_host.fetch_add(1, Ordering::Relaxed);
        if !(2..=254).contains(&host) {
            return Err(io::Error::other(format!(
                "node {}: pod CIDR {} exhausted",
                self.name,
                self.pod_cidr()
            )));
        }
        Ok(Ipv4Addr::new(10, 244, self.subnet, host))
    }

    /// What the node's host path `path` is on this machine:
    /// * `/sys/fs/bpf` (bpffs): the node's pin directory;
    /// * the cgroup v2 mount point: the node's cgroup; a parent of it (`/sys/fs/cgroup` when cgroup
    ///   v2 is at `/sys/fs/cgroup/unified`, as here): a directory with the node's cgroup at the
    ///   same relative place, as on the host;
    /// * `/run/netns`: the host's, with its namespace mounts;
    /// * anything else: an error, so an unexpected hostPath in a manifest is noticed.
    pub fn host_path(&self, path: &Path) -> io::Result<HostMount> {
        let mount = map_host_path(
            path,
            &cgroup2_root()?,
            self.cgroup.path(),
            self.bpffs.path(),
        )?;
        if mount
            == (HostMount::Bind {
                path: self.bpffs.path().to_path_buf(),
                recursive: false,
            })
        {
            std::fs::create_dir_all(self.bpffs.path())?;
        }
        Ok(mount)
    }

    /// Creates the Node object and reports it Ready, schedulable.
    pub async fn register(&self, client: &Client, kubernetes_version: &str) -> io::Result<()> {
        let nodes: Api<Node> = Api::all(client.clone());
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": arch,
                },
            },
            "spec": {"podCIDR": self.pod_cidr(), "podCIDRs": [self.pod_cidr()]},
        }))
        .map_err(io::Error::other)?;
        let kube_err = |what: &str, e: kube::Error| {
            io::Error::other(format!("node {}: {what}: {e}", self.name))
        };
        nodes
            .create(&PostParams::default(), &node)
            .await
            .map_err(|e| kube_err("create", e))?;
        nodes
            .patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(self.status(kubernetes_version, arch)),
            )
            .await
            .map_err(|e| kube_err("status", e))?;
        // Admission adds node.kubernetes.io/not-ready:NoSchedule to new nodes; a kubelet's Ready
        // condition would have the node lifecycle controller lift it. Nothing else taints here.
        nodes
            .patch(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"taints": null}})),
            )
            .await
            .map_err(|e| kube_err("remove the not-ready taint", e))?;
        Ok(())
    }

    fn status(&self, kubernetes_version: &str, arch: &str) -> serde_json::Value {
        let now = super::status::now();
        let condition = |type_: &str, status: &str, reason: &str| {
            json!({"type": type_, "status": status, "reason": reason,
                   "lastHeartbeatTime": now, "lastTransitionTime": now})
        };
        let resources =
            json!({"cpu": "8", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"});
        json!({"status": {
            "conditions": [
                condition("Ready", "True", "KubeletReady"),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID"),
            ],
            "capacity": resources,
            "allocatable": resources,
            "addresses": [
                {"type": "InternalIP", "address": self.internal_ip.to_string()},
                {"type": "Hostname", "address": self.name},
            ],
            "nodeInfo": {
                "kubeletVersion": format!("v{kubernetes_version}"),
                "operatingSystem": "linux",
                "architecture": arch,
                "containerRuntimeVersion": "kmesh-tests://0",
                "kernelVersion": "", "osImage": "", "machineID": "", "systemUUID": "",
                "bootID": "", "kubeProxyVersion": "",
            },
        }})
    }
}

/// [`NodeResources::host_path`] given the host's cgroup v2 mount point and the node's cgroup and
/// pin directory.
fn map_host_path(
    path: &Path,
    cgroup_root: &Path,
    node_cgroup: &Path,
    node_bpffs: &Path,
) -> io::Result<HostMount> {
    let path = normalize(path);
    if path == Path::new(BPFFS_ROOT) {
        return Ok(HostMount::Bind {
            path: node_bpffs.to_path_buf(),
            recursive: false,
        });
    }
    if path == cgroup_root {
        return Ok(HostMount::Bind {
            path: node_cgroup.to_path_buf(),
            recursive: false,
        });
    }
    // Only within /sys/fs: a hostPath of `/` or `/sys` would hide everything else.
    if let Ok(relative) = cgroup_root.strip_prefix(&path)
        && !relative.as_os_str().is_empty()
        && path.starts_with("/sys/fs")
    {
        return Ok(HostMount::CgroupParent {
            relative: relative.to_path_buf(),
            cgroup: node_cgroup.to_path_buf(),
        });
    }
    if path == Path::new(NETNS_DIR) {
        return Ok(HostMount::Bind {
            path: path.clone(),
            recursive: true,
        });
    }
    Err(io::Error::other(format!(
        "hostPath {} is not mapped by the test kubelet (mapped: {BPFFS_ROOT}, the cgroup v2 \
         mount {} and its parents below /sys/fs, {NETNS_DIR})",
        path.display(),
        cgroup_root.display()
    )))
}

/// `path` without `.`/`..` components or a trailing slash (hostPaths are absolute).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_are_the_nodes_own() {
        let (cg, pins) = (Path::new("/cg/node-a"), Path::new("/sys/fs/bpf/node-a"));
        let map = |p: &str, root: &str| map_host_path(Path::new(p), Path::new(root), cg, pins);
        let bind = |p: &Path, recursive| HostMount::Bind {
            path: p.to_path_buf(),
            recursive,
        };
        // A hybrid host (this machine): the parent of the cgroup v2 mount keeps its layout.
        assert_eq!(
            map("/sys/fs/cgroup", "/sys/fs/cgroup/unified").unwrap(),
            HostMount::CgroupParent {
                relative: "unified".into(),
                cgroup: cg.into()
            }
        );
        assert_eq!(
            map("/sys/fs/cgroup/unified/", "/sys/fs/cgroup/unified").unwrap(),
            bind(cg, false)
        );
        // A cgroup v2 host.
        assert_eq!(
            map("/sys/fs/cgroup", "/sys/fs/cgroup").unwrap(),
            bind(cg, false)
        );
        assert_eq!(
            map("/sys/fs/bpf", "/sys/fs/cgroup").unwrap(),
            bind(pins, false)
        );
        assert_eq!(
            map("/run/netns", "/sys/fs/cgroup").unwrap(),
            bind(Path::new("/run/netns"), true)
        );
        for unmapped in ["/", "/sys", "/etc", "/var/lib/kubelet"] {
            let e = map(unmapped, "/sys/fs/cgroup/unified")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("not mapped by the test kubelet"),
                "{unmapped}: {e}"
            );
        }
    }

    #[test]
    fn normalize() {
        assert_eq!(
            super::normalize(Path::new("/sys/fs/cgroup/")),
            Path::new("/sys/fs/cgroup")
        );
        assert_eq!(
            super::normalize(Path::new("/a/./b/../c")),
            Path::new("/a/c")
        );
    }
}
