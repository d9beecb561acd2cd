//! Long streaming responses (server-sent events, long downloads) are decided again
//! like WebSocket tunnels: a response whose body is still streaming is registered
//! in a [`Tunnels`] registry of its own and re-checked on every new snapshot and at
//! least every [`crate::tunnel::RECHECK_EVERY`]; one no longer allowed is ended
//! with an error, so the client sees it cut (HTTP/1.1: the connection closes;
//! HTTP/2: the stream is reset), and a `closed` decision line is logged.
//!
//! Ordinary responses pay nothing for this: the body wrapper holds what it needs by
//! value (inside the response's one boxed body) and registers only once the body
//! has been streaming for [`REGISTER_AFTER`]; `text/event-stream` registers as
//! soon as it waits for the upstream. At registration the request is decided again
//! on the spot, so nothing is sent after a refusal the proxy already knows of. A
//! response shorter than [`REGISTER_AFTER`] is delivered as it was decided, even
//! when a snapshot revoking its caller lands while it is sent: cutting it would
//! only turn a response already on its way into a broken one.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use crate::index::Index;
use crate::subscriber::Shared;
use crate::tunnel::{Recheck, Registration, TunnelInfo, Tunnels};

/// A body still streaming after this long is registered for re-verification.
pub const REGISTER_AFTER: Duration = Duration::from_secs(1);

/// Errors a proxied body can end with.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// What a response's request turns into when its body lasts: who asked and how
/// the request is decided again.
pub trait Later: Send + Unpin + 'static {
    /// Decides the request again against `index` at `now`.
    fn check(&mut self, index: &Index, now: i64) -> Result<(), String>;
    /// What the registry (and the log) shows, and the re-check to register.
    fn into_watch(self) -> (TunnelInfo, Recheck);
}

/// What every watched body of one proxy shares.
#[derive(Debug)]
pub struct Streams {
    /// The registry of long responses.
    pub registry: Arc<Tunnels>,
    index: Shared,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Streams {
    /// Watches bodies against the index `index` holds.
    pub fn new(index: Shared, metrics: Option<Arc<crate::metrics::Metrics>>) -> Arc<Streams> {
        Arc::new(Streams {
            registry: Tunnels::for_streams(metrics.clone()),
            index,
            metrics,
        })
    }
}

/// The ending decided by the proxy, as the body's error.
#[derive(Debug)]
struct Ended(String);

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ended by continuous verification: {}", self.0)
    }
}

impl std::error::Error for Ended {}

struct Watching {
    registration: Registration,
    closed: oneshot::Receiver<String>,
    info: TunnelInfo,
}

/// An upstream's body, re-verified while it lasts (see the module's doc).
pub struct Watched<B, L: Later> {
    inner: B,
    streams: Arc<Streams>,
    /// Until registered.
    later: Option<L>,
    decided: u64,
    /// The response's status, for the log.
    status: u16,
    started: Instant,
    eager: bool,
    watching: Option<Watching>,
    done: bool,
}

impl<B, L: Later> Watched<B, L> {
    /// Wraps `inner`, the body of a response (`head`) to a request decided on
    /// snapshot version `decided`.
    pub fn new(
        inner: B,
        head: &http::response::Parts,
        streams: Arc<Streams>,
        later: L,
        decided: u64,
    ) -> Watched<B, L> {
        let event_stream = head
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        Watched {
            inner,
            streams,
            later: Some(later),
            decided,
            status: head.status.as_u16(),
            started: Instant::now(),
            eager: event_stream,
            watching: None,
            done: false,
        }
    }

    /// Registers the response once it lasts, deciding it again first; the reason
    /// when that refuses it.
    fn register_if_due(&mut self, waiting: bool) -> Option<String> {
        let later = self.later.as_mut()?;
        let due = (waiting && self.eager) || self.started.elapsed() >= REGISTER_AFTER;
        if !due {
            return None;
        }
        let current = self.streams.index.load();
        if let Err(why) = later.check(&current, crate::clock::now()) {
            let (info, _) = self.later.take()?.into_watch();
            self.log_closed(&info, &why);
            if let Some(m) = &self.streams.metrics {
                m.stream_closed(true);
            }
            return Some(why);
        }
        let version = current.version();
        drop(current);
        let (info, recheck) = self.later.take()?.into_watch();
        let mut registration =
            self.streams
                .registry
                .open(info.clone(), recheck, &self.streams.index, version);
        let closed = registration.closed.take()?;
        self.watching = Some(Watching {
            registration,
            closed,
            info,
        });
        None
    }

    fn log_closed(&self, info: &TunnelInfo, reason: &str) {
        crate::tunnel::log_closed(info, reason, self.status, self.started.elapsed());
    }

    /// The reason, once the registry has closed this response (logged and counted).
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Option<String> {
        use std::future::Future as _;
        let w = self.watching.as_mut()?;
        let Poll::Ready(Ok(why)) = Pin::new(&mut w.closed).poll(cx) else {
            return None;
        };
        let info = w.info.clone();
        // Unregistered: a body ended by verification is not counted again.
        self.watching = None;
        self.log_closed(&info, &why);
        if let Some(m) = &self.streams.metrics {
            m.stream_closed(true);
        }
        Some(why)
    }

    /// Ends the body with the proxy's refusal.
    fn end(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.done = true;
        Poll::Ready(Some(Err(Box::new(Ended(why)))))
    }
}

impl<B, L> Body for Watched<B, L>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
    L: Later,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(why) = this.poll_closed(cx) {
            return this.end(why);
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let waiting = match &polled {
            Poll::Ready(Some(Ok(_))) => false,
            Poll::Pending => true,
            Poll::Ready(_) => {
                this.done = true;
                return polled.map(|f| f.map(|r| r.map_err(Into::into)));
            }
        };
        if this.later.is_some() {
            if let Some(why) = this.register_if_due(waiting) {
                return this.end(why);
            }
            // Just registered: the close signal must be able to wake this body.
            if let Some(why) = this.poll_closed(cx) {
                return this.end(why);
            }
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B, L: Later> Drop for Watched<B, L> {
    fn drop(&mut self) {
        if let Some(w) = self.watching.take() {
            drop(w.registration);
            if let Some(m) = &self.streams.metrics {
                m.stream_closed(false);
            }
        }
    }
}

impl<B, L: Later> std::fmt::Debug for Watched<B, L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("decided", &self.decided)
            .field("registered", &self.watching.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::sync::mpsc;

    /// A body fed by the test, chunk by chunk.
    struct Fed(mpsc::Receiver<Bytes>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|c| c.map(|c| Ok(Frame::data(c))))
        }
    }

    /// Allowed while `allowed` holds.
    struct Gate(Arc<AtomicBool>);

    impl Later for Gate {
        fn check(&mut self, _: &Index, _: i64) -> Result<(), String> {
            if self.0.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("revoked".into())
            }
        }

        fn into_watch(self) -> (TunnelInfo, Recheck) {
            let allowed = self.0;
            let recheck: Recheck = Box::new(move |_, _| {
                if allowed.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("revoked".into())
                }
            });
            (TunnelInfo::default(), recheck)
        }
    }

    fn head(event_stream: bool) -> http::response::Parts {
        let kind = if event_stream {
            "text/event-stream"
        } else {
            "application/octet-stream"
        };
        let res = http::Response::builder()
            .header("content-type", kind)
            .body(())
            .unwrap();
        res.into_parts().0
    }

    fn index_at(version: u64) -> Arc<Index> {
        let mut index = Index::default();
        let mut snapshot = (*index.snapshot).clone();
        snapshot.version = version;
        index.snapshot = Arc::new(snapshot);
        Arc::new(index)
    }

    async fn next(
        body: &mut (impl Body<Data = Bytes, Error = BodyError> + Unpin),
    ) -> Option<Result<Bytes, String>> {
        use http_body_util::BodyExt as _;
        match body.frame().await? {
            Ok(f) => Some(Ok(f.into_data().unwrap())),
            Err(e) => Some(Err(e.to_string())),
        }
    }

    #[tokio::test]
    async fn a_short_body_is_never_registered() {
        let shared: Shared = Arc::new(arc_swap::ArcSwap::new(index_at(1)));
        let streams = Streams::new(shared, None);
        let (tx, rx) = mpsc::channel(4);
        let allowed = Arc::new(AtomicBool::new(true));
        let mut body = Watched::new(Fed(rx), &head(false), streams.clone(), Gate(allowed), 1);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        drop(tx);
        assert_eq!(next(&mut body).await, Some(Ok(Bytes::from_static(b"a"))));
        assert!(streams.registry.is_empty());
        assert_eq!(next(&mut body).await, None);
        assert!(streams.registry.is_empty());
    }

    #[tokio::test]
    async fn a_short_body_is_delivered_as_decided_and_a_long_one_decided_again() {
        let shared: Shared = Arc::new(arc_swap::ArcSwap::new(index_at(1)));
        let streams = Streams::new(shared.clone(), None);
        let (tx, rx) = mpsc::channel(4);
        let allowed = Arc::new(AtomicBool::new(true));
        let mut body = Watched::new(
            Fed(rx),
            &head(false),
            streams.clone(),
            Gate(allowed.clone()),
            1,
        );
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert_eq!(next(&mut body).await, Some(Ok(Bytes::from_static(b"a"))));
        // Revoked, and the snapshot saying so swapped in: a body younger than
        // REGISTER_AFTER still goes out whole.
        allowed.store(false, Ordering::SeqCst);
        shared.store(index_at(2));
        tx.send(Bytes::from_static(b"b")).await.unwrap();
        assert_eq!(next(&mut body).await, Some(Ok(Bytes::from_static(b"b"))));
        assert!(streams.registry.is_empty());
        // Once it has lasted, it is decided again before its next bytes: cut.
        tokio::time::sleep(REGISTER_AFTER + Duration::from_millis(50)).await;
        tx.send(Bytes::from_static(b"c")).await.unwrap();
        let cut = next(&mut body).await;
        assert!(
            matches!(&cut, Some(Err(e)) if e.contains("revoked")),
            "{cut:?}"
        );
        assert_eq!(next(&mut body).await, None);
        assert!(streams.registry.is_empty());
    }

    #[tokio::test]
    async fn a_registered_event_stream_is_cut_when_verification_refuses_it() {
        let shared: Shared = Arc::new(arc_swap::ArcSwap::new(index_at(1)));
        let streams = Streams::new(shared, None);
        let (tx, rx) = mpsc::channel(4);
        let allowed = Arc::new(AtomicBool::new(true));
        let mut body = Watched::new(
            Fed(rx),
            &head(true),
            streams.clone(),
            Gate(allowed.clone()),
            1,
        );
        // Waiting on its upstream, an event stream registers at once.
        let waiting = tokio::time::timeout(Duration::from_millis(50), next(&mut body)).await;
        assert!(waiting.is_err());
        assert_eq!(streams.registry.len(), 1);
        tx.send(Bytes::from_static(b"data: 1\n\n")).await.unwrap();
        assert!(matches!(next(&mut body).await, Some(Ok(_))));
        // The registry decides again (as on a new snapshot) and refuses it: the
        // waiting body wakes and ends with an error, unregistered.
        allowed.store(false, Ordering::SeqCst);
        let refuse = async {
            // Once the body waits again.
            tokio::task::yield_now().await;
            streams.registry.verify(&index_at(1), 0)
        };
        let (cut, refused) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(5), next(&mut body)),
            refuse
        );
        assert_eq!(refused, 1);
        let cut = cut.unwrap();
        assert!(
            matches!(&cut, Some(Err(e)) if e.contains("revoked")),
            "{cut:?}"
        );
        assert!(streams.registry.is_empty());
        drop(tx);
    }
}
