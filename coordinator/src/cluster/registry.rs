//! The embedded registry: workers join the coordinator directly (`shoal worker --join`).
//!
//! [`Registry`] serves `shoal.v1.Coordinator`. A `Join` from a new address is answered only
//! after the coordinator has dialled that address back ([`pipeline::connect`]: Hello and
//! Inventory), so every worker it lists is one it can reach; a join from a known address
//! (the worker's heartbeat) refreshes its last-seen time. [`Registry::wait_for`] hands the
//! first joined workers to whoever builds the pipeline. `Status` reports the cluster: the
//! plan that [`Registry::set_plan`] recorded and, measured while answering, each worker's
//! counters, memory and round trips, one bounded probe per worker, concurrently, so one
//! unreachable worker shows up as such without failing the call.
//!
//! The registry keeps no state beyond this process (no etcd yet): a restarted coordinator
//! learns its workers again from their next heartbeat. It talks to workers only through
//! `shoal-proto`.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shoal_proto::v1::{self, coordinator_server, worker_client::WorkerClient};
use tokio::sync::watch;
use shoal_proto::security::Channel;
use tonic::{Request, Response, Status};

use super::pipeline::{self, Pipeline};
use super::{Error, Result};

/// How often workers join again, unless [`Registry::with_heartbeat`] says otherwise.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A worker not heard from for this many heartbeats is not handed out by
/// [`Registry::wait_for`] (it is still listed by `Status`).
pub const STALE_HEARTBEATS: u32 = 5;
/// Longest `Status` waits for one worker (connecting, Health, Stats, GetInventory).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One stage of the plan the coordinator loaded, as `Status` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageInfo {
    /// The worker's address (as joined, or as given by `--workers`).
    pub addr: String,
    pub layers: Range<usize>,
    pub embed: bool,
    pub head: bool,
}

impl StageInfo {
    /// The stages of a loaded pipeline, stage 0 first.
    pub fn of(p: &Pipeline) -> Vec<StageInfo> {
        p.stages
            .iter()
            .map(|(w, s)| StageInfo { addr: w.addr.clone(), layers: s.layers.clone(), embed: s.embed, head: s.head })
            .collect()
    }
}

/// The registry: cheap to clone, every clone shares the same state.
#[derive(Clone, Debug)]
pub struct Registry(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    name: String,
    heartbeat: Duration,
    state: Mutex<State>,
    // Bumped on every join (new or heartbeat), so waiters look again.
    joins: watch::Sender<u64>,
}

#[derive(Debug)]
struct State {
    // In join order.
    joined: Vec<Joined>,
    plan: Vec<StageInfo>,
    // The served plan and its inputs (`Coordinator.Plan`).
    planned: Option<(shoal_planner::Plan, pipeline::Planning)>,
    what: String,
    model: (String, String),
    // Channels `Status` probes workers on, by address.
    probes: HashMap<String, WorkerClient<Channel>>,
}

#[derive(Debug)]
struct Joined {
    worker: pipeline::Worker,
    node_name: String,
    last_seen: Instant,
}

impl Registry {
    /// An empty registry named `name` (in `JoinReply` and `Status`), in state
    /// "waiting for workers".
    pub fn new(name: impl Into<String>) -> Registry {
        Registry::with_heartbeat(name, HEARTBEAT)
    }

    /// Like [`Registry::new`], asking workers to join again every `heartbeat`.
    pub fn with_heartbeat(name: impl Into<String>, heartbeat: Duration) -> Registry {
        Registry(Arc::new(Inner {
            name: name.into(),
            heartbeat,
            state: Mutex::new(State {
                joined: Vec::new(),
                plan: Vec::new(),
                planned: None,
                what: "waiting for workers".into(),
                model: Default::default(),
                probes: HashMap::new(),
            }),
            joins: watch::Sender::new(0),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tonic service to add to a server (`Server::builder().add_service(r.service())`).
    pub fn service(&self) -> coordinator_server::CoordinatorServer<Registry> {
        coordinator_server::CoordinatorServer::new(self.clone())
    }

    /// Waits until `n` live workers have joined and returns the first `n` of them in join
    /// order. Workers silent for [`STALE_HEARTBEATS`] heartbeats are skipped.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Result<Vec<pipeline::Worker>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.0.joins.subscribe();
        loop {
            rx.borrow_and_update();
            let live = self.live();
            if live.len() >= n {
                return Ok(live.into_iter().take(n).collect());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `self`, so `changed` cannot fail; time is up.
                Ok(Err(_)) | Err(_) => {
                    return Err(Error::NotEnoughWorkers { have: self.live().len(), want: n, waited: timeout });
                }
            }
        }
    }

    /// A receiver that changes whenever a worker joins, heartbeats or leaves.
    pub fn joins(&self) -> watch::Receiver<u64> {
        self.0.joins.subscribe()
    }

    /// Joined workers heard from recently, in join order.
    pub fn live(&self) -> Vec<pipeline::Worker> {
        let stale = self.0.heartbeat * STALE_HEARTBEATS;
        self.state().joined.iter().filter(|j| j.last_seen.elapsed() < stale).map(|j| j.worker.clone()).collect()
    }

    /// Records the loaded plan, stage 0 first; `Status` lists these workers first.
    pub fn set_plan(&self, stages: Vec<StageInfo>) {
        self.state().plan = stages;
    }

    /// Records the loaded pipeline: its stages for `Status` and its plan for `Plan`.
    pub fn set_pipeline(&self, p: &Pipeline) {
        let mut st = self.state();
        st.plan = StageInfo::of(p);
        st.planned = Some((p.plan.clone(), p.planning.clone()));
    }

    /// The served plan, or the plan for another context length or parallelism on the same
    /// workers and model (0: as served).
    pub fn plan(&self, ctx: u64, parallel: u64) -> v1::PlanReply {
        let Some((plan, planning)) = self.state().planned.clone() else {
            return v1::PlanReply { error: "no plan yet: the coordinator is still waiting for workers or loading".into(), ..Default::default() };
        };
        let serving = (ctx == 0 || ctx == plan.workload.ctx) && (parallel == 0 || parallel == plan.workload.parallel);
        let p = if serving {
            Ok(plan)
        } else {
            planning.replan(ctx, parallel)
        };
        match p {
            Ok(p) => v1::PlanReply {
                serving,
                plan_json: serde_json::to_string(&p).unwrap_or_default(),
                table: shoal_planner::report::table(&p),
                error: String::new(),
            },
            Err(e) => v1::PlanReply { error: e.to_string(), ..Default::default() },
        }
    }

    /// Says what the coordinator is doing ("loading", "serving", ...).
    pub fn set_state(&self, what: &str) {
        self.state().what = what.to_string();
    }

    /// Names the served model: its file name and identity ([`shoal_proto::model_identity`]).
    pub fn set_model(&self, name: &str, identity: &str) {
        self.state().model = (name.to_string(), identity.to_string());
    }

    /// Handles one `Join`.
    async fn join(&self, r: v1::JoinRequest) -> std::result::Result<v1::JoinReply, Status> {
        if !shoal_proto::is_compatible(r.protocol_major, r.protocol_minor) {
            return Err(Status::failed_precondition(format!(
                "protocol major {} is not supported: this coordinator speaks shoal.v1 {}.x",
                r.protocol_major,
                shoal_proto::PROTOCOL_MAJOR
            )));
        }
        let addr = r.advertise_addr.trim().to_string();
        if addr.is_empty() {
            return Err(Status::invalid_argument("advertise_addr is empty: say where the coordinator can reach you"));
        }
        let reply = v1::JoinReply {
            protocol_major: shoal_proto::PROTOCOL_MAJOR,
            protocol_minor: shoal_proto::PROTOCOL_MINOR,
            coordinator_name: self.0.name.clone(),
            heartbeat_ms: self.0.heartbeat.as_millis().clamp(1, u32::MAX as u128) as u32,
        };
        if self.touch(&addr, &r.node_name) {
            return Ok(reply);
        }
        // A new worker: dial it back before saying yes.
        // UNAVAILABLE whatever went wrong, so the worker retries: the versions already agree.
        let worker = pipeline::connect(&addr).await.map_err(|e| {
            Status::unavailable(format!("the coordinator cannot dial this worker back at its advertise address: {e}"))
        })?;
        {
            let mut st = self.state();
            // Another Join from the same address may have won the race.
            if !st.joined.iter().any(|j| j.worker.addr == addr) {
                tracing::info!(%addr, node = %r.node_name, "worker joined");
                st.joined.push(Joined { worker, node_name: r.node_name, last_seen: Instant::now() });
            }
        }
        self.0.joins.send_modify(|n| *n += 1);
        Ok(reply)
    }

    /// Admits a worker found otherwise than by its `Join` (etcd mode), with a `Join`'s
    /// checks: dialed back when new, refreshed when known.
    pub async fn admit(&self, addr: &str, node_name: &str) -> std::result::Result<(), Status> {
        let r = v1::JoinRequest {
            protocol_major: shoal_proto::PROTOCOL_MAJOR,
            protocol_minor: shoal_proto::PROTOCOL_MINOR,
            node_name: node_name.to_string(),
            advertise_addr: addr.to_string(),
            capabilities: Vec::new(),
        };
        self.join(r).await.map(|_| ())
    }

    /// Forgets the worker at `addr` (its etcd lease expired); false if it was unknown.
    pub fn remove(&self, addr: &str) -> bool {
        let removed = {
            let mut st = self.state();
            let before = st.joined.len();
            st.joined.retain(|j| j.worker.addr != addr);
            st.probes.remove(addr);
            st.joined.len() != before
        };
        if removed {
            self.0.joins.send_modify(|n| *n += 1);
        }
        removed
    }

    /// Refreshes a known worker's last-seen time; false if `addr` is unknown.
    fn touch(&self, addr: &str, node_name: &str) -> bool {
        let known = {
            let mut st = self.state();
            match st.joined.iter_mut().find(|j| j.worker.addr == addr) {
                Some(j) => {
                    j.last_seen = Instant::now();
                    if j.node_name != node_name {
                        j.node_name = node_name.to_string();
                    }
                    true
                }
                None => false,
            }
        };
        if known {
            self.0.joins.send_modify(|n| *n += 1);
        }
        known
    }

    /// Builds the cluster status: the plan's stages, then the other joined workers, each
    /// probed concurrently within [`PROBE_TIMEOUT`].
    pub async fn status(&self) -> v1::ClusterStatus {
        struct Target {
            addr: String,
            stage: Option<(usize, StageInfo)>,
            joined: Option<(String, Duration)>,
            client: Option<WorkerClient<Channel>>,
        }
        let (targets, what, model) = {
            let st = self.state();
            let joined_info = |addr: &str| {
                st.joined.iter().find(|j| j.worker.addr == addr).map(|j| (j.node_name.clone(), j.last_seen.elapsed()))
            };
            let mut targets: Vec<Target> = st
                .plan
                .iter()
                .enumerate()
                .map(|(i, s)| Target {
                    addr: s.addr.clone(),
                    stage: Some((i, s.clone())),
                    joined: joined_info(&s.addr),
                    client: st.probes.get(&s.addr).cloned(),
                })
                .collect();
            for j in &st.joined {
                if !st.plan.iter().any(|s| s.addr == j.worker.addr) {
                    targets.push(Target {
                        addr: j.worker.addr.clone(),
                        stage: None,
                        joined: Some((j.node_name.clone(), j.last_seen.elapsed())),
                        client: st.probes.get(&j.worker.addr).cloned(),
                    });
                }
            }
            (targets, st.what.clone(), st.model.clone())
        };
        let tasks: Vec<_> = targets
            .into_iter()
            .map(|t| {
                let this = self.clone();
                tokio::spawn(async move {
                    let mut ws = v1::WorkerStatus {
                        addr: t.addr.clone(),
                        planned: t.stage.is_some(),
                        joined: t.joined.is_some(),
                        ..Default::default()
                    };
                    if let Some((i, s)) = &t.stage {
                        ws.stage = *i as u32;
                        ws.layer_start = s.layers.start as u32;
                        ws.layer_end = s.layers.end as u32;
                        ws.embed = s.embed;
                        ws.head = s.head;
                    }
                    if let Some((name, ago)) = &t.joined {
                        ws.node_name = name.clone();
                        ws.last_seen_ms_ago = Some(ago.as_millis() as u64);
                    }
                    match tokio::time::timeout(PROBE_TIMEOUT, this.probe(&t.addr, t.client, &mut ws)).await {
                        Ok(Ok(())) => ws.reachable = true,
                        Ok(Err(e)) => ws.error = e,
                        Err(_) => ws.error = format!("no answer within {PROBE_TIMEOUT:?}"),
                    }
                    ws
                })
            })
            .collect();
        let mut workers = Vec::with_capacity(tasks.len());
        for t in tasks {
            // A probe task cannot panic short of a bug; it would only lose its row.
            if let Ok(ws) = t.await {
                workers.push(ws);
            }
        }
        v1::ClusterStatus {
            coordinator_name: self.0.name.clone(),
            model_name: model.0,
            model_identity: model.1,
            state: what,
            workers,
        }
    }

    /// Measures one worker into `ws`: a timed Health, then Stats and GetInventory.
    async fn probe(
        &self,
        addr: &str,
        client: Option<WorkerClient<Channel>>,
        ws: &mut v1::WorkerStatus,
    ) -> std::result::Result<(), String> {
        let mut c = match client {
            Some(c) => c,
            None => {
                let ch = shoal_worker::service::connect(addr).await.map_err(|e| shoal_proto::error_chain(&e))?;
                let mut c = WorkerClient::new(ch);
                // Untimed: the first call may still be setting the connection up.
                c.health(v1::HealthRequest {}).await.map_err(|s| s.message().to_string())?;
                self.state().probes.insert(addr.to_string(), c.clone());
                c
            }
        };
        let t = Instant::now();
        c.health(v1::HealthRequest {}).await.map_err(|s| s.message().to_string())?;
        ws.rtt_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut c2 = c.clone();
        let (stats, inv) = tokio::join!(c.stats(v1::StatsRequest {}), c2.get_inventory(v1::InventoryRequest::default()));
        let stats = stats.map_err(|s| s.message().to_string())?.into_inner();
        let inv = inv.map_err(|s| s.message().to_string())?.into_inner();
        if ws.node_name.is_empty() {
            ws.node_name = inv.node_name;
        }
        ws.ram_total_bytes = inv.ram_total_bytes;
        ws.ram_free_bytes = inv.ram_free_bytes;
        ws.loaded = stats.loaded;
        if stats.loaded {
            // What the worker holds is the truth, whatever the plan says.
            ws.layer_start = stats.layer_start;
            ws.layer_end = stats.layer_end;
            ws.embed = stats.embed;
            ws.head = stats.head;
        }
        ws.shard_bytes = stats.shard_bytes;
        ws.kv_bytes = stats.kv_bytes;
        ws.shard_loads = stats.loads;
        ws.sequences = stats.sequences;
        ws.steps = stats.steps;
        ws.tokens = stats.tokens;
        ws.compute_ms_per_step = if stats.steps == 0 { 0.0 } else { stats.compute_ns as f64 / stats.steps as f64 / 1e6 };
        ws.next_stage_rtt_ms = stats.next_stage_rtt_ns as f64 / 1e6;
        ws.next_stage = stats.next_stage;
        ws.next_stage_error = stats.next_stage_error;
        Ok(())
    }
}

#[tonic::async_trait]
impl coordinator_server::Coordinator for Registry {
    async fn join(&self, req: Request<v1::JoinRequest>) -> std::result::Result<Response<v1::JoinReply>, Status> {
        Registry::join(self, req.into_inner()).await.map(Response::new)
    }

    async fn status(&self, _: Request<v1::StatusRequest>) -> std::result::Result<Response<v1::ClusterStatus>, Status> {
        Ok(Response::new(Registry::status(self).await))
    }

    async fn plan(&self, req: Request<v1::PlanRequest>) -> std::result::Result<Response<v1::PlanReply>, Status> {
        let r = req.into_inner();
        let this = self.clone();
        // Planning again runs the optimizer: keep it off the async threads.
        let reply = tokio::task::spawn_blocking(move || this.plan(r.ctx, r.parallel))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(reply))
    }
}

/// Serves the registry alone on `listener` until the process ends (a command that serves
/// other services too adds [`Registry::service`] to its own server instead).
pub async fn serve_registry(listener: tokio::net::TcpListener, registry: Registry) -> Result<()> {
    let sec = shoal_proto::security::get();
    // `Server::tcp_nodelay` applies only to listeners tonic binds itself: set it on each
    // accepted socket here, or small replies wait for the peer's delayed ACK (40 ms).
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |r| {
        r.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = sec.server_tls() {
        server = server.tls_config(tls).map_err(|e| Error::Serve(shoal_proto::error_chain(&e)))?;
    }
    server
        .tcp_nodelay(true)
        .add_service(tonic::service::interceptor::InterceptedService::new(registry.service(), sec.require_token()))
        .serve_with_incoming(incoming)
        .await
        .map_err(|e| Error::Serve(shoal_proto::error_chain(&e)))
}
