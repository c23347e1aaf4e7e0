//! Beyond Go tableflip: state handoff, the child's own failure reason, the adoption
//! report, and upgrades while the old generation drains.

mod util;

use std::net::SocketAddr;

use tableflip::{Error, Options, Upgrader, MAX_STATE_SIZE};
use util::{ask, checksum, exited, signal, state_bytes, Run};

#[test]
#[ignore = "entry point of the processes the other tests start"]
fn scenario_entry() {
    if let Ok(name) = std::env::var("TF_SCENARIO") {
        util::scenario(&name);
    }
}

#[test]
fn state_is_handed_to_the_next_generation() {
    const N: usize = 3 << 20;
    let mut run = Run::start(
        "state",
        &[
            ("TF_TCP", "127.0.0.1:0".into()),
            ("TF_STATE_BYTES", N.to_string()),
        ],
    );
    assert_eq!(run.expect("state").rest, "none");
    run.expect("state-set");
    let pid1 = run.expect("ready").pid;

    signal(pid1, libc::SIGHUP);
    run.expect_from("upgrade-ok", pid1);
    let got = run.expect("state");
    let want = state_bytes(pid1, N);
    assert_eq!(got.field("len"), Some(N.to_string().as_str()));
    assert_eq!(got.field("sum"), Some(checksum(&want).to_string().as_str()));
    let pid2 = run.expect_not_from("ready", pid1).pid;
    run.wait_first();

    // A generation that does not read the state is fine.
    run.next("nostate");
    signal(pid2, libc::SIGHUP);
    run.expect_from("upgrade-ok", pid2);
    let ready3 = run.expect_not_from("ready", pid2);
    util::wait_gone(pid2);
    signal(ready3.pid, libc::SIGTERM);
    run.expect_all_exited();
}

#[test]
fn state_size_is_bounded() {
    let _lock = util::fork_lock();
    let upg = Upgrader::new(Options::new()).unwrap();
    let too_big = vec![7u8; MAX_STATE_SIZE as usize + 1];
    match upg.fds().set_state(&too_big) {
        Err(Error::StateTooLarge { size, max }) => {
            assert_eq!(size, MAX_STATE_SIZE + 1);
            assert_eq!(max, 64 << 20);
        }
        other => panic!("expected StateTooLarge, got {other:?}"),
    }
    drop(too_big);
    upg.fds()
        .set_state(&vec![7u8; MAX_STATE_SIZE as usize])
        .unwrap();
    // Nothing was handed to this process.
    assert_eq!(upg.fds().take_state().unwrap(), None);
}

#[test]
fn a_failing_child_reports_its_own_reason() {
    let mut run = Run::start("fail", &[("TF_TCP", "127.0.0.1:0".into())]);
    let addr: SocketAddr = run.expect("tcp").field("addr").unwrap().parse().unwrap();
    let pid = run.expect("ready").pid;
    run.next("fail");
    signal(pid, libc::SIGHUP);
    let child = run.expect_not_from("start", pid);
    let err = run.expect_from("upgrade-error", pid);
    assert!(err.rest.contains("kind=ChildFailed"), "{err:?}");
    assert!(err.rest.contains("config_line_12:_unknown_key"), "{err:?}");
    assert!(err.rest.contains("exit_status:_1"), "{err:?}");
    assert!(err.rest.contains(&format!("pid_{}", child.pid)), "{err:?}");
    assert_eq!(err.field("children"), Some("0"));
    assert_eq!(ask(addr).unwrap(), pid);
    signal(pid, libc::SIGTERM);
    run.expect_all_exited();
}

#[test]
fn ready_reports_taken_and_closed_fds() {
    let dir = util::scratch_dir("adoption");
    let mut run = Run::start(
        "adoption",
        &[
            ("TF_TCP", "127.0.0.1:0".into()),
            ("TF_UNIX", dir.join("s.sock").display().to_string()),
        ],
    );
    let ready1 = run.expect("ready");
    assert_eq!(
        (ready1.field("taken"), ready1.field("closed")),
        (Some("0"), Some("0"))
    );
    signal(ready1.pid, libc::SIGHUP);
    run.expect_from("upgrade-ok", ready1.pid);
    let ready2 = run.expect_not_from("ready", ready1.pid);
    assert_eq!(
        (ready2.field("taken"), ready2.field("closed")),
        (Some("2"), Some("0"))
    );
    run.wait_first();
    run.next("noreq");
    signal(ready2.pid, libc::SIGHUP);
    run.expect_from("upgrade-ok", ready2.pid);
    let ready3 = run.expect_not_from("ready", ready2.pid);
    assert_eq!(
        (ready3.field("taken"), ready3.field("closed")),
        (Some("0"), Some("2"))
    );
    signal(ready3.pid, libc::SIGTERM);
    run.expect_all_exited();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn upgrade_during_drain_lets_three_generations_coexist() {
    let mut run = Run::start(
        "overlap",
        &[("TF_TCP", "127.0.0.1:0".into()), ("TF_OVERLAP", "1".into())],
    );
    let addr: SocketAddr = run.expect("tcp").field("addr").unwrap().parse().unwrap();
    let pid1 = run.expect("ready").pid;
    // The first generation drains for a while after handing over.
    std::fs::write(run.path("linger"), "3000").unwrap();
    signal(pid1, libc::SIGHUP);
    run.expect_from("upgrade-ok", pid1);
    let pid2 = run.expect_not_from("ready", pid1).pid;
    assert!(!exited(pid1));

    // Not refused with ParentAlive: a third generation starts while the first drains.
    signal(pid2, libc::SIGHUP);
    run.expect_from("upgrade-ok", pid2);
    let pid3 = run.expect_not_from("ready", pid2).pid;
    assert!(
        !exited(pid1),
        "the oldest generation should still be draining"
    );
    std::fs::remove_file(run.path("linger")).unwrap();
    assert_eq!(ask(addr).unwrap(), pid3);

    // The oldest drains cleanly and exits with status 0.
    run.expect_from("exit", pid1);
    assert!(run.wait_first().success());
    util::wait_gone(pid2);
    assert_eq!(ask(addr).unwrap(), pid3);
    signal(pid3, libc::SIGTERM);
    run.expect_all_exited();
}
