//! The reconciler driven in memory through its handle, as the watchers
//! and the admin API drive it; host listeners are real, on loopback.
use super::*;
use crate::backend::direct::Direct;
use crate::backend::Backend;
use crate::model::{Listener, Origin, PortKey, Proto};
use futures_util::StreamExt;
use std::net::SocketAddr;
use std::sync::Arc;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Whether `port` becomes free within a second: a closed tunnel's
/// accept loops drop their listeners as they next run.
async fn freed(port: u16) -> bool {
    for _ in 0..100 {
        if is_free(port) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

fn options() -> Options {
    Options {
        bind: vec!["127.0.0.1".parse().unwrap()],
        skip: PortSet::default(),
        max_tunnels: 10,
        remap: true,
        allow_privileged: false,
        rules: Vec::new(),
        udp: Default::default(),
        host_ports: None,
        keep_host_ports: false,
        // A failed dial fails its connection at once, unless a test
        // parks.
        park: tunnel::Park {
            wait: Duration::ZERO,
            ..Default::default()
        },
    }
}

fn target(name: &str) -> TargetSpec {
    TargetSpec {
        name: name.into(),
        backend: Arc::new(Backend::Direct(Direct {
            host: "127.0.0.1".into(),
        })),
        monitor_port: 7070,
        url: "http://127.0.0.1:7070".into(),
        fixed: false,
        published: BTreeMap::new(),
        rules: Vec::new(),
        dev: None,
        compose: None,
    }
}

fn start(targets: &[&str], opts: Options) -> (Handle, CancellationToken) {
    let shutdown = CancellationToken::new();
    let specs = targets.iter().map(|t| target(t)).collect();
    let (h, _) = spawn(specs, opts, Vec::new(), shutdown.clone());
    (h, shutdown)
}

fn open(ports: &[u16]) -> BTreeMap<PortKey, Vec<Listener>> {
    ports
        .iter()
        .map(|&port| {
            let l = Listener {
                since: None,
                port,
                address: "0.0.0.0".parse().unwrap(),
                dual_stack: false,
                process: None,
            };
            ((Proto::Tcp, port), vec![l])
        })
        .collect()
}

async fn tunnel(h: &Handle, target: &str, port: u16) -> Option<TunnelView> {
    let id = TunnelId::new(target, port);
    h.tunnels(None)
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.id == id)
}

/// The tunnel once it is active (polled: a target added after start
/// waits out the start-up's quiet second), or None after 5 s.
async fn active(h: &Handle, target: &str, port: u16) -> Option<TunnelView> {
    for _ in 0..100 {
        match tunnel(h, target, port).await {
            Some(t) if t.state == State::Active => return Some(t),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    None
}

async fn count(h: &Handle) -> usize {
    h.tunnels(None).await.unwrap().len()
}

#[tokio::test]
async fn udp_servers_get_udp_tunnels_beside_the_tcp_ones() {
    let (h, _stop) = start(&["dev"], options());
    let p = free_port();
    let udp_free = || std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok();
    assert!(udp_free());
    let mut ports = open(&[p]);
    let tcp = ports[&(Proto::Tcp, p)].clone();
    ports.insert((Proto::Udp, p), tcp);
    assert!(h.ports("dev", ports).await);
    let all = h.tunnels(None).await.unwrap();
    let shown: Vec<(String, State, u16)> = all
        .iter()
        .map(|t| (t.id.to_string(), t.state.clone(), t.host_port))
        .collect();
    assert_eq!(
        shown,
        [
            (format!("dev:tcp:{p}"), State::Active, p),
            (format!("dev:udp:{p}"), State::Active, p),
        ],
        "TCP and UDP on one port number are two tunnels on the same host port"
    );
    assert!(!udp_free(), "the host UDP port is bound");
    assert!(h.ports("dev", BTreeMap::new()).await);
    assert_eq!(count(&h).await, 0);
    let mut freed = false;
    for _ in 0..100 {
        freed = udp_free();
        if freed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(freed, "the host UDP port is freed when the port closes");
}

#[tokio::test]
async fn open_ports_get_tunnels_that_go_when_the_port_closes() {
    let (h, _stop) = start(&["dev"], options());
    let p = free_port();
    assert!(h.ports("dev", open(&[p, 7070])).await);
    let t = tunnel(&h, "dev", p).await.unwrap();
    assert_eq!(
        (t.state, t.host_port, t.origin),
        (State::Active, p, Origin::Auto)
    );
    assert_eq!(t.host_addresses, [SocketAddr::from(([127, 0, 0, 1], p))]);
    assert!(!is_free(p), "the host port listens");
    assert_eq!(
        count(&h).await,
        1,
        "the monitor's own port is never forwarded"
    );
    h.ports("dev", open(&[])).await;
    assert_eq!(count(&h).await, 0);
    assert!(freed(p).await, "the host port is free again");
}

#[tokio::test]
async fn a_renamed_target_keeps_its_tunnels_under_the_new_name() {
    let (h, _stop) = start(&["dev"], options());
    let (p, q) = (free_port(), free_port());
    h.ports("dev", open(&[p])).await;
    let closed = h.close(TunnelId::new("dev", p)).await.unwrap();
    assert_eq!(closed.state, State::Closed);
    h.ports("dev", open(&[p, q])).await;
    let before = tunnel(&h, "dev", q).await.unwrap();
    h.rename_target("dev", "web", "renamed".into()).await;
    let after = tunnel(&h, "web", q).await.expect("under the new name");
    assert_eq!(
        (after.state, after.host_port, after.opened_at),
        (State::Active, q, before.opened_at),
        "the same tunnel, not a new one"
    );
    assert!(tunnel(&h, "dev", q).await.is_none());
    assert_eq!(
        tunnel(&h, "web", p).await.unwrap().state,
        State::Closed,
        "still closed"
    );
    let targets = h.targets().await.unwrap();
    assert_eq!(
        targets
            .iter()
            .map(|t| (t.name.as_str(), t.url.as_str()))
            .collect::<Vec<_>>(),
        [("web", "renamed")]
    );
    // What the watcher still sends under the old name reaches it.
    h.ports("dev", open(&[])).await;
    assert_eq!(count(&h).await, 0);
    assert!(freed(q).await);
}

#[tokio::test]
async fn a_tunnel_whose_connections_fail_is_unhealthy_until_one_gets_through() {
    let shutdown = CancellationToken::new();
    let mut spec = target("dev");
    // Nothing listens there yet; the tunnel itself is on 127.0.0.1.
    spec.backend = Arc::new(Backend::Direct(Direct {
        host: "127.0.0.2".into(),
    }));
    let (h, _) = spawn(vec![spec], options(), Vec::new(), shutdown.clone());
    let p = free_port();
    h.ports("dev", open(&[p])).await;
    let t = tunnel(&h, "dev", p).await.unwrap();
    assert_eq!(t.state, State::Active, "{t:?}");
    let mut events = h.watch().await.unwrap();
    let first = events.next().await.unwrap().unwrap();
    assert_eq!(first.tunnel.failing, None);
    let failing = |h: Handle| async move { tunnel(&h, "dev", p).await.and_then(|t| t.failing) };
    for n in 1..=2u64 {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", p))
            .await
            .unwrap();
        let mut buf = [0u8; 1];
        let _ = tokio::io::AsyncReadExt::read(&mut c, &mut buf).await;
        let mut seen = None;
        for _ in 0..200 {
            seen = failing(h.clone()).await.filter(|f| f.count == n);
            if seen.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let f = seen.unwrap_or_else(|| panic!("{n} failures in a row"));
        assert!(f.why.contains("127.0.0.2"), "{f:?}");
    }
    let first = failing(h.clone()).await.unwrap().since;
    assert!(first <= chrono::Utc::now());
    // Watchers hear of it too, within a tick.
    let heard = tokio::time::timeout(RETRY * 3, events.next())
        .await
        .expect("an update within a tick")
        .unwrap()
        .unwrap();
    assert!(
        heard.tunnel.failing.as_ref().is_some_and(|f| f.count >= 1),
        "{heard:?}"
    );
    let server = tokio::net::TcpListener::bind(("127.0.0.2", p))
        .await
        .unwrap();
    let _c = tokio::net::TcpStream::connect(("127.0.0.1", p))
        .await
        .unwrap();
    let _accepted = server.accept().await.unwrap();
    for _ in 0..200 {
        if failing(h.clone()).await.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(failing(h.clone()).await, None, "healthy again");
    assert_eq!(tunnel(&h, "dev", p).await.unwrap().state, State::Active);
    shutdown.cancel();
}

#[tokio::test]
async fn a_connection_waits_for_its_path_to_come_back() {
    let shutdown = CancellationToken::new();
    let mut spec = target("dev");
    spec.backend = Arc::new(Backend::Direct(Direct {
        host: "127.0.0.2".into(),
    }));
    let opts = Options {
        park: tunnel::Park {
            wait: Duration::from_secs(10),
            max: 1,
        },
        ..options()
    };
    let (h, _) = spawn(vec![spec], opts, Vec::new(), shutdown.clone());
    let p = free_port();
    h.ports("dev", open(&[p])).await;
    assert_eq!(tunnel(&h, "dev", p).await.unwrap().state, State::Active);
    // Nothing answers at the far end yet: the first connection waits,
    // the second finds the one parking place taken and fails.
    let mut parked = tokio::net::TcpStream::connect(("127.0.0.1", p))
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut parked, b"hello")
        .await
        .unwrap();
    let mut second = tokio::net::TcpStream::connect(("127.0.0.1", p))
        .await
        .unwrap();
    let mut buf = [0u8; 5];
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut second, &mut buf),
    )
    .await
    .expect("the second fails at once");
    assert!(matches!(refused, Ok(0) | Err(_)), "{refused:?}");
    // The path comes back: the parked one gets through, bytes intact.
    let server = tokio::net::TcpListener::bind(("127.0.0.2", p))
        .await
        .unwrap();
    let (mut far, _) = tokio::time::timeout(Duration::from_secs(5), server.accept())
        .await
        .expect("the parked connection arrives")
        .unwrap();
    tokio::io::AsyncReadExt::read_exact(&mut far, &mut buf)
        .await
        .unwrap();
    assert_eq!(&buf, b"hello");
    let t = tunnel(&h, "dev", p).await.unwrap();
    assert_eq!(t.failing, None, "the latest connection got through");
    assert_eq!(t.counters.total, 2);
    shutdown.cancel();
}

#[tokio::test]
async fn skipped_ports_are_left_alone_unless_opened_by_hand() {
    let p = free_port();
    let opts = Options {
        skip: p.to_string().parse().unwrap(),
        ..options()
    };
    let (h, _stop) = start(&["dev"], opts);
    h.ports("dev", open(&[p])).await;
    assert_eq!(count(&h).await, 0);
    let t = h.open(String::new(), (Proto::Tcp, p), None).await.unwrap();
    assert_eq!((t.state, t.origin), (State::Active, Origin::Manual));
}

#[tokio::test]
async fn an_admin_close_holds_until_the_port_reopens() {
    let (h, _stop) = start(&["dev"], options());
    let p = free_port();
    h.ports("dev", open(&[p])).await;
    let closed = h.close(TunnelId::new("dev", p)).await.unwrap();
    assert_eq!(closed.state, State::Closed);
    assert!(freed(p).await);
    // The monitor reports the port again (a reconnect): still closed.
    h.ports("dev", open(&[p])).await;
    assert_eq!(tunnel(&h, "dev", p).await.unwrap().state, State::Closed);
    // It closes and reopens inside: forwarded again.
    h.ports("dev", open(&[])).await;
    assert_eq!(count(&h).await, 0);
    h.ports("dev", open(&[p])).await;
    assert_eq!(tunnel(&h, "dev", p).await.unwrap().state, State::Active);
    // Mistyped ids are refused, not echoed whole.
    let err = parse_id(&"dev:tcp:x".repeat(100)).unwrap_err();
    assert!(
        matches!(err, AdminError::NotFound(ref id) if id.len() < 200),
        "{err}"
    );
}

#[tokio::test]
async fn a_busy_host_port_is_remapped_and_says_so() {
    let (h, _stop) = start(&["dev"], options());
    let p = free_port();
    let _busy = std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
    h.ports("dev", open(&[p])).await;
    let t = tunnel(&h, "dev", p).await.unwrap();
    assert_eq!(t.state, State::Active);
    assert_ne!(t.host_port, p);
    let note = t.note.unwrap();
    assert!(note.contains(&format!("host port {p} is busy")), "{note}");
}

#[tokio::test(start_paused = true)]
async fn an_exact_host_port_fails_while_busy_and_is_retried() {
    let (h, _stop) = start(&["dev"], options());
    let (p, q) = (free_port(), free_port());
    let busy = std::net::TcpListener::bind(("127.0.0.1", q)).unwrap();
    h.ports("dev", open(&[p])).await;
    let t = h.open("dev".into(), (Proto::Tcp, p), Some(q)).await;
    // The pre-bind check refuses to move a working tunnel onto a busy port.
    assert!(matches!(t, Err(AdminError::Precondition(_))), "{t:?}");
    assert_eq!(tunnel(&h, "dev", p).await.unwrap().host_port, p);
    // A new manual tunnel on a busy exact port fails and is retried.
    let r = free_port();
    let t = h
        .open("dev".into(), (Proto::Tcp, r), Some(q))
        .await
        .unwrap();
    let State::Failed(why) = t.state else {
        panic!("{t:?}")
    };
    assert!(
        why.to_string()
            .contains(&format!("host port {q} is busy (asked for by OpenTunnel)")),
        "{why}"
    );
    drop(busy);
    let mut waited = Duration::ZERO;
    while tunnel(&h, "dev", r).await.unwrap().state != State::Active {
        assert!(waited < RETRY * 3, "not retried");
        tokio::time::sleep(RETRY / 4).await;
        waited += RETRY / 4;
    }
    assert_eq!(tunnel(&h, "dev", r).await.unwrap().host_port, q);
}

#[tokio::test]
async fn the_cap_lists_new_ports_and_never_evicts() {
    let opts = Options {
        max_tunnels: 1,
        ..options()
    };
    let (h, _stop) = start(&["dev"], opts);
    let (low, high) = {
        let (a, b) = (free_port(), free_port());
        (a.min(b), a.max(b))
    };
    h.ports("dev", open(&[high])).await;
    h.ports("dev", open(&[low, high])).await;
    assert_eq!(tunnel(&h, "dev", high).await.unwrap().state, State::Active);
    let capped = tunnel(&h, "dev", low).await.unwrap();
    assert_eq!(capped.state, State::Capped);
    assert!(capped.note.unwrap().contains("--max-tunnels 1"));
    assert!(is_free(low), "a capped port is not bound");
    h.ports("dev", open(&[low])).await;
    assert_eq!(tunnel(&h, "dev", low).await.unwrap().state, State::Active);
}

#[tokio::test]
async fn two_targets_on_one_port_by_name_at_start_then_the_first_keeps_it() {
    let (h, _stop) = start(&["a", "b"], options());
    let p = free_port();
    // At start, b reports first, yet a (first by name) gets the port:
    // b waits until every target has reported.
    h.ports("b", open(&[p])).await;
    assert_eq!(count(&h).await, 0, "b waits for a");
    h.ports("a", open(&[p])).await;
    let a = tunnel(&h, "a", p).await.unwrap();
    let b = tunnel(&h, "b", p).await.unwrap();
    assert_eq!((a.state, a.host_port), (State::Active, p));
    assert_eq!(b.state, State::Active);
    assert_ne!(b.host_port, p);
    let note = b.note.unwrap();
    assert!(
        note.starts_with(&format!("host port {p} is held by a:tcp:{p}")),
        "{note}"
    );
    // Afterwards, a port that opens later is the first one's.
    let q = free_port();
    h.ports("b", open(&[p, q])).await;
    h.ports("a", open(&[p, q])).await;
    let b = tunnel(&h, "b", q).await.unwrap();
    let a = tunnel(&h, "a", q).await.unwrap();
    assert_eq!((b.state, b.host_port), (State::Active, q));
    assert_ne!(a.host_port, q);
    let note = a.note.unwrap();
    assert!(
        note.starts_with(&format!("host port {q} is held by b:tcp:{q}")),
        "{note}"
    );
}

#[tokio::test]
async fn statics_always_exist_and_cannot_be_closed_or_reopened() {
    let shutdown = CancellationToken::new();
    let p = free_port();
    let spec = TargetSpec {
        fixed: true,
        ..target("forge")
    };
    let (h, _) = spawn(
        vec![spec],
        options(),
        vec![("forge".into(), p)],
        shutdown.clone(),
    );
    let t = tunnel(&h, "forge", p).await.unwrap();
    assert_eq!(
        (t.origin, t.state, t.host_port),
        (Origin::Egress, State::Active, p)
    );
    let err = h.close(TunnelId::new("forge", p)).await.unwrap_err();
    assert!(matches!(err, AdminError::Precondition(_)), "{err}");
    let err = h
        .open("forge".into(), (Proto::Tcp, 9), None)
        .await
        .unwrap_err();
    assert!(matches!(err, AdminError::Precondition(_)), "{err}");
    let targets = h.targets().await.unwrap();
    assert!(targets[0].connected, "a gate upstream needs no monitor");
}

#[tokio::test]
async fn watchers_see_every_tunnel_then_each_change() {
    let (h, _stop) = start(&["dev"], options());
    let p = free_port();
    h.ports("dev", open(&[p])).await;
    let mut events = h.watch().await.unwrap();
    let first = events.next().await.unwrap().unwrap();
    assert_eq!((first.tunnel.id.port, first.removed), (p, false));
    h.ports("dev", open(&[])).await;
    let gone = events.next().await.unwrap().unwrap();
    assert_eq!((gone.tunnel.id.port, gone.removed), (p, true));
    assert_eq!(gone.tunnel.state, State::Closed);
}

#[tokio::test]
async fn targets_come_and_go_with_their_tunnels() {
    let (h, _stop) = start(&[], options());
    let p = free_port();
    h.add_target(target("web")).await;
    assert!(h.ports("web", open(&[p])).await);
    assert!(
        active(&h, "web", p).await.is_some(),
        "{:?}",
        tunnel(&h, "web", p).await
    );
    h.remove_target("web").await;
    assert!(h.targets().await.unwrap().is_empty());
    assert_eq!(count(&h).await, 0);
    assert!(freed(p).await, "a removed target's host ports are freed");
    // A target that comes back starts afresh.
    h.add_target(TargetSpec {
        published: [((Proto::Tcp, p), 18080)].into(),
        ..target("web")
    })
    .await;
    h.ports("web", open(&[p])).await;
    let t = tunnel(&h, "web", p).await.unwrap();
    assert_eq!((t.state, t.host_port), (State::Published(18080), 18080));
    assert!(freed(p).await, "a port Docker publishes is not bound again");
}

#[tokio::test]
async fn a_probe_dials_the_container_port_through_the_backend() {
    let (h, _stop) = start(&["dev"], options());
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = server.local_addr().unwrap().port();
    // The direct backend of these tests dials 127.0.0.1:PORT, where
    // `server` listens; the tunnel's host listener moves to another port.
    h.ports("dev", open(&[p])).await;
    let (t, reached) = h.probe(TunnelId::new("dev", p)).await.unwrap();
    assert_ne!(t.host_port, p, "remapped: the server holds the port");
    assert_eq!(reached, Ok(()));
    drop(server);
    let (_, reached) = h.probe(TunnelId::new("dev", p)).await.unwrap();
    assert!(reached.unwrap_err().contains("cannot reach"));
    let err = h.probe(TunnelId::new("dev", 1)).await.unwrap_err();
    assert!(matches!(err, AdminError::NotFound(_)), "{err}");
}

#[tokio::test]
async fn links_show_in_targets_and_shutdown_frees_every_port() {
    let (h, stop) = start(&["dev"], options());
    h.link(
        "dev",
        Link::Up {
            instance_id: "run-1".into(),
        },
    )
    .await;
    h.link(
        "dev",
        Link::Down {
            error: "refused".into(),
        },
    )
    .await;
    let t = &h.targets().await.unwrap()[0];
    assert_eq!(
        (t.connected, t.instance_id.as_str(), t.error.as_deref()),
        (false, "run-1", Some("refused"))
    );
    let p = free_port();
    h.ports("dev", open(&[p])).await;
    assert_eq!(tunnel(&h, "dev", p).await.unwrap().state, State::Active);
    assert!(!is_free(p));
    stop.cancel();
    let stopped = async {
        while h.targets().await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(tunnel::DRAIN * 3, stopped)
        .await
        .expect("the reconciler stops");
    assert!(freed(p).await);
    assert!(matches!(h.tunnels(None).await, Err(AdminError::Stopping)));
}
