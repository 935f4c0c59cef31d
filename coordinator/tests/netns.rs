//! The cluster across "hosts": the coordinator and three workers each in their own network
//! namespace (`scripts/netns-cluster`), joined by a bridge; every link carries a 0.5 ms one-way
//! delay (host to host; a round trip 1 ms) and a 1 Gbit/s rate. Greedy `shoal run --worker
//! ...` from the coordinator's namespace must print byte for byte what single-process `shoal
//! run` prints, with stages talking to each other over the bridge rather than 127.0.0.1.
//!
//! The delay comes from netem on each host's egress where the kernel has it. Where it does not
//! (`CONFIG_NET_SCH_NETEM` off, e.g. some microVM kernels) the links get the rate alone (tbf)
//! and the delay comes from `shoal delay-proxy`: one per worker, in the worker's namespace in
//! front of its port, and the coordinator is given the proxies' addresses. The coordinator
//! hands those same addresses to each stage as its next stage, so every hop (coordinator to
//! stage 1, stage to stage, and the answers back) crosses a proxy and gets the delay each way.
//! The output says which of the two ran.
//!
//! Needs root and iproute2; prints `SKIPPED` and why otherwise. The shaping is measured, not
//! just listed: an HTTP/2 PING round trip on each hop, from the sender's namespace to the
//! address the stage is dialed at (worker or proxy), must take at least 2 delays; a bulk
//! transfer must not beat the rate. Nothing outlives the test: a guard kills the workers and
//! proxies and removes the namespaces on drop (panics included), they exit when their stdin
//! pipe closes (the test dying by a signal included), and namespaces left by a test process
//! that was killed are removed by the next run.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{QWEN, SHOAL, SMOLLM2, model_path, models_dir};

/// One way, host to host (so a round trip takes two).
const DELAY_MS: f64 = 0.5;
const RATE_BITS: f64 = 1e9;
const N_WORKERS: usize = 3;
const WORKER_PORT: u16 = 7070;
/// Where a worker's delay proxy listens, on the worker's address, without netem.
const PROXY_PORT: u16 = 7071;
/// Prefix of this test's clusters; the process id follows, so stale ones can be found.
const PREFIX: &str = "shoalt";
/// Longest any one command may take before the test kills it and fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/netns-cluster")
}

/// Why this machine cannot run the test, if it cannot.
fn skip_reason() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().next());
    if uid != Some("0") {
        return Some("not root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    for tool in ["ip", "tc"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("`{tool}` is not installed (apt-get install -y iproute2)"));
        }
    }
    // Root in an unprivileged container cannot make namespaces: say so rather than fail.
    let probe = format!("{PREFIX}{}-probe", std::process::id());
    let out = Command::new("ip").args(["netns", "add", &probe]).output().expect("ip");
    if !out.status.success() {
        return Some(format!("cannot create network namespaces here: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    None
}

/// Runs `cmd`, killing it and failing after [`COMMAND_TIMEOUT`].
fn output_within(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > COMMAND_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

fn netns_cluster(args: &[&str]) -> Output {
    output_within(Command::new(script()).args(args))
}

/// The namespaces whose name starts with `prefix-`.
fn namespaces(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect()
}

/// Removes clusters of earlier runs of this test whose process no longer exists (killed by a
/// signal, so their guard never ran).
fn remove_stale_clusters() {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    // A cluster's prefix is PREFIX, the pid of the test process, and maybe a letter.
    let mut stale: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.strip_prefix(PREFIX)?.split_once('-'))
        .map(|(cluster, _)| cluster.to_string())
        .filter(|cluster| {
            let pid: String = cluster.chars().take_while(char::is_ascii_digit).collect();
            pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists()
        })
        .collect();
    stale.sort();
    stale.dedup();
    for cluster in stale {
        eprintln!("removing the stale cluster {PREFIX}{cluster}");
        netns_cluster(&["down", &format!("{PREFIX}{cluster}")]);
    }
}

/// A process of the cluster (a worker or a delay proxy) in its namespace; its stdin pipe,
/// held here, is its lifeline.
struct Proc {
    child: Child,
    _stdin: ChildStdin,
    log: PathBuf,
}

/// What delays the links.
#[derive(Clone, Copy, Debug, PartialEq)]
enum DelayBy {
    /// netem on each host's eth0.
    Netem,
    /// `shoal delay-proxy` in front of each worker (this kernel has no netem).
    Proxy,
}

/// The cluster: namespaces, worker and proxy processes, all removed on drop.
struct Cluster {
    prefix: String,
    delay_by: DelayBy,
    procs: Vec<Proc>,
    /// The address the coordinator (and each previous stage) dials each stage at: the
    /// worker's own, or its proxy's.
    stages: Vec<String>,
}

impl Cluster {
    /// Brings the namespaces up, with netem's delay where the kernel has it.
    fn up(prefix: &str) -> Cluster {
        let check = netns_cluster(&["netem-check"]);
        let delay_by = match check.status.code() {
            Some(0) => DelayBy::Netem,
            Some(3) => DelayBy::Proxy,
            _ => panic!("netns-cluster netem-check: {}", String::from_utf8_lossy(&check.stderr)),
        };
        let c = Cluster { prefix: prefix.into(), delay_by, procs: Vec::new(), stages: Vec::new() };
        let n = N_WORKERS.to_string();
        let delay = format!("{DELAY_MS}ms");
        let rate = format!("{}gbit", RATE_BITS / 1e9);
        let out = netns_cluster(&["up", prefix, &n, "--delay", &delay, "--rate", &rate]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "netns-cluster up failed: {err}");
        if delay_by == DelayBy::Proxy {
            assert!(err.contains("delay-proxy"), "up without netem does not point to delay-proxy: {err}");
        }
        c
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn addr(&self, host: &str) -> String {
        let out = netns_cluster(&["addr", &self.prefix, host]);
        assert!(out.status.success(), "addr {host}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Starts `cmd` (a process that prints `listening on ADDR` once bound, and exits when its
    /// stdin closes) and returns ADDR.
    fn spawn(&mut self, what: &str, mut cmd: Command) -> String {
        let log = std::env::temp_dir().join(format!("{}-{what}.log", self.prefix));
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        // The guard owns the child from here, so a failure below still kills it.
        self.procs.push(Proc { child, _stdin: stdin, log: log.clone() });
        let line = common::first_line(stdout);
        let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| {
            let err = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("{what} did not start (said {line:?}): {err}")
        });
        addr.to_string()
    }

    /// Starts `shoal worker` in each worker namespace, listening on its address, and without
    /// netem a `shoal delay-proxy` in front of it.
    fn start_workers(&mut self) {
        for i in 1..=N_WORKERS {
            let host = format!("w{i}");
            let listen = format!("{}:{WORKER_PORT}", self.addr(&host));
            let mut cmd = Command::new(script());
            // Plaintext between namespaces (the shaping check speaks raw HTTP/2 to each
            // port); mutual TLS is tested in `security.rs`.
            cmd.args(["exec", &self.prefix, &host, SHOAL, "worker", "--insecure", "--exit-with-parent"])
                .args(["--listen", &listen, "--name", &host, "--models-dir"])
                .arg(models_dir());
            let addr = self.spawn(&host, cmd);
            assert_eq!(addr, listen, "worker {host} bound elsewhere");
            if self.delay_by == DelayBy::Proxy {
                let mut cmd = Command::new(script());
                cmd.env("SHOAL_BIN", SHOAL)
                    .args(["proxy", &self.prefix, &host, &PROXY_PORT.to_string(), &WORKER_PORT.to_string()])
                    .args(["--delay", &format!("{DELAY_MS}ms"), "--exit-with-parent"]);
                let proxy = self.spawn(&format!("{host}-proxy"), cmd);
                assert_eq!(proxy, format!("{}:{PROXY_PORT}", self.addr(&host)), "proxy of {host} bound elsewhere");
                self.stages.push(proxy);
            } else {
                self.stages.push(addr);
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
            if panicking {
                eprintln!("--- {}:\n{}", p.log.display(), std::fs::read_to_string(&p.log).unwrap_or_default());
            }
            let _ = std::fs::remove_file(&p.log);
        }
        let out = netns_cluster(&["down", &self.prefix]);
        if !out.status.success() || panicking {
            eprintln!("netns-cluster down: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

mod netns {
    use std::os::fd::AsRawFd;

    unsafe extern "C" {
        fn setns(fd: i32, nstype: i32) -> i32;
    }
    const CLONE_NEWNET: i32 = 0x4000_0000;

    /// Runs `f` on a thread that has entered the network namespace `name`. Network namespaces
    /// are per thread, so the rest of the test stays where it is; sockets keep the namespace
    /// they were made in wherever they are moved afterwards.
    pub fn within<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{name}");
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: `setns` reads a valid open descriptor and changes only this thread's
            // network namespace; it touches no memory of ours.
            let r = unsafe { setns(ns.as_raw_fd(), CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }
}

/// Measures the link from the coordinator to worker 1, directly (no proxy): the smallest TCP
/// handshake time of several connects (one round trip) and the rate of a bulk transfer, with a
/// listener of this process inside w1's namespace.
fn measure_link(c: &Cluster) -> (Duration, f64) {
    let w1 = c.addr("w1");
    let listener = netns::within(&c.ns("w1"), move || TcpListener::bind((w1.as_str(), 0)).unwrap());
    let to = listener.local_addr().unwrap();
    const BULK: usize = 32 << 20;
    let sink = std::thread::spawn(move || {
        // The handshake probes first (their connections are closed unread), then the bulk one.
        let mut n = 0;
        for s in listener.incoming() {
            let mut s = s.unwrap();
            n = std::io::copy(&mut s, &mut std::io::sink()).unwrap_or(0);
            if n > 0 {
                s.write_all(b"k").unwrap();
                break;
            }
        }
        n
    });
    let (rtt, secs) = netns::within(&c.ns("c"), move || {
        let mut rtt = Duration::MAX;
        for _ in 0..8 {
            let t = Instant::now();
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
            rtt = rtt.min(t.elapsed());
            drop(s);
        }
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
        let buf = vec![7u8; 1 << 20];
        let t = Instant::now();
        for _ in 0..BULK / buf.len() {
            s.write_all(&buf).unwrap();
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).unwrap();
        (rtt, t.elapsed().as_secs_f64())
    });
    assert_eq!(sink.join().unwrap(), BULK as u64);
    (rtt, BULK as f64 * 8.0 / secs)
}

/// An HTTP/2 frame header: length, type, flags, stream 0.
fn h2_header(len: usize, kind: u8, flags: u8) -> [u8; 9] {
    let l = (len as u32).to_be_bytes();
    [l[1], l[2], l[3], kind, flags, 0, 0, 0, 0]
}

const H2_SETTINGS: u8 = 0x4;
const H2_PING: u8 = 0x6;
const H2_GOAWAY: u8 = 0x7;
const H2_ACK: u8 = 0x1;

/// The smallest of several HTTP/2 PING round trips from namespace `ns` to the gRPC server (or
/// the proxy in front of one) at `to`: the server answers a PING itself, at once, so this is
/// the network's round trip plus whatever delays the bytes on the way.
fn h2_ping_rtt(ns: &str, to: &str) -> Duration {
    let to: std::net::SocketAddr = to.parse().unwrap();
    netns::within(ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        s.write_all(&h2_header(0, H2_SETTINGS, 0)).unwrap();
        let mut best = Duration::MAX;
        for i in 0..10u64 {
            let payload = (0x5348_4f41_4c00_0000 + i).to_be_bytes();
            let t = Instant::now();
            s.write_all(&[&h2_header(8, H2_PING, 0)[..], &payload].concat()).unwrap();
            loop {
                let mut head = [0u8; 9];
                s.read_exact(&mut head).unwrap_or_else(|e| panic!("HTTP/2 to {to}: {e}"));
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut body = vec![0u8; len];
                s.read_exact(&mut body).unwrap();
                match (head[3], head[4] & H2_ACK) {
                    (H2_PING, H2_ACK) if body == payload => break,
                    (H2_PING, 0) => s.write_all(&[&h2_header(8, H2_PING, H2_ACK)[..], &body].concat()).unwrap(),
                    (H2_SETTINGS, 0) => s.write_all(&h2_header(0, H2_SETTINGS, H2_ACK)).unwrap(),
                    (H2_GOAWAY, _) => panic!("{to} sent GOAWAY: {body:?}"),
                    _ => {}
                }
            }
            best = best.min(t.elapsed());
        }
        best
    })
}

fn run_args(model: &Path, prompt: &str) -> Vec<String> {
    let mut v: Vec<String> = vec!["run".into(), "-m".into(), model.display().to_string()];
    for a in ["--temperature", "0", "-n", "24", "--ignore-eos", "-t", "1", prompt] {
        v.push(a.into());
    }
    v
}

fn check_model(c: &Cluster, name: &str, prompt: &str) {
    let model = model_path(name);
    let t0 = Instant::now();
    let single = output_within(Command::new(SHOAL).args(run_args(&model, prompt)));
    assert!(single.status.success(), "single process: {}", String::from_utf8_lossy(&single.stderr));
    let t1 = Instant::now();
    let mut cmd = Command::new(script());
    cmd.args(["exec", &c.prefix, "c", SHOAL, "--insecure"]).args(run_args(&model, prompt));
    for addr in &c.stages {
        cmd.args(["--worker", addr]);
    }
    let piped = output_within(&mut cmd);
    assert!(piped.status.success(), "through the workers: {}", String::from_utf8_lossy(&piped.stderr));
    eprintln!(
        "{name}: single process {:.1} s, through {N_WORKERS} namespaces {:.1} s: {:?}",
        (t1 - t0).as_secs_f64(),
        t1.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&piped.stdout)
    );
    assert!(!single.stdout.is_empty(), "{name}: empty completion");
    assert_eq!(
        String::from_utf8_lossy(&piped.stdout),
        String::from_utf8_lossy(&single.stdout),
        "{name}: the pipeline across namespaces printed something else"
    );
    assert_eq!(piped.stdout, single.stdout, "{name}: same text, different bytes");
}

#[test]
fn pipeline_across_namespaces_matches_single_process() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED netns test: {why}");
        return;
    }
    let t0 = Instant::now();
    remove_stale_clusters();
    let prefix = format!("{PREFIX}{}", std::process::id());
    let mut cluster = Cluster::up(&prefix);
    let ns = namespaces(&prefix);
    assert_eq!(ns.len(), N_WORKERS + 2, "namespaces {ns:?}");

    let by = match cluster.delay_by {
        DelayBy::Netem => "netem on each host's egress".to_string(),
        DelayBy::Proxy => "shoal delay-proxy in front of each worker (no netem in this kernel)".to_string(),
    };
    eprintln!("netns: delay mechanism: {by}; {DELAY_MS} ms one way, rate {} Gbit/s", RATE_BITS / 1e9);

    // The shaping is there: netem (delay and rate) on the hosts' ends, tbf (rate) on the
    // bridge's; tbf on both without netem ...
    for (host, dev, netem) in [("c", "eth0", true), ("w1", "eth0", true), ("br", "v-c", false), ("br", "v-w1", false)] {
        let out = Command::new("tc").args(["-n", &cluster.ns(host), "qdisc", "show", "dev", dev]).output().unwrap();
        let q = String::from_utf8_lossy(&out.stdout);
        let kind = if netem && cluster.delay_by == DelayBy::Netem { "netem" } else { "tbf" };
        assert!(q.contains(kind) && q.contains("rate 1Gbit"), "{host}/{dev} has no {kind} at 1Gbit: {q}");
    }
    // ... and it works: no transfer beats the rate, and with netem a handshake takes 2 delays.
    let (handshake, bits) = measure_link(&cluster);
    eprintln!(
        "netns: c -> w1 direct: TCP handshake {:.3} ms, bulk {:.2} Gbit/s",
        handshake.as_secs_f64() * 1e3,
        bits / 1e9
    );
    // Each delay holds each byte at least D; 10% off for timer rounding.
    let least = Duration::from_secs_f64(2.0 * DELAY_MS * 0.9 / 1e3);
    if cluster.delay_by == DelayBy::Netem {
        assert!(handshake >= least, "handshake {handshake:?} < {least:?}: netem's delay is not applied");
    }
    assert!(bits <= RATE_BITS * 1.1, "{:.2} Gbit/s > 1 Gbit/s: the rate limit is not applied", bits / 1e9);

    cluster.start_workers();
    // Every hop the pipeline uses, at the address it dials (a proxy without netem): a round
    // trip takes 2 delays.
    let senders: Vec<String> =
        std::iter::once("c".to_string()).chain((1..N_WORKERS).map(|i| format!("w{i}"))).collect();
    for (from, to) in senders.iter().zip(cluster.stages.clone()) {
        let rtt = h2_ping_rtt(&cluster.ns(from), &to);
        eprintln!(
            "netns: {from} -> {to}: HTTP/2 PING round trip {:.3} ms (2 x {DELAY_MS} ms + the network; at least {:.3})",
            rtt.as_secs_f64() * 1e3,
            least.as_secs_f64() * 1e3
        );
        assert!(rtt >= least, "{from} -> {to}: round trip {rtt:?} < {least:?}: the delay ({by}) is not applied");
    }

    if cluster.delay_by == DelayBy::Proxy {
        // The control: the same probe to worker 1 itself, past its proxy, sees no delay.
        let direct = format!("{}:{WORKER_PORT}", cluster.addr("w1"));
        let rtt = h2_ping_rtt(&cluster.ns("c"), &direct);
        eprintln!("netns: c -> {direct} (no proxy): HTTP/2 PING round trip {:.3} ms", rtt.as_secs_f64() * 1e3);
        assert!(rtt < least, "c -> {direct}: {rtt:?} without a proxy: the probe cannot tell the delay apart");
    }

    check_model(&cluster, SMOLLM2, "The three primary colors are");
    check_model(&cluster, QWEN, "def fibonacci(n):");

    let pids: Vec<u32> = cluster.procs.iter().map(|p| p.child.id()).collect();
    drop(cluster);
    let left = namespaces(&prefix);
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    for pid in pids {
        // Reaped by the guard, so /proc has no entry (not even a zombie).
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "worker or proxy {pid} left behind");
    }
    eprintln!("netns test ({by}): {:.1} s", t0.elapsed().as_secs_f64());
}

/// The base URL of `shoal serve` started in the coordinator's namespace over the cluster's
/// workers (f32 activations: any split gives the same bits), once it serves.
fn serve_in(c: &mut Cluster) -> String {
    let log = std::env::temp_dir().join(format!("{}-serve.log", c.prefix));
    let state = std::env::temp_dir().join(format!("{}-state", c.prefix));
    let mut cmd = Command::new(script());
    cmd.args(["exec", &c.prefix, "c", SHOAL, "--insecure", "serve", "--model"])
        .arg(model_path(SMOLLM2))
        .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--threads", "1", "--codec", "f32", "--state-dir"])
        .arg(&state);
    for addr in &c.stages {
        cmd.args(["--worker", addr]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    c.procs.push(Proc { child, _stdin: stdin, log: log.clone() });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = std::io::BufReader::new(stdout);
        let http = common::wait_line(&mut out, "serving on", "shoal serve");
        let _ = tx.send(http);
        for _ in std::io::BufRead::lines(out) {}
    });
    let http = rx.recv_timeout(Duration::from_secs(120)).unwrap_or_else(|_| {
        panic!("shoal serve did not serve: {}", std::fs::read_to_string(&log).unwrap_or_default())
    });
    format!("{http}/v1")
}

/// `n` greedy streamed completions at once from the coordinator's namespace; `during` runs
/// once `after` events have arrived in all. Returns each text, and the longest gap between
/// two events of one stream.
fn completions(c: &Cluster, api: &str, n: usize, after: usize, during: impl FnOnce()) -> (Vec<String>, Duration) {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    let seen = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (ns, api, seen) = (c.ns("c"), api.to_string(), Arc::clone(&seen));
            let body = format!(r#"{{"prompt": "Here is fact number {i} about the sea:", "max_tokens": 48, "temperature": 0, "stream": true}}"#);
            std::thread::spawn(move || netns::within(&ns, move || common::post_stream(&api, "/v1/completions", &body, &seen)))
        })
        .collect();
    common::once_seen(&seen, after, during);
    let mut longest = Duration::ZERO;
    let texts = handles
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let (status, events) = h.join().unwrap();
            assert_eq!(status, 200, "request {i}: {events:?}");
            assert_eq!(events.last().map(|e| e.1.as_str()), Some("[DONE]"), "request {i} did not end well: {events:?}");
            longest = longest.max(events.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap_or_default());
            events[..events.len() - 1]
                .iter()
                .map(|(_, d)| {
                    let v: serde_json::Value = serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}"));
                    assert!(v.get("error").is_none(), "request {i}: an error reached the client: {d}");
                    v["choices"][0]["text"].as_str().unwrap_or("").to_string()
                })
                .collect::<String>()
        })
        .collect();
    (texts, longest)
}

/// `/metrics` of the coordinator in the cluster's namespace.
fn metrics(c: &Cluster, api: &str) -> String {
    let hostport = api.trim_start_matches("http://").trim_end_matches("/v1").to_string();
    netns::within(&c.ns("c"), move || {
        let mut s = TcpStream::connect(&hostport).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {hostport}\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
}

/// One unlabelled metric of the coordinator in the cluster's namespace.
fn metric(c: &Cluster, api: &str, name: &str) -> f64 {
    let text = metrics(c, api);
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Partition: worker 2's link is cut (its bridge port down; the process lives on) while 8
/// streams run through it, and restored. Nothing hangs and nothing is lost: the coordinator
/// forms the pipeline again without it, every stream ends with the text of a run without
/// the fault, and once the link is back the worker is taken in again.
#[test]
fn a_worker_cut_off_and_restored_loses_no_request() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED netns partition test: {why}");
        return;
    }
    remove_stale_clusters();
    let prefix = format!("{PREFIX}{}p", std::process::id());
    let mut cluster = Cluster::up(&prefix);
    cluster.start_workers();
    let api = serve_in(&mut cluster);
    let (reference, _) = completions(&cluster, &api, 8, 0, || {});
    assert!(reference.iter().all(|t| !t.is_empty()), "{reference:?}");

    let link = |state: &str| {
        let out = Command::new("ip").args(["-n", &cluster.ns("br"), "link", "set", "v-w2", state]).output().unwrap();
        assert!(out.status.success(), "ip link set v-w2 {state}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let cut_for = Duration::from_secs(8);
    let (texts, longest) = completions(&cluster, &api, 8, 8 * 8, || {
        link("down");
        std::thread::sleep(cut_for);
        link("up");
    });
    assert_eq!(texts, reference, "the text changed across the partition");
    eprintln!(
        "netns partition: 8 streams survived w2 cut off for {cut_for:?}; longest gap a client saw {:.2} s, recovery pause {:.2} s",
        longest.as_secs_f64(),
        metric(&cluster, &api, "shoal_last_recovery_pause_seconds")
    );
    assert!(metric(&cluster, &api, "shoal_recoveries_total") >= 1.0);
    // The link is back: w2 answers again and is taken in at a safe point.
    let t0 = Instant::now();
    while metric(&cluster, &api, "shoal_recoveries_total") < 2.0 || metric(&cluster, &api, "shoal_recovering") != 0.0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "w2 was not taken back");
        std::thread::sleep(Duration::from_millis(250));
    }
    let text = metrics(&cluster, &api);
    let up: Vec<&str> = text.lines().filter(|l| l.starts_with("shoal_stage_up{") && l.ends_with(" 1")).collect();
    assert_eq!(up.len(), 3, "three stages again: {up:?}");
    let (again, _) = completions(&cluster, &api, 8, 0, || {});
    assert_eq!(again, reference, "the text changed after w2 came back");
}
