-- wrk script for the half-load runs of `cargo bench -p vigil --bench proxy`:
-- after each response a connection waits VIGIL_BENCH_DELAY_MS milliseconds before
-- its next request, so N connections offer about N / (delay + latency) requests
-- per second whatever the target. (wrk2's constant rate is not available here.)
-- wrk starts each request's clock when it is written, so the wait is not counted
-- as latency.
local ms = tonumber(os.getenv("VIGIL_BENCH_DELAY_MS")) or 1

function delay()
  return ms
end
