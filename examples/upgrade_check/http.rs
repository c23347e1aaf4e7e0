//! The HTTP/1.1 side of the clients (`--http`): one `GET /` at a time on a connection,
//! answered with a `Content-Length` body that holds `pid=<pid>`.
//!
//! Every request that does not get a whole 2xx response counts as failed: refused,
//! reset (also a write to a connection the server has closed), closed before or within
//! the response, timed out, or answered with another status or without a pid. Nothing is
//! retried: RFC 9112 §9.3.1 lets a client retry a request on a closed idle connection,
//! but wrk and many others do not, so a server must not make them need to.
//!
//! The idle pool (`--idle N`, [`IdlePool`]) holds keep-alive connections that stay idle
//! across the upgrades, and sends one request on each per upgrade: after it, or
//! (`--probe`) at instants spread around it.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::load::{parse_pid, Failure};
use crate::server::Upgrade;
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
        self.send(close)?;
        self.receive()
    }

    /// Sends `GET /` (with `Connection: close` if `close`).
    pub fn send(&mut self, close: bool) -> Result<(), Failed> {
        let n = self.served + 1;
        let request: &[u8] = if close {
            b"GET / HTTP/1.1\r\nHost: upgrade-check\r\nConnection: close\r\n\r\n"
        } else {
            b"GET / HTTP/1.1\r\nHost: upgrade-check\r\n\r\n"
        };
        self.stream
            .write_all(request)
            .map_err(|e| (Failure::of(&e), format!("request {n}: write: {e}")))
    }

    /// Reads the response to the request sent last.
    pub fn receive(&mut self) -> Result<Answer, Failed> {
        let n = self.served + 1;
        let answer = self
            .read_response()
            .map_err(|(kind, msg)| (kind, format!("request {n}: {msg}")))?;
        self.served += 1;
        Ok(answer)
    }

    /// Whether the server has closed (or reset) this idle connection, or sent something
    /// unasked: looked at without waiting.
    pub fn closed_by_server(&self) -> bool {
        let mut fds = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, exclusively borrowed for the call; the fd is open.
        let n = unsafe { libc::poll(&mut fds, 1, 0) };
        n > 0 && fds.revents != 0
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

/// `--idle N`: keep-alive connections that stay idle between upgrades, each sending one
/// request per upgrade. Without `--probe` the request goes once the old generation has
/// exited: the connection must still be open (a server that closes idle connections at
/// an upgrade fails), and the answer must come from the new generation. With `--probe`
/// the requests go at instants spread around the upgrade, learnt from the previous one:
/// a third within ±10 ms of the moment the new generation was ready (when a server that
/// hands connections over lets go of them), a third within ±10 ms of the moment the old
/// generation let go of its idle connections (the first one it closed, as the pool saw
/// it, or else its exit), a third over the whole upgrade. Every one must be answered,
/// by either generation.
///
/// A connection found closed by the server before its request is counted, and its
/// request goes anyway (as wrk's would: it fails); a request that fails is counted, never
/// retried. After each upgrade, a new connection (answered once) takes the place of
/// each one the server ended.
pub struct IdlePool {
    addr: SocketAddr,
    conns: Vec<Option<Conn>>,
    probe: bool,
    /// From the previous upgrade, after its `SIGHUP`: the new generation ready, and the
    /// moment the old one let go of its idle connections (the first it closed, or its
    /// exit).
    last: Option<(Duration, Duration)>,
    pub stats: PoolStats,
}

/// What the idle pool saw.
#[derive(Default)]
pub struct PoolStats {
    pub requests: u64,
    pub by_new: u64,
    pub by_old: u64,
    pub failed: u64,
    /// Of the failed requests: those sent on a connection the server had closed (or
    /// reset) already; the others met the close on their way.
    pub failed_closed: u64,
    /// Idle connections the server had closed (or reset) before their next request.
    pub closed_idle: u64,
    /// Answers that said `Connection: close`.
    pub told_to_close: u64,
    /// Answered by a pid that was neither the old nor the new generation.
    pub other_pid: u64,
    pub examples: Vec<String>,
}

/// The requests of one upgrade, being sent on a thread of their own (`--probe`).
pub struct Shot(JoinHandle<Volley>);

/// Every connection with its request, and when (after the start) the server first
/// closed one of those still idle, if it did.
type Volley = (Vec<(Option<Conn>, Sent)>, Option<Duration>);

/// What became of one connection's request before its answer was read, and whether
/// the server had closed the connection before the request left.
struct Sent {
    result: Result<(), Failed>,
    closed: bool,
}

impl IdlePool {
    /// Opens `n` keep-alive connections, each answered once.
    pub fn open(addr: SocketAddr, n: usize, probe: bool) -> Result<IdlePool, String> {
        let mut conns = Vec::with_capacity(n);
        for i in 0..n {
            let mut conn =
                Conn::connect(addr).map_err(|(_, e)| format!("idle pool, connection {i}: {e}"))?;
            let answer = conn
                .get(false)
                .map_err(|(_, e)| format!("idle pool, connection {i}: {e}"))?;
            if answer.close {
                return Err(format!("idle pool, connection {i}: not kept alive"));
            }
            conns.push(Some(conn));
        }
        Ok(IdlePool {
            addr,
            conns,
            probe,
            last: None,
            stats: PoolStats::default(),
        })
    }

    /// Just before the `SIGHUP`: with `--probe`, starts sending the requests at their
    /// instants.
    pub fn arm(&mut self) -> Option<Shot> {
        if !self.probe {
            return None;
        }
        // The first upgrade has no previous one to aim at: a guess.
        let (ready, gone) = self
            .last
            .unwrap_or((Duration::from_millis(5), Duration::from_millis(20)));
        let n = self.conns.len();
        let ms = Duration::from_millis;
        let span = gone + ms(20);
        let mut plan: Vec<(Duration, Option<Conn>)> = self
            .conns
            .drain(..)
            .enumerate()
            .map(|(i, conn)| {
                // Evenly spread within each third, in a different order each time.
                let (third, k) = (i % 3, (i / 3) as u32);
                let per = (n as u32).div_ceil(3).max(1);
                let within = |width: Duration| width * k / per;
                let at = match third {
                    0 => ready.saturating_sub(ms(10)) + within(ms(20)),
                    1 => gone.saturating_sub(ms(10)) + within(ms(20)),
                    _ => within(span),
                };
                (at, conn)
            })
            .collect();
        plan.sort_by_key(|(at, _)| *at);
        let addr = self.addr;
        let started = Instant::now();
        let thread = thread::spawn(move || {
            let mut sent = Vec::with_capacity(plan.len());
            let mut first_close = None;
            let mut plan: Vec<(Duration, Option<Conn>, bool)> =
                plan.into_iter().map(|(at, c)| (at, c, false)).collect();
            for i in 0..plan.len() {
                let due = started + plan[i].0;
                // Meanwhile, the connections still idle tell when the server lets go of
                // them, if it closes them.
                while let Some(wait) = due.checked_duration_since(Instant::now()) {
                    if watch_closes(&mut plan[i..], wait) && first_close.is_none() {
                        first_close = Some(started.elapsed());
                    }
                }
                sent.push(send(addr, plan[i].1.take()));
            }
            (sent, first_close)
        });
        Some(Shot(thread))
    }

    /// After the upgrade (the old generation has exited): reads the answers of the
    /// requests sent around it (`shot`), or sends one request on each connection now.
    pub fn after(&mut self, shot: Option<Shot>, upgrade: &Upgrade) {
        let (sent, first_close) = match shot {
            Some(Shot(thread)) => thread.join().unwrap_or_default(),
            None => {
                let addr = self.addr;
                (self.conns.drain(..).map(|c| send(addr, c)).collect(), None)
            }
        };
        self.last = Some((upgrade.ready, first_close.unwrap_or(upgrade.old_exit)));
        let (closed_before, told_before) = (self.stats.closed_idle, self.stats.told_to_close);
        for (conn, sent) in sent {
            self.stats.requests += 1;
            if sent.closed {
                self.stats.closed_idle += 1;
            }
            let result = match (sent.result, conn) {
                (Err(failed), _) => Err(failed),
                (Ok(()), Some(mut c)) => c.receive().map(|a| (c, a)),
                (Ok(()), None) => Err((Failure::Other, "no connection".into())),
            };
            if sent.closed && result.is_err() {
                self.stats.failed_closed += 1;
            }
            let keep = match result {
                Err((kind, msg)) => {
                    self.stats.failed += 1;
                    if self.stats.failed <= 3 {
                        self.stats.example(format!("{}: {msg}", kind.name()));
                    }
                    None
                }
                Ok((c, answer)) => {
                    if answer.pid == upgrade.new {
                        self.stats.by_new += 1;
                    } else if answer.pid == upgrade.old && self.probe {
                        self.stats.by_old += 1;
                    } else {
                        self.stats.other_pid += 1;
                        self.stats.example(format!(
                            "answered by pid {} after the upgrade {} -> {}",
                            answer.pid, upgrade.old, upgrade.new
                        ));
                    }
                    if answer.close {
                        self.stats.told_to_close += 1;
                        None
                    } else {
                        Some(c)
                    }
                }
            };
            self.conns.push(keep);
        }
        // A connection the server ended is replaced at once, so that every upgrade has
        // the whole pool idle across it; its first request is not counted.
        let addr = self.addr;
        for slot in self.conns.iter_mut().filter(|c| c.is_none()) {
            *slot = Conn::connect(addr)
                .ok()
                .and_then(|mut c| c.get(false).ok().filter(|a| !a.close).map(|_| c));
        }
        let closed = self.stats.closed_idle - closed_before;
        let told = self.stats.told_to_close - told_before;
        if closed + told > 0 {
            self.stats.example(format!(
                "upgrade {} -> {}: {closed} idle connection(s) closed by the server, {told} \
                 told to close",
                upgrade.old, upgrade.new
            ));
        }
    }

    /// Whether anything went wrong: a failed request, an idle connection closed (or
    /// told to close) by the server, an answer from the wrong generation.
    pub fn problems(&self) -> Vec<String> {
        let s = &self.stats;
        let mut out = Vec::new();
        if s.failed > 0 {
            out.push(format!("idle pool: {} request(s) failed", s.failed));
        }
        if s.closed_idle + s.told_to_close > 0 {
            out.push(format!(
                "idle pool: the server ended {} idle keep-alive connection(s) ({} closed, {} \
                 told to close)",
                s.closed_idle + s.told_to_close,
                s.closed_idle,
                s.told_to_close
            ));
        }
        if s.other_pid > 0 {
            out.push(format!(
                "idle pool: {} answer(s) from the wrong generation",
                s.other_pid
            ));
        }
        out
    }

    /// The summary lines.
    pub fn summary(&self, upgrades: usize) -> String {
        let s = &self.stats;
        let mut out = format!(
            "  idle keep-alive pool: {} connections, one request each per upgrade ({}), {} \
             upgrades\n      {} requests: {} answered by the new generation, {} by the old, \
             {} failed ({} of them on a connection already closed by the server); {} idle \
             connection(s) closed by the server, {} told to close\n",
            self.conns.len(),
            if self.probe {
                "sent around the upgrade, a third within ±10 ms of the new generation being \
                 ready, a third within ±10 ms of the old one letting go"
            } else {
                "sent once the old generation has exited"
            },
            upgrades,
            s.requests,
            s.by_new,
            s.by_old,
            s.failed,
            s.failed_closed,
            s.closed_idle,
            s.told_to_close
        );
        for e in &s.examples {
            out.push_str(&format!("      {e}\n"));
        }
        out
    }
}

impl PoolStats {
    fn example(&mut self, e: String) {
        if self.examples.len() < 10 {
            self.examples.push(e);
        }
    }
}

/// Waits up to `wait` for the server to close one of the idle connections of `plan`
/// (their flag is set once seen); returns whether it did.
fn watch_closes(plan: &mut [(Duration, Option<Conn>, bool)], wait: Duration) -> bool {
    let mut watched: Vec<usize> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    for (i, (_, conn, seen)) in plan.iter().enumerate() {
        if let Some(conn) = conn.as_ref().filter(|_| !*seen) {
            watched.push(i);
            fds.push(libc::pollfd {
                fd: conn.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
    }
    // Below a millisecond, poll(2) cannot wait: sleep instead.
    if fds.is_empty() || wait < Duration::from_millis(1) {
        thread::sleep(wait);
        return false;
    }
    let ms = wait.as_millis().min(1000) as libc::c_int;
    // SAFETY: a valid, exclusively borrowed array of pollfd; the fds stay open.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return false;
    }
    for (p, &i) in fds.iter().zip(&watched) {
        if p.revents != 0 {
            plan[i].2 = true;
        }
    }
    true
}

/// Sends one request on `conn` (a new connection if it is `None`), whether or not the
/// server has closed it: as wrk and most clients do, which do not look before they send.
fn send(addr: SocketAddr, conn: Option<Conn>) -> (Option<Conn>, Sent) {
    let mut conn = match conn {
        Some(c) => c,
        None => match Conn::connect(addr) {
            Ok(c) => c,
            Err(failed) => {
                let result = Err(failed);
                return (
                    None,
                    Sent {
                        result,
                        closed: false,
                    },
                );
            }
        },
    };
    let closed = conn.closed_by_server();
    let result = conn.send(false);
    (Some(conn), Sent { result, closed })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
