//! The admin API's messages in protobuf's JSON mapping (as grpcurl prints
//! them: lowerCamelCase names, enums by name, 64-bit integers as strings,
//! timestamps in RFC 3339), with every field present so scripts find the
//! same keys each time: what `ls -o json`, `watch`, `wait -o json`, the
//! panel and `tunnel-svc mcp` give.

use porthole::pb::v1::{Backend, Origin, Process, Protocol, Target, Tunnel, TunnelState};
use serde_json::{json, Value};

fn enum_name<E: TryFrom<i32>>(n: i32, name: impl Fn(E) -> &'static str) -> Value {
    match E::try_from(n) {
        Ok(e) => Value::from(name(e)),
        // An enum value this build does not know: its number, as the
        // mapping says.
        Err(_) => Value::from(n),
    }
}

fn time(t: &Option<prost_types::Timestamp>) -> Value {
    t.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map_or(Value::Null, |t| {
            Value::from(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        })
}

pub fn process(p: &Process) -> Value {
    json!({
        "pid": p.pid,
        "name": p.name,
        "cmdline": p.cmdline,
        "cmdlineTruncated": p.cmdline_truncated,
    })
}

pub fn tunnel(t: &Tunnel) -> Value {
    json!({
        "id": t.id,
        "target": t.target,
        "protocol": enum_name(t.protocol, |e: Protocol| e.as_str_name()),
        "containerPort": t.container_port,
        "hostPort": t.host_port,
        "hostAddresses": t.host_addresses,
        "state": enum_name(t.state, |e: TunnelState| e.as_str_name()),
        "backend": enum_name(t.backend, |e: Backend| e.as_str_name()),
        "origin": enum_name(t.origin, |e: Origin| e.as_str_name()),
        "error": t.error,
        "openedAt": time(&t.opened_at),
        "process": t.process.as_ref().map_or(Value::Null, process),
        "activeConnections": t.active_connections.to_string(),
        "totalConnections": t.total_connections.to_string(),
        "bytesIn": t.bytes_in.to_string(),
        "bytesOut": t.bytes_out.to_string(),
        "note": t.note,
        "label": t.label,
        "datagramsIn": t.datagrams_in.to_string(),
        "datagramsOut": t.datagrams_out.to_string(),
        "datagramsDropped": t.datagrams_dropped.to_string(),
        "consecutiveFailures": t.consecutive_failures.to_string(),
        "failingSince": time(&t.failing_since),
        "settingsFrom": t.settings_from,
        "url": t.url,
        "usableAfterMs": t.usable_after_ms.to_string(),
    })
}

pub fn target(t: &Target) -> Value {
    json!({
        "name": t.name,
        "url": t.url,
        "backend": enum_name(t.backend, |e: Backend| e.as_str_name()),
        "connected": t.connected,
        "instanceId": t.instance_id,
        "error": t.error,
        "since": time(&t.since),
    })
}

/// A WatchTunnels message.
pub fn update(u: &porthole::pb::v1::TunnelUpdate) -> Value {
    json!({
        "tunnel": u.tunnel.as_ref().map_or(Value::Null, tunnel),
        "removed": u.removed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapping_is_protobufs() {
        let t = Tunnel {
            id: "web:tcp:8000".into(),
            state: TunnelState::Active as i32,
            protocol: Protocol::Tcp as i32,
            bytes_in: u64::MAX,
            opened_at: Some(prost_types::Timestamp {
                seconds: 1_790_000_000,
                nanos: 5_000_000,
            }),
            origin: 99,
            ..Default::default()
        };
        let v = tunnel(&t);
        assert_eq!(v["state"], "TUNNEL_STATE_ACTIVE");
        assert_eq!(v["protocol"], "PROTOCOL_TCP");
        assert_eq!(v["bytesIn"], "18446744073709551615", "64-bit as a string");
        assert_eq!(v["openedAt"], "2026-09-21T14:13:20.005Z");
        assert_eq!(v["origin"], 99, "an unknown enum value by number");
        assert_eq!(v["process"], Value::Null);
        assert_eq!(v["failingSince"], Value::Null);
    }
}
