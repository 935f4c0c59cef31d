//! Fuzzes the decoder of a tensor-parallel step message (what a follower reads from its
//! leader): any byte string must decode or give an error, never panic or allocate beyond
//! what the input can justify; what decodes must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_model::tp::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(ops) = decode(data) {
        let mut again = Vec::new();
        ops.iter().for_each(|op| encode(op, &mut again));
        assert_eq!(again, data);
    }
});
