//! `shoal cert`: the cluster CA and node certificates (see `docs/security.md`).

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Subcommand, Debug)]
pub enum CertCommand {
    /// Create a cluster CA in DIR (`ca.pem`, `ca.key`) and a random join token
    /// (`join-token`). Keep DIR private: whoever has `ca.key` can admit nodes.
    Init {
        #[arg(long, default_value = "shoal-ca")]
        dir: PathBuf,
    },
    /// Issue a certificate for node NAME, signed by the CA in --dir, into --out (default
    /// `shoal-NAME`): `node.pem`, `node.key`, `ca.pem` and `join-token`, the node's
    /// `--tls-dir`.
    Issue {
        name: String,
        #[arg(long, default_value = "shoal-ca")]
        dir: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
        /// Host names or addresses to list in the certificate as well (repeatable).
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
    },
}

pub fn run(c: CertCommand) -> Result<()> {
    match c {
        CertCommand::Init { dir } => {
            shoal_proto::security::init_ca(&dir)?;
            super::print_stdout(&format!(
                "cluster CA in {0}; issue a certificate per node with `shoal cert issue NAME --dir {0}`\n",
                dir.display()
            ))
        }
        CertCommand::Issue { name, dir, out, hosts } => {
            let out = out.unwrap_or_else(|| PathBuf::from(format!("shoal-{name}")));
            shoal_proto::security::issue(&dir, &name, &hosts, &out)?;
            super::print_stdout(&format!("{name}: {}; copy it to the node and pass --tls-dir\n", out.display()))
        }
    }
}
