//! `wgtwo-operator revoke NAME -n NS`: offboards a subscriber. Revokes the grant's live refresh
//! token at the identity service (RFC 7009), which ends the authorization there (and, on Hydra,
//! every token issued from it), then deletes the grant; its target and state Secrets go with it
//! (owner references). Nothing is deleted unless the identity service accepted the revocation,
//! except with `--force`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams};

use super::{api_error, get_grant};
use crate::api::{GrantType, WgtwoGrant};
use crate::controller::issuers::{self, AllowedIssuer};
use crate::controller::lineage;
use crate::controller::target::KEY_ACCESS_TOKEN;
use crate::kubeapi::secret_text;
use crate::oauth::secrets::{AccessToken, RefreshToken};
use crate::oauth::{ClientConfig, WgtwoClient};

pub struct Options {
    pub namespace: String,
    pub name: String,
    /// Delete the grant even if the revocation failed.
    pub force: bool,
    /// The identity services the refresh token and client secret may be sent to (as the operator's
    /// `--allowed-issuer`): a grant's author chooses its issuerUrl, and the person revoking may hold
    /// rights the author does not.
    pub allowed_issuers: Vec<AllowedIssuer>,
    pub ca_bundle: Option<PathBuf>,
    pub timeout: Duration,
}

/// Times the state Secret is read again after a revocation, in case the operator rotated the
/// refresh token in between.
const RECHECKS: usize = 3;

pub async fn run(client: kube::Client, opts: Options, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let Options { namespace: ns, name, .. } = &opts;
    let grants: Api<WgtwoGrant> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client, ns);
    let grant = get_grant(&grants, ns, name).await?;
    let GrantType::RefreshToken(token_ref) = grant.spec.grant_type() else {
        bail!(
            "WgtwoGrant {ns}/{name} is a product grant (client credentials): it has no subscriber authorization to revoke, and its token may be shared with other grants. Delete it with kubectl delete wgtwogrant {name} -n {ns}"
        );
    };
    let issuer = &grant.spec.issuer_url;
    match revoke(&opts, &grant, &secrets, &token_ref.name, &token_ref.key).await {
        Ok(()) => writeln!(
            out,
            "Revoked the authorization of {ns}/{name} at {issuer}: its refresh token and access token are no longer accepted"
        )?,
        Err(err) if opts.force => writeln!(
            out,
            "NOT revoked at {issuer}: {err:#}. Deleting the grant anyway (--force): the authorization stays valid at the identity service until its refresh token expires"
        )?,
        Err(err) => {
            return Err(err.context(format!(
                "nothing was deleted; pass --force to delete WgtwoGrant {ns}/{name} without revoking its authorization"
            )));
        }
    }
    grants
        .delete(name, &DeleteParams::background())
        .await
        .map_err(|e| api_error(&format!("delete WgtwoGrant {ns}/{name}"), e))?;
    writeln!(
        out,
        "Deleted WgtwoGrant {ns}/{name}; Secrets {} and {} go with it. Secret {} (the authorization's refresh token, not the operator's) was left in place",
        grant.spec.target.secret_name,
        lineage::state_secret_name(name),
        token_ref.name
    )?;
    Ok(())
}

/// Revokes the live refresh token (the operator's state Secret holds it; before the first refresh
/// it is the one in the user's Secret) and the published access token.
async fn revoke(
    opts: &Options,
    grant: &WgtwoGrant,
    secrets: &Api<Secret>,
    user_secret: &str,
    user_key: &str,
) -> anyhow::Result<()> {
    let ns = &opts.namespace;
    let issuer = &grant.spec.issuer_url;
    if !issuers::is_allowed(issuer, &opts.allowed_issuers) {
        let allowed: Vec<&str> = opts.allowed_issuers.iter().map(AllowedIssuer::as_str).collect();
        bail!(
            "spec.issuerUrl {issuer} is not an identity service revoke may send the grant's refresh token and client secret to (allowed: {}); no Secret was read. Pass --allowed-issuer {issuer} if you trust it",
            allowed.join(", ")
        );
    }
    let read = |name: String| async move {
        secrets.get_opt(&name).await.map_err(|e| api_error(&format!("read Secret {ns}/{name}"), e))
    };
    let client_name = &grant.spec.client_secret_ref.name;
    let (client_id, client_secret) = crate::authorize::read_client(secrets, ns, client_name).await.map_err(|e| {
        match e.downcast::<kube::Error>() {
            Ok(err) => api_error(&format!("read Secret {ns}/{client_name}"), err),
            Err(other) => other,
        }
    })?;
    let value = |secret: &Secret, key: &str| secret_text(secret, key).ok();
    let state_name = lineage::state_secret_name(&grant.metadata.name.clone().unwrap_or_default());
    let live = |state: Option<Secret>| state.and_then(|s| value(&s, lineage::KEY_REFRESH_TOKEN));
    let mut token = match live(read(state_name.clone()).await?) {
        Some(token) => token,
        None => read(user_secret.to_owned()).await?.and_then(|s| value(&s, user_key)).ok_or_else(|| {
            anyhow!(
                "no refresh token to revoke: neither Secret {state_name} nor {user_secret} key {user_key} holds one"
            )
        })?,
    };
    let access = read(grant.spec.target.secret_name.clone()).await?.and_then(|s| value(&s, KEY_ACCESS_TOKEN));

    let ca_bundle_pem = match &opts.ca_bundle {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("--ca-bundle {}", path.display()))?),
        None => None,
    };
    let mut config = ClientConfig::new(client_id, client_secret);
    config.issuer_url = issuer.clone();
    config.timeout = opts.timeout;
    config.ca_bundle_pem = ca_bundle_pem;
    let client = WgtwoClient::discover(config)
        .await
        .map_err(|e| anyhow!("the identity service {issuer} could not be used: {e}"))?;
    if let Some(access) = access {
        client
            .revoke_access_token(&AccessToken::new(access))
            .await
            .map_err(|e| anyhow!("revoking the access token: {e}"))?;
    }
    for _ in 0..RECHECKS {
        client
            .revoke_refresh_token(&RefreshToken::new(token.clone()))
            .await
            .map_err(|e| anyhow!("revoking the refresh token: {e}"))?;
        // The operator may have rotated it just before: then the new one is revoked too.
        match live(read(state_name.clone()).await?) {
            Some(now) if now != token => token = now,
            _ => return Ok(()),
        }
    }
    bail!("the refresh token kept changing while it was revoked; run revoke again")
}
