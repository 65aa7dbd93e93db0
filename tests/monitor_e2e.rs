//! monitor-svc end to end: the real binary inside a network namespace,
//! real listening sockets opened and closed by real processes, and every
//! check made the way a user (or tunnel-svc) would make it: over gRPC, the
//! JSON shim and grpcurl.
//!
//! Each test makes its own namespace, so they all run in parallel.

use porthole_testkit as common;

use common::{
    binary, comm, grpcurl, http, http_get, poll_until, require_root, skip_or_fail, which, within,
    write_token, Listener, MonitorClient, MonitorProc, Netns, Proc, DEADLINE,
};
use porthole::pb::v1::{
    watch_events_response::Kind, EventType, ListEventsRequest, ListEventsResponse,
    ListPortsRequest, ListPortsResponse, Port, PortEvent, Protocol, Snapshot, WatchEventsRequest,
    WatchEventsResponse,
};
use std::collections::{BTreeMap, BTreeSet};
use tonic::{Code, Streaming};

type Client = MonitorClient;

/// The monitor's own port, as it reports it.
const MONITOR_KEY: &str = "tcp:0.0.0.0:7070";

// ---------------------------------------------------------------------------
// Helpers

async fn list_ports(client: &mut Client) -> ListPortsResponse {
    within("ListPorts", client.list_ports(ListPortsRequest {}))
        .await
        .expect("ListPorts")
        .into_inner()
}

async fn list_events(client: &mut Client, req: ListEventsRequest) -> ListEventsResponse {
    within("ListEvents", client.list_events(req))
        .await
        .expect("ListEvents")
        .into_inner()
}

fn after_seq(seq: u64) -> ListEventsRequest {
    ListEventsRequest {
        since: None,
        after_seq: seq,
    }
}

fn port_keys(ports: &[Port]) -> BTreeSet<String> {
    ports.iter().map(|p| p.key.clone()).collect()
}

/// Polls ListPorts until `pred` holds for its keys; returns that answer.
async fn wait_ports(
    client: &mut Client,
    what: &str,
    pred: impl Fn(&BTreeSet<String>) -> bool,
) -> ListPortsResponse {
    poll_until(what, DEADLINE, || {
        let mut c = client.clone();
        let pred = &pred;
        async move {
            let resp = list_ports(&mut c).await;
            pred(&port_keys(&resp.ports)).then_some(resp)
        }
    })
    .await
}

/// Polls ListEvents until an event of `kind` for `key` is logged; returns it.
async fn wait_event(client: &mut Client, kind: EventType, key: &str) -> PortEvent {
    poll_until(&format!("{kind:?} event for {key}"), DEADLINE, || {
        let mut c = client.clone();
        async move {
            list_events(&mut c, ListEventsRequest::default())
                .await
                .events
                .into_iter()
                .find(|e| e.r#type == kind as i32 && key_of(e) == key)
        }
    })
    .await
}

async fn watch(
    client: &mut Client,
    instance_id: &str,
    after_seq: u64,
) -> Streaming<WatchEventsResponse> {
    let req = WatchEventsRequest {
        instance_id: instance_id.to_string(),
        after_seq,
    };
    within("WatchEvents", client.watch_events(req))
        .await
        .expect("WatchEvents")
        .into_inner()
}

/// The next message of a watch stream; panics on end, error or timeout.
async fn next(stream: &mut Streaming<WatchEventsResponse>) -> Kind {
    match within("the next WatchEvents message", stream.message()).await {
        Ok(Some(WatchEventsResponse { kind: Some(kind) })) => kind,
        other => panic!("expected a WatchEvents message, got {other:?}"),
    }
}

async fn next_snapshot(stream: &mut Streaming<WatchEventsResponse>) -> Snapshot {
    match next(stream).await {
        Kind::Snapshot(s) => s,
        Kind::Event(e) => panic!("expected a Snapshot first, got event {e:?}"),
    }
}

async fn next_event(stream: &mut Streaming<WatchEventsResponse>) -> PortEvent {
    match next(stream).await {
        Kind::Event(e) => e,
        Kind::Snapshot(s) => panic!("expected an event, got a snapshot {s:?}"),
    }
}

fn key_of(e: &PortEvent) -> &str {
    e.port.as_ref().map(|p| p.key.as_str()).unwrap_or("")
}

fn kind_of(e: &PortEvent) -> EventType {
    EventType::try_from(e.r#type).unwrap_or(EventType::Unspecified)
}

/// `(type, key, seq)` of each event, for comparisons.
fn summary(events: &[PortEvent]) -> Vec<(EventType, String, u64)> {
    events
        .iter()
        .map(|e| (kind_of(e), key_of(e).to_string(), e.seq))
        .collect()
}

fn timestamp_of(e: &PortEvent) -> chrono::DateTime<chrono::Utc> {
    let ts = e.timestamp.as_ref().expect("event has a timestamp");
    chrono::DateTime::from_timestamp(ts.seconds, ts.nanos as u32).expect("valid timestamp")
}

/// Reads events until one of each `keys` of `kind` has arrived; checks
/// nothing else arrives in between and seqs follow on from `last_seq`
/// without gaps. Returns the events and the last seq.
async fn expect_events(
    stream: &mut Streaming<WatchEventsResponse>,
    kind: EventType,
    keys: &BTreeSet<String>,
    mut last_seq: u64,
) -> (Vec<PortEvent>, u64) {
    let mut got = Vec::new();
    let mut seen = BTreeSet::new();
    while seen != *keys {
        let e = next_event(stream).await;
        assert_eq!(e.seq, last_seq + 1, "seqs increase by one: {e:?}");
        last_seq = e.seq;
        assert_eq!(kind_of(&e), kind, "unexpected event {e:?}");
        assert!(
            keys.contains(key_of(&e)),
            "unexpected event {e:?}, want only {keys:?}"
        );
        assert!(seen.insert(key_of(&e).to_string()), "duplicate event {e:?}");
        got.push(e);
    }
    (got, last_seq)
}

fn set(keys: &[&str]) -> BTreeSet<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

/// The JSON shim's events as `(type, port, seq)`, checking the legacy fields.
fn json_summary(body: &str) -> Vec<(String, String, u64)> {
    let value: serde_json::Value = serde_json::from_str(body).expect("body is JSON");
    let array = value.as_array().expect("body is a JSON array");
    array
        .iter()
        .map(|e| {
            let field = |name: &str| {
                e.get(name)
                    .and_then(|v| v.as_str())
                    .unwrap_or_else(|| panic!("event {e} has no string {name:?}"))
                    .to_string()
            };
            let ts = field("timestamp");
            chrono::DateTime::parse_from_rfc3339(&ts)
                .unwrap_or_else(|err| panic!("timestamp {ts:?} is not RFC 3339: {err}"));
            (
                field("type"),
                field("port"),
                e.get("seq").and_then(|v| v.as_u64()).unwrap_or(0),
            )
        })
        .collect()
}

fn proto_as_json(events: &[PortEvent]) -> Vec<(String, String, u64)> {
    events
        .iter()
        .map(|e| {
            let kind = match kind_of(e) {
                EventType::Opened => "opened",
                EventType::Closed => "closed",
                EventType::Unspecified => "unspecified",
            };
            (kind.to_string(), key_of(e).to_string(), e.seq)
        })
        .collect()
}

/// Percent-encodes what a query value cannot carry as is.
fn query_escape(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

// ---------------------------------------------------------------------------
// 1. Ports listening before the monitor starts

#[tokio::test(flavor = "multi_thread")]
async fn ports_open_before_start_are_reported_as_opened() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let wildcard = Listener::tcp4(&ns, "0.0.0.0", 8080);
    let own_addr = ns.addr().to_string();
    let specific = Listener::tcp4(&ns, &own_addr, 8090);
    let monitor = MonitorProc::start(&ns, &[]).await;
    let mut client = monitor.client().await;

    let wildcard_key = "tcp:0.0.0.0:8080".to_string();
    let specific_key = format!("tcp:{own_addr}:8090");
    let events = list_events(&mut client, ListEventsRequest::default()).await;
    assert!(!events.instance_id.is_empty());
    assert!(!events.truncated);
    let start_up = summary(&events.events);
    let keys: BTreeSet<String> = start_up.iter().map(|(_, k, _)| k.clone()).collect();
    assert_eq!(
        keys,
        set(&[MONITOR_KEY, &wildcard_key, &specific_key]),
        "start-up events: {start_up:?}"
    );
    assert!(
        start_up.iter().all(|(t, _, _)| *t == EventType::Opened),
        "{start_up:?}"
    );
    let seqs: Vec<u64> = start_up.iter().map(|(_, _, s)| *s).collect();
    assert_eq!(seqs, [1, 2, 3], "seq starts at 1 and increases");
    assert_eq!((events.first_seq, events.last_seq), (1, 3));

    let ports = list_ports(&mut client).await;
    assert_eq!(ports.instance_id, events.instance_id);
    assert_eq!(ports.seq, 3);
    let by_key: BTreeMap<&str, &Port> = ports.ports.iter().map(|p| (p.key.as_str(), p)).collect();
    for (key, listener, address, port) in [
        (&wildcard_key, &wildcard, "0.0.0.0", 8080),
        (&specific_key, &specific, own_addr.as_str(), 8090),
    ] {
        let p = by_key
            .get(key.as_str())
            .unwrap_or_else(|| panic!("{key} not in {by_key:?}"));
        assert_eq!(p.protocol, Protocol::Tcp as i32, "{p:?}");
        assert_eq!((p.address.as_str(), p.port), (address, port), "{p:?}");
        let process = p
            .process
            .as_ref()
            .unwrap_or_else(|| panic!("{key} has no process"));
        assert_eq!(process.pid, listener.pid(), "{p:?}");
        assert_eq!(process.name, comm(listener.pid()), "{p:?}");
        assert_eq!(process.name, common::HELPER, "{p:?}");
        assert!(process.cmdline.iter().any(|a| a == "listen"), "{p:?}");
        // The opened event carries the same port.
        let e = events
            .events
            .iter()
            .find(|e| key_of(e) == key.as_str())
            .unwrap();
        assert_eq!(e.port.as_ref(), Some(*p));
    }
    let own = by_key
        .get(MONITOR_KEY)
        .expect("the monitor's own port is listed");
    assert_eq!(own.process.as_ref().map(|p| p.pid), Some(monitor.pid()));
}

// ---------------------------------------------------------------------------
// 2. Live events over WatchEvents, ListPorts and the JSON shim

#[tokio::test(flavor = "multi_thread")]
async fn watch_reports_every_kind_of_listener_opening_and_closing() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    let mut client = monitor.client().await;
    let mut stream = watch(&mut client, "", 0).await;
    let snapshot = next_snapshot(&mut stream).await;
    assert!(!snapshot.instance_id.is_empty());
    assert_eq!(port_keys(&snapshot.ports), set(&[MONITOR_KEY]));
    assert_eq!(
        snapshot.seq, 1,
        "the start-up event of the monitor's own port"
    );

    let listeners = [
        Listener::tcp4(&ns, "0.0.0.0", 8081),
        Listener::tcp6_only(&ns, "::", 8082),
        Listener::tcp_dual(&ns, 8083),
        Listener::tcp6_only(&ns, "::1", 8084),
        Listener::udp(&ns, "127.0.0.1", 5353),
    ];
    let keys = [
        "tcp:0.0.0.0:8081",
        "tcp:[::]:8082",
        "tcp:*:8083",
        "tcp:[::1]:8084",
        "udp:127.0.0.1:5353",
    ];
    let (opened, last) =
        expect_events(&mut stream, EventType::Opened, &set(&keys), snapshot.seq).await;

    // Each event describes its socket and the process holding it.
    let expected = [
        (Protocol::Tcp, "0.0.0.0", 8081),
        (Protocol::Tcp, "::", 8082),
        (Protocol::Tcp, "::", 8083),
        (Protocol::Tcp, "::1", 8084),
        (Protocol::Udp, "127.0.0.1", 5353),
    ];
    for ((key, listener), (protocol, address, port)) in keys.iter().zip(&listeners).zip(expected) {
        let e = opened.iter().find(|e| key_of(e) == *key).unwrap();
        let p = e.port.as_ref().unwrap();
        assert_eq!(
            (p.protocol, p.address.as_str(), p.port),
            (protocol as i32, address, port),
            "{e:?}"
        );
        assert_eq!(
            p.dual_stack,
            key.contains(":*:"),
            "dual_stack says what the key says: {e:?}"
        );
        assert!(
            p.server,
            "listeners, and UDP outside the ephemeral range: {e:?}"
        );
        assert_eq!(
            p.process.as_ref().map(|p| p.pid),
            Some(listener.pid()),
            "{e:?}"
        );
        assert!(e.timestamp.is_some(), "{e:?}");
    }
    let ports = list_ports(&mut client).await;
    let mut want = set(&keys);
    want.insert(MONITOR_KEY.into());
    assert_eq!(port_keys(&ports.ports), want);
    assert_eq!(ports.seq, last);
    assert_eq!(ports.instance_id, snapshot.instance_id);

    for l in listeners {
        l.close();
    }
    let (closed, last) = expect_events(&mut stream, EventType::Closed, &set(&keys), last).await;
    assert_eq!(
        port_keys(&list_ports(&mut client).await.ports),
        set(&[MONITOR_KEY])
    );

    // The JSON shim shows the same history, oldest first.
    let all = list_events(&mut client, ListEventsRequest::default()).await;
    assert_eq!(all.last_seq, last);
    let streamed: Vec<PortEvent> = opened.into_iter().chain(closed).collect();
    assert_eq!(summary(&all.events[1..]), summary(&streamed));
    let resp = http_get(monitor.addr(), "/port-events").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(json_summary(&resp.body), proto_as_json(&all.events));
    let value: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
    for (json, proto) in value.as_array().unwrap().iter().zip(&all.events) {
        let ts = json["timestamp"].as_str().unwrap();
        let parsed = chrono::DateTime::parse_from_rfc3339(ts).unwrap();
        assert_eq!(parsed, timestamp_of(proto), "JSON and gRPC agree on {ts}");
    }
}

// ---------------------------------------------------------------------------
// 3. ListEvents: since / after_seq

#[tokio::test(flavor = "multi_thread")]
async fn list_events_since_is_strictly_after() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    let mut client = monitor.client().await;
    let _a = Listener::tcp4(&ns, "0.0.0.0", 8081);
    let a = wait_event(&mut client, EventType::Opened, "tcp:0.0.0.0:8081").await;
    let _b = Listener::tcp4(&ns, "0.0.0.0", 8082);
    let b = wait_event(&mut client, EventType::Opened, "tcp:0.0.0.0:8082").await;
    assert!(b.seq > a.seq);
    assert!(
        timestamp_of(&b) > timestamp_of(&a),
        "separate scans, later timestamp"
    );

    let since_a = ListEventsRequest {
        since: a.timestamp,
        after_seq: 0,
    };
    let page = list_events(&mut client, since_a).await;
    assert!(!page.truncated);
    assert_eq!(
        summary(&page.events),
        summary(std::slice::from_ref(&b)),
        "only events after A"
    );
    assert!(page
        .events
        .iter()
        .all(|e| timestamp_of(e) > timestamp_of(&a)));

    let since_b = ListEventsRequest {
        since: b.timestamp,
        after_seq: 0,
    };
    assert!(list_events(&mut client, since_b).await.events.is_empty());

    let page = list_events(&mut client, after_seq(a.seq)).await;
    assert_eq!(summary(&page.events), summary(std::slice::from_ref(&b)));
    let everything = list_events(&mut client, after_seq(0)).await;
    assert_eq!(everything.events.first().map(|e| e.seq), Some(1));
    assert_eq!(everything.last_seq, b.seq);

    let both = ListEventsRequest {
        since: a.timestamp,
        after_seq: a.seq,
    };
    let err = within("ListEvents with both", client.list_events(both))
        .await
        .expect_err("since and after_seq together are refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let bad = ListEventsRequest {
        since: Some(prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        }),
        after_seq: 0,
    };
    let err = within("ListEvents with a bad since", client.list_events(bad))
        .await
        .expect_err("invalid timestamp is refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("since"), "{err:?}");
}

// ---------------------------------------------------------------------------
// 4. The JSON shim's legacy contract

#[tokio::test(flavor = "multi_thread")]
async fn json_shim_keeps_the_legacy_contract() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    let addr = monitor.addr();
    let mut client = monitor.client().await;
    let _l = Listener::tcp4(&ns, "0.0.0.0", 8081);
    wait_event(&mut client, EventType::Opened, "tcp:0.0.0.0:8081").await;

    let resp = http_get(addr, "/port-events").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let all = json_summary(&resp.body);
    assert_eq!(
        all.iter()
            .map(|(t, p, _)| (t.as_str(), p.as_str()))
            .collect::<Vec<_>>(),
        [("opened", MONITOR_KEY), ("opened", "tcp:0.0.0.0:8081")]
    );
    let value: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
    let first_ts = value[0]["timestamp"].as_str().unwrap().to_string();
    assert!(first_ts.ends_with('Z'), "{first_ts}");

    // since = the first event's own timestamp: only what came after it.
    let resp = http_get(
        addr,
        &format!("/port-events?since={}", query_escape(&first_ts)),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let after: Vec<(String, String, u64)> = all[1..].to_vec();
    assert_eq!(json_summary(&resp.body), after);

    // The same instant written with a +01:00 offset, `+` sent as %2B.
    let t = chrono::DateTime::parse_from_rfc3339(&first_ts).unwrap();
    let plus_one = t
        .with_timezone(&chrono::FixedOffset::east_opt(3600).unwrap())
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, false);
    assert!(plus_one.ends_with("+01:00"), "{plus_one}");
    let resp = http_get(
        addr,
        &format!("/port-events?since={}", query_escape(&plus_one)),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(json_summary(&resp.body), after);

    // Whole seconds, no fraction: a second before the first event gets all.
    let earlier = (t - chrono::TimeDelta::seconds(1))
        .with_timezone(&chrono::Utc)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let resp = http_get(
        addr,
        &format!("/port-events?since={}", query_escape(&earlier)),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(json_summary(&resp.body), all);

    // Nothing after a future instant: an empty array, never null.
    let resp = http_get(addr, "/port-events?since=2999-01-01T00:00:00Z").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.body.trim(), "[]");

    let resp = http_get(addr, "/port-events?since=garbage").await;
    assert_eq!(resp.status, 400, "{resp:?}");
    assert!(
        resp.body.contains("since"),
        "the error names the parameter: {resp:?}"
    );

    for method in ["POST", "DELETE", "PUT"] {
        let resp = http(addr, method, "/port-events", &[]).await.expect(method);
        assert_eq!(resp.status, 405, "{method}: {resp:?}");
        assert_eq!(resp.header("allow"), Some("GET"), "{method}: {resp:?}");
    }

    let resp = http_get(addr, "/healthz").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let resp = http_get(addr, "/metrics").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(
        resp.body.contains("porthole_monitor_scans_total"),
        "{}",
        resp.body
    );
    // Without the token only the public paths answer; with it, the rest.
    let resp = http_get(addr, "/no-such-path").await;
    assert_eq!(resp.status, 401, "{resp:?}");
    let bearer = format!(
        "Bearer {}",
        std::fs::read_to_string(monitor.token_file())
            .unwrap()
            .trim()
    );
    let resp = http(addr, "GET", "/no-such-path", &[("Authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(resp.status, 404, "{resp:?}");
}

// ---------------------------------------------------------------------------
// 5. Resuming a watch

#[tokio::test(flavor = "multi_thread")]
async fn watch_resumes_with_exactly_the_missed_events() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    let mut client = monitor.client().await;
    let mut stream = watch(&mut client, "", 0).await;
    let snapshot = next_snapshot(&mut stream).await;
    let _first = Listener::tcp4(&ns, "0.0.0.0", 8081);
    let seen = next_event(&mut stream).await;
    assert_eq!(key_of(&seen), "tcp:0.0.0.0:8081");
    drop(stream);

    let _second = Listener::tcp4(&ns, "0.0.0.0", 8082);
    let _third = Listener::udp(&ns, "0.0.0.0", 8083);
    wait_ports(&mut client, "8082 and 8083 listed", |k| {
        k.contains("tcp:0.0.0.0:8082") && k.contains("udp:0.0.0.0:8083")
    })
    .await;
    let missed = list_events(&mut client, after_seq(seen.seq)).await;
    assert_eq!(
        summary(&missed.events)
            .into_iter()
            .map(|(t, k, _)| (t, k))
            .collect::<BTreeSet<_>>(),
        [
            (EventType::Opened, "tcp:0.0.0.0:8082".to_string()),
            (EventType::Opened, "udp:0.0.0.0:8083".to_string()),
        ]
        .into_iter()
        .collect(),
    );

    let mut resumed = watch(&mut client, &snapshot.instance_id, seen.seq).await;
    let mut got = Vec::new();
    for _ in 0..missed.events.len() {
        got.push(next_event(&mut resumed).await);
    }
    assert_eq!(got, missed.events, "exactly the missed events, no snapshot");

    // And the resumed stream is live.
    let _fourth = Listener::tcp4(&ns, "127.0.0.1", 8084);
    let e = next_event(&mut resumed).await;
    assert_eq!(
        (kind_of(&e), key_of(&e)),
        (EventType::Opened, "tcp:127.0.0.1:8084")
    );
    assert_eq!(e.seq, missed.last_seq + 1);
}

// ---------------------------------------------------------------------------
// 6. Resuming from a point the buffer no longer holds

#[tokio::test(flavor = "multi_thread")]
async fn resume_past_a_wrapped_buffer_gets_a_snapshot() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &["--buffer-size", "5"]).await;
    let mut client = monitor.client().await;
    let listeners: Vec<Listener> = (8081..=8086)
        .map(|port| Listener::tcp4(&ns, "0.0.0.0", port))
        .collect();
    let ports = wait_ports(&mut client, "all six listed", |k| k.len() == 7).await;
    assert!(ports.seq >= 7, "{ports:?}");

    let events = list_events(&mut client, ListEventsRequest::default()).await;
    assert_eq!(events.events.len(), 5, "the buffer holds five");
    assert_eq!(events.first_seq, events.last_seq - 4);
    assert!(events.truncated, "older events were dropped");
    let fell_off = list_events(&mut client, after_seq(1)).await;
    assert!(fell_off.truncated, "seq 2 fell off: {fell_off:?}");
    let held = list_events(&mut client, after_seq(events.first_seq - 1)).await;
    assert!(!held.truncated, "{held:?}");
    assert_eq!(held.events, events.events);

    let mut stream = watch(&mut client, &events.instance_id, 1).await;
    let snapshot = next_snapshot(&mut stream).await;
    let now = list_ports(&mut client).await;
    assert_eq!(snapshot.instance_id, now.instance_id);
    assert_eq!(snapshot.seq, now.seq);
    let sorted = |mut v: Vec<Port>| {
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    };
    assert_eq!(sorted(snapshot.ports), sorted(now.ports));

    // A point the buffer still holds resumes without a snapshot.
    let mut stream = watch(&mut client, &events.instance_id, events.last_seq - 2).await;
    let e = next_event(&mut stream).await;
    assert_eq!(e.seq, events.last_seq - 1);
    drop(listeners);
}

// ---------------------------------------------------------------------------
// 7. A restarted monitor is a new instance

#[tokio::test(flavor = "multi_thread")]
async fn resume_against_a_restarted_monitor_gets_a_snapshot() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let _l = Listener::tcp4(&ns, "0.0.0.0", 8081);
    let mut first = MonitorProc::start(&ns, &[]).await;
    let mut client = first.client().await;
    let before = list_events(&mut client, ListEventsRequest::default()).await;
    assert!(before.last_seq >= 2);
    let status = first.terminate().await;
    assert!(status.success(), "monitor-svc exited with {status}");
    drop(client);

    let second = MonitorProc::start(&ns, &[]).await;
    let mut client = second.client().await;
    let mut stream = watch(&mut client, &before.instance_id, before.last_seq).await;
    let snapshot = next_snapshot(&mut stream).await;
    assert_ne!(snapshot.instance_id, before.instance_id);
    assert_eq!(
        snapshot.instance_id,
        list_ports(&mut client).await.instance_id
    );
    assert_eq!(
        port_keys(&snapshot.ports),
        set(&[MONITOR_KEY, "tcp:0.0.0.0:8081"])
    );
}

// ---------------------------------------------------------------------------
// 8. Bearer token: what a neighbour without it gets

/// A server on the container's loopback only, with a secret planted in its
/// command line; it greets every connection.
fn secret_server(ns: &Netns, port: u16) -> Proc {
    let port = port.to_string();
    ns.spawn(
        binary(common::HELPER),
        [
            "greet",
            "127.0.0.1",
            port.as_str(),
            "inside",
            "--password=hunter2",
        ],
    )
}

/// Relay.Dial of `port` with `authorization` (if any): the bytes the
/// server sent, or the error.
async fn relay_read(
    monitor: &MonitorProc,
    port: u16,
    authorization: Option<&str>,
) -> Result<Vec<u8>, tonic::Status> {
    use porthole::pb::v1::{relay_client::RelayClient, relay_frame, DialRequest, RelayFrame};
    let frames = tokio_stream::iter(vec![
        RelayFrame {
            kind: Some(relay_frame::Kind::Dial(DialRequest {
                protocol: Protocol::Tcp as i32,
                port: port.into(),
            })),
        },
        RelayFrame {
            kind: Some(relay_frame::Kind::CloseWrite(true)),
        },
    ]);
    let mut req = tonic::Request::new(frames);
    if let Some(value) = authorization {
        req.metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    let mut inbound = within(
        "Relay.Dial",
        RelayClient::new(monitor.channel().await).dial(req),
    )
    .await?
    .into_inner();
    let mut got = Vec::new();
    while let Some(frame) = within("relay frames", inbound.message()).await? {
        if let Some(relay_frame::Kind::Data(d)) = frame.kind {
            got.extend_from_slice(&d);
        }
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread")]
async fn neighbour_without_the_token_gets_no_relay_and_no_command_lines() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let token_file = ns.log_dir().join("token");
    write_token(&token_file, "s3cret-token");
    let monitor = MonitorProc::start(&ns, &["--token-file", token_file.to_str().unwrap()]).await;
    let port = 18_080;
    let server = secret_server(&ns, port);
    let key = format!("tcp:127.0.0.1:{port}");

    // With the token: everything, command lines included.
    let authed = monitor.client().await;
    let listed = poll_until("the server listed", DEADLINE, || {
        let (mut client, key) = (authed.clone(), &key);
        async move {
            let ports = list_ports(&mut client).await.ports;
            ports.into_iter().find(|p| p.key == *key)
        }
    })
    .await;
    let process = listed.process.expect("the server's process is visible");
    assert_eq!(process.pid, server.pid());
    assert!(
        process.cmdline.iter().any(|a| a == "--password=hunter2"),
        "{process:?}"
    );

    // The neighbour (this host, another namespace): the server is not
    // reachable directly...
    let direct = std::net::TcpStream::connect((monitor.addr().ip(), port));
    assert!(
        direct.is_err(),
        "the loopback-only server is not reachable directly"
    );
    // ...nor through Relay, without the right token.
    for auth in [None, Some("Bearer wrong-token"), Some("Basic s3cret-token")] {
        let err = relay_read(&monitor, port, auth)
            .await
            .expect_err("Relay needs the token");
        assert_eq!(err.code(), Code::Unauthenticated, "{auth:?}: {err:?}");
    }
    // The read-only surface answers, without command lines.
    let mut anon = monitor.anonymous_client().await;
    let ports = list_ports(&mut anon).await.ports;
    let p = ports
        .iter()
        .find(|p| p.key == key)
        .expect("listed anonymously");
    let process = p.process.as_ref().expect("pid and name stay");
    assert_eq!(process.pid, server.pid());
    assert!(process.cmdline.is_empty(), "{process:?}");
    let events = list_events(&mut anon, ListEventsRequest::default()).await;
    assert!(events.events.iter().all(|e| e
        .port
        .as_ref()
        .and_then(|p| p.process.as_ref())
        .is_none_or(|p| p.cmdline.is_empty())));
    let mut stream = within(
        "anonymous WatchEvents",
        anon.watch_events(WatchEventsRequest::default()),
    )
    .await
    .expect("WatchEvents is read-only")
    .into_inner();
    let snap = next_snapshot(&mut stream).await;
    assert!(snap
        .ports
        .iter()
        .all(|p| p.process.as_ref().is_none_or(|p| p.cmdline.is_empty())));
    let resp = http_get(monitor.addr(), "/port-events").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(
        !resp.body.contains("hunter2") && !resp.body.contains("cmdline"),
        "{}",
        resp.body
    );
    assert!(resp.body.contains(&key), "{}", resp.body);

    // With the token (any case of "Bearer"), Relay reaches the server.
    let got = relay_read(&monitor, port, Some("bearer s3cret-token"))
        .await
        .expect("the token opens Relay");
    assert_eq!(got, b"inside");
    let resp = http(
        monitor.addr(),
        "GET",
        "/port-events",
        &[("Authorization", "Bearer s3cret-token")],
    )
    .await
    .unwrap();
    assert!(resp.body.contains("hunter2"), "{}", resp.body);

    // --anonymous none: nothing but /healthz without the token.
    let closed = MonitorProc::start(
        &ns,
        &[
            "--listen",
            "0.0.0.0:7071",
            "--anonymous",
            "none",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    )
    .await;
    let err = within(
        "ListPorts",
        closed
            .anonymous_client()
            .await
            .list_ports(ListPortsRequest {}),
    )
    .await
    .expect_err("--anonymous none refuses it");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    for path in ["/port-events", "/metrics"] {
        assert_eq!(http_get(closed.addr(), path).await.status, 401, "{path}");
    }
    assert_eq!(http_get(closed.addr(), "/healthz").await.status, 200);
    assert!(!closed
        .client()
        .await
        .list_ports(ListPortsRequest {})
        .await
        .unwrap()
        .into_inner()
        .ports
        .is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_token_file_the_monitor_makes_a_private_one() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let runtime = ns.log_dir().join("xdg");
    let mut cmd = ns.command(binary("monitor-svc"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PORTHOLE_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(["--listen", "0.0.0.0:7070"])
        .env("XDG_RUNTIME_DIR", &runtime)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null());
    let mut proc = ns.spawn_command("monitor-svc", cmd);
    let token_file = runtime.join("porthole/monitor.token");
    proc.wait_for_log("token_file").await;
    let secret = std::fs::read_to_string(&token_file).expect("the token file exists");
    let secret = secret.trim();
    assert!(secret.len() >= 32, "at least 128 bits: {secret:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let log = proc.log();
    assert!(
        log.contains(&token_file.display().to_string()),
        "the path is logged:\n{log}"
    );
    assert!(!log.contains(secret), "the token is never logged:\n{log}");
    // A token file others can read is refused, with the reason.
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut refuse = ns.command(binary("monitor-svc"));
    refuse
        .args(["--listen", "127.0.0.1:7099"])
        .env("XDG_RUNTIME_DIR", &runtime);
    let out = within(
        "monitor-svc to refuse the token file",
        tokio::process::Command::from(refuse).output(),
    )
    .await
    .expect("run monitor-svc");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("chmod 600"), "{stderr}");
}

// ---------------------------------------------------------------------------
// 9. Graceful shutdown

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_open_streams_and_exits_zero() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let mut monitor = MonitorProc::start(&ns, &[]).await;
    let mut client = monitor.client().await;
    let mut stream = watch(&mut client, "", 0).await;
    next_snapshot(&mut stream).await;

    monitor.proc().signal("TERM");
    match within("the stream to end after SIGTERM", stream.message()).await {
        Ok(None) => {}
        Err(status) if status.code() == Code::Unavailable => {}
        other => panic!("expected UNAVAILABLE or a clean end, got {other:?}"),
    }
    let status = monitor.proc().wait_exit(DEADLINE).await;
    assert!(
        status.success(),
        "monitor-svc exited with {status}:\n{}",
        monitor.log()
    );
}

// ---------------------------------------------------------------------------
// 10. /proc/net as the source

#[tokio::test(flavor = "multi_thread")]
async fn procfs_source_sees_what_netlink_sees() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let netlink = MonitorProc::start(&ns, &["--source", "netlink"]).await;
    let procfs = MonitorProc::start(&ns, &["--source", "procfs", "--listen", "0.0.0.0:7071"]).await;
    let mut nl = netlink.client().await;
    let mut pf = procfs.client().await;
    let mut stream = watch(&mut pf, "", 0).await;
    let snapshot = next_snapshot(&mut stream).await;

    // /proc/net cannot tell a v6-only `::` socket from a dual-stack one on
    // its own; beside an IPv4 listener on the same port it must be v6-only.
    let listeners = [
        Listener::tcp4(&ns, "0.0.0.0", 8081),
        Listener::tcp6_only(&ns, "::", 8081),
        Listener::tcp_dual(&ns, 8083),
        Listener::tcp6_only(&ns, "::1", 8084),
        Listener::udp(&ns, "127.0.0.1", 5353),
        Listener::udp(&ns, "::1", 5354),
    ];
    let keys = set(&[
        "tcp:0.0.0.0:8081",
        "tcp:[::]:8081",
        "tcp:*:8083",
        "tcp:[::1]:8084",
        "udp:127.0.0.1:5353",
        "udp:[::1]:5354",
    ]);
    let (opened, last) = expect_events(&mut stream, EventType::Opened, &keys, snapshot.seq).await;
    for e in &opened {
        let process = e.port.as_ref().and_then(|p| p.process.as_ref());
        assert!(
            listeners
                .iter()
                .any(|l| Some(l.pid()) == process.map(|p| p.pid)),
            "{e:?}"
        );
    }
    let mut want = keys.clone();
    want.extend([
        "tcp:0.0.0.0:7070".to_string(),
        "tcp:0.0.0.0:7071".to_string(),
    ]);
    let from_netlink = wait_ports(&mut nl, "netlink lists the listeners", |k| *k == want).await;
    let from_procfs = list_ports(&mut pf).await;
    let strip = |ports: Vec<Port>| -> BTreeMap<String, (i32, String, u32)> {
        ports
            .into_iter()
            .map(|p| (p.key.clone(), (p.protocol, p.address, p.port)))
            .collect()
    };
    assert_eq!(strip(from_procfs.ports), strip(from_netlink.ports));

    // Closed newest first: with the IPv4 listener gone first, /proc/net
    // alone would (rightly, as far as it can tell) re-key `::` 8081 as `*`.
    for l in listeners.into_iter().rev() {
        l.close();
    }
    expect_events(&mut stream, EventType::Closed, &keys, last).await;
    let gone = set(&["tcp:0.0.0.0:7070", "tcp:0.0.0.0:7071"]);
    wait_ports(&mut nl, "netlink sees them closed", |k| *k == gone).await;
    assert_eq!(port_keys(&list_ports(&mut pf).await.ports), gone);
}

// ---------------------------------------------------------------------------
// 11. grpcurl, health and reflection with no .proto files

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_works_without_proto_files() {
    if !require_root() {
        return;
    }
    let Some(grpcurl_bin) = which("grpcurl") else {
        skip_or_fail(
            "grpcurl_works_without_proto_files",
            "grpcurl is not on PATH",
        );
        return;
    };
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    let _l = Listener::tcp4(&ns, "0.0.0.0", 8081);
    let mut client = monitor.client().await;
    wait_ports(&mut client, "8081 listed", |k| {
        k.contains("tcp:0.0.0.0:8081")
    })
    .await;
    let addr = monitor.addr().to_string();

    let services = grpcurl(&grpcurl_bin, &["--plaintext", &addr, "list"]).await;
    for name in ["porthole.v1.PortEvents", "grpc.health.v1.Health"] {
        assert!(
            services.lines().any(|l| l.trim() == name),
            "{name} in:\n{services}"
        );
    }
    let described = grpcurl(
        &grpcurl_bin,
        &["--plaintext", &addr, "describe", "porthole.v1.PortEvents"],
    )
    .await;
    for method in ["ListEvents", "WatchEvents", "ListPorts"] {
        assert!(described.contains(method), "{method} in:\n{described}");
    }

    let out = grpcurl(
        &grpcurl_bin,
        &[
            "--plaintext",
            "-d",
            "{}",
            &addr,
            "porthole.v1.PortEvents/ListPorts",
        ],
    )
    .await;
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let keys: Vec<&str> = json["ports"]
        .as_array()
        .unwrap_or_else(|| panic!("no ports in {out}"))
        .iter()
        .filter_map(|p| p["key"].as_str())
        .collect();
    assert!(keys.contains(&"tcp:0.0.0.0:8081"), "{out}");

    let out = grpcurl(
        &grpcurl_bin,
        &[
            "--plaintext",
            "-d",
            "{}",
            &addr,
            "grpc.health.v1.Health/Check",
        ],
    )
    .await;
    assert!(out.contains("SERVING"), "{out}");
    let out = grpcurl(
        &grpcurl_bin,
        &[
            "--plaintext",
            "-d",
            r#"{"service":"porthole.v1.PortEvents"}"#,
            &addr,
            "grpc.health.v1.Health/Check",
        ],
    )
    .await;
    assert!(out.contains("SERVING"), "{out}");

    // grpcurl 1.8 speaks only reflection v1alpha: both versions answer.
    let channel = monitor.channel().await;
    // The same call against each reflection version (different generated types).
    macro_rules! list_services {
        ($($version:ident)::+, $label:literal, $channel:expr) => {{
            use $($version)::+::{
                server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse, ServerReflectionRequest,
            };
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut c = ServerReflectionClient::new($channel);
            let mut s = within(
                concat!("reflection ", $label),
                c.server_reflection_info(tokio_stream::iter([req])),
            )
            .await
            .expect(concat!("reflection ", $label, " is served"))
            .into_inner();
            match within(concat!("reflection ", $label, " reply"), s.message()).await {
                Ok(Some(r)) => match r.message_response {
                    Some(MessageResponse::ListServicesResponse(l)) => l
                        .service
                        .into_iter()
                        .map(|s| s.name)
                        .collect::<BTreeSet<_>>(),
                    other => panic!("unexpected {} reply {other:?}", $label),
                },
                other => panic!("unexpected {} reply {other:?}", $label),
            }
        }};
    }
    let v1alpha = list_services!(tonic_reflection::pb::v1alpha, "v1alpha", channel.clone());
    let v1 = list_services!(tonic_reflection::pb::v1, "v1", channel);
    for name in ["porthole.v1.PortEvents", "grpc.health.v1.Health"] {
        assert!(v1alpha.contains(name), "{name} in v1alpha {v1alpha:?}");
        assert!(v1.contains(name), "{name} in v1 {v1:?}");
    }
}

// ---------------------------------------------------------------------------
// 12. Bad flags (no namespace, no root)

#[tokio::test(flavor = "multi_thread")]
async fn bad_flags_exit_non_zero_and_name_the_flag() {
    let bin = binary("monitor-svc");
    let cases: [(&[&str], &str); 5] = [
        (&["--interval", "0ms"], "--interval"),
        (&["--interval", "soon"], "--interval"),
        (&["--buffer-size", "0"], "--buffer-size"),
        (&["--listen", "nonsense"], "--listen"),
        (
            &[
                "--listen",
                "127.0.0.1:0",
                "--token-file",
                "/nonexistent/porthole-token",
            ],
            "/nonexistent/porthole-token",
        ),
    ];
    for (args, named) in cases {
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.args(args).kill_on_drop(true);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("PORTHOLE_") {
                cmd.env_remove(k);
            }
        }
        let out = within(&format!("monitor-svc {args:?} to exit"), cmd.output())
            .await
            .expect("run monitor-svc");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "monitor-svc {args:?} succeeded:\n{stderr}"
        );
        assert!(
            stderr.contains(named),
            "monitor-svc {args:?}: stderr does not name {named}:\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn udp_sockets_on_ephemeral_or_client_ports_are_not_servers() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    // 45000 is in Linux's default ephemeral range, where a resolver's
    // socket lands; 68 is a DHCP client's; 5300 is a server's.
    let _sockets = [
        Listener::udp(&ns, "127.0.0.1", 45000),
        Listener::udp(&ns, "0.0.0.0", 68),
        Listener::udp(&ns, "127.0.0.1", 5300),
    ];
    let mut client = monitor.client().await;
    let ports = poll_until("three UDP sockets listed", DEADLINE, || {
        let mut c = client.clone();
        async move {
            let ports = list_ports(&mut c).await.ports;
            let udp: Vec<_> = ports
                .into_iter()
                .filter(|p| p.protocol == Protocol::Udp as i32)
                .collect();
            (udp.len() == 3).then_some(udp)
        }
    })
    .await;
    let server = |port: u32| ports.iter().find(|p| p.port == port).unwrap().server;
    assert!(!server(45000) && !server(68) && server(5300), "{ports:?}");
    let _ = &mut client;
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_carries_udp_datagrams_intact_to_bound_ports_only() {
    if !require_root() {
        return;
    }
    use porthole::pb::v1::{
        relay_client::RelayClient, relay_frame::Kind as F, DialRequest, RelayFrame,
    };
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    let mut echo = ns.spawn_piped("udp-echo", {
        let mut cmd = ns.command(binary(common::HELPER));
        cmd.args(["udp-echo", "127.0.0.1", "5400"]);
        cmd
    });
    let mut ready = String::new();
    let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(echo.stdout()), &mut ready);
    assert_eq!(ready.trim(), "ready");
    let mut client = monitor.client().await;
    poll_until("the UDP socket listed", DEADLINE, || {
        let mut c = client.clone();
        async move {
            let ports = list_ports(&mut c).await.ports;
            ports
                .iter()
                .any(|p| p.protocol == Protocol::Udp as i32 && p.port == 5400)
                .then_some(())
        }
    })
    .await;
    let _ = &mut client;
    let dial = |port: u16| RelayFrame {
        kind: Some(F::Dial(DialRequest {
            protocol: Protocol::Udp as i32,
            port: port.into(),
        })),
    };
    let channel =
        porthole::auth::with_token(monitor.channel().await, Some(monitor.token().clone()));
    let relay = || RelayClient::new(channel.clone());
    // Nothing bound on 5401: refused, never sent anywhere.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(dial(5401)).await.unwrap();
    let refused = within(
        "Relay.Dial UDP",
        relay().dial(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect_err("no UDP socket on 5401");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // Datagrams from 1 byte to the largest come back one for one, intact.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(dial(5400)).await.unwrap();
    let mut inbound = within(
        "Relay.Dial UDP",
        relay().dial(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("a UDP flow to 5400")
    .into_inner();
    let first = within("dialed", inbound.message()).await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(F::Dialed(_))), "{first:?}");
    let mut rng = common::XorShift::seeded();
    let sizes: Vec<usize> = [1, 2, 1472, 1473, 9000, 65_507]
        .into_iter()
        .chain((0..194).map(|_| 1 + (rng.next_u64() % 65_507) as usize))
        .collect();
    for (i, size) in sizes.iter().enumerate() {
        let datagram: Vec<u8> = (0..*size).map(|j| (i * 31 + j) as u8).collect();
        tx.send(RelayFrame {
            kind: Some(F::Data(datagram.clone().into())),
        })
        .await
        .unwrap();
        let back = within("the echo", inbound.message())
            .await
            .unwrap()
            .unwrap();
        match back.kind {
            Some(F::Data(d)) => assert!(d[..] == datagram[..], "datagram {i} of {size} bytes"),
            other => panic!("datagram {i}: {other:?}"),
        }
    }
    tx.send(RelayFrame {
        kind: Some(F::CloseWrite(true)),
    })
    .await
    .unwrap();
    assert!(
        within("the end of the flow", inbound.message())
            .await
            .unwrap()
            .is_none(),
        "close_write ends the flow cleanly"
    );
    echo.kill();
}

/// The raw relay path (see `porthole::rawrelay`) on the monitor's own port:
/// the token, only a listening port, bytes both ways with half-close, and a
/// reset towards the server when the client's side breaks.
#[tokio::test(flavor = "multi_thread")]
async fn the_raw_relay_path_keeps_the_relay_rules() {
    if !require_root() {
        return;
    }
    use porthole::rawrelay::{request, Answer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    let port = 5410;
    let _server = common::Server::start(&ns, "127.0.0.1", port, "raw").await;
    monitor
        .wait_listed("the server listed", DEADLINE, |p| p.port == u32::from(port))
        .await;
    let token = monitor.token().clone();
    let ask = |port: u16, token: Option<porthole::auth::Token>| {
        let addr = monitor.addr();
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let answer = within("a raw relay answer", request(&mut s, port, token.as_ref()))
                .await
                .unwrap();
            (s, answer)
        }
    };
    // No token, a wrong one: refused.
    for wrong in [None, Some(porthole::auth::Token::new("nope").unwrap())] {
        let (_, answer) = ask(port, wrong).await;
        assert!(
            matches!(&answer, Answer::Err { code, .. } if *code == tonic::Code::Unauthenticated),
            "{answer:?}"
        );
    }
    // A port nothing listens on: refused, never dialled.
    let (_, answer) = ask(port + 1, Some(token.clone())).await;
    assert!(
        matches!(&answer, Answer::Err { code, message } if *code == tonic::Code::FailedPrecondition && message.contains("no TCP listener")),
        "{answer:?}"
    );
    // A listening port: its bytes, both ways, and a clean end.
    let (mut s, answer) = ask(port, Some(token.clone())).await;
    assert!(
        matches!(&answer, Answer::Ok(addr) if addr == &format!("127.0.0.1:{port}")),
        "{answer:?}"
    );
    s.write_all(b"ping\n").await.unwrap();
    s.shutdown().await.unwrap();
    let mut reply = String::new();
    within("the server's answer", s.read_to_string(&mut reply))
        .await
        .unwrap();
    assert_eq!(reply.trim(), "pong raw");
    // Something that is not a request after the magic: refused.
    let mut s = tokio::net::TcpStream::connect(monitor.addr())
        .await
        .unwrap();
    s.write_all(b"PORTHOLE-RELAY/1 sctp 80 x\n").await.unwrap();
    let mut reply = String::new();
    within("the refusal", s.read_to_string(&mut reply))
        .await
        .unwrap();
    assert!(reply.starts_with("ERR INVALID_ARGUMENT "), "{reply}");
    // The relays were counted.
    let metrics = common::http_get(monitor.addr(), "/metrics").await.body;
    assert!(
        metrics
            .lines()
            .any(|l| l == "porthole_monitor_relays_total 1"),
        "{metrics}"
    );
}
