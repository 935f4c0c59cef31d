//! Model architectures: hyperparameters from GGUF metadata and per-architecture tensor layout.

/// Architectures shoal can run, as named by `general.architecture`.
pub const SUPPORTED: &[&str] = &["llama", "qwen2"];
