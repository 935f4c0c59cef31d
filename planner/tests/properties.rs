//! Property tests on random models and clusters: every plan the optimizer returns is valid
//! (each tensor placed once, layers covered in order, no device over its memory), and its
//! predicted step time is never worse than an even split's under the same cost model.

use shoal_kernels::GgmlType;
use shoal_planner::cluster::{Device, DeviceKind, Host, Link};
use shoal_planner::place::{self, Search, Unit};
use shoal_planner::{Cluster, ModelDesc, PlanError, TensorDesc, Workload};

/// The project's seeded generator with the draws these tests need.
struct Rng(shoal_model::sampling::Rng);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn f(&mut self, lo: f64, hi: f64) -> f64 {
        lo + self.0.next_f64() * (hi - lo)
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.next() as usize % v.len()]
    }
}

fn random_model(r: &mut Rng) -> ModelDesc {
    let n_layer = r.range(1, 24) as usize;
    let n_embd = 256 * r.range(1, 6);
    let head_dim = r.pick(&[64u64, 128]);
    let n_head = (n_embd / head_dim).max(1);
    let n_head_kv = r.pick(&[1u64, 2, n_head]).min(n_head);
    let n_ff = 256 * r.range(2, 16);
    let n_vocab = 256 * r.range(4, 64);
    let moe = r.next().is_multiple_of(2);
    let n_expert = if moe { r.range(4, 16) } else { 0 };
    let n_expert_used = if moe { r.range(1, 4.min(n_expert)) } else { 0 };
    let ty = |r: &mut Rng| {
        r.pick(&[
            GgmlType::F16,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::Q4_0,
        ])
    };
    let mut t = Vec::new();
    let mut add =
        |name: &str, dims: &[u64], ty: GgmlType| t.push(TensorDesc::new(name, dims, ty).unwrap());
    add("token_embd.weight", &[n_embd, n_vocab], ty(r));
    add("output_norm.weight", &[n_embd], GgmlType::F32);
    if r.next().is_multiple_of(2) {
        add("output.weight", &[n_embd, n_vocab], ty(r));
    }
    for l in 0..n_layer {
        let b = |s: &str| format!("blk.{l}.{s}");
        add(&b("attn_norm.weight"), &[n_embd], GgmlType::F32);
        add(&b("attn_q.weight"), &[n_embd, n_head * head_dim], ty(r));
        add(&b("attn_k.weight"), &[n_embd, n_head_kv * head_dim], ty(r));
        add(&b("attn_v.weight"), &[n_embd, n_head_kv * head_dim], ty(r));
        add(
            &b("attn_output.weight"),
            &[n_head * head_dim, n_embd],
            ty(r),
        );
        add(&b("ffn_norm.weight"), &[n_embd], GgmlType::F32);
        if moe {
            add(
                &b("ffn_gate_inp.weight"),
                &[n_embd, n_expert],
                GgmlType::F32,
            );
            let ff = 256 * r.range(1, 4);
            add(&b("ffn_gate_exps.weight"), &[n_embd, ff, n_expert], ty(r));
            add(&b("ffn_up_exps.weight"), &[n_embd, ff, n_expert], ty(r));
            add(&b("ffn_down_exps.weight"), &[ff, n_embd, n_expert], ty(r));
        } else {
            add(&b("ffn_gate.weight"), &[n_embd, n_ff], ty(r));
            add(&b("ffn_up.weight"), &[n_embd, n_ff], ty(r));
            add(&b("ffn_down.weight"), &[n_ff, n_embd], ty(r));
        }
    }
    let m = ModelDesc {
        name: "random".into(),
        arch: "llama".into(),
        n_layer,
        n_embd,
        n_head,
        n_head_kv,
        head_dim_k: head_dim,
        head_dim_v: head_dim,
        n_vocab,
        n_ctx_train: 4096,
        n_expert,
        n_expert_used,
        tensors: t,
    };
    m.validate().unwrap();
    m
}

fn device(r: &mut Rng, kind: DeviceKind, mem: f64) -> Device {
    let gpu = kind == DeviceKind::Gpu;
    Device {
        name: if gpu { "gpu".into() } else { "CPU".into() },
        kind,
        memory: mem as u64,
        reserve: 0,
        bandwidth: if gpu {
            r.f(200e9, 1000e9)
        } else {
            r.f(20e9, 200e9)
        },
        flops: if gpu {
            r.f(10e12, 80e12)
        } else {
            r.f(0.3e12, 3e12)
        },
        layer_overhead_s: r.f(5e-6, 50e-6),
        rates: None,
    }
}

/// Hosts with 0-3 GPUs; memory scaled to the model so that plans fit, barely fit or not.
fn random_cluster(r: &mut Rng, model_bytes: f64) -> Cluster {
    let n_hosts = r.range(1, 3) as usize;
    let hosts = (0..n_hosts)
        .map(|i| {
            let n_gpu = r.range(0, 3) as usize;
            let gpu_mem = model_bytes * r.f(0.05, 0.8);
            let gpus = (0..n_gpu)
                .map(|_| device(r, DeviceKind::Gpu, gpu_mem))
                .collect();
            let ram = model_bytes * r.f(0.1, 1.5);
            Host {
                name: format!("h{i}"),
                cpu: device(r, DeviceKind::Cpu, ram),
                gpus,
                pcie: Link {
                    latency_s: 10e-6,
                    bandwidth: r.f(4e9, 25e9),
                },
                local: Link {
                    latency_s: 50e-6,
                    bandwidth: 5e9,
                },
            }
        })
        .collect();
    Cluster {
        name: "random".into(),
        hosts,
        coordinator: 0,
        network: Link {
            latency_s: r.f(50e-6, 2e-3),
            bandwidth: r.f(1e8, 3e9),
        },
        links: Default::default(),
        coordinator_links: Vec::new(),
    }
}

/// Layers split as evenly as possible over every unit (each host's GPUs, then its CPU).
fn even_split(m: &ModelDesc, c: &Cluster) -> Option<Vec<(Unit, std::ops::Range<usize>)>> {
    let mut units = Vec::new();
    for (h, host) in c.hosts.iter().enumerate() {
        units.extend((0..host.gpus.len()).map(|g| Unit {
            host: h,
            gpus: vec![g],
        }));
        units.push(Unit {
            host: h,
            gpus: vec![],
        });
    }
    if units.len() > m.n_layer {
        return None;
    }
    let (n, s) = (m.n_layer, units.len());
    let mut start = 0;
    Some(
        units
            .into_iter()
            .enumerate()
            .map(|(k, u)| {
                let len = n / s + usize::from(k < n % s);
                let r = start..start + len;
                start += len;
                (u, r)
            })
            .collect(),
    )
}

#[test]
fn plans_are_valid_and_never_worse_than_an_even_split() {
    let mut r = Rng(shoal_model::sampling::Rng::new(0x5eed_0001));
    let (mut fitted, mut compared, mut refused) = (0, 0, 0);
    for case in 0..300 {
        let m = random_model(&mut r);
        let c = random_cluster(&mut r, m.total_bytes() as f64);
        let w = Workload::new(r.pick(&[256u64, 1024, 4096]), r.pick(&[1u64, 2, 4, 8]));
        let got = place::plan(&m, &c, &w, &Search::default());
        let even = even_split(&m, &c).and_then(|stages| {
            (1..=w.parallel.min(stages.len() as u64))
                .filter_map(|g| place::evaluate(&m, &c, &w, &stages, g))
                .min_by(|a, b| a.objective_s.total_cmp(&b.objective_s))
        });
        match got {
            Ok(p) => {
                fitted += 1;
                if let Err(e) = place::validate(&p, &m, &c) {
                    panic!("case {case}: invalid plan: {e}\n{p:#?}");
                }
                assert!(
                    (p.prediction.step_ms / 1e3 - p.objective_s).abs()
                        <= 1e-12 + 1e-9 * p.objective_s
                );
                assert!(p.prediction.decode_tok_s > 0.0 && p.prediction.prefill_tok_s > 0.0);
                if let Some(e) = even {
                    compared += 1;
                    place::validate(&e, &m, &c)
                        .unwrap_or_else(|err| panic!("case {case}: even split invalid: {err}"));
                    assert!(
                        p.objective_s <= e.objective_s * (1.0 + 1e-9),
                        "case {case}: optimizer {:.6} ms worse than even split {:.6} ms",
                        p.objective_s * 1e3,
                        e.objective_s * 1e3
                    );
                }
            }
            Err(PlanError::NoFit(nf)) => {
                refused += 1;
                assert!(
                    even.is_none(),
                    "case {case}: the optimizer found no plan but the even split fits"
                );
                assert!(nf.need > 0 && nf.capacity > 0);
            }
            Err(e) => panic!("case {case}: {e}"),
        }
    }
    eprintln!("fitted {fitted}, refused {refused}, compared with an even split {compared}");
    // The generator must exercise both outcomes and the comparison.
    assert!(
        fitted >= 50 && refused >= 20 && compared >= 30,
        "fitted {fitted}, refused {refused}, compared {compared}"
    );
}
