//! Workload identity from Kubernetes ServiceAccount tokens (SPEC §6, §11): a pod's proxy
//! bootstraps with its ServiceAccount token; the control plane asks the API server
//! (`TokenReview`) whom it proves — `system:serviceaccount:NS:SA` — and signs a certificate
//! for `spiffe://<td>/ns/NS/sa/SA` only. Any other user (a person, a node, a group) proves
//! nothing here.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use plexus_control::certify::{Authenticator, is_dns1123_label};

/// The user-name prefix of ServiceAccounts.
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// The `(namespace, service account)` a TokenReview's user name names, or why it names none.
pub fn service_account_of(username: &str) -> Result<(String, String), String> {
    let Some(rest) = username.strip_prefix(SERVICE_ACCOUNT_PREFIX) else {
        return Err(format!("{username:?} is not a ServiceAccount (only pods' ServiceAccount tokens are accepted)"));
    };
    let mut parts = rest.split(':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(ns), Some(sa), None) if is_dns1123_label(ns) && is_dns1123_label(sa) => {
            Ok((ns.to_string(), sa.to_string()))
        }
        _ => {
            Err(format!("{username:?} is not a valid ServiceAccount user name (system:serviceaccount:NAMESPACE:NAME)"))
        }
    }
}

/// Authenticates ServiceAccount tokens with the API server's TokenReview.
pub struct TokenReviewAuthenticator {
    client: kube::Client,
}

impl TokenReviewAuthenticator {
    pub fn new(client: kube::Client) -> TokenReviewAuthenticator {
        TokenReviewAuthenticator { client }
    }
}

#[tonic::async_trait]
impl Authenticator for TokenReviewAuthenticator {
    async fn authenticate(&self, credential: &str) -> Result<(String, String), String> {
        if credential.is_empty() {
            return Err("no credential: a pod's proxy sends its ServiceAccount token".into());
        }
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(credential.to_string()), audiences: None },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("cannot review the ServiceAccount token with the API server: {e}"))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(format!(
                "the API server does not accept the token{}",
                status.error.map(|e| format!(": {e}")).unwrap_or_default()
            ));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        service_account_of(&username)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_service_accounts_are_identities() {
        assert_eq!(
            service_account_of("system:serviceaccount:bookinfo:bookinfo-reviews"),
            Ok(("bookinfo".into(), "bookinfo-reviews".into()))
        );
        assert_eq!(
            service_account_of("system:serviceaccount:default:default"),
            Ok(("default".into(), "default".into()))
        );
        for refused in [
            "admin",
            "system:node:plexus-node",
            "system:kube-controller-manager",
            "system:serviceaccounts:bookinfo",
            "system:serviceaccount:bookinfo",
            "system:serviceaccount:bookinfo:reviews:extra",
            "system:serviceaccount::reviews",
            "system:serviceaccount:Bookinfo:reviews",
            "system:serviceaccount:bookinfo:reviews/../admin",
            "System:serviceaccount:bookinfo:reviews",
            "",
        ] {
            assert!(service_account_of(refused).is_err(), "{refused:?} must be refused");
        }
    }
}
