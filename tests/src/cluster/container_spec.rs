//! A container's spec as the kubelet reads it, turned into the [`ContainerPlan`] the runtime
//! executes: the user (with the `runAsNonRoot` check), argv, the environment, the mounts (the
//! runtime's standard ones, the volumes, the kubelet's files, the image's binaries), and the
//! readiness probe. What the spec asks for and cannot be done here is a [`ConfigError`]; see the
//! table in [`super::container`] for what is honoured.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Secret};
use kube::Api;

use super::{
    image::Stage,
    kubelet::PodContext,
    nodes::HostMount,
    runtime::{ContainerPlan, Mount, MountSource, NodeKind, Propagation, User},
    volumes::{self, Prepared},
};
use crate::workspace_bin;

/// PATH of the images (Debian's default).
const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A container that cannot be started as specified: reported as `CreateContainerConfigError`.
#[derive(Debug)]
pub struct ConfigError(pub String);

/// The container's plan: program, environment, mounts, user.
pub async fn plan(
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
        // The node's network namespace for the agent (`--host-netns`): on a real node PID 1's,
        // here the test network's node namespace, from which this kubelet probes pods.
        (
            "KMESH_HOST_NETNS".into(),
            ctx.shared.network.node_netns_path().display().to_string(),
        ),
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
