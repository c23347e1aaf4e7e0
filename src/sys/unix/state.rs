//! The state blob handed from one generation to the next: a sealed memory file.

use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, BorrowedFd, OwnedFd};

use crate::error::{Error, Result};

use crate::fds::MAX_STATE_SIZE;

/// Copies `bytes` into a new close-on-exec file that is only ever read afterwards.
pub(crate) fn store(bytes: &[u8]) -> Result<OwnedFd> {
    let size = bytes.len() as u64;
    if size > MAX_STATE_SIZE {
        return Err(Error::StateTooLarge {
            size,
            max: MAX_STATE_SIZE,
        });
    }
    let fd = create().map_err(|e| Error::io("create the state file", None, e))?;
    let file = std::fs::File::from(fd);
    let raw = file.as_raw_fd();
    file.write_all_at(bytes, 0)
        .map_err(|e| Error::io("write the state file", Some(raw), e))?;
    let fd = OwnedFd::from(file);
    seal(&fd).map_err(|e| Error::io("seal the state file", Some(raw), e))?;
    Ok(fd)
}

/// Reads the whole blob. Uses positioned reads: the file offset is shared with the
/// previous generation, which holds the same open file description.
pub(crate) fn load(fd: BorrowedFd<'_>) -> Result<Vec<u8>> {
    let raw = fd.as_raw_fd();
    let st = rustix::fs::fstat(fd).map_err(|e| Error::io("fstat the state file", Some(raw), e))?;
    let size = st.st_size as u64;
    if size > MAX_STATE_SIZE {
        return Err(Error::StateTooLarge {
            size,
            max: MAX_STATE_SIZE,
        });
    }
    let file = std::fs::File::from(
        fd.try_clone_to_owned()
            .map_err(|e| Error::io("fcntl(F_DUPFD_CLOEXEC)", Some(raw), e))?,
    );
    let mut buf = vec![0u8; size as usize];
    file.read_exact_at(&mut buf, 0)
        .map_err(|e| Error::io("read the state file", Some(raw), e))?;
    Ok(buf)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn create() -> io::Result<OwnedFd> {
    use rustix::fs::MemfdFlags;
    Ok(rustix::fs::memfd_create(
        "tableflip-state",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn seal(fd: &OwnedFd) -> io::Result<()> {
    use rustix::fs::SealFlags;
    Ok(rustix::fs::fcntl_add_seals(
        fd,
        SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
    )?)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn create() -> io::Result<OwnedFd> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        ".tableflip-state-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    // Nobody else can open it by name once it is unlinked.
    std::fs::remove_file(&path)?;
    Ok(file.into())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn seal(_fd: &OwnedFd) -> io::Result<()> {
    Ok(())
}
