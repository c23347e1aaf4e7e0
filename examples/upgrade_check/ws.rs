//! The WebSocket side of the long-lived connections (`--hold N --ws`): as much of RFC 6455
//! as a client needs, with no dependency: the opening handshake, masked text frames out,
//! frames in (unmasked, as a server sends them). The server's `Sec-WebSocket-Accept` is
//! not checked (that needs SHA-1): this is a test client on loopback, not a browser.
//! Self-contained, so that the tokio example's tests use it too (included by path).

use std::io::{self, Read, Write};
use std::net::TcpStream;

/// The longest frame accepted from the server: its answers are one short line.
const MAX_PAYLOAD: u64 = 4096;

/// A frame from the server.
#[derive(Debug)]
pub enum Frame {
    Text(String),
    /// A close frame, with its status code if it has one.
    Close(Option<u16>),
    Ping(Vec<u8>),
    /// Pong, binary or a continuation: nothing this client asked for.
    Other(u8),
}

/// The opening handshake on a connected (blocking) stream; returns the bytes that came
/// after the response's head (none from a server that waits to be spoken to).
pub fn handshake(stream: &mut TcpStream, seed: u64) -> io::Result<Vec<u8>> {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..].copy_from_slice(&std::process::id().to_le_bytes().repeat(2));
    let request = format!(
        "GET /session HTTP/1.1\r\nHost: upgrade-check\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        base64(&key)
    );
    stream.write_all(request.as_bytes())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 8192 {
            return Err(io::Error::other("handshake response head too long"));
        }
        match stream.read(&mut chunk)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    if !head.starts_with("HTTP/1.1 101") {
        let line = head.lines().next().unwrap_or_default().to_owned();
        return Err(io::Error::other(format!("handshake refused: {line:?}")));
    }
    Ok(buf.split_off(end))
}

/// A masked frame from the client (`opcode` 1 text, 8 close, 10 pong).
pub fn frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// The first frame in `buf`, if it is all there, and how many bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Frame, usize)>, String> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(format!("reserved bits set: {b0:#04x}"));
    }
    if b1 & 0x80 != 0 {
        return Err("a masked frame from the server".into());
    }
    let (len, mut at) = match b1 & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4),
        127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()), 10),
        126 | 127 => return Ok(None),
        n => (n as u64, 2),
    };
    if len > MAX_PAYLOAD {
        return Err(format!("a frame of {len} bytes"));
    }
    if buf.len() < at + len as usize {
        return Ok(None);
    }
    let payload = &buf[at..at + len as usize];
    at += len as usize;
    if b0 & 0x80 == 0 {
        return Err("a fragmented message (this client sends none that needs one)".into());
    }
    let frame = match b0 & 0x0f {
        1 => {
            Frame::Text(String::from_utf8(payload.to_vec()).map_err(|_| "a text frame not UTF-8")?)
        }
        8 => {
            Frame::Close((payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])))
        }
        9 => Frame::Ping(payload.to_vec()),
        op => Frame::Other(op),
    };
    Ok(Some((frame, at)))
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
