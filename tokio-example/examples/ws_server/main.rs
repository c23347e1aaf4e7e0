//! A WebSocket chat server, on the synchronous `tungstenite`, that upgrades itself on
//! `SIGHUP` and hands every session to the new generation: no client is disconnected,
//! and each keeps its state.
//!
//! ```text
//! ws_server [--listen HOST:PORT] [--pid-file PATH] [--upgrade-timeout SECS]
//!           [--probation SECS] [--fd-store] [--keeper] [--control PATH|@NAME]
//!           [--drain SECS]
//! ws_server --control PATH|@NAME [--control-uid UID] --upgrade | --status
//! ```
//!
//! The flags are `tcp_server`'s (defaults `127.0.0.1:8080`, no pid file, 60 s, no
//! probation), and `--drain`: how long an exiting generation serves what it still has
//! (10 s). A WebSocket session (any path) has a count of the messages it has had
//! answered and a chat room (`lobby` at first). Each text message is answered with
//! `pid=<pid> n=<count> room=<room> ...`: `join ROOM` moves the session to `ROOM`
//! (`... joined`), `say TEXT` sends `room=<room> said=TEXT` to the other sessions in the
//! room (`... said`), anything else is echoed (`... echo=TEXT`). A plain `GET` (no
//! WebSocket) is answered `hello from pid=<pid>` and closed, for health checks. Try it
//! from the repository's root (with `websocat`, or any WebSocket client):
//!
//! ```text
//! pid_file="${XDG_RUNTIME_DIR:-.}/ws_server.pid"  # a directory of your own, not /tmp
//! cargo run --example ws_server -- --pid-file "$pid_file" &
//! websocat ws://127.0.0.1:8080/       # type: join kitchen, then hello
//! kill -HUP "$(cat "$pid_file")"      # upgrade: type again, a new pid answers, n goes on
//! kill -TERM "$(cat "$pid_file")"     # stop: every session gets a close frame (1001)
//! ```
//!
//! How a session moves (see `session.rs` for the bytes):
//!
//! - One thread serves everything: the listener, the sessions and the handover channel,
//!   behind one `poll`, with the exit notification. Signals, upgrades and the control
//!   socket have threads of their own, as in `tcp_server`.
//! - When the next generation has taken over, this one stops accepting and hands over
//!   every session that is idle (at a message boundary, its answers written): the socket,
//!   the bytes read and not yet used, and the state (count and room, tag
//!   [`session::STATE_V1`]). A session in the middle of a message is served until it
//!   reaches the end of it, then handed over. The new generation answers the next message.
//! - The old generation exits as soon as every session has gone: within milliseconds when
//!   they are idle, so the next deploy is not refused for it. At the drain's deadline
//!   (`--drain`) what is left gets a close frame and is counted as cut.
//! - A session the new generation refuses (its state's tag is one it does not know: a
//!   deploy that changed the format; `WS_SERVER_STATE_TAG=XXXX` makes a generation take
//!   only that tag, to try it) stays here, served until the drain's deadline, then
//!   closed cleanly (`1001 going away`). The lost ones (taken by a new generation that
//!   then died) are named in the log with their peer.
//! - Plaintext only: a TLS session's keys live in this process's memory and cannot move
//!   with the socket (a server on kernel TLS could hand its sockets over; not this one).
//! - `SIGTERM`: a close frame to every session (each at a message boundary), and exit once
//!   the clients have answered, or at the deadline.

mod session;

use std::collections::HashMap;
use std::error::Error;
use std::ffi::OsString;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use session::{Gate, Said, Served, Session, State, STATE_V1};
use signals::{Asked, Signals};
use tableflip::handover::{Receiver, Returned, Sender, Stream};
use tableflip::{control, Drain, Options, UnixAddr, Upgrader};
use tungstenite::Message;

/// How long an exiting generation serves what it still has (`--drain`).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

const USAGE: &str = "usage: ws_server [--listen HOST:PORT] [--pid-file PATH] \
                     [--upgrade-timeout SECS] [--probation SECS] [--fd-store] [--keeper] \
                     [--control PATH|@NAME] [--drain SECS]\n       \
                     ws_server --control PATH|@NAME [--control-uid UID] --upgrade | --status";

#[path = "../../../examples/common/signals.rs"]
mod signals;

/// Logs one line to stderr with this process's pid, in one `write` (see `tcp_server`).
macro_rules! log {
    ($($arg:tt)*) => {{
        let line = format!("[ws_server pid={}] {}\n", std::process::id(), format_args!($($arg)*));
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }};
}

struct Config {
    listen: String,
    pid_file: Option<PathBuf>,
    upgrade_timeout: Duration,
    probation: Duration,
    fd_store: bool,
    keeper: bool,
    control: Option<UnixAddr>,
    control_uid: Option<u32>,
    ask: Option<&'static str>,
    drain: Duration,
}

fn main() -> ExitCode {
    let config = match parse_args(std::env::args_os().skip(1)) {
        Ok(Some(config)) => config,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("ws_server: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(command) = config.ask {
        return ask(&config, command);
    }
    if config.keeper {
        if let Err(e) = tableflip::Keeper::new().run() {
            eprintln!("ws_server: {e}");
            return ExitCode::FAILURE;
        }
    }
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log!("fatal: {}", error_chain(&*e));
            ExitCode::FAILURE
        }
    }
}

/// `Ok(None)` for `--help`.
fn parse_args(mut args: impl Iterator<Item = OsString>) -> Result<Option<Config>, String> {
    let mut config = Config {
        listen: "127.0.0.1:8080".into(),
        pid_file: None,
        upgrade_timeout: Duration::from_secs(60),
        probation: Duration::ZERO,
        fd_store: false,
        keeper: false,
        control: None,
        control_uid: None,
        ask: None,
        drain: DRAIN_TIMEOUT,
    };
    while let Some(arg) = args.next() {
        let flag = arg.to_string_lossy().into_owned();
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let seconds = |v: OsString| {
            v.to_str()
                .and_then(|s| s.parse::<f64>().ok())
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .ok_or_else(|| format!("{flag}: bad number of seconds {v:?}"))
        };
        match flag.as_str() {
            "--listen" => {
                config.listen = value()?.into_string().map_err(|_| "--listen: not UTF-8")?
            }
            "--pid-file" => config.pid_file = Some(value()?.into()),
            "--upgrade-timeout" => {
                config.upgrade_timeout = Some(seconds(value()?)?)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| format!("{flag}: must be more than 0"))?
            }
            "--probation" => config.probation = seconds(value()?)?,
            "--drain" => config.drain = seconds(value()?)?,
            "--fd-store" => config.fd_store = true,
            "--keeper" => config.keeper = true,
            "--control" => {
                let v = value()?;
                config.control = Some(match v.to_str().and_then(|s| s.strip_prefix('@')) {
                    Some(name) => UnixAddr::abstract_name(name),
                    None => UnixAddr::Path(v.into()),
                });
            }
            "--control-uid" => {
                let v = value()?;
                let uid = v.to_str().and_then(|s| s.parse().ok());
                config.control_uid = Some(uid.ok_or_else(|| format!("{flag}: bad uid {v:?}"))?);
            }
            "--upgrade" => config.ask = Some("upgrade"),
            "--status" => config.ask = Some("status"),
            "-h" | "--help" => return Ok(None),
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    if config.ask.is_some() && config.control.is_none() {
        return Err("--upgrade and --status need --control".into());
    }
    Ok(Some(config))
}

/// `--upgrade` / `--status`: asks the server on the control socket, prints the answer.
fn ask(config: &Config, command: &str) -> ExitCode {
    let Some(addr) = config.control.clone() else {
        return ExitCode::from(2);
    };
    let timeout = config.upgrade_timeout + config.probation + Duration::from_secs(10);
    let mut client = control::ClientConfig::new(timeout);
    if let Some(uid) = config.control_uid {
        client = client.server_uid(uid);
    }
    let answer = match command {
        "upgrade" => control::request_upgrade(addr, client).map(|pid| pid.to_string()),
        _ => control::status(addr, client).map(|status| {
            let mut lines = vec![status.to_string()];
            lines.extend(status.upgrades.iter().map(|r| r.to_string()));
            lines.join("\n")
        }),
    };
    match answer {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ws_server: {command} failed: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> Result<(), Box<dyn Error>> {
    // First: a new generation starts with SIGHUP at its default, which is to die.
    let signals = Signals::new()?;
    let mut options = Options::new()
        .upgrade_timeout(config.upgrade_timeout)
        .probation(config.probation);
    if config.fd_store {
        options = options.fd_store(true);
    }
    if let Some(path) = &config.pid_file {
        options = options.pid_file(path);
    }
    let upg = Arc::new(Upgrader::new(options)?);
    let (listener, inherited): (TcpListener, bool) = match upg.fds().take(config.listen.as_str())? {
        Some(listener) => (listener, true),
        None => (upg.fds().listen(config.listen.as_str())?, false),
    };
    // Non-blocking accepts behind poll, in every generation (the flag is shared).
    listener.set_nonblocking(true)?;
    log!(
        "listening on {} ({})",
        listener.local_addr()?,
        if inherited { "inherited" } else { "new socket" }
    );
    let control = match &config.control {
        Some(addr) => Some(control::Server::listen(&upg, addr.clone())?),
        None => None,
    };
    let worker = UpgradeWorker::start(Arc::clone(&upg))?;
    let (signal_upg, requests) = (Arc::clone(&upg), worker.requests.clone());
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || handle_signals(signals, signal_upg, requests))?;

    // Ready before serving: the listener queues connections meanwhile, and the previous
    // generation serves until it commits (both accept from the same queue). The
    // sessions it hands over come after the commit, through the adoption's channel.
    let mut adoption = upg.ready()?;
    log!("ready; {adoption}");
    if let Some(ctl) = control {
        let u = Arc::clone(&upg);
        thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                log!("control socket on {}", ctl.addr());
                if let Err(e) = ctl.serve(&u) {
                    log!("control socket failed: {}", error_chain(&e));
                }
            })?;
    }
    let accept_tag = std::env::var("WS_SERVER_STATE_TAG")
        .ok()
        .and_then(|t| Some(u32::from_be_bytes(t.as_bytes().try_into().ok()?)))
        .unwrap_or(STATE_V1);
    let mut server = Server {
        sessions: HashMap::new(),
        heads: HashMap::new(),
        rx: adoption.handover.take(),
        accept_tag,
        taken: 0,
        drain: config.drain,
    };
    server.serve(&upg, &listener);
    drop(listener);
    // The upgrade that ended this generation may still be logging its result.
    drop(worker.busy.lock());
    server.drain(&upg);
    log!("exit");
    Ok(())
}

/// Everything the serving thread holds.
struct Server {
    sessions: HashMap<RawFd, Session>,
    /// Connections whose request head has not arrived whole, and since when.
    heads: HashMap<RawFd, (Gate, Instant)>,
    /// Sessions from the previous generation, until it is done.
    rx: Option<Receiver>,
    /// The state tag this generation takes.
    accept_tag: u32,
    /// Sessions taken from the previous generation.
    taken: u64,
    /// How long the drain may take.
    drain: Duration,
}

/// What to wait for in one `poll`.
struct Poll {
    fds: Vec<libc::pollfd>,
}

impl Poll {
    fn new() -> Poll {
        Poll { fds: Vec::new() }
    }

    fn add(&mut self, fd: impl AsFd, events: i16) {
        self.fds.push(libc::pollfd {
            fd: fd.as_fd().as_raw_fd(),
            events,
            revents: 0,
        });
    }

    /// Waits up to `timeout`; returns the fds that are ready.
    fn wait(mut self, timeout: Duration) -> Vec<RawFd> {
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: a valid, exclusively borrowed array of pollfd, its length with it.
        let rc = unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as _, ms) };
        if rc <= 0 {
            return Vec::new(); // timed out, or EINTR: look again
        }
        self.fds
            .iter()
            .filter(|p| p.revents != 0)
            .map(|p| p.fd)
            .collect()
    }
}

impl Server {
    /// Until the exit notification fires: accepts, hands shakes, serves, and takes what
    /// the previous generation hands over.
    fn serve(&mut self, upg: &Upgrader, listener: &TcpListener) {
        loop {
            let mut poll = Poll::new();
            poll.add(upg.exit(), libc::POLLIN);
            poll.add(listener, libc::POLLIN);
            if let Some(rx) = &self.rx {
                poll.add(rx, libc::POLLIN);
            }
            self.add_connections(&mut poll, |_| true);
            let ready = poll.wait(Duration::from_secs(1));
            if upg.exit().fired() {
                return;
            }
            if ready.contains(&listener.as_raw_fd()) {
                self.accept(listener);
            }
            if self
                .rx
                .as_ref()
                .is_some_and(|rx| ready.contains(&rx.as_fd().as_raw_fd()))
            {
                self.receive();
            }
            self.serve_ready(&ready);
            self.expire_heads();
        }
    }

    /// The sessions (those `which` picks) and the heads, to `poll`.
    fn add_connections(&self, poll: &mut Poll, which: impl Fn(&Session) -> bool) {
        for s in self.sessions.values().filter(|s| which(s)) {
            let write = if s.wants_write() { libc::POLLOUT } else { 0 };
            poll.add(s.stream(), libc::POLLIN | write);
        }
        for (gate, _) in self.heads.values() {
            poll.add(&gate.stream, libc::POLLIN);
        }
    }

    fn accept(&mut self, listener: &TcpListener) {
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        log!("connection error: {e}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.heads
                        .insert(fd, (Gate::new(stream, Vec::new()), Instant::now()));
                    self.head_ready(fd);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // The client gave up before we accepted: nothing was lost.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    log!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Reads a request head; once it is whole, the handshake (or a plain answer).
    fn head_ready(&mut self, fd: RawFd) {
        let Some((gate, _)) = self.heads.get_mut(&fd) else {
            return;
        };
        match gate.read_head() {
            Ok(None) => return,
            Ok(Some(_)) => {}
            Err(_) => {
                self.heads.remove(&fd);
                return;
            }
        }
        let Some((mut gate, _)) = self.heads.remove(&fd) else {
            return;
        };
        let head = String::from_utf8_lossy(gate.head()).to_ascii_lowercase();
        let websocket = head
            .lines()
            .any(|l| l.starts_with("upgrade:") && l.contains("websocket"));
        if !websocket {
            // A health check: one short answer, then close.
            let body = format!("hello from pid={}\n", std::process::id());
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = gate.stream.write_all(answer.as_bytes());
            return;
        }
        match Session::accept(gate) {
            Ok(session) => {
                self.sessions.insert(fd, session);
            }
            Err(e) => log!("connection error: {e}"),
        }
    }

    /// Closes connections whose request head is overdue.
    fn expire_heads(&mut self) {
        self.heads
            .retain(|_, (_, since)| since.elapsed() < HEAD_TIMEOUT);
    }

    /// Serves every connection in `ready`; delivers what was said in rooms.
    fn serve_ready(&mut self, ready: &[RawFd]) {
        let mut said = Vec::new();
        for fd in ready {
            if self.heads.contains_key(fd) {
                self.head_ready(*fd);
            } else if let Some(s) = self.sessions.get_mut(fd) {
                if let Served::Ended(_) = s.serve(&mut said) {
                    self.sessions.remove(fd);
                }
            }
        }
        self.say(said);
    }

    /// `say`: each text to the other sessions in its room.
    fn say(&mut self, said: Vec<Said>) {
        for Said { from, room, text } in said {
            let line = format!("room={room} said={text}");
            let mut ended = Vec::new();
            let others = self
                .sessions
                .iter_mut()
                .filter(|(fd, s)| **fd != from && s.state.room == room);
            for (fd, s) in others {
                if let Served::Ended(_) = s.send(Message::text(line.clone())) {
                    ended.push(*fd);
                }
            }
            for fd in ended {
                self.sessions.remove(&fd);
            }
        }
    }

    /// The new generation: takes what the previous one hands over, checked first: the
    /// tag this generation knows, a TCP connection, a state that decodes. The rest is
    /// refused, and stays with the previous generation.
    fn receive(&mut self) {
        let Some(rx) = self.rx.as_mut() else { return };
        let mut said = Vec::new();
        loop {
            let incoming = match rx.recv() {
                Ok(Some(incoming)) => incoming,
                Ok(None) => break,
                Err(e @ tableflip::Error::HandoverRefused { .. }) => {
                    log!("handover: {e}");
                    continue;
                }
                Err(e) => {
                    log!(
                        "handover: took {} session(s) from pid {}; {e}",
                        self.taken,
                        rx.pid()
                    );
                    self.rx = None;
                    break;
                }
            };
            let state = match State::decode(incoming.state()) {
                Ok(state) if incoming.tag() == self.accept_tag && incoming.is_tcp() => state,
                checked => {
                    let why = checked
                        .err()
                        .unwrap_or_else(|| "not a state this binary reads".into());
                    log!(
                        "handover: refusing session {} (tag {:#010x}): {why}",
                        incoming.id(),
                        incoming.tag()
                    );
                    let _ = incoming.refuse();
                    continue;
                }
            };
            match incoming.accept() {
                Ok((Stream::Tcp(stream), unread, _)) => {
                    let fd = stream.as_raw_fd();
                    match Session::adopt(stream, unread, state) {
                        Ok(mut session) => {
                            self.taken += 1;
                            // Bytes may have come with it: answer them now.
                            if let Served::Open = session.serve(&mut said) {
                                self.sessions.insert(fd, session);
                            }
                        }
                        Err(e) => log!("handover: {e}"),
                    }
                }
                Ok(_) => {} // not TCP: is_tcp() said it is
                Err(e) => log!("handover: {e}"),
            }
        }
        self.say(said);
    }

    /// Once the exit notification has fired: hands the sessions over (after an
    /// upgrade) or closes them (at a stop), serving each until it can go; what is
    /// left at the deadline is closed.
    fn drain(&mut self, upg: &Upgrader) {
        self.rx = None; // refuses what is still queued: the previous generation keeps it
        let before = self.sessions.len() as u64;
        log!("stopped accepting; {before} session(s)");
        let drain = upg.exit().drain(self.drain);
        let mut handed = None;
        if upg.exit().upgraded() {
            match upg.handover() {
                Ok(sender) => handed = Some(self.hand_over(&sender, &drain)),
                Err(e) => log!("no handover, closing the sessions: {}", error_chain(&e)),
            }
        }
        // What stays: refused ones until the deadline; at a stop (or without a
        // handover), every session gets a close frame at its next message boundary.
        let close_all = handed.is_none();
        let handed = handed.unwrap_or(0);
        while let Some(wait) = drain.tick() {
            if close_all {
                self.close_idle();
            }
            self.expire_heads();
            if self.sessions.is_empty() && self.heads.is_empty() {
                break;
            }
            let mut poll = Poll::new();
            self.add_connections(&mut poll, |_| true);
            let ready = poll.wait(wait);
            self.serve_ready(&ready);
        }
        let cut = self.sessions.len() as u64;
        if cut > 0 {
            log!("drain over: closing {cut} session(s) (1001 going away)");
            for s in self.sessions.values_mut() {
                let _ = s.close();
            }
        }
        drain.finish(before.saturating_sub(handed + cut), cut);
        if let Some(record) = upg
            .status()
            .last_upgrade()
            .filter(|_| upg.exit().upgraded())
        {
            log!("{record}");
        }
    }

    /// Sends a close frame to every idle session that has not had one.
    fn close_idle(&mut self) {
        let idle: Vec<RawFd> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.idle())
            .map(|(fd, _)| *fd)
            .collect();
        for fd in idle {
            if let Some(Served::Ended(_)) = self.sessions.get_mut(&fd).map(Session::close) {
                self.sessions.remove(&fd);
            }
        }
    }

    /// Sends each session once it is idle, serving the others until they are (or the
    /// drain's deadline); then waits for the answers. Returns how many the new
    /// generation took; the ones it refused stay, `kept`. Names the lost ones.
    fn hand_over(&mut self, sender: &Sender, drain: &Drain) -> u64 {
        let mut peers: HashMap<u64, Option<SocketAddr>> = HashMap::new();
        loop {
            let idle: Vec<RawFd> = self
                .sessions
                .iter()
                .filter(|(_, s)| s.idle() && !s.kept)
                .map(|(fd, _)| *fd)
                .collect();
            for fd in idle {
                let Some(session) = self.sessions.remove(&fd) else {
                    continue;
                };
                let peer = session.stream().peer_addr().ok();
                let (stream, unread, state) = session.into_parts();
                // On an error it comes back from finish(), with the reason.
                if let Ok(id) = sender.send(stream, &unread, STATE_V1, &state) {
                    peers.insert(id, peer);
                }
            }
            let _ = sender.flush();
            if let Ok(back) = sender.answers() {
                self.keep(back);
            }
            // A connection accepted before the exit whose request head is still on its
            // way becomes a session here, and goes too.
            self.expire_heads();
            if self.sessions.values().all(|s| s.kept) && self.heads.is_empty() {
                break;
            }
            // Sessions in the middle of a message: serve them until they are idle.
            let Some(wait) = drain.tick() else { break };
            let mut poll = Poll::new();
            poll.add(sender, libc::POLLIN);
            self.add_connections(&mut poll, |s| !s.kept);
            let ready = poll.wait(wait);
            self.serve_ready(&ready);
        }
        let left = drain.deadline().saturating_duration_since(Instant::now());
        let done = match sender.finish(left.max(Duration::from_millis(100))) {
            Ok(done) => done,
            Err(e) => {
                log!("handover failed: {}", error_chain(&e));
                return 0;
            }
        };
        log!("handover: {done}");
        for id in &done.lost {
            let peer = peers.get(id).copied().flatten();
            log!(
                "session {id} lost (from {peer:?}): pid {} took it, then went away",
                done.pid
            );
        }
        self.keep(done.returned);
        (done.accepted + done.given) as u64
    }

    /// Sessions that stay with this generation, served until the drain ends.
    fn keep(&mut self, back: Vec<Returned>) {
        for b in back {
            log!("session {} stays here: {}", b.id, b.reason);
            let (Stream::Tcp(stream), Ok(state)) = (b.stream, State::decode(&b.state)) else {
                continue;
            };
            let unread = b.unread;
            let fd = stream.as_raw_fd();
            if let Ok(mut session) = Session::adopt(stream, unread, state) {
                session.kept = true;
                let mut said = Vec::new();
                if let Served::Open = session.serve(&mut said) {
                    self.sessions.insert(fd, session);
                }
                self.say(said);
            }
        }
    }
}

/// Runs `upgrade()` on a thread started once (see `tcp_server`).
struct UpgradeWorker {
    requests: SyncSender<()>,
    busy: Arc<Mutex<()>>,
}

impl UpgradeWorker {
    fn start(upg: Arc<Upgrader>) -> io::Result<UpgradeWorker> {
        let (requests, rx) = mpsc::sync_channel::<()>(0);
        let busy = Arc::new(Mutex::new(()));
        let held = Arc::clone(&busy);
        thread::Builder::new()
            .name("upgrade".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    let _busy = held.lock().unwrap_or_else(|e| e.into_inner());
                    match upg.upgrade() {
                        Ok(pid) => {
                            log!("upgrade succeeded: the new generation (pid {pid}) is ready")
                        }
                        Err(e) => log!("upgrade failed: {}", error_chain(&e)),
                    }
                }
            })?;
        Ok(UpgradeWorker { requests, busy })
    }
}

fn handle_signals(mut signals: Signals, upg: Arc<Upgrader>, requests: SyncSender<()>) {
    for request in signals.forever() {
        log!("{}", request.line);
        match request.asked {
            Asked::Upgrade => {
                if requests.try_send(()).is_err() {
                    log!("upgrade failed: another upgrade is in progress");
                }
            }
            Asked::Stop => upg.stop(),
            Asked::Nothing => {}
        }
    }
}

/// An error and its chain of sources.
fn error_chain(e: &dyn Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}
