//! The keeper (`tcp_server --keeper`) as PID 1 of a fresh PID namespace, as in a
//! container: upgrades by `SIGHUP` to it under load, a `kill -9` of the serving
//! generation, `SIGTERM`. Needs root (`unshare -p`): reported as ignored, with
//! the reason, otherwise.

#[cfg(target_os = "linux")]
#[allow(dead_code)]
#[path = "util/examples.rs"]
mod util;

#[cfg(target_os = "linux")]
#[path = "util/harness.rs"]
mod harness;

#[cfg(target_os = "linux")]
#[path = "util/pidns.rs"]
mod pidns;

fn main() {
    #[cfg(target_os = "linux")]
    suite::main();
}

#[cfg(target_os = "linux")]
mod suite {
    use super::{harness, pidns, util};

    use std::net::SocketAddr;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use util::{example, free_port, line_probe, probing_client, Client, Load};

    const CLIENTS: [Client; 2] = [probing_client::<true> as Client; 2];
    const DEADLINE: Duration = Duration::from_secs(20);

    /// `tcp_server --keeper` as PID 1 of a PID namespace of its own.
    struct Contained {
        unshare: Child,
        /// The keeper's pid on the host.
        keeper: u32,
        addr: SocketAddr,
        log: std::path::PathBuf,
    }

    impl Contained {
        fn start(tag: &str) -> Contained {
            if let Some(why) = pidns::unsupported() {
                harness::skip(why);
            }
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let log =
                std::env::temp_dir().join(format!("tf-keeper-{tag}-{}.log", std::process::id()));
            let unshare = Command::new("unshare")
                .args(["-pf", "--mount-proc", "--kill-child"])
                .arg(example("tcp_server"))
                .args([
                    "--keeper",
                    "--listen",
                    &addr.to_string(),
                    "--upgrade-timeout",
                    "5",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let pid = unshare.id();
            let mut unshare = unshare;
            let keeper = wait_for("the keeper to start", || {
                // An unshare that ended has said why in the log.
                if let Ok(Some(status)) = unshare.try_wait() {
                    let said = std::fs::read_to_string(&log).unwrap_or_default();
                    panic!("unshare ended before the keeper started ({status}):\n{said}");
                }
                children(pid).first().copied()
            });
            let c = Contained {
                unshare,
                keeper,
                addr,
                log,
            };
            wait_for("the first generation to answer", || line_probe(c.addr).ok());
            c
        }

        fn signal(&self, host_pid: u32, sig: i32) {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is a live
            // descendant of ours.
            assert_eq!(unsafe { libc::kill(host_pid as i32, sig) }, 0);
        }

        /// The keeper's descendants on the host, with their namespace pid and state.
        fn descendants(&self) -> Vec<(u32, u32, char)> {
            pidns::descendants(self.keeper)
        }

        /// The host pid of the generation whose namespace pid is `ns`.
        fn host_pid(&self, ns: u32) -> u32 {
            wait_for("the serving generation on the host", || {
                self.descendants()
                    .into_iter()
                    .find(|(_, n, _)| *n == ns)
                    .map(|(h, _, _)| h)
            })
        }

        fn log(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }

        fn assert_no_zombie(&self) {
            let zombies = || -> Vec<(u32, u32, char)> {
                self.descendants()
                    .into_iter()
                    .filter(|(_, _, s)| *s == 'Z')
                    .collect()
            };
            // Reaping takes a moment: a zombie may exist briefly, never for long.
            let t = Instant::now();
            while !zombies().is_empty() {
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "zombies: {:?}\n{}",
                    zombies(),
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    impl Drop for Contained {
        fn drop(&mut self) {
            // The namespace dies with its PID 1.
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(self.keeper as i32, libc::SIGKILL) };
            let _ = self.unshare.kill();
            let _ = self.unshare.wait();
            let _ = std::fs::remove_file(&self.log);
        }
    }

    use pidns::children;

    #[track_caller]
    fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
        pidns::wait_for(what, DEADLINE, f)
    }

    /// Waits until the service answers from a generation other than `old` (namespace pids).
    fn next_generation(c: &Contained, old: u32) -> u32 {
        wait_for("a new generation to answer", || {
            line_probe(c.addr).ok().filter(|&p| p != old)
        })
    }

    fn the_keeper_stays_pid_1_through_20_upgrades_without_a_failed_connection() {
        let _lock = util::lock();
        let c = Contained::start("upgrades");
        let load = Load::start(c.addr, &CLIENTS);
        let mut generation = line_probe(c.addr).unwrap();
        let mut seen = vec![generation];
        for _ in 0..20 {
            let before = load.answered();
            wait_for("answers", || (load.answered() > before + 20).then_some(()));
            c.signal(c.keeper, libc::SIGHUP);
            generation = next_generation(&c, generation);
            seen.push(generation);
            // The old generation exits, and is reaped by the keeper.
            let old = seen[seen.len() - 2];
            wait_for("the old generation to be gone", || {
                (!c.descendants().iter().any(|(_, ns, _)| *ns == old)).then_some(())
            });
        }
        let stats = load.finish();
        assert!(
            stats.failures.is_empty(),
            "{:#?}\n{}",
            stats.failures,
            c.log()
        );
        assert!(stats.ok > 0);
        assert!(
            stats.pids.iter().all(|p| seen.contains(p)),
            "{:?} vs {seen:?}",
            stats.pids
        );
        c.assert_no_zombie();
        // Still the same keeper, PID 1 of the namespace.
        let status = std::fs::read_to_string(format!("/proc/{}/status", c.keeper)).unwrap();
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("NSpid:") && l.ends_with("\t1")),
            "{status}"
        );
    }

    fn a_killed_generation_is_replaced_on_the_same_sockets() {
        let _lock = util::lock();
        let c = Contained::start("kill9");
        let load = Load::start(c.addr, &CLIENTS);
        let mut generation = line_probe(c.addr).unwrap();
        let mut lost_limit = 0;
        for _ in 0..3 {
            let before = load.answered();
            wait_for("answers", || (load.answered() > before + 50).then_some(()));
            let host = c.host_pid(generation);
            c.signal(host, libc::SIGKILL);
            lost_limit += CLIENTS.len();
            generation = next_generation(&c, generation);
        }
        let before = load.answered();
        wait_for("answers", || (load.answered() > before + 50).then_some(()));
        let stats = load.finish();
        // Only what the killed process had accepted is lost; nothing is refused.
        let refused: Vec<&String> = stats
            .failures
            .iter()
            .filter(|f| !(f.contains("reply without a pid") || f.contains("reset")))
            .collect();
        assert!(refused.is_empty(), "{refused:#?}\n{}", c.log());
        assert!(stats.failures.len() <= lost_limit, "{:#?}", stats.failures);
        assert!(c.log().contains("starting it again"), "{}", c.log());
        c.assert_no_zombie();
    }

    fn sigterm_to_the_keeper_stops_everything_and_exits_0() {
        let _lock = util::lock();
        let mut c = Contained::start("sigterm");
        c.signal(c.keeper, libc::SIGHUP);
        let first = line_probe(c.addr).unwrap();
        let _ = next_generation(&c, first);
        c.signal(c.keeper, libc::SIGTERM);
        let status = wait_for("the keeper to exit", || c.unshare.try_wait().ok().flatten());
        assert!(status.success(), "{status}\n{}", c.log());
        assert!(children(c.keeper).is_empty());
        assert!(
            line_probe(c.addr).is_err(),
            "still answering after the stop"
        );
        assert!(c.log().contains("] exit"), "{}", c.log());
    }

    pub fn main() {
        harness::main(&[
            crate::trial!(the_keeper_stays_pid_1_through_20_upgrades_without_a_failed_connection),
            crate::trial!(a_killed_generation_is_replaced_on_the_same_sockets),
            crate::trial!(sigterm_to_the_keeper_stops_everything_and_exits_0),
        ])
    }
}
