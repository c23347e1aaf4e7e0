//! An HTTP/2 (h2c, prior knowledge) client that keeps a server busy across upgrades and
//! counts every request that failed: the client the tokio guide's HTTP/2 figures were
//! measured with, and tests/axum_server.rs runs.
//!
//! ```text
//! h2_check --addr HOST:PORT [--connections N] [--streams M] [--seconds S]
//! ```
//!
//! `N` connections (default 32), each with `M` streams (default 10) that send `GET /`
//! back to back, until stdin reaches its end (or `S` seconds have passed); then it prints
//! a summary on stdout. It behaves as a careful client that does not retry:
//!
//! - a connection that has received a `GOAWAY` takes no new request (the h2 crate
//!   refuses to open a stream on it: the request was never sent); the request goes on a
//!   new connection instead, and that is not a retry;
//! - a request that was sent (its stream opened) and did not get a whole `200` response
//!   with `pid=` in its body failed, whatever the reason (a `REFUSED_STREAM`, a stream
//!   above the `GOAWAY`'s last id, a reset, a closed connection): it is counted, never
//!   sent again.
//!
//! For each failed request it says what the wire showed: every connection's frames are
//! parsed as they pass ([`Tap`]), so the summary tells whether the stream's `HEADERS`
//! went out before or after the client's `PING` acknowledgement of the server's
//! shutdown `PING`, and what each `GOAWAY` said.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

const USAGE: &str = "usage: h2_check --addr HOST:PORT [--connections N] [--streams M] \
                     [--seconds S]";

/// How long a request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The failed requests described in the summary, at most.
const MAX_DESCRIBED: usize = 20;

struct Config {
    addr: SocketAddr,
    connections: usize,
    streams: usize,
    seconds: Option<f64>,
}

fn parse_args(mut args: impl Iterator<Item = OsString>) -> Result<Option<Config>, String> {
    let mut config = Config {
        addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
        connections: 32,
        streams: 10,
        seconds: None,
    };
    while let Some(arg) = args.next() {
        let flag = arg.to_string_lossy().into_owned();
        let value = args
            .next()
            .map(|v| v.to_string_lossy().into_owned())
            .ok_or_else(|| format!("{flag} needs a value"));
        let bad = |v: &str| format!("{flag}: bad value {v:?}");
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--addr" => {
                let v = value?;
                config.addr = v.parse().map_err(|_| bad(&v))?;
            }
            "--connections" => {
                let v = value?;
                config.connections = v.parse().ok().filter(|&n| n > 0).ok_or_else(|| bad(&v))?;
            }
            "--streams" => {
                let v = value?;
                config.streams = v.parse().ok().filter(|&n| n > 0).ok_or_else(|| bad(&v))?;
            }
            "--seconds" => {
                let v = value?;
                config.seconds = Some(
                    v.parse()
                        .ok()
                        .filter(|&s: &f64| s > 0.0)
                        .ok_or_else(|| bad(&v))?,
                );
            }
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(Some(config))
}

fn main() -> ExitCode {
    let config = match parse_args(std::env::args_os().skip(1)) {
        Ok(Some(config)) => config,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("h2_check: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let shared = Arc::new(Shared::default());
    // The end: stdin's EOF, or the time given.
    {
        let shared = Arc::clone(&shared);
        let seconds = config.seconds;
        std::thread::spawn(move || {
            match seconds {
                Some(s) => std::thread::sleep(Duration::from_secs_f64(s)),
                None => {
                    let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
                }
            }
            shared.stop.store(true, SeqCst);
        });
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("h2_check: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..config.connections {
            let slot = Arc::new(Slot::new(config.addr, Arc::clone(&shared)));
            for _ in 0..config.streams {
                tasks.push(tokio::spawn(worker(Arc::clone(&slot))));
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    print!("{}", shared.summary(&config, started.elapsed()));
    ExitCode::SUCCESS
}

/// What every task adds to.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    answered: AtomicU64,
    failed: AtomicU64,
    /// Connections opened, and why the ones before them ended.
    opened: AtomicU64,
    after_goaway: AtomicU64,
    ended_otherwise: AtomicU64,
    /// Requests that found their connection gone before they were sent (not failed).
    moved: AtomicU64,
    /// Failed requests whose `HEADERS` left after the client had acknowledged a `PING`
    /// that followed a `GOAWAY`, and above the last `GOAWAY`'s last stream id.
    late: AtomicU64,
    pids: Mutex<BTreeSet<u32>>,
    /// The failed requests, described.
    failures: Mutex<Vec<String>>,
    /// Connection errors, by message (for a connection that could not be opened).
    connect_errors: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, SeqCst);
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if f.len() < MAX_DESCRIBED {
            f.push(what);
        }
    }

    fn summary(&self, config: &Config, took: Duration) -> String {
        let pids = self.pids.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = format!(
            "h2_check: {} connections x {} streams to {}, {:.1} s\n",
            config.connections,
            config.streams,
            config.addr,
            took.as_secs_f64()
        );
        out.push_str(&format!(
            "  requests     {} answered, {} failed ({} of them opened before the client \
             had seen a GOAWAY and sent after its PING acknowledgement)\n",
            self.answered.load(SeqCst),
            self.failed.load(SeqCst),
            self.late.load(SeqCst)
        ));
        out.push_str(&format!(
            "  connections  {} opened; {} replaced after a GOAWAY, {} ended otherwise; {} \
             request(s) moved to a new connection before being sent\n",
            self.opened.load(SeqCst),
            self.after_goaway.load(SeqCst),
            self.ended_otherwise.load(SeqCst),
            self.moved.load(SeqCst)
        ));
        out.push_str(&format!("  pids         {} ({pids:?})\n", pids.len()));
        for (e, n) in self
            .connect_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            out.push_str(&format!("  connect error x{n}: {e}\n"));
        }
        for f in self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            out.push_str(&format!("  failed: {f}\n"));
        }
        out
    }
}

/// One connection's place: the connection in use, replaced when it goes away.
struct Slot {
    addr: SocketAddr,
    shared: Arc<Shared>,
    current: tokio::sync::Mutex<Option<Conn>>,
    next_generation: AtomicU64,
}

#[derive(Clone)]
struct Conn {
    /// Which connection of this slot it is.
    generation: u64,
    send: h2::client::SendRequest<Bytes>,
    wire: Arc<Wire>,
}

impl Slot {
    fn new(addr: SocketAddr, shared: Arc<Shared>) -> Slot {
        Slot {
            addr,
            shared,
            current: tokio::sync::Mutex::new(None),
            next_generation: AtomicU64::new(0),
        }
    }

    /// The connection in use, opened if there is none.
    async fn get(&self) -> Option<Conn> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref() {
            return Some(c.clone());
        }
        match self.connect().await {
            Ok(c) => {
                *current = Some(c.clone());
                Some(c)
            }
            Err(e) => {
                let mut errors = self
                    .shared
                    .connect_errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                *errors.entry(e).or_default() += 1;
                None
            }
        }
    }

    async fn connect(&self) -> Result<Conn, String> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let wire = Arc::new(Wire::default());
        let tap = Tap {
            stream,
            wire: Arc::clone(&wire),
            rx: Parser::new(0),
            tx: Parser::new(PREFACE_LEN),
        };
        let (send, conn) = h2::client::handshake(tap)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.shared.opened.fetch_add(1, SeqCst);
        Ok(Conn {
            generation: self.next_generation.fetch_add(1, SeqCst),
            send,
            wire,
        })
    }

    /// The connection `generation` takes no more requests: the next one is opened.
    async fn retire(&self, generation: u64, goaway: bool) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|c| c.generation == generation) {
            *current = None;
            let counter = match goaway {
                true => &self.shared.after_goaway,
                false => &self.shared.ended_otherwise,
            };
            counter.fetch_add(1, SeqCst);
        }
    }
}

/// One stream's worth of requests, back to back, until the end.
async fn worker(slot: Arc<Slot>) {
    let shared = Arc::clone(&slot.shared);
    while !shared.stop.load(SeqCst) {
        let Some(conn) = slot.get().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        // Not sent until send_request has opened the stream: an error before that moves
        // the request to a new connection.
        let mut send = match conn.send.clone().ready().await {
            Ok(send) => send,
            Err(e) => {
                shared.moved.fetch_add(1, SeqCst);
                slot.retire(conn.generation, e.is_go_away()).await;
                continue;
            }
        };
        let request = hyper::Request::get(format!("http://{}/", slot.addr))
            .body(())
            .expect("a valid request");
        let response = match send.send_request(request, true) {
            Ok((response, _)) => response,
            Err(e) => {
                shared.moved.fetch_add(1, SeqCst);
                slot.retire(conn.generation, e.is_go_away()).await;
                continue;
            }
        };
        let id = u32::from(response.stream_id());
        let result = tokio::time::timeout(REQUEST_TIMEOUT, async move {
            let response = response.await?;
            let status = response.status();
            let mut body = response.into_body();
            let mut bytes = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk?;
                let _ = body.flow_control().release_capacity(chunk.len());
                bytes.extend_from_slice(&chunk);
            }
            Ok::<_, h2::Error>((status, bytes))
        })
        .await;
        match result {
            Ok(Ok((status, body))) => {
                let body = String::from_utf8_lossy(&body);
                match parse_pid(&body).filter(|_| status == 200) {
                    Some(pid) => {
                        shared.answered.fetch_add(1, SeqCst);
                        shared
                            .pids
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(pid);
                    }
                    None => shared.fail(format!("stream {id}: status {status}, body {body:?}")),
                }
            }
            Ok(Err(e)) => {
                if conn.wire.late(id) {
                    shared.late.fetch_add(1, SeqCst);
                }
                shared.fail(format!("stream {id}: {e} ({})", conn.wire.describe(id)));
                // The connection may be over; if so, the next request finds out.
            }
            Err(_) => shared.fail(format!(
                "stream {id}: no response within {REQUEST_TIMEOUT:?} ({})",
                conn.wire.describe(id)
            )),
        }
    }
}

/// The `pid=<digits>` in a body.
fn parse_pid(body: &str) -> Option<u32> {
    let rest = &body[body.find("pid=")? + 4..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

// ---------------------------------------------------------------------------------------
// The wire: what each connection's frames said, in the order they passed.
// ---------------------------------------------------------------------------------------

/// The client preface that precedes the client's first frame.
const PREFACE_LEN: usize = 24;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

#[derive(Debug, Clone, Copy)]
enum Event {
    /// Sent: the `HEADERS` that opened this stream.
    Headers(u32),
    /// Sent: a `PING` acknowledgement.
    PingAck,
    /// Received: a `PING` (not an acknowledgement).
    Ping,
    /// Received: a `GOAWAY` with its last stream id and error code.
    GoAway(u32, u32),
    /// Received: `RST_STREAM` for a stream, with its error code.
    Reset(u32, u32),
}

/// One connection's frames, in order.
#[derive(Default)]
struct Wire {
    events: Mutex<Vec<Event>>,
}

impl Wire {
    fn push(&self, e: Event) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e);
    }

    /// Whether stream `id`'s `HEADERS` went out after a `PING` acknowledgement that
    /// followed a `GOAWAY`, and the last `GOAWAY` received named a lower last stream id.
    fn late(&self, id: u32) -> bool {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let (mut goaway, mut acked, mut late, mut last) = (false, false, false, u32::MAX);
        for e in events.iter() {
            match *e {
                Event::GoAway(l, _) => {
                    goaway = true;
                    last = l;
                }
                Event::PingAck if goaway => acked = true,
                Event::Headers(h) if h == id => late = acked,
                _ => {}
            }
        }
        late && last < id
    }

    /// What the wire says about stream `id`: where its `HEADERS` went relative to the
    /// `GOAWAY`s and the `PING` acknowledgements, and any reset.
    fn describe(&self, id: u32) -> String {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen_goaway = 0;
        let mut acks_after_goaway = 0;
        let mut out = Vec::new();
        for e in events.iter() {
            match *e {
                Event::GoAway(last, code) => {
                    seen_goaway += 1;
                    out.push(format!("GOAWAY#{seen_goaway}(last {last}, code {code})"));
                }
                Event::Ping if seen_goaway > 0 => out.push("PING".into()),
                Event::PingAck if seen_goaway > 0 => {
                    acks_after_goaway += 1;
                    out.push("PING-ACK sent".into());
                }
                Event::Headers(h) if h == id => out.push(format!(
                    "HEADERS {id} sent after {seen_goaway} GOAWAY(s) and {acks_after_goaway} \
                     PING-ACK(s) that followed one"
                )),
                Event::Reset(r, code) if r == id => {
                    out.push(format!("RST_STREAM {id} code {code}"))
                }
                _ => {}
            }
        }
        if !out.iter().any(|s| s.starts_with("HEADERS")) {
            out.push(format!("HEADERS {id} never seen"));
        }
        out.join(", ")
    }
}

/// Splits one direction's bytes into frames, reporting the ones [`Event`] names.
struct Parser {
    /// Bytes still to skip (the client preface).
    skip: usize,
    /// The frame header being read, and how much of it is there.
    head: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    left: usize,
    /// The first bytes of the current frame's payload, when it is one we read.
    payload: Vec<u8>,
    want: usize,
}

impl Parser {
    fn new(skip: usize) -> Parser {
        Parser {
            skip,
            head: [0; 9],
            have: 0,
            left: 0,
            payload: Vec::new(),
            want: 0,
        }
    }

    fn feed(&mut self, mut bytes: &[u8], sent: bool, wire: &Wire) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            if self.left == 0 && self.have < 9 {
                let n = (9 - self.have).min(bytes.len());
                self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have < 9 {
                    return;
                }
                let len = u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]);
                self.left = len as usize;
                self.payload.clear();
                self.want = match self.head[3] {
                    GOAWAY => 8,
                    RST_STREAM => 4,
                    _ => 0,
                };
                if self.left == 0 {
                    self.frame_done(sent, wire);
                }
                continue;
            }
            let n = self.left.min(bytes.len());
            let take = self.want.saturating_sub(self.payload.len()).min(n);
            self.payload.extend_from_slice(&bytes[..take]);
            self.left -= n;
            bytes = &bytes[n..];
            if self.left == 0 {
                self.frame_done(sent, wire);
            }
        }
    }

    fn frame_done(&mut self, sent: bool, wire: &Wire) {
        let kind = self.head[3];
        let flags = self.head[4];
        let stream = u32::from_be_bytes([self.head[5], self.head[6], self.head[7], self.head[8]])
            & 0x7fff_ffff;
        let word = |p: &[u8], at: usize| {
            p.get(at..at + 4)
                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        let event = match (sent, kind) {
            (true, HEADERS) => Some(Event::Headers(stream)),
            (true, PING) if flags & ACK != 0 => Some(Event::PingAck),
            (false, PING) if flags & ACK == 0 => Some(Event::Ping),
            (false, GOAWAY) => Some(Event::GoAway(
                word(&self.payload, 0) & 0x7fff_ffff,
                word(&self.payload, 4),
            )),
            (false, RST_STREAM) => Some(Event::Reset(stream, word(&self.payload, 0))),
            _ => None,
        };
        if let Some(e) = event {
            wire.push(e);
        }
        self.have = 0;
    }
}

/// A connection whose frames are parsed as they pass, both ways.
struct Tap {
    stream: TcpStream,
    wire: Arc<Wire>,
    rx: Parser,
    tx: Parser,
}

impl AsyncRead for Tap {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        this.rx.feed(&buf.filled()[before..], false, &this.wire);
        polled
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.tx.feed(&buf[..n], true, &this.wire);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
