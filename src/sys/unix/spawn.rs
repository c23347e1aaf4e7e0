//! Starting the next generation: everything prepared before the fork, then
//! [`child::spawn`](crate::sys::child::spawn).

use std::ffi::{CString, OsString};
use std::io;
use std::os::raw::c_char;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::sys::child::{self, ChildArgs, Step};
use crate::sys::process::Child;
use crate::sys::wire;

/// Variables that describe fds for this process only and must not reach the next one.
const NOT_INHERITED: &[&str] = &[wire::VAR, "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

/// What the next generation runs: this process's executable, arguments and initial
/// working directory, captured when the `Upgrader` was made.
#[derive(Debug)]
pub(crate) struct Program {
    /// `Options::executable`, if set.
    executable: Option<PathBuf>,
    argv0: OsString,
    argv: Vec<CString>,
    cwd: PathBuf,
    cwd_c: CString,
}

impl Program {
    /// This process's argv and working directory; `executable` overrides `argv[0]`.
    pub(crate) fn current(executable: Option<PathBuf>) -> Result<Program> {
        let cwd = std::env::current_dir().map_err(|e| Error::io("getcwd", None, e))?;
        let cwd_c = CString::new(cwd.as_os_str().as_bytes())
            .map_err(|_| Error::io("getcwd", None, io::ErrorKind::InvalidData))?;
        let args: Vec<OsString> = std::env::args_os().collect();
        Ok(Program {
            executable,
            argv0: args.first().cloned().unwrap_or_default(),
            argv: args
                .iter()
                .filter_map(|a| CString::new(a.as_bytes()).ok())
                .collect(),
            cwd,
            cwd_c,
        })
    }

    /// The initial working directory.
    pub(crate) fn cwd(&self) -> &Path {
        &self.cwd
    }

    /// Finds the executable to start: `Options::executable` if set, else `argv[0]`; a
    /// relative path containing a `/` resolves against the initial working directory,
    /// a bare name is searched in `$PATH` (like `execvp`, skipping files that are not
    /// executable). Done at upgrade time, so a binary replaced on disk by rename is what
    /// runs next.
    pub(crate) fn resolve(&self) -> Result<PathBuf> {
        let name = self
            .executable
            .as_deref()
            .map(Path::as_os_str)
            .unwrap_or(&self.argv0);
        let not_found = |path: PathBuf| Error::Exec {
            path,
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        if name.is_empty() {
            return Err(not_found(PathBuf::from("(empty argv[0])")));
        }
        if self.executable.is_some() || name.as_bytes().contains(&b'/') {
            return Ok(self.cwd.join(name));
        }
        let path_var = std::env::var_os("PATH")
            .unwrap_or_else(|| OsString::from("/usr/local/bin:/bin:/usr/bin"));
        std::env::split_paths(&path_var)
            .map(|dir| self.cwd.join(dir).join(name))
            .find(|candidate| is_executable(candidate))
            .ok_or_else(|| not_found(PathBuf::from(name)))
    }

    /// Starts `exe` with this program's argv, in the initial working directory, with
    /// the current environment (without the variables meant for this process only) plus
    /// `env` and `pid_var`, passing `fds` (close-on-exec cleared in the child only) and
    /// `moves` (`(from, to)`: `from` passed at `to`). Returns the child once it has
    /// called `execve`, or the reason it could not.
    pub(crate) fn spawn(
        &self,
        exe: &Path,
        env: &[(&str, &str)],
        pid_var: Option<PidVar<'_>>,
        fds: &[RawFd],
        moves: &[[RawFd; 2]],
    ) -> Result<Child> {
        let exec_err = |source: io::Error| Error::Exec {
            path: exe.to_path_buf(),
            source,
        };
        let path = CString::new(exe.as_os_str().as_bytes())
            .map_err(|_| exec_err(io::ErrorKind::InvalidInput.into()))?;
        let mut argv: Vec<*const c_char> = self.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let vars = environment(env, pid_var.as_ref().map(|v| v.name));
        let mut slot_var = pid_var.map(|v| SlotVar::new(v.name, v.value, v.slot));
        let mut envp: Vec<*const c_char> = vars.iter().map(|e| e.as_ptr()).collect();
        let pid_slot = match slot_var.as_mut() {
            Some(var) => {
                envp.push(var.as_ptr());
                var.pid_slot()
            }
            None => std::ptr::null_mut(),
        };
        envp.push(std::ptr::null());
        let (err_rd, err_wr, scratch) = error_pipe_and_scratch(fds, moves)?;

        let args = ChildArgs {
            path: path.as_ptr(),
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            cwd: self.cwd_c.as_ptr(),
            fds: fds.as_ptr(),
            nfds: fds.len(),
            moves: moves.as_ptr(),
            nmoves: moves.len(),
            scratch,
            pid_slot,
            err_fd: err_wr.as_raw_fd(),
        };
        // SAFETY: every pointer in `args` points into a buffer owned by this function or
        // by `self`, alive until after `spawn` returns, and no other thread writes to them.
        let pid = unsafe { child::spawn(&args) }.map_err(|e| Error::io("clone", None, e))?;
        drop(err_wr);
        let pid = rustix::process::Pid::from_raw(pid)
            .ok_or_else(|| Error::io("clone", None, io::ErrorKind::InvalidData))?;
        let child = Child::new(pid);
        match exec_failure(err_rd) {
            None => Ok(child),
            Some((step, errno)) => {
                // The child failed before or at exec and has exited with 127.
                let _ = child.reap();
                let source = io::Error::from_raw_os_error(errno);
                Err(match step {
                    Some(Step::Chdir) => Error::WorkingDirectory {
                        path: self.cwd.clone(),
                        source,
                    },
                    _ => exec_err(source),
                })
            }
        }
    }
}

/// The pipe on which the child reports a failure before exec (its write end above
/// every place a move writes to), and the first scratch number for the moves (above
/// every fd involved), or `-1` when every place is above every fd being moved (then
/// each goes straight there).
fn error_pipe_and_scratch(
    fds: &[RawFd],
    moves: &[[RawFd; 2]],
) -> Result<(OwnedFd, OwnedFd, RawFd)> {
    let (err_rd, err_wr) = crate::sys::os::pipe().map_err(|e| Error::io("pipe2", None, e))?;
    // (The first copy is closed here: a write end left open in this process would
    // keep the parent's read from ever seeing EOF.)
    let err_wr = match moves.iter().map(|[_, to]| *to).max() {
        Some(top) if err_wr.as_raw_fd() <= top => {
            let raw = err_wr.as_raw_fd();
            let above = rustix::io::fcntl_dupfd_cloexec(&err_wr, top.saturating_add(1))
                .map_err(|e| Error::io("fcntl(F_DUPFD_CLOEXEC)", Some(raw), e))?;
            drop(err_wr);
            above
        }
        _ => err_wr,
    };
    let lowest_to = moves.iter().map(|[_, to]| *to).min();
    let highest_from = moves
        .iter()
        .map(|[from, _]| *from)
        .chain(fds.iter().copied())
        .max();
    let scratch = match (lowest_to, highest_from) {
        (Some(to), Some(from)) if to > from => -1,
        _ => fds
            .iter()
            .chain(moves.iter().flatten())
            .chain([&err_wr.as_raw_fd()])
            .max()
            .map_or(3, |&fd| fd.saturating_add(1)),
    };
    Ok((err_rd, err_wr, scratch))
}

/// An environment variable whose value holds the child's pid: `PID_WIDTH` digits at
/// byte `slot` of `value`, written by the child itself between fork and exec.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PidVar<'a> {
    pub(crate) name: &'a str,
    pub(crate) value: &'a str,
    pub(crate) slot: usize,
}

/// Whether `path` is a regular file this process may execute.
fn is_executable(path: &Path) -> bool {
    path.is_file() && rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok()
}

/// The environment as it is now, without the variables meant for this process only,
/// with `extra` (replacing variables of the same names) and without `also_removed`.
fn environment(extra: &[(&str, &str)], also_removed: Option<&str>) -> Vec<CString> {
    let replaced = |k: &[u8]| {
        NOT_INHERITED.iter().any(|n| k == n.as_bytes())
            || extra.iter().any(|(n, _)| k == n.as_bytes())
            || also_removed.is_some_and(|n| k == n.as_bytes())
    };
    let kv = |k: &[u8], v: &[u8]| {
        let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
        kv.extend_from_slice(k);
        kv.push(b'=');
        kv.extend_from_slice(v);
        CString::new(kv).ok()
    };
    std::env::vars_os()
        .filter(|(k, _)| !replaced(k.as_bytes()))
        .filter_map(|(k, v)| kv(k.as_bytes(), v.as_bytes()))
        .chain(
            extra
                .iter()
                .filter_map(|(k, v)| kv(k.as_bytes(), v.as_bytes())),
        )
        .collect()
}

/// `NAME=value` as a C string, with the place of the pid slot the child fills in.
struct SlotVar {
    buf: Vec<u8>,
    pid_slot_at: usize,
}

impl SlotVar {
    fn new(name: &str, value: &str, slot: usize) -> SlotVar {
        let mut buf = Vec::with_capacity(name.len() + value.len() + 2);
        buf.extend_from_slice(name.as_bytes());
        buf.push(b'=');
        let pid_slot_at = buf.len() + slot;
        buf.extend_from_slice(value.as_bytes());
        buf.push(0);
        assert!(
            pid_slot_at + wire::PID_WIDTH < buf.len(),
            "the value has room for the pid"
        );
        SlotVar { buf, pid_slot_at }
    }

    fn as_ptr(&mut self) -> *const c_char {
        self.buf.as_mut_ptr() as *const c_char
    }

    /// Where the child writes its pid: `PID_WIDTH` bytes inside the buffer.
    fn pid_slot(&mut self) -> *mut u8 {
        // SAFETY: `new` checked that the slot lies within the buffer.
        unsafe { self.buf.as_mut_ptr().add(self.pid_slot_at) }
    }
}

/// What the child reported on its error pipe: `None` (EOF) if the exec succeeded (the
/// pipe's write end closed on exec), else the step that failed and its errno.
fn exec_failure(err_rd: std::os::unix::io::OwnedFd) -> Option<(Option<Step>, i32)> {
    let mut report = [0u8; 8];
    let mut got = 0;
    while got < report.len() {
        match crate::sys::os::read(&err_rd, &mut report[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let [a, b, c, d, e, f, g, h] = report;
    match got {
        0 => None,
        8 => Some((
            Step::from_raw(i32::from_ne_bytes([a, b, c, d])),
            i32::from_ne_bytes([e, f, g, h]),
        )),
        _ => Some((None, libc::EIO)),
    }
}

#[cfg(all(test, any(target_os = "linux", target_os = "android")))]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// The spawning tests of this binary, one at a time: a child started by one
    /// must not hold the other's pipes.
    static SPAWN: Mutex<()> = Mutex::new(());

    /// Runs `script` with `/bin/sh` as a generation would be started, with `moves`;
    /// returns its exit code (killed after 10 s: a watchdog, not a timing).
    fn run(script: &str, moves: &[[RawFd; 2]]) -> i32 {
        let cwd = std::env::current_dir().unwrap();
        let program = Program {
            executable: None,
            argv0: "sh".into(),
            argv: ["sh", "-c", script]
                .iter()
                .map(|a| CString::new(*a).unwrap())
                .collect(),
            cwd_c: CString::new(cwd.as_os_str().as_bytes()).unwrap(),
            cwd,
        };
        let child = program
            .spawn(Path::new("/bin/sh"), &[], None, &[], moves)
            .unwrap();
        let status = child
            .reap_by(Some(Instant::now() + Duration::from_secs(10)))
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        status.code().unwrap_or(128 + status.signal().unwrap_or(0))
    }

    fn read_all(fd: OwnedFd) -> String {
        let mut s = String::new();
        std::fs::File::from(fd).read_to_string(&mut s).unwrap();
        s
    }

    /// Places above every fd involved: each fd goes straight there (no scratch). The
    /// child finds the pipe at its place, and not at its old number (close-on-exec).
    #[test]
    fn a_move_to_a_free_place_passes_the_fd_there() {
        let _one = SPAWN.lock().unwrap_or_else(|e| e.into_inner());
        let (rd, wr) = crate::sys::os::pipe().unwrap();
        let (from, to) = (wr.as_raw_fd(), 200);
        assert_eq!(error_pipe_and_scratch(&[], &[[from, to]]).unwrap().2, -1);
        let script = format!("echo moved > /proc/self/fd/{to} && [ ! -e /proc/self/fd/{from} ]");
        let code = run(&script, &[[from, to]]);
        drop(wr);
        assert_eq!(code, 0, "the fd is not at {to}, or is still at {from}");
        assert_eq!(read_all(rd), "moved\n");
    }

    /// Two fds that trade numbers: each place is the other's fd, so they go through
    /// scratch numbers; each pipe ends up at the other's number.
    #[test]
    fn fds_that_trade_places_go_through_scratch_numbers() {
        let _one = SPAWN.lock().unwrap_or_else(|e| e.into_inner());
        let (rd1, wr1) = crate::sys::os::pipe().unwrap();
        let (rd2, wr2) = crate::sys::os::pipe().unwrap();
        let (a, b) = (wr1.as_raw_fd(), wr2.as_raw_fd());
        let moves = [[a, b], [b, a]];
        assert!(error_pipe_and_scratch(&[], &moves).unwrap().2 > a.max(b));
        let script = format!("echo one > /proc/self/fd/{b} && echo two > /proc/self/fd/{a}");
        let code = run(&script, &moves);
        drop((wr1, wr2));
        assert_eq!(code, 0);
        assert_eq!(read_all(rd1), "one\n", "pipe 1 (fd {a}) is not at fd {b}");
        assert_eq!(read_all(rd2), "two\n", "pipe 2 (fd {b}) is not at fd {a}");
    }
}
