//! Test support on top of `iot-launch`: everything it starts, plus what only tests
//! need (cleanup of a device's containers, network namespaces whose link a test
//! cuts, workspace binaries built for the test, unique ids).

pub mod browser;
pub mod netns;
pub mod partition;
pub mod podman;
pub mod process;
pub mod signin;

pub use iot_launch::{
    ApiServer, Ca, ClusterOptions, KubeApiServer, LoggedProcess, NatsCluster, NatsServer, OidcOptions, OidcStandIn,
    OpenBao, PodmanService, TlsMode, apiserver, auth, free_port, http, kube_apiserver, nats, nats_cluster, oidc, paths,
    run_captured, wait_until,
};
pub use netns::{Bridge, NetNs};
pub use partition::PartitionProxy;
pub use podman::{DeviceContainers, podman_cli};
pub use process::{cargo_bin, unique_id};
pub use signin::SignIn;

/// Stops a child: SIGTERM, up to 30 s to finish, then SIGKILL.
pub fn process_stop(child: &mut std::process::Child) {
    iot_launch::process::terminate_child(child, std::time::Duration::from_secs(30));
}
