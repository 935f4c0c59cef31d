//! Fidelity against llama.cpp: for both test models and every fixture prompt, shoal's
//! tokenization of the raw prompt, the logits at the last prompt position, and 48 greedy
//! tokens must match what llama.cpp produced (fixtures made by
//! `scripts/llama-cpp/make-fixtures.sh` from llama-cpp-python 0.3.36, see
//! `tests/fixtures/README.md`).
//!
//! Tolerance on logits: on x86 with AVX2/AVX-512, shoal's CPU forward pass rounds every float
//! operation like llama.cpp's CPU backend (same activation quantization, same accumulation
//! order per mul_mat path, same attention numerics for a context of `N_CTX` cells), so the
//! logits are bit-identical; the fixtures store them rounded to 6 decimals. We assert that
//! llama.cpp's top-64 logits are matched within `LOGIT_TOL` absolute (the fixture rounding
//! plus an ulp of logits near 30) and that the top-1 token is the same.

use std::path::PathBuf;

use serde::Deserialize;
use shoal_model::engine::{Engine, GenerateRequest};
use shoal_model::sampling::SamplingParams;

/// Largest allowed |shoal − llama.cpp| over llama.cpp's top-64 logits.
const LOGIT_TOL: f32 = 1e-5;

/// The context the fixtures were made with (llama.cpp's default `n_ctx`); attention rounds
/// like llama.cpp's for a KV cache of this size.
const N_CTX: usize = 512;

#[derive(Deserialize)]
struct Fixture {
    model: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    prompt_tokens: Vec<u32>,
    greedy_tokens: Vec<u32>,
    top_logits: Vec<(u32, f32)>,
}

fn models_dir() -> PathBuf {
    std::env::var_os("SHOAL_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/shoal/models")
    })
}

fn check(fixture: &str) {
    // Bit-compatibility with llama.cpp is built into the x86 SIMD kernels (AVX2 and AVX-512
    // both reproduce ggml's rounding order); the portable kernels are only within tolerance
    // (see `kernels/src/quant/mod.rs`), so on a CPU without AVX2 this comparison cannot hold.
    let level = shoal_kernels::cpu::detected_level();
    if level == shoal_kernels::cpu::SimdLevel::Portable {
        eprintln!("SKIPPED {fixture}: no AVX2 on this CPU, and only the x86 kernels are bit-exact");
        return;
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(fixture);
    let fx: Fixture = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let model = models_dir().join(&fx.model);
    assert!(model.exists(), "{} is missing: run scripts/fetch-models", model.display());
    let mut engine = Engine::load(&model, 2, N_CTX).unwrap();
    assert!(fx.cases.len() >= 4);
    let mut worst = 0f32;
    for case in &fx.cases {
        let tokens = engine.tokenize(&case.prompt, false).unwrap();
        assert_eq!(tokens, case.prompt_tokens, "tokenization of {:?}", case.prompt);

        let seq = 1_000;
        engine.executor().add_sequence(seq);
        let logits = engine.prefill(seq, &tokens).unwrap();
        engine.executor().release(seq);
        for &(id, want) in &case.top_logits {
            let got = logits[id as usize];
            worst = worst.max((got - want).abs());
            assert!(
                (got - want).abs() <= LOGIT_TOL,
                "{:?}: logit of token {id}: shoal {got}, llama.cpp {want}",
                case.prompt
            );
        }
        eprintln!("{:?} worst so far {worst}", case.prompt);
        let top1 = shoal_model::sampling::argmax(&logits);
        assert_eq!(top1, case.top_logits[0].0, "{:?}: top-1 token", case.prompt);

        let req = GenerateRequest {
            prompt_tokens: tokens,
            params: SamplingParams::greedy(),
            max_tokens: case.greedy_tokens.len(),
            stop: vec![],
            stop_at_eog: false,
        };
        let g = engine.generate(&req, |_| {}).unwrap();
        assert_eq!(g.tokens, case.greedy_tokens, "greedy tokens for {:?}", case.prompt);
    }
    eprintln!("{fixture}: {} prompts, worst top-64 logit difference {worst:.4}", fx.cases.len());
}

#[test]
fn smollm2_matches_llama_cpp() {
    check("smollm2-135m-instruct-q4_1.json");
}

#[test]
fn qwen2_5_coder_matches_llama_cpp() {
    check("qwen2.5-coder-0.5b-instruct-q4_k_m.json");
}
