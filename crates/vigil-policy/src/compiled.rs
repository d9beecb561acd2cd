//! The compiled policy: a flat, serialisable program the proxy evaluates without
//! re-reading policy text, plus the evaluator and `explain`.

use std::net::IpAddr;

use chrono_tz::Tz;
use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use crate::amr::Amr;
use crate::ast::{Effect, Flag, Scalar, StrField};
use crate::request::{HeaderValue, Request};
use crate::symbols::{Interner, Sym, Symbols};
use crate::text::{fold_ends_with, fold_eq, fold_starts_with};

/// Bumped when the serialised form changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

/// Interned fields compared by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum SymField {
    User,
    Domain,
    ServiceAccount,
    Device,
}

/// A string test; `In`/`NotIn` lists are sorted (and folded where the field folds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum StrTest {
    Eq(Box<str>),
    In(Box<[Box<str>]>),
    NotIn(Box<[Box<str>]>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Regex(u32),
    Present(bool),
}

/// A test on a claim or posture value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum ValueTest {
    Is(Scalar),
    In(Box<[Scalar]>),
    NotIn(Box<[Scalar]>),
    Has(Scalar),
    AnyOf(Box<[Scalar]>),
    AllOf(Box<[Scalar]>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Regex(u32),
    Lt(f64),
    Gt(f64),
}

/// A set of small integers covering `base..base + 64 * words.len()`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BitSet {
    base: u32,
    words: Box<[u64]>,
}

impl BitSet {
    pub fn from_ids(ids: &[u32]) -> BitSet {
        let (Some(&min), Some(&max)) = (ids.iter().min(), ids.iter().max()) else {
            return BitSet {
                base: 0,
                words: Box::new([]),
            };
        };
        let base = min & !63;
        let mut words = vec![0u64; ((max - base) / 64 + 1) as usize];
        for &id in ids {
            let off = id - base;
            words[(off / 64) as usize] |= 1 << (off % 64);
        }
        BitSet {
            base,
            words: words.into(),
        }
    }

    #[inline]
    pub fn contains(&self, id: u32) -> bool {
        let Some(off) = id.checked_sub(self.base) else {
            return false;
        };
        self.words
            .get((off / 64) as usize)
            .is_some_and(|w| w & (1 << (off % 64)) != 0)
    }

    /// The ids in the set, ascending. A bit past `u32::MAX` (only a hand-made program
    /// has one) can never be matched by [`BitSet::contains`] and is skipped.
    pub(crate) fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(move |(i, &word)| {
            let start = u64::from(self.base) + 64 * i as u64;
            std::iter::successors(Some(word), |&w| Some(w & w.wrapping_sub(1)))
                .take_while(|&w| w != 0)
                .filter_map(move |w| u32::try_from(start + u64::from(w.trailing_zeros())).ok())
        })
    }
}

/// Sorted, merged, inclusive address ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PrefixTable {
    v4: Box<[(u32, u32)]>,
    v6: Box<[(u128, u128)]>,
}

fn merge<T: Ord + Copy>(mut ranges: Vec<(T, T)>, succ: impl Fn(T) -> Option<T>) -> Box<[(T, T)]> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        if let Some(last) = out.last_mut() {
            if succ(last.1).is_none_or(|n| lo <= n) {
                last.1 = last.1.max(hi);
                continue;
            }
        }
        out.push((lo, hi));
    }
    out.into()
}

fn lookup<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
    let i = ranges.partition_point(|(lo, _)| *lo <= x);
    i > 0 && x <= ranges[i - 1].1
}

impl PrefixTable {
    pub fn from_nets(nets: &[ipnet::IpNet]) -> PrefixTable {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for n in nets {
            match n {
                ipnet::IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()))),
                ipnet::IpNet::V6(n) => {
                    v6.push((u128::from(n.network()), u128::from(n.broadcast())))
                }
            }
        }
        PrefixTable {
            v4: merge(v4, |x: u32| x.checked_add(1)),
            v6: merge(v6, |x: u128| x.checked_add(1)),
        }
    }

    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => lookup(&self.v4, u32::from(a)),
            IpAddr::V6(a) => lookup(&self.v6, u128::from(a)),
        }
    }
}

/// One atomic test against the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Check {
    Const(bool),
    Flag {
        flag: Flag,
        expect: bool,
    },
    Sym {
        field: SymField,
        set: Box<[u32]>,
        negate: bool,
    },
    Str {
        field: StrField,
        test: StrTest,
    },
    GroupHas(u32),
    GroupAny(BitSet),
    GroupAll(Box<[u32]>),
    Claim {
        path: Box<[Box<str>]>,
        test: ValueTest,
    },
    Posture {
        attr: u32,
        test: ValueTest,
    },
    Fingerprint {
        set: Box<[[u8; 32]]>,
        negate: bool,
    },
    Ip {
        table: PrefixTable,
        negate: bool,
    },
    TimeOfDay {
        zone: u32,
        after: u32,
        before: u32,
    },
    Date {
        after: i64,
        before: i64,
    },
    Weekday {
        zone: u32,
        days: u8,
    },
    AuthAgeLt(i64),
    AuthAgeGt(i64),
    AmrAny(Amr),
    AmrAll(Amr),
}

/// A node of the flattened tree; children are `edges[first..first + len]` and
/// always have smaller indices than their parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Node {
    Leaf(u32),
    All { first: u32, len: u32 },
    Any { first: u32, len: u32 },
    NotAll { first: u32, len: u32 },
    NotAny { first: u32, len: u32 },
}

/// A top-level rule of the compiled policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleInfo {
    /// Allow or deny.
    pub effect: Effect,
    /// JSON Pointer of the block in the source document.
    pub pointer: Box<str>,
    pub(crate) root: u32,
}

/// The serialised part of a compiled policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Program {
    pub checks: Vec<Check>,
    pub nodes: Vec<Node>,
    pub edges: Vec<u32>,
    /// Deny rules first, each group in document order.
    pub rules: Vec<RuleInfo>,
    /// Source pointer of each node, for `explain`.
    pub pointers: Vec<Box<str>>,
    /// Regular expressions as written (anchored on load) and whether they ignore case.
    pub patterns: Vec<(Box<str>, bool)>,
    /// IANA names of the time zones used.
    pub zones: Vec<Box<str>>,
}

/// A policy ready to evaluate. Cheap to share; evaluation borrows it immutably.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub(crate) program: Program,
    regexes: Vec<Regex>,
    tzs: Vec<Tz>,
}

/// Why a compiled policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not a compiled policy of a known version.
    #[error("undecodable compiled policy: {0}")]
    Decode(String),
    /// The program is internally inconsistent (bad index, cycle, unknown zone or pattern).
    #[error("inconsistent compiled policy: {0}")]
    Invalid(String),
}

/// Three-valued outcome of a node. Only ambiguous input (a repeated header) is
/// `Unknown`; it never allows and always lets a deny rule fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Truth {
    /// Certainly does not hold.
    False,
    /// Cannot be decided from the request.
    Unknown,
    /// Certainly holds.
    True,
}

impl std::ops::Not for Truth {
    type Output = Truth;

    /// Kleene negation: unknown stays unknown.
    fn not(self) -> Truth {
        match self {
            Truth::False => Truth::True,
            Truth::Unknown => Truth::Unknown,
            Truth::True => Truth::False,
        }
    }
}

impl From<bool> for Truth {
    fn from(b: bool) -> Truth {
        if b {
            Truth::True
        } else {
            Truth::False
        }
    }
}

impl RuleInfo {
    /// Whether a rule with this outcome decides: allow needs certainty, deny
    /// fires unless it certainly does not hold.
    pub fn fires(&self, t: Truth) -> bool {
        match self.effect {
            Effect::Allow => t == Truth::True,
            Effect::Deny => t != Truth::False,
        }
    }
}

/// The outcome of evaluating a policy for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allow: bool,
    /// Index (see [`CompiledPolicy::rule`]) of the rule that decided; `None` when no rule
    /// matched and the default deny applied.
    pub rule: Option<u32>,
}

impl Decision {
    /// The default outcome: nothing matched, so deny.
    pub const DEFAULT_DENY: Decision = Decision {
        allow: false,
        rule: None,
    };
}

/// Most nodes deep a loaded program may be (the compiler stays far below).
const MAX_LOADED_DEPTH: usize = 1024;

/// Builds `source` matched against the whole value. The source must stand alone as
/// an expression first: `a)|(?:b` would otherwise escape the anchors.
pub(crate) fn anchored_regex(
    source: &str,
    ignore_case: bool,
    size_limit: usize,
) -> Result<Regex, regex::Error> {
    let build = |re: &str| {
        RegexBuilder::new(re)
            .case_insensitive(ignore_case)
            .size_limit(size_limit)
            .build()
    };
    build(source).and_then(|_| build(&format!("^(?:{source})$")))
}

impl CompiledPolicy {
    pub(crate) fn from_program(program: Program) -> Result<CompiledPolicy, LoadError> {
        validate(&program)?;
        let regexes = program
            .patterns
            .iter()
            .map(|(p, ci)| {
                anchored_regex(p, *ci, 1 << 20)
                    .map_err(|e| LoadError::Invalid(format!("pattern {p:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let tzs = program
            .zones
            .iter()
            .map(|z| {
                z.parse::<Tz>()
                    .map_err(|_| LoadError::Invalid(format!("unknown time zone {z:?}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(CompiledPolicy {
            program,
            regexes,
            tzs,
        })
    }

    /// The stable binary form (postcard), versioned, for the snapshot.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain owned data into a Vec cannot fail.
        postcard::to_allocvec(&(FORMAT_VERSION, &self.program)).unwrap_or_default()
    }

    /// Loads the binary form, checking every index so a hostile program cannot panic
    /// or loop the evaluator.
    pub fn from_bytes(bytes: &[u8]) -> Result<CompiledPolicy, LoadError> {
        let (version, program): (u32, Program) =
            postcard::from_bytes(bytes).map_err(|e| LoadError::Decode(e.to_string()))?;
        if version != FORMAT_VERSION {
            return Err(LoadError::Decode(format!(
                "format version {version}, expected {FORMAT_VERSION}"
            )));
        }
        CompiledPolicy::from_program(program)
    }

    /// Re-expresses a policy compiled against `from` in terms of `to`, interning into `to`
    /// every name the policy uses. A snapshot ships each policy with its own small symbol
    /// table; the proxy relinks them all into one table shared with its users and devices.
    ///
    /// Only interned ids change (sets are re-sorted, as the compiler emits them); the
    /// tree, its evaluation order and every other operand stay as they are, so the result
    /// decides every request exactly as the policy compiled directly against `to` would.
    /// An id that `from` does not hold is [`LoadError::Invalid`], reported before anything
    /// is interned into `to`. Since only ids change, the result keeps every property
    /// `self` was validated for.
    pub fn relink(&self, from: &Symbols, to: &mut Symbols) -> Result<CompiledPolicy, LoadError> {
        let mut program = self.program.clone();
        // A first pass only resolves (keeping every id), so a bad id leaves `to` untouched.
        let mut resolve = |ns: Namespace, id: u32| ns.name(from, id).map(|_| id);
        for check in &mut program.checks {
            relink_check(check, &mut resolve)?;
        }
        let mut relink = |ns: Namespace, id: u32| -> Result<u32, LoadError> {
            let name = ns.name(from, id)?;
            Ok(ns.table_mut(to).intern(name).0)
        };
        for check in &mut program.checks {
            relink_check(check, &mut relink)?;
        }
        debug_assert!(
            validate(&program).is_ok(),
            "relinking keeps a program valid"
        );
        // Patterns and zones are unchanged: reuse what `self` already built from them.
        Ok(CompiledPolicy {
            program,
            regexes: self.regexes.clone(),
            tzs: self.tzs.clone(),
        })
    }

    /// The rules, deny rules first.
    pub fn rules(&self) -> &[RuleInfo] {
        &self.program.rules
    }

    /// One rule by the index a [`Decision`] carries.
    pub fn rule(&self, index: u32) -> Option<&RuleInfo> {
        self.program.rules.get(index as usize)
    }

    /// Whether any check reads a request header (a caller that decides a request
    /// again later needs to keep its headers only then).
    pub fn reads_headers(&self) -> bool {
        self.program.checks.iter().any(|c| {
            matches!(
                c,
                Check::Str {
                    field: StrField::Header(_),
                    ..
                }
            )
        })
    }

    /// Decides one request: the first deny rule that holds — or cannot be ruled out
    /// because the input is ambiguous — denies; else the first allow rule that
    /// certainly holds allows; else deny.
    pub fn evaluate(&self, req: &Request<'_>) -> Decision {
        // Rules are stored deny-first, so the first rule that fires decides.
        for (i, rule) in self.program.rules.iter().enumerate() {
            if rule.fires(self.node(rule.root, req)) {
                return Decision {
                    allow: rule.effect == Effect::Allow,
                    rule: Some(i as u32),
                };
            }
        }
        Decision::DEFAULT_DENY
    }

    pub(crate) fn children(&self, first: u32, len: u32) -> &[u32] {
        let start = first as usize;
        self.program
            .edges
            .get(start..start + len as usize)
            .unwrap_or(&[])
    }

    pub(crate) fn node(&self, idx: u32, req: &Request<'_>) -> Truth {
        let Some(node) = self.program.nodes.get(idx as usize) else {
            return Truth::False;
        };
        match *node {
            Node::Leaf(c) => self.check(c, req),
            Node::All { first, len } => self.all(self.children(first, len), req),
            Node::Any { first, len } => self.any(self.children(first, len), req),
            Node::NotAll { first, len } => !self.all(self.children(first, len), req),
            Node::NotAny { first, len } => !self.any(self.children(first, len), req),
        }
    }

    fn all(&self, children: &[u32], req: &Request<'_>) -> Truth {
        let mut acc = Truth::True;
        for &c in children {
            match self.node(c, req) {
                Truth::False => return Truth::False,
                t => acc = acc.min(t),
            }
        }
        acc
    }

    fn any(&self, children: &[u32], req: &Request<'_>) -> Truth {
        let mut acc = Truth::False;
        for &c in children {
            match self.node(c, req) {
                Truth::True => return Truth::True,
                t => acc = acc.max(t),
            }
        }
        acc
    }

    fn check(&self, idx: u32, req: &Request<'_>) -> Truth {
        match self.program.checks.get(idx as usize) {
            Some(Check::Str {
                field: field @ StrField::Header(name),
                test,
            }) => match (req.headers.get(name), test) {
                (HeaderValue::Repeated, StrTest::Present(p)) => Truth::from(*p),
                (HeaderValue::Repeated, _) => Truth::Unknown,
                (HeaderValue::One(v), _) => self.str_test(field, test, Some(v)).into(),
                (HeaderValue::Absent, _) => self.str_test(field, test, None).into(),
            },
            Some(check) => self.check_bool(check, req).into(),
            None => Truth::False,
        }
    }

    fn check_bool(&self, check: &Check, req: &Request<'_>) -> bool {
        match check {
            Check::Const(b) => *b,
            Check::Flag { flag, expect } => flag_value(*flag, req) == Some(*expect),
            Check::Sym { field, set, negate } => {
                let sym = match field {
                    SymField::User => req.user.map(|u| u.id.sym),
                    // Only a verified email with a domain has one (as for the string field).
                    SymField::Domain => req.email_domain().and(req.user.map(|u| u.domain)),
                    SymField::ServiceAccount => req.service_account.map(|s| s.sym),
                    SymField::Device => req.device.map(|d| d.id.sym),
                };
                match sym {
                    Some(s) => set.binary_search(&s.0).is_ok() != *negate,
                    None => false,
                }
            }
            Check::Str { field, test } => self.str_test(field, test, str_field(field, req)),
            Check::GroupHas(g) => req.user.is_some_and(|u| u.groups.iter().any(|s| s.0 == *g)),
            Check::GroupAny(set) => req
                .user
                .is_some_and(|u| u.groups.iter().any(|s| set.contains(s.0))),
            Check::GroupAll(all) => req
                .user
                .is_some_and(|u| all.iter().all(|g| u.groups.iter().any(|s| s.0 == *g))),
            Check::Claim { path, test } => req
                .user
                .and_then(|u| u.claims)
                .and_then(|claims| claim_at(path, claims))
                .is_some_and(|v| self.value_test(test, ValRef::from_json(v))),
            Check::Posture { attr, test } => {
                let Some(d) = req.device else { return false };
                if !d.posture.is_fresh(req.now) {
                    return false;
                }
                match d.posture.get(crate::Sym(*attr)) {
                    Some(v) => self.value_test(test, ValRef::from_scalar(v)),
                    None => false,
                }
            }
            Check::Fingerprint { set, negate } => match req.client_certificate {
                Some(c) => set.binary_search(&c.spki_sha256).is_ok() != *negate,
                None => false,
            },
            Check::Ip { table, negate } => match req.source_ip {
                Some(ip) => table.contains(ip) != *negate,
                None => false,
            },
            Check::TimeOfDay {
                zone,
                after,
                before,
            } => {
                let Some(local) = self.local_seconds(*zone, req.now) else {
                    return false;
                };
                let t = local.rem_euclid(86_400) as u32;
                if after < before {
                    *after <= t && t < *before
                } else {
                    t >= *after || t < *before
                }
            }
            Check::Date { after, before } => *after <= req.now && req.now < *before,
            Check::Weekday { zone, days } => {
                let Some(local) = self.local_seconds(*zone, req.now) else {
                    return false;
                };
                // 1970-01-01 was a Thursday: three days after Monday.
                let day = (local.div_euclid(86_400) + 3).rem_euclid(7);
                days & (1 << day) != 0
            }
            Check::AuthAgeLt(n) => req
                .session
                .auth_time
                .is_some_and(|t| req.now.saturating_sub(t) < *n),
            Check::AuthAgeGt(n) => req
                .session
                .auth_time
                .is_some_and(|t| req.now.saturating_sub(t) > *n),
            Check::AmrAny(set) => req.session.amr.contains_any(*set),
            Check::AmrAll(set) => req.session.amr.contains_all(*set),
        }
    }

    /// Unix seconds shifted by the zone's UTC offset at `now`.
    fn local_seconds(&self, zone: u32, now: i64) -> Option<i64> {
        let tz = self.tzs.get(zone as usize)?;
        Some(now + i64::from(crate::zone::offset(*tz, now)?))
    }

    fn regex(&self, idx: u32) -> Option<&Regex> {
        self.regexes.get(idx as usize)
    }

    fn str_test(&self, field: &StrField, test: &StrTest, value: Option<&str>) -> bool {
        if let StrTest::Present(p) = test {
            return value.is_some() == *p;
        }
        let Some(v) = value else { return false };
        let folds = field.folds_case();
        // Operands of folding fields are stored folded.
        let eq = |want: &str| if folds { fold_eq(v, want) } else { v == want };
        match test {
            StrTest::Eq(w) => eq(w),
            StrTest::In(list) if folds => list.iter().any(|w| eq(w)),
            StrTest::In(list) => list.binary_search_by(|w| (**w).cmp(v)).is_ok(),
            StrTest::NotIn(list) if folds => !list.iter().any(|w| eq(w)),
            StrTest::NotIn(list) => list.binary_search_by(|w| (**w).cmp(v)).is_err(),
            StrTest::Prefix(p) if folds => fold_starts_with(v, p),
            StrTest::Prefix(p) => v.starts_with(&**p),
            StrTest::Suffix(s) if folds => fold_ends_with(v, s),
            StrTest::Suffix(s) => v.ends_with(&**s),
            StrTest::Regex(i) => self.regex(*i).is_some_and(|r| r.is_match(v)),
            StrTest::Present(_) => false,
        }
    }

    fn value_test(&self, test: &ValueTest, v: ValRef<'_>) -> bool {
        match test {
            ValueTest::Is(s) => v.eq_scalar(s),
            ValueTest::In(list) => v.is_scalar() && list.iter().any(|s| v.eq_scalar(s)),
            ValueTest::NotIn(list) => v.is_scalar() && !list.iter().any(|s| v.eq_scalar(s)),
            ValueTest::Has(s) => v.array_has(s),
            ValueTest::AnyOf(list) => list.iter().any(|s| v.array_has(s)),
            ValueTest::AllOf(list) => v.is_array() && list.iter().all(|s| v.array_has(s)),
            ValueTest::Prefix(p) => v.as_str().is_some_and(|s| s.starts_with(&**p)),
            ValueTest::Suffix(p) => v.as_str().is_some_and(|s| s.ends_with(&**p)),
            ValueTest::Regex(i) => v
                .as_str()
                .is_some_and(|s| self.regex(*i).is_some_and(|r| r.is_match(s))),
            ValueTest::Lt(n) => v.as_num().is_some_and(|x| x < *n),
            ValueTest::Gt(n) => v.as_num().is_some_and(|x| x > *n),
        }
    }
}

/// The value of a yes/no fact; `None` when its subject is absent.
pub(crate) fn flag_value(flag: Flag, req: &Request<'_>) -> Option<bool> {
    Some(match flag {
        Flag::AuthenticatedUser => req.user.is_some(),
        Flag::ServiceAccount => req.service_account.is_some(),
        Flag::Device => req.device.is_some(),
        Flag::DeviceApproved => req.device?.approved,
        Flag::DevicePostureFresh => req.device?.posture.is_fresh(req.now),
        Flag::ClientCertificate => req.client_certificate.is_some(),
        Flag::Mfa => req.session.amr.is_multi_factor(),
        Flag::Grant => req.has_active_grant(),
    })
}

/// The claim at `path` inside the claims object, if there is one.
pub(crate) fn claim_at<'a>(
    path: &[Box<str>],
    claims: &'a serde_json::Value,
) -> Option<&'a serde_json::Value> {
    path.iter().try_fold(claims, |v, seg| v.get(&**seg))
}

/// The value of a string field; `None` when absent (then only `Present(false)` holds).
pub(crate) fn str_field<'a>(field: &StrField, req: &Request<'a>) -> Option<&'a str> {
    match field {
        StrField::User => req.user.map(|u| u.id.name),
        StrField::Email => req.verified_email(),
        StrField::Domain => req.email_domain(),
        StrField::ServiceAccount => req.service_account.map(|s| s.name),
        StrField::DeviceId => req.device.map(|d| d.id.name),
        StrField::ClientCertificateIssuer => req.client_certificate.map(|c| c.issuer),
        StrField::HttpMethod => Some(req.method),
        StrField::HttpPath => Some(req.path),
        StrField::Header(name) => match req.headers.get(name) {
            HeaderValue::One(v) => Some(v),
            HeaderValue::Absent | HeaderValue::Repeated => None,
        },
    }
}

/// A borrowed claim or posture value.
#[derive(Clone, Copy)]
pub(crate) enum ValRef<'a> {
    Bool(bool),
    Num(f64),
    Str(&'a str),
    Array(&'a [serde_json::Value]),
    Other,
}

impl<'a> ValRef<'a> {
    pub fn from_json(v: &'a serde_json::Value) -> ValRef<'a> {
        match v {
            serde_json::Value::Bool(b) => ValRef::Bool(*b),
            serde_json::Value::Number(n) => n.as_f64().map_or(ValRef::Other, ValRef::Num),
            serde_json::Value::String(s) => ValRef::Str(s),
            serde_json::Value::Array(a) => ValRef::Array(a),
            _ => ValRef::Other,
        }
    }

    pub fn from_scalar(s: &'a Scalar) -> ValRef<'a> {
        match s {
            Scalar::Bool(b) => ValRef::Bool(*b),
            Scalar::Num(n) => ValRef::Num(*n),
            Scalar::Str(s) => ValRef::Str(s),
        }
    }

    fn eq_scalar(self, s: &Scalar) -> bool {
        match (self, s) {
            (ValRef::Bool(a), Scalar::Bool(b)) => a == *b,
            (ValRef::Num(a), Scalar::Num(b)) => a == *b,
            (ValRef::Str(a), Scalar::Str(b)) => a == b,
            _ => false,
        }
    }

    fn is_scalar(self) -> bool {
        matches!(self, ValRef::Bool(_) | ValRef::Num(_) | ValRef::Str(_))
    }

    fn is_array(self) -> bool {
        matches!(self, ValRef::Array(_))
    }

    fn array_has(self, s: &Scalar) -> bool {
        match self {
            ValRef::Array(items) => items.iter().any(|i| ValRef::from_json(i).eq_scalar(s)),
            _ => false,
        }
    }

    fn as_str(self) -> Option<&'a str> {
        match self {
            ValRef::Str(s) => Some(s),
            _ => None,
        }
    }

    fn as_num(self) -> Option<f64> {
        match self {
            ValRef::Num(n) => Some(n),
            _ => None,
        }
    }
}

/// A symbol namespace a check refers to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Namespace {
    Users,
    Groups,
    ServiceAccounts,
    Devices,
    Attributes,
    Domains,
}

impl Namespace {
    pub(crate) fn of(field: SymField) -> Namespace {
        match field {
            SymField::User => Namespace::Users,
            SymField::Domain => Namespace::Domains,
            SymField::ServiceAccount => Namespace::ServiceAccounts,
            SymField::Device => Namespace::Devices,
        }
    }

    fn table(self, s: &Symbols) -> &Interner {
        match self {
            Namespace::Users => &s.users,
            Namespace::Groups => &s.groups,
            Namespace::ServiceAccounts => &s.service_accounts,
            Namespace::Devices => &s.devices,
            Namespace::Attributes => &s.attributes,
            Namespace::Domains => &s.domains,
        }
    }

    pub(crate) fn table_mut(self, s: &mut Symbols) -> &mut Interner {
        match self {
            Namespace::Users => &mut s.users,
            Namespace::Groups => &mut s.groups,
            Namespace::ServiceAccounts => &mut s.service_accounts,
            Namespace::Devices => &mut s.devices,
            Namespace::Attributes => &mut s.attributes,
            Namespace::Domains => &mut s.domains,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Namespace::Users => "user",
            Namespace::Groups => "group",
            Namespace::ServiceAccounts => "service account",
            Namespace::Devices => "device",
            Namespace::Attributes => "posture attribute",
            Namespace::Domains => "domain",
        }
    }

    /// The name of `id` in `symbols`, or why there is none.
    fn name(self, symbols: &Symbols, id: u32) -> Result<&str, LoadError> {
        self.table(symbols).name(Sym(id)).ok_or_else(|| {
            LoadError::Invalid(format!(
                "{} id {id} is not in the policy's symbol table",
                self.label()
            ))
        })
    }
}

/// Replaces every interned id in `check` by `map` of it, leaving sets sorted and
/// deduplicated as the compiler emits them. Nothing else in the check changes.
fn relink_check(
    check: &mut Check,
    map: &mut impl FnMut(Namespace, u32) -> Result<u32, LoadError>,
) -> Result<(), LoadError> {
    match check {
        Check::Sym { field, set, .. } => {
            *set = relink_set(Namespace::of(*field), set.iter().copied(), map)?.into();
        }
        Check::GroupHas(g) => *g = map(Namespace::Groups, *g)?,
        Check::GroupAny(set) => {
            *set = BitSet::from_ids(&relink_set(Namespace::Groups, set.ids(), map)?);
        }
        Check::GroupAll(all) => {
            *all = relink_set(Namespace::Groups, all.iter().copied(), map)?.into();
        }
        Check::Posture { attr, .. } => *attr = map(Namespace::Attributes, *attr)?,
        Check::Const(_)
        | Check::Flag { .. }
        | Check::Str { .. }
        | Check::Claim { .. }
        | Check::Fingerprint { .. }
        | Check::Ip { .. }
        | Check::TimeOfDay { .. }
        | Check::Date { .. }
        | Check::Weekday { .. }
        | Check::AuthAgeLt(_)
        | Check::AuthAgeGt(_)
        | Check::AmrAny(_)
        | Check::AmrAll(_) => {}
    }
    Ok(())
}

fn relink_set(
    ns: Namespace,
    ids: impl Iterator<Item = u32>,
    map: &mut impl FnMut(Namespace, u32) -> Result<u32, LoadError>,
) -> Result<Vec<u32>, LoadError> {
    let mut out = ids.map(|id| map(ns, id)).collect::<Result<Vec<u32>, _>>()?;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn validate(p: &Program) -> Result<(), LoadError> {
    let bad = |m: String| Err(LoadError::Invalid(m));
    if p.pointers.len() != p.nodes.len() {
        return bad("one source pointer per node expected".into());
    }
    let mut depth = vec![0usize; p.nodes.len()];
    for (i, node) in p.nodes.iter().enumerate() {
        match *node {
            Node::Leaf(c) => {
                let Some(check) = p.checks.get(c as usize) else {
                    return bad(format!("node {i} names missing check {c}"));
                };
                validate_check(p, check)?;
                depth[i] = 1;
            }
            Node::All { first, len }
            | Node::Any { first, len }
            | Node::NotAll { first, len }
            | Node::NotAny { first, len } => {
                let range = (first as usize)..(first as usize).saturating_add(len as usize);
                let Some(children) = p.edges.get(range) else {
                    return bad(format!("node {i} has children outside the edge table"));
                };
                let mut d = 0;
                for &c in children {
                    if c as usize >= i {
                        return bad(format!("node {i} has child {c} that is not earlier"));
                    }
                    d = d.max(depth[c as usize]);
                }
                depth[i] = d + 1;
                if depth[i] > MAX_LOADED_DEPTH {
                    return bad(format!("node {i} nests deeper than {MAX_LOADED_DEPTH}"));
                }
            }
        }
    }
    let mut seen_allow = false;
    for r in &p.rules {
        if r.root as usize >= p.nodes.len() {
            return bad(format!("rule {} has no root node", r.pointer));
        }
        match r.effect {
            Effect::Allow => seen_allow = true,
            Effect::Deny if seen_allow => {
                return bad("deny rules must come before allow rules".into())
            }
            Effect::Deny => {}
        }
    }
    Ok(())
}

fn validate_check(p: &Program, c: &Check) -> Result<(), LoadError> {
    let regex_ok = |i: &u32| (*i as usize) < p.patterns.len();
    let ok = match c {
        Check::Str {
            test: StrTest::Regex(i),
            ..
        } => regex_ok(i),
        Check::Claim {
            test: ValueTest::Regex(i),
            ..
        }
        | Check::Posture {
            test: ValueTest::Regex(i),
            ..
        } => regex_ok(i),
        Check::TimeOfDay {
            zone,
            after,
            before,
        } => {
            (*zone as usize) < p.zones.len()
                && *after <= 86_400
                && *before <= 86_400
                && after != before
        }
        Check::Weekday { zone, .. } => (*zone as usize) < p.zones.len(),
        Check::Sym { set, .. } => set.windows(2).all(|w| w[0] < w[1]),
        Check::Fingerprint { set, .. } => set.windows(2).all(|w| w[0] < w[1]),
        Check::Str {
            field,
            test: StrTest::In(l) | StrTest::NotIn(l),
        } => field.folds_case() || l.windows(2).all(|w| w[0] < w[1]),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(LoadError::Invalid(format!("check {c:?} is inconsistent")))
    }
}

#[cfg(test)]
mod tests {
    use super::BitSet;

    #[test]
    fn bit_set_ids_round_trip_and_stop_at_u32_max() {
        for ids in [
            &[][..],
            &[0],
            &[5, 63, 64, 65, 200],
            &[1000, 1001, 1063],
            &[u32::MAX - 64, u32::MAX],
        ] {
            let set = BitSet::from_ids(ids);
            assert_eq!(set.ids().collect::<Vec<_>>(), ids);
            assert!(ids.iter().all(|&id| set.contains(id)));
        }
        // A hand-made set whose words run past u32::MAX yields only reachable ids.
        let set = BitSet {
            base: !63,
            words: Box::new([1 << 63, u64::MAX]),
        };
        assert_eq!(set.ids().collect::<Vec<_>>(), [u32::MAX]);
    }
}
