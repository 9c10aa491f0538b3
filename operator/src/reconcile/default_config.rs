//! The KmeshConfig `default`, created by the operator when none exists, so that
//! `kubectl apply -k config/default` is the whole install: a CRD and an object of it cannot go in
//! one `kubectl apply` on a fresh cluster (kubectl maps every object's kind before the CRD is
//! served), and without the object there is nowhere to write the status.
//!
//! Promises: the operator only ever *creates* it (a POST; `409 AlreadyExists` means someone else
//! did, which is fine) and never changes its contents, so a user's object — applied from
//! `config/kmeshconfig`, or owned by a GitOps tool — stays theirs. It is created with an empty
//! spec, so the CRD's defaults fill it in, and annotated [`CREATED_BY`]. The API server makes the
//! creator the owner of every field it defaulted, which would make a later server-side apply of
//! other values (a GitOps tool's) conflict with `kmesh-operator`; so right after creating it the
//! operator gives up that ownership ([`release_fields`]: a merge patch that clears
//! `managedFields`, guarded by the created `resourceVersion`, so it changes nothing if anyone
//! wrote the object meanwhile). A deleted `default` is created again (the operator cannot run
//! without one): deleting it resets the configuration to the defaults. Failed attempts (the CRD
//! not installed or being deleted, RBAC) are retried at most every [`RETRY`], and each distinct
//! failure is logged once.
use std::time::Duration;

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::FIELD_MANAGER;
use crate::crd::{KmeshConfig, SINGLETON_NAME};

/// The annotation on a KmeshConfig the operator created.
pub const CREATED_BY: &str = "kmesh.net/created-by";

/// A failed creation is tried again at most this often.
pub const RETRY: Duration = Duration::from_secs(10);

/// What one attempt did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Creation {
    /// Created now.
    Created,
    /// It exists already (HTTP 409): created by someone else since the store last looked.
    AlreadyExists,
    /// The API server refused or could not be reached: `code` (0 without an answer) and what
    /// it said.
    Failed { code: u16, message: String },
    /// Not tried: the last failure was less than [`RETRY`] ago.
    Deferred,
}

/// Creates the KmeshConfig `default` when asked to, at most every [`RETRY`] after a failure.
#[derive(Debug, Default)]
pub struct DefaultConfig {
    retry_at: Option<Instant>,
    /// The last failure logged, so that each distinct one is logged once.
    last_logged: Option<(u16, String)>,
}

impl DefaultConfig {
    /// Creates `default` unless a recent attempt failed.
    pub async fn ensure(&mut self, client: &Client) -> Creation {
        let now = Instant::now();
        if self.retry_at.is_some_and(|at| now < at) {
            return Creation::Deferred;
        }
        let creation = create(client).await;
        match &creation {
            Creation::Created => {
                info!(
                    "created KmeshConfig \"{SINGLETON_NAME}\" with the default spec (none \
                     existed); edit it, or apply your own over it"
                );
                self.reset();
            }
            Creation::AlreadyExists => {
                debug!("KmeshConfig \"{SINGLETON_NAME}\" exists already");
                self.reset();
            }
            Creation::Failed { code, message } => {
                self.retry_at = Some(now + RETRY);
                let failure = (*code, message.clone());
                if self.last_logged.as_ref() != Some(&failure) {
                    warn!(
                        code,
                        %message,
                        "KmeshConfig \"{SINGLETON_NAME}\" does not exist and could not be \
                         created; the operator runs with the default settings meanwhile \
                         (retrying every {}s)",
                        RETRY.as_secs()
                    );
                    self.last_logged = Some(failure);
                }
            }
            Creation::Deferred => {}
        }
        creation
    }

    fn reset(&mut self) {
        self.retry_at = None;
        self.last_logged = None;
    }
}

/// The object created: the singleton's name, the annotation, an empty spec.
pub fn default_object() -> DynamicObject {
    let resource = ApiResource::erase::<KmeshConfig>(&());
    let mut object = DynamicObject::new(SINGLETON_NAME, &resource).data(json!({ "spec": {} }));
    object.metadata.annotations =
        Some([(CREATED_BY.to_string(), FIELD_MANAGER.to_string())].into());
    object
}

async fn create(client: &Client) -> Creation {
    let resource = ApiResource::erase::<KmeshConfig>(&());
    let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PostParams::default()
    };
    match api.create(&params, &default_object()).await {
        Ok(created) => {
            release_fields(&api, created.metadata.resource_version.as_deref()).await;
            Creation::Created
        }
        Err(kube::Error::Api(s)) if s.code == 409 || s.reason == "AlreadyExists" => {
            Creation::AlreadyExists
        }
        Err(kube::Error::Api(s)) => Creation::Failed {
            code: s.code,
            message: s.message,
        },
        Err(other) => Creation::Failed {
            code: 0,
            message: other.to_string(),
        },
    }
}

/// The merge patch that clears the object's `managedFields` (`[{}]` is how the API server is told
/// to drop them all), applied only if the object is still at `resource_version` (the API server
/// answers 409 otherwise).
pub fn release_patch(resource_version: &str) -> serde_json::Value {
    json!({ "metadata": { "resourceVersion": resource_version, "managedFields": [{}] } })
}

/// Gives up the ownership of the fields the API server defaulted on creation (see the module
/// documentation). The object having changed since is harmless; any other failure is logged,
/// once per creation.
async fn release_fields(api: &Api<DynamicObject>, resource_version: Option<&str>) {
    let Some(resource_version) = resource_version else {
        return;
    };
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    let patch = Patch::Merge(release_patch(resource_version));
    match api.patch(SINGLETON_NAME, &params, &patch).await {
        Ok(_) => debug!("released the defaulted fields of the created KmeshConfig"),
        // Written by someone else since the create: nothing to release, they own what they set.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            debug!(message = %s.message, "the created KmeshConfig changed meanwhile");
        }
        Err(error) => warn!(
            %error,
            "could not release the fields of the created KmeshConfig \"{SINGLETON_NAME}\": a \
             server-side apply of other values will conflict with \"{FIELD_MANAGER}\" (use \
             --force-conflicts)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use kube::Resource as _;

    use super::*;

    #[test]
    fn the_object_is_the_singleton_with_an_empty_spec() {
        let object = serde_json::to_value(default_object()).unwrap();
        assert_eq!(object["apiVersion"], KmeshConfig::api_version(&()).as_ref());
        assert_eq!(object["kind"], "KmeshConfig");
        assert_eq!(object["metadata"]["name"], SINGLETON_NAME);
        assert_eq!(object["metadata"]["annotations"][CREATED_BY], FIELD_MANAGER);
        assert_eq!(object["spec"], json!({}));
        // An empty spec reads as the default configuration.
        let config: KmeshConfig = serde_json::from_value(object).unwrap();
        assert_eq!(config.spec, Default::default());
    }
}
