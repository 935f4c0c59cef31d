//! Helpers shared by the coordinator's integration tests: where the models are, child
//! processes that die with the test, and starting `shoal serve`. Each test binary uses a
//! part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const QWEN: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
pub const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// `$SHOAL_MODELS_DIR`, else `~/.cache/shoal/models` (where scripts/fetch-models puts them).
pub fn models_dir() -> PathBuf {
    std::env::var_os("SHOAL_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/shoal/models")
    })
}

pub fn model_path(name: &str) -> PathBuf {
    let p = models_dir().join(name);
    assert!(p.exists(), "{} is missing: run scripts/fetch-models", p.display());
    p
}

/// Child processes killed (and reaped) on drop, so a failing test leaves none behind, and
/// temporary directories removed after them.
#[derive(Default)]
pub struct Procs(pub Vec<Child>, pub Vec<PathBuf>);

impl Procs {
    /// A fresh empty directory, removed when `self` drops.
    pub fn temp_dir(&mut self, tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!("shoal-test-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        self.1.push(d.clone());
        d
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in &self.1 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

pub type Out = BufReader<ChildStdout>;

/// Reads stdout lines until one starts with `prefix`; returns the rest of it.
pub fn wait_line(out: &mut impl BufRead, prefix: &str, what: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "{what} ended before printing {prefix:?}");
        if let Some(rest) = line.trim().strip_prefix(prefix) {
            return rest.trim().to_string();
        }
    }
}

/// The first line a child prints on `out`, waited for at most 30 s (empty if none came). A
/// thread keeps draining the pipe afterwards, for the child's lifetime, so it never blocks
/// on a full pipe.
pub fn first_line(out: ChildStdout) -> String {
    let mut out = BufReader::new(out);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        let _ = tx.send(line);
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    });
    rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap_or_default()
}

/// Starts `shoal worker --listen LISTEN --exit-with-parent --models-dir <test models>
/// EXTRA...` (global flags such as `--tls-dir` may be among EXTRA), held by `procs` so it dies
/// with the test, without inheriting `SHOAL_TLS_DIR`/`SHOAL_JOIN_TOKEN`; returns the address
/// it printed.
pub fn worker(procs: &mut Procs, listen: &str, extra: &[&str]) -> String {
    worker_in(procs, &models_dir(), listen, extra)
}

/// [`worker`] serving the models in `dir`.
pub fn worker_in(procs: &mut Procs, dir: &std::path::Path, listen: &str, extra: &[&str]) -> String {
    let mut child = Command::new(SHOAL)
        .args(["worker", "--listen", listen, "--exit-with-parent", "--models-dir"])
        .arg(dir)
        .args(extra)
        .env_remove("SHOAL_TLS_DIR")
        .env_remove("SHOAL_JOIN_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    procs.0.push(child);
    let line = first_line(out);
    line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("worker said {line:?}")).to_string()
}

/// `shoal status --coordinator REG --json`, parsed; the command must succeed.
pub fn status_json(reg: &str) -> serde_json::Value {
    let o = Command::new(SHOAL).args(["status", "--json", "--coordinator", reg]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Starts `shoal serve` on SmolLM2 (registry and API on free loopback ports) with `extra`
/// flags; returns (registry address, its stdout, pid) once the registry listens.
pub fn serve(procs: &mut Procs, extra: &[&str]) -> (String, Out, u32) {
    // Each server gets a state directory of its own unless the test names one.
    let state = if extra.contains(&"--state-dir") { None } else { Some(procs.temp_dir("state")) };
    let mut cmd = Command::new(SHOAL);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--model"]).arg(model_path(SMOLLM2)).args(extra);
    if let Some(s) = state {
        cmd.arg("--state-dir").arg(s);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let pid = child.id();
    procs.0.push(child);
    let reg = wait_line(&mut out, "registry on", "shoal serve");
    (reg, out, pid)
}

/// Waits until `shoal serve` has loaded the model; returns the API's base URL (`…/v1`).
pub fn serving(mut out: Out) -> String {
    let http = wait_line(&mut out, "serving on", "shoal serve");
    // Keep reading stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in out.lines() {});
    format!("{http}/v1")
}

/// A real etcd on loopback; killed by PID and its data directory removed on drop.
pub struct Etcd {
    pub child: Child,
    pub url: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn start_etcd(data: &std::path::Path) -> Etcd {
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "shoal-test", "--data-dir"])
        .arg(data)
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("shoal-test={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd is installed by scripts/install-deps (Debian etcd-server)");
    let etcd = Etcd { child, url };
    // Ready when its client port answers the health endpoint.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", client)) {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /health HTTP/1.0\r\n\r\n");
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            if body.contains("\"health\":\"true\"") {
                return etcd;
            }
        }
        assert!(Instant::now() < deadline, "etcd did not become healthy");
        std::thread::sleep(Duration::from_millis(100));
    }
}


/// Waits until `seen` reaches `after` (failing after 120 s: no tokens came), then runs
/// `during`: what a test does to a cluster while its streams are under way.
pub fn once_seen(seen: &std::sync::atomic::AtomicUsize, after: usize, during: impl FnOnce()) {
    let t0 = Instant::now();
    while seen.load(std::sync::atomic::Ordering::Relaxed) < after {
        assert!(t0.elapsed() < Duration::from_secs(120), "no tokens came");
        std::thread::sleep(Duration::from_millis(5));
    }
    during();
}

/// One HTTP/1.0 POST on a fresh connection; returns (status, headers + body text).
pub fn post(base: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let hostport = base.trim_start_matches("http://").trim_end_matches("/v1");
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    write!(s, "POST {path} HTTP/1.0\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

/// A streamed (SSE) completion: POSTs `body` (which asks for `"stream": true`) and returns
/// the status and each `data:` event with the time it arrived, `[DONE]` included; `seen`
/// counts the events as they come.
pub fn post_stream(base: &str, path: &str, body: &str, seen: &std::sync::atomic::AtomicUsize) -> (u16, Vec<(Instant, String)>) {
    let (status, events, _) = post_stream_with_comments(base, path, body, seen);
    (status, events)
}

/// [`post_stream`], also returning the SSE comments (`: ...` lines) the server sent.
pub fn post_stream_with_comments(
    base: &str,
    path: &str,
    body: &str,
    seen: &std::sync::atomic::AtomicUsize,
) -> (u16, Vec<(Instant, String)>, Vec<String>) {
    use std::io::Write;
    let hostport = base.trim_start_matches("http://").trim_end_matches("/v1");
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    // Nothing may hang: a stream silent this long fails the test.
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    write!(s, "POST {path} HTTP/1.0\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (mut events, mut comments) = (Vec::new(), Vec::new());
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => panic!("the stream stalled or broke after {} events: {e}", events.len()),
        }
        if let Some(data) = line.trim().strip_prefix("data:") {
            events.push((Instant::now(), data.trim().to_string()));
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else if let Some(c) = line.trim().strip_prefix(':') {
            comments.push(c.trim().to_string());
        }
    }
    (status, events, comments)
}
