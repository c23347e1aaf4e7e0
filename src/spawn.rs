//! Starting the next generation: everything prepared before the fork, then
//! [`child::spawn`](crate::child::spawn).

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io::{self, Read};
use std::os::raw::c_char;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use crate::child::{self, ChildArgs};
use crate::error::{Error, Result};
use crate::wire;

/// Variables that describe fds for this process only and must not reach the next one.
const NOT_INHERITED: &[&str] = &[wire::VAR, "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

/// Finds the executable to start: `explicit` if set, else `argv0`; a relative path
/// containing a `/` resolves against `cwd`, a bare name is searched in `$PATH`.
/// Done at upgrade time, so a binary replaced on disk by rename is what runs next.
pub(crate) fn resolve_executable(
    explicit: Option<&Path>,
    argv0: &OsStr,
    cwd: &Path,
) -> Result<PathBuf> {
    let name = explicit.map(Path::as_os_str).unwrap_or(argv0);
    let not_found = |path: PathBuf| Error::Exec {
        path,
        source: io::Error::from_raw_os_error(libc::ENOENT),
    };
    if name.is_empty() {
        return Err(not_found(PathBuf::from("(empty argv[0])")));
    }
    if explicit.is_some() || name.as_bytes().contains(&b'/') {
        return Ok(cwd.join(name));
    }
    let path_var =
        std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/local/bin:/bin:/usr/bin"));
    for dir in std::env::split_paths(&path_var) {
        let candidate = cwd.join(dir).join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(not_found(PathBuf::from(name)))
}

/// Starts `exe` with `argv`, the current environment plus `table`, in `cwd`, passing
/// `fds` (close-on-exec cleared in the child only). Returns the child's pid once it has
/// called `execve`, or the reason it could not.
pub(crate) fn spawn(
    exe: &Path,
    argv: &[CString],
    cwd: &CStr,
    table: &str,
    fds: &[RawFd],
) -> Result<libc::pid_t> {
    let exec_err = |source: io::Error| Error::Exec {
        path: exe.to_path_buf(),
        source,
    };
    let path = CString::new(exe.as_os_str().as_bytes())
        .map_err(|_| exec_err(io::ErrorKind::InvalidInput.into()))?;

    let mut argv_ptrs: Vec<*const c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());

    // The environment as it is now, without our own variables, plus the new table.
    let env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !NOT_INHERITED.iter().any(|n| k.as_bytes() == n.as_bytes()))
        .filter_map(|(k, v)| {
            let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
            kv.extend_from_slice(k.as_bytes());
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    let mut table_var = Vec::with_capacity(wire::VAR.len() + table.len() + 2);
    table_var.extend_from_slice(wire::VAR.as_bytes());
    table_var.push(b'=');
    let pid_slot_at = table_var.len() + wire::PID_OFFSET;
    table_var.extend_from_slice(table.as_bytes());
    table_var.push(0);
    debug_assert!(pid_slot_at + wire::PID_WIDTH < table_var.len());
    // One pointer into the table buffer serves both the envp entry and the pid slot.
    let table_ptr = table_var.as_mut_ptr();
    let mut env_ptrs: Vec<*const c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(table_ptr as *const c_char);
    env_ptrs.push(std::ptr::null());

    let (err_rd, err_wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| Error::io("pipe2", None, e))?;

    let args = ChildArgs {
        path: path.as_ptr(),
        argv: argv_ptrs.as_ptr(),
        envp: env_ptrs.as_ptr(),
        cwd: cwd.as_ptr(),
        fds: fds.as_ptr(),
        nfds: fds.len(),
        // SAFETY: pid_slot_at + PID_WIDTH is within `table_var` (asserted above).
        pid_slot: unsafe { table_ptr.add(pid_slot_at) },
        err_fd: err_wr.as_raw_fd(),
    };
    // SAFETY: every pointer in `args` points into a buffer owned by this function, alive
    // until after `spawn` returns, and no other thread can reach these buffers.
    let pid = unsafe { child::spawn(&args) }.map_err(|e| Error::io("clone", None, e))?;
    drop(err_wr);

    // EOF: the exec succeeded (the pipe's write end closed on exec). Four bytes: errno.
    let mut errno = [0u8; 4];
    let mut got = 0;
    let mut file = std::fs::File::from(err_rd);
    while got < errno.len() {
        match file.read(&mut errno[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    drop(file);
    if got == 0 {
        return Ok(pid);
    }
    // The child failed before or at exec and has exited with 127: reap it.
    crate::upgrader::reap(pid);
    let code = if got == errno.len() {
        i32::from_ne_bytes(errno)
    } else {
        libc::EIO
    };
    Err(exec_err(io::Error::from_raw_os_error(code)))
}
