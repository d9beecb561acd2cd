//! What the request path reads: the snapshot, with everything a request needs
//! derived from it ahead of time. Each route's policy is loaded and linked into one
//! symbol table; users' groups and devices' posture are interned against that table;
//! grants are grouped by route and subject; the route table is compiled. All of it
//! is built off the request path and swapped in whole, and an update re-derives
//! only what it touches (everything of a kind whose derivation reads names the
//! symbol table gained: groups and domains for users, attributes for devices).

use std::collections::HashMap;
use std::sync::Arc;

use vigil_policy::ast::Scalar as PolicyScalar;
use vigil_policy::request::{GrantWindow, Posture};
use vigil_policy::{CompiledPolicy, Sym, Symbols};
use vigil_proto::v1::entry::Body;
use vigil_proto::v1::{grant, scalar};
use vigil_snapshot::{Kind, Snapshot, SnapshotError, Update};

use crate::routes::RouteTable;
use crate::upstream::Forwarding;

/// A route as requests read it: authorization, then forwarding.
#[derive(Debug)]
pub struct RoutePolicy {
    /// The route's effective policy, linked into the index's symbol table.
    pub policy: CompiledPolicy,
    /// Sign-ins older than this many seconds must be renewed.
    pub max_auth_age_s: Option<u64>,
    /// Where allowed requests go.
    pub forwarding: Forwarding,
    /// Whether the policy reads request headers (so a request decided again later
    /// must keep them).
    pub reads_headers: bool,
    /// The identity provider users of this route sign in with (else the only one).
    pub identity_provider: Option<String>,
}

/// A user as the proxy reads it. Users live here only: the index's snapshot keeps
/// no user entries (see [`Index::snapshot`]), so a hundred thousand users are held
/// once, compactly, rather than as decoded protobuf beside their derived form.
#[derive(Debug, Clone, PartialEq)]
pub struct UserFacts {
    /// Who the identity provider says the user is ([`subject_key`]), the key of
    /// [`Index::subjects`].
    pub subject: Arc<str>,
    /// Suspended users are denied everywhere.
    pub suspended: bool,
    /// The directory's email for the user.
    pub email: Option<String>,
    /// Whether that email is verified.
    pub email_verified: bool,
    /// The email's domain, interned ([`Sym::NONE`] when no policy names it).
    pub domain: Sym,
    /// The directory groups that some policy names, interned and sorted.
    pub groups: Box<[Sym]>,
    /// All the user's directory groups, as ids in [`Index::group_names`], in the
    /// order the control plane sent them (sorted by name).
    pub directory_groups: Box<[u32]>,
    /// The groups the identity provider last asserted, as ids in
    /// [`Index::group_names`].
    pub idp_group_ids: Box<[u32]>,
    /// Those of them some policy names (interned and sorted), with when they last
    /// changed (Unix seconds): they replace the groups of a session sealed before
    /// that time. `None`: never recorded.
    pub idp_groups: Option<(i64, Box<[Sym]>)>,
}

/// Every directory group name some user holds, stored once for the whole index: a
/// hundred thousand users in a few thousand groups hold four bytes per membership
/// rather than a string each. Names are only added (like the policies' symbol
/// table), and a full snapshot starts a new table.
#[derive(Debug, Clone, Default)]
pub struct GroupNames {
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u32>,
}

impl GroupNames {
    /// The id of `name`, added when new.
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        // More than 2^32 distinct group names cannot fit in a snapshot.
        let id = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        let name: Arc<str> = Arc::from(name);
        self.names.push(name.clone());
        self.ids.insert(name, id);
        id
    }

    /// The name of `id` (empty for an id this table never gave out).
    pub fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", |n| n)
    }
}

/// A device as authorization reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceFacts {
    /// Approved by an admin.
    pub approved: bool,
    /// Revoked devices are denied everywhere.
    pub revoked: bool,
    /// Its posture, attributes that some policy names, interned and sorted.
    pub posture: Posture,
}

/// A route's active and future grants, by subject.
#[derive(Debug, Default)]
pub struct RouteGrants {
    /// By user id.
    pub users: HashMap<String, Vec<GrantWindow>>,
    /// By service account id.
    pub service_accounts: HashMap<String, Vec<GrantWindow>>,
}

/// One version of everything the proxy enforces.
#[derive(Debug, Clone, Default)]
pub struct Index {
    /// The entries, as the control plane sent them, except users (held in
    /// [`Index::users`] alone) and routes' compiled policies (held loaded in
    /// [`Index::policies`]).
    pub snapshot: Arc<Snapshot>,
    /// The names of users' directory groups ([`UserFacts::directory_groups`]).
    pub group_names: Arc<GroupNames>,
    /// Names the policies mention, shared by every route's policy.
    pub symbols: Arc<Symbols>,
    /// Each route's loaded policy, by route id (a persistent map: an update copies
    /// only the paths it touches).
    pub policies: imbl::OrdMap<String, Arc<RoutePolicy>>,
    /// Users, by id.
    pub users: imbl::OrdMap<String, Arc<UserFacts>>,
    /// Devices, by id.
    pub devices: imbl::OrdMap<String, Arc<DeviceFacts>>,
    /// Grants, by route id.
    pub grants: Arc<HashMap<String, RouteGrants>>,
    /// Which route serves a (host, path); rebuilt only when routes change.
    pub routes: Arc<RouteTable>,
    /// Service accounts by the SHA-256 of their bearer token; rebuilt only when
    /// service accounts change.
    pub tokens: Arc<HashMap<Vec<u8>, TokenHolder>>,
    /// Users by `issuer\nsubject` (issuer without a trailing slash), kept up to
    /// date entry by entry.
    pub subjects: imbl::OrdMap<Arc<str>, String>,
    /// Identity providers whose bearer JWTs are accepted, by issuer; rebuilt only
    /// when identity providers change.
    pub issuers: Arc<crate::jwt::Issuers>,
    /// Client certificates (SHA-256 of the SubjectPublicKeyInfo) that identify a
    /// device, by device id; kept up to date entry by entry.
    pub device_certificates: imbl::HashMap<[u8; 32], String>,
    /// Client certificates that authenticate a service account, by its id; kept
    /// up to date entry by entry.
    pub service_account_certificates: imbl::HashMap<[u8; 32], String>,
}

/// Who a client certificate names (see [`Index::certificate_holder`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateHolder<'a> {
    /// A device: it identifies the device, the caller authenticates otherwise.
    Device(&'a str),
    /// A service account: it authenticates as the account.
    ServiceAccount(&'a str),
}

/// The key of [`Index::subjects`].
pub fn subject_key(issuer: &str, subject: &str) -> String {
    format!("{}\n{subject}", issuer.trim_end_matches('/'))
}

/// The service account a token hash belongs to, with the key its token must be
/// signed with ([`vigil_snapshot::satoken`]).
#[derive(Debug)]
pub struct TokenHolder {
    /// The service account's id.
    pub id: String,
    /// The raw Ed25519 key that signed its token (empty: never signed).
    key: Vec<u8>,
    /// Whether the token verified: checked once, at its first use, since one
    /// hash is one token.
    verified: std::sync::OnceLock<bool>,
}

fn all_tokens(snapshot: &Snapshot) -> HashMap<Vec<u8>, TokenHolder> {
    snapshot
        .of_kind(Kind::ServiceAccount)
        .filter_map(|e| match &e.body {
            Some(Body::ServiceAccount(sa)) if !sa.token_sha256.is_empty() => Some((
                sa.token_sha256.clone(),
                TokenHolder {
                    id: e.id.clone(),
                    key: sa.token_key.clone(),
                    verified: std::sync::OnceLock::new(),
                },
            )),
            _ => None,
        })
        .collect()
}

/// The fingerprint entry `entry` registers, when it is of `kind` and names one.
fn certificate_of(entry: &vigil_proto::v1::Entry, kind: Kind) -> Option<[u8; 32]> {
    let bytes = match (&entry.body, kind) {
        (Some(Body::Device(d)), Kind::Device) => &d.client_certificate_sha256,
        (Some(Body::ServiceAccount(sa)), Kind::ServiceAccount) => &sa.client_certificate_sha256,
        _ => return None,
    };
    bytes.as_slice().try_into().ok()
}

/// `prev` (fingerprint → id, for entries of `kind`) after the entries named in
/// `touched` went from `before` to `after`, or built afresh when `full`.
fn recertify(
    prev: &imbl::HashMap<[u8; 32], String>,
    before: &Snapshot,
    after: &Snapshot,
    kind: Kind,
    touched: &[(Kind, String)],
    full: bool,
) -> imbl::HashMap<[u8; 32], String> {
    if full {
        return after
            .of_kind(kind)
            .filter_map(|e| Some((certificate_of(e, kind)?, e.id.clone())))
            .collect();
    }
    let mut next = prev.clone();
    for (_, id) in touched.iter().filter(|(k, _)| *k == kind) {
        if let Some(old) = before.get(kind, id).and_then(|e| certificate_of(e, kind)) {
            // Fingerprints are unique within a kind; remove only this entry's.
            if next.get(&old) == Some(id) {
                next.remove(&old);
            }
        }
        if let Some(new) = after.get(kind, id).and_then(|e| certificate_of(e, kind)) {
            next.insert(new, id.clone());
        }
    }
    next
}

/// How many names each derivation reads from the table: users read groups and
/// domains, devices read posture attributes. Tables only ever grow, so a change in
/// a count is a change in what that derivation can see.
fn user_names(s: &Symbols) -> (usize, usize) {
    (s.groups.len(), s.domains.len())
}

/// A user's facts from its entry, its directory groups interned into `names`.
fn user_facts(
    u: vigil_proto::v1::User,
    names: &mut Arc<GroupNames>,
    symbols: &Symbols,
) -> UserFacts {
    let directory_groups: Box<[u32]> = u
        .groups
        .iter()
        .map(|g| match names.ids.get(g.as_str()) {
            Some(id) => *id,
            // Copies a shared table once, and only when a name is new.
            None => Arc::make_mut(names).intern(g),
        })
        .collect();
    let idp_group_ids: Box<[u32]> = u
        .idp_groups
        .iter()
        .map(|g| match names.ids.get(g.as_str()) {
            Some(id) => *id,
            None => Arc::make_mut(names).intern(g),
        })
        .collect();
    relink_user(
        UserFacts {
            subject: Arc::from(subject_key(&u.issuer, &u.subject)),
            suspended: u.suspended,
            email: u.email,
            email_verified: u.email_verified,
            domain: Sym::NONE,
            groups: Box::new([]),
            directory_groups,
            idp_group_ids,
            idp_groups: u.idp_groups_at.map(|at| (at, Box::default())),
        },
        names,
        symbols,
    )
}

/// `user` with what it reads from the policies' symbol table (groups, domain)
/// looked up again.
fn relink_user(mut user: UserFacts, names: &GroupNames, symbols: &Symbols) -> UserFacts {
    let mut groups: Vec<Sym> = user
        .directory_groups
        .iter()
        .filter_map(|g| symbols.groups.get(names.name(*g)))
        .collect();
    groups.sort_unstable();
    user.groups = groups.into();
    if let Some((at, _)) = user.idp_groups {
        let mut idp: Vec<Sym> = user
            .idp_group_ids
            .iter()
            .filter_map(|g| symbols.groups.get(names.name(*g)))
            .collect();
        idp.sort_unstable();
        user.idp_groups = Some((at, idp.into()));
    }
    user.domain = user
        .email
        .as_deref()
        .map_or(Sym::NONE, |e| symbols.domain_of(e));
    user
}

fn device_facts(body: &Body, symbols: &Symbols) -> Option<DeviceFacts> {
    let Body::Device(d) = body else { return None };
    let mut attributes: Vec<(Sym, PolicyScalar)> = d
        .posture
        .iter()
        .filter_map(|a| {
            let sym = symbols.attributes.get(&a.name)?;
            let value = match a.value.as_ref()?.value.as_ref()? {
                scalar::Value::Bool(b) => PolicyScalar::Bool(*b),
                scalar::Value::Number(n) => PolicyScalar::Num(*n),
                scalar::Value::Text(t) => PolicyScalar::Str(t.clone()),
            };
            Some((sym, value))
        })
        .collect();
    attributes.sort_by_key(|(s, _)| *s);
    Some(DeviceFacts {
        approved: d.approved,
        revoked: d.revoked,
        posture: Posture {
            expires_at: d.posture_expires_at,
            attributes,
        },
    })
}

fn all_grants(snapshot: &Snapshot) -> HashMap<String, RouteGrants> {
    let mut by_route: HashMap<String, RouteGrants> = HashMap::new();
    for e in snapshot.of_kind(Kind::Grant) {
        let Some(Body::Grant(g)) = &e.body else {
            continue;
        };
        let window = GrantWindow {
            start: g.start,
            end: g.end,
        };
        let route = by_route.entry(g.route.clone()).or_default();
        let (map, id) = match &g.subject {
            Some(grant::Subject::User(u)) => (&mut route.users, u),
            Some(grant::Subject::ServiceAccount(s)) => (&mut route.service_accounts, s),
            None => continue,
        };
        map.entry(id.clone()).or_default().push(window);
    }
    by_route
}

/// `prev` with the entries of `kind` named in `touched` derived again from `snapshot`
/// (or every entry of `kind`, when `all`).
fn rederive<T>(
    prev: &imbl::OrdMap<String, Arc<T>>,
    snapshot: &Snapshot,
    kind: Kind,
    touched: &[(Kind, String)],
    all: bool,
    derive: impl Fn(&Body) -> Option<T>,
) -> imbl::OrdMap<String, Arc<T>> {
    let facts = |e: &vigil_proto::v1::Entry| e.body.as_ref().and_then(&derive).map(Arc::new);
    if all {
        return snapshot
            .of_kind(kind)
            .filter_map(|e| Some((e.id.clone(), facts(e)?)))
            .collect();
    }
    let mut next = prev.clone();
    for (_, id) in touched.iter().filter(|(k, _)| *k == kind) {
        match snapshot.get(kind, id).and_then(facts) {
            Some(f) => next.insert(id.clone(), f),
            None => next.remove(id),
        };
    }
    next
}

impl Index {
    /// The version held (0: none).
    pub fn version(&self) -> u64 {
        self.snapshot.version
    }

    /// The route serving a request: its id and policy. `host` and `path` are
    /// canonical ([`crate::routes::canonical_host`], [`crate::normalize::normalize_path`]).
    pub fn route(&self, host: &str, path: &str) -> Option<(&str, &CompiledPolicy)> {
        let id = self.routes.find(host, path)?;
        Some((id, self.policy(id)?))
    }

    /// A user's directory groups, by name.
    pub fn group_names_of(&self, user: &UserFacts) -> Vec<String> {
        user.directory_groups
            .iter()
            .map(|g| self.group_names.name(*g).to_owned())
            .collect()
    }

    /// The policy of a route.
    pub fn policy(&self, route: &str) -> Option<&CompiledPolicy> {
        self.policies.get(route).map(|p| &p.policy)
    }

    /// Who the client certificate with SubjectPublicKeyInfo hash `spki_sha256`
    /// belongs to. The control plane keeps a fingerprint to one device or service
    /// account; should both hold one, the device wins and the certificate
    /// authenticates no service account.
    pub fn certificate_holder(&self, spki_sha256: &[u8; 32]) -> Option<CertificateHolder<'_>> {
        if let Some(device) = self.device_certificates.get(spki_sha256) {
            return Some(CertificateHolder::Device(device));
        }
        self.service_account_certificates
            .get(spki_sha256)
            .map(|sa| CertificateHolder::ServiceAccount(sa))
    }

    /// The service account whose bearer token is `token`: its hash is the
    /// account's current one and it is signed, for that account, by the key the
    /// snapshot names (verified at the token's first use).
    pub fn service_account_by_token(&self, token: &str) -> Option<&str> {
        self.service_account_and_hash(token).map(|(id, _)| id)
    }

    /// [`Index::service_account_by_token`], with the token's SHA-256 (which a
    /// request decided again later checks against the account's current one).
    pub fn service_account_and_hash(&self, token: &str) -> Option<(&str, [u8; 32])> {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let hash = <[u8; 32]>::try_from(digest.as_ref()).ok()?;
        let holder = self.tokens.get(&hash[..])?;
        let verified = *holder.verified.get_or_init(|| {
            vigil_snapshot::satoken::verify(token, &holder.id, &holder.key)
                .inspect_err(|e| {
                    tracing::warn!(service_account = %holder.id, "Refusing the service account's token ({e}); rotate it");
                })
                .is_ok()
        });
        verified.then_some((holder.id.as_str(), hash))
    }

    /// The index after `update`, leaving `self` untouched: everything it holds is
    /// persistent or shared, so only what the update touches is copied. Every check
    /// (each changed route's policy, the update's shape and base version) passes
    /// before the result exists, so a bad update changes nothing.
    pub fn apply(&self, mut update: Update) -> Result<Index, SnapshotError> {
        let full = update.full;
        let (mut symbols, mut policies) = if full {
            (Arc::new(Symbols::default()), imbl::OrdMap::new())
        } else {
            (self.symbols.clone(), self.policies.clone())
        };
        let (user_names_before, attributes_before) =
            (user_names(&symbols), symbols.attributes.len());
        let mut touched: Vec<(Kind, String)> = Vec::new();
        for removed in &update.removals {
            let kind = Kind::try_from(removed.kind).unwrap_or(Kind::Unspecified);
            if kind == Kind::Route {
                policies.remove(&removed.id);
            }
            touched.push((kind, removed.id.clone()));
        }
        // Users are taken out of their entries (which stay, empty, for the update's
        // checks): the snapshot keeps none.
        let mut upserted_users = Vec::new();
        for entry in &mut update.upserts {
            let Some(body) = &mut entry.body else {
                continue;
            };
            touched.push((vigil_snapshot::kind_of(body), entry.id.clone()));
            match body {
                Body::User(user) => {
                    upserted_users.push((entry.id.clone(), std::mem::take(user)));
                }
                Body::Route(route) => {
                    // Copies the symbol table only when a route changes (and then once).
                    let policy =
                        vigil_snapshot::decode_policy(&route.policy, Arc::make_mut(&mut symbols))
                            .map_err(|e| {
                            SnapshotError::Invalid(format!("route `{}`: {e}", entry.id))
                        })?;
                    // Loaded once; its bytes are not read again.
                    route.policy = Vec::new();
                    let max_auth_age_s = route.settings.as_ref().and_then(|s| s.max_auth_age_s);
                    let identity_provider = route
                        .settings
                        .as_ref()
                        .and_then(|s| s.identity_provider.clone());
                    policies.insert(
                        entry.id.clone(),
                        Arc::new(RoutePolicy {
                            reads_headers: policy.reads_headers(),
                            policy,
                            max_auth_age_s,
                            forwarding: Forwarding::new(route),
                            identity_provider,
                        }),
                    );
                }
                _ => {}
            }
        }
        let mut snapshot = (*self.snapshot).clone();
        snapshot.apply_except(update, Kind::User)?;
        // Names new to the table can make groups, domains or posture attributes count
        // that did not before: then every user (or device) is derived again.
        let all_users = !full && user_names(&symbols) != user_names_before;
        let all_devices = full || symbols.attributes.len() != attributes_before;
        let (mut users, mut subjects, mut group_names) = if full {
            Default::default()
        } else {
            (
                self.users.clone(),
                self.subjects.clone(),
                self.group_names.clone(),
            )
        };
        for (_, id) in touched.iter().filter(|(k, _)| *k == Kind::User) {
            if let Some(old) = users.remove(id) {
                subjects.remove(&old.subject);
            }
        }
        for (id, user) in upserted_users {
            let facts = user_facts(user, &mut group_names, &symbols);
            subjects.insert(facts.subject.clone(), id.clone());
            users.insert(id, Arc::new(facts));
        }
        if all_users {
            users = users
                .iter()
                .map(|(id, u)| {
                    (
                        id.clone(),
                        Arc::new(relink_user((**u).clone(), &group_names, &symbols)),
                    )
                })
                .collect();
        }
        let touches = |kind: Kind| full || touched.iter().any(|(k, _)| *k == kind);
        let devices = rederive(
            &self.devices,
            &snapshot,
            Kind::Device,
            &touched,
            all_devices,
            |b| device_facts(b, &symbols),
        );
        let grants = if touches(Kind::Grant) {
            Arc::new(all_grants(&snapshot))
        } else {
            self.grants.clone()
        };
        let routes = if touches(Kind::Route) {
            Arc::new(RouteTable::build(&snapshot))
        } else {
            self.routes.clone()
        };
        let tokens = if touches(Kind::ServiceAccount) {
            Arc::new(all_tokens(&snapshot))
        } else {
            self.tokens.clone()
        };
        let issuers = if touches(Kind::IdentityProvider) {
            Arc::new(crate::jwt::issuers(&snapshot))
        } else {
            self.issuers.clone()
        };
        let device_certificates = recertify(
            &self.device_certificates,
            &self.snapshot,
            &snapshot,
            Kind::Device,
            &touched,
            full,
        );
        let service_account_certificates = recertify(
            &self.service_account_certificates,
            &self.snapshot,
            &snapshot,
            Kind::ServiceAccount,
            &touched,
            full,
        );
        Ok(Index {
            device_certificates,
            service_account_certificates,
            tokens,
            subjects,
            issuers,
            snapshot: Arc::new(snapshot),
            group_names,
            symbols,
            policies,
            users,
            devices,
            grants,
            routes,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vigil_proto::v1::{Device, Entry, EntryKey, ServiceAccount};
    use vigil_snapshot::{satoken, Signer};

    fn device(id: &str, fp: u8) -> Entry {
        Entry {
            id: id.into(),
            body: Some(Body::Device(Device {
                name: id.into(),
                client_certificate_sha256: vec![fp; 32],
                ..Device::default()
            })),
        }
    }

    fn service_account(id: &str, fp: u8) -> Entry {
        Entry {
            id: id.into(),
            body: Some(Body::ServiceAccount(ServiceAccount {
                client_certificate_sha256: vec![fp; 32],
                ..ServiceAccount::default()
            })),
        }
    }

    fn update(
        version: u64,
        full: bool,
        mut upserts: Vec<Entry>,
        removals: Vec<EntryKey>,
    ) -> Update {
        upserts.sort_by_key(vigil_snapshot::Key::of);
        Update {
            version,
            base_version: if full { 0 } else { version - 1 },
            full,
            upserts,
            removals,
        }
    }

    #[test]
    fn client_certificates_follow_their_holders() {
        let index = Index::default()
            .apply(update(
                1,
                true,
                vec![
                    device("laptop", 1),
                    device("phone", 2),
                    service_account("ci", 3),
                ],
                vec![],
            ))
            .unwrap();
        assert_eq!(
            index.certificate_holder(&[1; 32]),
            Some(CertificateHolder::Device("laptop"))
        );
        assert_eq!(
            index.certificate_holder(&[3; 32]),
            Some(CertificateHolder::ServiceAccount("ci"))
        );
        assert_eq!(index.certificate_holder(&[9; 32]), None);
        // A new key for the laptop, the phone's key moved to a tablet in the same
        // delta, the service account gone: only current keys name anyone.
        let index = index
            .apply(update(
                2,
                false,
                vec![device("laptop", 4), device("phone", 0), device("tablet", 2)],
                vec![EntryKey {
                    kind: Kind::ServiceAccount as i32,
                    id: "ci".into(),
                }],
            ))
            .unwrap();
        assert_eq!(index.certificate_holder(&[1; 32]), None);
        assert_eq!(
            index.certificate_holder(&[4; 32]),
            Some(CertificateHolder::Device("laptop"))
        );
        assert_eq!(
            index.certificate_holder(&[2; 32]),
            Some(CertificateHolder::Device("tablet"))
        );
        assert_eq!(index.certificate_holder(&[3; 32]), None);
        // Should a device and a service account share a key, the device wins.
        let index = index
            .apply(update(3, false, vec![service_account("ci", 4)], vec![]))
            .unwrap();
        assert_eq!(
            index.certificate_holder(&[4; 32]),
            Some(CertificateHolder::Device("laptop"))
        );
    }

    fn sha256(token: &str) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .to_vec()
    }

    fn with_accounts(accounts: Vec<(&str, &str, Vec<u8>)>) -> Index {
        let upserts = accounts
            .into_iter()
            .map(|(id, token, key)| Entry {
                id: id.into(),
                body: Some(Body::ServiceAccount(ServiceAccount {
                    token_sha256: sha256(token),
                    token_key: key,
                    ..ServiceAccount::default()
                })),
            })
            .collect();
        Index::default()
            .apply(Update {
                version: 1,
                base_version: 0,
                full: true,
                upserts,
                removals: vec![],
            })
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_service_account_token_needs_its_hash_and_its_signature() {
        let control = Signer::from_seed(&[1; 32]).unwrap();
        let other = Signer::from_seed(&[2; 32]).unwrap();
        let good = satoken::issue(&control, "ci", 1_900_000_000, [1; 16]);
        // Hash registered, but signed by a key the snapshot does not name for it.
        let foreign = satoken::issue(&other, "deploy", 1_900_000_000, [2; 16]);
        // Hash registered under another account than the one it names.
        let swapped = satoken::issue(&control, "ci", 1_900_000_000, [3; 16]);
        let unsigned = "vgl_sa_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let key = control.public_key().to_vec();
        let index = with_accounts(vec![
            ("ci", &good, key.clone()),
            ("deploy", &foreign, key.clone()),
            ("legacy", unsigned, Vec::new()),
            ("ops", &swapped, key.clone()),
        ]);
        assert_eq!(index.service_account_by_token(&good), Some("ci"));
        // Again, from the cached check.
        assert_eq!(index.service_account_by_token(&good), Some("ci"));
        assert_eq!(index.service_account_by_token(&foreign), None);
        assert_eq!(index.service_account_by_token(&swapped), None);
        assert_eq!(index.service_account_by_token(unsigned), None);
        assert_eq!(index.service_account_by_token("vgl_sa_unknown"), None);
    }
}
