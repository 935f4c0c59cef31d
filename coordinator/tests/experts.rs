//! Routed experts on a separate expert-host process: `shoal run --worker A --expert-host B`
//! on the qwen3moe and mixtral reference fixtures (scripts/fixtures) prints exactly what one
//! process prints (f32 activations both ways), and the stage really depends on the host: with
//! the host gone, the run fails naming it.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Procs, SHOAL};

fn fixtures_dir() -> PathBuf {
    std::env::var_os("SHOAL_FIXTURES_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/shoal/fixtures")
    })
}

/// `shoal worker` on loopback serving the fixtures directory; returns its address.
fn worker(procs: &mut Procs) -> String {
    common::worker_in(procs, &fixtures_dir(), "127.0.0.1:0", &[])
}

fn run(model: &str, extra: &[&str]) -> std::process::Output {
    let path = fixtures_dir().join(model);
    assert!(path.exists(), "{} is missing: run scripts/fixtures/run", path.display());
    Command::new(SHOAL)
        .args(["run", "--temperature", "0", "-n", "16", "--ignore-eos", "-t", "1", "--model"])
        .arg(path)
        .args(extra)
        .arg("stone river light")
        .env_remove("SHOAL_TLS_DIR")
        .output()
        .unwrap()
}

#[test]
fn experts_on_an_expert_host_print_what_one_process_prints() {
    let mut procs = Procs::default();
    let (stage, host) = (worker(&mut procs), worker(&mut procs));
    for model in ["qwen3moe.gguf", "mixtral.gguf"] {
        let single = run(model, &[]);
        assert!(single.status.success(), "{}", String::from_utf8_lossy(&single.stderr));
        assert!(!single.stdout.is_empty(), "{model}: empty completion");
        let remote = run(model, &["--worker", &stage, "--expert-host", &host]);
        assert!(remote.status.success(), "{model}: {}", String::from_utf8_lossy(&remote.stderr));
        assert_eq!(
            String::from_utf8_lossy(&remote.stdout),
            String::from_utf8_lossy(&single.stdout),
            "{model}: experts on an expert host changed the output"
        );
        eprintln!("{model}: {:?} either way", String::from_utf8_lossy(&single.stdout));
    }
    // The stage needs its host: without it the run fails, and says why.
    let p = &mut procs.0[1];
    p.kill().unwrap();
    p.wait().unwrap();
    let out = run("qwen3moe.gguf", &["--worker", &stage, "--expert-host", &host]);
    assert!(!out.status.success(), "ran without its expert host");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&host), "the error does not name the expert host: {err}");
}
