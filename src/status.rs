//! What a generation reports about itself: [`Upgrader::status`](crate::Upgrader::status),
//! or a control socket's `status` command.

use std::fmt;
use std::time::SystemTime;

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
    /// One line for a log: `pid 4242, ready, last upgrade: ok (pid 4250)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {}", self.pid)?;
        f.write_str(if self.ready { ", ready" } else { ", not ready" })?;
        if self.upgrading {
            f.write_str(", upgrading")?;
        }
        match self.last_upgrade.as_ref().map(|l| &l.result) {
            None => f.write_str(", no upgrade yet"),
            Some(Ok(pid)) => write!(f, ", last upgrade: ok (pid {pid})"),
            Some(Err(e)) => write!(f, ", last upgrade failed: {} ({})", e.message, e.kind),
        }
    }
}
