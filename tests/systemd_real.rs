//! The `tcp_server` example as a unit of a real systemd (booted by `util/systemd.rs` in
//! namespaces of its own), reloaded under client load: after every `systemctl reload`
//! `MainPID` names the new generation, no connection fails, and `systemctl stop` leaves
//! no process. Reported as ignored, with the reason, when not root or when
//! systemd, `unshare` or `nsenter` is missing.

// The examples' harness: `lock()`, `example()`, ports and client load.
#[cfg(target_os = "linux")]
#[allow(dead_code)]
#[path = "util/examples.rs"]
mod util;

#[cfg(target_os = "linux")]
#[allow(dead_code)]
#[path = "util/systemd.rs"]
mod systemd;

#[cfg(target_os = "linux")]
#[path = "util/harness.rs"]
mod harness;

fn main() {
    #[cfg(target_os = "linux")]
    suite::main();
}

#[cfg(target_os = "linux")]
mod suite {
    use super::{harness, systemd, util};

    use std::io::{self, BufRead, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::sync::mpsc;
    use std::thread;
    use std::time::{Duration, Instant};

    use systemd::{assert_visible, cgroup_procs, Scratch, Systemd};
    use util::{example, free_port, line_probe, probing_client, Client, Load, Stats};

    /// `systemctl reload`s per test.
    const RELOADS: usize = 10;
    const SERVICE: &str = "tf-tcp.service";
    const SOCKET: &str = "tf-tcp.socket";
    /// Under /run, a tmpfs of the namespace.
    const PID_FILE: &str = "/run/tf-tcp.pid";
    /// Connections answered between two reloads, so that every generation serves.
    const ANSWERS: u64 = 50;
    /// The client threads: new connections without pause.
    const CLIENTS: [Client; 2] = [probing_client::<true> as Client; 2];

    fn tcp_server() -> PathBuf {
        let path = example("tcp_server");
        assert_visible(&path);
        path
    }

    fn free_addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], free_port()))
    }

    /// The `ExecStart=` line: a failed upgrade gives up after 5 s at most.
    fn exec_start(binary: &Path, addr: SocketAddr, extra: &str) -> String {
        assert_visible(binary);
        format!(
            "ExecStart={} --listen {addr} --upgrade-timeout 5{extra}",
            binary.display()
        )
    }

    /// A `Type=notify` service, with `NotifyAccess=` set when `notify_access` is given.
    fn notify_service(exec_start: &str, notify_access: Option<&str>) -> String {
        let access = notify_access
            .map(|a| format!("NotifyAccess={a}\n"))
            .unwrap_or_default();
        format!(
            "[Unit]\nDescription=tcp_server (Type=notify)\n\n[Service]\nType=notify\n{access}\
             {exec_start}\nExecReload=/bin/kill -HUP $MAINPID\n"
        )
    }

    /// Waits until the unit is active and its main pid answers; returns that pid.
    fn wait_serving(sd: &Systemd, addr: SocketAddr) -> u32 {
        sd.wait_active(SERVICE);
        sd.wait_for("the main pid to answer", || {
            let pid = sd.main_pid(SERVICE);
            (pid != 0 && line_probe(addr).ok() == Some(pid)).then_some(pid)
        })
    }

    /// Waits until the clients have had `n` more connections answered.
    fn wait_answers(sd: &Systemd, load: &Load, n: u64) {
        let target = load.answered() + n;
        sd.wait_for(&format!("{n} more answers"), || {
            (load.answered() >= target).then_some(())
        });
    }

    /// One `systemctl reload`, followed until the new generation has taken over: the reload
    /// succeeds, `MainPID` moves to a new pid while the unit stays up (same `InvocationID`:
    /// not stopped and started again), that pid answers (and is in the pid file, if
    /// `pid_file`), and the old generation exits. Returns the new pid and what was seen on
    /// the way.
    ///
    /// With `ExecReload=/bin/kill`, this failed now and then under load before the commit
    /// waited for systemd to read it: see [`many_reloads_never_take_the_unit_down`].
    fn reload_and_follow(
        sd: &Systemd,
        addr: SocketAddr,
        old: u32,
        pid_file: bool,
    ) -> (u32, String) {
        let invocation = sd.show(SERVICE, "InvocationID");
        let t0 = Instant::now();
        let status = sd.reload(SERVICE);
        let reload_took = t0.elapsed();
        assert!(
            status.success(),
            "systemctl reload: {status}\n{}",
            sd.diagnostics(SERVICE)
        );
        let mut seen: Vec<String> = Vec::new();
        let new = sd.wait_for("MainPID to name a new generation", || {
            let props = sd.show_all(SERVICE, &["MainPID", "ActiveState", "SubState"]);
            let pid: u32 = props["MainPID"].parse().expect("MainPID");
            let active = props["ActiveState"].as_str();
            let state = format!("{pid} {active}/{}", props["SubState"]);
            if seen.last() != Some(&state) {
                seen.push(state.clone());
            }
            assert!(
                matches!(active, "active" | "reloading"),
                "{SERVICE} went down after the reload (MainPID {old} before; now {state}):\n{}",
                sd.diagnostics(SERVICE)
            );
            (pid != old && pid != 0 && active == "active").then_some(pid)
        });
        let moved = t0.elapsed();
        assert_eq!(
            sd.show(SERVICE, "InvocationID"),
            invocation,
            "{SERVICE} was stopped and started again during the reload (MainPID {old} before, \
             {new} now):\n{}",
            sd.diagnostics(SERVICE)
        );
        sd.wait_for("the new generation to answer", || {
            (line_probe(addr).ok() == Some(new)).then_some(())
        });
        if pid_file {
            let named = std::fs::read_to_string(sd.inside(PID_FILE)).unwrap_or_default();
            assert_eq!(named.trim(), new.to_string(), "the pid file");
        }
        sd.wait_for(&format!("the old generation {old} to exit"), || {
            (!sd.alive(old)).then_some(())
        });
        let report = format!(
            "reload returned {status} after {reload_took:.0?}; MainPID {old} -> {new} after \
             {moved:.0?}; seen (MainPID ActiveState/SubState): {}",
            seen.join(", ")
        );
        (new, report)
    }

    /// No connection failed, and every one was answered by a known generation.
    fn check_load(stats: &Stats, generations: &[u32]) {
        eprintln!(
            "{} connections answered, {} failed; generations {generations:?}",
            stats.ok,
            stats.failures.len()
        );
        assert!(
            stats.failures.is_empty(),
            "{} connections failed: {:#?}",
            stats.failures.len(),
            stats.failures
        );
        assert!(stats.ok > 0, "no connection was answered");
        for pid in &stats.pids {
            assert!(generations.contains(pid), "answered by unknown pid {pid}");
        }
    }

    /// `systemctl stop`: the unit is down, its cgroup is empty and no generation is left.
    /// Returns systemd's `Result=` (see [`stop_after_a_reload_drains`] for why it is not
    /// always `success`).
    fn stop_and_check_gone(
        sd: &Systemd,
        cgroup: &Path,
        generations: &[u32],
        stats: &Stats,
    ) -> String {
        sd.stop(SERVICE);
        let props = sd.show_all(SERVICE, &["ActiveState", "Result", "MainPID"]);
        assert!(
            matches!(props["ActiveState"].as_str(), "inactive" | "failed"),
            "{props:?}"
        );
        assert_eq!(props["MainPID"], "0", "{props:?}");
        // systemd may report the unit stopped while a process it has just SIGKILLed still
        // exists (see `stop_after_a_reload_drains`): they must go without further help.
        let at_stop = cgroup_procs(cgroup);
        sd.wait_for("the unit's processes to be gone", || {
            let gone = cgroup_procs(cgroup).is_empty()
                && generations
                    .iter()
                    .chain(&stats.pids)
                    .all(|&pid| !sd.alive(pid));
            gone.then_some(())
        });
        if !at_stop.is_empty() {
            eprintln!("(host pids {at_stop:?} were still in the cgroup when stop returned)");
        }
        eprintln!(
            "stopped: ActiveState={} Result={}",
            props["ActiveState"], props["Result"]
        );
        props["Result"].clone()
    }

    /// Whether generation `pid` logged its own graceful exit (after draining).
    fn exited_by_itself(sd: &Systemd, pid: u32) -> bool {
        sd.log(SERVICE)
            .contains(&format!("[tcp_server pid={pid}] exit"))
    }

    /// The service is started: [`RELOADS`] reloads under load, each followed to the new
    /// generation, then a stop.
    fn reloads_under_load(sd: &Systemd, addr: SocketAddr, pid_file: bool) {
        let first = wait_serving(sd, addr);
        let cgroup = sd.unit_cgroup(SERVICE);
        let load = Load::start(addr, &CLIENTS);
        let mut generations = vec![first];
        let started = Instant::now();
        for i in 1..=RELOADS {
            wait_answers(sd, &load, ANSWERS);
            let old = *generations.last().unwrap();
            let (new, report) = reload_and_follow(sd, addr, old, pid_file);
            eprintln!("reload {i}: {report}");
            assert!(!generations.contains(&new), "pid {new} again");
            generations.push(new);
        }
        wait_answers(sd, &load, ANSWERS);
        let stats = load.finish();
        eprintln!("{RELOADS} reloads in {:.0?}", started.elapsed());
        check_load(&stats, &generations);
        let log = sd.log(SERVICE);
        assert!(!log.contains("upgrade failed"), "an upgrade failed:\n{log}");
        assert_eq!(log.matches("] ready").count(), RELOADS + 1, "{log}");
        stop_and_check_gone(sd, &cgroup, &generations, &stats);
    }

    fn notify_access_all_follows_reloads() {
        let addr = free_addr();
        let unit = notify_service(&exec_start(&tcp_server(), addr, ""), Some("all"));
        let sd = Systemd::boot(&[(SERVICE, &unit)]);
        sd.start(SERVICE);
        reloads_under_load(&sd, addr, false);
    }

    /// With the default `NotifyAccess=main`, systemd takes `MAINPID=` only from the main
    /// process: the old generation announces the new one at the commit, so the unit
    /// follows every reload. (Before the two-phase handoff, the new generation's own
    /// `MAINPID=` was refused and the first reload took the unit down.)
    fn notify_access_main_follows_reloads() {
        let addr = free_addr();
        let unit = notify_service(&exec_start(&tcp_server(), addr, ""), None);
        let sd = Systemd::boot(&[(SERVICE, &unit)]);
        assert_eq!(sd.show(SERVICE, "NotifyAccess"), "main");
        sd.start(SERVICE);
        reloads_under_load(&sd, addr, false);
    }

    fn simple_with_pid_file_follows_reloads() {
        let addr = free_addr();
        let start = exec_start(&tcp_server(), addr, &format!(" --pid-file {PID_FILE}"));
        let unit = format!(
            "[Unit]\nDescription=tcp_server (Type=simple, PIDFile=)\n\n[Service]\nType=simple\n\
             PIDFile={PID_FILE}\n{start}\nExecReload=/bin/kill -HUP $MAINPID\n"
        );
        let sd = Systemd::boot(&[(SERVICE, &unit)]);
        sd.start(SERVICE);
        reloads_under_load(&sd, addr, true);
    }

    fn socket_activated_follows_reloads() {
        let addr = free_addr();
        let socket =
            format!("[Unit]\nDescription=tcp_server's socket\n\n[Socket]\nListenStream={addr}\n");
        let service = notify_service(&exec_start(&tcp_server(), addr, ""), Some("all"));
        let sd = Systemd::boot(&[(SOCKET, &socket), (SERVICE, &service)]);
        sd.start(SOCKET);
        assert_eq!(sd.wait_active(SOCKET), "listening");
        sd.start(SERVICE);
        reloads_under_load(&sd, addr, false);
        // The first generation took systemd's socket rather than binding one.
        let log = sd.log(SERVICE);
        let first_ready = log.lines().find(|l| l.contains("] ready")).unwrap_or("");
        assert!(
            first_ready.contains(&format!("took 1 inherited fd(s): TCP listener {addr}")),
            "{log}"
        );
        // The socket outlives its service's generations.
        assert_eq!(sd.show(SOCKET, "SubState"), "listening");
        sd.stop(SOCKET);
    }

    /// A copy of the example binary in a directory of the test's own, replaced the way a
    /// deploy does it: the new file is written next to it and renamed over it.
    struct Deploy {
        binary: PathBuf,
        dir: Scratch,
    }

    impl Deploy {
        fn new() -> Deploy {
            let dir = Scratch::new("deploy");
            let deploy = Deploy {
                binary: dir.path().join("tcp_server"),
                dir,
            };
            deploy.install(&tcp_server());
            deploy
        }

        fn install(&self, from: &Path) {
            let tmp = self.dir.path().join("tcp_server.new");
            std::fs::copy(from, &tmp).expect("copy binary");
            std::fs::rename(&tmp, &self.binary).expect("rename binary");
        }

        fn install_script(&self, script: &str) {
            let tmp = self.dir.path().join("tcp_server.new");
            std::fs::write(&tmp, script).unwrap();
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::rename(&tmp, &self.binary).expect("rename script");
        }
    }

    /// A deploy that exits 3: `systemctl reload` still succeeds (kill did), systemd hears
    /// of the failure through `STATUS=`, the unit stays active with the same `MainPID` and
    /// keeps serving; the next good deploy upgrades.
    fn bad_deploy_keeps_the_old_generation() {
        let deploy = Deploy::new();
        let addr = free_addr();
        let unit = notify_service(&exec_start(&deploy.binary, addr, ""), Some("all"));
        let sd = Systemd::boot(&[(SERVICE, &unit)]);
        sd.start(SERVICE);
        let first = wait_serving(&sd, addr);
        let cgroup = sd.unit_cgroup(SERVICE);
        let load = Load::start(addr, &CLIENTS);

        wait_answers(&sd, &load, ANSWERS);
        let (second, report) = reload_and_follow(&sd, addr, first, false);
        eprintln!("good reload: {report}");

        deploy.install_script("#!/bin/sh\nexit 3\n");
        wait_answers(&sd, &load, ANSWERS);
        let t0 = Instant::now();
        let status = sd.reload(SERVICE);
        assert!(status.success(), "systemctl reload: {status}");
        let text = sd.wait_for("systemd to hear of the failed upgrade", || {
            let text = sd.show(SERVICE, "StatusText");
            text.contains("upgrade failed").then_some(text)
        });
        assert!(text.contains("exit status: 3"), "StatusText={text}");
        assert_eq!(sd.wait_active(SERVICE), "running");
        eprintln!(
            "bad reload: systemctl reload returned {status}; StatusText={text:?} after {:.0?}",
            t0.elapsed()
        );
        assert_eq!(sd.main_pid(SERVICE), second, "MainPID changed");
        assert!(sd.alive(second));
        wait_answers(&sd, &load, ANSWERS);
        assert_eq!(line_probe(addr).expect("still serving"), second);
        let log = sd.log(SERVICE);
        assert!(
            log.contains(&format!(
                "[tcp_server pid={second}] upgrade failed: new generation"
            )),
            "{log}"
        );

        deploy.install(&tcp_server());
        wait_answers(&sd, &load, ANSWERS);
        let (third, report) = reload_and_follow(&sd, addr, second, false);
        eprintln!("good reload after the bad one: {report}");
        wait_answers(&sd, &load, ANSWERS);
        let stats = load.finish();
        let generations = [first, second, third];
        check_load(&stats, &generations);
        stop_and_check_gone(&sd, &cgroup, &generations, &stats);
    }

    /// A generation that systemd started itself drains on `systemctl stop`: SIGTERM, then
    /// its own exit with status 0.
    fn stop_before_any_reload_drains() {
        let addr = free_addr();
        let unit = notify_service(&exec_start(&tcp_server(), addr, ""), Some("all"));
        let sd = Systemd::boot(&[(SERVICE, &unit)]);
        sd.start(SERVICE);
        let first = wait_serving(&sd, addr);
        let cgroup = sd.unit_cgroup(SERVICE);
        let result = stop_and_check_gone(&sd, &cgroup, &[first], &Stats::default());
        assert_eq!(result, "success");
        assert!(exited_by_itself(&sd, first), "{}", sd.log(SERVICE));
    }

    /// A client that holds its connection open for `hold` after reading its line,
    /// sending a byte every 250 ms (the example's lingering close waits for it to
    /// close). Returns once the line has arrived; the thread returns the line.
    fn slow_client(addr: SocketAddr, hold: Duration) -> thread::JoinHandle<io::Result<String>> {
        let (read, got) = mpsc::channel();
        let client = thread::spawn(move || {
            let mut conn = TcpStream::connect(addr)?;
            let mut line = String::new();
            io::BufReader::new(conn.try_clone()?).read_line(&mut line)?;
            let _ = read.send(());
            let end = Instant::now() + hold;
            while Instant::now() < end {
                conn.write_all(b".")?;
                thread::sleep(Duration::from_millis(250));
            }
            Ok(line)
        });
        got.recv_timeout(Duration::from_secs(10))
            .expect("the slow client's line");
        client
    }

    /// A stop whose drain takes 5 s, with `TimeoutStopSec=2`: the generation asks for
    /// the time it needs (`EXTEND_TIMEOUT_USEC=`, repeated while it drains), systemd
    /// waits, and the unit stops with the generation's own clean exit, not `SIGKILL`.
    /// (Without the extension systemd 252 kills it at 2 s: `Result=timeout`.)
    fn a_stop_longer_than_timeout_stop_sec_drains() {
        let addr = free_addr();
        let mut unit = notify_service(&exec_start(&tcp_server(), addr, ""), None);
        unit.push_str("TimeoutStopSec=2\n");
        let sd = Systemd::boot(&[(SERVICE, &unit)]);
        sd.start(SERVICE);
        let first = wait_serving(&sd, addr);
        let cgroup = sd.unit_cgroup(SERVICE);
        let client = slow_client(addr, Duration::from_secs(5));
        let t = Instant::now();
        let result = stop_and_check_gone(&sd, &cgroup, &[first], &Stats::default());
        let took = t.elapsed();
        let line = client.join().unwrap().expect("the slow client");
        assert_eq!(line.trim(), format!("hello from pid={first}"));
        eprintln!("stop took {took:.1?} (TimeoutStopSec=2)");
        assert_eq!(result, "success", "{}", sd.diagnostics(SERVICE));
        assert!(exited_by_itself(&sd, first), "{}", sd.log(SERVICE));
        assert!(
            took >= Duration::from_secs(3),
            "the drain was not waited for ({took:?}):\n{}",
            sd.log(SERVICE)
        );
        assert!(
            !sd.log(SERVICE).contains("drain timeout"),
            "{}",
            sd.log(SERVICE)
        );
    }

    /// After a reload, systemd learnt the main pid (`MAINPID=`) while that process was the
    /// old generation's child, not its own, and marks it alien. On stop, systemd 252 sends
    /// SIGTERM and, seeing nothing it can wait for, SIGKILL at once: the last generation
    /// cannot drain. The unit ends `failed` (`Result=signal`), or `inactive` while the
    /// process is still dying; it passes only when systemd happened to read `MAINPID=`
    /// after the old generation had exited (1 run in 6 here).
    fn stop_after_a_reload_drains() {
        let addr = free_addr();
        let unit = notify_service(&exec_start(&tcp_server(), addr, ""), Some("all"));
        let sd = Systemd::boot(&[(SERVICE, &unit)]);
        sd.start(SERVICE);
        let first = wait_serving(&sd, addr);
        let cgroup = sd.unit_cgroup(SERVICE);
        let (second, _) = reload_and_follow(&sd, addr, first, false);
        let result = stop_and_check_gone(&sd, &cgroup, &[first, second], &Stats::default());
        assert!(
            exited_by_itself(&sd, second),
            "generation {second} was killed (Result={result}):\n{}",
            sd.diagnostics(SERVICE)
        );
        assert_eq!(result, "success");
    }

    /// A unit-level workaround for the above: an `ExecStop=` that sends SIGTERM and waits
    /// for the main pid to exit. systemd waits for `ExecStop=`, reaps the generation (it is
    /// PID 1, every orphan's reaper) and finds nothing left to kill.
    fn stop_with_an_exec_stop_that_waits_drains() {
        let addr = free_addr();
        let mut unit = notify_service(&exec_start(&tcp_server(), addr, ""), Some("all"));
        unit.push_str("ExecStop=/bin/sh -c 'kill -TERM $MAINPID; while kill -0 $MAINPID 2>/dev/null; do sleep 0.05; done'\n");
        let sd = Systemd::boot(&[(SERVICE, &unit)]);
        sd.start(SERVICE);
        let first = wait_serving(&sd, addr);
        let cgroup = sd.unit_cgroup(SERVICE);
        let (second, _) = reload_and_follow(&sd, addr, first, false);
        let (third, _) = reload_and_follow(&sd, addr, second, false);
        let result = stop_and_check_gone(&sd, &cgroup, &[first, second, third], &Stats::default());
        assert!(
            exited_by_itself(&sd, third),
            "generation {third} was killed (Result={result}):\n{}",
            sd.diagnostics(SERVICE)
        );
        assert_eq!(result, "success");
    }

    /// Reloads to run in [`many_reloads_never_take_the_unit_down`].
    const MANY_RELOADS: usize = 300;

    /// A soak test for a race behind rare failures of the reload tests. When `ExecReload=`'s
    /// kill exits, systemd 252 checks whether the main pid is still alive; after the first
    /// reload the main pid is alien (not systemd's child when `MAINPID=` named it), and a
    /// zombie counts as dead. If systemd runs late, the old generation has exited by then
    /// while the new generation's `MAINPID=` is still unread: systemd stops the unit,
    /// SIGTERMs the new generation, and `systemctl reload` still succeeds (with socket
    /// activation, the next connection starts a fresh generation). Seen 4 times in about
    /// 1500 reloads of the other tests on this shared 2-core machine, at load averages up to
    /// 10, and once more in a CI run; 300 reloads here at a load average of 6 all passed.
    /// The commit now waits until systemd has read its `MAINPID=` before the old generation
    /// may exit (`tests/systemd.rs` checks that wait deterministically); this soak test
    /// passed at a load average of 6.7 with and without the wait, so it shows no
    /// regression rather than the fix.
    fn many_reloads_never_take_the_unit_down() {
        let addr = free_addr();
        let unit = notify_service(&exec_start(&tcp_server(), addr, ""), Some("all"));
        let sd = Systemd::boot(&[(SERVICE, &unit)]);
        sd.start(SERVICE);
        let mut pid = wait_serving(&sd, addr);
        let load = Load::start(addr, &CLIENTS);
        for i in 1..=MANY_RELOADS {
            wait_answers(&sd, &load, 10);
            let (new, _) = reload_and_follow(&sd, addr, pid, false);
            if i % 50 == 0 {
                eprintln!("{i} reloads");
            }
            pid = new;
        }
        let stats = load.finish();
        assert!(stats.failures.is_empty(), "{:#?}", stats.failures);
    }

    /// `FileDescriptorStoreMax=`, `Restart=always`: the serving generation is `kill -9`ed
    /// five times under load; each time systemd starts the service again on the sockets it
    /// kept, so no connection is refused (they wait in the kept queue). Only a connection
    /// the killed process had accepted and not yet answered is lost with it: at most one per
    /// client thread and kill. Afterwards upgrades work and the store holds exactly the
    /// live listener.
    fn the_fd_store_keeps_the_sockets_through_kill_9() {
        let addr = free_addr();
        let unit = format!(
            "[Unit]\nDescription=tcp_server (fd store)\nStartLimitIntervalSec=0\n\n\
             [Service]\nType=notify\n{}\n\
             ExecReload=/bin/kill -HUP $MAINPID\nFileDescriptorStoreMax=16\nRestart=always\n\
             RestartSec=0\n",
            exec_start(&tcp_server(), addr, " --fd-store")
        );
        let sd = Systemd::boot(&[(SERVICE, &unit)]);
        sd.start(SERVICE);
        let mut main = wait_serving(&sd, addr);
        let stored = |sd: &Systemd| sd.show(SERVICE, "NFileDescriptorStore");
        sd.wait_for("the listener in the store", || {
            (stored(&sd) == "1").then_some(())
        });
        let load = Load::start(addr, &CLIENTS);
        let mut generations = vec![main];
        for i in 1..=5 {
            wait_answers(&sd, &load, ANSWERS);
            let t = Instant::now();
            // The pid is the namespace's: signal it from there.
            let out = sd.systemctl(&["kill", "--kill-who=main", "--signal=SIGKILL", SERVICE]);
            assert!(out.status.success(), "systemctl kill: {out:?}");
            main = sd.wait_for("systemd to start the service again", || {
                let pid: u32 = sd.show(SERVICE, "MainPID").parse().ok()?;
                (pid != 0 && pid != main && sd.show(SERVICE, "ActiveState") == "active")
                    .then_some(pid)
            });
            sd.wait_for("the restarted generation to answer", || {
                (line_probe(addr).ok() == Some(main)).then_some(())
            });
            eprintln!("kill -9 {i}: pid {main} serves after {:.0?}", t.elapsed());
            generations.push(main);
        }
        wait_answers(&sd, &load, ANSWERS);
        let (next, report) = reload_and_follow(&sd, addr, main, false);
        eprintln!("after the restarts: {report}");
        generations.push(next);
        wait_answers(&sd, &load, ANSWERS);
        let stats = load.finish();
        eprintln!(
            "slowest connection: {:.0?} (a restart holds connections in the queue)",
            stats.slowest
        );
        // Lost with the killed process: accepted, not answered (EOF before the reply).
        let in_flight = |f: &String| f.contains("reply without a pid") || f.contains("reset");
        let (lost, failed): (Vec<&String>, Vec<&String>) =
            stats.failures.iter().partition(|f| in_flight(f));
        eprintln!(
            "{} answered; {} lost in flight in a killed process; {} refused or failed otherwise",
            stats.ok,
            lost.len(),
            failed.len()
        );
        assert!(failed.is_empty(), "refused or failed: {failed:#?}");
        assert!(lost.len() <= 5 * CLIENTS.len(), "{lost:#?}");
        assert!(stats.ok > 0, "no connection was answered");
        for pid in &stats.pids {
            assert!(generations.contains(pid), "answered by unknown pid {pid}");
        }
        assert_eq!(
            stored(&sd),
            "1",
            "the store holds exactly the live listener"
        );
        let cgroup = sd.unit_cgroup(SERVICE);
        stop_and_check_gone(&sd, &cgroup, &generations, &stats);
    }

    /// `tcp_server --keeper` as the unit's main process: `MainPID` stays the keeper's over
    /// every reload (the keeper forwards the `SIGHUP`), no connection fails, and a stop
    /// drains (the keeper is systemd's own child, so systemd waits for it).
    fn the_keeper_stays_the_main_pid_over_reloads() {
        let addr = free_addr();
        let unit = notify_service(&exec_start(&tcp_server(), addr, " --keeper"), None);
        let sd = Systemd::boot(&[(SERVICE, &unit)]);
        sd.start(SERVICE);
        sd.wait_active(SERVICE);
        let keeper: u32 = sd.show(SERVICE, "MainPID").parse().unwrap();
        let mut generation =
            sd.wait_for("the first generation to answer", || line_probe(addr).ok());
        assert_ne!(generation, keeper, "the keeper itself does not serve");
        let cgroup = sd.unit_cgroup(SERVICE);
        let load = Load::start(addr, &CLIENTS);
        let mut generations = vec![generation];
        for i in 1..=RELOADS {
            wait_answers(&sd, &load, ANSWERS);
            let status = sd.reload(SERVICE);
            assert!(
                status.success(),
                "reload {i}: {status}\n{}",
                sd.diagnostics(SERVICE)
            );
            generation = sd.wait_for("a new generation to answer", || {
                line_probe(addr).ok().filter(|&p| p != generation)
            });
            generations.push(generation);
            assert_eq!(
                sd.show(SERVICE, "MainPID"),
                keeper.to_string(),
                "reload {i}: MainPID moved off the keeper:\n{}",
                sd.diagnostics(SERVICE)
            );
        }
        wait_answers(&sd, &load, ANSWERS);
        let stats = load.finish();
        check_load(&stats, &generations);
        generations.push(keeper);
        let result = stop_and_check_gone(&sd, &cgroup, &generations, &stats);
        assert_eq!(result, "success", "{}", sd.diagnostics(SERVICE));
        assert!(exited_by_itself(&sd, generation), "{}", sd.log(SERVICE));
    }

    pub fn main() {
        harness::main(&[
            crate::trial!(notify_access_all_follows_reloads),
            crate::trial!(notify_access_main_follows_reloads),
            crate::trial!(simple_with_pid_file_follows_reloads),
            crate::trial!(socket_activated_follows_reloads),
            crate::trial!(bad_deploy_keeps_the_old_generation),
            crate::trial!(stop_before_any_reload_drains),
            crate::trial!(a_stop_longer_than_timeout_stop_sec_drains),
            crate::trial!(stop_after_a_reload_drains, ignore = "systemd 252 SIGKILLs on stop, without waiting, a main pid that was not its child when it learnt it (still fails 3 runs in 5): use ExecStop= or the keeper"),
            crate::trial!(stop_with_an_exec_stop_that_waits_drains),
            crate::trial!(many_reloads_never_take_the_unit_down, ignore = "soak test (300 reloads, ~25 s); catches a rare systemd 252 race between ExecReload's exit and MAINPID="),
            crate::trial!(the_fd_store_keeps_the_sockets_through_kill_9),
            crate::trial!(the_keeper_stays_the_main_pid_over_reloads),
        ])
    }
}
