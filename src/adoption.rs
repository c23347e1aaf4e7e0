//! What became of the inherited fds: [`Adoption`] and [`InheritedFd`], plain data on
//! every platform (where upgrades are unsupported, `ready` never returns one).

use std::fmt;

use crate::error::RawFd;

/// An inherited fd, as [`Adoption`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InheritedFd {
    /// The fd number in this process.
    pub fd: RawFd,
    /// What it was passed as: `"TCP listener"`, `"Unix listener"`, `"file descriptor"`, ...
    pub kind: &'static str,
    /// Its address, path or name.
    pub key: String,
}

impl fmt::Display for InheritedFd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} (fd {})", self.kind, self.key, self.fd)
    }
}

/// What [`Upgrader::ready`](crate::Upgrader::ready) did with the fds inherited from the
/// previous generation: which were taken, and which were closed because nobody asked
/// for them. Log it: a listener dropped by a configuration change shows up in `closed`.
///
/// It also carries the receiving end of the [handover channel](crate::handover), to be
/// taken (`adoption.handover.take()`): not plain data, so it is neither `Clone` nor
/// comparable.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Adoption {
    /// Inherited fds this generation took (and will pass on).
    pub taken: Vec<InheritedFd>,
    /// Inherited fds nobody asked for: closed, their Unix socket files removed.
    pub closed: Vec<InheritedFd>,
    /// Connections the previous generation hands over, if it offered a channel: `None`
    /// on a first start, when the previous generation is an older release, or when it
    /// died before committing.
    #[cfg(unix)]
    #[cfg_attr(docsrs, doc(cfg(unix)))]
    pub handover: Option<crate::handover::Receiver>,
}

impl fmt::Display for Adoption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |f: &mut fmt::Formatter<'_>, v: &[InheritedFd]| -> fmt::Result {
            for (i, fd) in v.iter().enumerate() {
                write!(f, "{}{fd}", if i == 0 { ": " } else { ", " })?;
            }
            Ok(())
        };
        write!(f, "took {} inherited fd(s)", self.taken.len())?;
        list(f, &self.taken)?;
        write!(f, "; closed {} unused", self.closed.len())?;
        list(f, &self.closed)?;
        #[cfg(not(unix))]
        return Ok(());
        #[cfg(unix)]
        match &self.handover {
            Some(rx) => write!(f, "; handover channel from pid {}", rx.pid()),
            None => Ok(()),
        }
    }
}
