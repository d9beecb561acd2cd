//! Criterion-by-criterion tests of the compiled evaluator. Every case is also run
//! through the reference interpreter and must agree with it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::amr::Amr;
use crate::ast::Scalar;
use crate::request::*;
use crate::*;

struct Fixture {
    symbols: Symbols,
    library: BTreeMap<String, Document>,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            symbols: Symbols::default(),
            library: BTreeMap::new(),
        }
    }

    fn named(mut self, name: &str, yaml: &str) -> Self {
        self.library.insert(
            name.into(),
            parse_yaml(yaml).expect("library policy parses"),
        );
        self
    }

    /// Compiles `yaml`, evaluates `req`, checks the interpreter agrees, returns allow.
    fn allows(&mut self, yaml: &str, req: &Request<'_>) -> bool {
        let doc = parse_yaml(yaml).unwrap_or_else(|e| panic!("{yaml}\n{e}"));
        let policy = compile(
            &doc,
            CompileEnv {
                symbols: &mut self.symbols,
                directory: None,
                library: Some(&self.library),
                name: None,
            },
        )
        .unwrap_or_else(|e| panic!("{yaml}\n{e}"));
        // Domains are interned by compilation; resolve the request's like a proxy would.
        let mut req = *req;
        if let Some(u) = &mut req.user {
            u.domain = u.email.map_or(Sym::NONE, |e| self.symbols.domain_of(e));
        }
        let req = &req;
        let d = policy.evaluate(req);
        let (allow, rule) = interp::evaluate(&doc, Some(&self.library), &self.symbols, req);
        assert_eq!(
            d.allow, allow,
            "compiled and interpreter disagree on\n{yaml}"
        );
        assert_eq!(
            d.rule
                .and_then(|i| policy.rule(i))
                .map(|r| r.pointer.to_string()),
            rule
        );
        // The serialised form decides the same.
        let back = CompiledPolicy::from_bytes(&policy.to_bytes()).expect("round trip");
        assert_eq!(back.evaluate(req), d);
        assert_eq!(policy.explain(req).allow, d.allow);
        d.allow
    }

    fn group(&mut self, name: &str) -> Sym {
        self.symbols.groups.intern(name)
    }
}

fn allow(crit: &str) -> String {
    format!("allow:\n  and:\n    - {crit}\n")
}

const T0: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z, a Thursday

fn user<'a>(id: &'a str, email: Option<&'a str>, groups: &'a [Sym]) -> User<'a> {
    User {
        id: Id {
            sym: Sym::NONE,
            name: id,
        },
        email,
        email_verified: true,
        domain: Sym::NONE,
        groups,
        claims: None,
    }
}

#[test]
fn constants_and_default_deny() {
    let mut f = Fixture::new();
    let req = Request::anonymous("GET", "/", T0);
    assert!(f.allows(&allow("accept: true"), &req));
    assert!(!f.allows(&allow("reject: true"), &req));
    assert!(
        !f.allows("deny:\n  and:\n    - reject: true\n", &req),
        "no allow rule: default deny"
    );
    assert!(
        !f.allows(
            "allow:\n  and: [accept: true]\ndeny:\n  or: [accept: true]\n",
            &req
        ),
        "deny beats allow"
    );
}

#[test]
fn identity_users_and_service_accounts() {
    let mut f = Fixture::new();
    let alice_sym = f.symbols.users.intern("alice");
    let mut u = user("alice", None, &[]);
    u.id.sym = alice_sym;
    let mut req = Request::anonymous("GET", "/", T0);
    assert!(!f.allows(&allow("authenticated_user: true"), &req));
    assert!(f.allows(&allow("authenticated_user: false"), &req));
    assert!(
        !f.allows(&allow("user: alice"), &req),
        "anonymous never matches a user"
    );
    assert!(
        !f.allows(&allow("user: {not_in: [bob]}"), &req),
        "not_in needs a user"
    );
    req.user = Some(u);
    assert!(f.allows(&allow("authenticated_user: true"), &req));
    assert!(f.allows(&allow("user: alice"), &req));
    assert!(f.allows(&allow("user: {in: [bob, alice]}"), &req));
    assert!(!f.allows(&allow("user: {not_in: [bob, alice]}"), &req));
    assert!(f.allows(&allow("user: {starts_with: al, ends_with: ice}"), &req));
    assert!(f.allows(&allow("user: {matches: 'a.*e'}"), &req));
    assert!(
        !f.allows(&allow("user: {matches: 'lic'}"), &req),
        "matches is anchored"
    );
    assert!(!f.allows(&allow("service_account: true"), &req));

    let sa = f.symbols.service_accounts.intern("ci-bot");
    let req = Request {
        service_account: Some(Id {
            sym: sa,
            name: "ci-bot",
        }),
        ..Request::anonymous("GET", "/", T0)
    };
    assert!(f.allows(&allow("service_account: true"), &req));
    assert!(f.allows(&allow("service_account: ci-bot"), &req));
    assert!(f.allows(&allow("service_account: {starts_with: ci-}"), &req));
    assert!(!f.allows(&allow("service_account: {not_in: [ci-bot]}"), &req));
    assert!(
        !f.allows(&allow("authenticated_user: true"), &req),
        "a service account is not a user"
    );
}

#[test]
fn email_and_domain_fold_case_and_need_verification() {
    let mut f = Fixture::new();
    let mut u = user("u1", Some("José.García@Example.COM"), &[]);
    let req = Request {
        user: Some(u),
        ..Request::anonymous("GET", "/", T0)
    };
    assert!(f.allows(&allow("email: josé.garcía@example.com"), &req));
    assert!(f.allows(
        &allow("email: {in: [a@b.c, JOSÉ.GARCÍA@example.com]}"),
        &req
    ));
    assert!(f.allows(&allow("email: {ends_with: '@EXAMPLE.com'}"), &req));
    assert!(f.allows(&allow("email: {matches: 'josé\\..*@example\\.com'}"), &req));
    assert!(f.allows(&allow("domain: example.com"), &req));
    assert!(!f.allows(&allow("domain: {not_in: [example.com]}"), &req));
    assert!(!f.allows(&allow("domain: ample.com"), &req));
    assert!(f.allows(&allow("domain: {ends_with: .com}"), &req));
    // Internationalised addresses.
    u.email = Some("用户@例子.广告");
    let req = Request {
        user: Some(u),
        ..Request::anonymous("GET", "/", T0)
    };
    assert!(f.allows(&allow("domain: 例子.广告"), &req));
    assert!(f.allows(&allow("email: 用户@例子.广告"), &req));
    // Unverified email: the criteria cannot hold, even negated forms.
    u.email_verified = false;
    let req = Request {
        user: Some(u),
        ..Request::anonymous("GET", "/", T0)
    };
    assert!(!f.allows(&allow("domain: 例子.广告"), &req));
    assert!(!f.allows(&allow("domain: {not_in: [evil.com]}"), &req));
    // A user without email.
    let req = Request {
        user: Some(user("u2", None, &[])),
        ..Request::anonymous("GET", "/", T0)
    };
    assert!(!f.allows(&allow("email: {starts_with: a}"), &req));
}

#[test]
fn groups_has_any_all_and_empty() {
    let mut f = Fixture::new();
    let eng = f.group("eng");
    let ops = f.group("ops");
    let _ = f.group("sales");
    let groups = [eng, ops];
    let req = Request {
        user: Some(user("u", None, &groups)),
        ..Request::anonymous("GET", "/", T0)
    };
    assert!(f.allows(&allow("groups: eng"), &req));
    assert!(f.allows(&allow("groups: {has: ops}"), &req));
    assert!(!f.allows(&allow("groups: {has: sales}"), &req));
    assert!(f.allows(&allow("groups: {any_of: [sales, ops]}"), &req));
    assert!(!f.allows(&allow("groups: {any_of: [sales, brand-new-group]}"), &req));
    assert!(f.allows(&allow("groups: {all_of: [ops, eng]}"), &req));
    assert!(!f.allows(&allow("groups: {all_of: [ops, eng, sales]}"), &req));
    let none: [Sym; 0] = [];
    let req = Request {
        user: Some(user("u", None, &none)),
        ..Request::anonymous("GET", "/", T0)
    };
    assert!(!f.allows(&allow("groups: {any_of: [eng]}"), &req));
    assert!(!f.allows(&allow("groups: {all_of: [eng]}"), &req));
    assert!(f.allows("allow:\n  nor:\n    - groups: eng\n", &req));
    // Far-apart ids still land in one bit set.
    let ids: Vec<Sym> = (0..5000).map(|i| f.group(&format!("g{i}"))).collect();
    let last = [ids[4999]];
    let req = Request {
        user: Some(user("u", None, &last)),
        ..Request::anonymous("GET", "/", T0)
    };
    assert!(f.allows(&allow("groups: {any_of: [g0, g4999]}"), &req));
    assert!(!f.allows(&allow("groups: {any_of: [g0, g4998]}"), &req));
}

#[test]
fn claims_by_path_and_type() {
    let mut f = Fixture::new();
    let claims = serde_json::json!({
        "org": {"team": "core", "level": 7, "admin": false},
        "roles": ["reader", "writer"],
        "https://example.com/roles": ["root"],
    });
    let mut u = user("u", None, &[]);
    u.claims = Some(&claims);
    let req = Request {
        user: Some(u),
        ..Request::anonymous("GET", "/", T0)
    };
    assert!(f.allows(&allow("claim/org.team: core"), &req));
    assert!(f.allows(&allow("claim/org.team: {in: [core, edge]}"), &req));
    assert!(!f.allows(&allow("claim/org.team: {not_in: [core]}"), &req));
    assert!(f.allows(&allow("claim/org.level: {gt: 5, lt: 8}"), &req));
    assert!(f.allows(&allow("claim/org.level: 7"), &req));
    assert!(
        !f.allows(&allow("claim/org.level: '7'"), &req),
        "no string/number coercion"
    );
    assert!(f.allows(&allow("claim/org.admin: false"), &req));
    assert!(f.allows(&allow("claim/roles: {has: writer}"), &req));
    assert!(f.allows(&allow("claim/roles: {any_of: [admin, reader]}"), &req));
    assert!(!f.allows(&allow("claim/roles: {all_of: [admin, reader]}"), &req));
    assert!(f.allows(
        &allow("claim/org.team: {starts_with: co, matches: 'c.re'}"),
        &req
    ));
    assert!(f.allows(
        &allow("'claim': {path: ['https://example.com/roles'], has: root}"),
        &req
    ));
    // Missing claims and wrong types are simply false, including not_in.
    assert!(!f.allows(&allow("claim/org.missing: {not_in: [x]}"), &req));
    assert!(
        !f.allows(&allow("claim/roles: reader"), &req),
        "an array is not a scalar"
    );
    assert!(!f.allows(&allow("claim/org: {has: x}"), &req));
    assert!(!f.allows(&allow("claim/org.team.deeper: x"), &req));
}

#[test]
fn device_approval_and_posture_freshness() {
    let mut f = Fixture::new();
    let managed = f.symbols.attributes.intern("managed");
    let os = f.symbols.attributes.intern("os");
    let ver = f.symbols.attributes.intern("os_version");
    let dev_sym = f.symbols.devices.intern("laptop-1");
    let mut attributes = vec![
        (managed, Scalar::Bool(true)),
        (os, Scalar::Str("macos".into())),
        (ver, Scalar::Num(14.2)),
    ];
    attributes.sort_by_key(|(s, _)| *s);
    let posture = Posture {
        expires_at: Some(T0 + 60),
        attributes,
    };
    let device = Device {
        id: Id {
            sym: dev_sym,
            name: "laptop-1",
        },
        approved: true,
        posture: &posture,
    };
    let req = Request {
        device: Some(device),
        ..Request::anonymous("GET", "/", T0)
    };
    assert!(f.allows(&allow("device: true"), &req));
    assert!(f.allows(&allow("device/approved: true"), &req));
    assert!(f.allows(&allow("device/id: laptop-1"), &req));
    assert!(!f.allows(&allow("device/id: {not_in: [laptop-1]}"), &req));
    assert!(f.allows(&allow("device/posture_fresh: true"), &req));
    assert!(f.allows(&allow("device/managed: true"), &req));
    assert!(f.allows(&allow("device/os: {in: [macos, linux]}"), &req));
    assert!(f.allows(&allow("device/os_version: {gt: 14}"), &req));
    assert!(
        !f.allows(&allow("device/disk_encrypted: true"), &req),
        "unknown attribute is false"
    );
    // Stale posture counts as not compliant.
    let stale = Request {
        now: T0 + 60,
        ..req
    };
    assert!(!f.allows(&allow("device/managed: true"), &stale));
    assert!(!f.allows(&allow("device/os: {not_in: [windows]}"), &stale));
    assert!(f.allows(&allow("device/posture_fresh: false"), &stale));
    assert!(
        f.allows(&allow("device/approved: true"), &stale),
        "approval does not expire with posture"
    );
    // No device: every device criterion except `device: false` is false.
    let none = Request::anonymous("GET", "/", T0);
    assert!(f.allows(&allow("device: false"), &none));
    assert!(!f.allows(&allow("device/approved: false"), &none));
    assert!(!f.allows(&allow("device/posture_fresh: false"), &none));
    let unapproved = Device {
        approved: false,
        ..device
    };
    let req = Request {
        device: Some(unapproved),
        ..Request::anonymous("GET", "/", T0)
    };
    assert!(!f.allows(&allow("device/approved: true"), &req));
}

#[test]
fn client_certificates() {
    let mut f = Fixture::new();
    let fp = [0xabu8; 32];
    let hex = "ab".repeat(32);
    let colons = vec!["AB"; 32].join(":");
    let cert = ClientCertificate {
        spki_sha256: fp,
        issuer: "CN=Vigil Device CA,O=Example",
    };
    let req = Request {
        client_certificate: Some(cert),
        ..Request::anonymous("GET", "/", T0)
    };
    assert!(f.allows(&allow("client_certificate: true"), &req));
    assert!(f.allows(
        &allow(&format!("client_certificate/fingerprint: {hex}")),
        &req
    ));
    assert!(f.allows(
        &allow(&format!(
            "client_certificate/fingerprint: {{in: ['{colons}']}}"
        )),
        &req
    ));
    assert!(!f.allows(
        &allow(&format!(
            "client_certificate/fingerprint: {{not_in: [{hex}]}}"
        )),
        &req
    ));
    assert!(f.allows(
        &allow("client_certificate/issuer: {starts_with: 'CN=Vigil Device CA'}"),
        &req
    ));
    let none = Request::anonymous("GET", "/", T0);
    assert!(!f.allows(
        &allow(&format!(
            "client_certificate/fingerprint: {{not_in: [{hex}]}}"
        )),
        &none
    ));
    assert!(f.allows(&allow("client_certificate: false"), &none));
}

#[test]
fn http_method_path_and_headers() {
    let mut f = Fixture::new();
    let headers = &HeaderList(&[("X-Team", "core"), ("x-dup", "a"), ("X-Dup", "b")]);
    let req = Request {
        headers,
        ..Request::anonymous("get", "/api/v1/items", T0)
    };
    // Methods compare without regard to case, so `delete` cannot dodge a deny on DELETE.
    assert!(f.allows(&allow("http_method: GET"), &req));
    assert!(f.allows(&allow("http_method: {in: [post, Get]}"), &req));
    let del = Request {
        headers,
        ..Request::anonymous("delete", "/", T0)
    };
    assert!(!f.allows(
        "allow:\n  and: [accept: true]\ndeny:\n  or: [http_method: DELETE]\n",
        &del
    ));
    assert!(f.allows(&allow("http_path: {starts_with: /api/}"), &req));
    assert!(f.allows(&allow("http_path: /api/v1/items"), &req));
    assert!(
        !f.allows(&allow("http_path: /API/v1/items"), &req),
        "paths are case-sensitive"
    );
    assert!(f.allows(
        &allow("http_path: {matches: '/api/v[0-9]+/.*', ends_with: items}"),
        &req
    ));
    assert!(f.allows(&allow("http_path: {not_in: [/admin]}"), &req));
    assert!(f.allows(&allow("header/x-team: core"), &req));
    assert!(f.allows(&allow("header/X-TEAM: {in: [core]}"), &req));
    assert!(f.allows(&allow("header/x-team: true"), &req));
    assert!(f.allows(&allow("header/x-absent: false"), &req));
    assert!(!f.allows(&allow("header/x-absent: {not_in: [x]}"), &req));
    // A repeated header is ambiguous: never enough to allow, always enough to deny.
    assert!(!f.allows(&allow("header/x-dup: a"), &req));
    assert!(!f.allows(&allow("header/x-dup: {not_in: [zzz]}"), &req));
    assert!(!f.allows("allow:\n  not:\n    - header/x-dup: a\n", &req));
    assert!(
        f.allows(&allow("header/x-dup: true"), &req),
        "presence itself is certain"
    );
    let deny_prod = "allow:\n  and: [accept: true]\ndeny:\n  or:\n    - header/x-dup: prod\n";
    assert!(
        !f.allows(deny_prod, &req),
        "sending the header twice cannot dodge a deny"
    );
    let deny_not_core = "allow:\n  and: [accept: true]\ndeny:\n  nor:\n    - header/x-dup: core\n";
    assert!(!f.allows(deny_not_core, &req));
    assert!(f.allows(
        "allow:\n  and: [accept: true]\ndeny:\n  or:\n    - header/x-team: prod\n",
        &req
    ));
}

#[test]
fn source_ip_v4_v6_and_mapped() {
    let mut f = Fixture::new();
    let at = |ip: &str| Request {
        source_ip: Some(ip.parse::<IpAddr>().unwrap()),
        ..Request::anonymous("GET", "/", T0)
    };
    let p = allow(
        "source_ip: {in: [10.0.0.0/8, 192.168.1.7, '2001:db8::/32', '::ffff:172.16.0.0/108']}",
    );
    assert!(f.allows(&p, &at("10.255.255.255")));
    assert!(!f.allows(&p, &at("11.0.0.0")));
    assert!(f.allows(&p, &at("192.168.1.7")));
    assert!(!f.allows(&p, &at("192.168.1.8")));
    assert!(f.allows(&p, &at("2001:db8:ffff::1")));
    assert!(!f.allows(&p, &at("2001:db9::1")));
    assert!(
        f.allows(&p, &at("::ffff:10.1.2.3")),
        "IPv4-mapped IPv6 is treated as IPv4"
    );
    assert!(
        f.allows(&p, &at("172.16.3.4")),
        "mapped network written in IPv6 form"
    );
    assert!(!f.allows(&p, &at("172.32.0.1")));
    assert!(f.allows(&allow("source_ip: {not_in: ['::/0']}"), &at("1.2.3.4")));
    assert!(f.allows(&allow("source_ip: 0.0.0.0/0"), &at("255.255.255.255")));
    assert!(f.allows(
        &allow("source_ip: '::/0'"),
        &at("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")
    ));
    assert!(!f.allows(
        &allow("source_ip: {not_in: [10.0.0.0/8]}"),
        &Request::anonymous("GET", "/", T0)
    ));
}

#[test]
fn time_windows_across_dst() {
    let mut f = Fixture::new();
    let at = |now| Request::anonymous("GET", "/", now);
    let p = allow("time_of_day: {tz: Europe/Paris, after: '09:00', before: '17:30'}");
    // 2026-03-29: Paris switches to CEST (UTC+2) at 01:00 UTC.
    let before_switch = 1_774_688_400; // 2026-03-28T09:00:00Z = 10:00 CET
    assert!(f.allows(&p, &at(before_switch)));
    let after_switch = 1_774_854_000; // 2026-03-30T07:00:00Z = 09:00 CEST
    assert!(f.allows(&p, &at(after_switch)));
    assert!(!f.allows(&p, &at(after_switch - 1)), "08:59:59 local");
    assert!(
        f.allows(&p, &at(1_774_881_000)),
        "2026-03-30T14:30:00Z = 16:30 CEST is inside"
    );
    let p = allow("time_of_day: {tz: Europe/Paris, after: '09:00', before: '16:30'}");
    assert!(!f.allows(&p, &at(1_774_881_000)), "before is exclusive");
    assert!(f.allows(&p, &at(1_774_881_000 - 1)));
    // A window that wraps midnight.
    let night = allow("time_of_day: {tz: UTC, after: '22:00', before: '06:00'}");
    assert!(f.allows(&night, &at(T0 + 23 * 3600)));
    assert!(f.allows(&night, &at(T0 + 5 * 3600)));
    assert!(!f.allows(&night, &at(T0 + 12 * 3600)));
    // Only an end.
    assert!(f.allows(&allow("time_of_day: {before: '01:00'}"), &at(T0)));
    // The local date differs from UTC: 2026-01-01T23:30Z is Friday in Tokyo.
    let fri = allow("weekday: {tz: Asia/Tokyo, is: fri}");
    assert!(f.allows(&fri, &at(T0 + 23 * 3600 + 1800)));
    assert!(f.allows(&allow("weekday: thu"), &at(T0)));
    assert!(f.allows(&allow("weekday: {in: [Monday, thursday]}"), &at(T0)));
    assert!(!f.allows(&allow("weekday: {not_in: [thu]}"), &at(T0)));
    // Before the Unix epoch too.
    assert!(f.allows(&allow("weekday: wed"), &at(-86_400)));
}

#[test]
fn dates_inclusive_start_exclusive_end() {
    let mut f = Fixture::new();
    let at = |now| Request::anonymous("GET", "/", now);
    let p = allow("date: {after: '2026-01-01', before: '2026-01-02T00:00:00Z'}");
    assert!(f.allows(&p, &at(T0)));
    assert!(!f.allows(&p, &at(T0 - 1)));
    assert!(!f.allows(&p, &at(T0 + 86_400)));
    // A date in a zone is local midnight there.
    let p = allow("date: {tz: America/New_York, after: '2026-01-01'}");
    assert!(!f.allows(&p, &at(T0)), "still 2025 in New York");
    assert!(f.allows(&p, &at(T0 + 5 * 3600)));
}

#[test]
fn session_auth_age_mfa_and_grants() {
    let mut f = Fixture::new();
    let mut req = Request::anonymous("GET", "/", T0);
    assert!(
        !f.allows(&allow("auth_age: {lt: 15m}"), &req),
        "no auth time"
    );
    req.session.auth_time = Some(T0 - 600);
    assert!(f.allows(&allow("auth_age: {lt: 15m}"), &req));
    assert!(!f.allows(&allow("auth_age: {lt: 600}"), &req));
    assert!(f.allows(&allow("auth_age: {gt: 599, lt: 1h}"), &req));
    req.session.amr = Amr::from_values(["pwd"]);
    assert!(!f.allows(&allow("mfa: true"), &req));
    assert!(f.allows(&allow("mfa: false"), &req));
    assert!(f.allows(&allow("mfa: pwd"), &req));
    req.session.amr = Amr::from_values(["pwd", "hwk"]);
    assert!(f.allows(&allow("mfa: true"), &req));
    assert!(f.allows(&allow("mfa: {any_of: [otp, hwk]}"), &req));
    assert!(!f.allows(&allow("mfa: {all_of: [otp, hwk]}"), &req));
    let grants = [GrantWindow {
        start: T0 - 10,
        end: T0 + 10,
    }];
    req.grants = &grants;
    assert!(f.allows(&allow("grant: true"), &req));
    assert!(
        !f.allows(
            &allow("grant: true"),
            &Request {
                now: T0 + 10,
                ..req
            }
        ),
        "end is exclusive"
    );
    assert!(
        !f.allows(
            &allow("grant: true"),
            &Request {
                now: T0 - 11,
                ..req
            }
        ),
        "not yet started"
    );
}

#[test]
fn blocks_and_named_policies() {
    let mut f = Fixture::new()
        .named(
            "staff",
            "allow:\n  or:\n    - domain: corp.example\ndeny:\n  or:\n    - groups: contractors\n",
        )
        .named(
            "admins",
            "allow:\n  and:\n    - policy: staff\n    - groups: admins\n",
        );
    let admins = f.group("admins");
    let contractors = f.group("contractors");
    let g_admin = [admins];
    let g_both = [admins, contractors];
    let staff = Request {
        user: Some(user("a", Some("a@corp.example"), &g_admin)),
        ..Request::anonymous("GET", "/", T0)
    };
    let contractor = Request {
        user: Some(user("b", Some("b@corp.example"), &g_both)),
        ..Request::anonymous("GET", "/", T0)
    };
    assert!(f.allows(&allow("policy: staff"), &staff));
    assert!(
        !f.allows(&allow("policy: staff"), &contractor),
        "the named policy's deny applies"
    );
    assert!(f.allows(&allow("policy: admins"), &staff));
    assert!(!f.allows(&allow("policy: admins"), &contractor));
    assert!(f.allows("allow:\n  not:\n    - policy: staff\n", &contractor));
    // A policy cannot refer to itself, directly or through others.
    let doc = parse_yaml("allow:\n  and:\n    - policy: loop\n").unwrap();
    let f2 = Fixture::new().named("loop", "allow:\n  and:\n    - policy: outer\n");
    let e = compile(
        &doc,
        CompileEnv {
            symbols: &mut Symbols::default(),
            directory: None,
            library: Some(&f2.library),
            name: Some("outer"),
        },
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("refers to itself (outer → loop → outer)"),
        "{e}"
    );
    // The loop closes inside `loop`; the problem still points into the compiled document,
    // at the reference that leads there, and names where inside `loop` it closed.
    assert_eq!(e.problems().len(), 1, "{e}");
    assert_eq!(e.problems()[0].pointer, "/allow/and/0/policy", "{e}");
    assert!(
        e.problems()[0]
            .message
            .starts_with("in `loop#/allow/and/0/policy`: "),
        "{e}"
    );
    // not = not(and), nor = not(or); several keys in one block all must hold.
    let p = "allow:\n  or: [domain: corp.example]\n  nor: [groups: contractors]\n";
    assert!(f.allows(p, &staff));
    assert!(!f.allows(p, &contractor));
    let p = "allow:\n  not:\n    - groups: admins\n    - groups: contractors\n";
    assert!(f.allows(p, &staff));
    assert!(!f.allows(p, &contractor));
    // A list of rules.
    let p = "- deny: {or: [groups: contractors]}\n- allow: {or: [groups: admins]}\n";
    assert!(f.allows(p, &staff));
    assert!(!f.allows(p, &contractor));
}

#[test]
fn decision_names_the_rule_and_explain_shows_the_tree() {
    let mut symbols = Symbols::default();
    let doc = parse_yaml(
        "allow:\n  and:\n    - http_method: GET\n    - domain: corp.example\ndeny:\n  or:\n    - http_path: {starts_with: /admin}\n",
    )
    .unwrap();
    let p = compile_standalone(&doc, &mut symbols).unwrap();
    let mut u = user("a", Some("a@corp.example"), &[]);
    u.domain = symbols.domain_of("a@corp.example");
    let ok = Request {
        user: Some(u),
        ..Request::anonymous("GET", "/x", T0)
    };
    let d = p.evaluate(&ok);
    assert!(d.allow);
    assert_eq!(&*p.rule(d.rule.unwrap()).unwrap().pointer, "/allow");
    let admin = Request {
        path: "/admin/users",
        ..ok
    };
    let d = p.evaluate(&admin);
    assert!(!d.allow);
    assert_eq!(&*p.rule(d.rule.unwrap()).unwrap().pointer, "/deny");
    let anon = Request::anonymous("GET", "/x", T0);
    assert_eq!(p.evaluate(&anon), Decision::DEFAULT_DENY);
    let e = p.explain(&anon);
    assert!(!e.allow);
    assert_eq!(e.decided_by, None);
    let json = serde_json::to_value(&e).unwrap();
    let allow_rule = &json["rules"][1];
    assert_eq!(allow_rule["pointer"], "/allow");
    assert_eq!(allow_rule["condition"]["kind"], "and");
    let crit = &allow_rule["condition"]["children"];
    assert_eq!(crit[0]["pointer"], "/allow/and/0/http_method");
    assert_eq!(crit[0]["matched"], true);
    assert_eq!(crit[1]["pointer"], "/allow/and/1/domain");
    assert_eq!(crit[1]["matched"], false);
    assert_eq!(crit[1]["note"], "no user");
}

#[test]
fn corrupt_compiled_programs_are_refused() {
    let mut symbols = Symbols::default();
    let doc =
        parse_yaml("allow:\n  and:\n    - http_method: GET\n    - groups: {any_of: [a, b]}\n")
            .unwrap();
    let p = compile_standalone(&doc, &mut symbols).unwrap();
    let bytes = p.to_bytes();
    assert!(CompiledPolicy::from_bytes(&bytes).is_ok());
    assert!(CompiledPolicy::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    assert!(CompiledPolicy::from_bytes(b"").is_err());
    // A child that points forward (a cycle) is refused.
    let mut program = p.program.clone();
    if let Some(crate::compiled::Node::All { first, .. }) = program.nodes.last().copied() {
        program.edges[first as usize] = (program.nodes.len() - 1) as u32;
    }
    assert!(CompiledPolicy::from_program(program).is_err());
    // Every truncation and single-byte corruption is handled without panicking.
    for i in 0..bytes.len() {
        let _ = CompiledPolicy::from_bytes(&bytes[..i]);
        let mut b = bytes.clone();
        b[i] ^= 0xff;
        if let Ok(p) = CompiledPolicy::from_bytes(&b) {
            let _ = p.evaluate(&Request::anonymous("GET", "/", T0));
        }
    }
}

#[test]
fn domains_resolve_through_the_symbol_table() {
    let mut symbols = Symbols::default();
    let doc =
        parse_yaml("allow:\n  and:\n    - domain: {in: [Corp.Example, other.org]}\n").unwrap();
    let p = compile_standalone(&doc, &mut symbols).unwrap();
    assert_eq!(
        symbols.domain_of("x@CORP.example"),
        symbols.domains.get("corp.example").unwrap()
    );
    assert_eq!(symbols.domain_of("x@nowhere.net"), Sym::NONE);
    assert_eq!(symbols.domain_of("no-at-sign"), Sym::NONE);
    let mut u = user("a", Some("a@CORP.EXAMPLE"), &[]);
    u.domain = symbols.domain_of("a@CORP.EXAMPLE");
    assert!(
        p.evaluate(&Request {
            user: Some(u),
            ..Request::anonymous("GET", "/", T0)
        })
        .allow
    );
    u.email_verified = false;
    assert!(
        !p.evaluate(&Request {
            user: Some(u),
            ..Request::anonymous("GET", "/", T0)
        })
        .allow
    );
}

#[test]
fn loaded_programs_are_held_to_the_parser_rules() {
    let mut symbols = Symbols::default();
    let doc = parse_yaml("allow:\n  and:\n    - http_path: {matches: '/api/.*'}\n    - time_of_day: {after: '09:00', before: '17:00'}\n").unwrap();
    let p = compile_standalone(&doc, &mut symbols).unwrap();
    // A stored pattern that would escape its anchors is refused on load.
    let mut program = p.program.clone();
    program.patterns[0].0 = "/api/.*)|(?:/admin".into();
    assert!(CompiledPolicy::from_program(program).is_err());
    // So is an empty (always-true when wrapped) time window.
    let mut program = p.program.clone();
    for c in &mut program.checks {
        if let crate::compiled::Check::TimeOfDay { after, before, .. } = c {
            *after = *before;
        }
    }
    assert!(CompiledPolicy::from_program(program).is_err());
    // Explain reports a deny that fires on ambiguous input as matched.
    let doc = parse_yaml("allow:\n  and: [accept: true]\ndeny:\n  or:\n    - header/x-env: prod\n")
        .unwrap();
    let p = compile_standalone(&doc, &mut symbols).unwrap();
    let headers = HeaderList(&[("x-env", "dev"), ("x-env", "prod")]);
    let req = Request {
        headers: &headers,
        ..Request::anonymous("GET", "/", T0)
    };
    let e = p.explain(&req);
    assert!(!e.allow);
    assert_eq!(e.decided_by.as_deref(), Some("/deny"));
    assert!(e.rules[0].matched);
    assert!(e.rules[0].condition.unknown);
}

/// Policies of a snapshot, each compiled against its own table for the relink tests.
const RELINK_POLICIES: &[&str] = &[
    "allow:\n  or:\n    - user: {in: [carol, alice]}\n    - groups: {all_of: [ops, eng]}\ndeny:\n  or:\n    - groups: contractors\n    - user: mallory\n",
    "allow:\n  and:\n    - domain: {in: [Other.Org, corp.example]}\n    - groups: {any_of: [g-far, admins, eng]}\n",
    "- deny:\n    and:\n      - user: {not_in: [alice, bob]}\n      - groups: {has: admins}\n- allow:\n    or:\n      - service_account: {in: [svc-b, svc-a]}\n      - groups: {all_of: [admins]}\n",
    "allow:\n  and:\n    - device/id: {in: [d2, d1]}\n    - device/managed: true\n    - device/os: {in: [linux, macos]}\ndeny:\n  or:\n    - device/disk_encrypted: false\n    - device/id: d3\n",
    "allow:\n  and:\n    - policy: base\n    - service_account: {not_in: [svc-a]}\n    - domain: {not_in: [evil.example]}\n",
    "allow:\n  or:\n    - groups: {any_of: [eng, ops, sales]}\n    - device/os_version: {gt: 13}\n    - user: bob\n",
];

fn relink_library() -> BTreeMap<String, Document> {
    let mut lib = BTreeMap::new();
    lib.insert(
        "base".to_owned(),
        parse_yaml("allow:\n  or:\n    - groups: sales\n    - device/managed: true\ndeny:\n  or:\n    - groups: contractors\n")
            .unwrap(),
    );
    lib
}

fn compile_with(
    yaml: &str,
    symbols: &mut Symbols,
    lib: &BTreeMap<String, Document>,
) -> CompiledPolicy {
    let doc = parse_yaml(yaml).unwrap_or_else(|e| panic!("{yaml}\n{e}"));
    compile(
        &doc,
        CompileEnv {
            symbols,
            directory: None,
            library: Some(lib),
            name: None,
        },
    )
    .unwrap_or_else(|e| panic!("{yaml}\n{e}"))
}

/// A proxy's table: other names first, and the policies' names in another order, so
/// that no id means the same thing as in a policy's own table (groups pass 64, so the
/// `any_of` bit sets move to another base).
fn shared_symbols() -> Symbols {
    let mut s = Symbols::default();
    for i in 0..100 {
        s.groups.intern(&format!("filler-{i}"));
    }
    for g in ["sales", "eng", "unused", "admins", "ops"] {
        s.groups.intern(g);
    }
    for u in ["zed", "bob", "carol", "alice"] {
        s.users.intern(u);
    }
    for a in ["serial", "os_version", "os", "managed"] {
        s.attributes.intern(a);
    }
    for d in ["d9", "d2"] {
        s.devices.intern(d);
    }
    for sa in ["svc-z", "svc-b"] {
        s.service_accounts.intern(sa);
    }
    for d in ["elsewhere.net", "other.org"] {
        s.domains.intern(d);
    }
    s
}

#[test]
fn relinked_policies_decide_like_policies_compiled_against_the_shared_table() {
    let lib = relink_library();
    let mut shared = shared_symbols();
    let relinked: Vec<CompiledPolicy> = RELINK_POLICIES
        .iter()
        .map(|yaml| {
            let mut own = Symbols::default();
            let p = compile_with(yaml, &mut own, &lib);
            p.relink(&own, &mut shared).expect("relinks")
        })
        .collect();
    // Relinking interned every name: compiling directly adds nothing and yields the
    // very same program.
    let before = shared.clone();
    let direct: Vec<CompiledPolicy> = RELINK_POLICIES
        .iter()
        .map(|yaml| compile_with(yaml, &mut shared, &lib))
        .collect();
    assert_eq!(
        shared, before,
        "relink interned every name the policies use"
    );
    for ((yaml, r), d) in RELINK_POLICIES.iter().zip(&relinked).zip(&direct) {
        assert_eq!(r.program, d.program, "{yaml}");
        // Relinking into the table a policy was compiled against changes nothing.
        let again = r.relink(&shared, &mut shared.clone()).unwrap();
        assert_eq!(again.program, r.program, "{yaml}");
    }

    // Requests with ids from the shared table (names no policy uses stay NONE).
    let g = |names: &[&str]| -> Vec<Sym> {
        names
            .iter()
            .map(|n| shared.groups.get(n).unwrap_or(Sym::NONE))
            .collect()
    };
    let group_sets = [
        g(&[]),
        g(&["eng"]),
        g(&["ops", "eng"]),
        g(&["admins"]),
        g(&["admins", "contractors"]),
        g(&["g-far"]),
        g(&["sales", "filler-3"]),
        g(&["nobody"]),
    ];
    let users = ["alice", "bob", "carol", "mallory", "zed", "stranger"];
    let emails = [
        None,
        Some("a@corp.example"),
        Some("b@OTHER.org"),
        Some("c@evil.example"),
    ];
    let attr = |n: &str| shared.attributes.get(n).unwrap();
    let postures: Vec<Posture> = vec![
        Posture::default(),
        Posture {
            expires_at: None,
            attributes: {
                let mut v = vec![
                    (attr("managed"), Scalar::Bool(true)),
                    (attr("os"), Scalar::Str("linux".into())),
                    (attr("disk_encrypted"), Scalar::Bool(true)),
                ];
                v.sort_by_key(|(s, _)| *s);
                v
            },
        },
        Posture {
            expires_at: None,
            attributes: {
                let mut v = vec![
                    (attr("managed"), Scalar::Bool(true)),
                    (attr("os"), Scalar::Str("macos".into())),
                    (attr("disk_encrypted"), Scalar::Bool(false)),
                    (attr("os_version"), Scalar::Num(14.0)),
                ];
                v.sort_by_key(|(s, _)| *s);
                v
            },
        },
    ];
    let id = |table: &Interner, name: &'static str| Id {
        sym: table.get(name).unwrap_or(Sym::NONE),
        name,
    };
    let mut principals: Vec<Request<'_>> = Vec::new();
    for u in users {
        for gs in &group_sets {
            for e in emails {
                let mut usr = user(u, e, gs);
                usr.id = id(&shared.users, u);
                usr.domain = e.map_or(Sym::NONE, |e| shared.domain_of(e));
                principals.push(Request {
                    user: Some(usr),
                    ..Request::anonymous("GET", "/", T0)
                });
            }
        }
    }
    for sa in ["svc-a", "svc-b", "svc-z"] {
        principals.push(Request {
            service_account: Some(id(&shared.service_accounts, sa)),
            ..Request::anonymous("GET", "/", T0)
        });
    }
    let mut requests = Vec::new();
    for base in &principals {
        requests.push(*base);
        for dev in ["d1", "d2", "d3"] {
            for posture in &postures {
                requests.push(Request {
                    device: Some(Device {
                        id: id(&shared.devices, dev),
                        approved: true,
                        posture,
                    }),
                    ..*base
                });
            }
        }
    }

    let docs: Vec<Document> = RELINK_POLICIES
        .iter()
        .map(|y| parse_yaml(y).unwrap())
        .collect();
    let mut allowed = 0;
    let mut by_deny = 0;
    for req in &requests {
        for ((r, d), doc) in relinked.iter().zip(&direct).zip(&docs) {
            let decision = r.evaluate(req);
            assert_eq!(decision, d.evaluate(req));
            // And both agree with the reference interpreter over the shared table.
            let (allow, rule) = interp::evaluate(doc, Some(&lib), &shared, req);
            assert_eq!(decision.allow, allow);
            assert_eq!(
                decision
                    .rule
                    .and_then(|i| r.rule(i))
                    .map(|x| x.pointer.to_string()),
                rule
            );
            assert_eq!(r.explain(req).allow, decision.allow);
            allowed += usize::from(decision.allow);
            by_deny += usize::from(!decision.allow && decision.rule.is_some());
        }
    }
    // The requests exercise allows, denies by a rule and default denies alike.
    let total = requests.len() * RELINK_POLICIES.len();
    assert!(allowed > 0 && by_deny > 0 && allowed + by_deny < total);
}

#[test]
fn relink_refuses_ids_missing_from_the_source_table() {
    let lib = relink_library();
    for yaml in RELINK_POLICIES {
        let mut own = Symbols::default();
        let p = compile_with(yaml, &mut own, &lib);
        let to = shared_symbols();
        // An empty source table holds none of the policy's ids.
        let mut target = to.clone();
        assert!(matches!(
            p.relink(&Symbols::default(), &mut target),
            Err(LoadError::Invalid(_))
        ));
        assert_eq!(target, to, "a failed relink interns nothing");
        // Nor does one that misses only the last name of a namespace.
        for ns in 0..6 {
            let mut partial = Symbols::default();
            let mut dropped = false;
            for (i, (src, dst)) in [
                (&own.users, &mut partial.users),
                (&own.groups, &mut partial.groups),
                (&own.service_accounts, &mut partial.service_accounts),
                (&own.devices, &mut partial.devices),
                (&own.attributes, &mut partial.attributes),
                (&own.domains, &mut partial.domains),
            ]
            .into_iter()
            .enumerate()
            {
                let keep = if i == ns && !src.is_empty() {
                    dropped = true;
                    src.len() - 1
                } else {
                    src.len()
                };
                for j in 0..keep {
                    dst.intern(src.name(Sym(j as u32)).unwrap());
                }
            }
            let mut target = to.clone();
            let r = p.relink(&partial, &mut target);
            assert_eq!(
                r.is_err(),
                dropped,
                "{yaml} without the last of namespace {ns}"
            );
            if dropped {
                assert_eq!(target, to);
            }
        }
    }

    // Hand-made programs with ids no table holds are refused, never a panic.
    use crate::compiled::{BitSet, Check, SymField};
    let mut own = Symbols::default();
    let p = compile_with("allow:\n  and:\n    - http_method: GET\n", &mut own, &lib);
    own.users.intern("u");
    own.groups.intern("g");
    own.attributes.intern("a");
    for check in [
        Check::Sym {
            field: SymField::User,
            set: Box::new([0, 7]),
            negate: false,
        },
        Check::Sym {
            field: SymField::Domain,
            set: Box::new([0]),
            negate: true,
        },
        Check::GroupHas(u32::MAX),
        Check::GroupAny(BitSet::from_ids(&[0, 1000])),
        Check::GroupAll(Box::new([3, 0])),
        Check::Posture {
            attr: 1,
            test: crate::compiled::ValueTest::Is(Scalar::Bool(true)),
        },
    ] {
        let mut program = p.program.clone();
        program.checks[0] = check.clone();
        let bad = CompiledPolicy::from_program(program).expect("a loadable program");
        let mut to = shared_symbols();
        let err = bad.relink(&own, &mut to).expect_err("missing id");
        assert!(matches!(err, LoadError::Invalid(_)), "{check:?}: {err}");
        assert!(err.to_string().contains("not in the policy's symbol table"));
        assert_eq!(to, shared_symbols());
    }
}
