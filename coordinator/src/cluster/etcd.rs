//! etcd mode (`--etcd URL[,URL]`): cluster membership in etcd instead of `Join` calls.
//!
//! A worker puts `{prefix}/workers/{advertise addr}` = `{"addr": ..., "node_name": ...}`
//! under a lease of [`LEASE_TTL_S`] seconds and keeps the lease alive; when the worker dies
//! or loses etcd, the lease expires and etcd deletes the key. The coordinator reads the
//! prefix, then watches it: a put admits the worker into the [`Registry`] (dialed back, as a
//! `Join` is), a delete removes it, and workers whose keys exist are kept fresh. The
//! coordinator publishes the plan it serves under `{prefix}/plan`. Key layout and
//! operations: `docs/operations.md`.

use std::collections::HashMap;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};

use super::registry::Registry;

/// Seconds a worker's key outlives its last keep-alive.
pub const LEASE_TTL_S: i64 = 5;
/// Seconds the leader's election key outlives its last keep-alive: how long a standby
/// waits after the leader dies before it leads.
pub const LEADER_TTL_S: i64 = 3;
/// Default key prefix (`--etcd-prefix`): several clusters can share one etcd.
pub const DEFAULT_PREFIX: &str = "/shoal/default";

/// The key of the worker reachable at `addr`.
pub fn worker_key(prefix: &str, addr: &str) -> String {
    format!("{}/workers/{addr}", prefix.trim_end_matches('/'))
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Member {
    addr: String,
    node_name: String,
}

fn endpoints(urls: &str) -> Vec<String> {
    urls.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect()
}

/// Registers this worker and keeps its lease alive, forever: a lost etcd or lease is
/// retried every second (the key comes back with a new lease).
pub async fn register(urls: String, prefix: String, addr: String, node_name: String) -> std::convert::Infallible {
    let key = worker_key(&prefix, &addr);
    let value = serde_json::json!({ "addr": addr, "node_name": node_name }).to_string();
    loop {
        let r: Result<(), etcd_client::Error> = async {
            let mut c = Client::connect(endpoints(&urls), None).await?;
            let lease = c.lease_grant(LEASE_TTL_S, None).await?.id();
            c.put(key.as_str(), value.as_str(), Some(PutOptions::new().with_lease(lease))).await?;
            tracing::info!(%key, lease, "registered in etcd");
            let (mut keeper, mut acks) = c.lease_keep_alive(lease).await?;
            let every = Duration::from_millis((LEASE_TTL_S as u64 * 1000) / 3);
            loop {
                keeper.keep_alive().await?;
                match tokio::time::timeout(every, acks.message()).await {
                    Ok(Ok(Some(a))) if a.ttl() > 0 => {}
                    Ok(Ok(Some(_))) => return Err(etcd_client::Error::LeaseKeepAliveError("the lease expired".into())),
                    Ok(Ok(None)) => return Err(etcd_client::Error::LeaseKeepAliveError("keep-alive stream ended".into())),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(etcd_client::Error::LeaseKeepAliveError("no keep-alive answer".into())),
                }
                tokio::time::sleep(every).await;
            }
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(%key, "etcd registration: {e}; retrying");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keeps `registry`'s workers equal to the members under `prefix`, forever (reconnecting
/// after an etcd failure and reading the prefix afresh).
pub async fn follow(urls: String, prefix: String, registry: Registry) -> std::convert::Infallible {
    let dir = format!("{}/workers/", prefix.trim_end_matches('/'));
    // Members by key, as last read.
    let mut members: HashMap<String, Member> = HashMap::new();
    loop {
        let r: Result<(), etcd_client::Error> = async {
            let mut c = Client::connect(endpoints(&urls), None).await?;
            let now = c.get(dir.as_str(), Some(GetOptions::new().with_prefix())).await?;
            let mut seen = HashMap::new();
            for kv in now.kvs() {
                if let Some(m) = parse(kv.key(), kv.value()) {
                    seen.insert(String::from_utf8_lossy(kv.key()).into_owned(), m);
                }
            }
            // Whoever left while we were not watching.
            for (k, m) in &members {
                if !seen.contains_key(k) && registry.remove(&m.addr) {
                    tracing::info!(addr = %m.addr, "worker left (no longer in etcd)");
                }
            }
            members = seen;
            for m in members.values() {
                admit(&registry, m).await;
            }
            let rev = now.header().map_or(0, |h| h.revision()) + 1;
            let mut stream = c.watch(dir.as_str(), Some(WatchOptions::new().with_prefix().with_start_revision(rev))).await?;
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    msg = stream.message() => {
                        let Some(resp) = msg? else { return Ok(()) };
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            match ev.event_type() {
                                EventType::Put => {
                                    if let Some(m) = parse(kv.key(), kv.value()) {
                                        admit(&registry, &m).await;
                                        members.insert(key, m);
                                    }
                                }
                                EventType::Delete => {
                                    if let Some(m) = members.remove(&key) && registry.remove(&m.addr) {
                                        tracing::info!(addr = %m.addr, "worker left (its etcd lease expired)");
                                    }
                                }
                            }
                        }
                    }
                    // Members whose keys exist are alive: keep them fresh in the registry
                    // (and admit any that could not be dialed back before).
                    _ = tick.tick() => {
                        for m in members.values() {
                            admit(&registry, m).await;
                        }
                    }
                }
            }
        }
        .await;
        if let Err(e) = r {
            tracing::warn!("etcd membership: {e}; retrying");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The key of the plan being served.
pub fn plan_key(prefix: &str) -> String {
    format!("{}/plan", prefix.trim_end_matches('/'))
}

/// Publishes the plan being served under `{prefix}/plan`: the model, its identity and the
/// stages in pipeline order. Returns its version, the etcd revision of the put (ordered
/// across every plan any coordinator of the cluster ever published).
pub async fn publish_plan(urls: &str, prefix: &str, model: &str, identity: &str, stages: &[super::registry::StageInfo]) -> Result<i64, etcd_client::Error> {
    let stages: Vec<serde_json::Value> = stages
        .iter()
        .map(|s| serde_json::json!({"addr": s.addr, "layer_start": s.layers.start, "layer_end": s.layers.end, "embed": s.embed, "head": s.head}))
        .collect();
    let value = serde_json::json!({"model": model, "model_identity": identity, "stages": stages}).to_string();
    let mut c = Client::connect(endpoints(urls), None).await?;
    let r = c.put(plan_key(prefix), value, None).await?;
    Ok(r.header().map_or(0, |h| h.revision()))
}

/// A plan as published under `{prefix}/plan`.
#[derive(serde::Deserialize, Debug, Clone, PartialEq)]
pub struct PublishedPlan {
    pub model: String,
    pub model_identity: String,
    pub stages: Vec<PublishedStage>,
}

#[derive(serde::Deserialize, Debug, Clone, PartialEq)]
pub struct PublishedStage {
    pub addr: String,
    pub layer_start: usize,
    pub layer_end: usize,
    pub embed: bool,
    pub head: bool,
}

/// The plan published under `prefix` and its version, if there is a readable one.
pub async fn read_plan(urls: &str, prefix: &str) -> Result<Option<(PublishedPlan, i64)>, etcd_client::Error> {
    let mut c = Client::connect(endpoints(urls), None).await?;
    let r = c.get(plan_key(prefix), None).await?;
    let Some(kv) = r.kvs().first() else { return Ok(None) };
    match serde_json::from_slice::<PublishedPlan>(kv.value()) {
        Ok(p) => Ok(Some((p, kv.mod_revision()))),
        Err(e) => {
            tracing::warn!("ignoring the malformed plan in etcd: {e}");
            Ok(None)
        }
    }
}

/// The election of the coordinator that leads the cluster at `prefix`.
pub fn election_name(prefix: &str) -> String {
    format!("{}/leader", prefix.trim_end_matches('/'))
}

/// Leadership won in [`campaign`]: `lost` resolves (with why) if the lease cannot be kept
/// alive, after which another coordinator may lead and this one must stop.
pub struct Leadership {
    pub lost: tokio::sync::oneshot::Receiver<String>,
    /// The election key (`{prefix}/leader/<lease>`), for the log.
    pub key: String,
}

/// Campaigns for leadership of the cluster at `prefix` with `me` (the registry address) as
/// the value, under a lease of [`LEADER_TTL_S`] kept alive from the start (a standby can
/// wait for hours). Returns once this coordinator leads: when no other holds the election,
/// or the leader's lease expired (it died or lost etcd).
pub async fn campaign(urls: &str, prefix: &str, me: &str) -> Result<Leadership, etcd_client::Error> {
    let mut c = Client::connect(endpoints(urls), None).await?;
    let lease = c.lease_grant(LEADER_TTL_S, None).await?.id();
    let (mut keeper, mut acks) = c.lease_keep_alive(lease).await?;
    let (lost_tx, mut lost) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let every = Duration::from_millis((LEADER_TTL_S as u64 * 1000) / 3);
        let why = loop {
            if let Err(e) = keeper.keep_alive().await {
                break format!("keeping the leader lease alive: {e}");
            }
            match tokio::time::timeout(every, acks.message()).await {
                Ok(Ok(Some(a))) if a.ttl() > 0 => {}
                Ok(Ok(Some(_))) => break "the leader lease expired".to_string(),
                Ok(Ok(None)) => break "the lease keep-alive stream ended".to_string(),
                Ok(Err(e)) => break format!("keeping the leader lease alive: {e}"),
                Err(_) => break "etcd did not answer a lease keep-alive in time".to_string(),
            }
            tokio::time::sleep(every).await;
        };
        let _ = lost_tx.send(why);
    });
    // A standby whose own lease dies while it waits starts over.
    let r = tokio::select! {
        r = c.campaign(election_name(prefix), me, lease) => r?,
        why = &mut lost => {
            return Err(etcd_client::Error::LeaseKeepAliveError(why.unwrap_or_else(|_| "the keep-alive task ended".into())));
        }
    };
    let key = r.leader().map(|k| String::from_utf8_lossy(k.key()).into_owned()).unwrap_or_default();
    Ok(Leadership { lost, key })
}

fn parse(key: &[u8], value: &[u8]) -> Option<Member> {
    match serde_json::from_slice::<Member>(value) {
        Ok(m) if !m.addr.is_empty() => Some(m),
        _ => {
            tracing::warn!(key = %String::from_utf8_lossy(key), "ignoring a malformed member record in etcd");
            None
        }
    }
}

async fn admit(registry: &Registry, m: &Member) {
    if let Err(s) = registry.admit(&m.addr, &m.node_name).await {
        tracing::warn!(addr = %m.addr, "etcd member not admitted: {}", s.message());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_and_records() {
        assert_eq!(super::worker_key("/shoal/lab/", "10.0.0.5:7070"), "/shoal/lab/workers/10.0.0.5:7070");
        assert_eq!(super::plan_key("/shoal/lab"), "/shoal/lab/plan");
        assert_eq!(super::endpoints(" http://a:2379, http://b:2379 ,"), ["http://a:2379", "http://b:2379"]);
        let m = super::parse(b"k", br#"{"addr":"h:1","node_name":"n"}"#).unwrap();
        assert_eq!((m.addr.as_str(), m.node_name.as_str()), ("h:1", "n"));
        assert!(super::parse(b"k", b"not json").is_none());
        assert!(super::parse(b"k", br#"{"addr":"","node_name":"n"}"#).is_none());
    }
}
