//! Building snapshots from the store: a full build from every entity, then
//! incremental builds from the change log. Both paths derive each entry from the
//! stored documents alone, so a given revision always yields the same entries,
//! whichever replica builds it and however it got there.

use std::collections::{BTreeMap, BTreeSet};

use vigil_proto::v1::{self as pb, entry::Body};
use vigil_snapshot::{Entry, History, Key, Kind, Snapshot};
use vigil_store::{Change, RawRecord};

use crate::resources::*;

/// Changed keys kept for deltas before a lagging proxy gets a full snapshot instead.
const HISTORY_KEYS: usize = 100_000;

/// Decrypts a stored secret.
pub type OpenSecret = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The stored documents a snapshot derives from, and the snapshot itself.
pub struct Builder {
    records: BTreeMap<(String, String), RawRecord>,
    policies: BTreeMap<String, vigil_policy::Document>,
    history: History,
    open_secret: OpenSecret,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("version", &self.history.current().version)
            .field("records", &self.records.len())
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// A full build from every entity at `revision`. `open_secret` decrypts stored
    /// secrets (identity providers' client secrets).
    pub fn full(revision: i64, records: Vec<RawRecord>, open_secret: OpenSecret) -> Builder {
        let mut b = Builder {
            records: BTreeMap::new(),
            policies: BTreeMap::new(),
            history: History::new(Snapshot::default(), HISTORY_KEYS),
            open_secret,
        };
        for r in records {
            if r.kind == Policy::KIND {
                b.parse_policy(&r);
            }
            b.records.insert((r.kind.clone(), r.id.clone()), r);
        }
        let entries: Vec<Entry> = b
            .records
            .keys()
            .filter_map(|(kind, id)| b.derive(kind, id))
            .collect();
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
        let mut touched: BTreeSet<(String, String)> = BTreeSet::new();
        for c in changes {
            touched.insert((c.kind.clone(), c.id.clone()));
        }
        let mut fresh: BTreeMap<(String, String), RawRecord> = records
            .into_iter()
            .map(|r| ((r.kind.clone(), r.id.clone()), r))
            .collect();
        let mut changed_policies = BTreeSet::new();
        for key in &touched {
            match fresh.remove(key) {
                Some(r) => {
                    self.records.insert(key.clone(), r);
                }
                None => {
                    self.records.remove(key);
                }
            }
            if key.0 == Policy::KIND {
                changed_policies.insert(key.1.clone());
                self.policies.remove(&key.1);
                if let Some(r) = self.records.get(key).cloned() {
                    self.parse_policy(&r);
                }
            }
        }
        // Routes to recompile: those changed, and those reaching a changed policy.
        let mut affected: BTreeSet<(String, String)> = touched
            .into_iter()
            .filter(|(k, _)| k != Policy::KIND)
            .collect();
        if !changed_policies.is_empty() {
            for ((kind, id), r) in self
                .records
                .range((Route::KIND.to_owned(), String::new())..)
            {
                if kind != Route::KIND {
                    break;
                }
                if self.reaches(r, &changed_policies) {
                    affected.insert((kind.clone(), id.clone()));
                }
            }
        }
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for (kind, id) in &affected {
            let Some(k) = entry_kind(kind) else { continue };
            match self.derive(kind, id) {
                Some(e) => upserts.push(e),
                None => removals.push(Key {
                    kind: k,
                    id: id.clone(),
                }),
            }
        }
        self.history.advance(version(revision), upserts, removals)
    }

    fn parse_policy(&mut self, r: &RawRecord) {
        let doc = serde_json::from_str::<PolicySpec>(&r.body)
            .ok()
            .and_then(|s| vigil_policy::parse_json_value(&s.document).ok());
        match doc {
            Some(d) => {
                self.policies.insert(r.id.clone(), d);
            }
            None => {
                tracing::error!(policy = %r.id, "Stored policy does not parse; routes using it deny everything")
            }
        }
    }

    /// Whether a route's policies reach any of `names`, directly or through references.
    fn reaches(&self, route: &RawRecord, names: &BTreeSet<String>) -> bool {
        let Ok(spec) = serde_json::from_str::<RouteSpec>(&route.body) else {
            return true;
        };
        let mut stack: Vec<String> = spec.policies.clone();
        if let Some(inline) = spec
            .policy
            .as_ref()
            .and_then(|p| vigil_policy::parse_json_value(p).ok())
        {
            stack.extend(inline.references());
        }
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
    fn derive(&self, kind: &str, id: &str) -> Option<Entry> {
        let r = self.records.get(&(kind.to_owned(), id.to_owned()))?;
        let body = match kind {
            Route::KIND => Body::Route(self.route(r)?),
            User::KIND => Body::User(user(r)?),
            Device::KIND => Body::Device(device(r)?),
            ServiceAccount::KIND => Body::ServiceAccount(service_account(r)?),
            Grant::KIND => Body::Grant(grant(r)?),
            IdentityProvider::KIND => Body::IdentityProvider(self.identity_provider(r)?),
            Session::KIND => Body::RevokedSession(revoked_session(r)?),
            _ => return None,
        };
        Some(Entry {
            id: id.to_owned(),
            body: Some(body),
        })
    }

    fn route(&self, r: &RawRecord) -> Option<pb::Route> {
        let spec: RouteSpec = decode(r)?;
        let policy = self.compile_route(&r.id, &spec);
        let s = &spec.settings;
        Some(pb::Route {
            host: spec.host.clone(),
            path: Some(match &spec.path {
                PathMatch::Prefix(p) => pb::route::Path::Prefix(p.clone()),
                PathMatch::Exact(p) => pb::route::Path::Exact(p.clone()),
                PathMatch::Regex(p) => pb::route::Path::Regex(p.clone()),
            }),
            upstreams: spec.upstreams.clone(),
            policy,
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
        })
    }

    /// The route's effective policy: every rule of its named policies and of its inline
    /// policy (any allow rule allows, any deny rule denies), compiled with a symbol
    /// table of its own. A policy that fails to compile becomes deny-all: fail closed.
    fn compile_route(&self, route: &str, spec: &RouteSpec) -> Vec<u8> {
        let mut rules = Vec::new();
        let mut broken = false;
        for name in &spec.policies {
            match self.policies.get(name) {
                Some(doc) => rules.extend(doc.rules.iter().cloned().map(|mut r| {
                    r.pointer = format!("{name}#{}", r.pointer);
                    r
                })),
                None => broken = true,
            }
        }
        if let Some(inline) = &spec.policy {
            match vigil_policy::parse_json_value(inline) {
                Ok(doc) => rules.extend(doc.rules),
                Err(_) => broken = true,
            }
        }
        let mut symbols = vigil_policy::Symbols::default();
        let doc = vigil_policy::Document { rules };
        let compiled = if broken {
            None
        } else {
            vigil_policy::compile(
                &doc,
                vigil_policy::CompileEnv {
                    symbols: &mut symbols,
                    directory: None,
                    library: Some(&self.policies),
                    name: None,
                },
            )
            .map_err(|e| tracing::error!(route, error = %e, "Route policy does not compile; the route denies everything"))
            .ok()
        };
        let compiled = match compiled {
            Some(c) => c,
            None => {
                symbols = vigil_policy::Symbols::default();
                match vigil_policy::compile_standalone(
                    &vigil_policy::Document { rules: Vec::new() },
                    &mut symbols,
                ) {
                    Ok(c) => c,
                    Err(_) => return Vec::new(),
                }
            }
        };
        vigil_snapshot::encode_policy(&compiled, &symbols)
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

/// RFC 3339 → Unix seconds.
fn unix(t: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.timestamp())
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

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| *c != ':').collect();
    (0..s.len() / 2)
        .map_while(|i| {
            s.get(2 * i..2 * i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect()
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
        client_certificate_sha256: spec
            .client_certificate_sha256
            .as_deref()
            .map(hex)
            .unwrap_or_default(),
    })
}

fn service_account(r: &RawRecord) -> Option<pb::ServiceAccount> {
    let spec: ServiceAccountSpec = decode(r)?;
    Some(pb::ServiceAccount {
        groups: sorted(spec.groups),
        expires_at: spec.expires_at.as_deref().and_then(unix),
        disabled: spec.disabled,
        token_sha256: r.secret.as_deref().map(hex).unwrap_or_default(),
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
