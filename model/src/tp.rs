//! Tensor parallelism inside a stage: G ranks each hold 1/G of every layer and together
//! compute what one executor would.
//!
//! Rank `r` of `G` holds (see [`TpSlice`]):
//! - a contiguous range of the KV-head groups, with the query heads that read them: rows of
//!   `wq`/`wk`/`wv` (and their biases) and the matching *columns* of `wo`;
//! - a contiguous range of the dense FFN's hidden columns: rows of `w_gate`/`w_up`, columns
//!   of `w_down`, cut at `w_down`'s quantization blocks;
//! - in MoE layers, a contiguous range of the routed experts (expert parallelism: the router
//!   runs on every rank, each rank runs the chosen experts it owns).
//!
//! Each rank's `wo` and `w_down` products are partial sums of the full product, so the block
//! outputs are summed over the ranks by an all-reduce ([`Collective::all_reduce`]), twice
//! per layer. Everything else (embedding, norms, residual stream, router) is replicated and
//! computed by every rank on identical bits, because the all-reduce gives every rank the
//! same sum (summed in rank order). Rank 0 is the *leader*: it is the stage the pipeline
//! sees, it broadcasts each step (and the sequence bookkeeping before it) to the other
//! ranks ([`Collective::broadcast`]), and only it computes the output head.
//!
//! Row slices are views into the mapped file. A column slice that starts and ends on
//! quantization blocks is copied block for block (the same bytes, so the same dot products);
//! one that does not (a K-quant `wo` whose heads are not a multiple of 256 columns) is
//! dequantized to f32.
//!
//! This module knows no network: [`LocalGroup`] is the in-process collective (threads), and
//! the worker crate has one over TCP between processes.

use std::ops::Range;
use std::sync::{Arc, Barrier, Mutex};

use crate::arch::Config;
use crate::executor::{SeqChunk, StageInput};
use crate::{Error, Result};

/// The communication a tensor-parallel group needs. `rank` 0 is the leader.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Sums `buf` over all ranks (in rank order, so every rank gets the same bits) and
    /// leaves the sum in every rank's `buf`. Every rank passes the same length.
    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Rank 0's `msg` to every rank: the others' `msg` is replaced by it.
    fn broadcast(&mut self, msg: &mut Vec<u8>) -> Result<()>;
}

/// How a group splits the block outputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TpMode {
    /// Each rank computes whole rows of `wo` and `w_down` (`rows` of the hidden size) from
    /// the whole attention output and FFN activation, gathered first. Every dot product is
    /// the one a single executor computes, so a group's output equals TP = 1 bit for bit.
    /// Four collectives per layer, two of them of the attention/FFN width.
    #[default]
    Exact,
    /// Megatron-style: each rank multiplies its own columns of `wo` and `w_down`, and the
    /// partial products are summed: two all-reduces of the hidden size per layer, but the
    /// sums round differently from one matmul (within float noise of TP = 1; with quantized
    /// activations a flipped rounding can move a logit noticeably).
    Sum,
}

impl std::str::FromStr for TpMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "exact" => Ok(TpMode::Exact),
            "sum" => Ok(TpMode::Sum),
            _ => Err(format!("unknown tensor-parallel mode {s:?} (exact or sum)")),
        }
    }
}

/// Which part of every layer one rank holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpSlice {
    pub rank: usize,
    pub size: usize,
    pub mode: TpMode,
    /// [`TpMode::Exact`]: the rows of `wo` and `w_down` (outputs of the hidden size).
    pub rows: Range<usize>,
    /// KV heads (each with its `n_head / n_head_kv` query heads).
    pub kv_heads: Range<usize>,
    /// Hidden columns of the dense FFN.
    pub ff: Range<usize>,
    /// Routed experts (MoE layers).
    pub experts: Range<usize>,
}

/// The `rank`-th of `size` near-equal contiguous parts of `0..n` (the first `n % size`
/// parts one longer).
pub fn split(n: usize, size: usize, rank: usize) -> Range<usize> {
    let (q, r) = (n / size, n % size);
    let start = rank * q + rank.min(r);
    start..start + q + usize::from(rank < r)
}

impl TpSlice {
    /// Rank `rank` of `size` over `c`, with FFN columns cut in units of `ff_unit` (the
    /// block size of `w_down`'s type).
    pub fn new(c: &Config, rank: usize, size: usize, mode: TpMode, ff_unit: usize) -> Result<TpSlice> {
        if size == 0 || rank >= size {
            return Err(Error::InvalidRequest(format!("tensor-parallel rank {rank} of {size}")));
        }
        if size > c.n_head_kv.max(1) * 8 || size > 64 {
            return Err(Error::InvalidRequest(format!(
                "tensor-parallel size {size} is too large for {} KV heads",
                c.n_head_kv
            )));
        }
        // Exact mode cuts rows only: any FFN column is a row of `w_gate`/`w_up`.
        let unit = if mode == TpMode::Exact { 1 } else { ff_unit.max(1) };
        if !c.n_ff.is_multiple_of(unit) {
            return Err(Error::InvalidRequest(format!("FFN width {} is not a multiple of {unit}", c.n_ff)));
        }
        let f = split(c.n_ff / unit, size, rank);
        Ok(TpSlice {
            rank,
            size,
            mode,
            rows: split(c.n_embd, size, rank),
            kv_heads: split(c.n_head_kv, size, rank),
            ff: f.start * unit..f.end * unit,
            experts: split(c.moe.map_or(0, |m| m.n_expert), size, rank),
        })
    }

    /// Query heads of this rank.
    pub fn heads(&self, c: &Config) -> Range<usize> {
        let g = c.n_head / c.n_head_kv;
        self.kv_heads.start * g..self.kv_heads.end * g
    }
}

/// What the leader tells the other ranks, in order, before a step (the wire format is in
/// docs/protocol.md, "The group link").
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Add(u64),
    Release(u64),
    Truncate(u64, usize),
    Forward(Vec<SeqChunk>, OwnedInput),
    /// The group ends (the leader's executor is dropped).
    Stop,
}

#[derive(Clone, Debug, PartialEq)]
pub enum OwnedInput {
    Tokens(Vec<u32>),
    Hidden(Vec<f32>),
}

impl OwnedInput {
    pub fn as_input(&self) -> StageInput<'_> {
        match self {
            OwnedInput::Tokens(t) => StageInput::Tokens(t),
            OwnedInput::Hidden(h) => StageInput::Hidden(h),
        }
    }
}

// Wire tags of the ops.
const ADD: u8 = 1;
const RELEASE: u8 = 2;
const TRUNCATE: u8 = 3;
const FORWARD: u8 = 4;
const STOP: u8 = 5;

/// Appends `op` to `out` (little-endian, length-prefixed arrays).
pub fn encode(op: &Op, out: &mut Vec<u8>) {
    let u64_ = |out: &mut Vec<u8>, v: u64| out.extend_from_slice(&v.to_le_bytes());
    match op {
        Op::Add(s) => {
            out.push(ADD);
            u64_(out, *s);
        }
        Op::Release(s) => {
            out.push(RELEASE);
            u64_(out, *s);
        }
        Op::Truncate(s, n) => {
            out.push(TRUNCATE);
            u64_(out, *s);
            u64_(out, *n as u64);
        }
        Op::Forward(chunks, input) => encode_forward(chunks, input.as_input(), out),
        Op::Stop => out.push(STOP),
    }
}

/// Appends a forward op for `chunks` and `input` to `out` (what `encode` writes for
/// `Op::Forward`, without copying the input first).
pub fn encode_forward(chunks: &[SeqChunk], input: StageInput<'_>, out: &mut Vec<u8>) {
    let u64_ = |out: &mut Vec<u8>, v: u64| out.extend_from_slice(&v.to_le_bytes());
    out.push(FORWARD);
    u64_(out, chunks.len() as u64);
    for ch in chunks {
        u64_(out, ch.seq);
        u64_(out, ch.n_tokens as u64);
    }
    match input {
        StageInput::Tokens(t) => {
            out.push(0);
            u64_(out, t.len() as u64);
            t.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        StageInput::Hidden(h) => {
            out.push(1);
            u64_(out, h.len() as u64);
            h.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
    }
}

/// Reads the ops of a message; a malformed message is an error, never a panic.
pub fn decode(mut b: &[u8]) -> Result<Vec<Op>> {
    let bad = |what: &str| Error::Collective(format!("malformed step message: {what}"));
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Some(h)
    }
    let u64_ = |b: &mut &[u8]| take(b, 8).map(|x| u64::from_le_bytes(x.try_into().expect("8 bytes")));
    let mut ops = Vec::new();
    while let Some(&tag) = b.first() {
        b = &b[1..];
        let op = match tag {
            ADD => Op::Add(u64_(&mut b).ok_or_else(|| bad("add"))?),
            RELEASE => Op::Release(u64_(&mut b).ok_or_else(|| bad("release"))?),
            TRUNCATE => {
                let s = u64_(&mut b).ok_or_else(|| bad("truncate"))?;
                Op::Truncate(s, u64_(&mut b).ok_or_else(|| bad("truncate"))? as usize)
            }
            FORWARD => {
                let n = u64_(&mut b).ok_or_else(|| bad("chunks"))? as usize;
                if n > b.len() / 16 {
                    return Err(bad("chunk count"));
                }
                let mut chunks = Vec::with_capacity(n);
                for _ in 0..n {
                    let seq = u64_(&mut b).ok_or_else(|| bad("chunk"))?;
                    let n_tokens = u64_(&mut b).ok_or_else(|| bad("chunk"))? as usize;
                    chunks.push(SeqChunk { seq, n_tokens });
                }
                let kind = take(&mut b, 1).ok_or_else(|| bad("input"))?[0];
                let len = u64_(&mut b).ok_or_else(|| bad("input"))? as usize;
                let bytes = take(&mut b, len.checked_mul(4).ok_or_else(|| bad("input length"))?)
                    .ok_or_else(|| bad("input"))?;
                let words = bytes.chunks_exact(4).map(|x| <[u8; 4]>::try_from(x).expect("4 bytes"));
                let input = match kind {
                    0 => OwnedInput::Tokens(words.map(u32::from_le_bytes).collect()),
                    1 => OwnedInput::Hidden(words.map(f32::from_le_bytes).collect()),
                    _ => return Err(bad("input kind")),
                };
                Op::Forward(chunks, input)
            }
            STOP => Op::Stop,
            t => return Err(bad(&format!("tag {t}"))),
        };
        ops.push(op);
    }
    Ok(ops)
}

/// Shared state of an in-process group.
struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f32>>>,
    msg: Mutex<Vec<u8>>,
}

/// The in-process collective: `size` ranks on threads of one process, meeting at a barrier.
/// Each rank sums the others' buffers itself, in rank order. A barrier has no timeout: a
/// rank that stops calling leaves the others waiting, so every rank must run every step
/// (as `ShardExecutor::follow` does until the leader's stop).
pub struct LocalGroup {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    /// The `size` members of a new group, rank 0 first; give each to its own thread.
    pub fn new(size: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(Shared {
            barrier: Barrier::new(size),
            slots: Mutex::new(vec![Vec::new(); size]),
            msg: Mutex::new(Vec::new()),
        });
        (0..size).map(|rank| LocalGroup { rank, size, shared: Arc::clone(&shared) }).collect()
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<()> {
        {
            let mut slots = self.shared.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots[self.rank].clear();
            slots[self.rank].extend_from_slice(buf);
        }
        self.shared.barrier.wait();
        {
            let slots = self.shared.slots.lock().unwrap_or_else(|p| p.into_inner());
            if slots.iter().any(|s| s.len() != buf.len()) {
                return Err(Error::Collective("ranks reduced buffers of different lengths".into()));
            }
            sum_in_rank_order(slots.iter().map(|s| s.as_slice()), buf);
        }
        // Nobody refills a slot before every rank has read them all.
        self.shared.barrier.wait();
        Ok(())
    }

    fn broadcast(&mut self, msg: &mut Vec<u8>) -> Result<()> {
        if self.rank == 0 {
            *self.shared.msg.lock().unwrap_or_else(|p| p.into_inner()) = msg.clone();
        }
        self.shared.barrier.wait();
        if self.rank != 0 {
            msg.clone_from(&self.shared.msg.lock().unwrap_or_else(|p| p.into_inner()));
        }
        self.shared.barrier.wait();
        Ok(())
    }
}

/// `out = parts[0] + parts[1] + ...`, element by element, in that order: the one summation
/// order every collective uses, so where the ranks run changes no bit.
pub fn sum_in_rank_order<'a>(mut parts: impl Iterator<Item = &'a [f32]>, out: &mut [f32]) {
    match parts.next() {
        Some(first) => out.copy_from_slice(first),
        None => return,
    }
    for p in parts {
        out.iter_mut().zip(p).for_each(|(o, &v)| *o += v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_every_unit_once_and_evenly() {
        for n in 0..20 {
            for size in 1..6 {
                let parts: Vec<_> = (0..size).map(|r| split(n, size, r)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[size - 1].end, n);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() <= w[1].len() + 1);
                }
            }
        }
    }

    #[test]
    fn step_messages_round_trip_and_bad_ones_are_errors() {
        let ops = vec![
            Op::Add(7),
            Op::Truncate(7, 3),
            Op::Release(9),
            Op::Forward(vec![SeqChunk { seq: 7, n_tokens: 2 }], OwnedInput::Tokens(vec![1, 2])),
            Op::Forward(vec![SeqChunk { seq: 7, n_tokens: 1 }], OwnedInput::Hidden(vec![0.5, -1.0])),
            Op::Stop,
        ];
        let mut b = Vec::new();
        ops.iter().for_each(|o| encode(o, &mut b));
        assert_eq!(decode(&b).unwrap(), ops);
        // Every truncation of a valid message, and junk, is refused without a panic.
        for cut in 1..b.len() {
            let _ = decode(&b[..cut]);
        }
        assert!(decode(&[9]).is_err());
        assert!(decode(&[FORWARD, 255, 255, 255, 255, 255, 255, 255, 255]).is_err());
    }

    #[test]
    fn local_group_sums_in_rank_order_on_every_rank() {
        let members = LocalGroup::new(3);
        let handles: Vec<_> = members
            .into_iter()
            .map(|mut g| {
                std::thread::spawn(move || {
                    let mut buf = vec![g.rank() as f32 + 0.25; 4];
                    g.all_reduce(&mut buf).unwrap();
                    let mut msg = if g.rank() == 0 { b"step".to_vec() } else { Vec::new() };
                    g.broadcast(&mut msg).unwrap();
                    (buf, msg)
                })
            })
            .collect();
        for h in handles {
            let (buf, msg) = h.join().unwrap();
            assert_eq!(buf, vec![3.75; 4]);
            assert_eq!(msg, b"step");
        }
    }
}
