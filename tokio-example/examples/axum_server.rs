//! An axum server on tokio and hyper (HTTP/1.1 and HTTP/2) that upgrades itself on
//! `SIGHUP` without failing a request.
//!
//! ```text
//! axum_server [--listen HOST:PORT] [--pid-file PATH] [--upgrade-timeout SECS]
//!             [--probation SECS] [--fd-store] [--keeper]
//!             [--lame-duck SECS] [--no-handover]
//! ```
//!
//! The same flags and answers as the `http_server` example: defaults `127.0.0.1:8080`,
//! no pid file, 60 s, 2 s; `GET` (and `HEAD`) of any path answers `200` with the body
//! `hello from pid=<pid>`, other methods get `405`. HTTP/2 is spoken with prior knowledge
//! (`curl --http2-prior-knowledge`, `h2load`), next to HTTP/1.1 on the same port.
//!
//! It is the example of the `tokio-example` package, which keeps tokio, hyper and axum
//! out of the main package's build. Try it from the repository's root:
//!
//! ```text
//! pid_file="${XDG_RUNTIME_DIR:-.}/axum_server.pid"  # a directory of your own, not /tmp
//! cargo run --example axum_server -- --pid-file "$pid_file" &
//! curl http://127.0.0.1:8080/               # hello from pid=1234
//! kill -HUP "$(cat "$pid_file")"            # upgrade
//! curl --http2-prior-knowledge http://127.0.0.1:8080/   # hello from pid=1240
//! kill -TERM "$(cat "$pid_file")"           # graceful stop
//! ```
//!
//! How tableflip meets tokio:
//!
//! - The listener comes from the registry (`upg.fds().listen::<TcpListener>(..)`), is set
//!   non-blocking, and goes into [`tokio::net::TcpListener::from_std`]. `O_NONBLOCK` is
//!   shared by the generations (it lives on the open file description), so every
//!   generation must use the same mode; the std examples set it too.
//! - Signals are read on a thread of their own with signal-hook, as in the std examples:
//!   tokio's signal streams do not say who sent a signal, and a `SIGHUP` that the kernel
//!   sent is no upgrade request (see [`asked`]). `upgrade()` blocks until the new
//!   generation is ready or has failed, so it runs in `spawn_blocking`.
//! - The exit notification is awaited through `Upgrader::exit().try_clone()`, taken by
//!   tokio as the pipe read end it is (`tokio::net::unix::pipe::Receiver`): no thread is
//!   parked on it, and no `unsafe`.
//!
//! Each connection is a task of its own. It reads the first bytes itself to tell
//! HTTP/2 (the client preface) from HTTP/1, and serves it with hyper's builder for that
//! protocol, the bytes it read first put back in front of the stream ([`Prefixed`]).
//! hyper-util's automatic builder does the same, but gives neither its read buffer nor
//! the stream back: a connection it serves can only be closed. Once this generation
//! should exit:
//!
//! 1. it stops accepting; the connections still queued are the next generation's;
//! 2. HTTP/1 connections go to the new generation through the handover channel
//!    (`tableflip::handover`), each at its next idle moment, between two requests:
//!    hyper's graceful shutdown ends a connection that has no request under way without
//!    closing its socket (`poll_without_shutdown`), and `into_parts` gives the stream
//!    back with the bytes hyper had read and not used (the start of the next request,
//!    if some has come), which travel with it. hyper says nothing of idleness, so the
//!    service counts requests and responses, and the stream is wrapped ([`Watched`]) to
//!    know that the last response is written: a connection busy with a request finishes
//!    it here first. A connection that has not shown its protocol yet goes with the
//!    bytes it has sent;
//! 3. HTTP/2 connections cannot move (hyper keeps their state), and get `GOAWAY`:
//!    first one of this example's (last stream id 2³¹−1) with a `PING`; once the client
//!    has acknowledged that `PING`, hyper's graceful shutdown, whose own `PING` round
//!    trip ends with the final `GOAWAY`. Every stream the client opened before it saw
//!    the first `GOAWAY` is served: see [`GoAway`] for why hyper's shutdown alone is not
//!    enough;
//! 4. the process exits once every connection is handed over or done (a few
//!    milliseconds), or after [`DRAIN_TIMEOUT`].
//!
//! What cannot be handed over (`--no-handover`, a stop, a new generation that refused a
//! connection, one of an older release) drains as a lame duck instead: responses say
//! `Connection: close` for `--lame-duck` seconds, then the connections idle since their
//! last response (and those that have not sent a first request after
//! [`FIRST_REQUEST_GRACE`]) are closed.
//!
//! Why not `axum::serve(..).with_graceful_shutdown(..)`: it closes every idle keep-alive
//! connection at once, racing the next request that the client may already have sent
//! (wrk, like many clients, does not retry it), and hyper-util's graceful shutdown also
//! closes a connection it has accepted but not read yet, request bytes buffered or not:
//! about 37 failed requests per upgrade, measured.
//!
//! One current-thread runtime keeps it small (tokio features `rt`, `net`, `sync`, `time`;
//! no macros); a busy server would use the multi-thread runtime.

use std::convert::Infallible;
use std::error::Error;
use std::ffi::OsString;
use std::future::{poll_fn, Future};
use std::io;
use std::path::PathBuf;
use std::pin::{pin, Pin};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::server::conn::{http1, http2};
use hyper::service::{service_fn, Service as _};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use signals::{Asked, Signals};
use tableflip::handover::{Receiver, Returned, Sender, Stream};
use tableflip::{Options, Upgrader};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant, Sleep};

/// How long an exiting generation waits for its connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an exiting generation answers HTTP/1 requests with `Connection: close`
/// before it shuts down what is left (`--lame-duck`; at most [`DRAIN_TIMEOUT`]).
const LAME_DUCK: Duration = Duration::from_secs(2);
/// Once this process should exit, how long a new connection may take to send its first
/// request; at least the lame-duck phase.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(5);
/// How often a draining connection looks at the clock.
const TICK: Duration = Duration::from_millis(50);
/// How long an exiting generation waits for the connections busy with a request to
/// reach their next idle moment and be handed over; then the rest drain as lame ducks.
const HANDOVER_WINDOW: Duration = Duration::from_secs(5);
/// How long the new generation has to acknowledge the connections handed to it.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an HTTP/2 client has to acknowledge the `PING` after this example's
/// `GOAWAY`, before hyper's graceful shutdown starts anyway.
const GOAWAY_ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// The handover's tag for a connection of this example (`"HTv1"`). Its state is two
/// bytes: the protocol (0: not known yet, 1: HTTP/1), and 1 if no request has been
/// served on it yet, else 0.
const HANDOVER_TAG: u32 = u32::from_be_bytes(*b"HTv1");

const USAGE: &str = "usage: axum_server [--listen HOST:PORT] [--pid-file PATH] \
                     [--upgrade-timeout SECS] [--lame-duck SECS] [--no-handover] \
                     [--probation SECS] [--fd-store] [--keeper]";

// The main package's, shared by every example.
#[path = "../../examples/common/signals.rs"]
mod signals;

/// Logs one line to stderr with this process's pid, in one `write`, ignoring errors.
macro_rules! log {
    ($($arg:tt)*) => {{
        let line = format!("[axum_server pid={}] {}\n", std::process::id(), format_args!($($arg)*));
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }};
}

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
}

fn main() -> ExitCode {
    let config = match parse_args(std::env::args_os().skip(1)) {
        Ok(Some(config)) => config,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("axum_server: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // `--keeper`: this process stays in front of the generations, with one pid, for
    // the service's whole life (containers, supervisors); the generations it starts
    // run this same `main` and go on from here.
    if config.keeper {
        if let Err(e) = tableflip::Keeper::new().run() {
            eprintln!("axum_server: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Into::into)
        .and_then(|runtime| runtime.block_on(run(config)));
    match result {
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
            "-h" | "--help" => return Ok(None),
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(Some(config))
}

async fn run(config: Config) -> Result<(), Box<dyn Error>> {
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
    let (listener, inherited): (std::net::TcpListener, bool) =
        match upg.fds().take(config.listen.as_str())? {
            Some(listener) => (listener, true),
            None => (upg.fds().listen(config.listen.as_str())?, false),
        };
    // tokio needs it non-blocking; and since O_NONBLOCK is shared with the other
    // generation, every generation sets it (and none clears it).
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    log!(
        "listening on http://{} ({})",
        listener.local_addr()?,
        if inherited { "inherited" } else { "new socket" }
    );
    // The exit notification, owned, as tokio's pipe receiver (it is a pipe's read end):
    // awaited, never read; no thread is parked on it.
    let exit = tokio::net::unix::pipe::Receiver::from_owned_fd(upg.exit().try_clone()?.into())?;

    let upgrades = UpgradeTasks::default();
    let (signal_upg, signal_upgrades) = (Arc::clone(&upg), Arc::clone(&upgrades));
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || handle_signals(signals, signal_upg, signal_upgrades, runtime))?;

    let hello = get(|| async { format!("hello from pid={}\n", std::process::id()) });
    let app = Router::new()
        .route("/", hello.clone())
        .route("/{*path}", hello);
    let ctx = Arc::new(Ctx {
        app: TowerToHyperService::new(app),
        phase: watch::channel(Phase::Serving).0,
        alive: watch::channel(()).0,
        handover: Mutex::new(None),
        lame_duck: config.lame_duck,
    });

    // Report ready while serving (below): with a probation the previous generation
    // commits only after the window. ready() blocks: on a blocking thread, which then
    // takes the connections the previous generation hands over. Which inherited fds
    // were taken, and which were closed because nobody asked for them: a listener
    // dropped by a configuration change shows up here.
    let reporter = {
        let (upg, ctx) = (Arc::clone(&upg), Arc::clone(&ctx));
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let mut ready = upg.ready();
            match &mut ready {
                Ok(adoption) => {
                    log!("ready; {adoption}");
                    if let Some(rx) = adoption.handover.take() {
                        adopt(rx, &upg, &ctx, &runtime);
                    }
                }
                // Not taken over: the previous generation serves on. Stop and drain.
                Err(_) => upg.stop(),
            }
            ready.map(drop)
        })
    };

    loop {
        // The exit fd first: once told to exit, accept nothing more.
        match first(pin!(exit.readable()), listener.accept()).await {
            Either::Left(Ok(_)) => break,
            Either::Left(Err(e)) => {
                log!("waiting for the exit fd failed ({e}); exiting");
                break;
            }
            Either::Right(Ok((stream, _peer))) => ctx.spawn(Conn::accepted(stream)),
            // The client gave up before we accepted: nothing was lost.
            Either::Right(Err(e)) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Either::Right(Err(e)) => {
                log!("accept failed: {e}");
                // Out of fds or memory: the connection stays queued; back off.
                sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // Stop accepting: the next generation (if any) has its own copy of the socket.
    drop(listener);

    let before = ctx.alive.receiver_count();
    // Ticks ask systemd for time at a stop; `finish` completes the upgrade's record.
    let drain = upg.exit().drain(DRAIN_TIMEOUT);
    // Upgraded: HTTP/1 connections go to the new generation, each at its next idle
    // moment; HTTP/2 ones get GOAWAY.
    let handed = if upg.exit().upgraded() && !config.no_handover {
        log!("stopped accepting; handing {before} connection(s) over");
        hand_over(&upg, &ctx).await
    } else {
        0
    };
    let lame = before.saturating_sub(handed);
    ctx.phase
        .send_replace(Phase::Drain(Instant::now() + config.lame_duck));
    if lame > 0 {
        log!(
            "draining {lame} connection(s), lame duck for {:?}",
            config.lame_duck
        );
    }
    while let Some(wait) = drain.tick() {
        if timeout(wait, ctx.alive.closed()).await.is_ok() {
            break;
        }
    }
    let left = ctx.alive.receiver_count();
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
    // The upgrade that ended this generation may still be logging its result.
    let pending = std::mem::take(&mut *upgrades.lock().unwrap_or_else(|e| e.into_inner()));
    for upgrade in pending {
        let _ = upgrade.await;
    }
    log!("exit");
    match reporter.await {
        Ok(Err(e)) => Err(e.into()),
        _ => Ok(()),
    }
}

/// The old generation, upgraded: opens the handover to the connection tasks, which hand
/// their HTTP/1 connections over at their next idle moment; waits for them (at most
/// [`HANDOVER_WINDOW`]), closes it, and serves as lame ducks the connections that stay
/// (refused, not acknowledged in time). Returns how many went.
async fn hand_over(upg: &Upgrader, ctx: &Arc<Ctx>) -> usize {
    match upg.handover() {
        Ok(sender) => *ctx.sender() = Some(sender),
        Err(e) => {
            log!(
                "no handover ({}): every connection drains here",
                error_chain(&e)
            );
            return 0;
        }
    }
    ctx.phase.send_replace(Phase::HandOver);
    let deadline = Instant::now() + HANDOVER_WINDOW;
    loop {
        // Wakes up now and then to read the answers, so that the new generation always
        // has room to send them.
        let wait = deadline.min(Instant::now() + Duration::from_millis(20));
        let done = tokio::time::timeout_at(wait, ctx.alive.closed())
            .await
            .is_ok();
        let refused = match ctx.sender().as_ref() {
            Some(sender) => sender.answers().unwrap_or_default(),
            None => Vec::new(),
        };
        for back in refused {
            ctx.stay(back);
        }
        if done || Instant::now() >= deadline {
            break;
        }
    }
    // Nothing more is handed over: what is still busy drains here.
    let Some(sender) = ctx.sender().take() else {
        return 0;
    };
    ctx.phase
        .send_replace(Phase::Drain(Instant::now() + ctx.lame_duck));
    // finish() waits for the answers: on a blocking thread.
    match tokio::task::spawn_blocking(move || sender.finish(HANDOVER_TIMEOUT)).await {
        Ok(Ok(done)) => {
            log!("{done}");
            let went = done.accepted + done.given;
            for back in done.returned {
                ctx.stay(back);
            }
            went
        }
        Ok(Err(e)) => {
            log!("handover: {}", error_chain(&e));
            0
        }
        Err(e) => {
            log!("handover: {e}");
            0
        }
    }
}

/// The new generation: takes the connections the previous one hands over, on the
/// blocking thread that reported ready, and serves each in a task like the ones it
/// accepts, with the bytes the previous generation had read from it.
fn adopt(mut rx: Receiver, upg: &Upgrader, ctx: &Arc<Ctx>, runtime: &tokio::runtime::Handle) {
    loop {
        match rx.recv() {
            Ok(Some(incoming)) => {
                // What it says of itself comes from the previous generation: checked.
                let known = match (incoming.tag(), incoming.is_tcp(), incoming.state()) {
                    (HANDOVER_TAG, true, &[0, first @ (0 | 1)]) => Some((None, first == 1)),
                    (HANDOVER_TAG, true, &[1, first @ (0 | 1)]) => {
                        Some((Some(Proto::Http1), first == 1))
                    }
                    _ => None,
                };
                let Some((proto, first)) = known else {
                    log!("handover: refusing {incoming:?}: not a connection of ours");
                    let _ = incoming.refuse();
                    continue;
                };
                match incoming.accept() {
                    Ok((Stream::Tcp(stream), unread, _)) => {
                        let ctx = Arc::clone(ctx);
                        let conn = move || -> io::Result<Conn> {
                            stream.set_nonblocking(true)?;
                            let stream = TcpStream::from_std(stream)?;
                            Ok(Conn::adopted(stream, unread, proto, first))
                        };
                        // from_std needs the runtime: in a task.
                        runtime.spawn(async move {
                            match conn() {
                                Ok(conn) => ctx.spawn(conn),
                                Err(e) => log!("handover: {e}"),
                            }
                        });
                    }
                    Ok(_) => {} // is_tcp() said TCP
                    Err(e) => log!("handover: {}", error_chain(&e)),
                }
            }
            // Nothing more for now: wait for more, or for this generation's own exit
            // (then the next recv() refuses what is left and ends).
            Ok(None) => {
                let _ = upg.exit().wait_readable(&rx, None);
            }
            Err(tableflip::Error::HandoverRefused { reason, .. }) => {
                log!("handover: refused something that arrived: {reason}")
            }
            Err(tableflip::Error::HandoverEnded { .. }) => return,
            Err(e) => {
                log!("handover: {}", error_chain(&e));
                return;
            }
        }
    }
}

/// The tasks running `upgrade()`, awaited before exiting. They return promptly once the
/// exit fd fires: the upgrade has succeeded, or `stop()` has cancelled it.
type UpgradeTasks = Arc<Mutex<Vec<JoinHandle<()>>>>;

/// Upgrades on `SIGHUP` (in `spawn_blocking`: `upgrade()` blocks until the new
/// generation is ready or has failed), stops on `SIGTERM` and `SIGINT`.
fn handle_signals(
    mut signals: Signals,
    upg: Arc<Upgrader>,
    upgrades: UpgradeTasks,
    runtime: tokio::runtime::Handle,
) {
    for request in signals.forever() {
        log!("{}", request.line);
        match request.asked {
            Asked::Upgrade => {}
            // stop() cancels an upgrade in progress and reaps its child: it may block,
            // which this thread may.
            Asked::Stop => {
                upg.stop();
                continue;
            }
            Asked::Nothing => continue,
        }
        let upg = Arc::clone(&upg);
        // Locked before the task starts, so that the exiting main task finds it.
        let mut tasks = upgrades.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(runtime.spawn_blocking(move || match upg.upgrade() {
            Ok(pid) => log!("upgrade succeeded: the new generation (pid {pid}) is ready"),
            Err(e) => log!("upgrade failed: {}", error_chain(&e)),
        }));
    }
}

/// Where an exiting generation is, as its connection tasks see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Upgraded: HTTP/1 connections go to the new generation at their next idle moment,
    /// HTTP/2 ones get `GOAWAY`.
    HandOver,
    /// Nothing is handed over (any more): HTTP/1 connections are lame ducks until the
    /// instant given, HTTP/2 ones get `GOAWAY`.
    Drain(Instant),
}

/// What the accept loop, the connection tasks and the handover share.
struct Ctx {
    app: TowerToHyperService<Router>,
    /// Every connection task holds a receiver.
    phase: watch::Sender<Phase>,
    /// Every connection task holds a receiver, so that the sender counts them.
    alive: watch::Sender<()>,
    /// The handover channel's sending end, while connections are handed over.
    handover: Mutex<Option<Sender>>,
    lame_duck: Duration,
}

impl Ctx {
    fn sender(&self) -> std::sync::MutexGuard<'_, Option<Sender>> {
        self.handover.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves `conn` in a task of its own, counted until it ends.
    fn spawn(self: &Arc<Self>, conn: Conn) {
        let (ctx, alive) = (Arc::clone(self), self.alive.subscribe());
        let phase = self.phase.subscribe();
        tokio::spawn(async move {
            let _alive = alive;
            serve(conn, &ctx, phase).await;
        });
    }

    /// A connection that stays in this generation (the new one refused it, or did not
    /// acknowledge it in time): served here, as a lame duck, and never offered again.
    fn stay(self: &Arc<Self>, back: Returned) {
        log!(
            "connection {} stays: {}",
            back.id,
            error_chain(&back.reason)
        );
        let Stream::Tcp(stream) = back.stream else {
            return;
        };
        let proto = (back.state.first() == Some(&1)).then_some(Proto::Http1);
        let first = back.state.get(1) == Some(&1);
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream));
        match stream {
            Ok(stream) => {
                let mut conn = Conn::adopted(stream, back.unread, proto, first);
                conn.life.stays = true;
                self.spawn(conn);
            }
            Err(e) => log!("connection {}: {e}", back.id),
        }
    }

    /// Hands `conn` to the new generation (with the bytes read from it and not used),
    /// or gives it back if nothing is handed over (any more). Never waits.
    fn offer(&self, conn: Conn) -> Result<(), Conn> {
        let sender = self.sender();
        let Some(sender) = sender.as_ref().filter(|_| !conn.life.stays) else {
            return Err(conn);
        };
        let state = [
            u8::from(conn.life.proto == Some(Proto::Http1)),
            u8::from(conn.life.first),
        ];
        match conn.stream.into_std() {
            Ok(stream) => {
                // Sent, or (over a limit, or the channel over) kept by the sender, which
                // gives it back in `answers` or `finish`: either way not ours now.
                let _ = sender.send(stream, &conn.buf, HANDOVER_TAG, &state);
                let _ = sender.flush();
            }
            Err(e) => log!("cannot take a connection from tokio: {e}"),
        }
        Ok(())
    }
}

/// The protocol of a connection, once its first bytes have shown it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Http1,
    Http2,
}

/// What an HTTP/2 client sends first (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Proto {
    /// What the first bytes of a connection say, if they say enough.
    fn sniff(first: &[u8]) -> Option<Proto> {
        let n = first.len().min(PREFACE.len());
        if first[..n] != PREFACE[..n] {
            Some(Proto::Http1)
        } else if n == PREFACE.len() {
            Some(Proto::Http2)
        } else {
            None
        }
    }
}

/// A connection, and what this generation knows of it.
struct Conn {
    stream: TcpStream,
    /// Bytes read and not used yet: put back in front of the stream.
    buf: Vec<u8>,
    life: Life,
}

/// What this generation knows of a connection, besides its bytes.
struct Life {
    /// `None` until its first bytes have shown it.
    proto: Option<Proto>,
    /// No request has been served on it yet.
    first: bool,
    /// It came back from the new generation: it drains here, and is not offered again.
    stays: bool,
    /// When this connection first saw that its generation should exit.
    exiting_since: Option<Instant>,
}

impl Conn {
    fn accepted(stream: TcpStream) -> Conn {
        Conn::adopted(stream, Vec::new(), None, true)
    }

    fn adopted(stream: TcpStream, buf: Vec<u8>, proto: Option<Proto>, first: bool) -> Conn {
        let life = Life {
            proto,
            first,
            stays: false,
            exiting_since: None,
        };
        Conn { stream, buf, life }
    }
}

/// What a connection does in a phase.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Serve on.
    Stay,
    /// Go to the new generation at its next idle moment.
    Go,
    /// Serve as a lame duck; once idle at this instant, end.
    Lame(Instant),
}

impl Life {
    fn fate(&mut self, phase: Phase, lame_duck: Duration) -> Fate {
        if phase == Phase::Serving {
            return Fate::Stay;
        }
        let since = *self.exiting_since.get_or_insert_with(Instant::now);
        let end = match phase {
            Phase::HandOver if !self.stays => return Fate::Go,
            Phase::Drain(end) => end,
            _ => since + lame_duck,
        };
        // A connection that has not sent its first request yet is not idle: its
        // request is on its way.
        Fate::Lame(match self.first {
            true => end.max(since + FIRST_REQUEST_GRACE),
            false => end,
        })
    }
}

/// What becomes of a connection after a step of [`serve`].
enum Step {
    /// Serve it on (its protocol is known now).
    Next(Conn),
    /// Hand it to the new generation.
    Go(Conn),
    /// It is over.
    Over,
}

/// Serves one connection until it ends or goes to the new generation.
async fn serve(conn: Conn, ctx: &Arc<Ctx>, phase: watch::Receiver<Phase>) {
    let mut step = Step::Next(conn);
    loop {
        let conn = match step {
            Step::Next(conn) => conn,
            Step::Go(conn) => match ctx.offer(conn) {
                Ok(()) => return,
                // Nothing is handed over any more: serve on here, as a lame duck.
                Err(mut back) => {
                    back.life.stays = true;
                    back
                }
            },
            Step::Over => return,
        };
        step = match conn.life.proto {
            None => sniff(conn, ctx, &phase).await,
            Some(Proto::Http1) => serve_http1(conn, ctx, &phase).await,
            Some(Proto::Http2) => return serve_http2(conn, ctx, &phase).await,
        };
    }
}

/// Reads the first bytes of a connection until they show its protocol; a connection
/// that has not shown it yet goes to the new generation with what it has sent.
async fn sniff(mut conn: Conn, ctx: &Arc<Ctx>, phase: &watch::Receiver<Phase>) -> Step {
    enum Sniffed {
        Proto(Proto),
        Over,
        Go,
    }
    let sniffed = drive(phase, |cx, phase| loop {
        if let Some(proto) = Proto::sniff(&conn.buf) {
            return Poll::Ready(Sniffed::Proto(proto));
        }
        let mut chunk = [0u8; 1024];
        let mut read = ReadBuf::new(&mut chunk);
        match Pin::new(&mut conn.stream).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(Sniffed::Over),
            Poll::Ready(Ok(())) => conn.buf.extend_from_slice(read.filled()),
            Poll::Ready(Err(_)) => return Poll::Ready(Sniffed::Over),
            Poll::Pending => {
                return match conn.life.fate(phase, ctx.lame_duck) {
                    Fate::Stay => Poll::Pending,
                    Fate::Go => Poll::Ready(Sniffed::Go),
                    // Nothing has come at all by the end of the grace: nothing will.
                    Fate::Lame(end) if conn.buf.is_empty() && Instant::now() >= end => {
                        Poll::Ready(Sniffed::Over)
                    }
                    Fate::Lame(_) => Poll::Pending,
                };
            }
        }
    })
    .await;
    match sniffed {
        Sniffed::Proto(proto) => {
            conn.life.proto = Some(proto);
            Step::Next(conn)
        }
        Sniffed::Over => Step::Over,
        Sniffed::Go => Step::Go(conn),
    }
}

/// What the service and the stream tell an HTTP/1 connection's task.
#[derive(Default)]
struct ConnInfo {
    /// Requests seen so far, and responses ready.
    requests: AtomicU64,
    responses: AtomicU64,
    /// Bytes have arrived since the last response was ready: a request is on its way
    /// or under way (HTTP/1 has one at a time; pipelining is not considered).
    unanswered: AtomicBool,
    /// The last write (or flush) could not go through whole: hyper holds bytes of a
    /// response that the client has not been sent yet.
    unwritten: AtomicBool,
    /// Every response says `Connection: close`.
    lame: AtomicBool,
}

impl ConnInfo {
    /// Every request has its response, written: hyper has no request under way, though
    /// it may hold the start of the next one (bytes it has read, not a whole head yet),
    /// which `into_parts` gives back.
    fn between_requests(&self) -> bool {
        self.requests.load(Ordering::SeqCst) == self.responses.load(Ordering::SeqCst)
            && !self.unwritten.load(Ordering::SeqCst)
    }

    /// Between requests, and nothing has arrived since the last response: closing the
    /// connection cuts nothing off.
    fn idle(&self) -> bool {
        self.between_requests() && !self.unanswered.load(Ordering::SeqCst)
    }
}

/// Serves an HTTP/1 connection until it ends, or until it is idle and should go to the
/// new generation: then hyper's graceful shutdown ends it without closing the socket
/// (`poll_without_shutdown`), and `into_parts` gives the stream back with the bytes
/// hyper had read and not used.
async fn serve_http1(conn: Conn, ctx: &Arc<Ctx>, phase: &watch::Receiver<Phase>) -> Step {
    let Conn {
        stream,
        buf,
        mut life,
    } = conn;
    let info = Arc::new(ConnInfo::default());
    let service = {
        let (ctx, info) = (Arc::clone(ctx), Arc::clone(&info));
        service_fn(move |req: Request<Incoming>| {
            info.requests.fetch_add(1, Ordering::SeqCst);
            let response = ctx.app.call(req);
            let info = Arc::clone(&info);
            // Boxed: poll_without_shutdown wants a future that is Unpin.
            Box::pin(async move {
                let mut response = response.await?;
                info.responses.fetch_add(1, Ordering::SeqCst);
                info.unanswered.store(false, Ordering::SeqCst);
                // Lame duck: the client's next request goes to a new connection.
                if info.lame.load(Ordering::SeqCst) {
                    let close = HeaderValue::from_static("close");
                    response.headers_mut().insert(CONNECTION, close);
                }
                Ok::<_, Infallible>(response)
            })
        })
    };
    let io = Watched {
        inner: Prefixed::new(buf, stream),
        info: Arc::clone(&info),
    };
    let mut http = http1::Builder::new().serve_connection(TokioIo::new(io), service);
    // Set once hyper has been asked to end the connection: to hand it over, or not.
    let mut ending: Option<bool> = None;
    let done = drive(phase, |cx, phase| loop {
        if let Poll::Ready(done) = http.poll_without_shutdown(cx) {
            return Poll::Ready(done);
        }
        if ending.is_some() {
            return Poll::Pending;
        }
        life.first = life.first && info.requests.load(Ordering::SeqCst) == 0;
        // Between requests, hyper's graceful shutdown ends the connection at once (a
        // request under way, it would end it after the response, and say so in it).
        let go = match life.fate(phase, ctx.lame_duck) {
            Fate::Stay => return Poll::Pending,
            // With the start of the next request, if some has come: it goes along.
            Fate::Go if info.between_requests() => true,
            Fate::Go => return Poll::Pending,
            // Only once nothing has come since the last response.
            Fate::Lame(end) => {
                info.lame.store(true, Ordering::SeqCst);
                if Instant::now() < end || !info.idle() {
                    return Poll::Pending;
                }
                false
            }
        };
        Pin::new(&mut http).graceful_shutdown();
        ending = Some(go);
    })
    .await;
    life.first = life.first && info.requests.load(Ordering::SeqCst) == 0;
    if done.is_err() {
        return Step::Over; // a client's error ends only its connection
    }
    let parts = http.into_parts();
    let Prefixed { prefix, inner } = parts.io.into_inner().inner;
    let mut stream = inner;
    if ending == Some(true) {
        // What hyper had read and not used, then what it had not read yet of ours.
        let mut unread = parts.read_buf.to_vec();
        unread.extend_from_slice(&prefix);
        return Step::Go(Conn {
            stream,
            buf: unread,
            life,
        });
    }
    // Over (the client closed it, or a response said `Connection: close`, or a lame
    // duck stayed idle to its end): what hyper's own shutdown would do.
    let _ = poll_fn(|cx| Pin::new(&mut stream).poll_shutdown(cx)).await;
    Step::Over
}

/// Serves an HTTP/2 connection until it ends; once this generation should exit, shuts it
/// down with `GOAWAY` in two round trips (see [`GoAway`]).
async fn serve_http2(conn: Conn, ctx: &Arc<Ctx>, phase: &watch::Receiver<Phase>) {
    let Conn {
        stream,
        buf,
        mut life,
    } = conn;
    let goaway = Arc::new(GoAway::default());
    let io = GoAwayIo::new(Prefixed::new(buf, stream), Arc::clone(&goaway));
    let service = {
        let ctx = Arc::clone(ctx);
        service_fn(move |req: Request<Incoming>| ctx.app.call(req))
    };
    let http =
        http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(io), service);
    let mut http = pin!(http);
    // When this example's GOAWAY was asked for; whether hyper's shutdown has started.
    let (mut asked, mut shut) = (None::<Instant>, false);
    let _ = drive(phase, |cx, phase| loop {
        if let Poll::Ready(done) = http.as_mut().poll(cx) {
            return Poll::Ready(done);
        }
        if life.fate(phase, ctx.lame_duck) == Fate::Stay || shut {
            return Poll::Pending;
        }
        match asked {
            // GOAWAY and PING, written at the next frame boundary (polled at once).
            None => {
                goaway.ask();
                asked = Some(Instant::now());
            }
            // The client has seen the GOAWAY and sent what it had opened before.
            Some(at) if goaway.acked() || at.elapsed() >= GOAWAY_ACK_TIMEOUT => {
                http.as_mut().graceful_shutdown();
                shut = true;
            }
            Some(_) => return Poll::Pending,
        }
    })
    .await;
}

/// Polls `step` until it is ready, with the current phase; wakes it when the phase
/// changes, and every [`TICK`] once this generation should exit (`step` checks the
/// clock). `step` has the connection to poll, and decides after each poll: everything
/// happens in one task, so nothing is read or written between its look and its act.
async fn drive<T>(
    phase: &watch::Receiver<Phase>,
    mut step: impl FnMut(&mut Context<'_>, Phase) -> Poll<T>,
) -> T {
    async fn changed(mut rx: watch::Receiver<Phase>) -> watch::Receiver<Phase> {
        if rx.changed().await.is_err() {
            // No sender: no change will come.
            std::future::pending::<()>().await;
        }
        rx
    }
    let mut changes = Box::pin(changed(phase.clone()));
    let mut tick: Pin<Box<Sleep>> = Box::pin(sleep(TICK));
    poll_fn(|cx| loop {
        let now = *phase.borrow();
        if let Poll::Ready(out) = step(cx, now) {
            return Poll::Ready(out);
        }
        if let Poll::Ready(rx) = changes.as_mut().poll(cx) {
            changes = Box::pin(changed(rx));
            continue;
        }
        if now != Phase::Serving && tick.as_mut().poll(cx).is_ready() {
            tick.as_mut().reset(Instant::now() + TICK);
            continue;
        }
        return Poll::Pending;
    })
    .await
}

/// A stream with bytes put back in front of it: what was read to tell the protocol, or
/// what the previous generation had read.
struct Prefixed {
    prefix: Vec<u8>,
    inner: TcpStream,
}

impl Prefixed {
    fn new(prefix: Vec<u8>, inner: TcpStream) -> Prefixed {
        Prefixed { prefix, inner }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.drain(..n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// An HTTP/1 client's stream, noting in [`ConnInfo`] when bytes arrive and whether a
/// response is written whole.
struct Watched {
    inner: Prefixed,
    info: Arc<ConnInfo>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.info.unanswered.store(true, Ordering::SeqCst);
        }
        polled
    }
}

impl Watched {
    fn written<T>(&self, polled: Poll<T>) -> Poll<T> {
        self.info
            .unwritten
            .store(polled.is_pending(), Ordering::SeqCst);
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.written(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.written(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.written(polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The HTTP/2 shutdown of this example: a `GOAWAY` with last stream id 2³¹−1 and a
/// `PING` of its own, then hyper's graceful shutdown once the client has acknowledged
/// that `PING`.
///
/// hyper's graceful shutdown alone (the h2 crate's) sends `GOAWAY` (2³¹−1) and a `PING`,
/// and the final `GOAWAY`, naming the last stream it has seen, as soon as the `PING` is
/// acknowledged: one round trip, as RFC 9113 §6.8 suggests. But a client writes its
/// acknowledgement before the requests it had already queued: the h2 crate's client
/// (hyper's, reqwest's) does, in the same write, and so do others that send `PING`
/// acknowledgements first. Those requests, opened before the client saw the `GOAWAY`,
/// arrive after the acknowledgement, above the final `GOAWAY`'s last stream id, and are
/// refused unprocessed. Measured with `h2_check` (32 connections × 10 streams, an
/// upgrade every 250 ms): 180 such failed requests in 41 upgrades, every one of them
/// with its `HEADERS` after the client's `PING` acknowledgement.
///
/// With this example's round trip first, what the client had queued goes out with (or
/// before) its acknowledgement of this example's `PING`, which comes back before hyper's
/// shutdown starts: every stream opened before the client saw the first `GOAWAY` is
/// below the final one. The frames are written between hyper's, at a frame boundary
/// ([`GoAwayIo`]); the h2 crate ignores the acknowledgement of a `PING` it did not send.
#[derive(Default)]
struct GoAway {
    /// Set by the connection's task: write the `GOAWAY` and the `PING`.
    asked: AtomicBool,
    /// The client has acknowledged the `PING`.
    acked: AtomicBool,
}

impl GoAway {
    /// This example's `PING` payload: the h2 crate's own are other bytes.
    const PING: [u8; 8] = *b"tflipgo1";

    fn ask(&self) {
        self.asked.store(true, Ordering::SeqCst);
    }

    fn acked(&self) -> bool {
        self.acked.load(Ordering::SeqCst)
    }

    /// `GOAWAY` (last stream id 2³¹−1, `NO_ERROR`) and `PING`, as frames (RFC 9113 §4.1,
    /// §6.7, §6.8).
    fn frames() -> Vec<u8> {
        let mut out = Vec::with_capacity(34);
        out.extend_from_slice(&[0, 0, 8, frame::GOAWAY, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&[0, 0, 8, frame::PING, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&GoAway::PING);
        out
    }
}

/// HTTP/2 frame types and flags this example reads or writes.
mod frame {
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const ACK: u8 = 0x1;
    /// A frame header: length (24 bits), type, flags, stream id (32 bits).
    pub const HEADER: usize = 9;
}

/// Where a stream of frames is: which frame, and how much of it has passed.
#[derive(Default)]
struct Frames {
    /// The current frame's header, as much as has passed.
    head: [u8; frame::HEADER],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    left: usize,
    /// The current frame's payload, when it is one to look at (a `PING`).
    payload: Vec<u8>,
    /// Whole frames passed.
    count: u64,
}

impl Frames {
    /// Follows `bytes`; returns the payload of every `PING` acknowledgement among the
    /// frames they end.
    fn pass(&mut self, mut bytes: &[u8], mut on_ack: impl FnMut(&[u8])) {
        while !bytes.is_empty() {
            if self.have < frame::HEADER {
                let n = (frame::HEADER - self.have).min(bytes.len());
                self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == frame::HEADER {
                    self.left =
                        u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]) as usize;
                    self.payload.clear();
                    self.end(&mut on_ack);
                }
                continue;
            }
            let n = self.left.min(bytes.len());
            if self.head[3] == frame::PING && self.payload.len() < 8 {
                self.payload
                    .extend_from_slice(&bytes[..n.min(8 - self.payload.len())]);
            }
            self.left -= n;
            bytes = &bytes[n..];
            self.end(&mut on_ack);
        }
    }

    /// If the current frame has passed whole: counts it, and reports an acknowledgement.
    fn end(&mut self, on_ack: &mut impl FnMut(&[u8])) {
        if self.have < frame::HEADER || self.left > 0 {
            return;
        }
        if self.head[3] == frame::PING && self.head[4] & frame::ACK != 0 {
            on_ack(&self.payload);
        }
        self.have = 0;
        self.count += 1;
    }

    /// Between two frames, after at least one.
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.count > 0
    }
}

/// An HTTP/2 connection's stream that follows the frames both ways: it writes
/// [`GoAway::frames`] between two of hyper's frames once asked (never before hyper's
/// first, its `SETTINGS`), and notes the client's acknowledgement of the `PING`.
struct GoAwayIo {
    inner: Prefixed,
    goaway: Arc<GoAway>,
    /// What the client sends, after its preface.
    client: Frames,
    preface_left: usize,
    /// What hyper writes.
    server: Frames,
    /// This example's frames, while they are being written; `Some(empty)` once written.
    ours: Option<Vec<u8>>,
}

impl GoAwayIo {
    fn new(inner: Prefixed, goaway: Arc<GoAway>) -> GoAwayIo {
        GoAwayIo {
            inner,
            goaway,
            client: Frames::default(),
            preface_left: PREFACE.len(),
            server: Frames::default(),
            ours: None,
        }
    }

    /// Writes this example's frames first, if asked for and between two of hyper's.
    fn poll_ours(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ours.is_none() && self.goaway.asked.load(Ordering::SeqCst) {
            if !self.server.at_boundary() {
                return Poll::Ready(Ok(()));
            }
            self.ours = Some(GoAway::frames());
        }
        while let Some(ours) = self.ours.as_mut().filter(|o| !o.is_empty()) {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, ours))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            ours.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for GoAwayIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let mut read = &buf.filled()[before..];
        let skip = this.preface_left.min(read.len());
        this.preface_left -= skip;
        read = &read[skip..];
        let goaway = &this.goaway;
        this.client.pass(read, |payload| {
            if payload == GoAway::PING {
                goaway.acked.store(true, Ordering::SeqCst);
            }
        });
        polled
    }
}

impl AsyncWrite for GoAwayIo {
    // Not vectored: every write passes through `server`, one buffer at a time.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_ours(cx))?;
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.server.pass(&buf[..n], |_| {});
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_ours(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

enum Either<A, B> {
    Left(A),
    Right(B),
}

/// Waits for `a` or `b`, whichever is ready first, polling `a` first (tokio's `select!`
/// without its macros). The other one is dropped, or, for `a`, left to poll again.
async fn first<A: Future, B: Future>(mut a: Pin<&mut A>, b: B) -> Either<A::Output, B::Output> {
    let mut b = pin!(b);
    poll_fn(move |cx| {
        if let Poll::Ready(out) = a.as_mut().poll(cx) {
            return Poll::Ready(Either::Left(out));
        }
        b.as_mut().poll(cx).map(Either::Right)
    })
    .await
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
