//! Criterion benchmark: one decision per iteration, cycling through the 10,000-input
//! mix, for Vigil (`vigil/evaluate`), cedar-policy (`cedar/is_authorized`) and regorus
//! (`regorus/eval` on its RVM, `regorus/eval_rule` on its interpreter). The engines
//! are checked to agree on every input first. Run from `bench/peers` with
//! `cargo bench`; the per-decision median/p99 table is `cargo run --release`.

use std::cell::Cell;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use vigil_bench_peers::workload::Sizes;
use vigil_bench_peers::{describe_mix, Setup};

/// Total time and iterations criterion ran, to print mean ratios at the end.
#[derive(Default)]
struct Tally {
    time: Cell<Duration>,
    iters: Cell<u64>,
}

impl Tally {
    fn add(&self, d: Duration, iters: u64) {
        self.time.set(self.time.get() + d);
        self.iters.set(self.iters.get() + iters);
    }

    fn mean_ns(&self) -> f64 {
        self.time.get().as_nanos() as f64 / self.iters.get().max(1) as f64
    }
}

/// Times `iters` decisions, continuing through the mix where the last call stopped.
fn run(
    tally: &Tally,
    next: &mut usize,
    len: usize,
    iters: u64,
    mut decide: impl FnMut(usize) -> bool,
) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        black_box(decide(black_box(*next)));
        *next += 1;
        if *next == len {
            *next = 0;
        }
    }
    let d = start.elapsed();
    tally.add(d, iters);
    d
}

fn main() {
    let mut setup = Setup::build(Sizes::ISSUE);
    match setup.verify() {
        Ok(counts) => eprintln!("engines agree on every input; {}", describe_mix(&counts)),
        Err(e) => panic!("ENGINES DISAGREE, not timing different work:\n{e}"),
    }
    let w = &setup.workload;
    let len = w.inputs.len();
    let routes: Vec<usize> = w.inputs.iter().map(|i| i.route).collect();
    let vigil_requests = setup.vigil.requests(w);
    let tallies: [Tally; 4] = Default::default();
    let names = [
        "vigil/evaluate",
        "cedar/is_authorized",
        "regorus/eval",
        "regorus/eval_rule",
    ];

    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    let mut g = c.benchmark_group("decision");
    g.throughput(Throughput::Elements(1));

    let mut next = 0;
    g.bench_function(names[0], |b| {
        b.iter_custom(|iters| {
            run(&tallies[0], &mut next, len, iters, |i| {
                setup.vigil.decide(routes[i], &vigil_requests[i])
            })
        })
    });
    let mut next = 0;
    g.bench_function(names[1], |b| {
        b.iter_custom(|iters| {
            run(&tallies[1], &mut next, len, iters, |i| {
                setup.cedar.decide(routes[i], &setup.cedar_requests[i])
            })
        })
    });
    let rego_inputs = &setup.rego_inputs;
    let rego_vm = &mut setup.rego_vm;
    let mut next = 0;
    g.bench_function(names[2], |b| {
        b.iter_custom(|iters| {
            run(&tallies[2], &mut next, len, iters, |i| {
                rego_vm.decide(routes[i], &rego_inputs[i])
            })
        })
    });
    let rego_interp = &mut setup.rego_interp;
    let mut next = 0;
    g.bench_function(names[3], |b| {
        b.iter_custom(|iters| {
            run(&tallies[3], &mut next, len, iters, |i| {
                rego_interp.decide(routes[i], &rego_inputs[i])
            })
        })
    });
    g.finish();
    c.final_summary();

    // Mean over everything criterion ran (warm-up included), so comparable across engines.
    let vigil = tallies[0].mean_ns();
    if tallies[0].iters.get() > 0 {
        println!("\nmean ns per decision over all iterations run (warm-up included):");
        for (name, t) in names.iter().zip(&tallies) {
            if t.iters.get() > 0 {
                let ns = t.mean_ns();
                println!("  {name:<22} {ns:>12.1} ns   {:>8.1}x Vigil", ns / vigil);
            }
        }
    }
}
