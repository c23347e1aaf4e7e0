//! [`Upgrader`]: one per process, the story of a generation. Its life on Unix is in
//! `sys/unix/generation.rs`; where upgrades are unsupported, [`Upgrader::new`] fails.

use std::fmt;
use std::time::Duration;

use crate::adoption::Adoption;
use crate::error::Result;
use crate::exit::Exit;
#[cfg(unix)]
use crate::exit::Incoming;
use crate::fds::Fds;
#[cfg(unix)]
use crate::kinds::Accept;
use crate::options::Options;
use crate::status::Status;

/// Runs graceful upgrades for this process: Go tableflip's `Upgrader`.
///
/// Create one early in `main` with [`Upgrader::new`], get your sockets from
/// [`fds`](Upgrader::fds), start serving ([`incoming`](Upgrader::incoming) accepts until
/// it is time to go), call [`ready`](Upgrader::ready), call [`upgrade`](Upgrader::upgrade)
/// (from a signal-handling thread, say) to start the next generation, and exit once the
/// [exit notification](Upgrader::exit) has fired and your work in flight is done.
///
/// Every method takes `&self`, so an `Upgrader` can be shared through an `Arc`.
/// Dropping it is [`stop`](Upgrader::stop).
pub struct Upgrader(pub(crate) crate::sys::Generation);

impl fmt::Debug for Upgrader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Upgrader {
    /// Creates the process's `Upgrader`, adopting the fds passed by the previous
    /// generation when this process is an upgrade child (or, on a first start, the
    /// sockets of systemd's socket activation).
    ///
    /// Fails with [`Error::AlreadyCreated`](crate::Error::AlreadyCreated) while another
    /// `Upgrader` is alive, and with [`Error::FdTable`](crate::Error::FdTable) when the
    /// inherited fd table is malformed or names an fd that is not open or was not
    /// inherited. A table addressed to another process (one this process merely
    /// inherited) is ignored: this is then a fresh start. Fails with
    /// [`Error::PidFile`](crate::Error::PidFile) when the [pid file](Options::pid_file)'s
    /// directory does not exist, or other users can write to it: now, before the
    /// application binds or serves anything (in a new generation, the previous
    /// generation's `upgrade()` then fails with this as the reason). Writes one line to
    /// stderr when the [fd store](Options::fd_store) is on and nobody can hold it. Where
    /// upgrades are unsupported (not Unix) it fails with
    /// [`Error::Unsupported`](crate::Error::Unsupported).
    ///
    /// Call it early: the working directory and `argv` it sees are the ones the next
    /// generation gets.
    pub fn new(options: Options) -> Result<Upgrader> {
        crate::sys::Generation::new(options).map(Upgrader)
    }

    /// An `Upgrader` for tests of code that takes one (Go's `tableflip/testing`): any
    /// number of them may exist at once, in parallel test threads, next to the process's
    /// own. It inherits nothing (every socket is bound fresh), tells the world nothing
    /// (no pid file, nothing to systemd), and never starts a process:
    /// [`upgrade`](Upgrader::upgrade) succeeds at once, as if a new generation had taken
    /// over, and returns this process's own pid, so that the code under test drains and
    /// ends as it would after a real upgrade.
    ///
    /// ```
    /// use std::net::TcpListener;
    ///
    /// // The code under test: serves until the upgrader says to go.
    /// fn serve(upg: &tableflip::Upgrader, listener: &TcpListener) -> usize {
    ///     upg.incoming(listener).count()
    /// }
    ///
    /// # fn main() -> tableflip::Result<()> {
    /// // In a #[test]:
    /// let upg = tableflip::Upgrader::standalone(tableflip::Options::new())?;
    /// let listener: TcpListener = upg.fds().listen("127.0.0.1:0")?;
    /// upg.ready()?;
    /// std::thread::scope(|s| {
    ///     let server = s.spawn(|| serve(&upg, &listener));
    ///     let _client = std::net::TcpStream::connect(listener.local_addr().unwrap());
    ///     std::thread::sleep(std::time::Duration::from_millis(50));
    ///     upg.upgrade().unwrap(); // the server stops accepting
    ///     assert_eq!(server.join().unwrap(), 1);
    /// });
    /// assert!(upg.exit().upgraded());
    /// # Ok(())
    /// # }
    /// ```
    pub fn standalone(options: Options) -> Result<Upgrader> {
        crate::sys::Generation::standalone(options).map(Upgrader)
    }

    /// The fd registry: listen on, inherit and add the sockets that travel to the next
    /// generation, and the [state](Fds::set_state) handed over with them.
    pub fn fds(&self) -> &Fds {
        self.0.fds()
    }

    /// Whether this process was started by an upgrade (it has a previous generation,
    /// which may have exited since).
    pub fn has_parent(&self) -> bool {
        self.0.has_parent()
    }

    /// Waits until the previous generation has exited (every one of its threads).
    /// Returns `Ok(true)` once it has, or when there is none; `Ok(false)` if it is still
    /// running after `timeout`.
    pub fn wait_for_parent(&self, timeout: Duration) -> Result<bool> {
        self.0.wait_for_parent(timeout)
    }

    /// Tells the previous generation that this one is ready to serve, waits for it to
    /// commit the upgrade, then takes over: writes the pid file, closes the inherited fds
    /// nobody took (removing their Unix socket files) and returns.
    ///
    /// Start serving *before* calling it: with a probation
    /// ([`Options::probation`]) the previous generation commits only once the window has
    /// passed, and both serve meanwhile. If the previous generation gives up on this one
    /// instead (a timeout, or `stop()` there), this process is killed before it has
    /// changed anything outside: no pid file, no message to systemd, no unlinked file.
    /// If the previous generation has died meanwhile, this one carries on alone (and
    /// tells systemd its pid itself).
    ///
    /// Returns the [adoption report](Adoption): which inherited fds were taken and which
    /// were closed because nobody asked for them. State handed over with
    /// [`Fds::set_state`] and not read by now is discarded. Calling it again does
    /// nothing (and reports nothing); after [`stop`](Upgrader::stop) it fails with
    /// [`Error::Stopped`](crate::Error::Stopped).
    pub fn ready(&self) -> Result<Adoption> {
        self.0.ready()
    }

    /// Gives up instead of becoming ready: reports `reason` to the previous generation,
    /// whose [`upgrade`](Upgrader::upgrade) fails with
    /// [`Error::ChildFailed`](crate::Error::ChildFailed) carrying it, and exits with
    /// status 1. For a new generation that cannot take over (a bad configuration, a port
    /// it cannot get), so that whoever asked for the upgrade sees why. The reason is also
    /// written to stderr; at most 4 KiB of it reaches the parent.
    pub fn fail(&self, reason: impl fmt::Display) -> ! {
        self.0.fail(&reason.to_string())
    }

    /// Starts the next generation, waits until it is ready (and, with
    /// [`Options::probation`], until it has stayed alive for the window), commits, and
    /// returns its pid.
    ///
    /// On success this generation should stop accepting, finish its work and exit. The
    /// [exit notification](Upgrader::exit) fires *before* `upgrade` returns (once the new
    /// generation has confirmed the commit), so that this generation stops accepting as
    /// soon as it can; the result is recorded before it fires (see [`Exit`]). The
    /// registry passes nothing on any more; its copies of the fds are closed by
    /// [`stop`](Upgrader::stop) or the drop (not on this path). The
    /// [upgrade timeout](Options::upgrade_timeout) says how long it may take.
    ///
    /// On failure nothing changed: this generation keeps its fds and keeps serving, it
    /// is systemd's main pid and its pid file names it, the child (if any) was reaped,
    /// and another upgrade may be tried. The error says what happened:
    /// [`Exec`](crate::Error::Exec), [`ChildExited`](crate::Error::ChildExited),
    /// [`ChildFailed`](crate::Error::ChildFailed) (with the child's own reason),
    /// [`Timeout`](crate::Error::Timeout) (the child was killed),
    /// [`ChildDiedAfterReady`](crate::Error::ChildDiedAfterReady) (it died during the
    /// probation), [`Notify`](crate::Error::Notify), or
    /// [`Stopped`](crate::Error::Stopped).
    ///
    /// Refused with [`NotReady`](crate::Error::NotReady) before
    /// [`ready`](Upgrader::ready), [`UpgradeInProgress`](crate::Error::UpgradeInProgress)
    /// while another upgrade runs, [`AlreadyUpgraded`](crate::Error::AlreadyUpgraded)
    /// after a successful one, [`Stopped`](crate::Error::Stopped) after
    /// [`stop`](Upgrader::stop), and [`ParentAlive`](crate::Error::ParentAlive) while this
    /// generation's own parent has not exited.
    pub fn upgrade(&self) -> Result<u32> {
        self.0.upgrade()
    }

    /// The sending end of the [handover channel](crate::handover) to the generation this
    /// one upgraded to: hand it the connections still in use, instead of draining them.
    /// Taken once, after [`upgrade`](Upgrader::upgrade) has returned `Ok`.
    ///
    /// Fails with [`Error::HandoverUnavailable`](crate::Error::HandoverUnavailable)
    /// before a successful upgrade, when taken already, when the new generation took no
    /// channel (an older release, which confirms the commit without it) or reads no
    /// version this one writes, and when it has closed its end: then drain as before.
    #[cfg(unix)]
    #[cfg_attr(docsrs, doc(cfg(unix)))]
    pub fn handover(&self) -> Result<crate::handover::Sender> {
        self.0.handover()
    }

    /// Stops upgrading: no upgrade starts after this, and one in progress is cancelled
    /// (its child killed and reaped, its `upgrade()` returning
    /// [`Error::Stopped`](crate::Error::Stopped)) before the exit notification fires and
    /// `stop` returns. A `ready()` waiting for the previous generation's commit returns
    /// [`Error::Stopped`](crate::Error::Stopped) (the previous generation then serves
    /// on).
    ///
    /// When it returns, the registry's copies of the fds are closed, as with Go's
    /// `Stop`: a pipe's write end passed to the next generation reaches EOF once that
    /// generation and your own handles have closed it. The sockets you took from
    /// [`fds`](Upgrader::fds) stay open. If no upgrade ever succeeded, the socket files
    /// of the Unix sockets this process listened on are removed, except, in a new
    /// generation that never became ready, those it inherited (the previous generation
    /// still serves on them); and the [pid file](Options::pid_file) of a generation that
    /// became ready is removed if it still names this process (one written by any other
    /// process, a later generation among them, is left alone). Calling it again does
    /// nothing.
    pub fn stop(&self) {
        self.0.stop()
    }

    /// The exit notification: it fires once this generation should stop accepting and
    /// exit (an upgrade succeeded, or [`stop`](Upgrader::stop) was called). Wait on it,
    /// poll it next to your listeners, or clone it for a task of its own; see [`Exit`].
    pub fn exit(&self) -> &Exit {
        self.0.exit()
    }

    /// The connections accepted from `listener` until the exit notification fires: the
    /// accept loop that never loses a connection at an upgrade.
    ///
    /// ```no_run
    /// # fn serve(upg: &tableflip::Upgrader) -> tableflip::Result<()> {
    /// use std::net::TcpListener;
    /// let listener: TcpListener = upg.fds().listen("127.0.0.1:8080")?;
    /// for conn in upg.incoming(&listener) {
    ///     match conn {
    ///         Ok(conn) => { /* hand it to a thread */ drop(conn) }
    ///         Err(e) => eprintln!("accept: {e}"), // EMFILE and friends; it backs off
    ///     }
    /// }
    /// // The next generation accepts from here on: finish what is in flight, then exit.
    /// # Ok(()) }
    /// ```
    ///
    /// It waits for the listener and the notification together and accepts only when the
    /// listener is readable, without blocking, a batch at a time: a blocking `accept()`
    /// is not woken when the notification fires (nor by closing the listener), and a
    /// connection that the other generation accepted first would leave it blocked.
    /// So it sets `O_NONBLOCK` on the listener, which the other generation shares (the
    /// flag belongs to the open file description): serve every generation with
    /// `incoming`, or with the same mode. The connections it yields are blocking, like
    /// those std's `accept` returns. An error from `accept` (the fd limit reached, say)
    /// is yielded, and the next accept waits 10 ms; the iterator ends when the
    /// notification fires, or after an error setting the listener non-blocking.
    #[cfg(unix)]
    #[cfg_attr(docsrs, doc(cfg(unix)))]
    pub fn incoming<'a, L: Accept>(&'a self, listener: &'a L) -> Incoming<'a, L> {
        Incoming::new(self.exit(), listener)
    }

    /// What this generation is doing: its pid, whether it is ready, whether an upgrade
    /// runs now, whether an upgrade started it, and how the last one ended. The control
    /// socket's `status` command answers with it.
    pub fn status(&self) -> Status {
        self.0.status()
    }
}
