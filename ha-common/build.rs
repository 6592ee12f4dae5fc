//! Compiles `proto/*.proto` with protox, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/gtm.proto",
        "proto/cm.proto",
        "proto/cn.proto",
        "proto/replicator.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Status messages serialise straight to `cm_ctl status --json`.
        .type_attribute("mpp_ha.cm.InstanceStatus", "#[derive(serde::Serialize)]")
        .type_attribute("mpp_ha.cm.DnGroupStatus", "#[derive(serde::Serialize)]")
        .type_attribute("mpp_ha.cm.ClusterStatus", "#[derive(serde::Serialize)]")
        .type_attribute("mpp_ha.cm.AgentStatus", "#[derive(serde::Serialize)]")
        .type_attribute("mpp_ha.cm.RoleChange", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}
