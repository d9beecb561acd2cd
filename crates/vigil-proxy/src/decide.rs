//! Authorization, on every request, from the snapshot alone. In this order:
//!
//! 1. **The principal's standing.** A revoked or expired session, or a service
//!    account that is disabled or expired, makes the request unauthenticated: the
//!    caller signs the user in again or answers 401. A suspended user or a revoked
//!    device is denied.
//! 2. **Auth age.** A route with `max_auth_age_s` sends a user whose sign-in is
//!    older back to sign in.
//! 3. **The route's compiled policy**, with the full context: the user's groups
//!    from the directory and the IdP's claims, the device's posture while fresh,
//!    the request's method, path, headers and source, the time, and the
//!    principal's grants for the route. No rule allowing means deny; an anonymous
//!    request that is not allowed must sign in.

use std::net::IpAddr;

use vigil_policy::request::{
    ClientCertificate, Device as PolicyDevice, GrantWindow, Headers, Id, Posture, Session,
    User as PolicyUser,
};
use vigil_policy::{Amr, Effect, Request, Sym, Symbols};
use vigil_proto::v1::entry::Body;
use vigil_proto::v1::{grant, scalar};
use vigil_snapshot::Kind;

use crate::index::Index;

/// A signed-in user's session.
#[derive(Debug, Clone, Copy)]
pub struct SessionFacts<'a> {
    /// Session id.
    pub id: &'a str,
    /// When the user authenticated (Unix seconds).
    pub auth_time: i64,
    /// When the session ends (Unix seconds).
    pub expires_at: i64,
    /// Authentication methods (RFC 8176).
    pub amr: &'a [String],
}

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub enum Principal<'a> {
    /// Nobody authenticated.
    Anonymous,
    /// A user, from a session cookie or an IdP's token.
    User {
        /// User id.
        id: &'a str,
        /// The session, when the user came through one.
        session: Option<SessionFacts<'a>>,
        /// Email from the IdP, used when the directory has none.
        email: Option<&'a str>,
        /// Whether the IdP vouched for that email.
        email_verified: bool,
        /// Groups named in the IdP's claims.
        claim_groups: &'a [String],
        /// The IdP's claims.
        claims: Option<&'a serde_json::Value>,
    },
    /// A service account, by its token.
    ServiceAccount {
        /// Its id.
        id: &'a str,
    },
}

/// The request's facts, besides the principal.
#[derive(Clone, Copy)]
pub struct Facts<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Canonical path.
    pub path: &'a str,
    /// Headers.
    pub headers: &'a dyn Headers,
    /// The client's address.
    pub source_ip: Option<IpAddr>,
    /// Now, Unix seconds.
    pub now: i64,
    /// The device, when identified (by certificate or session).
    pub device_id: Option<&'a str>,
    /// The verified client certificate, if any.
    pub client_certificate: Option<ClientCertificate<'a>>,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead; the JSON Pointer of the allow rule that decided.
    Allow {
        /// The rule.
        rule: String,
    },
    /// 403, with why (and the deny rule's pointer when a rule decided).
    Deny {
        /// Why, for the denial page and the decision log.
        reason: String,
        /// The deny rule that fired, if one did.
        rule: Option<String>,
    },
    /// Sign in (again) or present a credential: 302 to login or 401.
    Unauthenticated {
        /// Why.
        reason: String,
        /// Whether the user must sign in again even with a live IdP session.
        reauthenticate: bool,
    },
}

fn deny(reason: impl Into<String>) -> Verdict {
    Verdict::Deny {
        reason: reason.into(),
        rule: None,
    }
}

fn unauthenticated(reason: impl Into<String>, reauthenticate: bool) -> Verdict {
    Verdict::Unauthenticated {
        reason: reason.into(),
        reauthenticate,
    }
}

fn body<'s>(index: &'s Index, kind: Kind, id: &str) -> Option<&'s Body> {
    index.snapshot.get(kind, id)?.body.as_ref()
}

/// Decides `principal`'s request for route `route` (see the module's doc).
pub fn decide(index: &Index, route: &str, principal: Principal<'_>, facts: Facts<'_>) -> Verdict {
    let Some(policy) = index.policy(route) else {
        return deny(format!("route `{route}` has no policy"));
    };
    let Some(Body::Route(route_entry)) = body(index, Kind::Route, route) else {
        return deny(format!("route `{route}` is not in the snapshot"));
    };
    let symbols: &Symbols = &index.symbols;
    let now = facts.now;

    // 1. Standing.
    let mut groups: Vec<Sym> = Vec::new();
    let mut user = None;
    let mut service_account = None;
    let mut session = Session::default();
    let subject: Option<(bool, &str)>;
    match principal {
        Principal::Anonymous => subject = None,
        Principal::ServiceAccount { id } => {
            let Some(Body::ServiceAccount(sa)) = body(index, Kind::ServiceAccount, id) else {
                return unauthenticated("unknown service account", false);
            };
            if sa.disabled {
                return unauthenticated("the service account is disabled", false);
            }
            if sa.expires_at.is_some_and(|e| e <= now) {
                return unauthenticated("the service account has expired", false);
            }
            // `groups` criteria look at users only (docs/policy.md); policies name
            // service accounts by id.
            service_account = Some(Id {
                sym: symbols.service_accounts.get(id).unwrap_or(Sym::NONE),
                name: id,
            });
            subject = Some((false, id));
        }
        Principal::User {
            id,
            session: facts_session,
            email,
            email_verified,
            claim_groups,
            claims,
        } => {
            if let Some(s) = facts_session {
                if s.expires_at <= now {
                    return unauthenticated("the session has expired", false);
                }
                if index.snapshot.get(Kind::RevokedSession, s.id).is_some() {
                    return unauthenticated("the session was revoked", true);
                }
                if let Some(max) = route_entry
                    .settings
                    .as_ref()
                    .and_then(|st| st.max_auth_age_s)
                {
                    let age = now.saturating_sub(s.auth_time);
                    if u64::try_from(age).unwrap_or(u64::MAX) > max {
                        return unauthenticated(
                            format!("this route needs a sign-in in the last {max} s"),
                            true,
                        );
                    }
                }
                session = Session {
                    auth_time: Some(s.auth_time),
                    amr: Amr::from_values(s.amr.iter().map(String::as_str)),
                };
            }
            let (mut email, mut email_verified) = (email, email_verified);
            if let Some(Body::User(u)) = body(index, Kind::User, id) {
                if u.suspended {
                    return deny("the user is suspended");
                }
                groups.extend(u.groups.iter().filter_map(|g| symbols.groups.get(g)));
                if u.email.is_some() {
                    email = u.email.as_deref();
                    email_verified = u.email_verified;
                }
            }
            groups.extend(claim_groups.iter().filter_map(|g| symbols.groups.get(g)));
            groups.sort_unstable();
            groups.dedup();
            user = Some((id, email, email_verified, claims));
            subject = Some((true, id));
        }
    }

    // The device: revoked means denied; posture counts while fresh.
    let mut posture = Posture::default();
    let mut device = None;
    if let Some(device_id) = facts.device_id {
        match body(index, Kind::Device, device_id) {
            Some(Body::Device(d)) => {
                if d.revoked {
                    return deny("the device is revoked");
                }
                posture.expires_at = d.posture_expires_at;
                posture.attributes = d
                    .posture
                    .iter()
                    .filter_map(|a| {
                        let sym = symbols.attributes.get(&a.name)?;
                        let value = match a.value.as_ref()?.value.as_ref()? {
                            scalar::Value::Bool(b) => vigil_policy::ast::Scalar::Bool(*b),
                            scalar::Value::Number(n) => vigil_policy::ast::Scalar::Num(*n),
                            scalar::Value::Text(t) => vigil_policy::ast::Scalar::Str(t.clone()),
                        };
                        Some((sym, value))
                    })
                    .collect();
                posture.attributes.sort_by_key(|(s, _)| *s);
                device = Some((device_id, d.approved));
            }
            _ => device = Some((device_id, false)),
        }
    }

    // Grants for this route.
    let grants: Vec<GrantWindow> = match subject {
        None => Vec::new(),
        Some((is_user, id)) => index
            .snapshot
            .of_kind(Kind::Grant)
            .filter_map(|e| match e.body.as_ref()? {
                Body::Grant(g) if g.route == route => {
                    let matches = match g.subject.as_ref()? {
                        grant::Subject::User(u) => is_user && u == id,
                        grant::Subject::ServiceAccount(s) => !is_user && s == id,
                    };
                    matches.then_some(GrantWindow {
                        start: g.start,
                        end: g.end,
                    })
                }
                _ => None,
            })
            .collect(),
    };

    // 3. The policy.
    let request = Request {
        user: user.map(|(id, email, email_verified, claims)| PolicyUser {
            id: Id {
                sym: symbols.users.get(id).unwrap_or(Sym::NONE),
                name: id,
            },
            email,
            email_verified,
            domain: email.map_or(Sym::NONE, |e| symbols.domain_of(e)),
            groups: &groups,
            claims,
        }),
        service_account,
        device: device.map(|(id, approved)| PolicyDevice {
            id: Id {
                sym: symbols.devices.get(id).unwrap_or(Sym::NONE),
                name: id,
            },
            approved,
            posture: &posture,
        }),
        client_certificate: facts.client_certificate,
        method: facts.method,
        path: facts.path,
        headers: facts.headers,
        source_ip: facts.source_ip,
        now,
        session,
        grants: &grants,
    };
    let decision = policy.evaluate(&request);
    let rule = decision
        .rule
        .and_then(|i| policy.rule(i))
        .map(|r| (r.effect, r.pointer.to_string()));
    match (decision.allow, rule) {
        (true, Some((_, pointer))) => Verdict::Allow { rule: pointer },
        (true, None) => deny("no rule decided"),
        (false, _) if subject.is_none() => unauthenticated("sign in to reach this route", false),
        (false, Some((Effect::Deny, pointer))) => Verdict::Deny {
            reason: format!("denied by the rule at {pointer}"),
            rule: Some(pointer),
        },
        (false, _) => deny("no rule allows this request"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_policy::request::NoHeaders;
    use vigil_proto::v1::{
        route, Attribute, Device, Entry, Grant, RevokedSession, Route, RouteSettings, Scalar,
        ServiceAccount, User,
    };
    use vigil_snapshot::Update;

    const NOW: i64 = 1_900_000_000;

    fn policy(doc: &str) -> Vec<u8> {
        let doc = vigil_policy::parse_json(doc).unwrap_or_else(|e| panic!("{e:?}"));
        let mut symbols = Symbols::default();
        let p = vigil_policy::compile_standalone(&doc, &mut symbols)
            .unwrap_or_else(|e| panic!("{e:?}"));
        vigil_snapshot::encode_policy(&p, &symbols)
    }

    fn entry(id: &str, body: Body) -> Entry {
        Entry {
            id: id.into(),
            body: Some(body),
        }
    }

    fn route_entry(id: &str, doc: &str, max_auth_age_s: Option<u64>) -> Entry {
        entry(
            id,
            Body::Route(Route {
                host: format!("{id}.example"),
                path: Some(route::Path::Prefix("/".into())),
                policy: policy(doc),
                settings: Some(RouteSettings {
                    max_auth_age_s,
                    ..RouteSettings::default()
                }),
                ..Route::default()
            }),
        )
    }

    fn user(id: &str, groups: &[&str], suspended: bool) -> Entry {
        entry(
            id,
            Body::User(User {
                issuer: "https://idp.example".into(),
                subject: id.into(),
                email: Some(format!("{id}@corp.example")),
                email_verified: true,
                suspended,
                groups: groups.iter().map(|g| g.to_string()).collect(),
                ..User::default()
            }),
        )
    }

    fn index() -> Index {
        let upserts = vec![
            route_entry(
                "eng",
                r#"{"allow": {"and": [{"groups": {"has": "eng"}}]}}"#,
                None,
            ),
            route_entry(
                "fresh",
                r#"{"allow": {"and": [{"authenticated_user": true}]}}"#,
                Some(600),
            ),
            route_entry(
                "managed",
                r#"{"allow": {"and": [{"device/approved": true}, {"device/managed": true}, {"device/posture_fresh": true}]}}"#,
                None,
            ),
            route_entry("jit", r#"{"allow": {"and": [{"grant": true}]}}"#, None),
            route_entry(
                "guarded",
                r#"{"allow": {"and": [{"domain": "corp.example"}]}, "deny": {"and": [{"http_method": "DELETE"}]}}"#,
                None,
            ),
            route_entry(
                "bots",
                r#"{"allow": {"and": [{"service_account": "ci"}]}}"#,
                None,
            ),
            user("alice", &["eng"], false),
            user("bob", &["sales"], false),
            user("mallory", &["eng"], true),
            entry(
                "laptop",
                Body::Device(Device {
                    name: "laptop".into(),
                    approved: true,
                    posture: vec![Attribute {
                        name: "managed".into(),
                        value: Some(Scalar {
                            value: Some(scalar::Value::Bool(true)),
                        }),
                    }],
                    posture_expires_at: Some(NOW + 60),
                    ..Device::default()
                }),
            ),
            entry(
                "stolen",
                Body::Device(Device {
                    name: "stolen".into(),
                    approved: true,
                    revoked: true,
                    ..Device::default()
                }),
            ),
            entry(
                "g1",
                Body::Grant(Grant {
                    subject: Some(grant::Subject::User("bob".into())),
                    route: "jit".into(),
                    start: NOW - 10,
                    end: NOW + 10,
                }),
            ),
            entry(
                "ses_gone",
                Body::RevokedSession(RevokedSession {
                    user_id: "alice".into(),
                    revoked_at: NOW - 5,
                    expires_at: NOW + 3600,
                }),
            ),
            entry(
                "ci",
                Body::ServiceAccount(ServiceAccount {
                    groups: vec!["robots".into()],
                    ..ServiceAccount::default()
                }),
            ),
            entry(
                "old-ci",
                Body::ServiceAccount(ServiceAccount {
                    groups: vec!["robots".into()],
                    expires_at: Some(NOW - 1),
                    ..ServiceAccount::default()
                }),
            ),
        ];
        let mut upserts = upserts;
        // Updates list entries in key order, as the control plane sends them.
        upserts.sort_by_key(vigil_snapshot::Key::of);
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

    fn facts(method: &'static str, device_id: Option<&'static str>) -> Facts<'static> {
        Facts {
            method,
            path: "/",
            headers: &NoHeaders,
            source_ip: None,
            now: NOW,
            device_id,
            client_certificate: None,
        }
    }

    fn as_user<'a>(id: &'a str, session: Option<SessionFacts<'a>>) -> Principal<'a> {
        Principal::User {
            id,
            session,
            email: None,
            email_verified: false,
            claim_groups: &[],
            claims: None,
        }
    }

    fn session(id: &'static str, auth_time: i64) -> SessionFacts<'static> {
        SessionFacts {
            id,
            auth_time,
            expires_at: NOW + 3600,
            amr: &[],
        }
    }

    fn allowed(v: &Verdict) -> bool {
        matches!(v, Verdict::Allow { .. })
    }

    #[test]
    fn groups_from_the_directory_and_from_claims() {
        let ix = index();
        assert!(allowed(&decide(
            &ix,
            "eng",
            as_user("alice", None),
            facts("GET", None)
        )));
        let bob = decide(&ix, "eng", as_user("bob", None), facts("GET", None));
        assert_eq!(bob, deny("no rule allows this request"));
        let claimed = ["eng".to_owned()];
        let from_idp = Principal::User {
            id: "carol",
            session: None,
            email: None,
            email_verified: false,
            claim_groups: &claimed,
            claims: None,
        };
        assert!(
            allowed(&decide(&ix, "eng", from_idp, facts("GET", None))),
            "unknown to the directory, in eng by claim"
        );
        assert!(matches!(
            decide(&ix, "eng", Principal::Anonymous, facts("GET", None)),
            Verdict::Unauthenticated { .. }
        ));
        assert_eq!(
            decide(&ix, "nope", as_user("alice", None), facts("GET", None)),
            deny("route `nope` has no policy")
        );
    }

    #[test]
    fn standing_comes_before_policy() {
        let ix = index();
        assert_eq!(
            decide(&ix, "eng", as_user("mallory", None), facts("GET", None)),
            deny("the user is suspended")
        );
        let revoked = decide(
            &ix,
            "eng",
            as_user("alice", Some(session("ses_gone", NOW))),
            facts("GET", None),
        );
        assert!(
            matches!(
                revoked,
                Verdict::Unauthenticated {
                    reauthenticate: true,
                    ..
                }
            ),
            "{revoked:?}"
        );
        let mut expired = session("ses_ok", NOW - 100);
        expired.expires_at = NOW;
        assert!(matches!(
            decide(
                &ix,
                "eng",
                as_user("alice", Some(expired)),
                facts("GET", None)
            ),
            Verdict::Unauthenticated {
                reauthenticate: false,
                ..
            }
        ));
        assert_eq!(
            decide(
                &ix,
                "eng",
                as_user("alice", None),
                facts("GET", Some("stolen"))
            ),
            deny("the device is revoked")
        );
    }

    #[test]
    fn auth_age_sends_the_user_back_to_sign_in() {
        let ix = index();
        let recent = decide(
            &ix,
            "fresh",
            as_user("bob", Some(session("ses_a", NOW - 600))),
            facts("GET", None),
        );
        assert!(allowed(&recent), "{recent:?}");
        let stale = decide(
            &ix,
            "fresh",
            as_user("bob", Some(session("ses_a", NOW - 601))),
            facts("GET", None),
        );
        assert!(
            matches!(
                stale,
                Verdict::Unauthenticated {
                    reauthenticate: true,
                    ..
                }
            ),
            "{stale:?}"
        );
    }

    #[test]
    fn posture_counts_while_fresh() {
        let ix = index();
        assert!(allowed(&decide(
            &ix,
            "managed",
            as_user("bob", None),
            facts("GET", Some("laptop"))
        )));
        let mut later = facts("GET", Some("laptop"));
        later.now = NOW + 60;
        assert!(
            !allowed(&decide(&ix, "managed", as_user("bob", None), later)),
            "posture expired"
        );
        assert!(
            !allowed(&decide(
                &ix,
                "managed",
                as_user("bob", None),
                facts("GET", None)
            )),
            "no device"
        );
        assert!(!allowed(&decide(
            &ix,
            "managed",
            as_user("bob", None),
            facts("GET", Some("unknown"))
        )));
    }

    #[test]
    fn grants_deny_rules_and_service_accounts() {
        let ix = index();
        assert!(allowed(&decide(
            &ix,
            "jit",
            as_user("bob", None),
            facts("GET", None)
        )));
        assert!(!allowed(&decide(
            &ix,
            "jit",
            as_user("alice", None),
            facts("GET", None)
        )));
        let mut after = facts("GET", None);
        after.now = NOW + 10;
        assert!(
            !allowed(&decide(&ix, "jit", as_user("bob", None), after)),
            "the window's end is exclusive"
        );

        assert!(allowed(&decide(
            &ix,
            "guarded",
            as_user("bob", None),
            facts("GET", None)
        )));
        let deleted = decide(&ix, "guarded", as_user("bob", None), facts("DELETE", None));
        assert!(
            matches!(&deleted, Verdict::Deny { rule: Some(_), .. }),
            "{deleted:?}"
        );

        let ci = decide(
            &ix,
            "bots",
            Principal::ServiceAccount { id: "ci" },
            facts("GET", None),
        );
        assert!(allowed(&ci), "{ci:?}");
        assert!(!allowed(&decide(
            &ix,
            "bots",
            as_user("alice", None),
            facts("GET", None)
        )));
        assert!(matches!(
            decide(
                &ix,
                "bots",
                Principal::ServiceAccount { id: "old-ci" },
                facts("GET", None)
            ),
            Verdict::Unauthenticated { .. }
        ));
        assert!(matches!(
            decide(
                &ix,
                "bots",
                Principal::ServiceAccount { id: "ghost" },
                facts("GET", None)
            ),
            Verdict::Unauthenticated { .. }
        ));
    }
}
