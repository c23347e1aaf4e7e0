//! Upgrade latency against the spawn floor, by passed fds and by parent memory.
//!
//! `cargo bench --bench upgrade` prints tables and, last, one machine-readable line:
//! `floor_us=… upgrade4_us=… upgrade400_us=… upgrade4000_us=… rss_ratio=… child_new4000_us=…
//! handoff_p50_us=… handoff_p99_us=… handoff_ratio=…` (the handoff: see `handoff.rs`),
//! continued by `per_fd_us=… per_fd_floor_us=… per_fd_floor_rustix_us=… per_fd_over_floor_us=…
//! per_fd_ratio=… per_fd_decode_us=… per_fd_spawn_us=… child_decode4000_us=…
//! child_new_floor_ratio=…` (the per-fd floor: see
//! `fd_floor.rs`) and `http_p50_us=… http_p99_us=… upgrade_http_p50_us=…
//! upgrade_http_p99_us=… upgrade_p50_ratio=… upgrade_p99_ratio=… reconnect_p99_ratio=…
//! spawn_p99_ratio=… upgrade_p99_ratio_wrk=… upgrade_p99_ratio_rounds=…` (request latency:
//! see `requests.rs`).
//! `benches/README.md` explains each figure and its target.
//! Without `--bench` (as `cargo test --benches` runs it) it does a smoke run of a few
//! upgrades and prints no figures.
//!
//! # Processes
//!
//! The binary plays four roles, chosen by [`ROLE`] and the fd table:
//!
//! - **launcher** (`ROLE` unset): starts itself again with `ROLE=measure` and
//!   [`LAUNCHER`] set to its own pid, and waits. The environment of the measuring process
//!   is thus fixed at its start; nothing calls `set_var`.
//! - **measuring parent** (`ROLE=measure`, no previous generation, started by the
//!   launcher): runs every measurement. `upgrade()` re-executes `argv[0]` with this
//!   environment, so its children see `ROLE=measure` too.
//! - **upgrade child** (`ROLE=measure`, `Upgrader::has_parent()`): `Upgrader::new()`,
//!   `ready()`, exit. When the last entry of its fd table is a [`REPORT`] (or
//!   [`REPORT_TAKE`]) pipe, it writes its own timings there: `new()`, its page faults,
//!   decoding the table alone, taking every fd (`REPORT_TAKE` only), and `ready()`.
//! - **floor child** (`ROLE=floor`): writes one byte to its stdout (a pipe) and exits.
//!
//! # Method
//!
//! Cases are interleaved, in an order that rotates every round, and every timed
//! operation comes right after two untimed floor spawns ([`FloorSpawner::prime`]).
//! Upgrade children are reaped (`waitpid`) before the next run.
//!
//! # Settings (environment)
//!
//! - `TABLEFLIP_BENCH_ROUNDS`: rounds of the main comparison (default 150).
//! - `TABLEFLIP_BENCH_BIG_HEAP_MIB`: the large heap of the memory case (default 4096,
//!   `0` skips it). It is lowered automatically when `MemAvailable` is short.
//! - `TABLEFLIP_BENCH_HANDOFFS`: upgrades of the `tcp_server` handoff (default 100).
//! - `TABLEFLIP_BENCH_ONLY_FDS=n`: only upgrades with `n` fds, with the child's own
//!   timings, for `strace -c -f` or `perf`; `TABLEFLIP_BENCH_CHILD=take` makes the child
//!   take every fd first.
//! - `TABLEFLIP_BENCH_HTTP_CONNS` (default 4), `TABLEFLIP_BENCH_HTTP_ROUNDS` (default 5,
//!   each round a 2 s window of every kind), `TABLEFLIP_BENCH_HTTP_PERIOD_MS` (default
//!   250): the request-latency measurement.
//! - `TABLEFLIP_BENCH_ONLY=http` or `=fd-floor`: only that measurement.
//!
//! Figures only: nothing here asserts a time.

use std::error::Error;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{Read, Write};
use std::os::raw::{c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{eventfd, EventfdFlags};
use rustix::pipe::{pipe_with, PipeFlags};
use tableflip::{Options, Upgrader};

mod fd_floor;
mod handoff;
mod requests;

type Res<T> = Result<T, Box<dyn Error>>;

/// Selects the role of a process started from this binary.
const ROLE: &str = "TABLEFLIP_BENCH_ROLE";
/// The launcher's pid: only its direct child is the measuring parent.
const LAUNCHER: &str = "TABLEFLIP_BENCH_LAUNCHER";
/// Name of the pipe on which an upgrade child reports its own timings.
const REPORT: &str = "bench-report";
/// The same, asking the child to take every inherited fd before `ready()`.
const REPORT_TAKE: &str = "bench-report-take";
/// The byte a floor child writes.
const FLOOR_BYTE: u8 = b'F';

const MIB: usize = 1024 * 1024;
/// Untimed spawns before each timed one (see [`FloorSpawner::prime`]).
const PRIMERS: usize = 2;

fn main() {
    let role = std::env::var_os(ROLE);
    let result = match role.as_deref().map(OsStr::as_bytes) {
        None => launch(),
        Some(b"floor") => floor_child(),
        Some(b"measure") => measure_or_child(),
        Some(other) => Err(format!("unknown {ROLE}={}", String::from_utf8_lossy(other)).into()),
    };
    if let Err(e) = result {
        eprintln!("bench upgrade (pid {}): {e}", std::process::id());
        std::process::exit(1);
    }
}

// ---- Roles ---------------------------------------------------------------------------

/// Starts the measuring parent with its environment set from the start.
fn launch() -> Res<()> {
    let exe = std::env::current_exe()?;
    let status = Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(ROLE, "measure")
        .env(LAUNCHER, std::process::id().to_string())
        .status()?;
    if !status.success() {
        return Err(format!("measuring process: {status}").into());
    }
    Ok(())
}

fn floor_child() -> Res<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(&[FLOOR_BYTE])?;
    out.flush()?;
    Ok(())
}

fn measure_or_child() -> Res<()> {
    let faults = minor_faults();
    let t = Instant::now();
    let upg = Upgrader::new(Options::new())?;
    let new_time = t.elapsed();
    let new_faults = minor_faults().saturating_sub(faults);
    if upg.has_parent() {
        return upgrade_child(upg, new_time, new_faults);
    }
    let launcher = std::env::var(LAUNCHER).unwrap_or_default();
    if launcher != std::os::unix::process::parent_id().to_string() {
        return Err(format!(
            "{ROLE}=measure, but not an upgrade child nor started by the launcher (pid {launcher:?})"
        )
        .into());
    }
    drop(upg);
    measure()
}

fn upgrade_child(upg: Upgrader, new_time: Duration, new_faults: u64) -> Res<()> {
    // The parent registers the report pipe last, so its entry ends the table: look there
    // rather than search the registry, which would add to the timed upgrade.
    let table = std::env::var_os(tableflip::__private::FD_TABLE_VAR).unwrap_or_default();
    let last_is = |name: &str| table.as_bytes().ends_with(format!(",fd,{name}").as_bytes());
    let (mut report, take_all) = if last_is(REPORT) {
        (
            upg.fds().take_named::<OwnedFd>(REPORT)?.map(File::from),
            false,
        )
    } else if last_is(REPORT_TAKE) {
        (
            upg.fds()
                .take_named::<OwnedFd>(REPORT_TAKE)?
                .map(File::from),
            true,
        )
    } else {
        (None, false)
    };
    let mut taken = Vec::new();
    if let Some(r) = &mut report {
        // How much of new() is decoding the table (timed again, now warm).
        let t = Instant::now();
        let decoded = tableflip::__private::decode_fd_table(table.as_bytes(), std::process::id());
        let decode_time = t.elapsed();
        let _ = std::hint::black_box(decoded);
        // A server takes its sockets before ready(): f0, f1, ... until one is missing.
        let t = Instant::now();
        if take_all {
            while let Some(fd) = upg
                .fds()
                .take_named::<OwnedFd>(&format!("f{}", taken.len()))?
            {
                taken.push(fd);
            }
        }
        let take_time = t.elapsed();
        for v in [
            nanos(new_time),
            new_faults,
            nanos(decode_time),
            nanos(take_time),
        ] {
            r.write_all(&v.to_ne_bytes())?;
        }
    }
    let t = Instant::now();
    upg.ready()?;
    let ready_time = t.elapsed();
    if let Some(r) = &mut report {
        r.write_all(&nanos(ready_time).to_ne_bytes())?;
    }
    // Exit at once, without dropping anything: the parent reaps us.
    std::process::exit(0)
}

// ---- The measuring parent ------------------------------------------------------------

struct Config {
    full: bool,
    rounds: usize,
    sizes: [usize; 3],
    child_runs: usize,
    take_runs: usize,
    mem_runs: usize,
    big_heap_mib: usize,
}

fn measure() -> Res<()> {
    let full = std::env::args_os().any(|a| a == "--bench");
    let exe = std::env::current_exe()?;
    let (soft_before, soft, hard) = raise_nofile()?;

    let mut cfg = if full {
        Config {
            full,
            rounds: env_usize("TABLEFLIP_BENCH_ROUNDS", 150)?,
            sizes: [4, 400, 4000],
            child_runs: 50,
            take_runs: 10,
            mem_runs: 100,
            big_heap_mib: env_usize("TABLEFLIP_BENCH_BIG_HEAP_MIB", 4096)?,
        }
    } else {
        Config {
            full,
            rounds: 3,
            sizes: [4, 40, 400],
            child_runs: 2,
            take_runs: 1,
            mem_runs: 2,
            big_heap_mib: 0,
        }
    };
    // Each passed fd is open twice in the parent (ours and the registry's copy), and
    // every successful upgrade leaves one fd open for good (the write end of the pipe
    // that tells the new generation when this process has exited): keep room for both.
    let upgrades = 3 + 3 * cfg.rounds + cfg.child_runs + cfg.take_runs + 2 * cfg.mem_runs;
    let room = (soft as usize).saturating_sub(64 + upgrades) / 2;
    if cfg.sizes[2] > room {
        println!(
            "note: RLIMIT_NOFILE {soft} allows {room} passed fds, not {}",
            cfg.sizes[2]
        );
        cfg.sizes[2] = room;
    }
    let mem_avail = meminfo_kib("MemAvailable").unwrap_or(0) as usize / 1024;
    if cfg.big_heap_mib > 0 && cfg.big_heap_mib + 2048 > mem_avail {
        let fit = mem_avail.saturating_sub(2048);
        let lowered = if fit >= 1024 {
            1 << (usize::BITS - 1 - fit.leading_zeros())
        } else {
            0
        };
        println!(
            "note: MemAvailable is {mem_avail} MiB: large heap lowered from {} MiB to {lowered} MiB",
            cfg.big_heap_mib
        );
        cfg.big_heap_mib = lowered;
    }

    println!(
        "tableflip upgrade benchmark{}",
        if full {
            ""
        } else {
            " (smoke run: pass --bench for figures)"
        }
    );
    println!(
        "machine: {} cores, {:.1} GiB RAM ({:.1} GiB available), kernel {}, glibc {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        meminfo_kib("MemTotal").unwrap_or(0) as f64 / (1024.0 * 1024.0),
        mem_avail as f64 / 1024.0,
        kernel_release(),
        glibc_version(),
    );
    println!("RLIMIT_NOFILE: soft {soft} (was {soft_before}), hard {hard}");
    let load_start = loadavg();
    println!("load average at start: {load_start}");
    println!();

    let args: Vec<CString> = std::env::args_os()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()?;
    let spawner = FloorSpawner::new(&exe, &args)?;

    if let Some(n) = std::env::var_os("TABLEFLIP_BENCH_ONLY_FDS") {
        let n: usize = n
            .to_str()
            .and_then(|s| s.parse().ok())
            .ok_or("TABLEFLIP_BENCH_ONLY_FDS: not a number")?;
        let take = std::env::var_os("TABLEFLIP_BENCH_CHILD").is_some_and(|v| v == "take");
        return profile(n, cfg.rounds, take, &spawner);
    }
    match std::env::var("TABLEFLIP_BENCH_ONLY").as_deref() {
        Ok("http") => {
            requests::measure(&request_plan()?)?.print();
            println!("load average at end: {}", loadavg());
            return Ok(());
        }
        Ok("fd-floor") => {
            let mut f = fd_floor::FdFloor::new();
            for _ in 0..cfg.rounds {
                f.run(cfg.sizes[2])?;
            }
            print_header();
            for s in f.rows() {
                s.print_row(f.floor.median());
            }
            println!("load average at end: {}", loadavg());
            return Ok(());
        }
        Ok(other) => return Err(format!("TABLEFLIP_BENCH_ONLY={other}: http or fd-floor").into()),
        Err(_) => {}
    }

    // Main comparison, interleaved so that every case sees the same machine load and
    // the same number of open fds in this process.
    let mut floor = Samples::new("floor: vfork-style clone + execve");
    let mut floor_cmd = Samples::new("floor: std::process::Command");
    let mut up: Vec<Samples> = cfg
        .sizes
        .iter()
        .map(|n| Samples::new(&format!("upgrade(), {n} fds")))
        .collect();
    let mut register = Samples::new(&format!("  (setup) add_fd x{}", cfg.sizes[2]));
    let mut fd_floor = fd_floor::FdFloor::new();
    let mut floor_fds = Samples::new(&format!(
        "floor: vfork-style, {} close-on-exec fds open",
        2 * cfg.sizes[2]
    ));
    // Warm-up: page cache, dynamic loader, CPU frequency.
    for _ in 0..3 {
        spawner.spawn()?;
        upgrade_once(cfg.sizes[0], ChildDoes::Nothing, &spawner)?;
    }
    let t_main = Instant::now();
    // The order rotates from round to round, and every timed operation is primed
    // (see FloorSpawner::prime).
    for round in 0..cfg.rounds {
        for case in (0..7).map(|c| (c + round) % 7) {
            match case {
                0 => {
                    spawner.prime()?;
                    floor.push(spawner.spawn()?);
                }
                5 => {
                    spawner.prime()?;
                    fd_floor.run(cfg.sizes[2])?;
                }
                6 => {
                    // As many fds as an upgrade with the most fds holds (the caller's
                    // and the registry's copies), all close-on-exec: the kernel copies
                    // the fd table at the clone and closes them at the exec.
                    let held = (0..2 * cfg.sizes[2])
                        .map(|_| eventfd(0, EventfdFlags::CLOEXEC))
                        .collect::<Result<Vec<OwnedFd>, _>>()?;
                    spawner.prime()?;
                    floor_fds.push(spawner.spawn()?);
                    drop(held);
                }
                1 => {
                    spawner.prime()?;
                    floor_cmd.push(floor_command(&exe)?);
                }
                i => {
                    let r = upgrade_once(cfg.sizes[i - 2], ChildDoes::Nothing, &spawner)?;
                    up[i - 2].push(r.upgrade);
                    if i == 4 {
                        register.push(r.register);
                    }
                }
            }
        }
    }
    let main_secs = t_main.elapsed().as_secs_f64();

    // Child start-up with the largest table: the child reports its own timings.
    let big = cfg.sizes[2];
    let mut child_new = Samples::new(&format!("child Upgrader::new(), {big} inherited fds"));
    let mut child_faults: Vec<u64> = Vec::new();
    let mut child_decode = Samples::new(&format!("  of which: decode the table, {big} entries"));
    let mut child_ready = Samples::new(&format!("child ready(), {big} inherited fds unused"));
    for _ in 0..cfg.child_runs {
        let r = upgrade_once(big, ChildDoes::Report, &spawner)?;
        let c = r.child.ok_or("no report from the child")?;
        child_new.push(c.new);
        child_faults.push(c.new_faults);
        child_decode.push(c.decode);
        child_ready.push(c.ready);
    }
    // A child that takes every fd before ready(), as a server does with its sockets.
    let mut up_take = Samples::new(&format!("upgrade(), {big} fds, child takes all"));
    let mut child_take = Samples::new(&format!(
        "  child takes {big} fds (fds().take_named::<OwnedFd>(..))"
    ));
    for _ in 0..cfg.take_runs {
        let r = upgrade_once(big, ChildDoes::TakeAll, &spawner)?;
        child_take.push(r.child.ok_or("no report from the child")?.take);
        up_take.push(r.upgrade);
    }

    // Parent memory: the same 4-fd upgrade with a small and a large touched heap.
    let mut mem: Vec<(usize, Samples, Samples)> = Vec::new();
    for mib in [10, cfg.big_heap_mib] {
        if mib == 0 {
            continue;
        }
        let t = Instant::now();
        let heap = touched_heap(mib * MIB);
        let touch_secs = t.elapsed().as_secs_f64();
        let rss = status_kib("VmRSS").unwrap_or(0) / 1024;
        println!("heap of {mib} MiB touched in {touch_secs:.2} s; VmRSS {rss} MiB");
        let mut f = Samples::new(&format!("floor: vfork-style, {mib} MiB heap"));
        let mut u = Samples::new(&format!("upgrade(), 4 fds, {mib} MiB heap"));
        for _ in 0..cfg.mem_runs {
            spawner.prime()?;
            f.push(spawner.spawn()?);
            u.push(upgrade_once(4, ChildDoes::Nothing, &spawner)?.upgrade);
        }
        // Keep the heap alive (and resident) until here.
        std::hint::black_box(&heap);
        drop(heap);
        mem.push((mib, f, u));
    }
    // The handoff of a real server under load, last (it makes this process a child
    // subreaper for the server's generations).
    let handoff = if cfg.full {
        Some(handoff::measure(
            env_usize("TABLEFLIP_BENCH_HANDOFFS", 100)?,
            2,
        )?)
    } else {
        println!("handoff: skipped in the smoke run");
        None
    };
    // Request latency of a real HTTP server, with and without upgrades.
    let reqs = if cfg.full {
        Some(requests::measure(&request_plan()?)?)
    } else {
        println!("request latency: skipped in the smoke run");
        None
    };
    let load_end = loadavg();

    // ---- Report ----
    println!();
    print_header();
    let fl = floor.median();
    let rows: Vec<&Samples> = [&floor, &floor_cmd, &floor_fds]
        .into_iter()
        .chain(up.iter())
        .chain([
            &register,
            &child_new,
            &child_decode,
            &child_ready,
            &up_take,
            &child_take,
        ])
        .chain(mem.iter().flat_map(|(_, f, u)| [f, u]))
        .collect();
    for s in rows {
        s.print_row(fl);
    }
    if let Some(h) = &handoff {
        println!();
        println!(
            "handoff of tcp_server (release) under 2 connecting client threads: {} answered, {} failed",
            h.answered, h.failed
        );
        print_header();
        h.serving.print_row(fl);
        h.gone.print_row(fl);
        for p in &h.phases {
            p.print_row(fl);
        }
    }
    println!();
    println!("per passed fd, {big} fds, this process (µs per fd):");
    print_header();
    let floor_fd = fd_floor.floor.median();
    for s in fd_floor.rows() {
        s.print_row(floor_fd);
    }
    let per_fd = (up[2].median() - up[0].median()) / (cfg.sizes[2] - cfg.sizes[0]) as f64;
    // What else an upgrade pays per passed fd, from the figures above.
    let decode_fd = child_decode.median() / big as f64;
    let spawn_fd = (floor_fds.median() - fl) / big as f64;
    println!(
        "upgrade(), per passed fd: {per_fd:.3} = floor {floor_fd:.3} + decoding the entry {decode_fd:.3} + the kernel's fd table at the spawn {spawn_fd:.3} + the rest {:.3}",
        per_fd - floor_fd - decode_fd - spawn_fd
    );
    if let Some(r) = &reqs {
        println!();
        r.print();
    }
    println!();
    let ratio4 = up[0].median() / fl;
    let rss_ratio = match mem.as_slice() {
        [(_, _, small), (_, _, large)] => Some(large.median() / small.median()),
        _ => None,
    };
    let new_big = child_new.median();
    child_faults.sort_unstable();
    println!(
        "child Upgrader::new() with {big} fds: {} minor page faults (median)",
        child_faults
            .get(child_faults.len() / 2)
            .copied()
            .unwrap_or(0)
    );
    println!("main comparison: {} rounds in {main_secs:.1} s", cfg.rounds);
    println!("load average at end: {load_end}");
    if !cfg.full {
        println!("smoke run ok");
        return Ok(());
    }
    println!("targets:");
    target("upgrade with 4 fds / floor", ratio4, 1.25, "");
    target(
        &format!(
            "cost per passed fd, (upgrade{} - upgrade{}) / {}",
            cfg.sizes[2],
            cfg.sizes[0],
            cfg.sizes[2] - cfg.sizes[0]
        ),
        per_fd,
        0.5,
        " µs",
    );
    match rss_ratio {
        Some(r) => target(
            &format!("upgrade4 with {} MiB / with 10 MiB", cfg.big_heap_mib),
            r,
            1.2,
            "",
        ),
        None => println!(
            "  {:<52} skipped",
            "upgrade4 with a large heap / with 10 MiB"
        ),
    }
    target(
        &format!("child Upgrader::new() with {big} fds"),
        new_big,
        1000.0,
        " µs",
    );
    // Issue 28: the same two, against the floor measured in this run.
    target(
        "cost per passed fd / per-fd floor (F_SETFD + F_GETFD)",
        per_fd / floor_fd,
        1.5,
        "",
    );
    let new_floor = big as f64 * floor_fd + child_decode.median();
    target(
        &format!("child Upgrader::new(), {big} fds / ({big} x floor + decoding)"),
        new_big / new_floor,
        2.0,
        "",
    );
    let (h50, h99) = handoff.as_ref().map_or((f64::NAN, f64::NAN), |h| {
        (h.serving.median(), h.serving.quantile(0.99))
    });
    target(
        "handoff (SIGHUP -> new generation answers) / floor",
        h50 / fl,
        2.0,
        "",
    );
    let nan = (f64::NAN, f64::NAN);
    let ratios = |k| reqs.as_ref().map_or(nan, |r| r.ratios(k));
    let (q50, q99) = ratios(requests::Kind::Upgrade);
    let latency = |k: requests::Kind| {
        reqs.as_ref().map_or(nan, |r| {
            let s = &r.by_kind[k.index()];
            (s.median(), s.quantile(0.99))
        })
    };
    let (base50, base99) = latency(requests::Kind::Quiet);
    let (up50, up99) = latency(requests::Kind::Upgrade);
    if let Some(r) = &reqs {
        target(
            &format!(
                "request p99 with a SIGHUP every {} ms / without",
                r.period.as_millis()
            ),
            q99,
            1.5,
            "",
        );
    }
    println!();
    print!(
        "floor_us={:.1} upgrade4_us={:.1} upgrade400_us={:.1} upgrade4000_us={:.1} rss_ratio={} child_new4000_us={:.1} handoff_p50_us={:.1} handoff_p99_us={:.1} handoff_ratio={:.2}",
        fl,
        up[0].median(),
        up[1].median(),
        up[2].median(),
        rss_ratio.map_or("NA".to_string(), |r| format!("{r:.3}")),
        new_big,
        h50,
        h99,
        h50 / fl,
    );
    println!(
        " per_fd_us={per_fd:.3} per_fd_floor_us={floor_fd:.3} per_fd_floor_rustix_us={:.3} per_fd_over_floor_us={:.3} per_fd_ratio={:.2} per_fd_decode_us={decode_fd:.3} per_fd_spawn_us={spawn_fd:.3} child_decode4000_us={:.1} child_new_floor_ratio={:.2} http_p50_us={:.1} http_p99_us={:.1} upgrade_http_p50_us={:.1} upgrade_http_p99_us={:.1} upgrade_p50_ratio={q50:.2} upgrade_p99_ratio={q99:.2} reconnect_p99_ratio={:.2} spawn_p99_ratio={:.2} upgrade_p99_ratio_wrk={:.2} upgrade_p99_ratio_rounds={:.2}",
        fd_floor.floor_rustix.median(),
        per_fd - floor_fd,
        per_fd / floor_fd,
        child_decode.median(),
        new_big / new_floor,
        base50,
        base99,
        up50,
        up99,
        ratios(requests::Kind::Reconnect).1,
        ratios(requests::Kind::Spawn).1,
        reqs.as_ref().map_or(f64::NAN, |r| r.wrk_p99_ratio(requests::Kind::Upgrade)),
        reqs.as_ref().map_or(f64::NAN, |r| r.round_p99_ratio(requests::Kind::Upgrade)),
    );
    Ok(())
}

/// `TABLEFLIP_BENCH_ONLY_FDS=n`: only upgrades with `n` fds, for `strace -c -f` or `perf`.
fn profile(n: usize, rounds: usize, take: bool, spawner: &FloorSpawner) -> Res<()> {
    let mut up = Samples::new(&format!("upgrade(), {n} fds"));
    let mut new = Samples::new("child Upgrader::new()");
    let mut faults: Vec<u64> = Vec::new();
    let mut decode = Samples::new("  of which: decode the table");
    let mut taking = Samples::new("child takes every fd");
    let mut ready = Samples::new("child ready()");
    let does = if take {
        ChildDoes::TakeAll
    } else {
        ChildDoes::Report
    };
    for _ in 0..rounds {
        let r = upgrade_once(n.max(1), does, spawner)?;
        let c = r.child.ok_or("no report from the child")?;
        up.push(r.upgrade);
        new.push(c.new);
        faults.push(c.new_faults);
        decode.push(c.decode);
        taking.push(c.take);
        ready.push(c.ready);
    }
    print_header();
    let base = up.median();
    for s in [&up, &new, &decode, &taking, &ready] {
        s.print_row(base);
    }
    faults.sort_unstable();
    println!(
        "child Upgrader::new(): {} minor page faults (median)",
        faults.get(faults.len() / 2).copied().unwrap_or(0)
    );
    Ok(())
}

fn print_header() {
    println!(
        "{:<46} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "case (µs)", "runs", "median", "p10", "p90", "min", "max", "ratio"
    );
}

fn target(what: &str, value: f64, limit: f64, unit: &str) {
    let verdict = if value <= limit {
        "met".to_string()
    } else {
        format!("MISSED by {:.0}%", (value / limit - 1.0) * 100.0)
    };
    println!("  {what:<52} {value:>9.3}{unit} (target ≤ {limit}{unit}): {verdict}");
}

/// What the upgrade child does between `Upgrader::new()` and `ready()`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ChildDoes {
    /// Nothing: `ready()` closes every inherited fd.
    Nothing,
    /// Reports its timings on one of the passed fds (a pipe).
    Report,
    /// Takes every inherited fd, then reports its timings.
    TakeAll,
}

struct UpgradeRun {
    /// `add_fd` for every fd, before the timed part.
    register: Duration,
    /// `upgrade()` until it returned `Ok`.
    upgrade: Duration,
    /// The child's own timings, when asked for.
    child: Option<ChildTimes>,
}

/// What an upgrade child measures in itself.
struct ChildTimes {
    /// `Upgrader::new()`.
    new: Duration,
    /// Minor page faults during `Upgrader::new()` (fresh heap pages).
    new_faults: u64,
    /// Decoding the fd table alone (part of `new()`).
    decode: Duration,
    /// Taking every inherited fd from the registry (when asked to).
    take: Duration,
    /// `ready()`: closes the inherited fds nobody took, writes the readiness byte.
    ready: Duration,
}

/// One upgrade of a fresh first-generation `Upgrader` passing `n` fds (eventfds, each
/// under its own name), then reaps the child. With `report`, one of the `n` fds is a
/// pipe on which the child reports its own timings.
fn upgrade_once(n: usize, child: ChildDoes, primer: &FloorSpawner) -> Res<UpgradeRun> {
    let report = child != ChildDoes::Nothing;
    let events = (0..n - usize::from(report))
        .map(|_| eventfd(0, EventfdFlags::CLOEXEC))
        .collect::<Result<Vec<OwnedFd>, _>>()?;
    let pipe = if report {
        Some(pipe_with(PipeFlags::CLOEXEC)?)
    } else {
        None
    };
    let upg = Upgrader::new(Options::new().upgrade_timeout(Duration::from_secs(20)))?;
    let t = Instant::now();
    for (i, fd) in events.iter().enumerate() {
        upg.fds().add_named(&format!("f{i}"), fd)?;
    }
    if let Some((_, wr)) = &pipe {
        let name = match child {
            ChildDoes::TakeAll => REPORT_TAKE,
            _ => REPORT,
        };
        upg.fds().add_named(name, wr)?;
    }
    let register = t.elapsed();
    upg.ready()?;

    primer.prime()?;
    let t = Instant::now();
    upg.upgrade()?;
    let upgrade = t.elapsed();

    drop(upg);
    let child = match pipe {
        Some((rd, wr)) => {
            drop(wr);
            let mut buf = [0u8; 40];
            File::from(rd).read_exact(&mut buf)?;
            Some(ChildTimes {
                new: from_nanos(&buf[..8])?,
                new_faults: u64::from_ne_bytes(buf[8..16].try_into()?),
                decode: from_nanos(&buf[16..24])?,
                take: from_nanos(&buf[24..32])?,
                ready: from_nanos(&buf[32..])?,
            })
        }
        None => None,
    };
    reap_any()?;
    drop(events);
    Ok(UpgradeRun {
        register,
        upgrade,
        child,
    })
}

/// Waits for our one child (the new generation of the upgrade just done) to exit.
/// No upgrade is running, so `waitpid(-1)` cannot steal the crate's child.
fn reap_any() -> Res<()> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == -1 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("waitpid: {e}").into());
        }
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            return Err(format!("upgrade child {pid} ended with wait status {status:#x}").into());
        }
        return Ok(());
    }
}

/// A floor run with `std::process::Command` (a `posix_spawn` on glibc).
fn floor_command(exe: &Path) -> Res<Duration> {
    let t = Instant::now();
    let (rd, wr) = pipe_with(PipeFlags::CLOEXEC)?;
    let mut child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(ROLE, "floor")
        .stdout(Stdio::from(wr))
        .spawn()?;
    // The Command (and its copy of the write end) is gone: EOF comes from the child.
    read_floor_byte(rd)?;
    let d = t.elapsed();
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("floor child: {status}").into());
    }
    Ok(d)
}

fn read_floor_byte(rd: OwnedFd) -> Res<()> {
    let mut byte = [0u8; 1];
    File::from(rd).read_exact(&mut byte)?;
    if byte[0] != FLOOR_BYTE {
        return Err("floor child wrote something else".into());
    }
    Ok(())
}

/// The request-latency plan, from the environment (see the module docs).
fn request_plan() -> Res<requests::Plan> {
    Ok(requests::Plan {
        conns: env_usize("TABLEFLIP_BENCH_HTTP_CONNS", 4)?.max(1),
        window: Duration::from_secs(2),
        rounds: env_usize("TABLEFLIP_BENCH_HTTP_ROUNDS", 5)?.max(1),
        period: Duration::from_millis(
            env_usize("TABLEFLIP_BENCH_HTTP_PERIOD_MS", 250)?.max(1) as u64
        ),
    })
}

// ---- The vfork-style floor -----------------------------------------------------------

/// Spawns the floor child the way the crate spawns a new generation: a
/// `clone(CLONE_VM | CLONE_VFORK)` child on its own stack that only redirects stdout,
/// restores the signal mask and calls `execve`. argv and envp are built for each spawn
/// (the crate builds them for each upgrade too).
struct FloorSpawner {
    path: CString,
    argv: Vec<CString>,
}

/// What the floor child reads between clone and exec; it all lives on the parent's stack
/// or heap, which the suspended parent does not touch meanwhile.
struct FloorArgs {
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    stdout: RawFd,
    mask: *const libc::sigset_t,
}

impl FloorSpawner {
    fn new(exe: &Path, argv: &[CString]) -> Res<FloorSpawner> {
        Ok(FloorSpawner {
            path: CString::new(exe.as_os_str().as_bytes())?,
            argv: argv.to_vec(),
        })
    }

    /// Untimed floor runs before each timed operation, so that every case is measured
    /// in the same state: the first spawn after idle time or a long computation costs
    /// ~40% more on a VM (the other vCPU has to wake up).
    fn prime(&self) -> Res<()> {
        for _ in 0..PRIMERS {
            self.spawn()?;
        }
        Ok(())
    }

    /// One floor run: from the start of the spawn until the child's byte has arrived.
    fn spawn(&self) -> Res<Duration> {
        const STACK: usize = 64 * 1024;
        let t = Instant::now();
        let env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| k != ROLE)
            .map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv)
            })
            .chain(std::iter::once(CString::new(format!("{ROLE}=floor"))))
            .collect::<Result<_, _>>()?;
        let mut envp: Vec<*const c_char> = env.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        let mut argv: Vec<*const c_char> = self.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let (rd, wr) = pipe_with(PipeFlags::CLOEXEC)?;
        let mut stack = vec![0u8; STACK];

        // SAFETY: zeroed sigset_t values are valid; both are filled before use.
        let (mut all, mut old): (libc::sigset_t, libc::sigset_t) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        // SAFETY: valid sigset pointers.
        unsafe { libc::sigfillset(&mut all) };
        let args = FloorArgs {
            path: self.path.as_ptr(),
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            stdout: wr.as_raw_fd(),
            mask: &old,
        };
        // Block every signal so no handler runs on the child's stack (it shares our
        // memory); the child restores the old mask right before execve.
        // SAFETY: valid sigset pointers.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc).into());
        }
        // The top of the stack, 16-byte aligned (stacks grow down on x86_64 and aarch64).
        let top = {
            let end = stack.as_mut_ptr_range().end as usize;
            (end & !15) as *mut c_void
        };
        // SAFETY: CLONE_VFORK suspends this thread until the child has exec'd or exited,
        // so `args`, the buffers it points into and `stack` outlive the child's use of
        // them; the child only runs `floor_child_main`.
        let pid = unsafe {
            libc::clone(
                floor_child_main,
                top,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                &args as *const FloorArgs as *mut c_void,
            )
        };
        let clone_err = std::io::Error::last_os_error();
        // SAFETY: restoring the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        drop(wr);
        if pid == -1 {
            return Err(format!("clone: {clone_err}").into());
        }
        let read = read_floor_byte(rd);
        let d = t.elapsed();
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        while unsafe { libc::waitpid(pid, &mut status, 0) } == -1 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("waitpid({pid}): {e}").into());
            }
        }
        read?;
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            return Err(format!("floor child {pid} ended with wait status {status:#x}").into());
        }
        Ok(d)
    }
}

/// The floor child between clone and exec: async-signal-safe calls only, no allocation.
extern "C" fn floor_child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the FloorArgs the suspended parent keeps alive.
    let args = unsafe { &*(arg as *const FloorArgs) };
    // SAFETY: dup2 onto stdout; the copy is not close-on-exec. Then the parent's mask and
    // execve with NUL-terminated strings and NULL-terminated arrays.
    unsafe {
        if libc::dup2(args.stdout, 1) == -1 {
            libc::_exit(126);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, args.mask, std::ptr::null_mut());
        libc::execve(args.path, args.argv, args.envp);
        libc::_exit(127)
    }
}

// ---- Samples -------------------------------------------------------------------------

struct Samples {
    name: String,
    us: Vec<f64>,
}

impl Samples {
    fn new(name: &str) -> Samples {
        Samples {
            name: name.to_string(),
            us: Vec::new(),
        }
    }

    fn push(&mut self, d: Duration) {
        self.us.push(d.as_secs_f64() * 1e6);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.us.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    fn quantile(&self, q: f64) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() - 1) as f64 * q).round() as usize]
    }

    fn median(&self) -> f64 {
        self.quantile(0.5)
    }

    fn print_row(&self, floor: f64) {
        // Sub-microsecond figures (per fd) with ns resolution.
        let p = if self.median() < 10.0 { 3 } else { 1 };
        println!(
            "{:<46} {:>5} {:>9.p$} {:>9.p$} {:>9.p$} {:>9.p$} {:>9.p$} {:>7.2}",
            self.name,
            self.us.len(),
            self.median(),
            self.quantile(0.1),
            self.quantile(0.9),
            self.quantile(0.0),
            self.quantile(1.0),
            self.median() / floor,
        );
    }
}

// ---- Machine facts and helpers -------------------------------------------------------

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: (soft before, soft now, hard).
fn raise_nofile() -> Res<(u64, u64, u64)> {
    // SAFETY: a zeroed rlimit is valid; getrlimit fills it.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid rlimit pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == -1 {
        return Err(format!("getrlimit: {}", std::io::Error::last_os_error()).into());
    }
    let before = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: valid rlimit pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == -1 {
        return Err(format!("setrlimit: {}", std::io::Error::last_os_error()).into());
    }
    Ok((before, lim.rlim_cur, lim.rlim_max))
}

/// `bytes` of heap, every page written (4 KiB pages unless THP is set to `always`).
fn touched_heap(bytes: usize) -> Vec<u8> {
    vec![1u8; bytes]
}

/// Minor page faults of this process so far.
fn minor_faults() -> u64 {
    // SAFETY: a zeroed rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid rusage pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    u64::try_from(ru.ru_minflt).unwrap_or(0)
}

fn env_usize(name: &str, default: usize) -> Res<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a number").into()),
        Err(_) => Ok(default),
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn from_nanos(b: &[u8]) -> Res<Duration> {
    Ok(Duration::from_nanos(u64::from_ne_bytes(b.try_into()?)))
}

fn proc_field(file: &str, key: &str) -> Option<u64> {
    std::fs::read_to_string(file).ok()?.lines().find_map(|l| {
        l.strip_prefix(key)?
            .strip_prefix(':')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

fn meminfo_kib(key: &str) -> Option<u64> {
    proc_field("/proc/meminfo", key)
}

fn status_kib(key: &str) -> Option<u64> {
    proc_field("/proc/self/status", key)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

#[cfg(target_env = "gnu")]
fn glibc_version() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string.
    let v = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
    v.to_string_lossy().into_owned()
}

#[cfg(not(target_env = "gnu"))]
fn glibc_version() -> String {
    "(not glibc)".into()
}
