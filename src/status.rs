//! What a generation reports about itself: [`Upgrader::status`](crate::Upgrader::status),
//! or a control socket's `status` command.

use std::fmt;
#[cfg(unix)]
use std::time::UNIX_EPOCH;
use std::time::{Duration, SystemTime};

#[cfg(unix)]
use crate::error::Result;

/// What a generation says about itself: [`Upgrader::status`](crate::Upgrader::status), or a control socket's
/// `status` command ([`status`](crate::control::status)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// The generation's pid.
    pub pid: u32,
    /// Whether it is ready and in charge: [`ready`](crate::Upgrader::ready) has returned, and
    /// it has neither handed over nor stopped.
    pub ready: bool,
    /// Whether an upgrade is running now.
    pub upgrading: bool,
    /// The pid of the generation whose upgrade started this one, if one did. `None` for
    /// a first start, and for a generation that a keeper or systemd started again.
    pub started_by: Option<u32>,
    /// The last [`MAX_RECORDS`] upgrades, oldest first: those this generation ran, after
    /// those its predecessors ran (the one that started this generation among them),
    /// each passed on at every upgrade. Refused attempts (`UpgradeInProgress`,
    /// `NotReady`, `ParentAlive`, ...) are not recorded.
    pub upgrades: Vec<UpgradeRecord>,
}

/// How many [upgrade records](UpgradeRecord) a generation keeps and passes on.
pub const MAX_RECORDS: usize = 8;

impl Status {
    /// The last upgrade this generation ran, if it ran one: the last of
    /// [`upgrades`](Status::upgrades) whose [`pid`](UpgradeRecord::pid) is this
    /// generation's.
    pub fn last_upgrade(&self) -> Option<&UpgradeRecord> {
        self.upgrades.iter().rev().find(|r| r.pid == self.pid)
    }
}

/// One upgrade: how long each phase took, what became of the connections, and how it
/// ended. A generation records each upgrade it runs, and passes its records on at
/// every upgrade, so that the one serving now can say what the last few cost
/// ([`Status::upgrades`], the control socket's `status`).
///
/// The phases are measured from [`started`](UpgradeRecord::started) with a monotonic
/// clock; a phase not reached, or not known to the generation reporting, is `None`. The
/// old generation knows the handshake (ready, probation, the commit) and what its
/// [handover](crate::handover) and its [drain](crate::Drain) reported; it tells the new
/// generation when its drain ends ([`Drain::finish`](crate::Drain::finish), or
/// [`Upgrader::stop`](crate::Upgrader::stop) with what it knows then). Only the new
/// generation learns when the old one is [gone](UpgradeRecord::gone).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpgradeRecord {
    /// The generation that ran the upgrade (the old one).
    pub pid: u32,
    /// When it started the new generation (to the millisecond).
    pub started: SystemTime,
    /// The new generation's pid, or why the upgrade failed.
    pub result: std::result::Result<u32, UpgradeFailure>,
    /// From the start until [`upgrade`](crate::Upgrader::upgrade) returned: for a success,
    /// until the new generation confirmed the commit (and systemd, if any, read it).
    pub ended: Duration,
    /// From the start until the new generation reported ready.
    pub ready: Option<Duration>,
    /// How long the new generation was kept on [probation](crate::Options::probation)
    /// once ready (zero without one): until the commit began.
    pub probation: Option<Duration>,
    /// How many connections the new generation took over through the
    /// [handover channel](crate::handover) (accepted, or left to it at the deadline):
    /// what [`Sender::finish`](crate::handover::Sender::finish) reported.
    pub handed_over: Option<u64>,
    /// How many connections the old generation finished serving while it drained, as
    /// its application reported ([`Drain::finish`](crate::Drain::finish)).
    pub drained: Option<u64>,
    /// How many connections the old generation cut at its drain deadline, as its
    /// application reported ([`Drain::finish`](crate::Drain::finish)).
    pub force_closed: Option<u64>,
    /// From the start until the old generation's drain ended.
    pub drain_ended: Option<Duration>,
    /// From the start until the new generation saw the old one gone (every thread of it
    /// exited). It looks while it waits in [`Upgrader::incoming`](crate::Upgrader::incoming)
    /// or [`Exit::wait_readable`](crate::Exit::wait_readable), in
    /// [`Upgrader::wait_for_parent`](crate::Upgrader::wait_for_parent), and when asked
    /// for its [status](crate::Upgrader::status): a generation that does none of these
    /// for a while notes it late.
    pub gone: Option<Duration>,
}

/// Why an upgrade failed, as text that survives a trip over the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpgradeFailure {
    /// The name of the [`Error`](crate::Error) variant (`ChildFailed`, `Timeout`, ...).
    pub kind: String,
    /// The error's message (with the OS error behind it, if any), on one line, cut to
    /// [`MAX_FAILURE_MESSAGE`] bytes in a record.
    pub message: String,
}

/// The longest failure message an [`UpgradeRecord`] keeps, in bytes (the error itself,
/// as [`upgrade`](crate::Upgrader::upgrade) returns it, is whole).
pub const MAX_FAILURE_MESSAGE: usize = 256;

impl UpgradeRecord {
    /// The record of an upgrade by `pid` that began at `started` and ended `ended` later
    /// with `result`; nothing else known yet.
    #[cfg(unix)]
    pub(crate) fn new(
        pid: u32,
        started: SystemTime,
        ended: Duration,
        result: std::result::Result<u32, UpgradeFailure>,
    ) -> UpgradeRecord {
        UpgradeRecord {
            pid,
            started,
            result,
            ended,
            ready: None,
            probation: None,
            handed_over: None,
            drained: None,
            force_closed: None,
            drain_ended: None,
            gone: None,
        }
    }

    /// The record of an upgrade by this process that started at `started` and ends now
    /// (`ended` after it) with `result`.
    #[cfg(unix)]
    pub(crate) fn of(started: SystemTime, ended: Duration, result: &Result<u32>) -> UpgradeRecord {
        let result = match result {
            Ok(pid) => Ok(*pid),
            Err(e) => Err(UpgradeFailure {
                kind: e.kind_name().to_string(),
                message: one_line(&e.to_string(), MAX_FAILURE_MESSAGE),
            }),
        };
        UpgradeRecord::new(std::process::id(), to_millis(started), ended, result)
    }

    /// Whether `other` is a record of the same upgrade.
    #[cfg(unix)]
    pub(crate) fn same_upgrade(&self, other: &UpgradeRecord) -> bool {
        self.pid == other.pid && self.started == other.started
    }
}

/// `t` to the millisecond, as records keep it.
#[cfg(unix)]
pub(crate) fn to_millis(t: SystemTime) -> SystemTime {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    UNIX_EPOCH + Duration::from_millis(since.as_millis().min(u64::MAX as u128) as u64)
}

/// `s` on one line (control characters as spaces), at most `max` bytes.
#[cfg(unix)]
pub(crate) fn one_line(s: &str, max: usize) -> String {
    crate::error::clip(s, max)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl fmt::Display for Status {
    /// One line for a log: `pid 4250, ready, started by an upgrade from pid 4242, last
    /// upgrade: ok (pid 4260)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {}", self.pid)?;
        f.write_str(if self.ready { ", ready" } else { ", not ready" })?;
        if self.upgrading {
            f.write_str(", upgrading")?;
        }
        if let Some(pid) = self.started_by {
            write!(f, ", started by an upgrade from pid {pid}")?;
        }
        match self.last_upgrade().map(|l| &l.result) {
            None if self.started_by.is_some() => f.write_str(", no upgrade since"),
            None => f.write_str(", no upgrade yet"),
            Some(Ok(pid)) => write!(f, ", last upgrade: ok (pid {pid})"),
            Some(Err(e)) => write!(f, ", last upgrade failed: {} ({})", e.message, e.kind),
        }
    }
}

impl fmt::Display for UpgradeRecord {
    /// One line for a log: `upgrade 4242 -> 4250: ready after 12.1ms, no probation,
    /// committed after 13.4ms; 3 handed over, 10 drained, 0 force-closed; drain ended
    /// after 2.1s; pid 4242 gone after 2.2s`. What is not known is left out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.result {
            Ok(pid) => write!(f, "upgrade {} -> {pid}: ", self.pid)?,
            Err(_) => write!(f, "upgrade by {} failed: ", self.pid)?,
        }
        if let Some(d) = self.ready {
            write!(f, "ready after {d:.1?}, ")?;
        }
        match self.probation {
            Some(Duration::ZERO) => f.write_str("no probation, ")?,
            Some(d) => write!(f, "probation {d:.1?}, ")?,
            None => {}
        }
        match &self.result {
            Ok(_) => write!(f, "committed after {:.1?}", self.ended)?,
            Err(e) => write!(f, "{} after {:.1?}: {}", e.kind, self.ended, e.message)?,
        }
        let counts = [
            (self.handed_over, "handed over"),
            (self.drained, "drained"),
            (self.force_closed, "force-closed"),
        ];
        let mut first = true;
        for (n, what) in counts {
            if let Some(n) = n {
                f.write_str(if first { "; " } else { ", " })?;
                write!(f, "{n} {what}")?;
                first = false;
            }
        }
        if let Some(d) = self.drain_ended {
            write!(f, "; drain ended after {d:.1?}")?;
        }
        if let Some(d) = self.gone {
            write!(f, "; pid {} gone after {d:.1?}", self.pid)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: u32, result: std::result::Result<u32, UpgradeFailure>) -> UpgradeRecord {
        UpgradeRecord {
            pid,
            started: UNIX_EPOCH + Duration::from_millis(1_767_225_600_250),
            result,
            ended: Duration::from_micros(13_400),
            ready: Some(Duration::from_micros(12_100)),
            probation: Some(Duration::ZERO),
            handed_over: Some(3),
            drained: Some(10),
            force_closed: Some(0),
            drain_ended: Some(Duration::from_millis(2100)),
            gone: Some(Duration::from_millis(2200)),
        }
    }

    fn status(
        started_by: Option<u32>,
        last: Option<std::result::Result<u32, UpgradeFailure>>,
    ) -> Status {
        Status {
            pid: 4250,
            ready: true,
            upgrading: false,
            started_by,
            upgrades: last
                .map(|result| record(4250, result))
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn says_which_upgrade_started_the_generation() {
        assert_eq!(
            status(None, None).to_string(),
            "pid 4250, ready, no upgrade yet"
        );
        assert_eq!(
            status(Some(4242), None).to_string(),
            "pid 4250, ready, started by an upgrade from pid 4242, no upgrade since"
        );
        assert_eq!(
            status(Some(4242), Some(Ok(4260))).to_string(),
            "pid 4250, ready, started by an upgrade from pid 4242, last upgrade: ok (pid 4260)"
        );
        // The record of the upgrade that started it is not its own.
        let mut s = status(Some(4242), None);
        s.upgrades.push(record(4242, Ok(4250)));
        assert_eq!(s.last_upgrade(), None);
    }

    #[test]
    fn a_record_reads_as_one_line() {
        assert_eq!(
            record(4242, Ok(4250)).to_string(),
            "upgrade 4242 -> 4250: ready after 12.1ms, no probation, committed after \
             13.4ms; 3 handed over, 10 drained, 0 force-closed; drain ended after 2.1s; pid \
             4242 gone after 2.2s"
        );
        let failed = UpgradeRecord {
            ready: None,
            probation: None,
            handed_over: None,
            drained: None,
            force_closed: None,
            drain_ended: None,
            gone: None,
            ..record(
                4242,
                Err(UpgradeFailure {
                    kind: "ChildExited".into(),
                    message: "exit status: 3".into(),
                }),
            )
        };
        assert_eq!(
            failed.to_string(),
            "upgrade by 4242 failed: ChildExited after 13.4ms: exit status: 3"
        );
    }
}
