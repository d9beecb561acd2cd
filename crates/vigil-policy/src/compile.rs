//! From the typed AST to a [`CompiledPolicy`]: names interned, sets made bit sets,
//! networks made range tables, regexes and zones collected, the tree flattened.

use std::collections::HashMap;

use crate::ast::*;
use crate::compiled::*;
use crate::error::{PolicyError, Problems};
use crate::symbols::{Interner, Symbols};

/// Entities the compiler can check names against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntityKind {
    /// A user id.
    User,
    /// A group name.
    Group,
    /// A service account id.
    ServiceAccount,
    /// A device id.
    Device,
}

/// The directory a policy is checked against: unknown names become errors.
pub trait Directory {
    /// Whether an entity of this kind and id exists.
    fn contains(&self, kind: EntityKind, id: &str) -> bool;
}

/// Named policies that `policy: <name>` may refer to.
pub trait Library {
    /// The parsed policy of that name.
    fn get(&self, name: &str) -> Option<&Document>;
}

impl Library for HashMap<String, Document> {
    fn get(&self, name: &str) -> Option<&Document> {
        HashMap::get(self, name)
    }
}

impl Library for std::collections::BTreeMap<String, Document> {
    fn get(&self, name: &str) -> Option<&Document> {
        std::collections::BTreeMap::get(self, name)
    }
}

/// What compilation needs besides the document.
pub struct CompileEnv<'a> {
    /// The snapshot's symbol tables; new names are interned here.
    pub symbols: &'a mut Symbols,
    /// When given, unknown users, groups, service accounts and devices are errors.
    pub directory: Option<&'a dyn Directory>,
    /// Named policies for references.
    pub library: Option<&'a dyn Library>,
    /// The name of the policy being compiled, when it has one, so that a reference
    /// back to it is reported as a cycle.
    pub name: Option<&'a str>,
}

/// How many named-policy references may nest.
pub const MAX_REFERENCE_DEPTH: usize = 8;

/// Compiles a parsed document.
pub fn compile(doc: &Document, env: CompileEnv<'_>) -> Result<CompiledPolicy, PolicyError> {
    let mut c = Compiler {
        env,
        program: Program {
            checks: Vec::new(),
            nodes: Vec::new(),
            edges: Vec::new(),
            rules: Vec::new(),
            pointers: Vec::new(),
            patterns: Vec::new(),
            zones: Vec::new(),
        },
        problems: Problems::default(),
        refs: HashMap::new(),
        stack: Vec::new(),
        site: None,
        costs: Vec::new(),
    };
    if let Some(name) = c.env.name {
        c.stack.push(name.to_owned());
    }
    let mut rules: Vec<RuleInfo> = doc
        .rules
        .iter()
        .map(|r| RuleInfo {
            effect: r.effect,
            pointer: r.pointer.as_str().into(),
            root: c.expr(&r.expr, ""),
        })
        .collect();
    if !c.problems.is_empty() {
        return Err(PolicyError::Invalid(c.problems.0));
    }
    // Deny rules first; the sort is stable so document order holds within each effect.
    rules.sort_by_key(|r| r.effect == Effect::Allow);
    c.program.rules = rules;
    CompiledPolicy::from_program(c.program).map_err(|e| {
        PolicyError::Invalid(vec![crate::Problem {
            pointer: String::new(),
            message: e.to_string(),
        }])
    })
}

struct Compiler<'a> {
    env: CompileEnv<'a>,
    program: Program,
    problems: Problems,
    /// Root node of each referenced policy compiled so far, shared by every reference.
    refs: HashMap<String, u32>,
    /// References being compiled, to report cycles.
    stack: Vec<String>,
    /// While a referenced policy is compiled: the pointer of the reference in the
    /// document being compiled, where problems found inside are reported.
    site: Option<String>,
    /// Estimated evaluation cost of each node, for ordering siblings.
    costs: Vec<u32>,
}

/// Rough relative cost of one check, in units of a few nanoseconds.
fn check_cost(c: &Check) -> u32 {
    match c {
        Check::Const(_)
        | Check::Flag { .. }
        | Check::Date { .. }
        | Check::AuthAgeLt(_)
        | Check::AuthAgeGt(_) => 1,
        Check::AmrAny(_)
        | Check::AmrAll(_)
        | Check::Sym { .. }
        | Check::GroupHas(_)
        | Check::GroupAny(_) => 2,
        Check::Fingerprint { .. } | Check::Ip { .. } | Check::GroupAll(_) => 3,
        Check::Str {
            field: StrField::Header(_),
            ..
        } => 8,
        Check::Str {
            test: StrTest::Regex(_),
            ..
        } => 20,
        Check::Str { field, .. } if field.folds_case() => 5,
        Check::Str { .. } => 3,
        Check::Posture { .. } => 5,
        Check::TimeOfDay { .. } | Check::Weekday { .. } => 6,
        Check::Claim {
            test: ValueTest::Regex(_),
            ..
        } => 25,
        Check::Claim { .. } => 10,
    }
}

/// Interns `names`; their ids sorted and deduplicated.
fn intern_set(table: &mut Interner, names: &[String]) -> Vec<u32> {
    let mut ids: Vec<u32> = names.iter().map(|n| table.intern(n).0).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

enum Combine {
    All,
    Any,
    NotAll,
    NotAny,
}

impl Compiler<'_> {
    fn push_node(&mut self, node: Node, pointer: String) -> u32 {
        let cost = match node {
            Node::Leaf(c) => self.program.checks.get(c as usize).map_or(1, check_cost),
            Node::All { first, len }
            | Node::Any { first, len }
            | Node::NotAll { first, len }
            | Node::NotAny { first, len } => self.program.edges
                [first as usize..(first + len) as usize]
                .iter()
                .fold(1u32, |acc, &c| acc.saturating_add(self.costs[c as usize])),
        };
        self.costs.push(cost);
        self.program.nodes.push(node);
        self.program.pointers.push(pointer.into());
        (self.program.nodes.len() - 1) as u32
    }

    fn leaf(&mut self, check: Check, pointer: &str) -> u32 {
        self.program.checks.push(check);
        let c = (self.program.checks.len() - 1) as u32;
        self.push_node(Node::Leaf(c), pointer.to_owned())
    }

    /// A parent over already compiled children. Children of the same kind are spliced
    /// in (`and` inside `and`) and a lone child of `and`/`or` stands for its parent.
    fn combine(&mut self, how: Combine, children: Vec<u32>, pointer: String) -> u32 {
        let mut flat = Vec::with_capacity(children.len());
        for c in children {
            match (&how, self.program.nodes[c as usize]) {
                (Combine::All, Node::All { first, len })
                | (Combine::Any, Node::Any { first, len }) => {
                    flat.extend_from_slice(
                        &self.program.edges[first as usize..(first + len) as usize],
                    );
                }
                _ => flat.push(c),
            }
        }
        if flat.len() == 1 && matches!(how, Combine::All | Combine::Any) {
            return flat[0];
        }
        // Criteria have no side effects, so children may run cheapest first: a request
        // that fails a cheap check never pays for an expensive one. (Explain restores
        // document order.)
        flat.sort_by_key(|&c| self.costs[c as usize]);
        let first = self.program.edges.len() as u32;
        let len = flat.len() as u32;
        self.program.edges.extend(flat);
        let node = match how {
            Combine::All => Node::All { first, len },
            Combine::Any => Node::Any { first, len },
            Combine::NotAll => Node::NotAll { first, len },
            Combine::NotAny => Node::NotAny { first, len },
        };
        self.push_node(node, pointer)
    }

    /// `prefix` marks nodes that come from a referenced policy (`name#`).
    fn expr(&mut self, e: &Expr, prefix: &str) -> u32 {
        let pointer = format!("{prefix}{}", e.pointer);
        let (how, children) = match &e.kind {
            ExprKind::Criterion(c) => return self.criterion(c, &pointer),
            ExprKind::And(c) => (Combine::All, c),
            ExprKind::Or(c) => (Combine::Any, c),
            ExprKind::Not(c) => (Combine::NotAll, c),
            ExprKind::Nor(c) => (Combine::NotAny, c),
        };
        let ids = children.iter().map(|c| self.expr(c, prefix)).collect();
        self.combine(how, ids, pointer)
    }

    /// Records a problem. One found inside a referenced policy is reported at the
    /// reference in the document being compiled, so every pointer points into it.
    fn problem(&mut self, pointer: &str, message: String) {
        match &self.site {
            Some(site) => self
                .problems
                .add(site, format!("in `{pointer}`: {message}")),
            None => self.problems.add(pointer, message),
        }
    }

    fn known(&mut self, kind: EntityKind, id: &str, pointer: &str) {
        if let Some(dir) = self.env.directory {
            if !dir.contains(kind, id) {
                let what = match kind {
                    EntityKind::User => "user",
                    EntityKind::Group => "group",
                    EntityKind::ServiceAccount => "service account",
                    EntityKind::Device => "device",
                };
                self.problem(pointer, format!("unknown {what} `{id}`"));
            }
        }
    }

    fn pattern(&mut self, p: &Pattern, ignore_case: bool) -> u32 {
        let key: (Box<str>, bool) = (p.source.as_str().into(), ignore_case);
        if let Some(i) = self.program.patterns.iter().position(|x| *x == key) {
            return i as u32;
        }
        self.program.patterns.push(key);
        (self.program.patterns.len() - 1) as u32
    }

    fn zone(&mut self, tz: chrono_tz::Tz) -> u32 {
        let name = tz.name();
        if let Some(i) = self.program.zones.iter().position(|z| &**z == name) {
            return i as u32;
        }
        self.program.zones.push(name.into());
        (self.program.zones.len() - 1) as u32
    }

    /// Compiles a criterion; several operators become an `and` of one check each.
    fn criterion(&mut self, c: &Criterion, ptr: &str) -> u32 {
        let checks: Vec<Check> = match c {
            Criterion::Const(b) => vec![Check::Const(*b)],
            Criterion::Flag { flag, expect } => vec![Check::Flag {
                flag: *flag,
                expect: *expect,
            }],
            Criterion::Str { field, ops } => ops
                .iter()
                .map(|op| self.str_check(field, op, ptr))
                .collect(),
            Criterion::Groups(ops) => ops.iter().map(|op| self.group_check(op, ptr)).collect(),
            Criterion::Claim { path, ops } => {
                let path: Box<[Box<str>]> = path.iter().map(|s| s.as_str().into()).collect();
                ops.iter()
                    .map(|op| Check::Claim {
                        path: path.clone(),
                        test: self.value_test(op),
                    })
                    .collect()
            }
            Criterion::Posture { attr, ops } => {
                let attr = self.env.symbols.attributes.intern(attr).0;
                ops.iter()
                    .map(|op| Check::Posture {
                        attr,
                        test: self.value_test(op),
                    })
                    .collect()
            }
            Criterion::Fingerprint(ops) => ops
                .iter()
                .map(|op| {
                    let (list, negate) = match op {
                        FingerprintOp::In(l) => (l, false),
                        FingerprintOp::NotIn(l) => (l, true),
                    };
                    let mut set = list.clone();
                    set.sort_unstable();
                    set.dedup();
                    Check::Fingerprint {
                        set: set.into(),
                        negate,
                    }
                })
                .collect(),
            Criterion::SourceIp(ops) => ops
                .iter()
                .map(|op| match op {
                    IpOp::In(n) => Check::Ip {
                        table: PrefixTable::from_nets(n),
                        negate: false,
                    },
                    IpOp::NotIn(n) => Check::Ip {
                        table: PrefixTable::from_nets(n),
                        negate: true,
                    },
                })
                .collect(),
            Criterion::TimeOfDay { tz, after, before } => {
                let zone = self.zone(*tz);
                vec![Check::TimeOfDay {
                    zone,
                    after: after.unwrap_or(0),
                    before: before.unwrap_or(86_400),
                }]
            }
            Criterion::Date { after, before } => {
                vec![Check::Date {
                    after: after.unwrap_or(i64::MIN),
                    before: before.unwrap_or(i64::MAX),
                }]
            }
            Criterion::Weekday { tz, days, negate } => {
                let zone = self.zone(*tz);
                let days = if *negate { !days & 0x7f } else { *days };
                vec![Check::Weekday { zone, days }]
            }
            Criterion::AuthAge(ops) => ops
                .iter()
                .map(|op| match op {
                    NumOp::Lt(n) => Check::AuthAgeLt(*n),
                    NumOp::Gt(n) => Check::AuthAgeGt(*n),
                })
                .collect(),
            Criterion::Mfa(ops) => ops
                .iter()
                .map(|op| match op {
                    AmrOp::AnyOf(s) => Check::AmrAny(*s),
                    AmrOp::AllOf(s) => Check::AmrAll(*s),
                })
                .collect(),
            Criterion::Policy(name) => return self.reference(name, ptr),
        };
        let ids: Vec<u32> = checks.into_iter().map(|c| self.leaf(c, ptr)).collect();
        self.combine(Combine::All, ids, ptr.to_owned())
    }

    fn sym_set(&mut self, field: SymField, names: &[String], ptr: &str) -> Box<[u32]> {
        let ids = intern_set(Namespace::of(field).table_mut(self.env.symbols), names);
        let kind = match field {
            SymField::User => EntityKind::User,
            SymField::ServiceAccount => EntityKind::ServiceAccount,
            SymField::Device => EntityKind::Device,
            // Domains are not directory entities; operands are already folded.
            SymField::Domain => return ids.into(),
        };
        for n in names {
            self.known(kind, n, ptr);
        }
        ids.into()
    }

    fn str_check(&mut self, field: &StrField, op: &StrOp, ptr: &str) -> Check {
        let sym_field = match field {
            StrField::User => Some(SymField::User),
            StrField::ServiceAccount => Some(SymField::ServiceAccount),
            StrField::DeviceId => Some(SymField::Device),
            StrField::Domain => Some(SymField::Domain),
            _ => None,
        };
        if let Some(sf) = sym_field {
            let set = match op {
                StrOp::Is(s) => Some((std::slice::from_ref(s), false)),
                StrOp::In(l) => Some((l.as_slice(), false)),
                StrOp::NotIn(l) => Some((l.as_slice(), true)),
                _ => None,
            };
            if let Some((names, negate)) = set {
                return Check::Sym {
                    field: sf,
                    set: self.sym_set(sf, names, ptr),
                    negate,
                };
            }
        }
        let folds = field.folds_case();
        let sorted = |l: &[String]| -> Box<[Box<str>]> {
            let mut v: Vec<Box<str>> = l.iter().map(|s| s.as_str().into()).collect();
            v.sort_unstable();
            v.dedup();
            v.into()
        };
        let test = match op {
            StrOp::Is(s) => StrTest::Eq(s.as_str().into()),
            StrOp::In(l) => StrTest::In(sorted(l)),
            StrOp::NotIn(l) => StrTest::NotIn(sorted(l)),
            StrOp::StartsWith(s) => StrTest::Prefix(s.as_str().into()),
            StrOp::EndsWith(s) => StrTest::Suffix(s.as_str().into()),
            StrOp::Matches(p) => StrTest::Regex(self.pattern(p, folds)),
            StrOp::Present(b) => StrTest::Present(*b),
        };
        Check::Str {
            field: field.clone(),
            test,
        }
    }

    fn group_check(&mut self, op: &SetOp, ptr: &str) -> Check {
        let names: &[String] = match op {
            SetOp::Has(n) => std::slice::from_ref(n),
            SetOp::AnyOf(l) | SetOp::AllOf(l) => l,
        };
        for n in names {
            self.known(EntityKind::Group, n, ptr);
        }
        let ids = intern_set(&mut self.env.symbols.groups, names);
        match op {
            SetOp::Has(_) => Check::GroupHas(ids[0]),
            SetOp::AnyOf(_) => Check::GroupAny(BitSet::from_ids(&ids)),
            SetOp::AllOf(_) => Check::GroupAll(ids.into()),
        }
    }

    fn value_test(&mut self, op: &ValueOp) -> ValueTest {
        let list = |l: &[Scalar]| -> Box<[Scalar]> { l.to_vec().into() };
        match op {
            ValueOp::Is(s) => ValueTest::Is(s.clone()),
            ValueOp::In(l) => ValueTest::In(list(l)),
            ValueOp::NotIn(l) => ValueTest::NotIn(list(l)),
            ValueOp::Has(s) => ValueTest::Has(s.clone()),
            ValueOp::AnyOf(l) => ValueTest::AnyOf(list(l)),
            ValueOp::AllOf(l) => ValueTest::AllOf(list(l)),
            ValueOp::StartsWith(s) => ValueTest::Prefix(s.as_str().into()),
            ValueOp::EndsWith(s) => ValueTest::Suffix(s.as_str().into()),
            ValueOp::Matches(p) => ValueTest::Regex(self.pattern(p, false)),
            ValueOp::Lt(n) => ValueTest::Lt(*n),
            ValueOp::Gt(n) => ValueTest::Gt(*n),
        }
    }

    /// `policy: name` holds when the named policy allows: no deny rule holds and an allow rule does.
    fn reference(&mut self, name: &str, ptr: &str) -> u32 {
        if let Some(&root) = self.refs.get(name) {
            return root;
        }
        if let Some(start) = self.stack.iter().position(|n| n == name) {
            let chain = self.stack[start..].join(" → ");
            self.problem(
                ptr,
                format!("policy `{name}` refers to itself ({chain} → {name})"),
            );
            return self.leaf(Check::Const(false), ptr);
        }
        if self.stack.len() > MAX_REFERENCE_DEPTH {
            let msg = format!("policy references nest more than {MAX_REFERENCE_DEPTH} deep");
            self.problem(ptr, msg);
            return self.leaf(Check::Const(false), ptr);
        }
        let Some(doc) = self.env.library.and_then(|l| l.get(name)) else {
            self.problem(ptr, format!("unknown policy `{name}`"));
            return self.leaf(Check::Const(false), ptr);
        };
        self.stack.push(name.to_owned());
        let entered = self.site.is_none();
        if entered {
            self.site = Some(ptr.to_owned());
        }
        let prefix = format!("{name}#");
        let mut denies = Vec::new();
        let mut allows = Vec::new();
        for r in &doc.rules {
            let root = self.expr(&r.expr, &prefix);
            match r.effect {
                Effect::Deny => denies.push(root),
                Effect::Allow => allows.push(root),
            }
        }
        self.stack.pop();
        if entered {
            self.site = None;
        }
        let allowed = if allows.is_empty() {
            self.leaf(Check::Const(false), ptr)
        } else {
            self.combine(Combine::Any, allows, ptr.to_owned())
        };
        let root = if denies.is_empty() {
            allowed
        } else {
            let no_deny = self.combine(Combine::NotAny, denies, ptr.to_owned());
            self.combine(Combine::All, vec![no_deny, allowed], ptr.to_owned())
        };
        self.refs.insert(name.to_owned(), root);
        root
    }
}
