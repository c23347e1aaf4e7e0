//! HTTP/1 connections, and how one leaves between two requests: the service counts
//! requests and responses, the stream ([`Watched`]) notes what arrives and whether a
//! response is written whole, and once the connection is idle hyper's graceful shutdown
//! ends it without closing the socket; `into_parts` gives the stream back with the
//! bytes hyper had read and not used ([`serve_http1`]).

use std::convert::Infallible;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::server::conn::http1;
use hyper::service::{service_fn, Service as _};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::sniff::Prefixed;
use crate::{drive, Conn, Ctx, Fate, Phase, Step};

/// What the service and the stream tell an HTTP/1 connection's task.
#[derive(Default)]
struct ConnInfo {
    /// Requests seen so far, and responses ready.
    requests: AtomicU64,
    responses: AtomicU64,
    /// Bytes have arrived since the last response was ready: a request is on its way
    /// or under way (HTTP/1 has one at a time; pipelining is not considered).
    unanswered: AtomicBool,
    /// The last write (or flush) could not go through whole: hyper holds bytes of a
    /// response that the client has not been sent yet.
    unwritten: AtomicBool,
    /// Every response says `Connection: close`.
    lame: AtomicBool,
}

impl ConnInfo {
    /// Every request has its response, written: hyper has no request under way, though
    /// it may hold the start of the next one (bytes it has read, not a whole head yet),
    /// which `into_parts` gives back.
    fn between_requests(&self) -> bool {
        self.requests.load(Ordering::SeqCst) == self.responses.load(Ordering::SeqCst)
            && !self.unwritten.load(Ordering::SeqCst)
    }

    /// Between requests, and nothing has arrived since the last response: closing the
    /// connection cuts nothing off.
    fn idle(&self) -> bool {
        self.between_requests() && !self.unanswered.load(Ordering::SeqCst)
    }
}

/// Serves an HTTP/1 connection until it ends, or until it is idle and should go to the
/// new generation: then hyper's graceful shutdown ends it without closing the socket
/// (`poll_without_shutdown`), and `into_parts` gives the stream back with the bytes
/// hyper had read and not used.
pub async fn serve_http1(conn: Conn, ctx: &Arc<Ctx>, phase: &watch::Receiver<Phase>) -> Step {
    let Conn {
        stream,
        buf,
        mut life,
    } = conn;
    let info = Arc::new(ConnInfo::default());
    let service = {
        let (ctx, info) = (Arc::clone(ctx), Arc::clone(&info));
        service_fn(move |req: Request<Incoming>| {
            info.requests.fetch_add(1, Ordering::SeqCst);
            let response = ctx.app.call(req);
            let info = Arc::clone(&info);
            // Boxed: poll_without_shutdown wants a future that is Unpin.
            Box::pin(async move {
                let mut response = response.await?;
                info.responses.fetch_add(1, Ordering::SeqCst);
                info.unanswered.store(false, Ordering::SeqCst);
                // Lame duck: the client's next request goes to a new connection.
                if info.lame.load(Ordering::SeqCst) {
                    let close = HeaderValue::from_static("close");
                    response.headers_mut().insert(CONNECTION, close);
                }
                Ok::<_, Infallible>(response)
            })
        })
    };
    let io = Watched {
        inner: Prefixed::new(buf, stream),
        info: Arc::clone(&info),
    };
    let mut http = http1::Builder::new().serve_connection(TokioIo::new(io), service);
    // Set once hyper has been asked to end the connection: to hand it over, or not.
    let mut ending: Option<bool> = None;
    let done = drive(phase, |cx, phase| loop {
        if let Poll::Ready(done) = http.poll_without_shutdown(cx) {
            return Poll::Ready(done);
        }
        if ending.is_some() {
            return Poll::Pending;
        }
        life.first = life.first && info.requests.load(Ordering::SeqCst) == 0;
        // Between requests, hyper's graceful shutdown ends the connection at once (a
        // request under way, it would end it after the response, and say so in it).
        let go = match life.fate(phase, ctx.lame_duck) {
            Fate::Stay => return Poll::Pending,
            // With the start of the next request, if some has come: it goes along.
            Fate::Go if info.between_requests() => true,
            Fate::Go => return Poll::Pending,
            // Only once nothing has come since the last response.
            Fate::Lame(end) => {
                info.lame.store(true, Ordering::SeqCst);
                if Instant::now() < end || !info.idle() {
                    return Poll::Pending;
                }
                false
            }
        };
        Pin::new(&mut http).graceful_shutdown();
        ending = Some(go);
    })
    .await;
    life.first = life.first && info.requests.load(Ordering::SeqCst) == 0;
    if done.is_err() {
        return Step::Over; // a client's error ends only its connection
    }
    let parts = http.into_parts();
    let Prefixed { prefix, inner } = parts.io.into_inner().inner;
    let mut stream = inner;
    if ending == Some(true) {
        // What hyper had read and not used, then what it had not read yet of ours.
        let mut unread = parts.read_buf.to_vec();
        unread.extend_from_slice(&prefix);
        return Step::Go(Conn {
            stream,
            buf: unread,
            life,
        });
    }
    // Over (the client closed it, or a response said `Connection: close`, or a lame
    // duck stayed idle to its end): what hyper's own shutdown would do.
    let _ = poll_fn(|cx| Pin::new(&mut stream).poll_shutdown(cx)).await;
    Step::Over
}

/// An HTTP/1 client's stream, noting in [`ConnInfo`] when bytes arrive and whether a
/// response is written whole.
pub struct Watched {
    inner: Prefixed,
    info: Arc<ConnInfo>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.info.unanswered.store(true, Ordering::SeqCst);
        }
        polled
    }
}

impl Watched {
    fn written<T>(&self, polled: Poll<T>) -> Poll<T> {
        self.info
            .unwritten
            .store(polled.is_pending(), Ordering::SeqCst);
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.written(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.written(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.written(polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
