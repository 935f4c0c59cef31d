//! shoal-model: everything about a model that is not raw compute.
//!
//! Owns GGUF reading (memory-mapped, zero-copy, every extent checked), the tokenizer and chat
//! template from GGUF metadata, the architectures, sampling, and the shard executor that runs
//! layers [a, b) for a batch of sequences. It must not know about the network or processes.

pub mod error;
pub mod gguf;
pub mod arch;
pub mod chat;
pub mod sampling;
pub mod tokenizer;
pub mod weights;
pub mod engine;
pub mod executor;
pub mod tp;
#[cfg(feature = "cuda")]
pub mod gpu;

pub use error::{Error, Result};
