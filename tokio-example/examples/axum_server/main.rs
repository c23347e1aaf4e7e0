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
//!   sent is no upgrade request (see [`asked`](signals::Request::asked)). `upgrade()`
//!   blocks until the new generation is ready or has failed, so it runs in
//!   `spawn_blocking`.
//! - The exit notification is awaited through `Upgrader::exit().try_clone()`, taken by
//!   tokio as the pipe read end it is (`tokio::net::unix::pipe::Receiver`): no thread is
//!   parked on it, and no `unsafe`.
//!
//! Each connection is a task of its own. It reads the first bytes itself to tell
//! HTTP/2 (the client preface) from HTTP/1, and serves it with hyper's builder for that
//! protocol, the bytes it read first put back in front of the stream
//! ([`Prefixed`](sniff::Prefixed)). hyper-util's automatic builder does the same, but
//! gives neither its read buffer nor the stream back: a connection it serves can only be
//! closed. Once this generation should exit:
//!
//! 1. it stops accepting; the connections still queued are the next generation's;
//! 2. HTTP/1 connections go to the new generation through the handover channel
//!    (`tableflip::handover`), each at its next idle moment, between two requests:
//!    hyper's graceful shutdown ends a connection that has no request under way without
//!    closing its socket (`poll_without_shutdown`), and `into_parts` gives the stream
//!    back with the bytes hyper had read and not used (the start of the next request,
//!    if some has come), which travel with it. hyper says nothing of idleness, so the
//!    service counts requests and responses, and the stream is wrapped
//!    ([`Watched`](http1::Watched)) to know that the last response is written: a
//!    connection busy with a request finishes it here first. A connection that has not
//!    shown its protocol yet goes with the bytes it has sent;
//! 3. HTTP/2 connections cannot move (hyper keeps their state), and get `GOAWAY`:
//!    first one of this example's (last stream id 2³¹−1) with a `PING`; once the client
//!    has acknowledged that `PING`, hyper's graceful shutdown, whose own `PING` round
//!    trip ends with the final `GOAWAY`. Every stream the client opened before it saw
//!    the first `GOAWAY` is served: see [`GoAway`](http2::GoAway) for why hyper's
//!    shutdown alone is not enough;
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
//! Where it is: this file has the server, its phases and a connection's life;
//! `sniff.rs` the first bytes, `http1.rs` the HTTP/1 connection and how it leaves
//! between two requests, `http2.rs` the `GOAWAY` shutdown, `handover.rs` the handover
//! channel's two ends.
//!
//! One current-thread runtime keeps it small (tokio features `rt`, `net`, `sync`, `time`;
//! no macros); a busy server would use the multi-thread runtime.

use std::error::Error;
use std::ffi::OsString;
use std::future::{poll_fn, Future};
use std::io;
use std::path::PathBuf;
use std::pin::{pin, Pin};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use handover::{adopt, hand_over, HANDOVER_TAG};
use http1::serve_http1;
use http2::serve_http2;
use hyper_util::service::TowerToHyperService;
use signals::{Asked, Signals};
use sniff::{sniff, Proto};
use tableflip::handover::{Returned, Sender, Stream};
use tableflip::{Options, Upgrader};
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

const USAGE: &str = "usage: axum_server [--listen HOST:PORT] [--pid-file PATH] \
                     [--upgrade-timeout SECS] [--lame-duck SECS] [--no-handover] \
                     [--probation SECS] [--fd-store] [--keeper]";

// The main package's, shared by every example.
#[path = "../../../examples/common/signals.rs"]
mod signals;

/// Logs one line to stderr with this process's pid, in one `write`, ignoring errors.
macro_rules! log {
    ($($arg:tt)*) => {{
        let line = format!("[axum_server pid={}] {}\n", std::process::id(), format_args!($($arg)*));
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }};
}

// Declared after `log!`, so that they can use it.
mod handover;
mod http1;
mod http2;
mod sniff;

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
