//! Phase 2: broken deploys. Each one is installed the way a deploy does it, `SIGHUP` is
//! sent, and the old generation must log the reason and carry on unchanged; then a good
//! deploy must upgrade.

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use crate::deploy::Deploy;
use crate::load::{idle_fd_count, Load};
use crate::procs::{
    children, exited, micros, now_us, signal, status_text, strays, wait_for, wait_reaped,
};
use crate::report::{ms, secs, FaultOutcome, Progress, Report};
use crate::server::Server;
use crate::{Config, Res, STEP_TIMEOUT};

/// A broken deploy, and the reason the old generation must give for refusing it.
pub struct Fault {
    pub name: &'static str,
    pub install: fn(&Deploy) -> Res<()>,
    pub expect: &'static str,
    /// The broken generation serves before it dies: connections it accepted die with it.
    pub serves: bool,
}

pub fn faults() -> [Fault; 5] {
    [
        Fault {
            name: "exits with status 3",
            install: |d| d.install_script("#!/bin/sh\nexit 3\n"),
            expect: "exit status: 3",
            serves: false,
        },
        Fault {
            name: "killed by SIGKILL",
            install: |d| d.install_script("#!/bin/sh\nkill -9 $$\n"),
            expect: "signal: 9",
            serves: false,
        },
        Fault {
            name: "hangs past the timeout",
            install: |d| d.install_script("#!/bin/sh\nexec sleep 1000\n"),
            expect: "not ready after",
            serves: false,
        },
        Fault {
            name: "binary missing",
            install: Deploy::remove,
            expect: "No such file or directory",
            serves: false,
        },
        Fault {
            name: "no execute bit",
            install: Deploy::install_not_executable,
            expect: "Permission denied",
            serves: false,
        },
    ]
}

/// The scenario in which the old generation is killed while a slow deploy starts.
pub const KILLED_MID_UPGRADE: &str = "old generation SIGKILLed mid-upgrade";

/// Every fault scenario `--faults` runs, in order (`--list-faults` prints them).
pub fn scenario_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = faults().iter().map(|f| f.name).collect();
    names.push(KILLED_MID_UPGRADE);
    names.push(probation_fault().name);
    names
}

/// The deploy that becomes ready and crashes 300 ms later, under `--probation 1`.
pub fn probation_fault() -> Fault {
    Fault {
        name: "ready, then dies 300 ms later",
        install: Deploy::install_dies_after_ready,
        expect: "after it became ready",
        serves: true,
    }
}

pub fn fault_scenarios(
    config: &Config,
    deploy: &Deploy,
    report: &mut Report,
    progress: &mut Progress,
) -> Res<()> {
    progress.say(&format!(
        "fault scenarios: --upgrade-timeout {}, {} clients",
        secs(config.fault_timeout),
        config.clients
    ));
    deploy.install_good()?;
    let mut server = Server::start(
        "faults",
        &deploy.bin,
        deploy.dir(),
        config.fault_timeout,
        config.proto,
    )?;
    let load = Load::start(server.addr, &config.client_kinds());
    let result = (|| -> Res<()> {
        load.wait_answers(&server, 100)?;
        for fault in faults() {
            load.set_stage(format!("fault: {}", fault.name));
            progress.say(&format!("fault: {}", fault.name));
            let outcome = failed_upgrade(&mut server, &load, deploy, &fault)?;
            report.faults.push(outcome);
        }
        load.set_stage("fault: old generation killed".into());
        progress.say("fault: old generation killed mid-upgrade");
        let outcome = killed_mid_upgrade(&mut server, &load, deploy)?;
        report.faults.push(outcome);
        Ok(())
    })();
    report.fault_stats = Some(load.finish(&server.generations));
    report.generations.extend(&server.generations);
    let result = result.and_then(|()| server.stop());
    result.map_err(|e| server.with_log(e))?;
    probation_scenario(config, deploy, report, progress)
}

/// A server with a one-second probation gets a deploy that becomes ready and crashes
/// 300 ms later: the old generation rolls it back and serves on, its pid file unchanged,
/// and no connection is refused; then the good deploy upgrades (a second later).
fn probation_scenario(
    config: &Config,
    deploy: &Deploy,
    report: &mut Report,
    progress: &mut Progress,
) -> Res<()> {
    let fault = probation_fault();
    progress.say(&format!("fault: {} (--probation 1)", fault.name));
    deploy.install_good()?;
    let mut server = Server::start_with(
        "probation",
        &deploy.bin,
        deploy.dir(),
        config.fault_timeout,
        config.proto,
        &["--probation", "1"],
    )?;
    let load = Load::start(server.addr, &config.client_kinds());
    let result = (|| -> Res<()> {
        load.wait_answers(&server, 100)?;
        load.set_stage(format!("fault: {}", fault.name));
        let outcome = failed_upgrade(&mut server, &load, deploy, &fault)?;
        report.faults.push(outcome);
        Ok(())
    })();
    report.probation_stats = Some(load.finish(&server.generations));
    report.generations.extend(&server.generations);
    // The deploy's killer is ours too (see `install_dies_after_ready`).
    if let Some(helper) = std::fs::read_to_string(deploy.helper_pid_file())
        .ok()
        .and_then(|p| p.trim().parse().ok())
    {
        report.generations.push(helper);
    }
    let result = result.and_then(|()| server.stop());
    result.map_err(|e| server.with_log(e))
}

/// Deploys `fault`, sends SIGHUP, and checks that the old generation shrugs it off; then
/// deploys the good binary again and upgrades to it.
pub fn failed_upgrade(
    server: &mut Server,
    load: &Load,
    deploy: &Deploy,
    fault: &Fault,
) -> Res<FaultOutcome> {
    let old = server.current;
    let mut outcome = FaultOutcome::new(fault.name);
    let fds_before = idle_fd_count(old, Some(load))?;
    let failed_before = load.shared.failed.load(SeqCst);
    let in_flight_before = load.in_flight();
    let logged_before = server.failure_lines().len();

    (fault.install)(deploy)?;
    signal(old, libc::SIGHUP)?;
    let line = wait_for(
        "the failed upgrade to be logged",
        server.upgrade_timeout + STEP_TIMEOUT,
        Duration::from_millis(5),
        || {
            if exited(old) {
                return Err(format!("the old generation (pid {old}) exited"));
            }
            Ok(server.failure_lines().get(logged_before).cloned())
        },
    )?;
    let logged_at = now_us();
    outcome.reason = reason(&line);
    // A broken generation that served (on probation) answered connections: one of ours.
    if let Some(pid) = pid_in(&outcome.reason) {
        server.generations.push(pid);
    }
    if !line.contains(fault.expect) {
        outcome.problem(format!("expected the reason to mention {:?}", fault.expect));
    }

    // Still the one generation, serving: to the clients and to a connection of ours.
    load.wait_answered_by(old, logged_at)?;
    match server.probe() {
        Ok(pid) if pid == old => {}
        Ok(pid) => outcome.problem(format!("a probe was answered by pid {pid}, not {old}")),
        Err((kind, e)) => outcome.problem(format!("a probe failed: {}: {e}", kind.name())),
    }
    match server.pid_from_file() {
        Some(pid) if pid == old => {}
        other => outcome.problem(format!("the pid file names {other:?}, not {old}")),
    }
    let strays = strays(old);
    if !strays.is_empty() {
        outcome.problem(format!("processes left behind: {}", strays.join(", ")));
    }
    let fds_after = idle_fd_count(old, Some(load))?;
    outcome.fds = format!("{fds_before} -> {fds_after}");
    if fds_after != fds_before {
        outcome.problem(format!("fd count {fds_before} before, {fds_after} after"));
    }

    // What the crashing generation held died with it (and only that, only if it served).
    let lost = if fault.serves {
        load.in_flight() - in_flight_before
    } else {
        0
    };
    outcome.lost_in_flight = lost;

    // The next deploy is good: the failure left nothing in the way.
    deploy.install_good()?;
    let upgrade = server.upgrade(load)?;
    outcome.recovery = Some(upgrade.latency);
    outcome.failed_connections = load.shared.failed.load(SeqCst) - failed_before - lost;
    Ok(outcome)
}

/// Deploys a wrapper that sleeps before it executes the good binary, kills the old
/// generation with SIGKILL while the wrapper sleeps, and checks that the new generation
/// comes up on its own, then upgrades.
pub fn killed_mid_upgrade(server: &mut Server, load: &Load, deploy: &Deploy) -> Res<FaultOutcome> {
    let old = server.current;
    let mut outcome = FaultOutcome::new(KILLED_MID_UPGRADE);
    let failed_before = load.shared.failed.load(SeqCst);

    // If the good binary is not back in place when the wrapper wakes up, `exec "$0"`
    // runs the wrapper again, which waits another second.
    deploy.install_script("#!/bin/sh\nsleep 1\nexec \"$0\" \"$@\"\n")?;
    signal(old, libc::SIGHUP)?;
    // The wrapper is the old generation's child; it sleeps while it has a child itself.
    let wrapper = wait_for(
        "the slow wrapper to start",
        STEP_TIMEOUT,
        Duration::from_millis(2),
        || Ok(children(old).into_iter().find(|&c| !children(c).is_empty())),
    )?;
    // Nothing in flight: the connections a SIGKILLed server was handling are lost, and
    // that is not the point here. Connections made from now on queue on the listener.
    load.pause()?;
    if children(wrapper).is_empty() {
        // Pausing took so long that the wrapper may have gone on: not a valid test.
        outcome.problem("the wrapper had stopped sleeping before the SIGKILL".into());
    }
    signal(old, libc::SIGKILL)?;
    let killed_at = now_us();
    deploy.install_good()?;
    load.resume();

    let status = wait_reaped(old)?;
    if status.is_some_and(|s| !(libc::WIFSIGNALED(s) && libc::WTERMSIG(s) == libc::SIGKILL)) {
        outcome.problem(format!(
            "the old generation ended with {}",
            status_text(status)
        ));
    }
    let new = wait_for(
        "the pid file to name the new generation",
        STEP_TIMEOUT,
        Duration::from_millis(1),
        || {
            if exited(wrapper) {
                return Err(format!("the new generation (pid {wrapper}) exited"));
            }
            Ok(server.pid_from_file().filter(|&p| p != old))
        },
    )?;
    server.generations.push(new);
    server.current = new;
    if new != wrapper {
        outcome.problem(format!(
            "the pid file names {new}, the wrapper was {wrapper}"
        ));
    }
    let answered = load.wait_answered_by(new, killed_at)?;
    outcome.reason = format!(
        "pid {new} took over alone, {} after the SIGKILL",
        ms(micros(answered - killed_at))
    );
    let strays = strays(new);
    if !strays.is_empty() {
        outcome.problem(format!("processes left behind: {}", strays.join(", ")));
    }
    outcome.fds = format!("{} (new)", idle_fd_count(new, Some(load))?);

    // It knows its parent is gone (an upgrade is refused while the parent lives).
    let upgrade = server.upgrade(load)?;
    outcome.recovery = Some(upgrade.latency);
    outcome.failed_connections = load.shared.failed.load(SeqCst) - failed_before;
    Ok(outcome)
}

/// The pid in "new generation (pid 1234) ...".
fn pid_in(reason: &str) -> Option<u32> {
    let rest = &reason[reason.find("(pid ")? + 5..];
    rest[..rest.find(')')?].parse().ok()
}

/// "[tcp_server pid=1] upgrade failed: reason" -> "reason".
pub fn reason(line: &str) -> String {
    let rest = &line[line.find("upgrade failed").unwrap_or(0)..];
    rest.trim_start_matches("upgrade failed")
        .trim_start_matches([':', ' '])
        .to_string()
}
