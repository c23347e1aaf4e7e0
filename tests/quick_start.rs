//! The README's quick start, run as it stands, so that it stays true: the steps are
//! written once, in the README, and this test runs those very lines.
//!
//! # The convention, for whoever edits the README
//!
//! - A fenced block runs when its info string carries the word `quick-start` after the
//!   language (```` ```sh quick-start ````). The marked blocks run in the order they
//!   come, line by line, in one `sh`; blank and comment-only lines are skipped.
//!   Unmarked blocks are not run. The quick start must show a start, two upgrades (the
//!   second after a deploy by rename) and a stop, with the answers in between.
//! - The steps run in a scratch directory that looks like the repository's root to them:
//!   it holds a copy of `examples/minimal.rs` (and `examples/common/`). There
//!   `cargo build --example minimal` is a stand-in that compiles that copy with the
//!   workspace's rustc against the libraries the workspace built for the example (the
//!   real command would compile every dependency again, about a minute); any other
//!   `cargo` command fails. `nc` is the machine's, or where it has none, the README's own
//!   alternative, `cat < /dev/tcp/HOST/PORT`. The port 8080 is replaced by a free one
//!   wherever it appears.
//! - What each line is checked for, and waited for before the next line is run (as a
//!   person would, before typing it):
//!   - every line exits with status 0;
//!   - `COMMAND  # → OUTPUT`: the command prints OUTPUT. A number in OUTPUT stands for a
//!     pid, which must be that of the generation serving then: the same number, the
//!     same pid; different numbers, different pids;
//!   - a line that ends in `&` starts the service: a generation reports ready (it logs
//!     `ready`) and the pid file, `minimal.pid`, names it;
//!   - `kill -HUP ...` upgrades: a new generation reports ready, the pid file names it,
//!     and the old one exits;
//!   - `kill -TERM ...` stops: the generation exits.
//!
//!   At the end every generation has exited, each with status 0, and no process is left.
#![cfg(target_os = "linux")]

#[allow(dead_code)]
#[path = "util/examples.rs"]
mod util;

#[allow(dead_code)]
#[path = "util/docs.rs"]
mod docs;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use util::{become_subreaper, free_port, group_empty, lock, reap_group, TempDir, DEADLINE};

/// The word of a block's info string that makes the test run it.
const MARKER: &str = "quick-start";
/// What starts an expected output, in a line's comment.
const ARROW: &str = "# →";
/// The port the README uses, replaced by a free one.
const PORT: &str = "8080";
/// Where the example writes its pid, in its working directory.
const PID_FILE: &str = "minimal.pid";
/// The start of the example's log lines, followed by `PID] `.
const LOG_TAG: &str = "[minimal pid=";
/// The line the shell prints after each step, with the step's exit status.
const DONE: &str = "@@quick-start-step-done";
/// A run that takes longer than this has its processes killed.
const WATCHDOG: Duration = Duration::from_secs(240);

#[test]
fn the_readmes_quick_start_works_as_written() {
    let _lock = lock();
    become_subreaper();
    let readme = fs::read_to_string(docs::root().join("README.md")).expect("read README.md");
    let steps = steps(&readme);
    let kinds: Vec<Kind> = steps.iter().map(|s| kind(s)).collect();
    let count = |k: Kind| kinds.iter().filter(|&&x| x == k).count();
    assert!(
        count(Kind::Start) == 1
            && count(Kind::Upgrade) >= 2
            && count(Kind::Stop) == 1
            && count(Kind::Probe) >= 3
            && steps.iter().any(|s| s.starts_with("mv ")),
        "the README's {MARKER} blocks must start the service, connect, upgrade, deploy by \
         renaming (mv), upgrade again and stop; they run:\n{}",
        steps.join("\n")
    );

    let dir = TempDir::new("quick-start");
    let repo = docs::root();
    fs::create_dir_all(dir.path().join("examples/common")).unwrap();
    for file in ["examples/minimal.rs", "examples/common/signals.rs"] {
        fs::copy(repo.join(file), dir.path().join(file)).expect(file);
    }
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    write_cargo_stand_in(&bin);
    if !on_path("nc") {
        let nc = "#!/bin/bash\n# The README's alternative to nc (tests/quick_start.rs).\n\
                  exec cat < \"/dev/tcp/$1/$2\"\n";
        write_script(&bin.join("nc"), nc);
    }

    let port = free_port().to_string();
    let mut shell = Shell::start(dir.path(), &bin);
    let mut service = Service::new(dir.path(), shell.log.clone());
    let mut pids = BTreeMap::new();
    for (step, kind) in steps.iter().zip(kinds) {
        let line = step.replace(PORT, &port);
        let (status, output) = shell.run(&line);
        assert_eq!(status, 0, "`{line}` failed: {output}\n{}", shell.log());
        match kind {
            Kind::Probe => {
                let expected = step.split(ARROW).nth(1).unwrap().trim();
                let serving = service.serving.expect("a probe while nothing serves");
                match matches(expected, output.trim_end(), &mut pids) {
                    Ok(found) if found.iter().all(|&pid| pid == serving) => {}
                    Ok(found) => panic!(
                        "`{line}` printed {output:?}: pids {found:?}, but pid {serving} serves"
                    ),
                    Err(why) => panic!("`{line}` printed {output:?}, not {expected:?}: {why}"),
                }
            }
            Kind::Start => service.started(),
            Kind::Upgrade => service.upgraded(),
            Kind::Stop => service.stopped(),
            Kind::Plain => {}
        }
    }

    // The first generation is the shell's child: the shell has its exit status.
    let first = service.generations[0];
    let (status, _) = shell.run(&format!("wait {first}"));
    assert_eq!(
        status, 0,
        "pid {first} (the first generation) exited with {status}"
    );
    let later = service.generations[1..].to_vec();
    for pid in later {
        let status = service.reaped(pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "pid {pid} did not exit with status 0 (raw wait status {status:#x})"
        );
    }
    let log = shell.log();
    assert!(!log.contains("upgrade failed"), "{log}");
    shell.finish();
}

/// The lines of the README's blocks marked [`MARKER`], in order, without blank and
/// comment-only lines.
fn steps(readme: &str) -> Vec<String> {
    let mut out = Vec::new();
    // Inside a fenced block: whether it is marked.
    let mut block: Option<bool> = None;
    for line in readme.lines() {
        if let Some(info) = line.strip_prefix("```") {
            block = match block {
                Some(_) => None,
                None => Some(info.split([' ', ',']).any(|word| word == MARKER)),
            };
        } else if block == Some(true) && !line.trim().is_empty() && !line.starts_with('#') {
            out.push(line.to_string());
        }
    }
    out
}

/// What a step does, and so what it is checked for (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Start,
    Upgrade,
    Stop,
    Probe,
    Plain,
}

fn kind(step: &str) -> Kind {
    let command = step.split(" #").next().unwrap().trim();
    if step.contains(ARROW) {
        Kind::Probe
    } else if command.ends_with('&') {
        Kind::Start
    } else if command.starts_with("kill -HUP ") {
        Kind::Upgrade
    } else if command.starts_with("kill -TERM ") {
        Kind::Stop
    } else {
        Kind::Plain
    }
}

/// Whether `actual` is `expected` with each number of `expected` standing for a pid;
/// returns the pids found. `pids` binds the numbers written to the pids seen: the same
/// number must be the same pid, another number another pid.
fn matches(
    expected: &str,
    actual: &str,
    pids: &mut BTreeMap<u64, u32>,
) -> Result<Vec<u32>, String> {
    let mut found = Vec::new();
    let mut rest = actual;
    let mut text = expected;
    while !text.is_empty() {
        let digits = text.len() - text.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            let literal = text.split(|c: char| c.is_ascii_digit()).next().unwrap();
            rest = rest
                .strip_prefix(literal)
                .ok_or_else(|| format!("{rest:?} does not start with {literal:?}"))?;
            text = &text[literal.len()..];
            continue;
        }
        let written: u64 = text[..digits].parse().map_err(|e| format!("{e}"))?;
        let len = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let pid: u32 = rest[..len]
            .parse()
            .map_err(|_| format!("no pid at {rest:?}"))?;
        match pids.get(&written) {
            Some(&bound) if bound != pid => {
                return Err(format!("{written} was pid {bound} before, now {pid}"))
            }
            None if pids.values().any(|&p| p == pid) => {
                return Err(format!("{written} is new, but pid {pid} was seen before"))
            }
            _ => {}
        }
        pids.insert(written, pid);
        found.push(pid);
        rest = &rest[len..];
        text = &text[digits..];
    }
    match rest.is_empty() {
        true => Ok(found),
        false => Err(format!("{rest:?} more")),
    }
}

/// A `cargo` for the steps that does `cargo build --example minimal` only: it compiles
/// the scratch copy of `examples/minimal.rs` as cargo would, with the workspace's rustc,
/// against the libraries the workspace's build of the example used.
fn write_cargo_stand_in(bin: &Path) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let out = Command::new(&cargo)
        .args(["build", "-p", "tableflip", "--example", "minimal"])
        .arg("--message-format=json")
        .current_dir(docs::root())
        .stdin(Stdio::null())
        .output()
        .expect("run cargo build --example minimal");
    assert!(
        out.status.success(),
        "cargo build --example minimal: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8(out.stdout).expect("cargo's JSON");
    let artifact = |kind: &str, name: &str| {
        let (kind, name) = (
            format!("\"kind\":[\"{kind}\"]"),
            format!("\"name\":\"{name}\""),
        );
        json.lines()
            .find(|l| l.contains("\"compiler-artifact\"") && l.contains(&kind) && l.contains(&name))
            .unwrap_or_else(|| panic!("cargo built no {kind} {name}:\n{json}"))
    };
    let rlib = |name: &str| {
        let line = artifact("lib", name);
        let files = &line[line.find("\"filenames\":[").expect("filenames")..];
        let files = &files[..files.find(']').expect("the end of filenames")];
        let rlib = files
            .split('"')
            .find(|f| f.ends_with(".rlib"))
            .unwrap_or_else(|| panic!("no rlib for {name}: {line}"));
        PathBuf::from(rlib)
    };
    let example = artifact("example", "minimal");
    let edition = example.split("\"edition\":\"").nth(1).expect("edition");
    let edition = &edition[..edition.find('"').unwrap()];
    // The crates examples/minimal.rs uses.
    let tableflip = rlib("tableflip");
    let signal_hook = rlib("signal_hook");
    let deps = tableflip.parent().unwrap();
    let rustc = Path::new(&cargo).with_file_name("rustc");
    let rustc = if rustc.is_file() {
        rustc
    } else {
        "rustc".into()
    };
    let quote = |p: &Path| {
        let p = p.to_str().expect("a UTF-8 path");
        assert!(!p.contains('\''), "a path with a quote: {p}");
        format!("'{p}'")
    };
    let script = format!(
        "#!/bin/sh\n\
         # tests/quick_start.rs's cargo: `cargo build --example minimal` only.\n\
         [ \"$*\" = 'build --example minimal' ] || {{ echo \"not in the quick-start test: cargo $*\" >&2; exit 2; }}\n\
         mkdir -p target/debug/examples && exec {} --edition {edition} --crate-name minimal \
         --crate-type bin -o target/debug/examples/minimal examples/minimal.rs \
         -L dependency={} --extern tableflip={} --extern signal_hook={}\n",
        quote(&rustc),
        quote(deps),
        quote(&tableflip),
        quote(&signal_hook),
    );
    write_script(&bin.join("cargo"), &script);
}

fn write_script(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
}

/// One `sh` that runs the steps in order, in a process group of its own (which the
/// service's generations join), killed on drop or by a watchdog.
struct Shell {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: mpsc::Receiver<String>,
    log: PathBuf,
    finished: bool,
    _watchdog: mpsc::Sender<()>,
}

impl Shell {
    /// `sh` in `dir`, with `bin` first on its `PATH`; its stderr, which the service
    /// inherits, goes to a log file in `dir`.
    fn start(dir: &Path, bin: &Path) -> Shell {
        let log = dir.join("quick-start.log");
        let path = std::env::var_os("PATH").unwrap_or_default();
        let path = std::env::join_paths(
            std::iter::once(bin.to_path_buf()).chain(std::env::split_paths(&path)),
        )
        .unwrap();
        let mut cmd = Command::new("sh");
        cmd.current_dir(dir)
            .env("PATH", path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log).unwrap());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().expect("start sh");
        let pgid = child.id() as i32;
        let (tx, rx) = mpsc::channel::<()>();
        thread::spawn(move || {
            // The sender is dropped with the Shell: then this returns Disconnected.
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(WATCHDOG) {
                eprintln!("watchdog: killing process group {pgid}");
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
        });
        let (lines, stdout) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    return;
                }
            }
        });
        Shell {
            stdin: child.stdin.take(),
            child,
            stdout,
            log,
            finished: false,
            _watchdog: tx,
        }
    }

    /// Runs `line` (its stdin /dev/null) and returns its exit status and output.
    fn run(&mut self, line: &str) -> (i32, String) {
        let script = format!("{{ {line}\n}} </dev/null\nprintf '\\n{DONE} %s\\n' \"$?\"\n");
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(script.as_bytes()).expect("write to sh");
        stdin.flush().unwrap();
        let mut output = String::new();
        loop {
            let next = self.stdout.recv_timeout(DEADLINE);
            let out = next.unwrap_or_else(|e| {
                panic!(
                    "`{line}`: no end after {DEADLINE:?} ({e}): {output}\n{}",
                    self.log()
                )
            });
            if let Some(status) = out.strip_prefix(DONE) {
                let status = status.trim().parse().expect("the status");
                return (status, output.trim_end_matches('\n').to_string());
            }
            output.push_str(&out);
            output.push('\n');
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ends the shell and checks that nothing of its process group is left.
    fn finish(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().expect("wait for sh");
        assert!(status.success(), "sh: {status}");
        let pgid = self.child.id() as i32;
        let deadline = Instant::now() + DEADLINE;
        while !group_empty(pgid) {
            reap_group(pgid);
            assert!(
                Instant::now() < deadline,
                "processes left over:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
        self.finished = true;
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("--- log of the steps ---\n{}---", self.log());
        }
        if !self.finished {
            // SAFETY: kill(2) has no memory-safety preconditions; the group is the one
            // of our child, not reaped yet.
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.wait();
            reap_group(self.child.id() as i32);
        }
    }
}

/// The example as the steps run it: its generations, followed through its pid file and
/// its log.
struct Service {
    pid_file: PathBuf,
    log: PathBuf,
    /// The generation serving now.
    serving: Option<u32>,
    /// Every generation, in order.
    generations: Vec<u32>,
    /// The wait status of each generation this process has reaped (every one but the
    /// first, the shell's child, is reparented here).
    statuses: BTreeMap<u32, i32>,
}

impl Service {
    fn new(dir: &Path, log: PathBuf) -> Service {
        Service {
            pid_file: dir.join(PID_FILE),
            log,
            serving: None,
            generations: Vec::new(),
            statuses: BTreeMap::new(),
        }
    }

    /// After a start: a generation is ready, and the pid file names it.
    fn started(&mut self) {
        assert_eq!(self.serving, None, "started twice");
        let pid = self.wait_for("the service to be ready", |s| {
            s.pid_from_file().filter(|&pid| s.ready(pid))
        });
        self.serving = Some(pid);
        self.generations.push(pid);
    }

    /// After `kill -HUP`: a new generation is ready, the pid file names it, and the old
    /// one has exited.
    fn upgraded(&mut self) {
        let old = self.serving.expect("an upgrade while nothing serves");
        let new = self.wait_for("a new generation to take over", |s| {
            let new = s
                .pid_from_file()
                .filter(|&pid| pid != old && s.ready(pid))?;
            s.exited(old).then_some(new)
        });
        self.serving = Some(new);
        self.generations.push(new);
    }

    /// After `kill -TERM`: the generation serving has exited.
    fn stopped(&mut self) {
        let old = self.serving.take().expect("a stop while nothing serves");
        self.wait_for("the service to exit", |s| s.exited(old).then_some(()));
    }

    /// The wait status of `pid`, a generation reparented to this process.
    fn reaped(&mut self, pid: u32) -> i32 {
        self.wait_for(&format!("pid {pid} to be reaped"), |s| {
            s.exited(pid);
            s.statuses.get(&pid).copied()
        })
    }

    fn pid_from_file(&self) -> Option<u32> {
        fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()
    }

    fn ready(&self, pid: u32) -> bool {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        log.contains(&format!("{LOG_TAG}{pid}] ready"))
    }

    /// Whether `pid` has exited; reaps it if it is this process's child.
    fn exited(&mut self, pid: u32) -> bool {
        if self.statuses.contains_key(&pid) {
            return true;
        }
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        if unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) } == pid as i32 {
            self.statuses.insert(pid, status);
            return true;
        }
        // Not our child (yet): gone, or a zombie its parent has not reaped.
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z')),
        }
    }

    /// Polls `f` every 10 ms until it returns `Some`; panics after [`DEADLINE`].
    fn wait_for<T>(&mut self, what: &str, mut f: impl FnMut(&mut Self) -> Option<T>) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if Instant::now() >= deadline {
                let log = fs::read_to_string(&self.log).unwrap_or_default();
                panic!("timed out after {DEADLINE:?} waiting for {what}:\n{log}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The matching of expected outputs: numbers are pids, bound once.
#[test]
fn expected_outputs_match_with_numbers_as_pids() {
    let mut pids = BTreeMap::new();
    assert_eq!(
        matches("hello from pid 4242", "hello from pid 17", &mut pids),
        Ok(vec![17])
    );
    assert!(matches("hello from pid 4242", "hello from pid 18", &mut pids).is_err());
    assert!(matches("hello from pid 4250", "hello from pid 17", &mut pids).is_err());
    assert_eq!(
        matches("hi from pid 4250", "hi from pid 18", &mut pids),
        Ok(vec![18])
    );
    assert!(matches("hi from pid 4250", "howdy from pid 18", &mut pids).is_err());
    assert!(matches("hi from pid 4250", "hi from pid 18 and more", &mut pids).is_err());
    assert!(matches("hi from pid 4250", "hi from pid x", &mut pids).is_err());
}

/// The steps are the marked blocks' lines, in order, and nothing else.
#[test]
fn only_marked_blocks_are_steps() {
    let readme = "```sh\nnot me\n```\n\n```sh quick-start\na\n# a comment\n\nb &\n```\n\
                  ```rust\nfn main() {}\n```\n```sh,quick-start\nkill -HUP 1  # x\n```\n";
    assert_eq!(steps(readme), ["a", "b &", "kill -HUP 1  # x"]);
    let kinds: Vec<Kind> = steps(readme).iter().map(|s| kind(s)).collect();
    assert_eq!(kinds, [Kind::Plain, Kind::Start, Kind::Upgrade]);
}
