//! What a generation reports about itself: [`Upgrader::status`](crate::Upgrader::status),
//! or a control socket's `status` command.

use std::fmt;
use std::time::SystemTime;

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
    /// How the last upgrade this generation ran ended, if it ran one. Refused attempts
    /// (`UpgradeInProgress`, `NotReady`, `ParentAlive`, ...) do not count.
    pub last_upgrade: Option<LastUpgrade>,
}

/// How an upgrade ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LastUpgrade {
    /// When it ended (to the millisecond, when it came over a control socket).
    pub ended: SystemTime,
    /// The new generation's pid, or why the upgrade failed.
    pub result: std::result::Result<u32, UpgradeFailure>,
}

/// Why an upgrade failed, as text that survives a trip over the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpgradeFailure {
    /// The name of the [`Error`](crate::Error) variant (`ChildFailed`, `Timeout`, ...).
    pub kind: String,
    /// The error's message (with the OS error behind it, if any), on one line.
    pub message: String,
}

impl LastUpgrade {
    /// The record of an upgrade that ends now with `result`.
    #[cfg(unix)]
    pub(crate) fn of(result: &Result<u32>) -> LastUpgrade {
        LastUpgrade {
            ended: SystemTime::now(),
            result: match result {
                Ok(pid) => Ok(*pid),
                Err(e) => Err(UpgradeFailure {
                    kind: e.kind_name().to_string(),
                    message: e.to_string(),
                }),
            },
        }
    }
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
        match self.last_upgrade.as_ref().map(|l| &l.result) {
            None if self.started_by.is_some() => f.write_str(", no upgrade since"),
            None => f.write_str(", no upgrade yet"),
            Some(Ok(pid)) => write!(f, ", last upgrade: ok (pid {pid})"),
            Some(Err(e)) => write!(f, ", last upgrade failed: {} ({})", e.message, e.kind),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(
        started_by: Option<u32>,
        last: Option<std::result::Result<u32, UpgradeFailure>>,
    ) -> Status {
        Status {
            pid: 4250,
            ready: true,
            upgrading: false,
            started_by,
            last_upgrade: last.map(|result| LastUpgrade {
                ended: SystemTime::UNIX_EPOCH,
                result,
            }),
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
    }
}
