//! The HTTP/1.1 side of the clients (`--http`): one `GET /` at a time on a connection,
//! answered with a `Content-Length` body that holds `pid=<pid>`.
//!
//! Every request that does not get a whole 2xx response counts as failed: refused,
//! reset (also a write to a connection the server has closed), closed before or within
//! the response, timed out, or answered with another status or without a pid. Nothing is
//! retried: RFC 9112 §9.3.1 lets a client retry a request on a closed idle connection,
//! but wrk and many others do not, so a server must not make them need to.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};

use crate::load::{parse_pid, Failure};
use crate::{CONNECT_TIMEOUT, MAX_REPLY, READ_TIMEOUT};

/// A failed request: the kind and what happened, in words.
pub type Failed = (Failure, String);

/// A persistent connection, and the bytes read beyond the last response.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Responses read on it so far.
    pub served: u64,
}

/// What a response said, once it has arrived whole and with a 2xx status.
pub struct Answer {
    pub pid: u32,
    /// `Connection: close`: the server ends the connection after this response.
    pub close: bool,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> Result<Conn, Failed> {
        let fail = |what: &str, e: io::Error| (Failure::of(&e), format!("{what}: {e}"));
        let stream =
            TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| fail("connect", e))?;
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(READ_TIMEOUT)))
            .map_err(|e| fail("set timeouts", e))?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
            served: 0,
        })
    }

    /// Sends `GET /` (with `Connection: close` if `close`) and reads the response.
    pub fn get(&mut self, close: bool) -> Result<Answer, Failed> {
        let n = self.served + 1;
        let request: &[u8] = if close {
            b"GET / HTTP/1.1\r\nHost: upgrade-check\r\nConnection: close\r\n\r\n"
        } else {
            b"GET / HTTP/1.1\r\nHost: upgrade-check\r\n\r\n"
        };
        self.stream
            .write_all(request)
            .map_err(|e| (Failure::of(&e), format!("request {n}: write: {e}")))?;
        let answer = self
            .read_response()
            .map_err(|(kind, msg)| (kind, format!("request {n}: {msg}")))?;
        self.served += 1;
        Ok(answer)
    }

    fn read_response(&mut self) -> Result<Answer, Failed> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() as u64 > MAX_REPLY {
                return Err((Failure::Wrong, "response head too long".into()));
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let wrong = |why: &str| (Failure::Wrong, format!("{why}: {head:?}"));
        let status: u16 = head
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| head.strip_prefix("HTTP/1.0 "))
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| wrong("bad status line"))?;
        let (mut len, mut close) = (None, false);
        for line in head.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                len = value.parse::<u64>().ok();
            } else if name.eq_ignore_ascii_case("connection") {
                close |= value
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("close"));
            }
        }
        let len = len
            .filter(|&n| n <= MAX_REPLY)
            .ok_or_else(|| wrong("no usable Content-Length"))? as usize;
        while self.buf.len() < head_end + len {
            self.fill()?;
        }
        let body = String::from_utf8_lossy(&self.buf[head_end..head_end + len]).into_owned();
        self.buf.drain(..head_end + len);
        if !(200..300).contains(&status) {
            return Err((Failure::Wrong, format!("status {status}: {body:?}")));
        }
        let pid = parse_pid(&body).ok_or_else(|| wrong("no pid in the body"))?;
        Ok(Answer { pid, close })
    }

    /// Reads more of the response into `buf`.
    fn fill(&mut self) -> Result<(), Failed> {
        let mut chunk = [0u8; 4096];
        loop {
            return match self.stream.read(&mut chunk) {
                Ok(0) if self.buf.is_empty() => {
                    Err((Failure::Empty, "closed before the response".into()))
                }
                Ok(0) => Err((
                    Failure::CutOff,
                    format!(
                        "closed within the response after {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ),
                )),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err((Failure::of(&e), format!("read: {e}"))),
            };
        }
    }

    /// After a `Connection: close` response: the server must close, with nothing more.
    pub fn expect_close(mut self) -> Result<(), Failed> {
        if !self.buf.is_empty() {
            return Err((Failure::Wrong, "data after the response".into()));
        }
        let mut chunk = [0u8; 256];
        loop {
            return match self.stream.read(&mut chunk) {
                Ok(0) => Ok(()),
                Ok(_) => Err((Failure::Wrong, "data after the response".into())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err((Failure::of(&e), format!("after the response: {e}"))),
            };
        }
    }
}

/// One request on a new connection, with `Connection: close`: the pid that answered,
/// once the server has closed the connection.
pub fn probe(addr: SocketAddr) -> Result<u32, Failed> {
    let mut conn = Conn::connect(addr)?;
    let answer = conn.get(true)?;
    conn.expect_close()?;
    Ok(answer.pid)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
