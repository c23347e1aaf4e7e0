//! What Go tableflip and ecdysis users reach for, with real processes: sockets whose
//! name the kernel chose, `SOCK_SEQPACKET` listeners, stale socket files, the listing of
//! what was inherited, the `$PATH` search, the new generation's working directory.
#![cfg(target_os = "linux")]

mod util;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;

use util::{signal, Run};

#[test]
#[ignore = "entry point of the processes the other tests start"]
fn scenario_entry() {
    if let Ok(name) = std::env::var("TF_SCENARIO") {
        util::scenario(&name);
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
