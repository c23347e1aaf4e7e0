//! The keeper against its own descendants: each test runs the test binary itself under
//! [`tableflip::Keeper::run`] (as PID 1 of a fresh PID namespace, as in a container, or
//! as a child subreaper), lets the service start a hostile helper (or say something it
//! should not), and checks that the keeper rejects it with a clear log line and that the
//! service goes on as before. Needs root (`unshare -p`): reported as ignored, with the
//! reason, otherwise.
//!
//! The processes: `scenario_entry gen` is the keeper and, below it, every generation (a
//! TCP server that answers `pid=<pid>`, upgrades on `SIGHUP`, stops on `SIGTERM`, and on
//! `SIGUSR1` runs the command in the file `cmd` of its directory); `scenario_entry helper
//! ...` is a hostile descendant a generation starts; `witness` and `sleeper` are
//! bystanders. Each prints `@@ <role> <pid> <event> ...` lines to stderr, which goes to a
//! log file next to the keeper's own lines.

#[cfg(target_os = "linux")]
#[path = "util/harness.rs"]
mod harness;

#[cfg(target_os = "linux")]
#[path = "util/pidns.rs"]
mod pidns;

fn main() {
    #[cfg(target_os = "linux")]
    suite::main();
}

#[cfg(target_os = "linux")]
mod suite {
    use super::{harness, pidns};

    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::io::{AsFd, OwnedFd};
    use std::os::unix::net::UnixDatagram;
    use std::path::PathBuf;
    use std::process::{Child, Command, ExitStatus, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    use tableflip::{Keeper, Options, Upgrader, Wake};

    const DEADLINE: Duration = Duration::from_secs(20);

    // ---- the processes under test ----

    fn entry() {
        // Watchdog: no process of these tests outlives 90 s.
        // SAFETY: alarm(2) only arms a timer.
        unsafe { libc::alarm(90) };
        let args: Vec<String> = std::env::args().skip(2).collect();
        match args.first().map(String::as_str) {
            Some("gen") => generation(),
            Some("helper") => helper(&args[1..]),
            Some("witness") => witness(),
            Some("sleeper") => sleeper(),
            other => panic!("unknown role {other:?}"),
        }
    }

    /// One line in one write: the processes share one log file.
    fn say(role: &str, event: &str) {
        let line = format!("@@ {role} {} {event}\n", std::process::id());
        let _ = std::io::stderr().write_all(line.as_bytes());
    }

    fn env_ms(name: &str) -> Option<Duration> {
        let ms = std::env::var(name).ok()?.parse().ok()?;
        Some(Duration::from_millis(ms))
    }

    /// The keeper, then (in every process it starts) one generation of the service.
    fn generation() {
        if std::env::var_os("TF_THREAD_FIRST").is_some() {
            // A thread of the application (a logger, a runtime) started before the keeper.
            std::thread::spawn(|| loop {
                std::thread::sleep(Duration::from_secs(3600));
            });
        }
        let keeper = Keeper::new()
            .backoff(Duration::from_millis(100), Duration::from_millis(400))
            .stop_timeout(env_ms("TF_STOP_MS").unwrap_or(Duration::from_secs(25)));
        if let Err(e) = keeper.run() {
            eprintln!("keeper failed: {e}");
            std::process::exit(3);
        }
        // From here on: a generation.
        let upgrade_child = std::env::var_os("TABLEFLIP_FDS").is_some();
        say("gen", "start");
        // Before it answers: a signal the keeper forwards must find the handler.
        let mut signals = signal_hook::iterator::Signals::new([
            libc::SIGHUP,
            libc::SIGTERM,
            libc::SIGUSR1,
            libc::SIGUSR2,
        ])
        .unwrap();
        let opts = Options::new()
            .upgrade_timeout(Duration::from_secs(10))
            .probation(env_ms("TF_PROBATION_MS").unwrap_or_default());
        let upg = Arc::new(Upgrader::new(opts).expect("Upgrader::new"));
        let listener = upg
            .fds()
            .listen::<TcpListener>(std::env::var("TF_ADDR").unwrap().as_str())
            .expect("listen");
        listener.set_nonblocking(true).unwrap();
        let u = Arc::clone(&upg);
        let server = std::thread::spawn(move || {
            while u.exit().wait_readable(&listener, None) == Wake::Readable {
                while let Ok((mut conn, _)) = listener.accept() {
                    let _ = conn.set_nonblocking(false);
                    let _ = writeln!(conn, "pid={}", std::process::id());
                }
            }
        });
        if let (true, Some(delay)) = (upgrade_child, env_ms("TF_UPGRADE_READY_DELAY_MS")) {
            std::thread::sleep(delay);
        }
        say("gen", "ready-called");
        upg.ready().expect("ready");
        say("gen", "ready");
        for sig in signals.forever() {
            match sig {
                libc::SIGHUP => match upg.upgrade() {
                    Ok(pid) => {
                        say("gen", &format!("upgraded {pid}"));
                        break;
                    }
                    Err(e) => say("gen", &format!("upgrade-failed {e}")),
                },
                libc::SIGTERM => {
                    say("gen", "term");
                    upg.stop();
                    if let Some(time) = env_ms("TF_DRAIN_MS") {
                        drain_for(&upg, time);
                    }
                    break;
                }
                libc::SIGUSR1 => command(),
                _ => say("gen", "usr2"),
            }
        }
        let _ = server.join();
        say("gen", "exit");
        std::process::exit(0)
    }

    /// A drain at the stop that takes `time`, ticking as an application's would.
    fn drain_for(upg: &Upgrader, time: Duration) {
        let end = Instant::now() + time;
        let drain = upg.exit().drain(time + Duration::from_secs(5));
        while let Some(wait) = drain.tick() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(wait.min(left));
        }
        drain.finish(1, 0);
        say("gen", "drained");
    }

    /// `cmd`: `<n> self|helper <what> [arg]`; logs `cmd-done <n>` when done.
    fn command() {
        let text = std::fs::read_to_string(dir().join("cmd")).unwrap();
        let words: Vec<&str> = text.split_whitespace().collect();
        let (n, who, what) = (words[0], words[1], &words[2..]);
        if who == "self" {
            act(what);
        } else {
            let status = Command::new(std::env::current_exe().unwrap())
                .args(["scenario_entry", "helper"])
                .args(what)
                .status()
                .unwrap();
            assert!(status.success(), "helper: {status}");
        }
        say("gen", &format!("cmd-done {n}"));
    }

    fn dir() -> PathBuf {
        PathBuf::from(std::env::var_os("TF_DIR").unwrap())
    }

    /// A hostile descendant of the service.
    fn helper(what: &[String]) {
        let what: Vec<&str> = what.iter().map(String::as_str).collect();
        act(&what);
        // Alive while the keeper reads what it sent (the keeper is not helped by a race).
        std::thread::sleep(Duration::from_millis(300));
    }

    /// What a helper (or the main generation itself) does.
    fn act(what: &[&str]) {
        let arg = what.get(1).copied().unwrap_or("");
        match what[0] {
            "mainpid" if arg == "own" => notify(&format!("MAINPID={}", std::process::id()), &[]),
            "mainpid" => notify(&format!("MAINPID={arg}"), &[]),
            "relay" => notify("STOPPING=1\nSTATUS=pwned\nREADY=1", &[]),
            "status" => notify(&format!("STATUS={arg}"), &[]),
            "extend" => notify(&format!("EXTEND_TIMEOUT_USEC={arg}"), &[]),
            "fdstore" => {
                let count: usize = what[2].parse().unwrap();
                // Sockets: each one its own open file (the store keeps one copy of each).
                let mut fds: Vec<OwnedFd> = Vec::new();
                for _ in 0..count.div_ceil(2) {
                    let (a, b) = UnixDatagram::pair().unwrap();
                    fds.push(a.into());
                    fds.push(b.into());
                }
                fds.truncate(count);
                for chunk in fds.chunks(250) {
                    notify(&format!("FDSTORE=1\nFDNAME={arg}"), chunk);
                }
            }
            "spawn" => {
                // Left running on purpose: it outlives its parent (a background job).
                #[allow(clippy::zombie_processes)]
                Command::new(std::env::current_exe().unwrap())
                    .args(["scenario_entry", arg])
                    .stdin(Stdio::null())
                    .spawn()
                    .unwrap();
            }
            other => panic!("unknown act {other}"),
        }
    }

    /// One datagram to `$NOTIFY_SOCKET`, with `fds`.
    fn notify(msg: &str, fds: &[OwnedFd]) {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        let target = std::env::var("NOTIFY_SOCKET").unwrap();
        let name = target.strip_prefix('@').expect("an abstract name");
        let addr = rustix::net::SocketAddrUnix::new_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::unbound().unwrap();
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        let mut space = vec![
            std::mem::MaybeUninit::<u8>::uninit();
            rustix::cmsg_space!(ScmRights(fds.len().max(1)))
        ];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !borrowed.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(&borrowed)));
        }
        let iov = [std::io::IoSlice::new(msg.as_bytes())];
        rustix::net::sendmsg_addr(&sock, &addr, &iov, &mut control, SendFlags::empty()).unwrap();
    }

    /// A bystander that says which signals reach it.
    fn witness() {
        let mut signals =
            signal_hook::iterator::Signals::new([libc::SIGHUP, libc::SIGUSR2]).unwrap();
        say("witness", "up");
        for sig in signals.forever() {
            say("witness", &format!("got-signal {sig}"));
        }
    }

    /// A background job that ignores `SIGTERM` and runs until killed.
    fn sleeper() {
        // SAFETY: setting a disposition to SIG_IGN has no memory effects.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
        say("sleeper", "up");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }

    // ---- the test side ----

    /// One test at a time: they share the machine's two cores and the host's processes.
    fn lock() -> MutexGuard<'static, ()> {
        static LOCK: Mutex<()> = Mutex::new(());
        LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The keeper (scenario `gen`) and its service.
    struct Service {
        child: Child,
        /// The keeper's pid on the host.
        keeper: u32,
        /// Whether the keeper is PID 1 of a PID namespace of its own.
        contained: bool,
        addr: SocketAddr,
        dir: PathBuf,
        commands: usize,
    }

    #[derive(Default)]
    struct Setup<'a> {
        env: Vec<(&'a str, String)>,
        /// A subreaper (a child of this test) instead of PID 1 of a namespace.
        subreaper: bool,
        /// `ulimit -n` for the keeper.
        fd_limit: Option<u32>,
    }

    impl Service {
        fn start(tag: &str, setup: Setup<'_>) -> Service {
            if let Some(why) = pidns::unsupported() {
                harness::skip(why);
            }
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "tf-keeper-attack-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let exe = std::env::current_exe().unwrap();
            let limit = setup
                .fd_limit
                .map_or(String::new(), |n| format!("ulimit -n {n} && "));
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c").arg(format!("{limit}exec \"$@\"")).arg("sh");
            if !setup.subreaper {
                cmd.args(["unshare", "-pf", "--mount-proc", "--kill-child"]);
            }
            cmd.arg(&exe)
                .args(["scenario_entry", "gen"])
                .env("TF_DIR", &dir)
                .env("TF_ADDR", addr.to_string())
                .env_remove("NOTIFY_SOCKET")
                .env_remove("TABLEFLIP_KEEPER")
                .env_remove("LISTEN_FDS")
                .env_remove("TABLEFLIP_FDS")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file(&dir.join("log")));
            for (k, v) in &setup.env {
                cmd.env(k, v);
            }
            let child = cmd.spawn().unwrap();
            let keeper = if setup.subreaper {
                child.id()
            } else {
                let pid = child.id();
                wait_for("the keeper to start", || children(pid).first().copied())
            };
            let s = Service {
                child,
                keeper,
                contained: !setup.subreaper,
                addr,
                dir,
                commands: 0,
            };
            s.wait_log("the first generation to be ready", |l| {
                l.ends_with(" ready")
            });
            s
        }

        fn log(&self) -> String {
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        }

        /// Waits for a log line that `pred` accepts, and returns it.
        #[track_caller]
        fn wait_log(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
            let t = Instant::now();
            loop {
                if let Some(l) = self.log().lines().find(|l| pred(l)) {
                    return l.to_string();
                }
                if t.elapsed() > DEADLINE {
                    panic!("timed out waiting for {what}; log:\n{}", self.log());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        /// Runs a command in the main generation (`SIGUSR1` through the keeper).
        #[track_caller]
        fn command(&mut self, cmd: &str) {
            self.commands += 1;
            let n = self.commands;
            std::fs::write(self.dir.join("cmd"), format!("{n} {cmd}")).unwrap();
            signal(self.keeper, libc::SIGUSR1);
            self.wait_log(&format!("command {cmd:?}"), |l| {
                l.ends_with(&format!(" cmd-done {n}"))
            });
        }

        /// The pid (as the service sees it) of the generation that answers.
        fn probe(&self) -> std::io::Result<u32> {
            let mut conn = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut reply = String::new();
            conn.read_to_string(&mut reply)?;
            reply
                .trim()
                .strip_prefix("pid=")
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("bad reply {reply:?}")))
        }

        /// The keeper's live descendants: (host pid, pid in the service's namespace).
        fn descendants(&self) -> Vec<(u32, u32)> {
            pidns::descendants(self.keeper)
                .into_iter()
                .filter(|(_, _, state)| *state != 'Z')
                .map(|(host, ns, _)| (host, ns))
                .collect()
        }

        /// The host pid of the process the service knows as `ns`.
        fn host_pid(&self, ns: u32) -> u32 {
            wait_for("the process on the host", || {
                self.descendants()
                    .into_iter()
                    .find(|(_, n)| *n == ns)
                    .map(|(h, _)| h)
            })
        }

        /// The pids of the generations that logged `start`, in order.
        fn generations(&self) -> Vec<u32> {
            self.log()
                .lines()
                .filter(|l| l.starts_with("@@ gen ") && l.ends_with(" start"))
                .filter_map(|l| l.split(' ').nth(2)?.parse().ok())
                .collect()
        }

        /// Waits for the keeper to exit, at most `limit`.
        #[track_caller]
        fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
            let t = Instant::now();
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return status;
                }
                if t.elapsed() > limit {
                    panic!(
                        "the keeper did not exit within {limit:?}; log:\n{}",
                        self.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        fn alive(&mut self) -> bool {
            self.child.try_wait().unwrap().is_none()
        }
    }

    impl Drop for Service {
        fn drop(&mut self) {
            // The namespace dies with its PID 1; a subreaper's descendants are killed here.
            let rest: Vec<u32> = if self.contained {
                Vec::new()
            } else {
                self.descendants().into_iter().map(|(h, _)| h).collect()
            };
            for pid in rest.into_iter().chain([self.keeper]) {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            if harness::failing() {
                eprintln!("log of {}:\n{}", self.dir.display(), self.log());
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn log_file(path: &std::path::Path) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
    }

    fn free_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    use pidns::children;

    fn signal(pid: u32, sig: i32) {
        assert_eq!(
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, sig) },
            0,
            "kill({pid}, {sig})"
        );
    }

    #[track_caller]
    fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
        pidns::wait_for(what, DEADLINE, f)
    }

    /// Waits until a generation other than `old` answers.
    fn next_generation(s: &Service, old: u32) -> u32 {
        let t = Instant::now();
        loop {
            if let Ok(pid) = s.probe() {
                if pid != old {
                    return pid;
                }
            }
            if t.elapsed() > DEADLINE {
                panic!("no new generation answers; log:\n{}", s.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[track_caller]
    fn assert_logged(s: &Service, needle: &str) {
        let log = s.log();
        assert!(log.contains(needle), "{needle:?} not logged:\n{log}");
    }

    // ---- the attacks ----

    /// Attack 1: a forged `MAINPID=` (from a helper, or out of range from the main
    /// generation itself) would make the keeper signal every process (`kill(-1)`), a
    /// process group, or panic. Rejected; a forwarded signal reaches the main generation
    /// and nobody else.
    fn a_forged_mainpid_is_rejected_and_signals_reach_only_the_main_generation() {
        let _lock = lock();
        let mut s = Service::start("forged", Setup::default());
        let main = s.probe().unwrap();
        s.command("helper spawn witness");
        s.wait_log("the witness", |l| {
            l.starts_with("@@ witness ") && l.ends_with(" up")
        });
        s.command("helper mainpid 4294967295");
        s.command("helper mainpid 2147483649");
        s.command("self mainpid 4294967295");
        s.command("self mainpid 0");
        s.command("self mainpid 1");
        s.command("self mainpid 4000000");
        signal(s.keeper, libc::SIGUSR2);
        s.wait_log("the main generation to get SIGUSR2", |l| {
            l == format!("@@ gen {main} usr2")
        });
        // The witness would have had it by now too.
        std::thread::sleep(Duration::from_millis(300));
        assert!(s.alive(), "the keeper died:\n{}", s.log());
        let log = s.log();
        assert!(
            !log.contains("got-signal"),
            "a bystander got the signal:\n{log}"
        );
        assert_logged(
            &s,
            "(not the main generation, pid 2): \"MAINPID=4294967295\"",
        );
        assert_logged(
            &s,
            "(not the main generation, pid 2): \"MAINPID=2147483649\"",
        );
        assert_logged(
            &s,
            "rejected \"MAINPID=4294967295\" from pid 2: not a pid in 1..=2147483647",
        );
        assert_logged(
            &s,
            "rejected \"MAINPID=0\" from pid 2: not a pid in 1..=2147483647",
        );
        assert_logged(&s, "rejected \"MAINPID=1\" from pid 2: not the successor");
        assert_logged(
            &s,
            "rejected \"MAINPID=4000000\" from pid 2: not the successor",
        );
        assert_eq!(s.probe().unwrap(), main);
    }

    /// Attack 2: a helper says `MAINPID=<its own pid>` and exits. The keeper keeps
    /// following the real generation: a crash restarts it, `SIGTERM` reaches it.
    fn a_stale_mainpid_from_a_helper_does_not_lose_the_service() {
        let _lock = lock();
        let mut s = Service::start("stale", Setup::default());
        let main = s.probe().unwrap();
        s.command("helper mainpid own");
        signal(s.host_pid(main), libc::SIGKILL);
        let next = next_generation(&s, main);
        assert_logged(&s, "starting it again");
        signal(s.keeper, libc::SIGTERM);
        let status = s.wait_exit(DEADLINE);
        assert!(status.success(), "{status}\n{}", s.log());
        assert_logged(&s, &format!("@@ gen {next} term"));
        assert_logged(&s, "(not the main generation, pid 2): \"MAINPID=");
    }

    /// Attack 3: the old generation is killed during the handoff. The orphaned new one
    /// takes over (the keeper does not start a third), only one serves, and a stop ends
    /// everything.
    fn handoff_killed(tag: &str, env: Vec<(&'static str, String)>, kill_when: &str) {
        let _lock = lock();
        let mut s = Service::start(
            tag,
            Setup {
                env,
                ..Setup::default()
            },
        );
        let first = s.probe().unwrap();
        let first_host = s.host_pid(first);
        signal(s.keeper, libc::SIGHUP);
        let line = s.wait_log("the new generation", |l| {
            l.starts_with("@@ gen ") && l.ends_with(kill_when) && !l.contains(&format!(" {first} "))
        });
        let second: u32 = line.split(' ').nth(2).unwrap().parse().unwrap();
        // After the announcement, which the old generation sends as soon as the new one
        // runs (a kill before it is the documented limit); with a probation, into the
        // probation: the old generation has the new one's report by then.
        std::thread::sleep(Duration::from_millis(300));
        signal(first_host, libc::SIGKILL);
        s.wait_log("the successor to take over", |l| {
            l.contains(&format!(
                "pid {second}, the announced successor, takes over"
            ))
        });
        s.wait_log("the successor to be ready", |l| {
            l == format!("@@ gen {second} ready")
        });
        // Longer than any restart back-off.
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(s.generations(), vec![first, second], "{}", s.log());
        for _ in 0..20 {
            assert_eq!(s.probe().unwrap(), second);
        }
        signal(s.keeper, libc::SIGTERM);
        let status = s.wait_exit(DEADLINE);
        assert!(status.success(), "{status}\n{}", s.log());
        assert!(s.probe().is_err(), "still answering after the stop");
    }

    fn the_old_generation_killed_before_its_successor_is_ready_leaves_one_generation() {
        handoff_killed(
            "handoff-start",
            vec![("TF_UPGRADE_READY_DELAY_MS", "1500".into())],
            " start",
        );
    }

    fn the_old_generation_killed_during_the_probation_leaves_one_generation() {
        handoff_killed(
            "handoff-probation",
            vec![("TF_PROBATION_MS", "3000".into())],
            " ready-called",
        );
    }

    /// Attack 4: an fd stored under a name with `:` would break `$LISTEN_FDNAMES` and
    /// every later start. Rejected; a crash is followed by a working restart.
    fn a_bad_fd_name_is_rejected_and_restarts_still_work() {
        let _lock = lock();
        let mut s = Service::start("fdname", Setup::default());
        let main = s.probe().unwrap();
        s.command("self fdstore a:b 2");
        s.command("self fdstore ok\u{7f} 1");
        s.command("helper fdstore fine 2");
        for _ in 0..2 {
            let old = s.probe().unwrap();
            signal(s.host_pid(old), libc::SIGKILL);
            next_generation(&s, old);
        }
        assert!(!s.log().contains("giving up"), "{}", s.log());
        assert_logged(
            &s,
            "rejected \"FDSTORE=1 with 2 fds\\nFDNAME=a:b\" from pid 2: contains ':'",
        );
        assert_logged(&s, "FDNAME=ok\\u{7f}\" from pid 2: not printable ASCII");
        assert_logged(
            &s,
            "(not the main generation, pid 2): \"FDSTORE=1\\nFDNAME=fine\"",
        );
        assert_ne!(s.probe().unwrap(), main);
    }

    /// Attack 5: a descendant floods the fd store (1000 fds, under a soft limit of 1024)
    /// and so would make every start fail. Refused from anyone but the main generation;
    /// from the main generation, capped; restarts still work and inherit few fds.
    fn an_fd_store_flood_is_refused_and_restarts_still_work() {
        let _lock = lock();
        let mut s = Service::start(
            "flood",
            Setup {
                fd_limit: Some(1024),
                ..Setup::default()
            },
        );
        s.command("helper fdstore flood 1000");
        s.command("self fdstore flood 1000");
        let old = s.probe().unwrap();
        signal(s.host_pid(old), libc::SIGKILL);
        let new = next_generation(&s, old);
        let fds = std::fs::read_dir(format!("/proc/{}/fd", s.host_pid(new)))
            .unwrap()
            .count();
        assert!(fds < 600, "the new generation holds {fds} fds");
        assert!(!s.log().contains("giving up"), "{}", s.log());
        assert_logged(
            &s,
            "(not the main generation, pid 2): \"FDSTORE=1\\nFDNAME=flood\"",
        );
        assert_logged(&s, "from pid 2: the fd store is full:");
    }

    /// Attack 6: a thread started before `Keeper::run` would take the keeper's `SIGTERM`:
    /// as a subreaper its default action kills the keeper (143) and orphans the
    /// generation; as PID 1 it is dropped (PID 1 gets no signal it has no handler for).
    fn a_thread_started_before_the_keeper(subreaper: bool) {
        let _lock = lock();
        let env = vec![("TF_THREAD_FIRST", "1".into())];
        let setup = Setup {
            env,
            subreaper,
            ..Setup::default()
        };
        let mut s = Service::start("thread", setup);
        let main = s.probe().unwrap();
        signal(s.keeper, libc::SIGTERM);
        let status = s.wait_exit(DEADLINE);
        assert!(status.success(), "{status}\n{}", s.log());
        assert_logged(&s, &format!("@@ gen {main} term"));
        assert_logged(&s, &format!("@@ gen {main} exit"));
    }

    fn a_thread_started_before_the_keeper_does_not_take_its_sigterm() {
        a_thread_started_before_the_keeper(false);
    }

    fn a_thread_started_before_a_subreaper_keeper_does_not_take_its_sigterm() {
        a_thread_started_before_the_keeper(true);
    }

    /// Attack 7: two keepers that are PID 1 in one network namespace, with the name the
    /// keeper used to take (`@tableflip-keeper/1`) held by someone else first.
    fn two_keepers_share_a_network_namespace_with_a_squatter() {
        let _lock = lock();
        let name = std::os::unix::net::SocketAddr::from_abstract_name(b"tableflip-keeper/1");
        // Taken already by another test run, perhaps: then it is squatted all the same.
        let _squatter = name.ok().and_then(|a| UnixDatagram::bind_addr(&a).ok());
        let a = Service::start("pod-a", Setup::default());
        let b = Service::start("pod-b", Setup::default());
        assert_eq!(a.probe().unwrap(), 2);
        assert_eq!(b.probe().unwrap(), 2);
        let target = |s: &Service| -> String {
            let environ =
                std::fs::read(format!("/proc/{}/environ", s.host_pid(2))).unwrap_or_default();
            environ
                .split(|&b| b == 0)
                .find_map(|v| v.strip_prefix(b"NOTIFY_SOCKET="))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let (ta, tb) = (target(&a), target(&b));
        assert!(ta.starts_with("@tableflip-keeper/1/"), "{ta}");
        assert_ne!(ta, tb);
    }

    /// Attack 8: a descendant tells the keeper's systemd `STOPPING=1`, `STATUS=`,
    /// `READY=1` through the keeper. Only the main generation is relayed.
    fn only_the_main_generation_is_relayed_upstream() {
        let _lock = lock();
        let name = format!("tf-keeper-upstream-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let upstream = UnixDatagram::bind_addr(&addr).unwrap();
        upstream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let env = vec![("NOTIFY_SOCKET", format!("@{name}"))];
        let mut s = Service::start(
            "relay",
            Setup {
                env,
                ..Setup::default()
            },
        );
        let mut got = Vec::new();
        let mut read = |until: &str| loop {
            let mut buf = [0u8; 4096];
            let n = upstream.recv(&mut buf).expect("a message upstream");
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            got.push(msg.clone());
            if msg.contains(until) {
                return got.clone();
            }
        };
        read("READY=1");
        s.command("helper relay");
        s.command("helper extend 999");
        s.command("self extend 12x");
        s.command("self status fine");
        s.command("self extend 12345");
        let got = read("EXTEND_TIMEOUT_USEC=");
        assert!(
            !got.iter().any(|m| m.contains("pwned")
                || m.contains("STOPPING")
                || m.contains("999")
                || m.contains("12x")),
            "relayed: {got:?}"
        );
        assert!(got.iter().any(|m| m.contains("STATUS=fine")), "{got:?}");
        assert_eq!(got.last().unwrap(), "EXTEND_TIMEOUT_USEC=12345");
        assert_logged(
            &s,
            "(not the main generation, pid 2): \"EXTEND_TIMEOUT_USEC=999\"",
        );
        assert_logged(&s, "EXTEND_TIMEOUT_USEC=12x");
        assert_logged(
            &s,
            "(not the main generation, pid 2): \"STOPPING=1\\nSTATUS=pwned\\nREADY=1\"",
        );
    }

    /// A drain at the stop that asks for time (`EXTEND_TIMEOUT_USEC=`): under a keeper that
    /// relays to a service manager, the keeper waits past its own stop timeout (1 s here)
    /// for the 3 s drain, as systemd does, and exits with the generation's status 0.
    /// Without a service manager above it, its stop timeout stays the bound.
    fn a_drain_at_the_stop_gets_the_time_it_asks_for(upstream: bool) {
        let _lock = lock();
        let name = format!("tf-keeper-extend-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let manager = UnixDatagram::bind_addr(&addr).unwrap();
        manager
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut env = vec![
            ("TF_STOP_MS", "1000".to_string()),
            ("TF_DRAIN_MS", "3000".to_string()),
        ];
        if upstream {
            env.push(("NOTIFY_SOCKET", format!("@{name}")));
        }
        let mut s = Service::start(
            "extend",
            Setup {
                env,
                ..Setup::default()
            },
        );
        let t = Instant::now();
        signal(s.keeper, libc::SIGTERM);
        let status = s.wait_exit(Duration::from_secs(15));
        let took = t.elapsed();
        let log = s.log();
        let mut heard = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = manager.recv(&mut buf) {
            heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        if upstream {
            assert!(status.success(), "{status} after {took:?}\n{log}");
            assert!(took >= Duration::from_secs(3), "{took:?}\n{log}");
            assert!(log.contains(" drained\n"), "{log}");
            assert!(!log.contains("stop timeout"), "{log}");
            assert!(
                heard.iter().any(|m| m.starts_with("EXTEND_TIMEOUT_USEC=")),
                "{heard:?}"
            );
        } else {
            assert!(!status.success(), "{status}\n{log}");
            assert!(took < Duration::from_secs(3), "{took:?}\n{log}");
            assert!(!log.contains(" drained\n"), "{log}");
            assert_logged(&s, "the stop timeout (1s) has passed");
        }
    }

    fn a_drain_at_the_stop_gets_the_time_it_asks_for_under_systemd() {
        a_drain_at_the_stop_gets_the_time_it_asks_for(true);
    }

    fn a_drain_at_the_stop_is_bounded_by_the_stop_timeout_alone() {
        a_drain_at_the_stop_gets_the_time_it_asks_for(false);
    }

    /// Attack 11: a double-forked background job that ignores `SIGTERM` kept the keeper
    /// from exiting forever. After the stop timeout it is killed and the keeper exits
    /// with the main generation's status.
    fn an_orphan(subreaper: bool) {
        let _lock = lock();
        let env = vec![("TF_STOP_MS", "1000".into())];
        let mut s = Service::start(
            "orphan",
            Setup {
                env,
                subreaper,
                ..Setup::default()
            },
        );
        s.command("helper spawn sleeper");
        let line = s.wait_log("the orphan", |l| {
            l.starts_with("@@ sleeper ") && l.ends_with(" up")
        });
        let sleeper: u32 = line.split(' ').nth(2).unwrap().parse().unwrap();
        let host = s.host_pid(sleeper);
        signal(s.keeper, libc::SIGTERM);
        let status = s.wait_exit(Duration::from_secs(15));
        assert!(status.success(), "{status}\n{}", s.log());
        assert_logged(
            &s,
            "tableflip keeper: the stop timeout (1s) has passed: SIGKILL to what is left (pids [",
        );
        // SAFETY: kill(2) with signal 0 only checks.
        let gone = unsafe { libc::kill(host as i32, 0) } == -1;
        assert!(
            gone || std::fs::read_to_string(format!("/proc/{host}/stat"))
                .is_ok_and(|s| s.contains(") Z"))
        );
    }

    fn an_orphan_does_not_keep_the_keeper_from_exiting() {
        an_orphan(false);
    }

    fn an_orphan_does_not_keep_a_subreaper_keeper_from_exiting() {
        an_orphan(true);
    }

    pub fn main() {
        harness::main_with_entry(
            entry,
            &[
                crate::trial!(
                    a_forged_mainpid_is_rejected_and_signals_reach_only_the_main_generation
                ),
                crate::trial!(a_stale_mainpid_from_a_helper_does_not_lose_the_service),
                crate::trial!(
                    the_old_generation_killed_before_its_successor_is_ready_leaves_one_generation
                ),
                crate::trial!(the_old_generation_killed_during_the_probation_leaves_one_generation),
                crate::trial!(a_bad_fd_name_is_rejected_and_restarts_still_work),
                crate::trial!(an_fd_store_flood_is_refused_and_restarts_still_work),
                crate::trial!(a_thread_started_before_the_keeper_does_not_take_its_sigterm),
                crate::trial!(a_thread_started_before_a_subreaper_keeper_does_not_take_its_sigterm),
                crate::trial!(two_keepers_share_a_network_namespace_with_a_squatter),
                crate::trial!(only_the_main_generation_is_relayed_upstream),
                crate::trial!(an_orphan_does_not_keep_the_keeper_from_exiting),
                crate::trial!(a_drain_at_the_stop_gets_the_time_it_asks_for_under_systemd),
                crate::trial!(a_drain_at_the_stop_is_bounded_by_the_stop_timeout_alone),
                crate::trial!(an_orphan_does_not_keep_a_subreaper_keeper_from_exiting),
            ],
        )
    }
}
