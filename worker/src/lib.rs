//! shoal-worker: the worker daemon that holds a shard of the model.
//!
//! A worker loads only its shard's tensors from its own copy of the model file (memory-mapped,
//! from its models dir), owns the KV cache of its layers and runs forward steps for batches of
//! sequences on one compute thread ([`compute`]). Its gRPC service ([`service`]) streams the
//! output hidden states straight to the next stage; the last stage samples and only token ids
//! travel back. It must not depend on `shoal-coordinator`: the two meet only through
//! `shoal-proto`.

pub mod collective;
pub mod compute;
pub mod error;
pub mod experts;
pub mod inventory;
pub mod join;
pub mod service;

pub use error::{Error, Result};
pub use service::{WorkerConfig, WorkerService, serve};
