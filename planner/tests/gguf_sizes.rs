//! Bytes per tensor computed from the block formats equal the real tensor sizes in both test
//! models' files, and a header-only prefix of a file describes the model as well as the
//! whole file does.

use std::path::PathBuf;

use shoal_model::gguf::{GgufFile, Header};
use shoal_planner::ModelDesc;

fn model(name: &str) -> PathBuf {
    let dir = std::env::var_os("SHOAL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/shoal/models"));
    let p = dir.join(name);
    assert!(p.exists(), "{} is missing: run scripts/fetch-models", p.display());
    p
}

/// Each tensor's extent in the file: from its offset to the next tensor's (in offset order),
/// or to the end of the file for the last, less the alignment padding.
fn check(name: &str) {
    let f = GgufFile::open(model(name)).unwrap();
    let h = f.header();
    let desc = ModelDesc::from_header(name, h).unwrap();
    assert_eq!(desc.tensors.len(), h.tensors.len());
    let mut by_offset: Vec<usize> = (0..h.tensors.len()).collect();
    by_offset.sort_by_key(|&i| h.tensors[i].offset);
    let data_len = f.file_size() - h.data_offset;
    for (k, &i) in by_offset.iter().enumerate() {
        let t = &h.tensors[i];
        let end = by_offset.get(k + 1).map_or(data_len, |&j| h.tensors[j].offset);
        let extent = end - t.offset;
        let computed = desc.tensors[i].bytes;
        // The data of the next tensor starts at the next multiple of the alignment.
        assert_eq!(computed.div_ceil(h.alignment) * h.alignment, extent.div_ceil(h.alignment) * h.alignment, "{}", t.name);
        assert!(computed <= extent && extent - computed < h.alignment, "{}: computed {computed}, extent {extent}", t.name);
        if k + 1 == by_offset.len() {
            assert_eq!(computed, extent, "the last tensor ends the file: {}", t.name);
        }
    }
    assert_eq!(desc.total_bytes(), h.tensor_bytes(), "{name}");

    // The header alone (the file cut right after it) gives the same description.
    let prefix = &f.bytes()[..h.data_offset as usize];
    let h2 = Header::parse(prefix, false).unwrap();
    assert_eq!(ModelDesc::from_header(name, &h2).unwrap(), desc);
}

#[test]
fn smollm2_q4_1_sizes_match_the_file() {
    check("SmolLM2-135M-Instruct.Q4_1.gguf");
}

#[test]
fn qwen2_5_coder_q4_k_m_sizes_match_the_file() {
    check("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
}
