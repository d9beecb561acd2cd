//! The workload in Vigil's policy language: one YAML policy per route, all compiled
//! against one shared symbol table, and one borrowed `Request` per input.

use std::fmt::Write as _;
use std::net::IpAddr;

use vigil_policy::ast::Scalar;
use vigil_policy::{
    compile_standalone, parse_yaml, CompiledPolicy, Device, Id, Posture, Request, Sym, Symbols,
    User,
};

use crate::workload::{clock, Criterion, Deny, Route, Workload};

/// Which criterion kinds (indices into [`crate::workload::KINDS`]) to leave out of the
/// allow rules; used only by the cost breakdown.
pub type Without = [bool; 8];

/// The Vigil policy text of a route.
pub fn policy_yaml(w: &Workload, route: &Route, without: &Without) -> String {
    let mut y = String::from("allow:\n  and:\n");
    let list = |items: Vec<&str>| items.join(", ");
    let mut any = false;
    for c in &route.allow {
        if without[c.kind()] {
            continue;
        }
        any = true;
        let line = match c {
            Criterion::Groups(gs) => format!(
                "groups: {{any_of: [{}]}}",
                list(gs.iter().map(|g| w.groups[*g as usize].as_str()).collect())
            ),
            Criterion::Domain(ds) => format!(
                "domain: {{in: [{}]}}",
                list(ds.iter().map(|d| w.domains[*d].as_str()).collect())
            ),
            Criterion::Managed => "device/managed: true".to_owned(),
            Criterion::DiskEncrypted => "device/disk_encrypted: true".to_owned(),
            Criterion::Method(ms) => format!("http_method: {{in: [{}]}}", list(ms.clone())),
            Criterion::PathPrefix(p) => format!("http_path: {{starts_with: '{p}'}}"),
            Criterion::SourceIp(nets) => format!(
                "source_ip: {{in: [{}]}}",
                nets.iter().map(|n| n.cidr()).collect::<Vec<_>>().join(", ")
            ),
            Criterion::TimeOfDay { tz, after, before } => format!(
                "time_of_day: {{tz: {}, after: '{}', before: '{}'}}",
                tz.name(),
                clock(*after),
                clock(*before)
            ),
        };
        let _ = writeln!(y, "    - {line}");
    }
    if !any {
        y.push_str("    - accept: true\n");
    }
    if let Some(d) = &route.deny {
        let line = match d {
            Deny::Groups(gs) => format!(
                "groups: {{any_of: [{}]}}",
                list(gs.iter().map(|g| w.groups[*g as usize].as_str()).collect())
            ),
            Deny::Method(ms) => format!("http_method: {{in: [{}]}}", list(ms.clone())),
            Deny::PathPrefix(p) => format!("http_path: {{starts_with: '{p}'}}"),
        };
        let _ = write!(y, "deny:\n  or:\n    - {line}\n");
    }
    y
}

/// Compiled policies and the per-user and per-input data requests borrow.
pub struct VigilSide {
    /// The shared symbol table.
    pub symbols: Symbols,
    /// One compiled policy per route.
    pub policies: Vec<CompiledPolicy>,
    user_syms: Vec<Sym>,
    user_domains: Vec<Sym>,
    user_groups: Vec<Vec<Sym>>,
    postures: Vec<Posture>,
}

impl VigilSide {
    /// Parses and compiles every route's policy with one symbol table.
    pub fn build(w: &Workload, without: &Without) -> VigilSide {
        let mut symbols = Symbols::default();
        // Intern the directory the way a snapshot would: groups, users, posture attributes.
        let group_syms: Vec<Sym> = w.groups.iter().map(|g| symbols.groups.intern(g)).collect();
        let user_syms = w
            .users
            .iter()
            .map(|u| symbols.users.intern(&u.name))
            .collect();
        let managed = symbols.attributes.intern("managed");
        let disk = symbols.attributes.intern("disk_encrypted");
        let policies = w
            .routes
            .iter()
            .map(|r| {
                let text = policy_yaml(w, r, without);
                let doc = parse_yaml(&text).unwrap_or_else(|e| panic!("{text}\n{e}"));
                compile_standalone(&doc, &mut symbols).unwrap_or_else(|e| panic!("{text}\n{e}"))
            })
            .collect();
        // After compiling, as a snapshot does: each user's email domain resolved once.
        let user_domains = w
            .users
            .iter()
            .map(|u| symbols.domain_of(&u.email))
            .collect();
        let user_groups = w
            .users
            .iter()
            .map(|u| u.groups.iter().map(|g| group_syms[*g as usize]).collect())
            .collect();
        let postures = w
            .inputs
            .iter()
            .map(|i| {
                let mut attributes = vec![
                    (managed, Scalar::Bool(i.managed)),
                    (disk, Scalar::Bool(i.disk_encrypted)),
                ];
                attributes.sort_by_key(|(s, _)| *s);
                Posture {
                    expires_at: Some(i.posture_expires),
                    attributes,
                }
            })
            .collect();
        VigilSide {
            symbols,
            policies,
            user_syms,
            user_domains,
            user_groups,
            postures,
        }
    }

    /// One request per input, borrowing the workload and this side's data.
    pub fn requests<'a>(&'a self, w: &'a Workload) -> Vec<Request<'a>> {
        w.inputs
            .iter()
            .enumerate()
            .map(|(n, i)| {
                let u = &w.users[i.user];
                Request {
                    user: Some(User {
                        id: Id {
                            sym: self.user_syms[i.user],
                            name: &u.name,
                        },
                        email: Some(&u.email),
                        email_verified: true,
                        domain: self.user_domains[i.user],
                        groups: &self.user_groups[i.user],
                        claims: None,
                    }),
                    device: Some(Device {
                        id: Id {
                            sym: Sym::NONE,
                            name: "laptop",
                        },
                        approved: true,
                        posture: &self.postures[n],
                    }),
                    source_ip: Some(IpAddr::V4(i.ip)),
                    ..Request::anonymous(i.method, &i.path, i.now)
                }
            })
            .collect()
    }

    /// Decides input `req` on route `route`.
    #[inline]
    pub fn decide(&self, route: usize, req: &Request<'_>) -> bool {
        self.policies[route].evaluate(req).allow
    }
}
