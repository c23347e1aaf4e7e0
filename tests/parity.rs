//! What Go tableflip and ecdysis users reach for, with real processes: sockets whose
//! name the kernel chose, `SOCK_SEQPACKET` listeners, stale socket files, the listing of
//! what was inherited, the `$PATH` search, the new generation's working directory.
#![cfg(target_os = "linux")]

mod util;

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use tableflip::{Options, Upgrader};
use util::{say, signal, Run};

#[test]
#[ignore = "entry point of the processes the other tests start"]
fn scenario_entry() {
    match std::env::var("TF_SCENARIO").as_deref() {
        Ok("go-upgrader-on-os") => go_generation(),
        Ok(name) => util::scenario(name),
        Err(_) => {}
    }
}

/// Upgrades `pid` and returns the new generation's pid.
#[track_caller]
fn upgrade(run: &mut Run, pid: u32) -> u32 {
    signal(pid, libc::SIGHUP);
    run.expect_upgrade_result(pid)
        .unwrap_or_else(|e| panic!("upgrade failed: {e:?}"))
}

#[test]
fn a_socket_named_by_the_kernel_travels_and_is_found_again_by_an_empty_name() {
    let mut run = Run::start("autobind", &[("TF_AUTOBIND", "1".into())]);
    let first = run.expect("autobind");
    let name = first.field("name").unwrap().to_string();
    assert_eq!(
        name.len(),
        5,
        "Linux autobind names are 5 hex digits: {first:?}"
    );
    assert!(name.bytes().all(|b| b.is_ascii_hexdigit()), "{first:?}");
    let pid = run.expect("ready").pid;
    let new = upgrade(&mut run, pid);
    let second = run.expect_from("autobind", new);
    assert_eq!(second.field("name"), Some(name.as_str()), "{second:?}");
    assert_eq!(
        second.field("inode"),
        first.field("inode"),
        "not the same socket"
    );
    let ready = run.expect_from("ready", new);
    assert_eq!(ready.field("taken"), Some("1"), "{ready:?}");
    signal(new, libc::SIGTERM);
    run.expect_all_exited();
}

#[test]
fn a_seqpacket_listener_travels_with_its_socket_file() {
    let dir = util::scratch_dir("seqpacket");
    let path = dir.join("p.sock");
    let mut run = Run::start("seqpacket", &[("TF_SEQPACKET", path.display().to_string())]);
    let first = run.expect("seqpacket");
    let pid = run.expect("ready").pid;
    let new = upgrade(&mut run, pid);
    let second = run.expect_from("seqpacket", new);
    assert_eq!(
        second.field("inode"),
        first.field("inode"),
        "not the same socket"
    );
    run.wait_first();
    assert!(
        path.exists(),
        "the old generation removed a passed socket's file"
    );
    signal(new, libc::SIGTERM);
    run.expect_all_exited();
    assert!(
        !path.exists(),
        "stop() leaves the socket file of a never-upgraded generation"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A new generation killed before it became ready leaves the socket file it bound; the
/// next one binds there all the same (nobody listens on it), and a live one is kept.
#[test]
fn a_socket_file_left_by_a_killed_generation_does_not_block_the_next() {
    let dir = util::scratch_dir("stale");
    let extra = dir.join("extra.sock");
    let mut run = Run::start(
        "stale",
        &[
            ("TF_TCP", "127.0.0.1:0".into()),
            ("TF_EXTRA_UNIX", extra.display().to_string()),
            ("TF_TIMEOUT_MS", "1500".into()),
        ],
    );
    let pid = run.expect("ready").pid;
    run.next("extra hang-after-listen");
    signal(pid, libc::SIGHUP);
    let hung = run.expect_not_from("extra", pid).pid;
    let err = run.expect_upgrade_result(pid).unwrap_err();
    assert!(err.rest.contains("kind=Timeout"), "{err:?}");
    util::wait_gone(hung);
    assert!(
        extra.exists(),
        "the killed generation's socket file is left behind"
    );
    run.next("extra");
    let new = upgrade(&mut run, pid);
    run.expect_from("extra", new);
    assert!(
        !run.seen("listen-error"),
        "binding over the stale file failed"
    );
    signal(new, libc::SIGTERM);
    run.expect_all_exited();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn what_was_inherited_is_listed_before_ready() {
    let mut run = Run::start("listing", &[("TF_TCP", "127.0.0.1:0".into())]);
    let addr = run.expect("tcp").field("addr").unwrap().to_string();
    let first = run.expect("inherited");
    assert_eq!(
        first.field("list"),
        Some(""),
        "a first start inherits nothing"
    );
    let pid = run.expect("ready").pid;
    signal(pid, libc::SIGHUP);
    let listed = run.expect_not_from("inherited", pid);
    assert_eq!(
        listed.field("list"),
        Some(format!("TCP_listener:{addr}").as_str()),
        "{listed:?}"
    );
    let new = run.expect_upgrade_result(pid).unwrap();
    assert_eq!(new, listed.pid);
    signal(new, libc::SIGTERM);
    run.expect_all_exited();
}

/// `argv[0]` a bare name: the first executable file of that name in `$PATH` runs, as
/// with `execvp`; a non-executable one earlier in `$PATH` is skipped.
#[test]
fn the_path_search_skips_files_that_are_not_executable() {
    let dir = util::scratch_dir("pathsearch");
    let (a, b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(a.join("tf-server"), "not a program").unwrap();
    std::fs::set_permissions(a.join("tf-server"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(std::env::current_exe().unwrap(), b.join("tf-server")).unwrap();
    let path = format!("{}:{}", a.display(), b.display());
    let mut run = Run::start_with(
        "pathsearch",
        &[("TF_TCP", "127.0.0.1:0".into()), ("PATH", path)],
        None,
        |cmd| {
            cmd.arg0("tf-server");
        },
    );
    let pid = run.expect("ready").pid;
    let new = upgrade(&mut run, pid);
    signal(new, libc::SIGTERM);
    run.expect_all_exited();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_vanished_working_directory_is_named_in_the_error() {
    let dir = util::scratch_dir("cwd");
    let cwd = dir.join("gone");
    std::fs::create_dir_all(&cwd).unwrap();
    let cwd_for_child = cwd.clone();
    let mut run = Run::start_with(
        "cwd",
        &[("TF_TCP", "127.0.0.1:0".into())],
        None,
        move |cmd| {
            cmd.current_dir(&cwd_for_child);
        },
    );
    let pid = run.expect("ready").pid;
    std::fs::remove_dir(&cwd).unwrap();
    signal(pid, libc::SIGHUP);
    let err = run.expect_upgrade_result(pid).unwrap_err();
    assert!(err.rest.contains("kind=WorkingDirectory"), "{err:?}");
    assert!(
        err.rest.contains("gone"),
        "the error names the directory: {err:?}"
    );
    assert!(
        err.rest.contains("No_such_file"),
        "and the OS reason: {err:?}"
    );
    assert_eq!(err.field("children"), Some("0"));
    signal(pid, libc::SIGTERM);
    run.expect_all_exited();
    let _ = std::fs::remove_dir_all(dir);
}

/// The names of Go's test pipes.
const NAMES: [&str; 2] = ["zaphod", "beeblebrox"];

/// Go tableflip's `TestUpgraderOnOS` (and its `TestMain`), translated: the first
/// generation passes the write ends of three pipes, upgrades, calls `stop()` and reads
/// them; the new generation writes its pid and the names and exits.
#[test]
fn go_upgrader_on_os() {
    let mut run = Run::start("go-upgrader-on-os", &[]);
    let early = run.expect("upgrade-before-ready");
    assert_eq!(early.field("ok"), Some("false"), "{early:?}");
    let child = run.expect("child-ready").pid;
    let got = run.expect("read");
    assert_eq!(got.field("upgraded"), Some(child.to_string().as_str()));
    assert_eq!(
        got.field("pid"),
        Some(child.to_string().as_str()),
        "{got:?}"
    );
    assert_ne!(
        child,
        run.first_pid(),
        "the child did not run in a new process"
    );
    for name in NAMES {
        assert_eq!(
            got.field(name),
            Some(format!("{name}+eof").as_str()),
            "{name}: no EOF after stop(): {got:?}"
        );
    }
    run.expect_all_exited();
}

/// Both generations of [`go_upgrader_on_os`].
fn go_generation() -> ! {
    // Watchdog: never outlive a minute.
    // SAFETY: alarm(2) only arms a timer.
    unsafe { libc::alarm(60) };
    let upg = Upgrader::new(Options::new()).unwrap();
    if upg.has_parent() {
        // Go's TestMain in the child: write the pid, write the names (left open until
        // this process exits), ready.
        if let Some(fd) = upg.fds().take_named::<OwnedFd>("pid").unwrap() {
            let pid = u64::from(std::process::id());
            std::fs::File::from(fd)
                .write_all(&pid.to_le_bytes())
                .unwrap();
        }
        let mut open = Vec::new();
        for name in NAMES {
            if let Some(fd) = upg.fds().take_named::<OwnedFd>(name).unwrap() {
                let mut file = std::fs::File::from(fd);
                file.write_all(name.as_bytes()).unwrap();
                open.push(file);
            }
        }
        upg.ready().unwrap();
        say("child-ready");
        std::process::exit(0);
    }
    let pipe = || rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
    let (r_pid, w_pid) = pipe();
    upg.fds().add_named("pid", &w_pid).unwrap();
    drop(w_pid);
    let mut readers = Vec::new();
    for name in NAMES {
        let (r, w) = pipe();
        upg.fds().add_named(name, &w).unwrap();
        drop(w);
        readers.push(r);
    }
    say(format!("upgrade-before-ready ok={}", upg.upgrade().is_ok()));
    upg.ready().unwrap();
    let child = upg.upgrade().unwrap();
    // Go: "Close copies of write pipes, so that reads below return EOF."
    upg.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (pid, _) = read_until(&r_pid, 8, deadline);
    let pid = <[u8; 8]>::try_from(pid.as_slice()).map_or(0, u64::from_le_bytes);
    let mut line = format!("read upgraded={child} pid={pid}");
    for (name, r) in NAMES.iter().zip(&readers) {
        let (bytes, eof) = read_until(r, usize::MAX, deadline);
        let eof = if eof { "+eof" } else { "+no-eof" };
        line.push_str(&format!(" {name}={}{eof}", String::from_utf8_lossy(&bytes)));
    }
    say(line);
    std::process::exit(0);
}

/// Reads `fd` until `max` bytes, EOF (`true`) or `deadline`.
fn read_until(fd: &OwnedFd, max: usize, deadline: Instant) -> (Vec<u8>, bool) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut out = Vec::new();
    while out.len() < max {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (out, false);
        }
        let timeout = Timespec {
            tv_sec: left.as_secs() as _,
            tv_nsec: left.subsec_nanos() as _,
        };
        let mut pfd = [PollFd::new(fd, PollFlags::IN)];
        if poll(&mut pfd, Some(&timeout)).unwrap_or(0) == 0 {
            continue;
        }
        let mut buf = [0u8; 64];
        let want = buf.len().min(max - out.len());
        match rustix::io::read(fd.as_fd(), &mut buf[..want]) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return (out, false),
        }
    }
    (out, false)
}
