//! The processes the keeper deals with, as it checks them: a pid from a message becomes
//! a [`Verified`] process only once `/proc` shows it alive and descended from the keeper,
//! and the keeper signals nothing else. A pidfd, taken before the check, keeps the
//! answer true afterwards: a signal through it cannot reach another process that got
//! the pid later, and it tells when the process exits even if the keeper is not its
//! parent.
//!
//! `/proc` must be the one of the keeper's PID namespace (as in a container, or
//! `unshare -pf --mount-proc`): [`check_proc`] refuses to start otherwise.

use std::io;
use std::os::unix::io::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal};

/// The deepest chain of parents followed up to the keeper.
const MAX_DEPTH: usize = 4096;

/// A process the keeper checked: alive and its descendant when it was checked, held by a
/// pidfd (Linux 5.3+) so that it stays that process.
#[derive(Debug)]
pub(super) struct Verified {
    pid: u32,
    pidfd: Option<OwnedFd>,
}

impl Verified {
    /// A child the keeper has just started and not reaped (its pid cannot be reused).
    pub(super) fn child(pid: u32) -> Verified {
        Verified {
            pid,
            pidfd: open(pid).ok(),
        }
    }

    /// `pid` as a live descendant of the keeper (`me`), or why it is not one.
    pub(super) fn check(pid: u32, me: u32) -> Result<Verified, &'static str> {
        if pid == me {
            return Err("the keeper itself");
        }
        // The pidfd first: if the process is still alive after the look at /proc, what
        // /proc said was about this very process.
        let pidfd = match open(pid) {
            Ok(fd) => Some(fd),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Err("no such process"),
            Err(_) => None,
        };
        if !is_descendant(pid, me) {
            return Err("not a descendant of the keeper");
        }
        let v = Verified { pid, pidfd };
        if v.exited() {
            return Err("no longer alive");
        }
        Ok(v)
    }

    pub(super) fn pid(&self) -> u32 {
        self.pid
    }

    /// Readable once the process has exited (where there is a pidfd).
    pub(super) fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|fd| fd.as_fd())
    }

    /// Whether the process has exited (a zombie counts as exited).
    pub(super) fn exited(&self) -> bool {
        match &self.pidfd {
            Some(fd) => {
                let mut p = [PollFd::new(fd, PollFlags::IN)];
                let now = Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                matches!(rustix::event::poll(&mut p, Some(&now)), Ok(n) if n > 0)
            }
            None => !matches!(state(self.pid), Some(s) if s != 'Z'),
        }
    }

    /// Sends `sig`: through the pidfd, else by its (positive, checked) pid.
    pub(super) fn signal(&self, sig: libc::c_int) {
        let Some(sig) = Signal::from_named_raw(sig) else {
            return;
        };
        if let Some(fd) = &self.pidfd {
            let _ = rustix::process::pidfd_send_signal(fd, sig);
        } else if let Some(pid) = Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    /// Waits at most `limit` for the process to exit, then [`reap_or_peek`](Self::reap_or_peek).
    pub(super) fn wait_exit(&self, limit: std::time::Duration) -> Option<ExitStatus> {
        let deadline = crate::sys::os::deadline(Some(limit));
        match &self.pidfd {
            Some(fd) => {
                let _ = crate::sys::os::readable(fd.as_fd(), deadline);
            }
            None => {
                while !self.exited() && crate::sys::os::left(deadline) != Some(Default::default()) {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
        self.reap_or_peek()
    }

    /// How it ended, if it has: from `waitpid` when it is the keeper's child (reaping
    /// it), else from `/proc` while it is a zombie. `None` while it runs.
    pub(super) fn reap_or_peek(&self) -> Option<ExitStatus> {
        if !self.exited() {
            return None;
        }
        let pid = Pid::from_raw(self.pid as i32)?;
        match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG) {
            Ok(Some((_, status))) => Some(ExitStatus::from_raw(status.as_raw())),
            // Not ours to reap: its parent (an older generation) still runs.
            _ => Some(zombie_status(self.pid).unwrap_or(ExitStatus::from_raw(libc::SIGKILL))),
        }
    }
}

/// A pid from a message: a decimal number in `1..=i32::MAX` (what `kill(2)` takes as
/// one process, not a group or every process).
pub(super) fn parse_pid(text: &str) -> Result<u32, &'static str> {
    match text.parse::<u32>() {
        Ok(pid) if (1..=i32::MAX as u32).contains(&pid) && !text.starts_with('+') => Ok(pid),
        _ => Err("not a pid in 1..=2147483647"),
    }
}

fn open(pid: u32) -> io::Result<OwnedFd> {
    let pid = Pid::from_raw(pid as i32).ok_or(io::ErrorKind::InvalidInput)?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// Fields of `/proc/<pid>/stat` after the command name: state is the first.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(String::from).collect())
}

fn state(pid: u32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// The parent pid of `pid`.
pub(super) fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// A zombie's wait status (`exit_code`, field 52 of `/proc/<pid>/stat`, Linux 3.5+).
fn zombie_status(pid: u32) -> Option<ExitStatus> {
    let fields = stat_fields(pid)?;
    if fields.first()? != "Z" {
        return None;
    }
    // Field 52 overall; the list starts at field 3 (state).
    Some(ExitStatus::from_raw(fields.get(49)?.parse().ok()?))
}

/// Whether `pid` descends from `me`: its chain of parents in `/proc` reaches it.
pub(super) fn is_descendant(mut pid: u32, me: u32) -> bool {
    if pid == me || pid == 0 {
        return false;
    }
    for _ in 0..MAX_DEPTH {
        match parent_of(pid) {
            Some(ppid) if ppid == me => return true,
            Some(ppid) if ppid > 1 => pid = ppid,
            _ => return false,
        }
    }
    false
}

/// Every live descendant of `me`, from one pass over `/proc`.
pub(super) fn descendants(me: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: Vec<(u32, u32)> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, parent_of(pid)?)))
        .collect();
    let mut found = vec![me];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(pid, ppid)| *ppid == parent && *pid != me)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// Sends `sig` to every live descendant of `me`, each checked first. Returns how many
/// were signalled.
pub(super) fn signal_descendants(me: u32, sig: libc::c_int) -> usize {
    let mut n = 0;
    for pid in descendants(me) {
        if let Ok(p) = Verified::check(pid, me) {
            p.signal(sig);
            n += 1;
        }
    }
    n
}

/// Checks that `/proc` shows this process under its own pid: the keeper reads its
/// descendants there, and a `/proc` of another PID namespace would name other processes.
pub(super) fn check_proc() -> io::Result<()> {
    let seen = std::fs::read_link("/proc/self")?;
    if seen.to_str().and_then(|s| s.parse::<u32>().ok()) == Some(std::process::id()) {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "/proc is not the one of this PID namespace (/proc/self is {}, this process is \
             pid {}): mount one (unshare --mount-proc, or a container's own /proc)",
            seen.display(),
            std::process::id()
        )))
    }
}
