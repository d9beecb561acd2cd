//! The snapshot stream: one task keeps the snapshot current from the store; each
//! subscribed proxy gets a gRPC stream that always jumps to the newest version.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Mutex};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use vigil_proto::parts::{update_messages, UPDATE_PART_BYTES};
use vigil_proto::v1::control_plane_server::{ControlPlane, ControlPlaneServer};
use vigil_proto::v1::{
    control_message, proxy_message, ControlMessage, Envelope, Heartbeat, Hello, ProxyMessage,
};
use vigil_proto::HEARTBEAT;
use vigil_snapshot::Signer;

use crate::crypto::token_hash;
use crate::resources::{is_past, JoinToken, Resource as _};
use crate::snapshot::Builder;
use crate::Control;
use vigil_proto::{sole_bearer, BearerError};
/// How often the store is polled for writes made elsewhere: often without
/// LISTEN/NOTIFY (SQLite, or while the listener reconnects), rarely as a safety net.
const POLL: Duration = Duration::from_secs(1);
const POLL_LISTENING: Duration = Duration::from_secs(30);
/// A version that changed no snapshot entry (a write to sessions' bookkeeping,
/// admin or join tokens) is announced to streams at most this often: the
/// verifier and proxies' activity reports write many such versions, and each
/// would otherwise wake every proxy. Versions that change entries go at once.
const QUIET_EVERY: Duration = Duration::from_secs(1);

/// How often each replica records the fleet it serves in the store.
const RECORD_FLEET: Duration = Duration::from_secs(2);
/// A proxy recorded as connected but not heard of for this long streamed from a
/// replica that is gone.
const STALE: Duration = Duration::from_secs(35);
/// Proxies not seen for this long are forgotten.
const FORGET: Duration = Duration::from_secs(7 * 24 * 3600);

/// What the control plane knows of one proxy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProxyStatus {
    /// The proxy's id (from its hello).
    pub id: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its software version.
    pub software_version: String,
    /// The join token it authenticated with.
    pub join_token: String,
    /// The version it last acknowledged.
    pub version: u64,
    /// The version it last refused, with why.
    pub last_nack: Option<Nack>,
    /// Whether its stream is open now (on any replica).
    pub connected: bool,
    /// When the current (or last) stream opened (RFC 3339 in JSON).
    #[serde(with = "crate::time::as_millis")]
    pub connected_since: DateTime<Utc>,
    /// When it was last heard from (RFC 3339 in JSON).
    #[serde(with = "crate::time::as_millis")]
    pub last_seen: DateTime<Utc>,
    /// Changed since this replica last recorded the fleet.
    #[serde(skip)]
    dirty: bool,
}

impl ProxyStatus {
    /// A proxy that has just said `hello`.
    fn from_hello(hello: Hello, join_token: String) -> ProxyStatus {
        let now = Utc::now();
        ProxyStatus {
            id: hello.proxy_id,
            labels: hello
                .labels
                .into_iter()
                .map(|l| (l.name, l.value))
                .collect(),
            software_version: hello.software_version,
            join_token,
            version: hello.version,
            last_nack: None,
            connected: true,
            connected_since: now,
            last_seen: now,
            dirty: true,
        }
    }
}

/// A refused version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Nack {
    /// The version refused.
    pub version: u64,
    /// The proxy's error.
    pub error: String,
}

/// The shared snapshot state and the fleet.
pub struct Hub {
    builder: Mutex<Builder>,
    version: watch::Sender<u64>,
    signer: Arc<Signer>,
    /// Signed updates for the current version, by base ([`vigil_snapshot::History::base_for`]:
    /// every holder that needs the full snapshot shares one entry).
    cache: Mutex<(u64, HashMap<u64, Envelope>)>,
    proxies: Mutex<BTreeMap<String, ProxyStatus>>,
    /// Session reports on their way to the store.
    reports: mpsc::Sender<crate::sessions::Report>,
    /// When the hub began, the base of `announced_ms`.
    born: std::time::Instant,
    /// When (ms after `born`) a version was last announced to streams.
    announced_ms: std::sync::atomic::AtomicU64,
    /// A version built but not yet announced (0: none), see [`QUIET_EVERY`].
    quiet: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("version", &*self.version.borrow())
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// Builds the first snapshot from the whole store; also returns the queue of
    /// session reports for [`crate::sessions::run`] to drain.
    pub(crate) async fn start(
        control: &Control,
        signer: Arc<Signer>,
    ) -> Result<(Arc<Hub>, mpsc::Receiver<crate::sessions::Report>), vigil_store::StoreError> {
        let (revision, records) = control.store.load_all().await?;
        let c = control.clone();
        let builder = Builder::full(revision, records, Box::new(move |s| c.open(s)));
        let version = builder.history().current().version;
        tracing::info!(version, "Snapshot built");
        let (tx, _) = watch::channel(version);
        let (reports, queued) = crate::sessions::queue();
        let hub = Hub {
            builder: Mutex::new(builder),
            version: tx,
            signer,
            cache: Mutex::new((version, HashMap::new())),
            proxies: Mutex::new(BTreeMap::new()),
            reports,
            born: std::time::Instant::now(),
            announced_ms: std::sync::atomic::AtomicU64::new(0),
            quiet: std::sync::atomic::AtomicU64::new(0),
        };
        Ok((Arc::new(hub), queued))
    }

    /// The version of the current snapshot (announced to streams, or about to
    /// be: see [`QUIET_EVERY`]).
    pub fn version(&self) -> u64 {
        (*self.version.borrow()).max(self.quiet.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The whole fleet: what every replica recorded, with this replica's own
    /// (fresher) knowledge laid over it, each proxy as last heard of.
    pub async fn fleet(
        &self,
        control: &Control,
    ) -> Result<Vec<ProxyStatus>, vigil_store::StoreError> {
        let stale = Utc::now() - STALE;
        let mut fleet: BTreeMap<String, ProxyStatus> = BTreeMap::new();
        for (id, doc) in control.store.proxies().await? {
            match serde_json::from_str::<ProxyStatus>(&doc) {
                Ok(mut s) => {
                    if s.connected && s.last_seen < stale {
                        s.connected = false;
                    }
                    fleet.insert(id, s);
                }
                Err(e) => {
                    tracing::warn!(proxy = %id, error = %e, "A recorded proxy status does not decode")
                }
            }
        }
        for s in self.proxies.lock().await.values() {
            match fleet.get(&s.id) {
                Some(recorded) if recorded.last_seen > s.last_seen => {}
                _ => {
                    fleet.insert(s.id.clone(), s.clone());
                }
            }
        }
        Ok(fleet.into_values().collect())
    }

    /// Announces `version` to every stream.
    fn announce(&self, version: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.quiet.store(0, Relaxed);
        let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.announced_ms.store(now, Relaxed);
        self.version.send_replace(version);
    }

    /// How long until a version held back by [`QUIET_EVERY`] is due (zero: now);
    /// `None` when none is held back.
    pub(crate) fn quiet_due_in(&self) -> Option<Duration> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.quiet.load(Relaxed) == 0 {
            return None;
        }
        let since = self
            .born
            .elapsed()
            .saturating_sub(Duration::from_millis(self.announced_ms.load(Relaxed)));
        Some(QUIET_EVERY.saturating_sub(since))
    }

    /// Catches up with the store; returns the new version.
    pub async fn refresh(&self, control: &Control) -> Result<u64, vigil_store::StoreError> {
        let held = self.quiet.load(std::sync::atomic::Ordering::Relaxed);
        if held != 0 && self.quiet_due_in() == Some(Duration::ZERO) {
            self.announce(held);
        }
        let from = self.version();
        let (revision, changes, records) = control
            .store
            .changed_since(i64::try_from(from).unwrap_or(i64::MAX))
            .await?;
        let Ok(target) = u64::try_from(revision) else {
            return Ok(from);
        };
        if target <= from {
            return Ok(from);
        }
        let changed = {
            let mut b = self.builder.lock().await;
            // Another refresh may have got there first.
            if b.history().current().version >= target {
                return Ok(self.version());
            }
            b.advance(revision, &changes, records)
        };
        tracing::debug!(
            version = target,
            changed = changed.len(),
            "Snapshot advanced"
        );
        if changed.is_empty() && self.recently_announced() {
            self.quiet
                .store(target, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.announce(target);
        }
        Ok(target)
    }

    /// Whether a version was announced less than [`QUIET_EVERY`] ago.
    fn recently_announced(&self) -> bool {
        let at =
            Duration::from_millis(self.announced_ms.load(std::sync::atomic::Ordering::Relaxed));
        self.born.elapsed().saturating_sub(at) < QUIET_EVERY
    }

    /// The signed update taking a holder of `from` to the current version. One
    /// caller computes and signs it while the others wait for the cached result:
    /// a thousand streams woken by one write sign it once.
    async fn update_from(&self, from: u64) -> Option<(u64, Envelope)> {
        let mut cache = self.cache.lock().await;
        let (version, base, update) = {
            let b = self.builder.lock().await;
            let h = b.history();
            let (version, base) = (h.current().version, h.base_for(from)?);
            if cache.0 == version {
                if let Some(e) = cache.1.get(&base) {
                    return Some((version, e.clone()));
                }
            }
            (version, base, h.update_from(from)?)
        };
        let envelope = self.signer.seal(&update);
        if cache.0 != version {
            *cache = (version, HashMap::new());
        }
        // Deltas from many bases are small; keep the cache from growing without bound.
        if cache.1.len() < 64 {
            cache.1.insert(base, envelope.clone());
        }
        Some((version, envelope))
    }

    async fn seen(&self, id: &str, f: impl FnOnce(&mut ProxyStatus)) {
        if let Some(s) = self.proxies.lock().await.get_mut(id) {
            s.last_seen = Utc::now();
            s.dirty = true;
            f(s);
        }
    }
}

/// Records the proxies this replica serves in the store, every couple of seconds,
/// so that every replica can list the whole fleet.
pub async fn run_fleet_recorder(control: Control, hub: Arc<Hub>) {
    let mut tick = tokio::time::interval(RECORD_FLEET);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let rows: Vec<(String, String, i64)> = {
            let mut proxies = hub.proxies.lock().await;
            proxies
                .values_mut()
                .filter(|s| s.dirty)
                .filter_map(|s| {
                    s.dirty = false;
                    let doc = serde_json::to_string(s).ok()?;
                    Some((s.id.clone(), doc, s.last_seen.timestamp_millis()))
                })
                .collect()
        };
        if rows.is_empty() {
            continue;
        }
        let forget = (Utc::now() - FORGET).timestamp_millis();
        if let Err(e) = control.store.put_proxies(&rows, forget).await {
            tracing::debug!(error = %e, "Cannot record the fleet now; will retry");
            let mut proxies = hub.proxies.lock().await;
            for (id, _, _) in &rows {
                if let Some(s) = proxies.get_mut(id) {
                    s.dirty = true;
                }
            }
        }
    }
}

/// Keeps the hub current: on every local write at once, and by polling for writes
/// made through other replicas.
pub async fn run_refresher(control: Control, hub: Arc<Hub>) {
    let mut local = control.revisions();
    let mut failing = false;
    let mut listener: Option<vigil_store::RevisionListener> = None;
    loop {
        if listener.is_none() {
            // Cheap on SQLite (there is nothing to listen to); on PostgreSQL retried
            // at each poll until it connects.
            listener = control
                .store
                .listen_revisions()
                .await
                .map_err(
                    |e| tracing::debug!(error = %e, "Cannot LISTEN for revisions yet; polling"),
                )
                .ok()
                .flatten();
        }
        let poll = if listener.is_some() {
            POLL_LISTENING
        } else {
            POLL
        };
        let notified = async {
            match listener.as_mut() {
                Some(l) => l.next().await.map(|_| ()),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = local.changed() => if r.is_err() { return },
            r = notified => if let Err(e) = r {
                tracing::debug!(error = %e, "Revision listener failed; polling until it is back");
                listener = None;
            },
            () = tokio::time::sleep(poll) => {},
            // A quiet version held back comes out when it is due.
            () = tokio::time::sleep(hub.quiet_due_in().unwrap_or(poll)) => {},
        }
        match hub.refresh(&control).await {
            Ok(_) => {
                if failing {
                    tracing::info!("Snapshot refresh recovered");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "Snapshot refresh failed; proxies keep the last version");
                }
                failing = true;
            }
        }
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct Service {
    control: Control,
    hub: Arc<Hub>,
}

impl Service {
    /// A tonic server for the service.
    pub fn server(control: Control, hub: Arc<Hub>) -> ControlPlaneServer<Service> {
        ControlPlaneServer::new(Service { control, hub })
            .max_decoding_message_size(4 << 20)
            .max_encoding_message_size(usize::MAX)
    }

    /// The join token in the metadata, checked against the store: its name.
    async fn authenticate(&self, req: &Request<Streaming<ProxyMessage>>) -> Result<String, Status> {
        let token = sole_bearer(req.metadata().as_ref()).map_err(|e| {
            Status::unauthenticated(match e {
                BearerError::NotOne => "send one join token as `authorization: Bearer <token>`",
                BearerError::Malformed | BearerError::NotBearer => {
                    "the authorization metadata must be `Bearer <token>`"
                }
            })
        })?;
        let hash = token_hash(token);
        // Comparing hashes: equal time whatever the token.
        if self.control.fleet_join_hash() == Some(hash.as_str()) {
            return Ok("fleet".into());
        }
        let rec = self
            .control
            .store
            .find_by_secret(JoinToken::KIND, &hash)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "Join token lookup failed");
                Status::unavailable("the control plane cannot check join tokens right now")
            })?
            .ok_or_else(|| Status::unauthenticated("unknown join token"))?;
        let spec = crate::api::stored::<JoinToken>(rec.body)
            .map_err(|_| Status::internal("a stored join token does not decode"))?;
        if spec.expires_at.as_deref().is_some_and(is_past) {
            return Err(Status::unauthenticated("the join token has expired"));
        }
        Ok(rec.id)
    }
}

type Outbound = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl ControlPlane for Service {
    type SubscribeStream = Outbound;

    async fn subscribe(
        &self,
        req: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<Outbound>, Status> {
        let join_token = self.authenticate(&req).await?;
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(HEARTBEAT, inbound.message()).await {
            Ok(Ok(Some(ProxyMessage {
                msg: Some(proxy_message::Msg::Hello(h)),
            }))) => h,
            Ok(Err(e)) => return Err(e),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be a hello",
                ))
            }
        };
        // The id goes into the log, the fleet table and audit actors: no NUL (the
        // store cannot hold it) and no line breaks or other control characters.
        if hello.proxy_id.is_empty()
            || hello.proxy_id.len() > 200
            || hello.proxy_id.chars().any(char::is_control)
        {
            return Err(Status::invalid_argument(
                "hello.proxy_id must be 1 to 200 characters, none of them control characters",
            ));
        }
        let id = hello.proxy_id.clone();
        let held = hello.version;
        self.hub
            .proxies
            .lock()
            .await
            .insert(id.clone(), ProxyStatus::from_hello(hello, join_token));
        tracing::info!(proxy = %id, held, "Proxy subscribed");
        // The refresher follows writes a moment later; catching up here first means
        // a proxy that subscribes after a write was acknowledged starts with it.
        if let Err(e) = self.hub.refresh(&self.control).await {
            tracing::debug!(proxy = %id, error = %e, "Cannot catch up with the store; sending the snapshot built so far");
        }
        // Capacity 1: a proxy that stops reading holds one update here and one in
        // flight; newer versions replace what it has not taken yet.
        let (tx, rx) = mpsc::channel::<Result<ControlMessage, Status>>(1);
        let (held_tx, held_rx) = watch::channel(held);
        let reader = tokio::spawn(read_inbound(self.hub.clone(), id.clone(), inbound, held_tx));
        tokio::spawn(write_outbound(self.hub.clone(), id, tx, held_rx, reader));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The proxy's side of a stream: acks, nacks, heartbeats, session reports, and a new
/// hello (which asks for what changed since the version it names). What the proxy
/// holds goes to the writer through `held`.
async fn read_inbound(
    hub: Arc<Hub>,
    id: String,
    mut inbound: Streaming<ProxyMessage>,
    held: watch::Sender<u64>,
) {
    while let Ok(Some(m)) = inbound.message().await {
        match m.msg {
            Some(proxy_message::Msg::Ack(a)) => hub.seen(&id, |s| s.version = a.version).await,
            Some(proxy_message::Msg::Nack(n)) => {
                tracing::warn!(proxy = %id, version = n.version, error = %n.error, "Proxy refused an update");
                let nack = Nack {
                    version: n.version,
                    error: n.error.chars().take(1000).collect(),
                };
                hub.seen(&id, |s| s.last_nack = Some(nack)).await;
                // It keeps what it had, which we no longer know exactly: resend in full.
                held.send_replace(0);
            }
            Some(proxy_message::Msg::Hello(h)) => {
                hub.seen(&id, |_| {}).await;
                held.send_replace(h.version);
            }
            Some(proxy_message::Msg::Session(report)) => {
                hub.seen(&id, |_| {}).await;
                if hub.reports.try_send((id.clone(), report)).is_err() {
                    tracing::warn!(proxy = %id, "Session reports are arriving faster than they can be recorded; dropped one");
                }
            }
            Some(proxy_message::Msg::Heartbeat(_)) | None => hub.seen(&id, |_| {}).await,
        }
    }
}

/// The control plane's side of a stream: latest wins. Whenever there is room to
/// send, it sends the update from what the proxy holds to the newest version; a
/// new `held` (after a nack or a hello) takes effect at once.
async fn write_outbound(
    hub: Arc<Hub>,
    id: String,
    tx: mpsc::Sender<Result<ControlMessage, Status>>,
    mut held: watch::Receiver<u64>,
    reader: tokio::task::JoinHandle<()>,
) {
    let mut versions = hub.version.subscribe();
    let mut sent = *held.borrow_and_update();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let Some((version, envelope)) = hub.update_from(sent).await {
            // A large update goes in parts; a new `held` may cut it short, and the
            // next update's first part tells the proxy to drop what it began.
            let send = async {
                for msg in update_messages(envelope, UPDATE_PART_BYTES) {
                    tx.send(Ok(ControlMessage { msg: Some(msg) })).await?;
                }
                Ok::<(), mpsc::error::SendError<_>>(())
            };
            tokio::select! {
                r = send => if r.is_err() { break } else { sent = version },
                r = held.changed() => if r.is_err() { break } else { sent = *held.borrow_and_update() },
            }
            continue;
        }
        tokio::select! {
            r = versions.changed() => if r.is_err() { break },
            r = held.changed() => if r.is_err() { break } else { sent = *held.borrow_and_update() },
            _ = heartbeat.tick() => {
                let beat = ControlMessage { msg: Some(control_message::Msg::Heartbeat(Heartbeat { unix_ms: Utc::now().timestamp_millis() })) };
                if tx.send(Ok(beat)).await.is_err() { break }
            }
            () = tx.closed() => break,
        }
    }
    reader.abort();
    hub.seen(&id, |s| s.connected = false).await;
    tracing::info!(proxy = %id, "Proxy stream closed");
}
