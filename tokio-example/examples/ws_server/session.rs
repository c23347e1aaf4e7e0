//! One WebSocket session: its socket under tungstenite, the bytes read from it and not yet
//! given to tungstenite, its state, and how it travels to the next generation.
//!
//! tungstenite reads into a buffer of its own, and gives no way to get it back. A session
//! can move only at a point where every byte read off the socket is accounted for, so
//! tungstenite reads through a [`Gate`], which keeps the bytes it read itself and gives
//! tungstenite at most the rest of the current frame (and, during the opening handshake,
//! at most the request's head). When tungstenite has just handed out a message and no
//! fragmented message is under way, tungstenite holds nothing: what was read and not
//! used is the gate's buffer, whole frames or the start of the next one. That buffer is
//! the handover's `unread`, and the new generation puts it back under a gate of its own.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

/// The tag of a session's state in a handover: version 1 of [`State::encode`], "WSS1".
/// A binary that changes the state's format gives it another tag; a generation refuses
/// a tag it does not know, and the session stays with the old one.
pub const STATE_V1: u32 = u32::from_be_bytes(*b"WSS1");
/// The room a session is in until it joins another.
const LOBBY: &str = "lobby";
/// The longest room name (ASCII letters, digits, `-` and `_`).
const MAX_ROOM: usize = 32;
/// The longest message a client may send: this is a chat, not a file transfer.
const MAX_MESSAGE: usize = 16 << 10;
/// How much the gate reads from the socket at a time.
const CHUNK: usize = 16 << 10;
/// The longest request head before the handshake.
pub const MAX_HEAD: usize = 8 << 10;

/// What a session carries from generation to generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// Messages answered so far, by every generation.
    pub n: u64,
    /// The chat room it is in.
    pub room: String,
}

impl State {
    fn new() -> State {
        State {
            n: 0,
            room: LOBBY.into(),
        }
    }

    /// `n` (little-endian `u64`), the room's length (`u8`), the room.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.n.to_le_bytes().to_vec();
        out.push(self.room.len() as u8);
        out.extend_from_slice(self.room.as_bytes());
        out
    }

    /// The strict inverse of [`encode`](State::encode): what comes from another process
    /// is checked before it is used.
    pub fn decode(bytes: &[u8]) -> Result<State, String> {
        let (n, rest) = bytes
            .split_first_chunk::<8>()
            .ok_or("shorter than a count")?;
        let (&len, room) = rest.split_first().ok_or("no room")?;
        if room.len() != len as usize {
            return Err(format!("{} bytes of room, said {len}", room.len()));
        }
        let room = std::str::from_utf8(room).map_err(|_| "a room not UTF-8")?;
        if !valid_room(room) {
            return Err(format!("bad room name {room:?}"));
        }
        Ok(State {
            n: u64::from_le_bytes(*n),
            room: room.into(),
        })
    }
}

fn valid_room(room: &str) -> bool {
    (1..=MAX_ROOM).contains(&room.len())
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The socket under tungstenite: reads into a buffer of its own and gives tungstenite at
/// most the request head (`head`), then at most the rest of the current frame.
#[derive(Debug)]
pub struct Gate {
    pub stream: TcpStream,
    /// Read from the socket, not given to tungstenite.
    buf: Vec<u8>,
    /// During the handshake: the bytes of the request head still to give.
    head: usize,
    /// Bytes of the current frame not yet given.
    left: u64,
    /// A data frame without FIN was given, and the continuation with FIN was not.
    fragmented: bool,
}

impl Gate {
    /// `unread`: bytes read from `stream` before (by the previous generation), which
    /// start at a frame's first byte.
    pub fn new(stream: TcpStream, unread: Vec<u8>) -> Gate {
        Gate {
            stream,
            buf: unread,
            head: 0,
            left: 0,
            fragmented: false,
        }
    }

    /// Reads once from the socket into the buffer: `Ok(0)` at EOF.
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; CHUNK];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Reads what is there until the buffer holds a whole request head: its length, or
    /// `None` for not yet. Fails at EOF, or past [`MAX_HEAD`].
    pub fn read_head(&mut self) -> io::Result<Option<usize>> {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                self.head = i + 4;
                return Ok(Some(i + 4));
            }
            if self.buf.len() > MAX_HEAD {
                return Err(io::Error::other("request head too long"));
            }
            match self.fill() {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The request head, once [`read_head`](Gate::read_head) found it.
    pub fn head(&self) -> &[u8] {
        &self.buf[..self.head]
    }

    /// Whether tungstenite holds no byte of a frame or message under way: every frame
    /// given was given whole, and no fragmented message is open.
    fn at_boundary(&self) -> bool {
        self.head == 0 && self.left == 0 && !self.fragmented
    }

    /// How much to give tungstenite now: at most `want`, never past the head or frame.
    fn allowance(&mut self, want: usize) -> io::Result<usize> {
        if self.head > 0 {
            return Ok(want.min(self.head));
        }
        if self.left == 0 {
            // The next frame's whole header first, so that its end is known.
            let (len, fin, opcode) = loop {
                if let Some(h) = frame_header(&self.buf)? {
                    break h;
                }
                if self.fill()? == 0 {
                    return Ok(0);
                }
            };
            self.left = len;
            match opcode {
                1 | 2 => self.fragmented = !fin,
                0 if fin => self.fragmented = false,
                _ => {}
            }
        }
        if self.buf.is_empty() && self.fill()? == 0 {
            return Ok(0);
        }
        Ok(want.min(self.buf.len()).min(self.left as usize))
    }
}

impl Read for Gate {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let n = self.allowance(out.len())?;
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf.drain(..n);
        if self.head > 0 {
            self.head -= n;
        } else {
            self.left -= n as u64;
        }
        Ok(n)
    }
}

impl Write for Gate {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.stream.write(data)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// A frame's length (header and payload), FIN and opcode, once its header is whole in
/// `buf`.
fn frame_header(buf: &[u8]) -> io::Result<Option<(u64, bool, u8)>> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    let (ext, len) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (2, u16::from_be_bytes([b[0], b[1]]) as u64),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (8, u64::from_be_bytes(b.try_into().unwrap())),
            None => return Ok(None),
        },
        n => (0, n as u64),
    };
    // Larger than any frame this server takes: let tungstenite refuse it without
    // overflowing here.
    let len = len.min(u32::MAX as u64);
    Ok(Some((2 + ext + mask + len, b0 & 0x80 != 0, b0 & 0x0f)))
}

/// `say TEXT`: what goes to the other sessions in a room.
pub struct Said {
    /// The session that said it (its fd).
    pub from: RawFd,
    pub room: String,
    pub text: String,
}

/// What serving a session came to.
pub enum Served {
    /// It is open (and whatever could be answered was).
    Open,
    /// It has ended: closed by the client, by the close handshake, or by an error.
    Ended(String),
}

/// An open session.
#[derive(Debug)]
pub struct Session {
    ws: WebSocket<Gate>,
    pub state: State,
    /// Everything tungstenite was given to write has been written.
    flushed: bool,
    /// A close frame has been sent: the session ends with the client's answer.
    closing: bool,
    /// Returned by the next generation: it stays here until the drain ends.
    pub kept: bool,
}

/// What a session may have queued for a client that does not read (the room's messages
/// pile up): past this, the session ends.
const MAX_QUEUED: usize = 1 << 20;

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .max_write_buffer_size(MAX_QUEUED)
}

impl Session {
    /// The opening handshake, on a gate whose buffer holds the request head (see
    /// [`Gate::read_head`]): tungstenite reads the head and writes its answer. The
    /// answer is short and the socket's buffer empty, so it never waits to be written.
    pub fn accept(gate: Gate) -> Result<Session, String> {
        match tungstenite::accept_with_config(gate, Some(config())) {
            Ok(ws) => Ok(Session {
                ws,
                state: State::new(),
                flushed: true,
                closing: false,
                kept: false,
            }),
            Err(e) => Err(format!("handshake: {e}")),
        }
    }

    /// A session handed over: its socket, the bytes read and not used, its state.
    pub fn adopt(stream: TcpStream, unread: Vec<u8>, state: State) -> io::Result<Session> {
        stream.set_nonblocking(true)?;
        let ws =
            WebSocket::from_raw_socket(Gate::new(stream, unread), Role::Server, Some(config()));
        Ok(Session {
            ws,
            state,
            flushed: true,
            closing: false,
            kept: false,
        })
    }

    pub fn stream(&self) -> &TcpStream {
        &self.ws.get_ref().stream
    }

    /// Whether it can move to the next generation now: at a message boundary, with
    /// nothing left to write, and no close under way.
    pub fn idle(&self) -> bool {
        self.ws.get_ref().at_boundary() && self.flushed && !self.closing
    }

    /// Whether it waits for the socket to take what it has to write.
    pub fn wants_write(&self) -> bool {
        !self.flushed
    }

    /// The session, for the handover: the socket, the bytes read and not given to
    /// tungstenite, and the state. Only when [`idle`](Session::idle).
    pub fn into_parts(self) -> (TcpStream, Vec<u8>, Vec<u8>) {
        let state = self.state.encode();
        let gate = self.ws.into_inner();
        (gate.stream, gate.buf, state)
    }

    /// Reads and answers every message that has arrived; `said` gets what is to go to
    /// the others in the room (`say TEXT`). Writes what it can.
    pub fn serve(&mut self, said: &mut Vec<Said>) -> Served {
        loop {
            let message = match self.ws.read() {
                Ok(m) => m,
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(tungstenite::Error::ConnectionClosed) => return Served::Ended("closed".into()),
                Err(e) => return Served::Ended(e.to_string()),
            };
            let reply = match message {
                Message::Text(text) => self.answer(text.as_str(), said),
                Message::Binary(data) => format!("bytes={}", data.len()),
                // tungstenite answers pings, and the close handshake, itself.
                _ => continue,
            };
            self.state.n += 1;
            let reply = format!(
                "pid={} n={} room={} {reply}",
                std::process::id(),
                self.state.n,
                self.state.room
            );
            if let Served::Ended(e) = self.send(Message::text(reply)) {
                return Served::Ended(e);
            }
        }
        self.flush()
    }

    /// `join ROOM`, `say TEXT`, or anything else, echoed.
    fn answer(&mut self, text: &str, said: &mut Vec<Said>) -> String {
        if let Some(room) = text.strip_prefix("join ") {
            if !valid_room(room) {
                return "error=bad-room-name".into();
            }
            self.state.room = room.into();
            "joined".into()
        } else if let Some(words) = text.strip_prefix("say ") {
            said.push(Said {
                from: self.stream().as_raw_fd(),
                room: self.state.room.clone(),
                text: words.to_owned(),
            });
            "said".into()
        } else {
            format!("echo={text}")
        }
    }

    /// Queues `message` and writes what the socket takes.
    pub fn send(&mut self, message: Message) -> Served {
        match self.ws.write(message) {
            Ok(()) => self.flush(),
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.flushed = false;
                Served::Open
            }
            Err(e) => Served::Ended(e.to_string()),
        }
    }

    /// Writes what is queued, as far as the socket takes it.
    pub fn flush(&mut self) -> Served {
        match self.ws.flush() {
            Ok(()) => {
                self.flushed = true;
                Served::Open
            }
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.flushed = false;
                Served::Open
            }
            Err(tungstenite::Error::ConnectionClosed) => Served::Ended("closed".into()),
            Err(e) => Served::Ended(e.to_string()),
        }
    }

    /// Starts the close handshake: `1001 going away`. The session ends with the
    /// client's answer (or the drain's deadline).
    pub fn close(&mut self) -> Served {
        self.closing = true;
        let frame = CloseFrame {
            code: CloseCode::Away,
            reason: "server going away".into(),
        };
        match self.ws.close(Some(frame)) {
            Ok(()) => self.flush(),
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.flushed = false;
                Served::Open
            }
            Err(e) => Served::Ended(e.to_string()),
        }
    }
}
