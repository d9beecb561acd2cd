//! Vigil's policy evaluator against cedar-policy and regorus on the same generated
//! work: 10,000 routes, 100,000 users, 5,000 groups and a 10,000-request mix (see
//! `docs/benchmarks.md`). Shared by the per-decision table (`src/main.rs`) and the
//! criterion benchmark (`benches/peers.rs`).

pub mod cedar;
pub mod rego;
pub mod vigil;
pub mod workload;

use std::collections::BTreeMap;
use std::time::Instant;

use workload::{Outcome, Workload, KINDS};

/// Everything built from one workload, ready to evaluate.
pub struct Setup {
    /// The workload.
    pub workload: Workload,
    /// Vigil's compiled policies.
    pub vigil: vigil::VigilSide,
    /// Cedar's policy sets and entities.
    pub cedar: cedar::CedarSide,
    /// Cedar requests, one per input.
    pub cedar_requests: Vec<cedar_policy::Request>,
    /// regorus RVM programs.
    pub rego_vm: rego::RegoVmSide,
    /// regorus interpreter engines.
    pub rego_interp: rego::RegoInterpSide,
    /// Rego `input` documents, one per input.
    pub rego_inputs: Vec<regorus::Value>,
    /// Seconds each build step took, for the report.
    pub build_secs: Vec<(&'static str, f64)>,
}

fn timed<T>(steps: &mut Vec<(&'static str, f64)>, name: &'static str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let v = f();
    steps.push((name, t.elapsed().as_secs_f64()));
    v
}

impl Setup {
    /// Generates the workload and builds every engine's form of it.
    pub fn build(sizes: workload::Sizes) -> Setup {
        let mut s = Vec::new();
        let workload = timed(&mut s, "generate workload", || Workload::generate(sizes));
        let w = &workload;
        let vigil = timed(&mut s, "vigil: parse + compile", || {
            vigil::VigilSide::build(w, &[false; 8])
        });
        let cedar = timed(&mut s, "cedar: parse + entities", || {
            cedar::CedarSide::build(w)
        });
        let cedar_requests = timed(&mut s, "cedar: build requests", || cedar.requests(w));
        let rego_vm = timed(&mut s, "regorus: compile to RVM", || {
            rego::RegoVmSide::build(w)
        });
        let rego_interp = timed(&mut s, "regorus: load interpreter", || {
            rego::RegoInterpSide::build(w)
        });
        let rego_inputs = timed(&mut s, "regorus: build inputs", || rego::inputs(w));
        Setup {
            workload,
            vigil,
            cedar,
            cedar_requests,
            rego_vm,
            rego_interp,
            rego_inputs,
            build_secs: s,
        }
    }

    /// Checks that every engine and the model decide every input alike. Returns the
    /// model's outcome counts; on any disagreement, the inputs that differ.
    pub fn verify(&mut self) -> Result<BTreeMap<Outcome, usize>, String> {
        let w = &self.workload;
        let requests = self.vigil.requests(w);
        let mut counts = BTreeMap::new();
        let mut problems = Vec::new();
        for (n, i) in w.inputs.iter().enumerate() {
            let outcome = w.outcome(i);
            *counts.entry(outcome).or_insert(0) += 1;
            let model = outcome == Outcome::Allow;
            let v = self.vigil.decide(i.route, &requests[n]);
            let c = self.cedar.decide(i.route, &self.cedar_requests[n]);
            let r = self.rego_vm.decide(i.route, &self.rego_inputs[n]);
            let ri = self.rego_interp.decide(i.route, &self.rego_inputs[n]);
            if [v, c, r, ri] != [model; 4] {
                problems.push(format!(
                    "input {n} (route {}, expected {outcome:?}): vigil {v}, cedar {c}, regorus-rvm {r}, regorus-interp {ri}",
                    w.routes[i.route].name
                ));
            }
        }
        if problems.is_empty() {
            Ok(counts)
        } else {
            let shown = problems.len().min(20);
            Err(format!(
                "{} of {} inputs decided differently:\n{}",
                problems.len(),
                w.inputs.len(),
                problems[..shown].join("\n")
            ))
        }
    }
}

/// A one-paragraph description of the mix from the model's outcome counts.
pub fn describe_mix(counts: &BTreeMap<Outcome, usize>) -> String {
    let total: usize = counts.values().sum();
    let allowed = counts.get(&Outcome::Allow).copied().unwrap_or(0);
    let mut parts = Vec::new();
    for (o, n) in counts {
        let name = match o {
            Outcome::Allow => continue,
            Outcome::Denied(kind) => (*kind).to_owned(),
            Outcome::NotAllowed(k) => format!("no {}", KINDS[*k]),
        };
        parts.push(format!("{name} {n}"));
    }
    format!(
        "{allowed} of {total} allowed ({:.1}%); denied by: {}",
        100.0 * allowed as f64 / total as f64,
        parts.join(", ")
    )
}
