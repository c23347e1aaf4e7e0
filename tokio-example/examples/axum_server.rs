//! An axum server on tokio and hyper (HTTP/1.1 and HTTP/2) that upgrades itself on
//! `SIGHUP` without failing a request.
//!
//! ```text
//! axum_server [--listen HOST:PORT] [--pid-file PATH] [--upgrade-timeout SECS]
//!             [--probation SECS] [--fd-store] [--keeper]
//!             [--lame-duck SECS]
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
//! - The exit notification is awaited through `Upgrader::exit_handle`, taken by
//!   tokio as the pipe read end it is (`tokio::net::unix::pipe::Receiver`): no thread is
//!   parked on it, and no `unsafe`.
//!
//! Why not `axum::serve(..).with_graceful_shutdown(..)`: it closes every idle keep-alive
//! connection at once, racing the next request that the client may already have sent
//! (wrk, like many clients, does not retry it), and hyper-util's graceful shutdown also
//! closes a connection it has accepted but not read yet, request bytes buffered or not:
//! about 37 failed requests per upgrade, measured. Here each connection is driven by
//! hyper-util's auto builder in a task of its own, and once this generation should exit:
//!
//! 1. it stops accepting; the connections still queued are the next generation's;
//! 2. HTTP/2 connections get `GOAWAY` (hyper's graceful shutdown): the streams in flight
//!    finish, and the client opens a new connection, to the new generation;
//! 3. HTTP/1 connections have a lame-duck phase of `--lame-duck` seconds: they are
//!    served as before, but every response says `Connection: close`, so each client
//!    moves on after its next request, the one that may be on the wire already;
//! 4. at the end of that phase hyper shuts down what is left, but only connections that
//!    are idle: nothing has arrived since the last response. hyper would also close a
//!    connection whose request has partly arrived, or arrived but not been parsed yet,
//!    unanswered; the stream is wrapped ([`Watched`]) to know. A connection that has not
//!    sent its first request gets [`FIRST_REQUEST_GRACE`] instead of the lame duck;
//! 5. the process exits once every connection is done, or after [`DRAIN_TIMEOUT`].
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
use hyper::service::{service_fn, Service as _};
use hyper::{Request, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use signals::{Asked, Signals};
use tableflip::{Options, Upgrader};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

/// How long an exiting generation waits for its connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an exiting generation answers HTTP/1 requests with `Connection: close`
/// before it shuts down what is left (`--lame-duck`; at most [`DRAIN_TIMEOUT`]).
const LAME_DUCK: Duration = Duration::from_secs(2);
/// Once this process should exit, how long a new connection may take to send its first
/// request; at least the lame-duck phase.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(5);
/// How often a connection in its lame-duck phase looks at the clock and its protocol.
const LAME_DUCK_TICK: Duration = Duration::from_millis(50);

const USAGE: &str = "usage: axum_server [--listen HOST:PORT] [--pid-file PATH] \
                     [--upgrade-timeout SECS] [--lame-duck SECS] [--probation SECS] \
                     [--fd-store] [--keeper]";

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

    // Report ready while serving (below): with a probation the previous generation
    // commits only after the window. ready() blocks: on a blocking thread. Which
    // inherited fds were taken, and which were closed because nobody asked for them: a
    // listener dropped by a configuration change shows up here.
    let reporter = {
        let upg = Arc::clone(&upg);
        tokio::task::spawn_blocking(move || {
            let ready = upg.ready();
            match &ready {
                Ok(adoption) => log!("ready; {adoption}"),
                // Not taken over: the previous generation serves on. Stop and drain.
                Err(_) => upg.stop(),
            }
            ready.map(drop)
        })
    };

    let hello = get(|| async { format!("hello from pid={}\n", std::process::id()) });
    let app = Router::new()
        .route("/", hello.clone())
        .route("/{*path}", hello);

    // `None` while serving; the end of the lame-duck phase once this generation should
    // exit. Every connection holds a receiver: the sender counts them.
    let (phase, _) = watch::channel(None::<Instant>);
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        // The exit fd first: once told to exit, accept nothing more.
        match first(pin!(exit.readable()), listener.accept()).await {
            Either::Left(Ok(_)) => break,
            Either::Left(Err(e)) => {
                log!("waiting for the exit fd failed ({e}); exiting");
                break;
            }
            Either::Right(Ok((stream, _peer))) => {
                let conn =
                    serve_connection(stream, app.clone(), builder.clone(), phase.subscribe());
                tokio::spawn(conn);
            }
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

    phase.send_replace(Some(Instant::now() + config.lame_duck));
    let before = phase.receiver_count();
    log!(
        "stopped accepting; draining {before} connection(s), lame duck for {:?}",
        config.lame_duck
    );
    // Ticks ask systemd for time at a stop; `finish` completes the upgrade's record.
    let drain = upg.exit().drain(DRAIN_TIMEOUT);
    while let Some(wait) = drain.tick() {
        if timeout(wait, phase.closed()).await.is_ok() {
            break;
        }
    }
    let left = phase.receiver_count();
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

/// What the service and the stream tell their connection's task.
#[derive(Default)]
struct ConnInfo {
    /// An HTTP/2 request has arrived: this connection speaks HTTP/2.
    h2: AtomicBool,
    /// Requests seen so far; none: the first one is still to come.
    requests: AtomicU64,
    /// Bytes have arrived since the last response was ready: a request is on its way
    /// or under way (HTTP/1 has one at a time; pipelining is not considered).
    unanswered: AtomicBool,
}

/// The client's stream, noting in [`ConnInfo::unanswered`] when bytes arrive.
struct Watched {
    stream: TcpStream,
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
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.info.unanswered.store(true, Ordering::SeqCst);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Serves one connection until it ends; once this generation should exit, drains it as
/// the module documentation says.
async fn serve_connection(
    stream: TcpStream,
    app: Router,
    builder: auto::Builder<TokioExecutor>,
    mut phase: watch::Receiver<Option<Instant>>,
) {
    let info = Arc::new(ConnInfo::default());
    let service = {
        let (app, info, phase) = (
            TowerToHyperService::new(app),
            Arc::clone(&info),
            phase.clone(),
        );
        service_fn(move |req: Request<Incoming>| {
            info.requests.fetch_add(1, Ordering::Relaxed);
            let http1 = req.version() < Version::HTTP_2;
            if !http1 {
                info.h2.store(true, Ordering::Relaxed);
            }
            let response = app.call(req);
            let phase = phase.clone();
            let info = Arc::clone(&info);
            async move {
                let mut response = response.await?;
                info.unanswered.store(false, Ordering::SeqCst);
                // Lame duck: the client's next request goes to a new connection. (HTTP/2
                // has no Connection header; its connections get GOAWAY instead.)
                if http1 && phase.borrow().is_some() {
                    let close = HeaderValue::from_static("close");
                    response.headers_mut().insert(CONNECTION, close);
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    let stream = Watched {
        stream,
        info: Arc::clone(&info),
    };
    let mut conn = pin!(builder.serve_connection(TokioIo::new(stream), service));

    // Serving, until this generation should exit.
    let lame_duck_end = loop {
        if let Some(end) = *phase.borrow_and_update() {
            break end;
        }
        match first(conn.as_mut(), phase.changed()).await {
            Either::Left(_) => return, // done (a client's error ends only its connection)
            Either::Right(Ok(())) => {}
            Either::Right(Err(_)) => break Instant::now(), // no sender: exiting
        }
    };
    let first_request_end = lame_duck_end.max(Instant::now() + FIRST_REQUEST_GRACE);

    // Lame duck, then hyper's graceful shutdown. `first` polls the connection before
    // the timer, so whatever the client has sent by then is read (and noted in
    // `unanswered`) before this looks.
    let mut shut_down = false;
    loop {
        let end = if info.requests.load(Ordering::Relaxed) == 0 {
            first_request_end
        } else {
            lame_duck_end
        };
        let idle = !info.unanswered.load(Ordering::SeqCst);
        if !shut_down && (info.h2.load(Ordering::Relaxed) || (idle && Instant::now() >= end)) {
            // HTTP/2: GOAWAY, streams in flight finish. HTTP/1: idle, so closed.
            conn.as_mut().graceful_shutdown();
            shut_down = true;
        }
        if let Either::Left(_) = first(conn.as_mut(), sleep(LAME_DUCK_TICK)).await {
            return;
        }
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
