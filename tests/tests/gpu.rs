//! The GPU path of the shard executor against the CPU path, on both test models and the
//! upcycled-MoE checkpoint's routing (feature `cuda`; each test says "skipped" and returns
//! when no CUDA device is present).
//!
//! What must hold: 24 greedy tokens identical for a prompt and then a batch of two sequences
//! at different positions (a prefill chunk then decode steps), and every step's logits within
//! [`LOGIT_TOL`] of the CPU's. The matrix kernels compute with the CPU's integers; the f32
//! order of sums and the attention arithmetic differ, so logits are close, not bit-equal.
#![cfg(feature = "cuda")]

use std::path::PathBuf;
use std::sync::Arc;

use shoal_model::arch::Config;
use shoal_model::executor::{SeqChunk, ShardExecutor, StageInput, StageOutput};
use shoal_model::gguf::GgufFile;
use shoal_model::gpu::ExpertPlacement;
use shoal_model::sampling::argmax;
use shoal_model::tokenizer::Tokenizer;
use shoal_model::weights::{ShardSpec, Weights};

/// Largest |GPU − CPU| logit allowed, on logits spanning about ±30.
const LOGIT_TOL: f32 = 0.1;

fn models_dir() -> PathBuf {
    std::env::var_os("SHOAL_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/shoal/models")
    })
}

fn gpu_present() -> bool {
    match shoal_kernels::cuda::probe(false) {
        Ok(g) if !g.is_empty() => true,
        Ok(_) | Err(_) => {
            eprintln!("skipped: no CUDA device on this machine");
            false
        }
    }
}

/// Greedy tokens and per-step logits of sequence 1 (prompt, then 24 steps), with sequence 2
/// (the prompt less its last token) batched alongside.
fn run(ex: &mut ShardExecutor, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    ex.add_sequence(1);
    ex.add_sequence(2);
    let short = &prompt[..prompt.len() - 1];
    let mut input: Vec<u32> = prompt.iter().chain(short).copied().collect();
    let mut chunks = vec![SeqChunk { seq: 1, n_tokens: prompt.len() }, SeqChunk { seq: 2, n_tokens: short.len() }];
    let (mut toks, mut logits) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let StageOutput::Logits(l) = ex.forward(&chunks, StageInput::Tokens(&input)).unwrap() else { panic!("no logits") };
        let v = l.len() / 2;
        let (a, b) = (argmax(&l[..v]), argmax(&l[v..]));
        toks.push(a);
        logits.push(l[..v].to_vec());
        input = vec![a, b];
        chunks = vec![SeqChunk { seq: 1, n_tokens: 1 }, SeqChunk { seq: 2, n_tokens: 1 }];
    }
    (toks, logits)
}

fn gpu_matches_cpu(file: &str, text: &str) {
    if !gpu_present() {
        return;
    }
    let file = Arc::new(GgufFile::open(models_dir().join(file)).unwrap());
    let c = Config::from_gguf(&file).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let prompt = tok.encode(text, true, false).unwrap();
    let w = Arc::new(Weights::load(Arc::clone(&file), ShardSpec::full(c.n_layer)).unwrap());
    let mut cpu = ShardExecutor::new(Arc::clone(&w), 2, 512);
    let mut gpu = ShardExecutor::new(w, 2, 512);
    gpu.use_gpu(0, ExpertPlacement::Gpu).unwrap();
    let (want, want_logits) = run(&mut cpu, &prompt, 24);
    let (got, got_logits) = run(&mut gpu, &prompt, 24);
    let worst = got_logits
        .iter()
        .zip(&want_logits)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0.0f32, f32::max);
    eprintln!("{file:?} on {}: {:?} (largest logit difference {worst})", gpu.gpu_name().unwrap_or("?"), tok.decode(&got, false));
    assert_eq!(got, want, "GPU greedy tokens differ from the CPU's");
    assert!(worst <= LOGIT_TOL, "logits differ from the CPU's by up to {worst}");
}

#[test]
fn smollm2_on_the_gpu_generates_the_cpu_tokens() {
    gpu_matches_cpu("SmolLM2-135M-Instruct.Q4_1.gguf", "The capital of France is");
}

#[test]
fn qwen2_5_on_the_gpu_generates_the_cpu_tokens() {
    gpu_matches_cpu("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "def fibonacci(n):");
}

#[test]
fn moe_fixture_on_the_gpu_routes_like_the_cpu_with_experts_on_device_or_in_host_ram() {
    if !gpu_present() {
        return;
    }
    let dir = std::env::var_os("SHOAL_FIXTURES_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/shoal/fixtures")
    });
    let file = Arc::new(GgufFile::open(dir.join("qwen3moe.gguf")).unwrap());
    let c = Config::from_gguf(&file).unwrap();
    let w = Arc::new(Weights::load(Arc::clone(&file), ShardSpec::full(c.n_layer)).unwrap());
    let prompt = [1u32, 7, 42, 99, 5, 13];
    let (want, want_logits) = run(&mut ShardExecutor::new(Arc::clone(&w), 1, 256), &prompt, 12);
    for place in [ExpertPlacement::Gpu, ExpertPlacement::HostRam] {
        let mut ex = ShardExecutor::new(Arc::clone(&w), 1, 256);
        ex.use_gpu(0, place).unwrap();
        let (got, logits) = run(&mut ex, &prompt, 12);
        assert_eq!(got, want, "{place:?}: greedy tokens differ from the CPU's");
        let worst = logits.iter().zip(&want_logits).flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs())).fold(0.0f32, f32::max);
        assert!(worst <= 1e-3, "{place:?}: logits differ from the CPU's by up to {worst}");
    }
}
