//! qwen3, qwen3moe and mixtral against Hugging Face `transformers`: small models with seeded
//! random weights made, run and converted by `scripts/fixtures/make_fixtures.py` (llama.cpp's
//! converter, f32 weights), with transformers' logits and greedy tokens saved beside them.
//!
//! The executor runs the prompt as one chunk, then the reference's greedy tokens one at a time
//! (each step compared, so one early miss cannot hide the rest). At every step its greedy
//! token must be the reference's, and its logits within [`TOLERANCE`] of transformers'
//! (absolute; the logits span about ±3). The gap is rounding, not a difference in the model:
//! shoal keeps K and V in f16 and rounds Q to f16 in attention, as llama.cpp does, where
//! transformers stays in f32.

use std::path::PathBuf;
use std::sync::Arc;

use shoal_model::arch::Config;
use shoal_model::executor::{SeqChunk, ShardExecutor, StageInput, StageOutput};
use shoal_model::gguf::GgufFile;
use shoal_model::sampling::argmax;
use shoal_model::weights::{ShardSpec, Weights};

const TOLERANCE: f32 = 2e-2;

fn fixtures_dir() -> PathBuf {
    std::env::var_os("SHOAL_FIXTURES_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/shoal/fixtures")
    })
}

#[derive(serde::Deserialize)]
struct Reference {
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

/// Runs fixture `name`; returns the largest logit difference over every step.
fn check(name: &str) -> f32 {
    let dir = fixtures_dir();
    let (gguf, json) = (dir.join(format!("{name}.gguf")), dir.join(format!("{name}.json")));
    assert!(gguf.exists() && json.exists(), "{} is missing: run scripts/fixtures/run", gguf.display());
    let r: Reference = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    let file = Arc::new(GgufFile::open(&gguf).unwrap());
    let c = Config::from_gguf(&file).unwrap();
    let w = Weights::load(file, ShardSpec::full(c.n_layer)).unwrap();
    let mut ex = ShardExecutor::new(Arc::new(w), 2, 256);
    ex.add_sequence(1);
    let mut input = r.prompt.clone();
    let mut worst = 0f32;
    for (step, (want_tok, want)) in r.greedy.iter().zip(&r.logits).enumerate() {
        let chunk = [SeqChunk { seq: 1, n_tokens: input.len() }];
        let StageOutput::Logits(got) = ex.forward(&chunk, StageInput::Tokens(&input)).unwrap() else { panic!("no logits") };
        assert_eq!(got.len(), want.len(), "{name}: vocabulary");
        let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff <= TOLERANCE, "{name}: step {step}: logits differ by up to {diff}");
        assert_eq!(argmax(&got), *want_tok, "{name}: step {step}: greedy token");
        worst = worst.max(diff);
        input = vec![*want_tok];
    }
    eprintln!("{name} ({}): {} greedy steps equal, logits within {worst:.2e} of transformers", c.arch, r.greedy.len());
    worst
}

#[test]
fn qwen3_matches_transformers() {
    let c = Config::from_gguf(&GgufFile::open(fixtures_dir().join("qwen3.gguf")).unwrap()).unwrap();
    assert!(c.traits.qk_norm && c.moe.is_none());
    check("qwen3");
}

#[test]
fn qwen3moe_matches_transformers() {
    let c = Config::from_gguf(&GgufFile::open(fixtures_dir().join("qwen3moe.gguf")).unwrap()).unwrap();
    let m = c.moe.expect("experts");
    assert_eq!((m.n_expert, m.n_used), (8, 2));
    check("qwen3moe");
}

#[test]
fn mixtral_matches_transformers() {
    let c = Config::from_gguf(&GgufFile::open(fixtures_dir().join("mixtral.gguf")).unwrap()).unwrap();
    assert_eq!(c.arch, "llama");
    let m = c.moe.expect("experts");
    assert_eq!((m.n_expert, m.n_used), (8, 2));
    check("mixtral");
}
