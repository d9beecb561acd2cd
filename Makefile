# Vigil: the developer entry points. `make test` is what CI runs.
SHELL := /bin/bash
CARGO ?= cargo
FUZZ_SECONDS ?= 20

.PHONY: run test deps lint fmt bench bench-policy bench-control bench-stream bench-proxy bench-revocation bench-verifier openapi fuzz-smoke clean

## deps: installs what the tests need (PostgreSQL server binaries) when missing.
deps:
	@bash scripts/ensure-deps.sh

## run: builds and starts `vigil all-in-one --demo`: the control plane on an embedded SQLite
## file, one proxy, development keys in ./vigil-data, a demo route; prints what to try.
run:
	$(CARGO) run --release --locked -p vigil -- all-in-one --demo

## test: the whole test suite (unit, property, end-to-end with real PostgreSQL).
test: deps
	$(CARGO) test --workspace --locked
	bash deploy/helm/test.sh

## lint: formatting and clippy, warnings are errors.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

## bench: every benchmark; figures go to docs/benchmarks.md by hand.
bench: deps bench-policy bench-control bench-stream bench-proxy bench-revocation bench-verifier

## bench-control: the store and REST API at 100,000 users and 10,000 routes on PostgreSQL.
bench-control:
	$(CARGO) bench -p vigil-control --bench control

## bench-stream: snapshot build, delta size, propagation to 1/100/1,000 subscribers, memory per stream.
bench-stream:
	$(CARGO) bench -p vigil --bench stream

## bench-proxy: wrk through Vigil against nginx proxy_pass and auth_request; proxy memory
## holding 100,000 users and 10,000 routes (installs nginx and wrk when missing); what
## following HTTP/1.1 framing below hyper costs a request (criterion).
bench-proxy:
	@export PATH="$$PATH:/usr/sbin"; command -v nginx >/dev/null && command -v wrk >/dev/null || \
	  { SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq nginx wrk; }
	$(CARGO) bench -p vigil --bench proxy
	$(CARGO) bench -p vigil-proxy --bench framing

## bench-revocation: REST 2xx -> first refused request at each of two real proxies.
bench-revocation:
	$(CARGO) bench -p vigil --bench revocation

## bench-verifier: sessions re-verified per second per core against the real oidc-provider
## (control plane, IdP and PostgreSQL CPU per verification; needs `make deps` for Node).
bench-verifier: deps
	$(CARGO) bench -p vigil --bench verifier

## openapi: regenerates docs/api/openapi.json from the code.
openapi:
	VIGIL_WRITE_OPENAPI=1 $(CARGO) test -p vigil-control --test openapi

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
