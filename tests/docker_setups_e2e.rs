//! `tunnel-svc --docker` with the container set-ups users have: a user
//! that is not root, capabilities dropped, no new privileges, no network,
//! several networks, an image without a shell, a read-only root, an app on
//! the port the monitor used to take, a paused container; and the two
//! whose ports are not their own (`--network host`, `--network
//! container:OTHER`). Each works, checked as a user would (`curl
//! localhost:PORT`, `docker exec ps`, nothing left in `/`), or says why in
//! the log.

use porthole_testkit as common;

use common::docker::{get, have_docker, http_server, tunnels_of, Container, Image, Network, World};
use common::{poll_until, unused_local_port, wait_for, DEADLINE};

fn test_name() -> String {
    std::thread::current().name().unwrap_or("test").to_string()
}

/// A set-up that must simply work: the container's server answers on
/// `localhost:PORT` through its tunnel.
struct Setup<'a> {
    /// `--network` values; the world's network when empty.
    networks: &'a [&'a str],
    /// More `docker run` flags.
    extra: &'a [&'a str],
    /// Where the server listens inside.
    addr: &'a str,
    /// Its port (a free one when 0).
    port: u16,
    /// The image: busybox's, or one with only an httpd and no shell.
    no_shell: bool,
    /// tunnel-svc flags.
    tunnel: &'a [&'a str],
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            networks: &[],
            extra: &[],
            addr: "0.0.0.0",
            port: 0,
            no_shell: false,
            tunnel: &[],
        }
    }
}

/// A set-up that runs. Fields drop in order: the container before its
/// image and network.
struct Running {
    tunnel: common::TunnelProc,
    c: Container,
    port: u16,
    _image: Option<Image>,
    w: World,
}

impl Running {
    /// The container's target, as ListTargets shows it.
    async fn target(&self) -> porthole::pb::v1::Target {
        let all = self.tunnel.targets().await;
        let t = all.into_iter().find(|t| t.name == self.c.name);
        t.expect("the container is a target")
    }
}

/// Runs the set-up and checks it works; what runs, for more checks.
async fn works(setup: Setup<'_>) -> Option<Running> {
    if !have_docker(&test_name()) {
        return None;
    }
    let w = World::new();
    let port = match setup.port {
        0 => unused_local_port(),
        p => p,
    };
    let networks: Vec<&str> = match setup.networks {
        [] => vec![w.net.name.as_str()],
        some => some.to_vec(),
    };
    let mut extra = vec!["--label", w.label.as_str()];
    extra.extend_from_slice(setup.extra);
    let text = test_name();
    let (c, image) = if setup.no_shell {
        let image = Image::httpd_only(&text);
        let listen = format!("{}:{port}", setup.addr);
        let cmd = ["/httpd", "-f", "-p", &listen, "-h", "/www"];
        (
            Container::run_on(&image, &networks, &extra, &cmd),
            Some(image),
        )
    } else {
        let cmd = http_server(setup.addr, port, &text);
        let cmd = cmd.each_ref().map(String::as_str);
        (Container::run_on(&w.image, &networks, &extra, &cmd), None)
    };
    let tunnel = w.tunnel_svc(setup.tunnel).await;
    let body = poll_until("the container's server on localhost", DEADLINE, || {
        get(port)
    })
    .await;
    assert_eq!(body, text);
    if !setup.no_shell {
        assert!(
            !c.exec(&["ls", "-a", "/"]).contains("porthole"),
            "nothing of porthole is left in /"
        );
    }
    Some(Running {
        tunnel,
        c,
        port,
        _image: image,
        w,
    })
}

/// The monitor's line in `ps` inside the container.
fn monitor_ps(c: &Container) -> String {
    c.monitor_ps()
        .unwrap_or_else(|| panic!("a monitor in:\n{}", c.exec(&["ps"])))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_root_user_gets_a_monitor_running_as_that_user() {
    let setup = Setup {
        extra: &["--user", "1000"],
        ..Default::default()
    };
    let Some(mut r) = works(setup).await else {
        return;
    };
    // busybox ps: PID USER TIME COMMAND.
    let line = monitor_ps(&r.c);
    assert_eq!(line.split_whitespace().nth(1), Some("1000"), "{line}");
    assert!(r.tunnel.terminate().await.success());
    wait_for("the monitor to exit with its exec stream", DEADLINE, || {
        !r.c.exec(&["ps"]).contains("--stdio")
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_root_user_without_capabilities() {
    let setup = Setup {
        extra: &["--user", "1000", "--cap-drop", "ALL"],
        ..Default::default()
    };
    let Some(r) = works(setup).await else {
        return;
    };
    // Without CAP_SETUID the monitor stays root (0: no /etc/passwd), and
    // says so.
    let line = monitor_ps(&r.c);
    assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
    assert!(r
        .tunnel
        .log()
        .contains("cannot run as the container's user"));
}

#[tokio::test(flavor = "multi_thread")]
async fn root_without_capabilities() {
    works(Setup {
        extra: &["--cap-drop", "ALL"],
        ..Default::default()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_new_privileges() {
    works(Setup {
        extra: &["--security-opt", "no-new-privileges", "--user", "1000"],
        ..Default::default()
    })
    .await;
}

/// The engine refuses to copy into a read-only root: the monitor is
/// streamed in over exec to the first place that is writable and
/// executable. Docker mounts `--tmpfs` `noexec`, so it is written to
/// `/tmp`, does not run there, and moves on to `/dev` (Docker's own tmpfs,
/// not `noexec`); it removes itself from there too.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_root_gets_the_monitor_streamed_in() {
    let Some(mut r) = works(Setup {
        extra: &["--read-only", "--tmpfs", "/tmp"],
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let line = monitor_ps(&r.c);
    assert!(line.contains("/dev/.porthole-monitor-svc"), "{line}");
    assert!(
        !r.c.exec(&["ls", "-a", "/dev", "/tmp"]).contains("porthole"),
        "the monitor removed its file"
    );
    assert!(
        r.tunnel.log().contains("streamed in over exec"),
        "the log says how it got in"
    );
    assert!(r.tunnel.terminate().await.success());
    wait_for("the monitor to exit with its exec stream", DEADLINE, || {
        !r.c.exec(&["ps"]).contains("--stdio")
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn no_network_goes_over_the_exec_stream() {
    let Some(r) = works(Setup {
        networks: &["none"],
        addr: "127.0.0.1",
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let t = r.target().await;
    assert!(t.url.ends_with(" via exec"), "{t:?}");
    let monitor = r.c.monitor_ps().expect("the monitor runs");
    assert!(
        !monitor.contains("--stdio-listen"),
        "no address, no listener: {monitor}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn several_networks() {
    if !have_docker(&test_name()) {
        return;
    }
    // Joined after it starts, as `docker network connect` does.
    let other = Network::new();
    let Some(r) = works(Setup::default()).await else {
        return;
    };
    common::docker::docker(&["network", "connect", &other.name, &r.c.name]).unwrap();
    assert_eq!(get(r.port).await.as_deref(), Some(test_name().as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_without_a_shell() {
    works(Setup {
        no_shell: true,
        ..Default::default()
    })
    .await;
}

/// The monitor used to listen on 7070 in every container: an app there
/// clashed with it. It takes a free ephemeral port now.
#[tokio::test(flavor = "multi_thread")]
async fn an_app_on_port_7070() {
    let Some(r) = works(Setup {
        port: 7070,
        addr: "0.0.0.0",
        tunnel: &["--docker-transport", "ip"],
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let t = r.target().await;
    assert!(
        t.url.contains(" via ip ") && !t.url.ends_with(":7070"),
        "{t:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn paused_then_unpaused() {
    let Some(r) = works(Setup::default()).await else {
        return;
    };
    r.c.docker("pause");
    r.c.docker("unpause");
    let body = poll_until("the server after unpause", DEADLINE, || get(r.port)).await;
    assert_eq!(body, test_name());
}

/// `--network host`: the ports are on the host already. No monitor, no
/// target, nothing bound; the log says why.
#[tokio::test(flavor = "multi_thread")]
async fn host_network_is_left_alone_and_says_why() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let port = unused_local_port();
    let cmd = http_server("127.0.0.1", port, "on-the-host");
    let extra = ["--label", w.label.as_str()];
    let c = Container::run_on(
        &w.image,
        &["host"],
        &extra,
        &cmd.each_ref().map(String::as_str),
    );
    let mut tunnel = w.tunnel_svc(&[]).await;
    tunnel.proc().wait_for_log("--network host").await;
    // Its own server, on the host's port, started in its own time.
    let own = poll_until("the container's server on the host", DEADLINE, || get(port)).await;
    assert_eq!(own, "on-the-host");
    assert!(tunnel.targets().await.iter().all(|t| t.name != c.name));
    assert!(!c.exec(&["ps"]).contains("--stdio"), "no monitor inside");
}

/// `--network container:OTHER`: one set of ports, forwarded once, as the
/// other container's.
#[tokio::test(flavor = "multi_thread")]
async fn a_shared_network_is_forwarded_once() {
    let Some(mut r) = works(Setup::default()).await else {
        return;
    };
    let shares = format!("container:{}", r.c.name);
    let extra = ["--label", r.w.label.as_str()];
    let sharer = Container::run_on(
        &r.w.image,
        &[&shares],
        &extra,
        &["/bin/busybox", "sleep", "600"],
    );
    r.tunnel.proc().wait_for_log(&sharer.name).await;
    assert!(r.tunnel.log().contains("shares the network of container"));
    assert!(r
        .tunnel
        .targets()
        .await
        .iter()
        .all(|t| t.name != sharer.name));
    assert_eq!(tunnels_of(&r.tunnel, &r.c.name).await.len(), 1);
    assert_eq!(get(r.port).await.as_deref(), Some(test_name().as_str()));
}

/// `docker run -p` of a server that listens on the container's loopback
/// only: Docker's forward cannot reach it, so porthole forwards it, and
/// the tunnel says why it is not left to Docker.
#[tokio::test(flavor = "multi_thread")]
async fn a_published_port_docker_cannot_reach_is_forwarded() {
    let published = unused_local_port();
    let port = unused_local_port();
    let publish = format!("127.0.0.1:{published}:{port}");
    let Some(r) = works(Setup {
        addr: "127.0.0.1",
        port,
        extra: &["-p", &publish],
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let t = tunnels_of(&r.tunnel, &r.c.name).await;
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(t[0].host_port, u32::from(port), "{t:?}");
    assert!(
        t[0].note.contains(&published.to_string()) && t[0].note.contains("loopback only"),
        "{t:?}"
    );
    assert_eq!(
        get(published).await,
        None,
        "Docker's own forward reaches nothing"
    );
}

/// A directory of the container's own at the monitor's path is never
/// replaced: the engine refuses the archive, and the monitor is streamed
/// in to `/tmp` instead.
#[tokio::test(flavor = "multi_thread")]
async fn a_directory_at_the_monitors_path_is_left_alone() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let script = "mkdir -p /.porthole-monitor-svc && echo mine > /.porthole-monitor-svc/keep \
                  && exec /bin/busybox sleep 600";
    let extra = ["--label", w.label.as_str()];
    let c = Container::run(&w.image, &w.net, &extra, &["/bin/sh", "-c", script]);
    wait_for("the container's directory", DEADLINE, || {
        common::docker::docker(&[
            "exec",
            &c.name,
            "/bin/busybox",
            "cat",
            "/.porthole-monitor-svc/keep",
        ])
        .is_ok_and(|s| s == "mine")
    });
    let tunnel = w.tunnel_svc(&[]).await;
    tunnel
        .wait_target("the container's monitor", |t| {
            t.name == c.name && t.connected
        })
        .await;
    let line = monitor_ps(&c);
    assert!(line.contains("/tmp/.porthole-monitor-svc"), "{line}");
    assert_eq!(c.exec(&["cat", "/.porthole-monitor-svc/keep"]), "mine");
}
