//! Runs the main package's `upgrade_check` example against a server, in a process group
//! of its own with a watchdog: for tests/upgrade_check.rs, and for the tokio example's
//! tests (tokio-example/tests/axum_server.rs). Include this file beside
//! util/examples.rs, which must be the module `util`.

use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::util;

/// A run that takes longer than this is killed, and the test fails.
const WATCHDOG: Duration = Duration::from_secs(240);

/// A process started in a new process group (which every process it starts joins),
/// killed as a group on drop or when the watchdog fires.
struct Group {
    child: Child,
    waited: bool,
    _watchdog: mpsc::Sender<()>,
}

impl Group {
    fn spawn(cmd: &mut Command) -> Group {
        std::os::unix::process::CommandExt::process_group(cmd, 0);
        let child = cmd.spawn().expect("cannot start upgrade_check");
        let pgid = child.id() as i32;
        let (tx, rx) = mpsc::channel::<()>();
        thread::spawn(move || {
            // The sender is dropped with the Group: then this returns Disconnected.
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(WATCHDOG) {
                eprintln!("watchdog: killing process group {pgid} after {WATCHDOG:?}");
                kill_group(pgid);
            }
        });
        Group {
            child,
            waited: false,
            _watchdog: tx,
        }
    }

    /// Waits for the leader to exit, kills whatever it left in the group, and reaps it.
    fn wait(&mut self) -> ExitStatus {
        // Without reaping: until then the zombie leader keeps the group id ours.
        loop {
            // SAFETY: all-zero bytes are a valid siginfo_t.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid with a valid pointer to a siginfo_t.
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    self.child.id() as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if rc == 0 || std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
                break;
            }
        }
        kill_group(self.child.id() as i32);
        self.waited = true;
        self.child.wait().expect("reap upgrade_check")
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.waited {
            kill_group(self.child.id() as i32);
            let _ = self.child.wait();
        }
    }
}

fn kill_group(pgid: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions. The group is ours: its leader
    // is our child and has not been reaped (see `Group::wait`).
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
}

/// Runs upgrade_check against the binary `server` (20 upgrades under load, 4 clients,
/// then `args`), checks that it passed, and returns its summary.
pub fn upgrade_check(server: &Path, args: &[&str]) -> String {
    let _lock = util::lock();
    let mut cmd = Command::new(util::example_of("tableflip", "upgrade_check"));
    cmd.arg("--server")
        .arg(server)
        .args(["--upgrades", "20", "--clients", "4"])
        .args(args)
        .args(["--time-limit", "200"])
        // Pid files and server copies on tmpfs when there is one: an fsync of the pid
        // file on a disk busy with other work can stall an upgrade for seconds.
        .env("TMPDIR", tmpdir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut group = Group::spawn(&mut cmd);

    let mut stderr = group.child.stderr.take().unwrap();
    let progress = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut summary = String::new();
    let _ = group
        .child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut summary);
    let status = group.wait();
    let progress = progress.join().unwrap();
    eprintln!("{progress}{summary}");
    assert!(
        status.success(),
        "upgrade_check failed ({status}):\n{progress}{summary}"
    );
    assert!(summary.contains("result: PASS"), "{summary}");
    summary
}

fn tmpdir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.into()
    } else {
        std::env::temp_dir()
    }
}
