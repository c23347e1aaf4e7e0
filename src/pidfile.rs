//! Writing the pid file atomically.

use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{Mode, OFlags};

/// Writes `pid` to `path`: into a new file created exclusively (`O_EXCL | O_NOFOLLOW`,
/// mode 0644) next to it, then renamed over it, so a reader sees the old content or the
/// new one, never a partial file, and a symlink planted at the temporary name is never
/// followed. A failure removes the temporary file.
///
/// No `fsync`: the rename is what a reader needs, and after a crash of the machine
/// every pid file is stale anyway. (It cost ≈1.4 ms of every upgrade on a disk, up to
/// seconds on a busy one, between the commit and the old generation's exit.)
pub(crate) fn write(path: &Path, pid: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the pid file path has no file name",
        )
    })?;
    let mut tmp_name = Vec::with_capacity(name.len() + 24);
    tmp_name.push(b'.');
    tmp_name.extend_from_slice(name.as_bytes());
    tmp_name.extend_from_slice(format!(".{pid}.tmp").as_bytes());
    let tmp = dir.join(std::ffi::OsStr::from_bytes(&tmp_name));

    // A leftover from a process with the same pid that crashed mid-write: remove it
    // (never following a link), then create exclusively.
    let _ = remove_if_not_dir(&tmp);
    let fd = rustix::fs::open(
        &tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )?;
    let result = (|| {
        let mut file = std::fs::File::from(fd);
        // The mode given to open is filtered by the umask; a pid file is world-readable.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        file.write_all(format!("{pid}\n").as_bytes())?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn remove_if_not_dir(path: &Path) -> io::Result<()> {
    let st = rustix::fs::lstat(path)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory {
        std::fs::remove_file(path)?;
    }
    Ok(())
}
