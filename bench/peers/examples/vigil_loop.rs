//! Vigil alone on the issue-2 mix, for profiling (e.g. under `perf record`):
//! `cargo run --release --example vigil_loop -- [SECONDS] [KIND]`. Cycles through the
//! mix and prints the mean ns per decision of each second; with KIND (e.g.
//! `time_of_day`, see `workload::KINDS`) that criterion is left out of every allow rule.

use std::hint::black_box;
use std::time::{Duration, Instant};

use vigil_bench_peers::vigil::VigilSide;
use vigil_bench_peers::workload::{Sizes, Workload, KINDS};

fn main() {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let mut without = [false; 8];
    if let Some(kind) = args.next() {
        match KINDS.iter().position(|k| *k == kind) {
            Some(k) => without[k] = true,
            None => {
                eprintln!("unknown criterion kind {kind:?}; one of {KINDS:?}");
                std::process::exit(2);
            }
        }
    }
    let w = Workload::generate(Sizes::ISSUE);
    let side = VigilSide::build(&w, &without);
    let reqs = side.requests(&w);
    let routes: Vec<usize> = w.inputs.iter().map(|i| i.route).collect();
    let mut allowed = 0usize;
    for s in 0..secs {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(1) {
            for (i, r) in reqs.iter().enumerate() {
                allowed += usize::from(black_box(side.decide(routes[i], black_box(r))));
            }
            n += reqs.len() as u64;
        }
        let ns = start.elapsed().as_nanos() as f64 / n as f64;
        println!("second {s}: {ns:.1} ns per decision");
    }
    black_box(allowed);
}
