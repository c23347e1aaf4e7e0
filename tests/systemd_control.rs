//! `tcp_server` under a real systemd (booted by `util/systemd.rs` in namespaces of its
//! own) with its control socket as `ExecReload=`: a good `systemctl reload` succeeds and
//! `MainPID` follows the new generation; a deploy that exits 3 makes `systemctl reload`
//! fail, with the new generation's reason in the unit's log, while the unit stays active
//! with the same `MainPID` and keeps serving. Reported as ignored, with
//! the reason, when not root or when systemd, `unshare` or `nsenter` is missing.

// The examples' harness: `lock()`, `example()`, ports and client load.
#[cfg(target_os = "linux")]
#[allow(dead_code)]
#[path = "util/examples.rs"]
mod util;

#[cfg(target_os = "linux")]
#[allow(dead_code)]
#[path = "util/systemd.rs"]
mod systemd;

#[cfg(target_os = "linux")]
#[path = "util/harness.rs"]
mod harness;

fn main() {
    #[cfg(target_os = "linux")]
    suite::main();
}

#[cfg(target_os = "linux")]
mod suite {
    use super::{harness, systemd, util};

    use std::net::SocketAddr;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::time::Instant;

    use systemd::{assert_visible, cgroup_procs, Scratch, Systemd};
    use util::{example, free_port, line_probe, probing_client, Client, Load};

    const SERVICE: &str = "tf-ctl.service";
    /// Under /run, a tmpfs of the namespace.
    const CONTROL: &str = "/run/tf-ctl.sock";
    const PID_FILE: &str = "/run/tf-ctl.pid";
    /// Connections answered between two reloads, so that every generation serves.
    const ANSWERS: u64 = 50;
    const CLIENTS: [Client; 2] = [probing_client::<true> as Client; 2];

    /// A copy of the example in a directory of the test's own (visible in the namespace),
    /// replaced the way a deploy does it: written next to it, renamed over it.
    struct Deploy {
        binary: PathBuf,
        good: PathBuf,
        dir: Scratch,
    }

    impl Deploy {
        fn new() -> Deploy {
            let good = example("tcp_server");
            assert_visible(&good);
            let dir = Scratch::new("ctl-deploy");
            let deploy = Deploy {
                binary: dir.path().join("tcp_server"),
                good,
                dir,
            };
            deploy.install_good();
            deploy
        }

        fn install_good(&self) {
            let tmp = self.dir.path().join("tcp_server.new");
            std::fs::copy(&self.good, &tmp).expect("copy binary");
            std::fs::rename(&tmp, &self.binary).expect("rename binary");
        }

        /// A deploy whose server exits with status 3 before it is ready, while its client
        /// mode (`--upgrade`, which `ExecReload=` runs) still works: what fails the reload is
        /// then the server's failure, reported over the control socket, not the client's.
        fn install_exit3(&self) {
            let tmp = self.dir.path().join("tcp_server.new");
            let script = format!(
                "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = --upgrade ] && exec {} \"$@\"; done\nexit 3\n",
                self.good.display()
            );
            std::fs::write(&tmp, script).unwrap();
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::rename(&tmp, &self.binary).expect("rename script");
        }
    }

    /// The unit: `ExecReload=` is the example's own client.
    fn service(binary: &Path, addr: SocketAddr, pid_file: bool) -> String {
        let b = binary.display();
        let (kind, extra) = if pid_file {
            (
                format!("Type=simple\nPIDFile={PID_FILE}\n"),
                format!(" --pid-file {PID_FILE}"),
            )
        } else {
            ("Type=notify\n".to_string(), String::new())
        };
        format!(
            "[Unit]\nDescription=tcp_server with a control socket\n\n[Service]\n{kind}\
             ExecStart={b} --listen {addr} --upgrade-timeout 5 --control {CONTROL}{extra}\n\
             ExecReload={b} --control {CONTROL} --upgrade\n"
        )
    }

    fn wait_answers(sd: &Systemd, load: &Load, n: u64) {
        let target = load.answered() + n;
        sd.wait_for(&format!("{n} more answers"), || {
            (load.answered() >= target).then_some(())
        });
    }

    /// A good reload: `systemctl reload` succeeds, and when it returns `MainPID` already
    /// names the new generation (the answer comes after the commit); the unit was not
    /// restarted, the new generation answers, the old one exits.
    fn good_reload(sd: &Systemd, addr: SocketAddr, old: u32, pid_file: bool) -> u32 {
        let invocation = sd.show(SERVICE, "InvocationID");
        let t0 = Instant::now();
        let out = sd.systemctl(&["reload", SERVICE]);
        assert!(
            out.status.success(),
            "systemctl reload: {} {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            sd.diagnostics(SERVICE)
        );
        let took = t0.elapsed();
        let props = sd.show_all(SERVICE, &["MainPID", "ActiveState", "InvocationID"]);
        let new: u32 = props["MainPID"].parse().expect("MainPID");
        assert_ne!(
            new,
            old,
            "MainPID did not move:\n{}",
            sd.diagnostics(SERVICE)
        );
        assert_eq!(props["ActiveState"], "active", "{props:?}");
        assert_eq!(props["InvocationID"], invocation, "the unit was restarted");
        // The client printed the pid it was told; systemd agrees.
        let log = sd.log(SERVICE);
        assert!(log.lines().any(|l| l.trim() == new.to_string()), "{log}");
        if pid_file {
            let named = std::fs::read_to_string(sd.inside(PID_FILE)).unwrap_or_default();
            assert_eq!(named.trim(), new.to_string(), "the pid file");
        }
        sd.wait_for("the new generation to answer", || {
            (line_probe(addr).ok() == Some(new)).then_some(())
        });
        sd.wait_for(&format!("the old generation {old} to exit"), || {
            (!sd.alive(old)).then_some(())
        });
        eprintln!("reload: MainPID {old} -> {new}; systemctl reload took {took:.0?}");
        new
    }

    fn reloads_report_their_result(pid_file: bool) {
        let deploy = Deploy::new();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let unit = service(&deploy.binary, addr, pid_file);
        let sd = Systemd::boot(&[(SERVICE, &unit)]);
        sd.start(SERVICE);
        sd.wait_active(SERVICE);
        let first = sd.wait_for("the main pid to answer", || {
            let pid = sd.main_pid(SERVICE);
            (pid != 0 && line_probe(addr).ok() == Some(pid)).then_some(pid)
        });
        let cgroup = sd.unit_cgroup(SERVICE);
        let load = Load::start(addr, &CLIENTS);
        let mut generations = vec![first];

        for _ in 0..2 {
            wait_answers(&sd, &load, ANSWERS);
            let old = *generations.last().unwrap();
            generations.push(good_reload(&sd, addr, old, pid_file));
        }

        // A deploy that exits 3: the reload fails; nothing else changes.
        let current = *generations.last().unwrap();
        deploy.install_exit3();
        wait_answers(&sd, &load, ANSWERS);
        let out = sd.systemctl(&["reload", SERVICE]);
        assert!(
            !out.status.success(),
            "systemctl reload succeeded although the upgrade failed:\n{}",
            sd.diagnostics(SERVICE)
        );
        eprintln!(
            "bad reload: systemctl reload {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        assert_eq!(sd.wait_active(SERVICE), "running");
        assert_eq!(sd.main_pid(SERVICE), current, "MainPID changed");
        assert!(sd.alive(current));
        let log = sd.log(SERVICE);
        assert!(
            log.contains("tcp_server: upgrade failed: new generation")
                && log.contains("exited before it was ready: exit status: 3"),
            "the reason is not in the unit's log:\n{log}"
        );
        if pid_file {
            let named = std::fs::read_to_string(sd.inside(PID_FILE)).unwrap_or_default();
            assert_eq!(named.trim(), current.to_string(), "the pid file");
        }
        wait_answers(&sd, &load, ANSWERS);
        assert_eq!(line_probe(addr).expect("still serving"), current);

        // The next good deploy reloads.
        deploy.install_good();
        wait_answers(&sd, &load, ANSWERS);
        generations.push(good_reload(&sd, addr, current, pid_file));
        wait_answers(&sd, &load, ANSWERS);
        let stats = load.finish();
        eprintln!(
            "{} connections answered, {} failed; generations {generations:?}",
            stats.ok,
            stats.failures.len()
        );
        assert!(stats.failures.is_empty(), "{:#?}", stats.failures);
        for pid in &stats.pids {
            assert!(generations.contains(pid), "answered by unknown pid {pid}");
        }

        sd.stop(SERVICE);
        // (Whether the last generation drains or is SIGKILLed on stop is systemd 252's
        // business: see `stop_after_a_reload_drains` in tests/systemd_real.rs.)
        sd.wait_for("the unit's processes to be gone", || {
            cgroup_procs(&cgroup).is_empty().then_some(())
        });
    }

    fn notify_reload_through_the_control_socket_reports_failure() {
        reloads_report_their_result(false);
    }

    fn pid_file_reload_through_the_control_socket_reports_failure() {
        reloads_report_their_result(true);
    }

    pub fn main() {
        harness::main(&[
            crate::trial!(notify_reload_through_the_control_socket_reports_failure),
            crate::trial!(pid_file_reload_through_the_control_socket_reports_failure),
        ])
    }
}
