//! Tensor parallelism inside one stage (`shoal_model::tp`), ranks on threads of this process
//! with the in-process collective: TP = 2 and 3 must compute what TP = 1 computes.
//!
//! - The qwen3, qwen3moe and mixtral fixtures (f32 weights, 2 KV heads: at TP = 3 one rank
//!   holds no attention head, only FFN columns or experts) against transformers, in both
//!   modes: greedy tokens exact and logits within the same [`TOLERANCE`] as at TP = 1.
//! - SmolLM2 Q4_1 (3 KV heads: 2 + 1 at TP = 2) and Qwen2.5 Q4_K_M (2 KV heads, K-quants) in
//!   [`TpMode::Exact`] against TP = 1: 16 greedy tokens and every logit bit equal. (In
//!   [`TpMode::Sum`] the partial products of `wo`/`w_down` are summed in another order than
//!   one matmul sums them; SmolLM2's activations reach 10^4, so a flipped int8 rounding of a
//!   quantized activation moves its logits by up to several units: Sum mode is checked on
//!   the f32 fixtures only.)
//!
//! The worker processes' TCP collective is tested end to end in `coordinator/tests`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use shoal_model::arch::Config;
use shoal_model::executor::{SeqChunk, ShardExecutor, StageInput, StageOutput};
use shoal_model::gguf::GgufFile;
use shoal_model::sampling::argmax;
use shoal_model::tp::{LocalGroup, TpMode};
use shoal_model::weights::{ShardSpec, Weights};

/// Absolute, on logits spanning about ±3 (as in `reference_fixtures.rs`).
const TOLERANCE: f32 = 2e-2;

fn fixtures_dir() -> PathBuf {
    std::env::var_os("SHOAL_FIXTURES_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/shoal/fixtures")
    })
}

fn models_dir() -> PathBuf {
    std::env::var_os("SHOAL_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/shoal/models")
    })
}

/// A stage of `size` ranks over the whole model: the leader here, the others following on
/// threads.
struct Group {
    leader: ShardExecutor,
    followers: Vec<JoinHandle<shoal_model::Result<()>>>,
}

impl Group {
    fn new(path: &Path, size: usize, mode: TpMode) -> Group {
        let file = Arc::new(GgufFile::open(path).unwrap());
        let c = Config::from_gguf(&file).unwrap();
        let spec = ShardSpec::full(c.n_layer);
        let mut members = LocalGroup::new(size).into_iter();
        let load = |rank: usize| {
            let w = Weights::load_tp(Arc::clone(&file), spec.clone(), Some((rank, size, mode))).unwrap();
            ShardExecutor::new(Arc::new(w), 1, 256)
        };
        let mut leader = load(0);
        leader.set_group(Box::new(members.next().unwrap())).unwrap();
        let followers = members
            .enumerate()
            .map(|(i, g)| {
                let mut ex = load(i + 1);
                ex.set_group(Box::new(g)).unwrap();
                std::thread::spawn(move || ex.follow())
            })
            .collect();
        Group { leader, followers }
    }

    /// Runs `prompt` then `steps` greedy tokens (or the `forced` ones, when given) for two
    /// sequences batched in every step (the second with the prompt's last token dropped, so
    /// their positions differ); returns the first sequence's tokens and logits per step.
    fn greedy(mut self, prompt: &[u32], steps: usize, forced: Option<&[u32]>) -> (Vec<u32>, Vec<Vec<f32>>) {
        let (a, b) = (1, 2);
        self.leader.add_sequence(a);
        self.leader.add_sequence(b);
        // Sequence bookkeeping travels too: a released and re-added sequence starts empty.
        self.leader.add_sequence(3);
        self.leader.release(3);
        let short = &prompt[..prompt.len() - 1];
        let mut input: Vec<u32> = prompt.iter().chain(short).copied().collect();
        let mut chunks = vec![SeqChunk { seq: a, n_tokens: prompt.len() }, SeqChunk { seq: b, n_tokens: short.len() }];
        let (mut toks, mut logits) = (Vec::new(), Vec::new());
        for step in 0..steps {
            let StageOutput::Logits(l) = self.leader.forward(&chunks, StageInput::Tokens(&input)).unwrap() else {
                panic!("no logits")
            };
            let v = l.len() / 2;
            let next_a = forced.map_or_else(|| argmax(&l[..v]), |f| f[step]);
            let next_b = argmax(&l[v..]);
            toks.push(next_a);
            logits.push(l[..v].to_vec());
            input = vec![next_a, next_b];
            chunks = vec![SeqChunk { seq: a, n_tokens: 1 }, SeqChunk { seq: b, n_tokens: 1 }];
        }
        // Dropping the leader ends the group: every follower returns cleanly.
        drop(self.leader);
        for f in self.followers {
            f.join().unwrap().unwrap();
        }
        (toks, logits)
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

#[derive(serde::Deserialize)]
struct Reference {
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn fixture_at(name: &str, size: usize, mode: TpMode) {
    let dir = fixtures_dir();
    let (gguf, json) = (dir.join(format!("{name}.gguf")), dir.join(format!("{name}.json")));
    assert!(gguf.exists() && json.exists(), "{} is missing: run scripts/fixtures/run", gguf.display());
    let r: Reference = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    let (toks, logits) = Group::new(&gguf, size, mode).greedy(&r.prompt, r.greedy.len(), Some(&r.greedy));
    let mut worst = 0f32;
    for (step, (got, want)) in logits.iter().zip(&r.logits).enumerate() {
        let d = max_diff(got, want);
        assert!(d <= TOLERANCE, "{name} TP={size} {mode:?}: step {step}: logits differ by up to {d}");
        assert_eq!(argmax(got), r.greedy[step], "{name} TP={size} {mode:?}: step {step}: greedy token");
        worst = worst.max(d);
    }
    assert_eq!(toks, r.greedy);
    eprintln!("{name} TP={size} {mode:?}: {} greedy steps equal, logits within {worst:.2e} of transformers", r.greedy.len());
}

#[test]
fn qwen3_fixture_at_tp_2_and_3_matches_transformers() {
    for mode in [TpMode::Exact, TpMode::Sum] {
        fixture_at("qwen3", 2, mode);
        fixture_at("qwen3", 3, mode);
    }
}

#[test]
fn qwen3moe_fixture_at_tp_2_and_3_matches_transformers() {
    for mode in [TpMode::Exact, TpMode::Sum] {
        fixture_at("qwen3moe", 2, mode);
        fixture_at("qwen3moe", 3, mode);
    }
}

#[test]
fn mixtral_fixture_at_tp_2_and_3_matches_transformers() {
    for mode in [TpMode::Exact, TpMode::Sum] {
        fixture_at("mixtral", 2, mode);
        fixture_at("mixtral", 3, mode);
    }
}

fn quantized_at(file: &str, prompt: &[u32], sizes: &[usize]) {
    let path = models_dir().join(file);
    assert!(path.exists(), "{} is missing: run scripts/fetch-models", path.display());
    let (want_toks, want_logits) = Group::new(&path, 1, TpMode::Exact).greedy(prompt, 16, None);
    for &size in sizes {
        let (toks, logits) = Group::new(&path, size, TpMode::Exact).greedy(prompt, 16, None);
        assert_eq!(toks, want_toks, "{file} TP={size}: greedy tokens differ from TP=1");
        for (step, (got, want)) in logits.iter().zip(&want_logits).enumerate() {
            assert!(got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "{file} TP={size}: step {step}: logits differ from TP=1 by up to {}", max_diff(got, want));
        }
        eprintln!("{file} TP={size}: 16 greedy tokens and every logit bit equal to TP=1");
    }
}

#[test]
fn smollm2_q4_1_at_tp_2_and_3_matches_tp_1() {
    // BOS and four ordinary tokens.
    quantized_at("SmolLM2-135M-Instruct.Q4_1.gguf", &[1, 504, 2365, 6354, 16438], &[2, 3]);
}

#[test]
fn qwen2_5_q4_k_m_at_tp_2_matches_tp_1() {
    // Four ordinary tokens.
    quantized_at("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", &[750, 75698, 1445, 982], &[2]);
}

