//! shoal-planner: will the model fit, where does each piece go, and how fast will it be.
//!
//! - [`model`]: a model's tensors from a GGUF header or the built-in [`catalog`].
//! - [`cluster`]: hosts, devices and links, from a TOML file or live worker inventories.
//! - [`cost`]: the memory model and the roofline that predicts a stage's step time.
//! - [`place`]: the exact optimizer over stage order and split points.
//! - [`report`]: the table `shoal plan` prints and its JSON.
//!
//! Planning needs no weights and no network; the coordinator serves the plan it returns.

pub mod catalog;
pub mod cluster;
pub mod cost;
pub mod model;
pub mod place;
pub mod report;

pub use cluster::Cluster;
pub use cost::Workload;
pub use model::{ModelDesc, Role, TensorDesc};
pub use place::{NoFit, Plan, Search, plan};

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("model: {0}")]
    Model(String),
    #[error("cluster: {0}")]
    Cluster(String),
    #[error("{0}")]
    Catalog(String),
    #[error("{0}")]
    NoFit(Box<place::NoFit>),
}
