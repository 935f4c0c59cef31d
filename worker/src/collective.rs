//! The TCP collective of a tensor-parallel stage whose ranks are worker processes (CPU hosts,
//! one socket per follower to the leader, distributed-llama style).
//!
//! The leader (rank 0) listens on a port it reports in its `LoadShard` reply; each follower
//! connects and opens with a handshake: `SHOALTP1`, its rank and the group size (u32 LE),
//! and the group secret the coordinator gave both (over its gRPC channel, so under TLS when
//! the cluster uses TLS). A peer that gets any of it wrong is logged and dropped; the leader
//! keeps waiting for the right ones until its deadline.
//!
//! After that, frames are a u32 LE length and a payload:
//! - all-reduce: each follower sends its buffer (f32 LE); the leader sums rank 0's, then
//!   rank 1's, ... in rank order ([`shoal_model::tp::sum_in_rank_order`]'s order) and sends
//!   the sum back to each: every rank ends with the same bits, and the same bits as the
//!   in-process collective;
//! - broadcast: the leader sends the bytes to each follower.
//!
//! A length that is not the expected one, a frame over [`MAX_FRAME`], a closed socket or a
//! leader that waits past [`STEP_TIMEOUT`] for a follower is an error naming the peer, never
//! a hang or a panic. Followers wait for the leader's next step without a time limit (an
//! idle stage is not a failure); the leader closing the socket ends them.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use shoal_model::tp::Collective;
use shoal_model::{Error, Result};

const MAGIC: &[u8; 8] = b"SHOALTP1";
/// Longest a leader waits for a follower's part of a step.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest frame either way (a step's input or a gathered activation).
pub const MAX_FRAME: usize = 1 << 30;
/// Longest secret a handshake may carry.
const MAX_SECRET: usize = 256;

/// One rank's end of a TCP group: the leader holds a socket per follower (index `r - 1`), a
/// follower one socket to the leader.
pub struct TcpCollective {
    rank: usize,
    size: usize,
    peers: Vec<(TcpStream, String)>,
    /// An outgoing frame (length, then payload), built once for every follower.
    frame: Vec<u8>,
    /// An incoming payload.
    inbox: Vec<u8>,
}

fn err(peer: &str, what: impl std::fmt::Display) -> Error {
    Error::Collective(format!("{peer}: {what}"))
}

impl TcpCollective {
    /// The leader's side: waits on `listener` until ranks `1..size` have joined with
    /// `secret`, or `deadline` passes.
    pub fn lead(listener: TcpListener, size: usize, secret: &[u8], wait: Duration) -> Result<TcpCollective> {
        let deadline = Instant::now() + wait;
        let local = listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string());
        listener.set_nonblocking(true).map_err(|e| err(&local, e))?;
        let mut slots: Vec<Option<(TcpStream, String)>> = (1..size).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            if Instant::now() > deadline {
                let missing: Vec<String> =
                    slots.iter().enumerate().filter(|s| s.1.is_none()).map(|s| (s.0 + 1).to_string()).collect();
                return Err(err(&local, format!("ranks {} did not join within {wait:?}", missing.join(", "))));
            }
            let (mut s, addr) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(err(&local, e)),
            };
            let peer = addr.to_string();
            match handshake_in(&mut s, size, secret) {
                Ok(rank) if slots[rank - 1].is_none() => {
                    let _ = s.write_all(&[1]);
                    tracing::info!(rank, %peer, "tensor-parallel rank joined");
                    slots[rank - 1] = Some((s, format!("rank {rank} ({peer})")));
                }
                Ok(rank) => tracing::warn!(rank, %peer, "refused a second peer for a rank already joined"),
                Err(why) => tracing::warn!(%peer, "refused a tensor-parallel peer: {why}"),
            }
        }
        let mut peers = Vec::with_capacity(size - 1);
        for (s, name) in slots.into_iter().flatten() {
            s.set_nonblocking(false).map_err(|e| err(&name, e))?;
            s.set_read_timeout(Some(STEP_TIMEOUT)).map_err(|e| err(&name, e))?;
            s.set_nodelay(true).map_err(|e| err(&name, e))?;
            peers.push((s, name));
        }
        Ok(TcpCollective { rank: 0, size, peers, frame: Vec::new(), inbox: Vec::new() })
    }

    /// A follower's side: joins the leader at `leader` as `rank` of `size`.
    pub fn join(leader: &str, rank: usize, size: usize, secret: &[u8], wait: Duration) -> Result<TcpCollective> {
        let name = format!("leader {leader}");
        if rank == 0 || rank >= size {
            return Err(err(&name, format!("rank {rank} of {size} cannot join a leader")));
        }
        // A name (the coordinator knows its workers as `a.lan:7070`) or an address; each of
        // a name's addresses in turn.
        let mut last = None;
        let mut conn = None;
        for addr in leader.to_socket_addrs().map_err(|e| err(&name, e))? {
            match TcpStream::connect_timeout(&addr, wait) {
                Ok(s) => {
                    conn = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let mut s = conn.ok_or_else(|| err(&name, last.map_or("the name has no address".into(), |e| e.to_string())))?;
        s.set_nodelay(true).map_err(|e| err(&name, e))?;
        s.set_read_timeout(Some(wait)).map_err(|e| err(&name, e))?;
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(size as u32).to_le_bytes());
        hello.extend_from_slice(&(secret.len() as u32).to_le_bytes());
        hello.extend_from_slice(secret);
        s.write_all(&hello).map_err(|e| err(&name, e))?;
        let mut ok = [0u8];
        s.read_exact(&mut ok).map_err(|e| err(&name, format!("refused the handshake ({e})")))?;
        if ok[0] != 1 {
            return Err(err(&name, "refused the handshake"));
        }
        // Steps come when they come.
        s.set_read_timeout(None).map_err(|e| err(&name, e))?;
        Ok(TcpCollective { rank, size, peers: vec![(s, name)], frame: Vec::new(), inbox: Vec::new() })
    }

    /// Starts `self.frame`; the payload follows, then [`Self::send_frame`].
    fn begin_frame(&mut self) {
        self.frame.clear();
        self.frame.extend_from_slice(&[0; 4]);
    }

    /// Sends `self.frame` (its length filled in) to peer `i`.
    fn send_frame(&mut self, i: usize) -> Result<()> {
        let len = (self.frame.len() - 4) as u32;
        self.frame[..4].copy_from_slice(&len.to_le_bytes());
        let (s, name) = &mut self.peers[i];
        s.write_all(&self.frame).map_err(|e| err(name, e))
    }

    /// Reads one frame from peer `i` into `out`; `want` is the exact length expected, if known.
    fn recv(peers: &mut [(TcpStream, String)], i: usize, want: Option<usize>, out: &mut Vec<u8>) -> Result<()> {
        let (s, name) = &mut peers[i];
        let mut len = [0u8; 4];
        s.read_exact(&mut len).map_err(|e| err(name, closed(e)))?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME || want.is_some_and(|w| w != len) {
            return Err(err(name, format!("a frame of {len} bytes, expected {}", want.unwrap_or(MAX_FRAME))));
        }
        out.resize(len, 0);
        s.read_exact(out).map_err(|e| err(name, closed(e)))
    }
}

fn closed(e: std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "the connection closed".into(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!("no answer within {STEP_TIMEOUT:?}"),
        _ => e.to_string(),
    }
}

/// Reads and checks a follower's handshake; returns its rank.
fn handshake_in(s: &mut TcpStream, size: usize, secret: &[u8]) -> std::result::Result<usize, String> {
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let mut head = [0u8; 20];
    s.read_exact(&mut head).map_err(|e| e.to_string())?;
    if &head[..8] != MAGIC {
        return Err("not a shoal tensor-parallel peer".into());
    }
    let word = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4 bytes")) as usize;
    let (rank, their_size, n) = (word(8), word(12), word(16));
    if their_size != size || rank == 0 || rank >= size {
        return Err(format!("rank {rank} of {their_size} for a group of {size}"));
    }
    if n > MAX_SECRET {
        return Err(format!("a secret of {n} bytes"));
    }
    let mut got = vec![0u8; n];
    s.read_exact(&mut got).map_err(|e| e.to_string())?;
    // Compared in full, whatever the first difference.
    let same = got.len() == secret.len() && got.iter().zip(secret).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0;
    if !same {
        return Err("wrong group secret".into());
    }
    Ok(rank)
}

fn f32s(b: &[u8]) -> impl Iterator<Item = f32> + '_ {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<()> {
        let want = Some(buf.len() * 4);
        if self.rank == 0 {
            // `buf` holds rank 0's part: the others are added to it in rank order.
            for i in 0..self.peers.len() {
                Self::recv(&mut self.peers, i, want, &mut self.inbox)?;
                buf.iter_mut().zip(f32s(&self.inbox)).for_each(|(o, v)| *o += v);
            }
        }
        self.begin_frame();
        buf.iter().for_each(|v| self.frame.extend_from_slice(&v.to_le_bytes()));
        if self.rank == 0 {
            for i in 0..self.peers.len() {
                self.send_frame(i)?;
            }
        } else {
            self.send_frame(0)?;
            Self::recv(&mut self.peers, 0, want, &mut self.inbox)?;
            buf.iter_mut().zip(f32s(&self.inbox)).for_each(|(o, v)| *o = v);
        }
        Ok(())
    }

    fn broadcast(&mut self, msg: &mut Vec<u8>) -> Result<()> {
        if self.rank == 0 {
            self.begin_frame();
            self.frame.extend_from_slice(msg);
            for i in 0..self.peers.len() {
                self.send_frame(i)?;
            }
            Ok(())
        } else {
            Self::recv(&mut self.peers, 0, None, msg)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(size: usize, secret: &'static [u8]) -> (TcpCollective, Vec<std::thread::JoinHandle<Result<TcpCollective>>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        // By name, as a coordinator that knows its workers by name hands it out.
        let addr = format!("localhost:{}", l.local_addr().unwrap().port());
        let joins = (1..size)
            .map(|r| {
                let a = addr.clone();
                std::thread::spawn(move || TcpCollective::join(&a, r, size, secret, Duration::from_secs(5)))
            })
            .collect();
        (TcpCollective::lead(l, size, secret, Duration::from_secs(5)).unwrap(), joins)
    }

    #[test]
    fn sums_in_rank_order_like_the_in_process_group() {
        let (mut lead, joins) = group(3, b"s3cret");
        let parts = [vec![1e8f32, 1.0, -0.5], vec![1.0, 2.0, 0.25], vec![-1e8, 3.0, 0.125]];
        let followers: Vec<_> = joins
            .into_iter()
            .enumerate()
            .map(|(i, j)| {
                let mut c = j.join().unwrap().unwrap();
                let mut b = parts[i + 1].clone();
                std::thread::spawn(move || {
                    c.all_reduce(&mut b).unwrap();
                    let mut msg = Vec::new();
                    c.broadcast(&mut msg).unwrap();
                    (b, msg)
                })
            })
            .collect();
        let mut b = parts[0].clone();
        lead.all_reduce(&mut b).unwrap();
        lead.broadcast(&mut b"step".to_vec()).unwrap();
        let mut want = vec![0f32; 3];
        shoal_model::tp::sum_in_rank_order(parts.iter().map(|p| p.as_slice()), &mut want);
        // (1e8 + 1) - 1e8 rounds to 0 in f32: the order shows.
        assert_eq!(want[0], 0.0);
        assert_eq!(b, want);
        for f in followers {
            let (fb, msg) = f.join().unwrap();
            assert_eq!(fb, want);
            assert_eq!(msg, b"step");
        }
    }

    #[test]
    fn a_wrong_secret_or_rank_is_refused_and_a_closed_leader_ends_a_follower() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let a = addr.clone();
        let bad = std::thread::spawn(move || TcpCollective::join(&a, 1, 2, b"wrong", Duration::from_secs(5)));
        let a = addr.clone();
        let bad_rank = std::thread::spawn(move || TcpCollective::join(&a, 1, 3, b"right", Duration::from_secs(5)));
        // The impostors are turned away; the leader keeps waiting, and gives up naming rank 1.
        let e = TcpCollective::lead(l, 2, b"right", Duration::from_millis(800)).err().unwrap();
        assert!(e.to_string().contains("ranks 1 did not join"), "{e}");
        assert!(bad.join().unwrap().is_err());
        assert!(bad_rank.join().unwrap().is_err());
        // A follower whose leader goes away gets an error, not a hang.
        let (lead, joins) = group(2, b"k");
        let mut f = joins.into_iter().next().unwrap().join().unwrap().unwrap();
        drop(lead);
        let e = f.broadcast(&mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("closed"), "{e}");
        // A frame of the wrong length is refused.
        let (mut lead, joins) = group(2, b"k");
        let mut f = joins.into_iter().next().unwrap().join().unwrap().unwrap();
        let t = std::thread::spawn(move || f.all_reduce(&mut [1.0, 2.0]));
        let e = lead.all_reduce(&mut [1.0, 2.0, 3.0]).unwrap_err();
        assert!(e.to_string().contains("expected 12"), "{e}");
        drop(lead);
        assert!(t.join().unwrap().is_err());
    }
}
