//! The counters behind `GET /metrics`, written in Prometheus' text exposition format.
//!
//! The API counts requests (per endpoint and status), tokens in and out and the time to
//! first token; the scrape adds what the scheduler and the registry know at that moment:
//! queue depth, active sequences, KV reserved and budgeted per stage, and each stage's
//! measured step time and KV bytes as its worker reports them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use shoal_proto::v1;

use crate::cluster::scheduler::SchedulerStats;

/// Upper bounds of the time-to-first-token histogram, in seconds.
const TTFT_BUCKETS: [f64; 11] = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

#[derive(Debug, Default)]
pub struct Metrics(Mutex<Inner>);

#[derive(Debug, Default)]
struct Inner {
    /// (endpoint, status code) -> count.
    requests: BTreeMap<(&'static str, u16), u64>,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// Counts per bucket of TTFT_BUCKETS (not cumulative), then the sum and count.
    ttft: [u64; TTFT_BUCKETS.len()],
    ttft_sum: f64,
    ttft_count: u64,
}

/// What the batch jobs add to a scrape.
#[derive(Debug, Default)]
pub struct JobCounts {
    /// status -> number of batches.
    pub batches: BTreeMap<String, u64>,
    pub lines_completed: u64,
    pub lines_failed: u64,
}

impl Metrics {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a request answered with `status`.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        *self.inner().requests.entry((endpoint, status)).or_default() += 1;
    }

    pub fn tokens(&self, prompt: usize, completion: usize) {
        let mut m = self.inner();
        m.prompt_tokens += prompt as u64;
        m.completion_tokens += completion as u64;
    }

    pub fn first_token(&self, after: Duration) {
        let s = after.as_secs_f64();
        let mut m = self.inner();
        if let Some(i) = TTFT_BUCKETS.iter().position(|&b| s <= b) {
            m.ttft[i] += 1;
        }
        m.ttft_sum += s;
        m.ttft_count += 1;
    }

    /// The exposition text of everything counted, the scheduler's `stats` and the cluster
    /// `status` (None: not asked or not answered).
    pub fn render(&self, sched: Option<&SchedulerStats>, status: Option<&v1::ClusterStatus>, jobs: Option<&JobCounts>) -> String {
        let mut o = String::new();
        let m = self.inner();
        head(&mut o, "shoal_requests_total", "counter", "HTTP API requests answered, by endpoint and status code.");
        for ((ep, code), n) in &m.requests {
            let _ = writeln!(o, "shoal_requests_total{{endpoint=\"{ep}\",code=\"{code}\"}} {n}");
        }
        head(&mut o, "shoal_prompt_tokens_total", "counter", "Prompt tokens of completed requests.");
        let _ = writeln!(o, "shoal_prompt_tokens_total {}", m.prompt_tokens);
        head(&mut o, "shoal_completion_tokens_total", "counter", "Tokens generated for completed requests.");
        let _ = writeln!(o, "shoal_completion_tokens_total {}", m.completion_tokens);
        head(&mut o, "shoal_time_to_first_token_seconds", "histogram", "From a request's arrival to its first sampled token.");
        let mut cum = 0;
        for (b, n) in TTFT_BUCKETS.iter().zip(m.ttft) {
            cum += n;
            let _ = writeln!(o, "shoal_time_to_first_token_seconds_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(o, "shoal_time_to_first_token_seconds_bucket{{le=\"+Inf\"}} {}", m.ttft_count);
        let _ = writeln!(o, "shoal_time_to_first_token_seconds_sum {}", m.ttft_sum);
        let _ = writeln!(o, "shoal_time_to_first_token_seconds_count {}", m.ttft_count);
        drop(m);
        if let Some(s) = sched {
            head(&mut o, "shoal_queue_depth", "gauge", "Requests waiting for a place in the running batch.");
            let _ = writeln!(o, "shoal_queue_depth {}", s.waiting);
            head(&mut o, "shoal_active_sequences", "gauge", "Sequences in the running batch, by priority.");
            let _ = writeln!(o, "shoal_active_sequences{{priority=\"interactive\"}} {}", s.active - s.active_background);
            let _ = writeln!(o, "shoal_active_sequences{{priority=\"background\"}} {}", s.active_background);
            head(&mut o, "shoal_pipeline_steps_total", "counter", "Frames answered by the pipeline.");
            let _ = writeln!(o, "shoal_pipeline_steps_total {}", s.steps);
            head(&mut o, "shoal_pipeline_step_seconds_total", "counter", "Sum over frames of the time from send to answer.");
            let _ = writeln!(o, "shoal_pipeline_step_seconds_total {}", s.step_ns as f64 / 1e9);
            head(&mut o, "shoal_kv_reserved_bytes", "gauge", "KV bytes the active sequences reserve (their worst case), per stage.");
            for (i, b) in s.kv_reserved.iter().enumerate() {
                let _ = writeln!(o, "shoal_kv_reserved_bytes{{stage=\"{i}\"}} {b}");
            }
            head(&mut o, "shoal_kv_budget_bytes", "gauge", "KV bytes each stage may hold (0: unlimited).");
            for (i, b) in s.kv_budget.iter().enumerate() {
                let _ = writeln!(o, "shoal_kv_budget_bytes{{stage=\"{i}\"}} {b}");
            }
            head(&mut o, "shoal_recoveries_total", "counter", "Times the pipeline was formed again (a worker lost or taken in).");
            let _ = writeln!(o, "shoal_recoveries_total {}", s.recoveries);
            head(&mut o, "shoal_recovering", "gauge", "1 while the sequences are paused for a recovery.");
            let _ = writeln!(o, "shoal_recovering {}", u8::from(s.recovering.is_some()));
            head(&mut o, "shoal_last_recovery_pause_seconds", "gauge", "The last recovery's pause: from the failure to the next sampled token.");
            let _ = writeln!(o, "shoal_last_recovery_pause_seconds {}", s.last_pause_ms as f64 / 1e3);
        }
        if let Some(st) = status {
            let planned: Vec<&v1::WorkerStatus> = st.workers.iter().filter(|w| w.planned).collect();
            head(&mut o, "shoal_stage_up", "gauge", "Whether the stage's worker answered and holds its shard.");
            for w in &planned {
                let up = w.reachable && w.loaded && w.next_stage_error.is_empty();
                let _ = writeln!(o, "shoal_stage_up{{stage=\"{}\",worker=\"{}\"}} {}", w.stage, w.addr, u8::from(up));
            }
            head(&mut o, "shoal_stage_step_seconds", "gauge", "Mean compute time of one step on the stage, as its worker measures it.");
            for w in &planned {
                let _ = writeln!(o, "shoal_stage_step_seconds{{stage=\"{}\",worker=\"{}\"}} {}", w.stage, w.addr, w.compute_ms_per_step / 1e3);
            }
            head(&mut o, "shoal_stage_kv_bytes", "gauge", "KV bytes the stage's worker holds now.");
            for w in &planned {
                let _ = writeln!(o, "shoal_stage_kv_bytes{{stage=\"{}\",worker=\"{}\"}} {}", w.stage, w.addr, w.kv_bytes);
            }
        }
        if let Some(j) = jobs {
            head(&mut o, "shoal_batches", "gauge", "Batch jobs by status.");
            for (status, n) in &j.batches {
                let _ = writeln!(o, "shoal_batches{{status=\"{status}\"}} {n}");
            }
            head(&mut o, "shoal_batch_lines_total", "counter", "Batch request lines finished, by result.");
            let _ = writeln!(o, "shoal_batch_lines_total{{result=\"completed\"}} {}", j.lines_completed);
            let _ = writeln!(o, "shoal_batch_lines_total{{result=\"failed\"}} {}", j.lines_failed);
        }
        o
    }
}

fn head(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}
