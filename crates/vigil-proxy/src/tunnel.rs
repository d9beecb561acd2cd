//! Open WebSocket tunnels, and their continuous verification: a tunnel outlives the
//! request that opened it, so whenever a new snapshot is swapped in, and at least
//! every [`RECHECK_EVERY`], each tunnel's original request is decided again against
//! the current snapshot; a tunnel no longer allowed is closed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch, Notify};

use crate::index::Index;
use crate::subscriber::Shared;

/// Every open tunnel is decided again at least this often (session expiry, time
/// windows, grants ending), besides on every new snapshot.
pub const RECHECK_EVERY: Duration = Duration::from_secs(30);

/// How often the verifier looks for a swapped snapshot when no version watch is
/// followed ([`Tunnels::follow`]): one wait-free load of the index.
const SWAP_POLL: Duration = Duration::from_millis(100);

/// Decides a tunnel's original request again: `Err(reason)` closes it.
pub type Recheck = Box<dyn Fn(&Index, i64) -> Result<(), String> + Send + Sync>;

/// Who holds a tunnel, and where to: what an admin (and the log) sees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelInfo {
    /// The request that opened it.
    pub request_id: String,
    /// Its route.
    pub route: String,
    /// The principal as the decision log names it.
    pub principal: String,
    /// The session, for a user signed in with a cookie.
    pub session: Option<String>,
    /// The user, however authenticated.
    pub user: Option<String>,
    /// The service account, for a service account's token.
    pub service_account: Option<String>,
    /// The device, when the session names one.
    pub device: Option<String>,
}

struct Open {
    info: Arc<TunnelInfo>,
    recheck: Arc<Recheck>,
    close: Option<oneshot::Sender<String>>,
}

/// The tunnels of one proxy.
pub struct Tunnels {
    open: parking_lot::Mutex<HashMap<u64, Open>>,
    next: AtomicU64,
    verifier: AtomicBool,
    wake: Notify,
    /// Where the number open is shown.
    gauge: Option<prometheus_client::metrics::gauge::Gauge<i64, std::sync::atomic::AtomicI64>>,
}

impl std::fmt::Debug for Tunnels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnels")
            .field("open", &self.open.lock().len())
            .finish_non_exhaustive()
    }
}

/// A registered tunnel: unregisters it when dropped (however the tunnel ends).
#[derive(Debug)]
pub struct Registration {
    id: u64,
    tunnels: Weak<Tunnels>,
    /// Resolves with the reason when the tunnel must be closed.
    pub closed: Option<oneshot::Receiver<String>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(t) = self.tunnels.upgrade() {
            if t.open.lock().remove(&self.id).is_some() {
                t.count();
            }
        }
    }
}

impl Tunnels {
    /// An empty registry, counting open tunnels in `metrics` when given.
    pub fn new(metrics: Option<Arc<crate::metrics::Metrics>>) -> Arc<Tunnels> {
        Tunnels::counted(metrics.map(|m| m.tunnels_open.clone()))
    }

    /// An empty registry of long streaming responses (same verification as
    /// tunnels), counted in `vigil_proxy_streams_watched`.
    pub fn for_streams(metrics: Option<Arc<crate::metrics::Metrics>>) -> Arc<Tunnels> {
        Tunnels::counted(metrics.map(|m| m.streams_watched.clone()))
    }

    fn counted(
        gauge: Option<prometheus_client::metrics::gauge::Gauge<i64, std::sync::atomic::AtomicI64>>,
    ) -> Arc<Tunnels> {
        Arc::new(Tunnels {
            open: parking_lot::Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            verifier: AtomicBool::new(false),
            wake: Notify::new(),
            gauge,
        })
    }

    fn count(&self) {
        if let Some(g) = &self.gauge {
            let n = self.open.lock().len();
            g.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Registers a tunnel whose request was decided on snapshot version `decided`;
    /// the first registration starts the verifier, which reads `index` (the proxy's
    /// one swapped index). A snapshot swapped in since `decided` is verified at once.
    pub fn open(
        self: &Arc<Self>,
        info: TunnelInfo,
        recheck: Recheck,
        index: &Shared,
        decided: u64,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.open.lock().insert(
            id,
            Open {
                info: Arc::new(info),
                recheck: Arc::new(recheck),
                close: Some(tx),
            },
        );
        self.count();
        let current = index.load().version();
        if !self.verifier.swap(true, Ordering::AcqRel) {
            tokio::spawn(verify_loop(Arc::downgrade(self), index.clone(), current));
        }
        if current != decided {
            self.wake.notify_one();
        }
        Registration {
            id,
            tunnels: Arc::downgrade(self),
            closed: Some(rx),
        }
    }

    /// The open tunnels.
    pub fn list(&self) -> Vec<Arc<TunnelInfo>> {
        self.open.lock().values().map(|o| o.info.clone()).collect()
    }

    /// How many tunnels are open.
    pub fn len(&self) -> usize {
        self.open.lock().len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every tunnel `which` selects, with `reason`; returns how many.
    pub fn close_where(&self, which: impl Fn(&TunnelInfo) -> bool, reason: &str) -> usize {
        let mut open = self.open.lock();
        let mut n = 0;
        for o in open.values_mut().filter(|o| which(&o.info)) {
            if let Some(tx) = o.close.take() {
                let _ = tx.send(reason.to_owned());
                n += 1;
            }
        }
        n
    }

    /// Decides every open tunnel's request again against `index` at `now` and closes
    /// those no longer allowed; returns how many it closed. The decisions run
    /// outside the registry's lock.
    pub fn verify(&self, index: &Index, now: i64) -> usize {
        let checks: Vec<(u64, Arc<Recheck>)> = self
            .open
            .lock()
            .iter()
            .filter(|(_, o)| o.close.is_some())
            .map(|(id, o)| (*id, o.recheck.clone()))
            .collect();
        let refused: Vec<(u64, String)> = checks
            .into_iter()
            .filter_map(|(id, check)| check(index, now).err().map(|why| (id, why)))
            .collect();
        let mut open = self.open.lock();
        let mut n = 0;
        for (id, why) in refused {
            if let Some(tx) = open.get_mut(&id).and_then(|o| o.close.take()) {
                let _ = tx.send(why);
                n += 1;
            }
        }
        n
    }

    /// Verifies the tunnels on every change `version` reports (the subscriber's
    /// version watch), on top of the verifier's own look at the swapped index.
    pub fn follow(self: &Arc<Self>, mut version: watch::Receiver<u64>) {
        let tunnels = Arc::downgrade(self);
        tokio::spawn(async move {
            while version.changed().await.is_ok() {
                match tunnels.upgrade() {
                    Some(t) => t.wake.notify_one(),
                    None => break,
                }
            }
        });
    }
}

fn now_s() -> i64 {
    crate::clock::now()
}

/// Runs while the registry lives: verifies every tunnel when the index swapped in
/// is not version `seen` (the one last verified against), when woken
/// ([`Tunnels::follow`], or a tunnel decided on an older version), and every
/// [`RECHECK_EVERY`].
async fn verify_loop(tunnels: Weak<Tunnels>, index: Shared, mut seen: u64) {
    let mut last = Instant::now();
    loop {
        let wake = match tunnels.upgrade() {
            Some(t) => t,
            None => return,
        };
        let woken = tokio::select! {
            () = wake.wake.notified() => true,
            () = tokio::time::sleep(SWAP_POLL) => false,
        };
        drop(wake);
        let current = index.load_full();
        if !woken && current.version() == seen && last.elapsed() < RECHECK_EVERY {
            continue;
        }
        seen = current.version();
        last = Instant::now();
        let Some(t) = tunnels.upgrade() else { return };
        if t.is_empty() {
            continue;
        }
        let closed = t.verify(&current, now_s());
        if closed > 0 {
            tracing::debug!(closed, version = seen, "Tunnels no longer allowed");
        }
    }
}

/// The decision line of a tunnel or long response the proxy closed: `reason`,
/// the response's `status`, and how long it was `open`.
pub(crate) fn log_closed(info: &TunnelInfo, reason: &str, status: u16, open: Duration) {
    tracing::info!(
        target: "vigil::decision",
        request_id = %info.request_id,
        route = info.route.as_str(),
        principal = %info.principal,
        decision = "closed",
        rule = "-",
        reason,
        status,
        open_ms = u64::try_from(open.as_millis()).unwrap_or(u64::MAX),
        "decision"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    fn info(route: &str, user: &str) -> TunnelInfo {
        TunnelInfo {
            route: route.into(),
            user: Some(user.into()),
            principal: format!("user:{user}"),
            ..TunnelInfo::default()
        }
    }

    #[tokio::test]
    async fn verification_closes_only_what_is_no_longer_allowed() {
        let shared: Shared = Arc::new(arc_swap::ArcSwap::from_pointee(Index::default()));
        let tunnels = Tunnels::new(None);
        let revoked = Arc::new(Mutex::new(Vec::<String>::new()));
        let mk = |user: &'static str| {
            let revoked = revoked.clone();
            let recheck: Recheck = Box::new(move |_, _| {
                if revoked.lock().iter().any(|u| u == user) {
                    Err(format!("{user} was revoked"))
                } else {
                    Ok(())
                }
            });
            tunnels.open(info("app", user), recheck, &shared, 0)
        };
        let mut alice = mk("alice");
        let mut bob = mk("bob");
        assert_eq!(tunnels.len(), 2);
        assert_eq!(tunnels.verify(&Index::default(), 0), 0);
        revoked.lock().push("bob".into());
        assert_eq!(tunnels.verify(&Index::default(), 0), 1);
        let why = bob
            .closed
            .take()
            .unwrap_or_else(|| panic!("no receiver"))
            .await;
        assert_eq!(why.as_deref(), Ok("bob was revoked"));
        // A closed tunnel is not decided or closed twice; it leaves when dropped.
        assert_eq!(tunnels.verify(&Index::default(), 0), 0);
        drop(bob);
        assert_eq!(tunnels.len(), 1);
        assert_eq!(
            tunnels.close_where(|t| t.user.as_deref() == Some("alice"), "admin"),
            1
        );
        let why = alice
            .closed
            .take()
            .unwrap_or_else(|| panic!("no receiver"))
            .await;
        assert_eq!(why.as_deref(), Ok("admin"));
        drop(alice);
        assert!(tunnels.is_empty());
    }

    #[tokio::test]
    async fn a_swapped_snapshot_wakes_the_verifier() {
        let shared: Shared = Arc::new(arc_swap::ArcSwap::from_pointee(Index::default()));
        let tunnels = Tunnels::new(None);
        // Allowed only at version 0: any new snapshot closes it.
        let recheck: Recheck = Box::new(|index, _| {
            if index.version() == 0 {
                Ok(())
            } else {
                Err("a new snapshot".into())
            }
        });
        let mut reg = tunnels.open(info("app", "alice"), recheck, &shared, 0);
        // Swapped in before the verifier first looks: still noticed.
        let mut next = Index::default();
        let mut snapshot = (*next.snapshot).clone();
        snapshot.version = 7;
        next.snapshot = Arc::new(snapshot);
        shared.store(Arc::new(next));
        let closed = reg.closed.take().unwrap_or_else(|| panic!("no receiver"));
        let why = tokio::time::timeout(Duration::from_secs(5), closed).await;
        assert!(
            matches!(why, Ok(Ok(ref w)) if w == "a new snapshot"),
            "{why:?}"
        );
    }
}
