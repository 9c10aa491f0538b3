//! Agent authentication with the Kubernetes TokenReview API: the bearer token must belong to the
//! agent's service account and be bound to a pod on the node it asks about.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};

use crate::server::{AuthError, Authenticator, Caller};

/// The extra field the API server fills with the node of the pod a token is bound to.
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// Reviews are cached this long, so a long-polling agent costs one review a minute, not one per poll.
const CACHE_TTL: Duration = Duration::from_secs(60);

pub struct TokenReviewAuth {
    client: Client,
    /// `system:serviceaccount:<namespace>:<name>` of the agents.
    agent_user: String,
    audiences: Vec<String>,
    cache: Mutex<HashMap<String, (Caller, Instant)>>,
}

impl TokenReviewAuth {
    pub fn new(
        client: Client,
        agent_namespace: &str,
        agent_service_account: &str,
        audiences: Vec<String>,
    ) -> Self {
        TokenReviewAuth {
            client,
            agent_user: format!("system:serviceaccount:{agent_namespace}:{agent_service_account}"),
            audiences,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, token: &str) -> Option<Caller> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(token)
            .filter(|(_, at)| at.elapsed() < CACHE_TTL)
            .map(|(caller, _)| caller.clone())
    }
}

impl Authenticator for TokenReviewAuth {
    async fn authenticate(&self, token: Option<&str>) -> Result<Caller, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        if let Some(caller) = self.cached(token) {
            return Ok(caller);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(format!("TokenReview failed: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        let user = status.user.unwrap_or_default();
        if user.username.as_deref() != Some(self.agent_user.as_str()) {
            return Err(AuthError::Rejected(format!(
                "{} is not the agents' service account {}",
                user.username.unwrap_or_default(),
                self.agent_user
            )));
        }
        let node = user
            .extra
            .as_ref()
            .and_then(|e| e.get(NODE_NAME_EXTRA))
            .and_then(|v| v.first())
            .ok_or_else(|| {
                AuthError::Rejected("the token is not bound to a pod on a node".into())
            })?;
        let caller = Caller::Node(node.clone());
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
        cache.insert(token.to_string(), (caller.clone(), Instant::now()));
        Ok(caller)
    }
}
