//! The parsed policy: what the document says, validated and typed, before compilation.
//!
//! Every node keeps the JSON Pointer of the text it came from, so errors, decisions
//! and `explain` can point back into the document.

use chrono_tz::Tz;
use ipnet::IpNet;
use regex::Regex;

use crate::amr::Amr;

/// A whole policy: its rules in document order.
#[derive(Debug, Clone)]
pub struct Document {
    /// The `allow` and `deny` blocks.
    pub rules: Vec<Rule>,
}

impl Document {
    /// Names of the policies this document refers to with `policy: <name>`, sorted, unique.
    pub fn references(&self) -> Vec<String> {
        fn walk(e: &Expr, out: &mut Vec<String>) {
            match &e.kind {
                ExprKind::And(c) | ExprKind::Or(c) | ExprKind::Not(c) | ExprKind::Nor(c) => {
                    c.iter().for_each(|x| walk(x, out))
                }
                ExprKind::Criterion(Criterion::Policy(n)) => out.push(n.clone()),
                ExprKind::Criterion(_) => {}
            }
        }
        let mut out = Vec::new();
        self.rules.iter().for_each(|r| walk(&r.expr, &mut out));
        out.sort();
        out.dedup();
        out
    }
}

/// Whether a rule grants or refuses access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// An `allow` block.
    Allow,
    /// A `deny` block; deny rules are checked first and beat any allow.
    Deny,
}

/// One top-level `allow` or `deny` block.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Allow or deny.
    pub effect: Effect,
    /// The block's condition.
    pub expr: Expr,
    /// Where the block is in the document, e.g. `/deny` or `/2/allow`.
    pub pointer: String,
}

/// A boolean expression node.
#[derive(Debug, Clone)]
pub struct Expr {
    /// Where the node is in the document.
    pub pointer: String,
    /// What the node is.
    pub kind: ExprKind,
}

/// The shapes of expression nodes.
#[derive(Debug, Clone)]
pub enum ExprKind {
    /// Every child holds.
    And(Vec<Expr>),
    /// At least one child holds.
    Or(Vec<Expr>),
    /// Not every child holds (the negation of `and`).
    Not(Vec<Expr>),
    /// No child holds (the negation of `or`).
    Nor(Vec<Expr>),
    /// A criterion.
    Criterion(Criterion),
}

/// A yes/no fact about the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Flag {
    /// The principal is an authenticated user (not anonymous, not a service account).
    AuthenticatedUser,
    /// The principal is a service account.
    ServiceAccount,
    /// A known device is attached to the request.
    Device,
    /// The device is approved (unknown when there is no device).
    DeviceApproved,
    /// The device's posture report has not expired (unknown when there is no device).
    DevicePostureFresh,
    /// A client certificate was presented.
    ClientCertificate,
    /// The session's authentication used several factors (see [`Amr::is_multi_factor`]).
    Mfa,
    /// A just-in-time access grant for this route is active now.
    Grant,
}

/// A string-valued field of the request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StrField {
    /// The user's id.
    User,
    /// The user's verified email, compared without regard to case.
    Email,
    /// The domain of the user's verified email, compared without regard to case.
    Domain,
    /// The service account's id.
    ServiceAccount,
    /// The device's id.
    DeviceId,
    /// The client certificate issuer's distinguished name.
    ClientCertificateIssuer,
    /// The HTTP method, compared without regard to ASCII case.
    HttpMethod,
    /// The normalised request path.
    HttpPath,
    /// A request header's value (name stored lowercase).
    Header(String),
}

impl StrField {
    /// Whether values of this field are compared case-insensitively (operands are stored folded).
    pub fn folds_case(&self) -> bool {
        matches!(
            self,
            StrField::Email | StrField::Domain | StrField::HttpMethod
        )
    }
}

/// A regular expression that must match the whole value.
#[derive(Debug, Clone)]
pub struct Pattern {
    /// The expression as written.
    pub source: String,
    /// The anchored, compiled expression.
    pub regex: Regex,
}

/// An operator over one string.
#[derive(Debug, Clone)]
pub enum StrOp {
    /// Equal to.
    Is(String),
    /// Equal to one of.
    In(Vec<String>),
    /// Present and equal to none of.
    NotIn(Vec<String>),
    /// Begins with.
    StartsWith(String),
    /// Ends with.
    EndsWith(String),
    /// The whole value matches the regular expression.
    Matches(Pattern),
    /// The value is present (`true`) or absent (`false`); headers only.
    Present(bool),
}

/// An operator over a set of names (groups).
#[derive(Debug, Clone)]
pub enum SetOp {
    /// The set contains this name.
    Has(String),
    /// The set contains at least one of these.
    AnyOf(Vec<String>),
    /// The set contains all of these.
    AllOf(Vec<String>),
}

/// A scalar operand for claims and posture attributes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Scalar {
    /// A boolean.
    Bool(bool),
    /// A number.
    Num(f64),
    /// A string.
    Str(String),
}

/// An operator over a claim or posture value (a scalar or, for claims, an array of scalars).
#[derive(Debug, Clone)]
pub enum ValueOp {
    /// The value equals.
    Is(Scalar),
    /// The value equals one of.
    In(Vec<Scalar>),
    /// The value is present and equals none of.
    NotIn(Vec<Scalar>),
    /// The value is an array containing.
    Has(Scalar),
    /// The value is an array containing at least one of.
    AnyOf(Vec<Scalar>),
    /// The value is an array containing all of.
    AllOf(Vec<Scalar>),
    /// The value is a string beginning with.
    StartsWith(String),
    /// The value is a string ending with.
    EndsWith(String),
    /// The value is a string matching the whole expression.
    Matches(Pattern),
    /// The value is a number less than.
    Lt(f64),
    /// The value is a number greater than.
    Gt(f64),
}

/// An operator over the client certificate's SPKI SHA-256 fingerprint.
#[derive(Debug, Clone)]
pub enum FingerprintOp {
    /// One of these fingerprints.
    In(Vec<[u8; 32]>),
    /// A certificate is present and has none of these fingerprints.
    NotIn(Vec<[u8; 32]>),
}

/// An operator over the source address.
#[derive(Debug, Clone)]
pub enum IpOp {
    /// Inside one of these networks.
    In(Vec<IpNet>),
    /// Known and inside none of these networks.
    NotIn(Vec<IpNet>),
}

/// A numeric comparison (seconds, for `auth_age`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NumOp {
    /// Less than.
    Lt(i64),
    /// Greater than.
    Gt(i64),
}

/// An operator over the session's authentication methods (RFC 8176 `amr`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AmrOp {
    /// Includes at least one of.
    AnyOf(Amr),
    /// Includes all of.
    AllOf(Amr),
}

/// One criterion, typed and validated.
#[derive(Debug, Clone)]
pub enum Criterion {
    /// `accept` (true) or `reject` (false).
    Const(bool),
    /// A yes/no fact compared with the expected value.
    Flag {
        /// Which fact.
        flag: Flag,
        /// What it must be.
        expect: bool,
    },
    /// String operators, all of which must hold.
    Str {
        /// Which field.
        field: StrField,
        /// The operators.
        ops: Vec<StrOp>,
    },
    /// Group membership operators.
    Groups(Vec<SetOp>),
    /// Operators on an IdP claim found by path.
    Claim {
        /// Object keys from the claims' root.
        path: Vec<String>,
        /// The operators.
        ops: Vec<ValueOp>,
    },
    /// Operators on a device posture attribute; stale posture never matches.
    Posture {
        /// The attribute's name.
        attr: String,
        /// The operators.
        ops: Vec<ValueOp>,
    },
    /// Client certificate fingerprint operators.
    Fingerprint(Vec<FingerprintOp>),
    /// Source address operators.
    SourceIp(Vec<IpOp>),
    /// Local time of day in a time zone: `after` inclusive, `before` exclusive, in
    /// seconds since local midnight; a window with `after > before` wraps midnight.
    TimeOfDay {
        /// The zone.
        tz: Tz,
        /// Start of the window.
        after: Option<u32>,
        /// End of the window.
        before: Option<u32>,
    },
    /// An instant range in Unix seconds: `after` inclusive, `before` exclusive.
    Date {
        /// Not before this instant.
        after: Option<i64>,
        /// Before this instant.
        before: Option<i64>,
    },
    /// Local day of the week in a time zone.
    Weekday {
        /// The zone.
        tz: Tz,
        /// Bit `n` set for days `n` days from Monday.
        days: u8,
        /// `not_in`: the day is none of `days`.
        negate: bool,
    },
    /// Seconds since the session's authentication.
    AuthAge(Vec<NumOp>),
    /// Authentication method operators.
    Mfa(Vec<AmrOp>),
    /// A reference to a named policy: holds when that policy allows.
    Policy(String),
}
