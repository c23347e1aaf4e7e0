//! Writing the pid file atomically, in a directory nobody else can write to.
//!
//! systemd (`PIDFile=`) and operators believe what the pid file says, so whoever can
//! write to its directory decides what they believe. In a directory other users can
//! write to (`/tmp`), another user could create the pid file's name, or the temporary
//! name it is written under, before this process does: a lie, or a start that fails.
//! So the directory must be one that only root and this process's user can write to
//! ([`check_dir`]), and every name is used relative to that directory, opened once.
//! The last generation removes the file when it stops, if it still names it
//! ([`remove_if_names`]).

use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsFd, BorrowedFd};
use std::path::Path;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};

/// How many temporary names are tried before giving up. A name is 64 random bits: it is
/// taken only by a leftover with the same bits, so a second try is already a miracle.
const ATTEMPTS: usize = 4;

/// Writes `pid` to `path`: into a new file created exclusively (`O_EXCL | O_NOFOLLOW`,
/// mode 0644) under a temporary name nobody can predict, `.NAME.PID.RANDOM.tmp`, next to
/// it, then renamed over it, so a reader sees the old content or the new one, never a
/// partial file, and nothing planted in the directory is followed or overwritten. A
/// failure removes the temporary file. Then the temporary files of writers that died
/// before their rename (killed mid-write) are removed: see [`remove_stale`].
///
/// Fails, before it creates anything, if the directory is not safe ([`check_dir`]).
///
/// No `fsync`: the rename is what a reader needs, and after a crash of the machine
/// every pid file is stale anyway. (It cost ≈1.4 ms of every upgrade on a disk, up to
/// seconds on a busy one, between the commit and the old generation's exit.)
pub(crate) fn write(path: &Path, pid: u32) -> io::Result<()> {
    let (dir, name) = open_dir(path)?;
    let dirfd = dir.fd()?;
    let writer = std::process::id();
    let mut attempt = 0;
    let (tmp, fd) = loop {
        attempt += 1;
        let tmp = temp_name(name, writer, random()?);
        match rustix::fs::openat(
            dirfd,
            tmp.as_slice(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        ) {
            Ok(fd) => break (tmp, fd),
            Err(rustix::io::Errno::EXIST) if attempt < ATTEMPTS => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let result = (|| {
        let mut file = std::fs::File::from(fd);
        // The mode given to open is filtered by the umask; a pid file is world-readable.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        file.write_all(format!("{pid}\n").as_bytes())?;
        drop(file);
        Ok(rustix::fs::renameat(dirfd, tmp.as_slice(), dirfd, name)?)
    })();
    if result.is_err() {
        let _ = rustix::fs::unlinkat(dirfd, tmp.as_slice(), AtFlags::empty());
    }
    remove_stale(dir, name, writer);
    result
}

/// Checks the directory the pid file `path` goes in: it exists, it is a directory, and
/// nobody but root and this process's user (and its primary group, see
/// [`others_can_write`](crate::sys::safe_dir::others_can_write)) can write to it. Otherwise
/// another user could take the pid file's name, or its temporary name, first. The error
/// is the OS error (`ENOENT`, `ENOTDIR`, ...), or says why the directory is not safe.
pub(crate) fn check_dir(path: &Path) -> io::Result<()> {
    open_dir(path).map(drop)
}

/// Removes the pid file at `path` if, and only if, it names `pid`; returns whether it
/// did. A file that names another process (a later generation, another instance of the
/// service) is never removed, even one renamed over `path` while this runs: the file is
/// first renamed to a temporary name of this process's own and read again there, and
/// one that turns out to name another process goes back (with `link`, so that a newer
/// file written meanwhile is not overwritten). Only in that race is the path missing,
/// for the moment between the two renames. A temporary name left by a kill in between
/// is removed by the next writer ([`remove_stale`]).
pub(crate) fn remove_if_names(path: &Path, pid: u32) -> io::Result<bool> {
    let (dir, name) = open_dir(path)?;
    let dirfd = dir.fd()?;
    if !names(dirfd, name, pid)? {
        return Ok(false);
    }
    let claimed = temp_name(name, std::process::id(), random()?);
    match rustix::fs::renameat(dirfd, name, dirfd, claimed.as_slice()) {
        Ok(()) => {}
        Err(rustix::io::Errno::NOENT) => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    let ours = matches!(names(dirfd, OsStr::from_bytes(&claimed), pid), Ok(true));
    if !ours {
        // Swapped in since we looked: put it back, unless a newer one is there already.
        let _ = rustix::fs::linkat(dirfd, claimed.as_slice(), dirfd, name, AtFlags::empty());
    }
    rustix::fs::unlinkat(dirfd, claimed.as_slice(), AtFlags::empty())?;
    Ok(ours)
}

/// Whether `name` in `dirfd` is a regular file that holds `pid` (and a newline), as
/// [`write`] writes it. Never follows a symlink, never blocks on a FIFO.
fn names(dirfd: BorrowedFd<'_>, name: &OsStr, pid: u32) -> io::Result<bool> {
    let fd = match rustix::fs::openat(
        dirfd,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        // A symlink: ELOOP, or EMLINK on FreeBSD. Not a file this crate wrote.
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::LOOP | rustix::io::Errno::MLINK) => {
            return Ok(false)
        }
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) != FileType::RegularFile {
        return Ok(false);
    }
    let mut buf = [0u8; 24];
    let n = crate::sys::os::read(&fd, &mut buf)?;
    Ok(buf[..n] == *format!("{pid}\n").as_bytes())
}

/// The pid file's directory, opened and checked, and the file's name in it.
fn open_dir(path: &Path) -> io::Result<(Dir, &OsStr)> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the pid file path has no file name",
        )
    })?;
    let dir_path = crate::sys::safe_dir::dir_of(path);
    let fd = rustix::fs::open(
        dir_path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    let (uid, gid) = (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    );
    if let Some(why) = crate::sys::safe_dir::others_can_write(&st, &[uid], gid) {
        let who = match uid {
            0 => "root".to_string(),
            uid => format!("root and uid {uid}"),
        };
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the directory {} is not safe for a pid file: {why}, so another user could \
                 take its names first; use a directory only {who} can write to, such as \
                 /run/NAME or $XDG_RUNTIME_DIR",
                dir_path.display()
            ),
        ));
    }
    Ok((Dir::new(fd)?, name))
}

/// `.NAME.WRITER.RANDOM.tmp`, with `RANDOM` as 16 lowercase hex digits.
fn temp_name(name: &OsStr, writer: u32, random: u64) -> Vec<u8> {
    let mut tmp = Vec::with_capacity(name.len() + 40);
    tmp.push(b'.');
    tmp.extend_from_slice(name.as_bytes());
    tmp.extend_from_slice(format!(".{writer}.{random:016x}.tmp").as_bytes());
    tmp
}

/// The writer's pid, if `entry` is a temporary name [`temp_name`] made for `name`.
fn temp_writer(entry: &[u8], name: &OsStr) -> Option<u32> {
    let rest = entry
        .strip_prefix(b".")?
        .strip_prefix(name.as_bytes())?
        .strip_prefix(b".")?
        .strip_suffix(b".tmp")?;
    let dot = rest.iter().position(|&b| b == b'.')?;
    let (writer, random) = (&rest[..dot], &rest[dot + 1..]);
    let hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
    if random.len() != 16 || !random.iter().all(hex) {
        return None;
    }
    if writer.is_empty() || writer.len() > 10 || !writer.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(writer).ok()?.parse().ok()
}

/// Removes what writers of `name` that no longer run left behind: entries of `dir` whose
/// names are temporary names for `name`, that are regular files (never a symlink or a
/// directory) owned by this process's user, whose writer's pid names no process. A
/// writer that runs (or a pid reused since) keeps its file; so does another user's.
/// Best effort: nothing here fails the write. The directory was checked: nobody else
/// can swap an entry between the look and the unlink.
fn remove_stale(mut dir: Dir, name: &OsStr, writer: u32) {
    let uid = rustix::process::geteuid().as_raw();
    let stale: Vec<_> = dir
        .by_ref()
        .map_while(|e| e.ok())
        .filter(|e| temp_writer(e.file_name().to_bytes(), name).is_some_and(|w| w != writer))
        .map(|e| e.file_name().to_owned())
        .collect();
    let Ok(dirfd) = dir.fd() else { return };
    for entry in stale {
        if is_stale(dirfd, &entry, name, uid) {
            let _ = rustix::fs::unlinkat(dirfd, entry.as_c_str(), AtFlags::empty());
        }
    }
}

fn is_stale(dirfd: BorrowedFd<'_>, entry: &std::ffi::CStr, name: &OsStr, uid: u32) -> bool {
    let Ok(st) = rustix::fs::statat(dirfd.as_fd(), entry, AtFlags::SYMLINK_NOFOLLOW) else {
        return false;
    };
    #[allow(clippy::unnecessary_cast)]
    let ours =
        FileType::from_raw_mode(st.st_mode) == FileType::RegularFile && st.st_uid as u32 == uid;
    let gone = temp_writer(entry.to_bytes(), name)
        .and_then(|w| rustix::process::Pid::from_raw(i32::try_from(w).ok()?))
        .is_some_and(|pid| rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH));
    ours && gone
}

/// 64 bits nobody can predict: `getrandom(2)` where there is one (without waiting for
/// the kernel's pool at early boot), `/dev/urandom` elsewhere.
fn random() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::rand::{getrandom, GetRandomFlags};
        if let Ok(8) = getrandom(&mut bytes, GetRandomFlags::NONBLOCK) {
            return Ok(u64::from_ne_bytes(bytes));
        }
    }
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(u64::from_ne_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_recognised_exactly() {
        let name = OsStr::new("app.pid");
        let tmp = temp_name(name, 4242, 0x0123_4567_89ab_cdef);
        assert_eq!(tmp, b".app.pid.4242.0123456789abcdef.tmp");
        assert_eq!(temp_writer(&tmp, name), Some(4242));
        for other in [
            &b".app.pid.4242.tmp"[..],                    // no random part
            b".app.pid.4242.0123456789abcde.tmp",         // 15 digits
            b".app.pid.4242.0123456789ABCDEF.tmp",        // upper case
            b".app.pid..0123456789abcdef.tmp",            // no writer
            b".app.pid.42x.0123456789abcdef.tmp",         // not a pid
            b".app.pid.99999999999.0123456789abcdef.tmp", // too long
            b".other.pid.4242.0123456789abcdef.tmp",      // another file's
            b"app.pid.4242.0123456789abcdef.tmp",         // not hidden
            b".app.pid.4242.0123456789abcdef.tmp~",       // another suffix
            b"app.pid",
        ] {
            assert_eq!(
                temp_writer(other, name),
                None,
                "{:?}",
                OsStr::from_bytes(other)
            );
        }
    }

    #[test]
    fn random_names_differ() {
        let a = random().unwrap();
        let b = random().unwrap();
        assert_ne!(a, b);
    }
}
