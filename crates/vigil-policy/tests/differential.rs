//! Differential property test: for random policies and random request contexts the
//! compiled evaluator (and its serialised form) agrees with the plain recursive
//! interpreter of the parsed document on every case.

#![allow(clippy::unwrap_used, clippy::type_complexity)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use proptest::prelude::*;
use serde_json::{json, Value};
use vigil_policy::ast::Scalar;
use vigil_policy::*;

const GROUPS: &[&str] = &["eng", "ops", "sales", "admins", "contractors", "g5"];
const USERS: &[&str] = &["alice", "bob", "carol", "svc"];
const EMAILS: &[&str] = &[
    "alice@corp.example",
    "Bob@Corp.Example",
    "carol@other.org",
    "josé@exämple.de",
    "x@sub.corp.example",
    "no-at-sign",
];
const DOMAINS: &[&str] = &[
    "corp.example",
    "CORP.example",
    "other.org",
    "exämple.de",
    "sub.corp.example",
];
const METHODS: &[&str] = &["GET", "get", "POST", "DELETE", "delete", "PUT"];
const PATHS: &[&str] = &[
    "/",
    "/api",
    "/api/v1/items",
    "/admin",
    "/administrator",
    "/Admin/x",
];
const NETS: &[&str] = &[
    "10.0.0.0/8",
    "10.1.0.0/16",
    "192.168.1.7",
    "2001:db8::/32",
    "::ffff:172.16.0.0/108",
    "0.0.0.0/0",
    "::/0",
    "172.16.5.0/24",
];
const IPS: &[&str] = &[
    "10.1.2.3",
    "10.200.0.1",
    "192.168.1.7",
    "2001:db8::5",
    "2001:db9::1",
    "172.16.5.9",
    "::ffff:10.1.2.3",
    "8.8.8.8",
];
const ZONES: &[&str] = &[
    "UTC",
    "Europe/Paris",
    "America/New_York",
    "Asia/Kolkata",
    "Australia/Lord_Howe",
];
const CLOCKS: &[&str] = &[
    "00:00", "06:30", "09:00", "12:00", "17:30", "22:00", "23:59:59",
];
/// Ascending in every zone used, so any later entry can close a range opened by an earlier one.
const DATES: &[&str] = &[
    "2026-01-01T12:00:00+05:30",
    "2026-03-29",
    "2026-03-30T01:00:00Z",
    "2026-10-25",
];
const DAYS: &[&str] = &["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const AMRS: &[&str] = &["pwd", "otp", "hwk", "mfa", "sms", "fpt"];
const ATTRS: &[&str] = &["managed", "disk_encrypted", "os", "os_version"];
const HEADERS: &[&str] = &["x-team", "x-env"];
const HVALUES: &[&str] = &["core", "edge", "prod", "Core"];
const FPS: [&str; 2] = ["aa", "bb"];
const CLAIM_PATHS: &[&str] = &["team", "org.level", "roles", "org.admin", "missing"];
const SCALARS: &[&str] = &[
    "\"core\"",
    "\"reader\"",
    "\"admin\"",
    "3",
    "7",
    "7.5",
    "true",
    "false",
];

fn pick(list: &'static [&'static str]) -> impl Strategy<Value = &'static str> {
    prop::sample::select(list)
}

fn picks(list: &'static [&'static str]) -> impl Strategy<Value = Vec<&'static str>> {
    prop::sample::subsequence(list, 1..=list.len().min(3))
}

fn scalar() -> impl Strategy<Value = Value> {
    pick(SCALARS).prop_map(|s| serde_json::from_str(s).unwrap())
}

fn fingerprint(c: &str) -> String {
    c.repeat(32)
}

fn str_ops(values: &'static [&'static str], extra: bool) -> BoxedStrategy<Value> {
    let base = prop_oneof![
        pick(values).prop_map(|v| json!(v)),
        pick(values).prop_map(|v| json!({"is": v})),
        picks(values).prop_map(|v| json!({"in": v})),
        picks(values).prop_map(|v| json!({"not_in": v})),
    ];
    if !extra {
        return base.boxed();
    }
    prop_oneof![
        4 => base,
        1 => pick(values).prop_map(|v| json!({"starts_with": v.chars().take(3).collect::<String>()})),
        1 => pick(values).prop_map(|v| {
            let n = v.chars().count();
            json!({"ends_with": v.chars().skip(n.saturating_sub(4)).collect::<String>()})
        }),
        1 => pick(values).prop_map(|v| json!({"matches": format!("{}.*", regex::escape(&v.chars().take(2).collect::<String>()))})),
    ]
    .boxed()
}

/// Claim operators; posture values are scalars, so they take all but the array ones.
fn value_ops(arrays: bool) -> BoxedStrategy<Value> {
    let scalars = prop_oneof![
        scalar().prop_map(|v| v),
        scalar().prop_map(|v| json!({"is": v})),
        prop::collection::vec(scalar(), 1..3).prop_map(|v| json!({"in": v})),
        prop::collection::vec(scalar(), 1..3).prop_map(|v| json!({"not_in": v})),
        Just(json!({"starts_with": "co"})),
        Just(json!({"matches": "c.*"})),
        (0..10i64).prop_map(|n| json!({"lt": n})),
        (0..10i64).prop_map(|n| json!({"gt": n, "lt": 20})),
    ];
    if !arrays {
        return scalars.boxed();
    }
    prop_oneof![
        scalars,
        scalar().prop_map(|v| json!({"has": v})),
        prop::collection::vec(scalar(), 1..3).prop_map(|v| json!({"any_of": v})),
        prop::collection::vec(scalar(), 1..3).prop_map(|v| json!({"all_of": v})),
    ]
    .boxed()
}

fn criterion() -> BoxedStrategy<Value> {
    prop_oneof![
        any::<bool>().prop_map(|b| if b { json!({"accept": true}) } else { json!({"reject": true}) }),
        any::<bool>().prop_map(|b| json!({"authenticated_user": b})),
        str_ops(USERS, true).prop_map(|o| json!({"user": o})),
        str_ops(EMAILS, true).prop_map(|o| json!({"email": o})),
        str_ops(DOMAINS, true).prop_map(|o| json!({"domain": o})),
        prop_oneof![
            pick(GROUPS).prop_map(|g| json!(g)),
            pick(GROUPS).prop_map(|g| json!({"has": g})),
            picks(GROUPS).prop_map(|g| json!({"any_of": g})),
            picks(GROUPS).prop_map(|g| json!({"all_of": g})),
        ]
        .prop_map(|o| json!({"groups": o})),
        (pick(CLAIM_PATHS), value_ops(true)).prop_map(|(p, o)| json!({ format!("claim/{p}"): o })),
        any::<bool>().prop_map(|b| json!({"service_account": b})),
        str_ops(USERS, false).prop_map(|o| json!({"service_account": o})),
        any::<bool>().prop_map(|b| json!({"device": b})),
        str_ops(&["d1", "d2"], true).prop_map(|o| json!({"device/id": o})),
        any::<bool>().prop_map(|b| json!({"device/approved": b})),
        any::<bool>().prop_map(|b| json!({"device/posture_fresh": b})),
        (pick(ATTRS), value_ops(false)).prop_map(|(a, o)| json!({ format!("device/{a}"): o })),
        any::<bool>().prop_map(|b| json!({"client_certificate": b})),
        (prop::sample::select(&FPS[..]), any::<bool>()).prop_map(|(c, neg)| {
            json!({"client_certificate/fingerprint": { if neg { "not_in" } else { "in" }: [fingerprint(c)] }})
        }),
        str_ops(&["CN=A", "CN=B"], true).prop_map(|o| json!({"client_certificate/issuer": o})),
        str_ops(METHODS, false).prop_map(|o| json!({"http_method": o})),
        str_ops(PATHS, true).prop_map(|o| json!({"http_path": o})),
        (pick(HEADERS), prop_oneof![str_ops(HVALUES, true), any::<bool>().prop_map(|b| json!(b))])
            .prop_map(|(h, o)| json!({ format!("header/{h}"): o })),
        (prop::sample::subsequence(NETS, 1..3), any::<bool>())
            .prop_map(|(n, neg)| json!({"source_ip": { if neg { "not_in" } else { "in" }: n }})),
        (pick(ZONES), prop::option::of(pick(CLOCKS)), pick(CLOCKS)).prop_filter_map("empty window", |(tz, a, b)| {
            if a.unwrap_or("00:00") == b {
                return None;
            }
            Some(match a {
                Some(a) => json!({"time_of_day": {"tz": tz, "after": a, "before": b}}),
                None => json!({"time_of_day": {"tz": tz, "before": b}}),
            })
        }),
        (pick(ZONES), 0..DATES.len(), prop::option::of(1..DATES.len())).prop_map(|(tz, a, b)| match b {
            Some(b) if b > a => json!({"date": {"tz": tz, "after": DATES[a], "before": DATES[b]}}),
            Some(_) => json!({"date": {"tz": tz, "after": DATES[a]}}),
            None => json!({"date": {"tz": tz, "before": DATES[a]}}),
        }),
        (pick(ZONES), picks(DAYS), any::<bool>())
            .prop_map(|(tz, d, neg)| json!({"weekday": {"tz": tz, if neg { "not_in" } else { "in" }: d}})),
        (0..7200i64, any::<bool>()).prop_map(|(n, lt)| json!({"auth_age": { if lt { "lt" } else { "gt" }: n }})),
        prop_oneof![
            any::<bool>().prop_map(|b| json!(b)),
            picks(AMRS).prop_map(|a| json!({"any_of": a})),
            picks(AMRS).prop_map(|a| json!({"all_of": a})),
        ]
        .prop_map(|o| json!({"mfa": o})),
        any::<bool>().prop_map(|b| json!({"grant": b})),
        pick(&["base", "strict"]).prop_map(|p| json!({"policy": p})),
    ]
    .boxed()
}

fn block() -> impl Strategy<Value = Value> {
    let leaf = criterion();
    leaf.prop_recursive(4, 40, 4, |inner| {
        (
            pick(&["and", "or", "not", "nor"]),
            prop::collection::vec(inner, 1..4),
        )
            .prop_map(|(k, items)| json!({ k: items }))
    })
    .prop_map(|v| {
        // A block's value must itself be an and/or/not/nor object.
        if v.as_object().is_some_and(|o| {
            o.keys()
                .all(|k| ["and", "or", "not", "nor"].contains(&k.as_str()))
        }) {
            v
        } else {
            json!({"and": [v]})
        }
    })
}

fn document() -> impl Strategy<Value = Value> {
    prop_oneof![
        (prop::option::of(block()), block()).prop_map(|(deny, allow)| match deny {
            Some(d) => json!({"deny": d, "allow": allow}),
            None => json!({"allow": allow}),
        }),
        prop::collection::vec((any::<bool>(), block()), 1..4).prop_map(|rules| {
            Value::Array(
                rules
                    .into_iter()
                    .map(|(d, b)| json!({ if d { "deny" } else { "allow" }: b }))
                    .collect(),
            )
        }),
    ]
}

#[derive(Debug, Clone)]
struct Spec {
    user: Option<(usize, Option<usize>, bool, Vec<usize>, usize)>,
    service_account: Option<usize>,
    device: Option<(usize, bool, Vec<(usize, usize)>, Option<i64>)>,
    cert: Option<(usize, usize)>,
    method: usize,
    path: usize,
    headers: Vec<(usize, usize)>,
    ip: Option<usize>,
    now: i64,
    auth_age: Option<i64>,
    amr: Vec<usize>,
    grant: Option<(i64, i64)>,
}

fn spec() -> impl Strategy<Value = Spec> {
    let user = prop::option::of((
        0..USERS.len(),
        prop::option::of(0..EMAILS.len()),
        any::<bool>(),
        prop::collection::vec(0..GROUPS.len(), 0..4),
        0..3usize,
    ));
    let device = prop::option::of((
        0..2usize,
        any::<bool>(),
        prop::collection::vec((0..ATTRS.len(), 0..SCALARS.len()), 0..4),
        prop::option::of(-100i64..100),
    ));
    // Instants around the 2026 DST switches and ordinary days.
    let now = prop_oneof![
        1_774_746_000i64 - 7200..1_774_746_000 + 7200,
        1_792_890_000i64 - 7200..1_792_890_000 + 7200,
        1_767_225_600i64..1_767_225_600 + 14 * 86_400,
    ];
    (
        (
            user,
            prop::option::of(0..USERS.len()),
            device,
            prop::option::of((0..2usize, 0..2usize)),
        ),
        (
            0..METHODS.len(),
            0..PATHS.len(),
            prop::collection::vec((0..HEADERS.len(), 0..HVALUES.len()), 0..3),
        ),
        (
            prop::option::of(0..IPS.len()),
            now,
            prop::option::of(0..7200i64),
            prop::collection::vec(0..AMRS.len(), 0..3),
        ),
        prop::option::of((-100i64..100, 0i64..200)),
    )
        .prop_map(
            |(
                (user, service_account, device, cert),
                (method, path, headers),
                (ip, now, auth_age, amr),
                grant,
            )| Spec {
                user,
                service_account,
                device,
                cert,
                method,
                path,
                headers,
                ip,
                now,
                auth_age,
                amr,
                grant,
            },
        )
}

fn claims(i: usize) -> Value {
    match i {
        0 => {
            json!({"team": "core", "org": {"level": 7, "admin": false}, "roles": ["reader", "admin"]})
        }
        1 => json!({"team": "edge", "org": {"level": 3}, "roles": "reader"}),
        _ => json!({}),
    }
}

fn library() -> BTreeMap<String, Document> {
    let mut lib = BTreeMap::new();
    lib.insert("base".into(), parse_yaml("allow:\n  or:\n    - domain: corp.example\n    - groups: admins\ndeny:\n  or:\n    - groups: contractors\n").unwrap());
    lib.insert(
        "strict".into(),
        parse_yaml("allow:\n  and:\n    - policy: base\n    - mfa: true\n").unwrap(),
    );
    lib
}

/// A proxy's shared table: other names first, then the generator's names in another
/// order, so no id means what it means in a policy's own fresh table.
fn shared_symbols() -> Symbols {
    let mut s = Symbols::default();
    for i in 0..70 {
        s.groups.intern(&format!("filler-{i}"));
    }
    for g in GROUPS.iter().rev().step_by(2) {
        s.groups.intern(g);
    }
    for u in USERS.iter().rev() {
        s.users.intern(u);
        s.service_accounts.intern(&format!("other-{u}"));
    }
    for a in ATTRS.iter().rev() {
        s.attributes.intern(a);
    }
    s.devices.intern("d0");
    s.devices.intern("d2");
    s.domains.intern("sub.corp.example");
    s.domains.intern("nowhere.net");
    s
}

/// Checks one generated case. With `relink`, the policy is compiled against its own
/// table and relinked into [`shared_symbols`]; it must then be the very program that
/// compiling against the shared table gives, and decide alike.
fn run(doc_value: &Value, spec: &Spec, relink: bool) -> Result<(), TestCaseError> {
    let Ok(doc) = parse_json(&doc_value.to_string()) else {
        // Generated documents are meant to be valid; any that is not is a generator bug.
        return Err(TestCaseError::fail(format!(
            "generated policy did not parse: {doc_value}"
        )));
    };
    let lib = library();
    let compile_into = |symbols: &mut Symbols| {
        compile(
            &doc,
            CompileEnv {
                symbols,
                directory: None,
                library: Some(&lib),
                name: None,
            },
        )
        .map_err(|e| TestCaseError::fail(format!("compile: {e}\n{doc_value}")))
    };
    let mut symbols = Symbols::default();
    let mut relinked = None;
    if relink {
        symbols = shared_symbols();
        let mut own = Symbols::default();
        let r = compile_into(&mut own)?
            .relink(&own, &mut symbols)
            .map_err(|e| TestCaseError::fail(format!("relink: {e}\n{doc_value}")))?;
        relinked = Some(r);
    }
    let before = symbols.clone();
    let policy = compile_into(&mut symbols)?;
    if let Some(r) = &relinked {
        prop_assert_eq!(&symbols, &before, "relink interned every name");
        prop_assert_eq!(r.to_bytes(), policy.to_bytes(), "policy {}", doc_value);
    }

    // Build the request after compiling, resolving names through the symbol tables.
    let claim_values: Vec<Value> = (0..3).map(claims).collect();
    let mut groups: Vec<Sym> = Vec::new();
    for g in spec.user.iter().flat_map(|u| u.3.iter()) {
        groups.push(symbols.groups.intern(GROUPS[*g]));
    }
    let mut attributes: Vec<(Sym, Scalar)> = Vec::new();
    if let Some((_, _, attrs, _)) = &spec.device {
        for (a, v) in attrs {
            let sym = symbols.attributes.intern(ATTRS[*a]);
            if attributes.iter().any(|(s, _)| *s == sym) {
                continue;
            }
            let scalar = match serde_json::from_str::<Value>(SCALARS[*v]).unwrap() {
                Value::Bool(b) => Scalar::Bool(b),
                Value::Number(n) => Scalar::Num(n.as_f64().unwrap()),
                Value::String(s) => Scalar::Str(s),
                _ => unreachable!(),
            };
            attributes.push((sym, scalar));
        }
    }
    attributes.sort_by_key(|(s, _)| *s);
    let posture = Posture {
        expires_at: spec.device.as_ref().and_then(|d| d.3).map(|o| spec.now + o),
        attributes,
    };
    let device_names = ["d1", "d2"];
    let header_pairs: Vec<(&str, &str)> = spec
        .headers
        .iter()
        .map(|(h, v)| (HEADERS[*h], HVALUES[*v]))
        .collect();
    let headers = HeaderList(&header_pairs);
    let grants: Vec<GrantWindow> = spec
        .grant
        .iter()
        .map(|(s, len)| GrantWindow {
            start: spec.now + s,
            end: spec.now + s + len,
        })
        .collect();
    let req = Request {
        user: spec.user.as_ref().map(|(u, e, verified, _, c)| User {
            id: Id {
                sym: symbols.users.get(USERS[*u]).unwrap_or(Sym::NONE),
                name: USERS[*u],
            },
            email: e.map(|e| EMAILS[e]),
            email_verified: *verified,
            domain: e.map_or(Sym::NONE, |e| symbols.domain_of(EMAILS[e])),
            groups: &groups,
            claims: Some(&claim_values[*c]),
        }),
        service_account: spec.service_account.map(|s| Id {
            sym: symbols.service_accounts.get(USERS[s]).unwrap_or(Sym::NONE),
            name: USERS[s],
        }),
        device: spec.device.as_ref().map(|(d, approved, _, _)| Device {
            id: Id {
                sym: symbols.devices.get(device_names[*d]).unwrap_or(Sym::NONE),
                name: device_names[*d],
            },
            approved: *approved,
            posture: &posture,
        }),
        client_certificate: spec.cert.map(|(f, i)| ClientCertificate {
            spki_sha256: parse_fingerprint(&fingerprint(FPS[f])).unwrap(),
            issuer: ["CN=A", "CN=B"][i],
        }),
        method: METHODS[spec.method],
        path: PATHS[spec.path],
        headers: &headers,
        source_ip: spec.ip.map(|i| IPS[i].parse::<IpAddr>().unwrap()),
        now: spec.now,
        session: Session {
            auth_time: spec.auth_age.map(|a| spec.now - a),
            amr: Amr::from_values(spec.amr.iter().map(|a| AMRS[*a])),
        },
        grants: &grants,
    };

    let decision = policy.evaluate(&req);
    let (allow, rule) = interp::evaluate(&doc, Some(&lib), &symbols, &req);
    let compiled_rule = decision
        .rule
        .and_then(|i| policy.rule(i))
        .map(|r| r.pointer.to_string());
    prop_assert_eq!(decision.allow, allow, "policy {}", doc_value);
    prop_assert_eq!(compiled_rule, rule, "policy {}", doc_value);
    let reloaded = CompiledPolicy::from_bytes(&policy.to_bytes())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(reloaded.evaluate(&req), decision);
    prop_assert_eq!(policy.explain(&req).allow, decision.allow);
    if let Some(r) = &relinked {
        prop_assert_eq!(r.evaluate(&req), decision, "policy {}", doc_value);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn compiled_evaluator_agrees_with_interpreter(doc in document(), specs in prop::collection::vec(spec(), 8)) {
        for s in &specs {
            run(&doc, s, false)?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn relinked_policy_decides_like_one_compiled_against_the_shared_table(doc in document(), specs in prop::collection::vec(spec(), 8)) {
        for s in &specs {
            run(&doc, s, true)?;
        }
    }
}
