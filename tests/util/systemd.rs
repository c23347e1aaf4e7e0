//! Harness for `tests/systemd_real.rs`: boots a real systemd as PID 1 of private PID,
//! mount, UTS and cgroup namespaces, with the test's units and nothing from the host's
//! boot, and drives it with `systemctl` through `nsenter`.
//!
//! What keeps the host safe (booting systemd naively empties the host's /tmp):
//! - systemd starts only [`TARGET`], a target of our own that wants nothing, so none of
//!   the host's sysinit runs (`systemd-tmpfiles-setup` would empty the host's /tmp).
//!   Every test unit gets a drop-in with `DefaultDependencies=no`.
//! - In the namespace, /tmp, /var/tmp and /run are fresh tmpfs mounts; /sys and
//!   /proc/sys are read-only (PID 1 itself raises `fs.file-max` and
//!   `net.unix.max_dgram_qlen` at boot otherwise, and the network namespace is the
//!   host's); the hostname is private.
//! - systemd's cgroup tree is a fresh cgroup2 mount rooted at a cgroup of our own under
//!   the host's cgroup2 hierarchy, removed afterwards; it never touches the host's cgroups.
//! - Units log to files ([`Systemd::log`]) and systemd to a pseudo-terminal mounted over
//!   /dev/console ([`Systemd::console`]): neither journald nor the host's console is used.
//! - Everything runs under one watchdog and dies with the namespace's init: [`Drop`]
//!   SIGKILLs it (the kernel kills the rest of the namespace), and so does the kernel if
//!   this test process dies (parent-death signals on `unshare` and on init).
//!
//! Files the namespace must see (binaries, logs) live under the build's target directory
//! (`CARGO_TARGET_TMPDIR` for the tests' own). When that is under a directory the
//! namespace hides (a checkout under /tmp), the init script keeps it visible.
//!
//! Pids that systemd reports (`MainPID`) and that the services print are the
//! namespace's; [`Systemd::alive`] takes those.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::{lock, open_pty, DEADLINE};

/// The systemd binary under test.
pub const SYSTEMD: &str = "/lib/systemd/systemd";
/// The unit systemd boots into: ours, wanting nothing.
pub const TARGET: &str = "tableflip-harness.target";
/// A test that keeps its systemd longer than this has it killed.
const WATCHDOG: Duration = Duration::from_secs(120);
/// Directories that the namespace mounts afresh: files there are invisible to it.
const HIDDEN: [&str; 3] = ["/tmp", "/var/tmp", "/run"];

/// Runs as PID 1 of the new namespaces, then execs systemd. Arguments: the boot
/// directory, the console pty, the target, systemd's log level.
///
/// The fifth, `keep`, empty or a directory under one of [`HIDDEN`] (the build's target
/// directory, when the checkout is under /tmp): it is bound to a staging point on a
/// private tmpfs over /mnt before the fresh mounts and moved back to its place after,
/// so that the namespace sees it and nothing else of the host's /tmp.
const INIT_SCRIPT: &str = r#"set -eu
dir=$1 console=$2 target=$3 level=$4 keep=${5:-}
mount --make-rprivate /
if [ -n "$keep" ]; then
    mount -t tmpfs -o mode=700 tmpfs /mnt
    mkdir /mnt/keep
    mount --bind "$keep" /mnt/keep
fi
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
if [ -n "$keep" ]; then
    mkdir -p "$keep"
    mount --move /mnt/keep "$keep"
    umount /mnt
fi
mount -o remount,bind,ro /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
mount --bind "$console" /dev/console
mkdir -p /run/systemd/system
cp -R "$dir/units/." /run/systemd/system/
export container=other SYSTEMD_COLORS=0
exec /lib/systemd/systemd --system --unit="$target" --show-status=no \
    --log-target=console --log-level="$level"
"#;

/// systemd's log level: `info`, or `$TABLEFLIP_SYSTEMD_LOG_LEVEL` (`debug` shows every
/// notification and state change). Debug logging slows systemd down noticeably.
fn log_level() -> String {
    std::env::var("TABLEFLIP_SYSTEMD_LOG_LEVEL")
        .ok()
        .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "info".into())
}

/// Why these tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return crate::harness::needs_root("a systemd in namespaces needs CAP_SYS_ADMIN");
    }
    if !Path::new(SYSTEMD).is_file() {
        return Some(format!("{SYSTEMD} is missing"));
    }
    for tool in ["unshare", "nsenter"] {
        if which(tool).is_none() {
            return Some(format!("`{tool}` is not on $PATH"));
        }
    }
    None
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// The build's target directory (the parent of `CARGO_TARGET_TMPDIR`) when it is under
/// one of [`HIDDEN`]: the init script keeps it visible in the namespace.
fn kept() -> Option<PathBuf> {
    let tmpdir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(tmpdir).ok()?;
    let target = fs::canonicalize(tmpdir).ok()?.parent()?.to_path_buf();
    HIDDEN
        .iter()
        .any(|h| target.starts_with(h))
        .then_some(target)
}

/// Panics unless the namespace sees `path`: outside the directories it mounts afresh,
/// or inside the one kept ([`kept`]).
#[track_caller]
pub fn assert_visible(path: &Path) {
    let real =
        fs::canonicalize(path).unwrap_or_else(|e| panic!("cannot resolve {}: {e}", path.display()));
    if kept().is_some_and(|k| real.starts_with(k)) {
        return;
    }
    for hidden in HIDDEN {
        assert!(
            !real.starts_with(hidden),
            "{} is under {hidden}, which the systemd namespace replaces with an empty \
             tmpfs; build elsewhere (CARGO_TARGET_DIR)",
            real.display()
        );
    }
}

/// A fresh directory under `CARGO_TARGET_TMPDIR`, which the namespace sees. Removed on
/// drop, except when the test is failing (its files are evidence then).
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        fs::create_dir_all(base).expect("create CARGO_TARGET_TMPDIR");
        assert_visible(base);
        let path = base.join(format!(
            "systemd-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).expect("create scratch dir");
        Scratch(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if crate::harness::failing() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A systemd running as PID 1 of its own namespaces.
pub struct Systemd {
    /// The namespace's init (systemd) as the host sees it.
    init: u32,
    /// `unshare`, our child and init's parent. Reaped on drop, after init.
    unshare: Child,
    /// The cgroup (host path) that is the root of systemd's cgroup tree.
    cgroup: PathBuf,
    /// Unit file names, for diagnostics.
    units: Vec<String>,
    /// Our copy of the console's terminal end: while it is open, reading the pty never
    /// fails, however often systemd closes its own.
    console_slave: Option<fs::File>,
    /// Signalled by the console reader when it has stopped.
    console_done: mpsc::Receiver<()>,
    /// Set once [`diagnostics`](Systemd::diagnostics) went into a message: `drop`
    /// does not print them again.
    reported: Cell<bool>,
    /// Dropped first in `drop`: the watchdog stands down.
    watchdog: Option<mpsc::Sender<()>>,
    /// Logs, the init script and the units.
    dir: Scratch,
    /// Held until everything is gone: these tests never run in parallel with each other
    /// or with the examples' tests.
    _lock: MutexGuard<'static, ()>,
}

impl std::fmt::Debug for Systemd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Systemd")
            .field("init", &self.init)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Systemd {
    /// Boots systemd with `units` (file name, contents) in /run/systemd/system, and
    /// waits until `systemctl is-system-running` says `running`. No unit is started.
    /// Each unit gets a drop-in with `DefaultDependencies=no`; a `.service` also gets its
    /// stdout and stderr appended to a file ([`log`](Systemd::log)).
    ///
    /// Skips the calling test ([`crate::harness::skip`]: reported as ignored, with the
    /// reason) when not root or when systemd, `unshare` or `nsenter` is missing. Takes
    /// the examples' [`lock`].
    pub fn boot(units: &[(&str, &str)]) -> Systemd {
        if let Some(why) = skip_reason() {
            crate::harness::skip(why);
        }
        let guard = lock();
        let started = Instant::now();
        let dir = Scratch::new("boot");
        write_units(dir.path(), units);
        let script = dir.path().join("init.sh");
        fs::write(&script, INIT_SCRIPT).expect("write init script");
        let cgroup = make_cgroup();
        let (master, slave, slave_path) = open_pty();
        let console_done = read_console(master, dir.path().join("systemd.log"), started);
        let init_log = fs::File::create(dir.path().join("init.log")).expect("create init.log");

        // sh joins the cgroup, then becomes unshare: everything in the namespace is in
        // that cgroup, and the cgroup namespace is rooted there.
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&cgroup)
            .args([
                "unshare",
                "--kill-child",
                "-pfmuC",
                "--mount-proc",
                "/bin/sh",
            ])
            .arg(&script)
            .arg(dir.path())
            .arg(&slave_path)
            .arg(TARGET)
            .arg(log_level())
            .arg(kept().unwrap_or_default())
            .current_dir("/")
            .env_remove("TABLEFLIP_FDS")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(init_log.try_clone().expect("dup init.log"))
            .stderr(init_log);
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // prctl(2), which is async-signal-safe. With it, unshare (and through
        // --kill-child, init) is killed if this thread dies without dropping `Systemd`.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let unshare = cmd.spawn().expect("cannot start unshare");

        let (tx, rx) = mpsc::channel::<()>();
        let mut sd = Systemd {
            init: 0,
            unshare,
            cgroup,
            units: units.iter().map(|(name, _)| name.to_string()).collect(),
            console_slave: Some(slave),
            console_done,
            reported: Cell::new(false),
            watchdog: Some(tx),
            dir,
            _lock: guard,
        };
        sd.init = sd.find_init();
        let init = sd.init;
        thread::spawn(move || {
            // The sender is dropped with the Systemd: then this returns Disconnected.
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(WATCHDOG) {
                eprintln!(
                    "watchdog: killing the systemd namespace (init {init}) after {WATCHDOG:?}"
                );
                // SAFETY: kill(2) has no memory-safety preconditions. init cannot have
                // been reaped yet: the Systemd, which waits for it, still exists.
                unsafe { libc::kill(init as i32, libc::SIGKILL) };
            }
        });
        sd.wait_booted();
        eprintln!(
            "systemd booted in {:?} (init is pid {} on the host)",
            started.elapsed(),
            sd.init
        );
        sd
    }

    /// The host pid of init: unshare's only child.
    fn find_init(&mut self) -> u32 {
        let pid = self.unshare.id();
        let children = format!("/proc/{pid}/task/{pid}/children");
        let deadline = Instant::now() + DEADLINE;
        loop {
            let found = fs::read_to_string(&children).unwrap_or_default();
            if let Some(init) = found.split_whitespace().next() {
                return init.parse().expect("pid in /proc/.../children");
            }
            if let Ok(Some(status)) = self.unshare.try_wait() {
                panic!(
                    "unshare exited ({status}) before starting init:\n{}",
                    self.init_log()
                );
            }
            assert!(Instant::now() < deadline, "unshare started no init");
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Polls `systemctl is-system-running` until it says `running`.
    fn wait_booted(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        let mut last = String::new();
        loop {
            if let Ok(Some(status)) = self.unshare.try_wait() {
                panic!(
                    "the namespace's init exited ({status}) during boot; last \
                     is-system-running: {last:?}\ninit.log:\n{}\nsystemd:\n{}",
                    self.init_log(),
                    tail(&self.console(), 60)
                );
            }
            let out = self.try_systemctl(&["is-system-running"], DEADLINE);
            let state = out
                .as_ref()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            match state.as_str() {
                "running" => return,
                "degraded" => {
                    let failed = self.systemctl(&["list-units", "--failed"]);
                    panic!(
                        "systemd booted degraded:\n{}\nsystemd:\n{}",
                        String::from_utf8_lossy(&failed.stdout),
                        tail(&self.console(), 60)
                    );
                }
                _ => {}
            }
            last = match out {
                Ok(o) => format!("{state} {}", String::from_utf8_lossy(&o.stderr).trim()),
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "systemd not running after {DEADLINE:?}; last is-system-running: {last:?}\n\
                 init.log:\n{}\nsystemd:\n{}",
                self.init_log(),
                tail(&self.console(), 60)
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// `systemctl ARGS` in the namespace; its output and status. Panics if it takes longer
    /// than [`DEADLINE`].
    #[track_caller]
    pub fn systemctl(&self, args: &[&str]) -> Output {
        self.try_systemctl(args, DEADLINE)
            .unwrap_or_else(|e| panic!("systemctl {}: {e}", args.join(" ")))
    }

    fn try_systemctl(&self, args: &[&str], deadline: Duration) -> io::Result<Output> {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.init.to_string())
            .args(["-m", "-p", "systemctl", "--no-pager"])
            .args(args)
            .env("SYSTEMD_COLORS", "0")
            .env("LC_ALL", "C");
        run_with_deadline(&mut cmd, deadline)
    }

    /// `systemctl start UNIT`; panics with the unit's state and log if it fails.
    #[track_caller]
    pub fn start(&self, unit: &str) {
        self.expect_ok(&["start", unit], unit);
    }

    /// `systemctl stop UNIT`; panics with the unit's state and log if it fails.
    #[track_caller]
    pub fn stop(&self, unit: &str) {
        self.expect_ok(&["stop", unit], unit);
    }

    /// `systemctl reload UNIT`: its exit status. It returns when systemd's reload job is
    /// done, which with `ExecReload=/bin/kill -HUP $MAINPID` is when kill has exited.
    #[track_caller]
    pub fn reload(&self, unit: &str) -> ExitStatus {
        self.systemctl(&["reload", unit]).status
    }

    #[track_caller]
    fn expect_ok(&self, args: &[&str], unit: &str) {
        let out = self.systemctl(args);
        assert!(
            out.status.success(),
            "systemctl {} failed ({}): {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            self.diagnostics(unit)
        );
    }

    /// The values of `properties` of `unit` (`systemctl show -p ...`).
    #[track_caller]
    pub fn show_all(&self, unit: &str, properties: &[&str]) -> HashMap<String, String> {
        let mut args = vec!["show", unit];
        for p in properties {
            args.extend(["-p", p]);
        }
        let out = self.systemctl(&args);
        assert!(
            out.status.success(),
            "systemctl show {unit}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// One property of `unit`: `show("x.service", "NFileDescriptorStore")`.
    #[track_caller]
    pub fn show(&self, unit: &str, property: &str) -> String {
        self.show_all(unit, &[property])
            .remove(property)
            .unwrap_or_default()
    }

    /// `MainPID` of `unit` (0: none), a pid of the namespace.
    #[track_caller]
    pub fn main_pid(&self, unit: &str) -> u32 {
        let pid = self.show(unit, "MainPID");
        pid.parse()
            .unwrap_or_else(|_| panic!("MainPID of {unit}: {pid:?}"))
    }

    /// Polls `f` every 10 ms until it returns `Some`; after [`DEADLINE`] panics (and
    /// `drop` prints every unit's state and log).
    #[track_caller]
    pub fn wait_for<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {DEADLINE:?} waiting for {what}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `unit` is `active` (its `SubState` is returned). Panics at once if it
    /// has gone `failed` or `inactive`.
    #[track_caller]
    pub fn wait_active(&self, unit: &str) -> String {
        self.wait_for(&format!("{unit} to be active"), || {
            let props = self.show_all(unit, &["ActiveState", "SubState", "Result"]);
            let active = props.get("ActiveState").map_or("", String::as_str);
            assert!(
                !matches!(active, "failed" | "inactive"),
                "{unit} is {active} ({:?}):\n{}",
                props,
                self.diagnostics(unit)
            );
            (active == "active").then(|| props.get("SubState").cloned().unwrap_or_default())
        })
    }

    /// What the unit wrote to stdout and stderr (a `.service` of [`boot`](Systemd::boot)).
    pub fn log(&self, unit: &str) -> String {
        fs::read_to_string(self.log_path(unit)).unwrap_or_default()
    }

    fn log_path(&self, unit: &str) -> PathBuf {
        self.dir.path().join(format!("{unit}.log"))
    }

    /// systemd's own messages so far (see [`log_level`]), from its console, each line prefixed
    /// with `[seconds]` since `boot` began.
    pub fn console(&self) -> String {
        fs::read_to_string(self.dir.path().join("systemd.log")).unwrap_or_default()
    }

    fn init_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("init.log")).unwrap_or_default()
    }

    /// Whether `pid`, a pid of the namespace, is a live process there (not a zombie).
    pub fn alive(&self, pid: u32) -> bool {
        let stat = self.inside(&format!("/proc/{pid}/stat"));
        fs::read_to_string(stat).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
    }

    /// The host path of `path` as the namespace sees it (`/run/x.pid`, say).
    pub fn inside(&self, path: &str) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.init)).join(path.trim_start_matches('/'))
    }

    /// The host path of `unit`'s cgroup, while it has one.
    #[track_caller]
    pub fn unit_cgroup(&self, unit: &str) -> PathBuf {
        let cg = self.show(unit, "ControlGroup");
        assert!(!cg.is_empty(), "{unit} has no cgroup");
        self.cgroup.join(cg.trim_start_matches('/'))
    }

    /// systemd's messages about `unit` and about processes exiting, without the chatter
    /// that our own `systemctl` calls cause.
    pub fn console_about(&self, unit: &str) -> String {
        const CHATTER: [&str; 5] = [
            "Collecting.",
            "Preset files",
            "Found unit",
            "unit change signal",
            "message type=",
        ];
        let lines: Vec<String> = self
            .console()
            .lines()
            .filter(|l| {
                let message = l.split_once("] ").map_or(*l, |(_, m)| m);
                (message.contains(unit)
                    || message.starts_with("Child ")
                    || message.starts_with("Received SIGCHLD"))
                    && !CHATTER.iter().any(|c| message.contains(c))
            })
            .map(str::to_owned)
            .collect();
        lines.join("\n")
    }

    /// The state of `unit` as systemd reports it, its log, and the end of systemd's
    /// messages about it. `drop` prints them when the test fails, unless they have been
    /// asked for already (for a panic message).
    pub fn diagnostics(&self, unit: &str) -> String {
        self.reported.set(true);
        let status = self
            .try_systemctl(&["status", "-l", "--lines=0", unit], Duration::from_secs(5))
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("(systemctl status: {e})"));
        format!(
            "--- systemctl status {unit} ---\n{status}--- log of {unit} ---\n{}\
             --- systemd about {unit} (the last lines; all of it in {}) ---\n{}",
            tail(&self.log(unit), 40),
            self.dir.path().join("systemd.log").display(),
            tail(&self.console_about(unit), 40)
        )
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        self.watchdog = None;
        let running = matches!(self.unshare.try_wait(), Ok(None));
        if thread::panicking() && !self.reported.get() {
            if running {
                for unit in &self.units {
                    eprintln!("{}", self.diagnostics(unit));
                }
            } else {
                eprintln!(
                    "the namespace had already exited; systemd:\n{}",
                    tail(&self.console(), 60)
                );
            }
        }
        if running && self.init != 0 {
            // SAFETY: kill(2) has no memory-safety preconditions. unshare has not been
            // reaped, so its child init cannot have been reaped and its pid reused.
            unsafe { libc::kill(self.init as i32, libc::SIGKILL) };
        } else if running {
            // No init was found (kill(0, ..) would hit our own process group).
            let _ = self.unshare.kill();
        }
        // The kernel kills the rest of the namespace before init is reaped.
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.unshare.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    eprintln!("unshare still running; killing it");
                    let _ = self.unshare.kill();
                    let _ = self.unshare.wait();
                    break;
                }
                Ok(None) => thread::sleep(Duration::from_millis(5)),
            }
        }
        // No terminal end is left open: the console reader sees EIO and stops.
        self.console_slave = None;
        let _ = self.console_done.recv_timeout(Duration::from_secs(5));
        remove_cgroup(&self.cgroup, Instant::now() + DEADLINE);
    }
}

/// Writes the units and their drop-ins into `dir/units`, and the harness's target.
fn write_units(dir: &Path, units: &[(&str, &str)]) {
    let units_dir = dir.join("units");
    fs::create_dir(&units_dir).expect("create units dir");
    let target = "[Unit]\nDescription=tableflip test harness\nDefaultDependencies=no\n";
    fs::write(units_dir.join(TARGET), target).unwrap();
    for (name, contents) in units {
        assert!(
            !name.contains('/') && *name != TARGET && name.contains('.'),
            "bad unit file name {name:?}"
        );
        fs::write(units_dir.join(name), contents).unwrap();
        let mut dropin =
            String::from("# Written by the test harness.\n[Unit]\nDefaultDependencies=no\n");
        if name.ends_with(".service") {
            let log = dir.join(format!("{name}.log"));
            fs::File::create(&log).expect("create unit log");
            dropin.push_str(&format!(
                "[Service]\nStandardOutput=append:{0}\nStandardError=append:{0}\n",
                log.display()
            ));
        }
        let dropin_dir = units_dir.join(format!("{name}.d"));
        fs::create_dir(&dropin_dir).unwrap();
        fs::write(dropin_dir.join("tableflip-harness.conf"), dropin).unwrap();
    }
}

/// Creates the cgroup that roots systemd's tree, under this process's own cgroup in
/// the host's cgroup2 hierarchy, after removing empty ones left by dead test processes.
fn make_cgroup() -> PathBuf {
    let base = cgroup2_dir().unwrap_or_else(|e| {
        panic!("cannot find this process's cgroup2 directory (systemd needs one): {e}")
    });
    let prefix = "tableflip-systemd-";
    if let Ok(entries) = fs::read_dir(&base) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let owner = name
                .strip_prefix(prefix)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                remove_cgroup(&entry.path(), Instant::now());
            }
        }
    }
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = base.join(format!(
        "{prefix}{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", dir.display()));
    dir
}

/// Where this process's cgroup2 cgroup is on the host: the cgroup2 mount point from
/// mountinfo, joined with the `0::` path from /proc/self/cgroup.
fn cgroup2_dir() -> io::Result<PathBuf> {
    let own = fs::read_to_string("/proc/self/cgroup")?;
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| io::Error::other("no cgroup2 line in /proc/self/cgroup"))?
        .to_string();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split(' ').next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split(' ').collect();
        let (Some(root), Some(mount_point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let Ok(rel) = Path::new(&own).strip_prefix(root) else {
            continue;
        };
        let dir = Path::new(mount_point).join(rel);
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    Err(io::Error::other(
        "no cgroup2 mount holds this process's cgroup",
    ))
}

/// Removes `dir` and the cgroups below it, deepest first, retrying until `deadline`
/// while processes are still leaving them.
fn remove_cgroup(dir: &Path, deadline: Instant) {
    fn subdirs(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    subdirs(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    loop {
        let mut all = Vec::new();
        subdirs(dir, &mut all);
        let mut last_error = None;
        for d in &all {
            if let Err(e) = fs::remove_dir(d) {
                if e.kind() != io::ErrorKind::NotFound {
                    last_error = Some((d.clone(), e));
                }
            }
        }
        let Some((d, e)) = last_error else { return };
        if Instant::now() >= deadline {
            eprintln!("cannot remove cgroup {}: {e}", d.display());
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Every pid (host pids) in the cgroup at `dir` and below; empty once it is gone.
pub fn cgroup_procs(dir: &Path) -> Vec<u32> {
    let mut out: Vec<u32> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(cgroup_procs(&e.path()));
            }
        }
    }
    out
}

/// Copies what arrives on the pty `master` to `log` until the pty is hung up, each line
/// prefixed with the seconds since `start` at which it arrived; the receiver hears when
/// it has stopped.
fn read_console(master: OwnedFd, log: PathBuf, start: Instant) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    let mut out = fs::File::create(log).expect("create systemd.log");
    let mut master = fs::File::from(master);
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        let mut line = Vec::new();
        // EIO once no terminal end is open any more.
        while let Ok(n @ 1..) = master.read(&mut buf) {
            let at = start.elapsed().as_secs_f64();
            for &b in &buf[..n] {
                match b {
                    b'\r' => {}
                    b'\n' => {
                        let _ = writeln!(out, "[{at:10.6}] {}", String::from_utf8_lossy(&line));
                        line.clear();
                    }
                    _ => line.push(b),
                }
            }
        }
        let _ = tx.send(());
    });
    rx
}

/// Runs `cmd` with its output captured; kills it and fails after `deadline`.
fn run_with_deadline(cmd: &mut Command, deadline: Duration) -> io::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let readers = [
        reader(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
        reader(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
    ];
    let end = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{cmd:?} still running after {deadline:?}; killed"),
            ));
        }
        thread::sleep(Duration::from_millis(1));
    };
    let [stdout, stderr] = readers.map(|r| r.join().unwrap_or_default());
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn reader(stream: Option<Box<dyn Read + Send>>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut s) = stream {
            let _ = s.read_to_end(&mut out);
        }
        out
    })
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    out.push('\n');
    out
}
