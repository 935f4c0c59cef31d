//! The shipped cluster examples against the catalogue: the plans the README promises.

use std::path::PathBuf;

use shoal_planner::place::{self, Search};
use shoal_planner::{Cluster, PlanError, Workload, catalog};

fn example(name: &str) -> Cluster {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name);
    Cluster::from_toml_file(&p).unwrap()
}

#[test]
fn every_example_parses() {
    for f in [
        "3x3090-plus-cpu-host.toml",
        "3x3090.toml",
        "two-2x3090-1gbe.toml",
        "cpu-lab-4-nodes.toml",
    ] {
        let c = example(f);
        assert!(!c.hosts.is_empty(), "{f}");
    }
}

/// Plans a catalogue model on an example cluster and checks the plan independently.
fn plan(model: &str, cluster: &str, ctx: u64, parallel: u64) -> place::Plan {
    let m = catalog::lookup(model).unwrap();
    let c = example(cluster);
    let p = place::plan(&m, &c, &Workload::new(ctx, parallel), &Search::default()).unwrap();
    place::validate(&p, &m, &c).unwrap();
    eprintln!("{}", shoal_planner::report::table(&p));
    p
}

#[test]
fn qwen3_235b_fits_three_3090s_and_a_cpu_host() {
    let p = plan("qwen3-235b-a22b:q4_k_m", "3x3090-plus-cpu-host.toml", 32768, 1);
    // 142 GB of weights cannot sit in 72 GB of VRAM: the CPU host takes a stage.
    assert!(p.stages.iter().any(|s| s.label == "bigram/cpu"));
    assert!(p.stages.iter().any(|s| !s.unit.gpus.is_empty()));
    let d = p.prediction.decode_tok_s_single;
    assert!(d > 1.0 && d < 200.0, "predicted decode {d} tok/s");
}

#[test]
fn with_four_sequences_a_gpu_stage_keeps_attention_and_moves_experts_to_host_ram() {
    // Four sequences' KV makes the GPUs shorter still: a GPU stage keeps its attention and
    // sends the routed experts of its last layers to the rig's own RAM.
    let p = plan("qwen3-235b-a22b:q4_k_m", "3x3090-plus-cpu-host.toml", 32768, 4);
    let s = p.stages.iter().find(|s| !s.unit.gpus.is_empty() && !s.offloaded.is_empty()).expect("a GPU stage offloads");
    let l = s.offloaded.start;
    let on = |name: &str| &p.tensors.iter().find(|t| t.tensor == name).unwrap().devices;
    assert_eq!(on(&format!("blk.{l}.ffn_up_exps.weight")), &vec!["rig/cpu".to_string()]);
    assert_eq!(on(&format!("blk.{l}.attn_q.weight")), &vec![s.label.clone()]);
    assert_eq!(on(&format!("blk.{l}.ffn_gate_inp.weight")), &vec![s.label.clone()]);
}

#[test]
fn qwen3_coder_480b_fits_the_cpu_lab() {
    let p = plan("qwen3-coder-480b-a35b:q4_k_m", "cpu-lab-4-nodes.toml", 32768, 1);
    assert!(p.stages.len() >= 3, "290 GB needs at least three 128 GB hosts");
    assert!(p.prediction.decode_tok_s_single > 0.5);
}

#[test]
fn llama_405b_on_three_3090s_does_not_fit_and_says_by_how_much() {
    let m = catalog::lookup("llama-3.1-405b:q4_k_m").unwrap();
    let c = example("3x3090.toml");
    let w = Workload::new(32768, 1);
    match place::plan(&m, &c, &w, &Search::default()) {
        Err(PlanError::NoFit(nf)) => {
            let msg = nf.to_string();
            eprintln!("{msg}");
            assert!(nf.shortfall > 100_000_000_000, "{msg}");
            assert!(
                nf.need > nf.weights && nf.weights > 240_000_000_000,
                "{msg}"
            );
            let s = place::suggest(&m, &c, &w, &Search::default(), &[]);
            assert!(s.iter().any(|s| s.contains("more RTX 3090")), "{s:?}");
        }
        other => panic!("expected NoFit, got {other:?}"),
    }
}
