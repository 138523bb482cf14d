//! Slow-client protection. pingora's downstream read timeout applies to each read,
//! so a client that sends one header byte every few seconds (slowloris) would keep
//! its connection forever. [`GuardedApp`] wraps every accepted connection in
//! [`HeaderDeadline`]: a request's headers must be complete within a deadline
//! counted from their first byte, or the client gets `408 Request Timeout` and the
//! connection is closed. Bodies are governed by the per-read body timeout instead,
//! and HTTP/2 connections (h2c) by HTTP/2's own idle handling.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora::server::ShutdownWatch;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Written to a client whose headers did not arrive in time.
const RESPONSE_408: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n\
content-length: 37\r\nconnection: close\r\n\r\nrequest headers not received in time\n";

const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

/// Where the connection is in its request/response cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request's headers: the deadline runs.
    Headers,
    /// Headers complete; a body may follow. No deadline.
    Body,
    /// A response was written; the next byte read starts a new request.
    Idle,
    /// Not HTTP/1 (h2c): no header deadline.
    Off,
}

/// A connection whose request headers must arrive within a deadline.
pub struct HeaderDeadline {
    inner: Stream,
    limit: Duration,
    phase: Phase,
    first_read: bool,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Last three bytes seen in the header phase, to find `\r\n\r\n` across reads.
    tail: [u8; 3],
    timed_out: IntCounter,
}

impl fmt::Debug for HeaderDeadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderDeadline")
            .field("inner", &self.inner)
            .field("limit", &self.limit)
            .field("phase", &self.phase)
            .finish()
    }
}

impl HeaderDeadline {
    /// Wraps a freshly accepted connection; its first request's deadline starts now.
    pub fn new(inner: Stream, limit: Duration, timed_out: IntCounter) -> Self {
        Self {
            inner,
            limit,
            phase: Phase::Headers,
            first_read: true,
            sleep: Some(Box::pin(tokio::time::sleep(limit))),
            tail: [0; 3],
            timed_out,
        }
    }

    /// Updates the phase from bytes just read.
    fn saw(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.first_read {
            self.first_read = false;
            if bytes.starts_with(H2_PREFACE_START) {
                self.phase = Phase::Off;
                self.sleep = None;
                return;
            }
        }
        match self.phase {
            Phase::Idle => {
                self.phase = Phase::Headers;
                self.tail = [0; 3];
                self.sleep = Some(Box::pin(tokio::time::sleep(self.limit)));
                self.scan(bytes);
            }
            Phase::Headers => self.scan(bytes),
            Phase::Body | Phase::Off => {}
        }
    }

    fn scan(&mut self, bytes: &[u8]) {
        let mut window = [0u8; 4];
        window[1..].copy_from_slice(&self.tail);
        for &b in bytes {
            window.rotate_left(1);
            window[3] = b;
            if &window == b"\r\n\r\n" {
                self.phase = Phase::Body;
                self.sleep = None;
                return;
            }
        }
        self.tail.copy_from_slice(&window[1..]);
    }

    fn wrote(&mut self, bytes: &[u8]) {
        // "HTTP/1.x 1xx" (100 Continue) is not the response: the body comes next.
        let informational = bytes.len() > 9 && bytes.starts_with(b"HTTP/1.") && bytes[9] == b'1';
        if matches!(self.phase, Phase::Headers | Phase::Body) && !informational {
            self.phase = Phase::Idle;
            self.sleep = None;
        }
    }
}

impl AsyncRead for HeaderDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(sleep) = this.sleep.as_mut()
            && sleep.as_mut().poll(cx).is_ready()
        {
            this.sleep = None;
            this.timed_out.inc();
            // Best effort: the send buffer of a connection that only trickled bytes
            // in is empty, so this completes at once; if not, the client just sees
            // the connection close.
            let _ = Pin::new(&mut this.inner).poll_write(cx, RESPONSE_408);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("request headers not complete within {:?}", this.limit),
            )));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &result {
            let filled = buf.filled();
            let fresh = filled[before..].to_vec();
            this.saw(&fresh);
        }
        result
    }
}

impl AsyncWrite for HeaderDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result
            && *n > 0
        {
            this.wrote(buf);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &result
            && *n > 0
            && let Some(first) = bufs.iter().find(|b| !b.is_empty())
        {
            let first = first.to_vec();
            this.wrote(&first);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for HeaderDeadline {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await;
    }
}

impl UniqueID for HeaderDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeaderDeadline {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeaderDeadline {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeaderDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for HeaderDeadline {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for HeaderDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// A server app whose connections get a header deadline before `inner` sees them,
/// and whose idle keep-alive connections are drained, not cut, at shutdown.
pub struct GuardedApp<A> {
    inner: Arc<A>,
    limit: Duration,
    timed_out: IntCounter,
    drain: Duration,
}

impl<A> GuardedApp<A> {
    /// Guards `inner`'s connections with `limit` for each request's headers. At
    /// shutdown (or a graceful upgrade), idle keep-alive connections stay open for
    /// `drain`: a request arriving on one is served with `Connection: close`, so the
    /// client learns from the answer, not from a reset, that it must reconnect (to the
    /// successor, after an upgrade). Those still idle after `drain` are closed.
    pub fn new(inner: A, limit: Duration, timed_out: IntCounter, drain: Duration) -> Self {
        Self {
            inner: Arc::new(inner),
            limit,
            timed_out,
            drain,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for GuardedApp<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // A reused keep-alive connection comes back already wrapped.
        let already = stream.as_any().is::<HeaderDeadline>();
        let stream: Stream = if already {
            stream
        } else {
            Box::new(HeaderDeadline::new(
                stream,
                self.limit,
                self.timed_out.clone(),
            ))
        };
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        // pingora calls this once the listeners are closed; the inner cleanup aborts
        // every connection waiting for its next request, which races with clients
        // sending one right then. Until it runs, pingora answers with keep-alive off.
        tokio::time::sleep(self.drain).await;
        self.inner.cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(limit: Duration) -> (HeaderDeadline, tokio::net::TcpStream, IntCounter) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(server));
        let counter = IntCounter::new("t", "t").unwrap();
        (
            HeaderDeadline::new(stream, limit, counter.clone()),
            client,
            counter,
        )
    }

    #[tokio::test]
    async fn trickled_headers_get_408_after_the_deadline() {
        let (mut guarded, mut client, counter) = pair(Duration::from_millis(300)).await;
        let writer = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\nHost: x\r\n" {
                if client.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut answer = Vec::new();
            let _ = client.read_to_end(&mut answer).await;
            answer
        });
        let mut buf = [0u8; 64];
        let err = loop {
            match guarded.read(&mut buf).await {
                Ok(0) => panic!("client closed first"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(guarded);
        let answer = writer.await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 408"), "{answer:?}");
        assert_eq!(counter.get(), 1);
    }

    #[tokio::test]
    async fn complete_headers_disarm_the_deadline_until_the_next_request() {
        let (mut guarded, mut client, counter) = pair(Duration::from_millis(200)).await;
        client
            .write_all(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r")
            .await
            .unwrap();
        let mut buf = [0u8; 128];
        let n = guarded.read(&mut buf).await.unwrap();
        assert!(n > 0);
        client.write_all(b"\n").await.unwrap();
        let _ = guarded.read(&mut buf).await.unwrap();
        assert_eq!(guarded.phase, Phase::Body);
        // A slow body is not this guard's business.
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.write_all(b"ok").await.unwrap();
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 2);
        // 100 Continue does not end the request; the real response does.
        guarded
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(guarded.phase, Phase::Body);
        guarded.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        assert_eq!(guarded.phase, Phase::Idle);
        // Idle keep-alive time is not counted; the next request's first byte starts it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        client
            .write_all(b"GET /next HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let _ = guarded.read(&mut buf).await.unwrap();
        assert_eq!(guarded.phase, Phase::Body);
        assert_eq!(counter.get(), 0);
    }

    #[tokio::test]
    async fn h2c_connections_are_not_subject_to_the_header_deadline() {
        let (mut guarded, mut client, _) = pair(Duration::from_millis(100)).await;
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let _ = guarded.read(&mut buf).await.unwrap();
        assert_eq!(guarded.phase, Phase::Off);
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.write_all(b"x").await.unwrap();
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 1);
    }
}
