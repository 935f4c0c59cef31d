//! Placement: which device holds which layers, where the routed experts live, and in what
//! order the stages run, chosen by an exact optimizer.
//!
//! Candidates: every GPU is a unit, every host's CPU is a unit, and a host with ≥ 2 GPUs may
//! instead run them as one tensor-parallel unit. Units are grouped by host (GPUs first, then
//! the CPU); every order of the hosts is tried (up to 7 hosts; beyond that the given order and
//! its reverse) together with each host's TP choice. For each such sequence of units a dynamic
//! program over split points assigns a contiguous (possibly empty) layer range to each unit,
//! the embedding to the first stage and the head to the last. Inside a GPU stage that does not
//! fit, the routed experts of its last layers move to the host's CPU RAM, as few as needed;
//! the host's RAM must hold them plus its own CPU stage.
//!
//! The objective is the predicted time of a decode step for `parallel` sequences run as G
//! micro-batch groups: max(R, G × slowest stage), where R is one group's trip through every
//! stage and link. The DP keeps, per state, the Pareto set of (sum of stage and link times,
//! slowest stage, RAM taken on the host by offloaded experts), which is exact for that
//! objective; G is chosen by trying each value.

use std::ops::Range;

use crate::PlanError;
use crate::cluster::{Cluster, Device, DeviceKind, Link};
use crate::cost::{self, ModelCost, Workload};
use crate::model::{ModelDesc, Role};

/// A device or a tensor-parallel group of one host's GPUs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Unit {
    pub host: usize,
    /// GPU indices on the host; empty: the host's CPU.
    pub gpus: Vec<usize>,
}

impl Unit {
    pub fn is_cpu(&self) -> bool {
        self.gpus.is_empty()
    }

    /// The unit as one device: a TP group has its GPUs' summed memory and bandwidth.
    pub fn device(&self, c: &Cluster) -> Device {
        let h = &c.hosts[self.host];
        if self.gpus.is_empty() {
            return h.cpu.clone();
        }
        let g = self.gpus.len() as f64;
        let gs: Vec<&Device> = self.gpus.iter().map(|&i| &h.gpus[i]).collect();
        let min = |f: &dyn Fn(&Device) -> f64| gs.iter().map(|d| f(d)).fold(f64::MAX, f64::min);
        Device {
            name: if gs.len() == 1 {
                gs[0].name.clone()
            } else {
                format!("{}x {}, TP", gs.len(), gs[0].name)
            },
            kind: DeviceKind::Gpu,
            memory: (min(&|d| d.memory as f64) * g) as u64,
            reserve: gs.iter().map(|d| d.reserve).sum(),
            bandwidth: min(&|d| d.bandwidth) * g,
            flops: min(&|d| d.flops) * g,
            layer_overhead_s: min(&|d| d.layer_overhead_s),
            rates: None,
        }
    }

    pub fn label(&self, c: &Cluster) -> String {
        let h = &c.hosts[self.host];
        match self.gpus.as_slice() {
            [] => format!("{}/cpu", h.name),
            [g] => format!("{}/gpu{g}", h.name),
            gs => format!("{}/gpu{}-{}", h.name, gs[0], gs[gs.len() - 1]),
        }
    }
}

/// Options of the search.
#[derive(Clone, Debug)]
pub struct Search {
    /// Consider tensor-parallel groups of a host's GPUs.
    pub tensor_parallel: bool,
    /// Consider other host orders than the given one.
    pub reorder: bool,
    /// Every unit must get at least one layer (live clusters: every worker joined to serve).
    pub use_all: bool,
}

impl Default for Search {
    fn default() -> Self {
        Search {
            tensor_parallel: true,
            reorder: true,
            use_all: false,
        }
    }
}

/// One pipeline stage of a plan.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Stage {
    pub unit: Unit,
    pub label: String,
    pub device: String,
    pub layers: Range<usize>,
    pub embed: bool,
    pub head: bool,
    /// Layers whose routed experts live in the host's CPU RAM instead.
    pub offloaded: Range<usize>,
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    pub scratch_bytes: u64,
    /// Bytes of the unit's devices the plan may use.
    pub capacity: u64,
    /// Predicted decode time of one micro-batch on this stage (offloaded experts included).
    pub ms_per_step: f64,
    /// Predicted time of one prefill chunk.
    pub prefill_ms: f64,
    /// What limits the stage: "memory bandwidth", "compute", "experts on CPU", "overhead".
    pub bottleneck: String,
}

/// Memory use of a physical device (a CPU's RAM or one GPU).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DeviceUse {
    pub host: String,
    pub device: String,
    pub used: u64,
    pub capacity: u64,
}

/// Where a tensor lives: `host/cpu`, `host/gpu1`, or `host/gpu0-2` (split over a TP group).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Placement {
    pub tensor: String,
    pub bytes: u64,
    pub devices: Vec<String>,
}

/// Predicted speed.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Prediction {
    /// One sequence alone.
    pub decode_tok_s_single: f64,
    /// All `parallel` sequences together.
    pub decode_tok_s: f64,
    /// Time of one decode step of all sequences.
    pub step_ms: f64,
    pub groups: u64,
    pub prefill_tok_s: f64,
    pub bottleneck: String,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Plan {
    pub model: String,
    pub cluster: String,
    pub workload: Workload,
    pub stages: Vec<Stage>,
    pub devices: Vec<DeviceUse>,
    pub prediction: Prediction,
    /// The optimizer's objective (seconds per decode step); equals `prediction.step_ms / 1e3`.
    pub objective_s: f64,
    pub tensors: Vec<Placement>,
}

/// Per-unit prefix sums over layers.
struct UnitTable {
    unit: Unit,
    dev: Device,
    /// Host CPU, for offloaded experts.
    cpu: Device,
    /// Memory with experts resident / without them; offloaded bytes.
    mem_res: Vec<f64>,
    mem_off: Vec<f64>,
    off_bytes: Vec<f64>,
    /// Decode time with experts resident / with them on the CPU (+ PCIe trips).
    t_res: Vec<f64>,
    t_off: Vec<f64>,
    /// Prefill time of one chunk (experts resident / offloaded).
    p_res: Vec<f64>,
    p_off: Vec<f64>,
    has_experts: Vec<bool>,
}

fn prefix(v: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut out = vec![0.0];
    for x in v {
        let last = *out.last().unwrap_or(&0.0);
        out.push(last + x);
    }
    out
}

/// Seconds of the two all-reduces per block of a TP group, for `tokens` rows.
fn allreduce_time(c: &Cluster, u: &Unit, mc: &ModelCost, tokens: f64) -> f64 {
    let g = u.gpus.len() as f64;
    if g < 2.0 {
        return 0.0;
    }
    let bytes = tokens * mc.n_embd * 4.0;
    let pcie = c.hosts[u.host].pcie;
    2.0 * (2.0 * (g - 1.0) * pcie.latency_s + 2.0 * (g - 1.0) / g * bytes / pcie.bandwidth)
}

impl UnitTable {
    fn new(c: &Cluster, mc: &ModelCost, w: &Workload, unit: Unit, batch: f64) -> UnitTable {
        let dev = unit.device(c);
        let cpu = c.hosts[unit.host].cpu.clone();
        let pcie = c.hosts[unit.host].pcie;
        let kv = mc.kv_layer(w);
        let chunk = w.prefill_chunk.min(w.ctx).max(1) as f64;
        let ar = allreduce_time(c, &unit, mc, batch);
        let ar_p = allreduce_time(c, &unit, mc, chunk);
        let offload_trip = |tokens: f64| 2.0 * pcie.time(tokens * mc.n_embd * 4.0);
        let ls = &mc.layers;
        let can_off = !unit.is_cpu();
        UnitTable {
            mem_res: prefix(
                ls.iter()
                    .map(|l| (l.dense.total() + l.experts.total()) as f64 + kv),
            ),
            mem_off: prefix(ls.iter().map(|l| l.dense.total() as f64 + kv)),
            off_bytes: prefix(ls.iter().map(|l| l.experts.total() as f64)),
            t_res: prefix(ls.iter().map(|l| {
                cost::dense_decode(&dev, mc, l, batch, w)
                    + cost::experts_time(&dev, mc, l, batch)
                    + ar
            })),
            t_off: prefix(ls.iter().map(|l| {
                if !can_off || l.experts.is_empty() {
                    0.0 // never offloaded (see `Ctx::eval`)
                } else {
                    cost::dense_decode(&dev, mc, l, batch, w)
                        + cost::experts_time(&cpu, mc, l, batch)
                        + offload_trip(batch)
                        + ar
                }
            })),
            p_res: prefix(ls.iter().map(|l| {
                cost::dense_prefill(&dev, mc, l, chunk) + cost::experts_time(&dev, mc, l, chunk) + ar_p
            })),
            p_off: prefix(ls.iter().map(|l| {
                if !can_off || l.experts.is_empty() {
                    0.0 // never offloaded (see `Ctx::eval`)
                } else {
                    cost::dense_prefill(&dev, mc, l, chunk)
                        + cost::experts_time(&cpu, mc, l, chunk)
                        + offload_trip(chunk)
                        + ar_p
                }
            })),
            has_experts: ls.iter().map(|l| !l.experts.is_empty()).collect(),
            unit,
            dev,
            cpu,
        }
    }
}

/// A stage choice evaluated: memory, offload, times.
#[derive(Clone, Debug)]
struct StageEval {
    offload: usize,
    weights: f64,
    kv: f64,
    scratch: f64,
    off_bytes: f64,
    time: f64,
    prefill: f64,
}

struct Ctx<'a> {
    c: &'a Cluster,
    mc: &'a ModelCost,
    w: &'a Workload,
}

impl Ctx<'_> {
    /// Layers [i, j) on unit table `t`, with the embedding and/or head, when `taken` bytes of
    /// the unit are already used (the host's offloaded experts, for a CPU unit). `None` when it
    /// cannot fit even with every expert offloaded.
    fn eval(
        &self,
        t: &UnitTable,
        i: usize,
        j: usize,
        embed: bool,
        head: bool,
        taken: f64,
        batch: f64,
    ) -> Option<StageEval> {
        let mc = self.mc;
        let kv = mc.kv_layer(self.w) * (j - i) as f64;
        let scratch = mc.scratch(self.w, head);
        let mut ends = 0.0;
        if embed {
            ends += mc.ends.embed_bytes as f64;
        }
        if head && !(mc.tied_head && embed) {
            ends += mc.ends.head_bytes as f64;
        }
        let cap = t.dev.memory as f64 - taken * (1.0 + self.w.margin);
        let held = |m: usize| {
            t.mem_res[j - m] - t.mem_res[i] + t.mem_off[j] - t.mem_off[j - m] + ends + scratch
        };
        let fits = |m: usize| held(m) * (1.0 + self.w.margin) <= cap;
        // Offload the experts of the last m layers, m as small as fits (held(m) decreases).
        let max_off = if t.unit.is_cpu() {
            0
        } else {
            (i..j).rev().take_while(|&l| t.has_experts[l]).count()
        };
        if !fits(max_off) {
            return None;
        }
        let (mut lo, mut hi) = (0usize, max_off);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if fits(mid) { hi = mid } else { lo = mid + 1 }
        }
        let m = lo;
        let sum = |v: &[f64]| v[j - m] - v[i];
        let sum_off = |v: &[f64]| v[j] - v[j - m];
        let time = sum(&t.t_res)
            + sum_off(&t.t_off)
            + cost::step_overhead(&t.dev)
            + if head {
                cost::head_time(&t.dev, mc, batch)
            } else {
                0.0
            };
        let prefill = sum(&t.p_res)
            + sum_off(&t.p_off)
            + cost::step_overhead(&t.dev)
            + if head {
                cost::head_time(&t.dev, mc, 1.0)
            } else {
                0.0
            };
        Some(StageEval {
            offload: m,
            weights: held(m) - kv - scratch,
            kv,
            scratch,
            off_bytes: sum_off(&t.off_bytes),
            time,
            prefill,
        })
    }

    /// The link a micro-batch crosses from unit `a` to unit `b`.
    fn hop(&self, a: &Unit, b: &Unit) -> Link {
        if a.host == b.host {
            let h = &self.c.hosts[a.host];
            if a.is_cpu() && b.is_cpu() {
                h.local
            } else {
                h.pcie
            }
        } else {
            self.c.link(a.host, b.host)
        }
    }

    /// Coordinator to (or from) a unit: token ids only, so latency only.
    fn coord_hop(&self, u: &Unit) -> f64 {
        self.c.coordinator_link(u.host).latency_s
    }
}

/// One DP entry: times so far, host RAM taken by offloads, and the stage that led here.
#[derive(Clone, Copy, Debug)]
struct Entry {
    sum: f64,
    max: f64,
    off: f64,
    node: usize,
}

/// Back-pointers: the stage chosen (unit index, layers) and the previous node.
#[derive(Clone, Debug)]
struct Node {
    prev: usize,
    unit: usize,
    range: (usize, usize),
}

const ROOT: usize = usize::MAX;
/// Most units (CPUs and GPUs) a plan considers.
pub const MAX_UNITS: usize = 128;

/// A stage the DP chose: unit index and layers [start, end).
type Chosen = (usize, usize, usize);
/// Most entries kept per DP state (by objective) in the rare case the Pareto set is larger.
const FRONTIER_CAP: usize = 64;

fn dominated(a: &Entry, b: &Entry) -> bool {
    b.sum <= a.sum && b.max <= a.max && b.off <= a.off
}

/// Adds `e` unless another entry is at least as good in every respect; true if added.
fn insert(front: &mut Vec<Entry>, e: Entry, groups: f64) -> bool {
    if front.iter().any(|f| dominated(&e, f)) {
        return false;
    }
    front.retain(|f| !dominated(f, &e));
    front.push(e);
    if front.len() > FRONTIER_CAP {
        front.sort_by(|a, b| objective(a, groups).total_cmp(&objective(b, groups)));
        front.truncate(FRONTIER_CAP);
    }
    true
}

fn objective(e: &Entry, groups: f64) -> f64 {
    e.sum.max(groups * e.max)
}

/// The best assignment of layers to `units` (in this order) for `groups` micro-batches of
/// `batch` sequences: (objective, stages as (unit index, layers)).
fn dp(
    ctx: &Ctx<'_>,
    tables: &[UnitTable],
    groups: f64,
    batch: f64,
    use_all: bool,
) -> Option<(f64, Vec<Chosen>)> {
    let n_units = tables.len();
    let n_layer = ctx.mc.layers.len();
    let act = batch * ctx.mc.n_embd * ctx.w.act_bytes;
    // states[k][i][last]: last = index of the last used unit, n_units for none.
    let idx = |k: usize, i: usize, last: usize| (k * (n_layer + 1) + i) * (n_units + 1) + last;
    let mut states: Vec<Vec<Entry>> =
        vec![Vec::new(); (n_units + 1) * (n_layer + 1) * (n_units + 1)];
    let mut nodes: Vec<Node> = Vec::new();
    states[idx(0, 0, n_units)].push(Entry {
        sum: 0.0,
        max: 0.0,
        off: 0.0,
        node: ROOT,
    });
    for k in 0..n_units {
        let t = &tables[k];
        let host_ends = k + 1 == n_units || tables[k + 1].unit.host != t.unit.host;
        let cpu_cap = t.cpu.memory as f64;
        for i in 0..=n_layer {
            for last in 0..=n_units {
                let front = std::mem::take(&mut states[idx(k, i, last)]);
                for e in &front {
                    // Skip unit k.
                    if !use_all {
                        let mut s = *e;
                        let ok = if host_ends {
                            let fine = s.off * (1.0 + ctx.w.margin) <= cpu_cap;
                            s.off = 0.0;
                            fine
                        } else {
                            true
                        };
                        if ok {
                            insert(&mut states[idx(k + 1, i, last)], s, groups);
                        }
                    }
                    // Layers [i, j) on unit k.
                    let embed = last == n_units;
                    let taken = if t.unit.is_cpu() { e.off } else { 0.0 };
                    for j in i + 1..=n_layer {
                        let head = j == n_layer;
                        let Some(ev) = ctx.eval(t, i, j, embed, head, taken, batch) else {
                            // Larger ranges need more memory: stop.
                            break;
                        };
                        let mut sum = e.sum + ev.time;
                        sum += if embed {
                            ctx.coord_hop(&t.unit)
                        } else {
                            ctx.hop(&tables[last].unit, &t.unit).time(act)
                        };
                        if head {
                            sum += ctx.coord_hop(&t.unit);
                        }
                        let mut off = e.off + ev.off_bytes;
                        if host_ends {
                            if !t.unit.is_cpu() && off * (1.0 + ctx.w.margin) > cpu_cap {
                                continue;
                            }
                            off = 0.0;
                        }
                        let ne = Entry {
                            sum,
                            max: e.max.max(ev.time),
                            off,
                            node: nodes.len(),
                        };
                        if insert(&mut states[idx(k + 1, j, k)], ne, groups) {
                            nodes.push(Node {
                                prev: e.node,
                                unit: k,
                                range: (i, j),
                            });
                        }
                    }
                }
            }
        }
    }
    let mut best: Option<Entry> = None;
    for last in 0..n_units {
        for e in &states[idx(n_units, n_layer, last)] {
            if best.is_none_or(|b| objective(e, groups) < objective(&b, groups)) {
                best = Some(*e);
            }
        }
    }
    let best = best?;
    let mut out = Vec::new();
    let mut n = best.node;
    while n != ROOT {
        let node = &nodes[n];
        out.push((node.unit, node.range.0, node.range.1));
        n = node.prev;
    }
    out.reverse();
    Some((objective(&best, groups), out))
}

/// The unit sequences to try: host orders × each multi-GPU host's TP choice.
fn candidates(c: &Cluster, search: &Search) -> Vec<Vec<Unit>> {
    let n = c.hosts.len();
    let mut orders: Vec<Vec<usize>> = Vec::new();
    if search.reorder && n <= 7 {
        permute(&mut (0..n).collect(), 0, &mut orders);
    } else {
        orders.push((0..n).collect());
        if search.reorder && n > 1 {
            orders.push((0..n).rev().collect());
        }
    }
    let multi: Vec<usize> = (0..n)
        .filter(|&h| search.tensor_parallel && c.hosts[h].gpus.len() >= 2)
        .collect();
    // Each multi-GPU host's TP choice, or all-or-none beyond 6 such hosts.
    let masks: Vec<u64> = if multi.len() <= 6 { (0..1u64 << multi.len()).collect() } else { vec![0, u64::MAX] };
    let mut out = Vec::new();
    for order in &orders {
        for &mask in &masks {
            let tp = |h: usize| {
                multi
                    .iter()
                    .position(|&m| m == h)
                    .is_some_and(|b| mask >> b.min(63) & 1 == 1)
            };
            let mut units = Vec::new();
            for &h in order {
                let g = c.hosts[h].gpus.len();
                if tp(h) {
                    units.push(Unit {
                        host: h,
                        gpus: (0..g).collect(),
                    });
                } else {
                    units.extend((0..g).map(|i| Unit {
                        host: h,
                        gpus: vec![i],
                    }));
                }
                units.push(Unit {
                    host: h,
                    gpus: vec![],
                });
            }
            out.push(units);
        }
    }
    out
}

fn permute(v: &mut Vec<usize>, k: usize, out: &mut Vec<Vec<usize>>) {
    if k == v.len() {
        out.push(v.clone());
        return;
    }
    for i in k..v.len() {
        v.swap(k, i);
        permute(v, k + 1, out);
        v.swap(k, i);
    }
}

/// Micro-batch group counts worth trying for `parallel` sequences on at most `units` stages.
fn group_counts(parallel: u64, units: usize) -> Vec<u64> {
    (1..=parallel.min(units as u64).max(1)).collect()
}

/// Plans `m` on `c` for workload `w`: the exact optimum of the search described at the top of
/// this module, or [`NoFit`] saying by how much it misses.
pub fn plan(m: &ModelDesc, c: &Cluster, w: &Workload, search: &Search) -> Result<Plan, PlanError> {
    if w.ctx == 0 {
        return Err(PlanError::Cluster("the context length must be positive".into()));
    }
    let devices: usize = c.hosts.iter().map(|h| 1 + h.gpus.len()).sum();
    if c.hosts.is_empty() || c.hosts.len() > crate::cluster::MAX_HOSTS || devices > MAX_UNITS {
        return Err(PlanError::Cluster(format!(
            "{} hosts with {devices} devices: plans take 1 to {} hosts and at most {MAX_UNITS} devices",
            c.hosts.len(),
            crate::cluster::MAX_HOSTS
        )));
    }
    let mc = ModelCost::new(m, w);
    let ctx = Ctx { c, mc: &mc, w };
    let mut best: Option<(f64, u64, Vec<Unit>, Vec<Chosen>)> = None;
    for units in candidates(c, search) {
        for g in group_counts(w.parallel, units.len()) {
            let batch = w.parallel.div_ceil(g) as f64;
            let tables: Vec<UnitTable> = units
                .iter()
                .map(|u| UnitTable::new(c, &mc, w, u.clone(), batch))
                .collect();
            if let Some((obj, stages)) = dp(&ctx, &tables, g as f64, batch, search.use_all)
                && best.as_ref().is_none_or(|b| obj < b.0)
            {
                best = Some((obj, g, units.clone(), stages));
            }
        }
    }
    let Some((obj, groups, units, stages)) = best else {
        return Err(PlanError::NoFit(Box::new(no_fit(m, c, w))));
    };
    let chosen: Vec<(Unit, Range<usize>)> = stages
        .iter()
        .map(|&(u, i, j)| (units[u].clone(), i..j))
        .collect();
    build(m, c, w, &chosen, groups, obj)
}

/// Evaluates one given assignment (unit, layers) in pipeline order with `groups` micro-batch
/// groups, or `None` when it does not fit. The even split of the property tests goes through
/// here, so it is judged by the same cost model as the optimizer.
pub fn evaluate(
    m: &ModelDesc,
    c: &Cluster,
    w: &Workload,
    stages: &[(Unit, Range<usize>)],
    groups: u64,
) -> Option<Plan> {
    let mc = ModelCost::new(m, w);
    let ctx = Ctx { c, mc: &mc, w };
    let batch = w.parallel.div_ceil(groups.max(1)) as f64;
    let n_layer = mc.layers.len();
    let (mut sum, mut max) = (0.0f64, 0.0f64);
    let mut covered = 0;
    for (_, r) in stages {
        if r.start != covered || r.end <= r.start {
            return None;
        }
        covered = r.end;
    }
    if covered != n_layer {
        return None;
    }
    let off_by_host = offloads(&ctx, stages, batch)?;
    let mut prev: Option<&Unit> = None;
    for (k, (u, r)) in stages.iter().enumerate() {
        let t = UnitTable::new(c, &mc, w, u.clone(), batch);
        let taken = if u.is_cpu() { off_by_host[u.host] } else { 0.0 };
        let ev = ctx.eval(&t, r.start, r.end, k == 0, r.end == n_layer, taken, batch)?;
        sum += ev.time
            + prev.map_or(ctx.coord_hop(u), |p| {
                ctx.hop(p, u).time(batch * mc.n_embd * w.act_bytes)
            });
        if r.end == n_layer {
            sum += ctx.coord_hop(u);
        }
        max = max.max(ev.time);
        prev = Some(u);
    }
    let obj = sum.max(groups as f64 * max);
    build(m, c, w, stages, groups, obj).ok()
}

/// Bytes of routed experts each host's GPU stages offload to its CPU RAM; `None` when a GPU
/// stage cannot fit or a host's RAM cannot take its offloads.
fn offloads(ctx: &Ctx<'_>, stages: &[(Unit, Range<usize>)], batch: f64) -> Option<Vec<f64>> {
    let n_layer = ctx.mc.layers.len();
    let mut off = vec![0.0f64; ctx.c.hosts.len()];
    for (k, (u, r)) in stages.iter().enumerate() {
        if !u.is_cpu() {
            let t = UnitTable::new(ctx.c, ctx.mc, ctx.w, u.clone(), batch);
            off[u.host] += ctx
                .eval(&t, r.start, r.end, k == 0, r.end == n_layer, 0.0, batch)?
                .off_bytes;
        }
    }
    for (h, &o) in off.iter().enumerate() {
        if o * (1.0 + ctx.w.margin) > ctx.c.hosts[h].cpu.memory as f64 {
            return None;
        }
    }
    Some(off)
}

/// Turns a chosen assignment into a [`Plan`]: stage details, device memory, per-tensor
/// placement and the prediction.
fn build(
    m: &ModelDesc,
    c: &Cluster,
    w: &Workload,
    stages: &[(Unit, Range<usize>)],
    groups: u64,
    obj: f64,
) -> Result<Plan, PlanError> {
    let mc = ModelCost::new(m, w);
    let ctx = Ctx { c, mc: &mc, w };
    let n_layer = mc.layers.len();
    let batch = w.parallel.div_ceil(groups.max(1)) as f64;
    let mut out = Vec::new();
    let off_by_host = offloads(&ctx, stages, batch)
        .ok_or_else(|| PlanError::Cluster("offloaded experts do not fit the host's RAM".into()))?;
    let (mut single, mut prefill) = (0.0, 0.0);
    let chunk = w.prefill_chunk.min(w.ctx).max(1) as f64;
    let mut prev: Option<&Unit> = None;
    for (k, (u, r)) in stages.iter().enumerate() {
        let t = UnitTable::new(c, &mc, w, u.clone(), batch);
        let t1 = UnitTable::new(c, &mc, w, u.clone(), 1.0);
        let (embed, head) = (k == 0, r.end == n_layer);
        let taken = if u.is_cpu() { off_by_host[u.host] } else { 0.0 };
        let ev = ctx
            .eval(&t, r.start, r.end, embed, head, taken, batch)
            .ok_or_else(|| PlanError::Cluster(format!("stage {k} does not fit")))?;
        let ev1 = ctx
            .eval(&t1, r.start, r.end, embed, head, taken, 1.0)
            .ok_or_else(|| PlanError::Cluster(format!("stage {k} does not fit")))?;
        let hop_in = prev.map_or(ctx.coord_hop(u), |p| {
            ctx.hop(p, u).time(mc.n_embd * w.act_bytes)
        });
        let hop_in_p = prev.map_or(ctx.coord_hop(u), |p| {
            ctx.hop(p, u).time(chunk * mc.n_embd * w.act_bytes)
        });
        single += ev1.time + hop_in + if head { ctx.coord_hop(u) } else { 0.0 };
        prefill += ev.prefill + hop_in_p;
        let dev = u.device(c);
        out.push(Stage {
            unit: u.clone(),
            label: u.label(c),
            device: dev.name.clone(),
            layers: r.clone(),
            embed,
            head,
            offloaded: r.end - ev.offload..r.end,
            weight_bytes: ev.weights as u64,
            kv_bytes: ev.kv as u64,
            scratch_bytes: ev.scratch as u64,
            capacity: dev.memory,
            ms_per_step: ev.time * 1e3,
            prefill_ms: ev.prefill * 1e3,
            bottleneck: bottleneck(&ctx, &t, r.clone(), ev.offload, batch),
        });
        prev = Some(u);
    }
    let tensors = placements(m, c, &out);
    let devices = device_use(c, w, &out, &tensors);
    let slowest = out
        .iter()
        .max_by(|a, b| a.ms_per_step.total_cmp(&b.ms_per_step));
    let sum_stages: f64 = out.iter().map(|s| s.ms_per_step).sum::<f64>() / 1e3;
    let why = match slowest {
        Some(s) if groups as f64 * s.ms_per_step / 1e3 >= obj * 0.999 => {
            format!("stage {} ({}): {}", s.label, s.device, s.bottleneck)
        }
        Some(_) if sum_stages < obj * 0.5 => format!(
            "links between stages (stages compute {:.0}% of a step)",
            100.0 * sum_stages / obj
        ),
        Some(s) => format!(
            "the pipeline's length; slowest stage {} ({}): {}",
            s.label, s.device, s.bottleneck
        ),
        None => "nothing".into(),
    };
    Ok(Plan {
        model: m.name.clone(),
        cluster: c.name.clone(),
        workload: w.clone(),
        stages: out,
        devices,
        prediction: Prediction {
            decode_tok_s_single: 1.0 / single.max(1e-12),
            decode_tok_s: w.parallel as f64 / obj.max(1e-12),
            step_ms: obj * 1e3,
            groups,
            prefill_tok_s: chunk / prefill.max(1e-12),
            bottleneck: why,
        },
        objective_s: obj,
        tensors,
    })
}

/// Names what limits a stage most.
fn bottleneck(ctx: &Ctx<'_>, t: &UnitTable, r: Range<usize>, offload: usize, batch: f64) -> String {
    let (d, mc) = (&t.dev, ctx.mc);
    // (time, what): on a live worker the measured kernels replace bandwidth and compute.
    let mut items = [
        (0.0, "memory bandwidth"),
        (0.0, "compute"),
        (0.0, "matrix kernels (measured)"),
        (0.0, "per-layer overhead"),
        (0.0, "routed experts on the host CPU"),
    ];
    for l in r.start..r.end {
        let ld = &mc.layers[l];
        let resident = l < r.end - offload;
        if d.rates.is_some() {
            items[2].0 += cost::dense_matmul_time(d, &ld.dense, &ld.mats, ld.dense_flops, batch).0
                + if resident { cost::experts_time(d, mc, ld, batch) } else { 0.0 };
        } else {
            let (e_bytes, e_flops) = if resident {
                (ld.experts.total() as f64 * mc.expert_touch(batch), ld.expert_flops * mc.expert_share)
            } else {
                (0.0, 0.0)
            };
            items[0].0 += (ld.dense.total() as f64 + e_bytes) / d.bandwidth;
            items[1].0 += batch * (ld.dense_flops + e_flops) / d.flops;
        }
        items[3].0 += cost::layer_overhead(d, cost::DISPATCHES_PER_LAYER) + cost::vector_work(d, mc, batch);
        if !resident {
            items[4].0 += cost::experts_time(&t.cpu, mc, ld, batch);
        }
    }
    items.iter().max_by(|a, b| a.0.total_cmp(&b.0)).map_or("", |x| x.1).to_string()
}

/// Every tensor and the device(s) holding it.
fn placements(m: &ModelDesc, c: &Cluster, stages: &[Stage]) -> Vec<Placement> {
    let n_layer = m.n_layer;
    let first = stages.first();
    let last = stages.iter().find(|s| s.layers.end == n_layer);
    let cpu_of = |s: &Stage| format!("{}/cpu", c.hosts[s.unit.host].name);
    m.tensors
        .iter()
        .map(|t| {
            let devices = match (t.role, t.layer) {
                (Role::Embed, _) => {
                    let mut d: Vec<String> = first.map(|s| s.label.clone()).into_iter().collect();
                    if m.tied_head()
                        && let Some(l) = last
                        && !d.contains(&l.label)
                    {
                        d.push(l.label.clone());
                    }
                    d
                }
                (Role::Head, _) => last.map(|s| s.label.clone()).into_iter().collect(),
                (role, Some(l)) => stages
                    .iter()
                    .find(|s| s.layers.contains(&l))
                    .map(|s| {
                        if role == Role::Experts && s.offloaded.contains(&l) {
                            cpu_of(s)
                        } else {
                            s.label.clone()
                        }
                    })
                    .into_iter()
                    .collect(),
                (_, None) => Vec::new(),
            };
            Placement {
                tensor: t.name.clone(),
                bytes: t.bytes,
                devices,
            }
        })
        .collect()
}

/// Memory per physical device, summed from the tensor placement (TP groups split evenly) plus
/// each stage's KV cache and scratch.
fn device_use(c: &Cluster, w: &Workload, stages: &[Stage], tensors: &[Placement]) -> Vec<DeviceUse> {
    let mut uses: Vec<DeviceUse> = Vec::new();
    let mut add = |host: usize, dev: &str, bytes: f64, cap: u64| {
        let hn = &c.hosts[host].name;
        match uses.iter_mut().find(|u| &u.host == hn && u.device == dev) {
            Some(u) => u.used += bytes as u64,
            None => uses.push(DeviceUse {
                host: hn.clone(),
                device: dev.to_string(),
                used: bytes as u64,
                capacity: cap,
            }),
        }
    };
    // Weights, by the label of the unit that holds them.
    for p in tensors {
        for label in &p.devices {
            let (host, gpus) = parse_label(c, label, stages);
            split(c, host, &gpus, p.bytes as f64, &mut add);
        }
    }
    for s in stages {
        let extra = (s.kv_bytes + s.scratch_bytes) as f64;
        split(c, s.unit.host, &s.unit.gpus, extra, &mut add);
    }
    for u in &mut uses {
        u.used = (u.used as f64 * (1.0 + w.margin)) as u64;
    }
    uses
}

fn split(
    c: &Cluster,
    host: usize,
    gpus: &[usize],
    bytes: f64,
    add: &mut impl FnMut(usize, &str, f64, u64),
) {
    let h = &c.hosts[host];
    if gpus.is_empty() {
        add(host, "cpu", bytes, h.cpu.memory);
    } else {
        for &g in gpus {
            add(
                host,
                &format!("gpu{g}"),
                bytes / gpus.len() as f64,
                h.gpus[g].memory,
            );
        }
    }
}

fn parse_label(c: &Cluster, label: &str, stages: &[Stage]) -> (usize, Vec<usize>) {
    if let Some(s) = stages.iter().find(|s| s.label == label) {
        return (s.unit.host, s.unit.gpus.clone());
    }
    let host = label
        .strip_suffix("/cpu")
        .and_then(|h| c.hosts.iter().position(|x| x.name == h))
        .unwrap_or(0);
    (host, Vec::new())
}

/// Why a model does not fit, by how much, and what would make it fit.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct NoFit {
    /// Bytes the model needs at the least: all weights, the KV cache, scratch, margin.
    pub need: u64,
    /// Bytes all devices of the cluster offer.
    pub capacity: u64,
    /// `need - capacity` (0 when the total would do but no split fits the devices).
    pub shortfall: u64,
    pub weights: u64,
    pub kv: u64,
    /// Filled in by [`suggest`].
    pub suggestions: Vec<String>,
}

impl std::fmt::Display for NoFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gb = |b: u64| b as f64 / 1e9;
        write!(
            f,
            "does not fit: needs {:.1} GB ({:.1} GB weights + {:.1} GB KV cache + scratch and margin) but the cluster has {:.1} GB",
            gb(self.need),
            gb(self.weights),
            gb(self.kv),
            gb(self.capacity)
        )?;
        if self.shortfall > 0 {
            write!(f, ", {:.1} GB short", gb(self.shortfall))?;
        } else {
            write!(
                f,
                "; the total would do but no split of the layers fits the devices"
            )?;
        }
        for s in &self.suggestions {
            write!(f, "\n  - {s}")?;
        }
        Ok(())
    }
}

fn no_fit(m: &ModelDesc, c: &Cluster, w: &Workload) -> NoFit {
    let mc = ModelCost::new(m, w);
    let weights = m.total_bytes();
    let kv = (mc.kv_layer(w) * m.n_layer as f64) as u64;
    let need = ((weights + kv) as f64 + mc.scratch(w, true)) * (1.0 + w.margin);
    let capacity = c.capacity();
    NoFit {
        need: need as u64,
        capacity,
        shortfall: (need as u64).saturating_sub(capacity),
        weights,
        kv,
        suggestions: Vec::new(),
    }
}

/// What would make `m` fit: a shorter context, fewer parallel sequences, another quantization
/// (`alternatives`: smaller variants of the same model, smallest last), or more devices like
/// the cluster's largest. Each is checked by planning again.
pub fn suggest(
    m: &ModelDesc,
    c: &Cluster,
    w: &Workload,
    search: &Search,
    alternatives: &[ModelDesc],
) -> Vec<String> {
    let fits = |m: &ModelDesc, c: &Cluster, w: &Workload| plan(m, c, w, search).is_ok();
    let mut out = Vec::new();
    let mut ctx = w.ctx / 2;
    while ctx >= 256 {
        let w2 = Workload { ctx, ..w.clone() };
        if fits(m, c, &w2) {
            out.push(format!("a shorter context: --ctx {ctx} fits"));
            break;
        }
        ctx /= 2;
    }
    if w.parallel > 1 {
        let w2 = Workload {
            parallel: 1,
            ..w.clone()
        };
        if fits(m, c, &w2) {
            out.push("fewer parallel sequences: --parallel 1 fits".into());
        }
    }
    for alt in alternatives {
        if fits(alt, c, w) {
            out.push(format!(
                "a smaller quantization: {} ({:.1} GB) fits",
                alt.name,
                alt.total_bytes() as f64 / 1e9
            ));
            break;
        }
    }
    // More of the largest device: GPUs on the host with the most of them, else whole hosts.
    let gpu_host = (0..c.hosts.len())
        .filter(|&h| !c.hosts[h].gpus.is_empty())
        .max_by_key(|&h| c.hosts[h].gpus[0].memory);
    let mut more = c.clone();
    for n in 1..=32 {
        let what = match gpu_host {
            Some(h) => {
                let g = more.hosts[h].gpus[0].clone();
                more.hosts[h].gpus.push(g.clone());
                format!(
                    "{n} more {} ({:.0} GB)",
                    g.name,
                    (g.memory + g.reserve) as f64 / 1e9
                )
            }
            None => {
                let big = c
                    .hosts
                    .iter()
                    .max_by_key(|h| h.cpu.memory)
                    .cloned()
                    .expect("a cluster has hosts");
                let mut h = big.clone();
                h.name = format!("{}-extra{n}", big.name);
                more.hosts.push(h);
                format!(
                    "{n} more host(s) like {} ({:.0} GB RAM)",
                    big.name,
                    (big.cpu.memory + big.cpu.reserve) as f64 / 1e9
                )
            }
        };
        // Adding devices only grows the search; skip the expensive host-order search.
        let quick = Search {
            reorder: false,
            ..search.clone()
        };
        if plan(m, &more, w, &quick).is_ok() {
            out.push(format!("more devices: {what} would fit"));
            break;
        }
    }
    out
}

/// Checks a plan against the model and cluster without trusting the optimizer: every tensor
/// is placed exactly once (a tied embedding at most twice: input and head), the stages cover
/// the layers in order, and no physical device holds more than its memory.
pub fn validate(p: &Plan, m: &ModelDesc, c: &Cluster) -> Result<(), String> {
    if p.tensors.len() != m.tensors.len() {
        return Err(format!(
            "{} tensors placed, the model has {}",
            p.tensors.len(),
            m.tensors.len()
        ));
    }
    for (pl, t) in p.tensors.iter().zip(&m.tensors) {
        let max = if t.role == Role::Embed && m.tied_head() {
            2
        } else {
            1
        };
        if pl.tensor != t.name || pl.devices.is_empty() || pl.devices.len() > max {
            return Err(format!("{} is placed on {:?}", t.name, pl.devices));
        }
    }
    let mut next = 0;
    for (k, s) in p.stages.iter().enumerate() {
        if s.layers.start != next || s.layers.is_empty() {
            return Err(format!(
                "stage {k} has layers {:?}, expected to start at {next}",
                s.layers
            ));
        }
        if s.unit.host >= c.hosts.len()
            || s.unit
                .gpus
                .iter()
                .any(|&g| g >= c.hosts[s.unit.host].gpus.len())
        {
            return Err(format!(
                "stage {k} is on a device the cluster does not have"
            ));
        }
        next = s.layers.end;
    }
    if next != m.n_layer {
        return Err(format!("the stages cover {next} of {} layers", m.n_layer));
    }
    // Recount memory from the tensors, independently of the optimizer's prefix sums.
    let mut used: std::collections::BTreeMap<(usize, String), f64> = Default::default();
    for (pl, t) in p.tensors.iter().zip(&m.tensors) {
        for label in &pl.devices {
            let (host, gpus) = parse_label(c, label, &p.stages);
            for (dev, share) in physical(&gpus) {
                *used.entry((host, dev)).or_default() += t.bytes as f64 * share;
            }
        }
    }
    for s in &p.stages {
        for (dev, share) in physical(&s.unit.gpus) {
            *used.entry((s.unit.host, dev)).or_default() +=
                (s.kv_bytes + s.scratch_bytes) as f64 * share;
        }
    }
    for ((host, dev), bytes) in used {
        let h = &c.hosts[host];
        let cap = if dev == "cpu" {
            h.cpu.memory
        } else {
            h.gpus[dev[3..].parse::<usize>().map_err(|e| e.to_string())?].memory
        };
        // One byte per tensor of rounding slack.
        if bytes > cap as f64 + m.tensors.len() as f64 {
            return Err(format!(
                "{}/{dev} holds {:.3} GB but has {:.3} GB",
                h.name,
                bytes / 1e9,
                cap as f64 / 1e9
            ));
        }
    }
    Ok(())
}

fn physical(gpus: &[usize]) -> Vec<(String, f64)> {
    if gpus.is_empty() {
        vec![("cpu".to_string(), 1.0)]
    } else {
        gpus.iter()
            .map(|g| (format!("gpu{g}"), 1.0 / gpus.len() as f64))
            .collect()
    }
}
