//! shoal-proto: the wire contract between coordinator and workers.
//!
//! Holds the protocol version that the `Hello` handshake compares. The gRPC services
//! (tonic + prost) live here too once the cluster is wired; this crate must not depend on
//! `shoal-model` or `shoal-kernels`, so both sides can share it.

/// Protocol major version: peers with a different major refuse each other at `Hello`.
pub const PROTOCOL_MAJOR: u32 = 1;
/// Protocol minor version: additive changes only.
pub const PROTOCOL_MINOR: u32 = 0;

/// Whether a peer speaking `major.minor` can talk to this build.
pub fn is_compatible(major: u32, _minor: u32) -> bool {
    major == PROTOCOL_MAJOR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_major_is_refused() {
        assert!(is_compatible(PROTOCOL_MAJOR, PROTOCOL_MINOR + 3));
        assert!(!is_compatible(PROTOCOL_MAJOR + 1, 0));
    }
}
