//! The pipeline-parallel cluster end to end: real `shoal worker` processes on 127.0.0.1,
//! real gRPC, real models. Greedy output through 1, 2 and 3 workers must equal the
//! single-process engine; bad frames, foreign protocol majors and killed workers must fail
//! cleanly and quickly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shoal_coordinator::cluster::local::LocalCluster;
use shoal_coordinator::cluster::pipeline::{self, LoadOptions, Pipeline, Sampled};
use shoal_coordinator::cluster::scheduler::{Scheduler, SchedulerConfig};
use shoal_kernels::codec::Codec;
use shoal_model::engine::{Engine, GenerateRequest};
use shoal_model::gguf::GgufFile;
use shoal_model::sampling::{SamplingParams, argmax, logprobs};
use shoal_proto::v1::{self, worker_client::WorkerClient};

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const QWEN: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
/// Threads and context of both the reference engine and every worker: attention rounds
/// like llama.cpp for this (n_ctx, n_threads), so they must agree for bit-exact logits.
const THREADS: usize = 2;
const N_CTX: usize = 512;

fn models_dir() -> PathBuf {
    std::env::var_os("SHOAL_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/shoal/models")
    })
}

fn model_path(name: &str) -> PathBuf {
    let p = models_dir().join(name);
    assert!(p.exists(), "{} is missing: run scripts/fetch-models", p.display());
    p
}

fn start(n: usize) -> LocalCluster {
    LocalCluster::start(Path::new(env!("CARGO_BIN_EXE_shoal")), n, &models_dir()).expect("starting workers")
}

fn opts(name: &str, codec: Codec) -> LoadOptions {
    LoadOptions {
        model_file: name.into(),
        n_ctx: N_CTX,
        n_threads: THREADS,
        attn_threads: THREADS,
        codec,
        kv_budget: 0,
        even: true,
    }
}

async fn load(addrs: &[String], name: &str, codec: Codec) -> Scheduler {
    let mut workers = Vec::new();
    for a in addrs {
        workers.push(pipeline::connect(a).await.unwrap());
    }
    let file = GgufFile::open(model_path(name)).unwrap();
    Scheduler::start(Pipeline::load(workers, &file, &opts(name, codec)).await.unwrap(), SchedulerConfig::default())
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest { prompt_tokens: prompt, params: SamplingParams::greedy(), max_tokens, stop: vec![], stop_at_eog: false }
}

/// Greedy tokens, the log-probability of each and the gap between the two best logits, from
/// the single-process engine.
fn reference(engine: &mut Engine, prompt: &[u32], n: usize) -> Vec<(u32, f32, f32)> {
    let seq = 99;
    engine.executor().add_sequence(seq);
    let mut logits = engine.prefill(seq, prompt).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let id = argmax(&logits);
        let second = logits.iter().enumerate().filter(|&(i, _)| i != id as usize).map(|(_, &l)| l).fold(f32::MIN, f32::max);
        out.push((id, logprobs(&logits, id, 0).0, logits[id as usize] - second));
        if out.len() < n {
            logits = engine.decode(seq, id).unwrap();
        }
    }
    engine.executor().release(seq);
    out
}

async fn through(p: &Scheduler, prompt: &[u32], n: usize) -> Vec<Sampled> {
    p.sample_loop(&greedy(prompt.to_vec(), n), true, |_, len| len < n).await.unwrap()
}

const N_TOKENS: usize = 24;

/// Tolerances of the lossy codecs, stated per codec: `(gap, logprob)`.
///
/// - `gap`: greedy tokens must equal the single-process engine's up to the first position
///   where the engine's two best logits are closer than this (a near-tie the codec's noise
///   may flip; after a flip the continuations differ legitimately).
/// - `logprob`: before that position, the chosen token's log-probability may differ by at
///   most this many nats.
///
/// Measured on the fixture prompts (24 tokens): bf16 flips at gaps up to 0.66 with |Δ| up
/// to 0.15; q8 (one scale per token, so outlier channels of the residual stream cost the
/// others precision) flips at gaps up to 1.01 with |Δ| up to 0.61. f32 must be exact.
fn tolerance(c: Codec) -> (f32, f32) {
    match c {
        Codec::F32 => (0.0, 0.0),
        Codec::Bf16 => (1.0, 0.3),
        Codec::Q8 => (1.5, 1.0),
    }
}

/// The prompts of the llama.cpp fixtures (`tests/fixtures/*.json`).
fn fixture_prompts(name: &str) -> Vec<Vec<u32>> {
    let f = match name {
        SMOLLM2 => "smollm2-135m-instruct-q4_1.json",
        _ => "qwen2.5-coder-0.5b-instruct-q4_k_m.json",
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(f);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["prompt_tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect())
        .collect()
}

async fn check_model(name: &str) {
    let mut engine = Engine::load(model_path(name), THREADS, N_CTX).unwrap();
    let prompts = fixture_prompts(name);
    let want: Vec<_> = prompts.iter().map(|p| reference(&mut engine, p, N_TOKENS)).collect();
    let cluster = start(3);
    let addrs = cluster.addrs();
    let runs = [(1, Codec::F32), (2, Codec::F32), (3, Codec::F32), (3, Codec::Bf16), (3, Codec::Q8)];
    for (n, codec) in runs {
        let p = load(&addrs[..n], name, codec).await;
        for (k, (prompt, want)) in prompts.iter().zip(&want).enumerate() {
            let got = through(&p, prompt, N_TOKENS).await;
            let got_tokens: Vec<u32> = got.iter().map(|s| s.token).collect();
            let want_tokens: Vec<u32> = want.iter().map(|w| w.0).collect();
            let first_diff = got_tokens.iter().zip(&want_tokens).position(|(a, b)| a != b);
            let mut worst = 0.0f32;
            for (g, w) in got.iter().zip(want).take(first_diff.unwrap_or(N_TOKENS)) {
                let lp = g.logprob.expect("asked for logprobs");
                if codec == Codec::F32 {
                    // The split is bit-exact and f32 frames are exact: identical logits.
                    assert_eq!(lp.to_bits(), w.1.to_bits(), "{name}: {n} workers: logprob {lp} vs {}", w.1);
                }
                worst = worst.max((lp - w.1).abs());
            }
            let (gap_tol, lp_tol) = tolerance(codec);
            if let Some(i) = first_diff {
                assert!(
                    want[i].2 < gap_tol,
                    "{name} case {k}: {n} workers, {codec}: token {i} differs where the top-2 gap is {}",
                    want[i].2
                );
            }
            assert!(worst <= lp_tol, "{name} case {k}: {n} workers, {codec}: logprob off by {worst}");
            eprintln!(
                "{name} case {k}: {n} workers, {codec}: worst |Δ logprob| {worst:e}, first differing token {first_diff:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_greedy_through_1_2_3_workers_equals_single_process() {
    check_model(SMOLLM2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen25_greedy_through_1_2_3_workers_equals_single_process() {
    check_model(QWEN).await;
}

#[test]
fn shoal_run_with_workers_prints_what_shoal_run_prints() {
    let m = model_path(SMOLLM2);
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["run", "--temperature", "0", "-n", "24", "--ctx", "512", "--threads", "2", "--model"])
            .arg(&m)
            .args(extra)
            .arg("The three primary colors are")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let single = run(&[]);
    assert!(!single.trim().is_empty());
    for w in ["1", "2", "3"] {
        assert_eq!(run(&["--workers", w]), single, "--workers {w}");
    }
    assert_eq!(run(&["--workers", "2", "--codec", "bf16"]), single, "--codec bf16");
}

async fn raw_client(addr: &str) -> WorkerClient<tonic::transport::Channel> {
    WorkerClient::connect(format!("http://{addr}")).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_protocol_major_is_refused_at_hello() {
    let cluster = start(1);
    let mut c = raw_client(&cluster.addrs()[0]).await;
    let mut h = shoal_proto::hello("test");
    h.protocol_major = shoal_proto::PROTOCOL_MAJOR + 1;
    let e = c.hello(h).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("protocol major 2 is not supported"), "{}", e.message());
    // The same major with a newer minor is fine.
    let mut h = shoal_proto::hello("test");
    h.protocol_minor += 5;
    assert_eq!(c.hello(h).await.unwrap().into_inner().protocol_major, shoal_proto::PROTOCOL_MAJOR);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_shard_refuses_escaping_paths_and_other_files() {
    let cluster = start(1);
    let mut c = raw_client(&cluster.addrs()[0]).await;
    let req = |file: &str, hash: &str| v1::LoadShardRequest {
        model_file: file.into(),
        model_hash: hash.into(),
        layer_start: 0,
        layer_end: 2,
        embed: true,
        head: false,
        n_ctx: 64,
        n_threads: 1,
        activation_dtype: v1::ActivationDtype::F32 as i32,
        ..Default::default()
    };
    for bad in ["../SmolLM2-135M-Instruct.Q4_1.gguf", "/etc/passwd", "./x/../../y.gguf", ""] {
        let e = c.load_shard(req(bad, "")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}: {e:?}");
    }
    let e = c.load_shard(req(SMOLLM2, &"0".repeat(64))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("the worker's copy differs"), "{}", e.message());
    let ok = c.load_shard(req(SMOLLM2, "")).await.unwrap().into_inner();
    let f = GgufFile::open(model_path(SMOLLM2)).unwrap();
    let header = &f.bytes()[..f.header().data_offset as usize];
    assert_eq!(ok.model_hash, shoal_proto::model_identity(header, f.file_size()));
}

fn hidden_frame(step: u64, seq: u64, n_tokens: u32, dim: u32, dtype: i32, bytes: usize) -> v1::ForwardFrame {
    v1::ForwardFrame {
        step,
        chunks: vec![v1::Chunk { seq, n_tokens, sample: true }],
        starts: vec![],
        input: Some(v1::forward_frame::Input::Hidden(v1::Activations { dtype, n_tokens, dim, data: vec![0; bytes] })),
    }
}

/// Sends one frame on a fresh Forward stream and returns the first answer.
async fn one_frame(
    c: &mut WorkerClient<tonic::transport::Channel>,
    f: v1::ForwardFrame,
) -> Result<v1::ForwardResult, tonic::Status> {
    let stream = tokio_stream::iter(vec![f]);
    let mut r = c.forward(stream).await?.into_inner();
    match r.message().await {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(tonic::Status::unknown("stream ended without an answer")),
        Err(s) => Err(s),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_invalid_argument_and_the_worker_keeps_serving() {
    let cluster = start(2);
    let addrs = cluster.addrs();
    let p = load(&addrs, SMOLLM2, Codec::F32).await;
    let dim = 576u32; // SmolLM2-135M n_embd
    let f32_ = v1::ActivationDtype::F32 as i32;
    // Stage 1 takes hidden states; a sequence must be started before use.
    let mut c = raw_client(&addrs[1]).await;
    let cases = [
        ("wrong byte length", hidden_frame(1, 5, 2, dim, f32_, 2 * dim as usize * 4 - 1), "bytes"),
        ("n_tokens differs from the chunks", {
            let mut f = hidden_frame(2, 5, 2, dim, f32_, 2 * dim as usize * 4);
            f.chunks[0].n_tokens = 3;
            f
        }, "tokens"),
        ("wrong dim", hidden_frame(3, 5, 1, dim + 1, f32_, (dim as usize + 1) * 4), "n_embd"),
        ("unknown dtype", hidden_frame(4, 5, 1, dim, 9, dim as usize * 4), "dtype"),
        ("bf16 frame with f32 length", hidden_frame(5, 5, 1, dim, v1::ActivationDtype::Bf16 as i32, dim as usize * 4), "bytes"),
        ("unknown sequence", hidden_frame(6, 12345, 1, dim, f32_, dim as usize * 4), "unknown"),
        ("too many tokens", hidden_frame(7, 5, 100_000, dim, f32_, 0), "tokens"),
        ("token ids to a hidden stage", v1::ForwardFrame {
            step: 8,
            chunks: vec![v1::Chunk { seq: 5, n_tokens: 1, sample: true }],
            starts: vec![],
            input: Some(v1::forward_frame::Input::Tokens(v1::TokenIds { ids: vec![1] })),
        }, "embedding"),
    ];
    for (what, frame, expect) in cases {
        let e = one_frame(&mut c, frame).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains(expect), "{what}: {:?} lacks {expect:?}", e.message());
    }
    // A bad frame sent through stage 0 (wrong token count) comes back the same way.
    let mut c0 = raw_client(&addrs[0]).await;
    let e = one_frame(
        &mut c0,
        v1::ForwardFrame {
            step: 9,
            chunks: vec![v1::Chunk { seq: 1, n_tokens: 2, sample: true }],
            starts: vec![v1::SeqStart { seq: 1, sampling: None, history: vec![] }],
            input: Some(v1::forward_frame::Input::Tokens(v1::TokenIds { ids: vec![1] })),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // Both workers still serve: health, stats and a real generation.
    for a in &addrs {
        let mut c = raw_client(a).await;
        let h = c.health(v1::HealthRequest {}).await.unwrap().into_inner();
        assert!(h.serving && h.loaded);
    }
    let stats = c.stats(v1::StatsRequest {}).await.unwrap().into_inner();
    assert!(stats.frames_rejected >= 8, "{stats:?}");
    let got = through(&p, &[1, 504, 3575, 282, 4649, 314], 8).await;
    assert_eq!(got.len(), 8);
}

/// Kills worker `victim` of a 3-stage pipeline after a few tokens and checks the request
/// fails with a clear error within 5 s.
async fn killed_worker_fails_the_request(victim: usize) {
    let cluster = start(3);
    let p = load(&cluster.addrs(), SMOLLM2, Codec::F32).await;
    let pid = cluster.pids()[victim];
    let mut killed_at = None;
    let r = p
        .sample_loop(&greedy(vec![1, 504, 3575, 282, 4649, 314], 400), false, |_, len| {
            if len == 4 {
                let st = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
                assert!(st.success());
                killed_at = Some(Instant::now());
            }
            true
        })
        .await;
    let waited = killed_at.expect("the victim was killed").elapsed();
    let e = r.expect_err("a dead stage cannot produce tokens");
    assert!(waited < Duration::from_secs(5), "took {waited:?} to notice");
    let msg = e.to_string();
    assert!(msg.contains("pipeline failed"), "{msg}");
    let addr = &cluster.addrs()[victim];
    let names = if victim == 0 { format!("first stage {addr} failed") } else { format!("next stage {addr} failed") };
    assert!(msg.contains(&names), "{msg} does not say {names:?}");
    eprintln!("killed stage {victim}: failed after {waited:?}: {msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_middle_worker_fails_the_request_within_5s() {
    killed_worker_fails_the_request(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_last_worker_fails_the_request_within_5s() {
    killed_worker_fails_the_request(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_first_worker_fails_the_request_within_5s() {
    killed_worker_fails_the_request(0).await;
}

#[test]
fn local_cluster_leaves_no_orphans() {
    let cluster = start(2);
    let pids = cluster.pids();
    for pid in &pids {
        assert!(Path::new(&format!("/proc/{pid}")).exists());
    }
    drop(cluster);
    for pid in &pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "worker {pid} outlived its cluster");
    }
}

/// Pids whose parent is `ppid` (from `/proc/*/stat`).
fn children_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |x| x.1).split_whitespace().collect();
        if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(ppid) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn workers_exit_when_shoal_run_is_killed() {
    let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["run", "--workers", "2", "--ignore-eos", "-n", "2000", "--ctx", "2048", "--model"])
        .arg(model_path(SMOLLM2))
        .arg("hello")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let kids = loop {
        let k = children_of(run.id());
        if k.len() == 2 || Instant::now() > deadline {
            break k;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(kids.len(), 2, "the workers did not start");
    std::thread::sleep(Duration::from_millis(500));
    run.kill().unwrap(); // SIGKILL: no destructor runs in the parent
    run.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while kids.iter().any(|p| Path::new(&format!("/proc/{p}")).exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in &kids {
        // A zombie reparented to init is reaped at once; a live worker would still be here.
        let state = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let state = state.rsplit_once(')').map_or("", |x| x.1).split_whitespace().next().unwrap_or("");
        assert!(state.is_empty() || state == "Z", "worker {p} outlived its killed parent (state {state})");
    }
}

#[test]
fn shoal_run_through_running_workers() {
    let cluster = start(2);
    let m = model_path(QWEN);
    let run = |extra: &[String]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["run", "--temperature", "0", "-n", "16", "--ctx", "512", "--threads", "2", "--chat", "--model"])
            .arg(&m)
            .args(extra)
            .arg("Write a haiku about the sea.")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let single = run(&[]);
    let addrs = cluster.addrs();
    let through = run(&["--worker".into(), addrs[0].clone(), "--worker".into(), addrs[1].clone()]);
    assert_eq!(through, single);
    // The workers outlive the run and serve the next one.
    assert_eq!(run(&["--worker".into(), addrs[1].clone(), "--worker".into(), addrs[0].clone()]), single);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_budget_is_enforced_and_release_frees_it() {
    let cluster = start(1);
    let mut c = raw_client(&cluster.addrs()[0]).await;
    // SmolLM2-135M: 30 layers × kv_dim 192 × (K + V) × f16 = 23,040 bytes per token.
    let per_token = 30 * 192 * 2 * 2;
    c.load_shard(v1::LoadShardRequest {
        model_file: SMOLLM2.into(),
        layer_start: 0,
        layer_end: 30,
        embed: true,
        head: true,
        n_ctx: 64,
        n_threads: 1,
        kv_budget_bytes: 10 * per_token,
        activation_dtype: v1::ActivationDtype::F32 as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    let frame = |seq: u64, n: u32| v1::ForwardFrame {
        step: seq,
        chunks: vec![v1::Chunk { seq, n_tokens: n, sample: true }],
        starts: vec![v1::SeqStart { seq, sampling: None, history: vec![] }],
        input: Some(v1::forward_frame::Input::Tokens(v1::TokenIds { ids: vec![1; n as usize] })),
    };
    let r = one_frame(&mut c, frame(1, 8)).await.unwrap();
    assert_eq!(r.tokens.len(), 1);
    let e = one_frame(&mut c, frame(2, 4)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("KV budget"), "{}", e.message());
    let st = c.stats(v1::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(st.kv_bytes, 8 * per_token);
    assert_eq!(c.release(v1::ReleaseRequest { seqs: vec![1, 77] }).await.unwrap().into_inner().released, 1);
    assert_eq!(c.stats(v1::StatsRequest {}).await.unwrap().into_inner().kv_bytes, 0);
    one_frame(&mut c, frame(2, 4)).await.unwrap();
}
