//! Feeds arbitrary bytes to the handover channel's message decoder, as a hostile
//! generation at the other end of the channel would (both ends decode with it).
//!
//! Besides "no panic", the decoder must keep its promises:
//!
//! * the format is canonical: a message it accepts, encoded again, is the same bytes;
//! * it is strict: no strict prefix of an accepted message is accepted (every size is
//!   the sum of its fields);
//! * an accepted message is at most `MAX_MESSAGE` bytes and carries at most `MAX_FDS`
//!   fds;
//! * an error has a reason, in a bounded amount of text, however large the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tableflip::__private::decode_handover_message;
use tableflip::handover::{MAX_FDS, MAX_MESSAGE};

fuzz_target!(|data: &[u8]| {
    match decode_handover_message(data) {
        Ok((fds, again)) => {
            assert_eq!(again, data, "an accepted message encodes to other bytes");
            assert!(data.len() <= MAX_MESSAGE, "{} bytes accepted", data.len());
            assert!(fds <= MAX_FDS, "{fds} fds in one message");
            for cut in [1, 2, data.len() / 2] {
                if cut <= data.len() && cut > 0 {
                    let prefix = &data[..data.len() - cut];
                    assert!(
                        decode_handover_message(prefix).is_err(),
                        "a prefix of {} bytes was accepted too",
                        prefix.len()
                    );
                }
            }
        }
        Err(reason) => {
            assert!(!reason.is_empty(), "an error without a reason");
            assert!(reason.len() <= 400, "unbounded reason: {} bytes", reason.len());
        }
    }
});
