//! From a raw document to the typed [`ast`](crate::ast), reporting every problem
//! with its JSON Pointer.

use std::str::FromStr;

use chrono::{NaiveDate, NaiveTime, TimeZone as _};
use chrono_tz::Tz;
use ipnet::IpNet;

use crate::amr::{Amr, AMR_VALUES};
use crate::ast::*;
use crate::doc::Value;
use crate::error::{push_pointer, PolicyError, Problems};

/// How deeply `and`/`or`/`not`/`nor` blocks may nest.
pub const MAX_DEPTH: usize = 32;
/// Most criteria and blocks one document may hold.
pub const MAX_NODES: usize = 10_000;
/// Compiled size limit of one regular expression, in bytes.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Most regular expressions (`matches`) one document may hold. Each may compile to
/// [`REGEX_SIZE_LIMIT`] and is compiled again wherever the policy is loaded (the
/// control plane, every proxy): without a bound, one 1 MiB document of 9,000
/// near-limit expressions took 18 s of CPU and about 1.7 GB to check.
pub const MAX_PATTERNS: usize = 256;

/// Every criterion name the language knows, for "did you mean" hints.
pub const CRITERIA: &[&str] = &[
    "accept",
    "reject",
    "authenticated_user",
    "user",
    "email",
    "domain",
    "groups",
    "claim",
    "service_account",
    "device",
    "client_certificate",
    "http_method",
    "http_path",
    "header",
    "source_ip",
    "time_of_day",
    "date",
    "weekday",
    "auth_age",
    "mfa",
    "grant",
    "policy",
];

const BLOCKS: [&str; 4] = ["and", "or", "not", "nor"];

/// Parses and validates a document.
pub fn parse(value: &Value) -> Result<Document, PolicyError> {
    let mut p = Parser {
        problems: Problems::default(),
        nodes: 0,
        patterns: 0,
    };
    let rules = p.document(value);
    if p.problems.is_empty() {
        Ok(Document { rules })
    } else {
        Err(PolicyError::Invalid(p.problems.0))
    }
}

struct Parser {
    problems: Problems,
    nodes: usize,
    /// Regular expressions seen so far (see [`MAX_PATTERNS`]).
    patterns: usize,
}

fn describe_ops(ops: &[&str]) -> String {
    ops.iter()
        .map(|o| format!("`{o}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (levenshtein(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn did_you_mean(word: &str, candidates: &[&str]) -> String {
    match closest(word, candidates) {
        Some(c) => format!("; did you mean `{c}`?"),
        None => String::new(),
    }
}

impl Parser {
    fn err(&mut self, ptr: &str, msg: impl Into<String>) {
        self.problems.add(ptr, msg);
    }

    fn document(&mut self, v: &Value) -> Vec<Rule> {
        let mut rules = Vec::new();
        match v {
            Value::Object(_) => self.rule_object(v, "", &mut rules),
            Value::Array(items) => {
                if items.is_empty() {
                    self.err("", "a policy needs at least one `allow` or `deny` block");
                }
                for (i, item) in items.iter().enumerate() {
                    self.rule_object(item, &format!("/{i}"), &mut rules);
                }
            }
            other => self.err(
                "",
                format!(
                    "expected an object with `allow` and/or `deny` blocks (or a list of them), found {}",
                    other.kind()
                ),
            ),
        }
        rules
    }

    fn rule_object(&mut self, v: &Value, ptr: &str, rules: &mut Vec<Rule>) {
        let Value::Object(entries) = v else {
            self.err(
                ptr,
                format!(
                    "expected an object with `allow` and/or `deny`, found {}",
                    v.kind()
                ),
            );
            return;
        };
        if entries.is_empty() {
            self.err(ptr, "a policy needs at least one `allow` or `deny` block");
        }
        for (key, value) in entries {
            let p = push_pointer(ptr, key);
            let effect = match key.as_str() {
                "allow" => Effect::Allow,
                "deny" => Effect::Deny,
                other => {
                    let hint = did_you_mean(other, &["allow", "deny"]);
                    self.err(
                        &p,
                        format!("unknown key `{other}`: expected `allow` or `deny`{hint}"),
                    );
                    continue;
                }
            };
            if let Some(expr) = self.block(value, &p, 0) {
                rules.push(Rule {
                    effect,
                    expr,
                    pointer: p,
                });
            }
        }
    }

    /// A block: an object whose keys are `and`, `or`, `not`, `nor` (several keys all must hold).
    fn block(&mut self, v: &Value, ptr: &str, depth: usize) -> Option<Expr> {
        if depth >= MAX_DEPTH {
            self.err(ptr, format!("blocks nest more than {MAX_DEPTH} deep"));
            return None;
        }
        let Value::Object(entries) = v else {
            self.err(
                ptr,
                format!("expected a block such as `{{and: [...]}}` (keys `and`, `or`, `not`, `nor`), found {}", v.kind()),
            );
            return None;
        };
        if entries.is_empty() {
            self.err(ptr, "empty block: use `and`, `or`, `not` or `nor`");
            return None;
        }
        let mut parts = Vec::new();
        for (key, value) in entries {
            let p = push_pointer(ptr, key);
            if !BLOCKS.contains(&key.as_str()) {
                let msg = if CRITERIA.contains(&criterion_name(key)) {
                    format!("a criterion cannot stand directly in a block; wrap it: `and: [{{{key}: ...}}]`")
                } else {
                    format!(
                        "unknown key `{key}`: expected `and`, `or`, `not` or `nor`{}",
                        did_you_mean(key, &BLOCKS)
                    )
                };
                self.err(&p, msg);
                continue;
            }
            let Value::Array(items) = value else {
                self.err(
                    &p,
                    format!(
                        "`{key}` takes a list of criteria or blocks, found {}",
                        value.kind()
                    ),
                );
                continue;
            };
            if items.is_empty() {
                self.err(
                    &p,
                    format!("`{key}` is empty; write `accept: true` to match every request"),
                );
                continue;
            }
            let mut children = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                if let Some(e) = self.item(item, &format!("{p}/{i}"), depth + 1) {
                    children.push(e);
                }
            }
            let kind = match key.as_str() {
                "and" => ExprKind::And(children),
                "or" => ExprKind::Or(children),
                "not" => ExprKind::Not(children),
                _ => ExprKind::Nor(children),
            };
            parts.push(Expr { pointer: p, kind });
        }
        self.count(ptr)?;
        match parts.len() {
            0 => None,
            1 => parts.pop(),
            _ => Some(Expr {
                pointer: ptr.to_owned(),
                kind: ExprKind::And(parts),
            }),
        }
    }

    fn count(&mut self, ptr: &str) -> Option<()> {
        self.nodes += 1;
        if self.nodes == MAX_NODES + 1 {
            self.err(
                ptr,
                format!("the policy has more than {MAX_NODES} criteria and blocks"),
            );
        }
        (self.nodes <= MAX_NODES).then_some(())
    }

    /// An item of a block's list: a nested block or a single-key criterion object.
    fn item(&mut self, v: &Value, ptr: &str, depth: usize) -> Option<Expr> {
        let Value::Object(entries) = v else {
            self.err(
                ptr,
                format!(
                    "expected a criterion such as `{{email: {{is: ...}}}}` or a block, found {}",
                    v.kind()
                ),
            );
            return None;
        };
        match entries.as_slice() {
            [] => {
                self.err(ptr, "empty object: expected one criterion or block");
                None
            }
            keys if keys.iter().all(|(k, _)| BLOCKS.contains(&k.as_str())) => {
                self.block(v, ptr, depth)
            }
            [(key, operand)] => {
                self.count(ptr)?;
                let p = push_pointer(ptr, key);
                let criterion = self.criterion(key, operand, &p)?;
                Some(Expr {
                    pointer: p,
                    kind: ExprKind::Criterion(criterion),
                })
            }
            many => {
                let keys: Vec<&str> = many.iter().map(|(k, _)| k.as_str()).collect();
                self.err(
                    ptr,
                    format!(
                        "one criterion per list item; this one has {} ({}): split them into separate items",
                        keys.len(),
                        describe_ops(&keys)
                    ),
                );
                None
            }
        }
    }

    fn criterion(&mut self, key: &str, v: &Value, ptr: &str) -> Option<Criterion> {
        let (name, sub) = match key.split_once('/') {
            Some((n, s)) => (n, Some(s)),
            None => (key, None),
        };
        if !CRITERIA.contains(&name) {
            let hint = did_you_mean(name, CRITERIA);
            self.err(ptr, format!("unknown criterion `{name}`{hint}"));
            return None;
        }
        let takes_sub = matches!(name, "claim" | "device" | "client_certificate" | "header");
        if sub.is_some() && !takes_sub {
            self.err(ptr, format!("`{name}` takes no `/` sub-field"));
            return None;
        }
        match (name, sub) {
            ("accept", None) => self
                .expect_true(v, ptr, name)
                .map(|()| Criterion::Const(true)),
            ("reject", None) => self
                .expect_true(v, ptr, name)
                .map(|()| Criterion::Const(false)),
            ("authenticated_user", None) => self.flag(v, ptr, Flag::AuthenticatedUser),
            ("user", None) => self.strings(v, ptr, StrField::User, STR_OPS),
            ("email", None) => self.strings(v, ptr, StrField::Email, STR_OPS),
            ("domain", None) => self.strings(v, ptr, StrField::Domain, STR_OPS),
            ("groups", None) => self.groups(v, ptr),
            ("claim", sub) => self.claim(v, ptr, sub),
            ("service_account", None) => match bool_operand(v) {
                Some(b) => Some(Criterion::Flag {
                    flag: Flag::ServiceAccount,
                    expect: b,
                }),
                None => self.strings(v, ptr, StrField::ServiceAccount, STR_OPS),
            },
            ("device", None) => self.flag(v, ptr, Flag::Device),
            ("device", Some("id")) => self.strings(v, ptr, StrField::DeviceId, STR_OPS),
            ("device", Some("approved")) => self.flag(v, ptr, Flag::DeviceApproved),
            ("device", Some("posture_fresh")) => self.flag(v, ptr, Flag::DevicePostureFresh),
            ("device", Some(attr)) => self.posture(v, ptr, attr),
            ("client_certificate", None) => self.flag(v, ptr, Flag::ClientCertificate),
            ("client_certificate", Some("fingerprint")) => self.fingerprint(v, ptr),
            ("client_certificate", Some("issuer")) => {
                self.strings(v, ptr, StrField::ClientCertificateIssuer, STR_OPS)
            }
            ("client_certificate", Some(other)) => {
                self.err(ptr, format!("unknown field `{other}` of `client_certificate`: expected `fingerprint` or `issuer`"));
                None
            }
            ("http_method", None) => {
                self.strings(v, ptr, StrField::HttpMethod, &["is", "in", "not_in"])
            }
            ("http_path", None) => self.strings(v, ptr, StrField::HttpPath, STR_OPS),
            ("header", None) => {
                self.err(
                    ptr,
                    "name the header: `header/<name>`, e.g. `header/x-team`",
                );
                None
            }
            ("header", Some(h)) => self.header(v, ptr, h),
            ("source_ip", None) => self.source_ip(v, ptr),
            ("time_of_day", None) => self.time_of_day(v, ptr),
            ("date", None) => self.date(v, ptr),
            ("weekday", None) => self.weekday(v, ptr),
            ("auth_age", None) => self.auth_age(v, ptr),
            ("mfa", None) => self.mfa(v, ptr),
            ("grant", None) => self.flag(v, ptr, Flag::Grant),
            ("policy", None) => match v {
                Value::String(s) if !s.trim().is_empty() => Some(Criterion::Policy(s.clone())),
                other => {
                    self.err(
                        ptr,
                        format!(
                            "`policy` takes the name of a policy, found {}",
                            other.kind()
                        ),
                    );
                    None
                }
            },
            // Unknown names and stray sub-fields were refused above.
            _ => None,
        }
    }

    fn expect_true(&mut self, v: &Value, ptr: &str, name: &str) -> Option<()> {
        if *v == Value::Bool(true) {
            Some(())
        } else {
            let found = if *v == Value::Bool(false) {
                "`false` (leave the criterion out instead)"
            } else {
                v.kind()
            };
            self.err(ptr, format!("`{name}` takes `true`, found {found}"));
            None
        }
    }

    fn flag(&mut self, v: &Value, ptr: &str, flag: Flag) -> Option<Criterion> {
        let Some(expect) = bool_operand(v) else {
            let expected = if matches!(v, Value::Object(_)) {
                "`true`, `false` or `{is: <boolean>}`"
            } else {
                "`true` or `false`"
            };
            self.err(ptr, format!("expected {expected}, found {}", v.kind()));
            return None;
        };
        Some(Criterion::Flag { flag, expect })
    }

    /// Splits an operand into (operator, value) pairs: a scalar is shorthand for `is`.
    fn operators<'v>(
        &mut self,
        v: &'v Value,
        ptr: &str,
        allowed: &[&str],
        shorthand: &'static str,
    ) -> Option<Vec<(&'v str, &'v Value, String)>> {
        match v {
            Value::Object(entries) => {
                if entries.is_empty() {
                    self.err(
                        ptr,
                        format!(
                            "no operator given: expected one of {}",
                            describe_ops(allowed)
                        ),
                    );
                    return None;
                }
                let mut out = Vec::new();
                let mut ok = true;
                for (op, value) in entries {
                    let p = push_pointer(ptr, op);
                    if allowed.contains(&op.as_str()) {
                        out.push((op.as_str(), value, p));
                    } else {
                        ok = false;
                        let hint = did_you_mean(op, allowed);
                        self.err(
                            &p,
                            format!(
                                "operator `{op}` is not valid here: expected one of {}{hint}",
                                describe_ops(allowed)
                            ),
                        );
                    }
                }
                ok.then_some(out)
            }
            Value::Array(_) => {
                self.err(
                    ptr,
                    format!(
                        "a list needs an operator, e.g. `{{in: [...]}}`; expected one of {}",
                        describe_ops(allowed)
                    ),
                );
                None
            }
            Value::Null => {
                self.err(
                    ptr,
                    format!(
                        "missing operand: expected a value or one of {}",
                        describe_ops(allowed)
                    ),
                );
                None
            }
            scalar => Some(vec![(shorthand, scalar, ptr.to_owned())]),
        }
    }

    fn string(&mut self, v: &Value, ptr: &str) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            other => {
                self.err(ptr, format!("expected a string, found {}", other.kind()));
                None
            }
        }
    }

    fn string_list(&mut self, v: &Value, ptr: &str) -> Option<Vec<String>> {
        let Value::Array(items) = v else {
            self.err(
                ptr,
                format!("expected a list of strings, found {}", v.kind()),
            );
            return None;
        };
        if items.is_empty() {
            self.err(ptr, "the list is empty");
            return None;
        }
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            out.push(self.string(item, &format!("{ptr}/{i}"))?);
        }
        Some(out)
    }

    /// A regular expression matched against the whole value (see `anchored_regex`).
    fn pattern(&mut self, v: &Value, ptr: &str, ignore_case: bool) -> Option<Pattern> {
        let source = self.string(v, ptr)?;
        self.patterns += 1;
        if self.patterns > MAX_PATTERNS {
            if self.patterns == MAX_PATTERNS + 1 {
                self.err(
                    ptr,
                    format!("the policy has more than {MAX_PATTERNS} regular expressions; use `in` lists or `starts_with` where they do"),
                );
            }
            return None;
        }
        match crate::compiled::anchored_regex(&source, ignore_case, REGEX_SIZE_LIMIT) {
            Ok(regex) => Some(Pattern { source, regex }),
            Err(e) => {
                let msg = e.to_string().replace('\n', " ");
                self.err(ptr, format!("invalid regular expression: {msg}"));
                None
            }
        }
    }

    fn strings(
        &mut self,
        v: &Value,
        ptr: &str,
        field: StrField,
        allowed: &[&str],
    ) -> Option<Criterion> {
        let ops = self.operators(v, ptr, allowed, "is")?;
        let mut out = Vec::with_capacity(ops.len());
        let mut ok = true;
        for (op, value, p) in ops {
            let parsed = match op {
                "is" => self.string(value, &p).map(StrOp::Is),
                "in" => self.string_list(value, &p).map(StrOp::In),
                "not_in" => self.string_list(value, &p).map(StrOp::NotIn),
                "starts_with" => self.string(value, &p).map(StrOp::StartsWith),
                "ends_with" => self.string(value, &p).map(StrOp::EndsWith),
                "matches" => self
                    .pattern(value, &p, field.folds_case())
                    .map(StrOp::Matches),
                _ => None,
            };
            match parsed.and_then(|o| self.normalize_str_op(&field, o, &p)) {
                Some(o) => out.push(o),
                None => ok = false,
            }
        }
        ok.then_some(Criterion::Str { field, ops: out })
    }

    /// Folds case where the field compares without it and validates field-specific forms.
    fn normalize_str_op(&mut self, field: &StrField, op: StrOp, ptr: &str) -> Option<StrOp> {
        let mut bad = None;
        let mut fix = |s: String| -> String {
            match field {
                StrField::Email | StrField::Domain => {
                    if s.is_empty() {
                        bad = Some("must not be empty".to_owned());
                    } else if *field == StrField::Domain && s.contains('@') {
                        bad = Some(format!(
                            "`{s}` is an email address; `domain` takes the part after `@`"
                        ));
                    }
                    crate::text::fold(&s)
                }
                StrField::HttpMethod => {
                    if s.is_empty() || !s.bytes().all(is_token_byte) {
                        bad = Some(format!("`{s}` is not an HTTP method"));
                    }
                    s.to_ascii_uppercase()
                }
                StrField::HttpPath => s,
                _ => {
                    if s.is_empty() {
                        bad = Some("must not be empty".to_owned());
                    }
                    s
                }
            }
        };
        let op = match op {
            StrOp::Is(s) => StrOp::Is(fix(s)),
            StrOp::In(v) => StrOp::In(v.into_iter().map(&mut fix).collect()),
            StrOp::NotIn(v) => StrOp::NotIn(v.into_iter().map(&mut fix).collect()),
            StrOp::StartsWith(s) => StrOp::StartsWith(fix(s)),
            StrOp::EndsWith(s) => StrOp::EndsWith(fix(s)),
            other => other,
        };
        if let Some(msg) = bad {
            self.err(ptr, msg);
            return None;
        }
        if *field == StrField::HttpPath {
            let needs_slash = match &op {
                StrOp::Is(s) | StrOp::StartsWith(s) => !s.starts_with('/'),
                StrOp::In(v) | StrOp::NotIn(v) => v.iter().any(|s| !s.starts_with('/')),
                _ => false,
            };
            if needs_slash {
                self.err(ptr, "paths begin with `/`");
                return None;
            }
        }
        Some(op)
    }

    fn header(&mut self, v: &Value, ptr: &str, name: &str) -> Option<Criterion> {
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            self.err(ptr, format!("`{name}` is not a valid header name"));
            return None;
        }
        let field = StrField::Header(name.to_ascii_lowercase());
        if let Some(b) = bool_operand(v) {
            return Some(Criterion::Str {
                field,
                ops: vec![StrOp::Present(b)],
            });
        }
        self.strings(v, ptr, field, STR_OPS)
    }

    fn groups(&mut self, v: &Value, ptr: &str) -> Option<Criterion> {
        let ops = self.operators(v, ptr, &["has", "any_of", "all_of"], "has")?;
        let mut out = Vec::new();
        let mut ok = true;
        for (op, value, p) in ops {
            let parsed = match op {
                "has" => self.string(value, &p).map(SetOp::Has),
                "any_of" => self.string_list(value, &p).map(SetOp::AnyOf),
                _ => self.string_list(value, &p).map(SetOp::AllOf),
            };
            let empty = match &parsed {
                Some(SetOp::Has(s)) => s.is_empty(),
                Some(SetOp::AnyOf(v) | SetOp::AllOf(v)) => v.iter().any(String::is_empty),
                None => false,
            };
            if empty {
                self.err(&p, "group names must not be empty");
                ok = false;
            }
            match parsed {
                Some(o) => out.push(o),
                None => ok = false,
            }
        }
        (ok).then_some(Criterion::Groups(out))
    }

    fn scalar(&mut self, v: &Value, ptr: &str) -> Option<Scalar> {
        match v {
            Value::Bool(b) => Some(Scalar::Bool(*b)),
            Value::Int(_) | Value::Float(_) => v
                .as_f64()
                .filter(|f| f.is_finite())
                .map(Scalar::Num)
                .or_else(|| {
                    self.err(ptr, "numbers must be finite");
                    None
                }),
            Value::String(s) => Some(Scalar::Str(s.clone())),
            other => {
                self.err(
                    ptr,
                    format!(
                        "expected a string, number or boolean, found {}",
                        other.kind()
                    ),
                );
                None
            }
        }
    }

    fn scalar_list(&mut self, v: &Value, ptr: &str) -> Option<Vec<Scalar>> {
        let Value::Array(items) = v else {
            self.err(ptr, format!("expected a list, found {}", v.kind()));
            return None;
        };
        if items.is_empty() {
            self.err(ptr, "the list is empty");
            return None;
        }
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            out.push(self.scalar(item, &format!("{ptr}/{i}"))?);
        }
        Some(out)
    }

    fn number(&mut self, v: &Value, ptr: &str) -> Option<f64> {
        match v.as_f64() {
            Some(f) if f.is_finite() => Some(f),
            Some(_) => {
                self.err(ptr, "numbers must be finite");
                None
            }
            None => {
                self.err(ptr, format!("expected a number, found {}", v.kind()));
                None
            }
        }
    }

    fn value_ops(&mut self, ops: Vec<(&str, &Value, String)>) -> Option<Vec<ValueOp>> {
        let mut out = Vec::with_capacity(ops.len());
        let mut ok = true;
        for (op, value, p) in ops {
            let parsed = match op {
                "is" => self.scalar(value, &p).map(ValueOp::Is),
                "in" => self.scalar_list(value, &p).map(ValueOp::In),
                "not_in" => self.scalar_list(value, &p).map(ValueOp::NotIn),
                "has" => self.scalar(value, &p).map(ValueOp::Has),
                "any_of" => self.scalar_list(value, &p).map(ValueOp::AnyOf),
                "all_of" => self.scalar_list(value, &p).map(ValueOp::AllOf),
                "starts_with" => self.string(value, &p).map(ValueOp::StartsWith),
                "ends_with" => self.string(value, &p).map(ValueOp::EndsWith),
                "matches" => self.pattern(value, &p, false).map(ValueOp::Matches),
                "lt" => self.number(value, &p).map(ValueOp::Lt),
                _ => self.number(value, &p).map(ValueOp::Gt),
            };
            match parsed {
                Some(o) => out.push(o),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn claim(&mut self, v: &Value, ptr: &str, sub: Option<&str>) -> Option<Criterion> {
        let (path, operand) = match sub {
            Some(s) => {
                let path: Vec<String> = s.split('.').map(str::to_owned).collect();
                if path.iter().any(String::is_empty) {
                    self.err(ptr, format!("`{s}` is not a claim path: use names separated by `.`, e.g. `claim/org.team`"));
                    return None;
                }
                (path, v.clone())
            }
            None => {
                // `claim: {path: [...], <operators>}` for claim names that contain dots.
                let Value::Object(entries) = v else {
                    self.err(
                        ptr,
                        "name the claim: `claim/<name>` or `claim: {path: [...], is: ...}`",
                    );
                    return None;
                };
                let Some((_, path_value)) = entries.iter().find(|(k, _)| k == "path") else {
                    self.err(ptr, "missing `path`: `claim: {path: [\"https://example.com/roles\"], has: admin}`");
                    return None;
                };
                let pp = push_pointer(ptr, "path");
                let path = match path_value {
                    Value::String(s) => vec![s.clone()],
                    other => self.string_list(other, &pp)?,
                };
                if path.iter().any(String::is_empty) {
                    self.err(&pp, "claim names must not be empty");
                    return None;
                }
                let rest = Value::Object(
                    entries
                        .iter()
                        .filter(|(k, _)| k != "path")
                        .cloned()
                        .collect(),
                );
                (path, rest)
            }
        };
        let ops = self.operators(&operand, ptr, CLAIM_OPS, "is")?;
        let ops = self.value_ops(ops)?;
        Some(Criterion::Claim { path, ops })
    }

    fn posture(&mut self, v: &Value, ptr: &str, attr: &str) -> Option<Criterion> {
        if attr.is_empty()
            || !attr
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            self.err(
                ptr,
                format!("`{attr}` is not a device attribute name (letters, digits, `_`, `-`, `.`)"),
            );
            return None;
        }
        let ops = self.operators(v, ptr, POSTURE_OPS, "is")?;
        let ops = self.value_ops(ops)?;
        Some(Criterion::Posture {
            attr: attr.to_owned(),
            ops,
        })
    }

    fn fingerprint(&mut self, v: &Value, ptr: &str) -> Option<Criterion> {
        let ops = self.operators(v, ptr, &["is", "in", "not_in"], "is")?;
        let mut out = Vec::new();
        for (op, value, p) in ops {
            let list = match op {
                "is" => vec![self.string(value, &p)?],
                _ => self.string_list(value, &p)?,
            };
            let mut fps = Vec::with_capacity(list.len());
            for (i, s) in list.iter().enumerate() {
                let at = if op == "is" {
                    p.clone()
                } else {
                    format!("{p}/{i}")
                };
                match parse_fingerprint(s) {
                    Some(fp) => fps.push(fp),
                    None => {
                        self.err(
                            &at,
                            "expected a SHA-256 fingerprint: 64 hex digits, colons allowed",
                        );
                        return None;
                    }
                }
            }
            out.push(if op == "not_in" {
                FingerprintOp::NotIn(fps)
            } else {
                FingerprintOp::In(fps)
            });
        }
        Some(Criterion::Fingerprint(out))
    }

    fn source_ip(&mut self, v: &Value, ptr: &str) -> Option<Criterion> {
        let ops = self.operators(v, ptr, &["is", "in", "not_in"], "in")?;
        let mut out = Vec::new();
        for (op, value, p) in ops {
            let list = match value {
                Value::String(s) => vec![s.clone()],
                _ if op == "is" => {
                    self.err(
                        &p,
                        format!("`is` takes one address or network, found {}", value.kind()),
                    );
                    return None;
                }
                _ => self.string_list(value, &p)?,
            };
            let mut nets = Vec::with_capacity(list.len());
            for (i, s) in list.iter().enumerate() {
                let at = if matches!(value, Value::Array(_)) {
                    format!("{p}/{i}")
                } else {
                    p.clone()
                };
                match parse_net(s) {
                    Ok(n) => nets.push(n),
                    Err(msg) => {
                        self.err(&at, msg);
                        return None;
                    }
                }
            }
            out.push(if op == "not_in" {
                IpOp::NotIn(nets)
            } else {
                IpOp::In(nets)
            });
        }
        Some(Criterion::SourceIp(out))
    }

    fn fields<'v>(
        &mut self,
        v: &'v Value,
        ptr: &str,
        allowed: &[&str],
    ) -> Option<Vec<(&'v str, &'v Value, String)>> {
        let Value::Object(entries) = v else {
            self.err(
                ptr,
                format!(
                    "expected an object with {}, found {}",
                    describe_ops(allowed),
                    v.kind()
                ),
            );
            return None;
        };
        self.operators(v, ptr, allowed, "is")
            .filter(|_| !entries.is_empty())
    }

    fn tz(&mut self, fields: &[(&str, &Value, String)]) -> Option<Tz> {
        match fields.iter().find(|(k, _, _)| *k == "tz") {
            None => Some(Tz::UTC),
            Some((_, v, p)) => {
                let name = self.string(v, p)?;
                match Tz::from_str(&name) {
                    Ok(tz) => Some(tz),
                    Err(_) => {
                        self.err(p, format!("unknown time zone `{name}`: use an IANA name such as `Europe/Paris` or `UTC`"));
                        None
                    }
                }
            }
        }
    }

    fn time_of_day(&mut self, v: &Value, ptr: &str) -> Option<Criterion> {
        let fields = self.fields(v, ptr, &["tz", "after", "before"])?;
        let tz = self.tz(&fields);
        let mut after = None;
        let mut before = None;
        let mut ok = tz.is_some();
        for (k, value, p) in &fields {
            let slot = match *k {
                "after" => &mut after,
                "before" => &mut before,
                _ => continue,
            };
            match value {
                Value::String(s) => {
                    match parse_clock(s, *k == "before") {
                        Some(secs) => *slot = Some(secs),
                        None => {
                            self.err(p, format!("`{s}` is not a time of day: use `HH:MM` or `HH:MM:SS` (24-hour)"));
                            ok = false;
                        }
                    }
                }
                other => {
                    self.err(
                        p,
                        format!("expected a time such as \"09:00\", found {}", other.kind()),
                    );
                    ok = false;
                }
            }
        }
        if ok && after.is_none() && before.is_none() {
            self.err(ptr, "give `after`, `before` or both");
            ok = false;
        }
        if ok && after.unwrap_or(0) == before.unwrap_or(86_400) {
            self.err(
                ptr,
                "the window is empty (a missing `after` means 00:00, a missing `before` 24:00)",
            );
            ok = false;
        }
        Some(Criterion::TimeOfDay {
            tz: tz?,
            after,
            before,
        })
        .filter(|_| ok)
    }

    fn date(&mut self, v: &Value, ptr: &str) -> Option<Criterion> {
        let fields = self.fields(v, ptr, &["tz", "after", "before"])?;
        let tz = self.tz(&fields)?;
        let mut after = None;
        let mut before = None;
        let mut ok = true;
        for (k, value, p) in &fields {
            let slot = match *k {
                "after" => &mut after,
                "before" => &mut before,
                _ => continue,
            };
            match value {
                Value::String(s) => match parse_instant(s, tz) {
                    Some(t) => *slot = Some(t),
                    None => {
                        self.err(p, format!("`{s}` is not a date: use `YYYY-MM-DD` or RFC 3339 (`2026-01-31T09:00:00Z`)"));
                        ok = false;
                    }
                },
                other => {
                    self.err(p, format!("expected a date string, found {}", other.kind()));
                    ok = false;
                }
            }
        }
        if ok && after.is_none() && before.is_none() {
            self.err(ptr, "give `after`, `before` or both");
            ok = false;
        }
        if let (true, Some(a), Some(b)) = (ok, after, before) {
            if a >= b {
                self.err(
                    ptr,
                    "`after` is not earlier than `before`: no instant matches",
                );
                ok = false;
            }
        }
        ok.then_some(Criterion::Date { after, before })
    }

    fn weekday(&mut self, v: &Value, ptr: &str) -> Option<Criterion> {
        let fields = match v {
            Value::String(_) => vec![("is", v, ptr.to_owned())],
            _ => self.fields(v, ptr, &["tz", "is", "in", "not_in"])?,
        };
        let tz = self.tz(&fields)?;
        let mut days = 0u8;
        let mut negate = None;
        for (k, value, p) in &fields {
            let names = match *k {
                "is" => vec![self.string(value, p)?],
                "in" | "not_in" => self.string_list(value, p)?,
                _ => continue,
            };
            if negate.replace(*k == "not_in").is_some() {
                self.err(ptr, "give one of `is`, `in`, `not_in`");
                return None;
            }
            for (i, n) in names.iter().enumerate() {
                match parse_weekday(n) {
                    Some(d) => days |= 1 << d,
                    None => {
                        let at = if *k == "is" {
                            p.clone()
                        } else {
                            format!("{p}/{i}")
                        };
                        self.err(
                            &at,
                            format!("`{n}` is not a day: use mon, tue, wed, thu, fri, sat, sun"),
                        );
                        return None;
                    }
                }
            }
        }
        let Some(negate) = negate else {
            self.err(ptr, "give the days with `is`, `in` or `not_in`");
            return None;
        };
        Some(Criterion::Weekday { tz, days, negate })
    }

    fn auth_age(&mut self, v: &Value, ptr: &str) -> Option<Criterion> {
        let Value::Object(_) = v else {
            self.err(
                ptr,
                "expected `{lt: <seconds or duration>}` or `{gt: ...}`, e.g. `{lt: 15m}`",
            );
            return None;
        };
        let ops = self.operators(v, ptr, &["lt", "gt"], "lt")?;
        let mut out = Vec::new();
        for (op, value, p) in ops {
            let secs = match value {
                Value::Int(i) if *i >= 0 => Some(*i),
                Value::String(s) => parse_duration(s),
                _ => None,
            };
            let Some(secs) = secs else {
                self.err(&p, "expected seconds (a whole number ≥ 0) or a duration such as `90s`, `15m`, `12h`, `7d`");
                return None;
            };
            out.push(if op == "lt" {
                NumOp::Lt(secs)
            } else {
                NumOp::Gt(secs)
            });
        }
        Some(Criterion::AuthAge(out))
    }

    fn mfa(&mut self, v: &Value, ptr: &str) -> Option<Criterion> {
        if let Some(b) = bool_operand(v) {
            return Some(Criterion::Flag {
                flag: Flag::Mfa,
                expect: b,
            });
        }
        let ops = self.operators(v, ptr, &["has", "any_of", "all_of"], "has")?;
        let mut out = Vec::new();
        for (op, value, p) in ops {
            let names = match op {
                "has" => vec![self.string(value, &p)?],
                _ => self.string_list(value, &p)?,
            };
            let mut set = Amr(0);
            for (i, n) in names.iter().enumerate() {
                match Amr::bit(n) {
                    Some(b) => set.0 |= b.0,
                    None => {
                        let at = if op == "has" {
                            p.clone()
                        } else {
                            format!("{p}/{i}")
                        };
                        let hint = did_you_mean(n, &AMR_VALUES);
                        self.err(
                            &at,
                            format!(
                                "`{n}` is not a registered authentication method (RFC 8176){hint}"
                            ),
                        );
                        return None;
                    }
                }
            }
            out.push(if op == "all_of" {
                AmrOp::AllOf(set)
            } else {
                AmrOp::AnyOf(set)
            });
        }
        Some(Criterion::Mfa(out))
    }
}

const STR_OPS: &[&str] = &["is", "in", "not_in", "starts_with", "ends_with", "matches"];
const CLAIM_OPS: &[&str] = &[
    "is",
    "in",
    "not_in",
    "has",
    "any_of",
    "all_of",
    "starts_with",
    "ends_with",
    "matches",
    "lt",
    "gt",
];
const POSTURE_OPS: &[&str] = &[
    "is",
    "in",
    "not_in",
    "starts_with",
    "ends_with",
    "matches",
    "lt",
    "gt",
];

/// `true`, `false`, or `{is: <boolean>}`.
fn bool_operand(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Object(entries) => match entries.as_slice() {
            [(k, Value::Bool(b))] if k == "is" => Some(*b),
            _ => None,
        },
        _ => None,
    }
}

fn criterion_name(key: &str) -> &str {
    key.split_once('/').map_or(key, |(n, _)| n)
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Lowercase hex of `bytes` (the form fingerprints and token hashes are written in).
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Parses a SHA-256 fingerprint written as hex, with or without colons.
pub fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let hex: Vec<u8> = s.bytes().filter(|b| *b != b':').collect();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Parses an address or CIDR network; IPv4-mapped IPv6 becomes IPv4. A network with
/// host bits set (`192.168.1.7/16`) is refused: usually a typo granting far more than meant.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net = if s.contains('/') {
        let net = IpNet::from_str(s).map_err(|_| {
            format!("`{s}` is not a CIDR network such as `10.0.0.0/8` or `2001:db8::/32`")
        })?;
        if net.trunc() != net {
            let host = IpNet::from(net.addr());
            return Err(format!(
                "`{s}` has host bits set: write `{}` for the network or `{host}` for the one address",
                net.trunc()
            ));
        }
        net
    } else {
        let ip = std::net::IpAddr::from_str(s)
            .map_err(|_| format!("`{s}` is not an IP address or CIDR network"))?;
        IpNet::from(ip)
    };
    Ok(canonical_net(net))
}

fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let Some(v4) = v6.addr().to_ipv4_mapped() {
            if v6.prefix_len() >= 96 {
                if let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96) {
                    return IpNet::V4(n);
                }
            }
        }
    }
    net
}

/// `HH:MM[:SS]` as seconds since midnight; `24:00` is allowed as an end.
fn parse_clock(s: &str, is_end: bool) -> Option<u32> {
    if is_end && (s == "24:00" || s == "24:00:00") {
        return Some(86_400);
    }
    let t = NaiveTime::parse_from_str(s, "%H:%M:%S")
        .or_else(|_| NaiveTime::parse_from_str(s, "%H:%M"))
        .ok()?;
    // chrono accepts one-digit fields; require the documented two-digit form.
    let parts: Vec<&str> = s.split(':').collect();
    if parts.iter().any(|p| p.len() != 2) {
        return None;
    }
    use chrono::Timelike;
    Some(t.num_seconds_from_midnight())
}

/// A date (local midnight in `tz`) or an RFC 3339 instant, as Unix seconds.
fn parse_instant(s: &str, tz: Tz) -> Option<i64> {
    if let Ok(dt) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(dt.timestamp());
    }
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    if s.len() != 10 {
        return None;
    }
    let midnight = d.and_hms_opt(0, 0, 0)?;
    // At a DST gap midnight may not exist locally; take the earliest valid instant.
    tz.from_local_datetime(&midnight)
        .earliest()
        .or_else(|| {
            tz.from_local_datetime(&(midnight + chrono::Duration::hours(1)))
                .earliest()
        })
        .map(|t| t.timestamp())
}

fn parse_weekday(s: &str) -> Option<u8> {
    let l = s.to_ascii_lowercase();
    const DAYS: [[&str; 2]; 7] = [
        ["mon", "monday"],
        ["tue", "tuesday"],
        ["wed", "wednesday"],
        ["thu", "thursday"],
        ["fri", "friday"],
        ["sat", "saturday"],
        ["sun", "sunday"],
    ];
    DAYS.iter()
        .position(|names| names.contains(&l.as_str()))
        .map(|i| i as u8)
}

/// `90`, `90s`, `15m`, `12h`, `7d` as seconds.
fn parse_duration(s: &str) -> Option<i64> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: i64 = num.parse().ok()?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests;
