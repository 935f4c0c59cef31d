//! What the planner knows about a model: every tensor's name, shape, type and bytes, and
//! the few hyper-parameters that size the KV cache and the attention work.
//!
//! Built from a GGUF header (a header-only prefix of the file is enough) or from the
//! built-in [`catalog`](crate::catalog).

use shoal_kernels::GgmlType;
use shoal_model::gguf::Header;

use crate::PlanError;

/// Most blocks a model may have (the largest published models have fewer than 130).
pub const MAX_LAYERS: usize = 1024;

/// What a tensor does, which decides where it may live and how much of it a token reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `token_embd`: one row read per token.
    Embed,
    /// `output` (the head) and `output_norm`.
    Head,
    /// Attention projections, biases and norms of a block (`attn_*`, QK norms).
    Attn,
    /// Dense FFN of a block and its norm (`ffn_gate/up/down`, `ffn_norm`).
    Ffn,
    /// The MoE router (`ffn_gate_inp`).
    Router,
    /// Routed experts stacked in one tensor (`ffn_*_exps`): a token reads `n_expert_used`
    /// of `n_expert` slices.
    Experts,
    /// Shared experts (`ffn_*_shexp`, `ffn_gate_inp_shexp`): read by every token.
    SharedExpert,
}

/// One tensor.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TensorDesc {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous dimension.
    pub dims: Vec<u64>,
    #[serde(serialize_with = "ser_ty")]
    pub ty: GgmlType,
    /// Bytes in the file, from the type's block layout.
    pub bytes: u64,
    /// The block it belongs to (`blk.N.`), if any.
    pub layer: Option<usize>,
    pub role: Role,
}

fn ser_ty<S: serde::Serializer>(ty: &GgmlType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(ty.name())
}

impl TensorDesc {
    /// A tensor of `ty` with `dims`; its bytes come from the block layout.
    pub fn new(name: &str, dims: &[u64], ty: GgmlType) -> Result<TensorDesc, PlanError> {
        let n: u64 = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| PlanError::Model(format!("{name}: shape {dims:?} overflows")))?;
        let bytes = ty.bytes_for(n).ok_or_else(|| {
            PlanError::Model(format!(
                "{name}: {n} elements are not whole {} blocks of {}",
                ty.name(),
                ty.block_size()
            ))
        })?;
        let (layer, role) = classify(name);
        Ok(TensorDesc {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty,
            bytes,
            layer,
            role,
        })
    }

    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Rows of a weight matrix (all experts' rows for stacked experts); 0 for vectors.
    pub fn rows(&self) -> u64 {
        if self.is_matrix() { self.dims[1..].iter().product() } else { 0 }
    }

    /// The matrix shape of a weight matrix (higher dimensions fold into rows).
    pub fn shape(&self) -> Option<MatShape> {
        self.is_matrix().then(|| MatShape { ty: self.ty, rows: self.rows(), cols: self.dims[0] })
    }

    /// Whether this is a weight matrix (2-D or more) rather than a norm or a bias.
    pub fn is_matrix(&self) -> bool {
        self.dims.len() >= 2 && self.dims[1] > 1
    }
}

/// Block index and role from a GGUF tensor name.
pub fn classify(name: &str) -> (Option<usize>, Role) {
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse().ok());
    let role = if name.starts_with("token_embd") {
        Role::Embed
    } else if name.starts_with("output") {
        Role::Head
    } else if name.contains("_shexp") {
        Role::SharedExpert
    } else if name.contains("_exps") {
        Role::Experts
    } else if name.contains("ffn_gate_inp") {
        Role::Router
    } else if name.contains(".ffn") {
        Role::Ffn
    } else {
        Role::Attn
    };
    (layer, role)
}

/// A model as the planner sees it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelDesc {
    /// Catalogue name (`qwen3-235b-a22b:q4_k_m`) or file name.
    pub name: String,
    /// GGUF `general.architecture`.
    pub arch: String,
    pub n_layer: usize,
    pub n_embd: u64,
    pub n_head: u64,
    pub n_head_kv: u64,
    /// Width of one K head and of one V head.
    pub head_dim_k: u64,
    pub head_dim_v: u64,
    pub n_vocab: u64,
    pub n_ctx_train: u64,
    /// Routed experts per MoE layer and how many each token uses (0 and 0: dense).
    pub n_expert: u64,
    pub n_expert_used: u64,
    pub tensors: Vec<TensorDesc>,
}

impl ModelDesc {
    /// Reads the description from a parsed GGUF header. Tensor bytes are computed from the
    /// block formats; the data section need not be present.
    pub fn from_header(name: &str, h: &Header) -> Result<ModelDesc, PlanError> {
        let arch = h
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| PlanError::Model("general.architecture is missing".into()))?
            .to_string();
        let u = |k: &str| h.get(&format!("{arch}.{k}")).and_then(|v| v.as_u64());
        let need = |k: &str| u(k).ok_or_else(|| PlanError::Model(format!("{arch}.{k} is missing")));
        let n_layer = need("block_count")? as usize;
        let n_embd = need("embedding_length")?;
        let n_head = need("attention.head_count")?;
        let n_head_kv = u("attention.head_count_kv").unwrap_or(n_head);
        if n_head == 0 || n_head_kv == 0 {
            return Err(PlanError::Model(
                "attention head counts must be positive".into(),
            ));
        }
        let head_dim_k = u("attention.key_length").unwrap_or(n_embd / n_head);
        let head_dim_v = u("attention.value_length").unwrap_or(head_dim_k);
        let tensors = h
            .tensors
            .iter()
            .map(|t| TensorDesc::new(&t.name, &t.dims, t.ty))
            .collect::<Result<Vec<_>, _>>()?;
        let n_vocab = tensors
            .iter()
            .find(|t| t.name == "token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
            .unwrap_or(0);
        let n_ctx_train = u("context_length").unwrap_or(0);
        let n_expert = u("expert_count").unwrap_or(0);
        let n_expert_used = u("expert_used_count").unwrap_or(0);
        let m = ModelDesc {
            name: name.to_string(),
            arch,
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim_k,
            head_dim_v,
            n_vocab,
            n_ctx_train,
            n_expert,
            n_expert_used,
            tensors,
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks what the planner relies on: blocks numbered below `n_layer`, an embedding,
    /// expert counts that make sense.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.n_layer == 0 || self.n_layer > MAX_LAYERS {
            return Err(PlanError::Model(format!("block_count {} (1 to {MAX_LAYERS})", self.n_layer)));
        }
        if let Some(t) = self
            .tensors
            .iter()
            .find(|t| t.layer.is_some_and(|l| l >= self.n_layer))
        {
            return Err(PlanError::Model(format!(
                "{} is beyond block_count {}",
                t.name, self.n_layer
            )));
        }
        if !self.tensors.iter().any(|t| t.role == Role::Embed) {
            return Err(PlanError::Model(
                "the model has no token_embd tensor".into(),
            ));
        }
        if self.n_expert_used > self.n_expert {
            return Err(PlanError::Model(format!(
                "{} experts used of {}",
                self.n_expert_used, self.n_expert
            )));
        }
        Ok(())
    }

    /// Whether the head reuses the embedding (no `output.weight`).
    pub fn tied_head(&self) -> bool {
        !self.tensors.iter().any(|t| t.name == "output.weight")
    }

    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }

    /// Bytes of K and V per token per layer at `kv_type_bytes` bytes per element.
    pub fn kv_bytes_per_token_layer(&self, kv_type_bytes: f64) -> f64 {
        self.n_head_kv as f64 * (self.head_dim_k + self.head_dim_v) as f64 * kv_type_bytes
    }

    /// Fraction of a routed-expert tensor that a batch of `tokens` tokens reads: the expected
    /// share of experts picked by at least one token, assuming uniform routing.
    pub fn expert_read_fraction(&self, tokens: f64) -> f64 {
        if self.n_expert == 0 {
            return 1.0;
        }
        let p = self.n_expert_used as f64 / self.n_expert as f64;
        1.0 - (1.0 - p).powf(tokens.max(1.0))
    }

    /// Per-layer totals, in layer order.
    pub fn layers(&self) -> Vec<LayerDesc> {
        let mut out = vec![LayerDesc::default(); self.n_layer];
        for t in &self.tensors {
            let Some(l) = t.layer else { continue };
            let d = &mut out[l];
            let flops = if t.is_matrix() {
                2.0 * t.n_elements() as f64
            } else {
                0.0
            };
            if t.role == Role::Experts {
                d.experts.add(t.ty, t.bytes, t.rows());
                d.expert_flops += flops;
            } else {
                d.dense.add(t.ty, t.bytes, t.rows());
                d.dense_flops += flops;
                if let Some(m) = t.shape() {
                    d.mats.push(m);
                }
            }
        }
        out
    }

    /// The head's matrices (the embedding's when the head is tied).
    pub fn head_mats(&self) -> Vec<MatShape> {
        let role = if self.tied_head() { Role::Embed } else { Role::Head };
        self.tensors.iter().filter(|t| t.role == role).filter_map(TensorDesc::shape).collect()
    }

    /// Bytes and per-token FLOPs of the embedding and of the head (norm + output matrix; the
    /// embedding when the head is tied).
    pub fn ends(&self) -> Ends {
        let embed = self.tensors.iter().find(|t| t.role == Role::Embed);
        let embed_bytes = embed.map_or(0, |t| t.bytes);
        let row = embed.map_or(0.0, |t| {
            t.bytes as f64 / t.dims.get(1).copied().unwrap_or(1).max(1) as f64
        });
        let mut head_bytes: u64 = self
            .tensors
            .iter()
            .filter(|t| t.role == Role::Head)
            .map(|t| t.bytes)
            .sum();
        let mut head_flops: f64 = self
            .tensors
            .iter()
            .filter(|t| t.role == Role::Head && t.is_matrix())
            .map(|t| 2.0 * t.n_elements() as f64)
            .sum();
        if self.tied_head() {
            head_bytes += embed_bytes;
            head_flops += embed.map_or(0.0, |t| 2.0 * t.n_elements() as f64);
        }
        Ends {
            embed_bytes,
            embed_row_bytes: row,
            head_bytes,
            head_flops,
        }
    }
}

/// One block's weights, split into what every token reads and the routed experts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerDesc {
    /// Attention, norms, dense FFN, router and shared experts.
    pub dense: TypeBytes,
    /// FLOPs per token of `dense`.
    pub dense_flops: f64,
    /// Routed experts, all of them.
    pub experts: TypeBytes,
    /// FLOPs of all experts for one token (a token computes `n_expert_used / n_expert`).
    pub expert_flops: f64,
    /// The matrices of `dense`, in file order: the shapes a live worker times
    /// (`KernelRates::probes`).
    pub mats: Vec<MatShape>,
}

/// A weight matrix as the kernels see it: `rows` outputs of `cols` inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatShape {
    pub ty: GgmlType,
    pub rows: u64,
    pub cols: u64,
}

/// Bytes and matrix rows per tensor type (kernels run at different speeds per type, and
/// each row has a fixed cost).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TypeBytes(pub Vec<TypeShare>);

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TypeShare {
    pub ty: GgmlType,
    pub bytes: u64,
    /// Rows of the matrices (output elements per token); 0 for norms and biases.
    pub rows: u64,
}

impl TypeBytes {
    pub fn add(&mut self, ty: GgmlType, bytes: u64, rows: u64) {
        match self.0.iter_mut().find(|s| s.ty == ty) {
            Some(s) => {
                s.bytes += bytes;
                s.rows += rows;
            }
            None => self.0.push(TypeShare { ty, bytes, rows }),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(|s| s.bytes).sum()
    }
}

/// Sizes of the embedding and the head.
#[derive(Clone, Debug, PartialEq)]
pub struct Ends {
    pub embed_bytes: u64,
    pub embed_row_bytes: f64,
    /// Output norm + output matrix (+ the embedding again when tied).
    pub head_bytes: u64,
    pub head_flops: f64,
}
