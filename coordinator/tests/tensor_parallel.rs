//! Tensor-parallel stages of worker processes over the TCP collective: `shoal run --worker
//! A+B` (one stage, TP = 2), `--worker A+B+C` (TP = 3) and `--worker A+B --worker C` (a
//! pipeline of a TP = 2 stage and a plain one) print exactly what one process prints, on
//! SmolLM2 Q4_1 and on the qwen3, qwen3moe and mixtral fixtures (experts split over ranks). Exact mode
//! and f32 activations: every bit is one process's, so the text must be identical. Then a
//! rank is killed: the next run fails and says which group member is missing.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Procs, SHOAL};

fn run(model: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(SHOAL)
        .args(["run", "--temperature", "0", "-n", "16", "--ignore-eos", "-t", "1", "--model"])
        .arg(model)
        .args(extra)
        .arg("The capital of France is")
        .env_remove("SHOAL_TLS_DIR")
        .output()
        .unwrap()
}

fn same_text(model: &Path, want: &str, extra: &[&str]) {
    let out = run(model, extra);
    assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{extra:?}: the text differs from one process's");
    eprintln!("{}: {extra:?} prints one process's text", model.display());
}

#[test]
fn tensor_parallel_stages_of_worker_processes_print_what_one_process_prints() {
    let mut procs = Procs::default();
    let model = common::model_path("SmolLM2-135M-Instruct.Q4_1.gguf");
    let single = run(&model, &[]);
    assert!(single.status.success(), "{}", String::from_utf8_lossy(&single.stderr));
    let want = String::from_utf8_lossy(&single.stdout).into_owned();
    assert!(want.len() > 20, "a short completion: {want:?}");
    let w: Vec<String> = (0..3).map(|_| common::worker(&mut procs, "127.0.0.1:0", &[])).collect();
    same_text(&model, &want, &["--worker", &format!("{}+{}", w[0], w[1])]);
    same_text(&model, &want, &["--worker", &format!("{}+{}+{}", w[0], w[1], w[2])]);
    same_text(&model, &want, &["--worker", &format!("{}+{}", w[1], w[2]), "--worker", &w[0]]);

    // The reference fixtures (whose single-process greedy tokens are transformers'): qwen3
    // and qwen3moe (2 KV heads: at TP = 3 rank 2 holds none) and mixtral, their 8 experts
    // split 4 + 4 and 3 + 3 + 2.
    let fixtures = std::env::var_os("SHOAL_FIXTURES_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/shoal/fixtures")
    });
    let f: Vec<String> = (0..3).map(|_| common::worker_in(&mut procs, &fixtures, "127.0.0.1:0", &[])).collect();
    for name in ["qwen3.gguf", "qwen3moe.gguf", "mixtral.gguf"] {
        let m = fixtures.join(name);
        assert!(m.exists(), "{} is missing: run scripts/fixtures/run", m.display());
        let single = run(&m, &[]);
        assert!(single.status.success(), "{}", String::from_utf8_lossy(&single.stderr));
        let want = String::from_utf8_lossy(&single.stdout).into_owned();
        same_text(&m, &want, &["--worker", &format!("{}+{}", f[0], f[1])]);
        same_text(&m, &want, &["--worker", &format!("{}+{}+{}", f[0], f[1], f[2])]);
    }

    // A rank that is gone: the stage cannot form, and the error names it.
    let p = &mut procs.0[2];
    p.kill().unwrap();
    p.wait().unwrap();
    let out = run(&model, &["--worker", &format!("{}+{}", w[0], w[2])]);
    assert!(!out.status.success(), "ran without its second rank");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&w[2]), "the error does not name the missing rank: {err}");
}
