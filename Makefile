# Vigil: the developer entry points. `make test` is what CI runs.
SHELL := /bin/bash
CARGO ?= cargo
FUZZ_SECONDS ?= 20

.PHONY: test lint fmt bench bench-policy fuzz-smoke clean

## test: the whole test suite (unit, property, end-to-end).
test:
	$(CARGO) test --workspace --locked

## lint: formatting and clippy, warnings are errors.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

## bench: every benchmark; figures go to docs/benchmarks.md by hand.
bench: bench-policy

## bench-policy: Vigil's evaluator against cedar-policy and regorus on the same work.
bench-policy:
	$(CARGO) bench -p vigil-policy --bench evaluate
	cd bench/peers && $(CARGO) run --release --locked
	cd bench/peers && $(CARGO) bench --locked

## fuzz-smoke: builds the fuzz targets and runs each briefly (installs cargo-fuzz if missing).
fuzz-smoke:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in policy_compile compiled_load; do \
	  mkdir -p corpus/$$t && cp -n seeds/$$t/* corpus/$$t/ 2>/dev/null; \
	  $(CARGO) fuzz run -s none $$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 || exit 1; \
	done

clean:
	$(CARGO) clean
