//! shoal-coordinator: the coordinator library behind the `shoal` command line.
//!
//! Owns the cluster side of shoal: the planner, the pipeline client and generation loop over
//! `shoal.v1`, and local cluster mode (worker processes on loopback). It talks to workers
//! only through `shoal-proto`; it must not call `shoal-worker` code (the `shoal worker`
//! subcommand merely hosts it in the same binary).

pub mod api;
pub mod cluster;
pub mod jobs;
pub mod metrics;
