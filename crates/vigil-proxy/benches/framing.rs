#![allow(missing_docs, clippy::unwrap_used)]
//! What following HTTP/1.1 framing below hyper (`vigil_proxy::framing`) costs a
//! request: 64 pipelined requests read through the plain transport and through
//! `Framed`, with hyper's first read size (8 KiB).

use std::hint::black_box;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokio::io::{AsyncRead, ReadBuf};
use vigil_proxy::framing::{Framed, Heads};

/// A request like the proxy bench's bearer one, and a small chunked upload.
fn stream() -> Vec<u8> {
    let token = "a".repeat(120);
    let get = format!(
        "GET /hello HTTP/1.1\r\nHost: app.bench.test\r\nUser-Agent: wrk\r\nAccept: */*\r\nAuthorization: Bearer vgl_sa_{token}\r\n\r\n"
    );
    let post = "POST /upload HTTP/1.1\r\nHost: app.bench.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let mut s = Vec::new();
    for i in 0..64 {
        s.extend_from_slice(if i % 8 == 7 {
            post.as_bytes()
        } else {
            get.as_bytes()
        });
    }
    s
}

fn drain<R: AsyncRead + Unpin>(mut r: R, buf: &mut [u8]) -> usize {
    let mut cx = Context::from_waker(Waker::noop());
    let mut total = 0;
    loop {
        let mut rb = ReadBuf::new(buf);
        match Pin::new(&mut r).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) if !rb.filled().is_empty() => total += rb.filled().len(),
            _ => return total,
        }
    }
}

fn bench(c: &mut Criterion) {
    let s = stream();
    let mut buf = vec![0u8; 8 * 1024];
    let mut g = c.benchmark_group("framing/64 requests");
    g.throughput(Throughput::Elements(64));
    g.bench_function("plain", |b| b.iter(|| drain(black_box(&s[..]), &mut buf)));
    g.bench_function("followed", |b| {
        b.iter(|| {
            let heads = Arc::new(Heads::default());
            drain(Framed::new(black_box(&s[..]), Some(heads)), &mut buf)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
