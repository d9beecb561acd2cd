//! `explain`: the whole decision tree with each node's outcome, for deny pages and
//! the admin "why" API. Slower than [`CompiledPolicy::evaluate`]; never on the hot path.

use serde::Serialize;

use crate::ast::Effect;
use crate::compiled::{claim_at, str_field, Check, CompiledPolicy, Node, Truth};
use crate::request::Request;

/// Why a request would be allowed or denied.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The decision, identical to [`CompiledPolicy::evaluate`]'s.
    pub allow: bool,
    /// Pointer of the deciding rule; absent when the default deny applied.
    pub decided_by: Option<String>,
    /// Every rule, deny rules first, with its outcome.
    pub rules: Vec<RuleTrace>,
}

/// One rule's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct RuleTrace {
    /// Allow or deny.
    pub effect: Effect,
    /// Where the rule is in the document.
    pub pointer: String,
    /// Whether the rule decided or would have decided (deny rules fire on unknown too).
    pub matched: bool,
    /// The condition, node by node.
    pub condition: Trace,
}

/// One node's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    /// Where the node is in the document (`name#/pointer` inside a referenced policy).
    pub pointer: String,
    /// `and`, `or`, `not`, `nor` or `criterion`.
    pub kind: &'static str,
    /// Whether the node certainly held.
    pub matched: bool,
    /// Whether the outcome could not be decided (ambiguous input such as a repeated header).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unknown: bool,
    /// Why a criterion could not hold, when the request lacks what it looks at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'static str>,
    /// Child nodes (every child is evaluated, without short-circuit).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Trace>,
}

impl CompiledPolicy {
    /// Explains the decision for `req` criterion by criterion.
    pub fn explain(&self, req: &Request<'_>) -> Explanation {
        let decision = self.evaluate(req);
        let rules = self
            .program
            .rules
            .iter()
            .map(|r| {
                let condition = self.trace(r.root, req);
                RuleTrace {
                    effect: r.effect,
                    pointer: r.pointer.to_string(),
                    matched: r.fires(condition.outcome()),
                    condition,
                }
            })
            .collect();
        Explanation {
            allow: decision.allow,
            decided_by: decision
                .rule
                .and_then(|i| self.rule(i))
                .map(|r| r.pointer.to_string()),
            rules,
        }
    }

    fn trace(&self, idx: u32, req: &Request<'_>) -> Trace {
        let pointer = self
            .program
            .pointers
            .get(idx as usize)
            .map(|p| p.to_string())
            .unwrap_or_default();
        let outcome = self.node(idx, req);
        let matched = outcome == Truth::True;
        let (kind, children, note) = match self.program.nodes.get(idx as usize) {
            Some(Node::Leaf(c)) => (
                "criterion",
                Vec::new(),
                self.program
                    .checks
                    .get(*c as usize)
                    .and_then(|c| missing(c, req)),
            ),
            Some(&Node::All { first, len }) => ("and", self.traces(first, len, req), None),
            Some(&Node::Any { first, len }) => ("or", self.traces(first, len, req), None),
            Some(&Node::NotAll { first, len }) => ("not", self.traces(first, len, req), None),
            Some(&Node::NotAny { first, len }) => ("nor", self.traces(first, len, req), None),
            None => ("criterion", Vec::new(), Some("missing node")),
        };
        Trace {
            pointer,
            kind,
            matched,
            unknown: outcome == Truth::Unknown,
            note: if matched { None } else { note },
            children,
        }
    }

    fn traces(&self, first: u32, len: u32, req: &Request<'_>) -> Vec<Trace> {
        // Node ids follow document order; evaluation order may differ (cheapest first).
        let mut ids = self.children(first, len).to_vec();
        ids.sort_unstable();
        ids.iter().map(|&c| self.trace(c, req)).collect()
    }
}

impl Trace {
    /// The node's three-valued outcome, as the evaluator saw it.
    fn outcome(&self) -> Truth {
        if self.matched {
            Truth::True
        } else if self.unknown {
            Truth::Unknown
        } else {
            Truth::False
        }
    }
}

/// Names what the request lacks for a string field to have a value.
fn missing_str(field: &crate::ast::StrField, req: &Request<'_>) -> Option<&'static str> {
    use crate::ast::StrField;
    if str_field(field, req).is_some() {
        return None;
    }
    Some(match field {
        StrField::User => "no user",
        StrField::Email | StrField::Domain if req.user.is_none() => "no user",
        StrField::Email | StrField::Domain
            if req
                .user
                .is_some_and(|u| u.email.is_some() && !u.email_verified) =>
        {
            "email not verified"
        }
        StrField::Email => "no email",
        StrField::Domain if req.user.is_some_and(|u| u.email.is_some()) => "no domain in the email",
        StrField::Domain => "no email",
        StrField::ServiceAccount => "no service account",
        StrField::DeviceId => "no device",
        StrField::ClientCertificateIssuer => "no client certificate",
        StrField::Header(_) => "header absent or repeated",
        StrField::HttpMethod | StrField::HttpPath => return None,
    })
}

/// Names what the request lacks for a criterion to be able to hold.
fn missing(check: &Check, req: &Request<'_>) -> Option<&'static str> {
    use crate::ast::StrField;
    use crate::compiled::SymField;
    match check {
        Check::Str { field, test } if !matches!(test, crate::compiled::StrTest::Present(_)) => {
            missing_str(field, req)
        }
        // Interned fields lack a value exactly when their string form does.
        Check::Sym { field, .. } => missing_str(
            &match field {
                SymField::User => StrField::User,
                SymField::Domain => StrField::Domain,
                SymField::ServiceAccount => StrField::ServiceAccount,
                SymField::Device => StrField::DeviceId,
            },
            req,
        ),
        Check::GroupHas(_) | Check::GroupAny(_) | Check::GroupAll(_) => {
            req.user.is_none().then_some("no user")
        }
        Check::Claim { path, .. } => match req.user.and_then(|u| u.claims) {
            None => Some("no claims"),
            Some(claims) => claim_at(path, claims).is_none().then_some("claim absent"),
        },
        Check::Posture { .. } => match req.device {
            None => Some("no device"),
            Some(d) if !d.posture.is_fresh(req.now) => Some("device posture is stale"),
            Some(_) => None,
        },
        Check::Fingerprint { .. } => req
            .client_certificate
            .is_none()
            .then_some("no client certificate"),
        Check::Ip { .. } => req.source_ip.is_none().then_some("no source address"),
        Check::AuthAgeLt(_) | Check::AuthAgeGt(_) => req
            .session
            .auth_time
            .is_none()
            .then_some("no authentication time"),
        _ => None,
    }
}
