//! Feeds arbitrary bytes to the `TABLEFLIP_FDS` decoder, as a hostile environment would.
//!
//! Each input is decoded twice: as it is (for the pid in its own pid slot when that
//! slot holds ten digits, so the fuzzer can reach the entries without guessing a pid),
//! and behind a valid header addressed to pid 42 (so every input exercises the entry
//! parser). Besides "no panic", the decoder must keep its promises:
//!
//! * a table it accepts has one entry per `;`-separated field after the header, and is
//!   ignored (`Ok(None)`) by every other pid;
//! * an error names the entry and the reason in a bounded amount of text, however large
//!   the value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tableflip::__private::decode_fd_table;

const HEADER: &[u8] = b"tableflip1;pid=0000000042;";
/// Where the ten pid digits sit in a value (`tableflip1;pid=`).
const PID_SLOT: std::ops::Range<usize> = 15..25;

/// The pid written in the value's pid slot, or 1.
fn pid_of(value: &[u8]) -> u32 {
    value
        .get(PID_SLOT)
        .and_then(|d| std::str::from_utf8(d).ok())
        .and_then(|d| d.parse().ok())
        .unwrap_or(1)
}

fn check(value: &[u8], pid: u32) {
    match decode_fd_table(value, pid) {
        Ok(Some(n)) => {
            let fields = value.split(|&b| b == b';').count();
            assert_eq!(n, fields - 2, "entry count of an accepted table");
            assert_eq!(
                decode_fd_table(value, pid.wrapping_add(1)),
                Ok(None),
                "a table for pid {pid} was not ignored by another pid"
            );
        }
        Ok(None) => {}
        Err((entry, reason)) => {
            // `...` after 200 bytes of the entry.
            assert!(entry.len() <= 203, "unbounded entry: {} bytes", entry.len());
            assert!(
                reason.len() <= 256,
                "unbounded reason: {} bytes",
                reason.len()
            );
            assert!(!reason.is_empty(), "an error without a reason");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, pid_of(data));
    let mut value = Vec::with_capacity(HEADER.len() + data.len());
    value.extend_from_slice(HEADER);
    value.extend_from_slice(data);
    check(&value, 42);
});
