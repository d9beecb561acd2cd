//! Per-decision timing of Vigil, cedar-policy and regorus on the same workload.
//!
//! Run from `bench/peers` with `cargo run --release` (add `-- --breakdown` for the cost
//! of each Vigil criterion kind, `-- --small` for a quick smoke run on a small
//! workload, `-- --show` to print one route's policy as each engine gets it). It generates the workload (fixed seed), builds every engine's form of
//! it, checks that all engines decide every input alike (and exits non-zero if not),
//! then times every input of the mix on its own, in two regimes:
//!
//! - hot: one untimed evaluation of an input, then 16 back-to-back evaluations of it
//!   between two `Instant` reads, divided by 16 (policy and request data in cache);
//! - cold: one evaluation per `Instant` pair while walking the whole mix in a shuffled
//!   order (each decision touches a route, user and request the previous ones did
//!   not: what a proxy spreading traffic over 10,000 routes sees).
//!
//! Engines take turns pass by pass (5 passes, fresh shuffle each) so machine noise
//! spreads over all of them; each input keeps its median pass, the measured cost of
//! the empty timing loop is subtracted. Requests and inputs are built before timing;
//! only evaluation is measured. Prints median and p99 over the mix, ratios to Vigil
//! and whether the targets of issue 2 are met. See `docs/benchmarks.md`.

use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use vigil_bench_peers::workload::{Sizes, KINDS, SEED};
use vigil_bench_peers::{describe_mix, vigil::VigilSide, Setup};

/// Evaluations of one input per timed batch in the hot regime.
const REPS: u32 = 16;
/// Passes over the mix; each input keeps its median pass.
const PASSES: usize = 5;

const TARGET_MEDIAN_NS: f64 = 100.0;
const TARGET_CEDAR_RATIO: f64 = 20.0;
const TARGET_REGO_RATIO: f64 = 50.0;

/// Per-input samples of one engine: `[regime][input][pass]`, regime 0 hot, 1 cold.
struct Samples(Vec<Vec<[f64; PASSES]>>);

impl Samples {
    fn new(n: usize) -> Samples {
        Samples(vec![vec![[0.0; PASSES]; n]; 2])
    }
}

/// One pass of both regimes over `order`.
fn pass(
    samples: &mut Samples,
    p: usize,
    order: &[usize],
    overhead: [f64; 2],
    mut decide: impl FnMut(usize) -> bool,
) {
    for &i in order {
        // One untimed evaluation first, so the batch measures the warmed-up state.
        black_box(decide(black_box(i)));
        let start = Instant::now();
        for _ in 0..REPS {
            black_box(decide(black_box(i)));
        }
        samples.0[0][i][p] = start.elapsed().as_nanos() as f64 / f64::from(REPS) - overhead[0];
    }
    for &i in order {
        let start = Instant::now();
        black_box(decide(black_box(i)));
        samples.0[1][i][p] = start.elapsed().as_nanos() as f64 - overhead[1];
    }
}

/// Cost of the timing loops with nothing in them: `[hot per decision, cold]`.
fn timer_overhead(n: usize) -> [f64; 2] {
    let order: Vec<usize> = (0..n).collect();
    let mut s = Samples::new(n);
    for p in 0..PASSES {
        pass(&mut s, p, &order, [0.0; 2], |i| black_box(i) == usize::MAX);
    }
    let [hot, cold] = summarise(&s);
    [hot.median, cold.median]
}

#[derive(Clone, Copy)]
struct Stats {
    median: f64,
    p99: f64,
    mean: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Stats {
        median: rank(0.5),
        p99: rank(0.99),
        mean: v.iter().sum::<f64>() / v.len() as f64,
    }
}

/// Median pass of every input, then statistics over the mix, per regime.
fn summarise(s: &Samples) -> [Stats; 2] {
    let regime = |r: usize| {
        stats(
            s.0[r]
                .iter()
                .map(|passes| {
                    let mut p = *passes;
                    p.sort_by(f64::total_cmp);
                    p[PASSES / 2]
                })
                .collect(),
        )
    };
    [regime(0), regime(1)]
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let small = args.iter().any(|a| a == "--small");
    let breakdown = args.iter().any(|a| a == "--breakdown");
    let show = args.iter().any(|a| a == "--show");
    if let Some(a) = args
        .iter()
        .find(|a| !matches!(a.as_str(), "--small" | "--breakdown" | "--show"))
    {
        eprintln!("unknown argument {a:?}; expected --small, --breakdown or --show");
        return ExitCode::FAILURE;
    }
    if show {
        show_route(Sizes::ISSUE);
        return ExitCode::SUCCESS;
    }
    let sizes = if small {
        Sizes {
            routes: 500,
            users: 5_000,
            groups: 500,
            domains: 50,
            inputs: 2_000,
        }
    } else {
        Sizes::ISSUE
    };

    println!(
        "workload: {} routes, {} users, {} groups, {} domains, {} inputs (seed {SEED:#x})",
        sizes.routes, sizes.users, sizes.groups, sizes.domains, sizes.inputs,
    );
    let mut setup = Setup::build(sizes);
    for (step, secs) in &setup.build_secs {
        println!("  built {step:<28} {secs:>7.2} s");
    }
    let counts = match setup.verify() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ENGINES DISAGREE, not timing different work:\n{e}");
            return ExitCode::FAILURE;
        }
    };
    let w = &setup.workload;
    let mut per_count = [0usize; 9];
    for r in &w.routes {
        per_count[r.allow.len()] += 1;
    }
    let denies = w.routes.iter().filter(|r| r.deny.is_some()).count();
    println!(
        "  allow criteria per route: 5: {}, 6: {}, 7: {}, 8: {}; routes with a deny rule: {denies}",
        per_count[5], per_count[6], per_count[7], per_count[8]
    );
    let mean_groups =
        w.users.iter().map(|u| u.groups.len()).sum::<usize>() as f64 / w.users.len() as f64;
    println!("  groups per user: 1-20, mean {mean_groups:.1}");
    println!(
        "verified: vigil, cedar, regorus (RVM and interpreter) and the model agree on all {} inputs",
        w.inputs.len()
    );
    println!("  mix: {}", describe_mix(&counts));

    let n = w.inputs.len();
    let routes: Vec<usize> = w.inputs.iter().map(|i| i.route).collect();
    let overhead = timer_overhead(n);
    println!(
        "  timing-loop overhead subtracted: hot {:.1} ns per decision, cold {:.1} ns",
        overhead[0], overhead[1]
    );

    let vigil_requests = setup.vigil.requests(w);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(SEED ^ 1);
    let mut order: Vec<usize> = (0..n).collect();
    let mut samples: Vec<Samples> = (0..4).map(|_| Samples::new(n)).collect();
    let rego_inputs = &setup.rego_inputs;
    let started = Instant::now();
    for p in 0..PASSES {
        order.shuffle(&mut rng);
        pass(&mut samples[0], p, &order, overhead, |i| {
            setup.vigil.decide(routes[i], &vigil_requests[i])
        });
        pass(&mut samples[1], p, &order, overhead, |i| {
            setup.cedar.decide(routes[i], &setup.cedar_requests[i])
        });
        pass(&mut samples[2], p, &order, overhead, |i| {
            setup.rego_vm.decide(routes[i], &rego_inputs[i])
        });
        pass(&mut samples[3], p, &order, overhead, |i| {
            setup.rego_interp.decide(routes[i], &rego_inputs[i])
        });
    }
    println!(
        "  timed {PASSES} passes in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let names = [
        "vigil-policy",
        "cedar-policy 4.14",
        "regorus 0.14 (RVM)",
        "regorus 0.14 (interpreter)",
    ];
    let results: Vec<[Stats; 2]> = samples.iter().map(summarise).collect();

    for (r, regime) in [
        "hot: the same input 16x back to back, after one untimed warm-up evaluation",
        "cold: each input once, mix in shuffled order",
    ]
    .iter()
    .enumerate()
    {
        let vigil = results[0][r];
        println!();
        println!("{regime}");
        println!();
        println!("| engine | median ns | p99 ns | mean ns | median ×Vigil | p99 ×Vigil |");
        println!("|---|---:|---:|---:|---:|---:|");
        for (name, res) in names.iter().zip(&results) {
            let s = res[r];
            println!(
                "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                s.median,
                s.p99,
                s.mean,
                s.median / vigil.median,
                s.p99 / vigil.p99
            );
        }
        // The faster regorus mode is the one the target is judged against.
        let (cedar, rvm, interp) = (results[1][r], results[2][r], results[3][r]);
        let rego = if rvm.median <= interp.median {
            rvm
        } else {
            interp
        };
        let cedar_ratio = cedar.median / vigil.median;
        let rego_ratio = rego.median / vigil.median;
        println!();
        println!(
            "target: Vigil median <= {TARGET_MEDIAN_NS} ns: {:.1} ns -> {}",
            vigil.median,
            verdict(vigil.median <= TARGET_MEDIAN_NS)
        );
        println!(
            "target: >= {TARGET_CEDAR_RATIO}x faster than cedar-policy (median): {cedar_ratio:.1}x -> {} (p99: {:.1}x)",
            verdict(cedar_ratio >= TARGET_CEDAR_RATIO),
            cedar.p99 / vigil.p99
        );
        println!(
            "target: >= {TARGET_REGO_RATIO}x faster than regorus, its faster mode (median): {rego_ratio:.1}x -> {} (p99: {:.1}x)",
            verdict(rego_ratio >= TARGET_REGO_RATIO),
            rego.p99 / vigil.p99
        );
    }

    if breakdown {
        println!();
        println!(
            "Vigil by criterion kind: the same mix with one kind left out of every allow rule"
        );
        println!("(decisions change, so this hints at each kind's cost; it is not an exact split)");
        println!();
        let mut variants: Vec<(&str, VigilSide)> =
            vec![("nothing", VigilSide::build(w, &[false; 8]))];
        for (k, kind) in KINDS.iter().enumerate() {
            let mut without = [false; 8];
            without[k] = true;
            variants.push((kind, VigilSide::build(w, &without)));
        }
        let requests: Vec<_> = variants.iter().map(|(_, v)| v.requests(w)).collect();
        let mut samples: Vec<Samples> = variants.iter().map(|_| Samples::new(n)).collect();
        for p in 0..PASSES {
            order.shuffle(&mut rng);
            for (v, ((_, side), reqs)) in variants.iter().zip(&requests).enumerate() {
                pass(&mut samples[v], p, &order, overhead, |i| {
                    side.decide(routes[i], &reqs[i])
                });
            }
        }
        let results: Vec<[Stats; 2]> = samples.iter().map(summarise).collect();
        println!("| left out | hot median ns | hot p99 ns | cold median ns | cold p99 ns |");
        println!("|---|---:|---:|---:|---:|");
        for ((name, _), [hot, cold]) in variants.iter().zip(&results) {
            println!(
                "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
                hot.median, hot.p99, cold.median, cold.p99
            );
        }
    }
    ExitCode::SUCCESS
}

/// Prints the first input's route in each engine's language, and that input.
fn show_route(sizes: Sizes) {
    use vigil_bench_peers::{cedar, rego, vigil};
    let w = vigil_bench_peers::workload::Workload::generate(sizes);
    let input = &w.inputs[0];
    let route = &w.routes[input.route];
    println!(
        "# Vigil (YAML)\n{}",
        vigil::policy_yaml(&w, route, &[false; 8])
    );
    println!("# Cedar\n{}", cedar::policy_text(&w, route));
    println!("# Rego\n{}", rego::module_text(&w, route));
    println!("# input 0 as Rego input (Cedar gets the same fields as context)");
    let inputs = rego::inputs(&w);
    println!("{}", inputs[0].to_json_str().unwrap_or_default());
    println!("# model outcome: {:?}", w.outcome(input));
}
