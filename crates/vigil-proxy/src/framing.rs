//! HTTP/1.1 request framing followed below hyper, for the one conflict hyper's
//! parser settles without leaving a trace: a head with both `Content-Length` and
//! `Transfer-Encoding`. hyper reads such a request as chunked, drops
//! `Content-Length` before the request is built and closes the connection after
//! the response (RFC 9112 section 6.3 allows that or a 400); the edge refuses it
//! with 400 instead, as Envoy and nginx do, so the request never reaches an
//! upstream.
//!
//! [`Framed`] wraps a connection's transport and follows the bytes hyper is about
//! to read: each head (parsed with httparse, hyper's own parser, with the same
//! defaults), then its body by its framing (a length, or chunks up to the last
//! one and its trailers) to the next head. It notes which request, counted from
//! the connection's first, had both fields; [`Heads::mark`] puts
//! [`ConflictingFraming`] in that request's extensions as hyper hands it over.
//! It stops following at anything it cannot frame as hyper does (a head hyper
//! refuses anyway, an upgrade, `CONNECT`, a conflict, which ends the connection):
//! nothing after that is marked, and nothing is ever changed in the bytes.
//!
//! It also measures each head: one longer than [`MAX_HEAD`] is marked
//! [`HeadTooLarge`] (the edge answers 431). hyper's own limit, its read buffer,
//! is approximate: a head that arrives in one large read can pass it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Marks a request whose head carried both `Content-Length` and
/// `Transfer-Encoding` (see the module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConflictingFraming;

/// Marks a request whose head was longer than [`MAX_HEAD`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadTooLarge;

/// The longest request head served (request line and fields, with their line
/// breaks): 64 KiB, as the proxy's HTTP/1 read buffer.
pub const MAX_HEAD: usize = 64 * 1024;

/// What the transport saw, shared with the connection's service.
#[derive(Debug)]
pub struct Heads {
    /// The place on the connection (from 0) of the first head with both fields;
    /// `u64::MAX` while there is none.
    conflict: AtomicU64,
    /// The place of the first head longer than [`MAX_HEAD`]; `u64::MAX` while
    /// there is none.
    oversized: AtomicU64,
    /// How many requests hyper has handed over so far.
    served: AtomicU64,
    /// The place of the request at (or in) which following stopped, other than
    /// for a conflict: what comes after it is neither measured nor checked, so
    /// the connection should end with its response. `u64::MAX` while following.
    stopped_at: AtomicU64,
}

impl Default for Heads {
    fn default() -> Self {
        Heads {
            conflict: AtomicU64::new(u64::MAX),
            oversized: AtomicU64::new(u64::MAX),
            served: AtomicU64::new(0),
            stopped_at: AtomicU64::new(u64::MAX),
        }
    }
}

impl Heads {
    /// Whether following stopped at or before the request at `place` (an upgrade
    /// asked for, `CONNECT`, a head or a chunk it cannot frame as hyper does):
    /// what comes after it on the connection is not checked, so its response,
    /// unless it is a `101`, should close the connection.
    pub fn stopped_by(&self, place: u64) -> bool {
        self.stopped_at.load(Ordering::Relaxed) <= place
    }

    /// Counts `req`, the connection's next request, and marks it when its head was
    /// the conflicting one (or too long); returns its place. hyper parses a head
    /// only from bytes the transport has already followed, so the note is there
    /// before its request is.
    pub fn mark<B>(&self, req: &mut http::Request<B>) -> u64 {
        let place = self.served.fetch_add(1, Ordering::Relaxed);
        if self.conflict.load(Ordering::Relaxed) == place {
            req.extensions_mut().insert(ConflictingFraming);
        }
        if self.oversized.load(Ordering::Relaxed) == place {
            req.extensions_mut().insert(HeadTooLarge);
        }
        place
    }
}

/// A head, a chunk-size line or a trailer that has not all arrived yet is kept up
/// to this (hyper's read buffer holds a head to 64 KiB); beyond, following stops
/// (a head is marked too large first).
const MAX_PARTIAL: usize = MAX_HEAD + 1024;
/// hyper's default limit on a request's header fields (more is refused with 431).
const MAX_HEADERS: usize = 100;

/// Where in the byte stream the follower is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before or inside a request head.
    Head,
    /// Inside a body of the given remaining length.
    Length(u64),
    /// Before or inside a chunk-size line.
    ChunkSize,
    /// Inside a chunk's data, with this much left.
    ChunkData(u64),
    /// The line break after a chunk's data.
    ChunkEnd,
    /// Trailer fields after the last chunk, up to an empty line.
    Trailers,
    /// Not following any more.
    Off,
}

/// Follows request framing over a byte stream fed to it in pieces.
#[derive(Debug)]
struct Follow {
    state: State,
    /// What has arrived of a head or line that is not complete yet.
    partial: Vec<u8>,
    /// Heads framed so far.
    heads: u64,
    shared: Arc<Heads>,
}

impl Follow {
    fn new(shared: Arc<Heads>) -> Follow {
        Follow {
            state: State::Head,
            partial: Vec::new(),
            heads: 0,
            shared,
        }
    }

    /// Takes the next bytes of the stream.
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            data = match self.state {
                State::Off => return,
                State::Length(left) => {
                    let (rest, next) = skip(data, left);
                    self.state = next.map_or(State::Head, State::Length);
                    rest
                }
                State::ChunkData(left) => {
                    let (rest, next) = skip(data, left);
                    self.state = next.map_or(State::ChunkEnd, State::ChunkData);
                    rest
                }
                State::Head => self.head(data),
                State::ChunkSize | State::ChunkEnd | State::Trailers => self.line(data),
            };
        }
    }

    /// Follows a head; returns what is left of `data` after it.
    fn head<'d>(&mut self, data: &'d [u8]) -> &'d [u8] {
        if self.partial.is_empty() {
            // Empty lines before a request line are skipped, as httparse does.
            let data = skip_newlines(data);
            match head_end(data, 0) {
                Some(end) => {
                    self.whole_head(&data[..end]);
                    &data[end..]
                }
                None => {
                    self.keep(data);
                    &[]
                }
            }
        } else {
            // The end is looked for across what was kept and all of `data`
            // before anything is measured: a head may end early in a read
            // that also holds a large body.
            let from = self.partial.len().saturating_sub(2);
            self.partial.extend_from_slice(data);
            match head_end(&self.partial, from) {
                Some(end) => {
                    let left = self.partial.len() - end;
                    let head = std::mem::take(&mut self.partial);
                    self.whole_head(&head[..end]);
                    self.partial = head;
                    self.partial.clear();
                    &data[data.len() - left..]
                }
                None => {
                    if self.partial.len() > MAX_PARTIAL {
                        self.overflow();
                    }
                    &[]
                }
            }
        }
    }

    /// Follows a chunk-size line, the line break after a chunk or a trailer line;
    /// returns what is left of `data` after it.
    fn line<'d>(&mut self, data: &'d [u8]) -> &'d [u8] {
        let Some(at) = memchr::memchr(b'\n', data) else {
            self.keep(data);
            return &[];
        };
        let (end, rest) = data.split_at(at + 1);
        let next = if self.partial.is_empty() {
            after_line(self.state, end)
        } else {
            self.partial.extend_from_slice(end);
            let next = after_line(self.state, &self.partial);
            self.partial.clear();
            next
        };
        if next == State::Off {
            self.stop(self.place());
        } else {
            self.state = next;
        }
        rest
    }

    /// Stops following, in the head or body of the request at `place` (see
    /// [`Heads::stopped_by`]).
    fn stop(&mut self, place: u64) {
        self.state = State::Off;
        first(&self.shared.stopped_at, place);
    }

    /// The place of the request whose head or body is being followed.
    fn place(&self) -> u64 {
        match self.state {
            State::Head => self.heads,
            _ => self.heads.saturating_sub(1),
        }
    }

    /// Follows a head that has arrived whole.
    fn whole_head(&mut self, head: &[u8]) {
        let before = self.heads;
        self.state = self.framed(head);
        // A conflict is marked (its request refused, the connection closed);
        // any other stop is noted at the head's place, whether it was counted
        // or hyper refuses it.
        if self.state == State::Off && self.shared.conflict.load(Ordering::Relaxed) == u64::MAX {
            self.stop(before);
        }
    }

    /// Keeps an incomplete head or line, or stops following when it grows too long.
    fn keep(&mut self, data: &[u8]) {
        if self.partial.len() + data.len() > MAX_PARTIAL {
            self.overflow();
        } else {
            self.partial.extend_from_slice(data);
        }
    }

    /// Gives up on a head or line that grew past [`MAX_PARTIAL`] (a head that
    /// long is too large).
    fn overflow(&mut self) {
        if self.state == State::Head {
            first(&self.shared.oversized, self.heads);
        }
        self.stop(self.place());
        self.partial = Vec::new();
    }

    /// Parses a complete head and says how its body is framed.
    fn framed(&mut self, head: &[u8]) -> State {
        if head.len() > MAX_HEAD {
            first(&self.shared.oversized, self.heads);
        }
        // Left uninitialised: filling 100 empty fields would cost more than the parse.
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        match req.parse_with_uninit_headers(head, &mut fields) {
            Ok(httparse::Status::Complete(n)) if n == head.len() => {}
            // hyper refuses it, or frames it in a way not followed here.
            _ => return State::Off,
        }
        let place = self.heads;
        self.heads += 1;
        if req.method == Some("CONNECT") {
            return State::Off;
        }
        let (mut length, mut chunked, mut upgrade) = (None, None, false);
        for field in req.headers.iter() {
            let name = field.name;
            if name.eq_ignore_ascii_case("content-length") {
                match (length, parse_length(field.value)) {
                    (_, None) => return State::Off,
                    (Some(a), Some(b)) if a != b => return State::Off,
                    (_, l) => length = l,
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                // As hyper reads it: the last field decides, by its last coding.
                chunked = Some(ends_chunked(field.value));
            } else if name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if chunked.is_some() && length.is_some() {
            first(&self.shared.conflict, place);
            // hyper closes the connection after this request.
            return State::Off;
        }
        if upgrade {
            // What follows may be a tunnel's bytes.
            return State::Off;
        }
        match (chunked, length) {
            (Some(true), _) => State::ChunkSize,
            (Some(false), _) => State::Off,
            (None, Some(n)) if n > 0 => State::Length(n),
            (None, _) => State::Head,
        }
    }
}

/// Notes `place` in `slot` unless an earlier place is there (places only grow;
/// `u64::MAX` is none).
fn first(slot: &AtomicU64, place: u64) {
    slot.fetch_min(place, Ordering::Relaxed);
}

/// Skips up to `left` bytes of `data`: what is left of `data`, and what is left
/// to skip (`None` when all of it was).
fn skip(data: &[u8], left: u64) -> (&[u8], Option<u64>) {
    match usize::try_from(left) {
        Ok(n) if n <= data.len() => (&data[n..], None),
        _ => (&[], Some(left - data.len() as u64)),
    }
}

/// The state after a complete line (ending in `\n`) in `state`.
fn after_line(state: State, line: &[u8]) -> State {
    let empty = line == b"\r\n" || line == b"\n";
    match state {
        State::ChunkSize => match httparse::parse_chunk_size(line) {
            Ok(httparse::Status::Complete((_, 0))) => State::Trailers,
            Ok(httparse::Status::Complete((_, n))) => State::ChunkData(n),
            _ => State::Off,
        },
        State::ChunkEnd if empty => State::ChunkSize,
        State::Trailers if empty => State::Head,
        State::Trailers => State::Trailers,
        _ => State::Off,
    }
}

/// `data` without the empty lines it starts with.
fn skip_newlines(data: &[u8]) -> &[u8] {
    let n = data
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    &data[n..]
}

/// Where the head in `buf` ends (just after its empty line), looking at line
/// breaks from `from` on.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    memchr::memchr_iter(b'\n', buf.get(from..)?)
        .map(|at| from + at)
        .find_map(|at| match buf.get(at + 1..) {
            Some([b'\n', ..]) => Some(at + 2),
            Some([b'\r', b'\n', ..]) => Some(at + 3),
            _ => None,
        })
}

/// A `Content-Length` value as hyper takes it: digits only.
fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Whether a `Transfer-Encoding` value's last coding is `chunked`.
fn ends_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// A connection's transport, with its HTTP/1.1 request framing followed (see the
/// module); bytes pass through unchanged.
#[derive(Debug)]
pub struct Framed<I> {
    io: I,
    follow: Option<Follow>,
}

impl<I> Framed<I> {
    /// Wraps `io`, following its request framing into `heads` when given (HTTP/1.1
    /// connections), passing bytes through untouched otherwise.
    pub fn new(io: I, heads: Option<Arc<Heads>>) -> Framed<I> {
        Framed {
            io,
            follow: heads.map(Follow::new),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Framed<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if let Some(follow) = &mut this.follow {
            follow.feed(&buf.filled()[before..]);
            if follow.state == State::Off {
                this.follow = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Framed<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The places of conflicting heads `stream` holds, fed in pieces of `step`
    /// bytes, and whether the follower was still on at the end.
    fn follow(stream: &[u8], step: usize) -> (Option<u64>, bool) {
        let heads = Arc::new(Heads::default());
        let mut f = Follow::new(heads.clone());
        for piece in stream.chunks(step) {
            f.feed(piece);
        }
        let at = heads.conflict.load(Ordering::Relaxed);
        ((at != u64::MAX).then_some(at), f.state != State::Off)
    }

    /// Checks `stream` fed whole and in every piece size up to 16 bytes.
    fn each_step(stream: &[u8], want: (Option<u64>, bool)) {
        for step in (1..=16).chain([stream.len().max(1)]) {
            assert_eq!(
                follow(stream, step),
                want,
                "step {step}: {}",
                String::from_utf8_lossy(stream)
            );
        }
    }

    const GET: &str = "GET /a HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn both_fields_mark_their_request_wherever_it_is() {
        let both = "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        each_step(both.as_bytes(), (Some(0), false));
        let reversed = "POST /b HTTP/1.1\r\nHost: x\r\ntransfer-encoding: gzip, Chunked\r\ncontent-length: 0\r\n\r\n";
        each_step(reversed.as_bytes(), (Some(0), false));
        // After requests framed by a length, by chunks (extensions, trailers) and
        // with neither, and leading empty lines.
        let before = format!(
            "\r\n{GET}POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello\r\n\r\nxyPOST /d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=\"a\"\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n"
        );
        each_step(before.as_bytes(), (None, true));
        each_step(format!("{before}{both}").as_bytes(), (Some(3), false));
    }

    #[test]
    fn heads_over_the_limit_are_marked_wherever_they_are() {
        let head = |n: usize| {
            let pad = n - "GET / HTTP/1.1\r\nCookie: \r\n\r\n".len();
            format!("GET / HTTP/1.1\r\nCookie: {}\r\n\r\n", "a".repeat(pad))
        };
        for (stream, want) in [
            (head(MAX_HEAD), None),
            (head(MAX_HEAD + 1), Some(0)),
            (format!("{GET}{}", head(70_000)), Some(1)),
            (format!("{GET}{}{GET}", head(MAX_HEAD)), None),
        ] {
            for step in [1, 7, 1024, 8192, stream.len()] {
                let heads = Arc::new(Heads::default());
                let mut f = Follow::new(heads.clone());
                for piece in stream.as_bytes().chunks(step) {
                    f.feed(piece);
                }
                let at = heads.oversized.load(Ordering::Relaxed);
                assert_eq!((at != u64::MAX).then_some(at), want, "step {step}");
            }
        }
        // A 41 KB head whose last bytes come in one read with a 30 KB body:
        // the head is measured, not the read.
        let body = "b".repeat(30_000);
        let stream = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\nCookie: {}\r\n\r\n{body}{GET}",
            body.len(),
            "a".repeat(41_000)
        );
        let heads = Arc::new(Heads::default());
        let mut f = Follow::new(heads.clone());
        f.feed(&stream.as_bytes()[..40_000]);
        f.feed(&stream.as_bytes()[40_000..]);
        assert_eq!(heads.oversized.load(Ordering::Relaxed), u64::MAX);
        assert_eq!((f.state, f.heads), (State::Head, 2));
        // The mark goes on the request at that place.
        let heads = Heads::default();
        heads.oversized.store(1, Ordering::Relaxed);
        let mut first = http::Request::new(());
        let mut second = http::Request::new(());
        heads.mark(&mut first);
        heads.mark(&mut second);
        assert!(first.extensions().get::<HeadTooLarge>().is_none());
        assert!(second.extensions().get::<HeadTooLarge>().is_some());
    }

    #[test]
    fn where_following_stops_is_noted_except_at_a_conflict() {
        let stopped = |stream: &str| {
            let heads = Arc::new(Heads::default());
            let mut f = Follow::new(heads.clone());
            for piece in stream.as_bytes().chunks(5) {
                f.feed(piece);
            }
            let at = heads.stopped_at.load(Ordering::Relaxed);
            (at != u64::MAX).then_some(at)
        };
        let upgrade = "GET /ws HTTP/1.1\r\nUpgrade: foo\r\n\r\n";
        assert_eq!(stopped(&format!("{GET}{upgrade}{GET}")), Some(1));
        assert_eq!(stopped(&format!("{upgrade}{GET}")), Some(0));
        assert_eq!(
            stopped(&format!(
                "{GET}POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
            )),
            Some(1)
        );
        assert_eq!(stopped(&format!("{GET}{GET}")), None);
        assert_eq!(
            stopped(&format!(
                "{GET}POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
            )),
            None
        );
        let heads = Heads::default();
        heads.stopped_at.store(1, Ordering::Relaxed);
        assert!(!heads.stopped_by(0) && heads.stopped_by(1) && heads.stopped_by(2));
    }

    #[test]
    fn bodies_that_look_like_heads_are_not_heads() {
        let inner = "POST /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let by_length = format!(
            "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{inner}{GET}",
            inner.len()
        );
        each_step(by_length.as_bytes(), (None, true));
        let by_chunks = format!(
            "POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{inner}\r\n0\r\n\r\n{GET}",
            inner.len()
        );
        each_step(by_chunks.as_bytes(), (None, true));
    }

    #[test]
    fn following_stops_where_hyper_would_not_go_on() {
        for stream in [
            // Refused by hyper: bad length, lengths that differ, not chunked last.
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            // A tunnel may follow.
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
            // A bad chunk size.
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let then_both = format!(
                "{stream}POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
            );
            each_step(then_both.as_bytes(), (None, false));
        }
        // A head that never ends stops being kept.
        let mut f = Follow::new(Arc::new(Heads::default()));
        f.feed(b"GET / HTTP/1.1\r\n");
        for _ in 0..70 {
            f.feed(&[b'a'; 1024]);
        }
        assert_eq!((f.state, f.partial.capacity()), (State::Off, 0));
    }

    /// Streams stitched from pieces of requests: however a stream is cut into
    /// reads, the follower ends in the same place with the same note, and never
    /// panics.
    #[test]
    fn cutting_a_stream_differently_changes_nothing() {
        const PIECES: &[&str] = &[
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            "5\r\nhello\r\n",
            "0\r\n\r\n",
            "0\r\nA: b\r\n\r\n",
            "\r\n",
            "\n",
            "Content-Length: 1\r\n",
            "GET /",
            "ffffffffffffffffff\r\n",
            "\u{0}\u{ff}",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2_000 {
            let mut stream = Vec::new();
            for _ in 0..next() % 8 {
                let piece = PIECES[(next() % PIECES.len() as u64) as usize];
                stream.extend_from_slice(piece.as_bytes());
            }
            let whole = follow(&stream, stream.len().max(1));
            let step = (next() % 7 + 1) as usize;
            assert_eq!(
                follow(&stream, step),
                whole,
                "step {step}: {:?}",
                String::from_utf8_lossy(&stream)
            );
        }
    }

    #[test]
    fn requests_are_marked_by_their_place() {
        let heads = Heads::default();
        heads.conflict.store(1, Ordering::Relaxed);
        let marked: Vec<bool> = (0..3)
            .map(|_| {
                let mut req = http::Request::new(());
                heads.mark(&mut req);
                req.extensions().get::<ConflictingFraming>().is_some()
            })
            .collect();
        assert_eq!(marked, [false, true, false]);
    }
}
