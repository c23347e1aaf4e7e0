//! The test harness of the suites whose tests need what not every machine has (root, a
//! systemd binary, `unshare`): such a test is reported as **ignored, with its reason**,
//! never as passed. A test calls [`skip`] (directly, or through a helper such as
//! `Systemd::boot`) when it cannot run here.
//!
//! Built on `libtest-mimic`, so the command line is the usual one (`cargo test NAME`,
//! `--ignored`, `--include-ignored`, `--nocapture`, `--test-threads`), and a watchdog
//! fails a test that hangs instead of hanging CI.
#![allow(dead_code)]

use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::Duration;

use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// A test's whole run may take this long before the watchdog ends the test binary.
pub const WATCHDOG: Duration = Duration::from_secs(600);

/// One test: its name, its body and, for a test that runs only on request, why.
pub struct Test {
    pub name: &'static str,
    pub run: fn(),
    /// `Some(why)`: ignored unless asked for (`--ignored`, `--include-ignored`).
    pub ignore: Option<&'static str>,
}

/// `trial!(name)` or `trial!(name, ignore = "why")`: a [`Test`] for the function `name`.
#[macro_export]
macro_rules! trial {
    ($name:ident) => {
        $crate::harness::Test {
            name: stringify!($name),
            run: $name,
            ignore: None,
        }
    };
    ($name:ident, ignore = $why:expr) => {
        $crate::harness::Test {
            name: stringify!($name),
            run: $name,
            ignore: Some($why),
        }
    };
}

/// The payload of a skip: why the test cannot run here.
struct Skip(String);

/// Ends the calling test as ignored, with `why` in the report. Call it before the test
/// has started anything that needs cleaning up (destructors do run).
pub fn skip(why: impl Into<String>) -> ! {
    SKIPPING.with(|s| s.set(true));
    panic::panic_any(Skip(why.into()))
}

thread_local! {
    static SKIPPING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread unwinds because its test failed (not because it skips):
/// what a destructor asks before it keeps files for inspection.
pub fn failing() -> bool {
    std::thread::panicking() && !SKIPPING.with(|s| s.get())
}

/// Why a test that needs root cannot run here, if it cannot.
pub fn needs_root(what: &str) -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    (unsafe { libc::geteuid() } != 0).then(|| format!("needs root ({what})"))
}

/// Skips the calling test unless it runs as root.
pub fn require_root(what: &str) {
    if let Some(why) = needs_root(what) {
        skip(why)
    }
}

/// Runs `tests` as a test binary's `main` does, and exits with its status. A skipped test
/// shows as `ignored, <why>` and a summary line after the run counts them.
pub fn main(tests: &[Test]) -> ! {
    main_with_entry(|| {}, tests)
}

/// [`main`] for a suite whose tests start the test binary again as their own child
/// processes: when its first argument is `scenario_entry` (see `util::scenario_args`),
/// the binary runs `entry` instead of the tests.
pub fn main_with_entry(entry: fn(), tests: &[Test]) -> ! {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "scenario_entry")
    {
        entry();
        std::process::exit(0);
    }
    let args = Arguments::from_args();
    let run_ignored = args.ignored || args.include_ignored;
    // A skip is not a failure: keep its panic message out of the output.
    let default_hook = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if info.payload().downcast_ref::<Skip>().is_none() {
            default_hook(info);
        }
    }));
    let skipped = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let trials = tests
        .iter()
        .map(|t| {
            let (name, run, ignore) = (t.name, t.run, t.ignore);
            let skipped = std::sync::Arc::clone(&skipped);
            Trial::ignorable_test(name, move || {
                if let Some(why) = ignore.filter(|_| !run_ignored) {
                    return Ok(Completion::ignored_with(why));
                }
                let result = under_watchdog(name, run);
                if let Ok(Completion::Ignored { reason: Some(why) }) = &result {
                    skipped.lock().unwrap().push(format!("{name}: {why}"));
                }
                result
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let skipped = skipped.lock().unwrap();
    if !skipped.is_empty() {
        println!(
            "note: {} test(s) could not run on this machine and were reported as ignored:",
            skipped.len()
        );
        for line in skipped.iter() {
            println!("note:   {line}");
        }
    }
    conclusion.exit()
}

/// Runs one test body; a hang past [`WATCHDOG`] ends the whole binary with a failure.
fn under_watchdog(name: &'static str, run: fn()) -> Result<Completion, Failed> {
    let (done, waiting) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = waiting.recv_timeout(WATCHDOG) {
            eprintln!("watchdog: test {name} still runs after {WATCHDOG:?}: failing the run");
            std::process::exit(101);
        }
    });
    let result = panic::catch_unwind(AssertUnwindSafe(run));
    drop(done);
    match result {
        Ok(()) => Ok(Completion::Completed),
        Err(payload) => match payload.downcast::<Skip>() {
            Ok(skip) => Ok(Completion::ignored_with(skip.0)),
            Err(payload) => Err(Failed::from(panic_message(&payload))),
        },
    }
}

fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "the test panicked".into()
    }
}
