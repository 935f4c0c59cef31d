//! etcd mode against a real etcd server (Debian's `etcd-server`, started on loopback with a
//! temporary data directory and stopped by PID): workers register under a lease, the
//! coordinator finds them there, plans, publishes the plan in etcd and serves; a worker
//! killed with SIGKILL leaves the membership when its lease expires.

mod common;

use std::time::{Duration, Instant};

use common::{Procs, start_etcd, status_json};

fn joined(st: &serde_json::Value) -> Vec<String> {
    st["workers"].as_array().unwrap().iter().filter(|w| w["joined"] == true).map(|w| w["addr"].as_str().unwrap().to_string()).collect()
}

#[test]
fn workers_found_in_etcd_and_dropped_when_their_lease_expires() {
    let mut procs = Procs::default();
    let data = procs.temp_dir("etcd");
    let etcd = start_etcd(&data);
    let prefix = format!("/shoal/test-{}", std::process::id());
    let (reg, out, _) = common::serve(&mut procs, &["--etcd", &etcd.url, "--etcd-prefix", &prefix, "--min-workers", "2"]);
    let addrs: Vec<String> = (0..2)
        .map(|i| common::worker(&mut procs, "127.0.0.1:0", &["--name", &format!("e{i}"), "--etcd", &etcd.url, "--etcd-prefix", &prefix]))
        .collect();
    // No --join anywhere: the coordinator found both workers in etcd, planned and serves.
    let api = common::serving(out);
    assert!(api.starts_with("http://"));
    let st = status_json(&reg);
    assert_eq!(st["state"], "serving", "{st:#}");
    let mut got = joined(&st);
    got.sort();
    let mut want = addrs.clone();
    want.sort();
    assert_eq!(got, want, "{st:#}");
    // The plan being served is in etcd: both workers, every layer once, in order.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let plan: serde_json::Value = rt.block_on(async {
        let mut c = etcd_client::Client::connect([etcd.url.as_str()], None).await.unwrap();
        let r = c.get(format!("{prefix}/plan"), None).await.unwrap();
        let kv = r.kvs().first().expect("no plan in etcd");
        assert!(kv.mod_revision() > 0);
        serde_json::from_slice(kv.value()).unwrap()
    });
    assert_eq!(plan["model"], common::SMOLLM2, "{plan:#}");
    let stages = plan["stages"].as_array().unwrap();
    let mut in_plan: Vec<String> = stages.iter().map(|s| s["addr"].as_str().unwrap().to_string()).collect();
    in_plan.sort();
    assert_eq!(in_plan, want, "{plan:#}");
    assert_eq!(stages[0]["layer_start"], 0);
    assert_eq!(stages[1]["layer_end"], 30);
    assert_eq!(stages[0]["layer_end"], stages[1]["layer_start"]);
    assert!(stages[0]["embed"] == true && stages[1]["head"] == true, "{plan:#}");

    // SIGKILL the second worker: nothing deregisters it, its lease expires (5 s) and the
    // coordinator drops it.
    let t0 = Instant::now();
    let victim = procs.0.len() - 1;
    procs.0[victim].kill().unwrap();
    let _ = procs.0[victim].wait();
    loop {
        let left = joined(&status_json(&reg));
        if left == [addrs[0].clone()] {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "still joined after {:?}: {left:?}", t0.elapsed());
        std::thread::sleep(Duration::from_millis(250));
    }
    let took = t0.elapsed();
    eprintln!("etcd: the killed worker left the membership after {took:?}");
    assert!(took >= Duration::from_secs(3), "left after {took:?}, before its lease could expire");
    drop(etcd);
}
