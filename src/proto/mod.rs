//! The generated kpi.v1 protobuf messages and gRPC stubs (see `proto/kpi/v1/`), and their
//! conversions to and from domain types.
//!
//! `api` uses the services and the request conversions; `store` uses the event messages
//! to encode and decode the stored records, so both meet the same code here.

pub mod from_proto;
pub mod to_proto;

#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod generated {
    tonic::include_proto!("kpi.v1");
}

pub use generated::*;

/// The encoded `FileDescriptorSet` of `proto/`, served by gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kpi_v1_descriptor");
