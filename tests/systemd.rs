//! systemd integration: a real unixgram socket plays systemd's side of the notify
//! protocol, and socket activation passes pre-bound sockets at fd 3.
#![cfg(target_os = "linux")]

mod util;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixSocketAddr, UnixDatagram};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use util::{ask, signal, Run};

#[test]
#[ignore = "entry point of the processes the other tests start"]
fn scenario_entry() {
    if let Ok(name) = std::env::var("TF_SCENARIO") {
        util::scenario(&name);
    }
}

/// Receives the next datagram and the pid of its sender (`SO_PASSCRED`), or panics
/// after the deadline.
#[track_caller]
fn recv_from(sock: &UnixDatagram) -> (String, u32) {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    sock.set_read_timeout(Some(util::DEADLINE)).unwrap();
    let mut buf = [0u8; 4096];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::empty())
        .expect("no notification within the deadline");
    let n = msg.bytes;
    let mut pid = 0;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmCredentials(c) = m {
            pid = c.pid.as_raw_nonzero().get() as u32;
        }
    }
    assert_ne!(pid, 0, "no credentials on the notification");
    (String::from_utf8_lossy(&buf[..n]).into_owned(), pid)
}

/// Receives the next datagram, checking that `sender` sent it.
#[track_caller]
fn recv(sock: &UnixDatagram, sender: u32) -> String {
    let (msg, pid) = recv_from(sock);
    assert_eq!(pid, sender, "{msg:?} came from pid {pid}, not {sender}");
    msg
}

/// Every datagram that arrives within `quiet` of the previous one.
fn drain(sock: &UnixDatagram, quiet: Duration) -> Vec<String> {
    sock.set_read_timeout(Some(quiet)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

fn check_reloading(msg: &str) {
    let mut lines = msg.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"), "{msg:?}");
    let usec: u64 = lines
        .next()
        .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {msg:?}"));
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let now_usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
    assert!(
        usec <= now_usec && now_usec - usec < 60_000_000,
        "{usec} vs {now_usec}"
    );
}

/// The exact notifications, and who sends each, through ready, a successful upgrade, a
/// refused one, a failed one, a successful one again and a stop, with systemd's socket
/// at `target` (`/path` or `@abstract`). Every change of the main pid comes from the
/// main process itself, as `NotifyAccess=main` requires.
fn notify_protocol(sock: UnixDatagram, target: String) {
    rustix::net::sockopt::set_socket_passcred(&sock, true).unwrap();
    let mut run = Run::start(
        "notify",
        &[("TF_TCP", "127.0.0.1:0".into()), ("NOTIFY_SOCKET", target)],
    );
    let pid1 = run.expect("ready").pid;
    assert_eq!(recv(&sock, pid1), format!("MAINPID={pid1}\nREADY=1"));

    // A successful upgrade: RELOADING, then the commit, both from the old generation
    // (the main process). The new one says nothing; the old one never says STOPPING.
    std::fs::write(run.path("linger"), "1500").unwrap();
    signal(pid1, libc::SIGHUP);
    check_reloading(&recv(&sock, pid1));
    // Read before the new generation can be ready: the commit waits until it is read.
    let commit = recv(&sock, pid1);
    let pid2 = run.expect_not_from("ready", pid1).pid;
    assert_eq!(commit, format!("MAINPID={pid2}\nREADY=1"));
    let ok = run.expect_from("upgrade-ok", pid1);
    assert_eq!(ok.field("pid"), Some(pid2.to_string().as_str()));

    // Refused while the old generation drains: the reload is answered at once.
    signal(pid2, libc::SIGHUP);
    check_reloading(&recv(&sock, pid2));
    let refused = recv(&sock, pid2);
    assert!(
        refused.starts_with("READY=1\nSTATUS=upgrade refused: the previous generation"),
        "{refused:?}"
    );
    run.expect("upgrade-error");
    run.wait_first();
    std::fs::remove_file(run.path("linger")).unwrap();

    // A failed upgrade: RELOADING, then this generation is the main pid again, with why.
    run.next("exit 3");
    signal(pid2, libc::SIGHUP);
    check_reloading(&recv(&sock, pid2));
    let failed = recv(&sock, pid2);
    assert!(
        failed.starts_with(&format!("MAINPID={pid2}\nREADY=1\nSTATUS=upgrade failed: ")),
        "{failed:?}"
    );
    assert!(failed.contains("exit status: 3"), "{failed:?}");
    assert_eq!(
        failed.lines().count(),
        3,
        "STATUS= must be one line: {failed:?}"
    );
    run.expect("upgrade-error");

    // The next success clears the status it left.
    run.next("");
    signal(pid2, libc::SIGHUP);
    check_reloading(&recv(&sock, pid2));
    let commit = recv(&sock, pid2);
    let pid3 = run.expect_not_from("ready", pid2).pid;
    assert_eq!(commit, format!("MAINPID={pid3}\nREADY=1\nSTATUS="));
    run.expect_from("upgrade-ok", pid2);

    // A real stop.
    signal(pid3, libc::SIGTERM);
    assert_eq!(recv(&sock, pid3), "STOPPING=1");
    run.expect_all_exited();
    assert!(drain(&sock, Duration::from_millis(200)).is_empty());
}

#[test]
fn notify_protocol_on_a_path() {
    let dir = util::scratch_dir("notify");
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    notify_protocol(sock, path.display().to_string());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn notify_protocol_on_an_abstract_name() {
    let name = format!("tf-notify-{}", std::process::id());
    let addr = UnixSocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    notify_protocol(sock, format!("@{name}"));
}

/// Starts the scenario with `listener` at fd 3 through `sh -c 'LISTEN_PID=... exec'`.
/// The commit waits until systemd has read `MAINPID=` (at most half a second): systemd
/// 252, when `ExecReload=`'s `kill` exits, takes the unit for dead if the old main pid
/// has exited while the `MAINPID=` naming the new one is still unread. Here "systemd"
/// reads nothing for 300 ms after `RELOADING=1`: the old generation's upgrade must not
/// have returned meanwhile (the new one may have taken over: it waits for nothing).
#[test]
fn the_commit_waits_until_systemd_has_read_it() {
    let dir = util::scratch_dir("commitread");
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    rustix::net::sockopt::set_socket_passcred(&sock, true).unwrap();
    let mut run = Run::start(
        "notify",
        &[
            ("TF_TCP", "127.0.0.1:0".into()),
            ("NOTIFY_SOCKET", path.display().to_string()),
        ],
    );
    let pid1 = run.expect("ready").pid;
    assert_eq!(recv(&sock, pid1), format!("MAINPID={pid1}\nREADY=1"));
    signal(pid1, libc::SIGHUP);
    check_reloading(&recv(&sock, pid1));
    let unread = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    run.take_printed();
    // The commit waits at most 500 ms: only a test thread that overslept past that
    // (a loaded machine) may find the upgrade done, which then says nothing.
    assert!(
        !run.seen("upgrade-ok") || unread.elapsed() >= Duration::from_millis(500),
        "the upgrade was done before systemd read its commit"
    );
    let commit = recv(&sock, pid1);
    let pid2 = run.expect_not_from("ready", pid1).pid;
    assert_eq!(commit, format!("MAINPID={pid2}\nREADY=1"));
    run.expect_from("upgrade-ok", pid1);
    run.wait_first();
    signal(pid2, libc::SIGTERM);
    assert_eq!(recv(&sock, pid2), "STOPPING=1");
    run.expect_all_exited();
    let _ = std::fs::remove_dir_all(dir);
}

fn activated(listener: &TcpListener, listen_pid: &str, names: &str) -> Run {
    activated_with(listener, listen_pid, names, &[])
}

fn activated_with(
    listener: &TcpListener,
    listen_pid: &str,
    names: &str,
    extra: &[(&str, String)],
) -> Run {
    let fd = listener.as_raw_fd();
    let script =
        format!("LISTEN_PID={listen_pid} LISTEN_FDS=1 LISTEN_FDNAMES={names} exec \"$0\" \"$@\"");
    let addr = listener.local_addr().unwrap().to_string();
    let mut env = vec![("TF_TCP", addr)];
    env.extend(extra.iter().cloned());
    Run::start_via_shell("activation", &env, &script, move |cmd| {
        // SAFETY: dup2 and fcntl are async-signal-safe; they place the socket at fd 3
        // without FD_CLOEXEC for the shell, which passes it on to the test binary.
        unsafe {
            cmd.pre_exec(move || {
                // dup2(3, 3) would leave FD_CLOEXEC set: clear it by hand then.
                let rc = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if rc == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    })
}

#[test]
fn socket_activation_is_adopted_and_passed_on() {
    // Bound and listening, as systemd's .socket unit would; no SO_REUSEPORT, so the
    // server could not bind the port itself while this socket exists.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let inode = util::socket_inode(listener.as_raw_fd());
    let mut run = activated(&listener, "$$", "web");
    let tcp = run.expect("tcp");
    assert_eq!(
        tcp.field("addr").unwrap().parse::<SocketAddr>().unwrap(),
        addr
    );
    let ready = run.expect("ready");
    assert!(
        ready
            .field("sockets")
            .unwrap()
            .split(',')
            .any(|s| s == inode),
        "the activated socket is not in use: {ready:?}"
    );
    let pid = ready.pid;
    drop(listener);
    assert_eq!(ask(addr).unwrap(), pid);

    // The next generation gets it through tableflip's own table, and no LISTEN_*.
    signal(pid, libc::SIGHUP);
    run.expect_from("upgrade-ok", pid);
    let ready2 = run.expect_not_from("ready", pid);
    assert!(ready2
        .field("sockets")
        .unwrap()
        .split(',')
        .any(|s| s == inode));
    let environ = std::fs::read(format!("/proc/{}/environ", ready2.pid)).unwrap();
    for var in environ.split(|b| *b == 0) {
        assert!(
            !var.starts_with(b"LISTEN_"),
            "{}",
            String::from_utf8_lossy(var)
        );
    }
    run.wait_first();
    let deadline = Instant::now() + util::DEADLINE;
    while ask(addr).unwrap() != ready2.pid {
        assert!(Instant::now() < deadline);
    }
    signal(ready2.pid, libc::SIGTERM);
    run.expect_all_exited();
}

#[test]
fn socket_activation_for_another_pid_is_ignored() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut run = activated(&listener, "1", "web");
    // Not adopted: the server tries to bind the port itself, which is taken.
    let err = run.expect("listen-error");
    assert!(err.rest.contains("kind=Listen"), "{err:?}");
    assert!(err.rest.contains("Address_already_in_use"), "{err:?}");
    let pid = run.expect("ready").pid;
    signal(pid, libc::SIGTERM);
    run.expect_all_exited();
}

#[test]
fn socket_activation_names_that_do_not_match_the_count_are_an_error() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut run = activated(&listener, "$$", "web:extra");
    let err = run.expect("new-error");
    assert!(err.rest.contains("kind=FdTable"), "{err:?}");
    assert!(err.rest.contains("LISTEN_FDNAMES"), "{err:?}");
    assert!(err.rest.contains("LISTEN_FDS"), "{err:?}");
    run.expect_all_exited();
}

/// libsystemd's `sd_listen_fds()` marks the sockets close-on-exec; a process that called
/// it (or a library of its own that did) before `Upgrader::new` still adopts them.
#[test]
fn a_socket_marked_close_on_exec_is_adopted() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let inode = util::socket_inode(listener.as_raw_fd());
    let mut run = activated_with(&listener, "$$", "web", &[("TF_CLOEXEC3", "1".into())]);
    let ready = run.expect("ready");
    assert!(
        ready
            .field("sockets")
            .unwrap()
            .split(',')
            .any(|s| s == inode),
        "the activated socket is not in use: {ready:?}"
    );
    drop(listener);
    assert_eq!(ask(addr).unwrap(), ready.pid);
    signal(ready.pid, libc::SIGTERM);
    run.expect_all_exited();
}

/// One datagram with the fds that came with it (`SCM_RIGHTS`).
#[track_caller]
fn recv_with_fds(sock: &UnixDatagram) -> (String, Vec<std::os::fd::OwnedFd>) {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    sock.set_read_timeout(Some(util::DEADLINE)).unwrap();
    let mut buf = [0u8; 4096];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::empty())
        .expect("no notification within the deadline");
    let n = msg.bytes;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    (String::from_utf8_lossy(&buf[..n]).into_owned(), fds)
}

/// The next datagram that starts with `prefix` (others are skipped), with its fds.
#[track_caller]
fn recv_starting(sock: &UnixDatagram, prefix: &str) -> (String, Vec<std::os::fd::OwnedFd>) {
    loop {
        let (msg, fds) = recv_with_fds(sock);
        if msg.starts_with(prefix) {
            return (msg, fds);
        }
    }
}

/// What the fd store hears: each generation, once it has taken over, stores the sockets
/// it uses (under names that encode their keys) and takes out those it dropped.
#[test]
fn the_fd_store_holds_what_each_generation_uses() {
    let dir = util::scratch_dir("fdstore");
    let path = dir.join("notify.sock");
    let unix = dir.join("app.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut run = Run::start(
        "fdstore",
        &[
            ("TF_TCP", "127.0.0.1:0".into()),
            ("TF_UNIX", unix.display().to_string()),
            ("TF_FD_STORE", "1".into()),
            ("NOTIFY_SOCKET", path.display().to_string()),
        ],
    );
    let addr: SocketAddr = run.expect("tcp").field("addr").unwrap().parse().unwrap();
    let ready = run.expect("ready");
    let tcp_name = format!(
        "FDSTORE=1\nFDNAME=tableflip.tcp,{}",
        addr.to_string().replace(':', "%3A")
    );
    let mut stored = Vec::new();
    for _ in 0..2 {
        let (msg, fds) = recv_starting(&sock, "FDSTORE=1");
        assert_eq!(fds.len(), 1, "{msg:?}");
        stored.push((msg, util::socket_inode(fds[0].as_raw_fd())));
    }
    stored.sort();
    let (tcp_msg, tcp_inode) = stored.iter().find(|(m, _)| m.contains(".tcp,")).unwrap();
    assert_eq!(tcp_msg, &tcp_name);
    assert!(
        ready
            .field("sockets")
            .unwrap()
            .split(',')
            .any(|s| s == tcp_inode),
        "the stored fd is not the listener: {ready:?}"
    );
    let (unix_msg, _) = stored.iter().find(|(m, _)| m.contains(".unix,")).unwrap();
    assert!(
        unix_msg.starts_with("FDSTORE=1\nFDNAME=tableflip.unix,/"),
        "{unix_msg:?}"
    );
    assert!(
        unix_msg.contains("%3A"),
        "the socket file's identity, ':' escaped: {unix_msg:?}"
    );
    assert!(
        !unix_msg["FDSTORE=1\nFDNAME=".len()..].contains(':'),
        "{unix_msg:?}"
    );

    // A generation that takes nothing takes both out of the store.
    run.next("noreq");
    signal(ready.pid, libc::SIGHUP);
    let mut removed: Vec<String> = (0..2)
        .map(|_| recv_starting(&sock, "FDSTOREREMOVE=1").0)
        .collect();
    removed.sort();
    assert_eq!(
        removed[0],
        format!(
            "FDSTOREREMOVE=1\nFDNAME=tableflip.tcp,{}",
            addr.to_string().replace(':', "%3A")
        )
    );
    assert!(removed[1].starts_with("FDSTOREREMOVE=1\nFDNAME=tableflip.unix,/"));
    let new = run.expect_upgrade_result(ready.pid).unwrap();
    signal(new, libc::SIGTERM);
    run.expect_all_exited();
    let _ = std::fs::remove_dir_all(dir);
}

/// A restart with the sockets from the store: found under the keys they were stored as.
#[test]
fn sockets_from_the_fd_store_are_found_under_their_keys() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let inode = util::socket_inode(listener.as_raw_fd());
    let name = format!("tableflip.tcp,{}", addr.to_string().replace(':', "%3A"));
    let mut run = activated(&listener, "$$", &name);
    let ready = run.expect("ready");
    assert!(
        ready
            .field("sockets")
            .unwrap()
            .split(',')
            .any(|s| s == inode),
        "the stored socket is not in use: {ready:?}"
    );
    assert_eq!(ready.field("taken"), Some("1"), "{ready:?}");
    drop(listener);
    assert_eq!(ask(addr).unwrap(), ready.pid);
    signal(ready.pid, libc::SIGTERM);
    run.expect_all_exited();
}

/// `fd_store(false)` turns off the store that systemd offers (`$FDSTORE`); without a call
/// the store follows `$FDSTORE`.
#[test]
fn fd_store_false_turns_off_the_store_systemd_offers() {
    for (refuse, stores) in [(true, false), (false, true)] {
        let dir = util::scratch_dir("fdstore-off");
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let mut env = vec![
            ("TF_TCP", "127.0.0.1:0".to_string()),
            ("FDSTORE", "16".into()),
            ("NOTIFY_SOCKET", path.display().to_string()),
        ];
        if refuse {
            env.push(("TF_FD_STORE", "0".into()));
        }
        let mut run = Run::start("fdstore-off", &env);
        let ready = run.expect("ready");
        // The store is filled before ready() returns.
        let heard = drain(&sock, Duration::from_millis(300));
        assert!(
            heard.iter().any(|m| m.contains("READY=1")),
            "refuse={refuse}: {heard:?}"
        );
        assert_eq!(
            heard.iter().any(|m| m.starts_with("FDSTORE=1")),
            stores,
            "refuse={refuse}: {heard:?}"
        );
        signal(ready.pid, libc::SIGTERM);
        run.expect_all_exited();
        drop(run);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A store that is on with no `$NOTIFY_SOCKET` (nobody to hold the sockets) is named on
/// stderr, once, with why it is on; with `$NOTIFY_SOCKET` nothing is written.
#[test]
fn a_store_nobody_can_hold_is_named_on_stderr() {
    // ($TF_FD_STORE, $FDSTORE, whether $NOTIFY_SOCKET is set, what the line names)
    let cases = [
        (Some("1"), None, false, Some("Options::fd_store(true)")),
        (None, Some("16"), false, Some("$FDSTORE=16")),
        (Some("1"), None, true, None),
    ];
    for case @ (ask, offer, has_notify, warns) in cases {
        let dir = util::scratch_dir("fdstore-warn");
        let notify = dir.join("notify.sock");
        let _sock = UnixDatagram::bind(&notify).unwrap();
        let stderr_path = dir.join("stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut env = vec![("TF_TCP", "127.0.0.1:0".to_string())];
        if let Some(v) = ask {
            env.push(("TF_FD_STORE", v.into()));
        }
        if let Some(v) = offer {
            env.push(("FDSTORE", v.into()));
        }
        if has_notify {
            env.push(("NOTIFY_SOCKET", notify.display().to_string()));
        }
        let mut run = Run::start_with("fdstore-warn", &env, None, |cmd| {
            cmd.stderr(stderr);
            if !has_notify {
                cmd.env_remove("NOTIFY_SOCKET");
            }
        });
        let ready = run.expect("ready");
        signal(ready.pid, libc::SIGTERM);
        run.expect_all_exited();
        drop(run);
        let text = std::fs::read_to_string(&stderr_path).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("tableflip:"))
            .collect();
        match warns {
            Some(why) => {
                assert_eq!(lines.len(), 1, "{case:?}: {text:?}");
                assert!(lines[0].contains(why), "{case:?}: {lines:?}");
                assert!(lines[0].contains("$NOTIFY_SOCKET is not set"), "{lines:?}");
            }
            None => assert!(lines.is_empty(), "{case:?}: {lines:?}"),
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
