//! Generates the kpi.v1 Rust code from `proto/` with protox, so no `protoc` is needed.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/kpi/v1/kpi.proto",
        "proto/kpi/v1/targets.proto",
        "proto/kpi/v1/events.proto",
        "proto/kpi/v1/catalog.proto",
        "proto/kpi/v1/ingest.proto",
        "proto/kpi/v1/query.proto",
        "proto/kpi/v1/audit.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(files, ["proto"])?;
    // Server reflection serves this encoded set, so generic tools see the whole contract.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("kpi_v1_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Sorted label maps encode the same way every time.
        .btree_map(".")
        // prost's codec, with undecodable messages INVALID_ARGUMENT instead of INTERNAL.
        .codec_path("crate::api::codec::KpiCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
