//! A TCP server that upgrades itself on `SIGHUP` without refusing or dropping a
//! connection.
//!
//! ```text
//! tcp_server [--listen HOST:PORT] [--pid-file PATH] [--upgrade-timeout SECS]
//!            [--probation SECS] [--fd-store] [--keeper]
//!            [--control PATH|@NAME]
//! tcp_server --control PATH|@NAME [--control-uid UID] --upgrade | --status
//! ```
//!
//! Defaults: `127.0.0.1:8080`, no pid file, 60 s, no probation (`--probation 2` keeps
//! a new generation on probation for 2 s: if it dies within that time, this one serves
//! on as if nothing happened). `--fd-store` keeps the listener in systemd's fd store, so
//! that it survives a crash of every generation (see the systemd guide,
//! `docs/systemd.md`). Every connection gets one line, `hello from pid=<pid>`, then the
//! server's half-close; the server reads (and discards) what the client sends until it
//! closes, and hands the connection to the next generation at an upgrade. Try it:
//!
//! ```text
//! pid_file="${XDG_RUNTIME_DIR:-.}/tcp_server.pid"  # a directory of your own, not /tmp
//! cargo run --example tcp_server -- --pid-file "$pid_file" &
//! nc 127.0.0.1 8080                       # hello from pid=1234
//! kill -HUP "$(cat "$pid_file")"          # upgrade: a new process takes over
//! nc 127.0.0.1 8080                       # hello from pid=1240
//! kill -TERM "$(cat "$pid_file")"         # graceful stop
//! ```
//!
//! - `SIGHUP` starts the next generation (same binary path and arguments) on a thread of
//!   its own. If it fails, the reason is logged and this process keeps serving. A
//!   `SIGHUP` that the kernel sent (the terminal went away, or the process leading its
//!   session exited: see [`asked`](signals::Request::asked)) is logged and changes
//!   nothing.
//! - `--control PATH` (or `@NAME`, an abstract name) serves a control socket on a thread
//!   of its own (see `tableflip::control`). `tcp_server --control PATH --upgrade` asks
//!   the server there to upgrade, waits, prints the new generation's pid and exits 0, or
//!   prints why it failed (the new generation's own reason, if it gave one) and exits
//!   1: a command for systemd's `ExecReload=`. `--status` prints what the server is
//!   doing. The client waits `--upgrade-timeout` plus `--probation` plus 10 s at most,
//!   so give it the server's values if they are larger than the defaults. It believes
//!   only the answer of root, of its own user, or of the owner of a socket file in a
//!   directory only that owner and root can write to (`/run/tcp_server`, not `/tmp`);
//!   `--control-uid UID` names the uid the server runs as (needed for an abstract name
//!   when the server runs as another user than the client: anyone can bind one first).
//! - A generation accepts from the moment it has its listener, before it reports ready:
//!   with a probation both generations serve until the old one commits.
//! - When the next generation is ready (or on `SIGTERM`/`SIGINT`) this process stops
//!   accepting at once, finishes the connections it has accepted, and exits (after
//!   [`DRAIN_TIMEOUT`] at the latest).
//! - After the hello line a connection lingers (see [`linger`]) until the client closes
//!   it. A connection that lingers when the next generation takes over is handed to it
//!   (`tableflip::handover`) with what it has discarded so far, and lingers there: a
//!   client that keeps writing does not keep this process alive, and is not reset at
//!   the drain deadline. The new generation refuses a state it does not know (another
//!   [`LINGER_V1`]), and this one then lingers on it until the deadline. So an old
//!   generation whose connections only linger exits within milliseconds of the commit,
//!   and the next upgrade is not refused meanwhile.
//!
//! The accept loop is the part to copy. The listening socket's `O_NONBLOCK` flag is
//! shared by every generation (it lives on the open file description), and a thread
//! blocked in `accept()` is not woken when another thread closes the socket. So every
//! generation sets the listener non-blocking, waits on the listener *and* the exit
//! notification together (`Upgrader::wait_readable`), and accepts until `WouldBlock`.

use std::collections::HashMap;
use std::error::Error;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use signals::{Asked, Signals};
use tableflip::handover::{Receiver, Stream};
use tableflip::{control, Drain, Exit, Options, UnixAddr, Upgrader, Wake};

/// How long an exiting generation waits for its connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a single write to a client may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After replying, how long to wait for the client's next bytes or its close (see
/// [`linger`]).
const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// At most this many bytes are discarded while lingering, by all generations together.
const MAX_DISCARD: u64 = 64 * 1024;
/// The tag of a lingering connection's state in a handover: the bytes it has discarded,
/// a little-endian `u64`. A binary whose state differs uses another tag, and a
/// generation refuses a tag it does not know ([`receive`]).
const LINGER_V1: u32 = u32::from_be_bytes(*b"TSL1");
/// How long the old generation waits for the new one to take what it hands over.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

const USAGE: &str = "usage: tcp_server [--listen HOST:PORT] [--pid-file PATH] \
                     [--upgrade-timeout SECS] [--probation SECS] [--fd-store] \
                     [--keeper] [--control PATH|@NAME]\n       \
                     tcp_server --control PATH|@NAME [--control-uid UID] --upgrade | --status";

/// Logs one line to stderr with this process's pid. A single `write` per line, so the
/// lines of two generations sharing a log file do not interleave, and a closed stderr
/// is ignored instead of panicking like `eprintln!`.
#[path = "common/signals.rs"]
mod signals;

macro_rules! log {
    ($($arg:tt)*) => {{
        let line = format!("[tcp_server pid={}] {}\n", std::process::id(), format_args!($($arg)*));
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
    /// `--control-uid`: the uid the server on the control socket runs as.
    control_uid: Option<u32>,
    /// `--upgrade` or `--status`: a client of the control socket, not a server.
    ask: Option<&'static str>,
}

fn main() -> ExitCode {
    trace("main");
    let config = match parse_args(std::env::args_os().skip(1)) {
        Ok(Some(config)) => config,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("tcp_server: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(command) = config.ask {
        return ask(&config, command);
    }
    // `--keeper`: this process stays in front of the generations, with one pid, for
    // the service's whole life (containers, supervisors); the generations it starts
    // run this same `main` and go on from here.
    if config.keeper {
        if let Err(e) = tableflip::Keeper::new().run() {
            eprintln!("tcp_server: {e}");
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
fn parse_args(args: impl Iterator<Item = OsString>) -> Result<Option<Config>, String> {
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
    };
    let mut args = args;
    while let Some(arg) = args.next() {
        let flag = arg.to_string_lossy().into_owned();
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => {
                config.listen = value()?.into_string().map_err(|_| "--listen: not UTF-8")?
            }
            "--pid-file" => config.pid_file = Some(value()?.into()),
            "--upgrade-timeout" => {
                config.upgrade_timeout = seconds(&flag, &value()?)?
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| format!("{flag}: must be more than 0"))?;
            }
            "--probation" => config.probation = seconds(&flag, &value()?)?.unwrap_or_default(),
            "--fd-store" => config.fd_store = true,
            "--keeper" => config.keeper = true,
            "--control" => config.control = Some(control_addr(value()?)),
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

/// `@NAME` is an abstract socket name, anything else a path.
fn control_addr(v: OsString) -> UnixAddr {
    match v.to_str().and_then(|s| s.strip_prefix('@')) {
        Some(name) => UnixAddr::abstract_name(name),
        None => UnixAddr::Path(v.into()),
    }
}

/// `--upgrade` / `--status`: asks the server on the control socket, prints the answer.
fn ask(config: &Config, command: &str) -> ExitCode {
    let Some(addr) = config.control.clone() else {
        return ExitCode::from(2);
    };
    // The server answers when its upgrade has ended: its timeout plus its probation.
    let timeout = config.upgrade_timeout + config.probation + Duration::from_secs(10);
    let mut client = control::ClientConfig::new(timeout);
    if let Some(uid) = config.control_uid {
        client = client.server_uid(uid);
    }
    let answer = match command {
        "upgrade" => control::request_upgrade(addr, client).map(|pid| pid.to_string()),
        // The status, then the last upgrades, one line each.
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
            eprintln!("tcp_server: {command} failed: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// A decimal number of seconds (`0.5`, `2`); `None` for zero.
fn seconds(flag: &str, v: &OsString) -> Result<Option<Duration>, String> {
    v.to_str()
        .and_then(|s| s.parse::<f64>().ok())
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .map(|d| Some(d).filter(|d| !d.is_zero()))
        .ok_or_else(|| format!("{flag}: bad number of seconds {v:?}"))
}

fn run(config: Config) -> Result<(), Box<dyn Error>> {
    // First of all: a new generation starts with every signal at its default
    // disposition, and the default for SIGHUP is to die. Each signal comes with its
    // origin: who sent it, or whether the kernel did.
    let signals = Signals::new()?;

    let mut options = Options::new()
        .upgrade_timeout(config.upgrade_timeout)
        .probation(config.probation);
    // Only when asked: otherwise the store follows `$FDSTORE` (systemd 254+, the keeper).
    if config.fd_store {
        options = options.fd_store(true);
    }
    if let Some(path) = &config.pid_file {
        options = options.pid_file(path);
    }
    let upg = Arc::new(Upgrader::new(options)?);
    trace("new");

    // Inherited (from the previous generation, or the keeper's or systemd's fd store), or bound now.
    let (listener, inherited): (TcpListener, bool) = match upg.fds().take(config.listen.as_str())? {
        Some(listener) => (listener, true),
        None => (upg.fds().listen(config.listen.as_str())?, false),
    };
    log!(
        "listening on {} ({})",
        listener.local_addr()?,
        if inherited { "inherited" } else { "new socket" }
    );

    // The control socket: inherited from the previous generation, or bound now. Taken
    // before ready(), which closes inherited fds nobody took; served once ready.
    let control = match &config.control {
        Some(addr) => Some(control::Server::listen(&upg, addr.clone())?),
        None => None,
    };

    // Serve at once, before the other threads and before reporting ready: the sooner this
    // generation accepts, the sooner it answers (both generations poll the queue until
    // the old one stops), and with a probation the previous generation commits only
    // after the window, both serving meanwhile.
    let conns = Arc::new(Connections::default());
    let (server_upg, server_conns) = (Arc::clone(&upg), Arc::clone(&conns));
    let server = thread::Builder::new()
        .name("accept".into())
        .spawn(move || {
            serve(&listener, &server_upg, &server_conns);
            // Stop accepting: the next generation (if any) has its own copy.
            drop(listener);
        })?;

    // Once serving, a failure must not drop what was accepted: stop and drain first.
    let started = UpgradeWorker::start(Arc::clone(&upg)).and_then(|worker| {
        let (signal_upg, requests) = (Arc::clone(&upg), worker.requests.clone());
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || handle_signals(signals, signal_upg, requests))?;
        Ok(worker)
    });
    let worker = match started {
        Ok(worker) => worker,
        Err(e) => {
            upg.stop();
            let _ = server.join();
            conns.wait_idle(Instant::now() + DRAIN_TIMEOUT);
            return Err(e.into());
        }
    };

    // Tells the previous generation we are ready and waits for it to commit; then
    // writes the pid file. Which inherited fds were taken, and which were closed
    // because nobody asked for them: a listener dropped by a configuration change
    // shows up here.
    trace("report");
    let mut ready = upg.ready();
    trace("committed");
    match &mut ready {
        Ok(adoption) => {
            log!("ready; {adoption}");
            // The connections the previous generation hands over, on a thread of their
            // own.
            if let Some(rx) = adoption.handover.take() {
                let (u, c) = (Arc::clone(&upg), Arc::clone(&conns));
                let spawned = thread::Builder::new()
                    .name("handover".into())
                    .spawn(move || receive(rx, &u, &c));
                // Dropping the receiver refuses everything: the previous generation
                // keeps those connections.
                if let Err(e) = spawned {
                    log!("cannot start the handover thread ({e}): the previous generation keeps its connections");
                }
            }
        }
        // Not taken over (stopped meanwhile, or no pid file): the previous generation
        // serves on. Stop accepting, drain what we took, and fail.
        Err(_) => upg.stop(),
    }
    // Serve the control socket once in charge; it returns when this process should
    // exit, after answering the request that ended this generation.
    let control = match (control, &ready) {
        (Some(ctl), Ok(_)) => {
            let u = Arc::clone(&upg);
            let spawned = thread::Builder::new()
                .name("control".into())
                .spawn(move || {
                    log!("control socket on {}", ctl.addr());
                    if let Err(e) = ctl.serve(&u) {
                        log!("control socket failed: {}", error_chain(&e));
                    }
                });
            // Serving already: without its control socket rather than not at all.
            spawned
                .map_err(|e| log!("cannot start the control socket's thread: {e}"))
                .ok()
        }
        _ => None,
    };
    let _ = server.join();
    if let Some(control) = control {
        let _ = control.join();
    }
    // The upgrade that ended this generation may still be logging its result.
    drop(worker.busy.lock());

    let before = conns.active();
    log!("stopped accepting; draining {before} connection(s)");
    // At a stop under systemd, each tick asks for the time the drain needs
    // (`EXTEND_TIMEOUT_USEC=`); after an upgrade, `finish` completes its record.
    let drain = upg.exit().drain(DRAIN_TIMEOUT);
    // Lingering connections have seen the notification too, and park: after an upgrade
    // they go to the new generation; what stays (refused, or a stop) lingers on here.
    let handed = if upg.exit().upgraded() {
        hand_over(&upg, &conns, &drain)
    } else {
        0
    };
    let mut left = conns.active();
    for parked in conns.take_parked() {
        spawn_handler(Job::Linger(parked, false), &upg, &conns);
    }
    while let Some(wait) = drain.tick() {
        left = conns.wait_idle(Instant::now() + wait);
        if left == 0 {
            break;
        }
    }
    if left > 0 {
        log!("drain timeout: exiting with {left} connection(s) still open");
    }
    drain.finish(before.saturating_sub(handed + left) as u64, left as u64);
    if let Some(record) = upg
        .status()
        .last_upgrade()
        .filter(|_| upg.exit().upgraded())
    {
        log!("{record}");
    }
    log!("exit");
    ready.map(drop).map_err(Into::into)
}

/// Runs `upgrade()` on a thread started once, at start-up, so that a `SIGHUP` does not
/// wait for a new thread (it returns promptly once the exit notification fires: the
/// upgrade has succeeded, or `stop()` has cancelled it).
struct UpgradeWorker {
    /// A rendezvous channel: a request goes through only while the worker waits.
    requests: SyncSender<()>,
    /// Held while an upgrade runs and its result is logged.
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
                    trace("upgrade");
                    let result = upg.upgrade();
                    trace("upgraded");
                    match result {
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
                trace("sighup");
                // upgrade() blocks until the new generation is ready or has failed: it
                // runs on the worker, so that SIGTERM is still handled meanwhile.
                if requests.try_send(()).is_err() {
                    log!("upgrade failed: another upgrade is in progress");
                }
            }
            Asked::Stop => upg.stop(),
            Asked::Nothing => {}
        }
    }
}

/// Accepts connections until the upgrader's exit notification fires.
fn serve(listener: &TcpListener, upg: &Arc<Upgrader>, conns: &Arc<Connections>) {
    // Until the exit notification fires: then accept nothing more (the next generation
    // accepts from the same queue).
    for conn in upg.incoming(listener) {
        match conn {
            Ok(conn) => spawn_handler(Job::Hello(conn), upg, conns),
            // The client gave up before we accepted: nothing was lost.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            // Out of fds or memory: the connection stays queued, and incoming() waits a
            // little before the next accept.
            Err(e) => log!("accept failed: {e}"),
        }
    }
    trace("stopped-accepting");
}

/// What a connection thread does.
enum Job {
    /// A new connection: the hello line, then the lingering close.
    Hello(TcpStream),
    /// The lingering close only: a connection handed over, or one that stays with this
    /// generation. `true`: it may move to the next generation (it parks when the exit
    /// notification fires).
    Linger(Lingering, bool),
}

/// A connection after its hello line, and what it has discarded so far.
struct Lingering {
    conn: TcpStream,
    discarded: u64,
}

/// Runs [`handle`] on a thread of its own, counted in `conns` until it returns (or has
/// parked its connection for the handover). If no thread can be started, the connection
/// is served on this one: never dropped.
fn spawn_handler(job: Job, upg: &Arc<Upgrader>, conns: &Arc<Connections>) {
    let slot = Arc::new(Mutex::new(Some(job)));
    let (thread_slot, thread_upg, thread_conns) =
        (Arc::clone(&slot), Arc::clone(upg), Arc::clone(conns));
    let guard = conns.start();
    let spawned = thread::Builder::new().spawn(move || {
        let _guard = guard;
        let job = thread_slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(parked) = job.and_then(|job| handle(job, thread_upg.exit())) {
            thread_conns.park(parked);
        }
    });
    if let Err(e) = spawned {
        log!("cannot start a connection thread ({e}); serving inline");
        let job = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(parked) = job.and_then(|job| handle(job, upg.exit())) {
            conns.park(parked);
        }
    }
}

/// Serves one connection; returns it if it should move to the next generation.
fn handle(job: Job, exit: &Exit) -> Option<Lingering> {
    let result = (|| -> io::Result<Option<Lingering>> {
        match job {
            Job::Hello(mut conn) => {
                conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
                conn.write_all(format!("hello from pid={}\n", std::process::id()).as_bytes())?;
                conn.shutdown(Shutdown::Write)?;
                linger(Lingering { conn, discarded: 0 }, Some(exit))
            }
            Job::Linger(l, movable) => linger(l, Some(exit).filter(|_| movable)),
        }
    })();
    result.unwrap_or_else(|e| {
        log!("connection error: {e}");
        None
    })
}

/// The lingering close: closing a socket with unread input sends a reset, which can
/// destroy the reply before the client has read it. So wait for the client to close
/// first, discarding what it sends: at most [`LINGER_TIMEOUT`] between two reads, and
/// [`MAX_DISCARD`] bytes in all. With `exit`, stop when the exit notification fires
/// after an upgrade and return the connection, to be handed over.
fn linger(mut l: Lingering, exit: Option<&Exit>) -> io::Result<Option<Lingering>> {
    l.conn.set_read_timeout(Some(LINGER_TIMEOUT))?;
    let mut buf = [0u8; 1024];
    while l.discarded < MAX_DISCARD {
        if let Some(exit) = exit.filter(|e| !e.fired() || e.upgraded()) {
            match exit.wait_readable(&l.conn, Some(LINGER_TIMEOUT)) {
                Wake::Exit if exit.upgraded() => return Ok(Some(l)),
                // A stop: linger on here.
                Wake::Exit => continue,
                Wake::TimedOut => break,
                Wake::Readable => {}
            }
        }
        match l.conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => l.discarded += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    Ok(None)
}

/// The old generation, upgraded: hands the parked connections to the new one as they
/// park, until every connection thread has ended or parked (or the drain's deadline).
/// Returns how many the new generation took; what it did not take is parked again, to
/// linger here. The lost ones (accepted by a new generation that then died) are named.
fn hand_over(upg: &Upgrader, conns: &Connections, drain: &Drain) -> usize {
    let sender = upg
        .handover()
        .map_err(|e| {
            log!(
                "no handover, the connections linger here: {}",
                error_chain(&e)
            )
        })
        .ok();
    let mut peers: HashMap<u64, Option<SocketAddr>> = HashMap::new();
    loop {
        // Looked at before taking: a thread parks before it ends, so once none is
        // active, every parked connection is in this take.
        let all_parked = conns.active() == 0;
        if let Some(sender) = &sender {
            for l in conns.take_parked() {
                let peer = l.conn.peer_addr().ok();
                let state = l.discarded.to_le_bytes();
                // On an error it comes back from finish(), with the reason.
                if let Ok(id) = sender.send(l.conn, &[], LINGER_V1, &state) {
                    peers.insert(id, peer);
                }
            }
            let _ = sender.flush();
        }
        if all_parked {
            break;
        }
        // A thread still writing its hello line parks when it is done.
        let Some(wait) = drain.tick() else { break };
        match &sender {
            Some(_) => conns.wait_parked(Instant::now() + wait),
            None => drop(conns.wait_idle(Instant::now() + wait)),
        }
    }
    let Some(sender) = sender else { return 0 };
    let done = match sender.finish(HANDOVER_TIMEOUT) {
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
            "connection {id} lost (from {peer:?}): pid {} took it, then went away",
            done.pid
        );
    }
    for back in done.returned {
        if let Stream::Tcp(conn) = back.stream {
            let discarded = u64::from_le_bytes(back.state.try_into().unwrap_or([0; 8]));
            conns.park(Lingering { conn, discarded });
        }
    }
    done.accepted + done.given
}

/// The new generation: takes the connections the previous one hands over, and lingers
/// on each as if it had accepted it. Ends when the previous generation is done, or when
/// this one is told to exit (what is queued then is refused, and stays there).
fn receive(mut rx: Receiver, upg: &Arc<Upgrader>, conns: &Arc<Connections>) {
    let mut taken = 0;
    loop {
        if upg.exit().wait_readable(&rx, None) == Wake::Exit {
            return;
        }
        loop {
            match rx.recv() {
                // Checked before it is taken: a TCP connection with our state.
                Ok(Some(incoming))
                    if incoming.tag() == LINGER_V1
                        && incoming.is_tcp()
                        && incoming.state().len() == 8 =>
                {
                    match incoming.accept() {
                        Ok((Stream::Tcp(conn), _, state)) => {
                            let discarded = u64::from_le_bytes(state.try_into().unwrap_or([0; 8]));
                            let l = Lingering { conn, discarded };
                            spawn_handler(Job::Linger(l, true), upg, conns);
                            taken += 1;
                        }
                        Ok(_) => {} // not TCP: is_tcp() said it is
                        Err(e) => log!("handover: {}", error_chain(&e)),
                    }
                }
                Ok(Some(other)) => {
                    log!(
                        "handover: refusing connection {} (tag {:#010x}, {} bytes of state): not ours",
                        other.id(),
                        other.tag(),
                        other.state().len()
                    );
                    let _ = other.refuse();
                }
                Ok(None) => break,
                Err(e @ tableflip::Error::HandoverRefused { .. }) => log!("handover: {e}"),
                Err(e) => {
                    log!(
                        "handover: took {taken} connection(s) from pid {}; {e}",
                        rx.pid()
                    );
                    return;
                }
            }
        }
    }
}

/// Counts the connections being handled, so that exiting can wait for them, and holds
/// those parked for the handover.
#[derive(Default)]
struct Connections {
    active: Mutex<usize>,
    parked: Mutex<Vec<Lingering>>,
    changed: Condvar,
}

/// One connection being handled; dropping it ends it.
struct ConnGuard(Arc<Connections>);

impl Connections {
    fn start(self: &Arc<Self>) -> ConnGuard {
        *self.active.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        ConnGuard(Arc::clone(self))
    }

    fn active(&self) -> usize {
        *self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection thread hands its connection over (before it ends).
    fn park(&self, l: Lingering) {
        self.parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(l);
        // Under `active`'s lock, so that a waiter cannot miss it.
        let _active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        self.changed.notify_all();
    }

    fn take_parked(&self) -> Vec<Lingering> {
        std::mem::take(&mut *self.parked.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Waits until a connection is parked, none is active, or `deadline` passes.
    fn wait_parked(&self, deadline: Instant) {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let parked = !self
                .parked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty();
            if parked || *active == 0 || left.is_zero() {
                return;
            }
            active = self
                .changed
                .wait_timeout(active, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until no connection is left or `deadline` passes; returns how many are left.
    fn wait_idle(&self, deadline: Instant) -> usize {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if *active == 0 || left.is_zero() {
                return *active;
            }
            active = self
                .changed
                .wait_timeout(active, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        *self.0.active.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.0.changed.notify_all();
    }
}

/// An error and its chain of sources: "upgrade failed: cannot execute ...: No such file".
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

/// With `TCP_SERVER_TRACE` set (the handoff benchmark sets it), one line
/// `trace PHASE NS` at each step of start-up and upgrade, `NS` on `CLOCK_MONOTONIC`:
/// the benchmark splits a handoff into phases with them.
fn trace(phase: &str) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("TCP_SERVER_TRACE").is_some()) {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let ns = t.tv_sec as u128 * 1_000_000_000 + t.tv_nsec as u128;
        log!("trace {phase} {ns}");
    }
}
