//! Proves zero-downtime upgrades: runs a server, connects to it continuously from a few
//! threads while it upgrades itself again and again, deploys broken binaries, and counts
//! every connection (or HTTP request) that was refused, reset, timed out or answered
//! wrongly.
//!
//! ```text
//! upgrade_check [--server PATH] [--upgrades N] [--clients K] [--faults]
//!               [--fault-timeout SECS] [--time-limit SECS]
//!               [--http [--keep-alive N] [--idle N [--probe]]]
//! upgrade_check --hold N [--ws] [--interval SECS] [--pace SECS] [--server PATH]
//!               [--upgrades N] [--time-limit SECS]
//! upgrade_check --list-faults
//! ```
//!
//! Measure the examples' `tcp_server` (the default `--server` is the `tcp_server` next to
//! this executable, so both come from the same build profile):
//!
//! ```text
//! cargo build --release --examples
//! target/release/examples/upgrade_check --upgrades 100 --clients 4 --faults
//! ```
//!
//! With `--http` the clients speak HTTP/1.1 (the default `--server` is then the
//! `http_server` next to this executable): `N` of the `K` clients (`--keep-alive`, by
//! default half of them, rounded up) send requests back to back on persistent
//! connections, the others send each request on a new connection with
//! `Connection: close`. Every request counts, and none is retried:
//!
//! ```text
//! target/release/examples/upgrade_check --http --upgrades 100 --clients 4
//! target/release/examples/upgrade_check --http --server target/release/examples/axum_server
//! ```
//!
//! With `--hold N` the clients do not come and go: `N` connections stay open across the
//! upgrades (`--ws`: WebSocket sessions, the default `--server` is then `ws_server`),
//! each sending something every `--interval` (default 0.5 s), and every reset, EOF,
//! reconnect, lost state or answer from the wrong generation counts; the next upgrade
//! goes `--pace` (default 0.25 s) after the last one, and every refused one counts (see
//! `hold.rs`). The 200 connections of the issue that brought it:
//!
//! ```text
//! target/release/examples/upgrade_check --hold 200 --upgrades 5
//! target/release/examples/upgrade_check --hold 1000 --ws --upgrades 100
//! ```
//!
//! `--idle N` adds `N` keep-alive connections that stay idle across the upgrades and
//! send one request each per upgrade: once the old generation has exited (each must
//! still be open and be answered by the new generation), or with `--probe` at instants
//! spread around the upgrade, packed within ±10 ms of the moments the old generation
//! lets go of its connections (each must be answered). See `http::IdlePool`.
//!
//! # The server contract
//!
//! Any server can be checked if it takes `--listen HOST:PORT`, `--pid-file PATH` and
//! `--upgrade-timeout SECS`, writes its pid file when ready, upgrades on `SIGHUP`, stops
//! on `SIGTERM` (exiting with status 0), answers every connection with one line holding
//! `pid=<its pid>` and closes it. For `--faults` it must also log a line containing
//! `upgrade failed` and the reason to stderr when an upgrade fails.
//!
//! With `--http`, instead of the line: it answers `GET /` over HTTP/1.1 with a 2xx
//! status and a `Content-Length` body holding `pid=<its pid>` (the examples' servers say
//! `hello from pid=<pid>`), keeps connections alive unless told `Connection: close`, and
//! ends one only after a response with `Connection: close` or when the client closes it.
//!
//! With `--hold N`, a connection's line is followed by the server's half-close, and the
//! server reads what the client writes until it closes, across upgrades. With `--ws`,
//! the server answers a plain `GET /` as `--http` says, and a WebSocket session's text
//! message `join ROOM` with `pid=<pid> n=<count> room=ROOM joined`, any other text `M`
//! with `pid=<pid> n=<count> room=<room> echo=M`, the count being the messages the
//! session has had answered, by every generation.
//!
//! The server runs from a copy of its binary in a temporary directory, started with
//! `argv[0]` = that path, so an upgrade re-executes whatever a "deploy" last put there.
//! It inherits stdin, stdout and stderr only (not the fds this tool inherited), so its
//! fd count is its own.
//! This tool makes itself the child subreaper: every generation is reparented to it when
//! its parent exits, so it can check how each one ended, and kill everything at the end.
//!
//! # What it does
//!
//! 1. **Upgrades under load** (`--upgrades N`, default 20): `K` client threads connect
//!    without pause; the tool sends `SIGHUP` to the pid in the pid file `N` times. For
//!    each upgrade it measures the time from the signal until a connection is answered by
//!    the new pid (and until the pid file names it), how long the old generation kept
//!    answering after the new one was ready, and when the old one exited. Before the
//!    next signal it waits until every thread of the old generation has exited
//!    (`upgrade()` is refused while the previous generation lives), checks that it
//!    exited with status 0, that the new one has no child left, and (clients paused)
//!    its fd count: every upgraded generation must hold as many fds as the others.
//! 2. **Fault scenarios** (`--faults`), on a second server with a short
//!    `--upgrade-timeout` (`--fault-timeout`, default 2 s), clients still running. A
//!    deploy replaces the binary the way deploys do (write a file next to it, then
//!    rename it over) with: a script that exits with status 3, one that kills itself
//!    with `SIGKILL`, one that hangs (`exec sleep 1000`), no file at all, and a file
//!    without the execute bit; then `SIGHUP`. Each time the old generation must log the
//!    failure with the right reason, stay alive, keep answering, keep its pid file, have
//!    no child (zombie or stray) and hold as many fds as before; then the good binary is
//!    renamed back and an upgrade must go through. Last, a slow wrapper (`sleep 1`, then
//!    `exec` the binary) is deployed and the old generation is `SIGKILL`ed while the
//!    wrapper sleeps: the new generation must come up alone, write the pid file, answer
//!    the connections that queued meanwhile, and upgrade cleanly itself. (The clients
//!    are paused around the `SIGKILL`: a killed server loses the connections it was
//!    handling, and that is not what is measured.) Then, on a third server with
//!    `--probation 1`, a deploy that becomes ready and dies 300 ms later: the old
//!    generation must roll it back and serve on, and only the connections the dying
//!    generation had accepted may be lost. `--list-faults` prints the scenarios' names.
//!
//! At the end no process may be left: every generation has exited and was reaped, and
//! nothing else was reparented to the tool. The summary goes to stdout, progress to
//! stderr; the exit status is 0 only if nothing failed.
//!
//! # Limits
//!
//! The clients connect only to `127.0.0.1`, on a port this tool picked for the server
//! it started. At most 64 clients, 10 000 upgrades and 50 million connections; each
//! connection has a 5 s connect and a 10 s read timeout, and the whole run stops (and
//! fails) after `--time-limit` (default 900 s).
//!
//! # Source layout
//!
//! This file holds the flags, the run and phase 1; `faults` the fault scenarios,
//! `server` the server under test, `deploy` the binary swaps, `load` the clients,
//! `hold` the held connections (`ws` their WebSocket frames), `procs` waiting, signals
//! and `/proc`, and `report` the progress line and summary.

mod deploy;
mod faults;
mod hold;
mod http;
mod load;
mod procs;
mod report;
mod server;
mod ws;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deploy::Deploy;
use faults::{fault_scenarios, scenario_names};
use load::{idle_fd_count, ClientKind, Load, Proto};
use procs::{
    become_subreaper, descendants, describe_process, reap_all, reaped_strays,
    withhold_inherited_fds, Limits, Workspace, LIMITS, START,
};
use report::{ms, LoadPhase, Progress, Report};
use server::Server;

const USAGE: &str = "usage: upgrade_check [--server PATH] [--upgrades N] [--clients K] [--faults]
                     [--fault-timeout SECS] [--time-limit SECS]
                     [--http [--keep-alive N] [--idle N [--probe]]]
       upgrade_check --hold N [--ws] [--interval SECS] [--pace SECS] [--server PATH]
                     [--upgrades N] [--time-limit SECS]
       upgrade_check --list-faults";

const MAX_CLIENTS: usize = 64;
/// The most idle keep-alive connections (`--idle`).
const MAX_IDLE: usize = 1000;
const MAX_UPGRADES: usize = 10_000;
const MAX_CONNECTIONS: u64 = 50_000_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A reply is one short line (or a short HTTP response head, and a short body): anything
/// longer is wrong.
const MAX_REPLY: u64 = 4096;
/// Longest wait for one step (on top of the server's own timeouts): generous, because
/// the machine may be busy with other work.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an old generation may take to drain and exit (tcp_server gives up at 10 s).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The `--upgrade-timeout` of the server that is upgraded under load.
const LOAD_UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors are messages for the report.
type Res<T> = Result<T, String>;

struct Config {
    server: PathBuf,
    upgrades: usize,
    clients: usize,
    faults: bool,
    fault_timeout: Duration,
    time_limit: Duration,
    proto: Proto,
    /// How many of the HTTP clients keep their connections alive.
    keep_alive: usize,
    /// `--idle N`: keep-alive connections idle across the upgrades.
    idle: usize,
    /// `--probe`: their requests go around the upgrades, not after.
    probe: bool,
    /// `--list-faults`: print the fault scenarios' names, run nothing.
    list_faults: bool,
    /// `--hold N`: held connections instead of the clients that come and go.
    hold: Option<hold::Hold>,
}

impl Config {
    /// What each client thread does.
    fn client_kinds(&self) -> Vec<ClientKind> {
        (0..self.clients)
            .map(|i| match self.proto {
                Proto::Line => ClientKind::Line,
                Proto::Http if i < self.keep_alive => ClientKind::HttpKeepAlive,
                Proto::Http => ClientKind::HttpClose,
            })
            .collect()
    }
}

fn main() -> ExitCode {
    START.get_or_init(Instant::now);
    let config = match parse_args(std::env::args_os().skip(1)) {
        Ok(Some(config)) => config,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("upgrade_check: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if config.list_faults {
        for name in scenario_names() {
            println!("{name}");
        }
        return ExitCode::SUCCESS;
    }
    let mut report = Report::new(&config);
    if let Err(e) = run(&config, &mut report) {
        report.problems.push(e);
    }
    print!("{}", report.render());
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `Ok(None)` for `--help`.
fn parse_args(mut args: impl Iterator<Item = OsString>) -> Result<Option<Config>, String> {
    let mut config = Config {
        server: PathBuf::new(),
        upgrades: 20,
        clients: 4,
        faults: false,
        fault_timeout: Duration::from_secs(2),
        time_limit: Duration::from_secs(900),
        proto: Proto::Line,
        keep_alive: 0,
        idle: 0,
        probe: false,
        list_faults: false,
        hold: None,
    };
    let mut server = None;
    let mut keep_alive = None;
    let mut hold = hold::Hold {
        connections: 0,
        ws: false,
        interval: Duration::from_millis(500),
        pace: Duration::from_millis(250),
    };
    while let Some(arg) = args.next() {
        let flag = arg.to_string_lossy().into_owned();
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: OsString, max: usize| {
            v.to_str()
                .and_then(|s| s.parse::<usize>().ok())
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("{flag}: expected a number up to {max}, got {v:?}"))
        };
        let seconds = |v: OsString| {
            v.to_str()
                .and_then(|s| s.parse::<f64>().ok())
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| format!("{flag}: bad number of seconds {v:?}"))
        };
        match flag.as_str() {
            "--server" => server = Some(PathBuf::from(value()?)),
            "--upgrades" => config.upgrades = number(value()?, MAX_UPGRADES)?,
            "--clients" => config.clients = number(value()?, MAX_CLIENTS)?,
            "--faults" => config.faults = true,
            "--fault-timeout" => config.fault_timeout = seconds(value()?)?,
            "--time-limit" => config.time_limit = seconds(value()?)?,
            "--http" => config.proto = Proto::Http,
            "--keep-alive" => keep_alive = Some(number(value()?, MAX_CLIENTS)?),
            "--idle" => config.idle = number(value()?, MAX_IDLE)?,
            "--probe" => config.probe = true,
            "--list-faults" => config.list_faults = true,
            "--hold" => hold.connections = number(value()?, hold::MAX_HOLD)?,
            "--ws" => hold.ws = true,
            "--interval" => hold.interval = seconds(value()?)?,
            "--pace" => hold.pace = seconds(value()?)?,
            "-h" | "--help" => return Ok(None),
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    if config.clients == 0 {
        return Err("--clients: at least one client is needed to measure anything".into());
    }
    if hold.connections > 0 {
        if config.faults || config.proto == Proto::Http {
            return Err("--hold goes with neither --faults nor --http".into());
        }
        config.hold = Some(hold);
    } else if hold.ws {
        return Err("--ws needs --hold".into());
    }
    if config.idle > 0 && config.proto != Proto::Http {
        return Err("--idle needs --http".into());
    }
    if config.probe && config.idle == 0 {
        return Err("--probe needs --idle N".into());
    }
    match (config.proto, keep_alive) {
        (Proto::Line, Some(_)) => return Err("--keep-alive needs --http".into()),
        (Proto::Http, Some(n)) if n > config.clients => {
            return Err(format!(
                "--keep-alive {n}: more than the {} clients",
                config.clients
            ))
        }
        (Proto::Http, n) => config.keep_alive = n.unwrap_or(config.clients.div_ceil(2)),
        (Proto::Line, None) => {}
    }
    let default_server = match config.proto {
        _ if hold.ws => "ws_server",
        Proto::Line => "tcp_server",
        Proto::Http => "http_server",
    };
    config.server = match server {
        Some(path) => path,
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this executable ({e}); use --server"))?
            .with_file_name(default_server),
    };
    if !config.server.is_file() {
        return Err(format!(
            "no server binary at {} (build it: cargo build --examples)",
            config.server.display()
        ));
    }
    Ok(Some(config))
}

fn run(config: &Config, report: &mut Report) -> Res<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&interrupted))
            .map_err(|e| format!("cannot handle signal {signal}: {e}"))?;
    }
    let _ = LIMITS.set(Limits {
        deadline: Instant::now() + config.time_limit,
        interrupted,
    });
    become_subreaper()?;
    withhold_inherited_fds()?;
    // Kills whatever is left and removes the copies, however this returns.
    let dir = Workspace::new()?;
    let deploy = Deploy::new(dir.path(), &config.server)?;
    let mut progress = Progress::new();

    if let Some(hold) = config.hold {
        let result = hold::run(config, hold, &deploy, report, &mut progress);
        progress.finish();
        result?;
    } else if config.upgrades > 0 {
        let result = upgrades_under_load(config, &deploy, report, &mut progress);
        progress.finish();
        result?;
    }
    if config.faults {
        let result = fault_scenarios(config, &deploy, report, &mut progress);
        progress.finish();
        result?;
    }

    // Everything was stopped: nothing may be left, not even a zombie.
    reap_all();
    report.leftovers = descendants(std::process::id())
        .into_iter()
        .map(describe_process)
        .collect();
    report.strays = reaped_strays(&report.generations);
    Ok(())
}

/// Phase 1: the server is upgraded again and again while the clients connect.
fn upgrades_under_load(
    config: &Config,
    deploy: &Deploy,
    report: &mut Report,
    progress: &mut Progress,
) -> Res<()> {
    progress.say(&format!(
        "upgrades under load: {} upgrades, {} clients",
        config.upgrades, config.clients
    ));
    let mut server = Server::start(
        "load",
        &deploy.bin,
        deploy.dir(),
        LOAD_UPGRADE_TIMEOUT,
        config.proto,
    )?;
    let phase = report.load.insert(LoadPhase::default());
    let result = (|| -> Res<()> {
        phase.fds_first = Some(idle_fd_count(server.current, None)?);
        let load = Load::start(server.addr, &config.client_kinds());
        let mut pool = match config.idle {
            0 => None,
            n => Some(http::IdlePool::open(server.addr, n, config.probe)?),
        };
        let result = (|| -> Res<()> {
            load.wait_answers(&server, 100)?;
            for i in 1..=config.upgrades {
                load.set_stage(format!("upgrade {i}/{}", config.upgrades));
                let shot = pool.as_mut().and_then(http::IdlePool::arm);
                let upgrade = server.upgrade(&load)?;
                if let Some(pool) = pool.as_mut() {
                    pool.after(shot, &upgrade);
                }
                progress.update(&format!(
                    "upgrade {i}/{}: pid {} -> {} in {}, {} answered, {} failed",
                    config.upgrades,
                    upgrade.old,
                    upgrade.new,
                    ms(upgrade.latency),
                    load.shared.answered.load(SeqCst),
                    load.shared.failed.load(SeqCst),
                ));
                phase.upgrades.push(upgrade);
                // Traffic in every generation before the next switch.
                load.wait_answers(&server, 200)?;
            }
            Ok(())
        })();
        phase.stats = Some(load.finish(&server.generations));
        if let Some(pool) = &pool {
            report.header.push('\n');
            report
                .header
                .push_str(pool.summary(phase.upgrades.len()).trim_end());
            report.problems.extend(pool.problems());
        }
        result?;
        server.stop()
    })();
    report.generations.extend(&server.generations);
    result.map_err(|e| server.with_log(e))
}
