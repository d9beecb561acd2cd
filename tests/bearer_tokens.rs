//! Bearer JWTs from an identity provider, end to end: the control plane fetches the
//! provider's keys (discovery, then JWKS) into the snapshot, and the proxy verifies
//! tokens against them with no call to anyone. The provider here is a key server
//! the test runs (`support::JwtIssuer`: discovery document and JWKS over HTTP) with
//! an ES256 key.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use support::{
    client, echo_upstream, get_json, join_token, post_json, ControlProcess, JwtIssuer, ProxyProcess,
};
use vigil_test_postgres::TestPostgres;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identity_provider_tokens_are_verified_offline_against_the_snapshot_keys() {
    let pg = TestPostgres::start().unwrap();
    let db = pg.create_database("bearer").unwrap();
    let cp = ControlProcess::start(&db);
    let c = client();
    let url = cp.url.clone();
    let upstream = echo_upstream().await;

    let idp = JwtIssuer::start().await;
    let issuer = idp.issuer.clone();
    let public = idp.public.clone();

    post_json(
        &c,
        &url,
        "/v1/identity-providers",
        json!({"name": "corp", "issuer_url": issuer, "client_id": "vigil", "audiences": ["api"]}),
    )
    .await;
    post_json(
        &c,
        &url,
        "/v1/policies",
        json!({"name": "eng", "document": {"allow": {"and": [{"groups": "engineering"}]}}}),
    )
    .await;
    post_json(
        &c,
        &url,
        "/v1/routes",
        json!({"name": "api", "host": "api.test", "upstreams": [upstream], "policies": ["eng"]}),
    )
    .await;
    let token = join_token(&c, &url, "fleet").await;
    let proxy = ProxyProcess::start(&cp.grpc_url, &token, "proxy-a");
    proxy.wait_ready().await;

    let sign =
        |claims: Value, alg: Algorithm, key: Option<&EncodingKey>| idp.sign_with(&claims, alg, key);
    let claims = |sub: &str, aud: &str, exp: i64| {
        json!({"iss": issuer, "sub": sub, "aud": aud, "exp": exp, "iat": now(),
               "email": format!("{sub}@example.com"), "email_verified": true, "groups": ["engineering"]})
    };
    let call = |t: String| {
        let proxy_url = proxy.url.clone();
        async move {
            reqwest::Client::new()
                .get(format!("{proxy_url}/x"))
                .header("host", "api.test")
                .bearer_auth(t)
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .unwrap()
        }
    };

    // The keys reach the store (fetched at once), then the proxy (the next delta).
    let good = sign(claims("ada", "vigil", now() + 300), Algorithm::ES256, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let res = call(good.clone()).await;
        if res.status() == 200 {
            let body: Value = res.json().await.unwrap();
            let ada = vigil_snapshot::provisioned_user_id(&issuer, "ada");
            assert_eq!(body["headers"]["x-vigil-user"], ada);
            // The signed assertion verifies with the JWKS every proxy serves.
            let assertion = body["headers"]["x-vigil-jwt-assertion"].as_str().unwrap();
            let jwks: jsonwebtoken::jwk::JwkSet = reqwest::Client::new()
                .get(format!("{}/.well-known/vigil/jwks.json", proxy.url))
                .header("host", "api.test")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let key = jsonwebtoken::DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
            let mut v = jsonwebtoken::Validation::new(Algorithm::ES256);
            v.set_audience(&["api.test"]);
            let claims = jsonwebtoken::decode::<Value>(assertion, &key, &v)
                .unwrap()
                .claims;
            assert_eq!(claims["sub"], ada);
            assert_eq!(claims["email"], "ada@example.com");
            assert_eq!(claims["groups"], json!(["engineering"]));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the token was never accepted ({}); idp: {}; proxy log:\n{}",
            res.status(),
            get_json(&c, &url, "/v1/identity-providers/corp").await,
            proxy.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A configured extra audience works too.
    let res = call(sign(
        claims("ada", "api", now() + 300),
        Algorithm::ES256,
        None,
    ))
    .await;
    assert_eq!(res.status(), 200);
    // Not in the group the policy wants: 403.
    let mut outsider = claims("eve", "vigil", now() + 300);
    outsider["groups"] = json!(["sales"]);
    let res = call(sign(outsider, Algorithm::ES256, None)).await;
    assert_eq!(res.status(), 403);

    // Refused outright: 401 with `invalid_token`.
    let mut wrong_iss = claims("ada", "vigil", now() + 300);
    wrong_iss["iss"] = json!("https://evil.example");
    let body = URL_SAFE_NO_PAD.encode(claims("ada", "vigil", now() + 300).to_string());
    let none = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"k1"}"#);
    let bad = [
        (
            "wrong audience",
            sign(claims("ada", "other", now() + 300), Algorithm::ES256, None),
        ),
        (
            "expired",
            sign(claims("ada", "vigil", now() - 120), Algorithm::ES256, None),
        ),
        ("wrong issuer", sign(wrong_iss, Algorithm::ES256, None)),
        ("alg none", format!("{none}.{body}.")),
        (
            "HS256 keyed with the public key",
            sign(
                claims("ada", "vigil", now() + 300),
                Algorithm::HS256,
                Some(&EncodingKey::from_secret(&public)),
            ),
        ),
        ("tampered", format!("{}x", &good[..good.len() - 1])),
    ];
    for (what, t) in bad {
        let res = call(t).await;
        assert_eq!(res.status(), 401, "{what}");
        let challenge = res.headers()["www-authenticate"].to_str().unwrap();
        assert!(challenge.contains("invalid_token"), "{what}: {challenge}");
    }

    // A directory user with the token's issuer and subject is that user: suspended,
    // the same token is denied.
    let bob = post_json(
        &c,
        &url,
        "/v1/users",
        json!({"issuer": issuer, "subject": "bob", "status": "suspended"}),
    )
    .await;
    let bobs = sign(claims("bob", "vigil", now() + 300), Algorithm::ES256, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let res = call(bobs.clone()).await;
        if res.status() == 403 {
            let body: Value = res.json().await.unwrap();
            assert!(
                body["detail"].as_str().unwrap().contains("suspended"),
                "{body}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob ({}) was never refused",
            bob["id"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
