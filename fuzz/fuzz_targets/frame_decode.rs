//! Arbitrary bytes as a stream of protocol frames: decoding must return
//! "incomplete", an error or frames that re-encode to the same bytes, never
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dmq_protocol::fuzzing::decode(data);
});
