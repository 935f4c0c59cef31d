//! The worker port is not an open door: `shoal cert` makes a cluster CA and node
//! certificates; workers started with `--tls-dir` accept only mutual-TLS connections from
//! certificates of their CA that carry the join token; a pipeline of such workers computes
//! exactly what one process does; plaintext beyond loopback is refused without `--insecure`.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{Procs, SHOAL, SMOLLM2, model_path, models_dir, worker};
use shoal_proto::security;
use shoal_proto::v1::worker_client::WorkerClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn shoal(args: &[&str]) -> std::process::Output {
    Command::new(SHOAL).args(args).output().unwrap()
}

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn read(dir: &Path, f: &str) -> String {
    std::fs::read_to_string(dir.join(f)).unwrap()
}

/// A client that presents `identity` (if any) and trusts `ca`, with `token` (if any).
async fn hello(addr: &str, ca: &Path, identity: Option<&Path>, token: Option<&str>) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "ca.pem"))).domain_name(security::SERVER_NAME);
    if let Some(dir) = identity {
        tls = tls.identity(Identity::from_pem(read(dir, "node.pem"), read(dir, "node.key")));
    }
    let ep = Endpoint::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).unwrap();
    let ch = ep.connect().await.map_err(|e| format!("connect: {}", shoal_proto::error_chain(&e)))?;
    let mut c = WorkerClient::new(ch);
    let mut req = tonic::Request::new(shoal_proto::hello("test"));
    if let Some(t) = token {
        req.metadata_mut().insert(security::TOKEN_HEADER, t.parse().unwrap());
    }
    c.hello(req).await.map(|_| ()).map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

/// Whether a call failed below gRPC: the TLS handshake failed, or the server's alert closed
/// the connection under the request (seen as UNKNOWN "transport error", CANCELLED or
/// UNAVAILABLE, depending on timing), not a status from the service.
fn refused_by_tls(e: &str) -> bool {
    ["connect:", "Unknown", "Cancelled", "Unavailable"].iter().any(|p| e.starts_with(p))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_and_the_join_token_keep_strangers_out() {
    let mut procs = Procs::default();
    let t = procs.temp_dir("tls");
    let (ca, ca2) = (t.join("ca"), t.join("ca2"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    ok(shoal(&["cert", "init", "--dir", &s(&ca)]));
    ok(shoal(&["cert", "init", "--dir", &s(&ca2)]));
    for n in ["w1", "w2", "c"] {
        ok(shoal(&["cert", "issue", n, "--dir", &s(&ca), "--out", &s(&t.join(n)), "--host", "127.0.0.1"]));
    }
    ok(shoal(&["cert", "issue", "stranger", "--dir", &s(&ca2), "--out", &s(&t.join("stranger"))]));
    let token = read(&ca, "join-token");
    assert_eq!(token.trim().len(), 64);
    assert_ne!(token, read(&ca2, "join-token"));

    let a1 = worker(&mut procs, "127.0.0.1:0", &["--tls-dir", &s(&t.join("w1"))]);
    let a2 = worker(&mut procs, "127.0.0.1:0", &["--tls-dir", &s(&t.join("w2"))]);

    // A member with the token is let in.
    let (c, tok) = (t.join("c"), Some(token.trim()));
    hello(&a1, &ca, Some(&c), tok).await.unwrap();
    // No client certificate, another CA's certificate: refused at the TLS handshake.
    let e = hello(&a1, &ca, None, tok).await.unwrap_err();
    assert!(refused_by_tls(&e), "without a certificate: {e}");
    let e = hello(&a1, &ca2, Some(&t.join("stranger")), tok).await.unwrap_err();
    assert!(refused_by_tls(&e), "another CA: {e}");
    // The stranger trusting our CA (so only its own certificate is wrong) is refused too.
    let e = hello(&a1, &ca, Some(&t.join("stranger")), tok).await.unwrap_err();
    assert!(refused_by_tls(&e), "another CA, our CA trusted: {e}");
    // A member's certificate without the token, or with a wrong one: UNAUTHENTICATED.
    for bad in [None, Some("0".repeat(64))] {
        let e = hello(&a1, &ca, Some(&c), bad.as_deref()).await.unwrap_err();
        assert!(e.starts_with("Unauthenticated") && e.contains("join token"), "{bad:?}: {e}");
    }
    // Plaintext to a TLS worker gets nowhere.
    let plain = Endpoint::from_shared(format!("http://{a1}")).unwrap().connect().await;
    if let Ok(ch) = plain {
        let e = WorkerClient::new(ch).hello(shoal_proto::hello("test")).await.unwrap_err();
        assert_ne!(e.code(), tonic::Code::Ok);
    }
    // The worker served every refusal and still answers a member.
    hello(&a1, &ca, Some(&c), tok).await.unwrap();

    // A pipeline over mutual TLS (coordinator to stage 0, stage 0 to stage 1, tokens back
    // from stage 1) prints exactly what one process does.
    let model = model_path(SMOLLM2);
    let run = ["run", "-m", model.to_str().unwrap(), "--temperature", "0", "-n", "16", "--ignore-eos", "-t", "1", "The capital of France is"];
    let single = ok(shoal(&run));
    let mut args = vec!["--tls-dir".to_string(), s(&c)];
    args.extend(run.iter().map(|a| a.to_string()));
    args.extend(["--worker".into(), a1.clone(), "--worker".into(), a2.clone()]);
    let piped = ok(Command::new(SHOAL).args(&args).output().unwrap());
    assert!(!single.is_empty());
    assert_eq!(piped, single);
    // Without a certificate of its own, the coordinator cannot use the workers.
    let mut args = run.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    args.extend(["--worker".into(), a1.clone()]);
    let out = Command::new(SHOAL).args(&args).env_remove("SHOAL_TLS_DIR").output().unwrap();
    assert!(!out.status.success(), "a plaintext coordinator drove a TLS worker");

    // Registry mode over mutual TLS: a worker joins a TLS coordinator, which plans, loads
    // and serves through it; `shoal status` needs a certificate too.
    let (reg, out, _) = common::serve(&mut procs, &["--tls-dir", &s(&c), "--min-workers", "1"]);
    worker(&mut procs, "127.0.0.1:0", &["--tls-dir", &s(&t.join("w2")), "--join", &reg]);
    let api = common::serving(out);
    assert!(api.starts_with("http://127.0.0.1:"), "{api}");
    let st = ok(shoal(&["--tls-dir", &s(&c), "status", "--coordinator", &reg, "--json"]));
    let j: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert_eq!(j["state"], "serving", "{j:#}");
    assert!(j["workers"].as_array().unwrap().iter().any(|w| w["joined"] == true && w["loaded"] == true), "{j:#}");
    let out = Command::new(SHOAL).args(["status", "--coordinator", &reg]).env_remove("SHOAL_TLS_DIR").output().unwrap();
    assert!(!out.status.success(), "status without a certificate: {}", String::from_utf8_lossy(&out.stdout));

    // Loading a directory without a node certificate is a clear error.
    let out = shoal(&["--tls-dir", &s(&ca), "status", "--coordinator", "127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("node.pem"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn plaintext_beyond_loopback_needs_insecure() {
    let mut procs = Procs::default();
    // A worker on every interface without TLS refuses to start...
    let out = Command::new(SHOAL)
        .args(["worker", "--listen", "0.0.0.0:0", "--models-dir"])
        .arg(models_dir())
        .env_remove("SHOAL_TLS_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to serve plaintext gRPC on 0.0.0.0") && err.contains("--insecure"), "{err}");
    // ... and starts with --insecure.
    let addr = worker(&mut procs, "0.0.0.0:0", &["--insecure"]);
    assert!(addr.starts_with("0.0.0.0:"), "{addr}");
    // A coordinator will not dial a non-loopback worker in plaintext either.
    let model = model_path(SMOLLM2);
    let out = Command::new(SHOAL)
        .args(["run", "-m", model.to_str().unwrap(), "-n", "1", "--worker", "10.255.255.1:7070", "hi"])
        .env_remove("SHOAL_TLS_DIR")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing plaintext gRPC to 10.255.255.1:7070"), "{err}");
}
