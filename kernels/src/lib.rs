//! shoal-kernels: the compute of shoal.
//!
//! Owns the GGUF block formats (dequantization, quantized dot products), matrix×vector and
//! matrix×matrix over quantized weights, RMSNorm, RoPE, SwiGLU, softmax and attention over a
//! KV cache, and the thread pool they run on. Every SIMD path (AVX-512, AVX2/FMA) has a
//! portable scalar twin that tests compare it with; the path is chosen at run time.
//!
//! This crate must not know about models, files or the network: it sees slices and shapes.

pub mod cpu;
pub mod error;
pub mod matmul;
pub mod ops;
pub mod attention;
pub mod codec;
pub mod pool;
pub mod quant;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use error::{Error, Result};
pub use pool::ThreadPool;
pub use quant::GgmlType;
