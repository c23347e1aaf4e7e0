//! The settings of an [`Upgrader`](crate::Upgrader).

use std::fmt;
#[cfg(unix)]
use std::os::unix::io::BorrowedFd;
#[cfg(windows)]
use std::os::windows::io::BorrowedSocket as BorrowedFd;
use std::path::PathBuf;
#[cfg(any(unix, windows))]
use std::sync::Arc;
use std::time::Duration;

/// Called on a socket the registry creates, after `socket()` and before `bind()`
/// ([`Options::before_bind`]).
#[cfg(any(unix, windows))]
pub(crate) type Hook = dyn Fn(BorrowedFd<'_>) -> std::io::Result<()> + Send + Sync;
/// Neither Unix nor Windows: no socket type to hand over, and no `before_bind` to set.
#[cfg(not(any(unix, windows)))]
pub(crate) type Hook = dyn Fn(std::convert::Infallible) -> std::io::Result<()> + Send + Sync;

/// What [`Options::before_bind`] keeps.
pub(crate) type BeforeBind = std::sync::Arc<Hook>;

/// `listen()`'s backlog unless [`Options::backlog`] says otherwise.
#[cfg(unix)]
const BACKLOG: i32 = libc::SOMAXCONN;
/// Not Unix: nothing listens (`sys/unsupported.rs`); any value does.
#[cfg(not(unix))]
const BACKLOG: i32 = 128;

/// Settings for an [`Upgrader`](crate::Upgrader), built with chained calls:
///
/// ```
/// # use std::time::Duration;
/// let options = tableflip::Options::new()
///     .upgrade_timeout(Duration::from_secs(30))
///     .probation(Duration::from_secs(2))
///     .pid_file("/run/myapp.pid");
/// ```
#[derive(Clone)]
pub struct Options {
    pub(crate) upgrade_timeout: Duration,
    pub(crate) probation: Duration,
    pub(crate) pid_file: Option<PathBuf>,
    pub(crate) executable: Option<PathBuf>,
    pub(crate) before_bind: Option<BeforeBind>,
    pub(crate) backlog: i32,
    pub(crate) upgrade_during_drain: bool,
    /// `None`: as `$FDSTORE` says.
    pub(crate) fd_store: Option<bool>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            upgrade_timeout: Duration::from_secs(60),
            probation: Duration::ZERO,
            pid_file: None,
            executable: None,
            before_bind: None,
            backlog: BACKLOG,
            upgrade_during_drain: false,
            fd_store: None,
        }
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("upgrade_timeout", &self.upgrade_timeout)
            .field("probation", &self.probation)
            .field("pid_file", &self.pid_file)
            .field("executable", &self.executable)
            .field("before_bind", &self.before_bind.as_ref().map(|_| "Fn"))
            .field("backlog", &self.backlog)
            .field("upgrade_during_drain", &self.upgrade_during_drain)
            .field("fd_store", &self.fd_store)
            .finish()
    }
}

impl Options {
    /// The defaults: a 60 s upgrade timeout, no probation, no pid file, `argv[0]` as the
    /// executable, a listen backlog of `SOMAXCONN`.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a new generation may take to start and take over. Default: 60 s.
    ///
    /// It is one budget for the new generation's part of the handshake: it runs from
    /// the spawn until the new generation reports ready
    /// ([`Upgrader::ready`](crate::Upgrader::ready)), stops, and runs again from the
    /// commit until the new generation confirms that it has taken over (it writes its
    /// pid file, then confirms: normally a fraction of a millisecond). A new
    /// generation that runs out of it is killed, and
    /// [`upgrade`](crate::Upgrader::upgrade) fails with
    /// [`Error::Timeout`](crate::Error::Timeout), which says which of the two it was
    /// waiting for. One that reports ready with nothing of the budget left is not
    /// committed to.
    ///
    /// Not counted, between the two: the [probation](Options::probation), and, under
    /// systemd (`$NOTIFY_SOCKET`), the wait for room in systemd's queue for the commit's
    /// message (at most 1 s; [`Error::Notify`](crate::Error::Notify) beyond). After the
    /// confirmation `upgrade()` waits, at most 500 ms, until systemd has read that
    /// message (a failed upgrade waits as long, at most, for systemd to read that this
    /// generation is the main one again). So `upgrade()` returns at most the timeout
    /// plus the probation plus 1.5 s after the spawn (without systemd: the timeout plus
    /// the probation), give or take the moment it takes to kill and reap a new
    /// generation that failed.
    pub fn upgrade_timeout(mut self, timeout: Duration) -> Self {
        self.upgrade_timeout = timeout;
        self
    }

    /// How long a new generation that became ready must stay alive before the upgrade
    /// is committed. Default: zero (commit at once, like Go tableflip).
    ///
    /// During the probation both generations serve the shared sockets, and the old one
    /// watches the new one. If the new one dies (a panic on its first request, a
    /// configuration value read lazily), [`Upgrader::upgrade`](crate::Upgrader::upgrade)
    /// fails with [`Error::ChildDiedAfterReady`](crate::Error::ChildDiedAfterReady) and
    /// this generation carries on as if nothing happened: same pid file, same systemd
    /// main pid, same fds, and the next upgrade may be tried. Once the window has
    /// passed, the upgrade is committed and this generation is told to exit.
    ///
    /// The new generation's [`ready`](crate::Upgrader::ready) returns at the commit, so
    /// it must start serving *before* calling it (as the examples do). A probation
    /// makes every upgrade take that much longer: a second or two catches most deploys
    /// that crash on the first traffic.
    pub fn probation(mut self, window: Duration) -> Self {
        self.probation = window;
        self
    }

    /// A file that [`Upgrader::ready`](crate::Upgrader::ready) writes this process's pid
    /// to (atomically). A relative path is resolved against the working directory at
    /// [`Upgrader::new`](crate::Upgrader::new). Its directory must be one that only root
    /// and this process's user can write to (`/run/NAME`, `$XDG_RUNTIME_DIR`, not
    /// `/tmp`): otherwise [`Upgrader::new`](crate::Upgrader::new) fails with
    /// [`Error::PidFile`](crate::Error::PidFile), before anything is bound.
    /// [`Upgrader::stop`](crate::Upgrader::stop) (or the drop) of the last generation
    /// removes it, if it still names that process.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// The executable to start for the next generation. By default it is `argv[0]`,
    /// resolved at upgrade time against the initial working directory and `$PATH`, so
    /// a binary replaced on disk (by rename) is what runs next.
    pub fn executable(mut self, path: impl Into<PathBuf>) -> Self {
        self.executable = Some(path.into());
        self
    }

    /// A function called on every socket the registry creates, after `socket()` and
    /// before `bind()`: set `SO_REUSEPORT`, buffer sizes, `IPV6_V6ONLY`, ... (Go's
    /// `ListenConfig`). Wrap the fd with `socket2::SockRef::from(&fd)` for a typed API.
    ///
    /// On Windows, where nothing is ever bound, `f` takes a `BorrowedSocket` instead, so
    /// that the same closure compiles there.
    #[cfg(any(unix, windows))]
    pub fn before_bind(
        mut self,
        f: impl Fn(BorrowedFd<'_>) -> std::io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.before_bind = Some(Arc::new(f));
        self
    }

    /// Allows [`Upgrader::upgrade`](crate::Upgrader::upgrade) while the previous
    /// generation is still draining.
    ///
    /// By default a generation refuses to upgrade until its parent has exited
    /// ([`Error::ParentAlive`](crate::Error::ParentAlive)), so there are never more than
    /// two generations, and at most one of them not ready. A drain that waits on
    /// long-lived connections then blocks every deploy for as long as they last. With
    /// this option the upgrade goes ahead: the draining generation has already handed
    /// over its listeners, so a third process costs only its memory, and each old
    /// generation keeps draining and exits on its own. The price: three (or more)
    /// generations can run at once, and a chain of quick upgrades can pile up old ones.
    /// Bound your drain time.
    pub fn upgrade_during_drain(mut self, allow: bool) -> Self {
        self.upgrade_during_drain = allow;
        self
    }

    /// Keeps the listening and datagram sockets in systemd's fd store, so that they
    /// outlive every generation: if the serving one dies (OOM killer, `kill -9`, a crash
    /// after the handoff), systemd restarts the service (`Restart=`) on the same sockets,
    /// and connections wait in their queues instead of being refused. Needs
    /// `FileDescriptorStoreMax=` in the unit (and `$NOTIFY_SOCKET`).
    ///
    /// Unless this is called, the store is on when systemd sets `$FDSTORE` to a number
    /// above zero (systemd 254 and later, from `FileDescriptorStoreMax=`; the
    /// [keeper](crate::Keeper) sets it too) and off otherwise. `fd_store(true)` turns it
    /// on, `fd_store(false)` off, whatever `$FDSTORE` says. (A command-line flag that
    /// asks for the store should call `fd_store(true)` when it is given, and nothing
    /// when it is not.)
    ///
    /// A store that is on while `$NOTIFY_SOCKET` is not set (nobody could hold the
    /// sockets) makes [`Upgrader::new`](crate::Upgrader::new) write one line to stderr,
    /// `tableflip: ...`, saying so and why the store is on; it does nothing else. systemd
    /// 253 and older set no `$FDSTORE`, and a unit without `FileDescriptorStoreMax=`
    /// drops what it is sent: that cannot be seen from here.
    ///
    /// Each generation, once it has taken over, sends its sockets with `FDSTORE=1` under
    /// a name that encodes its registry key (`FDNAME=tableflip.tcp,[::1]%3A80`), and takes
    /// those it inherited but no longer uses out of the store (`FDSTOREREMOVE=1`). A
    /// fresh start with sockets from the store adopts them under those keys, next to the
    /// sockets of a socket unit. A key whose name would be over systemd's 255 bytes (a
    /// Unix path of some 240 bytes) is not stored.
    pub fn fd_store(mut self, keep: bool) -> Self {
        self.fd_store = Some(keep);
        self
    }

    /// The backlog passed to `listen()` for listeners the registry creates.
    /// Default: `SOMAXCONN` (the kernel caps it at `net.core.somaxconn`).
    pub fn backlog(mut self, backlog: i32) -> Self {
        self.backlog = backlog;
        self
    }
}
