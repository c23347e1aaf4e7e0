//! A small HTTP/1.1 server (std only, keep-alive) that upgrades itself on `SIGHUP`
//! without cutting off a request.
//!
//! ```text
//! http_server [--listen HOST:PORT] [--pid-file PATH] [--upgrade-timeout SECS]
//!             [--probation SECS] [--fd-store] [--keeper]
//!             [--lame-duck SECS] [--control PATH|@NAME]
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
//! `SIGHUP` upgrades, unless the kernel sent it (the terminal went away: see [`asked`]).
//!
//! When the next generation is ready (or on `SIGTERM`/`SIGINT`) this one:
//!
//! 1. stops accepting (the accept loop waits on the listener and the exit fd together,
//!    as in the `tcp_server` example, which explains why): connections still queued on
//!    the listener are the next generation's;
//! 2. becomes a lame duck for `--lame-duck` seconds: it keeps serving the connections it
//!    has, but every response says `Connection: close`, so each client moves to the new
//!    generation after its next request, the one it may already have sent;
//! 3. at the end of that phase closes the keep-alive connections that stayed idle
//!    throughout, and only if no byte of a request has arrived; a new connection gets
//!    [`FIRST_REQUEST_GRACE`] for its first request, which is always answered;
//! 4. exits once every connection is done (under load: a few milliseconds after the
//!    notification), or after [`DRAIN_TIMEOUT`].
//!
//! Why not close idle connections at once: a keep-alive connection that looks idle may
//! have the client's next request on the wire. Closing it makes that request fail, and
//! although RFC 9112 §9.3.1 lets clients retry it, wrk and many others do not (measured:
//! hundreds of failed requests per 10 s of wrk with a `SIGHUP` every 250 ms, 0 with the
//! lame duck). Closing a connection that has been idle for the whole lame-duck phase
//! still races a request sent at that very moment, as any idle timeout does.
//!
//! One thread per connection keeps it short; a server with many idle keep-alive clients
//! would use an event loop (epoll, mio, tokio with `AsyncFd` on the exit fd).

use std::error::Error;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

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
/// After the last response, how long to wait for the client to close (see [`linger`]).
const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Connections accepted per wake-up before the exit fd is looked at again.
const ACCEPT_BATCH: usize = 64;

const USAGE: &str = "usage: http_server [--listen HOST:PORT] [--pid-file PATH] \
                     [--upgrade-timeout SECS] [--lame-duck SECS] [--probation SECS] \
                     [--fd-store] [--keeper] [--control PATH|@NAME] \
                     [--control-uid UID] [--upgrade]";

/// Logs one line to stderr with this process's pid, in one `write`, ignoring errors.
#[path = "common/signals.rs"]
mod signals;

macro_rules! log {
    ($($arg:tt)*) => {{
        let line = format!("[http_server pid={}] {}\n", std::process::id(), format_args!($($arg)*));
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }};
}

struct Config {
    listen: String,
    pid_file: Option<PathBuf>,
    upgrade_timeout: Duration,
    lame_duck: Duration,
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
    let conns = Arc::new(Connections::default());
    let (server_upg, server_conns, lame_duck) =
        (Arc::clone(&upg), Arc::clone(&conns), config.lame_duck);
    let server = thread::Builder::new()
        .name("accept".into())
        .spawn(move || {
            serve(&listener, &server_upg, &server_conns, lame_duck);
            // Stop accepting: the next generation (if any) has its own copy.
            drop(listener);
        })?;
    // Which inherited fds were taken, and which were closed because nobody asked for
    // them: a listener dropped by a configuration change shows up here.
    let ready = upg.ready();
    match &ready {
        Ok(adoption) => log!("ready; {adoption}"),
        // Not taken over: the previous generation serves on. Stop, drain, and fail.
        Err(_) => upg.stop(),
    }
    let control = match &ready {
        Ok(_) => control::serve(control, &upg)?,
        Err(_) => None,
    };
    let _ = server.join();
    // The upgrade that ended this generation may still be logging its result.
    let pending = std::mem::take(&mut *upgrades.lock().unwrap_or_else(|e| e.into_inner()));
    for upgrade in pending {
        let _ = upgrade.join();
    }
    // It answers the request that ended this generation, then returns.
    if let Some(control) = control {
        let _ = control.join();
    }

    let before = conns.active();
    log!(
        "stopped accepting; draining {before} connection(s), lame duck for {:?}",
        config.lame_duck
    );
    // Ticks ask systemd for time at a stop; `finish` completes the upgrade's record.
    let drain = upg.exit().drain(DRAIN_TIMEOUT);
    let mut left = before;
    while let Some(wait) = drain.tick() {
        left = conns.wait_idle(Instant::now() + wait);
        if left == 0 {
            break;
        }
    }
    if left > 0 {
        log!("drain timeout: exiting with {left} connection(s) still open");
    }
    drain.finish((before - left) as u64, left as u64);
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
fn serve(
    listener: &TcpListener,
    upg: &Arc<Upgrader>,
    conns: &Arc<Connections>,
    lame_duck: Duration,
) {
    // The exit notification first: once told to exit, accept nothing more.
    while upg.exit().wait_readable(listener, None) == tableflip::Wake::Readable {
        for _ in 0..ACCEPT_BATCH {
            match listener.accept() {
                Ok((conn, _peer)) => spawn_handler(conn, upg, conns, lame_duck),
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

/// Runs [`handle`] on a thread of its own, counted in `conns` until it returns. If no
/// thread can be started, the connection is served on this one: never dropped.
fn spawn_handler(
    conn: TcpStream,
    upg: &Arc<Upgrader>,
    conns: &Arc<Connections>,
    lame_duck: Duration,
) {
    let slot = Arc::new(Mutex::new(Some(conn)));
    let thread_slot = Arc::clone(&slot);
    let thread_upg = Arc::clone(upg);
    let guard = conns.start();
    let spawned = thread::Builder::new().spawn(move || {
        let _guard = guard;
        let conn = thread_slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(conn) = conn {
            handle(conn, &thread_upg, lame_duck);
        }
    });
    if let Err(e) = spawned {
        log!("cannot start a connection thread ({e}); serving inline");
        let conn = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(conn) = conn {
            handle(conn, upg, lame_duck);
        }
    }
}

fn handle(mut conn: TcpStream, upg: &Upgrader, lame_duck: Duration) {
    if let Err(e) = serve_connection(&mut conn, upg, lame_duck) {
        // Timeouts and resets by the client end up here; nothing more can be sent.
        if e.kind() != io::ErrorKind::UnexpectedEof {
            log!("connection error: {e}");
        }
    }
}

/// Serves requests on `conn` until the client closes it, keep-alive ends, or it stays
/// idle too long (see [`wait_for_request`]).
fn serve_connection(conn: &mut TcpStream, upg: &Upgrader, lame_duck: Duration) -> io::Result<()> {
    // An accepted socket is a new open file description: its mode is ours alone.
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    // Bytes read but not used yet: a partial request, or the next pipelined one.
    let mut buf = Vec::with_capacity(1024);
    let mut first = true;
    loop {
        if buf.is_empty() {
            match wait_for_request(conn, upg, first, lame_duck)? {
                Wake::Request => {}
                // Idle, and not a byte of a request has arrived: nothing is cut off.
                Wake::Idle => return Ok(()),
            }
        }
        let Some(head_len) = read_head(conn, &mut buf)? else {
            return Ok(()); // closed by the client between (or within) requests
        };
        let request = match parse_head(&buf[..head_len]) {
            Ok(request) => request,
            Err((status, why)) => {
                respond(conn, status, &[], why, false, false)?;
                return linger(conn);
            }
        };
        buf.drain(..head_len);
        first = false;
        if request.expect_continue && request.content_length > 0 && buf.is_empty() {
            // The client waits for this before it sends the body (curl does, for POSTs).
            conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        discard_body(conn, &mut buf, request.content_length)?;

        // Lame duck: once this generation should exit, every response ends its
        // connection, and the client sends its next request to the new generation.
        let keep_alive = request.keep_alive && !upg.exit().fired();
        let head_only = request.method == "HEAD";
        if request.method == "GET" || head_only {
            let body = format!("hello from pid={}\n", std::process::id());
            respond(conn, "200 OK", &[], &body, head_only, keep_alive)?;
        } else {
            let allow = ["Allow: GET, HEAD"];
            respond(
                conn,
                "405 Method Not Allowed",
                &allow,
                "",
                false,
                keep_alive,
            )?;
        }
        if !keep_alive {
            return linger(conn);
        }
    }
}

enum Wake {
    /// Bytes of a request have arrived (or the client has closed or reset).
    Request,
    /// Idle until the deadline, with nothing to read.
    Idle,
}

/// Waits for the next request to start, or until the connection has been idle too long:
/// [`IDLE_TIMEOUT`], or, once this process should exit, until the end of the lame-duck
/// phase (`lame_duck` after the exit notification).
///
/// A new connection (`first`) is not idle: its client has just connected and its first
/// request is on the way. It gets [`FIRST_REQUEST_GRACE`] for it once this process
/// should exit (as Go's `net/http` does), or the lame-duck phase if that is longer.
///
/// `Wake::Idle` comes only from a final `poll` with a zero timeout that found nothing to
/// read: a request whose first bytes have arrived is always served.
fn wait_for_request(
    conn: &TcpStream,
    upg: &Upgrader,
    first: bool,
    lame_duck: Duration,
) -> io::Result<Wake> {
    let mut deadline = Instant::now() + IDLE_TIMEOUT;
    let mut fds = [pollin(conn.as_raw_fd()), pollin(upg.exit().as_raw_fd())];
    let mut nfds = fds.len();
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
            // Lame duck: stop watching the exit fd (it stays readable), and shorten the
            // wait. The response to a request that comes meanwhile closes the connection.
            nfds = 1;
            let grace = if first {
                FIRST_REQUEST_GRACE.max(lame_duck)
            } else {
                lame_duck
            };
            deadline = deadline.min(Instant::now() + grace);
            continue;
        }
        if ms == 0 {
            return Ok(Wake::Idle);
        }
    }
}

/// Reads until `buf` holds a whole request head; returns its length including the
/// final `\r\n\r\n`, or `None` if the client closed the connection first.
fn read_head(conn: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
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

struct Request {
    method: String,
    content_length: u64,
    keep_alive: bool,
    /// `Expect: 100-continue`.
    expect_continue: bool,
}

/// Parses a request head. On error: the status to answer with (then close) and why.
fn parse_head(head: &[u8]) -> Result<Request, (&'static str, &'static str)> {
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
fn discard_body(conn: &mut TcpStream, buf: &mut Vec<u8>, len: u64) -> io::Result<()> {
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
fn respond(
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
fn linger(conn: &mut TcpStream) -> io::Result<()> {
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

/// The control socket (`--control`, `--upgrade`), kept apart from the HTTP code.
mod control {
    use std::ffi::OsString;
    use std::process::ExitCode;
    use std::sync::Arc;
    use std::thread::{self, JoinHandle};
    use std::time::Duration;

    use tableflip::control::{request_upgrade, ClientConfig, Server};
    use tableflip::{UnixAddr, Upgrader};

    use super::{error_chain, Config};

    /// `@NAME` is an abstract socket name, anything else a path.
    pub fn addr(v: OsString) -> UnixAddr {
        match v.to_str().and_then(|s| s.strip_prefix('@')) {
            Some(name) => UnixAddr::abstract_name(name),
            None => UnixAddr::Path(v.into()),
        }
    }

    /// `--upgrade`: asks the server to upgrade and waits (its timeout and probation, and
    /// a margin).
    pub fn ask_upgrade(config: &Config) -> ExitCode {
        let Some(addr) = config.control.clone() else {
            eprintln!("http_server: --upgrade needs --control");
            return ExitCode::from(2);
        };
        let wait = config.upgrade_timeout + config.probation + Duration::from_secs(10);
        let mut client = ClientConfig::new(wait);
        if let Some(uid) = config.control_uid {
            client = client.server_uid(uid);
        }
        match request_upgrade(addr, client) {
            Ok(pid) => {
                println!("{pid}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("http_server: upgrade failed: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        }
    }

    pub fn listen(config: &Config, upg: &Upgrader) -> tableflip::Result<Option<Server>> {
        config
            .control
            .clone()
            .map(|addr| Server::listen(upg, addr))
            .transpose()
    }

    /// Serves on a thread of its own until this process should exit.
    pub fn serve(
        server: Option<Server>,
        upg: &Arc<Upgrader>,
    ) -> std::io::Result<Option<JoinHandle<()>>> {
        let Some(server) = server else {
            return Ok(None);
        };
        let upg = Arc::clone(upg);
        thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                if let Err(e) = server.serve(&upg) {
                    log!("control socket failed: {}", error_chain(&e));
                }
            })
            .map(Some)
    }
}
