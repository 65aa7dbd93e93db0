//! `tunnel-svc --docker` against the real Docker engine: containers from a
//! busybox-only image (no libc, no shell but busybox's) on a network of the
//! test's own, the real tunnel-svc on the host, and a static monitor-svc it
//! puts in each container. Every check is one a user would make: `curl
//! localhost:PORT`, `tunnel-svc ls`, `docker exec ... ps`.

use porthole_testkit as common;

use common::docker::{get, have_docker, static_monitor, tunnels_of, Container, Image, World};
use common::{poll_until, wait_for, TunnelProc, DEADLINE};
use std::net::SocketAddr;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn test_name() -> String {
    std::thread::current().name().unwrap_or("test").to_string()
}

fn free_port() -> u16 {
    common::unused_local_port()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_loopback_server_in_busybox_is_on_localhost_and_dns_is_not() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let port = free_port();
    let c = w.http("127.0.0.1", port, "in-busybox");
    // Everything over the exec stream: no network path to the container.
    let tunnel = w.tunnel_svc(&["--docker-transport", "exec"]).await;
    let started = Instant::now();
    let body = poll_until("the container's server on localhost", DEADLINE, || {
        get(port)
    })
    .await;
    assert_eq!(body, "in-busybox");
    eprintln!(
        "usable on localhost {} ms after tunnel-svc started",
        started.elapsed().as_millis()
    );
    // Only the server: Docker's embedded DNS (127.0.0.11) is not forwarded.
    let tunnels = tunnels_of(&tunnel, &c.name).await;
    assert_eq!(tunnels.len(), 1, "{tunnels:?}");
    assert_eq!(tunnels[0].id, format!("{}:tcp:{port}", c.name));
    let targets = tunnel.targets().await;
    let t = targets
        .iter()
        .find(|t| t.name == c.name)
        .expect("the container is a target");
    assert!(t.connected, "{t:?}");
    assert!(
        t.url.starts_with(&format!("docker://{} (", c.name)) && t.url.contains(&w.image.name),
        "{t:?}"
    );
    assert!(t.url.ends_with(" via exec"), "{t:?}");
    let ps = c.exec(&["ps"]);
    assert!(
        !ps.contains("--stdio-listen"),
        "exec transport: the monitor opens no port:\n{ps}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_frees_the_port_start_and_restart_bring_it_back() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let port = free_port();
    let c = w.http("127.0.0.1", port, "lifecycle");
    let tunnel = w.tunnel_svc(&[]).await;
    poll_until("the tunnel", DEADLINE, || get(port)).await;

    c.docker("stop");
    let stopped = Instant::now();
    wait_for(
        "the host port to be free after docker stop",
        DEADLINE,
        || common::host_port_is_free(port),
    );
    eprintln!(
        "host port free {} ms after docker stop returned",
        stopped.elapsed().as_millis()
    );
    assert!(tunnels_of(&tunnel, &c.name).await.is_empty());

    c.docker("start");
    let body = poll_until("the tunnel after docker start", DEADLINE, || get(port)).await;
    assert_eq!(body, "lifecycle");

    c.docker("restart");
    let body = poll_until("the tunnel after docker restart", DEADLINE, || get(port)).await;
    assert_eq!(body, "lifecycle");
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_started_later_are_followed_and_filters_hold() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let (port, other_port) = (free_port(), free_port());
    let tunnel = w.tunnel_svc(&[]).await;
    // The same image and network, without the label, started first: by the
    // time the labelled one is usable, its start event has been seen too.
    let other = Container::http(&w.image, &w.net, &[], "0.0.0.0", other_port, "other");
    let chosen = w.http("0.0.0.0", port, "chosen");
    let body = poll_until(
        "the labelled container, started after tunnel-svc",
        DEADLINE,
        || get(port),
    )
    .await;
    assert_eq!(body, "chosen");
    assert!(tunnels_of(&tunnel, &other.name).await.is_empty());
    // A container is a target as soon as it is followed: the other never was.
    let targets = tunnel.targets().await;
    assert!(
        targets.iter().all(|t| t.name != other.name)
            && targets.iter().any(|t| t.name == chosen.name),
        "{targets:?}"
    );
    assert!(
        common::host_port_is_free(other_port),
        "the other container is not forwarded"
    );
    drop(chosen);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_containers_on_one_port_both_forwarded_the_second_remapped() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let port = free_port();
    let a = w.http("127.0.0.1", port, "first");
    let tunnel = w.tunnel_svc(&[]).await;
    poll_until("the first container", DEADLINE, || get(port)).await;
    let b = w.http("127.0.0.1", port, "second");
    let moved = poll_until("the second container's tunnel", DEADLINE, || async {
        tunnels_of(&tunnel, &b.name)
            .await
            .into_iter()
            .find(|t| t.state == porthole::pb::v1::TunnelState::Active as i32)
    })
    .await;
    assert_ne!(moved.host_port, u32::from(port));
    assert!(
        moved
            .note
            .contains(&format!("held by {}:tcp:{port}", a.name)),
        "{moved:?}"
    );
    assert_eq!(get(port).await.as_deref(), Some("first"));
    assert_eq!(get(moved.host_port as u16).await.as_deref(), Some("second"));
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_of_porthole_stays_in_the_container() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let port = free_port();
    let c = w.http("127.0.0.1", port, "clean");
    let mut tunnel = w.tunnel_svc(&[]).await;
    poll_until("the tunnel", DEADLINE, || get(port)).await;
    let running = c.exec(&["ps"]);
    assert!(
        running.contains("--stdio"),
        "the monitor runs inside:\n{running}"
    );
    assert!(
        !c.exec(&["ls", "-a", "/"]).contains("porthole"),
        "the monitor removed its own file"
    );
    let status = tunnel.terminate().await;
    assert!(status.success(), "{status}");
    wait_for("the monitor to exit with its exec stream", DEADLINE, || {
        !c.exec(&["ps"]).contains("--stdio")
    });
}

#[test]
fn a_dynamically_linked_monitor_is_refused_plainly() {
    let dynamic = common::binary("monitor-svc");
    let out = std::process::Command::new(common::binary("tunnel-svc"))
        .args(["--docker", "--monitor-binary"])
        .arg(&dynamic)
        .args(["--admin", "127.0.0.1:0"])
        .output()
        .expect("run tunnel-svc");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("linked dynamically") && stderr.contains("crt-static"),
        "{stderr}"
    );
}

/// A read-only root without a shell: neither the archive API nor the exec
/// stream can put the monitor in; the target says both, and the other
/// containers are forwarded as ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_the_monitor_cannot_enter_says_why_and_the_others_carry_on() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let (port, ro_port) = (free_port(), free_port());
    let ro_image = Image::httpd_only("read-only");
    let listen = format!("127.0.0.1:{ro_port}");
    let ro = Container::run(
        &ro_image,
        &w.net,
        &["--read-only", "--label", &w.label],
        &["/httpd", "-f", "-p", &listen, "-h", "/www"],
    );
    let ok = w.http("127.0.0.1", port, "writable");
    let tunnel = w.tunnel_svc(&[]).await;
    assert_eq!(
        poll_until("the writable container", DEADLINE, || get(port)).await,
        "writable"
    );
    let target = tunnel
        .wait_target("the read-only container's error", |t| {
            t.name == ro.name && t.error.contains("read-only")
        })
        .await;
    assert!(!target.connected, "{target:?}");
    assert!(
        target.error.contains("cannot copy monitor-svc")
            && target.error.contains("streamed over exec"),
        "both ways tried, both said: {target:?}"
    );
    assert!(tunnel.log().contains("read-only"), "the log says it too");
    assert!(common::host_port_is_free(ro_port));
    drop((ok, ro));
}

#[tokio::test(flavor = "multi_thread")]
async fn after_sigkill_a_new_tunnel_svc_finds_exactly_one_monitor() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let port = free_port();
    let c = w.http("127.0.0.1", port, "again");
    let mut first = w.tunnel_svc(&[]).await;
    poll_until("the tunnel", DEADLINE, || get(port)).await;
    first.proc().kill();
    // The engine closes the exec's stdin with the client's connection, and
    // the monitor goes with it.
    wait_for("the orphaned monitor to exit", DEADLINE, || {
        !c.exec(&["ps"]).contains("--stdio")
    });
    let _second = w.tunnel_svc(&[]).await;
    assert_eq!(
        poll_until("the tunnel again", DEADLINE, || get(port)).await,
        "again"
    );
    let monitors = c
        .exec(&["ps"])
        .lines()
        .filter(|l| l.contains("porthole-monitor-svc"))
        .count();
    assert_eq!(monitors, 1, "{}", c.exec(&["ps"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn ports_docker_publishes_are_listed_not_tunnelled_again() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let (port, host_port) = (free_port(), free_port());
    let publish = format!("127.0.0.1:{host_port}:{port}");
    let c = Container::http(
        &w.image,
        &w.net,
        &["--label", &w.label, "-p", &publish],
        "0.0.0.0",
        port,
        "published",
    );
    let tunnel = w.tunnel_svc(&[]).await;
    let id = format!("{}:tcp:{port}", c.name);
    let t = tunnel
        .wait_tunnel(&id, "the published port listed", |t| {
            t.state == porthole::pb::v1::TunnelState::Published as i32
        })
        .await;
    assert_eq!(t.host_port, u32::from(host_port), "{t:?}");
    assert!(t.note.contains("published by Docker"), "{t:?}");
    assert!(
        common::host_port_is_free(port),
        "not bound again by tunnel-svc"
    );
    // Docker's own forward is what answers.
    assert_eq!(get(host_port).await.as_deref(), Some("published"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ip_transport_carries_bytes_with_a_token_the_command_line_never_shows() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let port = free_port();
    let c = w.http("127.0.0.1", port, "over-ip");
    let tunnel = w.tunnel_svc(&["--docker-transport", "ip"]).await;
    let target = tunnel
        .wait_target("the ip transport", |t| {
            t.name == c.name && t.url.contains(" via ip ")
        })
        .await;
    assert_eq!(
        poll_until("the loopback server over ip", DEADLINE, || get(port)).await,
        "over-ip"
    );
    let addr: SocketAddr = target
        .url
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("an address in {target:?}"));
    // The monitor's own port is not forwarded.
    let tunnels = tunnels_of(&tunnel, &c.name).await;
    assert!(
        tunnels
            .iter()
            .all(|t| t.container_port != u32::from(addr.port())),
        "{tunnels:?}"
    );
    // Its command line holds no token, and a neighbour without it gets no
    // relay on the container's address.
    let ps = c.exec(&["ps"]);
    assert!(ps.contains("--stdio-listen"), "{ps}");
    assert!(
        !ps.contains("Bearer") && ps.lines().all(|l| l.len() < 200),
        "{ps}"
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("the monitor listens on the container's address");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let dial = porthole::pb::v1::RelayFrame {
        kind: Some(porthole::pb::v1::relay_frame::Kind::Dial(
            porthole::pb::v1::DialRequest {
                protocol: porthole::pb::v1::Protocol::Tcp as i32,
                port: u32::from(port),
            },
        )),
    };
    tx.send(dial).await.unwrap();
    let refused = porthole::pb::v1::relay_client::RelayClient::new(channel)
        .dial(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("no relay without the token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    // Nor the read-only surface: that listener is tunnel-svc's alone.
    let events = common::http(addr, "GET", "/port-events", &[])
        .await
        .unwrap();
    assert_eq!(events.status, 401, "{events:?}");
    let health = common::http(addr, "GET", "/healthz", &[]).await.unwrap();
    assert_eq!(health.status, 200, "{health:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_filter_selects_and_a_rename_follows() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let port = free_port();
    let c = w.http("127.0.0.1", port, "named");
    let monitor = static_monitor().display().to_string();
    let by_name = format!("name={}", c.name);
    let tunnel = TunnelProc::start(
        &w.ns,
        &[
            "--docker",
            "--monitor-binary",
            &monitor,
            "--docker-filter",
            &by_name,
        ],
    )
    .await;
    assert_eq!(
        poll_until("the named container", DEADLINE, || get(port)).await,
        "named"
    );
    // A download under way when the container is renamed.
    c.exec(&["dd", "if=/dev/zero", "of=/tmp/www/big", "bs=1M", "count=32"]);
    let mut download = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    download
        .write_all(b"GET /big HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = vec![0u8; 1 << 20];
    download.read_exact(&mut got).await.expect("the first MiB");
    // Renamed: the target takes the new name (which still matches the
    // name filter, a substring as in `docker ps`).
    let renamed = format!("{}-renamed", c.name);
    common::docker::docker(&["rename", &c.name, &renamed]).expect("docker rename");
    let moved = poll_until("the tunnel under the new name", DEADLINE, || async {
        let id = format!("{renamed}:tcp:{port}");
        tunnel
            .tunnels()
            .await
            .into_iter()
            .find(|t| t.id == id && t.state == porthole::pb::v1::TunnelState::Active as i32)
    })
    .await;
    assert_eq!(moved.host_port, u32::from(port));
    assert!(tunnels_of(&tunnel, &c.name).await.is_empty());
    // The download goes on to its end: a rename is not a restart.
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, download.read_to_end(&mut rest))
        .await
        .expect("the rest of the download in time")
        .expect("no reset across the rename");
    assert!(
        got.len() + rest.len() >= 32 << 20,
        "{} bytes of 32 MiB",
        got.len() + rest.len()
    );
    // Removed on drop by its id, whatever its name now.
    drop(c);
}

#[tokio::test(flavor = "multi_thread")]
async fn container_labels_carry_rules() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let (port, ignored) = (free_port(), free_port());
    let labels = [
        "--label".to_string(),
        w.label.clone(),
        "--label".into(),
        format!("porthole.label.{port}=site"),
        "--label".into(),
        format!("porthole.ignore={ignored}"),
    ];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let script = format!(
        "mkdir -p /tmp/w && echo labelled > /tmp/w/index.html && \
         (/bin/busybox httpd -p 127.0.0.1:{ignored} -h /tmp/w) && \
         exec /bin/busybox httpd -f -p 127.0.0.1:{port} -h /tmp/w"
    );
    let c = Container::run(&w.image, &w.net, &labels, &["/bin/sh", "-c", &script]);
    let tunnel = w.tunnel_svc(&[]).await;
    let t = tunnel.wait_active(&format!("{}:tcp:{port}", c.name)).await;
    assert_eq!(t.label, "site");
    assert_eq!(get(port).await.as_deref(), Some("labelled"));
    assert!(
        tunnels_of(&tunnel, &c.name)
            .await
            .iter()
            .all(|t| t.container_port != u32::from(ignored)),
        "porthole.ignore holds"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_monitor_left_running_in_the_container_is_replaced() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let port = free_port();
    let c = w.http("127.0.0.1", port, "replaced");
    // A monitor from an earlier tunnel-svc whose stream never closed: its
    // stdin is a pipe nobody ends.
    let dest = format!("{}:/.porthole-monitor-svc", c.name);
    common::docker::docker(&["cp", &static_monitor().display().to_string(), &dest])
        .expect("docker cp");
    common::docker::docker(&[
        "exec",
        "-d",
        &c.name,
        "/bin/sh",
        "-c",
        "/bin/busybox sleep 600 | /.porthole-monitor-svc --stdio",
    ])
    .expect("docker exec -d");
    wait_for("the earlier monitor to run", DEADLINE, || {
        c.exec(&["ps"]).contains("porthole-monitor-svc --stdio")
    });
    let _tunnel = w.tunnel_svc(&[]).await;
    assert_eq!(
        poll_until("the tunnel", DEADLINE, || get(port)).await,
        "replaced"
    );
    // (The shell that started the earlier one stays, waiting for `sleep`.)
    let monitors = |ps: &str| -> Vec<String> {
        ps.lines()
            .filter(|l| l.contains("porthole-monitor-svc") && !l.contains("sh -c"))
            .map(String::from)
            .collect()
    };
    wait_for("exactly one monitor, the new one", DEADLINE, || {
        let now = monitors(&c.exec(&["ps"]));
        now.len() == 1 && now[0].contains("--replace")
    });
}

/// A UDP port of 127.0.0.1 (and ::1) free on the host, below the ephemeral
/// range so the container's monitor counts a socket on it as a server.
fn free_udp_port() -> u16 {
    (29_100..29_900)
        .find(|&p| {
            std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
                && (!common::host_has_ipv6() || std::net::UdpSocket::bind(("::1", p)).is_ok())
        })
        .expect("a free UDP port in 29100..29900")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_udp_server_is_carried_over_the_exec_stream() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let port = free_udp_port();
    let helper = format!(
        "{}:/porthole-helper:ro",
        common::docker::static_helper().display()
    );
    let extra = ["--label", w.label.as_str(), "-v", helper.as_str()];
    let args = ["/porthole-helper", "udp-echo", "0.0.0.0", &port.to_string()];
    let c = Container::run(&w.image, &w.net, &extra, &args);
    let tunnel = w.tunnel_svc(&["--docker-transport", "exec"]).await;
    let id = format!("{}:udp:{port}", c.name);
    let t = tunnel.wait_active(&id).await;
    assert_eq!(t.host_port, u32::from(port), "{t:?}");
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    for size in [1usize, 512, 1472, 9000, 65_507] {
        let datagram: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        client.send(&datagram).await.unwrap();
        let n = common::within("the echo through the exec stream", client.recv(&mut buf))
            .await
            .unwrap();
        assert!(buf[..n] == datagram[..], "{size} bytes came back as {n}");
    }
    let t = tunnel
        .wait_tunnel(&id, "five datagrams each way", |t| {
            t.datagrams_in == 5 && t.datagrams_out == 5
        })
        .await;
    assert_eq!(t.active_connections, 1, "{t:?}");
    // The container stops: the tunnel goes and frees the port.
    c.docker("stop");
    tunnel.wait_gone(&id).await;
    wait_for("the host UDP port freed", DEADLINE, || {
        std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
    });
}
