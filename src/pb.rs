//! Code generated from `proto/porthole/v1/*.proto` by build.rs.

/// `porthole.v1`: PortEvents, Relay and TunnelAdmin.
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod v1 {
    tonic::include_proto!("porthole.v1");
}

/// Encoded `FileDescriptorSet` of every porthole proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/porthole_descriptor.bin"));
