//! A small HTTP/1.1 server (std only, keep-alive) that upgrades itself on `SIGHUP`
//! without failing or closing a request or a connection.
//!
//! ```text
//! http_server [--listen HOST:PORT] [--pid-file PATH] [--upgrade-timeout SECS]
//!             [--probation SECS] [--fd-store] [--keeper]
//!             [--lame-duck SECS] [--no-handover] [--control PATH|@NAME]
//! http_server --control PATH|@NAME [--control-uid UID] --upgrade
//! ```
//!
//! Defaults: `127.0.0.1:8080`, no pid file, 60 s, 2 s. `GET` (and `HEAD`) of any path
//! answers `200` with the body `hello from pid=<pid>`; other methods get `405`.
//!
//! `--control` serves a control socket (see `tableflip::control`) on a thread of its
//! own; `--upgrade` asks the server there to upgrade, prints the new pid and exits 0,
//! or prints why it failed and exits 1. It believes only the answer of root, of its own
//! user, or of the owner of a socket file in a directory only that owner and root can
//! write to (`/run/http_server`, not `/tmp`); `--control-uid UID` names the uid the
//! server runs as (for an abstract name, when it runs as another user than the client).
//!
//! ```text
//! pid_file="${XDG_RUNTIME_DIR:-.}/http_server.pid"  # a directory of your own, not /tmp
//! cargo run --example http_server -- --pid-file "$pid_file" &
//! curl http://127.0.0.1:8080/              # hello from pid=1234
//! kill -HUP "$(cat "$pid_file")"           # upgrade
//! curl http://127.0.0.1:8080/              # hello from pid=1240
//! kill -TERM "$(cat "$pid_file")"          # graceful stop
//! ```
//!
//! `SIGHUP` upgrades, unless the kernel sent it (the terminal went away: see
//! [`asked`](signals::Request::asked)).
//!
//! When the next generation is ready this one:
//!
//! 1. stops accepting (the accept loop waits on the listener and the exit fd together,
//!    as in the `tcp_server` example, which explains why): connections still queued on
//!    the listener are the next generation's;
//! 2. hands every keep-alive connection to the new generation at its next idle moment,
//!    between two requests, through the handover channel (`tableflip::handover`), with
//!    the bytes it had read and not used (a pipelined request, or the start of one): an
//!    idle connection at once, one busy with a request once its response is written.
//!    The client sees nothing: its next request on the same connection is answered by
//!    the new generation, whether it was sent before, during or after the handover (it
//!    waits in the socket until the generation that owns the connection reads it);
//! 3. exits once every connection is handed over or done (a few milliseconds), or after
//!    [`DRAIN_TIMEOUT`].
//!
//! What cannot be handed over drains as a lame duck, as on a stop (`SIGTERM`,
//! `SIGINT`): a connection still busy after
//! [`HANDOVER_WINDOW`](handover::HANDOVER_WINDOW), one the new generation refused or did
//! not acknowledge in time, every connection with `--no-handover` (what a server whose
//! connections cannot move must do: TLS, a protocol with state it cannot write down) or
//! when the new generation takes no handover channel (an older release).
//! For `--lame-duck` seconds it keeps serving them, but every response says
//! `Connection: close`, so each client moves on after its next request, the one it may
//! already have sent; at the end of that phase it closes the keep-alive connections that
//! stayed idle throughout, and only if no byte of a request has arrived (a new
//! connection gets [`FIRST_REQUEST_GRACE`] for its first request, which is always
//! answered).
//!
//! Why not close idle connections at once: a keep-alive connection that looks idle may
//! have the client's next request on the wire. Closing it makes that request fail, and
//! although RFC 9112 §9.3.1 lets clients retry it, wrk and many others do not (measured:
//! hundreds of failed requests per 10 s of wrk with a `SIGHUP` every 250 ms, 0 with the
//! lame duck). Closing a connection that has been idle for the whole lame-duck phase
//! still races a request sent at that very moment, as any idle timeout does: the
//! handover is what removes that race.
//!
//! Where it is: this file has the server, the accept loop and a connection's life;
//! `http.rs` the HTTP/1.1 it speaks, `handover.rs` the handover channel's two ends,
//! `control.rs` the control socket.
//!
//! One thread per connection keeps it short; a server with many idle keep-alive clients
//! would use an event loop (epoll, mio, tokio with `AsyncFd` on the exit fd).

use std::error::Error;
use std::ffi::OsString;
use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use handover::{adopt, hand_over, Handover};
use http::{discard_body, linger, parse_head, read_head, respond};
use signals::{Asked, Signals};
use tableflip::{Options, Upgrader};

/// How long an exiting generation waits for its connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an exiting generation keeps idle keep-alive connections open, answering
/// with `Connection: close` (`--lame-duck`; at most [`DRAIN_TIMEOUT`]).
const LAME_DUCK: Duration = Duration::from_secs(2);
/// How long a keep-alive connection may sit idle between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Once this process should exit, how long a new connection may take to send its first
/// request (see [`wait_for_request`]); at least the lame-duck phase.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(5);
/// Longest a read or write may block once a request has started.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections accepted per wake-up before the exit fd is looked at again.
const ACCEPT_BATCH: usize = 64;

const USAGE: &str = "usage: http_server [--listen HOST:PORT] [--pid-file PATH] \
                     [--upgrade-timeout SECS] [--lame-duck SECS] [--no-handover] \
                     [--probation SECS] [--fd-store] [--keeper] [--control PATH|@NAME] \
                     [--control-uid UID] [--upgrade]";

#[path = "../common/signals.rs"]
mod signals;

/// Logs one line to stderr with this process's pid, in one `write`, ignoring errors.
macro_rules! log {
    ($($arg:tt)*) => {{
        let line = format!("[http_server pid={}] {}\n", std::process::id(), format_args!($($arg)*));
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }};
}

// Declared after `log!`, so that they can use it.
mod control;
mod handover;
mod http;

struct Config {
    listen: String,
    pid_file: Option<PathBuf>,
    upgrade_timeout: Duration,
    lame_duck: Duration,
    /// `--no-handover`: drain every connection as a lame duck.
    no_handover: bool,
    probation: Duration,
    fd_store: bool,
    keeper: bool,
    control: Option<tableflip::UnixAddr>,
    /// `--control-uid`: the uid the server on the control socket runs as.
    control_uid: Option<u32>,
    upgrade: bool,
}

fn main() -> ExitCode {
    let config = match parse_args(std::env::args_os().skip(1)) {
        Ok(Some(config)) => config,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("http_server: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if config.upgrade {
        return control::ask_upgrade(&config);
    }
    // `--keeper`: this process stays in front of the generations, with one pid, for
    // the service's whole life (containers, supervisors); the generations it starts
    // run this same `main` and go on from here.
    if config.keeper {
        if let Err(e) = tableflip::Keeper::new().run() {
            eprintln!("http_server: {e}");
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
        lame_duck: LAME_DUCK,
        no_handover: false,
        probation: Duration::ZERO,
        fd_store: false,
        keeper: false,
        control: None,
        control_uid: None,
        upgrade: false,
    };
    while let Some(arg) = args.next() {
        let flag = arg.to_string_lossy().into_owned();
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let seconds = |v: OsString, zero_ok: bool| {
            v.to_str()
                .and_then(|s| s.parse::<f64>().ok())
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .filter(|d| zero_ok || !d.is_zero())
                .ok_or_else(|| format!("{flag}: bad number of seconds {v:?}"))
        };
        match flag.as_str() {
            "--listen" => {
                config.listen = value()?.into_string().map_err(|_| "--listen: not UTF-8")?
            }
            "--pid-file" => config.pid_file = Some(value()?.into()),
            "--upgrade-timeout" => config.upgrade_timeout = seconds(value()?, false)?,
            "--probation" => config.probation = seconds(value()?, true)?,
            "--fd-store" => config.fd_store = true,
            "--keeper" => config.keeper = true,
            "--lame-duck" => {
                config.lame_duck = seconds(value()?, true)?;
                if config.lame_duck > DRAIN_TIMEOUT {
                    return Err(format!("--lame-duck: at most {DRAIN_TIMEOUT:?}"));
                }
            }
            "--no-handover" => config.no_handover = true,
            "--control" => config.control = Some(control::addr(value()?)),
            "--control-uid" => {
                let v = value()?;
                let uid = v.to_str().and_then(|s| s.parse().ok());
                config.control_uid = Some(uid.ok_or_else(|| format!("{flag}: bad uid {v:?}"))?);
            }
            "--upgrade" => config.upgrade = true,
            "-h" | "--help" => return Ok(None),
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(Some(config))
}

fn run(config: Config) -> Result<(), Box<dyn Error>> {
    // Before anything else: a new generation starts with SIGHUP at its default (death).
    // Each signal comes with its origin: who sent it, or whether the kernel did.
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
    // Inherited (from the previous generation, or a fd store), or bound now.
    let (listener, inherited): (TcpListener, bool) = match upg.fds().take(config.listen.as_str())? {
        Some(listener) => (listener, true),
        None => (upg.fds().listen(config.listen.as_str())?, false),
    };
    // The same mode in every generation: O_NONBLOCK is shared between them.
    listener.set_nonblocking(true)?;
    log!(
        "listening on http://{} ({})",
        listener.local_addr()?,
        if inherited { "inherited" } else { "new socket" }
    );

    let upgrades = UpgradeThreads::default();
    let (signal_upg, signal_upgrades) = (Arc::clone(&upg), Arc::clone(&upgrades));
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || handle_signals(signals, signal_upg, signal_upgrades))?;

    // Taken before ready() (which closes inherited fds nobody took), served once ready.
    let control = control::listen(&config, &upg)?;
    // Serve at once, before reporting ready: with a probation the previous generation
    // commits only after the window, and both serve meanwhile.
    let shared = Arc::new(Shared {
        upg: Arc::clone(&upg),
        conns: Arc::new(Connections::default()),
        handover: Handover::default(),
        lame_duck: config.lame_duck,
    });
    let server_shared = Arc::clone(&shared);
    let server = thread::Builder::new()
        .name("accept".into())
        .spawn(move || {
            serve(&listener, &server_shared);
            // Stop accepting: the next generation (if any) has its own copy.
            drop(listener);
        })?;
    // Which inherited fds were taken, and which were closed because nobody asked for
    // them: a listener dropped by a configuration change shows up here.
    let mut ready = upg.ready();
    match &mut ready {
        Ok(adoption) => {
            log!("ready; {adoption}");
            // The connections the previous generation hands over, on a thread of their
            // own until it has handed over everything.
            if let Some(rx) = adoption.handover.take() {
                let adopt_shared = Arc::clone(&shared);
                thread::Builder::new()
                    .name("handover".into())
                    .spawn(move || adopt(rx, &adopt_shared))?;
            }
        }
        // Not taken over: the previous generation serves on. Stop, drain, and fail.
        Err(_) => upg.stop(),
    }
    let control = match &ready {
        Ok(_) => control::serve(control, &upg)?,
        Err(_) => None,
    };
    let _ = server.join();

    let before = shared.conns.active();
    // Ticks ask systemd for time at a stop; `finish` completes the upgrade's record.
    let drain = upg.exit().drain(DRAIN_TIMEOUT);
    // Upgraded: the connections go to the new generation, each at its next idle moment.
    let handed = if upg.exit().upgraded() && !config.no_handover {
        log!("stopped accepting; handing {before} connection(s) over");
        hand_over(&shared)
    } else {
        shared.handover.close();
        0
    };
    let lame = before - handed;
    if lame > 0 {
        log!(
            "draining {lame} connection(s), lame duck for {:?}",
            config.lame_duck
        );
    }
    // The upgrade that ended this generation may still be logging its result.
    let pending = std::mem::take(&mut *upgrades.lock().unwrap_or_else(|e| e.into_inner()));
    for upgrade in pending {
        let _ = upgrade.join();
    }
    // It answers the request that ended this generation, then returns.
    if let Some(control) = control {
        let _ = control.join();
    }

    let mut left = shared.conns.active();
    while let Some(wait) = drain.tick() {
        left = shared.conns.wait_idle(Instant::now() + wait);
        if left == 0 {
            break;
        }
    }
    if left > 0 {
        log!("drain timeout: exiting with {left} connection(s) still open");
    }
    drain.finish(lame.saturating_sub(left) as u64, left as u64);
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

/// The threads running `upgrade()`, joined before exiting. They return promptly once
/// the exit fd fires: the upgrade has succeeded, or `stop()` has cancelled it.
type UpgradeThreads = Arc<Mutex<Vec<JoinHandle<()>>>>;

fn handle_signals(mut signals: Signals, upg: Arc<Upgrader>, upgrades: UpgradeThreads) {
    for request in signals.forever() {
        log!("{}", request.line);
        match request.asked {
            Asked::Upgrade => {}
            Asked::Stop => {
                upg.stop();
                continue;
            }
            Asked::Nothing => continue,
        }
        // upgrade() blocks until the new generation is ready or has failed.
        let upg = Arc::clone(&upg);
        // Locked before the thread starts, so that the exiting main thread finds it.
        let mut threads = upgrades.lock().unwrap_or_else(|e| e.into_inner());
        threads.retain(|t| !t.is_finished());
        let spawned = thread::Builder::new()
            .name("upgrade".into())
            .spawn(move || match upg.upgrade() {
                Ok(pid) => log!("upgrade succeeded: the new generation (pid {pid}) is ready"),
                Err(e) => log!("upgrade failed: {}", error_chain(&e)),
            });
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(e) => log!("upgrade failed: cannot start a thread: {e}"),
        }
    }
}

/// Accepts connections until the upgrader's exit fd becomes readable.
fn serve(listener: &TcpListener, shared: &Arc<Shared>) {
    // The exit notification first: once told to exit, accept nothing more.
    while shared.upg.exit().wait_readable(listener, None) == tableflip::Wake::Readable {
        for _ in 0..ACCEPT_BATCH {
            match listener.accept() {
                Ok((stream, _peer)) => spawn_handler(Conn::accepted(stream), shared),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    log!("accept failed: {e}");
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) {
                        thread::sleep(Duration::from_millis(100));
                    }
                    break;
                }
            }
        }
    }
}

/// What the accept loop, the connection threads and the handover share.
struct Shared {
    upg: Arc<Upgrader>,
    conns: Arc<Connections>,
    handover: Handover,
    lame_duck: Duration,
}

/// A connection, and what this generation knows of it.
struct Conn {
    stream: TcpStream,
    /// Bytes read and not used yet: a partial request, or the next pipelined one.
    buf: Vec<u8>,
    /// No request has been served on it yet.
    first: bool,
    /// It came back from the new generation: it drains here, and is not offered again.
    stays: bool,
}

impl Conn {
    fn accepted(stream: TcpStream) -> Conn {
        Conn::adopted(stream, Vec::with_capacity(1024), true)
    }

    fn adopted(stream: TcpStream, buf: Vec<u8>, first: bool) -> Conn {
        Conn {
            stream,
            buf,
            first,
            stays: false,
        }
    }

    fn stays(stream: TcpStream, buf: Vec<u8>, first: bool) -> Conn {
        Conn {
            stays: true,
            ..Conn::adopted(stream, buf, first)
        }
    }
}

/// Runs [`handle`] on a thread of its own, counted in `conns` until it returns. If no
/// thread can be started, the connection is served on this one: never dropped.
fn spawn_handler(conn: Conn, shared: &Arc<Shared>) {
    let slot = Arc::new(Mutex::new(Some(conn)));
    let thread_slot = Arc::clone(&slot);
    let thread_shared = Arc::clone(shared);
    let guard = shared.conns.start();
    let spawned = thread::Builder::new().spawn(move || {
        let _guard = guard;
        let conn = thread_slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(conn) = conn {
            handle(conn, &thread_shared);
        }
    });
    if let Err(e) = spawned {
        log!("cannot start a connection thread ({e}); serving inline");
        let conn = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(conn) = conn {
            handle(conn, shared);
        }
    }
}

fn handle(conn: Conn, shared: &Shared) {
    if let Err(e) = serve_connection(conn, shared) {
        // Timeouts and resets by the client end up here; nothing more can be sent.
        if e.kind() != io::ErrorKind::UnexpectedEof {
            log!("connection error: {e}");
        }
    }
}

/// Serves requests on `c` until the client closes it, keep-alive ends, it stays idle
/// too long (see [`wait_for_request`]), or, once this generation should exit, it is
/// handed to the new generation between two requests.
fn serve_connection(mut c: Conn, shared: &Shared) -> io::Result<()> {
    let upg = &shared.upg;
    // An accepted socket is a new open file description: its mode is ours alone.
    c.stream.set_nonblocking(false)?;
    c.stream.set_read_timeout(Some(IO_TIMEOUT))?;
    c.stream.set_write_timeout(Some(IO_TIMEOUT))?;
    // Once this generation should exit and the connection stays: a lame duck.
    let mut lame = false;
    loop {
        // Between two requests: where a connection goes to the new generation, with
        // what has been read of its next request.
        if !lame && upg.exit().fired() {
            match shared.handover.offer(c.stream, &c.buf, c.first, c.stays) {
                Ok(()) => return Ok(()),
                Err(stream) => {
                    c.stream = stream;
                    lame = true;
                }
            }
        }
        if c.buf.is_empty() {
            match wait_for_request(&c.stream, upg, c.first, shared.lame_duck, lame)? {
                Wake::Request => {}
                // Idle, and not a byte of a request has arrived: nothing is cut off.
                Wake::Idle => return Ok(()),
                Wake::Exit => continue,
            }
        }
        let Some(head_len) = read_head(&mut c.stream, &mut c.buf)? else {
            return Ok(()); // closed by the client between (or within) requests
        };
        let request = match parse_head(&c.buf[..head_len]) {
            Ok(request) => request,
            Err((status, why)) => {
                respond(&mut c.stream, status, &[], why, false, false)?;
                return linger(&mut c.stream);
            }
        };
        c.buf.drain(..head_len);
        c.first = false;
        if request.expect_continue && request.content_length > 0 && c.buf.is_empty() {
            // The client waits for this before it sends the body (curl does, for POSTs).
            c.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        discard_body(&mut c.stream, &mut c.buf, request.content_length)?;

        // Lame duck: once this generation should exit and the connection is not to be
        // handed over, every response ends its connection, and the client sends its
        // next request to the new generation.
        lame = lame || (upg.exit().fired() && !shared.handover.takes(c.stays));
        let keep_alive = request.keep_alive && !lame;
        let head_only = request.method == "HEAD";
        if request.method == "GET" || head_only {
            let body = format!("hello from pid={}\n", std::process::id());
            respond(&mut c.stream, "200 OK", &[], &body, head_only, keep_alive)?;
        } else {
            let allow = ["Allow: GET, HEAD"];
            respond(
                &mut c.stream,
                "405 Method Not Allowed",
                &allow,
                "",
                false,
                keep_alive,
            )?;
        }
        if !keep_alive {
            return linger(&mut c.stream);
        }
    }
}

enum Wake {
    /// Bytes of a request have arrived (or the client has closed or reset).
    Request,
    /// Idle until the deadline, with nothing to read.
    Idle,
    /// The exit notification fired, with nothing to read.
    Exit,
}

/// Waits for the next request to start, until the connection has been idle too long
/// ([`IDLE_TIMEOUT`]), or until the exit notification fires. A `lame` duck (this
/// generation should exit, and the connection stays) waits only until the end of the
/// lame-duck phase (`lame_duck` from now).
///
/// A new connection (`first`) is not idle: its client has just connected and its first
/// request is on the way. As a lame duck it gets [`FIRST_REQUEST_GRACE`] for it (as Go's
/// `net/http` does), or the lame-duck phase if that is longer.
///
/// `Wake::Idle` comes only from a final `poll` with a zero timeout that found nothing to
/// read: a request whose first bytes have arrived is always served.
fn wait_for_request(
    conn: &TcpStream,
    upg: &Upgrader,
    first: bool,
    lame_duck: Duration,
    lame: bool,
) -> io::Result<Wake> {
    let mut deadline = Instant::now() + IDLE_TIMEOUT;
    if lame {
        let grace = if first {
            FIRST_REQUEST_GRACE.max(lame_duck)
        } else {
            lame_duck
        };
        deadline = deadline.min(Instant::now() + grace);
    }
    let mut fds = [pollin(conn.as_raw_fd()), pollin(upg.exit().as_raw_fd())];
    // A lame duck does not watch the exit fd: it has fired, and stays readable.
    let nfds = if lame { 1 } else { 2 };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: the first `nfds` entries of `fds` are initialised pollfd structs,
        // valid for the call; both fds stay open for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), nfds as libc::nfds_t, ms) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // A request that has started arriving is served, even if exit was requested.
        if fds[0].revents != 0 {
            return Ok(Wake::Request);
        }
        if nfds == 2 && fds[1].revents != 0 {
            return Ok(Wake::Exit);
        }
        if ms == 0 {
            return Ok(Wake::Idle);
        }
    }
}

/// Counts the connections being handled, so that exiting can wait for them.
#[derive(Default)]
struct Connections {
    active: Mutex<usize>,
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

fn pollin(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
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
