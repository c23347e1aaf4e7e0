//! The upgrade lifecycle with real processes, real sockets on loopback and real signals.

mod util;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;

use util::{ask, exists, signal, wait_gone, Run};

/// Not a test: the body of every scenario process (see `util::scenario`).
#[test]
#[ignore = "entry point of the processes the other tests start"]
fn scenario_entry() {
    if let Ok(name) = std::env::var("TF_SCENARIO") {
        util::scenario(&name);
    }
}

fn tcp_env() -> Vec<(&'static str, String)> {
    vec![("TF_TCP", "127.0.0.1:0".to_string())]
}

/// Upgrades once with SIGHUP and returns the new generation's pid after checking that
/// the old one exited.
#[track_caller]
fn upgrade_ok(run: &mut Run, old: u32) -> u32 {
    upgrade_ok_event(run, old).pid
}

/// As [`upgrade_ok`], returning the new generation's `ready` event.
#[track_caller]
fn upgrade_ok_event(run: &mut Run, old: u32) -> util::Event {
    signal(old, libc::SIGHUP);
    run.expect_from("upgrade-ok", old);
    let ready = run.expect_not_from("ready", old);
    wait_gone_or_zombie_of_test(run, old);
    ready
}

/// The first generation is the test's own child and becomes a zombie until the test
/// reaps it; later ones are reaped by init.
#[track_caller]
fn wait_gone_or_zombie_of_test(run: &mut Run, pid: u32) {
    if pid == run.first_pid() {
        assert!(run.wait_first().success());
    } else {
        wait_gone(pid);
    }
}

#[test]
fn api_misuse_is_refused() {
    let mut run = Run::start("api", &[]);
    assert!(run
        .expect("second-new")
        .rest
        .contains("kind=AlreadyCreated"));
    assert!(run
        .expect("upgrade-before-ready")
        .rest
        .contains("kind=NotReady"));
    assert_eq!(run.expect("ready-again").field("ok"), Some("true"));
    assert_eq!(
        run.expect("should-exit").field("before-stop"),
        Some("false")
    );
    let before = run.expect("wait");
    assert_eq!(before.field("idle"), Some("TimedOut"), "{before:?}");
    assert_eq!(before.field("pending"), Some("Readable"), "{before:?}");
    assert_eq!(before.field("handle-fired"), Some("false"), "{before:?}");
    assert_eq!(run.expect("should-exit").field("after-stop"), Some("true"));
    // The exit notification wins over a readable listener.
    let after = run.expect("wait");
    assert_eq!(after.field("pending"), Some("Exit"), "{after:?}");
    assert_eq!(after.field("handle-fired"), Some("true"), "{after:?}");
    assert!(run
        .expect("upgrade-after-stop")
        .rest
        .contains("kind=Stopped"));
    assert_eq!(run.expect("ready-after-stop").field("ok"), Some("false"));
    run.expect("exit");
    run.expect_all_exited();
}

#[test]
fn listener_survives_three_generations_and_argv_is_identical() {
    let mut run = Run::start("chain", &tcp_env());
    let start = run.expect("start");
    let args = start.field("args").unwrap().to_string();
    let addr: SocketAddr = run.expect("tcp").field("addr").unwrap().parse().unwrap();
    let mut pid = run.expect("ready").pid;
    assert_eq!(ask(addr).unwrap(), pid);
    for _ in 0..3 {
        let new = upgrade_ok(&mut run, pid);
        // The new generation found the port-0 listener under the port it got.
        let tcp = run.expect_from("tcp", new);
        assert_eq!(
            tcp.field("addr").unwrap().parse::<SocketAddr>().unwrap(),
            addr
        );
        let start = run.expect_from("start", new);
        assert_eq!(start.field("args").unwrap(), args, "argv changed");
        assert_eq!(
            run.expect_from("new", new).field("has_parent"),
            Some("true")
        );
        assert_eq!(ask(addr).unwrap(), new);
        pid = new;
    }
    signal(pid, libc::SIGTERM);
    run.expect("exit");
    run.expect_all_exited();
}

#[test]
fn ignored_signals_are_at_their_default_in_the_new_generation() {
    let mut env = tcp_env();
    env.push(("TF_IGNORE_SIGNALS", "1".to_string()));
    let mut run = Run::start("chain", &env);
    let pid = run.expect("ready").pid;
    let new = upgrade_ok(&mut run, pid);
    // SIGPIPE only, which Rust's runtime ignores at start: SIGUSR2 and SIGRTMAX, ignored
    // by the old generation, were reset by the crate between fork and exec.
    let sigpipe = libc::SIGPIPE.to_string();
    let report = run.expect_from("signals", new);
    assert_eq!(report.field("ignored"), Some(sigpipe.as_str()));
    signal(new, libc::SIGTERM);
    run.expect("exit");
    run.expect_all_exited();
}

#[test]
fn concurrent_upgrade_is_refused() {
    let mut run = Run::start("concurrent", &tcp_env());
    let pid = run.expect("ready").pid;
    run.next("hang");
    signal(pid, libc::SIGHUP);
    let child = run.expect_not_from("start", pid);
    signal(pid, libc::SIGHUP);
    let err = run.expect("upgrade-error");
    assert!(err.rest.contains("kind=UpgradeInProgress"), "{err:?}");
    // Cancel the hanging one.
    signal(pid, libc::SIGTERM);
    let err = run.expect("upgrade-error");
    assert!(err.rest.contains("kind=Stopped"), "{err:?}");
    run.expect("exit");
    run.expect_all_exited();
    assert!(!exists(child.pid), "the cancelled child was not reaped");
}

/// A child that fails before ready: the old generation keeps serving with the same fds,
/// leaves no zombie, and the next upgrade works.
#[track_caller]
fn failing_child(mode: &str, expect: &[&str]) {
    let mut run = Run::start(
        "failing",
        &[
            ("TF_TCP", "127.0.0.1:0".into()),
            ("TF_TIMEOUT_MS", "1500".into()),
        ],
    );
    let addr: SocketAddr = run.expect("tcp").field("addr").unwrap().parse().unwrap();
    let ready = run.expect("ready");
    let pid = ready.pid;
    run.next(mode);
    signal(pid, libc::SIGHUP);
    let child = run.expect_not_from("start", pid);
    let err = run.expect("upgrade-error");
    for want in expect {
        assert!(err.rest.contains(want), "{mode}: {err:?} lacks {want}");
    }
    assert!(
        err.rest.contains(&format!("pid_{}", child.pid)),
        "{mode}: the error does not name the child's pid: {err:?}"
    );
    assert_eq!(err.field("children"), Some("0"), "{mode}: zombie left");
    assert!(!exists(child.pid), "{mode}: child {} not reaped", child.pid);
    assert_eq!(
        ask(addr).unwrap(),
        pid,
        "{mode}: old generation stopped serving"
    );
    run.next("");
    let new = upgrade_ok(&mut run, pid);
    assert_eq!(ask(addr).unwrap(), new);
    signal(new, libc::SIGTERM);
    run.expect_all_exited();
}

#[test]
fn child_exiting_cleanly_before_ready() {
    failing_child("exit 0", &["kind=ChildExited", "exit_status:_0"]);
}

#[test]
fn child_exiting_with_error_before_ready() {
    failing_child("exit 3", &["kind=ChildExited", "exit_status:_3"]);
}

#[test]
fn child_killed_by_signal_before_ready() {
    failing_child("abort", &["kind=ChildExited", "signal:_6"]);
}

#[test]
fn hanging_child_is_killed_and_reaped_after_timeout() {
    failing_child("hang", &["kind=Timeout", "1.5s"]);
}

#[test]
fn stop_cancels_an_upgrade() {
    let mut run = Run::start("stop-cancel", &tcp_env());
    let pid = run.expect("ready").pid;
    run.next("hang");
    signal(pid, libc::SIGHUP);
    let child = run.expect_not_from("start", pid);
    signal(pid, libc::SIGTERM);
    assert!(run.expect("upgrade-error").rest.contains("kind=Stopped"));
    run.expect("stopped");
    run.expect("exit");
    run.expect_all_exited();
    assert!(!exists(child.pid));
}

#[test]
fn missing_and_non_executable_binaries_fail_cleanly() {
    let exe_dir = util::scratch_dir("exe");
    let exe = exe_dir.join("server");
    let mut run = Run::start(
        "bad-binary",
        &[
            ("TF_TCP", "127.0.0.1:0".into()),
            ("TF_EXE", exe.display().to_string()),
        ],
    );
    let addr: SocketAddr = run.expect("tcp").field("addr").unwrap().parse().unwrap();
    let pid = run.expect("ready").pid;

    // Missing.
    signal(pid, libc::SIGHUP);
    let err = run.expect("upgrade-error");
    assert!(err.rest.contains("kind=Exec"), "{err:?}");
    assert!(err.rest.contains("No_such_file"), "{err:?}");
    assert!(
        err.rest.contains("server"),
        "the error names the path: {err:?}"
    );
    assert_eq!(ask(addr).unwrap(), pid);

    // Not executable.
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o644)).unwrap();
    signal(pid, libc::SIGHUP);
    let err = run.expect("upgrade-error");
    assert!(err.rest.contains("kind=Exec"), "{err:?}");
    assert!(err.rest.contains("Permission_denied"), "{err:?}");
    assert_eq!(err.field("children"), Some("0"));
    assert_eq!(ask(addr).unwrap(), pid);

    // Fixed: the next upgrade works.
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let new = upgrade_ok(&mut run, pid);
    assert_eq!(ask(addr).unwrap(), new);
    signal(new, libc::SIGTERM);
    run.expect_all_exited();
    let _ = std::fs::remove_dir_all(exe_dir);
}

#[test]
fn ready_writes_the_pid_file_absolute_and_relative() {
    for relative in [false, true] {
        let pid_dir = util::scratch_dir("pidfile");
        let abs = pid_dir.join("app.pid");
        // The relative path resolves against the initial working directory (the run's
        // directory), even after the process changed directory.
        let mut run = Run::start(
            "pidfile",
            &[(
                "TF_PIDFILE",
                if relative {
                    "app.pid".into()
                } else {
                    abs.display().to_string()
                },
            )],
        );
        let path = if relative {
            run.path("app.pid")
        } else {
            abs.clone()
        };
        let pid = run.expect("ready").pid;
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{pid}\n"));
        run.next("chdir");
        let new = upgrade_ok(&mut run, pid);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{new}\n"));
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
        signal(new, libc::SIGTERM);
        run.expect_all_exited();
        let _ = std::fs::remove_dir_all(pid_dir);
    }
}

#[test]
fn unused_inherited_fds_are_closed_and_unix_paths_unlinked_on_ready() {
    let dir = util::scratch_dir("unused");
    let sock = dir.join("s.sock");
    let mut run = Run::start(
        "unused",
        &[
            ("TF_TCP", "127.0.0.1:0".into()),
            ("TF_UNIX", sock.display().to_string()),
        ],
    );
    let addr: SocketAddr = run.expect("tcp").field("addr").unwrap().parse().unwrap();
    run.expect("unix");
    let pid = run.expect("ready").pid;
    assert!(sock.exists());
    run.next("noreq");
    let new = upgrade_ok(&mut run, pid);
    // Nobody took them: the socket file is gone and the TCP port is closed.
    assert!(!sock.exists(), "unused Unix socket path not unlinked");
    assert!(UnixStream::connect(&sock).is_err());
    assert_eq!(
        ask(addr).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused,
        "unused inherited listener still open"
    );
    signal(new, libc::SIGTERM);
    run.expect_all_exited();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn used_unix_path_is_unlinked_on_stop_without_upgrade() {
    let dir = util::scratch_dir("unixstop");
    let sock = dir.join("s.sock");
    let mut run = Run::start("unixstop", &[("TF_UNIX", sock.display().to_string())]);
    run.expect("unix");
    let pid = run.expect("ready").pid;
    assert!(sock.exists());
    signal(pid, libc::SIGTERM);
    run.expect("exit");
    run.expect_all_exited();
    assert!(!sock.exists(), "socket file left behind by stop()");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn unix_path_survives_an_upgrade_and_wrong_kind_leaves_it_in_place() {
    let dir = util::scratch_dir("unixkind");
    let sock = dir.join("s.sock");
    let mut run = Run::start("unixkind", &[("TF_UNIX", sock.display().to_string())]);
    run.expect("unix");
    let pid = run.expect("ready").pid;
    run.next("wrongkind");
    signal(pid, libc::SIGHUP);
    let wrong = run.expect_not_from("wrongkind", pid);
    assert!(wrong.rest.contains("kind=WrongKind"), "{wrong:?}");
    assert_eq!(run.expect("unix-lookup").field("found"), Some("true"));
    run.expect("upgrade-ok");
    let new = run.expect_not_from("ready", pid).pid;
    assert!(sock.exists(), "the path of a passed socket was unlinked");
    wait_gone_or_zombie_of_test(&mut run, pid);
    assert!(
        sock.exists(),
        "the old generation unlinked a passed socket's path"
    );
    signal(new, libc::SIGTERM);
    run.expect_all_exited();
    assert!(!sock.exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn abstract_names_are_never_unlinked() {
    let name = format!("tf-abstract-{}", std::process::id());
    let mut run = Run::start("abstract", &[("TF_ABSTRACT", name.clone())]);
    // A file with the same name in the working directory must survive everything.
    let decoy = run.path(&name);
    std::fs::write(&decoy, "decoy").unwrap();
    let decoy_at = run.path(&format!("@{name}"));
    std::fs::write(&decoy_at, "decoy").unwrap();
    run.expect("unix");
    let pid = run.expect("ready").pid;
    run.next("noreq");
    let new = upgrade_ok(&mut run, pid);
    signal(new, libc::SIGTERM);
    run.expect_all_exited();
    assert!(decoy.exists() && decoy_at.exists(), "a file was unlinked");
}

#[test]
fn abstract_listener_passes_to_the_next_generation() {
    let name = format!("tf-abstract-pass-{}", std::process::id());
    let mut run = Run::start("abstract-pass", &[("TF_ABSTRACT", name.clone())]);
    run.expect("unix");
    let pid = run.expect("ready").pid;
    let new = upgrade_ok(&mut run, pid);
    run.expect_from("unix", new);
    signal(new, libc::SIGTERM);
    run.expect_all_exited();
}

#[test]
fn fd_count_is_stable_over_50_generations() {
    let mut run = Run::start("fdcount", &tcp_env());
    let mut pid = run.expect("ready").pid;
    let addr: SocketAddr = run.expect("tcp").field("addr").unwrap().parse().unwrap();
    // The first generation has no parent; every later one holds one more fd (the pipe
    // that tells it when its parent has exited). Compare them all to the second.
    signal(pid, libc::SIGHUP);
    run.expect("upgrade-ok");
    let second = run.expect_not_from("ready", pid);
    let fds = second.field("fds").unwrap().to_string();
    run.wait_first();
    pid = second.pid;
    for i in 0..50 {
        signal(pid, libc::SIGHUP);
        run.expect_from("upgrade-ok", pid);
        let ready = run.expect_not_from("ready", pid);
        assert_eq!(ready.field("fds").unwrap(), fds, "generation {}", i + 3);
        // A generation refuses to upgrade until its parent has exited.
        wait_gone(pid);
        pid = ready.pid;
    }
    assert_eq!(ask(addr).unwrap(), pid);
    signal(pid, libc::SIGTERM);
    run.expect_all_exited();
}

#[test]
fn fd_count_is_stable_over_50_failed_upgrades() {
    // The first generation runs normally; the children it starts read `exit 1`.
    let mut run = Run::start(
        "fails",
        &[("TF_TCP", "127.0.0.1:0".into()), ("TF_FAILS", "50".into())],
    );
    let fails = run.expect("fails");
    assert_eq!(fails.field("before"), fails.field("after"), "{fails:?}");
    assert_eq!(fails.field("kinds"), Some("ChildExited"));
    assert_eq!(fails.field("children"), Some("0"));
    signal(fails.pid, libc::SIGTERM);
    run.expect_all_exited();
}

#[test]
fn upgrade_is_refused_while_the_parent_is_alive() {
    let mut run = Run::start("parent-alive", &tcp_env());
    let pid = run.expect("ready").pid;
    // The old generation lingers for a while after handing over.
    std::fs::write(run.path("linger"), "3000").unwrap();
    signal(pid, libc::SIGHUP);
    run.expect("upgrade-ok");
    let new = run.expect_not_from("ready", pid).pid;
    signal(new, libc::SIGHUP);
    let err = run.expect("upgrade-error");
    assert!(err.rest.contains("kind=ParentAlive"), "{err:?}");
    assert!(err.rest.contains(&format!("pid_{pid}")), "{err:?}");
    assert!(
        err.rest.contains("Options::upgrade_during_drain"),
        "the error names the option that allows it: {err:?}"
    );
    // Only now: the old generation reads the file when it is told to exit, which may be
    // after the new one is ready.
    std::fs::remove_file(run.path("linger")).unwrap();
    run.wait_first();
    let newer = upgrade_ok(&mut run, new);
    signal(newer, libc::SIGTERM);
    run.expect_all_exited();
}

/// A SO_REUSEPORT group travels whole and in order; asking for more binds the missing
/// sockets on the same port; asking for fewer closes the extras once ready.
#[test]
fn socket_groups_pass_in_order_and_resize() {
    let mut run = Run::start_mode("group", &[("TF_GROUP", "127.0.0.1:0".into())], "group 3");
    let g1 = run.expect("group");
    let port = g1.field("port").unwrap().to_string();
    let inodes1: Vec<String> = g1
        .field("inodes")
        .unwrap()
        .split(',')
        .map(String::from)
        .collect();
    assert_eq!(inodes1.len(), 3);
    let pid = run.expect("ready").pid;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(ask(addr).unwrap(), pid);

    // Same size: the same sockets, in the same order.
    let pid2 = upgrade_ok(&mut run, pid);
    let g2 = run.expect_from("group", pid2);
    assert_eq!(g2.field("port").unwrap(), port);
    assert_eq!(g2.field("inodes").unwrap(), inodes1.join(","));

    // More: the three inherited ones first, then a new one on the same port.
    run.next("group 4");
    let pid3 = upgrade_ok(&mut run, pid2);
    let g3 = run.expect_from("group", pid3);
    let inodes3: Vec<&str> = g3.field("inodes").unwrap().split(',').collect();
    assert_eq!(g3.field("port").unwrap(), port);
    assert_eq!(inodes3.len(), 4);
    assert_eq!(inodes3[..3].join(","), inodes1.join(","));
    assert!(!inodes1.iter().any(|i| i == inodes3[3]));
    for _ in 0..20 {
        assert_eq!(ask(addr).unwrap(), pid3);
    }

    // Fewer: the first two are kept, the other two closed by ready().
    run.next("group 2");
    let ready4 = upgrade_ok_event(&mut run, pid3);
    let pid4 = ready4.pid;
    let g4 = run.expect_from("group", pid4);
    assert_eq!(g4.field("inodes").unwrap(), inodes3[..2].join(","));
    let open: Vec<&str> = ready4.field("sockets").unwrap().split(',').collect();
    for closed in &inodes3[2..] {
        assert!(
            !open.contains(closed),
            "socket {closed} still open in {open:?}"
        );
    }
    for _ in 0..20 {
        assert_eq!(ask(addr).unwrap(), pid4);
    }
    signal(pid4, libc::SIGTERM);
    run.expect_all_exited();
}

/// A new generation that takes the inherited sockets and then gives up by dropping its
/// Upgrader (an error returned from main) must not unlink the socket files the old
/// generation still serves on, nor tell systemd it is stopping.
#[test]
fn a_child_dropping_its_upgrader_before_ready_changes_nothing() {
    let dir = util::scratch_dir("dropfail");
    let sock = dir.join("s.sock");
    let notify_path = dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    let mut run = Run::start(
        "dropfail",
        &[
            ("TF_UNIX", sock.display().to_string()),
            ("NOTIFY_SOCKET", notify_path.display().to_string()),
        ],
    );
    run.expect("unix");
    let pid = run.expect("ready").pid;
    run.next("dropfail");
    signal(pid, libc::SIGHUP);
    run.expect_not_from("dropped", pid);
    let err = run.expect_from("upgrade-error", pid);
    assert!(err.rest.contains("exit_status:_4"), "{err:?}");
    assert!(
        sock.exists(),
        "the failed child unlinked the old generation's socket"
    );
    UnixStream::connect(&sock).expect("the old generation's socket is gone");
    let mut buf = [0u8; 512];
    let mut seen = Vec::new();
    while let Ok(n) = notify.recv(&mut buf) {
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        !seen.iter().any(|m| m.contains("STOPPING")),
        "a child that never became ready said STOPPING=1: {seen:?}"
    );
    signal(pid, libc::SIGTERM);
    run.expect_all_exited();
    assert!(!sock.exists());
    let _ = std::fs::remove_dir_all(dir);
}

/// A pid file in a directory that does not exist is refused by `Upgrader::new`, before
/// anything is bound, naming the path; in a new generation (the directory removed since
/// the first start) the old generation's upgrade fails with that reason, before any
/// commit.
#[test]
fn the_pid_files_directory_is_checked_before_anything_is_bound() {
    let dir = util::scratch_dir("piddir");
    let missing = dir.join("missing").join("app.pid");
    let mut run = Run::start(
        "piddir",
        &[
            ("TF_TCP", "127.0.0.1:0".into()),
            ("TF_PIDFILE", missing.display().to_string()),
        ],
    );
    let err = run.expect("new-error");
    assert!(err.rest.contains("kind=PidFile"), "{err:?}");
    assert!(
        err.rest.contains(&missing.display().to_string()),
        "the error names the path: {err:?}"
    );
    assert!(err.rest.contains("No_such_file"), "{err:?}");
    run.expect_all_exited();
    assert!(!run.seen("tcp"), "a socket was bound before the error");
    drop(run);

    // The directory exists at the first start and is gone at the upgrade.
    let piddir = dir.join("run");
    std::fs::create_dir(&piddir).unwrap();
    let path = piddir.join("app.pid");
    let mut run = Run::start(
        "piddir2",
        &[
            ("TF_TCP", "127.0.0.1:0".into()),
            ("TF_PIDFILE", path.display().to_string()),
        ],
    );
    let addr: SocketAddr = run.expect("tcp").field("addr").unwrap().parse().unwrap();
    let pid = run.expect("ready").pid;
    std::fs::remove_dir_all(&piddir).unwrap();
    signal(pid, libc::SIGHUP);
    let child_err = run.expect_not_from("new-error", pid);
    assert!(child_err.rest.contains("kind=PidFile"), "{child_err:?}");
    let err = run.expect_from("upgrade-error", pid);
    assert!(err.rest.contains("kind=ChildFailed"), "{err:?}");
    assert!(
        err.rest.contains(&path.display().to_string()),
        "the old generation hears the reason: {err:?}"
    );
    assert!(!run.seen("ready"), "{err:?}");
    assert_eq!(ask(addr).unwrap(), pid);
    signal(pid, libc::SIGTERM);
    run.expect_all_exited();
    let _ = std::fs::remove_dir_all(dir);
}

/// `stop()` of the last generation removes the pid file, but only while it names that
/// generation: the old generation of an upgrade leaves its successor's, and a file that
/// names another process (another instance) stays.
#[test]
fn stop_removes_the_pid_file_only_while_it_names_this_process() {
    let dir = util::scratch_dir("pidstop");
    let path = dir.join("app.pid");
    let env = [
        ("TF_TCP", "127.0.0.1:0".to_string()),
        ("TF_PIDFILE", path.display().to_string()),
    ];
    let mut run = Run::start("pidstop", &env);
    let pid = run.expect("ready").pid;
    assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{pid}\n"));
    let new = upgrade_ok(&mut run, pid);
    // The old generation has exited (and stopped): the file names its successor still.
    assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{new}\n"));
    signal(new, libc::SIGTERM);
    run.expect_from("exit", new);
    run.expect_all_exited();
    assert!(
        !path.exists(),
        "stop() left the pid file of the last generation"
    );
    drop(run);

    // Somebody else's pid file, written over ours: left alone.
    let mut run = Run::start("pidstop-other", &env);
    let pid = run.expect("ready").pid;
    std::fs::write(&path, "4194305\n").unwrap();
    signal(pid, libc::SIGTERM);
    run.expect("exit");
    run.expect_all_exited();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "4194305\n");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "app.pid")
        .collect();
    assert!(leftovers.is_empty(), "files left: {leftovers:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The upgrade timeout is one budget for the new generation: the time to report ready
/// plus the time to confirm after the commit, the probation not counted. A new
/// generation ready after 1 s of a 2 s timeout has 1 s left to confirm; stopped
/// (SIGSTOP) for 2.6 s across the commit it is killed for that, and the error says it was
/// the confirmation that was late. (With a timeout for each phase it would have had 2 s
/// after the commit, and taken over.) Unstopped, the same generation takes over although
/// ready + probation (2.5 s) is over the timeout.
#[test]
fn the_upgrade_timeout_is_one_budget_for_ready_and_confirmation() {
    let mut run = Run::start(
        "budget",
        &[
            ("TF_TCP", "127.0.0.1:0".into()),
            ("TF_TIMEOUT_MS", "2000".into()),
            ("TF_PROBATION_MS", "1500".into()),
        ],
    );
    let addr: SocketAddr = run.expect("tcp").field("addr").unwrap().parse().unwrap();
    let pid = run.expect("ready").pid;
    run.next("delay-us 1000000");
    signal(pid, libc::SIGHUP);
    let child = run.expect_not_from("reporting", pid).pid;
    // It has sent R (ready() sends it at once); the commit comes 1.5 s after that.
    std::thread::sleep(std::time::Duration::from_millis(300));
    signal(child, libc::SIGSTOP);
    std::thread::sleep(std::time::Duration::from_millis(2600));
    signal(child, libc::SIGCONT);
    let err = run.expect_from("upgrade-error", pid);
    assert!(err.rest.contains("kind=Timeout"), "{err:?}");
    assert!(
        err.rest.contains("did_not_confirm") && err.rest.contains(&format!("pid_{child}")),
        "the error names the phase and the pid: {err:?}"
    );
    assert!(err.rest.contains("2s"), "{err:?}");
    assert!(!exists(child), "the late child was not reaped");
    assert_eq!(
        ask(addr).unwrap(),
        pid,
        "the old generation stopped serving"
    );

    let new = upgrade_ok(&mut run, pid);
    assert_eq!(ask(addr).unwrap(), new);
    signal(new, libc::SIGTERM);
    run.expect_all_exited();
}

/// After an upgrade the exit notification fires before `upgrade()` returns; a thread
/// that waits on `exit_handle()` (as a tokio task would) learns the new pid from
/// `status()`, recorded before it fired, even in a process that exits as soon as that
/// thread is done (where the upgrading thread's own report may be lost). After `stop()`
/// it learns that there was none.
#[test]
fn a_thread_waiting_on_the_exit_handle_learns_the_new_pid() {
    let mut env = tcp_env();
    env.push(("TF_EXIT_WAITER", "1".into()));
    let mut run = Run::start("exit-waiter", &env);
    let pid = run.expect("ready").pid;
    signal(pid, libc::SIGHUP);
    let waiter = run.expect_from("exit-waiter", pid);
    let new = run.expect_not_from("ready", pid).pid;
    assert_eq!(waiter.field("upgraded"), Some("true"), "{waiter:?}");
    assert_eq!(
        waiter.field("new_pid"),
        Some(new.to_string().as_str()),
        "{waiter:?}"
    );
    wait_gone_or_zombie_of_test(&mut run, pid);
    signal(new, libc::SIGTERM);
    let stopped = run.expect_from("exit-waiter", new);
    assert_eq!(stopped.field("upgraded"), Some("false"), "{stopped:?}");
    assert_eq!(stopped.field("new_pid"), Some("none"), "{stopped:?}");
    run.expect_all_exited();
}
