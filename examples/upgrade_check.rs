//! Proves zero-downtime upgrades: runs a server, connects to it continuously from a few
//! threads while it upgrades itself again and again, deploys broken binaries, and counts
//! every connection that was refused, reset, timed out or answered wrongly.
//!
//! ```text
//! upgrade_check [--server PATH] [--upgrades N] [--clients K] [--faults]
//!               [--fault-timeout SECS] [--time-limit SECS]
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
//! # The server contract
//!
//! Any server can be checked if it takes `--listen HOST:PORT`, `--pid-file PATH` and
//! `--upgrade-timeout SECS`, writes its pid file when ready, upgrades on `SIGHUP`, stops
//! on `SIGTERM` (exiting with status 0), answers every connection with one line holding
//! `pid=<its pid>` and closes it. For `--faults` it must also log a line containing
//! `upgrade failed` and the reason to stderr when an upgrade fails.
//!
//! The server runs from a copy of its binary in a temporary directory, started with
//! `argv[0]` = that path, so an upgrade re-executes whatever a "deploy" last put there.
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
//!    handling, and that is not what is measured.)
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

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, IsTerminal, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: upgrade_check [--server PATH] [--upgrades N] [--clients K] [--faults]
                     [--fault-timeout SECS] [--time-limit SECS]";

const MAX_CLIENTS: usize = 64;
const MAX_UPGRADES: usize = 10_000;
const MAX_CONNECTIONS: u64 = 50_000_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A reply is one short line: anything longer is wrong.
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
    };
    let mut server = None;
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
            "-h" | "--help" => return Ok(None),
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    if config.clients == 0 {
        return Err("--clients: at least one client is needed to measure anything".into());
    }
    config.server = match server {
        Some(path) => path,
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this executable ({e}); use --server"))?
            .with_file_name("tcp_server"),
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
    // Kills whatever is left and removes the copies, however this returns.
    let dir = Workspace::new()?;
    let deploy = Deploy::new(dir.path(), &config.server)?;
    let mut progress = Progress::new();

    if config.upgrades > 0 {
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

// ---------------------------------------------------------------------------------------
// Phase 1: upgrades under load
// ---------------------------------------------------------------------------------------

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
    let mut server = Server::start("load", &deploy.bin, deploy.dir(), LOAD_UPGRADE_TIMEOUT)?;
    let phase = report.load.insert(LoadPhase::default());
    let result = (|| -> Res<()> {
        phase.fds_first = Some(idle_fd_count(server.current, None)?);
        let load = Load::start(server.addr, config.clients);
        let result = (|| -> Res<()> {
            load.wait_answers(&server, 100)?;
            for i in 1..=config.upgrades {
                load.set_stage(format!("upgrade {i}/{}", config.upgrades));
                let upgrade = server.upgrade(&load)?;
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
        result?;
        server.stop()
    })();
    report.generations.extend(&server.generations);
    result.map_err(|e| server.with_log(e))
}

// ---------------------------------------------------------------------------------------
// Phase 2: fault scenarios
// ---------------------------------------------------------------------------------------

/// A broken deploy, and the reason the old generation must give for refusing it.
struct Fault {
    name: &'static str,
    install: fn(&Deploy) -> Res<()>,
    expect: &'static str,
}

fn faults() -> [Fault; 5] {
    [
        Fault {
            name: "exits with status 3",
            install: |d| d.install_script("#!/bin/sh\nexit 3\n"),
            expect: "exit status: 3",
        },
        Fault {
            name: "killed by SIGKILL",
            install: |d| d.install_script("#!/bin/sh\nkill -9 $$\n"),
            expect: "signal: 9",
        },
        Fault {
            name: "hangs past the timeout",
            install: |d| d.install_script("#!/bin/sh\nexec sleep 1000\n"),
            expect: "not ready after",
        },
        Fault {
            name: "binary missing",
            install: Deploy::remove,
            expect: "No such file or directory",
        },
        Fault {
            name: "no execute bit",
            install: Deploy::install_not_executable,
            expect: "Permission denied",
        },
    ]
}

fn fault_scenarios(
    config: &Config,
    deploy: &Deploy,
    report: &mut Report,
    progress: &mut Progress,
) -> Res<()> {
    progress.say(&format!(
        "fault scenarios: --upgrade-timeout {}, {} clients",
        secs(config.fault_timeout),
        config.clients
    ));
    deploy.install_good()?;
    let mut server = Server::start("faults", &deploy.bin, deploy.dir(), config.fault_timeout)?;
    let load = Load::start(server.addr, config.clients);
    let result = (|| -> Res<()> {
        load.wait_answers(&server, 100)?;
        for fault in faults() {
            load.set_stage(format!("fault: {}", fault.name));
            progress.say(&format!("fault: {}", fault.name));
            let outcome = failed_upgrade(&mut server, &load, deploy, &fault)?;
            report.faults.push(outcome);
        }
        load.set_stage("fault: old generation killed".into());
        progress.say("fault: old generation killed mid-upgrade");
        let outcome = killed_mid_upgrade(&mut server, &load, deploy)?;
        report.faults.push(outcome);
        Ok(())
    })();
    report.fault_stats = Some(load.finish(&server.generations));
    report.generations.extend(&server.generations);
    let result = result.and_then(|()| server.stop());
    result.map_err(|e| server.with_log(e))
}

/// Deploys `fault`, sends SIGHUP, and checks that the old generation shrugs it off; then
/// deploys the good binary again and upgrades to it.
fn failed_upgrade(
    server: &mut Server,
    load: &Load,
    deploy: &Deploy,
    fault: &Fault,
) -> Res<FaultOutcome> {
    let old = server.current;
    let mut outcome = FaultOutcome::new(fault.name);
    let fds_before = idle_fd_count(old, Some(load))?;
    let failed_before = load.shared.failed.load(SeqCst);
    let logged_before = server.failure_lines().len();

    (fault.install)(deploy)?;
    signal(old, libc::SIGHUP)?;
    let line = wait_for(
        "the failed upgrade to be logged",
        server.upgrade_timeout + STEP_TIMEOUT,
        Duration::from_millis(5),
        || {
            if exited(old) {
                return Err(format!("the old generation (pid {old}) exited"));
            }
            Ok(server.failure_lines().get(logged_before).cloned())
        },
    )?;
    let logged_at = now_us();
    outcome.reason = reason(&line);
    if !line.contains(fault.expect) {
        outcome.problem(format!("expected the reason to mention {:?}", fault.expect));
    }

    // Still the one generation, serving: to the clients and to a connection of ours.
    load.wait_answered_by(old, logged_at)?;
    match probe(server.addr) {
        Ok(pid) if pid == old => {}
        Ok(pid) => outcome.problem(format!("a probe was answered by pid {pid}, not {old}")),
        Err((kind, e)) => outcome.problem(format!("a probe failed: {}: {e}", kind.name())),
    }
    match server.pid_from_file() {
        Some(pid) if pid == old => {}
        other => outcome.problem(format!("the pid file names {other:?}, not {old}")),
    }
    let strays = strays(old);
    if !strays.is_empty() {
        outcome.problem(format!("processes left behind: {}", strays.join(", ")));
    }
    let fds_after = idle_fd_count(old, Some(load))?;
    outcome.fds = format!("{fds_before} -> {fds_after}");
    if fds_after != fds_before {
        outcome.problem(format!("fd count {fds_before} before, {fds_after} after"));
    }

    // The next deploy is good: the failure left nothing in the way.
    deploy.install_good()?;
    let upgrade = server.upgrade(load)?;
    outcome.recovery = Some(upgrade.latency);
    outcome.failed_connections = load.shared.failed.load(SeqCst) - failed_before;
    Ok(outcome)
}

/// Deploys a wrapper that sleeps before it executes the good binary, kills the old
/// generation with SIGKILL while the wrapper sleeps, and checks that the new generation
/// comes up on its own, then upgrades.
fn killed_mid_upgrade(server: &mut Server, load: &Load, deploy: &Deploy) -> Res<FaultOutcome> {
    let old = server.current;
    let mut outcome = FaultOutcome::new("old generation SIGKILLed mid-upgrade");
    let failed_before = load.shared.failed.load(SeqCst);

    // If the good binary is not back in place when the wrapper wakes up, `exec "$0"`
    // runs the wrapper again, which waits another second.
    deploy.install_script("#!/bin/sh\nsleep 1\nexec \"$0\" \"$@\"\n")?;
    signal(old, libc::SIGHUP)?;
    // The wrapper is the old generation's child; it sleeps while it has a child itself.
    let wrapper = wait_for(
        "the slow wrapper to start",
        STEP_TIMEOUT,
        Duration::from_millis(2),
        || Ok(children(old).into_iter().find(|&c| !children(c).is_empty())),
    )?;
    // Nothing in flight: the connections a SIGKILLed server was handling are lost, and
    // that is not the point here. Connections made from now on queue on the listener.
    load.pause()?;
    if children(wrapper).is_empty() {
        // Pausing took so long that the wrapper may have gone on: not a valid test.
        outcome.problem("the wrapper had stopped sleeping before the SIGKILL".into());
    }
    signal(old, libc::SIGKILL)?;
    let killed_at = now_us();
    deploy.install_good()?;
    load.resume();

    let status = wait_reaped(old)?;
    if status.is_some_and(|s| !(libc::WIFSIGNALED(s) && libc::WTERMSIG(s) == libc::SIGKILL)) {
        outcome.problem(format!(
            "the old generation ended with {}",
            status_text(status)
        ));
    }
    let new = wait_for(
        "the pid file to name the new generation",
        STEP_TIMEOUT,
        Duration::from_millis(1),
        || {
            if exited(wrapper) {
                return Err(format!("the new generation (pid {wrapper}) exited"));
            }
            Ok(server.pid_from_file().filter(|&p| p != old))
        },
    )?;
    server.generations.push(new);
    server.current = new;
    if new != wrapper {
        outcome.problem(format!(
            "the pid file names {new}, the wrapper was {wrapper}"
        ));
    }
    let answered = load.wait_answered_by(new, killed_at)?;
    outcome.reason = format!(
        "pid {new} took over alone, {} after the SIGKILL",
        ms(micros(answered - killed_at))
    );
    let strays = strays(new);
    if !strays.is_empty() {
        outcome.problem(format!("processes left behind: {}", strays.join(", ")));
    }
    outcome.fds = format!("{} (new)", idle_fd_count(new, Some(load))?);

    // It knows its parent is gone (an upgrade is refused while the parent lives).
    let upgrade = server.upgrade(load)?;
    outcome.recovery = Some(upgrade.latency);
    outcome.failed_connections = load.shared.failed.load(SeqCst) - failed_before;
    Ok(outcome)
}

/// "[tcp_server pid=1] upgrade failed: reason" -> "reason".
fn reason(line: &str) -> String {
    let rest = &line[line.find("upgrade failed").unwrap_or(0)..];
    rest.trim_start_matches("upgrade failed")
        .trim_start_matches([':', ' '])
        .to_string()
}

// ---------------------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------------------

/// A server started from `bin`, and every generation it has had.
struct Server {
    addr: SocketAddr,
    pid_file: PathBuf,
    log: PathBuf,
    upgrade_timeout: Duration,
    /// The generation that serves now.
    current: u32,
    generations: Vec<u32>,
    stopped: bool,
}

/// One successful upgrade, times measured from the SIGHUP.
struct Upgrade {
    old: u32,
    new: u32,
    /// Until a connection was answered by the new pid.
    latency: Duration,
    /// Until the pid file named the new pid.
    ready: Duration,
    /// How long the old generation kept answering after the new one was ready (the pid
    /// file named it, or it answered).
    overlap: Duration,
    /// Until every thread of the old generation had exited.
    old_exit: Duration,
    /// Connections answered from the SIGHUP until the old generation had exited.
    answered: u64,
    /// The new generation's fd count, idle.
    fds: usize,
}

impl Server {
    /// Starts `bin` (as `argv[0]`) in `dir` on a free loopback port, and waits until it
    /// has written its pid file and answered a connection.
    fn start(label: &str, bin: &Path, dir: &Path, upgrade_timeout: Duration) -> Res<Server> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("cannot find a free port: {e}"))?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let pid_file = dir.join(format!("{label}.pid"));
        let log = dir.join(format!("{label}.log"));
        let log_file =
            fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let child = Command::new(bin)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("--upgrade-timeout")
            .arg(upgrade_timeout.as_secs_f64().to_string())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        // Reaped by `reap_all` like every later generation.
        let pid = child.id();
        drop(child);
        let mut server = Server {
            addr,
            pid_file,
            log,
            upgrade_timeout,
            current: pid,
            generations: vec![pid],
            stopped: false,
        };
        let ready = wait_for(
            "the server to be ready",
            STEP_TIMEOUT,
            Duration::from_millis(5),
            || {
                if exited(pid) {
                    return Err(format!("the server (pid {pid}) exited during start-up"));
                }
                Ok(
                    (server.pid_from_file() == Some(pid) && probe(addr).ok() == Some(pid))
                        .then_some(()),
                )
            },
        );
        if let Err(e) = ready {
            server.stopped = true; // nothing to stop cleanly: Workspace kills it
            return Err(server.with_log(e));
        }
        Ok(server)
    }

    fn pid_from_file(&self) -> Option<u32> {
        fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()
    }

    /// The server's log lines that report a failed upgrade.
    fn failure_lines(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("upgrade failed"))
            .map(str::to_owned)
            .collect()
    }

    /// `msg`, followed by the end of the server's log.
    fn with_log(&self, msg: String) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n    ");
        format!("{msg}\n  end of the server's log:\n    {tail}")
    }

    /// Sends SIGHUP to the current generation and follows the upgrade to its end: the
    /// new generation is ready and answering, the old one has exited with status 0.
    fn upgrade(&mut self, load: &Load) -> Res<Upgrade> {
        let old = self.current;
        let logged_before = self.failure_lines().len();
        let answered_before = load.shared.answered.load(SeqCst);
        let sent = now_us();
        signal(old, libc::SIGHUP)?;

        // Ready: ready() writes the pid file before the old generation is told.
        let mut polls = 0u32;
        let (new, ready_at) = wait_for(
            "the pid file to name a new generation",
            self.upgrade_timeout + STEP_TIMEOUT,
            Duration::from_millis(1),
            || {
                if let Some(pid) = self.pid_from_file().filter(|&p| p != old) {
                    return Ok(Some((pid, now_us())));
                }
                polls += 1;
                if polls % 20 == 0 {
                    if let Some(line) = self.failure_lines().get(logged_before) {
                        return Err(format!("pid {old}: {}", line.trim()));
                    }
                    if exited(old) {
                        return Err(format!("pid {old} exited without a successor"));
                    }
                }
                Ok(None)
            },
        )?;
        self.generations.push(new);
        self.current = new;
        let answered_at = load.wait_answered_by(new, sent)?;

        // The old generation drains and exits: every thread, with status 0.
        wait_for(
            &format!("the old generation (pid {old}) to exit"),
            DRAIN_TIMEOUT + STEP_TIMEOUT,
            Duration::from_millis(1),
            || Ok(exited(old).then_some(())),
        )?;
        let exited_at = now_us();
        let answered = load.shared.answered.load(SeqCst) - answered_before;
        let status = wait_reaped(old)?;
        if status.is_some_and(|s| !(libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0)) {
            return Err(format!(
                "the old generation (pid {old}) ended with {}",
                status_text(status)
            ));
        }
        let strays = strays(new);
        if !strays.is_empty() {
            return Err(format!(
                "after the upgrade to pid {new}, processes were left: {}",
                strays.join(", ")
            ));
        }

        let ready_ref = ready_at.min(answered_at);
        let last_old = load.seen(old).map_or(0, |s| s.last);
        let fds = idle_fd_count(new, Some(load))?;
        Ok(Upgrade {
            old,
            new,
            latency: micros(answered_at - sent),
            ready: micros(ready_at - sent),
            overlap: micros(last_old.saturating_sub(ready_ref)),
            old_exit: micros(exited_at - sent),
            answered,
            fds,
        })
    }

    /// SIGTERM to the current generation, which must exit with status 0.
    fn stop(&mut self) -> Res<()> {
        let pid = self.current;
        signal(pid, libc::SIGTERM)?;
        wait_for(
            &format!("pid {pid} to exit after SIGTERM"),
            DRAIN_TIMEOUT + STEP_TIMEOUT,
            Duration::from_millis(2),
            || Ok(exited(pid).then_some(())),
        )?;
        let status = wait_reaped(pid)?;
        self.stopped = true;
        if status.is_some_and(|s| !(libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0)) {
            return Err(format!(
                "pid {pid} ended with {} after SIGTERM",
                status_text(status)
            ));
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.stopped {
            kill_descendants();
        }
    }
}

/// The directory the server runs from, with the binary a deploy replaces.
struct Deploy {
    /// The path the server runs from (its `argv[0]`).
    bin: PathBuf,
    /// A pristine copy of the server binary.
    good: PathBuf,
}

impl Deploy {
    fn new(dir: &Path, server: &Path) -> Res<Deploy> {
        let name = server.file_name().unwrap_or("server".as_ref());
        let deploy = Deploy {
            bin: dir.join(name),
            good: dir.join("good-binary"),
        };
        fs::copy(server, &deploy.good)
            .map_err(|e| format!("copy {} to {}: {e}", server.display(), dir.display()))?;
        deploy.install_good()?;
        Ok(deploy)
    }

    fn dir(&self) -> &Path {
        self.good.parent().unwrap_or(Path::new("."))
    }

    fn install_good(&self) -> Res<()> {
        self.install(0o755, |tmp| fs::copy(&self.good, tmp).map(drop))
    }

    fn install_script(&self, script: &str) -> Res<()> {
        self.install(0o755, |tmp| fs::write(tmp, script))
    }

    fn install_not_executable(&self) -> Res<()> {
        self.install(0o644, |tmp| fs::copy(&self.good, tmp).map(drop))
    }

    fn remove(&self) -> Res<()> {
        fs::remove_file(&self.bin).map_err(|e| format!("remove {}: {e}", self.bin.display()))
    }

    /// As a deploy does it: write a new file next to the binary, then rename it over.
    fn install(&self, mode: u32, write: impl FnOnce(&Path) -> io::Result<()>) -> Res<()> {
        let tmp = self.dir().join("deploy.tmp");
        let _ = fs::remove_file(&tmp);
        write(&tmp)
            .and_then(|()| fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)))
            .and_then(|()| fs::rename(&tmp, &self.bin))
            .map_err(|e| format!("deploy to {}: {e}", self.bin.display()))
    }
}

// ---------------------------------------------------------------------------------------
// The clients
// ---------------------------------------------------------------------------------------

/// Why a connection failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    Refused,
    Reset,
    Timeout,
    Empty,
    Wrong,
    Other,
}

const FAILURES: [Failure; 6] = [
    Failure::Refused,
    Failure::Reset,
    Failure::Timeout,
    Failure::Empty,
    Failure::Wrong,
    Failure::Other,
];

impl Failure {
    fn name(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Reset => "reset",
            Failure::Timeout => "timeout",
            Failure::Empty => "empty reply",
            Failure::Wrong => "wrong reply",
            Failure::Other => "other",
        }
    }

    fn of(e: &io::Error) -> Failure {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Failure::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Failure::Reset,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Failure::Timeout,
            _ => Failure::Other,
        }
    }
}

/// One new connection: the pid that answered, or why not.
fn probe(addr: SocketAddr) -> Result<u32, (Failure, String)> {
    let fail = |what: &str, e: io::Error| (Failure::of(&e), format!("{what}: {e}"));
    let conn =
        TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| fail("connect", e))?;
    conn.set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| fail("set_read_timeout", e))?;
    let mut reply = Vec::new();
    (&conn)
        .take(MAX_REPLY)
        .read_to_end(&mut reply)
        .map_err(|e| fail("read", e))?;
    if reply.is_empty() {
        return Err((Failure::Empty, "closed without a reply".into()));
    }
    let wrong = || {
        (
            Failure::Wrong,
            format!("{:?}", String::from_utf8_lossy(&reply)),
        )
    };
    let text = std::str::from_utf8(&reply).map_err(|_| wrong())?;
    let line = text.strip_suffix('\n').filter(|l| !l.contains('\n'));
    line.and_then(parse_pid).ok_or_else(wrong)
}

/// The `pid=<digits>` in a reply.
fn parse_pid(reply: &str) -> Option<u32> {
    let rest = &reply[reply.find("pid=")? + 4..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok().filter(|&pid| pid > 0)
}

/// When a pid answered, in µs since the start of this program.
#[derive(Clone, Copy)]
struct Seen {
    first: u64,
    last: u64,
}

/// What the client threads share with the control thread.
struct Shared {
    addr: SocketAddr,
    stop: AtomicBool,
    paused: AtomicBool,
    /// Clients between deciding to connect and being done with the connection.
    busy: AtomicUsize,
    started: AtomicU64,
    answered: AtomicU64,
    failed: AtomicU64,
    by_kind: [AtomicU64; 6],
    seen: Mutex<BTreeMap<u32, Seen>>,
    /// The first failures, in words.
    examples: Mutex<Vec<String>>,
    /// What the control thread is doing, for the failure messages.
    stage: Mutex<String>,
}

/// `K` client threads that connect without pause until [`Load::finish`].
struct Load {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// What the clients saw, in the end.
struct LoadStats {
    answered: u64,
    by_kind: [u64; 6],
    examples: Vec<String>,
    /// Answers from pids that were not a generation of the server.
    unknown_pids: Vec<u32>,
    capped: bool,
}

impl LoadStats {
    fn failed(&self) -> u64 {
        self.by_kind.iter().sum()
    }
}

impl Load {
    fn start(addr: SocketAddr, clients: usize) -> Load {
        let shared = Arc::new(Shared {
            addr,
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            by_kind: Default::default(),
            seen: Mutex::new(BTreeMap::new()),
            examples: Mutex::new(Vec::new()),
            stage: Mutex::new("start".into()),
        });
        let threads = (0..clients)
            .map(|_| {
                let shared = Arc::clone(&shared);
                thread::spawn(move || client(&shared))
            })
            .collect();
        Load { shared, threads }
    }

    fn set_stage(&self, stage: String) {
        *lock(&self.shared.stage) = stage;
    }

    fn seen(&self, pid: u32) -> Option<Seen> {
        lock(&self.shared.seen).get(&pid).copied()
    }

    /// Waits until `n` more connections have been answered.
    fn wait_answers(&self, server: &Server, n: u64) -> Res<()> {
        let target = self.shared.answered.load(SeqCst) + n;
        wait_for(
            &format!("{n} answers from pid {}", server.current),
            STEP_TIMEOUT,
            Duration::from_millis(1),
            || Ok((self.shared.answered.load(SeqCst) >= target).then_some(())),
        )
    }

    /// Waits until a client is answered by `pid` after `since` (µs); returns when the
    /// first such answer arrived.
    fn wait_answered_by(&self, pid: u32, since: u64) -> Res<u64> {
        wait_for(
            &format!("a client to be answered by pid {pid}"),
            STEP_TIMEOUT,
            Duration::from_millis(1),
            || {
                Ok(self
                    .seen(pid)
                    .filter(|s| s.last >= since)
                    .map(|s| s.first.max(since)))
            },
        )
    }

    /// Stops the clients from starting connections and waits until none is open.
    fn pause(&self) -> Res<()> {
        self.shared.paused.store(true, SeqCst);
        wait_for(
            "the clients to finish their connections",
            CONNECT_TIMEOUT + READ_TIMEOUT + STEP_TIMEOUT,
            Duration::from_millis(1),
            || Ok((self.shared.busy.load(SeqCst) == 0).then_some(())),
        )
    }

    fn resume(&self) {
        self.shared.paused.store(false, SeqCst);
    }

    /// Stops the clients; `generations` are the pids allowed to answer.
    fn finish(mut self, generations: &[u32]) -> LoadStats {
        self.shared.stop.store(true, SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let s = &self.shared;
        LoadStats {
            answered: s.answered.load(SeqCst),
            by_kind: std::array::from_fn(|i| s.by_kind[i].load(SeqCst)),
            examples: lock(&s.examples).clone(),
            unknown_pids: lock(&s.seen)
                .keys()
                .filter(|pid| !generations.contains(pid))
                .copied()
                .collect(),
            capped: s.started.load(SeqCst) >= MAX_CONNECTIONS,
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
    }
}

/// A client thread: one connection after the other, each answered or counted as failed.
fn client(shared: &Shared) {
    while !shared.stop.load(SeqCst) {
        // Announce the connection first, then look at `paused`: `pause()` sets it first,
        // then waits for `busy` to drop to zero, so one of the two always sees the other.
        shared.busy.fetch_add(1, SeqCst);
        if shared.paused.load(SeqCst) {
            shared.busy.fetch_sub(1, SeqCst);
            thread::sleep(Duration::from_millis(1));
            continue;
        }
        if shared.started.fetch_add(1, SeqCst) >= MAX_CONNECTIONS {
            shared.busy.fetch_sub(1, SeqCst);
            return;
        }
        let result = probe(shared.addr);
        let at = now_us();
        match result {
            Ok(pid) => {
                let mut seen = lock(&shared.seen);
                let s = seen.entry(pid).or_insert(Seen {
                    first: at,
                    last: at,
                });
                s.first = s.first.min(at);
                s.last = s.last.max(at);
                drop(seen);
                shared.answered.fetch_add(1, SeqCst);
            }
            Err((kind, msg)) => {
                shared.by_kind[kind as usize].fetch_add(1, SeqCst);
                shared.failed.fetch_add(1, SeqCst);
                let mut examples = lock(&shared.examples);
                if examples.len() < 10 {
                    let stage = lock(&shared.stage).clone();
                    examples.push(format!(
                        "at {:.3} s, {stage}: {}: {msg}",
                        at as f64 / 1e6,
                        kind.name()
                    ));
                }
            }
        }
        shared.busy.fetch_sub(1, SeqCst);
    }
}

/// The fd count of `pid` once it is idle: the clients paused (if any), and the count
/// unchanged for 25 ms.
fn idle_fd_count(pid: u32, load: Option<&Load>) -> Res<usize> {
    if let Some(load) = load {
        load.pause()?;
    }
    let mut last = None;
    let mut stable = 0;
    let count = wait_for(
        &format!("the fd count of pid {pid} to settle"),
        STEP_TIMEOUT,
        Duration::from_millis(5),
        || {
            let n = fd_count(pid).ok_or_else(|| format!("cannot read /proc/{pid}/fd"))?;
            stable = if last == Some(n) { stable + 1 } else { 0 };
            last = Some(n);
            Ok((stable >= 5).then_some(n))
        },
    );
    if let Some(load) = load {
        load.resume();
    }
    count
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

/// The end of the run: `--time-limit` from the start, or a SIGINT/SIGTERM.
struct Limits {
    deadline: Instant,
    interrupted: Arc<AtomicBool>,
}

static LIMITS: OnceLock<Limits> = OnceLock::new();
static START: OnceLock<Instant> = OnceLock::new();

fn now_us() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

fn micros(us: u64) -> Duration {
    Duration::from_micros(us)
}

/// Polls `f` every `every` until it returns `Ok(Some)`, fails, or `timeout` passes.
/// Reaps exited children on the way, and gives up when the run is interrupted or out of
/// time.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Res<Option<T>>,
) -> Res<T> {
    let deadline = Instant::now() + timeout;
    loop {
        reap_all();
        if let Some(v) = f()? {
            return Ok(v);
        }
        if let Some(limits) = LIMITS.get() {
            if limits.interrupted.load(SeqCst) {
                return Err(format!("interrupted while waiting for {what}"));
            }
            if Instant::now() >= limits.deadline {
                return Err(format!("time limit reached while waiting for {what}"));
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        thread::sleep(every);
    }
}

fn signal(pid: u32, sig: i32) -> Res<()> {
    // SAFETY: kill(2) has no memory-safety preconditions. `pid` is a generation this
    // program has not reaped, so the number cannot have been reused.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } == 0 {
        Ok(())
    } else {
        Err(format!(
            "kill({pid}, {sig}): {}",
            io::Error::last_os_error()
        ))
    }
}

/// Makes this process the reaper of orphaned descendants: each generation is
/// reparented here when its parent, the previous generation, exits.
fn become_subreaper() -> Res<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) };
        if rc != 0 {
            return Err(format!(
                "prctl(PR_SET_CHILD_SUBREAPER): {}",
                io::Error::last_os_error()
            ));
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    Err("upgrade_check runs on Linux only (it follows processes in /proc)".into())
}

/// Wait statuses of the children reaped so far.
static REAPED: Mutex<BTreeMap<u32, i32>> = Mutex::new(BTreeMap::new());

/// Reaps every child that has exited, keeping its status.
fn reap_all() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid pointer to an int.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        lock(&REAPED).insert(pid as u32, status);
    }
}

/// The wait status of `pid`, which has exited (all threads): `Ok(None)` if it is not
/// this program's child to reap.
fn wait_reaped(pid: u32) -> Res<Option<i32>> {
    wait_for(
        &format!("pid {pid} to be reaped"),
        STEP_TIMEOUT,
        Duration::from_millis(1),
        || {
            if let Some(&status) = lock(&REAPED).get(&pid) {
                return Ok(Some(Some(status)));
            }
            let mut status = 0;
            // SAFETY: waitpid with a valid pointer to an int.
            let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
            if rc == pid as libc::pid_t {
                lock(&REAPED).insert(pid, status);
                Ok(Some(Some(status)))
            } else if rc < 0 {
                Ok(Some(None)) // ECHILD: someone else's child
            } else {
                Ok(None)
            }
        },
    )
}

/// Pids this program reaped that were not generations of a server.
fn reaped_strays(generations: &[u32]) -> Vec<String> {
    lock(&REAPED)
        .iter()
        .filter(|(pid, _)| !generations.contains(pid))
        .map(|(pid, &status)| format!("{pid} ({})", status_text(Some(status))))
        .collect()
}

fn status_text(status: Option<i32>) -> String {
    match status {
        None => "an unknown status (not our child)".into(),
        Some(s) if libc::WIFEXITED(s) => format!("exit status {}", libc::WEXITSTATUS(s)),
        Some(s) if libc::WIFSIGNALED(s) => format!("signal {}", libc::WTERMSIG(s)),
        Some(s) => format!("wait status {s:#x}"),
    }
}

/// Whether `pid` has exited: gone, or every thread a zombie (an orphan waits for its
/// reaper; a zombie main thread can hide threads that still run).
fn exited(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks
        .flatten()
        .all(|t| matches!(task_state(&t.path()), None | Some('Z' | 'X')))
}

/// The state letter in a `/proc/.../stat` file, after the parenthesised command name.
fn task_state(dir: &Path) -> Option<char> {
    let stat = fs::read_to_string(dir.join("stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The children of `pid`, from every thread.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(list) = fs::read_to_string(t.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = children(pid);
    while let Some(p) = todo.pop() {
        todo.extend(children(p));
        out.push(p);
    }
    out
}

/// What is left besides the server's current generation: its children (zombies or
/// strays) and anything else reparented to this program.
fn strays(current: u32) -> Vec<String> {
    reap_all();
    descendants(std::process::id())
        .into_iter()
        .filter(|&p| p != current)
        .map(describe_process)
        .collect()
}

fn describe_process(pid: u32) -> String {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let comm = fs::read_to_string(dir.join("comm")).unwrap_or_default();
    let state = task_state(&dir).unwrap_or('?');
    format!("{pid} ({}, state {state})", comm.trim())
}

fn fd_count(pid: u32) -> Option<usize> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// SIGKILLs every descendant until none is left. Only this program's own children are
/// signalled (their pids cannot be reused before they are reaped); grandchildren are
/// reparented here as their parents die, and signalled in the next round.
fn kill_descendants() {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        reap_all();
        let children = children(std::process::id());
        if children.is_empty() || Instant::now() >= deadline {
            return;
        }
        for pid in children {
            let _ = signal(pid, libc::SIGKILL);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A temporary directory for the server copies; on drop, every process left is killed
/// and the directory removed.
struct Workspace(PathBuf);

impl Workspace {
    fn new() -> Res<Workspace> {
        let path = std::env::temp_dir().join(format!("upgrade_check-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
        Ok(Workspace(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        kill_descendants();
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------------------

/// A progress line on stderr: rewritten in place on a terminal, else printed every few
/// seconds.
struct Progress {
    tty: bool,
    last: Option<Instant>,
    pending: bool,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: io::stderr().is_terminal(),
            last: None,
            pending: false,
        }
    }

    /// A line of its own.
    fn say(&mut self, line: &str) {
        self.finish();
        eprintln!("upgrade_check: {line}");
    }

    fn update(&mut self, line: &str) {
        if self.tty {
            eprint!("\r\x1b[K  {line}");
            self.pending = true;
        } else if self
            .last
            .map_or(true, |t| t.elapsed() >= Duration::from_secs(2))
        {
            eprintln!("  {line}");
            self.last = Some(Instant::now());
        }
    }

    fn finish(&mut self) {
        if self.pending {
            eprintln!();
            self.pending = false;
        }
    }
}

#[derive(Default)]
struct LoadPhase {
    upgrades: Vec<Upgrade>,
    stats: Option<LoadStats>,
    /// The first generation's fd count, idle (the upgraded ones are in `upgrades`).
    fds_first: Option<usize>,
}

impl LoadPhase {
    /// The fewest and most fds an upgraded generation held. The first generation is not
    /// compared: an upgraded one holds fds it has no use for, such as tableflip's
    /// lifeline pipe from its parent.
    fn fds_range(&self) -> Option<(usize, usize)> {
        let fds = self.upgrades.iter().map(|u| u.fds);
        Some((fds.clone().min()?, fds.max()?))
    }
}

struct FaultOutcome {
    name: &'static str,
    reason: String,
    problems: Vec<String>,
    /// The old generation's fd count before and after, idle.
    fds: String,
    failed_connections: u64,
    /// The good upgrade afterwards: SIGHUP until the new pid answered.
    recovery: Option<Duration>,
}

impl FaultOutcome {
    fn new(name: &'static str) -> FaultOutcome {
        FaultOutcome {
            name,
            reason: String::new(),
            problems: Vec::new(),
            fds: "?".into(),
            failed_connections: 0,
            recovery: None,
        }
    }

    fn problem(&mut self, msg: String) {
        self.problems.push(msg);
    }

    fn passed(&self) -> bool {
        self.problems.is_empty() && self.failed_connections == 0 && self.recovery.is_some()
    }
}

struct Report {
    header: String,
    upgrades_planned: usize,
    faults_planned: bool,
    load: Option<LoadPhase>,
    faults: Vec<FaultOutcome>,
    fault_stats: Option<LoadStats>,
    /// Every generation of every server.
    generations: Vec<u32>,
    leftovers: Vec<String>,
    strays: Vec<String>,
    problems: Vec<String>,
}

impl Report {
    fn new(config: &Config) -> Report {
        Report {
            header: format!(
                "upgrade_check: {}, {} client threads",
                config.server.display(),
                config.clients
            ),
            upgrades_planned: config.upgrades,
            faults_planned: config.faults,
            load: None,
            faults: Vec::new(),
            fault_stats: None,
            generations: Vec::new(),
            leftovers: Vec::new(),
            strays: Vec::new(),
            problems: Vec::new(),
        }
    }

    fn passed(&self) -> bool {
        let stats_ok = |s: &Option<LoadStats>| {
            s.as_ref().map_or(true, |s| {
                s.failed() == 0 && s.unknown_pids.is_empty() && !s.capped
            })
        };
        let load_ok = self.load.as_ref().map_or(self.upgrades_planned == 0, |l| {
            l.upgrades.len() == self.upgrades_planned
                && stats_ok(&l.stats)
                && l.fds_range().map_or(true, |(min, max)| min == max)
        });
        let faults_ok = !self.faults_planned
            || (self.faults.len() == faults().len() + 1
                && self.faults.iter().all(FaultOutcome::passed)
                && stats_ok(&self.fault_stats));
        self.problems.is_empty()
            && load_ok
            && faults_ok
            && self.leftovers.is_empty()
            && self.strays.is_empty()
    }

    fn render(&self) -> String {
        let mut out = format!("\n{}\n", self.header);
        let row = |out: &mut String, name: &str, value: String| {
            out.push_str(&format!("  {name:<34}{value}\n"));
        };
        if let Some(load) = &self.load {
            out.push_str("\nUpgrades under load\n");
            let ups = &load.upgrades;
            row(
                &mut out,
                "upgrades",
                format!("{} of {}", ups.len(), self.upgrades_planned),
            );
            if let Some(stats) = &load.stats {
                render_stats(&mut out, stats);
            }
            let dist = |f: fn(&Upgrade) -> Duration| distribution(ups.iter().map(f).collect());
            row(&mut out, "SIGHUP -> new pid answers", dist(|u| u.latency));
            row(&mut out, "SIGHUP -> pid file names it", dist(|u| u.ready));
            row(
                &mut out,
                "old answering after new ready",
                dist(|u| u.overlap),
            );
            row(
                &mut out,
                "SIGHUP -> old generation exited",
                dist(|u| u.old_exit),
            );
            row(
                &mut out,
                "answered during the upgrades",
                format!(
                    "{} (from SIGHUP until the old generation exited)",
                    ups.iter().map(|u| u.answered).sum::<u64>()
                ),
            );
            row(
                &mut out,
                "old generations exited",
                format!("{} of {}, each with status 0", ups.len(), ups.len()),
            );
            let first = load.fds_first.map_or("?".into(), |n| n.to_string());
            let upgraded = match load.fds_range() {
                None => "-".into(),
                Some((min, max)) if min == max => format!("{min} in each upgraded one"),
                Some((min, max)) => format!("from {min} to {max} in the upgraded ones (a leak)"),
            };
            row(
                &mut out,
                "server fds, idle",
                format!("{first} in the first generation, {upgraded}"),
            );
        }
        if self.faults_planned {
            out.push_str("\nFault scenarios (each followed by a good upgrade)\n");
            out.push_str(&format!(
                "  {:<38}{:<7}{:<9}{:<10}{:<11}{}\n",
                "scenario",
                "result",
                "failed",
                "fds",
                "recovery",
                "reason logged by the old generation"
            ));
            for f in &self.faults {
                let recovery = f.recovery.map_or("-".into(), ms);
                out.push_str(&format!(
                    "  {:<38}{:<7}{:<9}{:<10}{:<11}{}\n",
                    f.name,
                    if f.passed() { "ok" } else { "FAIL" },
                    f.failed_connections,
                    f.fds,
                    recovery,
                    f.reason
                ));
                for p in &f.problems {
                    out.push_str(&format!("      problem: {p}\n"));
                }
            }
            if let Some(stats) = &self.fault_stats {
                render_stats(&mut out, stats);
            }
        }
        out.push('\n');
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        row(&mut out, "processes left over", list(&self.leftovers));
        row(&mut out, "other processes reaped", list(&self.strays));
        for p in &self.problems {
            out.push_str(&format!("  FAILED: {p}\n"));
        }
        out.push_str(if self.passed() {
            "\nresult: PASS\n"
        } else {
            "\nresult: FAIL\n"
        });
        out
    }
}

fn render_stats(out: &mut String, stats: &LoadStats) {
    let kinds: Vec<String> = FAILURES
        .iter()
        .map(|&k| format!("{} {}", k.name(), stats.by_kind[k as usize]))
        .collect();
    out.push_str(&format!(
        "  {:<34}{} answered, {} failed ({})\n",
        "connections",
        stats.answered,
        stats.failed(),
        kinds.join(", ")
    ));
    for e in &stats.examples {
        out.push_str(&format!("      {e}\n"));
    }
    if !stats.unknown_pids.is_empty() {
        out.push_str(&format!(
            "      answered by pids that were no generation: {:?}\n",
            stats.unknown_pids
        ));
    }
    if stats.capped {
        out.push_str(&format!(
            "      stopped at the limit of {MAX_CONNECTIONS} connections\n"
        ));
    }
}

/// "median 2.1 ms, p99 4.0 ms, max 5.2 ms".
fn distribution(mut values: Vec<Duration>) -> String {
    if values.is_empty() {
        return "-".into();
    }
    values.sort();
    // Nearest rank: the smallest value with at least p of the values at or below it.
    let rank =
        |p: f64| values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
    format!(
        "median {}, p99 {}, max {}",
        ms(rank(0.5)),
        ms(rank(0.99)),
        ms(values[values.len() - 1])
    )
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}
