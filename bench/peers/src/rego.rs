//! The workload in Rego for regorus: one module per route (`package routes.rN`,
//! `default allow := false`, `allow if { not deny; ... }`), each compiled on its own
//! like Vigil's and Cedar's per-route policies. The request is `input`: the user's
//! groups as an array of names, the email domain, device posture, method, path,
//! address, `now` and the local time precomputed in the route's zone.
//!
//! Two ways of running it are measured: regorus's register VM (RVM: each module
//! compiled to a bytecode program, one `RegoVM` per route, `set_input` + `execute`)
//! and its tree-walking interpreter (one `Engine` per route, `set_input` +
//! `eval_rule`).

use std::fmt::Write as _;

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::vm::RegoVM;
use regorus::{Engine, Value};

use crate::workload::{Criterion, Deny, Route, Workload};

fn set_of<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = items.map(|s| format!("{s:?}")).collect();
    format!("{{{}}}", quoted.join(", "))
}

/// The rule path a route's decision is read from.
pub fn entry_point(route: &Route) -> String {
    format!("data.routes.{}.allow", route.name)
}

/// The Rego module of a route.
pub fn module_text(w: &Workload, route: &Route) -> String {
    let groups = |gs: &[u32]| set_of(gs.iter().map(|g| w.groups[*g as usize].as_str()));
    let mut body = String::new();
    let mut helpers = String::new();
    let mut line = |s: &str| {
        let _ = writeln!(body, "\t{s}");
    };
    if route.deny.is_some() {
        line("not deny");
    }
    for c in &route.allow {
        match c {
            Criterion::Groups(gs) => {
                line("groups_ok");
                let _ = write!(
                    helpers,
                    "groups_ok if {{\n\tsome g in input.groups\n\tg in {}\n}}\n\n",
                    groups(gs)
                );
            }
            Criterion::Domain(ds) => line(&format!(
                "input.domain in {}",
                set_of(ds.iter().map(|d| w.domains[*d].as_str()))
            )),
            Criterion::Managed => {
                line("input.device.fresh_until > input.now");
                line("input.device.managed == true");
            }
            Criterion::DiskEncrypted => {
                line("input.device.fresh_until > input.now");
                line("input.device.disk_encrypted == true");
            }
            Criterion::Method(ms) => {
                line(&format!("input.method in {}", set_of(ms.iter().copied())))
            }
            Criterion::PathPrefix(p) => line(&format!("startswith(input.path, {p:?})")),
            Criterion::SourceIp(nets) => {
                line("ip_ok");
                for n in nets {
                    let _ = writeln!(
                        helpers,
                        "ip_ok if net.cidr_contains({:?}, input.ip)\n",
                        n.cidr()
                    );
                }
            }
            Criterion::TimeOfDay { after, before, .. } if after < before => {
                line(&format!("input.local_time >= {after}"));
                line(&format!("input.local_time < {before}"));
            }
            Criterion::TimeOfDay { after, before, .. } => {
                line("time_ok");
                let _ = write!(
                    helpers,
                    "time_ok if input.local_time >= {after}\n\ntime_ok if input.local_time < {before}\n\n"
                );
            }
        }
    }
    if let Some(d) = &route.deny {
        let _ = match d {
            Deny::Groups(gs) => write!(
                helpers,
                "deny if {{\n\tsome g in input.groups\n\tg in {}\n}}\n",
                groups(gs)
            ),
            Deny::Method(ms) => writeln!(
                helpers,
                "deny if input.method in {}",
                set_of(ms.iter().copied())
            ),
            Deny::PathPrefix(p) => writeln!(helpers, "deny if startswith(input.path, {p:?})"),
        };
    }
    format!(
        "package routes.{}\n\ndefault allow := false\n\nallow if {{\n{body}}}\n\n{helpers}",
        route.name
    )
}

/// Builds the `input` document of every request.
pub fn inputs(w: &Workload) -> Vec<Value> {
    w.inputs
        .iter()
        .map(|i| {
            let u = &w.users[i.user];
            let groups: Vec<&str> = u
                .groups
                .iter()
                .map(|g| w.groups[*g as usize].as_str())
                .collect();
            let json = serde_json::json!({
                "groups": groups,
                "domain": w.domains[u.domain],
                "device": {
                    "managed": i.managed,
                    "disk_encrypted": i.disk_encrypted,
                    "fresh_until": i.posture_expires,
                },
                "now": i.now,
                "method": i.method,
                "path": i.path,
                "ip": i.ip.to_string(),
                "local_time": i.local_time,
            });
            Value::from_json_str(&json.to_string()).expect("input document")
        })
        .collect()
}

/// One compiled RVM program and VM per route.
pub struct RegoVmSide {
    vms: Vec<RegoVM>,
}

impl RegoVmSide {
    /// Compiles every route's module to an RVM program and loads it into its own VM.
    pub fn build(w: &Workload) -> RegoVmSide {
        let vms = w
            .routes
            .iter()
            .map(|r| {
                let text = module_text(w, r);
                let mut engine = Engine::new();
                engine
                    .add_policy(format!("{}.rego", r.name), text.clone())
                    .unwrap_or_else(|e| panic!("{text}\n{e}"));
                let entry = entry_point(r);
                let compiled = engine
                    .compile_with_entrypoint(&entry.as_str().into())
                    .unwrap_or_else(|e| panic!("{text}\n{e}"));
                let program = Compiler::compile_from_policy(&compiled, &[entry.as_str()])
                    .unwrap_or_else(|e| panic!("{text}\n{e}"));
                let mut vm = RegoVM::new();
                vm.load_program(program);
                vm
            })
            .collect();
        RegoVmSide { vms }
    }

    /// Decides an input on route `route`.
    #[inline]
    pub fn decide(&mut self, route: usize, input: &Value) -> bool {
        let vm = &mut self.vms[route];
        vm.set_input(input.clone());
        match vm.execute() {
            Ok(v) => v == Value::from(true),
            Err(e) => panic!("regorus RVM failed on route {route}: {e}"),
        }
    }
}

/// One interpreter engine per route.
pub struct RegoInterpSide {
    engines: Vec<(Engine, String)>,
}

impl RegoInterpSide {
    /// Loads every route's module into its own engine.
    pub fn build(w: &Workload) -> RegoInterpSide {
        let engines = w
            .routes
            .iter()
            .map(|r| {
                let text = module_text(w, r);
                let mut engine = Engine::new();
                engine
                    .add_policy(format!("{}.rego", r.name), text.clone())
                    .unwrap_or_else(|e| panic!("{text}\n{e}"));
                (engine, entry_point(r))
            })
            .collect();
        RegoInterpSide { engines }
    }

    /// Decides an input on route `route`.
    #[inline]
    pub fn decide(&mut self, route: usize, input: &Value) -> bool {
        let (engine, entry) = &mut self.engines[route];
        engine.set_input(input.clone());
        match engine.eval_rule(entry.clone()) {
            Ok(v) => v == Value::from(true),
            Err(e) => panic!("regorus interpreter failed on route {route}: {e}"),
        }
    }
}
