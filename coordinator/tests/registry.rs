//! The embedded registry end to end: an in-process `Registry` on 127.0.0.1, real
//! `shoal worker --join` processes, real `shoal status` runs. Workers must join and be
//! handed out with their inventories, refusals must be clear and final, and `shoal status`
//! must show each stage's layers, counters and round trips after a real generation.

use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};

use shoal_coordinator::cluster::pipeline::{LoadOptions, Pipeline};
use shoal_coordinator::cluster::registry::{Registry, StageInfo, serve_registry};
use shoal_kernels::codec::Codec;
use shoal_model::gguf::GgufFile;
use shoal_proto::v1::{self, coordinator_client::CoordinatorClient, coordinator_server, worker_client::WorkerClient};

mod common;
use shoal_coordinator::cluster::scheduler::{Scheduler, SchedulerConfig};
use shoal_model::engine::GenerateRequest;
use shoal_model::sampling::SamplingParams;
use common::{SHOAL, SMOLLM2, model_path, models_dir};

/// Worker processes, killed and reaped when dropped (also when a test panics).
#[derive(Default)]
struct Workers {
    children: Vec<(Child, Option<ChildStdin>)>,
}

impl Workers {
    /// Starts `shoal worker --listen 127.0.0.1:0 --join COORDINATOR ...` and returns the
    /// address it printed.
    fn start(&mut self, coordinator: &str, name: &str) -> String {
        let mut child = Command::new(SHOAL)
            .args(["worker", "--listen", "127.0.0.1:0", "--exit-with-parent", "--join", coordinator, "--name", name])
            .arg("--models-dir")
            .arg(models_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let out = child.stdout.take().unwrap();
        self.children.push((child, stdin));
        let line = common::first_line(out);
        line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("worker said {line:?}")).to_string()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for (c, _) in &mut self.children {
            let _ = c.kill();
        }
        for (c, _) in &mut self.children {
            let _ = c.wait();
        }
    }
}

/// Serves `registry` on `listener` in the background; returns its address.
async fn serve(registry: &Registry, listener: tokio::net::TcpListener) -> String {
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(serve_registry(listener, registry.clone()));
    addr
}

async fn start_registry(name: &str) -> (Registry, String) {
    let registry = Registry::new(name);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = serve(&registry, listener).await;
    (registry, addr)
}

/// Runs the `shoal` binary off the async runtime (the registry it talks to runs on it).
async fn shoal(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || Command::new(SHOAL).args(&args).stdin(Stdio::null()).output().unwrap())
        .await
        .unwrap()
}

/// A port nothing listens on (bound, then closed).
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_join_and_are_handed_out_with_their_inventories() {
    let (registry, addr) = start_registry("test").await;
    let mut workers = Workers::default();
    let a = workers.start(&addr, "w-a");
    let b = workers.start(&addr, "w-b");
    let t = Instant::now();
    let got = registry.wait_for(2, Duration::from_secs(30)).await.unwrap();
    eprintln!("2 workers joined in {:?}", t.elapsed());
    let mut addrs: Vec<&str> = got.iter().map(|w| w.addr.as_str()).collect();
    addrs.sort();
    let mut want = vec![a.as_str(), b.as_str()];
    want.sort();
    assert_eq!(addrs, want);
    for w in &got {
        assert_eq!(w.hello.protocol_major, shoal_proto::PROTOCOL_MAJOR);
        assert!(w.inventory.node_name.starts_with("w-"), "{:?}", w.inventory);
        assert!(w.inventory.ram_total_bytes > 0 && w.inventory.memory_bandwidth_bytes_per_s > 0);
        assert!(w.inventory.models.iter().any(|m| m.name == SMOLLM2), "{:?}", w.inventory.models);
    }
    // Heartbeats keep them listed once, with a recent last-seen time.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(registry.live().len(), 2);
    let st = registry.status().await;
    assert_eq!(st.workers.len(), 2, "{st:?}");
    for w in &st.workers {
        assert!(w.joined && w.reachable && !w.planned && !w.loaded, "{w:?}");
        assert!(w.last_seen_ms_ago.unwrap() < 4000, "{w:?}");
    }
    // Not enough workers: a clear, bounded failure.
    let e = registry.wait_for(3, Duration::from_millis(300)).await.unwrap_err();
    assert_eq!(e.to_string(), "2 of 3 workers joined within 300ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_from_another_protocol_major_is_refused() {
    let (registry, addr) = start_registry("test").await;
    let mut c = CoordinatorClient::connect(format!("http://{addr}")).await.unwrap();
    let join = |major: u32, advertise: &str| v1::JoinRequest {
        protocol_major: major,
        protocol_minor: 0,
        node_name: "x".into(),
        advertise_addr: advertise.into(),
        capabilities: vec![],
    };
    let e = c.join(join(shoal_proto::PROTOCOL_MAJOR + 1, "127.0.0.1:1")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert_eq!(e.message(), "protocol major 2 is not supported: this coordinator speaks shoal.v1 1.x");
    let e = c.join(join(shoal_proto::PROTOCOL_MAJOR, "")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // An address the coordinator cannot dial back is not recorded; the worker may retry.
    let e = c.join(join(shoal_proto::PROTOCOL_MAJOR, &closed_port())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.message().contains("cannot dial this worker back"), "{}", e.message());
    assert!(registry.live().is_empty());
    assert!(registry.status().await.workers.is_empty());
}

/// A coordinator that refuses every worker, as one of another major would.
struct Refuser;

#[tonic::async_trait]
impl coordinator_server::Coordinator for Refuser {
    async fn join(&self, _: tonic::Request<v1::JoinRequest>) -> Result<tonic::Response<v1::JoinReply>, tonic::Status> {
        Err(tonic::Status::failed_precondition("protocol major 1 is not supported: this coordinator speaks shoal.v1 2.x"))
    }
    async fn status(&self, _: tonic::Request<v1::StatusRequest>) -> Result<tonic::Response<v1::ClusterStatus>, tonic::Status> {
        Err(tonic::Status::unimplemented("no"))
    }
    async fn plan(&self, _: tonic::Request<v1::PlanRequest>) -> Result<tonic::Response<v1::PlanReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("no"))
    }
}

/// Runs `shoal worker` to its end (at most 30 s) and returns its status and stderr.
async fn worker_until_exit(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    args.extend(["--models-dir".to_string(), models_dir().display().to_string()]);
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(SHOAL)
            .arg("worker")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_worker_exits_with_one_clear_line() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(coordinator_server::CoordinatorServer::new(Refuser))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let t = Instant::now();
    let (status, stderr) = worker_until_exit(&["--listen", "127.0.0.1:0", "--join", &addr]).await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(
        stderr.trim(),
        format!(
            "shoal: error: coordinator {addr} refused this worker: protocol major 1 is not supported: this \
             coordinator speaks shoal.v1 2.x"
        )
    );
    // Listening on every interface without --advertise: the coordinator could not dial back.
    let (status, stderr) = worker_until_exit(&["--listen", "0.0.0.0:0", "--join", &addr]).await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("pass --advertise HOST:PORT"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_keeps_trying_until_the_coordinator_comes_up() {
    let port = closed_port();
    let mut workers = Workers::default();
    let w = workers.start(&port, "early");
    // The worker serves while it retries.
    let mut c = WorkerClient::connect(format!("http://{w}")).await.unwrap();
    assert!(c.health(v1::HealthRequest {}).await.unwrap().into_inner().serving);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let registry = Registry::new("late");
    let listener = tokio::net::TcpListener::bind(&port).await.unwrap();
    serve(&registry, listener).await;
    let t = Instant::now();
    let got = registry.wait_for(1, Duration::from_secs(15)).await.unwrap();
    eprintln!("joined {:?} after the coordinator came up", t.elapsed());
    assert_eq!(got[0].addr, w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_status_shows_both_stages_after_a_generation() {
    let (registry, addr) = start_registry("status-test").await;
    let mut workers = Workers::default();
    workers.start(&addr, "s0");
    workers.start(&addr, "s1");
    let joined = registry.wait_for(2, Duration::from_secs(30)).await.unwrap();
    registry.set_state("loading");
    let file = GgufFile::open(model_path(SMOLLM2)).unwrap();
    let header = &file.bytes()[..file.header().data_offset as usize];
    let identity = shoal_proto::model_identity(header, file.file_size());
    registry.set_model(SMOLLM2, &identity);
    let opts = LoadOptions {
        model_file: SMOLLM2.into(),
        n_ctx: 256,
        n_threads: 1,
        attn_threads: 1,
        codec: Codec::F32,
        kv_budget: 0,
        worker_threads: vec![],
        parallel: 1,
        even: true,
        reorder: false,
        expert_host: None,
        tp_followers: Default::default(),
        tp_mode: Default::default(),
    };
    let p = Pipeline::load(joined, &file, &opts).await.unwrap();
    let plan = StageInfo::of(&p);
    assert_eq!(plan.len(), 2);
    registry.set_pipeline(&p);
    registry.set_state("serving");
    let sched = Scheduler::start(p, SchedulerConfig::default());
    let req = GenerateRequest {
        prompt_tokens: vec![1, 504, 3575, 282, 4649, 314],
        params: SamplingParams::greedy(),
        max_tokens: 6,
        stop: vec![],
        stop_at_eog: false,
    };
    let tokens = sched.sample_loop(&req, false, |_, _| true).await.unwrap();
    assert_eq!(tokens.len(), 6);

    let t = Instant::now();
    let out = shoal(vec!["status".into(), "--coordinator".into(), addr.clone(), "--json".into()]).await;
    eprintln!("shoal status --json took {:?}", t.elapsed());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["coordinator_name"], "status-test");
    assert_eq!(st["model_name"], SMOLLM2);
    assert_eq!(st["model_identity"], identity.as_str());
    assert_eq!(st["state"], "serving");
    let ws = st["workers"].as_array().unwrap();
    assert_eq!(ws.len(), 2, "{st:#}");
    let n_layer = 30; // SmolLM2-135M
    for (i, (w, s)) in ws.iter().zip(&plan).enumerate() {
        assert_eq!(w["addr"], s.addr.as_str(), "{st:#}");
        assert_eq!(w["stage"], i);
        assert!(w["reachable"].as_bool().unwrap() && w["planned"].as_bool().unwrap() && w["joined"].as_bool().unwrap());
        assert_eq!(w["layer_start"], s.layers.start);
        assert_eq!(w["layer_end"], s.layers.end);
        assert_eq!(w["embed"], i == 0);
        assert_eq!(w["head"], i == 1);
        assert!(w["steps"].as_u64().unwrap() >= 6, "{w:#}");
        assert!(w["shard_bytes"].as_u64().unwrap() > 0, "{w:#}");
        assert!(w["compute_ms_per_step"].as_f64().unwrap() > 0.0, "{w:#}");
        assert!(w["rtt_ms"].as_f64().unwrap() > 0.0, "{w:#}");
        assert!(w["ram_total_bytes"].as_u64().unwrap() >= w["ram_free_bytes"].as_u64().unwrap());
        assert!(w["tokens"].as_u64().unwrap() >= 6 + 5, "{w:#}");
    }
    assert_eq!(ws[0]["layer_start"], 0);
    assert_eq!(ws[0]["layer_end"], ws[1]["layer_start"]);
    assert_eq!(ws[1]["layer_end"], n_layer);
    assert_eq!(ws[0]["next_stage"], plan[1].addr.as_str());
    assert!(ws[0]["next_stage_rtt_ms"].as_f64().unwrap() > 0.0, "{st:#}");
    assert_eq!(ws[0]["next_stage_error"], "");
    assert_eq!(ws[1]["next_stage"], "");
    assert_eq!(ws[1]["next_stage_rtt_ms"], 0.0);

    // The table: a model line, a state line, a header and one row per worker.
    let out = shoal(vec!["status".into(), "--coordinator".into(), addr.clone()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    eprintln!("{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert!(lines[0].contains(SMOLLM2) && lines[1].contains("serving"), "{text}");
    assert!(lines[3].contains(&plan[0].addr) && lines[3].contains(&format!("[0, {}) +embed", plan[0].layers.end)));
    assert!(lines[4].contains(&plan[1].addr) && lines[4].contains(&format!("[{}, 30) +head", plan[1].layers.start)));

    // `shoal plan --coordinator` prints the plan being served: the same stages, with the
    // prediction made from the workers' calibrated kernels.
    let out = shoal(vec!["plan".into(), "--coordinator".into(), addr.clone(), "--json".into()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["serving"], true, "{j:#}");
    let stages = j["plan"]["stages"].as_array().unwrap();
    assert_eq!(stages.len(), plan.len());
    for (s, want) in stages.iter().zip(&plan) {
        assert_eq!(s["label"], format!("{}/cpu", want.addr));
        assert_eq!(s["layers"]["start"], want.layers.start);
        assert_eq!(s["layers"]["end"], want.layers.end);
    }
    let decode = j["plan"]["prediction"]["decode_tok_s_single"].as_f64().unwrap();
    assert!(decode > 1.0 && decode < 1e5, "{decode}");
    // A what-if on the same workers is labelled as such.
    let out = shoal(vec!["plan".into(), "--coordinator".into(), addr.clone(), "--parallel".into(), "4".into()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("parallel 4") && text.contains("what-if"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_stage_is_shown_not_fatal() {
    let (registry, addr) = start_registry("test").await;
    let mut workers = Workers::default();
    let up = workers.start(&addr, "up");
    registry.wait_for(1, Duration::from_secs(30)).await.unwrap();
    let down = closed_port();
    registry.set_plan(vec![
        StageInfo { addr: up.clone(), layers: 0..10, embed: true, head: false },
        StageInfo { addr: down.clone(), layers: 10..30, embed: false, head: true },
    ]);
    let t = Instant::now();
    let st = registry.status().await;
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
    assert_eq!(st.workers.len(), 2);
    let (a, b) = (&st.workers[0], &st.workers[1]);
    assert!(a.reachable && a.joined && !a.loaded && a.layer_end == 10, "{a:?}");
    assert!(!b.reachable && !b.joined && !b.error.is_empty() && b.layer_start == 10 && b.head, "{b:?}");
    // The table names it.
    let out = shoal(vec!["status".into(), "--coordinator".into(), addr]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!("{down}: unreachable:")), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_status_against_a_closed_port_exits_1_with_one_line() {
    let port = closed_port();
    let t = Instant::now();
    let out = shoal(vec!["status".into(), "--coordinator".into(), port.clone()]).await;
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with(&format!("shoal: error: cannot reach the coordinator at {port}")), "{err}");
}
