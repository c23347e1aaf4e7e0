//! The server under test: started from the deployed binary, followed across its
//! generations through its pid file, upgraded with `SIGHUP` and stopped with `SIGTERM`.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use crate::load::{idle_fd_count, probe, Failure, Load, Proto};
use crate::procs::{
    exited, kill_descendants, micros, now_us, signal, status_text, strays, wait_for, wait_reaped,
};
use crate::{Res, DRAIN_TIMEOUT, STEP_TIMEOUT};

/// A server started from `bin`, and every generation it has had.
pub struct Server {
    pub addr: SocketAddr,
    pid_file: PathBuf,
    log: PathBuf,
    pub upgrade_timeout: Duration,
    proto: Proto,
    /// The generation that serves now.
    pub current: u32,
    pub generations: Vec<u32>,
    stopped: bool,
}

/// One successful upgrade, times measured from the SIGHUP.
pub struct Upgrade {
    pub old: u32,
    pub new: u32,
    /// Until a connection was answered by the new pid.
    pub latency: Duration,
    /// Until the pid file named the new pid.
    pub ready: Duration,
    /// How long the old generation kept answering after the new one was ready (the pid
    /// file named it, or it answered).
    pub overlap: Duration,
    /// Until every thread of the old generation had exited.
    pub old_exit: Duration,
    /// Connections answered from the SIGHUP until the old generation had exited.
    pub answered: u64,
    /// The new generation's fd count, idle.
    pub fds: usize,
}

impl Server {
    /// Starts `bin` (as `argv[0]`) in `dir` on a free loopback port, and waits until it
    /// has written its pid file and answered a connection.
    pub fn start(
        label: &str,
        bin: &Path,
        dir: &Path,
        upgrade_timeout: Duration,
        proto: Proto,
    ) -> Res<Server> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("cannot find a free port: {e}"))?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let pid_file = dir.join(format!("{label}.pid"));
        let log = dir.join(format!("{label}.log"));
        let log_file =
            fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let child = Command::new(bin)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("--upgrade-timeout")
            .arg(upgrade_timeout.as_secs_f64().to_string())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        // Reaped by `reap_all` like every later generation.
        let pid = child.id();
        drop(child);
        let mut server = Server {
            addr,
            pid_file,
            log,
            upgrade_timeout,
            proto,
            current: pid,
            generations: vec![pid],
            stopped: false,
        };
        let ready = wait_for(
            "the server to be ready",
            STEP_TIMEOUT,
            Duration::from_millis(5),
            || {
                if exited(pid) {
                    return Err(format!("the server (pid {pid}) exited during start-up"));
                }
                Ok(
                    (server.pid_from_file() == Some(pid) && server.probe().ok() == Some(pid))
                        .then_some(()),
                )
            },
        );
        if let Err(e) = ready {
            server.stopped = true; // nothing to stop cleanly: Workspace kills it
            return Err(server.with_log(e));
        }
        Ok(server)
    }

    /// One connection (one request with `Connection: close` over HTTP): the pid that
    /// answered.
    pub fn probe(&self) -> Result<u32, (Failure, String)> {
        probe(self.addr, self.proto)
    }

    pub fn pid_from_file(&self) -> Option<u32> {
        fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()
    }

    /// The server's log lines that report a failed upgrade.
    pub fn failure_lines(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("upgrade failed"))
            .map(str::to_owned)
            .collect()
    }

    /// `msg`, followed by the end of the server's log.
    pub fn with_log(&self, msg: String) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n    ");
        format!("{msg}\n  end of the server's log:\n    {tail}")
    }

    /// Sends SIGHUP to the current generation and follows the upgrade to its end: the
    /// new generation is ready and answering, the old one has exited with status 0.
    pub fn upgrade(&mut self, load: &Load) -> Res<Upgrade> {
        let old = self.current;
        let logged_before = self.failure_lines().len();
        let answered_before = load.shared.answered.load(SeqCst);
        let sent = now_us();
        signal(old, libc::SIGHUP)?;

        // Ready: ready() writes the pid file before the old generation is told.
        let mut polls = 0u32;
        let (new, ready_at) = wait_for(
            "the pid file to name a new generation",
            self.upgrade_timeout + STEP_TIMEOUT,
            Duration::from_millis(1),
            || {
                if let Some(pid) = self.pid_from_file().filter(|&p| p != old) {
                    return Ok(Some((pid, now_us())));
                }
                polls += 1;
                if polls % 20 == 0 {
                    if let Some(line) = self.failure_lines().get(logged_before) {
                        return Err(format!("pid {old}: {}", line.trim()));
                    }
                    if exited(old) {
                        return Err(format!("pid {old} exited without a successor"));
                    }
                }
                Ok(None)
            },
        )?;
        self.generations.push(new);
        self.current = new;
        let answered_at = load.wait_answered_by(new, sent)?;

        // The old generation drains and exits: every thread, with status 0.
        wait_for(
            &format!("the old generation (pid {old}) to exit"),
            DRAIN_TIMEOUT + STEP_TIMEOUT,
            Duration::from_millis(1),
            || Ok(exited(old).then_some(())),
        )?;
        let exited_at = now_us();
        let answered = load.shared.answered.load(SeqCst) - answered_before;
        let status = wait_reaped(old)?;
        if status.is_some_and(|s| !(libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0)) {
            return Err(format!(
                "the old generation (pid {old}) ended with {}",
                status_text(status)
            ));
        }
        let strays = strays(new);
        if !strays.is_empty() {
            return Err(format!(
                "after the upgrade to pid {new}, processes were left: {}",
                strays.join(", ")
            ));
        }

        let ready_ref = ready_at.min(answered_at);
        let last_old = load.seen(old).map_or(0, |s| s.last);
        let fds = idle_fd_count(new, Some(load))?;
        Ok(Upgrade {
            old,
            new,
            latency: micros(answered_at - sent),
            ready: micros(ready_at - sent),
            overlap: micros(last_old.saturating_sub(ready_ref)),
            old_exit: micros(exited_at - sent),
            answered,
            fds,
        })
    }

    /// SIGTERM to the current generation, which must exit with status 0.
    pub fn stop(&mut self) -> Res<()> {
        let pid = self.current;
        signal(pid, libc::SIGTERM)?;
        wait_for(
            &format!("pid {pid} to exit after SIGTERM"),
            DRAIN_TIMEOUT + STEP_TIMEOUT,
            Duration::from_millis(2),
            || Ok(exited(pid).then_some(())),
        )?;
        let status = wait_reaped(pid)?;
        self.stopped = true;
        if status.is_some_and(|s| !(libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0)) {
            return Err(format!(
                "pid {pid} ended with {} after SIGTERM",
                status_text(status)
            ));
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.stopped {
            kill_descendants();
        }
    }
}
