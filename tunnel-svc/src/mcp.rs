//! `tunnel-svc mcp`: the Model Context Protocol over stdio (JSON-RPC 2.0,
//! one message per line), for coding agents. Its tools are calls to the
//! admin API of a running tunnel-svc, made with the user's admin token as
//! `ls` makes them: list, wait for a port (the URL to use), open, close,
//! and why a port is not forwarded.
//!
//! Written here rather than with an SDK: the protocol part a tools-only
//! server needs is `initialize`, `tools/list` and `tools/call`, and the
//! SDKs bring a schema generator and a second async stack with them.

use crate::cli::{self, Credentials, WaitFor};
use crate::json;
use porthole::pb::v1::{
    CloseTunnelRequest, ListTargetsRequest, OpenTunnelRequest, ProbeTunnelRequest, TunnelState,
};
use serde_json::{json, Value};
use std::net::SocketAddr;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The protocol versions this server speaks, newest first.
const VERSIONS: [&str; 3] = ["2025-06-18", "2025-03-26", "2024-11-05"];

/// Longest a request line may be.
const MAX_LINE: usize = 1 << 20;

/// The longest `wait_for_port` may wait.
const MAX_WAIT_SECS: f64 = 600.0;

/// Serves MCP on stdin/stdout until stdin ends.
pub async fn serve(admin: SocketAddr, auth: Credentials) -> anyhow::Result<()> {
    let server = Server {
        admin,
        auth,
        version: Default::default(),
    };
    server.run().await
}

#[derive(Clone)]
struct Server {
    admin: SocketAddr,
    auth: Credentials,
    /// The version agreed at `initialize` (until then, the newest).
    version: std::sync::Arc<std::sync::Mutex<Option<&'static str>>>,
}

/// Requests being answered at once; more wait for one to finish.
const IN_FLIGHT: usize = 32;

impl Server {
    /// Reads messages until stdin ends; each request is answered as soon
    /// as it is done (a `wait_for_port` does not hold up a `ping`).
    async fn run(self) -> anyhow::Result<()> {
        let mut lines = BufReader::new(tokio::io::stdin());
        let (answers, mut out) = tokio::sync::mpsc::channel::<Value>(IN_FLIGHT);
        let writer = tokio::spawn(async move {
            let mut stdout = tokio::io::stdout();
            while let Some(answer) = out.recv().await {
                let mut line = serde_json::to_vec(&answer)?;
                line.push(b'\n');
                stdout.write_all(&line).await?;
                stdout.flush().await?;
            }
            anyhow::Ok(())
        });
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut lines)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                break;
            }
            if line.len() > MAX_LINE {
                // The rest of the line is read and dropped with it.
                let mut rest = Vec::new();
                lines.read_until(b'\n', &mut rest).await?;
                let _ = answers
                    .send(error(Value::Null, -32600, "request too large"))
                    .await;
                continue;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let slot = slots.clone().acquire_owned().await?;
            let (me, answers, msg) = (self.clone(), answers.clone(), line.clone());
            tokio::spawn(async move {
                if let Some(answer) = me.handle(&msg).await {
                    let _ = answers.send(answer).await;
                }
                drop(slot);
            });
        }
        // Stdin ended: what is being answered still is, then the writer ends.
        drop(answers);
        writer.await?
    }

    fn version(&self) -> &'static str {
        self.version
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(VERSIONS[0])
    }

    /// The answer to one message; none for a notification.
    async fn handle(&self, line: &[u8]) -> Option<Value> {
        let msg: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => return Some(error(Value::Null, -32700, &format!("parse error: {e}"))),
        };
        let id = msg.get("id").cloned();
        let method = msg
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let params = msg.get("params").cloned().unwrap_or(Value::Null);
        let Some(id) = id else {
            // A notification (`notifications/initialized`, cancellations):
            // nothing to answer.
            return None;
        };
        let result = match method {
            "initialize" => Ok(self.initialize(&params)),
            "ping" => Ok(json!({})),
            "tools/list" => Ok(json!({ "tools": tools() })),
            "tools/call" => Ok(self.call(&params).await),
            "" => Err((-32600, "not a request: no method".to_string())),
            other => Err((-32601, format!("method not found: {other}"))),
        };
        Some(match result {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err((code, message)) => error(id, code, &message),
        })
    }

    fn initialize(&self, params: &Value) -> Value {
        let asked = params
            .get("protocolVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let version = VERSIONS
            .iter()
            .find(|v| **v == asked)
            .copied()
            .unwrap_or(VERSIONS[0]);
        *self.version.lock().unwrap_or_else(|e| e.into_inner()) = Some(version);
        json!({
            "protocolVersion": version,
            "capabilities": { "tools": { "listChanged": false } },
            "serverInfo": { "name": "porthole", "version": env!("CARGO_PKG_VERSION") },
            "instructions": "porthole forwards the ports that servers open inside containers to \
                the same port on this host's localhost. Use wait_for_port after starting a \
                server in a container to get the URL to use from the host; explain_port says \
                why a port is not forwarded.",
        })
    }

    /// A `tools/call`: its result, with `isError` set when the tool failed
    /// (a failed tool is a result the model reads, not a protocol error).
    async fn call(&self, params: &Value) -> Value {
        let name = params
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let args = params.get("arguments").cloned().unwrap_or(json!({}));
        let outcome = match name {
            "list_tunnels" => self.list_tunnels(&args).await,
            "list_targets" => self.list_targets().await,
            "wait_for_port" => self.wait_for_port(&args).await,
            "open_tunnel" => self.open_tunnel(&args).await,
            "close_tunnel" => self.close_tunnel(&args).await,
            "explain_port" => self.explain_port(&args).await,
            other => Err(anyhow::anyhow!("no tool named {other:?}")),
        };
        let (value, is_error) = match outcome {
            Ok(v) => (v, false),
            Err(e) => (json!({ "error": format!("{e:#}") }), true),
        };
        let mut result = json!({
            "content": [{ "type": "text", "text": value.to_string() }],
            "isError": is_error,
        });
        if self.version() >= "2025-06-18" {
            result["structuredContent"] = value;
        }
        result
    }

    async fn client(
        &self,
    ) -> anyhow::Result<
        porthole::pb::v1::tunnel_admin_client::TunnelAdminClient<porthole::auth::AuthChannel>,
    > {
        cli::client(self.admin, self.auth.clone()).await
    }

    async fn list_tunnels(&self, args: &Value) -> anyhow::Result<Value> {
        let target = opt_str(args, "target")?.unwrap_or_default();
        let tunnels = cli::all_tunnels(&mut self.client().await?, &target).await?;
        Ok(json!({ "tunnels": tunnels.iter().map(json::tunnel).collect::<Vec<_>>() }))
    }

    async fn list_targets(&self) -> anyhow::Result<Value> {
        let targets = self
            .client()
            .await?
            .list_targets(ListTargetsRequest::default())
            .await?
            .into_inner()
            .targets;
        Ok(json!({ "targets": targets.iter().map(json::target).collect::<Vec<_>>() }))
    }

    async fn wait_for_port(&self, args: &Value) -> anyhow::Result<Value> {
        let what = WaitFor {
            target: opt_str(args, "target")?,
            protocol: protocol(args)?,
            port: port(args, "port")?,
        };
        let secs = match args.get("timeout_seconds") {
            None | Some(Value::Null) => 30.0,
            Some(v) => v
                .as_f64()
                .filter(|s| *s > 0.0 && *s <= MAX_WAIT_SECS)
                .ok_or_else(|| {
                    anyhow::anyhow!("timeout_seconds: a number of seconds in (0, {MAX_WAIT_SECS}]")
                })?,
        };
        let timeout = std::time::Duration::from_secs_f64(secs);
        let ready = cli::wait(self.admin, self.auth.clone(), &what, timeout).await?;
        let url = if ready.tunnel.url.is_empty() {
            format!("http://{}", ready.host)
        } else {
            ready.tunnel.url.clone()
        };
        Ok(json!({
            "url": url,
            "host": ready.host,
            "tunnel": json::tunnel(&ready.tunnel),
        }))
    }

    async fn open_tunnel(&self, args: &Value) -> anyhow::Result<Value> {
        let req = OpenTunnelRequest {
            target: opt_str(args, "target")?.unwrap_or_default(),
            container_port: u32::from(port(args, "port")?),
            host_port: match args.get("host_port") {
                None | Some(Value::Null) => 0,
                Some(_) => u32::from(port(args, "host_port")?),
            },
            protocol: protocol(args)?.to_pb() as i32,
        };
        let t = self.client().await?.open_tunnel(req).await?.into_inner();
        Ok(json!({ "tunnel": t.tunnel.as_ref().map_or(Value::Null, json::tunnel) }))
    }

    async fn close_tunnel(&self, args: &Value) -> anyhow::Result<Value> {
        let id = opt_str(args, "id")?.ok_or_else(|| anyhow::anyhow!("id is required"))?;
        let t = self
            .client()
            .await?
            .close_tunnel(CloseTunnelRequest { id })
            .await?
            .into_inner();
        Ok(json!({ "tunnel": t.tunnel.as_ref().map_or(Value::Null, json::tunnel) }))
    }

    /// Where a port stands: its tunnel (state, host address, why it
    /// failed), or why it has none (the plan's reason, or nothing listens).
    async fn explain_port(&self, args: &Value) -> anyhow::Result<Value> {
        let port = port(args, "port")?;
        let proto = protocol(args)?;
        let mut client = self.client().await?;
        let targets = cli::target_names(&mut client, opt_str(args, "target")?).await?;
        let mut said = Vec::new();
        for target in targets {
            let id = format!("{target}:{proto}:{port}");
            let why = match client
                .probe_tunnel(ProbeTunnelRequest { id: id.clone() })
                .await
            {
                Ok(p) => {
                    let p = p.into_inner();
                    let t = p.tunnel.unwrap_or_default();
                    match TunnelState::try_from(t.state).unwrap_or_default() {
                        TunnelState::Active if p.reachable => {
                            format!(
                                "{id} is forwarded on {} and its server answers",
                                cli::host_of(&t)
                            )
                        }
                        TunnelState::Active => format!(
                            "{id} is forwarded on {}, but its server does not answer: {}",
                            cli::host_of(&t),
                            p.error
                        ),
                        TunnelState::Failed => format!("{id} failed: {}", t.error),
                        TunnelState::Closed => {
                            format!("{id} was closed by an admin; open_tunnel opens it again")
                        }
                        TunnelState::Published => format!("{id}: {}", t.note),
                        _ => format!("{id} is being set up: {}", t.note),
                    }
                }
                Err(s) if s.code() == tonic::Code::FailedPrecondition => s.message().to_string(),
                Err(s) if s.code() == tonic::Code::NotFound => format!(
                    "{id}: nothing listens on {proto} port {port} in {target} (a server bound \
                     there gets a tunnel within a second)"
                ),
                Err(s) => return Err(s.into()),
            };
            said.push(why);
        }
        if said.is_empty() {
            anyhow::bail!("tunnel-svc follows no targets");
        }
        Ok(json!({ "explanation": said.join("\n") }))
    }
}

fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn opt_str(args: &Value, key: &str) -> anyhow::Result<Option<String>> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(Value::String(_)) => Ok(None),
        Some(other) => anyhow::bail!("{key}: a string, not {other}"),
    }
}

fn port(args: &Value, key: &str) -> anyhow::Result<u16> {
    args.get(key)
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| anyhow::anyhow!("{key}: a port number in 1..65535 is required"))
}

fn protocol(args: &Value) -> anyhow::Result<crate::model::Proto> {
    match opt_str(args, "protocol")? {
        None => Ok(crate::model::Proto::Tcp),
        Some(p) => p.parse().map_err(anyhow::Error::msg),
    }
}

/// The tools, with their input schemas.
fn tools() -> Value {
    let port = json!({"type": "integer", "minimum": 1, "maximum": 65535,
        "description": "The port number inside the container."});
    let target = json!({"type": "string",
        "description": "The container (target) name; needed only when several have the port open."});
    let protocol = json!({"type": "string", "enum": ["tcp", "udp"], "default": "tcp"});
    json!([
        {
            "name": "list_tunnels",
            "description": "The forwarded ports: for each, the container port, the host address to use, its state and health, the listening process, connections and bytes.",
            "inputSchema": {"type": "object", "properties": {"target": target}},
        },
        {
            "name": "list_targets",
            "description": "The containers (targets) tunnel-svc follows, and whether each one's monitor is reachable.",
            "inputSchema": {"type": "object", "properties": {}},
        },
        {
            "name": "wait_for_port",
            "description": "Waits until a port in a container is forwarded to the host and a connection through it reaches the server; returns the URL to use from the host (http://localhost:PORT). Fails with the reason if it will not be forwarded.",
            "inputSchema": {"type": "object", "properties": {
                "port": port, "target": target, "protocol": protocol,
                "timeout_seconds": {"type": "number", "default": 30, "maximum": MAX_WAIT_SECS},
            }, "required": ["port"]},
        },
        {
            "name": "open_tunnel",
            "description": "Forwards a container port by hand (also one the rules leave out, or one that nothing listens on yet), optionally on a given host port.",
            "inputSchema": {"type": "object", "properties": {
                "port": port, "target": target, "protocol": protocol,
                "host_port": {"type": "integer", "minimum": 1, "maximum": 65535},
            }, "required": ["port"]},
        },
        {
            "name": "close_tunnel",
            "description": "Closes a tunnel by id (TARGET:tcp:PORT); an automatic one stays closed until its port closes and opens again, or open_tunnel.",
            "inputSchema": {"type": "object", "properties": {
                "id": {"type": "string", "description": "e.g. web:tcp:8000"},
            }, "required": ["id"]},
        },
        {
            "name": "explain_port",
            "description": "Says where a container port stands: forwarded and answering, failing and why, or why it is not forwarded (skip list, a rule, nothing listening).",
            "inputSchema": {"type": "object", "properties": {
                "port": port, "target": target, "protocol": protocol,
            }, "required": ["port"]},
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> Server {
        Server {
            admin: "127.0.0.1:1".parse().unwrap(),
            auth: Credentials::default(),
            version: Default::default(),
        }
    }

    #[tokio::test]
    async fn speaks_json_rpc() {
        let s = server();
        let init = s
            .handle(br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-03-26"}}"#)
            .await
            .unwrap();
        assert_eq!(init["result"]["protocolVersion"], "2025-03-26");
        assert_eq!(init["id"], 1);
        assert!(s
            .handle(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .await
            .is_none());
        let list = s
            .handle(br#"{"jsonrpc":"2.0","id":"a","method":"tools/list"}"#)
            .await
            .unwrap();
        assert_eq!(list["result"]["tools"].as_array().unwrap().len(), 6);
        let nope = s
            .handle(br#"{"jsonrpc":"2.0","id":2,"method":"x"}"#)
            .await
            .unwrap();
        assert_eq!(nope["error"]["code"], -32601);
        let bad = s.handle(b"{not json").await.unwrap();
        assert_eq!(bad["error"]["code"], -32700);
        let wrong = s
            .handle(br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"wait_for_port","arguments":{"port":70000}}}"#)
            .await
            .unwrap();
        assert_eq!(wrong["result"]["isError"], true);
        assert!(wrong["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("1..65535"));
        // An unknown version gets the newest this server speaks.
        let init = s
            .handle(br#"{"jsonrpc":"2.0","id":4,"method":"initialize","params":{"protocolVersion":"1999-01-01"}}"#)
            .await
            .unwrap();
        assert_eq!(init["result"]["protocolVersion"], VERSIONS[0]);
    }
}
