//! Routed experts across processes: the expert host (a worker that holds only the routed
//! experts of some layers and serves `RunExperts`), and the stage's client for it.
//!
//! The stage keeps the router: per MoE layer per step it sends the batch's FFN-normalized
//! hidden states and each token's chosen (expert, weight) pairs in one call, and gets each
//! token's weighted expert output back, both in the cluster's activation codec. The host runs
//! [`shoal_model::executor::run_experts`], the very code a stage runs for local experts, so
//! with f32 activations where the experts live changes no bit.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_kernels::ThreadPool;
use shoal_kernels::codec::{self, Codec};
use shoal_model::executor::{ExpertScratch, RemoteExperts, run_experts};
use shoal_model::weights::Weights;
use shoal_proto::security::Channel;
use shoal_proto::v1::{self, worker_client::WorkerClient};

use crate::error::{Error, Result};

/// Longest wait for one `RunExperts` answer.
const EXPERT_TIMEOUT: Duration = Duration::from_secs(600);

/// A loaded expert host: the layers' weights (only the experts are ever read) and the
/// threads that run them, one call at a time.
pub struct ExpertHost {
    weights: Arc<Weights>,
    work: Mutex<(ThreadPool, ExpertScratch, Vec<f32>, Vec<f32>)>,
}

impl std::fmt::Debug for ExpertHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertHost").field("layers", &self.weights.spec.layers).finish()
    }
}

impl ExpertHost {
    pub fn new(weights: Arc<Weights>, n_threads: usize) -> Result<ExpertHost> {
        if weights.config.moe.is_none() {
            return Err(Error::InvalidFrame("this model has no routed experts: nothing to host".into()));
        }
        Ok(ExpertHost { weights, work: Mutex::new((ThreadPool::new(n_threads), ExpertScratch::default(), Vec::new(), Vec::new())) })
    }

    /// The layers it hosts.
    pub fn layers(&self) -> std::ops::Range<usize> {
        self.weights.spec.layers.clone()
    }

    /// Runs one request (blocking: call it off the async runtime).
    pub fn run(&self, r: v1::ExpertRequest) -> Result<v1::ExpertReply> {
        let w = &self.weights;
        let layer = r.layer as usize;
        let Some(lw) = layer.checked_sub(w.spec.layers.start).and_then(|i| w.layers.get(i)) else {
            return Err(Error::InvalidFrame(format!("layer {layer} is not hosted here (layers {:?})", w.spec.layers)));
        };
        let moe = lw.moe.as_ref().ok_or_else(|| Error::InvalidFrame(format!("layer {layer} has no routed experts")))?;
        let xn = r.xn.ok_or_else(|| Error::InvalidFrame("no hidden states".into()))?;
        let codec = crate::service::codec_of(xn.dtype)?;
        let (n, e) = (xn.n_tokens as usize, xn.dim as usize);
        if e != w.config.n_embd {
            return Err(Error::InvalidFrame(format!("hidden states of width {e}, the model's is {}", w.config.n_embd)));
        }
        if n == 0 || n > crate::service::MAX_FRAME_TOKENS {
            return Err(Error::InvalidFrame(format!("{n} tokens (1 to {})", crate::service::MAX_FRAME_TOKENS)));
        }
        let k = moe.n_used;
        if r.experts.len() != n * k || r.weights.len() != n * k {
            return Err(Error::InvalidFrame(format!(
                "{} experts and {} weights for {n} tokens × {k} experts each",
                r.experts.len(),
                r.weights.len()
            )));
        }
        let mut chosen = Vec::with_capacity(n * k);
        for (&x, &wt) in r.experts.iter().zip(&r.weights) {
            if x as usize >= moe.n_expert || !wt.is_finite() {
                return Err(Error::InvalidFrame(format!("expert {x} with weight {wt} (the layer has {} experts)", moe.n_expert)));
            }
            chosen.push((x as usize, wt));
        }
        let mut guard = self.work.lock().unwrap_or_else(|p| p.into_inner());
        let (pool, scratch, xs, out) = &mut *guard;
        codec::decode(codec, &xn.data, n, e, xs)?;
        out.clear();
        out.resize(n * e, 0.0);
        run_experts(pool, w, lw, moe, xs, n, &chosen, out, scratch);
        pool.park();
        let mut data = Vec::new();
        codec::encode(codec, out, n, e, &mut data)?;
        Ok(v1::ExpertReply {
            out: Some(v1::Activations { dtype: crate::service::dtype_of(codec) as i32, n_tokens: n as u32, dim: e as u32, data }),
        })
    }
}

/// A stage's handle on its expert host; used from the compute thread, which blocks on the
/// async runtime for each call.
pub struct RemoteClient {
    addr: String,
    codec: Codec,
    rt: tokio::runtime::Handle,
    client: Option<WorkerClient<Channel>>,
    enc: Vec<u8>,
    dec: Vec<f32>,
}

impl RemoteClient {
    pub fn new(addr: String, codec: Codec, rt: tokio::runtime::Handle) -> RemoteClient {
        RemoteClient { addr, codec, rt, client: None, enc: Vec::new(), dec: Vec::new() }
    }

    fn call(&mut self, req: v1::ExpertRequest) -> std::result::Result<v1::ExpertReply, String> {
        let addr = self.addr.clone();
        let client = match &mut self.client {
            Some(c) => c,
            None => {
                let ch = self.rt.block_on(crate::service::connect(&addr)).map_err(|e| shoal_proto::error_chain(&e))?;
                self.client.insert(
                    WorkerClient::new(ch)
                        .max_decoding_message_size(shoal_proto::MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(shoal_proto::MAX_MESSAGE_BYTES),
                )
            }
        };
        let mut c = client.clone();
        // The timer must be made inside the runtime: in the async block, not out here.
        match self.rt.block_on(async move { tokio::time::timeout(EXPERT_TIMEOUT, c.run_experts(req)).await }) {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(format!("{} ({:?})", s.message(), s.code())),
            Err(_) => Err(format!("no answer within {EXPERT_TIMEOUT:?}")),
        }
    }
}

impl RemoteExperts for RemoteClient {
    fn run(&mut self, layer: usize, xn: &[f32], n: usize, chosen: &[(usize, f32)], out: &mut [f32]) -> shoal_model::Result<()> {
        let addr = self.addr.clone();
        let fail = |msg: String| shoal_model::Error::ExpertHost { addr: addr.clone(), msg };
        let e = xn.len() / n.max(1);
        codec::encode(self.codec, xn, n, e, &mut self.enc).map_err(|e| fail(e.to_string()))?;
        let req = v1::ExpertRequest {
            layer: layer as u32,
            xn: Some(v1::Activations {
                dtype: crate::service::dtype_of(self.codec) as i32,
                n_tokens: n as u32,
                dim: e as u32,
                data: std::mem::take(&mut self.enc),
            }),
            experts: chosen.iter().map(|c| c.0 as u32).collect(),
            weights: chosen.iter().map(|c| c.1).collect(),
        };
        let reply = self.call(req).map_err(fail)?;
        let o = reply.out.ok_or_else(|| fail("an answer without outputs".into()))?;
        if o.n_tokens as usize != n || o.dim as usize != e || crate::service::codec_of(o.dtype).ok() != Some(self.codec) {
            return Err(fail(format!("an answer of {} × {} for {n} × {e}", o.n_tokens, o.dim)));
        }
        codec::decode(self.codec, &o.data, n, e, &mut self.dec).map_err(|e| fail(e.to_string()))?;
        out[..n * e].copy_from_slice(&self.dec[..n * e]);
        Ok(())
    }
}

/// The expert host of a worker, if it was loaded as one.
pub type Slot = Mutex<Option<Arc<ExpertHost>>>;
