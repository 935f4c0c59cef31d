//! Errors of the worker, and their one conversion to `tonic::Status`.

use tonic::{Code, Status};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("protocol major {peer} is not supported: this worker speaks shoal.v1 {ours}.x")]
    IncompatibleProtocol { peer: u32, ours: u32 },
    #[error("model file {0:?}: {1}")]
    BadModelPath(String, String),
    #[error("model {file:?} has identity {have}, the coordinator expects {want}: the worker's copy differs")]
    HashMismatch { file: String, have: String, want: String },
    #[error("no shard is loaded: call LoadShard first")]
    NotLoaded,
    #[error("invalid frame: {0}")]
    InvalidFrame(String),
    #[error("KV budget of {budget} bytes exceeded: {want} needed")]
    KvBudget { budget: u64, want: u64 },
    #[error("next stage {addr}: {msg}")]
    NextStage { addr: String, msg: String },
    #[error("the compute thread stopped")]
    ComputeGone,
    #[error(transparent)]
    Model(#[from] shoal_model::Error),
    #[error(transparent)]
    Codec(#[from] shoal_kernels::codec::CodecError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Transport(#[from] tonic::transport::Error),
}

impl Error {
    /// Whether the same call could succeed later. Named per variant.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::NextStage { .. } | Error::ComputeGone | Error::Io(_) | Error::Transport(_) => true,
            Error::KvBudget { .. } => true,
            Error::Model(e) => e.is_retryable(),
            Error::IncompatibleProtocol { .. }
            | Error::BadModelPath(..)
            | Error::HashMismatch { .. }
            | Error::NotLoaded
            | Error::InvalidFrame(_)
            | Error::Codec(_) => false,
        }
    }

    fn code(&self) -> Code {
        use shoal_model::Error as M;
        match self {
            Error::IncompatibleProtocol { .. } | Error::NotLoaded | Error::HashMismatch { .. } => {
                Code::FailedPrecondition
            }
            Error::BadModelPath(..) | Error::InvalidFrame(_) | Error::Codec(_) => Code::InvalidArgument,
            Error::KvBudget { .. } => Code::ResourceExhausted,
            Error::NextStage { .. } | Error::ComputeGone | Error::Transport(_) => Code::Unavailable,
            Error::Io(_) => Code::Internal,
            Error::Model(m) => match m {
                M::UnknownSequence(_) | M::InvalidRequest(_) => Code::InvalidArgument,
                M::ContextFull { .. } => Code::ResourceExhausted,
                M::Io { .. } => Code::NotFound,
                M::Gguf { .. }
                | M::MissingMetadata(_)
                | M::Metadata { .. }
                | M::UnsupportedArchitecture(_)
                | M::UnsupportedTensorType { .. }
                | M::MissingTensor(_)
                | M::TensorShape { .. }
                | M::Tokenizer(_)
                | M::ChatTemplate(_) => Code::FailedPrecondition,
                M::Kernel(_) | M::Gpu(_) => Code::Internal,
                // Like a lost next stage: the coordinator forms the pipeline again.
                M::ExpertHost { .. } | M::Collective(_) => Code::Unavailable,
            },
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        Status::new(e.code(), e.to_string())
    }
}
