//! The coordinator's side of the pipeline-parallel cluster.
//!
//! [`pipeline`] connects to the workers over `shoal.v1` (Hello, Inventory with measured
//! kernel speeds, LoadShard) and places the model on them with `shoal-planner`, [`scheduler`] runs the generation loop
//! (one Forward stream into the first stage, micro-batches in flight), [`registry`] is the
//! `shoal.v1.Coordinator` service workers join, and [`local`] starts worker processes on
//! loopback for `--workers N`. Workers are reached only over the network; from
//! `shoal-worker` this module reuses just the channel settings (`service::connect`) and the
//! wire form of sampling parameters (`service::params_to_wire`), so both ends agree.

pub mod local;
pub mod etcd;
pub mod pipeline;
pub mod recovery;
pub mod registry;
pub mod scheduler;

pub type Result<T> = std::result::Result<T, Error>;

/// Errors of the cluster side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start a worker: {0}")]
    Spawn(String),
    #[error("cannot reach worker {addr}: {msg}")]
    Connect { addr: String, msg: String },
    #[error("worker {addr} refused the handshake: {msg}")]
    Refused { addr: String, msg: String },
    #[error("planning: {0}")]
    Plan(String),
    #[error("worker {addr} could not load its shard: {msg}")]
    Load { addr: String, msg: String },
    #[error("pipeline failed: {0}")]
    Stage(String),
    /// A stage refused a step (bad frame, KV budget): the pipeline is fine, the step is not.
    #[error("pipeline refused the step: {0}")]
    StageRefused(String),
    #[error("no answer from the pipeline within {0:?}")]
    Timeout(std::time::Duration),
    #[error("{have} of {want} workers joined within {waited:?}")]
    NotEnoughWorkers { have: usize, want: usize, waited: std::time::Duration },
    #[error("serving the coordinator's gRPC: {0}")]
    Serve(String),
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Model(#[from] shoal_model::Error),
}

impl Error {
    /// Whether the same call could succeed later. Named per variant.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Stage(_) | Error::Timeout(_) | Error::NotEnoughWorkers { .. } | Error::Busy(_) => true,
            Error::Serve(_) => false,
            Error::Model(e) => e.is_retryable(),
            Error::Spawn(_) | Error::Refused { .. } | Error::Plan(_) | Error::Load { .. } | Error::StageRefused(_) => false,
        }
    }
}
