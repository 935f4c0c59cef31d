//! The OpenAI-compatible API of `shoal serve` held to the official `openai` Python client:
//! one real cluster (the coordinator and 2 local worker processes on SmolLM2) and the cases of
//! `tests/clients/openai_suite.py` run against it: models, chat and completions whole and
//! streamed, stop strings, `max_tokens`, seeds, logprobs, errors in OpenAI's shape, `n`,
//! `/health` and `/metrics`, batch jobs (errors, cancel, and a round trip across a coordinator
//! restart), and 32 concurrent streams that must each equal the same request run alone.
//!
//! One test runs the functional cases on one cluster (loading it costs more than most cases);
//! a failing case is reported with its request and response and the others still run. The
//! concurrency case, the longest, runs on a cluster of its own beside it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

mod common;
use common::{Procs, SHOAL, SMOLLM2, model_path, serving};

/// The key the served API requires (so the suite also checks 401 for a wrong one).
const API_KEY: &str = "test-key-1";

/// The cases of the suite run on one cluster, in its order; each must report `ok`.
const CASES: [&str; 19] = [
    "models",
    "chat",
    "chat_stream",
    "completions",
    "stop",
    "max_tokens",
    "seed",
    "logprobs_chat",
    "logprobs_completions",
    "error_malformed_json",
    "error_invalid_body",
    "error_unknown_model",
    "error_temperature",
    "error_oversized_prompt",
    "n_choices",
    "api_key",
    "health_metrics",
    "batch_errors",
    "batch_cancel",
];

/// Starts `shoal serve` with 2 local workers on `state` and waits until it serves; returns
/// the API's base URL and the server's pid.
fn serve(procs: &mut Procs, state: &Path) -> (String, u32) {
    let state = state.to_str().unwrap();
    let flags = ["--workers", "2", "--threads", "1", "--ctx", "1024", "--api-key", API_KEY, "--state-dir", state, "--batch-parallel", "2"];
    let (_, out, pid) = common::serve(procs, &flags);
    (serving(out), pid)
}

/// What the suite said of each case: `ok`, `SKIP: why` or `FAIL: what`.
#[derive(Debug)]
enum Outcome {
    Ok,
    Skip(String),
    Fail(String),
}

/// Runs the suite's `cases` with `--keep-going`, echoing its output; returns
/// each reported case with its outcome, in order.
fn run_suite(base: &str, cases: &[&str], extra: &[&std::ffi::OsStr]) -> Vec<(String, Outcome)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/openai_suite.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args(["--base", base, "--model", SMOLLM2.trim_end_matches(".gguf"), "--shoal", SHOAL, "--api-key", API_KEY])
        .arg("--model-path")
        .arg(model_path(SMOLLM2))
        .arg("--keep-going")
        .args(extra)
        .args(cases)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 (with the `openai` package: scripts/install-deps installs it)");
    let mut got: Vec<(String, Outcome)> = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        eprintln!("{line}");
        if let Some(rest) = line.strip_prefix("ok ") {
            let name = rest.split_whitespace().next().unwrap_or_default();
            got.push((name.to_string(), Outcome::Ok));
        } else if let Some((name, why)) =
            line.strip_prefix("SKIP ").and_then(|r| r.split_once(": "))
        {
            got.push((name.to_string(), Outcome::Skip(why.to_string())));
        } else if let Some((name, what)) =
            line.strip_prefix("FAIL ").and_then(|r| r.split_once(": "))
        {
            got.push((name.to_string(), Outcome::Fail(what.to_string())));
        } else if let Some((_, Outcome::Fail(what))) = got.last_mut() {
            // The request and response lines of a failure.
            what.push('\n');
            what.push_str(&line);
        }
    }
    let status = child.wait().unwrap();
    let failed = got.iter().any(|(_, o)| matches!(o, Outcome::Fail(_)));
    assert!(
        status.success() || failed,
        "the suite exited with {status} without reporting a failed case (is the `openai` package \
         installed? scripts/install-deps installs it)"
    );
    got
}

/// Starts a cluster, runs `cases` on it and fails with the report of each failed case.
fn suite_passes(cases: &[&str]) {
    let t0 = Instant::now();
    let mut procs = Procs::default();
    let state = procs.temp_dir("state");
    let (base, _) = serve(&mut procs, &state);
    eprintln!("shoal serve with 2 workers up in {:?}", t0.elapsed());
    let got = run_suite(&base, cases, &["--state-dir".as_ref(), state.as_os_str()]);
    eprintln!("{:?} in all", t0.elapsed());
    check(cases, &got);
}

/// Fails with the report of each failed or skipped case.
fn check(cases: &[&str], got: &[(String, Outcome)]) {
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, cases, "the suite did not report every case once");
    // Every case here has what it needs: a skip is a failure.
    let failed: Vec<String> = got
        .iter()
        .filter_map(|(name, o)| match o {
            Outcome::Fail(what) => Some(format!("{name}: {what}")),
            Outcome::Skip(why) => Some(format!("{name}: skipped: {why}")),
            Outcome::Ok => None,
        })
        .collect();
    assert!(failed.is_empty(), "{} case(s) failed:\n{}", failed.len(), failed.join("\n"));
}

#[test]
fn openai_client_gets_the_shapes_it_expects_from_serve_with_2_workers() {
    suite_passes(&CASES);
}

/// 32 clients at once, each streaming 64 greedy tokens: every request completes, none is lost
/// or duplicated, and each equals the same request run alone. A cluster of its own, so that
/// it runs beside the other test.
#[test]
fn thirty_two_concurrent_streams_equal_the_same_requests_one_at_a_time() {
    suite_passes(&["concurrency"]);
}

/// A batch job across a coordinator restart: the suite starts a batch and waits until some of
/// its lines are done; the coordinator is killed (SIGKILL: no chance to save anything more)
/// and started again on the same state directory; the batch then finishes without running a
/// finished line again (their records on disk are unchanged, one per line), and every answer
/// equals the same request run interactively.
#[test]
fn batch_job_survives_a_coordinator_restart() {
    let mut procs = Procs::default();
    let state = procs.temp_dir("state");
    let handover = state.join("handover.json");
    let extra = ["--state-dir".as_ref(), state.as_os_str(), "--batch-file".as_ref(), handover.as_os_str()];
    let (base, pid) = serve(&mut procs, &state);
    let got = run_suite(&base, &["batch_submit"], &extra);
    check(&["batch_submit"], &got);
    let status = Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    assert!(status.success());
    // Reaped here so the state directory's lock is free when the next one starts.
    let mut first = procs.0.remove(0);
    first.wait().unwrap();
    let (base, _) = serve(&mut procs, &state);
    let got = run_suite(&base, &["batch_resume"], &extra);
    check(&["batch_resume"], &got);
}

/// Leader failover in etcd mode (a real etcd server, on loopback with a temporary data
/// directory, stopped by PID): two coordinators on one state directory, one leading and one
/// standing by; the leader is SIGKILLed while a batch job runs. The standby must lead and
/// serve within 10 s, taking the running pipeline over without the workers loading their
/// shards again, and the batch must finish with every line run exactly once (the suite's
/// `batch_resume` checks the journal, the output and error files, and every answer against
/// the same request run interactively).
#[test]
fn a_standby_coordinator_finishes_the_batch_when_the_leader_dies() {
    let mut procs = Procs::default();
    let data = procs.temp_dir("etcd");
    let etcd = common::start_etcd(&data);
    let prefix = format!("/shoal/failover-{}", std::process::id());
    let state = procs.temp_dir("state");
    let handover = state.join("handover.json");
    let extra = ["--state-dir".as_ref(), state.as_os_str(), "--batch-file".as_ref(), handover.as_os_str()];
    let st = state.to_str().unwrap();
    let flags = [
        "--etcd", &etcd.url, "--etcd-prefix", &prefix, "--min-workers", "2", "--threads", "1", "--ctx", "1024", "--api-key", API_KEY,
        "--state-dir", st, "--batch-parallel", "2",
    ];
    let (reg_a, out_a, pid_a) = common::serve(&mut procs, &flags);
    for i in 0..2 {
        common::worker(&mut procs, "127.0.0.1:0", &["--name", &format!("f{i}"), "--etcd", &etcd.url, "--etcd-prefix", &prefix]);
    }
    let base_a = serving(out_a);
    let (reg_b, out_b, _) = common::serve(&mut procs, &flags);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(common::status_json(&reg_b)["state"], "standby: waiting to lead");
    assert_eq!(common::status_json(&reg_a)["state"], "serving");

    let got = run_suite(&base_a, &["batch_submit"], &extra);
    check(&["batch_submit"], &got);
    let status = Command::new("kill").args(["-KILL", &pid_a.to_string()]).status().unwrap();
    assert!(status.success());
    let t0 = Instant::now();
    let base_b = serving(out_b);
    let took = t0.elapsed();
    eprintln!("failover: the standby serves {:.2} s after the leader was killed", took.as_secs_f64());
    assert!(took < std::time::Duration::from_secs(10), "the standby took {took:?}");
    // It took the pipeline over: both workers still hold the one shard they loaded.
    let st = common::status_json(&reg_b);
    let stages: Vec<&serde_json::Value> = st["workers"].as_array().unwrap().iter().filter(|w| w["planned"] == true).collect();
    assert_eq!(stages.len(), 2, "{st:#}");
    assert!(stages.iter().all(|w| w["loaded"] == true && w["shard_loads"] == 1), "a shard was loaded again: {st:#}");

    let got = run_suite(&base_b, &["batch_resume"], &extra);
    check(&["batch_resume"], &got);
    drop(etcd);
}
