//! Building snapshots from the store: a full build from every entity, then
//! incremental builds from the change log. Both paths derive each entry from the
//! stored documents alone, so a given revision always yields the same entries,
//! whichever replica builds it and however it got there.

use std::collections::{BTreeMap, BTreeSet};

use vigil_proto::v1::{self as pb, entry::Body};
use vigil_snapshot::{Entry, History, Key, Kind, Snapshot};
use vigil_store::{Change, RawRecord};

use crate::resources::*;
use crate::time::unix;

/// Changed keys kept for deltas before a lagging proxy gets a full snapshot instead.
const HISTORY_KEYS: usize = 100_000;

/// Decrypts a stored secret.
pub type OpenSecret = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// A route as stored, decoded once: routes are re-derived whenever a policy they
/// reach changes, so their documents are kept (nothing else is).
struct StoredRoute {
    spec: RouteSpec,
    /// The inline policy: `Err` when it no longer parses (the route then denies).
    inline: Result<Option<vigil_policy::Document>, ()>,
}

impl StoredRoute {
    /// Named policies it refers to directly: its list and its inline policy's references.
    fn references(&self) -> impl Iterator<Item = String> + '_ {
        let inline = match &self.inline {
            Ok(Some(doc)) => doc.references(),
            _ => Vec::new(),
        };
        self.spec.policies.iter().cloned().chain(inline)
    }
}

/// What a snapshot derives from besides the entity being derived (routes and named
/// policies, which other entries depend on), and the snapshot itself.
pub struct Builder {
    routes: BTreeMap<String, StoredRoute>,
    policies: BTreeMap<String, vigil_policy::Document>,
    history: History,
    open_secret: OpenSecret,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("version", &self.history.current().version)
            .field("routes", &self.routes.len())
            .field("policies", &self.policies.len())
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// A full build from every entity at `revision`. `open_secret` decrypts stored
    /// secrets (identity providers' client secrets).
    pub fn full(revision: i64, records: Vec<RawRecord>, open_secret: OpenSecret) -> Builder {
        let mut b = Builder {
            routes: BTreeMap::new(),
            policies: BTreeMap::new(),
            history: History::new(Snapshot::default(), HISTORY_KEYS),
            open_secret,
        };
        for r in &records {
            b.absorb(r);
        }
        let entries: Vec<Entry> = records.iter().filter_map(|r| b.derive(r)).collect();
        b.history = History::new(Snapshot::new(version(revision), entries), HISTORY_KEYS);
        b
    }

    /// The snapshot and its recent history.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Moves to `revision` given the change-log rows after the current version and the
    /// current form of the entities they name. Returns the snapshot keys that changed.
    pub fn advance(
        &mut self,
        revision: i64,
        changes: &[Change],
        records: Vec<RawRecord>,
    ) -> Vec<Key> {
        let touched: BTreeSet<(&str, &str)> = changes
            .iter()
            .map(|c| (c.kind.as_str(), c.id.as_str()))
            .collect();
        let fresh: BTreeMap<(&str, &str), &RawRecord> = records
            .iter()
            .map(|r| ((r.kind.as_str(), r.id.as_str()), r))
            .collect();
        let mut changed_policies = BTreeSet::new();
        for &(kind, id) in &touched {
            if kind == Route::KIND {
                self.routes.remove(id);
            } else if kind == Policy::KIND {
                self.policies.remove(id);
                changed_policies.insert(id.to_owned());
            }
            if let Some(r) = fresh.get(&(kind, id)) {
                self.absorb(r);
            }
        }
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for &(kind, id) in &touched {
            let Some(k) = entry_kind(kind) else { continue };
            match fresh.get(&(kind, id)).and_then(|r| self.derive(r)) {
                Some(e) => upserts.push(e),
                None => removals.push(Key {
                    kind: k,
                    id: id.to_owned(),
                }),
            }
        }
        // Routes that reach a changed policy are recompiled too.
        if !changed_policies.is_empty() {
            for (name, route) in &self.routes {
                if !touched.contains(&(Route::KIND, name.as_str()))
                    && self.reaches(route, &changed_policies)
                {
                    upserts.extend(self.route_entry(name, route));
                }
            }
        }
        self.history.advance(version(revision), upserts, removals)
    }

    /// Keeps what later derivations depend on: routes and named policies.
    fn absorb(&mut self, r: &RawRecord) {
        if r.kind == Policy::KIND {
            let doc = decode::<PolicySpec>(r)
                .and_then(|s| vigil_policy::parse_json_value(&s.document).ok());
            match doc {
                Some(d) => {
                    self.policies.insert(r.id.clone(), d);
                }
                None => {
                    tracing::error!(policy = %r.id, "Stored policy does not parse; routes using it deny everything")
                }
            }
        } else if r.kind == Route::KIND {
            if let Some(spec) = decode::<RouteSpec>(r) {
                let inline = match &spec.policy {
                    None => Ok(None),
                    Some(p) => vigil_policy::parse_json_value(p).map(Some).map_err(|_| ()),
                };
                self.routes
                    .insert(r.id.clone(), StoredRoute { spec, inline });
            }
        }
    }

    /// Whether a route reaches any of `names`, directly or through references.
    fn reaches(&self, route: &StoredRoute, names: &BTreeSet<String>) -> bool {
        let mut stack: Vec<String> = route.references().collect();
        let mut seen = BTreeSet::new();
        while let Some(p) = stack.pop() {
            if names.contains(&p) {
                return true;
            }
            if seen.insert(p.clone()) {
                if let Some(d) = self.policies.get(&p) {
                    stack.extend(d.references());
                }
            }
        }
        false
    }

    /// The entry for one stored entity, or `None` when it has no entry (kinds a
    /// proxy does not need, sessions not revoked, documents that do not decode).
    fn derive(&self, r: &RawRecord) -> Option<Entry> {
        let body = match entry_kind(&r.kind)? {
            Kind::Route => return self.route_entry(&r.id, self.routes.get(&r.id)?),
            Kind::User => Body::User(user(r)?),
            Kind::Device => Body::Device(device(r)?),
            Kind::ServiceAccount => Body::ServiceAccount(service_account(r)?),
            Kind::Grant => Body::Grant(grant(r)?),
            Kind::IdentityProvider => Body::IdentityProvider(self.identity_provider(r)?),
            Kind::RevokedSession => Body::RevokedSession(revoked_session(r)?),
            Kind::Unspecified => return None,
        };
        Some(Entry {
            id: r.id.clone(),
            body: Some(body),
        })
    }

    fn route_entry(&self, name: &str, route: &StoredRoute) -> Option<Entry> {
        let spec = &route.spec;
        let s = &spec.settings;
        let body = pb::Route {
            host: spec.host.clone(),
            path: Some(match &spec.path {
                PathMatch::Prefix(p) => pb::route::Path::Prefix(p.clone()),
                PathMatch::Exact(p) => pb::route::Path::Exact(p.clone()),
                PathMatch::Regex(p) => pb::route::Path::Regex(p.clone()),
            }),
            upstreams: spec.upstreams.clone(),
            policy: self.compile_route(name, route),
            settings: Some(pb::RouteSettings {
                timeout_ms: s.timeout_ms,
                preserve_host: s.preserve_host,
                prefix_rewrite: s.prefix_rewrite.clone(),
                set_request_headers: s
                    .set_request_headers
                    .iter()
                    .map(|(name, value)| pb::Header {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect(),
                remove_request_headers: s.remove_request_headers.clone(),
                allow_websockets: s.allow_websockets,
                cors_preflight: s.cors_preflight,
                max_auth_age_s: s.max_auth_age_s,
                identity_provider: s.identity_provider.clone(),
                upstream_ca_pem: s.upstream_ca_pem.clone(),
            }),
        };
        Some(Entry {
            id: name.to_owned(),
            body: Some(Body::Route(body)),
        })
    }

    /// One document with every rule of the route's named policies and of its inline
    /// policy; `None` when one of them is missing or does not parse.
    fn route_document(&self, route: &StoredRoute) -> Option<vigil_policy::Document> {
        let mut rules = Vec::new();
        for name in &route.spec.policies {
            let doc = self.policies.get(name)?;
            rules.extend(doc.rules.iter().cloned().map(|mut r| {
                r.pointer = format!("{name}#{}", r.pointer);
                r
            }));
        }
        if let Some(doc) = route.inline.as_ref().ok()? {
            rules.extend(doc.rules.iter().cloned());
        }
        Some(vigil_policy::Document { rules })
    }

    /// The route's effective policy (any allow rule allows, any deny rule denies),
    /// compiled with a symbol table of its own. A policy that cannot be built or
    /// compiled becomes the empty policy, which denies everything: fail closed.
    fn compile_route(&self, name: &str, route: &StoredRoute) -> Vec<u8> {
        let mut symbols = vigil_policy::Symbols::default();
        let compiled = self
            .route_document(route)
            .ok_or_else(|| "a policy it uses is missing or does not parse".to_owned())
            .and_then(|doc| {
                let env = vigil_policy::CompileEnv {
                    symbols: &mut symbols,
                    directory: None,
                    library: Some(&self.policies),
                    name: None,
                };
                vigil_policy::compile(&doc, env)
                    .map_err(|e| e.to_string())
            })
            .or_else(|e| {
                tracing::error!(route = name, error = %e, "Route policy does not compile; the route denies everything");
                symbols = vigil_policy::Symbols::default();
                vigil_policy::compile_standalone(
                    &vigil_policy::Document { rules: Vec::new() },
                    &mut symbols,
                )
                    .map_err(|e| e.to_string())
            });
        match compiled {
            Ok(c) => vigil_snapshot::encode_policy(&c, &symbols),
            // The empty policy always compiles; should it not, ship nothing and let the
            // proxy refuse the update rather than ship something that allows.
            Err(_) => Vec::new(),
        }
    }

    fn identity_provider(&self, r: &RawRecord) -> Option<pb::IdentityProvider> {
        let spec: IdentityProviderSpec = decode(r)?;
        let client_secret = r
            .secret
            .as_deref()
            .and_then(|s| (self.open_secret)(s))
            .unwrap_or_default();
        let mut domains = spec.allowed_domains.clone();
        domains.sort();
        Some(pb::IdentityProvider {
            issuer_url: spec.issuer_url,
            client_id: spec.client_id,
            client_secret,
            scopes: spec.scopes,
            claim_mapping_json: serde_json::to_string(&spec.claim_mapping).unwrap_or_default(),
            allowed_domains: domains,
            jwks_json: spec
                .jwks
                .as_ref()
                .map(|k| k.to_string())
                .unwrap_or_default(),
            audiences: spec.audiences,
        })
    }
}

fn version(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0)
}

fn entry_kind(kind: &str) -> Option<Kind> {
    Some(match kind {
        Route::KIND => Kind::Route,
        User::KIND => Kind::User,
        Device::KIND => Kind::Device,
        ServiceAccount::KIND => Kind::ServiceAccount,
        Grant::KIND => Kind::Grant,
        IdentityProvider::KIND => Kind::IdentityProvider,
        Session::KIND => Kind::RevokedSession,
        _ => return None,
    })
}

fn decode<T: serde::de::DeserializeOwned>(r: &RawRecord) -> Option<T> {
    serde_json::from_str(&r.body)
        .map_err(|e| tracing::error!(kind = %r.kind, id = %r.id, error = %e, "Stored document does not decode; left out of the snapshot"))
        .ok()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

fn user(r: &RawRecord) -> Option<pb::User> {
    let spec: UserSpec = decode(r)?;
    Some(pb::User {
        issuer: spec.issuer,
        subject: spec.subject,
        email: spec.email,
        email_verified: spec.email_verified,
        display_name: spec.display_name,
        suspended: spec.status == UserStatus::Suspended,
        groups: sorted(spec.groups),
        attributes_json: serde_json::to_string(&spec.attributes).unwrap_or_default(),
        idp_groups: sorted(
            spec.attributes
                .get(crate::verifier::IDP_GROUPS)
                .and_then(|g| g.as_array())
                .map(|g| {
                    g.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
        ),
        idp_groups_at: spec
            .attributes
            .get(crate::verifier::IDP_GROUPS_AT)
            .and_then(serde_json::Value::as_i64),
    })
}

fn scalar(v: &serde_json::Value) -> Option<pb::Scalar> {
    use pb::scalar::Value as S;
    let value = match v {
        serde_json::Value::Bool(b) => S::Bool(*b),
        serde_json::Value::Number(n) => S::Number(n.as_f64()?),
        serde_json::Value::String(s) => S::Text(s.clone()),
        _ => return None,
    };
    Some(pb::Scalar { value: Some(value) })
}

/// A stored SHA-256 (hex: certificate fingerprints, token hashes) as bytes.
fn sha256(hex: Option<&str>) -> Vec<u8> {
    hex.and_then(vigil_policy::parse_fingerprint)
        .map(|b| b.to_vec())
        .unwrap_or_default()
}

fn device(r: &RawRecord) -> Option<pb::Device> {
    let spec: DeviceSpec = decode(r)?;
    Some(pb::Device {
        name: spec.name,
        owner: spec.owner,
        approved: spec.approved,
        revoked: spec.revoked,
        // BTreeMap: sorted by name.
        posture: spec
            .posture
            .attributes
            .iter()
            .filter_map(|(name, v)| {
                Some(pb::Attribute {
                    name: name.clone(),
                    value: Some(scalar(v)?),
                })
            })
            .collect(),
        posture_expires_at: spec.posture.expires_at.as_deref().and_then(unix),
        client_certificate_sha256: sha256(spec.client_certificate_sha256.as_deref()),
    })
}

fn service_account(r: &RawRecord) -> Option<pb::ServiceAccount> {
    let spec: ServiceAccountSpec = decode(r)?;
    let secret = r
        .secret
        .as_deref()
        .map(crate::crypto::service_account_secret);
    Some(pb::ServiceAccount {
        groups: sorted(spec.groups),
        expires_at: spec.expires_at.as_deref().and_then(unix),
        disabled: spec.disabled,
        token_sha256: sha256(secret.as_ref().map(|s| s.0)),
        token_key: secret.map(|s| s.1).unwrap_or_default(),
        client_certificate_sha256: sha256(spec.client_certificate_sha256.as_deref()),
    })
}

fn grant(r: &RawRecord) -> Option<pb::Grant> {
    let spec: GrantSpec = decode(r)?;
    Some(pb::Grant {
        subject: Some(match spec.subject {
            Subject::User(u) => pb::grant::Subject::User(u),
            Subject::ServiceAccount(s) => pb::grant::Subject::ServiceAccount(s),
        }),
        route: spec.route,
        start: unix(&spec.start)?,
        end: unix(&spec.end)?,
    })
}

fn revoked_session(r: &RawRecord) -> Option<pb::RevokedSession> {
    let spec: SessionSpec = decode(r)?;
    let revoked_at = unix(spec.revoked_at.as_deref()?)?;
    Some(pb::RevokedSession {
        user_id: spec.user_id,
        revoked_at,
        expires_at: unix(&spec.expires_at).unwrap_or(i64::MAX),
    })
}
