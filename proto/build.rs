//! Generates the coordinator's gRPC code when the `grpc` feature is on, with a vendored protoc
//! (nothing to install).

fn main() {
    #[cfg(feature = "grpc")]
    {
        let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
        std::env::set_var("PROTOC", protoc);
        tonic_prost_build::configure()
            .compile_protos(
                &["proto/vigil/coordinator/v1/coordinator.proto"],
                &["proto"],
            )
            .expect("compile coordinator.proto");
    }
}
