//! Arbitrary bytes as a segment: the in-memory scan recovery uses, then a
//! real recovery (`Log::open` of a directory holding the bytes as its only
//! segment, reading everything, appending, reopening). Errors are fine;
//! panics are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dmq_log_store::fuzzing::scan_segment(data);
    dmq_log_store::fuzzing::recover_segment(data);
});
