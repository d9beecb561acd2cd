//! Serving the admin API over HTTP/1.1 and HTTP/2 with the limits `axum::serve`
//! leaves out: a connection that does not send a request head in time is closed,
//! so a client cannot pile up idle or half-sent connections until the process
//! runs out of file descriptors (and with them, database connections). The gRPC
//! stream's listener is screened the same way ([`screened`]).

use std::future::Future;
use std::time::Duration;

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

/// Serves `app` on `listener` until `shutdown` resolves, then lets in-flight
/// requests finish (up to 30 s).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
) {
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
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
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
        let _ = stream.set_nodelay(true);
        let (app, builder, watcher) = (app.clone(), builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            // hyper's own wait for the first bytes (which HTTP?) has no deadline.
            if !speaks_in_time(&stream).await {
                tracing::debug!(%peer, "No request in time; connection closed");
                return;
            }
            let service = TowerToHyperService::new(app);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "Admin connection ended");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("Admin requests still in flight after 30 s; closing");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// What the server sends on a connection given `sent` before it closes it.
    async fn answer_to(sent: &[u8]) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(serve(listener, app, std::future::pending()));
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
