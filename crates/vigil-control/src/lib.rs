//! Vigil's control plane: the admin REST API over the store (this crate), with
//! snapshot building and streaming to proxies alongside.

pub mod api;
pub mod auth;
pub mod body;
pub mod crypto;
pub mod idle;
mod jwks;
pub mod openapi;
pub mod problem;
pub mod resources;
pub mod serve;
mod sessions;
pub mod snapshot;
pub mod stream;
mod time;
pub mod verifier;

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use tokio::sync::watch;
use vigil_store::Store;

use crate::crypto::{token_hash, SecretBox};
use crate::problem::Problem;
use crate::resources::*;

/// What the control plane is configured with besides its store.
#[derive(Debug, Default)]
pub struct ControlConfig {
    /// An owner token accepted without being stored (for the first start).
    pub bootstrap_token: Option<String>,
    /// Key for secrets at rest: (key id, base64 32-byte key).
    pub secret_key: Option<(String, String)>,
}

/// Shared state of the control plane. Cheap to clone.
#[derive(Clone)]
pub struct Control {
    /// The store.
    pub store: Store,
    inner: Arc<Inner>,
}

struct Inner {
    bootstrap_hash: Option<String>,
    secrets: Option<SecretBox>,
    revision: watch::Sender<i64>,
    hub: std::sync::OnceLock<Arc<stream::Hub>>,
    /// The hash of a join token set in configuration rather than stored.
    fleet_join_hash: std::sync::OnceLock<String>,
    /// Signs service-account tokens: the snapshot signer once snapshots start.
    token_signer: std::sync::OnceLock<Arc<vigil_snapshot::Signer>>,
}

impl Control {
    /// Builds the state; fails on a malformed secret key.
    pub fn new(store: Store, config: ControlConfig) -> Result<Control, crypto::SecretError> {
        let secrets = match &config.secret_key {
            Some((id, key)) => Some(SecretBox::from_base64(id, key)?),
            None => None,
        };
        let (revision, _) = watch::channel(0);
        Ok(Control {
            store,
            inner: Arc::new(Inner {
                bootstrap_hash: config
                    .bootstrap_token
                    .as_deref()
                    .filter(|t| !t.is_empty())
                    .map(token_hash),
                secrets,
                revision,
                hub: std::sync::OnceLock::new(),
                fleet_join_hash: std::sync::OnceLock::new(),
                token_signer: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Also admits proxies presenting `token` (a join token from configuration,
    /// e.g. a Kubernetes secret shared with the proxies' Deployment). It must be
    /// at least 32 characters; it can be set once.
    pub fn accept_fleet_join_token(&self, token: &str) -> Result<(), &'static str> {
        if token.trim().len() < 32 {
            return Err("a fleet join token is at least 32 characters");
        }
        self.inner
            .fleet_join_hash
            .set(token_hash(token.trim()))
            .map_err(|_| "the fleet join token is already set")
    }

    pub(crate) fn fleet_join_hash(&self) -> Option<&str> {
        self.inner.fleet_join_hash.get().map(String::as_str)
    }

    pub(crate) fn bootstrap_hash(&self) -> Option<&str> {
        self.inner.bootstrap_hash.as_deref()
    }

    pub(crate) fn seal(&self, plain: &str) -> Result<String, Problem> {
        match &self.inner.secrets {
            Some(b) => Ok(b.seal(plain)),
            None => Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-secret-key",
                "the control plane has no secret key configured, so it cannot store secrets",
            )),
        }
    }

    /// Decrypts a stored secret.
    pub fn open(&self, sealed: &str) -> Option<String> {
        self.inner
            .secrets
            .as_ref()
            .and_then(|b| b.open(sealed).ok())
    }

    /// Commits `ops` as one write by `actor` and announces the revision to this
    /// process's snapshot builder: every write of the control plane goes through here.
    pub async fn write(
        &self,
        actor: &str,
        action: Option<&str>,
        ops: Vec<vigil_store::Op>,
    ) -> Result<vigil_store::Committed, vigil_store::StoreError> {
        let done = self.store.write(actor, action, ops).await?;
        self.notify(done.revision);
        Ok(done)
    }

    /// Announces a committed revision to local subscribers.
    fn notify(&self, revision: i64) {
        self.inner.revision.send_if_modified(|r| {
            if revision > *r {
                *r = revision;
                true
            } else {
                false
            }
        });
    }

    /// Builds the first snapshot and starts keeping it current; after this the
    /// gRPC service and `GET /v1/proxies` work.
    pub async fn start_snapshots(
        &self,
        signer: vigil_snapshot::Signer,
    ) -> Result<Arc<stream::Hub>, vigil_store::StoreError> {
        if let Some(h) = self.inner.hub.get() {
            return Ok(h.clone());
        }
        let signer = Arc::new(signer);
        if self.inner.token_signer.set(signer.clone()).is_err() {
            tracing::warn!("Service-account tokens were issued before snapshots started, with a key made for this run");
        }
        let (built, reports) = stream::Hub::start(self, signer).await?;
        let hub = self.inner.hub.get_or_init(|| built.clone()).clone();
        // Only the call whose hub was kept starts its tasks.
        if Arc::ptr_eq(&hub, &built) {
            tokio::spawn(stream::run_refresher(self.clone(), hub.clone()));
            tokio::spawn(stream::run_fleet_recorder(self.clone(), hub.clone()));
            tokio::spawn(sessions::run(self.clone(), reports));
            tokio::spawn(jwks::run(self.clone()));
        }
        Ok(hub)
    }

    /// The key that signs service-account tokens: the snapshot signing key. A
    /// control plane whose snapshots have not started (the REST API alone, in
    /// tests) signs with a key made for the process.
    pub(crate) fn token_signer(&self) -> Arc<vigil_snapshot::Signer> {
        self.inner
            .token_signer
            .get_or_init(|| match vigil_snapshot::Signer::generate() {
                Ok((s, _)) => Arc::new(s),
                Err(e) => panic!("no key for service-account tokens: {e}"),
            })
            .clone()
    }

    /// Starts re-verifying live sessions with their identity providers, each about
    /// once per `interval` (zero: never); see [`verifier`].
    pub fn start_verifier(&self, interval: std::time::Duration, limits: verifier::Limits) {
        tokio::spawn(verifier::run(self.clone(), interval, limits));
    }

    /// Starts revoking sessions unused for longer than `idle` (zero: never);
    /// see [`idle`].
    pub fn start_idle_timeout(&self, idle: std::time::Duration) {
        if !idle.is_zero() {
            tokio::spawn(idle::run(self.clone(), idle));
        }
    }

    /// The snapshot hub, once started.
    pub fn hub(&self) -> Option<&Arc<stream::Hub>> {
        self.inner.hub.get()
    }

    /// Revisions committed through this process.
    pub fn revisions(&self) -> watch::Receiver<i64> {
        self.inner.revision.subscribe()
    }
}

/// The admin API's routes, built once for the router and once to list what it
/// serves: the OpenAPI test compares that list with the document both ways.
struct Routes {
    router: Router<Control>,
    served: Vec<(&'static str, String)>,
}

impl Routes {
    /// Serves `handler` at `path`, which answers `methods` (the test checks that
    /// the handler answers exactly these).
    fn at(
        mut self,
        path: String,
        methods: &[&'static str],
        handler: MethodRouter<Control>,
    ) -> Routes {
        self.served
            .extend(methods.iter().map(|m| (*m, path.clone())));
        self.router = self.router.route(&path, handler);
        self
    }
}

impl Kinds for Routes {
    /// The kind's collection and items, and `rotate-token` for kinds with a token.
    fn kind<R: Resource>(self) -> Routes {
        let base = format!("/v1/{}", R::PATH);
        let routes = self
            .at(
                base.clone(),
                &["GET", "POST"],
                get(api::list::<R>).post(api::create::<R>),
            )
            .at(
                format!("{base}/{{id}}"),
                &["GET", "PUT", "PATCH", "DELETE"],
                get(api::get::<R>)
                    .put(api::replace::<R>)
                    .patch(api::patch::<R>)
                    .delete(api::delete::<R>),
            );
        if R::TOKEN_PREFIX.is_none() {
            return routes;
        }
        routes.at(
            format!("{base}/{{id}}/rotate-token"),
            &["POST"],
            post(api::rotate_token::<R>),
        )
    }
}

fn routes() -> Routes {
    let r = Routes {
        router: Router::new(),
        served: Vec::new(),
    }
    .at("/healthz".into(), &["GET"], get(healthz))
    .at("/readyz".into(), &["GET"], get(readyz))
    .at("/v1/openapi.json".into(), &["GET"], get(openapi_json))
    .at("/v1/audit".into(), &["GET"], get(api::audit))
    .at("/v1/proxies".into(), &["GET"], get(api::proxies))
    .at(
        "/v1/policies/validate".into(),
        &["POST"],
        post(api::validate_policy),
    )
    .at(
        "/v1/sessions/{id}/revoke".into(),
        &["POST"],
        post(api::revoke_session),
    )
    .at(
        "/v1/users/{id}/revoke-sessions".into(),
        &["POST"],
        post(api::revoke_user_sessions),
    )
    .at(
        "/v1/devices/{id}/posture".into(),
        &["PUT"],
        axum::routing::put(api::put_posture),
    );
    each_kind(r)
}

/// Every (method, path template) the admin API serves, in the OpenAPI document's
/// path syntax.
pub fn served() -> Vec<(&'static str, String)> {
    routes().served
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(c): State<Control>) -> Response {
    match c.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => Problem::from(e).into_response(),
    }
}

async fn not_found() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "no-such-endpoint",
        "no such endpoint; see /v1/openapi.json",
    )
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this endpoint does not take that method",
    )
}

async fn openapi_json() -> Json<serde_json::Value> {
    Json(openapi::document())
}

/// The admin API's router.
pub fn router(control: Control) -> Router {
    routes()
        .router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(control)
}
