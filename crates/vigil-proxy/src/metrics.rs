//! The proxy's Prometheus metrics, served on the health listener at `/metrics`:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `vigil_proxy_requests_total` | counter | `decision` (allow, deny, unauthenticated, edge, path, no-route, no-snapshot, sign-in, jwks), `status` (class: 2xx…5xx) |
//! | `vigil_proxy_decisions_total` | counter | `route`, `outcome` (allow, deny, unauthenticated) |
//! | `vigil_proxy_request_duration_seconds` | histogram | `decision` |
//! | `vigil_proxy_snapshot_version` | gauge | |
//! | `vigil_proxy_snapshot_age_seconds` | gauge | seconds since the snapshot last changed |
//! | `vigil_proxy_stream_connected` | gauge | 1 while the stream to the control plane is up |
//! | `vigil_proxy_tunnels_open` | gauge | WebSocket tunnels open |
//! | `vigil_proxy_tunnels_closed_total` | counter | `by` (peer: either side ended it; verification: no longer allowed) |
//! | `vigil_proxy_streams_watched` | gauge | long streaming responses being re-verified |
//! | `vigil_proxy_streams_closed_total` | counter | `by` (peer: the body ended or the client left; verification: no longer allowed) |
//! | `vigil_proxy_connections_open` | gauge | client connections being served (HTTP, TLS handshakes and WebSocket tunnels) |
//! | `vigil_proxy_connections_refused_total` | counter | connections closed at once at the connection limit |
//!
//! Route labels only ever name routes of the snapshot (and `-` for none), so the
//! series are bounded by the routes configured.

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    decision: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    route: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedBy {
    by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionOnly {
    decision: &'static str,
}

/// Every metric the proxy keeps.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    latency: Family<DecisionOnly, Histogram>,
    /// The snapshot version held.
    pub snapshot_version: Gauge<i64, AtomicI64>,
    /// Seconds since the snapshot last changed (set when scraped).
    pub snapshot_age: Gauge<f64, AtomicU64>,
    /// 1 while the stream is up.
    pub stream_connected: Gauge<i64, AtomicI64>,
    /// WebSocket tunnels open.
    pub tunnels_open: Gauge<i64, AtomicI64>,
    tunnels_closed: Family<ClosedBy, Counter>,
    /// Long streaming responses being re-verified (registered once they last).
    pub streams_watched: Gauge<i64, AtomicI64>,
    streams_closed: Family<ClosedBy, Counter>,
    /// Client connections being served.
    pub connections_open: Gauge<i64, AtomicI64>,
    /// Connections closed at once at the connection limit.
    pub connections_refused: Counter,
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl Metrics {
    /// A fresh set, registered.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("vigil_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        let decisions = Family::<DecisionLabels, Counter>::default();
        let latency = Family::<DecisionOnly, Histogram>::new_with_constructor(|| {
            // 50 µs to about 3.3 s.
            Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
        });
        let snapshot_version = Gauge::<i64, AtomicI64>::default();
        let snapshot_age = Gauge::<f64, AtomicU64>::default();
        let stream_connected = Gauge::<i64, AtomicI64>::default();
        let tunnels_open = Gauge::<i64, AtomicI64>::default();
        let tunnels_closed = Family::<ClosedBy, Counter>::default();
        let streams_watched = Gauge::<i64, AtomicI64>::default();
        let streams_closed = Family::<ClosedBy, Counter>::default();
        let connections_open = Gauge::<i64, AtomicI64>::default();
        let connections_refused = Counter::default();
        registry.register("requests", "Requests answered", requests.clone());
        registry.register(
            "decisions",
            "Authorization decisions by route and outcome",
            decisions.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers, upstream included",
            latency.clone(),
        );
        registry.register(
            "snapshot_version",
            "Policy snapshot version held",
            snapshot_version.clone(),
        );
        registry.register(
            "snapshot_age_seconds",
            "Seconds since the snapshot held last changed",
            snapshot_age.clone(),
        );
        registry.register(
            "stream_connected",
            "1 while the snapshot stream to the control plane is up",
            stream_connected.clone(),
        );
        registry.register(
            "tunnels_open",
            "WebSocket tunnels open",
            tunnels_open.clone(),
        );
        registry.register(
            "tunnels_closed",
            "WebSocket tunnels closed, by who closed them",
            tunnels_closed.clone(),
        );
        registry.register(
            "streams_watched",
            "Long streaming responses being re-verified",
            streams_watched.clone(),
        );
        registry.register(
            "streams_closed",
            "Re-verified streaming responses ended, by who ended them",
            streams_closed.clone(),
        );
        registry.register(
            "connections_open",
            "Client connections being served",
            connections_open.clone(),
        );
        registry.register(
            "connections_refused",
            "Client connections closed at once at the connection limit",
            connections_refused.clone(),
        );
        Arc::new(Metrics {
            registry,
            requests,
            decisions,
            latency,
            snapshot_version,
            snapshot_age,
            stream_connected,
            tunnels_open,
            tunnels_closed,
            streams_watched,
            streams_closed,
            connections_open,
            connections_refused,
        })
    }

    /// Counts a closed tunnel: `verification` when the proxy closed it because it
    /// was no longer allowed, else `peer`.
    pub fn tunnel_closed(&self, by_verification: bool) {
        let by = if by_verification {
            "verification"
        } else {
            "peer"
        };
        self.tunnels_closed.get_or_create(&ClosedBy { by }).inc();
    }

    /// Counts a re-verified streaming response that ended: `verification` when the
    /// proxy ended it because it was no longer allowed, else `peer`.
    pub fn stream_closed(&self, by_verification: bool) {
        let by = if by_verification {
            "verification"
        } else {
            "peer"
        };
        self.streams_closed.get_or_create(&ClosedBy { by }).inc();
    }

    /// Counts one answered request.
    pub fn request(&self, decision: &'static str, route: Option<&str>, status: u16, secs: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                decision,
                status: status_class(status),
            })
            .inc();
        if matches!(decision, "allow" | "deny" | "unauthenticated") {
            self.decisions
                .get_or_create(&DecisionLabels {
                    route: route.unwrap_or("-").to_owned(),
                    outcome: decision,
                })
                .inc();
        }
        self.latency
            .get_or_create(&DecisionOnly { decision })
            .observe(secs);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_decisions_are_counted() {
        let m = Metrics::new();
        m.request("allow", Some("app"), 200, 0.001);
        m.request("allow", Some("app"), 502, 0.002);
        m.request("deny", Some("app"), 403, 0.0001);
        m.request("edge", None, 400, 0.00001);
        m.snapshot_version.set(42);
        m.tunnels_open.set(2);
        m.tunnel_closed(true);
        let text = m.render();
        assert!(
            text.contains(r#"vigil_proxy_decisions_total{route="app",outcome="allow"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"vigil_proxy_requests_total{decision="edge",status="4xx"} 1"#),
            "{text}"
        );
        assert!(text.contains("vigil_proxy_snapshot_version 42"), "{text}");
        assert!(text.contains("vigil_proxy_tunnels_open 2"), "{text}");
        assert!(
            text.contains(r#"vigil_proxy_tunnels_closed_total{by="verification"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("vigil_proxy_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(!text.contains(r#"outcome="edge""#), "{text}");
    }
}
