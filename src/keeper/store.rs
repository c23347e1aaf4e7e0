//! The keeper's fd store: the fds the main generation asked it to hold (`FDSTORE=1`,
//! `FDNAME=`), passed to every generation it starts (`$LISTEN_FDS`, `$LISTEN_FDNAMES`).
//!
//! Like systemd's: names are checked as systemd checks them, one copy of each open file
//! is kept, `FDSTOREREMOVE=1` drops a name. Bounded so that what it holds can never stop
//! a start: at most half the soft fd limit, the keeper's own fds included (the rest is
//! the generations' room), at most [`HELD_MAX`] fds, and names that fit in one
//! environment string.

use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};

/// The most fds held, whatever the fd limit.
const HELD_MAX: usize = 4096;
/// The longest `$LISTEN_FDNAMES` (Linux takes 128 KiB per environment string).
const NAMES_MAX: usize = 64 * 1024;
/// The longest name systemd takes (`FDNAME_MAX`).
const FDNAME_MAX: usize = 255;
/// The name of fds stored without `FDNAME=`.
pub(super) const DEFAULT_NAME: &str = "stored";

/// An fd held for the generations, under the name it was stored with.
#[derive(Debug)]
struct Held {
    name: String,
    fd: OwnedFd,
    /// `(st_dev, st_ino)`: one copy of each open file.
    id: (u64, u64),
}

/// The fds held.
#[derive(Debug, Default)]
pub(super) struct Store {
    held: Vec<Held>,
}

/// What became of the fds of one `FDSTORE=1`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Stored {
    pub(super) kept: usize,
    /// Already held (another copy of the same open file).
    pub(super) duplicates: usize,
    /// Closed: no room left.
    pub(super) refused: usize,
}

/// Whether systemd would take `name` (`fdname_is_valid`): printable ASCII without `:`
/// (the separator of `$LISTEN_FDNAMES`), at most 255 bytes.
pub(super) fn check_name(name: &str) -> Result<(), &'static str> {
    if name.len() > FDNAME_MAX {
        return Err("longer than 255 bytes");
    }
    if !name.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err("not printable ASCII");
    }
    if name.contains(':') {
        return Err("contains ':'");
    }
    Ok(())
}

impl Store {
    /// Holds `fds` under `name` (already checked with [`check_name`]) while there is room.
    pub(super) fn add(&mut self, name: &str, fds: Vec<OwnedFd>) -> Stored {
        let mut out = Stored::default();
        let budget = budget();
        // What the keeper has open without these (they are open already, received).
        let mut open = open_fds().saturating_sub(fds.len());
        let mut names = self.names_len();
        for fd in fds {
            let Ok(st) = rustix::fs::fstat(&fd) else {
                out.refused += 1;
                continue;
            };
            #[allow(clippy::unnecessary_cast)]
            let id = (st.st_dev as u64, st.st_ino as u64);
            if self.held.iter().any(|h| h.id == id) {
                out.duplicates += 1;
                continue;
            }
            if open + 1 > budget
                || self.held.len() >= HELD_MAX
                || names + name.len() + 1 > NAMES_MAX
            {
                out.refused += 1;
                continue;
            }
            open += 1;
            names += name.len() + 1;
            self.held.push(Held {
                name: name.to_string(),
                fd,
                id,
            });
            out.kept += 1;
        }
        out
    }

    /// Drops every fd held under `name`; returns how many.
    pub(super) fn remove(&mut self, name: &str) -> usize {
        let before = self.held.len();
        self.held.retain(|h| h.name != name);
        before - self.held.len()
    }

    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    /// `$LISTEN_FDNAMES`.
    pub(super) fn names(&self) -> String {
        let names: Vec<&str> = self.held.iter().map(|h| h.name.as_str()).collect();
        names.join(":")
    }

    /// Each held fd and where a generation gets it (3, 4, ...).
    pub(super) fn moves(&self) -> Vec<[RawFd; 2]> {
        self.held
            .iter()
            .zip(3..)
            .map(|(h, to)| [h.fd.as_raw_fd(), to])
            .collect()
    }

    /// What `$FDSTORE` tells the generations: the most the store could hold.
    pub(super) fn max() -> usize {
        budget().min(HELD_MAX)
    }

    fn names_len(&self) -> usize {
        self.held.iter().map(|h| h.name.len() + 1).sum()
    }
}

/// The most fds the keeper may have open once holding the store: half its soft limit.
fn budget() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    usize::try_from(limit / 2).unwrap_or(usize::MAX)
}

/// How many fds this process has open (`/proc/self/fd`, less the one reading it).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count().saturating_sub(1))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_as_systemd_does() {
        assert!(check_name("tableflip.tcp,127.0.0.1%3A80").is_ok());
        assert!(check_name("").is_ok());
        assert!(check_name("with space ~").is_ok());
        assert_eq!(check_name("a:b"), Err("contains ':'"));
        assert_eq!(check_name("a\nb"), Err("not printable ASCII"));
        assert_eq!(check_name("é"), Err("not printable ASCII"));
        assert!(check_name(&"x".repeat(255)).is_ok());
        assert_eq!(check_name(&"x".repeat(256)), Err("longer than 255 bytes"));
    }

    #[test]
    fn one_copy_of_each_file_and_a_name_is_removed() {
        let mut store = Store::default();
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let a2 = a.try_clone().unwrap();
        let got = store.add("p", vec![a.into(), b.into(), a2.into()]);
        assert_eq!(
            got,
            Stored {
                kept: 2,
                duplicates: 1,
                refused: 0
            }
        );
        assert_eq!(store.names(), "p:p");
        assert_eq!(store.remove("p"), 2);
        assert_eq!(store.len(), 0);
    }
}
