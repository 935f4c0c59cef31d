//! `shoal info`: what is in a model file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use std::fmt::Write as _;

use anyhow::Result;
use shoal_model::arch::Config;
use shoal_model::gguf::GgufFile;

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// Path of the GGUF model file.
    #[arg(long, short)]
    model: PathBuf,
    /// Also print every metadata key.
    #[arg(long)]
    metadata: bool,
}

pub fn run(a: InfoArgs) -> Result<()> {
    let mut o = String::new();
    let f = GgufFile::open(&a.model)?;
    let h = f.header();
    let arch = f.get_str("general.architecture")?.unwrap_or("?");
    let name = f.get_str("general.name")?.unwrap_or("");
    let n_params: u64 = f.tensors().iter().map(|t| t.n_elements()).sum();
    writeln!(o, "file:          {}", a.model.display())?;
    writeln!(o, "name:          {name}")?;
    writeln!(o, "architecture:  {arch}{}", if shoal_model::arch::SUPPORTED.contains(&arch) { "" } else { " (not supported)" })?;
    writeln!(o, "gguf version:  {}", h.version)?;
    writeln!(o, "file size:     {} bytes ({:.1} MiB)", f.file_size(), f.file_size() as f64 / (1 << 20) as f64)?;
    writeln!(o, "parameters:    {} ({:.1} M)", n_params, n_params as f64 / 1e6)?;
    writeln!(o, "tensor bytes:  {}", h.tensor_bytes())?;
    match Config::from_gguf(&f) {
        Ok(c) => writeln!(o, 
            "hparams:       layers {} embd {} ff {} heads {}/{} head_dim {} vocab {} ctx {} rope base {} ({:?}) eps {}",
            c.n_layer, c.n_embd, c.n_ff, c.n_head, c.n_head_kv, c.head_dim, c.n_vocab, c.n_ctx_train,
            c.rope_freq_base, c.traits.rope, c.rms_eps
        )?,
        Err(e) => writeln!(o, "hparams:       unavailable ({e})")?,
    }
    let mut mix: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for t in f.tensors() {
        let m = mix.entry(t.ty.name()).or_default();
        m.0 += 1;
        m.1 += t.size;
    }
    let mix: Vec<String> = mix.iter().map(|(k, (n, b))| format!("{k}: {n} tensors, {:.1} MiB", *b as f64 / (1 << 20) as f64)).collect();
    writeln!(o, "quant mix:     {}", mix.join("; "))?;
    if a.metadata {
        writeln!(o, "\nmetadata:")?;
        for (k, v) in &h.metadata {
            writeln!(o, "  {k} = {v}")?;
        }
    }
    writeln!(o, "\n{:<40} {:<8} {:<24} {:>12}", "tensor", "type", "shape", "bytes")?;
    for t in f.tensors() {
        let shape = format!("{:?}", t.dims);
        writeln!(o, "{:<40} {:<8} {:<24} {:>12}", t.name, t.ty.name(), shape, t.size)?;
    }
    super::print_stdout(&o)
}
