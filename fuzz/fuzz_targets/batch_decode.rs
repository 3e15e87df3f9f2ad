//! Arbitrary bytes as one record batch: decoding must return an error or a
//! batch whose records all read back, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dmq_log_store::fuzzing::decode_batch(data);
});
