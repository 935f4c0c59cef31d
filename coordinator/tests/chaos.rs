//! Chaos: a worker SIGKILLed mid-generation loses no request and changes no token.
//!
//! A real etcd server (Debian `etcd-server`, on loopback with a temporary data directory,
//! stopped by PID), three `shoal worker` processes registered there and `shoal serve
//! --etcd` over them (f32 activations, so any split of the layers gives the same bits).
//! 16 concurrent greedy streamed completions (and 4 seeded ones at temperature 0.9) run once
//! without faults, then again while the middle stage is killed: every stream must finish
//! with exactly the fault-free text, and the pause is reported. Then a worker comes back, is taken into the pipeline at a safe
//! point, and the 16 give the same text again.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use common::{Procs, post_stream, start_etcd, status_json};

const TOPICS: [&str; 16] = [
    "the sea", "bread", "a red bicycle", "winter mornings", "owls", "the moon", "tea", "trains", "rain on a roof",
    "a lighthouse", "bees", "mountains", "a library", "the colour blue", "a small garden", "thunder",
];

/// What one stream gave: its text, its finish reason, and its longest gap between events.
struct Streamed {
    text: String,
    finish: String,
    longest_gap: Duration,
}

/// Besides the 16 greedy streams, 4 seeded ones at temperature 0.9: a restarted sampler
/// must go on with the same random stream.
const SEEDED: usize = 4;

fn body(i: usize, topic: &str) -> String {
    let mut b = serde_json::json!({
        "prompt": format!("Write two sentences about {topic}."),
        "max_tokens": 40,
        "temperature": 0,
        "stream": true,
    });
    if i >= TOPICS.len() {
        b["temperature"] = 0.9.into();
        b["seed"] = (1000 + i).into();
    }
    b.to_string()
}

fn topic(i: usize) -> &'static str {
    TOPICS[i % TOPICS.len()]
}

/// Runs the 16 completions at once; `during` runs on this thread once `after` events have
/// arrived in total.
fn run_all(api: &str, after: usize, during: impl FnOnce()) -> Vec<Streamed> {
    let seen = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..TOPICS.len() + SEEDED)
        .map(|i| {
            let (api, b, seen) = (api.to_string(), body(i, topic(i)), Arc::clone(&seen));
            std::thread::spawn(move || post_stream(&api, "/v1/completions", &b, &seen))
        })
        .collect();
    common::once_seen(&seen, after, during);
    handles
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let topic = topic(i);
            let (status, events) = h.join().unwrap();
            assert_eq!(status, 200, "{topic}: {events:?}");
            assert_eq!(events.last().map(|e| e.1.as_str()), Some("[DONE]"), "{topic}: the stream did not end well: {events:?}");
            let mut text = String::new();
            let mut finish = String::new();
            for (_, data) in &events[..events.len() - 1] {
                let v: serde_json::Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{topic}: {e}: {data}"));
                assert!(v.get("error").is_none(), "{topic}: an error reached the client: {data}");
                let c = &v["choices"][0];
                text.push_str(c["text"].as_str().unwrap_or(""));
                if let Some(f) = c["finish_reason"].as_str() {
                    finish = f.to_string();
                }
            }
            let longest_gap = events.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap_or_default();
            Streamed { text, finish, longest_gap }
        })
        .collect()
}

fn planned(reg: &str) -> Vec<String> {
    let st = status_json(reg);
    let mut stages: Vec<(u64, String)> = st["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["planned"] == true)
        .map(|w| (w["stage"].as_u64().unwrap(), w["addr"].as_str().unwrap().to_string()))
        .collect();
    stages.sort();
    stages.into_iter().map(|s| s.1).collect()
}

/// `GET path` on the API's host: the whole answer, status line first.
fn get(api: &str, path: &str) -> String {
    let hostport = api.trim_start_matches("http://").trim_end_matches("/v1");
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn metric(api: &str, name: &str) -> f64 {
    get(api, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[test]
fn a_worker_killed_mid_generation_loses_no_request_and_changes_no_token() {
    let mut procs = Procs::default();
    let data = procs.temp_dir("etcd");
    let etcd = start_etcd(&data);
    let prefix = format!("/shoal/chaos-{}", std::process::id());
    let etcd_flags = ["--etcd", etcd.url.as_str(), "--etcd-prefix", prefix.as_str()];
    let mut flags = vec!["--min-workers", "3", "--threads", "1", "--codec", "f32", "--max-seqs", "20"];
    flags.extend(etcd_flags);
    let (reg, out, _) = common::serve(&mut procs, &flags);
    let mut addrs = Vec::new();
    for i in 0..3 {
        let name = format!("c{i}");
        let mut extra = vec!["--name", name.as_str()];
        extra.extend(etcd_flags);
        addrs.push(common::worker(&mut procs, "127.0.0.1:0", &extra));
    }
    let api = common::serving(out);
    let stages = planned(&reg);
    assert_eq!(stages.len(), 3, "{stages:?}");

    let reference = run_all(&api, 0, || {});
    // Some prompts end at once (the model's end-of-text); most run to max_tokens.
    assert!(reference.iter().filter(|r| r.finish == "length").count() >= 10, "too few long completions to test with");

    // SIGKILL the middle stage once the streams are under way.
    let victim = addrs.iter().position(|a| *a == stages[1]).unwrap();
    let victim_proc = procs.0.len() - 3 + victim;
    let killed_at = std::cell::Cell::new(None);
    let chaos = run_all(&api, 20 * 8, || {
        procs.0[victim_proc].kill().unwrap();
        let _ = procs.0[victim_proc].wait();
        killed_at.set(Some(Instant::now()));
    });
    assert!(killed_at.get().is_some());
    for (i, (got, want)) in chaos.iter().zip(&reference).enumerate() {
        assert_eq!(got.text, want.text, "{} ({i}): the text changed across the failure", topic(i));
        assert_eq!(got.finish, want.finish, "{}", topic(i));
    }
    let pause = chaos.iter().map(|r| r.longest_gap).max().unwrap();
    let measured = metric(&api, "shoal_last_recovery_pause_seconds");
    eprintln!(
        "chaos: 16 streams survived the SIGKILL of stage 1 ({}); longest gap a client saw {:.2} s, recovery pause {:.2} s",
        stages[1],
        pause.as_secs_f64(),
        measured
    );
    assert_eq!(metric(&api, "shoal_recoveries_total"), 1.0);
    let after = planned(&reg);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(!after.contains(&stages[1]), "{after:?}");

    // A worker comes back: it registers in etcd and is taken in at a safe point.
    let mut extra = vec!["--name", "c1-again"];
    extra.extend(etcd_flags);
    let back = common::worker(&mut procs, "127.0.0.1:0", &extra);
    let t0 = Instant::now();
    while !planned(&reg).contains(&back) {
        assert!(t0.elapsed() < Duration::from_secs(60), "the returning worker was not taken in: {:?}", planned(&reg));
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("chaos: the returning worker {back} was taken in after {:.1} s", t0.elapsed().as_secs_f64());
    assert_eq!(planned(&reg).len(), 3);
    let again = run_all(&api, 0, || {});
    for (i, (got, want)) in again.iter().zip(&reference).enumerate() {
        assert_eq!(got.text, want.text, "{} ({i}): the text changed after the worker came back", topic(i));
    }
    assert_eq!(metric(&api, "shoal_recoveries_total"), 2.0, "the worker's return is the second time the pipeline formed");

    // Every worker lost: the model fits nowhere, so the streams wait, told why (an SSE
    // comment; `/health` says so too), until a worker joins; then they finish unchanged.
    let seen = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let (api, b, seen) = (api.clone(), body(i, topic(i)), Arc::clone(&seen));
            std::thread::spawn(move || common::post_stream_with_comments(&api, "/v1/completions", &b, &seen))
        })
        .collect();
    // procs.0[0] is the coordinator; every other child is a worker.
    common::once_seen(&seen, 4 * 6, || {
        for p in procs.0.iter_mut().skip(1) {
            let _ = p.kill();
            let _ = p.wait();
        }
    });
    let t0 = Instant::now();
    loop {
        let health = get(&api, "/health");
        if health.starts_with("HTTP/1.0 503") && health.contains("waiting for a worker to join") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "/health does not say the pipeline waits: {health}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Long enough for every stream to ask why it waits (after 1 s without a token).
    std::thread::sleep(Duration::from_millis(2500));
    let mut extra = vec!["--name", "replacement"];
    extra.extend(etcd_flags);
    common::worker(&mut procs, "127.0.0.1:0", &extra);
    let mut told = 0;
    let mut all_comments = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, events, comments) = h.join().unwrap();
        assert_eq!(status, 200);
        let text: String = events
            .iter()
            .filter(|e| e.1 != "[DONE]")
            .map(|e| serde_json::from_str::<serde_json::Value>(&e.1).unwrap()["choices"][0]["text"].as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(events.last().map(|e| e.1.as_str()), Some("[DONE]"));
        assert_eq!(text, reference[i].text, "{}: the text changed after every worker was replaced", topic(i));
        all_comments.extend(comments.clone());
        told += usize::from(comments.iter().any(|c| c.starts_with("paused: recovering") && c.contains("waiting for a worker")));
    }
    assert!(told > 0, "no stream was told of the pause: {all_comments:?}");
    eprintln!("chaos: every worker lost, then one joined: 4 streams waited ({told} told why) and finished unchanged");
    drop(etcd);
}
