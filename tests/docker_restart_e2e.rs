//! `tunnel-svc --docker` while things restart under it: the monitor killed
//! inside a running container, the container paused for longer than the
//! monitor link's keepalive, its network reconnected onto a new address.
//! Each time the tunnel works again within 2 s of the container being
//! back, and a request made meanwhile waits (parks) instead of failing.

use porthole_testkit as common;

use common::docker::{docker, get, have_docker, request, World};
use common::{poll_until, wait_for, DEADLINE};
use std::time::{Duration, Instant};

fn test_name() -> String {
    std::thread::current().name().unwrap_or("test").to_string()
}

/// How soon after the container is back the tunnel must work.
const BACK: Duration = Duration::from_secs(2);

/// A container serving `text` on a free port, followed by tunnel-svc
/// (transport `auto`: the monitor on the container's address).
async fn running(w: &World) -> (common::docker::Container, u16, common::TunnelProc) {
    running_with(w, &[]).await
}

/// [`running`], tunnel-svc with `args`.
async fn running_with(
    w: &World,
    args: &[&str],
) -> (common::docker::Container, u16, common::TunnelProc) {
    let port = common::unused_local_port();
    let c = w.http("0.0.0.0", port, &test_name());
    let tunnel = w.tunnel_svc(args).await;
    let body = poll_until("the tunnel", DEADLINE, || get(port)).await;
    assert_eq!(body, test_name());
    (c, port, tunnel)
}

/// Waits until the tunnel answers; how long that took from `since`.
async fn back(port: u16, since: Instant) -> Duration {
    let body = poll_until("the tunnel again", DEADLINE, || get(port)).await;
    assert_eq!(body, test_name());
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_monitor_killed_inside_is_replaced_and_the_tunnel_works_again() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let (c, port, tunnel) = running(&w).await;
    let line = c.monitor_ps().expect("a monitor runs inside");
    let pid = line.split_whitespace().next().unwrap().to_string();
    c.exec(&["kill", "-9", &pid]);
    let killed = Instant::now();
    // A request made now waits for the new monitor instead of failing.
    let took = back(port, killed).await;
    eprintln!(
        "a request right after the kill took {} ms",
        took.as_millis()
    );
    assert!(took < BACK + Duration::from_secs(1), "{took:?}");
    wait_for("a new monitor", DEADLINE, || {
        c.exec(&["ps"])
            .lines()
            .any(|l| l.contains("--stdio") && !l.starts_with(&format!("{pid} ")))
    });
    let t = tunnel.targets().await;
    assert!(t.iter().any(|t| t.name == c.name && t.connected), "{t:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_paused_20_s_works_again_after_unpause_and_a_request_waits_for_it() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    // Connections may wait longer than the pause.
    let (c, port, tunnel) = running_with(&w, &["--park", "30s"]).await;
    c.docker("pause");
    let paused = Instant::now();
    let t = tunnel
        .wait_target("the target says paused", |t| {
            t.name == c.name && !t.connected
        })
        .await;
    assert!(t.error.contains("paused"), "{t:?}");
    // A request made during the pause waits for the container.
    let waiting = tokio::spawn(request(port, Duration::from_secs(40)));
    while paused.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.docker("unpause");
    let unpaused = Instant::now();
    let answer = waiting.await.unwrap();
    assert!(
        answer.as_deref().is_ok_and(|a| a.ends_with(&test_name())),
        "{answer:?}"
    );
    let took = back(port, unpaused).await;
    eprintln!(
        "after unpause the tunnel answered in {} ms",
        took.as_millis()
    );
    assert!(took < BACK, "{took:?}");
    tunnel
        .wait_target("connected again", |t| t.name == c.name && t.connected)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_network_reconnect_onto_a_new_address_is_followed() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let (c, port, tunnel) = running(&w).await;
    let before = tunnel
        .wait_target("the ip transport", |t| {
            t.name == c.name && t.url.contains(" via ip ")
        })
        .await
        .url;
    // A new address in the network's /24 that nothing holds.
    let prefix = w.net.subnet.trim_end_matches("0/24");
    let new_ip = format!("{prefix}77");
    docker(&["network", "disconnect", &w.net.name, &c.name]).unwrap();
    docker(&["network", "connect", "--ip", &new_ip, &w.net.name, &c.name]).unwrap();
    let reconnected = Instant::now();
    let took = back(port, reconnected).await;
    eprintln!(
        "after the reconnect the tunnel answered in {} ms",
        took.as_millis()
    );
    assert!(took < BACK, "{took:?}");
    let after = tunnel
        .wait_target("the new address", |t| {
            t.name == c.name && t.url.contains(&new_ip)
        })
        .await
        .url;
    assert_ne!(before, after);
}

/// Containers that all serve the same port get host ports in the order of
/// their names, and keep them when tunnel-svc restarts, whichever monitor
/// reports first.
#[tokio::test(flavor = "multi_thread")]
async fn host_ports_stay_the_same_across_a_tunnel_svc_restart() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let port = common::unused_local_port();
    let containers: Vec<_> = (0..5)
        .map(|i| w.http("0.0.0.0", port, &format!("c{i}")))
        .collect();
    let names: Vec<String> = containers.iter().map(|c| c.name.clone()).collect();
    let mut tunnel = w.tunnel_svc(&[]).await;
    let before = host_ports(&tunnel, &names).await;
    // The first start gave them out by name, not by which monitor
    // reported first.
    let mut by_name: Vec<(&String, u32)> = names.iter().zip(before.iter().copied()).collect();
    by_name.sort();
    assert_eq!(by_name[0].1, u32::from(port), "{by_name:?}");
    assert!(by_name.windows(2).all(|w| w[0].1 < w[1].1), "{by_name:?}");
    assert!(tunnel.terminate().await.success());
    let tunnel = w.tunnel_svc(&[]).await;
    let after = host_ports(&tunnel, &names).await;
    assert_eq!(before, after, "the same host port for each container");
    // Each still reaches its own container.
    for (i, p) in after.iter().enumerate() {
        assert_eq!(
            get(*p as u16).await.as_deref(),
            Some(format!("c{i}").as_str())
        );
    }
}

/// The host port of each of `names`' one tunnel, once all are active.
async fn host_ports(tunnel: &common::TunnelProc, names: &[String]) -> Vec<u32> {
    poll_until("every container's tunnel", DEADLINE, || async {
        let all = tunnel.tunnels().await;
        let active = porthole::pb::v1::TunnelState::Active as i32;
        let ports: Vec<u32> = names
            .iter()
            .filter_map(|n| {
                let t = all.iter().find(|t| &t.target == n && t.state == active)?;
                Some(t.host_port)
            })
            .collect();
        (ports.len() == names.len()).then_some(ports)
    })
    .await
}

/// A container its restart policy restarts (`--restart always`) keeps its
/// tunnel: requests made while it is down wait for it and get through.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_restarted_by_its_policy_keeps_its_tunnel_and_no_request_fails() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let port = common::unused_local_port();
    // The server runs in the background; the container exits after 2 s
    // and is started again by the engine.
    let script = format!(
        "mkdir -p /tmp/www && echo {name} > /tmp/www/index.html && \
         /bin/busybox httpd -p 0.0.0.0:{port} -h /tmp/www && exec /bin/busybox sleep 2",
        name = test_name()
    );
    let extra = ["--label", w.label.as_str(), "--restart", "always"];
    let c = common::docker::Container::run(&w.image, &w.net, &extra, &["/bin/sh", "-c", &script]);
    let tunnel = w.tunnel_svc(&[]).await;
    back(port, Instant::now()).await;
    let restarts = || {
        docker(&["inspect", "-f", "{{.RestartCount}}", &c.name])
            .ok()
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    };
    let first = restarts();
    let (mut sent, mut slowest, mut reset) = (0, Duration::ZERO, Vec::new());
    let started = Instant::now();
    while restarts() < first + 2 && started.elapsed() < Duration::from_secs(30) {
        let asked = Instant::now();
        match request(port, Duration::from_secs(20)).await {
            Ok(body) => assert_eq!(body, test_name()),
            // Being served as the container exits: reset at both ends, as
            // any connection whose far end dies.
            Err(e) if e.contains("reset") => reset.push(e),
            Err(e) => panic!("request {sent} failed: {e}"),
        }
        sent += 1;
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(restarts() >= first + 2, "the container was restarted twice");
    eprintln!(
        "{sent} requests across two restarts, {} reset in flight, the slowest {} ms",
        reset.len(),
        slowest.as_millis()
    );
    assert!(
        reset.len() <= 2,
        "at most the one in flight per restart: {reset:?}"
    );
    // Requests made while it was down waited for it, and got through.
    assert!(slowest > Duration::from_millis(200), "{slowest:?}");
    assert!(tunnel.targets().await.iter().any(|t| t.name == c.name));
}

/// `docker restart`: requests made while the container is down wait for
/// it (its tunnel stays for the restart window) and none fails.
#[tokio::test(flavor = "multi_thread")]
async fn no_request_fails_across_docker_restart() {
    if !have_docker(&test_name()) {
        return;
    }
    let w = World::new();
    let (c, port, _tunnel) = running(&w).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut asked = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                asked.push(tokio::spawn(request(port, Duration::from_secs(20))));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut outcomes = Vec::new();
            for a in asked {
                outcomes.push(a.await.unwrap());
            }
            outcomes
        })
    };
    c.docker("restart");
    back(port, Instant::now()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let outcomes = client.await.unwrap();
    // One being served as the container is killed is reset at both ends,
    // as any connection whose far end dies; none other fails.
    let failed: Vec<&String> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().err())
        .filter(|e| !e.contains("reset"))
        .collect();
    let reset = outcomes.iter().filter(|o| o.is_err()).count() - failed.len();
    assert!(reset <= 1, "{outcomes:?}");
    eprintln!(
        "{} requests across docker restart, {} failed",
        outcomes.len(),
        failed.len()
    );
    assert!(outcomes.len() > 10, "{outcomes:?}");
    assert!(failed.is_empty(), "{failed:?}");
}
