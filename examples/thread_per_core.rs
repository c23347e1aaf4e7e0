//! A thread-per-core TCP server: one worker per CPU, each with its own `SO_REUSEPORT`
//! listener on the same port, upgraded on `SIGHUP` without losing a queued connection.
//!
//! ```text
//! thread_per_core [--listen HOST:PORT] [--pid-file PATH] [--upgrade-timeout SECS] [--workers N]
//! ```
//!
//! Defaults: `127.0.0.1:8080`, no pid file, 60 s, one worker per CPU. Every connection
//! gets one line, `hello from pid=<pid> worker=<n>`, and is closed.
//!
//! - The listeners are one group ([`Fds::listen_tcp_group`](tableflip::Fds::listen_tcp_group)):
//!   every socket of the group travels to the next generation, in order. Closing one socket
//!   of a `SO_REUSEPORT` group drops the connections queued on it, so none is re-created.
//!   Give every generation the same `--workers`: a generation that asks for fewer closes
//!   the extra sockets once it is ready.
//! - `SO_REUSEPORT` is set in the socket hook ([`Options::before_bind`]), which runs
//!   between `socket()` and `bind()` for every socket the registry creates.
//! - Each worker waits with `poll(2)` on its listener and on the upgrader's exit fd: no busy
//!   loop, and it stops accepting the moment the next generation is ready.
//! - `SIGHUP` upgrades, unless the kernel sent it (the terminal went away: see
//!   [`request`]); `SIGTERM` and `SIGINT` stop.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use signals::{Asked, Signals};
use tableflip::{Options, Upgrader};

/// Longest a write to a client may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

const USAGE: &str = "usage: thread_per_core [--listen HOST:PORT] [--pid-file PATH] [--upgrade-timeout SECS] [--workers N]";

#[path = "common/signals.rs"]
mod signals;

macro_rules! log {
    ($($arg:tt)*) => {{
        let line = format!("[thread_per_core pid={}] {}\n", std::process::id(), format_args!($($arg)*));
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }};
}

fn main() -> ExitCode {
    let mut listen = "127.0.0.1:8080".to_string();
    let mut pid_file = None;
    let mut timeout = Duration::from_secs(60);
    let mut workers = thread::available_parallelism().map_or(1, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        let value = args.next();
        let ok = match (flag.as_str(), value) {
            ("--listen", Some(v)) => {
                listen = v;
                true
            }
            ("--pid-file", Some(v)) => {
                pid_file = Some(v);
                true
            }
            ("--upgrade-timeout", Some(v)) => v
                .parse::<f64>()
                .ok()
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .map(|d| timeout = d)
                .is_some(),
            ("--workers", Some(v)) => v
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .map(|n| workers = n)
                .is_some(),
            _ => false,
        };
        if !ok {
            eprintln!("thread_per_core: bad argument {flag:?}\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    match run(&listen, pid_file, timeout, workers) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log!("fatal: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    listen: &str,
    pid_file: Option<String>,
    timeout: Duration,
    workers: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    // Before anything else: a new generation starts with SIGHUP at its default (death).
    // Each signal comes with its origin: who sent it, or whether the kernel did.
    let mut signals = Signals::new()?;

    let mut options = Options::new().upgrade_timeout(timeout).before_bind(|fd| {
        // Called for every socket the registry creates, before bind().
        rustix::net::sockopt::set_socket_reuseport(fd, true)?;
        Ok(())
    });
    if let Some(path) = pid_file {
        options = options.pid_file(path);
    }
    let upg = Arc::new(Upgrader::new(options)?);

    // Inherited (from the previous generation, or a fd store) or bound now: the
    // registry knows which, socket by socket.
    let inherited = upg.fds().inherited().len();
    let listeners = upg.fds().listen_group::<TcpListener>(listen, workers)?;
    let inherited = inherited - upg.fds().inherited().len();
    log!(
        "listening on {} with {} workers ({})",
        listeners[0].local_addr()?,
        listeners.len(),
        match inherited {
            0 => "new sockets".to_string(),
            n if n == listeners.len() => "inherited".to_string(),
            n => format!("{n} inherited, {} new sockets", listeners.len() - n),
        }
    );

    let u = Arc::clone(&upg);
    thread::spawn(move || {
        for request in signals.forever() {
            log!("{}", request.line);
            match request.asked {
                Asked::Upgrade => {
                    let u = Arc::clone(&u);
                    // upgrade() blocks until the next generation is ready or has failed.
                    // On success the exit notification fires first and main() may
                    // return before this thread logs: main() says it, from the status.
                    thread::spawn(move || {
                        if let Err(e) = u.upgrade() {
                            log!("upgrade failed, still serving: {e}");
                        }
                    });
                }
                Asked::Stop => u.stop(),
                Asked::Nothing => {}
            }
        }
    });

    // Writes the pid file and tells the previous generation to step aside. Connections
    // arriving before the workers start wait in the (shared) accept queues.
    // Which inherited fds were taken, and which were closed because nobody asked for
    // them: a listener dropped by a configuration change shows up here.
    let adoption = upg.ready()?;
    log!("ready; {adoption}");

    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(n, listener)| {
            let upg = Arc::clone(&upg);
            thread::Builder::new()
                .name(format!("worker-{n}"))
                .spawn(move || worker(n, listener, &upg))
        })
        .collect::<Result<_, _>>()?;
    for h in handles {
        if let Err(e) = h
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("worker panicked")))
        {
            log!("worker failed: {e}");
        }
    }
    // The result of the upgrade that ended this generation is recorded before its exit
    // notification fires.
    if let Some(record) = upg.status().last_upgrade() {
        if let Ok(pid) = record.result {
            log!("upgrade succeeded: pid {pid} took over; {record}");
        }
    }
    log!("exit");
    Ok(())
}

/// Serves one listener until the exit fd fires. Each connection is answered on the spot,
/// so once the loop ends nothing is left in flight.
fn worker(n: usize, listener: TcpListener, upg: &Upgrader) -> io::Result<()> {
    let reply = format!("hello from pid={} worker={n}\n", std::process::id());
    // Until the next generation has taken over: then it accepts from the same queue.
    for conn in upg.incoming(&listener) {
        match conn {
            Ok(mut conn) => {
                conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
                let _ = conn.write_all(reply.as_bytes());
                let _ = conn.shutdown(Shutdown::Write);
                // Read what the client already sent, so close() sends FIN, not RST. An
                // accepted socket is a new open file description: its mode is its own.
                let _ = conn.set_nonblocking(true);
                let mut sink = [0u8; 512];
                while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
            }
            // EMFILE and friends: incoming() waits a little before the next accept.
            Err(e) => log!("worker {n}: accept: {e}"),
        }
    }
    Ok(())
}
