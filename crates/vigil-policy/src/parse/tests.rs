use crate::{parse_json, parse_yaml, Document, PolicyError, Problem};

fn problems(yaml: &str) -> Vec<Problem> {
    match parse_yaml(yaml) {
        Err(PolicyError::Invalid(p)) => p,
        Err(e) => panic!("expected located problems, got {e}"),
        Ok(_) => panic!("expected an invalid policy:\n{yaml}"),
    }
}

fn one(yaml: &str) -> Problem {
    let p = problems(yaml);
    assert_eq!(p.len(), 1, "{p:?}");
    p.into_iter().next().unwrap()
}

fn ok(yaml: &str) -> Document {
    parse_yaml(yaml).unwrap_or_else(|e| panic!("{yaml}\n{e}"))
}

#[test]
fn every_problem_is_reported_with_its_pointer() {
    let p = problems(
        "allow:\n  and:\n    - emial: a@b.c\n    - groups: {hass: x}\n    - source_ip: 10.0.0.300/8\n    - http_path: {matches: '('}\n    - time_of_day: {tz: Mars/Olympus, after: '09:00'}\n",
    );
    let got: Vec<(&str, &str)> = p
        .iter()
        .map(|p| (p.pointer.as_str(), p.message.as_str()))
        .collect();
    assert_eq!(got.len(), 5, "{got:#?}");
    assert_eq!(got[0].0, "/allow/and/0/emial");
    assert!(
        got[0]
            .1
            .contains("unknown criterion `emial`; did you mean `email`?"),
        "{}",
        got[0].1
    );
    assert_eq!(got[1].0, "/allow/and/1/groups/hass");
    assert!(got[1].1.contains("did you mean `has`"), "{}", got[1].1);
    assert_eq!(got[2].0, "/allow/and/2/source_ip");
    assert!(got[2].1.contains("not a CIDR"), "{}", got[2].1);
    assert_eq!(got[3].0, "/allow/and/3/http_path/matches");
    assert!(
        got[3].1.starts_with("invalid regular expression"),
        "{}",
        got[3].1
    );
    assert_eq!(got[4].0, "/allow/and/4/time_of_day/tz");
    assert!(
        got[4].1.contains("unknown time zone `Mars/Olympus`"),
        "{}",
        got[4].1
    );
}

#[test]
fn pointers_escape_slash_and_tilde() {
    let p = one("allow:\n  and:\n    - claim/a..b: x\n");
    assert_eq!(p.pointer, "/allow/and/0/claim~1a..b");
    let p = one("allow:\n  and:\n    - header/x~y: {is: 1}\n");
    assert_eq!(p.pointer, "/allow/and/0/header~1x~0y/is");
}

#[test]
fn document_shape_errors() {
    assert_eq!(one("[]").pointer, "");
    assert!(one("42").message.contains("found a number"));
    let p = one("allow:\n  and: []\n");
    assert_eq!(p.pointer, "/allow/and");
    assert!(p.message.contains("accept: true"));
    let p = one("alow:\n  and: [accept: true]\n");
    assert!(p.message.contains("did you mean `allow`"), "{}", p.message);
    let p = one("allow:\n  email: a@b.c\n");
    assert_eq!(p.pointer, "/allow/email");
    assert!(p.message.contains("wrap it"), "{}", p.message);
    let p = one("allow:\n  and:\n    - {email: a@b.c, user: u}\n");
    assert!(
        p.message.contains("one criterion per list item"),
        "{}",
        p.message
    );
    let p = one("allow:\n  and:\n    - email\n");
    assert!(p.message.contains("found a string"), "{}", p.message);
    let p = one("- allow: {and: [accept: true]}\n- 3\n");
    assert_eq!(p.pointer, "/1");
}

#[test]
fn operator_and_operand_errors() {
    let p = one("allow:\n  and:\n    - http_method: {starts_with: G}\n");
    assert_eq!(p.pointer, "/allow/and/0/http_method/starts_with");
    assert!(p.message.contains("not valid here"));
    assert!(one("allow:\n  and:\n    - http_method: 'GE T'\n")
        .message
        .contains("not an HTTP method"));
    assert!(one("allow:\n  and:\n    - http_path: admin\n")
        .message
        .contains("begin with `/`"));
    assert!(one("allow:\n  and:\n    - domain: a@b.c\n")
        .message
        .contains("part after `@`"));
    assert!(one("allow:\n  and:\n    - user: {in: []}\n")
        .message
        .contains("empty"));
    assert!(one("allow:\n  and:\n    - user: [a, b]\n")
        .message
        .contains("needs an operator"));
    assert!(one("allow:\n  and:\n    - groups: ''\n")
        .message
        .contains("must not be empty"));
    assert!(one("allow:\n  and:\n    - accept: false\n")
        .message
        .contains("takes `true`"));
    assert!(one("allow:\n  and:\n    - device/approved: yes please\n")
        .message
        .contains("`true` or `false`"));
    assert!(one("allow:\n  and:\n    - device/bad attr: true\n")
        .message
        .contains("not a device attribute"));
    assert!(one("allow:\n  and:\n    - client_certificate/serial: x\n")
        .message
        .contains("expected `fingerprint` or `issuer`"));
    assert!(
        one("allow:\n  and:\n    - client_certificate/fingerprint: abc\n")
            .message
            .contains("64 hex digits")
    );
    assert!(one("allow:\n  and:\n    - header: x\n")
        .message
        .contains("header/<name>"));
    assert!(one("allow:\n  and:\n    - header/bad header: x\n")
        .message
        .contains("not a valid header name"));
    assert!(one("allow:\n  and:\n    - user/x: y\n")
        .message
        .contains("takes no `/`"));
    assert!(one("allow:\n  and:\n    - claim: x\n")
        .message
        .contains("name the claim"));
    assert!(one("allow:\n  and:\n    - claim: {has: x}\n")
        .message
        .contains("missing `path`"));
    assert!(one("allow:\n  and:\n    - claim/n: {lt: abc}\n")
        .message
        .contains("expected a number"));
    assert!(one("allow:\n  and:\n    - claim/n: {is: [1]}\n")
        .message
        .contains("expected a string, number or boolean"));
    assert!(one("allow:\n  and:\n    - policy: 3\n")
        .message
        .contains("name of a policy"));
}

#[test]
fn time_and_session_operand_errors() {
    assert!(one("allow:\n  and:\n    - time_of_day: {after: '9:00'}\n")
        .message
        .contains("HH:MM"));
    assert!(one("allow:\n  and:\n    - time_of_day: {after: '25:00'}\n")
        .message
        .contains("HH:MM"));
    assert!(one("allow:\n  and:\n    - time_of_day: {tz: UTC}\n")
        .message
        .contains("`after`, `before` or both"));
    assert!(
        one("allow:\n  and:\n    - time_of_day: {after: '10:00', before: '10:00'}\n")
            .message
            .contains("empty")
    );
    assert!(one("allow:\n  and:\n    - time_of_day: {after: '24:00'}\n")
        .message
        .contains("HH:MM"));
    ok("allow:\n  and:\n    - time_of_day: {after: '22:00', before: '24:00'}\n");
    assert!(one("allow:\n  and:\n    - date: {after: '2026-13-01'}\n")
        .message
        .contains("not a date"));
    assert!(
        one("allow:\n  and:\n    - date: {after: '2026-02-01', before: '2026-01-01'}\n")
            .message
            .contains("not earlier")
    );
    assert!(one("allow:\n  and:\n    - weekday: funday\n")
        .message
        .contains("not a day"));
    assert!(
        one("allow:\n  and:\n    - weekday: {in: [mon], not_in: [tue]}\n")
            .message
            .contains("one of")
    );
    assert!(one("allow:\n  and:\n    - auth_age: 300\n")
        .message
        .contains("lt: 15m"));
    assert!(one("allow:\n  and:\n    - auth_age: {lt: 5y}\n")
        .message
        .contains("duration"));
    assert!(one("allow:\n  and:\n    - auth_age: {lt: -1}\n")
        .message
        .contains("seconds"));
    let p = one("allow:\n  and:\n    - mfa: {any_of: [otp, sms2]}\n");
    assert_eq!(p.pointer, "/allow/and/0/mfa/any_of/1");
    assert!(p.message.contains("did you mean `sms`"), "{}", p.message);
}

#[test]
fn limits_on_depth_and_size() {
    let mut inner = String::from(r#"{"accept": true}"#);
    for _ in 0..40 {
        inner = format!(r#"{{"and": [{inner}]}}"#);
    }
    let e = parse_json(&format!(r#"{{"allow": {inner}}}"#)).unwrap_err();
    assert!(
        e.problems()
            .iter()
            .any(|p| p.message.contains("nest more than")),
        "{e}"
    );

    let items: Vec<String> = (0..10_005)
        .map(|i| format!("{{\"user\": \"u{i}\"}}"))
        .collect();
    let json = format!("{{\"allow\": {{\"or\": [{}]}}}}", items.join(","));
    let e = parse_json(&json).unwrap_err();
    assert!(
        e.problems()
            .iter()
            .any(|p| p.message.contains("more than 10000")),
        "{e}"
    );
    assert!(e.problems().len() <= 100, "problem list is capped");
}

#[test]
fn regular_expressions_are_counted() {
    let doc = |n: usize| {
        let items: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"http_path": {{"matches": "/a{i}/.*"}}}}"#))
            .collect();
        format!(r#"{{"allow": {{"or": [{}]}}}}"#, items.join(","))
    };
    parse_json(&doc(crate::MAX_PATTERNS)).unwrap();
    let e = parse_json(&doc(crate::MAX_PATTERNS + 50)).unwrap_err();
    let p = e.problems();
    assert_eq!(p.len(), 1, "{e}");
    assert_eq!(p[0].pointer, "/allow/or/256/http_path/matches");
    assert!(
        p[0].message.contains("more than 256 regular expressions"),
        "{e}"
    );
}

#[test]
fn json_and_yaml_give_the_same_policy() {
    let y =
        ok("allow:\n  or:\n    - email: {ends_with: '@x.org'}\n    - groups: {any_of: [a, b]}\n");
    let j = parse_json(r#"{"allow": {"or": [{"email": {"ends_with": "@x.org"}}, {"groups": {"any_of": ["a", "b"]}}]}}"#).unwrap();
    assert_eq!(format!("{y:?}"), format!("{j:?}"));
}

#[test]
fn yaml_oddities_are_errors_not_surprises() {
    // Non-string keys and multiple documents are refused by the reader.
    assert!(matches!(
        parse_yaml("1: x\n"),
        Err(PolicyError::Syntax { .. }) | Err(PolicyError::Invalid(_))
    ));
    assert!(parse_yaml("allow: {and: [accept: true]}\n---\ndeny: {}\n").is_err());
    // YAML 1.2 core schema: `yes` is a string, so it is not a boolean here.
    assert!(one("allow:\n  and:\n    - authenticated_user: yes\n")
        .message
        .contains("`true` or `false`"));
}

#[test]
fn a_regex_cannot_escape_its_anchors() {
    // Wrapped naively as `^(?:...)$`, this would become `^(?:/api/.*)|(?:/admin)$`,
    // whose second branch is unanchored at the start and matches `/x/admin`.
    let p = one("allow:\n  and:\n    - http_path: {matches: '/api/.*)|(?:/admin'}\n");
    assert_eq!(p.pointer, "/allow/and/0/http_path/matches");
    assert!(
        p.message.starts_with("invalid regular expression"),
        "{}",
        p.message
    );
    ok("allow:\n  and:\n    - http_path: {matches: '/api/.*|/admin'}\n");
}

#[test]
fn empty_windows_and_widened_networks_are_refused() {
    assert!(
        one("allow:\n  and:\n    - time_of_day: {before: '00:00'}\n")
            .message
            .contains("window is empty")
    );
    ok("allow:\n  and:\n    - time_of_day: {after: '00:00', before: '24:00'}\n");
    let p = one("allow:\n  and:\n    - source_ip: {in: [10.0.0.0/8, 192.168.1.7/16]}\n");
    assert_eq!(p.pointer, "/allow/and/0/source_ip/in/1");
    assert!(
        p.message.contains("host bits set") && p.message.contains("192.168.0.0/16"),
        "{}",
        p.message
    );
    ok("allow:\n  and:\n    - source_ip: {not_in: 10.0.0.0/8}\n");
    assert!(one("allow:\n  and:\n    - source_ip: {is: [10.0.0.1]}\n")
        .message
        .contains("one address"));
}

#[test]
fn list_items_may_be_multi_key_blocks_and_hints_cover_sub_fields() {
    ok("allow:\n  or:\n    - {and: [accept: true], nor: [groups: x]}\n");
    let p = one("allow:\n  and:\n    - claims/org.team: x\n");
    assert!(p.message.contains("did you mean `claim`"), "{}", p.message);
    ok("allow:\n  and:\n    - service_account: {is: true}\n    - mfa: {is: true}\n    - header/x-a: {is: false}\n");
    assert!(one("allow:\n  and:\n    - accept: false\n")
        .message
        .contains("leave the criterion out"));
}

#[test]
fn hex_round_trips_through_fingerprints() {
    let bytes: [u8; 32] = std::array::from_fn(|i| (i * 37 + 5) as u8);
    let hex = super::to_hex(&bytes);
    assert_eq!(hex.len(), 64);
    assert_eq!(&hex[..6], "052a4f");
    assert_eq!(super::parse_fingerprint(&hex), Some(bytes));
}
