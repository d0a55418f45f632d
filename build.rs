//! Compiles `proto/` with protox (pure Rust), so no system `protoc` is needed,
//! and writes the compiled descriptor set to `OUT_DIR/tokend_descriptor.bin`
//! for server reflection (`proto::FILE_DESCRIPTOR_SET`).

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = [
        "proto/tokend/v1/token.proto",
        "proto/tokend/v1/admin.proto",
        "proto/tokend/v1/peer.proto",
        "proto/spiffe/workload.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("tokend_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
