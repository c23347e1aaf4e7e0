//! A minimal daemon for systemd (or any supervisor that reads a pid file): reload with
//! `SIGHUP` to replace the running binary without refusing a connection.
//!
//! ```text
//! daemon --pid-file PATH [--listen HOST:PORT] [--upgrade-timeout SECS] [--probation SECS]
//!        [--fd-store] [--keeper] [--control PATH|@NAME]
//! daemon --control PATH|@NAME [--control-uid UID] --upgrade
//! ```
//!
//! It stays in the foreground (no double fork: systemd does the daemonizing), logs to
//! stderr (the journal) with its pid, answers every TCP connection on `--listen`
//! (default `127.0.0.1:8080`) with `hello from pid=<pid>`, upgrades on `SIGHUP` (not on
//! one the kernel sent when a terminal went away: see
//! [`asked`](signals::Request::asked)) and stops gracefully on `SIGTERM` or `SIGINT`.
//! The pid changes at every upgrade, so systemd must follow the pid file, which each
//! generation rewrites when it is ready, before the previous one exits:
//!
//! ```ini
//! # /etc/systemd/system/daemon.service
//! [Unit]
//! Description=tableflip example daemon
//! After=network.target
//!
//! [Service]
//! # Not Type=forking: the process started here is the first generation itself.
//! RuntimeDirectory=daemon
//! # Essential: when the main process exits after an upgrade, systemd reads the new main
//! # pid from here. Without it, it would take the exit for the end of the service.
//! PIDFile=/run/daemon/daemon.pid
//! ExecStart=/usr/local/bin/daemon --pid-file /run/daemon/daemon.pid --listen 0.0.0.0:8080 \
//!     --control /run/daemon/control.sock
//! # Upgrade: replace /usr/local/bin/daemon (by rename), then `systemctl reload daemon`,
//! # which fails, with the new generation's reason, if the upgrade fails. (With
//! # `ExecReload=/bin/kill -HUP $MAINPID` it would always succeed.)
//! ExecReload=/usr/local/bin/daemon --control /run/daemon/control.sock --upgrade
//! # Stopping sends SIGTERM; a generation drains for up to 10 s.
//! TimeoutStopSec=30
//! Restart=on-failure
//!
//! [Install]
//! WantedBy=multi-user.target
//! ```
//!
//! `--control` serves a control socket (see `tableflip::control`) on a thread of its own;
//! `daemon --control PATH --upgrade` asks the daemon there to upgrade, prints the new
//! pid and exits 0, or prints why it failed and exits 1. It believes only the answer of
//! root, of its own user, or of the owner of a socket file in a directory only that
//! owner and root can write to, as `/run/daemon` above is (with `User=www`, systemd
//! makes it belong to `www`: root's `ExecReload=` still just works). `--control-uid
//! UID` names the uid the daemon runs as: needed for an abstract name when it runs as
//! another user than the client, since anyone can bind one first.
//!
//! The serving loop is that of the `tcp_server` example, shortened; see there why it
//! waits on the listener and the exit fd together and accepts without blocking.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use signals::{Asked, Signals};
use tableflip::{Options, UnixAddr, Upgrader, Wake};

/// How long an exiting generation waits for its connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

const USAGE: &str = "usage: daemon --pid-file PATH [--listen HOST:PORT] \
                     [--upgrade-timeout SECS] [--probation SECS] [--fd-store] \
                     [--keeper] [--control PATH|@NAME]\n       \
                     daemon --control PATH|@NAME [--control-uid UID] --upgrade";

/// Logs one line to stderr with this process's pid, in one `write`, ignoring errors.
#[path = "common/signals.rs"]
mod signals;

macro_rules! log {
    ($($arg:tt)*) => {{
        let line = format!("[daemon pid={}] {}\n", std::process::id(), format_args!($($arg)*));
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }};
}

fn main() -> ExitCode {
    let mut pid_file: Option<PathBuf> = None;
    let mut listen = String::from("127.0.0.1:8080");
    let mut options = Options::new();
    let mut control: Option<UnixAddr> = None;
    let mut control_uid: Option<u32> = None;
    let mut upgrade = false;
    let mut keeper = false;
    // What the client waits for: the server's upgrade timeout plus its probation.
    let mut wait = Duration::from_secs(60 + 10);
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--help" || arg == "-h" {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        if arg == "--fd-store" {
            options = options.fd_store(true);
            continue;
        }
        if arg == "--keeper" {
            keeper = true;
            continue;
        }
        if arg == "--upgrade" {
            upgrade = true;
            continue;
        }
        let value = args.next();
        // A decimal number of seconds.
        let secs = value
            .as_ref()
            .and_then(|v| v.to_str()?.parse::<f64>().ok())
            .and_then(|s| Duration::try_from_secs_f64(s).ok());
        match (arg.to_str(), value) {
            (Some("--pid-file"), Some(v)) => pid_file = Some(v.into()),
            (Some("--listen"), Some(v)) if v.to_str().is_some() => {
                listen = v.to_string_lossy().into()
            }
            (Some("--upgrade-timeout"), Some(_)) if secs.is_some_and(|d| !d.is_zero()) => {
                options = options.upgrade_timeout(secs.unwrap_or_default());
                wait += secs
                    .unwrap_or_default()
                    .saturating_sub(Duration::from_secs(60));
            }
            (Some("--probation"), Some(_)) if secs.is_some() => {
                options = options.probation(secs.unwrap_or_default());
                wait += secs.unwrap_or_default();
            }
            (Some("--control"), Some(v)) => {
                control = Some(match v.to_str().and_then(|s| s.strip_prefix('@')) {
                    Some(name) => UnixAddr::abstract_name(name),
                    None => UnixAddr::Path(v.into()),
                })
            }
            (Some("--control-uid"), Some(v))
                if v.to_str().is_some_and(|s| s.parse::<u32>().is_ok()) =>
            {
                control_uid = v.to_str().and_then(|s| s.parse().ok());
            }
            _ => {
                eprintln!("daemon: bad argument {arg:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if upgrade {
        let Some(addr) = control else {
            eprintln!("daemon: --upgrade needs --control\n{USAGE}");
            return ExitCode::from(2);
        };
        let mut client = tableflip::control::ClientConfig::new(wait);
        if let Some(uid) = control_uid {
            client = client.server_uid(uid);
        }
        return match tableflip::control::request_upgrade(addr, client) {
            Ok(pid) => {
                println!("{pid}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("daemon: upgrade failed: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    // `--keeper`: this process stays in front of the generations, with one pid, for the
    // service's whole life; the generations it starts go on from here.
    if keeper {
        if let Err(e) = tableflip::Keeper::new().run() {
            eprintln!("daemon: {e}");
            return ExitCode::FAILURE;
        }
    }
    let Some(pid_file) = pid_file else {
        eprintln!("daemon: --pid-file is required\n{USAGE}");
        return ExitCode::from(2);
    };
    match run(options, pid_file, &listen, control) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log!("fatal: {}", error_chain(&*e));
            ExitCode::FAILURE
        }
    }
}

fn run(
    options: Options,
    pid_file: PathBuf,
    listen: &str,
    control: Option<UnixAddr>,
) -> Result<(), Box<dyn std::error::Error>> {
    // First: a new generation starts with SIGHUP at its default disposition (death).
    // Each signal comes with its origin: who sent it, or whether the kernel did.
    let signals = Signals::new()?;
    let upg = Arc::new(Upgrader::new(options.pid_file(&pid_file))?);

    // Inherited (from the previous generation, or a fd store), or bound now.
    let (listener, inherited): (TcpListener, bool) = match upg.fds().take(listen)? {
        Some(listener) => (listener, true),
        None => (upg.fds().listen(listen)?, false),
    };
    listener.set_nonblocking(true)?; // in every generation alike: the flag is shared
    log!(
        "listening on {} ({})",
        listener.local_addr()?,
        if inherited { "inherited" } else { "new socket" }
    );

    // The threads running upgrade(): the last one is joined before exiting, so that
    // its result is logged. Once the exit fd fires, they all return promptly.
    let upgrades: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
    let (u, threads) = (Arc::clone(&upg), Arc::clone(&upgrades));
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || on_signals(signals, u, threads))?;

    // The control socket, taken before ready() (which closes inherited fds nobody took)
    // and served once ready, until this process should exit.
    let control = match control {
        Some(addr) => Some(tableflip::control::Server::listen(&upg, addr)?),
        None => None,
    };
    let controller: Arc<Mutex<Option<JoinHandle<()>>>> = Arc::default();

    // Report ready from a thread of its own, so that the loop below serves at once: with
    // a probation the previous generation commits only after the window, and both serve
    // meanwhile.
    let u = Arc::clone(&upg);
    let slot = Arc::clone(&controller);
    let reporter = thread::spawn(move || match u.ready() {
        Ok(adoption) => {
            log!("ready; pid file {} updated; {adoption}", pid_file.display());
            if let Some(ctl) = control {
                let cu = Arc::clone(&u);
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread::spawn(move || {
                    if let Err(e) = ctl.serve(&cu) {
                        log!("control socket failed: {}", error_chain(&e));
                    }
                }));
            }
            if u.has_parent() {
                thread::spawn(move || {
                    if let Ok(true) = u.wait_for_parent(DRAIN_TIMEOUT * 2) {
                        log!("the previous generation has exited");
                    }
                });
            }
            Ok(())
        }
        Err(e) => {
            // The previous generation serves on: stop accepting and drain.
            u.stop();
            Err(e)
        }
    });

    // Serve until told to exit.
    let mut handlers: Vec<JoinHandle<()>> = Vec::new();
    while upg.exit().wait_readable(&listener, None) == Wake::Readable {
        handlers.retain(|h| !h.is_finished());
        // A bounded batch, so that a flood of connections cannot delay the exit check.
        for _ in 0..64 {
            let conn = match listener.accept() {
                Ok((conn, _)) => conn,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log!("accept failed: {e}");
                    if e.raw_os_error() == Some(libc::EMFILE) {
                        thread::sleep(Duration::from_millis(100)); // do not spin on EMFILE
                    }
                    break;
                }
            };
            // Keep the connection reachable: if no thread can be started, serve it here.
            let slot = Arc::new(Mutex::new(Some(conn)));
            let theirs = Arc::clone(&slot);
            let take =
                |s: &Mutex<Option<TcpStream>>| s.lock().unwrap_or_else(|e| e.into_inner()).take();
            match thread::Builder::new().spawn(move || take(&theirs).map_or((), answer)) {
                Ok(handle) => handlers.push(handle),
                Err(e) => {
                    log!("cannot start a thread ({e}); serving inline");
                    if let Some(conn) = take(&slot) {
                        answer(conn);
                    }
                }
            }
        }
    }
    drop(listener);
    let pending = std::mem::take(&mut *upgrades.lock().unwrap_or_else(|e| e.into_inner()));
    pending.into_iter().for_each(|t| drop(t.join()));
    // The control socket answers the request that ended this generation, then returns.
    let reported = reporter.join();
    if let Some(ctl) = controller.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = ctl.join();
    }
    handlers.retain(|h| !h.is_finished());

    let before = handlers.len();
    log!("stopped accepting; draining {before} connection(s)");
    // Ticks ask systemd for time at a stop; `finish` completes the upgrade's record.
    let drain = upg.exit().drain(DRAIN_TIMEOUT);
    while handlers.iter().any(|h| !h.is_finished()) && drain.tick().is_some() {
        thread::sleep(Duration::from_millis(10));
    }
    let left = handlers.iter().filter(|h| !h.is_finished()).count();
    drain.finish((before - left) as u64, left as u64);
    if let Some(record) = upg
        .status()
        .last_upgrade()
        .filter(|_| upg.exit().upgraded())
    {
        log!("{record}");
    }
    log!("exit");
    match reported {
        Ok(Err(e)) => Err(e.into()),
        _ => Ok(()),
    }
}

/// Upgrades on `SIGHUP` (on a thread of its own: `upgrade()` blocks until the new
/// generation is ready or has failed), stops on `SIGTERM` and `SIGINT`.
fn on_signals(mut signals: Signals, upg: Arc<Upgrader>, upgrades: Arc<Mutex<Vec<JoinHandle<()>>>>) {
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
        let upg = Arc::clone(&upg);
        // Locked before the thread starts, so that the exiting main thread finds it.
        let mut threads = upgrades.lock().unwrap_or_else(|e| e.into_inner());
        threads.retain(|t| !t.is_finished());
        let spawned = thread::Builder::new()
            .name("upgrade".into())
            .spawn(move || match upg.upgrade() {
                Ok(pid) => log!("upgrade succeeded: pid {pid} took over; handing over"),
                Err(e) => log!("upgrade failed: {}", error_chain(&e)),
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => log!("upgrade failed: cannot start a thread: {e}"),
        }
    }
}

/// An error and its sources: "cannot execute new generation /x: No such file ...".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    msg
}

/// Sends the greeting, then closes without a reset: FIN first, and wait (briefly) for
/// the client to close before dropping the socket, discarding anything it sent.
fn answer(mut conn: TcpStream) {
    let result = (|| -> io::Result<()> {
        conn.set_nonblocking(false)?; // a new file description: the mode is ours alone
        conn.set_write_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(format!("hello from pid={}\n", std::process::id()).as_bytes())?;
        conn.shutdown(Shutdown::Write)?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut sink = [0u8; 1024];
        for _ in 0..64 {
            if matches!(conn.read(&mut sink), Ok(0) | Err(_)) {
                break;
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        log!("connection error: {e}");
    }
}
