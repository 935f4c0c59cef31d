//! The shard executor on a real model: splitting the layers over several shards and batching
//! several sequences into one step must not change what the model computes.

use std::path::PathBuf;
use std::sync::Arc;

use shoal_model::arch::Config;
use shoal_model::executor::{SeqChunk, ShardExecutor, StageInput, StageOutput};
use shoal_model::gguf::GgufFile;
use shoal_model::weights::{ShardSpec, Weights};

fn model(name: &str) -> Arc<GgufFile> {
    let dir = std::env::var_os("SHOAL_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/shoal/models")
    });
    let p = dir.join(name);
    assert!(p.exists(), "{} is missing: run scripts/fetch-models", p.display());
    Arc::new(GgufFile::open(p).unwrap())
}

fn shard(f: &Arc<GgufFile>, layers: std::ops::Range<usize>, embed: bool, head: bool) -> ShardExecutor {
    let w = Weights::load(Arc::clone(f), ShardSpec { layers, embed, head }).unwrap();
    ShardExecutor::new(Arc::new(w), 2, 512)
}

/// Runs `steps` (token ids per step for one sequence) through a pipeline of shards.
fn pipeline(stages: &mut [ShardExecutor], seq: u64, steps: &[Vec<u32>]) -> Vec<Vec<f32>> {
    for s in stages.iter_mut() {
        s.add_sequence(seq);
    }
    let mut all = Vec::new();
    for toks in steps {
        let chunk = [SeqChunk { seq, n_tokens: toks.len() }];
        let mut out = stages[0].forward(&chunk, StageInput::Tokens(toks)).unwrap();
        for s in stages[1..].iter_mut() {
            let StageOutput::Hidden(h) = out else { panic!("a middle stage produced logits") };
            out = s.forward(&chunk, StageInput::Hidden(&h)).unwrap();
        }
        let StageOutput::Logits(l) = out else { panic!("the last stage produced hidden states") };
        all.push(l);
    }
    all
}

#[test]
fn split_shards_equal_the_whole_model_bit_for_bit() {
    for name in ["SmolLM2-135M-Instruct.Q4_1.gguf", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"] {
        let f = model(name);
        let n = Config::from_gguf(&f).unwrap().n_layer;
        let steps = vec![vec![504, 3575, 282, 4649, 314], vec![7042], vec![30]];
        let whole = pipeline(&mut [shard(&f, 0..n, true, true)], 7, &steps);
        let a = n / 3;
        let b = 2 * n / 3;
        let three = pipeline(
            &mut [shard(&f, 0..a, true, false), shard(&f, a..b, false, false), shard(&f, b..n, false, true)],
            7,
            &steps,
        );
        assert_eq!(whole, three, "{name}: 3 shards differ from 1");
    }
}

#[test]
fn batched_sequences_match_sequences_run_alone() {
    let f = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let n = Config::from_gguf(&f).unwrap().n_layer;
    let prompts: [&[u32]; 3] = [&[504, 3575, 282, 4649, 314], &[1604, 3987, 46477, 24, 94, 727], &[12615, 36411, 418]];
    let next = [7042u32, 472, 216];

    // Alone.
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut ex = shard(&f, 0..n, true, true);
        alone.push(pipeline(std::slice::from_mut(&mut ex), i as u64, &[p.to_vec(), vec![next[i]]]));
    }

    // Together: one prefill step holding all three prompts, then one decode step of three.
    let mut ex = shard(&f, 0..n, true, true);
    for i in 0..3 {
        ex.add_sequence(i);
    }
    let chunks: Vec<SeqChunk> =
        prompts.iter().enumerate().map(|(i, p)| SeqChunk { seq: i as u64, n_tokens: p.len() }).collect();
    let ids: Vec<u32> = prompts.concat();
    let StageOutput::Logits(pre) = ex.forward(&chunks, StageInput::Tokens(&ids)).unwrap() else { panic!() };
    let chunks: Vec<SeqChunk> = (0..3).map(|i| SeqChunk { seq: i, n_tokens: 1 }).collect();
    let StageOutput::Logits(dec) = ex.forward(&chunks, StageInput::Tokens(&next)).unwrap() else { panic!() };

    // The matmul may take a different (batched) path for a different number of rows, so the
    // comparison allows float noise; the argmax must agree.
    let nv = pre.len() / 3;
    for i in 0..3 {
        for (got, want) in [(&pre[i * nv..(i + 1) * nv], &alone[i][0]), (&dec[i * nv..(i + 1) * nv], &alone[i][1])] {
            let max_diff = got.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(max_diff < 0.05, "sequence {i}: batched logits differ by {max_diff}");
            assert_eq!(shoal_model::sampling::argmax(got), shoal_model::sampling::argmax(want));
        }
    }
}

#[test]
fn bad_steps_are_errors_and_leave_state_intact() {
    let f = model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let n = Config::from_gguf(&f).unwrap().n_layer;
    let mut ex = shard(&f, 0..n, true, true);
    ex.add_sequence(1);
    let one = [SeqChunk { seq: 1, n_tokens: 1 }];
    // Unknown sequence, wrong input kind and size, token outside the vocabulary, empty chunk.
    assert!(ex.forward(&[SeqChunk { seq: 9, n_tokens: 1 }], StageInput::Tokens(&[1])).is_err());
    assert!(ex.forward(&one, StageInput::Hidden(&[0.0; 576])).is_err());
    assert!(ex.forward(&one, StageInput::Tokens(&[1, 2])).is_err());
    assert!(ex.forward(&one, StageInput::Tokens(&[49152])).is_err());
    assert!(ex.forward(&[SeqChunk { seq: 1, n_tokens: 0 }], StageInput::Tokens(&[])).is_err());
    assert_eq!(ex.seq_len(1), Some(0), "a failed step must not advance the sequence");
    // Context limit.
    let long = vec![1u32; 513];
    assert!(matches!(
        ex.forward(&[SeqChunk { seq: 1, n_tokens: 513 }], StageInput::Tokens(&long)),
        Err(shoal_model::Error::ContextFull { .. })
    ));
    assert!(ex.forward(&one, StageInput::Tokens(&[504])).is_ok());
    assert_eq!(ex.seq_len(1), Some(1));
    // Truncate and release.
    ex.truncate(1, 0).unwrap();
    assert_eq!(ex.seq_len(1), Some(0));
    assert!(ex.release(1));
    assert!(!ex.release(1));
}
