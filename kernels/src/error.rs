//! Errors of the kernels crate.

/// What can go wrong when a kernel is handed data it cannot work with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown ggml type id {0}")]
    UnknownType(u32),
    #[error("ggml type {0} is not supported by shoal's kernels")]
    UnsupportedType(&'static str),
    #[error("row length {cols} is not a multiple of the block size {block} of {ty}")]
    BadRowLength { ty: &'static str, cols: usize, block: usize },
    #[error("buffer of {got} bytes where {want} were expected ({what})")]
    BadBufferSize { what: &'static str, want: usize, got: usize },
}

impl Error {
    /// Whether retrying the same call could succeed. Kernel errors are about the data, so
    /// none is.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::UnknownType(_)
            | Error::UnsupportedType(_)
            | Error::BadRowLength { .. }
            | Error::BadBufferSize { .. } => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
