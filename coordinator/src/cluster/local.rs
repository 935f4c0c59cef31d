//! Local cluster mode: N real `shoal worker` processes on 127.0.0.1.
//!
//! Each child is this same binary (`std::env::current_exe()`) started as
//! `shoal worker --listen 127.0.0.1:0 --models-dir DIR --exit-with-parent`; it prints
//! `listening on ADDR` on stdout once bound. No orphans: [`LocalCluster`] kills and reaps
//! its children on drop (normal exit, error, panic unwinding), and each child holds the read
//! end of a pipe whose write end only the parent has, so a parent that dies by a signal
//! (SIGKILL included) closes it and the child exits on its own. Ctrl-C reaches the children
//! too, since they share the terminal's process group.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use super::{Error, Result};

/// How long a worker may take to bind and print its address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Worker child processes, killed when dropped.
#[derive(Debug)]
pub struct LocalCluster {
    workers: Vec<LocalWorker>,
}

#[derive(Debug)]
struct LocalWorker {
    child: Child,
    addr: String,
    // Held open for the child's lifetime: its end-of-file tells the child to exit.
    _stdin: Option<ChildStdin>,
    _stdout: Option<BufReader<ChildStdout>>,
}

impl LocalCluster {
    /// Starts `n` workers of `exe` serving `models_dir` and waits for their addresses.
    pub fn start(exe: &Path, n: usize, models_dir: &Path) -> Result<LocalCluster> {
        let mut cluster = LocalCluster { workers: Vec::with_capacity(n) };
        for i in 0..n {
            let mut cmd = Command::new(exe);
            cmd.args(["worker", "--listen", "127.0.0.1:0", "--exit-with-parent", "--name"])
                .arg(format!("local-{i}"))
                .arg("--models-dir")
                .arg(models_dir);
            // The workers speak as this process does (the token travels in the environment,
            // not on a command line anyone can read).
            let sec = shoal_proto::security::get();
            if let Some(dir) = sec.tls_dir() {
                cmd.arg("--tls-dir").arg(dir);
            }
            if let Some(t) = sec.token() {
                cmd.env("SHOAL_JOIN_TOKEN", t);
            }
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| Error::Spawn(format!("{}: {e}", exe.display())))?;
            let stdin = child.stdin.take();
            let stdout = child.stdout.take().map(BufReader::new);
            // Read the address on a thread so a stuck child cannot hang the start.
            let (tx, rx) = std::sync::mpsc::channel();
            let Some(mut out) = stdout else { return Err(Error::Spawn("no stdout pipe".into())) };
            std::thread::spawn(move || {
                let mut line = String::new();
                let r = out.read_line(&mut line).map(|_| line);
                let _ = tx.send((r, out));
            });
            let (addr, out) = match rx.recv_timeout(START_TIMEOUT) {
                Ok((Ok(line), out)) => match line.trim().strip_prefix("listening on ") {
                    Some(a) => (a.to_string(), Some(out)),
                    None => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(Error::Spawn(format!("worker {i} did not start (said {:?})", line.trim())));
                    }
                },
                Ok((Err(e), _)) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Spawn(format!("worker {i}: {e}")));
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Spawn(format!("worker {i} did not print its address within {START_TIMEOUT:?}")));
                }
            };
            cluster.workers.push(LocalWorker { child, addr, _stdin: stdin, _stdout: out });
        }
        Ok(cluster)
    }

    /// The workers' `host:port`, in start order.
    pub fn addrs(&self) -> Vec<String> {
        self.workers.iter().map(|w| w.addr.clone()).collect()
    }

    /// Process ids, in start order (tests kill one to simulate a crash).
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.child.id()).collect()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.child.kill();
        }
        for w in &mut self.workers {
            let _ = w.child.wait();
        }
    }
}
