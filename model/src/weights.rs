//! The tensors of one shard, as views into the memory-mapped GGUF file.
//!
//! A shard is a layer range `[a, b)` plus, optionally, the token embedding (first stage) and
//! the output norm and head (last stage). Only those tensors are looked up and touched, so a
//! worker holding layers 40..60 of a 70B model never pages in the rest. Large matrices stay in
//! the map (zero-copy); the small per-layer vectors (norm weights, biases) are dequantized to
//! f32 once, since the kernels want them as `&[f32]` and they are a few KB.

use std::ops::Range;
use std::sync::Arc;

use shoal_kernels::GgmlType;
use shoal_kernels::matmul::{QMatrix, dequantize_row};

use crate::arch::Config;
use crate::tp::{TpMode, TpSlice};
use crate::gguf::{GgufFile, TensorInfo};
use crate::{Error, Result};

/// Which part of the model a shard holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardSpec {
    pub layers: Range<usize>,
    /// Holds `token_embd` and so takes token ids as input.
    pub embed: bool,
    /// Holds `output_norm` and `output` and so produces logits.
    pub head: bool,
}

impl ShardSpec {
    /// The whole model in one shard.
    pub fn full(n_layer: usize) -> ShardSpec {
        ShardSpec { layers: 0..n_layer, embed: true, head: true }
    }
}

/// A matrix in the file: `rows` rows of `cols` elements in type `ty`.
#[derive(Clone, Copy, Debug)]
pub struct Matrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    start: usize,
    len: usize,
    /// In [`Weights`]'s own buffers (a tensor-parallel column slice), not in the file.
    owned: Option<usize>,
}

impl Matrix {
    /// Expert `e`'s matrix of a stacked expert tensor of `n_expert` (GGUF `[cols, rows,
    /// n_expert]`, read here as `rows * n_expert` rows): its rows, in place.
    pub fn expert(&self, e: usize, n_expert: usize) -> Matrix {
        let rows = self.rows / n_expert;
        let len = self.len / n_expert;
        Matrix { ty: self.ty, rows, cols: self.cols, start: self.start + e * len, len, owned: self.owned }
    }

    /// Rows `r` of this matrix, in place.
    pub fn rows_range(&self, r: Range<usize>) -> Matrix {
        let row = self.len.checked_div(self.rows).unwrap_or(0);
        Matrix { rows: r.len(), start: self.start + r.start * row, len: r.len() * row, ..*self }
    }
}

/// The router of a layer with routed experts; the experts themselves are the layer's
/// `w_gate` / `w_up` / `w_down`, stacked (see [`Matrix::expert`]).
#[derive(Debug)]
pub struct MoeWeights {
    /// `ffn_gate_inp`: `(n_expert, n_embd)`, one logit per expert.
    pub router: Matrix,
    pub n_expert: usize,
    pub n_used: usize,
}

/// The weights of one decoder block.
#[derive(Debug)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    pub wo: Matrix,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    /// QK-norm weights, `(head_dim,)` each (qwen3).
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    /// Dense: `(n_ff, n_embd)`, `(n_ff, n_embd)`, `(n_embd, n_ff)`. With `moe`, every
    /// expert's, stacked: `n_expert` times as many rows, each expert's rows contiguous.
    pub w_gate: Matrix,
    pub w_up: Matrix,
    pub w_down: Matrix,
    pub moe: Option<MoeWeights>,
}

/// The tensors of one shard of a model.
#[derive(Debug)]
pub struct Weights {
    pub config: Config,
    pub spec: ShardSpec,
    file: Arc<GgufFile>,
    pub embed: Option<Matrix>,
    pub output_norm: Option<Vec<f32>>,
    pub output: Option<Matrix>,
    /// `layers[i]` is layer `spec.layers.start + i`.
    pub layers: Vec<LayerWeights>,
    /// The part of each layer this rank holds, in a tensor-parallel group (see [`crate::tp`]).
    pub tp: Option<TpSlice>,
    /// Column slices of a tensor-parallel rank (`Matrix::owned` indexes here).
    owned: Vec<Vec<u8>>,
}

impl Weights {
    /// Looks up and checks every tensor of `spec` in `file`.
    pub fn load(file: Arc<GgufFile>, spec: ShardSpec) -> Result<Weights> {
        Weights::load_tp(file, spec, None)
    }

    /// [`Weights::load`] for rank `rank` of a tensor-parallel group of `size` (`tp`), which
    /// holds its slice of every layer (see [`crate::tp`]); only rank 0 holds the head.
    pub fn load_tp(file: Arc<GgufFile>, mut spec: ShardSpec, tp: Option<(usize, usize, TpMode)>) -> Result<Weights> {
        if let Some((rank, _, _)) = tp
            && rank != 0
        {
            spec.head = false;
        }
        let config = Config::from_gguf(&file)?;
        if spec.layers.start > spec.layers.end || spec.layers.end > config.n_layer {
            return Err(Error::InvalidRequest(format!(
                "layer range {:?} is outside the model's {} layers",
                spec.layers, config.n_layer
            )));
        }
        let c = &config;
        let (e, q, kv, ff, v) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff, c.n_vocab);
        let mut w = Weights {
            config: config.clone(),
            spec: spec.clone(),
            file: Arc::clone(&file),
            embed: None,
            output_norm: None,
            output: None,
            layers: Vec::new(),
            tp: None,
            owned: Vec::new(),
        };
        if spec.embed {
            w.embed = Some(w.matrix("token_embd.weight", e, v)?);
        }
        if spec.head {
            w.output_norm = Some(w.vector("output_norm.weight", e)?);
            w.output = Some(match file.tensor_info("output.weight") {
                Some(_) => w.matrix("output.weight", e, v)?,
                None => w.matrix("token_embd.weight", e, v)?,
            });
        }
        for il in spec.layers.clone() {
            let n = |s: &str| format!("blk.{il}.{s}");
            let bias = |w: &Weights, s: &str, len| -> Result<Option<Vec<f32>>> {
                if config.traits.qkv_bias { w.vector(&n(s), len).map(Some) } else { Ok(None) }
            };
            let hd = config.head_dim;
            let qk_norm = |w: &Weights, s: &str| -> Result<Option<Vec<f32>>> {
                if config.traits.qk_norm { w.vector(&n(s), hd).map(Some) } else { Ok(None) }
            };
            let (w_gate, w_up, w_down, moe) = match config.moe {
                None => (
                    w.matrix(&n("ffn_gate.weight"), e, ff)?,
                    w.matrix(&n("ffn_up.weight"), e, ff)?,
                    w.matrix(&n("ffn_down.weight"), ff, e)?,
                    None,
                ),
                Some(m) => (
                    w.experts(&n("ffn_gate_exps.weight"), e, m.n_ff, m.n_expert)?,
                    w.experts(&n("ffn_up_exps.weight"), e, m.n_ff, m.n_expert)?,
                    w.experts(&n("ffn_down_exps.weight"), m.n_ff, e, m.n_expert)?,
                    Some(MoeWeights { router: w.matrix(&n("ffn_gate_inp.weight"), e, m.n_expert)?, n_expert: m.n_expert, n_used: m.n_used }),
                ),
            };
            let layer = LayerWeights {
                attn_norm: w.vector(&n("attn_norm.weight"), e)?,
                wq: w.matrix(&n("attn_q.weight"), e, q)?,
                wk: w.matrix(&n("attn_k.weight"), e, kv)?,
                wv: w.matrix(&n("attn_v.weight"), e, kv)?,
                wo: w.matrix(&n("attn_output.weight"), q, e)?,
                bq: bias(&w, "attn_q.bias", q)?,
                bk: bias(&w, "attn_k.bias", kv)?,
                bv: bias(&w, "attn_v.bias", kv)?,
                q_norm: qk_norm(&w, "attn_q_norm.weight")?,
                k_norm: qk_norm(&w, "attn_k_norm.weight")?,
                ffn_norm: w.vector(&n("ffn_norm.weight"), e)?,
                w_gate,
                w_up,
                w_down,
                moe,
            };
            w.layers.push(layer);
        }
        if let Some((rank, size, mode)) = tp
            && size > 1
        {
            w.slice(rank, size, mode)?;
        }
        Ok(w)
    }

    /// Cuts every layer down to rank `rank` of `size`'s part.
    fn slice(&mut self, rank: usize, size: usize, mode: TpMode) -> Result<()> {
        let c = self.config.clone();
        let unit = self.layers.iter().filter(|l| l.moe.is_none()).map(|l| l.w_down.ty.block_size()).max().unwrap_or(1);
        let t = TpSlice::new(&c, rank, size, mode, unit)?;
        let hd = c.head_dim;
        let (q, kv) = (t.heads(&c), t.kv_heads.clone());
        let (q, kv) = (q.start * hd..q.end * hd, kv.start * hd..kv.end * hd);
        let mut layers = std::mem::take(&mut self.layers);
        for l in &mut layers {
            l.wq = l.wq.rows_range(q.clone());
            l.wk = l.wk.rows_range(kv.clone());
            l.wv = l.wv.rows_range(kv.clone());
            l.wo = match mode {
                TpMode::Exact => l.wo.rows_range(t.rows.clone()),
                TpMode::Sum => self.cols(&l.wo, q.clone())?,
            };
            for (b, r) in [(&mut l.bq, &q), (&mut l.bk, &kv), (&mut l.bv, &kv)] {
                if let Some(b) = b {
                    *b = b[r.clone()].to_vec();
                }
            }
            if l.moe.is_none() {
                l.w_gate = l.w_gate.rows_range(t.ff.clone());
                l.w_up = l.w_up.rows_range(t.ff.clone());
                l.w_down = match mode {
                    TpMode::Exact => l.w_down.rows_range(t.rows.clone()),
                    TpMode::Sum => self.cols(&l.w_down, t.ff.clone())?,
                };
            }
        }
        self.layers = layers;
        self.tp = Some(t);
        Ok(())
    }

    /// Columns `r` of `m` as a matrix of this shard's own: block for block when `r` starts
    /// and ends on `m`'s quantization blocks, else dequantized to f32.
    fn cols(&mut self, m: &Matrix, r: Range<usize>) -> Result<Matrix> {
        let (bs, bb) = (m.ty.block_size(), m.ty.type_size());
        let src = self.qmatrix(m);
        let row_bytes = src.row_bytes();
        let (ty, buf) = if r.start.is_multiple_of(bs) && r.end.is_multiple_of(bs) {
            let (a, b) = (r.start / bs * bb, r.end / bs * bb);
            let mut buf = Vec::with_capacity(m.rows * (b - a));
            for row in 0..m.rows {
                buf.extend_from_slice(&src.data[row * row_bytes + a..row * row_bytes + b]);
            }
            (m.ty, buf)
        } else {
            let mut full = vec![0f32; m.cols];
            let mut buf = Vec::with_capacity(m.rows * r.len() * 4);
            for row in 0..m.rows {
                dequantize_row(m.ty, src.row(row), &mut full)?;
                full[r.clone()].iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
            }
            (GgmlType::F32, buf)
        };
        self.owned.push(buf);
        let len = self.owned.last().map_or(0, Vec::len);
        Ok(Matrix { ty, rows: m.rows, cols: r.len(), start: 0, len, owned: Some(self.owned.len() - 1) })
    }

    /// Query heads, KV heads, dense FFN columns and routed experts this shard computes (all
    /// of them, outside a tensor-parallel group).
    pub fn local_dims(&self) -> (usize, usize, usize, Range<usize>) {
        let c = &self.config;
        let n_expert = c.moe.map_or(0, |m| m.n_expert);
        match &self.tp {
            None => (c.n_head, c.n_head_kv, c.n_ff, 0..n_expert),
            Some(t) => (t.heads(c).len(), t.kv_heads.len(), t.ff.len(), t.experts.clone()),
        }
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.file.tensor_info(name).ok_or_else(|| Error::MissingTensor(name.to_string()))
    }

    /// A 2-D tensor of GGUF shape `[cols, rows]`, in a type the kernels support.
    fn matrix(&self, name: &str, cols: usize, rows: usize) -> Result<Matrix> {
        let t = self.info(name)?;
        if t.dims != [cols as u64, rows as u64] {
            return Err(Error::TensorShape {
                name: name.to_string(),
                got: t.dims.clone(),
                want: vec![cols as u64, rows as u64],
            });
        }
        if !t.ty.is_supported() {
            return Err(Error::UnsupportedTensorType { name: name.to_string(), ty: t.ty });
        }
        let start = (self.file.header().data_offset + t.offset) as usize;
        Ok(Matrix { ty: t.ty, rows, cols, start, len: t.size as usize, owned: None })
    }

    /// A stacked expert tensor of GGUF shape `[cols, rows, n_expert]`, as one matrix of
    /// `rows * n_expert` rows (expert `e`: [`Matrix::expert`]).
    fn experts(&self, name: &str, cols: usize, rows: usize, n_expert: usize) -> Result<Matrix> {
        let t = self.info(name)?;
        let want = [cols as u64, rows as u64, n_expert as u64];
        if t.dims != want {
            return Err(Error::TensorShape { name: name.to_string(), got: t.dims.clone(), want: want.to_vec() });
        }
        if !t.ty.is_supported() {
            return Err(Error::UnsupportedTensorType { name: name.to_string(), ty: t.ty });
        }
        let start = (self.file.header().data_offset + t.offset) as usize;
        Ok(Matrix { ty: t.ty, rows: rows * n_expert, cols, start, len: t.size as usize, owned: None })
    }

    /// A 1-D tensor of `len` elements, dequantized to f32.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.info(name)?;
        if t.dims != [len as u64] {
            return Err(Error::TensorShape {
                name: name.to_string(),
                got: t.dims.clone(),
                want: vec![len as u64],
            });
        }
        if !t.ty.is_supported() {
            return Err(Error::UnsupportedTensorType { name: name.to_string(), ty: t.ty });
        }
        let mut out = vec![0f32; len];
        dequantize_row(t.ty, self.file.tensor_data(t), &mut out)?;
        Ok(out)
    }

    /// The kernel view of a matrix. Extents were checked when the file was opened.
    pub fn qmatrix(&self, m: &Matrix) -> QMatrix<'_> {
        let bytes = match m.owned {
            Some(i) => &self.owned[i][..],
            None => self.file.bytes(),
        };
        let data = &bytes[m.start..m.start + m.len];
        QMatrix { ty: m.ty, rows: m.rows, cols: m.cols, data }
    }

    /// The file the shard maps.
    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }

    /// Bytes of weights this shard reads per forward step of one token (the decode roofline
    /// numerator): with routed experts, the router and the chosen experts' share.
    pub fn bytes_per_step(&self) -> u64 {
        let m = |m: &Matrix| m.len as u64;
        let mut b: u64 = self
            .layers
            .iter()
            .map(|l| {
                let ffn = m(&l.w_gate) + m(&l.w_up) + m(&l.w_down);
                let ffn = match &l.moe {
                    None => ffn,
                    // The chosen experts' share, of which a tensor-parallel rank runs the
                    // experts it owns.
                    Some(moe) => {
                        let owned = self.tp.as_ref().map_or(moe.n_expert, |t| t.experts.len()) as u64;
                        m(&moe.router) + ffn / moe.n_expert as u64 * moe.n_used as u64 * owned / moe.n_expert as u64
                    }
                };
                m(&l.wq) + m(&l.wk) + m(&l.wv) + m(&l.wo) + ffn
            })
            .sum();
        if let Some(o) = &self.output {
            b += m(o);
        }
        b
    }
}
