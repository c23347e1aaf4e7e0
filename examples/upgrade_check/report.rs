//! Reporting: the progress line on stderr, and the summary on stdout that decides
//! whether the run passed.

use std::io::{self, IsTerminal};
use std::time::{Duration, Instant};

use crate::faults::scenario_names;
use crate::load::{LoadStats, Proto, FAILURES};
use crate::server::Upgrade;
use crate::{Config, MAX_CONNECTIONS};

/// A progress line on stderr: rewritten in place on a terminal, else printed every few
/// seconds.
pub struct Progress {
    tty: bool,
    last: Option<Instant>,
    pending: bool,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            tty: io::stderr().is_terminal(),
            last: None,
            pending: false,
        }
    }

    /// A line of its own.
    pub fn say(&mut self, line: &str) {
        self.finish();
        eprintln!("upgrade_check: {line}");
    }

    pub fn update(&mut self, line: &str) {
        if self.tty {
            eprint!("\r\x1b[K  {line}");
            self.pending = true;
        } else if self
            .last
            .map_or(true, |t| t.elapsed() >= Duration::from_secs(2))
        {
            eprintln!("  {line}");
            self.last = Some(Instant::now());
        }
    }

    pub fn finish(&mut self) {
        if self.pending {
            eprintln!();
            self.pending = false;
        }
    }
}

#[derive(Default)]
pub struct LoadPhase {
    pub upgrades: Vec<Upgrade>,
    pub stats: Option<LoadStats>,
    /// The first generation's fd count, idle (the upgraded ones are in `upgrades`).
    pub fds_first: Option<usize>,
}

impl LoadPhase {
    /// The fewest and most fds an upgraded generation held. The first generation is not
    /// compared: an upgraded one holds fds it has no use for, such as tableflip's
    /// lifeline pipe from its parent.
    pub fn fds_range(&self) -> Option<(usize, usize)> {
        let fds = self.upgrades.iter().map(|u| u.fds);
        Some((fds.clone().min()?, fds.max()?))
    }
}

pub struct FaultOutcome {
    pub name: &'static str,
    pub reason: String,
    pub problems: Vec<String>,
    /// The old generation's fd count before and after, idle.
    pub fds: String,
    pub failed_connections: u64,
    /// Connections the broken generation had accepted when it died (a generation that
    /// serves, then crashes, takes those with it); not counted as failed.
    pub lost_in_flight: u64,
    /// The good upgrade afterwards: SIGHUP until the new pid answered.
    pub recovery: Option<Duration>,
}

impl FaultOutcome {
    pub fn new(name: &'static str) -> FaultOutcome {
        FaultOutcome {
            name,
            reason: String::new(),
            problems: Vec::new(),
            fds: "?".into(),
            failed_connections: 0,
            lost_in_flight: 0,
            recovery: None,
        }
    }

    pub fn problem(&mut self, msg: String) {
        self.problems.push(msg);
    }

    pub fn passed(&self) -> bool {
        self.problems.is_empty() && self.failed_connections == 0 && self.recovery.is_some()
    }
}

pub struct Report {
    pub header: String,
    pub upgrades_planned: usize,
    pub faults_planned: bool,
    pub load: Option<LoadPhase>,
    pub faults: Vec<FaultOutcome>,
    pub fault_stats: Option<LoadStats>,
    /// The load while a deploy died on its probation (in-flight losses allowed).
    pub probation_stats: Option<LoadStats>,
    /// Every generation of every server.
    pub generations: Vec<u32>,
    pub leftovers: Vec<String>,
    pub strays: Vec<String>,
    pub problems: Vec<String>,
    /// Sections of other phases (held connections), rendered as they are.
    pub sections: Vec<String>,
}

impl Report {
    pub fn new(config: &Config) -> Report {
        Report {
            header: format!(
                "upgrade_check: {}, {} client threads{}",
                config.server.display(),
                config.clients,
                match config.proto {
                    Proto::Line => String::new(),
                    Proto::Http => format!(
                        " (HTTP/1.1: {} keep-alive, {} Connection: close)",
                        config.keep_alive,
                        config.clients - config.keep_alive
                    ),
                }
            ),
            // With --hold, the upgrades are the held connections' (their section).
            upgrades_planned: if config.hold.is_some() {
                0
            } else {
                config.upgrades
            },
            faults_planned: config.faults,
            load: None,
            faults: Vec::new(),
            fault_stats: None,
            probation_stats: None,
            generations: Vec::new(),
            leftovers: Vec::new(),
            strays: Vec::new(),
            problems: Vec::new(),
            sections: Vec::new(),
        }
    }

    pub fn passed(&self) -> bool {
        let stats_ok = |s: &Option<LoadStats>| {
            s.as_ref().map_or(true, |s| {
                s.failed() == 0 && s.unknown_pids.is_empty() && !s.capped
            })
        };
        let load_ok = self.load.as_ref().map_or(self.upgrades_planned == 0, |l| {
            l.upgrades.len() == self.upgrades_planned
                && stats_ok(&l.stats)
                && l.fds_range().map_or(true, |(min, max)| min == max)
        });
        // Under the probation fault, only what the crashing generation held may be lost.
        let probation_ok = self.probation_stats.as_ref().is_some_and(|s| {
            s.failed() == crate::load::in_flight(&s.by_kind)
                && s.unknown_pids.is_empty()
                && !s.capped
        });
        let faults_ok = !self.faults_planned
            || (self.faults.len() == scenario_names().len()
                && self.faults.iter().all(FaultOutcome::passed)
                && stats_ok(&self.fault_stats)
                && probation_ok);
        self.problems.is_empty()
            && load_ok
            && faults_ok
            && self.leftovers.is_empty()
            && self.strays.is_empty()
    }

    pub fn render(&self) -> String {
        let mut out = format!("\n{}\n", self.header);
        let row = |out: &mut String, name: &str, value: String| {
            out.push_str(&format!("  {name:<34}{value}\n"));
        };
        if let Some(load) = &self.load {
            out.push_str("\nUpgrades under load\n");
            let ups = &load.upgrades;
            row(
                &mut out,
                "upgrades",
                format!("{} of {}", ups.len(), self.upgrades_planned),
            );
            if let Some(stats) = &load.stats {
                render_stats(&mut out, stats);
            }
            let dist = |f: fn(&Upgrade) -> Duration| distribution(ups.iter().map(f).collect());
            row(&mut out, "SIGHUP -> new pid answers", dist(|u| u.latency));
            row(&mut out, "SIGHUP -> pid file names it", dist(|u| u.ready));
            row(
                &mut out,
                "old answering after new ready",
                dist(|u| u.overlap),
            );
            row(
                &mut out,
                "SIGHUP -> old generation exited",
                dist(|u| u.old_exit),
            );
            row(
                &mut out,
                "answered during the upgrades",
                format!(
                    "{} (from SIGHUP until the old generation exited)",
                    ups.iter().map(|u| u.answered).sum::<u64>()
                ),
            );
            row(
                &mut out,
                "old generations exited",
                format!("{} of {}, each with status 0", ups.len(), ups.len()),
            );
            let first = load.fds_first.map_or("?".into(), |n| n.to_string());
            let upgraded = match load.fds_range() {
                None => "-".into(),
                Some((min, max)) if min == max => format!("{min} in each upgraded one"),
                Some((min, max)) => format!("from {min} to {max} in the upgraded ones (a leak)"),
            };
            row(
                &mut out,
                "server fds, idle",
                format!("{first} in the first generation, {upgraded}"),
            );
        }
        if self.faults_planned {
            out.push_str("\nFault scenarios (each followed by a good upgrade)\n");
            out.push_str(&format!(
                "  {:<38}{:<7}{:<9}{:<10}{:<11}{}\n",
                "scenario",
                "result",
                "failed",
                "fds",
                "recovery",
                "reason logged by the old generation"
            ));
            for f in &self.faults {
                let recovery = f.recovery.map_or("-".into(), ms);
                out.push_str(&format!(
                    "  {:<38}{:<7}{:<9}{:<10}{:<11}{}\n",
                    f.name,
                    if f.passed() { "ok" } else { "FAIL" },
                    f.failed_connections,
                    f.fds,
                    recovery,
                    f.reason
                ));
                if f.lost_in_flight > 0 {
                    out.push_str(&format!(
                        "      {} connection(s) the crashing generation had accepted died with it\n",
                        f.lost_in_flight
                    ));
                }
                for p in &f.problems {
                    out.push_str(&format!("      problem: {p}\n"));
                }
            }
            if let Some(stats) = &self.fault_stats {
                render_stats(&mut out, stats);
            }
            if let Some(stats) = &self.probation_stats {
                out.push_str("  under --probation 1:\n");
                render_stats(&mut out, stats);
            }
        }
        for section in &self.sections {
            out.push_str(section);
        }
        out.push('\n');
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        row(&mut out, "processes left over", list(&self.leftovers));
        row(&mut out, "other processes reaped", list(&self.strays));
        for p in &self.problems {
            out.push_str(&format!("  FAILED: {p}\n"));
        }
        out.push_str(if self.passed() {
            "\nresult: PASS\n"
        } else {
            "\nresult: FAIL\n"
        });
        out
    }
}

pub fn render_stats(out: &mut String, stats: &LoadStats) {
    let kinds: Vec<String> = FAILURES
        .iter()
        .map(|&k| format!("{} {}", k.name(), stats.by_kind[k as usize]))
        .collect();
    let what = match stats.proto {
        Proto::Line => "connections",
        Proto::Http => "requests",
    };
    out.push_str(&format!(
        "  {what:<34}{} answered, {} failed ({})\n",
        stats.answered,
        stats.failed(),
        kinds.join(", ")
    ));
    if stats.proto == Proto::Http {
        out.push_str(&format!(
            "      {} on reused keep-alive connections; {} keep-alive connections ended by \
             Connection: close\n",
            stats.reused, stats.closes
        ));
    }
    for e in &stats.examples {
        out.push_str(&format!("      {e}\n"));
    }
    if !stats.unknown_pids.is_empty() {
        out.push_str(&format!(
            "      answered by pids that were no generation: {:?}\n",
            stats.unknown_pids
        ));
    }
    if stats.capped {
        out.push_str(&format!(
            "      stopped at the limit of {MAX_CONNECTIONS} {what}\n"
        ));
    }
}

/// "median 2.1 ms, p99 4.0 ms, max 5.2 ms".
pub fn distribution(mut values: Vec<Duration>) -> String {
    if values.is_empty() {
        return "-".into();
    }
    values.sort();
    // Nearest rank: the smallest value with at least p of the values at or below it.
    let rank =
        |p: f64| values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
    format!(
        "median {}, p99 {}, max {}",
        ms(rank(0.5)),
        ms(rank(0.99)),
        ms(values[values.len() - 1])
    )
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

pub fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}
