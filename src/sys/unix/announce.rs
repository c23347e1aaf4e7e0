//! What a generation tells the world, in one place: the pid file, systemd (or a keeper)
//! through its notify socket, and the fd store. One method per event of a generation's
//! life, in the order they happen:
//!
//! | event | pid file | notify socket |
//! |---|---|---|
//! | [`took_over`](Announcer::took_over) (`ready()`) | names this process | `MAINPID=`, `READY=1` when alone; the fd store follows |
//! | [`reloading`](Announcer::reloading) (`upgrade()` starts) | | `RELOADING=1` |
//! | [`refused`](Announcer::refused) (an upgrade refused, its parent alive) | | `RELOADING=1`, `READY=1`, `STATUS=` |
//! | [`spawned`](Announcer::spawned) (the child runs) | | the successor, to a keeper |
//! | [`committing`](Announcer::committing) | | `MAINPID=<child>`, `READY=1` |
//! | [`committed`](Announcer::committed) (the child confirmed) | the child's | waits until read |
//! | [`rolled_back`](Announcer::rolled_back) (the upgrade failed) | this process's again | `MAINPID=` self, `READY=1`, `STATUS=` |
//! | [`stopping`](Announcer::stopping) (`stop()`, never upgraded) | removed if it names us | `STOPPING=1` |
//! | [`extend_stop`](Announcer::extend_stop) (a [`Drain`](crate::Drain) ticks, after `stopping`) | | `EXTEND_TIMEOUT_USEC=` |
//!
//! Nothing here blocks, except the commit's wait for room in the notify socket's queue
//! and for systemd to read it (see [`Notifier`]).

use std::io;
use std::os::unix::io::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::sys::handshake::Parent;
use crate::sys::pidfile;
use crate::sys::registry::Registry;
use crate::sys::systemd::{self, Notifier};
use crate::sys::wire::{Extra, Key};

/// The owner of everything a generation tells the world.
#[derive(Debug)]
pub(crate) struct Announcer {
    /// Absolute, resolved against the initial working directory.
    pid_file: Option<PathBuf>,
    /// systemd's (or a keeper's) notify socket, if `$NOTIFY_SOCKET` was set at start.
    notify: Option<Notifier>,
    /// Keep the sockets in the fd store.
    fd_store: bool,
    /// Set once this generation, the main one, told systemd it stops: only then may it
    /// ask for more time (after a commit the new generation is the main one).
    stopping: AtomicBool,
}

impl Announcer {
    pub(crate) fn new(pid_file: Option<PathBuf>, notify: Option<Notifier>, fd_store: bool) -> Self {
        Announcer {
            pid_file,
            notify,
            fd_store,
            stopping: AtomicBool::new(false),
        }
    }

    /// Whether a notify socket was given (`$NOTIFY_SOCKET`).
    pub(crate) fn has_notify(&self) -> bool {
        self.notify.is_some()
    }

    /// Nobody to tell anything: a standalone `Upgrader`.
    pub(crate) fn silent() -> Self {
        Announcer::new(None, None, false)
    }

    /// The pid file's directory, checked before anything is bound: it exists, and no
    /// other user can write to it.
    pub(crate) fn check(&self, parent: Option<&Parent>) -> Result<()> {
        match &self.pid_file {
            Some(path) => pidfile::check_dir(path).map_err(|e| pid_file_failed(parent, path, e)),
            None => Ok(()),
        }
    }

    /// This generation takes over (`ready()`): the pid file names it, and systemd hears
    /// its pid from itself when nobody committed to it (`alone`: a first start, or a
    /// parent that died undecided). A pid file that cannot be written fails the
    /// takeover, and the parent is told why (it rolls back).
    pub(crate) fn took_over(&self, alone: bool, parent: Option<&Parent>) -> Result<()> {
        if let Some(path) = &self.pid_file {
            pidfile::write(path, std::process::id())
                .map_err(|e| pid_file_failed(parent, path, e))?;
        }
        if let Some(n) = self.notify.as_ref().filter(|_| alone) {
            n.ready_alone();
        }
        Ok(())
    }

    /// The fd store follows this generation, once it has closed what it did not take:
    /// what it closed out, what it uses in (in that order: a socket group that shrank
    /// keeps its name).
    pub(crate) fn stored(&self, registry: &Registry, closed: &[(Key, Extra)]) {
        let Some(n) = self.notify.as_ref().filter(|_| self.fd_store) else {
            return;
        };
        let mut gone: Vec<String> = closed
            .iter()
            .filter_map(|(key, extra)| systemd::store_name(key, *extra))
            .collect();
        gone.sort();
        gone.dedup();
        for name in &gone {
            n.unstore(name);
        }
        registry.with_passed(|passed| {
            let kept: Vec<(String, BorrowedFd<'_>)> = passed
                .iter()
                .filter_map(|(fd, key, extra)| Some((systemd::store_name(key, *extra)?, *fd)))
                .collect();
            n.store(&kept);
        });
    }

    /// An upgrade starts.
    pub(crate) fn reloading(&self) {
        if let Some(n) = &self.notify {
            n.reloading();
        }
    }

    /// An upgrade was refused because this generation's parent still runs: systemd
    /// hears why (an `ExecReload=` waiting on it would otherwise see nothing).
    pub(crate) fn refused(&self, why: &Error) {
        if let (Some(n), Error::ParentAlive { .. }) = (&self.notify, why) {
            n.refused(why);
        }
    }

    /// The child runs: a keeper hears which process may follow this one.
    pub(crate) fn spawned(&self, child: u32) {
        if let Some(n) = &self.notify {
            n.announce(child);
        }
    }

    /// The commit: systemd hears the new main pid from this process, still its main one.
    pub(crate) fn committing(&self, child: u32) -> Result<()> {
        match &self.notify {
            Some(n) => n.commit(child),
            None => Ok(()),
        }
    }

    /// The child confirmed: this generation does not go before systemd has read who
    /// follows it (see `Notifier::wait_commit_read`).
    pub(crate) fn committed(&self) {
        if let Some(n) = &self.notify {
            n.wait_commit_read();
        }
    }

    /// The upgrade failed: whatever the commit told the world, this generation is the
    /// main one. `after_commit`: the child may have written its pid file before it died.
    pub(crate) fn rolled_back(&self, why: &Error, after_commit: bool) {
        if let Some(path) = self.pid_file.as_ref().filter(|_| after_commit) {
            let _ = pidfile::write(path, std::process::id());
        }
        if let Some(n) = &self.notify {
            n.upgrade_failed(why);
        }
    }

    /// `stop()` of a generation that never upgraded: `was_ready`, it served and wrote
    /// its pid file, which goes if it still names this process; systemd hears it stops.
    pub(crate) fn stopping(&self, was_ready: bool) {
        if !was_ready {
            return;
        }
        if let Some(path) = &self.pid_file {
            let _ = pidfile::remove_if_names(path, std::process::id());
        }
        if let Some(n) = &self.notify {
            n.stopping();
            self.stopping.store(true, Ordering::SeqCst);
        }
    }

    /// This generation, the main one, drains at a stop and asks for `time` more from
    /// now (`EXTEND_TIMEOUT_USEC=`). `false` (nothing sent) unless it has told systemd
    /// it stops: not after a handover, nor without a notify socket.
    pub(crate) fn extend_stop(&self, time: Duration) -> bool {
        match &self.notify {
            Some(n) if self.stopping.load(Ordering::SeqCst) => {
                n.extend_timeout(time);
                true
            }
            _ => false,
        }
    }
}

/// The pid file at `path` cannot be checked or written: the error, which the previous
/// generation (if any) is also told as the reason this one gives up.
fn pid_file_failed(parent: Option<&Parent>, path: &Path, source: io::Error) -> Error {
    let err = Error::PidFile {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = parent {
        parent.fail(&err.to_string());
    }
    err
}
