//! A plain recursive interpreter of the parsed document: slow, obvious, and
//! independent of the compiler's interning, bit sets, range tables and flattening.
//! It is the oracle the compiled evaluator is tested against.

use chrono::{Datelike, TimeZone, Timelike};

use crate::ast::*;
use crate::compile::Library;
use crate::compiled::Truth;
use crate::request::{HeaderValue, Request};
use crate::symbols::Symbols;

/// Evaluates `doc` for `req`: `(allowed, pointer of the deciding rule)`.
pub fn evaluate(
    doc: &Document,
    lib: Option<&dyn Library>,
    symbols: &Symbols,
    req: &Request<'_>,
) -> (bool, Option<String>) {
    let i = Interp { lib, symbols, req };
    for r in doc.rules.iter().filter(|r| r.effect == Effect::Deny) {
        if i.expr(&r.expr, 0) != Truth::False {
            return (false, Some(r.pointer.clone()));
        }
    }
    for r in doc.rules.iter().filter(|r| r.effect == Effect::Allow) {
        if i.expr(&r.expr, 0) == Truth::True {
            return (true, Some(r.pointer.clone()));
        }
    }
    (false, None)
}

struct Interp<'a, 'r> {
    lib: Option<&'a dyn Library>,
    symbols: &'a Symbols,
    req: &'a Request<'r>,
}

fn lower(s: &str) -> String {
    s.chars().flat_map(char::to_lowercase).collect()
}

impl Interp<'_, '_> {
    fn expr(&self, e: &Expr, depth: usize) -> Truth {
        // Kleene logic over False < Unknown < True: `and` is the least, `or` the greatest.
        let and = |c: &[Expr]| {
            c.iter()
                .map(|x| self.expr(x, depth))
                .min()
                .unwrap_or(Truth::True)
        };
        let or = |c: &[Expr]| {
            c.iter()
                .map(|x| self.expr(x, depth))
                .max()
                .unwrap_or(Truth::False)
        };
        match &e.kind {
            ExprKind::And(c) => and(c),
            ExprKind::Or(c) => or(c),
            ExprKind::Not(c) => !and(c),
            ExprKind::Nor(c) => !or(c),
            ExprKind::Criterion(
                c @ Criterion::Str {
                    field: StrField::Header(h),
                    ops,
                },
            ) => {
                if matches!(self.req.headers.get(h), HeaderValue::Repeated) {
                    // Presence is certain; anything about the value is not.
                    ops.iter()
                        .map(|op| match op {
                            StrOp::Present(p) => Truth::from(*p),
                            _ => Truth::Unknown,
                        })
                        .min()
                        .unwrap_or(Truth::True)
                } else {
                    Truth::from(self.criterion(c))
                }
            }
            ExprKind::Criterion(Criterion::Policy(name)) => {
                let Some(doc) = self.lib.and_then(|l| l.get(name)) else {
                    return Truth::False;
                };
                if depth > 16 {
                    return Truth::False;
                }
                let deny = doc
                    .rules
                    .iter()
                    .filter(|r| r.effect == Effect::Deny)
                    .map(|r| self.expr(&r.expr, depth + 1))
                    .max()
                    .unwrap_or(Truth::False);
                let allow = doc
                    .rules
                    .iter()
                    .filter(|r| r.effect == Effect::Allow)
                    .map(|r| self.expr(&r.expr, depth + 1))
                    .max()
                    .unwrap_or(Truth::False);
                (!deny).min(allow)
            }
            ExprKind::Criterion(c) => Truth::from(self.criterion(c)),
        }
    }

    fn criterion(&self, c: &Criterion) -> bool {
        let req = self.req;
        match c {
            Criterion::Const(b) => *b,
            Criterion::Flag { flag, expect } => {
                let v = match flag {
                    Flag::AuthenticatedUser => Some(req.user.is_some()),
                    Flag::ServiceAccount => Some(req.service_account.is_some()),
                    Flag::Device => Some(req.device.is_some()),
                    Flag::DeviceApproved => req.device.map(|d| d.approved),
                    Flag::DevicePostureFresh => req
                        .device
                        .map(|d| d.posture.expires_at.is_none_or(|e| req.now < e)),
                    Flag::ClientCertificate => Some(req.client_certificate.is_some()),
                    Flag::Mfa => {
                        let used = |names: &[&str]| {
                            names.iter().any(|n| {
                                crate::Amr::bit(n).is_some_and(|b| req.session.amr.0 & b.0 != 0)
                            })
                        };
                        let factors = [
                            &["pwd", "pin", "kba"][..],
                            &["hwk", "swk", "otp", "sms", "tel", "sc", "pop"],
                            &["face", "fpt", "iris", "retina", "vbm"],
                        ];
                        Some(used(&["mfa"]) || factors.iter().filter(|f| used(f)).count() >= 2)
                    }
                    Flag::Grant => Some(
                        req.grants
                            .iter()
                            .any(|g| g.start <= req.now && req.now < g.end),
                    ),
                };
                v == Some(*expect)
            }
            Criterion::Str { field, ops } => ops.iter().all(|op| self.str_op(field, op)),
            Criterion::Groups(ops) => {
                let Some(u) = req.user else { return false };
                let names: Vec<&str> = u
                    .groups
                    .iter()
                    .filter_map(|g| self.symbols.groups.name(*g))
                    .collect();
                ops.iter().all(|op| match op {
                    SetOp::Has(g) => names.contains(&g.as_str()),
                    SetOp::AnyOf(l) => l.iter().any(|g| names.contains(&g.as_str())),
                    SetOp::AllOf(l) => l.iter().all(|g| names.contains(&g.as_str())),
                })
            }
            Criterion::Claim { path, ops } => {
                let mut v = match req.user.and_then(|u| u.claims) {
                    Some(v) => v,
                    None => return false,
                };
                for p in path {
                    match v.as_object().and_then(|o| o.get(p)) {
                        Some(n) => v = n,
                        None => return false,
                    }
                }
                let v = v.clone();
                ops.iter().all(|op| value_op(op, &v, false))
            }
            Criterion::Posture { attr, ops } => {
                let Some(d) = req.device else { return false };
                if d.posture.expires_at.is_some_and(|e| req.now >= e) {
                    return false;
                }
                let found = d
                    .posture
                    .attributes
                    .iter()
                    .find(|(s, _)| self.symbols.attributes.name(*s) == Some(attr.as_str()));
                let Some((_, v)) = found else { return false };
                let v = match v {
                    Scalar::Bool(b) => serde_json::Value::Bool(*b),
                    Scalar::Num(n) => serde_json::Number::from_f64(*n)
                        .map_or(serde_json::Value::Null, serde_json::Value::Number),
                    Scalar::Str(s) => serde_json::Value::String(s.clone()),
                };
                ops.iter().all(|op| value_op(op, &v, true))
            }
            Criterion::Fingerprint(ops) => {
                let Some(c) = req.client_certificate else {
                    return false;
                };
                ops.iter().all(|op| match op {
                    FingerprintOp::In(l) => l.contains(&c.spki_sha256),
                    FingerprintOp::NotIn(l) => !l.contains(&c.spki_sha256),
                })
            }
            Criterion::SourceIp(ops) => {
                let Some(ip) = req.source_ip.map(|i| i.to_canonical()) else {
                    return false;
                };
                ops.iter().all(|op| match op {
                    IpOp::In(n) => n.iter().any(|n| n.contains(&ip)),
                    IpOp::NotIn(n) => !n.iter().any(|n| n.contains(&ip)),
                })
            }
            Criterion::TimeOfDay { tz, after, before } => {
                let Some(t) = tz.timestamp_opt(req.now, 0).single() else {
                    return false;
                };
                let secs = t.time().num_seconds_from_midnight();
                let (a, b) = (after.unwrap_or(0), before.unwrap_or(86_400));
                if a < b {
                    a <= secs && secs < b
                } else {
                    secs >= a || secs < b
                }
            }
            Criterion::Date { after, before } => {
                after.is_none_or(|a| req.now >= a) && before.is_none_or(|b| req.now < b)
            }
            Criterion::Weekday { tz, days, negate } => {
                let Some(t) = tz.timestamp_opt(req.now, 0).single() else {
                    return false;
                };
                let d = t.weekday().num_days_from_monday();
                (days & (1 << d) != 0) != *negate
            }
            Criterion::AuthAge(ops) => {
                let Some(at) = req.session.auth_time else {
                    return false;
                };
                let age = req.now.saturating_sub(at);
                ops.iter().all(|op| match op {
                    NumOp::Lt(n) => age < *n,
                    NumOp::Gt(n) => age > *n,
                })
            }
            Criterion::Mfa(ops) => ops.iter().all(|op| match op {
                AmrOp::AnyOf(s) => req.session.amr.0 & s.0 != 0,
                AmrOp::AllOf(s) => req.session.amr.0 & s.0 == s.0,
            }),
            Criterion::Policy(_) => false, // handled in `expr`, where unknown can propagate
        }
    }

    fn str_op(&self, field: &StrField, op: &StrOp) -> bool {
        let req = self.req;
        let value: Option<&str> = match field {
            StrField::User => req.user.map(|u| u.id.name),
            StrField::Email => req.user.filter(|u| u.email_verified).and_then(|u| u.email),
            StrField::Domain => req
                .user
                .filter(|u| u.email_verified)
                .and_then(|u| u.email)
                .and_then(|e| e.rsplit_once('@'))
                .map(|x| x.1),
            StrField::ServiceAccount => req.service_account.map(|s| s.name),
            StrField::DeviceId => req.device.map(|d| d.id.name),
            StrField::ClientCertificateIssuer => req.client_certificate.map(|c| c.issuer),
            StrField::HttpMethod => Some(req.method),
            StrField::HttpPath => Some(req.path),
            StrField::Header(h) => match req.headers.get(h) {
                HeaderValue::One(v) => Some(v),
                _ => None,
            },
        };
        if let StrOp::Present(p) = op {
            return value.is_some() == *p;
        }
        let Some(v) = value else { return false };
        let ci = field.folds_case();
        let v: String = match field {
            StrField::HttpMethod => v.to_ascii_uppercase(),
            _ if ci => lower(v),
            _ => v.to_owned(),
        };
        match op {
            StrOp::Is(w) => v == *w,
            StrOp::In(l) => l.contains(&v),
            StrOp::NotIn(l) => !l.contains(&v),
            StrOp::StartsWith(w) => v.starts_with(w.as_str()),
            StrOp::EndsWith(w) => v.ends_with(w.as_str()),
            // The pattern was built with the field's case rule.
            StrOp::Matches(p) => p.regex.is_match(value.unwrap_or_default()),
            StrOp::Present(_) => false,
        }
    }
}

fn scalar_eq(v: &serde_json::Value, s: &Scalar) -> bool {
    match (v, s) {
        (serde_json::Value::Bool(a), Scalar::Bool(b)) => a == b,
        (serde_json::Value::Number(a), Scalar::Num(b)) => a.as_f64() == Some(*b),
        (serde_json::Value::String(a), Scalar::Str(b)) => a == b,
        _ => false,
    }
}

fn value_op(op: &ValueOp, v: &serde_json::Value, _posture: bool) -> bool {
    let scalar = matches!(
        v,
        serde_json::Value::Bool(_) | serde_json::Value::Number(_) | serde_json::Value::String(_)
    );
    let arr = v.as_array();
    match op {
        ValueOp::Is(s) => scalar_eq(v, s),
        ValueOp::In(l) => scalar && l.iter().any(|s| scalar_eq(v, s)),
        ValueOp::NotIn(l) => scalar && !l.iter().any(|s| scalar_eq(v, s)),
        ValueOp::Has(s) => arr.is_some_and(|a| a.iter().any(|x| scalar_eq(x, s))),
        ValueOp::AnyOf(l) => {
            arr.is_some_and(|a| l.iter().any(|s| a.iter().any(|x| scalar_eq(x, s))))
        }
        ValueOp::AllOf(l) => {
            arr.is_some_and(|a| l.iter().all(|s| a.iter().any(|x| scalar_eq(x, s))))
        }
        ValueOp::StartsWith(p) => v.as_str().is_some_and(|s| s.starts_with(p.as_str())),
        ValueOp::EndsWith(p) => v.as_str().is_some_and(|s| s.ends_with(p.as_str())),
        ValueOp::Matches(p) => v.as_str().is_some_and(|s| p.regex.is_match(s)),
        ValueOp::Lt(n) => v.as_f64().is_some_and(|x| x < *n),
        ValueOp::Gt(n) => v.as_f64().is_some_and(|x| x > *n),
    }
}
