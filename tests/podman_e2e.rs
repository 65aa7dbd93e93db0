//! `tunnel-svc --docker` against rootful Podman (Debian's) through its
//! Docker-compatible API service, found with `--engine`: the same
//! busybox-only containers as the Docker tests, on a Podman network of the
//! test's own. Every check is one a user would make: `curl localhost:PORT`,
//! `tunnel-svc ls`, `podman exec ... ps`.

use porthole_testkit as common;

use common::docker::{get, have_podman, http_server, tunnels_of, Cli, Container, World};
use common::{poll_until, wait_for, DEADLINE};
use std::time::Instant;

fn test_name() -> String {
    std::thread::current().name().unwrap_or("test").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_podman_containers_loopback_server_is_on_localhost_through_restart_and_stop() {
    if !have_podman(&test_name()) {
        return;
    }
    let w = World::on(Cli::Podman);
    let port = common::unused_local_port();
    let c = w.http("127.0.0.1", port, "in-podman");
    let mut tunnel = w.tunnel_svc(&[]).await;
    let started = Instant::now();
    let body = poll_until("the container's server on localhost", DEADLINE, || {
        get(port)
    })
    .await;
    assert_eq!(body, "in-podman");
    eprintln!(
        "usable on localhost {} ms after tunnel-svc started",
        started.elapsed().as_millis()
    );
    let engine = &w.podman.as_ref().expect("a Podman world").url;
    let targets = tunnel.targets().await;
    let t = targets
        .iter()
        .find(|t| t.name == c.name)
        .expect("the container is a target");
    assert!(
        t.url.starts_with(&format!("podman://{} (", c.name))
            && t.url.ends_with(&format!(" on {engine}")),
        "ls shows the engine: {t:?}"
    );
    assert_eq!(tunnels_of(&tunnel, &c.name).await.len(), 1);

    c.docker("restart");
    let body = poll_until("the tunnel after podman restart", DEADLINE, || get(port)).await;
    assert_eq!(body, "in-podman");

    // tunnel-svc gone: its monitor and the monitor's file are gone too.
    assert!(c.monitor_ps().is_some(), "a monitor runs while followed");
    let status = tunnel.terminate_within(DEADLINE).await;
    assert!(status.success(), "tunnel-svc on SIGTERM: {status}");
    wait_for("the monitor to leave the container", DEADLINE, || {
        c.monitor_ps().is_none()
    });
    let root = c.exec(&["ls", "-a", "/"]);
    assert!(!root.contains("porthole"), "left in the container:\n{root}");

    // Followed again, then stopped: the host port is free.
    let tunnel = w.tunnel_svc(&[]).await;
    poll_until("the tunnel, followed again", DEADLINE, || get(port)).await;
    c.docker("stop");
    wait_for(
        "the host port to be free after podman stop",
        DEADLINE,
        || common::host_port_is_free(port),
    );
    assert!(tunnels_of(&tunnel, &c.name).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_podman_container_without_a_network_is_reached_over_exec() {
    if !have_podman(&test_name()) {
        return;
    }
    let w = World::on(Cli::Podman);
    let port = common::unused_local_port();
    let cmd = http_server("127.0.0.1", port, "no-network");
    let c = Container::run_on(
        &w.image,
        &["none"],
        &["--label", w.label.as_str()],
        &cmd.each_ref().map(String::as_str),
    );
    let tunnel = w.tunnel_svc(&[]).await;
    let body = poll_until("the server of a --network none container", DEADLINE, || {
        get(port)
    })
    .await;
    assert_eq!(body, "no-network");
    let targets = tunnel.targets().await;
    let t = targets.iter().find(|t| t.name == c.name).expect("a target");
    assert!(t.url.contains(" via exec"), "no address to reach: {t:?}");
}

/// Rootless Podman, as a user without root ([`common::docker::ROOTLESS_USER`],
/// made if missing, with a runtime directory as a login makes it): its API
/// service on its default socket, tunnel-svc as the same user finding it
/// with no flag. The containers have no network (`--network none`): this
/// host's `/dev/net/tun` is root's only, so slirp4netns cannot give a
/// rootless container one; the exec stream is what carries the bytes, as
/// it would for slirp4netns' unreachable addresses.
#[tokio::test(flavor = "multi_thread")]
async fn rootless_podman_as_its_user_with_tunnel_svc_as_that_user_too() {
    if !have_podman(&test_name()) {
        return;
    }
    let w = World::on(Cli::RootlessPodman);
    let port = common::unused_local_port();
    let cmd = http_server("127.0.0.1", port, "rootless");
    let c = Container::run_on(
        &w.image,
        &["none"],
        &["--label", w.label.as_str()],
        &cmd.each_ref().map(String::as_str),
    );
    let mut tunnel = w.tunnel_svc(&[]).await;
    let body = poll_until("the rootless container's server", DEADLINE, || get(port)).await;
    assert_eq!(body, "rootless");
    let user = w.rootless.as_ref().expect("a rootless world");
    let socket = format!("unix://{}/podman/podman.sock", user.runtime_dir.display());
    let targets = tunnel.targets().await;
    let t = targets.iter().find(|t| t.name == c.name).expect("a target");
    assert!(
        t.url.starts_with(&format!("podman://{} (", c.name))
            && t.url.contains(" via exec")
            && t.url.ends_with(&format!(" on {socket}")),
        "found the user's own Podman: {t:?}"
    );
    assert!(
        tunnel.log().contains("Podman's rootless socket"),
        "says where it found the engine:\n{}",
        tunnel.log()
    );
    let status = tunnel.terminate_within(DEADLINE).await;
    assert!(status.success(), "tunnel-svc on SIGTERM: {status}");
    wait_for("the monitor to leave the container", DEADLINE, || {
        c.monitor_ps().is_none()
    });
    let root = c.exec(&["ls", "-a", "/"]);
    assert!(!root.contains("porthole"), "left in the container:\n{root}");
    wait_for("the host port to be free", DEADLINE, || {
        common::host_port_is_free(port)
    });
}
