//! Processes in a PID namespace of their own (`unshare -pf --mount-proc`), seen from the
//! host: the keeper tests run their keeper there, as PID 1, as in a container.
#![allow(dead_code)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Why a PID namespace cannot be made here, if it cannot: the tests then skip.
pub fn unsupported() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (a PID namespace needs it)".into());
    }
    let ok = Command::new("unshare")
        .args(["-pf", "--mount-proc", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!ok).then(|| "unshare -pf --mount-proc does not work here".into())
}

/// The children of `pid` (every thread's).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// The descendants of `pid`: (host pid, pid in its own namespace, state letter).
pub fn descendants(pid: u32) -> Vec<(u32, u32, char)> {
    let mut out = Vec::new();
    let mut todo = children(pid);
    while let Some(pid) = todo.pop() {
        todo.extend(children(pid));
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let ns = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0);
        let state = status
            .lines()
            .find_map(|l| l.strip_prefix("State:"))
            .and_then(|l| l.trim().chars().next())
            .unwrap_or('?');
        out.push((pid, ns, state));
    }
    out
}

/// Polls `f` until it gives a value; fails the test after `limit`.
#[track_caller]
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
