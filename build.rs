//! Compiles the gRPC contracts no crate provides (CSI v1 Identity + Node, kubelet plugin
//! registration, the SPIFFE Workload API server side) with protox, so neither developers nor
//! CI need `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/csi.proto",
        "proto/pluginregistration.proto",
        "proto/workload.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
