//! Errors of the model crate: one enum, structured fields, no wildcard classification.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The inner errors are named `error`, not `source`: the message already includes them,
    // and a `source` would print twice in an error chain.
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{}: {error}", path.display())]
    Gguf { path: PathBuf, error: crate::gguf::GgufError },
    #[error("missing metadata key {0:?}")]
    MissingMetadata(String),
    #[error("metadata key {key:?}: {msg}")]
    Metadata { key: String, msg: String },
    #[error("unsupported model architecture {0:?} (supported: {supported})", supported = crate::arch::SUPPORTED.join(", "))]
    UnsupportedArchitecture(String),
    #[error("tensor {name:?}: type {ty} is not supported by shoal's kernels")]
    UnsupportedTensorType { name: String, ty: shoal_kernels::GgmlType },
    #[error("missing tensor {0:?}")]
    MissingTensor(String),
    #[error("tensor {name:?}: shape {got:?}, expected {want:?}")]
    TensorShape { name: String, got: Vec<u64>, want: Vec<u64> },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("sequence {0} is unknown to this shard")]
    UnknownSequence(u64),
    #[error("context full: sequence {seq} would reach {want} positions, limit {limit}")]
    ContextFull { seq: u64, want: usize, limit: usize },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Kernel(#[from] shoal_kernels::Error),
    /// The expert host that runs this shard's routed experts failed or cannot be reached.
    #[error("expert host {addr}: {msg}")]
    ExpertHost { addr: String, msg: String },
    /// A rank of this stage's tensor-parallel group failed or cannot be reached.
    #[error("tensor-parallel group: {0}")]
    Collective(String),
    /// The GPU path failed (no device, out of device memory, a kernel launch error).
    #[error("GPU: {0}")]
    Gpu(String),
}

impl Error {
    /// Whether the same call could succeed later. Named per variant, so a new variant forces
    /// a decision.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io { .. } | Error::ExpertHost { .. } | Error::Collective(_) => true,
            Error::ContextFull { .. } => false,
            Error::Gguf { .. }
            | Error::MissingMetadata(_)
            | Error::Metadata { .. }
            | Error::UnsupportedArchitecture(_)
            | Error::UnsupportedTensorType { .. }
            | Error::MissingTensor(_)
            | Error::TensorShape { .. }
            | Error::Tokenizer(_)
            | Error::ChatTemplate(_)
            | Error::UnknownSequence(_)
            | Error::InvalidRequest(_)
            | Error::Kernel(_)
            | Error::Gpu(_) => false,
        }
    }
}
