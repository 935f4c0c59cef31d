//! Fuzzes the GGUF header parser: any byte string must parse or give a `GgufError`, never
//! panic, hang or allocate beyond what the input can justify.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_model::gguf::Header;

fuzz_target!(|data: &[u8]| {
    for require_data in [true, false] {
        if let Ok(h) = Header::parse(data, require_data) {
            // Every tensor the parser accepts must lie inside the input when data is required.
            if require_data {
                for t in &h.tensors {
                    let end = h.data_offset + t.offset + t.size;
                    assert!(end <= data.len() as u64);
                }
            }
        }
    }
});
