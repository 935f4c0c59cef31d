//! `shoal plan`: will the model fit, where does each piece go, and how fast will it be.
//!
//! The model comes from a GGUF file's header (a header-only prefix of the file is enough) or
//! from the built-in catalogue (`qwen3-235b-a22b:q4_k_m`); the cluster from a TOML file (see
//! `deploy/examples/`) or from a running coordinator, which answers with the plan it serves
//! (or, for another `--ctx`/`--parallel`, the plan it would make on the same workers).

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use shoal_model::gguf::{GgufError, Header};
use shoal_planner::place::{self, Search};
use shoal_planner::{Cluster, ModelDesc, PlanError, Workload, catalog, report};
use shoal_proto::v1::{self, coordinator_client::CoordinatorClient};

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// A GGUF file (only its header is read) or a catalogue name such as
    /// `qwen3-235b-a22b:q4_k_m` (see docs/planner-catalog.md).
    #[arg(long, value_name = "PATH|NAME")]
    model: Option<String>,
    /// A cluster description (TOML; see deploy/examples/).
    #[arg(long, value_name = "FILE", conflicts_with = "coordinator", required_unless_present = "coordinator")]
    cluster: Option<std::path::PathBuf>,
    /// A running coordinator: print the plan it serves (with --ctx/--parallel: the plan it
    /// would make for them on the same workers).
    #[arg(long, value_name = "ADDR")]
    coordinator: Option<String>,
    /// Context length each sequence's KV cache is sized for [default: 4096].
    #[arg(long)]
    ctx: Option<u64>,
    /// Concurrent sequences [default: 1].
    #[arg(long)]
    parallel: Option<u64>,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

/// Exit status when the model does not fit (the report is still printed).
const NO_FIT: i32 = 2;

pub fn run(a: PlanArgs) -> Result<()> {
    if let Some(addr) = &a.coordinator {
        return from_coordinator(addr, &a);
    }
    let spec = a.model.as_deref().context("--model is required with --cluster")?;
    let model = load_model(spec)?;
    let path = a.cluster.as_ref().context("--cluster or --coordinator is required")?;
    let cluster = Cluster::from_toml_file(path)?;
    let w = Workload::new(a.ctx.unwrap_or(4096), a.parallel.unwrap_or(1));
    let search = Search::default();
    match place::plan(&model, &cluster, &w, &search) {
        Ok(p) => {
            place::validate(&p, &model, &cluster).map_err(|e| anyhow::anyhow!("internal error: invalid plan: {e}"))?;
            let text = if a.json { format!("{}\n", serde_json::to_string_pretty(&p)?) } else { report::table(&p) };
            super::print_stdout(&text)
        }
        Err(PlanError::NoFit(mut nf)) => {
            nf.suggestions = place::suggest(&model, &cluster, &w, &search, &catalog::smaller(&model.name));
            let text = if a.json {
                format!("{}\n", serde_json::to_string_pretty(&serde_json::json!({ "fits": false, "model": model.name, "no_fit": nf }))?)
            } else {
                format!("{}: {nf}\n", model.name)
            };
            super::print_stdout(&text)?;
            std::process::exit(NO_FIT);
        }
        Err(e) => Err(e.into()),
    }
}

/// A model description from a GGUF file's header, or from the catalogue when `spec` is not
/// a file.
pub fn load_model(spec: &str) -> Result<ModelDesc> {
    let path = Path::new(spec);
    if !path.exists() {
        return Ok(catalog::lookup(spec)?);
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or(spec);
    let header = read_header(path)?;
    Ok(ModelDesc::from_header(name, &header)?)
}

/// Reads as much of the file as its header needs: 1 MiB, then doubling up to the whole file
/// (a vocabulary of 150k tokens makes a header of several MiB). A header-only prefix of a
/// model (a partial download) is enough.
pub fn read_header(path: &Path) -> Result<Header> {
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut buf = Vec::new();
    let mut want = 1usize << 20;
    loop {
        let have = buf.len();
        (&mut f).take((want - have) as u64).read_to_end(&mut buf).with_context(|| path.display().to_string())?;
        let eof = buf.len() < want;
        match Header::parse(&buf, false) {
            Ok(h) => return Ok(h),
            // Only a header cut short by the prefix is worth reading more for.
            Err(GgufError::Truncated { .. } | GgufError::ImplausibleCount { .. }) if !eof => want = want.saturating_mul(2),
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
        }
    }
}

fn from_coordinator(addr: &str, a: &PlanArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    let reply = rt.block_on(async {
        let unreachable = |msg: String| anyhow::anyhow!("cannot reach the coordinator at {addr}: {msg}");
        let ch = shoal_proto::security::get()
            .endpoint(addr)
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(60))
            .connect()
            .await
            .map_err(|e| unreachable(shoal_proto::error_chain(&e)))?;
        CoordinatorClient::new(shoal_proto::security::with_token(ch))
            .plan(v1::PlanRequest { ctx: a.ctx.unwrap_or(0), parallel: a.parallel.unwrap_or(0) })
            .await
            .map_err(|s| unreachable(format!("{} ({:?})", s.message(), s.code())))
            .map(|r| r.into_inner())
    })?;
    if !reply.error.is_empty() {
        anyhow::bail!("the coordinator at {addr} has no plan: {}", reply.error);
    }
    let plan: serde_json::Value = serde_json::from_str(&reply.plan_json).context("the coordinator's plan is not JSON")?;
    if let Some(m) = &a.model {
        let served = plan["model"].as_str().unwrap_or("");
        let named = Path::new(m).file_name().and_then(|n| n.to_str()).unwrap_or(m);
        if served != named {
            anyhow::bail!("the coordinator at {addr} serves {served}, not {named}");
        }
    }
    let text = if a.json {
        format!("{:#}\n", serde_json::json!({ "serving": reply.serving, "plan": plan }))
    } else {
        let what = if reply.serving { "served by the coordinator" } else { "what-if on the coordinator's workers (not served)" };
        format!("{}({what})\n", reply.table)
    };
    super::print_stdout(&text)
}
