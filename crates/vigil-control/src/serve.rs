//! Serving the admin API over HTTP/1.1 and HTTP/2 with the limits `axum::serve`
//! leaves out: a connection that does not send a request head in time is closed,
//! an HTTP/2 connection with no request in flight for as long is closed too, and
//! at most so many connections are served at once, so a client cannot pile up
//! idle or half-sent connections until the process runs out of file descriptors
//! (and with them, database connections). The gRPC stream's listener is screened
//! the same way ([`screened`]).

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;

/// A request head must arrive within this long of the connection being ready for
/// it: a new connection, or one kept alive between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The most an HTTP/1 connection buffers, which bounds a request head (a longer
/// one gets 431); admin requests carry a token and a few headers.
const H1_MAX_BUFFER: usize = 64 * 1024;

/// An HTTP/2 connection is pinged after this long without a frame from the peer,
/// and closed when the ping is not answered within [`H2_PING_TIMEOUT`].
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Admin connections served at once unless configured otherwise; one more is
/// closed as soon as it is accepted.
pub const MAX_CONNECTIONS: usize = 1024;

/// In-flight requests get this long to finish after `shutdown`.
const DRAIN: Duration = Duration::from_secs(30);

/// Whether the client's first bytes arrive within [`HEADER_READ_TIMEOUT`] and
/// settle which HTTP it speaks: anything but the start of HTTP/2's preface is
/// HTTP/1, and a preface must arrive whole. Looked at without taking them.
pub async fn speaks_in_time(stream: &tokio::net::TcpStream) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let deadline = tokio::time::Instant::now() + HEADER_READ_TIMEOUT;
    let mut seen = [0u8; PREFACE.len()];
    loop {
        match tokio::time::timeout_at(deadline, stream.peek(&mut seen)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return false,
            Ok(Ok(n)) if seen[..n] != PREFACE[..n] || n == PREFACE.len() => return true,
            // Part of the preface: peeking again at once would see the same bytes.
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
    }
}

/// The connections accepted on `listener` whose first bytes arrive in time (see
/// [`speaks_in_time`]); the others are closed. For a server whose own accept
/// loop waits on a silent connection without a deadline: the gRPC stream's
/// (tonic's keep-alive pings start only once a client has spoken).
pub fn screened(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "Accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                if speaks_in_time(&stream).await {
                    let _ = tx.send(Ok(stream)).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Serves `app` on `listener`, at most `max_connections` at once (0: no limit),
/// until `shutdown` resolves, then lets in-flight requests finish (up to 30 s).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) {
    let max_connections = max_connections.min(tokio::sync::Semaphore::MAX_PERMITS);
    let places =
        (max_connections > 0).then(|| Arc::new(tokio::sync::Semaphore::new(max_connections)));
    let mut warned: Option<Instant> = None;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(H1_MAX_BUFFER);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    // Every connection holds a receiver: a value sent asks them to finish, and
    // the channel closes once the last of them has ended.
    let (stop, stopping) = tokio::sync::watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "Accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let place = match &places {
            Some(p) => match p.clone().try_acquire_owned() {
                Ok(place) => Some(place),
                Err(_) => {
                    drop(stream);
                    if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!(max_connections, "Admin API at its connection limit: new connections are closed as they come (VIGIL_ADMIN_MAX_CONNECTIONS)");
                        warned = Some(Instant::now());
                    }
                    continue;
                }
            },
            None => None,
        };
        let _ = stream.set_nodelay(true);
        let (app, builder, mut stopping) = (app.clone(), builder.clone(), stopping.clone());
        tokio::spawn(async move {
            // The connection's place is held until this task ends.
            let _place = place;
            // hyper's own wait for the first bytes (which HTTP?) has no deadline.
            if !speaks_in_time(&stream).await {
                tracing::debug!(%peer, "No request in time; connection closed");
                return;
            }
            let activity = Activity::default();
            let service = Tracked {
                inner: TowerToHyperService::new(app),
                activity: activity.clone(),
            };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            // Asked to finish (GOAWAY on HTTP/2; in-flight requests are answered)
            // when the server stops, or once no request has been in flight for
            // the header timeout: hyper closes idle HTTP/1 connections itself,
            // but would keep an idle HTTP/2 one open as long as it answers pings.
            let mut asked = false;
            let ended = loop {
                let wait = HEADER_READ_TIMEOUT
                    .saturating_sub(activity.idle_for())
                    .max(Duration::from_millis(100));
                tokio::select! {
                    ended = conn.as_mut() => break ended,
                    _ = stopping.changed(), if !asked => {
                        conn.as_mut().graceful_shutdown();
                        asked = true;
                    }
                    () = tokio::time::sleep(wait), if !asked => {
                        if activity.idle_for() >= HEADER_READ_TIMEOUT {
                            conn.as_mut().graceful_shutdown();
                            asked = true;
                        }
                    }
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "Admin connection ended");
            }
        });
    }
    drop(listener);
    drop(stopping);
    let _ = stop.send(());
    if tokio::time::timeout(DRAIN, stop.closed()).await.is_err() {
        tracing::warn!("Admin requests still in flight after 30 s; closing");
    }
}

/// Requests in flight on one connection, and when the last one ended.
#[derive(Clone)]
struct Activity(Arc<ActivityCounts>);

struct ActivityCounts {
    in_flight: AtomicUsize,
    /// When the last request ended, in milliseconds since `since`.
    last_end_ms: AtomicU64,
    /// tokio's clock, which tests can pause and move on.
    since: tokio::time::Instant,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity(Arc::new(ActivityCounts {
            in_flight: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
            since: tokio::time::Instant::now(),
        }))
    }
}

impl Activity {
    /// How long the connection has had no request in flight (zero while one is).
    fn idle_for(&self) -> Duration {
        let a = &self.0;
        if a.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(a.last_end_ms.load(Ordering::Acquire));
        a.since.elapsed().saturating_sub(last)
    }
}

/// Counts a request in flight until its answer (head and body, which admin
/// answers send at once) is ready.
struct InFlight(Activity);

impl InFlight {
    fn start(a: &Activity) -> InFlight {
        a.0.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0 .0;
        let now = u64::try_from(a.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.last_end_ms.store(now, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's service, with each request counted in its [`Activity`].
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Activity,
}

impl<S, R> hyper::service::Service<R> for Tracked<S>
where
    S: hyper::service::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send + 'static>>;

    fn call(&self, req: R) -> Self::Future {
        let counted = InFlight::start(&self.activity);
        let answer = self.inner.call(req);
        Box::pin(async move {
            let res = answer.await;
            drop(counted);
            res
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// The address of an admin server (one route, `/`, answering `ok`) serving at
    /// most `max_connections` at once.
    async fn serving(max_connections: usize) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(serve(
            listener,
            app,
            max_connections,
            std::future::pending(),
        ));
        addr
    }

    /// What the server sends on a connection given `sent` before it closes it.
    async fn answer_to(sent: &[u8]) -> String {
        let addr = serving(MAX_CONNECTIONS).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(sent).await.unwrap();
        let mut out = Vec::new();
        // Ends when the server closes the connection (the clock is paused: the
        // runtime moves it on while everyone waits).
        let read = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "still open a minute later, after {sent:?}");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn screened_connections_must_speak_first() {
        use tokio_stream::StreamExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = Box::pin(screened(listener));
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut speaking = tokio::net::TcpStream::connect(addr).await.unwrap();
        speaking.write_all(b"\x16\x03\x01").await.unwrap();
        let mut first = accepted.next().await.unwrap().unwrap();
        assert_eq!(first.peer_addr().unwrap(), speaking.local_addr().unwrap());
        // The silent one is closed once its time is up, never handed on.
        let mut out = Vec::new();
        silent.read_to_end(&mut out).await.unwrap();
        assert!(out.is_empty());
        let next = tokio::time::timeout(Duration::from_secs(60), accepted.next()).await;
        assert!(next.is_err(), "nothing else was handed on");
        first.write_all(b"x").await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn idle_http2_connections_are_sent_away() {
        let addr = serving(MAX_CONNECTIONS).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The preface and an empty SETTINGS frame; then no request, only what a
        // client library does by itself: acknowledge the server's pings.
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let opened = tokio::time::Instant::now();
        let (mut buf, mut types) = (Vec::new(), Vec::new());
        let ended = tokio::time::timeout(Duration::from_secs(300), async {
            let mut chunk = [0u8; 4096];
            loop {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                // Whole frames: 9-byte header (length, type, flags, stream), payload.
                while buf.len() >= 9 {
                    let len =
                        usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
                    if buf.len() < 9 + len {
                        break;
                    }
                    let frame: Vec<u8> = buf.drain(..9 + len).collect();
                    types.push(frame[3]);
                    if frame[3] == 6 && frame[4] & 1 == 0 {
                        let mut ack = frame.clone();
                        ack[4] = 1;
                        let _ = s.write_all(&ack).await;
                    }
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "an idle HTTP/2 connection stayed open: {types:?}"
        );
        // Sent away (GOAWAY, type 7) at the header timeout.
        let took = opened.elapsed();
        assert!(
            took < HEADER_READ_TIMEOUT + Duration::from_secs(2),
            "{took:?}"
        );
        assert!(types.contains(&7), "{types:?}");
    }

    /// The answer to a GET on `s`, or `None` when the server closed it.
    async fn answer(s: &mut tokio::net::TcpStream) -> Option<String> {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await.ok()?;
        (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_at_once() {
        let addr = serving(2).await;
        let mut a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut b = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(answer(&mut a).await.unwrap().starts_with("HTTP/1.1 200"));
        assert!(answer(&mut b).await.unwrap().starts_with("HTTP/1.1 200"));
        // Both places are taken (kept alive): a third is closed unanswered.
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert_eq!(answer(&mut c).await, None);
        // Once one ends, its place is free again.
        drop(a);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut d = tokio::net::TcpStream::connect(addr).await.unwrap();
            if let Some(got) = answer(&mut d).await {
                assert!(got.starts_with("HTTP/1.1 200"), "{got}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the closed connection's place was not freed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answer(&mut b).await.unwrap().starts_with("HTTP/1.1 200"));
    }

    #[tokio::test(start_paused = true)]
    async fn slow_or_idle_connections_are_closed() {
        // Half a head, never finished; half of HTTP/2's preface.
        assert!(answer_to(b"PRI * HTTP/2.0\r\n").await.is_empty());
        let got = answer_to(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
        assert!(got.is_empty() || got.starts_with("HTTP/1.1 408"), "{got}");
        // Nothing at all.
        assert!(answer_to(b"").await.is_empty());
        // A request, then the connection kept alive and idle.
        let got = answer_to(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            got.starts_with("HTTP/1.1 200") && got.ends_with("ok"),
            "{got}"
        );
    }
}
