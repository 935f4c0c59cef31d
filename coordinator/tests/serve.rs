//! `shoal serve` end to end: real worker processes (local or joined through the registry),
//! the real `openai` Python client sending concurrent requests, `shoal status`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{Procs, SHOAL, SMOLLM2, model_path, serving, status_json};

/// `shoal serve` with 1 thread per worker and a 512-token context, plus `extra`.
fn serve(procs: &mut Procs, extra: &[&str]) -> (String, common::Out, u32) {
    common::serve(procs, &[&["--threads", "1", "--ctx", "512"], extra].concat())
}

/// What single-process `shoal run` prints for a greedy completion.
fn single(prompt: &str, n: usize) -> String {
    let o = Command::new(SHOAL)
        .args(["run", "--temperature", "0", "-t", "1", "--ctx", "512", "-n", &n.to_string()])
        .arg("--model")
        .arg(model_path(SMOLLM2))
        .arg(prompt)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8(o.stdout).unwrap();
    s.strip_suffix('\n').unwrap_or(&s).to_string()
}

/// Sends `prompts` at once with the `openai` client; returns (text, finish, tokens) each.
fn openai_concurrent(base: &str, prompts: &[String], n: usize) -> Vec<(String, String, u64)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/openai_completions.py");
    let o = Command::new("python3")
        .arg(script)
        .args([base, "SmolLM2-135M-Instruct.Q4_1", &n.to_string()])
        .args(prompts)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "the openai client failed (scripts/install-deps installs it): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["text"].as_str().unwrap().to_string(),
                r["finish_reason"].as_str().unwrap().to_string(),
                r["completion_tokens"].as_u64().unwrap(),
            )
        })
        .collect()
}

const TOPICS: [&str; 16] = [
    "The history of Rome", "How bread is made", "The planets of the solar system", "Why the sky is blue",
    "A recipe for pancakes", "The rules of chess", "How a bicycle works", "The life of bees",
    "Tips for learning a language", "The water cycle", "How computers store numbers", "The French revolution",
    "Photosynthesis in plants", "How to tie a knot", "The tallest mountains", "Why cats purr",
];

#[test]
fn serve_with_3_local_workers_answers_16_concurrent_openai_requests_like_one_process() {
    let mut procs = Procs::default();
    let (reg, out, pid) = serve(&mut procs, &["--workers", "3"]);
    let base = serving(out);
    let prompts: Vec<String> = TOPICS.iter().map(|t| format!("{t} is")).collect();
    const N: usize = 16;
    let t0 = Instant::now();
    let got = openai_concurrent(&base, &prompts, N);
    eprintln!("16 concurrent requests of {N} tokens through 3 stages: {:?}", t0.elapsed());
    for (p, (text, finish, n)) in prompts.iter().zip(&got) {
        let want = single(p, N);
        assert_eq!(text, &want, "prompt {p:?}");
        if *finish == "length" {
            assert_eq!(*n, N as u64, "prompt {p:?}");
        } else {
            assert_eq!(finish, "stop", "prompt {p:?}");
        }
    }
    // The registry knows the 3 stages, their layers and that they have worked.
    let st = status_json(&reg);
    assert_eq!(st["state"], "serving", "{st}");
    let workers = st["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 3, "{st}");
    let mut next = 0;
    for w in workers {
        assert_eq!(w["layer_start"].as_u64().unwrap(), next, "{st}");
        next = w["layer_end"].as_u64().unwrap();
        assert!(w["steps"].as_u64().unwrap() > 0, "{st}");
    }
    assert_eq!(next, 30, "{st}");
    // Killing the coordinator takes its local workers with it.
    let kids = String::from_utf8(Command::new("pgrep").args(["-P", &pid.to_string()]).output().unwrap().stdout).unwrap();
    let kids: Vec<String> = kids.split_whitespace().map(str::to_string).collect();
    assert_eq!(kids.len(), 3, "children of shoal serve: {kids:?}");
    drop(procs);
    let t = Instant::now();
    while kids.iter().any(|k| Path::new(&format!("/proc/{k}")).exists()) {
        assert!(t.elapsed() < Duration::from_secs(5), "workers outlived shoal serve: {kids:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_loads_onto_workers_that_join_its_registry() {
    let mut procs = Procs::default();
    let (reg, out, _) = serve(&mut procs, &["--min-workers", "2"]);
    for i in 0..2 {
        common::worker(&mut procs, "127.0.0.1:0", &["--join", &reg, "--name", &format!("joined-{i}")]);
    }
    let base = serving(out);
    let prompts = vec!["The water cycle is".to_string()];
    let got = openai_concurrent(&base, &prompts, 12);
    assert_eq!(got[0].0, single(&prompts[0], 12));
    let st = status_json(&reg);
    let names: Vec<&str> = st["workers"].as_array().unwrap().iter().map(|w| w["node_name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 2, "{st}");
    assert!(names.iter().all(|n| n.starts_with("joined-")), "{st}");
}

/// One HTTP/1.1 request on a fresh connection; returns (status, headers + body text).
fn http(base: &str, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let hostport = base.trim_start_matches("http://").trim_end_matches("/v1");
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

#[test]
fn serve_checks_api_keys_and_enforces_its_limits() {
    // Beyond loopback without keys: refused before anything starts.
    let o = Command::new(SHOAL)
        .args(["serve", "--workers", "1", "--listen", "127.0.0.1:0", "--http", "0.0.0.0:0"])
        .arg("--model")
        .arg(model_path(SMOLLM2))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--api-key") && err.lines().count() == 1, "{err}");

    let mut procs = Procs::default();
    let flags = ["--workers", "1", "--api-key", "k1", "--max-concurrent-requests", "1", "--max-body-bytes", "4096"];
    let (_, out, _) = serve(&mut procs, &flags);
    let base = serving(out);
    let body = r#"{"prompt": "Hello", "max_tokens": 2, "temperature": 0}"#;
    let (st, text) = http(&base, "/v1/completions", None, body);
    assert_eq!(st, 401, "{text}");
    assert!(text.contains("\"code\":\"invalid_api_key\""), "{text}");
    let (st, text) = http(&base, "/v1/completions", Some("nope"), body);
    assert_eq!(st, 401, "{text}");
    let (st, text) = http(&base, "/v1/completions", Some("k1"), body);
    assert_eq!(st, 200, "{text}");
    assert!(text.contains("\"completion_tokens\":2"), "{text}");
    // Too large a body: 413, in OpenAI's error shape.
    let big = format!(r#"{{"prompt": "{}", "max_tokens": 1}}"#, "a".repeat(5000));
    let (st, text) = http(&base, "/v1/completions", Some("k1"), &big);
    assert_eq!(st, 413, "{text}");
    assert!(text.contains("\"error\""), "{text}");
    // One request generating at a time: a second one gets 429 with Retry-After.
    let long = r#"{"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": true}"#.to_string();
    let b2 = base.clone();
    let first = std::thread::spawn(move || http(&b2, "/v1/completions", Some("k1"), &long));
    std::thread::sleep(Duration::from_millis(300));
    let (st, text) = http(&base, "/v1/completions", Some("k1"), body);
    assert_eq!(st, 429, "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after: 1"), "{text}");
    let (st, text) = first.join().unwrap();
    assert_eq!(st, 200);
    assert!(text.contains("data: [DONE]"), "{text}");
    // /health needs no key.
    let (st, h) = get(&base, "/health");
    assert_eq!(st, 200, "{h}");
}

/// Admission by KV budget: a stage with room for about 180 tokens (4 MiB at 23 KB a token)
/// runs one request of 5 + 150 tokens at a time. A request that could never fit is refused
/// with 400; a second one waits for the first and then completes; with the queue full (one
/// waiting), a third gets 429 with Retry-After. Nothing runs out of memory and none is lost.
#[test]
fn kv_budget_queues_a_burst_and_refuses_what_cannot_fit() {
    let mut procs = Procs::default();
    let (_, out, pid) = serve(&mut procs, &["--workers", "1", "--kv-budget-mib", "4", "--max-queue", "1"]);
    let base = serving(out);
    let never = r#"{"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}"#;
    let (st, text) = http(&base, "/v1/completions", None, never);
    assert_eq!(st, 400, "{text}");
    assert!(text.contains("KV") && text.contains("budget"), "{text}");
    let long = r#"{"prompt": "Once upon a time", "max_tokens": 150, "temperature": 0, "stream": true}"#;
    let spawn = |body: &'static str| {
        let b = base.clone();
        std::thread::spawn(move || http(&b, "/v1/completions", None, body))
    };
    let a = spawn(long);
    std::thread::sleep(Duration::from_millis(500));
    let b = spawn(long);
    std::thread::sleep(Duration::from_millis(500));
    let (st, text) = http(&base, "/v1/completions", None, r#"{"prompt": "Hi", "max_tokens": 4}"#);
    assert_eq!(st, 429, "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after: 1") && text.contains("waiting"), "{text}");
    let (sa, ta) = a.join().unwrap();
    let (sb, tb) = b.join().unwrap();
    assert_eq!((sa, sb), (200, 200), "{ta}\n{tb}");
    // Both streamed to the end, and (greedy, same prompt) the same text.
    let text_of = |t: &str| -> String {
        t.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str::<serde_json::Value>(d).unwrap()["choices"][0]["text"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert!(ta.contains("data: [DONE]") && tb.contains("data: [DONE]"));
    assert_eq!(text_of(&ta), text_of(&tb));
    assert!(text_of(&ta).len() > 100, "{ta}");

    // /health is true while the pipeline can serve, and says what is wrong once it cannot.
    let (st, text) = get(&base, "/health");
    assert_eq!(st, 200, "{text}");
    assert!(text.ends_with(r#"{"status":"ok"}"#), "{text}");
    let kids = String::from_utf8(Command::new("pgrep").args(["-P", &pid.to_string()]).output().unwrap().stdout).unwrap();
    let worker = kids.split_whitespace().next().expect("the local worker");
    assert!(Command::new("kill").args(["-KILL", worker]).status().unwrap().success());
    let (st, text) = get(&base, "/health");
    assert_eq!(st, 503, "{text}");
    assert!(text.contains(r#""status":"unavailable""#) && text.contains("stage 0"), "{text}");
}

/// A GET on a fresh connection; returns (status, headers + body text).
fn get(base: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let hostport = base.trim_start_matches("http://").trim_end_matches("/v1");
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    (out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0), out)
}
