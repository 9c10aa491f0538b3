//! The leader keeps every waypoint's objects ([`super::objects`]) in the cluster: a server-side
//! apply of each one after a compile, skipped while what it would apply is what it last applied.
//! Removal is Kubernetes' garbage collector's: every object is owned by its Gateway. A failed apply
//! is logged and tried again after the next compile (the objects are not remembered as applied).
use std::collections::BTreeMap;

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Service, ServiceAccount},
};
use kmesh_snapshot::waypoint::WaypointName;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde::Serialize;
use tracing::{info, warn};

use super::objects::{WaypointObjects, WaypointSettings, waypoint_objects};
use crate::{compile::waypoint_port, gateway_api::Gateway, reconcile::FIELD_MANAGER};

/// Applies waypoint objects for the leader.
pub struct WaypointApplier {
    client: Client,
    /// Every setting but the CA, which is read from the operator's ConfigMap at each apply.
    settings: WaypointSettings,
    /// The namespace of the operator's CA ConfigMap; `None`: the snapshot server is plain HTTP.
    ca_namespace: Option<String>,
    /// What was last applied for each waypoint, as JSON: unchanged objects are not applied again.
    applied: BTreeMap<WaypointName, String>,
}

impl WaypointApplier {
    pub fn new(client: Client, settings: WaypointSettings, ca_namespace: Option<String>) -> Self {
        WaypointApplier {
            client,
            settings,
            ca_namespace,
            applied: BTreeMap::new(),
        }
    }

    /// Applies the objects of every Gateway that `waypoints` names (the compile's waypoints).
    pub async fn apply<'g>(
        &mut self,
        gateways: &'g [Gateway],
        waypoints: impl Iterator<Item = &'g WaypointName> + Clone,
    ) {
        let mut settings = self.settings.clone();
        settings.ca_pem = self.ca_pem().await;
        for gateway in gateways {
            let name = WaypointName {
                namespace: gateway.namespace().to_string(),
                name: gateway.name().to_string(),
            };
            if !waypoints.clone().any(|w| *w == name) {
                continue;
            }
            let Some(port) = waypoint_port(gateway) else {
                continue;
            };
            let Some(objects) = waypoint_objects(gateway, port, &settings) else {
                continue;
            };
            let json = serde_json::to_string(&(
                &objects.service_account,
                &objects.ca,
                &objects.service,
                &objects.deployment,
            ))
            .unwrap_or_default();
            if self.applied.get(&name) == Some(&json) {
                continue;
            }
            match self.apply_objects(&name, &objects).await {
                Ok(()) => {
                    info!(waypoint = %format!("{}/{}", name.namespace, name.name), "waypoint objects applied");
                    self.applied.insert(name, json);
                }
                Err(e) => {
                    warn!(waypoint = %format!("{}/{}", name.namespace, name.name), error = %e, "applying the waypoint's objects failed; retried after the next compile");
                    self.applied.remove(&name);
                }
            }
        }
        self.applied
            .retain(|name, _| waypoints.clone().any(|w| w == name));
    }

    async fn apply_objects(
        &self,
        name: &WaypointName,
        objects: &WaypointObjects,
    ) -> Result<(), kube::Error> {
        let ns = name.namespace.as_str();
        apply(
            Api::<ServiceAccount>::namespaced(self.client.clone(), ns),
            &objects.service_account,
        )
        .await?;
        if let Some(ca) = &objects.ca {
            apply(Api::<ConfigMap>::namespaced(self.client.clone(), ns), ca).await?;
        }
        apply(
            Api::<Service>::namespaced(self.client.clone(), ns),
            &objects.service,
        )
        .await?;
        apply(
            Api::<Deployment>::namespaced(self.client.clone(), ns),
            &objects.deployment,
        )
        .await
    }

    /// The operator's CA certificate, from its ConfigMap (`certs.rs` publishes it).
    async fn ca_pem(&self) -> Option<String> {
        let namespace = self.ca_namespace.as_deref()?;
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), namespace);
        match api.get_opt(crate::certs::CA_CONFIG_MAP).await {
            Ok(Some(config_map)) => config_map.data?.get("ca.crt").cloned(),
            Ok(None) => None,
            Err(e) => {
                warn!(error = %e, "reading the operator's CA for the waypoints failed");
                None
            }
        }
    }
}

/// A server-side apply of `object` by the operator's field manager.
async fn apply<K>(api: Api<K>, object: &K) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&name, &params, &Patch::Apply(object))
        .await
        .map(|_| ())
}
