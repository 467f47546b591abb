mod support;
use support::{Env, REDIRECT, ttl};
use wgtwo_testenv::Subscriber;

async fn raw_authorize(env: &Env, who: &str) -> serde_json::Value {
    let mut url = url::Url::parse(&format!("{}/oauth2/auth", env.hydra.base_url())).unwrap();
    url.query_pairs_mut()
        .append_pair("client_id", &env.client.client_id)
        .append_pair("response_type", "code")
        .append_pair("scope", "openid phone offline_access")
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("state", "abcdefghijklmnop")
        .append_pair("nonce", "abcdefghijklmnop");
    let cb = env.hydra.authorize(url.as_str(), &Subscriber::new(who, "+4711111111")).await.unwrap();
    let code = cb.code().unwrap();
    token(env, &[("grant_type", "authorization_code"), ("code", &code), ("redirect_uri", REDIRECT)]).await
}

async fn token(env: &Env, form: &[(&str, &str)]) -> serde_json::Value {
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(env.hydra.ca_pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let r = http
        .post(env.hydra.token_url())
        .basic_auth(&env.client.client_id, Some(&env.client.client_secret))
        .form(form)
        .send()
        .await
        .unwrap();
    r.json().await.unwrap()
}

async fn jwks(env: &Env) -> serde_json::Value {
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(env.hydra.ca_pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    http.get(format!("{}/.well-known/jwks.json", env.hydra.base_url())).send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn scratch() {
    let env = Env::start(ttl(3600)).await;
    let old = raw_authorize(&env, "old").await;
    let jwks1 = jwks(&env).await;
    let http = reqwest::Client::new();
    let r = http
        .post(env.hydra.admin_url().join("admin/keys/hydra.openid.id-token").unwrap())
        .json(&serde_json::json!({"alg": "RS256", "use": "sig", "kid": "rotated-1"}))
        .send()
        .await
        .unwrap();
    println!("rotate: {}", r.status());
    let jwks2 = jwks(&env).await;
    let new = raw_authorize(&env, "new").await;
    let old_refreshed =
        token(&env, &[("grant_type", "refresh_token"), ("refresh_token", old["refresh_token"].as_str().unwrap())])
            .await;
    let new_refreshed =
        token(&env, &[("grant_type", "refresh_token"), ("refresh_token", new["refresh_token"].as_str().unwrap())])
            .await;
    let out = serde_json::json!({"jwks1": jwks1, "jwks2": jwks2,
        "old": old["id_token"], "new": new["id_token"], "old_refreshed": old_refreshed["id_token"], "new_refreshed": new_refreshed["id_token"]});
    std::fs::write("/tmp/keys.json", serde_json::to_string_pretty(&out).unwrap()).unwrap();
}
