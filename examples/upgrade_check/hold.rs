//! The long-lived mode (`--hold N`): `N` connections held open across the upgrades, each
//! sending something every `--interval`, and every way a connection can suffer counted:
//! resets, EOFs, answers that never came, reconnects, answers from the wrong generation
//! and (WebSocket) state that did not follow the session.
//!
//! - **TCP** (`tcp_server`): each connection reads its hello line (and the server's
//!   half-close after it), then writes a byte every interval and never closes. The
//!   server must keep reading it, across every upgrade: a reset, an error on a write or
//!   a hello that never comes is a failure.
//! - **WebSocket** (`--ws`, `ws_server`): each session joins a room of its own
//!   (`join rI`), then sends `mK` every interval and expects `pid=P n=N room=rI
//!   echo=mK`, where `N` is one more than in the last answer: the session's count, which
//!   must travel with it from generation to generation, as its room must. An EOF, a
//!   close frame or a reset is a failure.
//!
//! A session's answers must come from one generation after the other: an answer from a
//! generation older than one that already answered it ("went back") means two
//! generations served it. After the last upgrade every session must have been answered
//! by the last generation. Each failed connection is reconnected, and counted again as a
//! reconnect.
//!
//! Upgrades are paced, not serialised: the next `SIGHUP` goes `--pace` after the pid file
//! named the last new generation, whether or not the old one has exited. A deploy the
//! server refuses (it logs `upgrade failed`, say because the old generation has not
//! exited yet) is counted and sent again after another pace. The time from the pid file
//! naming the new generation until every thread of the old one has exited is measured;
//! each old generation must end with status 0.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::deploy::Deploy;
use crate::load::{parse_pid, Failure, Proto};
use crate::procs::{exited, lock, micros, now_us, signal, status_text, wait_for, wait_reaped};
use crate::report::{distribution, ms, Progress, Report};
use crate::server::Server;
use crate::ws;
use crate::{Config, Res, CONNECT_TIMEOUT, DRAIN_TIMEOUT, READ_TIMEOUT, STEP_TIMEOUT};

/// The most connections held.
pub const MAX_HOLD: usize = 10_000;

/// What `--hold` was told.
#[derive(Clone, Copy, Debug)]
pub struct Hold {
    pub connections: usize,
    pub ws: bool,
    /// Between two messages on one connection.
    pub interval: Duration,
    /// From the pid file naming a new generation until the next `SIGHUP`.
    pub pace: Duration,
}

/// What the connections saw.
#[derive(Default, Debug)]
pub struct HoldStats {
    pub answered: u64,
    pub resets: u64,
    pub eofs: u64,
    pub timeouts: u64,
    /// Connections refused, and failures of no other kind.
    pub other: u64,
    pub reconnects: u64,
    /// Answers from a generation older than one that had already answered the session.
    pub went_back: u64,
    /// Answers whose count, room or echo did not follow the session's.
    pub state_breaks: u64,
    /// Answers from a generation to a message sent after the pid file had named its
    /// successor (it still served the session after the commit).
    pub late: u64,
    pub by_pid: BTreeMap<u32, u64>,
    /// Each connection's last answer's pid, at the end (`None`: none since it
    /// connected).
    pub last: Vec<Option<u32>>,
    pub examples: Vec<String>,
}

impl HoldStats {
    fn failures(&self) -> u64 {
        self.resets + self.eofs + self.timeouts + self.other
    }
}

/// What the connections' thread shares with the upgrades.
struct Shared {
    stop: AtomicBool,
    /// For each superseded generation, when (µs) the pid file named its successor.
    superseded: Mutex<HashMap<u32, u64>>,
    stats: Mutex<HoldStats>,
}

/// One upgrade, timed from the pid file naming the new generation.
struct Step {
    old: u32,
    named: u64,
    gone: Option<Duration>,
}

/// The phase: a server, `N` connections, the upgrades; the summary goes into `report`.
pub fn run(
    config: &Config,
    hold: Hold,
    deploy: &Deploy,
    report: &mut Report,
    progress: &mut Progress,
) -> Res<()> {
    let kind = if hold.ws {
        "WebSocket sessions"
    } else {
        "TCP connections"
    };
    progress.say(&format!(
        "held connections: {} {kind}, {} upgrades, a message every {}",
        hold.connections,
        config.upgrades,
        ms(hold.interval)
    ));
    // ws_server answers a plain `GET /` over HTTP with its pid: that is how the harness
    // sees it ready.
    let proto = if hold.ws { Proto::Http } else { Proto::Line };
    let mut server = Server::start(
        "hold",
        &deploy.bin,
        deploy.dir(),
        crate::LOAD_UPGRADE_TIMEOUT,
        proto,
    )?;
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        superseded: Mutex::new(HashMap::new()),
        stats: Mutex::new(HoldStats::default()),
    });
    let (addr, s) = (server.addr, Arc::clone(&shared));
    let clients = thread::spawn(move || Clients::new(addr, hold).run(&s));
    let result = upgrades(config, hold, &mut server, &shared, progress);
    shared.stop.store(true, SeqCst);
    let _ = clients.join();
    let stats = std::mem::take(&mut *lock(&shared.stats));
    let (steps, refused) = match result {
        Ok(r) => r,
        Err(e) => {
            report.generations.extend(&server.generations);
            return Err(server.with_log(e));
        }
    };
    let stopped = server.stop();
    report.generations.extend(&server.generations);
    summarize(config, hold, &server, &steps, &refused, &stats, report);
    stopped.map_err(|e| server.with_log(e))
}

/// The upgrades, paced; then every old generation must exit with status 0.
fn upgrades(
    config: &Config,
    hold: Hold,
    server: &mut Server,
    shared: &Shared,
    progress: &mut Progress,
) -> Res<(Vec<Step>, Vec<String>)> {
    // Every connection open and answered before the first upgrade.
    wait_for(
        "every held connection to be answered",
        STEP_TIMEOUT,
        Duration::from_millis(10),
        || {
            let s = lock(&shared.stats);
            Ok(s.last.iter().all(Option::is_some).then_some(()))
                .map(|r| r.filter(|_| s.last.len() == hold.connections))
        },
    )?;
    let mut steps: Vec<Step> = Vec::new();
    let mut refused = Vec::new();
    for i in 1..=config.upgrades {
        let old = server.current;
        let mut logged = server.failure_lines().len();
        signal(old, libc::SIGHUP)?;
        let mut again = now_us() + hold.pace.as_micros() as u64;
        let mut asked = false;
        let new = wait_for(
            &format!("pid {old} to be upgraded"),
            server.upgrade_timeout + STEP_TIMEOUT,
            Duration::from_millis(1),
            || {
                if let Some(pid) = server.pid_from_file().filter(|&p| p != old) {
                    return Ok(Some(pid));
                }
                let lines = server.failure_lines();
                if lines.len() > logged {
                    refused.extend(lines[logged..].iter().cloned());
                    logged = lines.len();
                    asked = true;
                    again = now_us() + hold.pace.as_micros() as u64;
                }
                if asked && now_us() >= again {
                    asked = false;
                    signal(old, libc::SIGHUP)?;
                }
                if exited(old) {
                    return Err(format!("pid {old} exited without a successor"));
                }
                gone(&mut steps);
                Ok(None)
            },
        )?;
        let named = now_us();
        lock(&shared.superseded).insert(old, named);
        server.generations.push(new);
        server.current = new;
        steps.push(Step {
            old,
            named,
            gone: None,
        });
        // The pace, watching the old generations go.
        while now_us() < named + hold.pace.as_micros() as u64 {
            gone(&mut steps);
            thread::sleep(Duration::from_millis(1));
        }
        let s = lock(&shared.stats);
        progress.update(&format!(
            "upgrade {i}/{}: pid {old} -> {new}, {} answered, {} failed, {} refused deploys",
            config.upgrades,
            s.answered,
            s.failures(),
            refused.len()
        ));
    }
    wait_for(
        "every old generation to exit",
        DRAIN_TIMEOUT + STEP_TIMEOUT,
        Duration::from_millis(1),
        || {
            gone(&mut steps);
            Ok(steps.iter().all(|s| s.gone.is_some()).then_some(()))
        },
    )?;
    for step in &steps {
        let status = wait_reaped(step.old)?;
        if status.is_some_and(|s| !(libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0)) {
            return Err(format!(
                "the old generation (pid {}) ended with {}",
                step.old,
                status_text(status)
            ));
        }
    }
    // Every session has a message answered by the last generation.
    let settle = hold.interval * 2 + Duration::from_millis(200);
    thread::sleep(settle);
    Ok((steps, refused))
}

/// Notes the old generations that have exited since the last look.
fn gone(steps: &mut [Step]) {
    for s in steps.iter_mut().filter(|s| s.gone.is_none()) {
        if exited(s.old) {
            s.gone = Some(micros(now_us().saturating_sub(s.named)));
        }
    }
}

fn summarize(
    config: &Config,
    hold: Hold,
    server: &Server,
    steps: &[Step],
    refused: &[String],
    stats: &HoldStats,
    report: &mut Report,
) {
    let mut out = String::from("\nHeld connections\n");
    let row = |out: &mut String, name: &str, value: String| {
        out.push_str(&format!("  {name:<34}{value}\n"));
    };
    let what = if hold.ws {
        "WebSocket sessions"
    } else {
        "TCP connections"
    };
    row(
        &mut out,
        "held",
        format!(
            "{} {what}, a message every {}",
            hold.connections,
            ms(hold.interval)
        ),
    );
    row(
        &mut out,
        "upgrades",
        format!(
            "{} of {}, a SIGHUP {} after each",
            steps.len(),
            config.upgrades,
            ms(hold.pace)
        ),
    );
    row(
        &mut out,
        "answers",
        format!(
            "{} from {} generation(s)",
            stats.answered,
            stats.by_pid.len()
        ),
    );
    row(
        &mut out,
        "failed",
        format!(
            "{} (reset {}, EOF {}, no answer {}, other {})",
            stats.failures(),
            stats.resets,
            stats.eofs,
            stats.timeouts,
            stats.other
        ),
    );
    row(&mut out, "reconnects", stats.reconnects.to_string());
    let unknown: Vec<u32> = stats
        .by_pid
        .keys()
        .filter(|p| !server.generations.contains(p))
        .copied()
        .collect();
    let stale = stats
        .last
        .iter()
        .filter(|l| l.is_some_and(|p| p != server.current) || l.is_none())
        .count();
    row(
        &mut out,
        "answers from the wrong generation",
        format!(
            "{} went back to an older one, {} from unknown pids",
            stats.went_back,
            unknown.len()
        ),
    );
    if hold.ws {
        row(
            &mut out,
            "state not carried over",
            stats.state_breaks.to_string(),
        );
        row(
            &mut out,
            "not answered by the last gen.",
            format!("{stale} session(s)"),
        );
    }
    row(
        &mut out,
        "old gen. answering after commit",
        format!("{} answer(s)", stats.late),
    );
    row(
        &mut out,
        "pid file -> old generation exited",
        distribution(steps.iter().filter_map(|s| s.gone).collect()),
    );
    row(&mut out, "deploys refused", refused.len().to_string());
    if let Some(first) = refused.first() {
        out.push_str(&format!("      first: {}\n", first.trim()));
    }
    for e in &stats.examples {
        out.push_str(&format!("      {e}\n"));
    }
    report.sections.push(out);
    let mut problem = |bad: bool, what: String| {
        if bad {
            report.problems.push(format!("held connections: {what}"));
        }
    };
    problem(stats.failures() > 0, format!("{} failed", stats.failures()));
    problem(
        stats.reconnects > 0,
        format!("{} reconnects", stats.reconnects),
    );
    problem(
        stats.went_back > 0,
        format!("{} went back", stats.went_back),
    );
    problem(
        !unknown.is_empty(),
        format!("answered by unknown pids {unknown:?}"),
    );
    problem(
        stats.state_breaks > 0,
        format!("{} answers lost the session's state", stats.state_breaks),
    );
    problem(
        hold.ws && stale > 0,
        format!("{stale} sessions not answered by the last generation"),
    );
    problem(
        !refused.is_empty(),
        format!("{} deploys refused", refused.len()),
    );
}

/// One held connection.
struct Conn {
    i: usize,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    /// TCP: the server's half-close after the hello line has been read.
    half_closed: bool,
    /// Sent and not answered yet: when (µs), and the answer's expected ending.
    waiting: Option<(u64, String)>,
    /// When the next message goes (µs).
    next: u64,
    seq: u64,
    /// The count of the last answer on this session.
    n: u64,
    /// The generations that answered this session, in order.
    pids: Vec<u32>,
    /// Connected at least once.
    connected: bool,
    /// Not before this (µs), after a failed connect.
    retry: u64,
}

struct Clients {
    addr: SocketAddr,
    hold: Hold,
    conns: Vec<Conn>,
}

impl Clients {
    fn new(addr: SocketAddr, hold: Hold) -> Clients {
        let start = now_us();
        let every = hold.interval.as_micros() as u64;
        let conns = (0..hold.connections)
            .map(|i| Conn {
                i,
                stream: None,
                buf: Vec::new(),
                half_closed: false,
                waiting: None,
                next: start + every * i as u64 / hold.connections as u64,
                seq: 0,
                n: 0,
                pids: Vec::new(),
                connected: false,
                retry: 0,
            })
            .collect();
        Clients { addr, hold, conns }
    }

    fn run(mut self, shared: &Shared) {
        lock(&shared.stats).last = vec![None; self.conns.len()];
        while !shared.stop.load(SeqCst) {
            let now = now_us();
            for i in 0..self.conns.len() {
                self.due(i, now, shared);
            }
            let mut fds: Vec<libc::pollfd> = Vec::new();
            let mut which = Vec::new();
            for c in &self.conns {
                if let Some(s) = &c.stream {
                    // After the half-close, only errors (a reset) wake it.
                    let events = if c.half_closed { 0 } else { libc::POLLIN };
                    fds.push(libc::pollfd {
                        fd: s.as_raw_fd(),
                        events,
                        revents: 0,
                    });
                    which.push(c.i);
                }
            }
            // SAFETY: a valid, exclusively borrowed array of pollfd.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, 10) };
            for (p, &i) in fds.iter().zip(&which) {
                if p.revents != 0 {
                    self.readable(i, shared);
                }
            }
        }
        let mut s = lock(&shared.stats);
        for c in &self.conns {
            s.last[c.i] = c.stream.as_ref().and(c.pids.last().copied());
        }
    }

    /// Connects, sends what is due, and times out what waited too long.
    fn due(&mut self, i: usize, now: u64, shared: &Shared) {
        let c = &mut self.conns[i];
        if c.stream.is_none() && now >= c.retry {
            match connect(self.addr, self.hold.ws, c.i) {
                Ok(s) => {
                    if c.connected {
                        lock(&shared.stats).reconnects += 1;
                    }
                    c.connected = true;
                    c.stream = Some(s);
                    c.buf.clear();
                    c.half_closed = false;
                    c.pids.clear();
                    c.n = 0;
                    c.seq = 0;
                    c.waiting = None;
                    if self.hold.ws {
                        let room = format!("r{}", c.i);
                        self.send(
                            i,
                            format!("join {room}"),
                            format!("room={room} joined"),
                            shared,
                        );
                    } else {
                        c.waiting = Some((now, String::new()));
                    }
                }
                Err((kind, msg)) => {
                    c.retry = now + 100_000;
                    fail(shared, kind, format!("connection {}: connect: {msg}", c.i));
                }
            }
            return;
        }
        let c = &mut self.conns[i];
        if c.stream.is_none() {
            return;
        }
        if let Some((sent, _)) = c.waiting {
            if now.saturating_sub(sent) > READ_TIMEOUT.as_micros() as u64 {
                let msg = format!("connection {}: no answer within {READ_TIMEOUT:?}", c.i);
                self.drop_conn(i, Failure::Timeout, msg, shared);
            }
            return;
        }
        if now < c.next {
            return;
        }
        c.next += self.hold.interval.as_micros() as u64;
        if self.hold.ws {
            c.seq += 1;
            let m = format!("m{}", c.seq);
            let expect = format!("room=r{} echo={m}", c.i);
            self.send(i, m, expect, shared);
        } else if let Err(e) = c.stream.as_ref().map_or(Ok(0), |mut s| s.write(b".")) {
            let msg = format!("connection {}: write: {e}", c.i);
            self.drop_conn(i, Failure::of(&e), msg, shared);
        }
    }

    /// A text message on a WebSocket session, and what its answer must end with.
    fn send(&mut self, i: usize, text: String, expect: String, shared: &Shared) {
        let c = &mut self.conns[i];
        let mask = (c.seq as u32 ^ (c.i as u32).rotate_left(16)).to_le_bytes();
        let frame = ws::frame(1, text.as_bytes(), mask);
        let sent = c
            .stream
            .as_ref()
            .map_or(Ok(()), |mut s| s.write_all(&frame));
        match sent {
            Ok(()) => c.waiting = Some((now_us(), expect)),
            Err(e) => {
                let msg = format!("connection {}: write: {e}", c.i);
                self.drop_conn(i, Failure::of(&e), msg, shared);
            }
        }
    }

    fn readable(&mut self, i: usize, shared: &Shared) {
        let mut chunk = [0u8; 4096];
        loop {
            let c = &mut self.conns[i];
            let Some(mut s) = c.stream.as_ref() else {
                return;
            };
            match s.read(&mut chunk) {
                Ok(0) if !self.hold.ws => return self.half_closed(i, shared),
                Ok(0) => {
                    let msg = format!("connection {}: closed by the server", c.i);
                    return self.drop_conn(i, Failure::Empty, msg, shared);
                }
                Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let msg = format!("connection {}: read: {e}", c.i);
                    return self.drop_conn(i, Failure::of(&e), msg, shared);
                }
            }
        }
        if self.hold.ws {
            self.frames(i, shared)
        } else {
            self.hello(i, shared)
        }
    }

    /// TCP: the server's half-close, which must follow the hello line.
    fn half_closed(&mut self, i: usize, shared: &Shared) {
        self.hello(i, shared);
        let c = &mut self.conns[i];
        let Some(mut s) = c.stream.as_ref() else {
            return;
        };
        if c.waiting.is_some() {
            let msg = format!("connection {}: closed before the hello line", c.i);
            return self.drop_conn(i, Failure::Empty, msg, shared);
        }
        c.half_closed = true;
        // Still there? A write finds a reset.
        if let Err(e) = s.write(b".") {
            let msg = format!("connection {}: after the hello: {e}", c.i);
            self.drop_conn(i, Failure::of(&e), msg, shared);
        }
    }

    /// TCP: the hello line.
    fn hello(&mut self, i: usize, shared: &Shared) {
        let c = &mut self.conns[i];
        let Some(end) = c.buf.iter().position(|&b| b == b'\n') else {
            return;
        };
        let line = String::from_utf8_lossy(&c.buf[..end]).into_owned();
        let extra = c.buf.len() > end + 1 || c.waiting.is_none();
        c.buf.clear();
        match parse_pid(&line).filter(|_| !extra) {
            Some(pid) => {
                let sent = c.waiting.take().map_or(0, |w| w.0);
                answered(c, pid, sent, shared);
            }
            None => {
                let msg = format!("connection {}: unexpected {line:?}", c.i);
                self.drop_conn(i, Failure::Wrong, msg, shared);
            }
        }
    }

    /// WebSocket: every whole frame read.
    fn frames(&mut self, i: usize, shared: &Shared) {
        loop {
            let c = &mut self.conns[i];
            let (frame, used) = match ws::parse(&c.buf) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => {
                    let msg = format!("connection {}: {e}", c.i);
                    return self.drop_conn(i, Failure::Wrong, msg, shared);
                }
            };
            c.buf.drain(..used);
            match frame {
                ws::Frame::Text(text) => self.answer(i, &text, shared),
                ws::Frame::Ping(data) => {
                    let pong = ws::frame(10, &data, [1, 2, 3, 4]);
                    if let Some(mut s) = c.stream.as_ref() {
                        let _ = s.write_all(&pong);
                    }
                }
                ws::Frame::Close(code) => {
                    let msg = format!("connection {}: close frame from the server ({code:?})", c.i);
                    return self.drop_conn(i, Failure::Empty, msg, shared);
                }
                ws::Frame::Other(op) => {
                    let msg = format!("connection {}: unexpected frame, opcode {op}", c.i);
                    return self.drop_conn(i, Failure::Wrong, msg, shared);
                }
            }
            if self.conns[i].stream.is_none() {
                return;
            }
        }
    }

    /// `pid=P n=N room=R echo=M` (or `... joined`): checked against the session.
    fn answer(&mut self, i: usize, text: &str, shared: &Shared) {
        let c = &mut self.conns[i];
        let Some((sent, expect)) = c.waiting.take() else {
            let msg = format!("connection {}: unasked {text:?}", c.i);
            return self.drop_conn(i, Failure::Wrong, msg, shared);
        };
        let Some(pid) = parse_pid(text) else {
            let msg = format!("connection {}: no pid in {text:?}", c.i);
            return self.drop_conn(i, Failure::Wrong, msg, shared);
        };
        let n = text
            .split(' ')
            .find_map(|f| f.strip_prefix("n="))
            .and_then(|n| n.parse::<u64>().ok());
        if n != Some(c.n + 1) || !text.ends_with(&expect) {
            let mut s = lock(&shared.stats);
            s.state_breaks += 1;
            example(
                &mut s,
                format!(
                    "connection {}: after n={} expected \"... n={} {expect}\", got {text:?}",
                    c.i,
                    c.n,
                    c.n + 1
                ),
            );
        }
        c.n = n.unwrap_or(c.n + 1);
        answered(c, pid, sent, shared);
    }

    fn drop_conn(&mut self, i: usize, kind: Failure, msg: String, shared: &Shared) {
        let c = &mut self.conns[i];
        c.stream = None;
        c.waiting = None;
        fail(shared, kind, msg);
    }
}

/// An answer from `pid` to what was sent at `sent` (µs).
fn answered(c: &mut Conn, pid: u32, sent: u64, shared: &Shared) {
    let late = lock(&shared.superseded)
        .get(&pid)
        .is_some_and(|&named| sent > named);
    let mut s = lock(&shared.stats);
    s.answered += 1;
    *s.by_pid.entry(pid).or_default() += 1;
    if late {
        s.late += 1;
    }
    if c.pids.last() != Some(&pid) {
        if c.pids.contains(&pid) {
            s.went_back += 1;
            example(
                &mut s,
                format!("connection {}: answered by {:?}, then {pid}", c.i, c.pids),
            );
        }
        c.pids.push(pid);
    }
    s.last[c.i] = Some(pid);
}

fn fail(shared: &Shared, kind: Failure, msg: String) {
    let mut s = lock(&shared.stats);
    match kind {
        Failure::Reset => s.resets += 1,
        Failure::Empty | Failure::CutOff => s.eofs += 1,
        Failure::Timeout => s.timeouts += 1,
        _ => s.other += 1,
    }
    example(
        &mut s,
        format!("at {:.3} s: {}: {msg}", now_us() as f64 / 1e6, kind.name()),
    );
}

fn example(s: &mut HoldStats, msg: String) {
    if s.examples.len() < 10 {
        s.examples.push(msg);
    }
}

/// A new connection, non-blocking once it is set up (a WebSocket session after its
/// handshake).
fn connect(addr: SocketAddr, ws: bool, i: usize) -> Result<TcpStream, (Failure, String)> {
    let fail = |what: &str, e: io::Error| (Failure::of(&e), format!("{what}: {e}"));
    let mut s =
        TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| fail("connect", e))?;
    s.set_read_timeout(Some(READ_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(READ_TIMEOUT)))
        .map_err(|e| fail("set timeouts", e))?;
    if ws {
        let rest = ws::handshake(&mut s, i as u64).map_err(|e| fail("handshake", e))?;
        if !rest.is_empty() {
            return Err((Failure::Wrong, "data before the first message".into()));
        }
    }
    s.set_nonblocking(true)
        .map_err(|e| fail("set_nonblocking", e))?;
    Ok(s)
}
