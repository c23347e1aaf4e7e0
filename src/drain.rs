//! [`Drain`]: a generation's last phase, timed, reported, and (at a stop under systemd)
//! given the time it needs.

use std::fmt;
use std::time::{Duration, Instant};

/// A generation's drain: once its [exit notification](crate::Exit) has fired, it
/// finishes what it was serving, until a deadline that the application sets. Get one
/// from [`Exit::drain`](crate::Exit::drain), call [`tick`](Drain::tick) from the drain
/// loop, and [`finish`](Drain::finish) with what became of the connections.
///
/// - **At a stop under systemd** (this generation is the main one, and
///   [`stop`](crate::Upgrader::stop) told systemd `STOPPING=1`), each tick asks systemd
///   for more time when the last request is 2.5 s old: `EXTEND_TIMEOUT_USEC=`, up to
///   10 s at a time and never beyond the deadline plus 5 s (to cut what is left and
///   exit). systemd then does not kill the service at `TimeoutStopSec=` while the drain
///   runs; a drain that stops ticking is killed 10 s after its last tick (or at
///   `TimeoutStopSec=`, if that is later). Under a [`Keeper`](crate::Keeper) the keeper
///   relays it, and waits as long itself. Nothing is sent after an upgrade (the new
///   generation is the main one then, and only it may ask), nor without
///   `$NOTIFY_SOCKET`. No thread is started: the ticks are the application's.
/// - **After an upgrade**, [`finish`](Drain::finish) completes this upgrade's
///   [record](crate::UpgradeRecord) (`drained`, `force_closed`, `drain_ended`), and the
///   new generation hears it: its [`status`](crate::Upgrader::status) shows it.
///
/// ```no_run
/// # use std::time::Duration;
/// # fn open_connections() -> u64 { 0 }
/// # fn wait_for_a_connection_to_end(_: Duration) {}
/// # fn cut_the_rest() -> u64 { 0 }
/// # fn main() -> tableflip::Result<()> {
/// # let upg = tableflip::Upgrader::new(tableflip::Options::new())?;
/// upg.exit().wait();
/// let drain = upg.exit().drain(Duration::from_secs(60));
/// let before = open_connections();
/// // tick() is None once the deadline has passed.
/// while let Some(wait) = drain.tick() {
///     if open_connections() == 0 {
///         break;
///     }
///     wait_for_a_connection_to_end(wait); // at most `wait`: then tick again
/// }
/// let cut = cut_the_rest();
/// drain.finish(before - cut, cut);
/// # Ok(()) }
/// ```
///
/// Under systemd, set the deadline to what the longest connection you are willing to
/// wait for needs, and `TimeoutStopSec=` to what a stop that does not drain needs: see
/// [stopping](crate::guide::systemd#stopping) in the systemd guide for `TimeoutStopSec=`
/// and `KillMode=`.
pub struct Drain(pub(crate) crate::sys::Drain);

impl fmt::Debug for Drain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drain")
            .field("deadline", &self.deadline())
            .finish_non_exhaustive()
    }
}

impl Drain {
    /// Call it from the drain loop, at least as often as it says: asks systemd for more
    /// time when this is a stop that needs it (see above), and returns how long to wait
    /// at most before the next tick (2.5 s at most, never past the deadline), or `None`
    /// once the deadline has passed: cut what is left, and finish.
    pub fn tick(&self) -> Option<Duration> {
        self.0.tick()
    }

    /// When the drain must end, as [`Exit::drain`](crate::Exit::drain) was told.
    pub fn deadline(&self) -> Instant {
        self.0.deadline()
    }

    /// The drain is over: `drained` connections finished, `force_closed` cut at the
    /// deadline. After an upgrade, this upgrade's record notes them (and when the drain
    /// ended), and the new generation is told; at a stop there is no record to note
    /// them in. Dropping the `Drain` instead reports nothing; the new generation then
    /// hears at [`stop`](crate::Upgrader::stop) (or when the `Upgrader` is dropped) what
    /// this generation knows without the counts.
    pub fn finish(self, drained: u64, force_closed: u64) {
        self.0.finish(drained, force_closed)
    }
}
