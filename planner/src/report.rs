//! The table `shoal plan` prints.

use std::fmt::Write;

use crate::place::Plan;

fn gb(b: u64) -> String {
    format!("{:.2}", b as f64 / 1e9)
}

fn layers(s: &crate::place::Stage) -> String {
    let mut t = format!("{}-{}", s.layers.start, s.layers.end - 1);
    if s.embed {
        t.push_str(" +embed");
    }
    if s.head {
        t.push_str(" +head");
    }
    t
}

/// A readable report: one row per stage, the routed experts kept in CPU RAM, memory per
/// device with headroom, and the prediction.
pub fn table(p: &Plan) -> String {
    let w = &p.workload;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "plan: {} on {}, ctx {}, parallel {}",
        p.model,
        if p.cluster.is_empty() {
            "the cluster"
        } else {
            &p.cluster
        },
        w.ctx,
        w.parallel
    );
    let rows: Vec<[String; 8]> = p
        .stages
        .iter()
        .enumerate()
        .map(|(k, s)| {
            [
                k.to_string(),
                format!("{} ({})", s.label, s.device),
                layers(s),
                gb(s.weight_bytes),
                gb(s.kv_bytes),
                gb(s.scratch_bytes),
                format!("{:.2}", s.ms_per_step),
                s.bottleneck.clone(),
            ]
        })
        .collect();
    let head = [
        "stage",
        "device",
        "layers",
        "weights GB",
        "KV GB",
        "scratch GB",
        "ms/step",
        "bottleneck",
    ];
    let mut width = head.map(|h| h.len());
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            if (3..7).contains(&i) {
                let _ = write!(l, "{}{}  ", " ".repeat(pad), c);
            } else {
                let _ = write!(l, "{}{}  ", c, " ".repeat(pad));
            }
        }
        l.trim_end().to_string()
    };
    let _ = writeln!(o, "{}", line(&head.map(String::from)));
    for r in &rows {
        let _ = writeln!(o, "{}", line(r));
    }
    for s in p.stages.iter().filter(|s| !s.offloaded.is_empty()) {
        let _ = writeln!(
            o,
            "routed experts of layers {}-{} ({}): in {}/cpu RAM",
            s.offloaded.start,
            s.offloaded.end - 1,
            s.label,
            s.label.split('/').next().unwrap_or("")
        );
    }
    let _ = writeln!(
        o,
        "\ndevice memory (weights + KV + scratch + {:.0}% margin):",
        w.margin * 100.0
    );
    let dw = p.devices.iter().map(|d| d.host.len() + d.device.len() + 1).max().unwrap_or(0);
    for d in &p.devices {
        let _ = writeln!(
            o,
            "  {:<dw$}  {:>8} / {:>8} GB   headroom {:>7} GB",
            format!("{}/{}", d.host, d.device),
            gb(d.used),
            gb(d.capacity),
            gb(d.capacity.saturating_sub(d.used))
        );
    }
    let pr = &p.prediction;
    let _ = writeln!(
        o,
        "\npredicted decode: {:.1} tok/s for one sequence; {:.1} tok/s for {} (step {:.1} ms, {} micro-batch group{})",
        pr.decode_tok_s_single,
        pr.decode_tok_s,
        w.parallel,
        pr.step_ms,
        pr.groups,
        if pr.groups == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        o,
        "predicted prefill: {:.0} tok/s ({}-token chunks)",
        pr.prefill_tok_s,
        w.prefill_chunk.min(w.ctx)
    );
    let _ = writeln!(o, "bottleneck: {}", pr.bottleneck);
    o
}
