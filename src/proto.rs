//! Generated protobuf and gRPC code. The only module where generated-code lint
//! exceptions live; core modules never import it (conversion happens in `api/`).
#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

/// tokend's own API: token, admin and peer services.
pub mod tokend {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("tokend.v1");
    }
}

/// The SPIFFE Workload API (no proto package: clients call `/SpiffeWorkloadAPI/...`).
pub mod spiffe {
    tonic::include_proto!("_");
}

/// Every file of `proto/` (and its imports) as an encoded
/// `FileDescriptorSet`, written by build.rs: what server reflection serves,
/// so grpcurl and grpcui work without the proto files.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tokend_descriptor.bin"));
