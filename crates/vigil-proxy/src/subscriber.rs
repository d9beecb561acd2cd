//! The proxy's end of the snapshot stream: connect to one of the configured control
//! planes (exponential backoff with jitter), say hello with the version held, then
//! verify, apply and persist each update off the request path, swap it in, and ack.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use vigil_proto::v1::control_plane_client::ControlPlaneClient;
use vigil_proto::v1::{
    control_message, proxy_message, Ack, Heartbeat, Hello, Label, Nack, ProxyMessage, SessionReport,
};
use vigil_proto::HEARTBEAT;
use vigil_snapshot::Verifier;

use crate::index::Index;
use crate::persist;

/// How to reach the control plane and whom to trust.
#[derive(Debug, Clone)]
pub struct Config {
    /// Control-plane gRPC addresses (`https://host:port`, or `http://` for tests), tried in turn.
    pub addresses: Vec<String>,
    /// The join token (sent as `authorization: Bearer <token>`).
    pub join_token: String,
    /// CA certificate (PEM) that signs the control plane's certificate; system roots when `None`.
    pub ca_pem: Option<String>,
    /// Public keys that may sign snapshots.
    pub verifier: Verifier,
    /// This proxy's id.
    pub proxy_id: String,
    /// Labels reported to the control plane.
    pub labels: Vec<(String, String)>,
    /// Where the last good snapshot is kept; `None` to keep nothing.
    pub snapshot_file: Option<std::path::PathBuf>,
}

/// Where the subscriber is, for `/readyz` and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// Never connected yet.
    Starting,
    /// Stream open.
    Connected {
        /// Address in use.
        address: String,
    },
    /// Between attempts.
    Retrying {
        /// The last error.
        error: String,
    },
}

/// What the request path reads: the current index, swapped whole.
pub type Shared = Arc<ArcSwap<Index>>;

/// A running subscriber.
#[derive(Debug, Clone)]
pub struct Handle {
    /// The current index (version 0 and empty until a snapshot arrives).
    pub index: Shared,
    /// The link's state.
    pub link: watch::Receiver<Link>,
    /// The version in `index`, announced after each swap (to wait on rather than poll).
    pub version: watch::Receiver<u64>,
    /// Where the request path reports sessions (new ones, and activity at most once a
    /// minute each) for the control plane to list and revoke. Sent while the stream
    /// is up; while it is down up to [`REPORT_QUEUE`] wait, and `try_send` fails
    /// beyond that (activity is reported again later; the sign-in path makes new
    /// sessions and sign-outs wait for room instead).
    pub reports: mpsc::Sender<SessionReport>,
}

impl Handle {
    /// What `/readyz` says: ready once a snapshot is held, whether or not the control
    /// plane is reachable now (the last good snapshot keeps being enforced); not ready
    /// without one, when every protected request is refused.
    pub fn readiness(&self) -> Result<String, String> {
        let version = self.version.borrow().to_owned();
        let link = match &*self.link.borrow() {
            Link::Starting => "connecting to the control plane".to_owned(),
            Link::Connected { address } => format!("streaming from {address}"),
            Link::Retrying { error } => format!("control plane unreachable ({error})"),
        };
        if version == 0 {
            Err(format!(
                "no policy snapshot yet, refusing every protected request; {link}"
            ))
        } else {
            Ok(format!("enforcing snapshot version {version}; {link}"))
        }
    }
}

/// Session reports held while the control plane is away.
pub const REPORT_QUEUE: usize = 1024;

/// No message (update or heartbeat) for this long means the stream is dead.
const SILENCE: Duration = Duration::from_secs(35);

/// New-session and sign-out reports sent within this long before a stream ended
/// are sent again on the next one: reports are not acknowledged, and a stream
/// can take this long to be known dead, all the while accepting what is
/// written into it. The control plane takes a report it already has as a no-op.
const RESEND_WINDOW: Duration = Duration::from_secs(2 * 35);

/// At most this many reports are kept to send again.
const RESEND_MAX: usize = 10_000;

/// Whether a report must reach the control plane (a new session, which carries
/// its issuer, or a sign-out), rather than activity, which is reported again.
fn must_arrive(r: &SessionReport) -> bool {
    r.signed_out || !r.issuer.is_empty()
}
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// Loads the persisted snapshot (if any) and starts the subscriber task.
pub fn start(config: Config) -> Handle {
    let store = config.snapshot_file.clone().map(persist::Store::new);
    let mut initial = Index::default();
    let mut chain = 0;
    if let Some(s) = &store {
        match s.load(&config.verifier) {
            Ok(Some((index, records))) => {
                tracing::info!(version = index.version(), path = %s.path().display(), "Loaded the last good snapshot from disk");
                initial = index;
                chain = records;
            }
            Ok(None) => {
                tracing::info!("No snapshot on disk; refusing protected requests until one arrives")
            }
            Err(e) => tracing::warn!(error = %e, "Cannot read the snapshot file"),
        }
    }
    spawn(config, store, initial, chain)
}

/// Starts the subscriber holding `initial` already (say, an index shared by several
/// subscribers in one process); it asks for what changed since. Nothing is read from
/// disk, though updates are still persisted when `config.snapshot_file` is set.
pub fn start_with(config: Config, initial: Index) -> Handle {
    let store = config.snapshot_file.clone().map(persist::Store::new);
    spawn(config, store, initial, 0)
}

fn spawn(config: Config, store: Option<persist::Store>, initial: Index, chain: usize) -> Handle {
    let (version_tx, version) = watch::channel(initial.version());
    let index: Shared = Arc::new(ArcSwap::from_pointee(initial));
    let (link_tx, link) = watch::channel(Link::Starting);
    let (reports, queued) = mpsc::channel(REPORT_QUEUE);
    let state = State {
        reports: queued,
        recent: std::collections::VecDeque::new(),
        ended: tokio::time::Instant::now(),
        store,
        index: index.clone(),
        link: link_tx,
        version: version_tx,
        chain,
    };
    tokio::spawn(run(config, state));
    Handle {
        index,
        link,
        version,
        reports,
    }
}

/// What the subscriber task owns.
struct State {
    store: Option<persist::Store>,
    index: Shared,
    link: watch::Sender<Link>,
    version: watch::Sender<u64>,
    /// Records in the snapshot file (one full snapshot and the deltas after it).
    chain: usize,
    /// Session reports from the request path.
    reports: mpsc::Receiver<SessionReport>,
    /// New-session and sign-out reports sent lately, and any report a closing
    /// stream did not take, to send again on the next stream (see
    /// [`RESEND_WINDOW`]).
    recent: std::collections::VecDeque<(tokio::time::Instant, SessionReport)>,
    /// When the last stream ended.
    ended: tokio::time::Instant,
}

/// A random fraction in [0.5, 1.5) for jitter, without a random-number crate.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    0.5 + f64::from(nanos % 1000) / 1000.0
}

async fn run(config: Config, mut state: State) {
    if config.addresses.is_empty() {
        let error = "no control-plane address configured".to_owned();
        tracing::error!("{error}; refusing protected requests");
        state.link.send_replace(Link::Retrying { error });
        return;
    }
    let mut backoff = BACKOFF_MIN;
    let mut attempt = 0usize;
    loop {
        let address = &config.addresses[attempt % config.addresses.len()];
        attempt += 1;
        let ended = session(&config, address, &mut state).await;
        state.ended = tokio::time::Instant::now();
        match ended {
            Ok(()) => backoff = BACKOFF_MIN,
            Err(e) => {
                tracing::warn!(address, error = %e, "Control-plane stream ended; retrying");
                state.link.send_replace(Link::Retrying { error: e.clone() });
            }
        }
        let wait = backoff.mul_f64(jitter());
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection: returns when the stream ends.
async fn session(config: &Config, address: &str, state: &mut State) -> Result<(), String> {
    let mut endpoint = Endpoint::from_shared(address.to_owned())
        .map_err(|e| format!("bad address {address}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(HEARTBEAT)
        .keep_alive_timeout(Duration::from_secs(20));
    if address.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &config.ca_pem {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client = ControlPlaneClient::new(channel).max_decoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::channel::<ProxyMessage>(16);
    // A long delta chain on disk is compacted by asking for a full snapshot.
    let held = state.index.load().version();
    let ask_from = if state.chain > 1000 { 0 } else { held };
    let hello = ProxyMessage {
        msg: Some(proxy_message::Msg::Hello(Hello {
            proxy_id: config.proxy_id.clone(),
            labels: config
                .labels
                .iter()
                .map(|(n, v)| Label {
                    name: n.clone(),
                    value: v.clone(),
                })
                .collect(),
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            version: ask_from,
        })),
    };
    tx.send(hello)
        .await
        .map_err(|_| "stream closed".to_owned())?;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let auth = format!("Bearer {}", config.join_token)
        .parse()
        .map_err(|_| "the join token is not valid metadata".to_owned())?;
    request.metadata_mut().insert("authorization", auth);
    let mut inbound = client
        .subscribe(request)
        .await
        .map_err(|s| format!("subscribe: {}", s.message()))?
        .into_inner();
    state.link.send_replace(Link::Connected {
        address: address.to_owned(),
    });
    tracing::info!(address, held, "Subscribed to the control plane");
    // What the last streams may have swallowed goes again.
    let ended = state.ended;
    while state
        .recent
        .front()
        .is_some_and(|(at, _)| ended.duration_since(*at) >= RESEND_WINDOW)
    {
        state.recent.pop_front();
    }
    for (_, report) in &state.recent {
        let msg = ProxyMessage {
            msg: Some(proxy_message::Msg::Session(report.clone())),
        };
        if tx.send(msg).await.is_err() {
            return Err("stream closed".to_owned());
        }
    }
    let beats = {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(HEARTBEAT);
            loop {
                t.tick().await;
                let unix_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                    .unwrap_or(0);
                let beat = ProxyMessage {
                    msg: Some(proxy_message::Msg::Heartbeat(Heartbeat { unix_ms })),
                };
                if tx.send(beat).await.is_err() {
                    break;
                }
            }
        })
    };
    let mut silent_at = tokio::time::Instant::now() + SILENCE;
    // A large update arrives in parts; they are joined here.
    let mut parts = vigil_proto::parts::Joiner::default();
    let result = loop {
        let received = tokio::select! {
            m = tokio::time::timeout_at(silent_at, inbound.message()) => m,
            Some(report) = state.reports.recv() => {
                let copy = report.clone();
                let msg = ProxyMessage { msg: Some(proxy_message::Msg::Session(report)) };
                let sent = tx.send(msg).await.is_ok();
                // Kept to send again: what must arrive, and whatever the stream
                // did not take.
                if !sent || must_arrive(&copy) {
                    if state.recent.len() >= RESEND_MAX {
                        state.recent.pop_front();
                    }
                    state.recent.push_back((tokio::time::Instant::now(), copy));
                }
                if !sent {
                    break Err("stream closed".to_owned());
                }
                continue;
            }
        };
        let msg = match received {
            Err(_) => break Err("the control plane went silent".to_owned()),
            Ok(Err(s)) => break Err(format!("stream: {}", s.message())),
            Ok(Ok(None)) => break Err("the control plane closed the stream".to_owned()),
            Ok(Ok(Some(m))) => m,
        };
        silent_at = tokio::time::Instant::now() + SILENCE;
        let envelope = match msg.msg {
            Some(control_message::Msg::Update(envelope)) => {
                parts.reset();
                Ok(envelope)
            }
            Some(control_message::Msg::UpdatePart(part)) => match parts.push(part) {
                Ok(Some(envelope)) => Ok(envelope),
                Ok(None) => continue,
                // Answered like an update that fails to verify: the control plane
                // sends the full snapshot again.
                Err(e) => Err((0, e.to_string())),
            },
            _ => continue,
        };
        let applied = match envelope {
            Ok(envelope) => apply(config, state, envelope).await,
            Err(e) => Err(e),
        };
        let reply = match applied {
            Ok(version) => proxy_message::Msg::Ack(Ack { version }),
            Err((version, error)) => {
                tracing::warn!(version, error = %error, "Refused a snapshot update; keeping the last good one");
                proxy_message::Msg::Nack(Nack { version, error })
            }
        };
        if tx.send(ProxyMessage { msg: Some(reply) }).await.is_err() {
            break Err("stream closed".to_owned());
        }
    };
    beats.abort();
    result
}

/// Updates larger than this are decoded on a blocking thread.
const INLINE_BYTES: usize = 64 * 1024;

/// Verifies, applies, persists, then swaps. A large update (a full snapshot takes a
/// while to decode) or one that must reach the disk is worked on a blocking thread;
/// a small delta in place, so a thousand deltas do not start a thousand threads.
/// Returns the version applied, or the version refused with why.
async fn apply(
    config: &Config,
    state: &mut State,
    envelope: vigil_snapshot::Envelope,
) -> Result<u64, (u64, String)> {
    let verifier = config.verifier.clone();
    let current = state.index.load_full();
    let store = state.store.clone();
    let blocking = store.is_some() || envelope.payload.len() > INLINE_BYTES;
    let work = move || {
        let update = verifier.open(&envelope).map_err(|e| (0, e.to_string()))?;
        // The signed bytes are read again only to persist them: without a snapshot
        // file they are freed before the index is built (a full snapshot's are tens
        // of megabytes, which would otherwise add to the peak).
        let signed = store.map(|s| (s, envelope));
        let (version, full) = (update.version, update.full);
        let next = current
            .apply(update)
            .map_err(|e| (version, e.to_string()))?;
        // Keep serving even if the disk fails; the next full snapshot rewrites the file.
        let persisted = signed.map(|(s, envelope)| s.record(&envelope, full));
        Ok((next, full, persisted))
    };
    let (next, full, persisted) = if blocking {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| (0, format!("applying the update failed: {e}")))??
    } else {
        work()?
    };
    match persisted {
        Some(Ok(())) => state.chain = if full { 1 } else { state.chain + 1 },
        Some(Err(e)) => tracing::warn!(error = %e, "Cannot persist the snapshot"),
        None => {}
    }
    let version = next.version();
    state.index.store(Arc::new(next));
    state.version.send_replace(version);
    tracing::debug!(version, full, "Snapshot applied");
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_a_snapshot_the_proxy_is_not_ready() {
        let handle = start(Config {
            addresses: vec![],
            join_token: String::new(),
            ca_pem: None,
            verifier: Verifier::default(),
            proxy_id: "p".into(),
            labels: vec![],
            snapshot_file: None,
        });
        tokio::task::yield_now().await;
        let not_ready = handle.readiness().unwrap_err();
        assert!(
            not_ready.contains("refusing every protected request"),
            "{not_ready}"
        );
        assert!(
            not_ready.contains("no control-plane address"),
            "{not_ready}"
        );
        assert_eq!(handle.index.load().version(), 0);
    }
}
