//! What the planner knows about a cluster: hosts, their devices (CPU RAM and GPUs) with
//! memory, bandwidth and compute, and the links between hosts.
//!
//! From a TOML file for what-if planning (see `deploy/examples/`), or from the inventories
//! of live workers (then each worker is a host whose CPU kernel rates were measured).

use std::collections::BTreeMap;

use shoal_kernels::GgmlType;

use crate::PlanError;
use crate::model::MatShape;

const GB: f64 = 1e9;
/// Largest cluster a file may describe (the optimizer's work grows with the square of the
/// number of devices).
pub const MAX_HOSTS: usize = 64;
pub const MAX_GPUS_PER_HOST: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Cpu,
    Gpu,
}

/// One place weights can live and be computed on.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Device {
    pub name: String,
    pub kind: DeviceKind,
    /// Bytes the planner may fill (memory minus the reserve).
    pub memory: u64,
    /// Bytes the reserve holds back (OS, CUDA context).
    pub reserve: u64,
    /// Bytes per second of memory bandwidth.
    pub bandwidth: f64,
    /// FLOP/s of the weight matrix products.
    pub flops: f64,
    /// Fixed cost per block per step (kernel launches, thread wake-ups), seconds.
    pub layer_overhead_s: f64,
    /// Measured kernel speeds, when the device is a live worker's CPU.
    #[serde(skip)]
    pub rates: Option<KernelRates>,
}

/// Measured speeds of the quantized matrix products on a worker's threads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelRates {
    /// Weight bytes per second multiplying one activation row, per weight type.
    pub single: Vec<(GgmlType, f64)>,
    /// Weight bytes × rows per second at `batch_rows` rows.
    pub batch: Vec<(GgmlType, f64)>,
    /// Fixed seconds per matrix row multiplying one activation row, per weight type.
    pub row: Vec<(GgmlType, f64)>,
    pub batch_rows: u32,
    /// Fixed cost of one matrix product call (dispatch, activation quantization, barrier).
    pub call_overhead_s: f64,
    /// Waking the worker's parked threads at the start of a step.
    pub wake_s: f64,
    /// Seconds per element of single-threaded vector work (norms, SwiGLU, adds).
    pub elementwise_s: f64,
    /// Handing a step to the compute thread and back.
    pub handoff_s: f64,
    /// Measured seconds for one activation row through exactly these matrices (a block's,
    /// or the head's), dispatch and barriers included; preferred over the per-type rates.
    pub probes: Vec<(Vec<MatShape>, f64)>,
    /// One token's attention over n cached positions of one block: fixed + n × per position
    /// seconds, measured for the model's head counts.
    pub attention: Option<(f64, f64)>,
}

impl KernelRates {
    fn lookup(v: &[(GgmlType, f64)], ty: GgmlType) -> Option<f64> {
        v.iter()
            .find(|(t, _)| *t == ty)
            .map(|&(_, r)| r)
            .filter(|r| *r > 0.0)
    }

    /// Rate for `ty`, or the slowest measured rate when `ty` was not measured.
    pub fn single_rate(&self, ty: GgmlType) -> f64 {
        Self::lookup(&self.single, ty).unwrap_or_else(|| {
            self.single
                .iter()
                .map(|r| r.1)
                .fold(f64::MAX, f64::min)
                .max(1.0)
        })
    }

    /// Measured time of one row through `mats`, if they were probed.
    pub fn probe(&self, mats: &[MatShape]) -> Option<f64> {
        if mats.is_empty() {
            return None;
        }
        self.probes.iter().find(|(m, s)| *s > 0.0 && m == mats).map(|p| p.1)
    }

    pub fn row_overhead(&self, ty: GgmlType) -> f64 {
        self.row.iter().find(|(t, _)| *t == ty).map_or(0.0, |r| r.1.max(0.0))
    }

    pub fn batch_rate(&self, ty: GgmlType) -> f64 {
        Self::lookup(&self.batch, ty).unwrap_or_else(|| {
            self.batch
                .iter()
                .map(|r| r.1)
                .fold(f64::MAX, f64::min)
                .max(1.0)
        })
    }
}

/// A network (or PCIe) link.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Link {
    /// One-way latency, seconds.
    pub latency_s: f64,
    /// Bytes per second.
    pub bandwidth: f64,
}

impl Link {
    /// Time to send `bytes` one way.
    pub fn time(&self, bytes: f64) -> f64 {
        self.latency_s + bytes / self.bandwidth.max(1.0)
    }
}

/// One machine.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Host {
    pub name: String,
    pub cpu: Device,
    pub gpus: Vec<Device>,
    /// Between this host's GPUs and its CPU (and GPU to GPU).
    pub pcie: Link,
    /// Between two processes on this host (a pipeline hop that stays local).
    pub local: Link,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Cluster {
    pub name: String,
    pub hosts: Vec<Host>,
    /// The host the coordinator runs on (steps start and end there).
    pub coordinator: usize,
    /// Between hosts unless `links` says otherwise.
    pub network: Link,
    /// Per pair of hosts (a < b).
    pub links: BTreeMap<(usize, usize), Link>,
    /// Coordinator to each host, when measured (live clusters); else `link(coordinator, h)`.
    pub coordinator_links: Vec<Link>,
}

/// A live worker as the coordinator sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveWorker {
    pub name: String,
    /// Bytes of RAM it reports free.
    pub ram_free: u64,
    /// Measured memory bandwidth, bytes per second.
    pub bandwidth: f64,
    /// Measured kernel speeds on the threads it will compute with.
    pub rates: Option<KernelRates>,
    /// Coordinator → worker round trip of a small call, seconds.
    pub rtt_s: f64,
}

impl Cluster {
    /// The link from the coordinator to host `h` (token ids: only its latency matters).
    pub fn coordinator_link(&self, h: usize) -> Link {
        self.coordinator_links
            .get(h)
            .copied()
            .unwrap_or_else(|| self.link(self.coordinator, h))
    }

    /// One host per live worker: its RAM (less 5% kept free) holds layers, its measured kernel
    /// rates time them, and the measured round trips give the links (worker to worker: the
    /// mean of the two one-way coordinator latencies).
    pub fn from_workers(name: &str, ws: &[LiveWorker]) -> Cluster {
        let hosts = ws
            .iter()
            .map(|w| {
                let reserve = w.ram_free / 20;
                // Compute from the batched rates: bytes × rows per second × FLOPs per byte.
                let flops = w
                    .rates
                    .as_ref()
                    .and_then(|r| {
                        r.batch
                            .iter()
                            .map(|&(ty, rate)| {
                                rate * 2.0 * ty.block_size() as f64 / ty.type_size() as f64
                            })
                            .reduce(f64::max)
                    })
                    .unwrap_or(w.bandwidth * 2.0);
                let cpu = Device {
                    name: "CPU".into(),
                    kind: DeviceKind::Cpu,
                    memory: w.ram_free - reserve,
                    reserve,
                    bandwidth: w.bandwidth.max(1.0),
                    flops: flops.max(1.0),
                    layer_overhead_s: 20e-6,
                    rates: w.rates.clone(),
                };
                let one_way = Link {
                    latency_s: w.rtt_s / 2.0,
                    bandwidth: 1.25 * GB,
                };
                Host {
                    name: w.name.clone(),
                    cpu,
                    gpus: Vec::new(),
                    pcie: one_way,
                    local: one_way,
                }
            })
            .collect::<Vec<_>>();
        let mut links = BTreeMap::new();
        for a in 0..ws.len() {
            for b in a + 1..ws.len() {
                links.insert(
                    (a, b),
                    Link {
                        latency_s: (ws[a].rtt_s + ws[b].rtt_s) / 4.0,
                        bandwidth: 1.25 * GB,
                    },
                );
            }
        }
        Cluster {
            name: name.to_string(),
            coordinator_links: ws
                .iter()
                .map(|w| Link {
                    latency_s: w.rtt_s / 2.0,
                    bandwidth: 1.25 * GB,
                })
                .collect(),
            hosts,
            coordinator: 0,
            network: Link {
                latency_s: 0.5e-3,
                bandwidth: 125e6,
            },
            links,
        }
    }

    /// The link between two hosts (the local link within one).
    pub fn link(&self, a: usize, b: usize) -> Link {
        if a == b {
            return self.hosts[a].local;
        }
        *self
            .links
            .get(&(a.min(b), a.max(b)))
            .unwrap_or(&self.network)
    }

    /// Total bytes of all devices.
    pub fn capacity(&self) -> u64 {
        self.hosts
            .iter()
            .map(|h| h.cpu.memory + h.gpus.iter().map(|g| g.memory).sum::<u64>())
            .sum()
    }

    /// Parses the TOML cluster description (see `deploy/examples/`).
    pub fn from_toml(text: &str) -> Result<Cluster, PlanError> {
        let f: FileCluster = toml::from_str(text).map_err(|e| PlanError::Cluster(e.to_string()))?;
        f.build()
    }

    pub fn from_toml_file(path: &std::path::Path) -> Result<Cluster, PlanError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PlanError::Cluster(format!("{}: {e}", path.display())))?;
        Cluster::from_toml(&text).map_err(|e| match e {
            PlanError::Cluster(m) => PlanError::Cluster(format!("{}: {m}", path.display())),
            e => e,
        })
    }
}

// ---- TOML ----

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    #[serde(default)]
    name: String,
    coordinator: Option<String>,
    #[serde(default)]
    network: FileLink,
    #[serde(default)]
    host: Vec<FileHost>,
    #[serde(default)]
    link: Vec<FilePairLink>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLink {
    #[serde(default = "default_net_latency")]
    latency_ms: f64,
    #[serde(default = "default_net_gbit")]
    bandwidth_gbit: f64,
}

impl Default for FileLink {
    fn default() -> Self {
        FileLink {
            latency_ms: default_net_latency(),
            bandwidth_gbit: default_net_gbit(),
        }
    }
}

fn default_net_latency() -> f64 {
    0.3
}
fn default_net_gbit() -> f64 {
    1.0
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePairLink {
    hosts: [String; 2],
    latency_ms: f64,
    bandwidth_gbit: f64,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHost {
    name: String,
    /// How many identical hosts this entry stands for (named `name-1`, `name-2`, ...).
    #[serde(default = "one")]
    count: usize,
    ram_gb: f64,
    ram_bandwidth_gbs: f64,
    cpu_tflops: f64,
    #[serde(default = "default_cpu_reserve")]
    reserve_gb: f64,
    #[serde(default = "default_pcie")]
    pcie_gbs: f64,
    #[serde(default)]
    gpu: Vec<FileGpu>,
}

fn one() -> usize {
    1
}
fn default_cpu_reserve() -> f64 {
    4.0
}
fn default_pcie() -> f64 {
    16.0
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGpu {
    name: String,
    #[serde(default = "one")]
    count: usize,
    memory_gb: f64,
    bandwidth_gbs: f64,
    tflops: f64,
    #[serde(default = "default_gpu_reserve")]
    reserve_gb: f64,
}

fn default_gpu_reserve() -> f64 {
    1.0
}

fn positive(what: &str, x: f64) -> Result<f64, PlanError> {
    if x.is_finite() && x > 0.0 {
        Ok(x)
    } else {
        Err(PlanError::Cluster(format!(
            "{what} must be a positive number, got {x}"
        )))
    }
}

fn link(what: &str, latency_ms: f64, gbit: f64) -> Result<Link, PlanError> {
    if !(latency_ms.is_finite() && latency_ms >= 0.0) {
        return Err(PlanError::Cluster(format!(
            "{what}: latency_ms must be >= 0"
        )));
    }
    Ok(Link {
        latency_s: latency_ms / 1e3,
        bandwidth: positive(&format!("{what}: bandwidth_gbit"), gbit)? * 1e9 / 8.0,
    })
}

impl FileCluster {
    fn build(self) -> Result<Cluster, PlanError> {
        let mut hosts = Vec::new();
        for h in &self.host {
            let gpus: usize = h.gpu.iter().map(|g| g.count).sum();
            if gpus > MAX_GPUS_PER_HOST {
                return Err(PlanError::Cluster(format!("host {}: {gpus} GPUs (at most {MAX_GPUS_PER_HOST})", h.name)));
            }
            if h.count > MAX_HOSTS || hosts.len() + h.count > MAX_HOSTS {
                return Err(PlanError::Cluster(format!("more than {MAX_HOSTS} hosts")));
            }
            if h.count == 0 {
                return Err(PlanError::Cluster(format!(
                    "host {}: count must be at least 1",
                    h.name
                )));
            }
            let ram = positive(&format!("host {}: ram_gb", h.name), h.ram_gb)?;
            if !(h.reserve_gb >= 0.0 && h.reserve_gb < ram) {
                return Err(PlanError::Cluster(format!(
                    "host {}: reserve_gb must be in [0, ram_gb)",
                    h.name
                )));
            }
            let cpu = Device {
                name: "CPU".into(),
                kind: DeviceKind::Cpu,
                memory: ((ram - h.reserve_gb) * GB) as u64,
                reserve: (h.reserve_gb * GB) as u64,
                bandwidth: positive(
                    &format!("host {}: ram_bandwidth_gbs", h.name),
                    h.ram_bandwidth_gbs,
                )? * GB,
                flops: positive(&format!("host {}: cpu_tflops", h.name), h.cpu_tflops)? * 1e12,
                layer_overhead_s: 20e-6,
                rates: None,
            };
            let mut gpus = Vec::new();
            for g in &h.gpu {
                let mem = positive(
                    &format!("host {} gpu {}: memory_gb", h.name, g.name),
                    g.memory_gb,
                )?;
                if !(g.reserve_gb >= 0.0 && g.reserve_gb < mem) {
                    return Err(PlanError::Cluster(format!(
                        "host {} gpu {}: reserve_gb must be in [0, memory_gb)",
                        h.name, g.name
                    )));
                }
                for _ in 0..g.count {
                    gpus.push(Device {
                        name: g.name.clone(),
                        kind: DeviceKind::Gpu,
                        memory: ((mem - g.reserve_gb) * GB) as u64,
                        reserve: (g.reserve_gb * GB) as u64,
                        bandwidth: positive(
                            &format!("host {} gpu {}: bandwidth_gbs", h.name, g.name),
                            g.bandwidth_gbs,
                        )? * GB,
                        flops: positive(
                            &format!("host {} gpu {}: tflops", h.name, g.name),
                            g.tflops,
                        )? * 1e12,
                        layer_overhead_s: 30e-6,
                        rates: None,
                    });
                }
            }
            let pcie = Link {
                latency_s: 10e-6,
                bandwidth: positive(&format!("host {}: pcie_gbs", h.name), h.pcie_gbs)? * GB,
            };
            for i in 0..h.count {
                let name = if h.count == 1 {
                    h.name.clone()
                } else {
                    format!("{}-{}", h.name, i + 1)
                };
                hosts.push(Host {
                    name,
                    cpu: cpu.clone(),
                    gpus: gpus.clone(),
                    pcie,
                    local: Link {
                        latency_s: 50e-6,
                        bandwidth: 5.0 * GB,
                    },
                });
            }
        }
        if hosts.is_empty() {
            return Err(PlanError::Cluster("no [[host]] entries".into()));
        }
        let find = |n: &str| {
            hosts
                .iter()
                .position(|h| h.name == n)
                .ok_or_else(|| PlanError::Cluster(format!("unknown host {n:?}")))
        };
        for (i, h) in hosts.iter().enumerate() {
            if hosts[..i].iter().any(|o| o.name == h.name) {
                return Err(PlanError::Cluster(format!(
                    "host {:?} is named twice",
                    h.name
                )));
            }
        }
        let coordinator = match &self.coordinator {
            Some(n) => find(n)?,
            None => 0,
        };
        let mut links = BTreeMap::new();
        for l in &self.link {
            let (a, b) = (find(&l.hosts[0])?, find(&l.hosts[1])?);
            if a == b {
                return Err(PlanError::Cluster(format!(
                    "link from {} to itself",
                    l.hosts[0]
                )));
            }
            links.insert(
                (a.min(b), a.max(b)),
                link(
                    &format!("link {}-{}", l.hosts[0], l.hosts[1]),
                    l.latency_ms,
                    l.bandwidth_gbit,
                )?,
            );
        }
        Ok(Cluster {
            name: self.name,
            hosts,
            coordinator,
            network: link(
                "network",
                self.network.latency_ms,
                self.network.bandwidth_gbit,
            )?,
            links,
            coordinator_links: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_gpus_counts_and_links() {
        let c = Cluster::from_toml(
            r#"
            name = "t"
            coordinator = "b-1"
            [network]
            latency_ms = 0.5
            bandwidth_gbit = 1
            [[host]]
            name = "a"
            ram_gb = 64
            ram_bandwidth_gbs = 40
            cpu_tflops = 1
            [[host.gpu]]
            name = "RTX 3090"
            count = 3
            memory_gb = 24
            bandwidth_gbs = 936
            tflops = 71
            [[host]]
            name = "b"
            count = 2
            ram_gb = 256
            ram_bandwidth_gbs = 100
            cpu_tflops = 2
            [[link]]
            hosts = ["a", "b-2"]
            latency_ms = 0.1
            bandwidth_gbit = 10
            "#,
        )
        .unwrap();
        assert_eq!(c.hosts.len(), 3);
        assert_eq!(c.hosts[0].gpus.len(), 3);
        assert_eq!(c.hosts[0].gpus[0].memory, 23_000_000_000);
        assert_eq!(c.hosts[0].cpu.memory, 60_000_000_000);
        assert_eq!(c.coordinator, 1);
        assert_eq!(c.link(0, 2).latency_s, 1e-4);
        assert_eq!(c.link(0, 1).bandwidth, 125e6);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let e =
            Cluster::from_toml("[[host]]\nname='a'\nram_gb=-1\nram_bandwidth_gbs=1\ncpu_tflops=1")
                .unwrap_err()
                .to_string();
        assert!(e.contains("ram_gb must be a positive"), "{e}");
        let e = Cluster::from_toml("").unwrap_err().to_string();
        assert!(e.contains("no [[host]]"), "{e}");
        let e = Cluster::from_toml(
            "[[host]]\nname='a'\nram_gb=1\nram_bandwidth_gbs=1\ncpu_tflops=1\nwat=1",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("wat"), "{e}");
        let e = Cluster::from_toml(
            "coordinator='x'\n[[host]]\nname='a'\nram_gb=8\nram_bandwidth_gbs=1\ncpu_tflops=1",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown host \"x\""), "{e}");
        let e = Cluster::from_toml("[[host]]\nname='a'\ncount=100000\nram_gb=8\nram_bandwidth_gbs=1\ncpu_tflops=1").unwrap_err().to_string();
        assert!(e.contains("more than 64 hosts"), "{e}");
        let e = Cluster::from_toml("[[host]]\nname='a'\nram_gb=8\nram_bandwidth_gbs=1\ncpu_tflops=1\n[[host.gpu]]\nname='g'\ncount=99\nmemory_gb=1\nbandwidth_gbs=1\ntflops=1").unwrap_err().to_string();
        assert!(e.contains("99 GPUs"), "{e}");
    }
}
