//! The control socket against real upgrading processes: the client API gets the new
//! pid or the new generation's own reason, a second request during an upgrade is
//! refused at once, a client that hangs up cancels nothing, hostile clients get an
//! error or are disconnected in time, and peers of another uid are refused.

#[cfg(target_os = "linux")]
mod util;

#[cfg(target_os = "linux")]
#[path = "util/harness.rs"]
mod harness;

fn main() {
    #[cfg(target_os = "linux")]
    suite::main();
}

#[cfg(target_os = "linux")]
mod suite {
    use super::{harness, util};

    use std::io::{Read, Write};
    use std::net::SocketAddr;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use tableflip::control::{self, Status};
    use tableflip::{Error, UnixAddr};
    use util::{ask, signal, Run};

    /// Long enough for any upgrade of these tests, on a loaded machine.
    const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

    /// The entry point of the processes the tests start (`util::scenario_args`).
    fn scenario_entry() {
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
        assert_eq!(status.last_upgrade, None);

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
        assert_eq!(status.last_upgrade, None);
        signal(pid3, libc::SIGTERM);
        run.expect_all_exited();
        assert!(!sock.exists(), "the socket file outlived the service");
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
        let last = status.last_upgrade.expect("a last upgrade");
        let failure = last.result.unwrap_err();
        assert_eq!(failure.kind, "ChildExited");
        assert!(failure.message.contains("exit status: 3"), "{failure:?}");
        let age = std::time::SystemTime::now()
            .duration_since(last.ended)
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

    pub fn main() {
        harness::main_with_entry(
            scenario_entry,
            &[
                crate::trial!(upgrades_over_the_control_socket_return_the_new_pid),
                crate::trial!(a_failed_upgrade_answers_with_the_new_generations_reason),
                crate::trial!(a_second_request_during_an_upgrade_is_refused_at_once),
                crate::trial!(a_client_that_hangs_up_does_not_cancel_the_upgrade),
                crate::trial!(hostile_clients_get_an_error_or_are_disconnected_in_time),
                crate::trial!(serve_one_answers_in_a_poll_loop),
                crate::trial!(a_mode_is_set_exactly_whatever_the_umask),
                crate::trial!(a_stale_socket_file_is_replaced_and_a_live_one_is_not),
                crate::trial!(peers_of_another_uid_are_refused),
            ],
        )
    }
}
