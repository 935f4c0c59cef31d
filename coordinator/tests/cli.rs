//! End-to-end tests of the `shoal` binary: bad input gets one clear line and a non-zero exit,
//! generation prints only the completion, and weights are mapped, not copied.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use shoal_model::gguf::{Array, Builder, Value};
use shoal_kernels::GgmlType;

mod common;
use common::{SMOLLM2, model_path};

fn shoal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
}

fn smollm2() -> PathBuf {
    model_path(SMOLLM2)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Runs `shoal run` on `model` and checks it failed with one line naming the problem.
fn run_fails(model: &Path, expect: &str) {
    let out = shoal().args(["run", "--max-tokens", "4", "--model"]).arg(model).arg("hi").output().unwrap();
    check_one_line_error(&out, expect);
}

fn check_one_line_error(out: &Output, expect: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded; stderr: {err}");
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(err.contains(expect), "expected {expect:?} in {err:?}");
    assert!(out.stdout.is_empty(), "stdout not empty");
}

#[test]
fn missing_file_is_one_line() {
    run_fails(Path::new("/nonexistent/model.gguf"), "No such file or directory");
}

#[test]
fn directory_is_refused() {
    run_fails(&std::env::temp_dir(), "is a directory");
}

#[test]
fn random_bytes_are_not_gguf() {
    let p = tmp("random.gguf");
    let mut x = 0x1234_5678_9abc_def0u64;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&p, bytes).unwrap();
    run_fails(&p, "not a GGUF file");
}

#[test]
fn truncated_model_header_and_data_are_named() {
    let full = std::fs::read(smollm2()).unwrap();
    let p = tmp("truncated-header.gguf");
    std::fs::write(&p, &full[..100_000]).unwrap();
    run_fails(&p, "file is truncated");
    let p = tmp("truncated-data.gguf");
    std::fs::write(&p, &full[..full.len() / 2]).unwrap();
    run_fails(&p, "file is truncated or corrupt: tensor");
}

#[test]
fn unknown_architecture_is_named() {
    let p = tmp("arch.gguf");
    let b = Builder::new()
        .kv("general.architecture", Value::String("mamba9".into()))
        .tensor("w", &[32], GgmlType::F32, vec![0; 128]);
    std::fs::write(&p, b.build()).unwrap();
    run_fails(&p, "unsupported model architecture \"mamba9\"");
}

#[test]
fn unknown_quant_type_is_named() {
    let p = tmp("type.gguf");
    let mut bytes = Builder::new()
        .kv("general.architecture", Value::String("llama".into()))
        .tensor("w", &[32], GgmlType::F32, vec![0; 128])
        .build();
    // Patch the tensor type (after name, rank and one dim) to an id ggml never assigned.
    let at = bytes.windows(9).position(|w| w == [1, 0, 0, 0, 0, 0, 0, 0, b'w']).unwrap() + 9 + 4 + 8;
    bytes[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
    run_fails(&p, "unknown ggml type id 77");
}

/// A tiny llama file whose Q projection is in a type shoal cannot compute with.
#[test]
fn unsupported_quant_type_is_named() {
    let e = 256u64;
    let f32s = |n: u64| vec![0u8; (n * 4) as usize];
    let mut b = Builder::new()
        .kv("general.architecture", Value::String("llama".into()))
        .kv("llama.block_count", Value::U32(1))
        .kv("llama.embedding_length", Value::U32(e as u32))
        .kv("llama.feed_forward_length", Value::U32(e as u32))
        .kv("llama.attention.head_count", Value::U32(4))
        .kv("llama.vocab_size", Value::U32(4))
        .kv("tokenizer.ggml.model", Value::String("gpt2".into()))
        .kv("tokenizer.ggml.tokens", Value::Array(Array::String(vec!["a".into(), "b".into(), "c".into(), "d".into()])))
        .tensor("token_embd.weight", &[e, 4], GgmlType::F32, f32s(e * 4))
        .tensor("output_norm.weight", &[e], GgmlType::F32, f32s(e))
        .tensor("blk.0.attn_norm.weight", &[e], GgmlType::F32, f32s(e))
        .tensor("blk.0.ffn_norm.weight", &[e], GgmlType::F32, f32s(e));
    let iq = GgmlType::IQ2_XXS;
    b = b.tensor("blk.0.attn_q.weight", &[e, e], iq, vec![0; (e / 256 * e) as usize * iq.type_size()]);
    for n in ["attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"] {
        b = b.tensor(&format!("blk.0.{n}.weight"), &[e, e], GgmlType::F32, f32s(e * e));
    }
    let p = tmp("iq2.gguf");
    std::fs::write(&p, b.build()).unwrap();
    run_fails(&p, "type IQ2_XXS is not supported");
}

#[test]
fn bad_flag_values_are_refused() {
    let out = shoal()
        .args(["run", "--temperature", "0.5", "--top-p", "7", "--model"])
        .arg(smollm2())
        .arg("hi")
        .output()
        .unwrap();
    check_one_line_error(&out, "top_p 7 must be in (0, 1]");
}

/// Peak RSS while generating stays below the file size + 150 MB: weights are mapped once.
#[test]
fn greedy_run_prints_only_the_completion_and_maps_weights() {
    let model = smollm2();
    let out = shoal()
        .args(["run", "--threads", "2", "--temperature", "0", "--max-tokens", "32", "--print-stats", "--model"])
        .arg(&model)
        .arg("The capital of France is")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("Paris"), "completion: {text:?}");
    assert!(!text.contains("The capital of France is"), "prompt echoed: {text:?}");
    let rss: u64 = err
        .lines()
        .find_map(|l| l.split("peak_rss_bytes=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no peak_rss_bytes in {err:?}"));
    let size = std::fs::metadata(&model).unwrap().len();
    assert!(rss < size + 150_000_000, "peak RSS {rss} ≥ file {size} + 150 MB");
}

fn run_ok(args: &[&str]) -> (String, String) {
    let out = shoal().arg("run").args(["--threads", "2", "--model"]).arg(smollm2()).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    (String::from_utf8(out.stdout).unwrap(), err)
}

/// Greedy "The capital of France is" → " Paris.\n\nThe United States has ..." (the fixture).
#[test]
fn stop_strings_and_max_tokens_end_generation() {
    let (text, err) = run_ok(&["--temperature", "0", "--stop", ".", "--print-stats", "The capital of France is"]);
    assert_eq!(text, " Paris\n");
    assert!(err.contains("finish=stop"), "{err}");
    let (text, err) = run_ok(&["--temperature", "0", "--max-tokens", "2", "--print-stats", "The capital of France is"]);
    assert_eq!(text, " Paris.\n");
    assert!(err.contains("generated_tokens=2 finish=length"), "{err}");
}

#[test]
fn a_seed_reproduces_a_sampled_completion() {
    let args = |seed: &'static str| ["--temperature", "1.0", "--top-k", "0", "--top-p", "1.0", "--min-p", "0", "--seed", seed, "--max-tokens", "24", "--ignore-eos", "Once upon a time"];
    let a = run_ok(&args("7")).0;
    assert_eq!(a, run_ok(&args("7")).0);
    assert_ne!(a, run_ok(&args("8")).0, "two seeds gave the same 24 sampled tokens");
}

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples").join(name)
}

#[test]
fn plan_places_qwen3_235b_on_the_3090_rig_and_cpu_host() {
    let out = shoal()
        .args(["plan", "--model", "qwen3-235b-a22b:q4_k_m", "--ctx", "32768", "--cluster"])
        .arg(example("3x3090-plus-cpu-host.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("ctx 32768") && text.contains("RTX 3090") && text.contains("bigram/cpu"), "{text}");
    assert!(text.contains("predicted decode:") && text.contains("bottleneck:"), "{text}");
}

#[test]
fn plan_says_llama_405b_does_not_fit_three_3090s_and_what_would() {
    let out = shoal()
        .args(["plan", "--model", "llama-3.1-405b:q4_k_m", "--ctx", "32768", "--json", "--cluster"])
        .arg(example("3x3090.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["fits"], false);
    let nf = &j["no_fit"];
    let short = nf["shortfall"].as_u64().unwrap();
    assert!(short > 100_000_000_000 && nf["need"].as_u64().unwrap() == nf["capacity"].as_u64().unwrap() + short, "{j:#}");
    assert!(nf["suggestions"].as_array().unwrap().iter().any(|s| s.as_str().unwrap().contains("more RTX 3090")), "{j:#}");
}

#[test]
fn plan_reads_a_header_only_prefix_of_a_gguf() {
    // The header of SmolLM2 alone, as from a partial download.
    let f = shoal_model::gguf::GgufFile::open(smollm2()).unwrap();
    let head = tmp("smollm2-header-only.gguf");
    std::fs::write(&head, &f.bytes()[..f.header().data_offset as usize]).unwrap();
    let out = shoal().args(["plan", "--json", "--model"]).arg(&head).arg("--cluster").arg(example("cpu-lab-4-nodes.toml")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let placed: u64 = j["tensors"].as_array().unwrap().iter().map(|t| t["bytes"].as_u64().unwrap()).sum();
    assert_eq!(placed, f.header().tensor_bytes());
}

#[test]
fn plan_rejects_bad_clusters_and_unknown_models_in_one_line() {
    let bad = tmp("bad-cluster.toml");
    std::fs::write(&bad, "[[host]]\nname = 'a'\nram_gb = 0\nram_bandwidth_gbs = 1\ncpu_tflops = 1\n").unwrap();
    let out = shoal().args(["plan", "--model", "qwen3-32b:q4_k_m", "--cluster"]).arg(&bad).output().unwrap();
    check_one_line_error(&out, "ram_gb must be a positive number");
    let out = shoal().args(["plan", "--model", "llama-9b:q4_k_m", "--cluster"]).arg(example("3x3090.toml")).output().unwrap();
    check_one_line_error(&out, "unknown model");
    // A file that is not GGUF is refused from its first bytes (not read to the end).
    let junk = tmp("not-a-model.gguf");
    std::fs::write(&junk, vec![b'x'; 3 << 20]).unwrap();
    let out = shoal().args(["plan", "--model"]).arg(&junk).arg("--cluster").arg(example("3x3090.toml")).output().unwrap();
    check_one_line_error(&out, "not a GGUF file");
}
