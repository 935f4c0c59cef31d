//! `shoal bench`: prefill and decode speed, measured the way llama-bench measures them.
//!
//! pp: `n_prompt` random tokens evaluated in one step on an empty sequence. tg: `n_gen` single
//! token steps starting from an empty sequence. Each is repeated `reps` times after one
//! warm-up run; the figure is the mean of tokens/s, with the standard deviation.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use shoal_model::arch::Config;
use shoal_model::engine::PREFILL_CHUNK;
use shoal_model::executor::{SeqChunk, ShardExecutor, StageInput};
use shoal_model::gguf::GgufFile;
use shoal_model::sampling::Rng;
use shoal_model::weights::{ShardSpec, Weights};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[arg(long, short)]
    model: PathBuf,
    #[arg(long, short)]
    threads: Option<usize>,
    /// Prompt tokens for the prefill test (0 skips it).
    #[arg(long, short = 'p', default_value_t = 512)]
    n_prompt: usize,
    /// Generated tokens for the decode test (0 skips it).
    #[arg(long, short = 'n', default_value_t = 128)]
    n_gen: usize,
    #[arg(long, short, default_value_t = 3)]
    reps: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Concurrent sequences in the decode test (through workers: the scheduler batches
    /// them); the figure is the aggregate tokens/s over all of them.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// In process: run on `cpu` or on GPU `cuda:N` (a build with the cuda feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Through workers: micro-batches in flight (0: one per stage).
    #[arg(long, default_value_t = 0)]
    in_flight: usize,
    #[command(flatten)]
    cluster: super::cluster::ClusterArgs,
}

#[cfg(feature = "cuda")]
fn use_gpu(exec: &mut ShardExecutor, ordinal: usize) -> Result<()> {
    Ok(exec.use_gpu(ordinal, shoal_model::gpu::ExpertPlacement::Gpu)?)
}

#[cfg(not(feature = "cuda"))]
fn use_gpu(_: &mut ShardExecutor, _: usize) -> Result<()> {
    anyhow::bail!("this build has no CUDA backend: build with --features shoal-coordinator/cuda")
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len().max(1) as f64;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len().max(1) as f64;
    (m, var.sqrt())
}

pub fn run(a: BenchArgs) -> Result<()> {
    let threads = a.threads.unwrap_or_else(super::default_threads);
    if a.cluster.enabled() {
        return run_cluster(a);
    }
    let file = Arc::new(GgufFile::open(&a.model)?);
    let config = Config::from_gguf(&file)?;
    let weights = Arc::new(Weights::load(Arc::clone(&file), ShardSpec::full(config.n_layer))?);
    super::prefault(&file);
    let n_ctx = (a.n_prompt.max(a.n_gen) + 16).max(64);
    let mut exec = ShardExecutor::new(weights, threads, n_ctx);
    match shoal_worker::service::parse_device(&a.device).map_err(anyhow::Error::msg)? {
        None => {}
        Some(ordinal) => use_gpu(&mut exec, ordinal.unwrap_or(0))?,
    }
    let device = exec.gpu_name().map_or_else(|| "cpu".to_string(), str::to_string);
    let mut rng = Rng::new(1234);
    let mut tok = || (rng.next_u64() % config.n_vocab as u64) as u32;
    let reps = a.reps.max(1);

    let mut pp = Vec::new();
    if a.n_prompt > 0 {
        let prompt: Vec<u32> = (0..a.n_prompt).map(|_| tok()).collect();
        for r in 0..=reps {
            exec.add_sequence(0);
            let t0 = Instant::now();
            for chunk in prompt.chunks(PREFILL_CHUNK) {
                exec.forward(&[SeqChunk { seq: 0, n_tokens: chunk.len() }], StageInput::Tokens(chunk))?;
            }
            let dt = t0.elapsed().as_secs_f64();
            if r > 0 {
                pp.push(a.n_prompt as f64 / dt);
            }
        }
    }
    let mut tg = Vec::new();
    if a.n_gen > 0 {
        for r in 0..=reps {
            exec.add_sequence(0);
            let mut t = tok();
            let t0 = Instant::now();
            for _ in 0..a.n_gen {
                exec.forward(&[SeqChunk { seq: 0, n_tokens: 1 }], StageInput::Tokens(&[t]))?;
                t = tok();
            }
            let dt = t0.elapsed().as_secs_f64();
            if r > 0 {
                tg.push(a.n_gen as f64 / dt);
            }
        }
    }
    let (ppm, pps) = mean_std(&pp);
    let (tgm, tgs) = mean_std(&tg);
    let name = a.model.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if a.json {
        let j = serde_json::json!({
            "model": name, "device": device, "threads": threads, "n_prompt": a.n_prompt, "n_gen": a.n_gen,
            "reps": reps, "pp_tok_s": ppm, "pp_tok_s_std": pps, "tg_tok_s": tgm, "tg_tok_s_std": tgs,
        });
        println!("{j}");
    } else {
        println!("| model | device | threads | test | tok/s |");
        println!("|---|---|---|---|---|");
        if a.n_prompt > 0 {
            println!("| {name} | {device} | {threads} | pp{} | {ppm:.2} ± {pps:.2} |", a.n_prompt);
        }
        if a.n_gen > 0 {
            println!("| {name} | {device} | {threads} | tg{} | {tgm:.2} ± {tgs:.2} |", a.n_gen);
        }
    }
    Ok(())
}

/// (steps, compute ns) of each stage.
async fn stage_stats(clients: &[shoal_proto::v1::worker_client::WorkerClient<shoal_proto::security::Channel>]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for c in clients {
        let r = c.clone().stats(shoal_proto::v1::StatsRequest {}).await;
        out.push(r.map_or((0, 0), |r| (r.get_ref().steps, r.get_ref().compute_ns)));
    }
    out
}

/// The same tests through a pipeline of workers and the scheduler.
///
/// pp: one sequence whose prompt is `n_prompt` random tokens, sampling once. tg: `concurrency`
/// sequences submitted at once, each a one-token random prompt followed by `n_gen` samples
/// with random tokens fed back (teacher forcing, so no sequence stops early); the figure is
/// all sampled tokens over the wall time.
fn run_cluster(a: BenchArgs) -> Result<()> {
    use shoal_coordinator::cluster::scheduler::{Scheduler, SchedulerConfig, Submission};
    use shoal_model::sampling::SamplingParams;

    let path = a.model.canonicalize()?;
    let file = GgufFile::open(&path)?;
    let config = Config::from_gguf(&file)?;
    let conc = a.concurrency.max(1);
    let n_ctx = (a.n_prompt.max(a.n_gen) + 16).max(64);
    let (local, addrs) = a.cluster.workers(&path)?;
    let mut opts = a.cluster.load_options(&path, a.threads, n_ctx)?;
    opts.parallel = conc as u64;
    let threads = if opts.worker_threads.is_empty() {
        opts.n_threads.to_string()
    } else {
        opts.worker_threads.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",")
    };
    let rt = super::cluster::runtime()?;
    let reps = a.reps.max(1);
    let mut rng = Rng::new(1234);
    let mut tok = move || (rng.next_u64() % config.n_vocab as u64) as u32;
    let (pp, tg, plan, stage_ms) = rt.block_on(async {
        let p = super::cluster::load(&addrs, &file, &opts).await?;
        let plan = p.plan.clone();
        eprint!("{}", shoal_planner::report::table(&plan));
        let clients: Vec<_> = p.stages.iter().map(|(w, _)| w.client()).collect();
        let sched = Scheduler::start(p, SchedulerConfig { max_seqs: conc.max(256), in_flight: a.in_flight, ..SchedulerConfig::default() });
        let one = |prompt: Vec<u32>, n: usize, forced: Vec<u32>| Submission {
            prompt,
            params: SamplingParams::greedy(),
            logprobs: false,
            top_logprobs: 0,
            max_tokens: n,
            forced: Some(forced),
            priority: Default::default(),
        };
        let mut pp = Vec::new();
        if a.n_prompt > 0 {
            for r in 0..=reps {
                let prompt: Vec<u32> = (0..a.n_prompt).map(|_| tok()).collect();
                let t0 = Instant::now();
                let mut rx = sched.submit(one(prompt, 1, vec![])).await?;
                while let Some(t) = rx.recv().await {
                    t?;
                }
                if r > 0 {
                    pp.push(a.n_prompt as f64 / t0.elapsed().as_secs_f64());
                }
            }
        }
        let mut tg = Vec::new();
        let before = stage_stats(&clients).await;
        if a.n_gen > 0 {
            for r in 0..=reps {
                let subs: Vec<Submission> =
                    (0..conc).map(|_| one(vec![tok()], a.n_gen, (0..a.n_gen).map(|_| tok()).collect())).collect();
                let t0 = Instant::now();
                let mut rxs = Vec::new();
                for s in subs {
                    rxs.push(sched.submit(s).await?);
                }
                let mut n = 0usize;
                for rx in &mut rxs {
                    while let Some(t) = rx.recv().await {
                        t?;
                        n += 1;
                    }
                }
                anyhow::ensure!(n == conc * a.n_gen, "{n} tokens sampled, expected {}", conc * a.n_gen);
                if r > 0 {
                    tg.push(n as f64 / t0.elapsed().as_secs_f64());
                }
            }
        }
        // Each stage's measured compute per decode step beside the plan's prediction.
        let mut stage_ms = Vec::new();
        if a.n_gen > 0 {
            let after = stage_stats(&clients).await;
            for (i, ((b, f), s)) in before.iter().zip(&after).zip(&plan.stages).enumerate() {
                let steps = f.0.saturating_sub(b.0).max(1);
                let ms = f.1.saturating_sub(b.1) as f64 / steps as f64 / 1e6;
                eprintln!("stage {i}: decode compute {ms:.2} ms/step measured, {:.2} predicted", s.ms_per_step);
                stage_ms.push((ms, s.ms_per_step));
            }
        }
        Ok::<_, anyhow::Error>((pp, tg, plan, stage_ms))
    })?;
    drop(local);
    let stages = addrs.len();
    // What the planner predicted for this plan from the workers' calibrated kernels.
    let (ppp, tgp) = (plan.prediction.prefill_tok_s, plan.prediction.decode_tok_s);
    let layers = plan.stages.iter().map(|s| format!("{}-{}", s.layers.start, s.layers.end - 1)).collect::<Vec<_>>().join(" ");
    let (ppm, pps) = mean_std(&pp);
    let (tgm, tgs) = mean_std(&tg);
    let name = a.model.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if a.json {
        let j = serde_json::json!({
            "model": name, "threads": threads, "n_prompt": a.n_prompt, "n_gen": a.n_gen, "reps": reps,
            "stages": stages, "concurrency": conc, "codec": a.cluster.codec.name(),
            "pp_tok_s": ppm, "pp_tok_s_std": pps, "tg_tok_s": tgm, "tg_tok_s_std": tgs,
            "pp_predicted_tok_s": ppp, "tg_predicted_tok_s": tgp, "layers": layers,
            "stage_compute_ms": stage_ms.iter().map(|s| s.0).collect::<Vec<_>>(),
            "stage_predicted_ms": stage_ms.iter().map(|s| s.1).collect::<Vec<_>>(),
        });
        println!("{j}");
    } else {
        println!("| model | stages | threads/stage | layers | codec | test | tok/s | predicted | measured/predicted |");
        println!("|---|---|---|---|---|---|---|---|---|");
        let codec = a.cluster.codec;
        if a.n_prompt > 0 {
            let r = ppm / ppp;
            println!("| {name} | {stages} | {threads} | {layers} | {codec} | pp{} | {ppm:.2} ± {pps:.2} | {ppp:.2} | {r:.2} |", a.n_prompt);
        }
        if a.n_gen > 0 {
            let r = tgm / tgp;
            println!("| {name} | {stages} | {threads} | {layers} | {codec} | tg{} x{conc} | {tgm:.2} ± {tgs:.2} | {tgp:.2} | {r:.2} |", a.n_gen);
        }
    }
    Ok(())
}
