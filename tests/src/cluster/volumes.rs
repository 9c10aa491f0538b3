//! Pod volumes, materialised as a kubelet does before it starts the containers: `secret`,
//! `configMap`, `downwardAPI` and `projected` volumes (service-account tokens from a TokenRequest
//! bound to the pod, with the spec's audience and expiry) are written to files under the pod's
//! directory; `emptyDir` is an empty directory; `hostPath` is the node's view of the path
//! ([`NodeResources::host_path`]). Tokens are not refreshed (a test is far shorter than their
//! lifetime). Any other volume type is an error naming it.
use std::{
    collections::BTreeMap,
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{
        ConfigMap, DownwardAPIVolumeFile, HostPathVolumeSource, KeyToPath, Pod, Secret,
        ServiceAccount, Volume,
    },
};
use kube::{Api, Client, api::PostParams};

use super::nodes::{HostMount, NodeResources};

/// A volume ready to be mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prepared {
    /// Files the kubelet wrote (or an empty directory).
    Dir(PathBuf),
    /// A path of the node.
    Host(HostMount),
}

/// What preparing a pod's volumes needs.
pub struct VolumeContext<'a> {
    pub client: &'a Client,
    pub pod: &'a Pod,
    pub node: &'a NodeResources,
    /// The pod's volume directory (created if missing).
    pub dir: &'a Path,
}

const DEFAULT_MODE: u32 = 0o644;

fn other(what: String) -> io::Error {
    io::Error::other(what)
}

/// Prepares every volume of the pod, by name.
pub async fn prepare(ctx: &VolumeContext<'_>) -> io::Result<BTreeMap<String, Prepared>> {
    let mut out = BTreeMap::new();
    let volumes = ctx
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for v in &volumes {
        let prepared = prepare_one(ctx, v)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("volume {:?}: {e}", v.name)))?;
        out.insert(v.name.clone(), prepared);
    }
    Ok(out)
}

async fn prepare_one(ctx: &VolumeContext<'_>, v: &Volume) -> io::Result<Prepared> {
    let dir = ctx.dir.join(&v.name);
    if let Some(hp) = &v.host_path {
        return host_path(ctx.node, hp).map(Prepared::Host);
    }
    std::fs::create_dir_all(&dir)?;
    let namespace = namespace_of(ctx.pod);
    if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let mode = s.default_mode.map_or(DEFAULT_MODE, |m| m as u32);
        let data = secret_data(ctx.client, namespace, &name, s.optional == Some(true)).await?;
        write_keys(
            &dir,
            &data,
            s.items.as_deref(),
            mode,
            s.optional == Some(true),
        )?;
    } else if let Some(c) = &v.config_map {
        let mode = c.default_mode.map_or(DEFAULT_MODE, |m| m as u32);
        let data =
            config_map_data(ctx.client, namespace, &c.name, c.optional == Some(true)).await?;
        write_keys(
            &dir,
            &data,
            c.items.as_deref(),
            mode,
            c.optional == Some(true),
        )?;
    } else if let Some(d) = &v.downward_api {
        let mode = d.default_mode.map_or(DEFAULT_MODE, |m| m as u32);
        write_downward(&dir, ctx.pod, d.items.as_deref().unwrap_or_default(), mode)?;
    } else if let Some(p) = &v.projected {
        let mode = p.default_mode.map_or(DEFAULT_MODE, |m| m as u32);
        for source in p.sources.as_deref().unwrap_or_default() {
            if let Some(t) = &source.service_account_token {
                let token = request_token(
                    ctx.client,
                    ctx.pod,
                    t.audience.as_deref(),
                    t.expiration_seconds,
                )
                .await?;
                write_file(&dir, &t.path, token.as_bytes(), mode)?;
            } else if let Some(c) = &source.config_map {
                let optional = c.optional == Some(true);
                let data = config_map_data(ctx.client, namespace, &c.name, optional).await?;
                write_keys(&dir, &data, c.items.as_deref(), mode, optional)?;
            } else if let Some(s) = &source.secret {
                let optional = s.optional == Some(true);
                let data = secret_data(ctx.client, namespace, &s.name, optional).await?;
                write_keys(&dir, &data, s.items.as_deref(), mode, optional)?;
            } else if let Some(d) = &source.downward_api {
                write_downward(&dir, ctx.pod, d.items.as_deref().unwrap_or_default(), mode)?;
            } else {
                return Err(other(
                    "a projected source other than serviceAccountToken, configMap, secret or \
                     downwardAPI (not supported by the test kubelet)"
                        .into(),
                ));
            }
        }
    } else if v.empty_dir.is_none() {
        return Err(other(
            "volume type not supported by the test kubelet (supported: secret, configMap, \
             downwardAPI, projected, emptyDir, hostPath)"
                .into(),
        ));
    }
    Ok(Prepared::Dir(dir))
}

fn host_path(node: &NodeResources, hp: &HostPathVolumeSource) -> io::Result<HostMount> {
    let mount = node.host_path(Path::new(&hp.path))?;
    let source = match &mount {
        HostMount::Bind { path, .. } => path.clone(),
        HostMount::CgroupParent { cgroup, .. } => cgroup.clone(),
    };
    match hp.type_.as_deref().unwrap_or("") {
        "" | "DirectoryOrCreate" => {}
        "Directory" if source.is_dir() => {}
        "Directory" => {
            return Err(other(format!(
                "hostPath {} (type Directory) is not a directory on node {} ({})",
                hp.path,
                node.name,
                source.display()
            )));
        }
        t => {
            return Err(other(format!(
                "hostPath type {t} not supported by the test kubelet"
            )));
        }
    }
    Ok(mount)
}

pub fn namespace_of(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

async fn secret_data(
    client: &Client,
    namespace: &str,
    name: &str,
    optional: bool,
) -> io::Result<BTreeMap<String, Vec<u8>>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(s)) => Ok(s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect()),
        Ok(None) if optional => Ok(BTreeMap::new()),
        Ok(None) => Err(other(format!("secret {namespace}/{name} not found"))),
        Err(e) => Err(other(format!("secret {namespace}/{name}: {e}"))),
    }
}

async fn config_map_data(
    client: &Client,
    namespace: &str,
    name: &str,
    optional: bool,
) -> io::Result<BTreeMap<String, Vec<u8>>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(c)) => {
            let mut data: BTreeMap<String, Vec<u8>> = c
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            data.extend(
                c.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            );
            Ok(data)
        }
        Ok(None) if optional => Ok(BTreeMap::new()),
        Ok(None) => Err(other(format!("configmap {namespace}/{name} not found"))),
        Err(e) => Err(other(format!("configmap {namespace}/{name}: {e}"))),
    }
}

/// A token of the pod's service account, bound to the pod (TokenRequest), as the kubelet projects.
async fn request_token(
    client: &Client,
    pod: &Pod,
    audience: Option<&str>,
    expiration_seconds: Option<i64>,
) -> io::Result<String> {
    let namespace = namespace_of(pod);
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            // Empty: the API server's own audiences, as for the kube-api-access volume.
            audiences: audience.map(|a| vec![a.to_string()]).unwrap_or_default(),
            expiration_seconds: Some(expiration_seconds.unwrap_or(3600)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let response = api
        .create_token_request(&sa, &PostParams::default(), &request)
        .await
        .map_err(|e| other(format!("TokenRequest for {namespace}/{sa}: {e}")))?;
    response
        .status
        .map(|s| s.token)
        .ok_or_else(|| other(format!("TokenRequest for {namespace}/{sa}: no token")))
}

fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    mode: u32,
    optional: bool,
) -> io::Result<()> {
    match items {
        None => {
            for (k, v) in data {
                write_file(dir, k, v, mode)?;
            }
        }
        Some(items) => {
            for item in items {
                match data.get(&item.key) {
                    Some(v) => {
                        write_file(dir, &item.path, v, item.mode.map_or(mode, |m| m as u32))?
                    }
                    None if optional => {}
                    None => return Err(other(format!("key {:?} not found", item.key))),
                }
            }
        }
    }
    Ok(())
}

fn write_downward(
    dir: &Path,
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    mode: u32,
) -> io::Result<()> {
    for item in items {
        let value = match (&item.field_ref, &item.resource_field_ref) {
            (Some(f), _) => field_value(pod, &f.field_path)?,
            _ => {
                return Err(other(format!(
                    "downwardAPI item {:?}: only fieldRef is supported by the test kubelet",
                    item.path
                )));
            }
        };
        write_file(
            dir,
            &item.path,
            value.as_bytes(),
            item.mode.map_or(mode, |m| m as u32),
        )?;
    }
    Ok(())
}

/// The value of a pod field for `fieldRef` (env and downwardAPI).
pub fn field_value(pod: &Pod, path: &str) -> io::Result<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let label = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref()
            .and_then(|m| m.get(key).cloned())
            .unwrap_or_default()
    };
    let keyed = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix("']"))
            .map(str::to_string)
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => namespace_of(pod).to_string(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()).unwrap_or_default(),
        _ => {
            if let Some(k) = keyed("metadata.labels['") {
                label(&meta.labels, &k)
            } else if let Some(k) = keyed("metadata.annotations['") {
                label(&meta.annotations, &k)
            } else {
                return Err(other(format!(
                    "fieldRef {path} not supported by the test kubelet"
                )));
            }
        }
    })
}

fn write_file(dir: &Path, relative: &str, contents: &[u8], mode: u32) -> io::Result<()> {
    let rel = Path::new(relative);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(other(format!(
            "path {relative:?} must be relative, without '..'"
        )));
    }
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, contents)
        .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)))
        .map_err(|e| io::Error::new(e.kind(), format!("write {}: {e}", path.display())))
}
