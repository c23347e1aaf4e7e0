//! HTTP/2 connections, which cannot move, and their shutdown: this example's `GOAWAY`
//! and `PING` first, then hyper's graceful shutdown once the client has acknowledged
//! that `PING` ([`GoAway`] says why), written between hyper's frames by a stream that
//! follows the frames both ways ([`GoAwayIo`]).

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::{service_fn, Service as _};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::sniff::{Prefixed, PREFACE};
use crate::{drive, Conn, Ctx, Fate, Phase};

/// How long an HTTP/2 client has to acknowledge the `PING` after this example's
/// `GOAWAY`, before hyper's graceful shutdown starts anyway.
const GOAWAY_ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves an HTTP/2 connection until it ends; once this generation should exit, shuts it
/// down with `GOAWAY` in two round trips (see [`GoAway`]).
pub async fn serve_http2(conn: Conn, ctx: &Arc<Ctx>, phase: &watch::Receiver<Phase>) {
    let Conn {
        stream,
        buf,
        mut life,
    } = conn;
    let goaway = Arc::new(GoAway::default());
    let io = GoAwayIo::new(Prefixed::new(buf, stream), Arc::clone(&goaway));
    let service = {
        let ctx = Arc::clone(ctx);
        service_fn(move |req: Request<Incoming>| ctx.app.call(req))
    };
    let http =
        http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(io), service);
    let mut http = pin!(http);
    // When this example's GOAWAY was asked for; whether hyper's shutdown has started.
    let (mut asked, mut shut) = (None::<Instant>, false);
    let _ = drive(phase, |cx, phase| loop {
        if let Poll::Ready(done) = http.as_mut().poll(cx) {
            return Poll::Ready(done);
        }
        if life.fate(phase, ctx.lame_duck) == Fate::Stay || shut {
            return Poll::Pending;
        }
        match asked {
            // GOAWAY and PING, written at the next frame boundary (polled at once).
            None => {
                goaway.ask();
                asked = Some(Instant::now());
            }
            // The client has seen the GOAWAY and sent what it had opened before.
            Some(at) if goaway.acked() || at.elapsed() >= GOAWAY_ACK_TIMEOUT => {
                http.as_mut().graceful_shutdown();
                shut = true;
            }
            Some(_) => return Poll::Pending,
        }
    })
    .await;
}

/// The HTTP/2 shutdown of this example: a `GOAWAY` with last stream id 2³¹−1 and a
/// `PING` of its own, then hyper's graceful shutdown once the client has acknowledged
/// that `PING`.
///
/// hyper's graceful shutdown alone (the h2 crate's) sends `GOAWAY` (2³¹−1) and a `PING`,
/// and the final `GOAWAY`, naming the last stream it has seen, as soon as the `PING` is
/// acknowledged: one round trip, as RFC 9113 §6.8 suggests. But a client writes its
/// acknowledgement before the requests it had already queued: the h2 crate's client
/// (hyper's, reqwest's) does, in the same write, and so do others that send `PING`
/// acknowledgements first. Those requests, opened before the client saw the `GOAWAY`,
/// arrive after the acknowledgement, above the final `GOAWAY`'s last stream id, and are
/// refused unprocessed. Measured with `h2_check` (32 connections × 10 streams, an
/// upgrade every 250 ms): 180 such failed requests in 41 upgrades, every one of them
/// with its `HEADERS` after the client's `PING` acknowledgement.
///
/// With this example's round trip first, what the client had queued goes out with (or
/// before) its acknowledgement of this example's `PING`, which comes back before hyper's
/// shutdown starts: every stream opened before the client saw the first `GOAWAY` is
/// below the final one. The frames are written between hyper's, at a frame boundary
/// ([`GoAwayIo`]); the h2 crate ignores the acknowledgement of a `PING` it did not send.
#[derive(Default)]
pub struct GoAway {
    /// Set by the connection's task: write the `GOAWAY` and the `PING`.
    asked: AtomicBool,
    /// The client has acknowledged the `PING`.
    acked: AtomicBool,
}

impl GoAway {
    /// This example's `PING` payload: the h2 crate's own are other bytes.
    const PING: [u8; 8] = *b"tflipgo1";

    fn ask(&self) {
        self.asked.store(true, Ordering::SeqCst);
    }

    fn acked(&self) -> bool {
        self.acked.load(Ordering::SeqCst)
    }

    /// `GOAWAY` (last stream id 2³¹−1, `NO_ERROR`) and `PING`, as frames (RFC 9113 §4.1,
    /// §6.7, §6.8).
    fn frames() -> Vec<u8> {
        let mut out = Vec::with_capacity(34);
        out.extend_from_slice(&[0, 0, 8, frame::GOAWAY, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&[0, 0, 8, frame::PING, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&GoAway::PING);
        out
    }
}

/// HTTP/2 frame types and flags this example reads or writes.
mod frame {
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const ACK: u8 = 0x1;
    /// A frame header: length (24 bits), type, flags, stream id (32 bits).
    pub const HEADER: usize = 9;
}

/// Where a stream of frames is: which frame, and how much of it has passed.
#[derive(Default)]
struct Frames {
    /// The current frame's header, as much as has passed.
    head: [u8; frame::HEADER],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    left: usize,
    /// The current frame's payload, when it is one to look at (a `PING`).
    payload: Vec<u8>,
    /// Whole frames passed.
    count: u64,
}

impl Frames {
    /// Follows `bytes`; returns the payload of every `PING` acknowledgement among the
    /// frames they end.
    fn pass(&mut self, mut bytes: &[u8], mut on_ack: impl FnMut(&[u8])) {
        while !bytes.is_empty() {
            if self.have < frame::HEADER {
                let n = (frame::HEADER - self.have).min(bytes.len());
                self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == frame::HEADER {
                    self.left =
                        u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]) as usize;
                    self.payload.clear();
                    self.end(&mut on_ack);
                }
                continue;
            }
            let n = self.left.min(bytes.len());
            if self.head[3] == frame::PING && self.payload.len() < 8 {
                self.payload
                    .extend_from_slice(&bytes[..n.min(8 - self.payload.len())]);
            }
            self.left -= n;
            bytes = &bytes[n..];
            self.end(&mut on_ack);
        }
    }

    /// If the current frame has passed whole: counts it, and reports an acknowledgement.
    fn end(&mut self, on_ack: &mut impl FnMut(&[u8])) {
        if self.have < frame::HEADER || self.left > 0 {
            return;
        }
        if self.head[3] == frame::PING && self.head[4] & frame::ACK != 0 {
            on_ack(&self.payload);
        }
        self.have = 0;
        self.count += 1;
    }

    /// Between two frames, after at least one.
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.count > 0
    }
}

/// An HTTP/2 connection's stream that follows the frames both ways: it writes
/// [`GoAway::frames`] between two of hyper's frames once asked (never before hyper's
/// first, its `SETTINGS`), and notes the client's acknowledgement of the `PING`.
struct GoAwayIo {
    inner: Prefixed,
    goaway: Arc<GoAway>,
    /// What the client sends, after its preface.
    client: Frames,
    preface_left: usize,
    /// What hyper writes.
    server: Frames,
    /// This example's frames, while they are being written; `Some(empty)` once written.
    ours: Option<Vec<u8>>,
}

impl GoAwayIo {
    fn new(inner: Prefixed, goaway: Arc<GoAway>) -> GoAwayIo {
        GoAwayIo {
            inner,
            goaway,
            client: Frames::default(),
            preface_left: PREFACE.len(),
            server: Frames::default(),
            ours: None,
        }
    }

    /// Writes this example's frames first, if asked for and between two of hyper's.
    fn poll_ours(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ours.is_none() && self.goaway.asked.load(Ordering::SeqCst) {
            if !self.server.at_boundary() {
                return Poll::Ready(Ok(()));
            }
            self.ours = Some(GoAway::frames());
        }
        while let Some(ours) = self.ours.as_mut().filter(|o| !o.is_empty()) {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, ours))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            ours.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for GoAwayIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let mut read = &buf.filled()[before..];
        let skip = this.preface_left.min(read.len());
        this.preface_left -= skip;
        read = &read[skip..];
        let goaway = &this.goaway;
        this.client.pass(read, |payload| {
            if payload == GoAway::PING {
                goaway.acked.store(true, Ordering::SeqCst);
            }
        });
        polled
    }
}

impl AsyncWrite for GoAwayIo {
    // Not vectored: every write passes through `server`, one buffer at a time.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_ours(cx))?;
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.server.pass(&buf[..n], |_| {});
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_ours(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
