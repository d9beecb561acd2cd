//! The identity providers' signing keys, fetched so that proxies can verify bearer
//! JWTs offline: every provider's discovery document is read for its `jwks_uri`,
//! and the key set stored on the provider when it changed (which ships it to every
//! proxy in the next delta). A provider without keys is fetched at once, others
//! every [`REFRESH`]; several replicas each fetch, and write only a change.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use vigil_store::ListQuery;

use crate::resources::{IdentityProvider, Resource as _};
use crate::Control;

/// How often the list of providers is looked at.
const POLL: Duration = Duration::from_secs(3);
/// How often a provider's keys are fetched again.
const REFRESH: Duration = Duration::from_secs(15 * 60);
/// A key set larger than this is refused.
const MAX_BYTES: usize = 256 * 1024;

/// Fetches keys until the process ends.
pub(crate) async fn run(control: Control) {
    let http = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "Cannot make the HTTP client for identity provider keys");
            return;
        }
    };
    let mut fetched: HashMap<String, Instant> = HashMap::new();
    loop {
        if let Err(e) = refresh(&control, &http, &mut fetched).await {
            tracing::warn!(error = %e, "Cannot refresh identity provider keys");
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn refresh(
    control: &Control,
    http: &reqwest::Client,
    fetched: &mut HashMap<String, Instant>,
) -> Result<(), String> {
    let page = control
        .store
        .list(
            IdentityProvider::KIND,
            &ListQuery {
                limit: Some(1000),
                ..ListQuery::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    for rec in page.items {
        let Ok(mut spec) = crate::api::stored::<IdentityProvider>(rec.body) else {
            continue;
        };
        let due = spec.jwks.is_none()
            || fetched
                .get(&rec.id)
                .is_none_or(|at| at.elapsed() >= REFRESH);
        if !due {
            continue;
        }
        fetched.insert(rec.id.clone(), Instant::now());
        let keys = match fetch(http, &spec.issuer_url).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(provider = %rec.id, error = %e, "Cannot fetch the identity provider's keys; keeping the ones held");
                continue;
            }
        };
        if spec.jwks.as_ref() == Some(&keys) {
            continue;
        }
        spec.jwks = Some(keys);
        let op =
            crate::api::replace_op::<IdentityProvider>(control, &rec.id, spec, Some(rec.version))
                .await
                .map_err(|p| p.detail)?;
        match control.write("system:jwks", Some("keys"), vec![op]).await {
            Ok(_) => {
                tracing::info!(provider = %rec.id, "Stored the identity provider's new signing keys")
            }
            // Changed meanwhile (an admin, or another replica): fetched again next poll.
            Err(e) => {
                fetched.remove(&rec.id);
                tracing::debug!(provider = %rec.id, error = %e, "Keys not stored");
            }
        }
    }
    Ok(())
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value, String> {
    let res = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !res.status().is_success() {
        return Err(format!("{url}: HTTP {}", res.status()));
    }
    let body = res.bytes().await.map_err(|e| format!("{url}: {e}"))?;
    if body.len() > MAX_BYTES {
        return Err(format!("{url}: larger than {MAX_BYTES} bytes"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))
}

/// The key set of the provider at `issuer`, through its discovery document.
async fn fetch(http: &reqwest::Client, issuer: &str) -> Result<Value, String> {
    let discovery = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let meta = get_json(http, &discovery).await?;
    let said = meta.get("issuer").and_then(Value::as_str).unwrap_or("");
    if said.trim_end_matches('/') != issuer.trim_end_matches('/') {
        return Err(format!(
            "the discovery document names issuer `{said}`, not `{issuer}`"
        ));
    }
    let jwks_uri = meta
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or("the discovery document has no `jwks_uri`")?;
    let keys = get_json(http, jwks_uri).await?;
    if !keys.get("keys").is_some_and(Value::is_array) {
        return Err(format!("{jwks_uri}: not a JWK set (no `keys` array)"));
    }
    Ok(keys)
}
