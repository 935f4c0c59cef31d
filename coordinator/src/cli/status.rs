//! `shoal status`: print the cluster as a coordinator sees it.
//!
//! One `Coordinator.Status` call; the coordinator measures every worker while answering
//! (round trips, counters, memory), so this command only formats the reply: a table, or the
//! whole `ClusterStatus` as JSON with `--json`.

use std::time::Duration;

use anyhow::{Context, Result};
use shoal_proto::v1::{self, coordinator_client::CoordinatorClient};

/// Longest wait for the coordinator to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for the answer (the coordinator bounds each worker's probe to 2 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The coordinator's gRPC address (`HOST:PORT`, as workers `--join` it).
    #[arg(long, value_name = "ADDR")]
    coordinator: String,
    /// Print the cluster status as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: StatusArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    let st = rt.block_on(fetch(&a.coordinator))?;
    let text = if a.json { format!("{:#}\n", to_json(&st)) } else { table(&st) };
    super::print_stdout(&text)
}

async fn fetch(addr: &str) -> Result<v1::ClusterStatus> {
    let unreachable = |msg: String| anyhow::anyhow!("cannot reach the coordinator at {addr}: {msg}");
    let ch = shoal_proto::security::get()
        .endpoint(addr)
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .map_err(|e| unreachable(shoal_proto::error_chain(&e)))?;
    let st = CoordinatorClient::new(shoal_proto::security::with_token(ch))
        .status(v1::StatusRequest {})
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unimplemented => unreachable("it does not serve shoal.v1.Coordinator".into()),
            _ => unreachable(format!("{} ({:?})", s.message(), s.code())),
        })?
        .into_inner();
    Ok(st)
}

/// The status as JSON, field names as in `shoal.proto`.
pub fn to_json(st: &v1::ClusterStatus) -> serde_json::Value {
    let workers: Vec<serde_json::Value> = st
        .workers
        .iter()
        .map(|w| {
            serde_json::json!({
                "addr": w.addr,
                "node_name": w.node_name,
                "reachable": w.reachable,
                "error": w.error,
                "planned": w.planned,
                "stage": w.stage,
                "joined": w.joined,
                "last_seen_ms_ago": w.last_seen_ms_ago,
                "loaded": w.loaded,
                "layer_start": w.layer_start,
                "layer_end": w.layer_end,
                "embed": w.embed,
                "head": w.head,
                "ram_total_bytes": w.ram_total_bytes,
                "ram_free_bytes": w.ram_free_bytes,
                "shard_bytes": w.shard_bytes,
                "kv_bytes": w.kv_bytes,
                "shard_loads": w.shard_loads,
                "sequences": w.sequences,
                "steps": w.steps,
                "tokens": w.tokens,
                "compute_ms_per_step": w.compute_ms_per_step,
                "rtt_ms": w.rtt_ms,
                "next_stage_rtt_ms": w.next_stage_rtt_ms,
                "next_stage": w.next_stage,
                "next_stage_error": w.next_stage_error,
            })
        })
        .collect();
    serde_json::json!({
        "coordinator_name": st.coordinator_name,
        "model_name": st.model_name,
        "model_identity": st.model_identity,
        "state": st.state,
        "workers": workers,
    })
}

const MB: f64 = 1e6;
const GIB: f64 = (1u64 << 30) as f64;

/// The status as a table: a model line, a state line, then one row per worker.
pub fn table(st: &v1::ClusterStatus) -> String {
    let mut out = String::new();
    let model = match (st.model_name.as_str(), st.model_identity.as_str()) {
        ("", _) => "(none yet)".to_string(),
        (name, "") => name.to_string(),
        (name, id) => format!("{name} (identity {})", &id[..id.len().min(12)]),
    };
    out += &format!("coordinator {}  model {model}\n", st.coordinator_name);
    out += &format!("state: {}  workers: {}\n", st.state, st.workers.len());
    if st.workers.is_empty() {
        return out;
    }
    let head = [
        "STAGE", "WORKER", "LAYERS", "RAM FREE/TOTAL", "SHARD MB", "KV MB", "SEQS", "STEPS", "MS/STEP", "RTT MS",
        "→NEXT MS", "SEEN",
    ];
    let mut rows: Vec<Vec<String>> = vec![head.iter().map(|s| s.to_string()).collect()];
    let mut notes = Vec::new();
    for w in &st.workers {
        let who = if w.node_name.is_empty() || w.node_name == w.addr {
            w.addr.clone()
        } else {
            format!("{} ({})", w.addr, w.node_name)
        };
        let stage = if w.planned { w.stage.to_string() } else { "-".into() };
        let seen = w.last_seen_ms_ago.map_or("-".into(), |ms| format!("{:.1}s ago", ms as f64 / 1e3));
        let layers = if w.loaded || w.planned {
            let mut l = format!("[{}, {})", w.layer_start, w.layer_end);
            if w.embed {
                l += " +embed";
            }
            if w.head {
                l += " +head";
            }
            l
        } else {
            "-".into()
        };
        if !w.reachable {
            notes.push(format!("{}: unreachable: {}", w.addr, w.error));
            let mut r = vec![stage, who, layers];
            r.extend(["unreachable".to_string()].into_iter().chain(std::iter::repeat_n("-".to_string(), 7)));
            r.push(seen);
            rows.push(r);
            continue;
        }
        let next = if !w.next_stage_error.is_empty() {
            notes.push(format!("{} → {}: {}", w.addr, w.next_stage, w.next_stage_error));
            "failed".into()
        } else if w.next_stage.is_empty() {
            "-".into()
        } else {
            format!("{:.2}", w.next_stage_rtt_ms)
        };
        rows.push(vec![
            stage,
            who,
            layers,
            format!("{:.1}/{:.1} GiB", w.ram_free_bytes as f64 / GIB, w.ram_total_bytes as f64 / GIB),
            format!("{:.1}", w.shard_bytes as f64 / MB),
            format!("{:.1}", w.kv_bytes as f64 / MB),
            w.sequences.to_string(),
            w.steps.to_string(),
            format!("{:.2}", w.compute_ms_per_step),
            format!("{:.2}", w.rtt_ms),
            next,
            seen,
        ]);
    }
    let widths: Vec<usize> =
        (0..head.len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(cell, &w)| format!("{cell:<w$}")).collect();
        out += line.join("  ").trim_end();
        out += "\n";
    }
    for n in notes {
        out += &n;
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_one_row_per_worker_and_names_the_unreachable() {
        let st = v1::ClusterStatus {
            coordinator_name: "c".into(),
            model_name: "m.gguf".into(),
            model_identity: "abcdef0123456789".into(),
            state: "serving".into(),
            workers: vec![
                v1::WorkerStatus {
                    addr: "10.0.0.1:7070".into(),
                    node_name: "a".into(),
                    reachable: true,
                    planned: true,
                    loaded: true,
                    layer_end: 15,
                    embed: true,
                    ram_total_bytes: 16 << 30,
                    ram_free_bytes: 8 << 30,
                    steps: 10,
                    compute_ms_per_step: 1.5,
                    rtt_ms: 0.25,
                    next_stage: "10.0.0.2:7070".into(),
                    next_stage_rtt_ms: 0.5,
                    ..Default::default()
                },
                v1::WorkerStatus {
                    addr: "10.0.0.2:7070".into(),
                    planned: true,
                    stage: 1,
                    layer_start: 15,
                    layer_end: 30,
                    head: true,
                    error: "connection refused".into(),
                    ..Default::default()
                },
            ],
        };
        let t = table(&st);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("m.gguf") && lines[1].contains("serving"), "{t}");
        assert!(lines[3].contains("10.0.0.1:7070 (a)") && lines[3].contains("[0, 15) +embed"), "{t}");
        assert!(lines[3].contains("8.0/16.0 GiB") && lines[3].contains("1.50"), "{t}");
        assert!(lines[4].contains("[15, 30) +head") && lines[4].contains("unreachable"), "{t}");
        assert!(t.contains("10.0.0.2:7070: unreachable: connection refused"), "{t}");
        let j = to_json(&st);
        assert_eq!(j["workers"][1]["layer_start"], 15);
        assert_eq!(j["state"], "serving");
    }
}
