//! Inheritance: reading the fd table a new generation finds in its environment,
//! adopting the fds it names, holding them until they are taken, and reporting what
//! became of them.

use std::collections::{HashMap, VecDeque};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::adoption::InheritedFd;
use crate::error::{clip, Error, Result};
use crate::sys::handshake;
use crate::sys::wire::{self, Extra, Key};

/// An inherited fd not yet taken.
#[derive(Debug)]
pub(crate) struct Inherited {
    pub(crate) fd: OwnedFd,
    pub(crate) key: Key,
    /// What the previous generation recorded beyond the key: the socket file's identity,
    /// or that the kernel chose the name.
    pub(crate) extra: Extra,
}

/// What a new generation inherits from the one that started it.
#[derive(Debug, Default)]
pub(crate) struct Inheritance {
    /// The fds for the registry.
    pub(crate) fds: Vec<Inherited>,
    /// The link to the previous generation.
    pub(crate) parent: Option<handshake::Parent>,
    /// The state handed over, if any.
    pub(crate) state: Option<OwnedFd>,
    /// This generation's end of the handover channel, if the parent made one. Checked
    /// only once the parent has committed, off the upgrade's path.
    pub(crate) handover: Option<OwnedFd>,
}

/// Reads `$TABLEFLIP_FDS` and adopts what it names, if it is addressed to this process.
/// Nothing (`Default`) when the variable is unset or addressed to another process.
pub(crate) fn from_env() -> Result<Inheritance> {
    let Some(value) = std::env::var_os(wire::VAR) else {
        return Ok(Inheritance::default());
    };
    let table_err = |entry: String, reason: String| Error::FdTable {
        var: wire::VAR,
        entry,
        reason,
        source: None,
    };
    let table = match wire::decode(value.as_bytes(), std::process::id()) {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(Inheritance::default()),
        Err(e) => return Err(table_err(e.entry, e.reason)),
    };
    for needed in [Key::Ready, Key::Parent, Key::Commit] {
        if !table.entries.iter().any(|e| e.key == needed) {
            // No entry is at fault: name the whole value (bounded).
            let whole = value.to_string_lossy();
            let shown = match clip(&whole, 200) {
                s if s.len() < whole.len() => format!("{s}..."),
                s => s.to_string(),
            };
            return Err(table_err(shown, format!("no {} entry", needed.tag())));
        }
    }
    let mut ready = None;
    let mut lifeline = None;
    let mut commit = None;
    let mut out = Inheritance::default();
    // In place (see `wire::Entry`): the handshake's entries are taken out on the way.
    out.fds = adopt(wire::VAR, table.entries, true)?
        .into_iter()
        .filter_map(|e| {
            let slot = match e.key {
                Key::Ready => &mut ready,
                Key::Parent => &mut lifeline,
                Key::Commit => &mut commit,
                Key::State => &mut out.state,
                Key::Handover => &mut out.handover,
                _ => return Some(e),
            };
            *slot = Some(e.fd);
            None
        })
        .collect();
    if let (Some(ready), Some(lifeline), Some(commit)) = (ready, lifeline, commit) {
        out.parent = Some(handshake::Parent::new(ready, commit, lifeline));
    }
    Ok(out)
}

/// Adopts the fds of a decoded table: each must be open and, if `inherited_only`, must
/// have been inherited through `execve` (close-on-exec clear; an fd this process opened
/// itself would have it set, since Rust opens everything close-on-exec). Each is made
/// close-on-exec again.
pub(crate) fn adopt(
    var: &'static str,
    entries: Vec<wire::Entry>,
    inherited_only: bool,
) -> Result<Vec<Inherited>> {
    for wire::Entry { fd, key, .. } in &entries {
        let entry = || format!("{fd},{}", key.tag());
        // On the number itself: a `BorrowedFd` may only be made of an open fd, and
        // whether this one is open is the question.
        // SAFETY: F_GETFD reads the descriptor flags of a number and touches no memory;
        // a number that is not open gives EBADF, which is reported.
        let flags = unsafe { libc::fcntl(*fd, libc::F_GETFD) };
        let reason = if flags == -1 {
            (
                format!("fd {fd} is not open"),
                Some(std::io::Error::last_os_error()),
            )
        } else if !inherited_only || flags & libc::FD_CLOEXEC == 0 {
            continue;
        } else {
            (
                format!(
                    "fd {fd} is close-on-exec, so it was not inherited from the previous generation"
                ),
                None,
            )
        };
        return Err(Error::FdTable {
            var,
            entry: entry(),
            reason: reason.0,
            source: reason.1,
        });
    }
    let adopted: Vec<Inherited> = entries
        .into_iter()
        .map(|wire::Entry { fd, key, extra }| Inherited {
            // SAFETY: the fd is open, was inherited across exec (checked above), is named
            // exactly once in the table, and nothing else in this process claims it.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            key,
            extra,
        })
        .collect();
    // Close-on-exec again, in one close_range per run of consecutive fds.
    crate::sys::batch::set_cloexec(adopted.iter().map(|e| e.fd.as_raw_fd()))
        .map_err(|e| Error::io("fcntl(F_SETFD, FD_CLOEXEC)", None, e))?;
    Ok(adopted)
}

/// The inherited fds not yet taken, in table order, indexed by key: taking thousands of
/// them one by one must not be quadratic. The index is built at the first lookup, so a
/// generation that takes nothing does not pay for it.
#[derive(Debug, Default)]
pub(crate) struct InheritedSet {
    /// `None` once taken (or given up).
    slots: Vec<Option<Inherited>>,
    /// Live slots by key, in table order; built on first use.
    index: Option<HashMap<Key, VecDeque<usize>>>,
    live: usize,
}

impl InheritedSet {
    pub(crate) fn new(all: Vec<Inherited>) -> InheritedSet {
        InheritedSet {
            live: all.len(),
            slots: all.into_iter().map(Some).collect(),
            index: None,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.live
    }

    fn index(&mut self) -> &mut HashMap<Key, VecDeque<usize>> {
        let slots = &self.slots;
        self.index.get_or_insert_with(|| {
            let mut index: HashMap<Key, VecDeque<usize>> = HashMap::new();
            for (i, e) in slots.iter().enumerate() {
                if let Some(e) = e {
                    index.entry(e.key.clone()).or_default().push_back(i);
                }
            }
            index
        })
    }

    /// The first live slot with exactly this key.
    pub(crate) fn find(&mut self, key: &Key) -> Option<usize> {
        if self.live == 0 {
            return None;
        }
        self.index().get(key)?.front().copied()
    }

    /// The live slots, in table order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, &Inherited)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| Some((i, e.as_ref()?)))
    }

    /// The live slot `i` (from `find` or `iter`).
    pub(crate) fn get(&self, i: usize) -> Option<&Inherited> {
        self.slots.get(i)?.as_ref()
    }

    /// Takes the live slot `i` out of the set.
    pub(crate) fn remove(&mut self, i: usize) -> Option<Inherited> {
        let e = self.slots.get_mut(i)?.take()?;
        if let Some(index) = self.index.as_mut() {
            if let Some(q) = index.get_mut(&e.key) {
                q.retain(|&j| j != i);
                if q.is_empty() {
                    index.remove(&e.key);
                }
            }
        }
        self.live -= 1;
        Some(e)
    }

    /// Everything left, in table order.
    pub(crate) fn take_all(&mut self) -> Vec<Inherited> {
        let all = std::mem::take(self);
        all.slots.into_iter().flatten().collect()
    }
}

impl InheritedFd {
    pub(crate) fn new(fd: RawFd, key: &Key) -> InheritedFd {
        InheritedFd {
            fd,
            kind: key.kind_name(),
            key: key.key_text(),
        }
    }
}
