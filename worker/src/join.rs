//! Joining a coordinator: `shoal worker --join COORDINATOR`.
//!
//! The worker calls `Coordinator.Join` with the address the coordinator should dial back
//! (its advertise address); the coordinator says Hello and reads the inventory over that
//! address before it answers. The worker then joins again every `heartbeat_ms` (the
//! coordinator's last-seen time). While the coordinator is unreachable, or cannot reach the
//! worker back, it retries with backoff and logs at warn; a refusal that retrying cannot
//! fix (another protocol major, a bad address) ends the loop with an error, and the worker
//! exits. The gRPC service keeps serving all along: joining runs beside it.

use std::convert::Infallible;
use std::time::Duration;

use shoal_proto::v1::{self, coordinator_client::CoordinatorClient};
use tonic::Code;
use shoal_proto::security::Channel;

/// First wait after a failed join; doubled up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between two attempts while the coordinator is unreachable.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest a Join may take (the coordinator dials back before it answers).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why joining stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("coordinator {coordinator} refused this worker: {msg}")]
    Refused { coordinator: String, msg: String },
}

impl JoinError {
    /// Whether the same call could succeed later. Named per variant.
    pub fn is_retryable(&self) -> bool {
        match self {
            JoinError::Refused { .. } => false,
        }
    }
}

/// Joins `coordinator` as `node_name`, reachable at `advertise`, and keeps joining every
/// heartbeat. Returns only when the coordinator refuses the worker for good.
pub async fn join_loop(coordinator: String, advertise: String, node_name: String) -> Result<Infallible, JoinError> {
    let req = v1::JoinRequest {
        protocol_major: shoal_proto::PROTOCOL_MAJOR,
        protocol_minor: shoal_proto::PROTOCOL_MINOR,
        node_name,
        advertise_addr: advertise,
        capabilities: shoal_proto::hello("").capabilities,
    };
    let refused = |msg: String| JoinError::Refused { coordinator: coordinator.clone(), msg };
    let mut client: Option<CoordinatorClient<Channel>> = None;
    let mut backoff = MIN_BACKOFF;
    let mut joined = false;
    loop {
        let r = async {
            let c = match client.as_mut() {
                Some(c) => c,
                None => {
                    let ch = crate::service::connect(&coordinator)
                        .await
                        .map_err(|e| tonic::Status::unavailable(shoal_proto::error_chain(&e)))?;
                    client.insert(CoordinatorClient::new(ch))
                }
            };
            tokio::time::timeout(JOIN_TIMEOUT, c.join(req.clone()))
                .await
                .map_err(|_| tonic::Status::deadline_exceeded(format!("no answer within {JOIN_TIMEOUT:?}")))?
                .map(tonic::Response::into_inner)
        }
        .await;
        match r {
            Ok(reply) => {
                if !shoal_proto::is_compatible(reply.protocol_major, reply.protocol_minor) {
                    return Err(refused(format!(
                        "it speaks protocol {}.{}, this worker shoal.v1 {}.x",
                        reply.protocol_major,
                        reply.protocol_minor,
                        shoal_proto::PROTOCOL_MAJOR
                    )));
                }
                if !joined {
                    tracing::info!(coordinator = %coordinator, name = %reply.coordinator_name, "joined");
                    joined = true;
                }
                backoff = MIN_BACKOFF;
                let beat = Duration::from_millis(u64::from(reply.heartbeat_ms));
                let beat = beat.clamp(Duration::from_millis(100), Duration::from_secs(60));
                tokio::time::sleep(beat).await;
            }
            // Retrying cannot fix these: another major, a malformed request.
            Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::InvalidArgument) => {
                return Err(refused(s.message().to_string()));
            }
            Err(s) if s.code() == Code::Unimplemented => {
                let msg = format!("it does not serve shoal.v1.Coordinator (is it a coordinator?): {}", s.message());
                return Err(refused(msg));
            }
            Err(s) => {
                tracing::warn!(coordinator = %coordinator, "cannot join (retrying in {backoff:?}): {}", s.message());
                if s.code() == Code::Unavailable {
                    // Dial again: the coordinator may have restarted elsewhere.
                    client = None;
                }
                joined = false;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
