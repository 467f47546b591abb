//! Reading the grant's inputs: the OAuth client Secret and the user's refresh token. A missing
//! Secret or key is a condition that says what to fix, never a crash or a silent retry loop.

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use super::status::reason;
use crate::api::{CLIENT_ID_KEY, CLIENT_SECRET_KEY, WgtwoGrant};
use crate::kubeapi::secret_text;
use crate::oauth::secrets::ClientSecret;

pub struct Inputs {
    pub client_id: String,
    pub client_secret: ClientSecret,
    /// The value in `refreshTokenSecretRef` (where a lineage starts).
    pub user_refresh_token: String,
}

/// Why the inputs cannot be used; `message` tells the user what to do.
#[derive(Debug, PartialEq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

pub async fn read(secrets: &Api<Secret>, grant: &WgtwoGrant) -> Result<Result<Inputs, Problem>, kube::Error> {
    let client_ref = &grant.spec.client_secret_ref.name;
    let token_ref = &grant.spec.refresh_token_secret_ref;
    let client = secrets.get_opt(client_ref).await?;
    let token = secrets.get_opt(&token_ref.name).await?;
    Ok(from_secrets(client.as_ref(), client_ref, token.as_ref(), &token_ref.name, &token_ref.key))
}

/// Pure: the inputs from the two Secrets, or the first problem found.
pub fn from_secrets(
    client: Option<&Secret>,
    client_name: &str,
    token: Option<&Secret>,
    token_name: &str,
    token_key: &str,
) -> Result<Inputs, Problem> {
    let client = client.ok_or_else(|| Problem {
        reason: reason::SECRET_NOT_FOUND,
        message: format!(
            "Secret {client_name} (clientSecretRef) does not exist: create it with the keys {CLIENT_ID_KEY} and {CLIENT_SECRET_KEY}"
        ),
    })?;
    let token = token.ok_or_else(|| Problem {
        reason: reason::SECRET_NOT_FOUND,
        message: format!(
            "Secret {token_name} (refreshTokenSecretRef) does not exist: create it with the refresh token under key {token_key}, or run wgtwo-operator authorize"
        ),
    })?;
    Ok(Inputs {
        client_id: value(client, client_name, CLIENT_ID_KEY, "clientSecretRef")?,
        client_secret: ClientSecret::new(value(client, client_name, CLIENT_SECRET_KEY, "clientSecretRef")?),
        user_refresh_token: value(token, token_name, token_key, "refreshTokenSecretRef")?,
    })
}

fn value(secret: &Secret, name: &str, key: &str, field: &str) -> Result<String, Problem> {
    let missing = || Problem {
        reason: reason::SECRET_KEY_MISSING,
        message: format!("Secret {name} ({field}) has no non-empty key {key}"),
    };
    secret_text(secret, key).map_err(|_| missing())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(pairs: &[(&str, &str)]) -> Secret {
        wgtwo_testenv::string_secret("s", pairs)
    }

    #[test]
    fn complete_inputs_are_read_and_trimmed() {
        let client = secret(&[("client_id", "id"), ("client_secret", "secret\n")]);
        let token = secret(&[("refresh_token", " rt ")]);
        let inputs = from_secrets(Some(&client), "c", Some(&token), "t", "refresh_token").unwrap();
        assert_eq!((inputs.client_id.as_str(), inputs.client_secret.secret().as_str()), ("id", "secret"));
        assert_eq!(inputs.user_refresh_token, "rt");
    }

    #[test]
    fn each_problem_names_the_secret_the_field_and_the_key() {
        let client = secret(&[("client_id", "id"), ("client_secret", "s")]);
        let token = secret(&[("refresh_token", "rt")]);
        let err = from_secrets(None, "wgtwo-client", Some(&token), "t", "refresh_token").err().unwrap();
        assert_eq!(err.reason, "SecretNotFound");
        assert!(err.message.contains("wgtwo-client (clientSecretRef)"));
        let err = from_secrets(Some(&client), "c", None, "alice-auth", "refresh_token").err().unwrap();
        assert!(err.message.contains("alice-auth (refreshTokenSecretRef)"));
        let err = from_secrets(Some(&client), "c", Some(&token), "t", "other_key").err().unwrap();
        assert_eq!(err.reason, "SecretKeyMissing");
        assert!(err.message.contains("key other_key"));
        let empty = secret(&[("client_id", "id"), ("client_secret", "  ")]);
        let err = from_secrets(Some(&empty), "c", Some(&token), "t", "refresh_token").err().unwrap();
        assert!(err.message.contains("client_secret"));
    }
}
