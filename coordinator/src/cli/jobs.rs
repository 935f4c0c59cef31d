//! `shoal jobs`: the batch jobs of a state directory, with their progress, read from disk, so
//! it works whether or not the `shoal serve` that owns the directory is running.

use std::path::PathBuf;

use anyhow::{Context, Result};
use shoal_coordinator::jobs;

#[derive(clap::Args, Debug)]
pub struct JobsArgs {
    /// The state directory of `shoal serve` (default: $XDG_STATE_HOME/shoal, else
    /// ~/.local/state/shoal).
    #[arg(long, env = "SHOAL_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Print JSON (the batch objects of the API) instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: JobsArgs) -> Result<()> {
    let dir = a.state_dir.unwrap_or_else(jobs::default_dir);
    let batches = jobs::read_dir_batches(&dir).with_context(|| format!("reading jobs from {}", dir.display()))?;
    if a.json {
        let v: Vec<serde_json::Value> = batches.iter().map(jobs::Batch::json).collect();
        return super::print_stdout(&format!("{}\n", serde_json::to_string_pretty(&v)?));
    }
    if batches.is_empty() {
        return super::print_stdout(&format!("no batch jobs in {}\n", dir.display()));
    }
    let mut out = format!("{:<30} {:<12} {:>16} {:>7} {:<21} {:<20} {}\n", "ID", "STATUS", "DONE/TOTAL", "FAILED", "ENDPOINT", "CREATED (UTC)", "OUTPUT");
    for b in &batches {
        let done = b.completed + b.failed;
        let pct = if b.total == 0 { 0.0 } else { 100.0 * done as f64 / b.total as f64 };
        out.push_str(&format!(
            "{:<30} {:<12} {:>16} {:>7} {:<21} {:<20} {}\n",
            b.id,
            b.status,
            format!("{done}/{} {pct:.0}%", b.total),
            b.failed,
            b.endpoint,
            utc(b.created_at),
            b.output_file_id.as_deref().unwrap_or("-"),
        ));
    }
    super::print_stdout(&out)
}

/// `YYYY-MM-DD HH:MM:SS` of a Unix time.
fn utc(t: u64) -> String {
    let (y, m, d) = shoal_model::chat::civil_from_days((t / 86400) as i64);
    let secs = t % 86400;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(super::utc(1_795_000_000), "2026-11-18 11:06:40");
    }
}
