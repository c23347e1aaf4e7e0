//! The clients: threads that connect (or send HTTP requests) without pause, and count
//! every connection or request that was answered (by which pid, when) or failed (and
//! why).

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::http;
use crate::procs::{fd_count, lock, now_us, wait_for};
use crate::server::Server;
use crate::{Res, CONNECT_TIMEOUT, MAX_CONNECTIONS, MAX_REPLY, READ_TIMEOUT, STEP_TIMEOUT};

/// What the server speaks: the reply the clients expect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// One line with the pid per connection, then EOF (the `tcp_server` contract).
    Line,
    /// HTTP/1.1: `GET /` is answered with a body holding the pid (`--http`).
    Http,
}

/// What one client thread does, again and again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientKind {
    /// A new connection, one line read until EOF.
    Line,
    /// A new connection per request, sent with `Connection: close`.
    HttpClose,
    /// Requests back to back on one connection, a new one only when the server ends it
    /// with `Connection: close`.
    HttpKeepAlive,
}

/// One new connection in `proto`, with nothing else going on: the pid that answered.
pub fn probe(addr: SocketAddr, proto: Proto) -> Result<u32, (Failure, String)> {
    match proto {
        Proto::Line => line_probe(addr),
        Proto::Http => http::probe(addr),
    }
}

/// Why a connection or request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    Refused,
    Reset,
    Timeout,
    /// Closed before any byte of the reply.
    Empty,
    /// Closed within an HTTP response.
    CutOff,
    Wrong,
    Other,
}

pub const FAILURES: [Failure; 7] = [
    Failure::Refused,
    Failure::Reset,
    Failure::Timeout,
    Failure::Empty,
    Failure::CutOff,
    Failure::Wrong,
    Failure::Other,
];

impl Failure {
    pub fn name(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Reset => "reset",
            Failure::Timeout => "timeout",
            Failure::Empty => "empty reply",
            Failure::CutOff => "cut off",
            Failure::Wrong => "wrong reply",
            Failure::Other => "other",
        }
    }

    pub fn of(e: &io::Error) -> Failure {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Failure::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Failure::Reset,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Failure::Timeout,
            _ => Failure::Other,
        }
    }
}

/// One new connection, one line: the pid that answered, or why not.
fn line_probe(addr: SocketAddr) -> Result<u32, (Failure, String)> {
    let fail = |what: &str, e: io::Error| (Failure::of(&e), format!("{what}: {e}"));
    let conn =
        TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| fail("connect", e))?;
    conn.set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| fail("set_read_timeout", e))?;
    let mut reply = Vec::new();
    (&conn)
        .take(MAX_REPLY)
        .read_to_end(&mut reply)
        .map_err(|e| fail("read", e))?;
    if reply.is_empty() {
        return Err((Failure::Empty, "closed without a reply".into()));
    }
    let wrong = || {
        (
            Failure::Wrong,
            format!("{:?}", String::from_utf8_lossy(&reply)),
        )
    };
    let text = std::str::from_utf8(&reply).map_err(|_| wrong())?;
    let line = text.strip_suffix('\n').filter(|l| !l.contains('\n'));
    line.and_then(parse_pid).ok_or_else(wrong)
}

/// The `pid=<digits>` in a reply.
pub fn parse_pid(reply: &str) -> Option<u32> {
    let rest = &reply[reply.find("pid=")? + 4..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok().filter(|&pid| pid > 0)
}

/// When a pid answered, in µs since the start of this program.
#[derive(Clone, Copy)]
pub struct Seen {
    pub first: u64,
    pub last: u64,
}

/// What the client threads share with the control thread.
pub struct Shared {
    pub addr: SocketAddr,
    pub stop: AtomicBool,
    pub paused: AtomicBool,
    /// Clients between deciding to connect and being done with the connection (a
    /// keep-alive client until it closes its connection).
    pub busy: AtomicUsize,
    pub started: AtomicU64,
    pub answered: AtomicU64,
    pub failed: AtomicU64,
    pub by_kind: [AtomicU64; FAILURES.len()],
    /// Requests answered on a connection that had served one before.
    pub reused: AtomicU64,
    /// Answers that ended their connection with `Connection: close`, on keep-alive
    /// connections.
    pub closes: AtomicU64,
    pub seen: Mutex<BTreeMap<u32, Seen>>,
    /// The first failures, in words.
    pub examples: Mutex<Vec<String>>,
    /// What the control thread is doing, for the failure messages.
    pub stage: Mutex<String>,
}

/// `K` client threads that connect without pause until [`Load::finish`].
pub struct Load {
    pub shared: Arc<Shared>,
    proto: Proto,
    threads: Vec<JoinHandle<()>>,
}

/// What the clients saw, in the end.
pub struct LoadStats {
    pub proto: Proto,
    pub answered: u64,
    pub by_kind: [u64; FAILURES.len()],
    pub reused: u64,
    pub closes: u64,
    pub examples: Vec<String>,
    /// Answers from pids that were not a generation of the server.
    pub unknown_pids: Vec<u32>,
    pub capped: bool,
}

impl LoadStats {
    pub fn failed(&self) -> u64 {
        self.by_kind.iter().sum()
    }
}

impl Load {
    /// One thread per entry of `clients`.
    pub fn start(addr: SocketAddr, clients: &[ClientKind]) -> Load {
        let shared = Arc::new(Shared {
            addr,
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            by_kind: Default::default(),
            reused: AtomicU64::new(0),
            closes: AtomicU64::new(0),
            seen: Mutex::new(BTreeMap::new()),
            examples: Mutex::new(Vec::new()),
            stage: Mutex::new("start".into()),
        });
        let threads = clients
            .iter()
            .map(|&kind| {
                let shared = Arc::clone(&shared);
                thread::spawn(move || match kind {
                    ClientKind::Line => client(&shared, line_probe),
                    ClientKind::HttpClose => client(&shared, http::probe),
                    ClientKind::HttpKeepAlive => keep_alive_client(&shared),
                })
            })
            .collect();
        let proto = if clients.contains(&ClientKind::Line) {
            Proto::Line
        } else {
            Proto::Http
        };
        Load {
            shared,
            proto,
            threads,
        }
    }

    pub fn set_stage(&self, stage: String) {
        *lock(&self.shared.stage) = stage;
    }

    pub fn seen(&self, pid: u32) -> Option<Seen> {
        lock(&self.shared.seen).get(&pid).copied()
    }

    /// Waits until `n` more connections have been answered.
    pub fn wait_answers(&self, server: &Server, n: u64) -> Res<()> {
        let target = self.shared.answered.load(SeqCst) + n;
        wait_for(
            &format!("{n} answers from pid {}", server.current),
            STEP_TIMEOUT,
            Duration::from_millis(1),
            || Ok((self.shared.answered.load(SeqCst) >= target).then_some(())),
        )
    }

    /// Waits until a client is answered by `pid` after `since` (µs); returns when the
    /// first such answer arrived.
    pub fn wait_answered_by(&self, pid: u32, since: u64) -> Res<u64> {
        wait_for(
            &format!("a client to be answered by pid {pid}"),
            STEP_TIMEOUT,
            Duration::from_millis(1),
            || {
                Ok(self
                    .seen(pid)
                    .filter(|s| s.last >= since)
                    .map(|s| s.first.max(since)))
            },
        )
    }

    /// Stops the clients from starting connections and waits until none is open.
    pub fn pause(&self) -> Res<()> {
        self.shared.paused.store(true, SeqCst);
        wait_for(
            "the clients to finish their connections",
            CONNECT_TIMEOUT + READ_TIMEOUT + STEP_TIMEOUT,
            Duration::from_millis(1),
            || Ok((self.shared.busy.load(SeqCst) == 0).then_some(())),
        )
    }

    pub fn resume(&self) {
        self.shared.paused.store(false, SeqCst);
    }

    /// Stops the clients; `generations` are the pids allowed to answer.
    pub fn finish(mut self, generations: &[u32]) -> LoadStats {
        self.shared.stop.store(true, SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let s = &self.shared;
        LoadStats {
            proto: self.proto,
            answered: s.answered.load(SeqCst),
            by_kind: std::array::from_fn(|i| s.by_kind[i].load(SeqCst)),
            reused: s.reused.load(SeqCst),
            closes: s.closes.load(SeqCst),
            examples: lock(&s.examples).clone(),
            unknown_pids: lock(&s.seen)
                .keys()
                .filter(|pid| !generations.contains(pid))
                .copied()
                .collect(),
            capped: s.started.load(SeqCst) >= MAX_CONNECTIONS,
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
    }
}

/// A client thread: one connection after the other, each answered or counted as failed.
fn client(shared: &Shared, probe: fn(SocketAddr) -> Result<u32, (Failure, String)>) {
    while !shared.stop.load(SeqCst) {
        // Announce the connection first, then look at `paused`: `pause()` sets it first,
        // then waits for `busy` to drop to zero, so one of the two always sees the other.
        shared.busy.fetch_add(1, SeqCst);
        if shared.paused.load(SeqCst) {
            shared.busy.fetch_sub(1, SeqCst);
            thread::sleep(Duration::from_millis(1));
            continue;
        }
        if shared.started.fetch_add(1, SeqCst) >= MAX_CONNECTIONS {
            shared.busy.fetch_sub(1, SeqCst);
            return;
        }
        shared.record(probe(shared.addr));
        shared.busy.fetch_sub(1, SeqCst);
    }
}

/// A keep-alive client thread: requests back to back on one connection, until the
/// server ends it with `Connection: close` (or a request fails, or the clients pause);
/// then a new connection.
fn keep_alive_client(shared: &Shared) {
    let mut conn: Option<http::Conn> = None;
    // Whether this thread counts in `busy`: from announcing a connection until it is
    // closed.
    let mut announced = false;
    let close = |conn: &mut Option<http::Conn>, announced: &mut bool| {
        *conn = None;
        shared.busy.fetch_sub(1, SeqCst);
        *announced = false;
    };
    while !shared.stop.load(SeqCst) {
        // As in `client`: announce, then look at `paused`.
        if !announced {
            shared.busy.fetch_add(1, SeqCst);
            announced = true;
        }
        if shared.paused.load(SeqCst) {
            // Nothing may stay open while paused, not even an idle connection.
            close(&mut conn, &mut announced);
            thread::sleep(Duration::from_millis(1));
            continue;
        }
        if shared.started.fetch_add(1, SeqCst) >= MAX_CONNECTIONS {
            break;
        }
        if conn.is_none() {
            match http::Conn::connect(shared.addr) {
                Ok(c) => conn = Some(c),
                Err(failed) => {
                    shared.record(Err(failed));
                    close(&mut conn, &mut announced);
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let reused = c.served > 0;
        let result = c.get(false);
        let keep = matches!(result, Ok(ref a) if !a.close);
        if let Ok(answer) = &result {
            if reused {
                shared.reused.fetch_add(1, SeqCst);
            }
            if answer.close {
                shared.closes.fetch_add(1, SeqCst);
            }
        }
        shared.record(result.map(|a| a.pid));
        if !keep {
            close(&mut conn, &mut announced);
        }
    }
    if announced {
        close(&mut conn, &mut announced);
    }
}

impl Shared {
    /// Counts one connection or request, answered or failed.
    fn record(&self, result: Result<u32, (Failure, String)>) {
        let at = now_us();
        match result {
            Ok(pid) => {
                let mut seen = lock(&self.seen);
                let s = seen.entry(pid).or_insert(Seen {
                    first: at,
                    last: at,
                });
                s.first = s.first.min(at);
                s.last = s.last.max(at);
                drop(seen);
                self.answered.fetch_add(1, SeqCst);
            }
            Err((kind, msg)) => {
                self.by_kind[kind as usize].fetch_add(1, SeqCst);
                self.failed.fetch_add(1, SeqCst);
                let mut examples = lock(&self.examples);
                if examples.len() < 10 {
                    let stage = lock(&self.stage).clone();
                    examples.push(format!(
                        "at {:.3} s, {stage}: {}: {msg}",
                        at as f64 / 1e6,
                        kind.name()
                    ));
                }
            }
        }
    }
}

/// The fd count of `pid` once it is idle: the clients paused (if any), and the count
/// unchanged for 25 ms.
pub fn idle_fd_count(pid: u32, load: Option<&Load>) -> Res<usize> {
    if let Some(load) = load {
        load.pause()?;
    }
    let mut last = None;
    let mut stable = 0;
    let count = wait_for(
        &format!("the fd count of pid {pid} to settle"),
        STEP_TIMEOUT,
        Duration::from_millis(5),
        || {
            let n = fd_count(pid).ok_or_else(|| format!("cannot read /proc/{pid}/fd"))?;
            stable = if last == Some(n) { stable + 1 } else { 0 };
            last = Some(n);
            Ok((stable >= 5).then_some(n))
        },
    );
    if let Some(load) = load {
        load.resume();
    }
    count
}
