//! Request latency as users feel it: the `http_server` example (release build, default
//! flags but a pid file) serves a pool of keep-alive connections, one client thread each,
//! each sending its next `GET /` as soon as the last answer has arrived (a closed loop,
//! as wrk does). Every request is timed from the moment its client starts on it
//! (connecting first when the server ended the connection with `Connection: close`)
//! until the whole response has arrived.
//!
//! Windows of four kinds ([`Kind`]) alternate, their order rotating every round, each
//! followed by a pause of one period so that an upgrade's tail does not spill into the
//! next window: nothing else; a `SIGHUP` every period (to the pid the pid file names, as
//! an operator's `kill -HUP "$(cat pid_file)"`); every client reconnecting every period
//! (what the upgrade's lame duck makes them do, without the upgrade); `http_server
//! --help` run every period (starting the binary, without the upgrade). A request
//! belongs to the window in which it started.
//!
//! Where the time goes, from the same run:
//! - the upgrade windows' requests by the time since the last `SIGHUP`, and the first
//!   requests of new connections (the client moving to the new generation);
//! - every window's requests by the age of their connection (in `http_server`, the age
//!   of the thread serving it);
//! - the new generation's start-up: its main thread's CPU time, its time waiting for a
//!   CPU on a run queue, and its minor page faults, from `clone` to when it waits for its
//!   accept thread (the main thread does nothing else; read from
//!   `/proc/PID/task/PID/{schedstat,stat}` before the next `SIGHUP`);
//! - how busy the machine was in each kind of window (`/proc/stat`);
//! - round by round, each kind's p99 over the baseline window's of the same round;
//! - the same latencies as wrk reports them ([`wrk_corrected`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::handoff::{now_ns, server_binary, Server};
use crate::{Res, Samples};

/// What the clients send: the smallest keep-alive request.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

/// How the request-latency figure is taken.
pub struct Plan {
    /// Keep-alive connections, one client thread each.
    pub conns: usize,
    /// Length of each window.
    pub window: Duration,
    /// Windows of each kind.
    pub rounds: usize,
    /// Time between two `SIGHUP`s in an upgrade window.
    pub period: Duration,
}

/// One request as a client saw it.
#[derive(Clone, Copy)]
struct Req {
    /// When the client started on it (`CLOCK_MONOTONIC`, ns).
    start: u64,
    /// Until the whole response had arrived.
    ns: u64,
    /// The first request of a new connection (the time includes `connect`).
    fresh: bool,
    /// How long its connection had been open when it started (ns).
    age: u64,
}

/// Buckets of the upgrade windows' requests by the time since the last `SIGHUP`, in ms.
pub const SINCE_SIGHUP_MS: [(u64, u64); 4] = [(0, 5), (5, 20), (20, 100), (100, u64::MAX)];

/// Buckets of every window's requests by the age of their connection, in ms.
pub const CONN_AGE_MS: [(u64, u64); 6] = [
    (0, 10),
    (10, 50),
    (50, 100),
    (100, 250),
    (250, 1000),
    (1000, u64::MAX),
];

/// What the request-latency measurement found.
pub struct Requests {
    /// Every request, by the kind of its window (in the order of [`KINDS`]).
    pub by_kind: Vec<Samples>,
    /// Round by round, p99 of each kind's window over the baseline window's (in the
    /// order of [`KINDS`]): paired windows, next to each other in time.
    pub rounds: Vec<[f64; KINDS.len()]>,
    /// The same, as wrk would report them (see [`wrk_corrected`]).
    pub wrk: Vec<Samples>,
    /// Every window's requests but first ones, by [`CONN_AGE_MS`].
    pub by_age: Vec<Samples>,
    /// The upgrade windows' requests by [`SINCE_SIGHUP_MS`].
    pub since_sighup: Vec<Samples>,
    /// First requests on new connections: in the upgrade windows (the new generation's
    /// first), and in the reconnect windows (a generation that has served a while).
    pub fresh: [Samples; 2],
    /// Of the upgrade windows' requests slower than the baseline's p99: how many, how
    /// many started in the first 20 ms after a `SIGHUP`, how many were first requests.
    pub slow: (usize, usize, usize),
    /// The new generations' start-up.
    pub start: StartUp,
    /// `SIGHUP`s sent, and upgrades seen (the pid file named a new pid by the next one).
    pub sighups: usize,
    pub upgrades: usize,
    /// Failed requests: what happened.
    pub failed: Vec<String>,
    /// The machine's busy share (all CPUs), by the kind of window.
    pub busy: [f64; KINDS.len()],
    /// The plan's connections and period.
    pub conns: usize,
    pub period: Duration,
}

impl Requests {
    /// The windows without anything else.
    pub fn baseline(&self) -> &Samples {
        &self.by_kind[Kind::Quiet.index()]
    }

    /// `kind`'s (p50, p99) over the baseline's.
    pub fn ratios(&self, kind: Kind) -> (f64, f64) {
        let (s, b) = (&self.by_kind[kind.index()], self.baseline());
        (s.median() / b.median(), s.quantile(0.99) / b.quantile(0.99))
    }

    /// The median over the rounds of `kind`'s p99 over the baseline's in the same round:
    /// a burst of other work spoils one round, not the figure.
    pub fn round_p99_ratio(&self, kind: Kind) -> f64 {
        let mut v: Vec<f64> = self.rounds.iter().map(|r| r[kind.index()]).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }

    /// `kind`'s p99 over the baseline's, both as wrk would report them.
    pub fn wrk_p99_ratio(&self, kind: Kind) -> f64 {
        let (s, b) = (&self.wrk[kind.index()], &self.wrk[Kind::Quiet.index()]);
        s.quantile(0.99) / b.quantile(0.99)
    }

    /// The tables: latencies by kind of window, where the upgrade windows' slow requests
    /// are, by connection age, the new generation's start-up.
    pub fn print(&self) {
        println!(
            "request latency of http_server (release), {} keep-alive connections, something every {} ms ({} SIGHUPs, {} upgrades), {} failed",
            self.conns,
            self.period.as_millis(),
            self.sighups,
            self.upgrades,
            self.failed.len(),
        );
        let mut reasons: Vec<&String> = self.failed.iter().collect();
        reasons.sort();
        reasons.dedup();
        for r in reasons.iter().take(5) {
            println!("  failed: {r}");
        }
        println!(
            "{:<46} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>5} {:>5} {:>5}",
            "case (µs)", "n", "p50", "p90", "p99", "p99.9", "max", "p50×", "p99×", "busy"
        );
        let base = self.baseline();
        for (s, b) in self.by_kind.iter().zip(self.busy) {
            row(&s.name, s, base, Some(b));
        }
        println!("the same as wrk reports them (corrected for coordinated omission, see benches/README.md):");
        for s in &self.wrk {
            row(
                &format!("  {}", s.name),
                s,
                &self.wrk[Kind::Quiet.index()],
                None,
            );
        }
        println!("of the SIGHUP windows:");
        for s in self.since_sighup.iter().chain(&self.fresh) {
            row(&s.name, s, base, None);
        }
        println!("of all windows (each connection's first request aside):");
        for s in &self.by_age {
            row(&s.name, s, base, None);
        }
        println!("p99 over the baseline's, round by round (windows next to each other in time):");
        for (kind, i) in KINDS.iter().zip(0..).skip(1) {
            let each: Vec<String> = self.rounds.iter().map(|r| format!("{:.2}", r[i])).collect();
            println!(
                "  {:<44} {} (median {:.2})",
                kind.name(),
                each.join(" "),
                self.round_p99_ratio(*kind)
            );
        }
        let (slow, early, first) = self.slow;
        let base99 = base.quantile(0.99);
        println!(
            "with upgrades, {slow} requests took longer than the baseline's p99 ({base99:.1} µs): {early} of them started less than 20 ms after a SIGHUP, {first} were first requests on a new connection"
        );
        let mut faults = self.start.faults.clone();
        faults.sort_unstable();
        println!(
            "new generation's main thread, clone to ready and committed: CPU median {:.0} µs (p90 {:.0}), waiting for a CPU median {:.0} µs (p90 {:.0}), {} minor faults (median)",
            self.start.cpu.median(),
            self.start.cpu.quantile(0.9),
            self.start.wait.median(),
            self.start.wait.quantile(0.9),
            faults.get(faults.len() / 2).copied().unwrap_or(0),
        );
    }
}

/// One row of the request tables: `s`, and its p50 and p99 over `base`'s.
fn row(name: &str, s: &Samples, base: &Samples, busy: Option<f64>) {
    println!(
        "{:<46} {:>7} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>5.2} {:>5.2} {:>5}",
        name,
        s.us.len(),
        s.median(),
        s.quantile(0.9),
        s.quantile(0.99),
        s.quantile(0.999),
        s.quantile(1.0),
        s.median() / base.median(),
        s.quantile(0.99) / base.quantile(0.99),
        busy.map_or(String::new(), |b| format!("{:.0}%", b * 100.0)),
    );
}

/// Runs the server and the clients, and measures.
pub fn measure(plan: &Plan) -> Res<Requests> {
    let bin = server_binary("http_server")?;
    let Server {
        dir,
        pid_file,
        addr,
        mut first,
        ..
    } = Server::start(&bin, "requests", &[])?;
    let outcome = run(plan, &bin, addr, &pid_file);
    let current = read_pid(&pid_file).unwrap_or(first.id());
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(current as i32, libc::SIGTERM) };
    let t = Instant::now();
    while TcpStream::connect(addr).is_ok() && t.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = first.try_wait();
    // Reap whatever was reparented here.
    // SAFETY: waitpid with a null status pointer.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
    if outcome.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("requests: the server's log is in {}", dir.display());
    }
    outcome
}

/// What happens every period in a window.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// Nothing: the baseline.
    Quiet,
    /// `SIGHUP` to the server: an upgrade.
    Upgrade,
    /// Every client drops its connection and makes a new one for its next request, as
    /// the lame duck's `Connection: close` makes it do in an upgrade, without the upgrade.
    Reconnect,
    /// `http_server --help` runs to its end (a `posix_spawn`, the dynamic loader, `main`):
    /// the CPU of starting the binary, without the upgrade.
    Spawn,
}

pub const KINDS: [Kind; 4] = [Kind::Quiet, Kind::Upgrade, Kind::Reconnect, Kind::Spawn];

impl Kind {
    pub fn index(self) -> usize {
        KINDS.iter().position(|&k| k == self).unwrap_or(0)
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Quiet => "requests, nothing else",
            Kind::Upgrade => "requests, SIGHUP (upgrade) every period",
            Kind::Reconnect => "requests, clients reconnect every period",
            Kind::Spawn => "requests, `http_server --help` every period",
        }
    }
}

/// The new generations' main threads, each read before the next `SIGHUP`: from the
/// clone until it waits for its accept thread (it does nothing else once ready).
pub struct StartUp {
    /// CPU time.
    pub cpu: Samples,
    /// Time waiting for a CPU on a run queue.
    pub wait: Samples,
    /// Minor page faults.
    pub faults: Vec<u64>,
}

impl StartUp {
    fn add(&mut self, pid: u32) {
        if let Some((cpu, wait, faults)) = main_thread_stats(pid) {
            self.cpu.push(cpu);
            self.wait.push(wait);
            self.faults.push(faults);
        }
    }
}

/// What happens during the windows, as the driving thread sees it.
struct Driver<'a> {
    plan: &'a Plan,
    bin: &'a Path,
    pid_file: &'a Path,
    /// Bumped to make every client reconnect.
    epoch: Arc<AtomicU64>,
    /// (kind, start, end) of each window, `CLOCK_MONOTONIC` ns.
    windows: Vec<(Kind, u64, u64)>,
    /// When each period's event happened.
    ticks: Vec<u64>,
    /// (busy, total) jiffies by kind.
    busy: [(u64, u64); KINDS.len()],
    start: StartUp,
    last_pid: u32,
    sighups: usize,
    upgrades: usize,
}

impl Driver<'_> {
    /// One window of `kind`, then a pause of one period.
    fn window(&mut self, kind: Kind) -> Res<()> {
        let plan = self.plan;
        let cpu = cpu_jiffies();
        let (from, from_ns) = (Instant::now(), now_ns());
        let mut k = 0u32;
        while kind != Kind::Quiet && from.elapsed() + plan.period / 2 < plan.window {
            sleep_until(from + plan.period * k);
            k += 1;
            // Old generations end up here (subreaper): reap them as they exit.
            // SAFETY: waitpid with a null status pointer.
            while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
            self.ticks.push(now_ns());
            self.tick(kind)?;
        }
        sleep_until(from + plan.window);
        self.windows.push((kind, from_ns, now_ns()));
        if let (Some((b0, t0)), Some((b1, t1))) = (cpu, cpu_jiffies()) {
            self.busy[kind.index()].0 += b1.saturating_sub(b0);
            self.busy[kind.index()].1 += t1.saturating_sub(t0);
        }
        // Let the last upgrade finish before the next window.
        std::thread::sleep(plan.period);
        Ok(())
    }

    fn tick(&mut self, kind: Kind) -> Res<()> {
        match kind {
            Kind::Quiet => {}
            Kind::Upgrade => {
                let pid = self.new_generation()?;
                self.sighups += 1;
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid as i32, libc::SIGHUP) };
            }
            Kind::Reconnect => {
                self.epoch.fetch_add(1, Ordering::Relaxed);
            }
            Kind::Spawn => {
                let status = Command::new(self.bin)
                    .arg("--help")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .status()?;
                if !status.success() {
                    return Err(format!("http_server --help: {status}").into());
                }
            }
        }
        Ok(())
    }

    /// The pid the pid file names; if the last `SIGHUP` made it a new one, counts the
    /// upgrade and reads the new generation's start-up.
    fn new_generation(&mut self) -> Res<u32> {
        let pid = read_pid(self.pid_file).ok_or("requests: no pid file")?;
        if pid != self.last_pid {
            self.upgrades += 1;
            self.start.add(pid);
            self.last_pid = pid;
        }
        Ok(pid)
    }
}

fn run(plan: &Plan, bin: &Path, addr: SocketAddr, pid_file: &Path) -> Res<Requests> {
    let t = Instant::now();
    while read_pid(pid_file).is_none() || TcpStream::connect(addr).is_err() {
        if t.elapsed() > Duration::from_secs(20) {
            return Err("requests: http_server did not start".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut d = Driver {
        plan,
        bin,
        pid_file,
        epoch: Arc::new(AtomicU64::new(0)),
        windows: Vec::new(),
        ticks: Vec::new(),
        busy: [(0, 0); KINDS.len()],
        start: StartUp {
            cpu: Samples::new("new generation's main thread: CPU time"),
            wait: Samples::new("new generation's main thread: waiting for a CPU"),
            faults: Vec::new(),
        },
        last_pid: read_pid(pid_file).ok_or("requests: no pid file")?,
        sighups: 0,
        upgrades: 0,
    };
    let threads: Vec<_> = (0..plan.conns)
        .map(|_| {
            let (stop, epoch) = (Arc::clone(&stop), Arc::clone(&d.epoch));
            std::thread::spawn(move || client(addr, &stop, &epoch))
        })
        .collect();
    // Warm-up: connections made, the server's threads running.
    std::thread::sleep(Duration::from_millis(500));
    // Every kind once per round, in an order that rotates.
    let outcome = (0..plan.rounds)
        .flat_map(|round| (0..KINDS.len()).map(move |i| KINDS[(i + round) % KINDS.len()]))
        .try_for_each(|kind| d.window(kind))
        .and_then(|()| d.new_generation().map(drop));
    stop.store(true, Ordering::Relaxed);
    let mut reqs = Vec::new();
    let mut failed = Vec::new();
    for t in threads {
        let (r, f) = t.join().map_err(|_| "requests: a client thread panicked")?;
        reqs.extend(r);
        failed.extend(f);
    }
    outcome?;
    Ok(Requests {
        sighups: d.sighups,
        upgrades: d.upgrades,
        failed,
        busy: d.busy.map(|(b, t)| b as f64 / t.max(1) as f64),
        conns: plan.conns,
        period: plan.period,
        ..classify(&reqs, &d.windows, &d.ticks, plan.conns, d.start)
    })
}

/// Sorts the requests into the windows; the upgrade windows' requests by the time since
/// the last `SIGHUP`; every request by the age of its connection.
fn classify(
    reqs: &[Req],
    windows: &[(Kind, u64, u64)],
    ticks: &[u64],
    plan_conns: usize,
    start: StartUp,
) -> Requests {
    let mut by_kind: Vec<Samples> = KINDS.iter().map(|k| Samples::new(k.name())).collect();
    // Each window's requests, for the round-by-round ratios.
    let mut by_window: Vec<Samples> = windows.iter().map(|_| Samples::new("")).collect();
    let mut fresh = [
        Samples::new("  first request on a new connection"),
        Samples::new("  the same in the reconnect windows"),
    ];
    // The upgrade windows' requests, with the ms since the last SIGHUP before each.
    let mut in_upgrade: Vec<(&Req, u64)> = Vec::new();
    for r in reqs {
        let Some(w) = windows
            .iter()
            .position(|(_, a, b)| (*a..*b).contains(&r.start))
        else {
            continue;
        };
        let kind = windows[w].0;
        by_kind[kind.index()].push(Duration::from_nanos(r.ns));
        by_window[w].push(Duration::from_nanos(r.ns));
        match kind {
            Kind::Reconnect if r.fresh => fresh[1].push(Duration::from_nanos(r.ns)),
            Kind::Upgrade => {
                let i = ticks.partition_point(|&s| s <= r.start);
                let ms = i
                    .checked_sub(1)
                    .map_or(u64::MAX, |j| (r.start - ticks[j]) / 1_000_000);
                if r.fresh {
                    fresh[0].push(Duration::from_nanos(r.ns));
                }
                in_upgrade.push((r, ms));
            }
            _ => {}
        }
    }
    let since_sighup = bucketed(
        &SINCE_SIGHUP_MS,
        |a, b| match b {
            u64::MAX => format!("  started {a} ms or more after a SIGHUP"),
            _ => format!("  started {a}-{b} ms after a SIGHUP"),
        },
        in_upgrade.iter().map(|(r, ms)| (*ms, r.ns)),
    );
    let by_age = bucketed(
        &CONN_AGE_MS,
        |a, b| match b {
            u64::MAX => format!("  on a connection open {a} ms or more"),
            _ => format!("  on a connection open {a}-{b} ms"),
        },
        reqs.iter()
            .filter(|r| !r.fresh)
            .map(|r| (r.age / 1_000_000, r.ns)),
    );
    let p99_ns = by_kind[Kind::Quiet.index()].quantile(0.99) * 1e3;
    let slow: Vec<&(&Req, u64)> = in_upgrade
        .iter()
        .filter(|(r, _)| r.ns as f64 > p99_ns)
        .collect();
    let early = slow.iter().filter(|(_, ms)| *ms < 20).count();
    let first = slow.iter().filter(|(r, _)| r.fresh).count();
    // Windows come round by round, every kind once per round.
    let rounds = windows
        .chunks(KINDS.len())
        .zip(by_window.chunks(KINDS.len()))
        .map(|(w, s)| {
            let p99 = |kind: Kind| {
                w.iter()
                    .position(|x| x.0 == kind)
                    .map_or(f64::NAN, |i| s[i].quantile(0.99))
            };
            KINDS.map(|k| p99(k) / p99(Kind::Quiet))
        })
        .collect();
    Requests {
        rounds,
        wrk: wrk_view(&by_kind, windows, plan_conns),
        by_kind,
        by_age,
        since_sighup,
        fresh,
        slow: (slow.len(), early, first),
        start,
        sighups: 0,
        upgrades: 0,
        failed: Vec::new(),
        busy: [0.0; KINDS.len()],
        conns: 0,
        period: Duration::ZERO,
    }
}

/// `(key, ns)` pairs sorted into the `ranges` of keys (half-open), named by `name`.
fn bucketed(
    ranges: &[(u64, u64)],
    name: impl Fn(u64, u64) -> String,
    items: impl Iterator<Item = (u64, u64)>,
) -> Vec<Samples> {
    let mut out: Vec<Samples> = ranges
        .iter()
        .map(|&(a, b)| Samples::new(&name(a, b)))
        .collect();
    for (key, ns) in items {
        if let Some(i) = ranges.iter().position(|&(a, b)| (a..b).contains(&key)) {
            out[i].push(Duration::from_nanos(ns));
        }
    }
    out
}

/// Each kind's latencies as one wrk run of its windows would report them.
fn wrk_view(by_kind: &[Samples], windows: &[(Kind, u64, u64)], conns: usize) -> Vec<Samples> {
    KINDS
        .iter()
        .zip(by_kind)
        .map(|(&kind, s)| {
            let us: u64 = windows
                .iter()
                .filter(|w| w.0 == kind)
                .map(|(_, a, b)| (b - a) / 1000)
                .sum();
            let per_conn = s.us.len() as f64 / conns.max(1) as f64;
            wrk_corrected(s, us as f64 / per_conn.max(1.0))
        })
        .collect()
}

/// The latencies `s` as wrk reports them. wrk corrects for coordinated omission
/// (`stats_correct` in its `stats.c`, applied to every run): with `interval` the mean
/// time between two requests of one connection (the run's length over the requests per
/// connection), each latency `l` of at least twice the interval adds the samples
/// `l - interval`, `l - 2 interval`, ... while they are above one interval: the requests
/// that a client sending at a steady rate would have had waiting behind the slow one.
/// A stall of one connection thus counts about `stall / interval` times.
fn wrk_corrected(s: &Samples, interval_us: f64) -> Samples {
    let mut out = Samples::new(&s.name);
    out.us = s.us.clone();
    if interval_us > 0.0 {
        for &l in s.us.iter().filter(|&&l| l >= 2.0 * interval_us) {
            let mut m = l - interval_us;
            while m > interval_us {
                out.us.push(m);
                m -= interval_us;
            }
        }
    }
    out
}

/// A client: one keep-alive connection at a time, one request after the other.
/// Failed requests are returned as what happened, in words.
fn client(addr: SocketAddr, stop: &AtomicBool, epoch: &AtomicU64) -> (Vec<Req>, Vec<String>) {
    let mut reqs = Vec::with_capacity(1 << 16);
    let mut failed = Vec::new();
    let mut conn: Option<TcpStream> = None;
    let mut opened = 0;
    let mut buf = Vec::with_capacity(1024);
    let mut seen = epoch.load(Ordering::Relaxed);
    while !stop.load(Ordering::Relaxed) {
        let start = now_ns();
        // Told to reconnect ([`Kind::Reconnect`]).
        let now = epoch.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            conn = None;
        }
        let fresh = conn.is_none();
        if fresh {
            match TcpStream::connect(addr) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    conn = Some(s);
                    opened = start;
                }
                Err(e) => {
                    failed.push(format!("connect: {e}"));
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
            }
        }
        let Some(s) = conn.as_mut() else { continue };
        match get(s, &mut buf) {
            Ok(close) => {
                reqs.push(Req {
                    start,
                    ns: now_ns() - start,
                    fresh,
                    age: start - opened,
                });
                if close {
                    conn = None;
                }
            }
            Err(e) => {
                let on = if fresh { "a new" } else { "a reused" };
                failed.push(format!("request on {on} connection: {e}"));
                conn = None;
            }
        }
    }
    (reqs, failed)
}

/// One request and its whole `200` response; `Ok(true)` if the server closes after it.
fn get(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    s.write_all(REQUEST)?;
    buf.clear();
    let mut chunk = [0u8; 1024];
    let head = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match read(s, &mut chunk)? {
            0 => return Err(bad("closed before the response")),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let text = std::str::from_utf8(&buf[..head]).map_err(|_| bad("head not UTF-8"))?;
    if !text.starts_with("HTTP/1.1 200 ") {
        return Err(bad("not 200"));
    }
    let (mut len, mut close) = (None, false);
    for line in text.split("\r\n") {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            len = value.trim().parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("connection") {
            close |= value.trim().eq_ignore_ascii_case("close");
        }
    }
    let len = len.ok_or_else(|| bad("no Content-Length"))?;
    while buf.len() < head + len {
        match read(s, &mut chunk)? {
            0 => return Err(bad("closed within the response")),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
    if buf.len() > head + len {
        return Err(bad("more than one response"));
    }
    Ok(close)
}

/// `read`, again after `EINTR` (this process reaps the server's generations: `SIGCHLD`).
fn read(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

fn read_pid(pid_file: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

/// The main thread of `pid`: (CPU time, time waiting on a run queue, minor faults).
fn main_thread_stats(pid: u32) -> Option<(Duration, Duration, u64)> {
    let sched = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/schedstat")).ok()?;
    let mut it = sched.split_whitespace().map(|v| v.parse::<u64>().ok());
    let (cpu, wait) = (it.next()??, it.next()??);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, minflt 10.
    let after = &stat[stat.rfind(')')? + 2..];
    let faults = after.split_whitespace().nth(7)?.parse().ok()?;
    Some((
        Duration::from_nanos(cpu),
        Duration::from_nanos(wait),
        faults,
    ))
}

/// (busy, total) jiffies of all CPUs so far.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user already).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}
