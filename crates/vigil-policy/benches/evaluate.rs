#![allow(missing_docs)]
//! Microbenchmarks of one route policy: evaluate (allowed, denied early, denied
//! late), explain, compile and load. The cross-engine comparison lives in bench/peers.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use vigil_policy::ast::Scalar;
use vigil_policy::*;

const POLICY: &str = r#"
allow:
  and:
    - groups: {any_of: [eng, sre, admins]}
    - domain: {in: [corp.example, example.org]}
    - device/managed: true
    - device/disk_encrypted: true
    - http_method: {in: [GET, POST]}
    - http_path: {starts_with: /api/}
    - source_ip: {in: [10.0.0.0/8, 192.168.0.0/16, "2001:db8::/32"]}
    - time_of_day: {tz: Europe/Paris, after: "07:00", before: "20:00"}
deny:
  or:
    - groups: contractors
"#;

fn bench(c: &mut Criterion) {
    let doc = parse_yaml(POLICY).expect("policy parses");
    let mut symbols = Symbols::default();
    for i in 0..5000 {
        symbols.groups.intern(&format!("g{i}"));
    }
    let policy = compile_standalone(&doc, &mut symbols).expect("policy compiles");
    let mut groups = vec![
        symbols.groups.intern("g17"),
        symbols.groups.intern("sre"),
        symbols.groups.intern("g4000"),
    ];
    groups.sort();
    let managed = symbols.attributes.intern("managed");
    let encrypted = symbols.attributes.intern("disk_encrypted");
    let posture = Posture {
        expires_at: Some(i64::MAX),
        attributes: vec![
            (managed, Scalar::Bool(true)),
            (encrypted, Scalar::Bool(true)),
        ],
    };
    let user = User {
        id: Id {
            sym: symbols.users.intern("u1"),
            name: "u1",
        },
        email: Some("u1@corp.example"),
        email_verified: true,
        domain: symbols.domain_of("u1@corp.example"),
        groups: &groups,
        claims: None,
    };
    let device = Device {
        id: Id {
            sym: symbols.devices.intern("d1"),
            name: "d1",
        },
        approved: true,
        posture: &posture,
    };
    let allowed = Request {
        user: Some(user),
        device: Some(device),
        source_ip: "10.20.30.40".parse().ok(),
        ..Request::anonymous("GET", "/api/v1/items", 1_767_258_000) // 2026-01-01T09:00Z, 10:00 Paris
    };
    assert!(policy.evaluate(&allowed).allow);
    let denied_late = Request {
        now: 1_767_225_600,
        ..allowed
    }; // 01:00 in Paris
    assert!(!policy.evaluate(&denied_late).allow);
    let denied_early = Request::anonymous("GET", "/api/v1/items", 1_767_258_000);

    c.bench_function("evaluate/allowed", |b| {
        b.iter(|| black_box(&policy).evaluate(black_box(&allowed)))
    });
    c.bench_function("evaluate/denied_at_last_criterion", |b| {
        b.iter(|| black_box(&policy).evaluate(black_box(&denied_late)))
    });
    c.bench_function("evaluate/denied_anonymous", |b| {
        b.iter(|| black_box(&policy).evaluate(black_box(&denied_early)))
    });
    let no_tz = compile_standalone(
        &parse_yaml(&POLICY.replace(
            "    - time_of_day: {tz: Europe/Paris, after: \"07:00\", before: \"20:00\"}\n",
            "",
        ))
        .expect("parses"),
        &mut symbols.clone(),
    )
    .expect("compiles");
    c.bench_function("evaluate/allowed_without_time_window", |b| {
        b.iter(|| black_box(&no_tz).evaluate(black_box(&allowed)))
    });
    c.bench_function("explain/allowed", |b| {
        b.iter(|| black_box(&policy).explain(black_box(&allowed)))
    });
    c.bench_function("compile", |b| {
        b.iter(|| compile_standalone(black_box(&doc), &mut symbols.clone()).expect("compiles"))
    });
    let bytes = policy.to_bytes();
    c.bench_function("load_from_bytes", |b| {
        b.iter(|| CompiledPolicy::from_bytes(black_box(&bytes)).expect("loads"))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(500));
    targets = bench
}
criterion_main!(benches);
