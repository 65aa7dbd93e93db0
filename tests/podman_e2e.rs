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

/// A container of `w` serving `text` on its 127.0.0.1, and tunnel-svc
/// following `w`, once the server answers on the host's localhost; the
/// container's target as `ls` shows it.
async fn serving(
    w: &World,
    text: &str,
) -> (Container, common::TunnelProc, u16, porthole::pb::v1::Target) {
    let port = common::unused_local_port();
    let c = w.http("127.0.0.1", port, text);
    let tunnel = w.tunnel_svc(&[]).await;
    let started = Instant::now();
    let body = poll_until("the container's server on localhost", DEADLINE, || {
        get(port)
    })
    .await;
    assert_eq!(body, text);
    eprintln!(
        "usable on localhost {} ms after tunnel-svc started",
        started.elapsed().as_millis()
    );
    let target = tunnel
        .targets()
        .await
        .into_iter()
        .find(|t| t.name == c.name)
        .expect("the container is a target");
    (c, tunnel, port, target)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_podman_containers_loopback_server_is_on_localhost_through_restart_and_stop() {
    if !have_podman(&test_name()) {
        return;
    }
    let w = World::on(Cli::Podman);
    let (c, mut tunnel, port, t) = serving(&w, "in-podman").await;
    let engine = &w.podman.as_ref().expect("a Podman world").url;
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

/// No network and a read-only root: Podman refuses the monitor's archive,
/// so it is streamed in over exec to `/tmp` (Podman's `--read-only` mounts
/// a tmpfs there), and the bytes go over the exec stream.
#[tokio::test(flavor = "multi_thread")]
async fn a_podman_container_without_a_network_or_a_writable_root_is_reached_over_exec() {
    if !have_podman(&test_name()) {
        return;
    }
    let w = World::on(Cli::Podman);
    let port = common::unused_local_port();
    let cmd = http_server("127.0.0.1", port, "no-network");
    let c = Container::run_on(
        &w.image,
        &["none"],
        &["--read-only", "--label", w.label.as_str()],
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
    let monitor = c.monitor_ps().expect("the monitor runs");
    assert!(
        !monitor.contains("--stdio-listen"),
        "no address, no listener: {monitor}"
    );
    assert!(monitor.contains("/tmp/.porthole-monitor-svc"), "{monitor}");
    assert!(tunnel.log().contains("streamed in over exec"));
    let tmp = c.exec(&["ls", "-a", "/tmp"]);
    assert!(!tmp.contains("porthole"), "left in /tmp:\n{tmp}");
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
    let (c, mut tunnel, port, t) = serving(&w, "rootless").await;
    let user = w.rootless.as_ref().expect("a rootless world");
    let socket = format!("unix://{}/podman/podman.sock", user.runtime_dir.display());
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

/// A "remote machine": a network namespace running sshd and Podman's API
/// service, whose socket the host reaches only through that sshd, as
/// `--engine ssh://root@ADDRESS/SOCKET` (what `DOCKER_HOST` or a docker
/// context would say) with the user's ssh options. Its container has no
/// network: the exec stream, over the same ssh forward, carries the bytes.
/// The ssh master is killed: it comes back, and so does the tunnel.
#[tokio::test(flavor = "multi_thread")]
async fn a_remote_podman_over_ssh_is_followed_and_its_master_comes_back() {
    if !have_podman(&test_name()) {
        return;
    }
    let w = World::remote().await;
    let (c, tunnel, port, t) = serving(&w, "far-away").await;
    let engine = w.remote_engine().expect("a remote world");
    assert!(
        t.url.starts_with(&format!("podman://{} (", c.name))
            && t.url.contains(" via exec")
            && t.url.ends_with(&format!(" on {engine}")),
        "{t:?}"
    );

    let master = poll_until("tunnel-svc's ssh master", DEADLINE, || async {
        common::ssh_master(tunnel.pid(), None)
    })
    .await;
    let killed = rustix::process::kill_process(
        rustix::process::Pid::from_raw(master as i32).expect("a pid"),
        rustix::process::Signal::KILL,
    );
    assert!(killed.is_ok(), "kill -KILL {master}");
    let again = Instant::now();
    poll_until("a new ssh master", DEADLINE, || async {
        common::ssh_master(tunnel.pid(), Some(master))
    })
    .await;
    let body = poll_until("the tunnel after the master came back", DEADLINE, || {
        get(port)
    })
    .await;
    assert_eq!(body, "far-away");
    eprintln!(
        "usable again {} ms after the master was killed",
        again.elapsed().as_millis()
    );
}

/// What Docker mode does for Docker containers, on Podman's events and
/// states: a renamed container keeps its tunnel under the new name, a
/// port the container publishes itself (`-p`) is listed, not forwarded,
/// and `porthole.*` labels are its rules.
#[tokio::test(flavor = "multi_thread")]
async fn podman_renames_published_ports_and_labels_are_followed_as_dockers() {
    if !have_podman(&test_name()) {
        return;
    }
    let w = World::on(Cli::Podman);
    let (c, tunnel, port, _) = serving(&w, "renamed").await;
    let renamed = common::docker::unique("renamed");
    Cli::Podman
        .run(&["rename", &c.name, &renamed])
        .expect("podman rename");
    let id = format!("{renamed}:tcp:{port}");
    tunnel.wait_active(&id).await;
    assert_eq!(get(port).await.as_deref(), Some("renamed"));

    let (inside, published) = (common::unused_local_port(), common::unused_local_port());
    let mapping = format!("{published}:{inside}");
    let cmd = http_server("0.0.0.0", inside, "published");
    let p = w.run(
        &["-p", mapping.as_str()],
        &cmd.each_ref().map(String::as_str),
    );
    let tunnel_id = format!("{}:tcp:{inside}", p.name);
    let t = poll_until("the published port, listed", DEADLINE, || async {
        tunnel.tunnel(&tunnel_id).await
    })
    .await;
    assert_eq!(t.host_port, u32::from(published), "{t:?}");
    assert!(t.note.contains("published"), "{t:?}");
    assert!(common::host_port_is_free(inside) || inside == published);

    // Its labels are its rules: one port ignored, another labelled.
    let (ignored, labelled) = (common::unused_local_port(), common::unused_local_port());
    let script = format!(
        "mkdir -p /tmp/w && /bin/busybox httpd -p 127.0.0.1:{ignored} -h /tmp/w && \
         exec /bin/busybox httpd -f -p 127.0.0.1:{labelled} -h /tmp/w"
    );
    let (ignore, label) = (
        format!("porthole.ignore={ignored}"),
        format!("porthole.label.{labelled}=site"),
    );
    let r = w.run(
        &["--label", ignore.as_str(), "--label", label.as_str()],
        &["/bin/sh", "-c", &script],
    );
    let t = tunnel
        .wait_active(&format!("{}:tcp:{labelled}", r.name))
        .await;
    assert_eq!(t.label, "site", "{t:?}");
    assert!(
        tunnel
            .tunnel(&format!("{}:tcp:{ignored}", r.name))
            .await
            .is_none(),
        "the ignored port has no tunnel"
    );
}
