//! Routed experts on a real model: SmolLM2 "upcycled" into a Mixtral-shaped model, every FFN
//! turned into identical experts behind a router, must reproduce the dense model exactly.
//!
//! Two upcycles, each written as a GGUF file (stacked `ffn_{gate,up,down}_exps`, an f32
//! `ffn_gate_inp` router, `llama.expert_count` / `expert_used_count`):
//! - 4 experts, top-2, a zero router: every token's two experts get weight 0.5 each, and
//!   0.5·y + 0.5·y is y exactly, so this checks the weighted sum;
//! - 4 experts, top-1, a random router: tokens go to different experts (each expert runs on
//!   the tokens routed to it, grouped across the batch) with weight exactly 1, so this checks
//!   the routing and grouping.
//!
//! Greedy tokens must equal the dense model's, and every logit bit for bit, for two
//! sequences batched in one step; on one executor and on tensor-parallel groups of 2 and 3
//! ranks (exact mode, in-process collective).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use shoal_kernels::GgmlType;
use shoal_model::executor::{SeqChunk, ShardExecutor, StageInput, StageOutput};
use shoal_model::gguf::{Builder, GgufFile, Value};
use shoal_model::sampling::argmax;
use shoal_model::tp::{LocalGroup, TpMode};
use shoal_model::weights::{ShardSpec, Weights};

const N_EXPERT: usize = 4;

fn models_dir() -> PathBuf {
    std::env::var_os("SHOAL_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/shoal/models")
    })
}

fn smollm2() -> PathBuf {
    let p = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-models", p.display());
    p
}

/// Writes `dense` with every FFN as `N_EXPERT` copies of itself, routed to `n_used` experts
/// by `router(layer, n_embd)` (`n_embd * N_EXPERT` f32, expert-major).
fn upcycle(dense: &GgufFile, out: &Path, n_used: usize, router: impl Fn(usize, usize) -> Vec<f32>) {
    let mut b = Builder::new();
    for (k, v) in &dense.header().metadata {
        if k != "general.alignment" {
            b = b.kv(k, v.clone());
        }
    }
    b = b.kv("llama.expert_count", Value::U32(N_EXPERT as u32)).kv("llama.expert_used_count", Value::U32(n_used as u32));
    let n_embd = dense.get_u64("llama.embedding_length").unwrap().unwrap() as usize;
    for t in dense.tensors() {
        let data = dense.tensor_data(t);
        let ffn = ["ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"].iter().find(|s| t.name.ends_with(*s));
        match ffn {
            None => b = b.tensor(&t.name, &t.dims, t.ty, data.to_vec()),
            Some(s) => {
                let layer: usize = t.name.split('.').nth(1).unwrap().parse().unwrap();
                let name = t.name.replace(s, &s.replace(".weight", "_exps.weight"));
                let mut dims = t.dims.clone();
                dims.push(N_EXPERT as u64);
                b = b.tensor(&name, &dims, t.ty, data.repeat(N_EXPERT));
                if s.starts_with("ffn_gate.") {
                    let r = router(layer, n_embd);
                    assert_eq!(r.len(), n_embd * N_EXPERT);
                    let bytes = r.iter().flat_map(|x| x.to_le_bytes()).collect();
                    b = b.tensor(&format!("blk.{layer}.ffn_gate_inp.weight"), &[n_embd as u64, N_EXPERT as u64], GgmlType::F32, bytes);
                }
            }
        }
    }
    std::fs::write(out, b.build()).unwrap();
}

/// Greedy decoding of two prompts batched in every step: the logits of each step, and the
/// tokens routed to each expert.
/// Greedy steps of `prompts` batched, on a stage of `tp` ranks (exact tensor parallelism,
/// the other ranks on threads): every step's logits, and the tokens routed to each expert.
fn run(file: Arc<GgufFile>, prompts: &[Vec<u32>], steps: usize, tp: usize) -> (Vec<Vec<f32>>, Vec<u64>) {
    let n_layer = shoal_model::arch::Config::from_gguf(&file).unwrap().n_layer;
    let load = |rank: usize| {
        let w = Weights::load_tp(Arc::clone(&file), ShardSpec::full(n_layer), Some((rank, tp, TpMode::Exact))).unwrap();
        ShardExecutor::new(Arc::new(w), if tp == 1 { 2 } else { 1 }, 256)
    };
    let mut group = LocalGroup::new(tp).into_iter();
    let mut ex = load(0);
    ex.set_group(Box::new(group.next().unwrap())).unwrap();
    let followers: Vec<_> = group
        .enumerate()
        .map(|(i, g)| {
            let mut f = load(i + 1);
            f.set_group(Box::new(g)).unwrap();
            std::thread::spawn(move || f.follow())
        })
        .collect();
    let n_vocab = ex.weights().config.n_vocab;
    for s in 0..prompts.len() {
        ex.add_sequence(s as u64);
    }
    let mut inputs: Vec<Vec<u32>> = prompts.to_vec();
    let mut all = Vec::new();
    for _ in 0..steps {
        let chunks: Vec<SeqChunk> = inputs.iter().enumerate().map(|(s, t)| SeqChunk { seq: s as u64, n_tokens: t.len() }).collect();
        let ids: Vec<u32> = inputs.concat();
        let StageOutput::Logits(l) = ex.forward(&chunks, StageInput::Tokens(&ids)).unwrap() else { panic!("no logits") };
        inputs = l.chunks_exact(n_vocab).map(|row| vec![argmax(row)]).collect();
        all.push(l);
    }
    let routed = ex.expert_tokens().to_vec();
    drop(ex);
    for f in followers {
        f.join().unwrap().unwrap();
    }
    (all, routed)
}

/// Upcycles, runs both models, compares; returns the tokens routed to each expert.
fn check(name: &str, n_used: usize, router: impl Fn(usize, usize) -> Vec<f32>) -> Vec<u64> {
    let dense_path = smollm2();
    let dense = Arc::new(GgufFile::open(&dense_path).unwrap());
    let out = std::env::temp_dir().join(format!("shoal-upcycled-{name}-{}.gguf", std::process::id()));
    upcycle(&dense, &out, n_used, router);
    let moe = Arc::new(GgufFile::open(&out).unwrap());
    let _ = std::fs::remove_file(&out); // the map keeps the data
    let c = shoal_model::arch::Config::from_gguf(&moe).unwrap();
    let m = c.moe.expect("the upcycled model has experts");
    assert_eq!((m.n_expert, m.n_used, m.n_ff), (N_EXPERT, n_used, c.n_ff));
    // Two prompts of different lengths, batched: prefill then 12 decode steps.
    let prompts = vec![vec![1, 504, 3458, 282, 4649, 314], vec![1, 29936, 421, 253, 1831, 1236, 30, 2342, 957]];
    let (want, none) = run(dense, &prompts, 13, 1);
    assert!(none.is_empty());
    let (got, routed) = run(Arc::clone(&moe), &prompts, 13, 1);
    let same_as_dense = |got: &[Vec<f32>], what: &str| {
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let same = g.len() == w.len() && g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{name} {what}: step {i}: the logits differ from the dense model's");
        }
    };
    same_as_dense(&got, "TP=1");
    // Tensor parallelism: the experts split over the ranks (2 + 2, then 2 + 1 + 1), and the
    // attention heads and FFN rows too; still every bit of the dense model.
    for tp in [2, 3] {
        let (got, _) = run(Arc::clone(&moe), &prompts, 13, tp);
        same_as_dense(&got, &format!("TP={tp}"));
    }
    // Every token went to n_used experts in every layer: (6 + 9 + 2 × 12) tokens × 30 layers.
    assert_eq!(routed.iter().sum::<u64>(), (6 + 9 + 2 * 12) * 30 * n_used as u64, "{routed:?}");
    routed
}

#[test]
fn upcycled_top2_zero_router_reproduces_the_dense_model_exactly() {
    let routed = check("top2", 2, |_, n_embd| vec![0.0; n_embd * N_EXPERT]);
    // All probabilities tie: the two lowest experts, always.
    assert!(routed[0] > 0 && routed[0] == routed[1] && routed[2] == 0 && routed[3] == 0, "{routed:?}");
}

#[test]
fn upcycled_top1_random_router_reproduces_the_dense_model_exactly() {
    // A fixed pseudo-random router, different per layer: tokens spread over the experts.
    let routed = check("top1", 1, |layer, n_embd| {
        let mut x = 0x9e37_79b9_u32.wrapping_mul(layer as u32 + 1);
        (0..n_embd * N_EXPERT)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32 - 0.5) * 0.2
            })
            .collect()
    });
    // The router spread the tokens: every expert ran on some.
    assert!(routed.iter().all(|&n| n > 0), "{routed:?}");
}
