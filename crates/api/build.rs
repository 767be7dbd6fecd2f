//! Generates the tonic/prost code from the .proto files with protox (pure Rust, no protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/plexus/discovery/v1/discovery.proto", "proto/plexus/identity/v1/identity.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // Small per-RPC buffers: see `src/codec.rs`.
    tonic_prost_build::configure().bytes(".").codec_path("crate::codec::SmallBufferCodec").compile_fds(fds)?;
    Ok(())
}
