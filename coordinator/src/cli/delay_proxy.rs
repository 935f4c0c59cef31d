//! `shoal delay-proxy` (hidden): a TCP relay that delays every byte by a fixed one-way delay in
//! each direction. A test tool, not part of serving: it stands in for `tc qdisc ... netem delay`
//! where the kernel has no netem (`CONFIG_NET_SCH_NETEM` off, as in some microVM kernels), so
//! `scripts/netns-cluster`, `coordinator/tests/netns.rs` and `benches/cluster.sh` can still put
//! a real delay on every link: one proxy in front of each worker, the coordinator given the
//! proxies' addresses, so every hop (coordinator to stage 1, stage to stage, and the answers
//! back) crosses one proxy and takes the delay D each way, a round trip 2·D.
//!
//! Per accepted connection it dials `--to`, sets TCP_NODELAY on both sockets and runs two
//! threads per direction: a reader that stamps each chunk it reads with the time it is due
//! (read time + D) and queues it, and a writer that waits for each deadline (sleeps for the
//! bulk, spins the last [`SPIN`]) and writes the chunk, so order is kept and the delay is
//! accurate to some tens of µs. The queue is bounded, so a slow receiver pushes back on the
//! sender as TCP would. An end of stream is delayed like data and passed on as a half-close;
//! the connection is closed when both directions have ended. Any I/O error is logged and
//! shuts both sockets down; nothing here panics on I/O.
//!
//! Unlike netem it delays the byte stream, not packets: TCP handshakes and ACKs between the
//! proxy and its peers see no delay, so TCP's window growth is not slowed by the round trip
//! (at 1 Gbit/s and a 1 ms round trip the window needed, 125 KB, is small anyway).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The last stretch before a deadline that a writer spins instead of sleeping: a sleep may
/// wake this much late (timer slack, wake-up latency).
const SPIN: Duration = Duration::from_micros(50);
/// Chunks queued per direction before the reader blocks (back pressure on the sender).
const QUEUE_CHUNKS: usize = 256;
/// Largest chunk one read takes.
const READ_BYTES: usize = 64 << 10;

#[derive(clap::Args, Debug)]
pub struct DelayProxyArgs {
    /// Address to listen on (`127.0.0.1:0` picks a free port; the bound address is printed
    /// on stdout as `listening on ADDR`).
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    /// Address each accepted connection is relayed to.
    #[arg(long, value_name = "HOST:PORT")]
    to: String,
    /// One-way delay added to each direction: `0.5ms`, `500us`, `1s`, `0`.
    #[arg(long, default_value = "0.5ms", value_parser = parse_delay)]
    delay: Duration,
    /// Exit when stdin reaches end-of-file (set by a parent that started this proxy, so the
    /// proxy cannot outlive it).
    #[arg(long)]
    exit_with_parent: bool,
}

/// Parses `0.5ms`, `500us` (or `µs`), `2ns`, `1s`, or a bare `0`.
pub fn parse_delay(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("bad delay '{s}': expected e.g. 0.5ms, 500us, 1s"))?;
    let scale = match unit.trim() {
        "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        "" if v == 0.0 => 0.0,
        u => return Err(format!("bad delay unit '{u}' in '{s}': s, ms, us or ns")),
    };
    Duration::try_from_secs_f64(v * scale).map_err(|e| format!("bad delay '{s}': {e}"))
}

pub fn run(a: DelayProxyArgs) -> Result<()> {
    if a.exit_with_parent {
        std::thread::spawn(|| {
            let mut sink = [0u8; 64];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            std::process::exit(0);
        });
    }
    // Threads inherit the timer slack of the thread that makes them: 1 µs rather than the
    // default 50 µs makes the writers' sleeps end closer to when they ask. Best effort.
    let _ = std::fs::write("/proc/self/timerslack_ns", "1000");
    let listener = TcpListener::bind(&a.listen).with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener.local_addr()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {addr}")?;
    out.flush()?;
    drop(out);
    tracing::info!(%addr, to = %a.to, delay = ?a.delay, "delay proxy");
    for conn in listener.incoming() {
        let client = match conn {
            Ok(c) => c,
            Err(e) => {
                // E.g. out of descriptors: back off rather than spin on accept.
                tracing::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let (to, delay) = (a.to.clone(), a.delay);
        let spawned = std::thread::Builder::new().name("relay".into()).spawn(move || relay(client, &to, delay));
        if let Err(e) = spawned {
            tracing::warn!("cannot start a relay thread: {e}");
        }
    }
    Ok(())
}

/// The two sockets of one relayed connection.
struct Pair {
    client: TcpStream,
    server: TcpStream,
    closed: AtomicBool,
    name: String,
}

impl Pair {
    /// Logs `e` (unless the pair is already closing) and shuts both sockets down, which ends
    /// every blocked read and write of this connection.
    fn abort(&self, what: &str, e: &std::io::Error) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            let routine =
                matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted);
            if routine {
                tracing::debug!("{}: {what}: {e}; closing", self.name);
            } else {
                tracing::warn!("{}: {what}: {e}; closing", self.name);
            }
        }
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }
}

/// One chunk of a direction's stream, with the time it is due at the other end.
enum Chunk {
    Data(Instant, Vec<u8>),
    End(Instant),
}

#[derive(Clone, Copy)]
enum Dir {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// The body of one of a connection's threads.
type Job = Box<dyn FnOnce() + Send>;

fn relay(client: TcpStream, to: &str, delay: Duration) {
    let peer = client.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let server = match TcpStream::connect(to) {
        Ok(s) => s,
        Err(e) => {
            // Dropping the client's socket closes it: the client sees the refusal as a close.
            tracing::warn!("{peer} -> {to}: cannot connect: {e}");
            return;
        }
    };
    for s in [&client, &server] {
        if let Err(e) = s.set_nodelay(true) {
            tracing::warn!("{peer} -> {to}: TCP_NODELAY: {e}");
        }
    }
    let pair = Arc::new(Pair { client, server, closed: AtomicBool::new(false), name: format!("{peer} -> {to}") });
    tracing::debug!("{}: open", pair.name);
    let mut jobs: Vec<(&str, Job)> = Vec::new();
    for dir in [Dir::Up, Dir::Down] {
        let (tx, rx) = sync_channel(QUEUE_CHUNKS);
        let (p, q) = (Arc::clone(&pair), Arc::clone(&pair));
        jobs.push(("reader", Box::new(move || read_side(&p, dir, delay, tx))));
        jobs.push(("writer", Box::new(move || write_side(&q, dir, rx))));
    }
    let mut threads = Vec::new();
    for (role, job) in jobs {
        match std::thread::Builder::new().name(format!("relay-{role}")).spawn(job) {
            Ok(t) => threads.push(t),
            // The job is dropped unrun; closing the pair ends the threads already started.
            Err(e) => pair.abort("cannot start a thread", &e),
        }
    }
    for t in threads {
        let _ = t.join();
    }
    tracing::debug!("{}: closed", pair.name);
}

fn ends(p: &Pair, dir: Dir) -> (&TcpStream, &TcpStream) {
    match dir {
        Dir::Up => (&p.client, &p.server),
        Dir::Down => (&p.server, &p.client),
    }
}

/// Reads `dir`'s source and queues each chunk with its deadline; the end of stream too.
fn read_side(p: &Pair, dir: Dir, delay: Duration, tx: SyncSender<Chunk>) {
    let (mut src, _) = ends(p, dir);
    let mut buf = vec![0u8; READ_BYTES];
    loop {
        match src.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send(Chunk::End(Instant::now() + delay));
                return;
            }
            Ok(n) => {
                let due = Instant::now() + delay;
                if tx.send(Chunk::Data(due, buf[..n].to_vec())).is_err() {
                    return; // The writer gave up (and closed the pair).
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                p.abort("read", &e);
                return;
            }
        }
    }
}

/// Writes `dir`'s queued chunks to its destination, each at its deadline, then passes the
/// end of stream on as a half-close.
fn write_side(p: &Pair, dir: Dir, rx: Receiver<Chunk>) {
    let (_, mut dst) = ends(p, dir);
    for chunk in rx {
        match chunk {
            Chunk::Data(due, bytes) => {
                wait_until(due);
                if let Err(e) = dst.write_all(&bytes) {
                    p.abort("write", &e);
                    return;
                }
            }
            Chunk::End(due) => {
                wait_until(due);
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

/// Sleeps until shortly before `due`, then spins to it.
fn wait_until(due: Instant) {
    loop {
        let now = Instant::now();
        if now >= due {
            return;
        }
        let left = due - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_parse() {
        assert_eq!(parse_delay("0.5ms"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_delay("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_delay("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_delay("0"), Ok(Duration::ZERO));
        assert!(parse_delay("5").is_err());
        assert!(parse_delay("ms").is_err());
        assert!(parse_delay("1h").is_err());
    }
}
