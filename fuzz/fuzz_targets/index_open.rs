//! Arbitrary bytes as a sealed index file of each kind (offset, time, id,
//! key): opening must verify or refuse, lookups on what opens must keep
//! their postconditions, nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dmq_index::fuzzing::open_index_files(data);
});
