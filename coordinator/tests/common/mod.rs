//! Helpers shared by the coordinator's integration tests: where the models are, child
//! processes that die with the test, and starting `shoal serve`. Each test binary uses a
//! part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};

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
    let mut child = Command::new(SHOAL)
        .args(["worker", "--listen", listen, "--exit-with-parent", "--models-dir"])
        .arg(models_dir())
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
