//! Generates the OTLP/gRPC trace service (client and server) from the vendored OpenTelemetry
//! .proto files with protox (pure Rust, no protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/opentelemetry/proto/collector/trace/v1/trace_service.proto"];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
