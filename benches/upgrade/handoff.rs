//! The handoff as users feel it: the `tcp_server` example (release build), with client
//! threads connecting without pause, upgraded by `SIGHUP` again and again. For each
//! upgrade: `SIGHUP` → the first connection answered by the new generation, and
//! `SIGHUP` → the old generation gone (every thread: its pidfd is readable), with the
//! phases in between read from the server's trace lines (`TCP_SERVER_TRACE`).

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{Res, Samples};

/// The phases of a handoff, in order: (name, from, to), each a trace point of the old
/// (`old:`) or the new (`new:`) generation, or the `SIGHUP` itself.
const PHASES: [(&str, &str, &str); 6] = [
    ("signal -> upgrade() called", "sighup", "old:upgrade"),
    ("spawn -> exec (new main())", "old:upgrade", "new:main"),
    ("exec -> Upgrader::new() returned", "new:main", "new:new"),
    (
        "-> readiness reported (ready() called)",
        "new:new",
        "new:report",
    ),
    (
        "-> committed (ready() returned)",
        "new:report",
        "new:committed",
    ),
    (
        "-> old stops accepting",
        "new:committed",
        "old:stopped-accepting",
    ),
];

/// What the handoff measurement found.
pub struct Handoff {
    pub serving: Samples,
    pub gone: Samples,
    pub phases: Vec<Samples>,
    pub answered: u64,
    pub failed: u64,
}

/// `CLOCK_MONOTONIC` in nanoseconds, as the server's trace lines have it.
pub fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The release build of the example `name`, next to this benchmark's binary.
pub fn server_binary(name: &str) -> Res<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/release/deps/upgrade-… → target/release/examples/NAME
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot find the target directory")?;
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(format!("cargo build --release --example {name} failed").into());
    }
    Ok(dir.join("examples").join(name))
}

/// A server example started for a measurement, with a pid file and its log in a
/// directory of its own; this process becomes a subreaper, so that generations whose
/// parent has exited are reparented here, to be reaped.
pub struct Server {
    pub dir: PathBuf,
    pub pid_file: PathBuf,
    pub log: PathBuf,
    pub addr: SocketAddr,
    /// The first generation.
    pub first: Child,
}

impl Server {
    /// Starts `bin --listen ADDR --pid-file PATH` with `env` set, on a free port of the
    /// loopback, in a new directory named after `what`.
    pub fn start(bin: &Path, what: &str, env: &[(&str, &str)]) -> Res<Server> {
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes integers only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let dir = std::env::temp_dir().join(format!("tableflip-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let (pid_file, log) = (dir.join("server.pid"), dir.join("server.log"));
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let first = Command::new(bin)
            .args(["--listen", &addr.to_string()])
            .args(["--pid-file", &pid_file.display().to_string()])
            .envs(env.iter().copied())
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        Ok(Server {
            dir,
            pid_file,
            log,
            addr,
            first,
        })
    }
}

/// Trace lines so far: (pid, phase) → nanoseconds.
fn traces(log: &Path) -> BTreeMap<(u32, String), u64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("[tcp_server pid=") else {
            continue;
        };
        let Some((pid, rest)) = rest.split_once("] trace ") else {
            continue;
        };
        let mut it = rest.split_whitespace();
        if let (Ok(pid), Some(phase), Some(Ok(ns))) =
            (pid.parse(), it.next(), it.next().map(str::parse))
        {
            out.entry((pid, phase.to_string())).or_insert(ns);
        }
    }
    out
}

/// A client thread: connects without pause; records when each answer came and from
/// which pid.
fn client(addr: SocketAddr, stop: Arc<AtomicBool>, seen: Arc<Mutex<Vec<(u64, u32)>>>) -> u64 {
    let mut failed = 0;
    let mut buf = String::new();
    while !stop.load(Ordering::Relaxed) {
        buf.clear();
        let answer = TcpStream::connect(addr).and_then(|mut s| s.read_to_string(&mut buf));
        let pid = buf
            .trim()
            .strip_prefix("hello from pid=")
            .and_then(|p| p.parse().ok());
        match (answer, pid) {
            (Ok(_), Some(pid)) => seen.lock().unwrap().push((now_ns(), pid)),
            _ => failed += 1,
        }
    }
    failed
}

fn wait<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> Res<T> {
    let t = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if t.elapsed() > Duration::from_secs(20) {
            return Err(format!("handoff: timed out waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// `upgrades` handoffs of `tcp_server` under `clients` client threads.
pub fn measure(upgrades: usize, clients: usize) -> Res<Handoff> {
    let bin = server_binary("tcp_server")?;
    let server = Server::start(&bin, "handoff", &[("TCP_SERVER_TRACE", "1")])?;
    let (dir, log, addr, mut first) = (server.dir, server.log, server.addr, server.first);
    let mut current = first.id();
    wait("the server to answer", || {
        TcpStream::connect(addr).ok().map(drop)
    })?;

    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (stop, seen) = (Arc::clone(&stop), Arc::clone(&seen));
            std::thread::spawn(move || client(addr, stop, seen))
        })
        .collect();
    let mut result = Handoff {
        serving: Samples::new("SIGHUP -> new generation answers"),
        gone: Samples::new("SIGHUP -> old generation gone"),
        phases: PHASES
            .iter()
            .map(|(name, _, _)| Samples::new(name))
            .collect(),
        answered: 0,
        failed: 0,
    };
    let outcome = (|| -> Res<()> {
        for _ in 0..upgrades {
            // Steady state first: the current generation serves.
            let mark = seen.lock().unwrap().len();
            wait("answers", || {
                (seen.lock().unwrap().len() > mark + 20).then_some(())
            })?;
            let pidfd = rustix::process::pidfd_open(
                rustix::process::Pid::from_raw(current as i32).ok_or("pid")?,
                rustix::process::PidfdFlags::empty(),
            )?;
            let t0 = now_ns();
            // SAFETY: kill(2) has no memory-safety preconditions; `current` is alive.
            unsafe { libc::kill(current as i32, libc::SIGHUP) };
            let mut pfd = [rustix::event::PollFd::new(
                &pidfd,
                rustix::event::PollFlags::IN,
            )];
            let timeout = rustix::event::Timespec {
                tv_sec: 20,
                tv_nsec: 0,
            };
            rustix::event::poll(&mut pfd, Some(&timeout))?;
            let t_gone = now_ns();
            let old = current;
            let trace = traces(&log);
            let new = trace
                .keys()
                .filter(|(pid, phase)| phase == "main" && *pid != old)
                .map(|(pid, _)| *pid)
                .find(|pid| {
                    trace
                        .get(&(*pid, "main".to_string()))
                        .is_some_and(|&ns| ns > t0)
                })
                .ok_or("handoff: no new generation in the trace")?;
            let t_serving = wait("the new generation to answer", || {
                seen.lock()
                    .unwrap()
                    .iter()
                    .find(|(t, pid)| *pid == new && *t > t0)
                    .map(|(t, _)| *t)
            })?;
            let trace = wait("the new generation's trace", || {
                let t = traces(&log);
                t.contains_key(&(new, "committed".to_string())).then_some(t)
            })?;
            let at = |point: &str| -> Option<u64> {
                match point.split_once(':') {
                    None => Some(t0),
                    Some(("old", p)) => trace.get(&(old, p.to_string())).copied(),
                    Some((_, p)) => trace.get(&(new, p.to_string())).copied(),
                }
            };
            result
                .serving
                .push(Duration::from_nanos(t_serving.saturating_sub(t0)));
            result
                .gone
                .push(Duration::from_nanos(t_gone.saturating_sub(t0)));
            for ((_, from, to), samples) in PHASES.iter().zip(&mut result.phases) {
                if let (Some(a), Some(b)) = (at(from), at(to)) {
                    samples.push(Duration::from_nanos(b.saturating_sub(a)));
                }
            }
            current = new;
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        result.failed += t.join().unwrap_or(0);
    }
    result.answered = seen.lock().unwrap().len() as u64;
    // SAFETY: as above.
    unsafe { libc::kill(current as i32, libc::SIGTERM) };
    let _ = wait("the server to stop", || {
        TcpStream::connect(addr).is_err().then_some(())
    });
    let _ = first.try_wait();
    // Reap whatever was reparented here.
    // SAFETY: waitpid with a null status pointer.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
    let _ = std::fs::remove_dir_all(&dir);
    outcome.map(|()| result)
}
