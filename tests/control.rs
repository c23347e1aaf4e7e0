//! The control socket against real upgrading processes: the client API gets the new
//! pid or the new generation's own reason, a second request during an upgrade is
//! refused at once, a client that hangs up cancels nothing, hostile clients get an
//! error or are disconnected in time, and peers of another uid are refused. The client
//! believes only whom it should: a squatter on an abstract name is not, a service of
//! another user in a directory of its own is.

#[cfg(target_os = "linux")]
mod util;

#[cfg(target_os = "linux")]
#[path = "util/harness.rs"]
mod harness;

// The example binaries, for the operator's view of a squatter (`--upgrade`).
#[cfg(target_os = "linux")]
#[allow(dead_code)]
#[path = "util/examples.rs"]
mod examples;

fn main() {
    #[cfg(target_os = "linux")]
    suite::main();
}

#[cfg(target_os = "linux")]
mod suite {
    use super::{examples, harness, util};

    use std::io::{Read, Write};
    use std::net::SocketAddr;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use tableflip::control::{self, ClientConfig, Status};
    use tableflip::{Error, UnixAddr};
    use util::{ask, signal, Run};

    /// Long enough for any upgrade of these tests, on a loaded machine.
    const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

    /// The entry point of the processes the tests start (`util::scenario_args`).
    fn scenario_entry() {
        // A squatter (for the squatting test): binds the name first, answers anyone.
        if let Ok(name) = std::env::var("TF_SQUAT") {
            squat(&name);
        }
        // A client process (for the uid tests): one status request, one line of result.
        if let Ok(addr) = std::env::var("TF_CLIENT_ADDR") {
            let addr = match addr.strip_prefix('@') {
                Some(name) => UnixAddr::abstract_name(name),
                None => UnixAddr::Path(addr.into()),
            };
            let line = match control::status(addr, Duration::from_secs(10)) {
                Ok(status) => format!("client-ok pid={}", status.pid),
                Err(Error::Remote { kind, message, .. }) => {
                    format!("client-remote kind={kind} message={message}")
                }
                Err(e) => format!("client-error {e}: {:?}", e.io_error()),
            };
            println!("\n{line}");
            std::process::exit(0);
        }
        if let Ok(name) = std::env::var("TF_SCENARIO") {
            util::scenario(&name);
        }
    }

    /// A scenario with a TCP listener, a pid file and a control socket at `ctl.sock` in its
    /// directory (relative, so every generation finds it the same way).
    fn start(tag: &str, extra: &[(&str, String)]) -> (Run, u32, SocketAddr, PathBuf) {
        let mut env = vec![
            ("TF_TCP", "127.0.0.1:0".to_string()),
            ("TF_PIDFILE", "app.pid".to_string()),
            ("TF_CONTROL", "ctl.sock".to_string()),
        ];
        env.extend(extra.iter().cloned());
        let mut run = Run::start(tag, &env);
        let addr: SocketAddr = run.expect("tcp").field("addr").unwrap().parse().unwrap();
        run.expect("control");
        let pid = run.expect("ready").pid;
        let sock = run.path("ctl.sock");
        (run, pid, addr, sock)
    }

    fn remote(result: tableflip::Result<impl std::fmt::Debug>) -> (String, String) {
        match result {
            Err(Error::Remote { kind, message, .. }) => (kind, message),
            other => panic!("expected an error answer, got {other:?}"),
        }
    }

    fn status_of(sock: &Path) -> Status {
        control::status(sock, CLIENT_TIMEOUT).expect("status")
    }

    /// Sends raw bytes, then reads whatever the server answers until it closes (or 10 s).
    fn raw(sock: &Path, bytes: &[u8]) -> String {
        let mut conn = UnixStream::connect(sock).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // The server may close after reading only the first bytes of an oversized request.
        let _ = conn.write_all(bytes);
        read_answer(&mut conn)
    }

    fn read_answer(conn: &mut UnixStream) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                // Closed with our unread bytes in its queue: the answer came first.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("read: {e} (so far {:?})", String::from_utf8_lossy(&out)),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn fd_count(pid: u32) -> usize {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Waits until `pid` has `fds` fds open again: a client has its answer a moment before
    /// the server closes its end.
    #[track_caller]
    fn wait_fd_count(pid: u32, fds: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while fd_count(pid) != fds {
            assert!(
                Instant::now() < deadline,
                "{} fds, was {fds}",
                fd_count(pid)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn inode(path: &Path) -> u64 {
        std::fs::symlink_metadata(path).unwrap().ino()
    }

    fn upgrades_over_the_control_socket_return_the_new_pid() {
        let (mut run, pid1, addr, sock) = start("ctl-ok", &[]);
        let meta = std::fs::symlink_metadata(&sock).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o600,
            "socket file mode"
        );
        let ino = inode(&sock);
        let status = status_of(&sock);
        assert_eq!(
            (status.pid, status.ready, status.upgrading),
            (pid1, true, false)
        );
        assert_eq!(status.last_upgrade(), None);

        let pid2 = control::request_upgrade(&sock, CLIENT_TIMEOUT).expect("upgrade");
        assert_ne!(pid2, pid1);
        assert_eq!(run.expect_not_from("ready", pid1).pid, pid2);
        // The answer comes after the commit: the pid file already names the new generation.
        assert_eq!(
            std::fs::read_to_string(run.path("app.pid")).unwrap().trim(),
            pid2.to_string()
        );
        run.expect_from("control-done", pid1);
        assert!(run.wait_first().success());
        assert_eq!(ask(addr).unwrap(), pid2);

        // The same socket file and queue, now served by the new generation.
        assert_eq!(inode(&sock), ino);
        let status = status_of(&sock);
        assert_eq!((status.pid, status.ready), (pid2, true));
        let pid3 = control::request_upgrade(&sock, CLIENT_TIMEOUT).expect("second upgrade");
        run.expect_from("control-done", pid2);
        util::wait_gone(pid2);
        let status = status_of(&sock);
        assert_eq!(status.pid, pid3);

        // The last generation ran no upgrade of its own; stopping removes the socket file.
        assert_eq!(status.last_upgrade(), None);
        signal(pid3, libc::SIGTERM);
        run.expect_all_exited();
        assert!(!sock.exists(), "the socket file outlived the service");
    }

    /// Each upgrade's record: measured by the old generation, completed by its drain's
    /// report and by the new generation, which sees it gone; passed on at the next
    /// upgrade; over the socket in both forms.
    fn upgrade_records_travel_and_complete() {
        let (mut run, pid1, _, sock) = start("ctl-records", &[("TF_DRAIN_COUNTS", "7 1".into())]);
        // Each old generation lives on 300 ms after its drain.
        std::fs::write(run.path("linger"), "300").unwrap();
        let pid2 = control::request_upgrade(&sock, CLIENT_TIMEOUT).expect("upgrade");
        run.expect_from("drained", pid1);
        util::wait_gone(pid1);
        let status = status_of(&sock);
        assert_eq!(status.pid, pid2);
        assert_eq!(status.last_upgrade(), None, "pid {pid2} ran none");
        assert_eq!(status.upgrades.len(), 1, "{status:?}");
        let first = status.upgrades[0].clone();
        let t = format!("{first:?}");
        assert_eq!((first.pid, first.result.clone()), (pid1, Ok(pid2)), "{t}");
        let ready = first.ready.expect("ready");
        assert!(ready <= first.ended, "{t}");
        assert_eq!(
            first.probation.map(|p| p < Duration::from_secs(1)),
            Some(true),
            "{t}"
        );
        assert_eq!(
            (first.drained, first.force_closed),
            (Some(7), Some(1)),
            "{t}"
        );
        let drained = first.drain_ended.expect("the drain's end");
        let gone = first.gone.expect("the old generation gone");
        assert!(first.ended <= drained, "{t}");
        assert!(gone >= drained + Duration::from_millis(300), "{t}");
        let age = std::time::SystemTime::now()
            .duration_since(first.started)
            .unwrap();
        assert!(age < Duration::from_secs(30) && gone < age, "{age:?} {t}");
        // One line for a log.
        let line = first.to_string();
        assert!(
            line.starts_with(&format!("upgrade {pid1} -> {pid2}: ready after"))
                && line.contains("7 drained, 1 force-closed")
                && line.contains(&format!("pid {pid1} gone after")),
            "{line}"
        );

        // Passed on: the next generation has both.
        let pid3 = control::request_upgrade(&sock, CLIENT_TIMEOUT).expect("second upgrade");
        run.expect_from("drained", pid2);
        util::wait_gone(pid2);
        let status = status_of(&sock);
        assert_eq!(status.pid, pid3);
        assert_eq!(status.upgrades.len(), 2, "{status:?}");
        assert_eq!(status.upgrades[0], first);
        let second = &status.upgrades[1];
        assert_eq!((second.pid, second.result.clone()), (pid2, Ok(pid3)));
        assert_eq!((second.drained, second.force_closed), (Some(7), Some(1)));
        assert!(
            second.gone.is_some() && second.started > first.started,
            "{second:?}"
        );

        // The machine-readable form, one line per record.
        let text = raw(&sock, b"tableflip-control/1 status\n");
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("record-v1: "))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[1].starts_with(&format!("record-v1: pid={pid2} started="))
                && lines[1].contains(&format!(" result=ok new={pid3} "))
                && lines[1].contains(" drained=7 forced=1"),
            "{text}"
        );
        signal(pid3, libc::SIGTERM);
        run.expect_all_exited();
    }

    fn a_failed_upgrade_answers_with_the_new_generations_reason() {
        let (mut run, pid1, addr, sock) = start("ctl-fail", &[]);
        let fds = fd_count(pid1);

        run.next("fail");
        let (kind, message) = remote(control::request_upgrade(&sock, CLIENT_TIMEOUT));
        assert_eq!(kind, "ChildFailed");
        assert!(message.contains("config line 12: unknown key"), "{message}");

        run.next("exit 3");
        let err = control::request_upgrade(&sock, CLIENT_TIMEOUT).unwrap_err();
        assert!(err.to_string().contains("exit status: 3"), "{err}");
        assert!(
            err.to_string().contains("ctl.sock"),
            "names the socket: {err}"
        );
        let (kind, _) = remote(Err::<(), _>(err));
        assert_eq!(kind, "ChildExited");

        // Still in charge, and it says how the last upgrade ended.
        let status = status_of(&sock);
        assert_eq!(
            (status.pid, status.ready, status.upgrading),
            (pid1, true, false)
        );
        let last = status.last_upgrade().expect("a last upgrade").clone();
        let failure = last.result.unwrap_err();
        assert_eq!(failure.kind, "ChildExited");
        assert!(failure.message.contains("exit status: 3"), "{failure:?}");
        let age = std::time::SystemTime::now()
            .duration_since(last.started + last.ended)
            .unwrap();
        assert!(age < Duration::from_secs(30), "{age:?}");
        assert_eq!(ask(addr).unwrap(), pid1);
        wait_fd_count(pid1, fds);

        signal(pid1, libc::SIGTERM);
        run.expect_all_exited();
    }

    fn a_second_request_during_an_upgrade_is_refused_at_once() {
        let (mut run, pid1, _, sock) = start("ctl-busy", &[]);
        // The next generation takes 2 s to become ready.
        run.next("delay-us 2000000");
        let first = {
            let sock = sock.clone();
            std::thread::spawn(move || control::request_upgrade(&sock, CLIENT_TIMEOUT))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !status_of(&sock).upgrading {
            assert!(Instant::now() < deadline, "never upgrading");
            std::thread::sleep(Duration::from_millis(10));
        }
        let t = Instant::now();
        let (kind, _) = remote(control::request_upgrade(&sock, CLIENT_TIMEOUT));
        assert_eq!(kind, "UpgradeInProgress");
        let status = status_of(&sock);
        assert!(status.upgrading);
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "{:?}",
            t.elapsed()
        );
        // A SIGHUP meanwhile is refused the same way.
        signal(pid1, libc::SIGHUP);
        let err = run.expect_upgrade_result(pid1).unwrap_err();
        assert!(err.rest.contains("kind=UpgradeInProgress"), "{err:?}");

        let pid2 = first.join().unwrap().expect("the first request upgrades");
        assert_eq!(run.expect_not_from("ready", pid1).pid, pid2);
        assert!(run.wait_first().success());
        signal(pid2, libc::SIGTERM);
        run.expect_all_exited();
    }

    fn a_client_that_hangs_up_does_not_cancel_the_upgrade() {
        let (mut run, pid1, addr, sock) =
            start("ctl-hangup", &[("TF_SIGPIPE_DEFAULT", "1".into())]);
        run.next("delay-us 300000");
        let mut conn = UnixStream::connect(&sock).unwrap();
        conn.write_all(b"tableflip-control/1 upgrade\n").unwrap();
        // Wait until the server has read it, then go away.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !status_of(&sock).upgrading {
            assert!(Instant::now() < deadline, "never upgrading");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(conn);
        let pid2 = run.expect_not_from("ready", pid1).pid;
        // The old generation wrote its answer into a closed socket: no SIGPIPE, exit 0.
        run.expect_from("control-done", pid1);
        assert!(run.wait_first().success());
        assert_eq!(ask(addr).unwrap(), pid2);
        assert_eq!(status_of(&sock).pid, pid2);
        signal(pid2, libc::SIGTERM);
        run.expect_all_exited();
    }

    fn hostile_clients_get_an_error_or_are_disconnected_in_time() {
        const REQUEST_MS: u64 = 500;
        let (mut run, pid1, _, sock) = start(
            "ctl-hostile",
            &[
                ("TF_CONTROL_REQUEST_MS", REQUEST_MS.to_string()),
                ("TF_SIGPIPE_DEFAULT", "1".into()),
            ],
        );
        let fds = fd_count(pid1);
        let prompt = Duration::from_millis(REQUEST_MS / 2);
        let answered = |bytes: &[u8], kind: &str, quick: bool| {
            let t = Instant::now();
            let answer = raw(&sock, bytes);
            let want = format!("tableflip-control/1 error {kind}\nmessage: ");
            assert!(answer.starts_with(&want), "{bytes:?}: {answer:?}");
            assert!(answer.ends_with("\n\n"), "{answer:?}");
            if quick {
                assert!(t.elapsed() < prompt, "{bytes:?} took {:?}", t.elapsed());
            }
        };
        // Refused as soon as it cannot be a request.
        answered(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "BadRequest", true);
        answered(b"\x00\x01\x02\xff", "BadRequest", true);
        answered(b"tableflip-control/2 upgrade\n", "UnsupportedVersion", true);
        answered(b"tableflip-control/1 reboot\n", "UnknownCommand", true);
        answered(b"tableflip-control/1 upgrade now\n", "BadRequest", true);
        answered(b"tableflip-control/1 \xc3\x28\n", "BadRequest", true);
        // Oversized: 1 MiB that starts like a request.
        let mut big = b"tableflip-control/1 ".to_vec();
        big.resize(1 << 20, b'a');
        answered(&big, "BadRequest", true);

        // Half a request, then nothing: timed out.
        for stall in [&b"tableflip-control/1 upg"[..], b""] {
            let t = Instant::now();
            let mut conn = UnixStream::connect(&sock).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            conn.write_all(stall).unwrap();
            let answer = read_answer(&mut conn);
            assert!(
                answer.starts_with("tableflip-control/1 error RequestTimeout\n"),
                "{answer:?}"
            );
            let took = t.elapsed();
            assert!(
                took >= Duration::from_millis(REQUEST_MS - 50) && took < Duration::from_secs(5),
                "{took:?}"
            );
        }

        // Half a request, then a hang-up: nothing to answer, nothing left behind.
        let mut conn = UnixStream::connect(&sock).unwrap();
        conn.write_all(b"tableflip-control/1 sta").unwrap();
        drop(conn);

        // More stalling clients than the server has slots: the others wait in the queue,
        // and a good request still gets through once the stallers have timed out.
        let stallers: Vec<UnixStream> = (0..control::MAX_PENDING + 8)
            .map(|_| {
                let mut c = UnixStream::connect(&sock).unwrap();
                c.write_all(b"tableflip").unwrap();
                c
            })
            .collect();
        let t = Instant::now();
        assert_eq!(status_of(&sock).pid, pid1);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        for mut c in stallers {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            assert!(read_answer(&mut c).contains("error RequestTimeout"));
        }

        // A good request, sent in pieces, is served.
        let mut conn = UnixStream::connect(&sock).unwrap();
        for piece in ["t", "ablef", "lip-control/1 st", "atus\r", "\n"] {
            conn.write_all(piece.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let answer = read_answer(&mut conn);
        assert!(
            answer.starts_with(&format!("tableflip-control/1 ok\npid: {pid1}\n")),
            "{answer:?}"
        );

        // Nothing leaked, nothing panicked.
        let deadline = Instant::now() + Duration::from_secs(5);
        while fd_count(pid1) != fds {
            assert!(
                Instant::now() < deadline,
                "{} fds, was {fds}",
                fd_count(pid1)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!run.seen("control-serve-error"));
        signal(pid1, libc::SIGTERM);
        run.expect_all_exited();
    }

    fn serve_one_answers_in_a_poll_loop() {
        let (mut run, pid1, _, sock) = start("ctl-one", &[("TF_CONTROL_ONE", "1".into())]);
        assert_eq!(status_of(&sock).pid, pid1);
        let pid2 = control::request_upgrade(&sock, CLIENT_TIMEOUT).expect("upgrade");
        assert_eq!(run.expect_not_from("ready", pid1).pid, pid2);
        assert!(run.wait_first().success());
        assert_eq!(status_of(&sock).pid, pid2);
        signal(pid2, libc::SIGTERM);
        run.expect_all_exited();
    }

    fn a_mode_is_set_exactly_whatever_the_umask() {
        // The scenario inherits the test's umask (022 here): 0660 would become 0640.
        let (mut run, pid1, _, sock) = start("ctl-mode", &[("TF_CONTROL_MODE", "660".into())]);
        let mode = std::fs::symlink_metadata(&sock)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o660);
        signal(pid1, libc::SIGTERM);
        run.expect_all_exited();
    }

    fn a_stale_socket_file_is_replaced_and_a_live_one_is_not() {
        // A socket file left by a process that died: nobody listens.
        let dir = util::scratch_dir("ctl-stale");
        let stale = dir.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let (mut run, pid1, _, _) = start(
            "ctl-stale",
            &[("TF_CONTROL", stale.to_string_lossy().into_owned())],
        );
        assert_eq!(status_of(&stale).pid, pid1);
        signal(pid1, libc::SIGTERM);
        run.expect_all_exited();
        drop(run);

        // A live one (ours) is left alone: the scenario cannot bind there.
        let live_path = dir.join("live.sock");
        let live = std::os::unix::net::UnixListener::bind(&live_path).unwrap();
        let mut run = Run::start(
            "ctl-live",
            &[("TF_CONTROL", live_path.to_string_lossy().into_owned())],
        );
        let err = run.expect("control-error");
        assert!(err.rest.contains("kind=Listen"), "{err:?}");
        run.expect("ready");
        assert!(live_path.exists());
        let first = run.first_pid();
        signal(first, libc::SIGTERM);
        run.expect_all_exited();
        drop(live);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Runs this test binary as a client under uid 65534 (nobody) and returns its line.
    fn client_as_nobody(addr: &str) -> String {
        use std::os::unix::process::CommandExt;
        // Under a watchdog of its own.
        let out = std::process::Command::new("timeout")
            .arg("60")
            .arg(std::env::current_exe().unwrap())
            .args([
                "scenario_entry",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TF_CLIENT_ADDR", addr)
            .env_remove("TF_SCENARIO")
            .current_dir("/")
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run the client");
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .find(|l| l.starts_with("client-"))
            .unwrap_or_else(|| {
                panic!(
                    "no result line; stdout {stdout:?}, stderr {:?}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
            .to_string()
    }

    fn peers_of_another_uid_are_refused() {
        harness::require_root("to run a client as another uid");
        // An abstract name has no file mode: the peer check is all there is.
        let name = format!("@tf-ctl-uid-{}", std::process::id());
        let (mut run, pid1, _, _) = start("ctl-uid", &[("TF_CONTROL", name.clone())]);
        let line = client_as_nobody(&name);
        assert!(
            line.starts_with("client-remote kind=PermissionDenied message=uid 65534 may not"),
            "{line}"
        );
        // The server's own user (root) is served.
        let addr = UnixAddr::abstract_name(&name[1..]);
        assert_eq!(control::status(addr, CLIENT_TIMEOUT).unwrap().pid, pid1);
        signal(pid1, libc::SIGTERM);
        run.expect_all_exited();
        drop(run);

        // Allowed by configuration.
        let (mut run, pid1, _, _) = start(
            "ctl-uid-allowed",
            &[
                ("TF_CONTROL", name.clone()),
                ("TF_CONTROL_ALLOW_UID", "65534".into()),
            ],
        );
        assert_eq!(client_as_nobody(&name), format!("client-ok pid={pid1}"));
        signal(pid1, libc::SIGTERM);
        run.expect_all_exited();
        drop(run);

        // A socket file with mode 0600: the kernel refuses the connection itself.
        let (mut run, pid1, _, sock) = start("ctl-uid-file", &[]);
        let line = client_as_nobody(&sock.to_string_lossy());
        assert!(
            line.starts_with("client-error control socket") && line.contains("PermissionDenied"),
            "{line}"
        );
        signal(pid1, libc::SIGTERM);
        run.expect_all_exited();
    }

    /// Binds the abstract name `name` and answers every connection with a made-up pid,
    /// as a user who took the name before the service started would.
    fn squat(name: &str) -> ! {
        use std::os::linux::net::SocketAddrExt;
        // SAFETY: alarm(2) only arms a timer: a squatter never outlives a minute.
        unsafe { libc::alarm(60) };
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap();
        let listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
        println!("\nsquatting");
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(b"tableflip-control/1 ok\npid: 4242\n\n");
        }
        std::process::exit(0);
    }

    /// A process of this test binary running as uid 65534; killed on drop.
    struct Squatter(std::process::Child);

    impl Squatter {
        fn start(name: &str) -> Squatter {
            use std::io::BufRead;
            use std::os::unix::process::CommandExt;
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args(util::scenario_args())
                .env("TF_SQUAT", name)
                .env_remove("TF_SCENARIO")
                .current_dir("/")
                .uid(65534)
                .gid(65534)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("start the squatter");
            let out = std::io::BufReader::new(child.stdout.take().unwrap());
            let bound = out
                .lines()
                .map_while(|l| l.ok())
                .any(|l| l.starts_with("squatting"));
            assert!(bound, "the squatter did not bind {name}");
            Squatter(child)
        }
    }

    impl Drop for Squatter {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// The client's refusal: the socket, the uid found, why.
    #[track_caller]
    fn not_believed<T: std::fmt::Debug>(
        result: tableflip::Result<T>,
        addr: &str,
        uid: u32,
    ) -> String {
        let err = match result {
            Err(e @ Error::ControlPeer { .. }) => e,
            other => panic!("expected the answer not to be believed, got {other:?}"),
        };
        let Error::ControlPeer {
            addr: a,
            uid: u,
            reason,
        } = &err
        else {
            unreachable!()
        };
        assert_eq!((a.as_str(), *u), (addr, uid), "{err}");
        let reason = reason.clone();
        let msg = err.to_string();
        assert!(
            msg.contains(addr) && msg.contains(&format!("uid {uid}")),
            "{msg}"
        );
        assert_eq!(
            std::io::Error::from(err).kind(),
            std::io::ErrorKind::PermissionDenied
        );
        reason
    }

    /// Another user binds the service's abstract name before it starts and answers with
    /// a made-up pid: the service cannot listen, and root's client, as a library call or
    /// as the example's `--upgrade`, is not fooled (it was: it printed the made-up pid
    /// and exited 0). Named as the service's uid, the squatter is believed.
    fn a_squatter_on_an_abstract_name_is_not_believed() {
        harness::require_root("to run a squatter as another uid");
        let name = format!("tf-ctl-squat-{}", std::process::id());
        let at = format!("@{name}");
        let squatter = Squatter::start(&name);
        let mut run = Run::start("ctl-squat", &[("TF_CONTROL", at.clone())]);
        let err = run.expect("control-error");
        assert!(err.rest.contains("kind=Listen"), "{err:?}");
        let pid1 = run.expect("ready").pid;

        let addr = UnixAddr::abstract_name(&name);
        let reason = not_believed(
            control::request_upgrade(addr.clone(), CLIENT_TIMEOUT),
            &at,
            65534,
        );
        assert!(reason.contains("an abstract name has no owner"), "{reason}");
        not_believed(control::status(addr.clone(), CLIENT_TIMEOUT), &at, 65534);
        // Named, it is believed: the caller said whom to expect.
        let named = ClientConfig::new(CLIENT_TIMEOUT).server_uid(65534);
        assert_eq!(control::request_upgrade(addr, named).unwrap(), 4242);

        // What an operator's unit file runs.
        let ask = |extra: &[&str]| {
            std::process::Command::new("timeout")
                .arg("60")
                .arg(examples::example("tcp_server"))
                .args(["--control", &at, "--upgrade"])
                .args(extra)
                .stdin(std::process::Stdio::null())
                .output()
                .expect("run the example's client")
        };
        let out = ask(&[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "stderr {stderr:?}");
        assert!(
            out.stdout.is_empty(),
            "{:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(stderr.contains(&format!("control socket {at}")), "{stderr}");
        assert!(stderr.contains("runs as uid 65534"), "{stderr}");
        let out = ask(&["--control-uid", "65534"]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4242");

        drop(squatter);
        signal(pid1, libc::SIGTERM);
        run.expect_all_exited();
    }

    /// A service running as uid 65534, its socket file in a directory of its own: root's
    /// client believes it and upgrades it. It stops believing it when the socket file
    /// belongs to someone else, or when every user can write to the directory (anyone
    /// could have bound the name), unless told the service's uid.
    fn root_asks_a_service_that_runs_as_another_user() {
        harness::require_root("to run a service as another uid");
        let home = util::scratch_dir("ctl-www");
        std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
        let sock = home.join("ctl.sock");
        let env = [
            ("TF_CONTROL", sock.to_string_lossy().into_owned()),
            (
                "TF_PIDFILE",
                home.join("app.pid").to_string_lossy().into_owned(),
            ),
        ];
        let mut run = Run::start_with("ctl-www", &env, None, |cmd| {
            use std::os::unix::process::CommandExt;
            cmd.uid(65534).gid(65534);
        });
        run.expect("control");
        let pid1 = run.expect("ready").pid;
        assert_eq!(std::fs::symlink_metadata(&sock).unwrap().uid(), 65534);
        assert_eq!(status_of(&sock).pid, pid1);
        let pid2 = control::request_upgrade(&sock, CLIENT_TIMEOUT).expect("upgrade");
        assert_eq!(run.expect_not_from("ready", pid1).pid, pid2);
        run.expect_from("control-done", pid1);
        assert_eq!(
            std::fs::read_to_string(home.join("app.pid"))
                .unwrap()
                .trim(),
            pid2.to_string()
        );
        let name = sock.to_string_lossy().into_owned();

        // The listener is not the socket file's owner.
        std::os::unix::fs::lchown(&sock, Some(1), None).unwrap();
        let reason = not_believed(control::status(&sock, CLIENT_TIMEOUT), &name, 65534);
        assert!(
            reason.contains("the socket file belongs to uid 1"),
            "{reason}"
        );
        std::os::unix::fs::lchown(&sock, Some(65534), None).unwrap();

        // Anyone could have bound the name.
        for mode in [0o1777, 0o777] {
            std::fs::set_permissions(&home, PermissionsExt::from_mode(mode)).unwrap();
            let reason = not_believed(control::status(&sock, CLIENT_TIMEOUT), &name, 65534);
            let why = format!(
                "its directory {} is not the service's own: every user can write to it (mode {mode:04o})",
                home.display()
            );
            assert!(reason.contains(&why), "{reason}");
        }
        let named = ClientConfig::new(CLIENT_TIMEOUT).server_uid(65534);
        assert_eq!(control::status(&sock, named).unwrap().pid, pid2);
        std::fs::set_permissions(&home, PermissionsExt::from_mode(0o755)).unwrap();
        assert_eq!(status_of(&sock).pid, pid2);

        signal(pid2, libc::SIGTERM);
        run.expect_all_exited();
        let _ = std::fs::remove_dir_all(&home);
    }

    pub fn main() {
        harness::main_with_entry(
            scenario_entry,
            &[
                crate::trial!(upgrades_over_the_control_socket_return_the_new_pid),
                crate::trial!(a_failed_upgrade_answers_with_the_new_generations_reason),
                crate::trial!(upgrade_records_travel_and_complete),
                crate::trial!(a_second_request_during_an_upgrade_is_refused_at_once),
                crate::trial!(a_client_that_hangs_up_does_not_cancel_the_upgrade),
                crate::trial!(hostile_clients_get_an_error_or_are_disconnected_in_time),
                crate::trial!(serve_one_answers_in_a_poll_loop),
                crate::trial!(a_mode_is_set_exactly_whatever_the_umask),
                crate::trial!(a_stale_socket_file_is_replaced_and_a_live_one_is_not),
                crate::trial!(peers_of_another_uid_are_refused),
                crate::trial!(a_squatter_on_an_abstract_name_is_not_believed),
                crate::trial!(root_asks_a_service_that_runs_as_another_user),
            ],
        )
    }
}
