//! shoal-worker: the worker daemon that holds a shard of the model.
//!
//! A worker loads only its shard's tensors from its own copy of the model file, owns the KV
//! cache of its layers and runs forward steps for batches of sequences. It must not depend on
//! `shoal-coordinator`: the two meet only through `shoal-proto`.
