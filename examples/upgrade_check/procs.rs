//! Processes: waiting with a deadline, signals, reaping as the child subreaper, and
//! reading the process tree and fd counts from `/proc`.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::{Res, STEP_TIMEOUT};

/// The end of the run: `--time-limit` from the start, or a SIGINT/SIGTERM.
pub struct Limits {
    pub deadline: Instant,
    pub interrupted: Arc<AtomicBool>,
}

pub static LIMITS: OnceLock<Limits> = OnceLock::new();
pub static START: OnceLock<Instant> = OnceLock::new();

pub fn now_us() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

pub fn micros(us: u64) -> Duration {
    Duration::from_micros(us)
}

/// Polls `f` every `every` until it returns `Ok(Some)`, fails, or `timeout` passes.
/// Reaps exited children on the way, and gives up when the run is interrupted or out of
/// time.
///
/// `f` looks before the reaping: reaping a generation can take the kernel a second or
/// more (it walks the `/proc/<pid>` dentries, which grow with every thread a
/// thread-per-connection server has had, and with every look at them), and that time
/// must not count as the server's.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Res<Option<T>>,
) -> Res<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        reap_all();
        if let Some(limits) = LIMITS.get() {
            if limits.interrupted.load(SeqCst) {
                return Err(format!("interrupted while waiting for {what}"));
            }
            if Instant::now() >= limits.deadline {
                return Err(format!("time limit reached while waiting for {what}"));
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        thread::sleep(every);
    }
}

pub fn signal(pid: u32, sig: i32) -> Res<()> {
    // SAFETY: kill(2) has no memory-safety preconditions. `pid` is a generation this
    // program has not reaped, so the number cannot have been reused.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } == 0 {
        Ok(())
    } else {
        Err(format!(
            "kill({pid}, {sig}): {}",
            io::Error::last_os_error()
        ))
    }
}

/// Makes this process the reaper of orphaned descendants: each generation is
/// reparented here when its parent, the previous generation, exits.
pub fn become_subreaper() -> Res<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) };
        if rc != 0 {
            return Err(format!(
                "prctl(PR_SET_CHILD_SUBREAPER): {}",
                io::Error::last_os_error()
            ));
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    Err("upgrade_check runs on Linux only (it follows processes in /proc)".into())
}

/// Wait statuses of the children reaped so far.
pub static REAPED: Mutex<BTreeMap<u32, i32>> = Mutex::new(BTreeMap::new());

/// Reaps every child that has exited, keeping its status.
pub fn reap_all() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid pointer to an int.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        lock(&REAPED).insert(pid as u32, status);
    }
}

/// The wait status of `pid`, which has exited (all threads): `Ok(None)` if it is not
/// this program's child to reap.
pub fn wait_reaped(pid: u32) -> Res<Option<i32>> {
    wait_for(
        &format!("pid {pid} to be reaped"),
        STEP_TIMEOUT,
        Duration::from_millis(1),
        || {
            if let Some(&status) = lock(&REAPED).get(&pid) {
                return Ok(Some(Some(status)));
            }
            let mut status = 0;
            // SAFETY: waitpid with a valid pointer to an int.
            let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
            if rc == pid as libc::pid_t {
                lock(&REAPED).insert(pid, status);
                Ok(Some(Some(status)))
            } else if rc < 0 {
                Ok(Some(None)) // ECHILD: someone else's child
            } else {
                Ok(None)
            }
        },
    )
}

/// Pids this program reaped that were not generations of a server.
pub fn reaped_strays(generations: &[u32]) -> Vec<String> {
    lock(&REAPED)
        .iter()
        .filter(|(pid, _)| !generations.contains(pid))
        .map(|(pid, &status)| format!("{pid} ({})", status_text(Some(status))))
        .collect()
}

pub fn status_text(status: Option<i32>) -> String {
    match status {
        None => "an unknown status (not our child)".into(),
        Some(s) if libc::WIFEXITED(s) => format!("exit status {}", libc::WEXITSTATUS(s)),
        Some(s) if libc::WIFSIGNALED(s) => format!("signal {}", libc::WTERMSIG(s)),
        Some(s) => format!("wait status {s:#x}"),
    }
}

/// Whether `pid` has exited: gone, or every thread a zombie (an orphan waits for its
/// reaper; a zombie main thread can hide threads that still run).
pub fn exited(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks
        .flatten()
        .all(|t| matches!(task_state(&t.path()), None | Some('Z' | 'X')))
}

/// The state letter in a `/proc/.../stat` file, after the parenthesised command name.
pub fn task_state(dir: &Path) -> Option<char> {
    let stat = fs::read_to_string(dir.join("stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The children of `pid`, from every thread.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(list) = fs::read_to_string(t.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = children(pid);
    while let Some(p) = todo.pop() {
        todo.extend(children(p));
        out.push(p);
    }
    out
}

/// What is left besides the server's current generation: its children (zombies or
/// strays) and anything else reparented to this program.
pub fn strays(current: u32) -> Vec<String> {
    reap_all();
    descendants(std::process::id())
        .into_iter()
        .filter(|&p| p != current)
        .map(describe_process)
        .collect()
}

pub fn describe_process(pid: u32) -> String {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let comm = fs::read_to_string(dir.join("comm")).unwrap_or_default();
    let state = task_state(&dir).unwrap_or('?');
    format!("{pid} ({}, state {state})", comm.trim())
}

pub fn fd_count(pid: u32) -> Option<usize> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Marks close-on-exec every fd above stderr that this program inherited (from a shell,
/// a test harness): the servers it starts get stdin, stdout and stderr only, so the fd
/// counts it reports are the server's own, wherever it runs.
pub fn withhold_inherited_fds() -> Res<()> {
    let dir = fs::read_dir("/proc/self/fd").map_err(|e| format!("/proc/self/fd: {e}"))?;
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if fd > 2 {
            // SAFETY: F_SETFD on an fd number touches no memory; an fd that is not open
            // (the directory's own, closed by now) fails with EBADF, which is ignored.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
    Ok(())
}

/// SIGKILLs every descendant until none is left. Only this program's own children are
/// signalled (their pids cannot be reused before they are reaped); grandchildren are
/// reparented here as their parents die, and signalled in the next round.
pub fn kill_descendants() {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        reap_all();
        let children = children(std::process::id());
        if children.is_empty() || Instant::now() >= deadline {
            return;
        }
        for pid in children {
            let _ = signal(pid, libc::SIGKILL);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A temporary directory for the server copies; on drop, every process left is killed
/// and the directory removed.
pub struct Workspace(PathBuf);

impl Workspace {
    pub fn new() -> Res<Workspace> {
        let path = std::env::temp_dir().join(format!("upgrade_check-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
        Ok(Workspace(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        kill_descendants();
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
