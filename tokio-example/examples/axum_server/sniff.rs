//! The first bytes of a connection: what tells HTTP/2 (the client preface) from HTTP/1
//! ([`sniff`]), and the stream they are put back in front of ([`Prefixed`]), which is
//! also how a connection handed over gets back the bytes the previous generation had
//! read.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{drive, Conn, Ctx, Fate, Phase, Step};

/// The protocol of a connection, once its first bytes have shown it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

/// What an HTTP/2 client sends first (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Proto {
    /// What the first bytes of a connection say, if they say enough.
    fn sniff(first: &[u8]) -> Option<Proto> {
        let n = first.len().min(PREFACE.len());
        if first[..n] != PREFACE[..n] {
            Some(Proto::Http1)
        } else if n == PREFACE.len() {
            Some(Proto::Http2)
        } else {
            None
        }
    }
}

/// Reads the first bytes of a connection until they show its protocol; a connection
/// that has not shown it yet goes to the new generation with what it has sent.
pub async fn sniff(mut conn: Conn, ctx: &Arc<Ctx>, phase: &watch::Receiver<Phase>) -> Step {
    enum Sniffed {
        Proto(Proto),
        Over,
        Go,
    }
    let sniffed = drive(phase, |cx, phase| loop {
        if let Some(proto) = Proto::sniff(&conn.buf) {
            return Poll::Ready(Sniffed::Proto(proto));
        }
        let mut chunk = [0u8; 1024];
        let mut read = ReadBuf::new(&mut chunk);
        match Pin::new(&mut conn.stream).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(Sniffed::Over),
            Poll::Ready(Ok(())) => conn.buf.extend_from_slice(read.filled()),
            Poll::Ready(Err(_)) => return Poll::Ready(Sniffed::Over),
            Poll::Pending => {
                return match conn.life.fate(phase, ctx.lame_duck) {
                    Fate::Stay => Poll::Pending,
                    Fate::Go => Poll::Ready(Sniffed::Go),
                    // Nothing has come at all by the end of the grace: nothing will.
                    Fate::Lame(end) if conn.buf.is_empty() && Instant::now() >= end => {
                        Poll::Ready(Sniffed::Over)
                    }
                    Fate::Lame(_) => Poll::Pending,
                };
            }
        }
    })
    .await;
    match sniffed {
        Sniffed::Proto(proto) => {
            conn.life.proto = Some(proto);
            Step::Next(conn)
        }
        Sniffed::Over => Step::Over,
        Sniffed::Go => Step::Go(conn),
    }
}

/// A stream with bytes put back in front of it: what was read to tell the protocol, or
/// what the previous generation had read.
pub struct Prefixed {
    pub prefix: Vec<u8>,
    pub inner: TcpStream,
}

impl Prefixed {
    pub fn new(prefix: Vec<u8>, inner: TcpStream) -> Prefixed {
        Prefixed { prefix, inner }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.drain(..n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
