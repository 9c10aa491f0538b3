//! Authentication with the Kubernetes TokenReview API. A token of the agents' service account must
//! be bound to a pod on a node: it is that node's agent ([`Caller::Node`]). A token of any other
//! service account is that account ([`Caller::ServiceAccount`]): a waypoint's, named like its
//! Gateway, reads that waypoint's configuration only (the server decides what each caller may
//! read). Anything else (not authenticated, not a service account) is refused.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, Client, api::PostParams};

use crate::server::{AuthError, Authenticator, Caller};

/// The extra field the API server fills with the node of the pod a token is bound to.
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// What a service account's user name starts with: `system:serviceaccount:<namespace>:<name>`.
const SERVICE_ACCOUNT_USER_PREFIX: &str = "system:serviceaccount:";
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
        let caller = caller_of_review(reviewed.status.unwrap_or_default(), &self.agent_user)?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
        cache.insert(token.to_string(), (caller.clone(), Instant::now()));
        Ok(caller)
    }
}

/// Who the token a TokenReview answered `status` for belongs to, `agent_user` being the agents'
/// user name (`system:serviceaccount:<namespace>:<name>`): that account's token bound to a pod on
/// a node is the node's agent; it is refused without a node (the agents' account never reads as
/// a plain service account). Any other service account's token is that account. Everything else
/// (not authenticated, a user that is no service account) is refused.
pub fn caller_of_review(status: TokenReviewStatus, agent_user: &str) -> Result<Caller, AuthError> {
    if status.authenticated != Some(true) {
        return Err(AuthError::Rejected(
            status.error.unwrap_or_else(|| "not authenticated".into()),
        ));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    if username == agent_user {
        let node = user
            .extra
            .as_ref()
            .and_then(|e| e.get(NODE_NAME_EXTRA))
            .and_then(|v| v.first())
            .ok_or_else(|| {
                AuthError::Rejected("the token is not bound to a pod on a node".into())
            })?;
        return Ok(Caller::Node(node.clone()));
    }
    service_account_of(&username).ok_or_else(|| {
        AuthError::Rejected(format!(
            "{username:?} is neither the agents' service account {agent_user} nor another \
             service account"
        ))
    })
}

/// The service account a user name `system:serviceaccount:<namespace>:<name>` names.
fn service_account_of(username: &str) -> Option<Caller> {
    let account = username.strip_prefix(SERVICE_ACCOUNT_USER_PREFIX)?;
    let (namespace, name) = account.split_once(':')?;
    if namespace.is_empty() || name.is_empty() || name.contains(':') {
        return None;
    }
    Some(Caller::ServiceAccount {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    const AGENT: &str = "system:serviceaccount:kmesh-system:kmesh-agent";

    fn reviewed(username: &str, node: Option<&str>) -> TokenReviewStatus {
        let extra = node.map(|n| [(NODE_NAME_EXTRA.to_string(), vec![n.to_string()])].into());
        TokenReviewStatus {
            authenticated: Some(true),
            user: Some(UserInfo {
                username: Some(username.to_string()),
                extra,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn rejection(result: Result<Caller, AuthError>) -> String {
        match result {
            Err(AuthError::Rejected(reason)) => reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn the_agents_account_is_a_node_only_with_a_node() {
        assert_eq!(
            caller_of_review(reviewed(AGENT, Some("node-1")), AGENT).unwrap(),
            Caller::Node("node-1".into())
        );
        let reason = rejection(caller_of_review(reviewed(AGENT, None), AGENT));
        assert!(reason.contains("not bound to a pod on a node"), "{reason}");
    }

    #[test]
    fn any_other_service_account_is_itself_bound_or_not() {
        let waypoint = Caller::ServiceAccount {
            namespace: "bookinfo".into(),
            name: "waypoint".into(),
        };
        let user = "system:serviceaccount:bookinfo:waypoint";
        assert_eq!(
            caller_of_review(reviewed(user, None), AGENT).unwrap(),
            waypoint
        );
        assert_eq!(
            caller_of_review(reviewed(user, Some("node-1")), AGENT).unwrap(),
            waypoint,
            "a node binding makes no node of another account"
        );
    }

    #[test]
    fn others_are_refused() {
        for user in [
            "alice",
            "system:node:node-1",
            "system:serviceaccount:bookinfo",
            "system:serviceaccount::waypoint",
            "system:serviceaccount:bookinfo:",
            "system:serviceaccount:a:b:c",
            "",
        ] {
            let reason = rejection(caller_of_review(reviewed(user, Some("node-1")), AGENT));
            assert!(reason.contains("neither"), "{user}: {reason}");
        }
        let mut expired = reviewed(AGENT, Some("node-1"));
        expired.authenticated = Some(false);
        expired.error = Some("token has expired".into());
        assert_eq!(
            rejection(caller_of_review(expired, AGENT)),
            "token has expired"
        );
        let mut unanswered = reviewed(AGENT, Some("node-1"));
        unanswered.authenticated = None;
        assert_eq!(
            rejection(caller_of_review(unanswered, AGENT)),
            "not authenticated"
        );
    }
}
