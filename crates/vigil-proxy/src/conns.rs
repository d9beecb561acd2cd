//! Pooled HTTP/1.1 connections to plain `http://` upstreams, driven by the task of
//! the request that uses them.
//!
//! hyper's pooled client runs every upstream connection in a task of its own: a
//! request crosses to that task and its response and body cross back, several
//! wake-ups a request, often from one worker thread to the other. Here the request
//! holds its connection exclusively (HTTP/1.1 has one exchange in flight anyway)
//! and polls the connection's I/O itself: first while waiting for the response
//! head, then from the response body ([`UpstreamBody`]) until the body ends, when
//! the connection goes back to the pool. A body dropped before its end closes its
//! connection, so a half-read response is never reused.
//!
//! A pooled connection is used again only if, polled once, it is idle and open; a
//! request that an idle connection could not take (the upstream closed it meanwhile)
//! is retried on another. Idle connections are dropped after [`IDLE_TIMEOUT`] and
//! at most [`MAX_IDLE`] are kept per upstream. `https://` upstreams keep hyper's
//! pooled client (TLS, HTTP/2 by ALPN, its connections shared between requests).

use std::collections::HashMap;
use std::future::{poll_fn, Future as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::upstream::{connect, Upstream};

/// Idle connections older than this are closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// At most this many idle connections are kept per upstream.
pub const MAX_IDLE: usize = 256;

/// Errors of the pooled connections.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Driver = http1::Connection<TokioIo<TcpStream>, Incoming>;

/// One connection: what sends on it and what runs its I/O.
struct Conn {
    sender: http1::SendRequest<Incoming>,
    driver: Pin<Box<Driver>>,
    /// The driver has finished: the connection is closed.
    ended: bool,
}

impl Conn {
    /// Runs the connection's I/O as far as it goes now.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if !self.ended && self.driver.as_mut().poll(cx).is_ready() {
            self.ended = true;
        }
    }

    /// Polls an idle connection once (reading an upstream's close, finishing its
    /// last exchange): whether it can take a request now.
    fn usable_now(&mut self, cx: &mut Context<'_>) -> bool {
        self.drive(cx);
        !self.ended && self.sender.is_ready()
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// The idle connections, per upstream authority.
#[derive(Default)]
pub struct Conns {
    idle: parking_lot::Mutex<HashMap<Authority, Vec<Idle>>>,
}

impl std::fmt::Debug for Conns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle: usize = self.idle.lock().values().map(Vec::len).sum();
        f.debug_struct("Conns").field("idle", &idle).finish()
    }
}

impl Conns {
    /// An empty pool.
    pub fn new() -> Arc<Conns> {
        Arc::new(Conns::default())
    }

    /// Sends `req` (origin-form target, `Host` set) to the plain-HTTP `upstream` on
    /// an idle connection, or a new one; the response, whose body carries the
    /// connection until it ends.
    pub async fn send(
        self: &Arc<Self>,
        upstream: &Upstream,
        mut req: Request<Incoming>,
    ) -> Result<Response<UpstreamBody>, BoxError> {
        loop {
            let (mut conn, pooled) = match self.checkout(&upstream.authority) {
                Some(conn) => (conn, true),
                None => (open(upstream).await?, false),
            };
            if pooled && !poll_fn(|cx| Poll::Ready(conn.usable_now(cx))).await {
                continue;
            }
            let mut sending = std::pin::pin!(conn.sender.try_send_request(req));
            let sent = poll_fn(|cx| {
                conn.drive(cx);
                sending.as_mut().poll(cx)
            })
            .await;
            match sent {
                Ok(res) => {
                    let (head, body) = res.into_parts();
                    let body = UpstreamBody {
                        inner: body,
                        pooled: Some(Pooled {
                            conn,
                            pool: self.clone(),
                            to: upstream.authority.clone(),
                        }),
                    };
                    return Ok(Response::from_parts(head, body));
                }
                Err(mut e) => match e.take_message() {
                    // Never sent: a pooled connection closed under it; try another.
                    Some(unsent) if pooled => req = unsent,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }

    /// The most recently used idle connection to `to`, if any.
    fn checkout(&self, to: &Authority) -> Option<Conn> {
        let mut idle = self.idle.lock();
        let list = idle.get_mut(to)?;
        let now = Instant::now();
        while let Some(i) = list.pop() {
            if now.duration_since(i.since) < IDLE_TIMEOUT {
                return Some(i.conn);
            }
        }
        None
    }

    /// Keeps `conn` for the next request to `to`, unless it is closed or the pool is full.
    fn checkin(&self, to: Authority, conn: Conn) {
        if conn.ended || conn.sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock();
        let list = idle.entry(to).or_default();
        if list.len() < MAX_IDLE {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Closes connections idle for longer than [`IDLE_TIMEOUT`]; returns how many
    /// are left.
    pub fn reap(&self) -> usize {
        let now = Instant::now();
        let mut idle = self.idle.lock();
        idle.retain(|_, list| {
            list.retain(|i| now.duration_since(i.since) < IDLE_TIMEOUT);
            !list.is_empty()
        });
        idle.values().map(Vec::len).sum()
    }

    /// Closes idle connections every few seconds, for as long as the pool lives.
    pub fn reap_in_background(self: &Arc<Self>) {
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(IDLE_TIMEOUT / 4);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                match pool.upgrade() {
                    Some(p) => {
                        p.reap();
                    }
                    None => return,
                }
            }
        });
    }
}

/// A new connection to `upstream`.
async fn open(upstream: &Upstream) -> Result<Conn, BoxError> {
    let tcp = connect(upstream).await?;
    let (sender, driver) = http1::Builder::new().handshake(TokioIo::new(tcp)).await?;
    Ok(Conn {
        sender,
        driver: Box::pin(driver),
        ended: false,
    })
}

/// An upstream response's body: it runs its connection's I/O while it is read, and
/// returns the connection to the pool once it has ended. A body of hyper's pooled
/// client (`https://` upstreams) has no connection of its own to run.
pub struct UpstreamBody {
    inner: Incoming,
    pooled: Option<Pooled>,
}

/// The connection a body runs, and the pool it goes back to.
struct Pooled {
    conn: Conn,
    pool: Arc<Conns>,
    to: Authority,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled", &self.pooled.is_some())
            .finish()
    }
}

impl From<Incoming> for UpstreamBody {
    fn from(inner: Incoming) -> UpstreamBody {
        UpstreamBody {
            inner,
            pooled: None,
        }
    }
}

impl UpstreamBody {
    fn release(&mut self) {
        if let Some(p) = self.pooled.take() {
            p.pool.checkin(p.to, p.conn);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        // Twice at most: the body asking for more wakes the connection, which is
        // this task; run it at once rather than on the next poll.
        for _ in 0..2 {
            if let Some(p) = &mut this.pooled {
                p.conn.drive(cx);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => continue,
                Poll::Ready(None) => {
                    this.release();
                    return Poll::Ready(None);
                }
                ready => return ready,
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Read to its end (or empty): the connection can serve again. Otherwise it
        // closes with the body.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt as _, Empty, Full};
    use hyper::service::service_fn;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    type Boxed = BoxBody<Bytes, BoxError>;

    fn full(bytes: impl Into<Bytes>) -> Boxed {
        Full::new(bytes.into())
            .map_err(|never| match never {})
            .boxed()
    }

    /// An HTTP/1.1 upstream: `/empty` answers 204, `/big` 1 MiB, anything else its
    /// path; `keep_alive` off closes after each response. Counts connections.
    async fn upstream(keep_alive: bool) -> (Upstream, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = service_fn(|req: Request<Incoming>| async move {
                        let res = match req.uri().path() {
                            "/empty" => {
                                let mut r = Response::new(full(""));
                                *r.status_mut() = http::StatusCode::NO_CONTENT;
                                r
                            }
                            "/big" => Response::new(full(vec![b'x'; 1 << 20])),
                            path => Response::new(full(path.to_owned())),
                        };
                        Ok::<_, Infallible>(res)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        (to(addr), accepted)
    }

    /// An upstream written by hand: `answer` to every request head on a connection,
    /// then, with `close_after`, the connection closed without a word. Counts
    /// connections accepted, and closed.
    async fn raw_upstream(
        answer: &'static [u8],
        close_after: bool,
    ) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (count, count_closed) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let count_closed = count_closed.clone();
                tokio::spawn(async move {
                    async {
                        let mut buf = vec![0u8; 4096];
                        let mut got = Vec::new();
                        loop {
                            while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                                got.drain(..end + 4);
                                if tcp.write_all(answer).await.is_err() || close_after {
                                    return;
                                }
                            }
                            match tcp.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(&buf[..n]),
                            }
                        }
                    }
                    .await;
                    drop(tcp);
                    count_closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, accepted, closed)
    }

    fn to(addr: SocketAddr) -> Upstream {
        Upstream {
            authority: addr.to_string().parse().unwrap(),
            base_path: String::new(),
            tls: false,
        }
    }

    /// A front server that sends every request on through `conns` (so that requests
    /// carry hyper's `Incoming` bodies, as in the proxy). `/drop/...` reads only the
    /// upstream's head and answers 200 itself.
    async fn front(conns: Arc<Conns>, upstream: Upstream) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (conns, upstream) = (conns.clone(), upstream.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |mut req: Request<Incoming>| {
                        let (conns, upstream) = (conns.clone(), upstream.clone());
                        async move {
                            let path = req.uri().path().to_owned();
                            let forward = path.strip_prefix("/drop").unwrap_or(&path).to_owned();
                            *req.uri_mut() = forward.parse().unwrap();
                            let res = conns.send(&upstream, req).await.unwrap();
                            let res: Response<Boxed> = if path.starts_with("/drop") {
                                drop(res);
                                Response::new(full("dropped"))
                            } else {
                                res.map(|b| b.map_err(BoxError::from).boxed())
                            };
                            Ok::<_, Infallible>(res)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        addr
    }

    /// `GET path` on a connection of its own; the status and body.
    async fn get(front: SocketAddr, path: &str) -> (u16, Vec<u8>) {
        let tcp = TcpStream::connect(front).await.unwrap();
        let (mut sender, conn) = http1::handshake(TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", "upstream.test")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let res = sender.send_request(req).await.unwrap();
        let status = res.status().as_u16();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, body.to_vec())
    }

    #[tokio::test]
    async fn requests_in_turn_share_one_connection() {
        let (up, accepted) = upstream(true).await;
        let conns = Conns::new();
        let via = front(conns.clone(), up).await;
        for i in 0..5 {
            let path = format!("/n/{i}");
            assert_eq!(get(via, &path).await, (200, path.into_bytes()));
        }
        let (status, big) = get(via, "/big").await;
        assert_eq!((status, big.len()), (200, 1 << 20));
        // Empty bodies end at once; their connection serves again.
        for _ in 0..3 {
            assert_eq!(get(via, "/empty").await, (204, Vec::new()));
        }
        assert_eq!(get(via, "/last").await, (200, b"/last".to_vec()));
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(conns.reap(), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let (up, accepted) = upstream(true).await;
        let conns = Conns::new();
        let via = front(conns.clone(), up).await;
        assert_eq!(get(via, "/drop/big").await, (200, b"dropped".to_vec()));
        assert_eq!(conns.reap(), 0, "a half-read connection is not kept");
        assert_eq!(get(via, "/after").await, (200, b"/after".to_vec()));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connections_the_upstream_closes_are_not_used_again() {
        // Says `Connection: close` and closes.
        let (up, accepted) = upstream(false).await;
        let conns = Conns::new();
        let via = front(conns.clone(), up).await;
        for i in 0..3 {
            let path = format!("/c/{i}");
            assert_eq!(get(via, &path).await, (200, path.into_bytes()));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);

        // Closes without a word after a keep-alive response.
        let (addr, accepted, closed) =
            raw_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true).await;
        let conns = Conns::new();
        let via = front(conns.clone(), to(addr)).await;
        for answered in 0..3 {
            // The close reaches the pooled connection first: the upstream has closed
            // every connection it answered (on loopback its FIN is then in our
            // socket), and the I/O driver has run since (yield_now resumes only
            // after the runtime polled it), so the connection's readiness shows it.
            while closed.load(Ordering::SeqCst) < answered {
                tokio::task::yield_now().await;
            }
            tokio::task::yield_now().await;
            assert_eq!(get(via, "/x").await, (200, b"ok".to_vec()));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn chunked_bodies_read_to_their_end_keep_the_connection() {
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                        2\r\nok\r\n3\r\n!!!\r\n0\r\n\r\n";
        let (addr, accepted, _) = raw_upstream(chunked, false).await;
        let conns = Conns::new();
        let via = front(conns.clone(), to(addr)).await;
        for _ in 0..4 {
            assert_eq!(get(via, "/x").await, (200, b"ok!!!".to_vec()));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let conns = Conns::new();
        let err = open(&to(addr)).await.err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("refused")),
            "{err:?}"
        );
        assert_eq!(conns.reap(), 0);
    }
}
