//! Any text, read as JSON and as YAML: the parser and compiler must never panic,
//! and whatever compiles must decide like the reference interpreter, also after a
//! round trip through the binary form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_policy::*;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for parsed in [parse_json(text), parse_yaml(text)] {
        let Ok(doc) = parsed else { continue };
        let mut symbols = Symbols::default();
        let Ok(policy) = compile_standalone(&doc, &mut symbols) else { continue };
        let groups = [symbols.groups.intern("eng")];
        let claims = serde_json::json!({"team": "core", "roles": ["a"]});
        let user = User {
            id: Id { sym: symbols.users.get("alice").unwrap_or(Sym::NONE), name: "alice" },
            email: Some("alice@corp.example"),
            email_verified: true,
            domain: symbols.domain_of("alice@corp.example"),
            groups: &groups,
            claims: Some(&claims),
        };
        let mut req = Request::anonymous("GET", "/api", 1_767_225_600);
        for r in [req, Request { user: Some(user), source_ip: "10.1.2.3".parse().ok(), ..req }] {
            req = r;
            let d = policy.evaluate(&req);
            let (allow, _) = interp::evaluate(&doc, None, &symbols, &req);
            assert_eq!(d.allow, allow, "compiled and interpreter disagree");
            let back = CompiledPolicy::from_bytes(&policy.to_bytes()).expect("own bytes load");
            assert_eq!(back.evaluate(&req), d);
            let _ = policy.explain(&req);
        }
    }
});
