//! Reading the grant's inputs: the OAuth client Secret and the user's refresh token. A missing
//! Secret or key is a condition that says what to fix, never a crash or a silent retry loop.

use k8s_openapi::api::core::v1::Secret;

use super::status::reason;
use crate::api::{CLIENT_ID_KEY, CLIENT_SECRET_KEY};
use crate::kubeapi::secret_text;
use crate::oauth::secrets::ClientSecret;

/// The OAuth client, from `clientSecretRef`.
pub struct Inputs {
    pub client_id: String,
    pub client_secret: ClientSecret,
}

/// Why the inputs cannot be used; `message` tells the user what to do.
#[derive(Debug, PartialEq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

/// The keys read from the client Secret.
pub const CLIENT_KEYS: &[&str] = &[CLIENT_ID_KEY, CLIENT_SECRET_KEY];

/// Pure: the OAuth client from its Secret, or what is wrong with it.
pub fn client(client: Option<&Secret>, client_name: &str) -> Result<Inputs, Problem> {
    let client = client.ok_or_else(|| Problem {
        reason: reason::SECRET_NOT_FOUND,
        message: format!(
            "Secret {client_name} (clientSecretRef) does not exist: create it with the keys {CLIENT_ID_KEY} and {CLIENT_SECRET_KEY}"
        ),
    })?;
    Ok(Inputs {
        client_id: value(client, client_name, CLIENT_ID_KEY, "clientSecretRef")?,
        client_secret: ClientSecret::new(value(client, client_name, CLIENT_SECRET_KEY, "clientSecretRef")?),
    })
}

/// Pure: the user's refresh token (where a lineage starts), or what is wrong with its Secret.
pub fn user_token(token: Option<&Secret>, token_name: &str, token_key: &str) -> Result<String, Problem> {
    let token = token.ok_or_else(|| Problem {
        reason: reason::SECRET_NOT_FOUND,
        message: format!(
            "Secret {token_name} (refreshTokenSecretRef) does not exist: create it with the refresh token under key {token_key}, or run wgtwo-operator authorize"
        ),
    })?;
    value(token, token_name, token_key, "refreshTokenSecretRef")
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
        let inputs = client(Some(&secret(&[("client_id", "id"), ("client_secret", "secret\n")])), "c").unwrap();
        assert_eq!((inputs.client_id.as_str(), inputs.client_secret.secret().as_str()), ("id", "secret"));
        assert_eq!(user_token(Some(&secret(&[("refresh_token", " rt ")])), "t", "refresh_token").unwrap(), "rt");
    }

    #[test]
    fn each_problem_names_the_secret_the_field_and_the_key() {
        let token = secret(&[("refresh_token", "rt")]);
        let err = client(None, "wgtwo-client").err().unwrap();
        assert_eq!(err.reason, "SecretNotFound");
        assert!(err.message.contains("wgtwo-client (clientSecretRef)"));
        let err = user_token(None, "alice-auth", "refresh_token").err().unwrap();
        assert!(err.message.contains("alice-auth (refreshTokenSecretRef)"));
        let err = user_token(Some(&token), "t", "other_key").err().unwrap();
        assert_eq!(err.reason, "SecretKeyMissing");
        assert!(err.message.contains("key other_key"));
        let empty = secret(&[("client_id", "id"), ("client_secret", "  ")]);
        let err = client(Some(&empty), "c").err().unwrap();
        assert!(err.message.contains("client_secret"));
    }
}
