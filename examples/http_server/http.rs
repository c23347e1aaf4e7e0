//! HTTP/1.1, as much as this example needs: a request head read and parsed, a body
//! skipped, a response written whole, and the end of a connection after its last
//! response ([`linger`]).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

/// After the last response, how long to wait for the client to close (see [`linger`]).
const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 16 * 1024;

/// Reads until `buf` holds a whole request head; returns its length including the
/// final `\r\n\r\n`, or `None` if the client closed the connection first.
pub fn read_head(conn: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
    let mut searched = 0;
    loop {
        if let Some(i) = find(&buf[searched..], b"\r\n\r\n") {
            return Ok(Some(searched + i + 4));
        }
        searched = buf.len().saturating_sub(3);
        if buf.len() > MAX_HEAD {
            respond(
                conn,
                "431 Request Header Fields Too Large",
                &[],
                "",
                false,
                false,
            )?;
            linger(conn)?;
            return Ok(None);
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

pub struct Request {
    pub method: String,
    pub content_length: u64,
    pub keep_alive: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
}

/// Parses a request head. On error: the status to answer with (then close) and why.
pub fn parse_head(head: &[u8]) -> Result<Request, (&'static str, &'static str)> {
    const BAD: &str = "400 Bad Request";
    let mut lines = head[..head.len() - 4].split(|&b| b == b'\n').map(|line| {
        // Every line but the last ended in "\r\n"; the last had "\r\n\r\n" cut off.
        line.strip_suffix(b"\r").unwrap_or(line)
    });
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err((BAD, "malformed request line\n"));
    };
    if method.is_empty() || !method.iter().all(u8::is_ascii_alphabetic) || target.is_empty() {
        return Err((BAD, "malformed request line\n"));
    }
    let http11 = match version {
        b"HTTP/1.1" => true,
        b"HTTP/1.0" => false,
        _ => return Err(("505 HTTP Version Not Supported", "HTTP/1.0 or 1.1 only\n")),
    };

    let mut content_length = None;
    let (mut close, mut keep_alive, mut expect_continue) = (false, false, false);
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err((BAD, "malformed header\n"));
        };
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.is_empty() || name.iter().any(|b| b.is_ascii_whitespace()) {
            return Err((BAD, "malformed header\n"));
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or((BAD, "bad Content-Length\n"))?;
            if content_length.is_some_and(|old| old != n) {
                return Err((BAD, "conflicting Content-Length\n"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Without chunked decoding the end of the body is unknown: refuse, and close.
            return Err(("501 Not Implemented", "Transfer-Encoding not supported\n"));
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue = http11 && value.eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(trim) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    Ok(Request {
        method: String::from_utf8_lossy(method).into_owned(),
        content_length: content_length.unwrap_or(0),
        keep_alive: !close && (http11 || keep_alive),
        expect_continue,
    })
}

/// Reads and drops a request body of `len` bytes, part of which may be in `buf`
/// already; leaves in `buf` whatever follows it (a pipelined request).
pub fn discard_body(conn: &mut TcpStream, buf: &mut Vec<u8>, len: u64) -> io::Result<()> {
    let buffered = buf.len().min(usize::try_from(len).unwrap_or(usize::MAX));
    buf.drain(..buffered);
    let mut left = len - buffered as u64;
    let mut chunk = [0u8; 8192];
    while left > 0 {
        let want = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        match conn.read(&mut chunk[..want]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => left -= n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes a whole response in one go.
pub fn respond(
    conn: &mut TcpStream,
    status: &str,
    headers: &[&str],
    body: &str,
    head_only: bool,
    keep_alive: bool,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: {}\r\n",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    for header in headers {
        out.push_str(header);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(body);
    }
    conn.write_all(out.as_bytes())
}

/// Ends a connection after its last response. Closing a socket that still has unread
/// input sends a reset, which can destroy the response before the client has read it;
/// so send FIN, and wait briefly for the client to close, discarding what it sends.
pub fn linger(conn: &mut TcpStream) -> io::Result<()> {
    conn.shutdown(Shutdown::Write)?;
    conn.set_read_timeout(Some(LINGER_TIMEOUT))?;
    let mut chunk = [0u8; 4096];
    let mut discarded = 0;
    while discarded < 256 * 1024 {
        match conn.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => discarded += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    Ok(())
}

/// `s` without leading and trailing whitespace (`<[u8]>::trim_ascii` needs Rust 1.80).
fn trim(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &s[start..end]
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
