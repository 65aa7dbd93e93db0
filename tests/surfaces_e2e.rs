//! The views over the admin API that scripts and agents use, against a real
//! tunnel-svc following a monitor in a namespace: `ls -o json`, `watch`
//! (NDJSON), `wait -o json` and its exit statuses, and `tunnel-svc mcp`
//! driven by the reference MCP client (the `mcp` package from PyPI).

use porthole_testkit as common;

use common::{
    require_root, skip_or_fail, unused_local_port, within, MonitorProc, Netns, Server, TunnelProc,
};
use serde_json::Value;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};

/// `tunnel-svc ARGS` against `tunnel`: its exit code and stdout.
async fn run(tunnel: &TunnelProc, args: &[&str]) -> (Option<i32>, String) {
    let out = within(&format!("tunnel-svc {args:?}"), tunnel.cli(args).output())
        .await
        .expect("run tunnel-svc");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The next line of `watch` that is about tunnel `id`, as JSON.
async fn next_about(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    id: &str,
) -> Value {
    loop {
        let line = within("a line from tunnel-svc watch", lines.next_line())
            .await
            .expect("watch's stdout")
            .expect("watch still running");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["tunnel"]["id"] == id {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_for_scripts_ls_watch_and_wait() {
    if !require_root() {
        return;
    }
    let port = unused_local_port();
    let id = format!("default:tcp:{port}");
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    let tunnel = TunnelProc::follow(&ns, &monitor, &[]).await;
    let mut watch = tunnel
        .cli(&["watch"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("tunnel-svc watch");
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();

    // Open: watch sees it become active.
    let server = Server::start(&ns, "127.0.0.1", port, "json").await;
    let mut seen = vec![];
    loop {
        let v = next_about(&mut lines, &id).await;
        let state = v["tunnel"]["state"].as_str().unwrap().to_string();
        seen.push(state.clone());
        if state == "TUNNEL_STATE_ACTIVE" {
            assert_eq!(v["removed"], false);
            break;
        }
    }

    // ls -o json: ListTargets and ListTunnels, as jq would read them.
    let (code, out) = run(&tunnel, &["ls", "-o", "json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let all: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(all["targets"][0]["name"], "default");
    assert_eq!(all["targets"][0]["connected"], true);
    let t = all["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(t["hostPort"], u64::from(port));
    assert_eq!(t["state"], "TUNNEL_STATE_ACTIVE");
    assert_eq!(t["protocol"], "PROTOCOL_TCP");
    assert!(t["bytesIn"].is_string(), "uint64 as a string: {t}");
    // It opened while watched: how long from listening to usable is known.
    let usable: u64 = t["usableAfterMs"].as_str().unwrap().parse().unwrap();
    assert!((1..10_000).contains(&usable), "{t}");
    eprintln!("usable {usable} ms after the port started listening");

    // wait -o json: ready, with the host address.
    let (code, out) = run(&tunnel, &["wait", &port.to_string(), "-o", "json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let ready: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["host"], format!("localhost:{port}"));
    assert_eq!(ready["tunnel"]["id"], id.as_str());
    // Nothing listens on port 1 in the container: timed out, status 3.
    let (code, out) = run(&tunnel, &["wait", "1", "--timeout", "300ms", "-o", "json"]).await;
    assert_eq!(code, Some(3), "{out}");
    let not: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(not["ready"], false);
    assert!(
        not["error"].as_str().unwrap().contains("timed out"),
        "{out}"
    );

    // Closed: watch sees it.
    let (code, _) = run(&tunnel, &["close", &id]).await;
    assert_eq!(code, Some(0));
    loop {
        let v = next_about(&mut lines, &id).await;
        if v["tunnel"]["state"] == "TUNNEL_STATE_CLOSED" {
            break;
        }
    }
    // Interrupted, it exits cleanly.
    let pid = rustix::process::Pid::from_raw(watch.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let status = within("watch to exit", watch.wait()).await.unwrap();
    assert!(status.success(), "{status}");
    drop(server);
}

/// The MCP client of the `mcp` package (PyPI), run by python3 from a
/// virtualenv `.ci/run` makes; `None` when it is not there.
fn mcp_python() -> Option<std::path::PathBuf> {
    let venv = common::target_dir().join("mcp-venv/bin/python3");
    if venv.is_file() {
        return Some(venv);
    }
    skip_or_fail(
        "an_mcp_client_waits_for_a_port_and_gets_its_url",
        "needs the mcp client (python3 -m venv target/mcp-venv && target/mcp-venv/bin/pip install mcp)",
    );
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn an_mcp_client_waits_for_a_port_and_gets_its_url() {
    if !require_root() {
        return;
    }
    let Some(python) = mcp_python() else {
        return;
    };
    let port = unused_local_port();
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    let tunnel = TunnelProc::follow(&ns, &monitor, &[]).await;
    let client = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp_client.py");
    let cmd = tunnel.cli(&["mcp"]);
    let argv: Vec<String> = std::iter::once(cmd.as_std().get_program())
        .chain(cmd.as_std().get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let state_dir = tunnel.state_dir().display().to_string();
    let mut py = tokio::process::Command::new(python);
    py.arg(client)
        .arg(port.to_string())
        .arg(monitor.addr().port().to_string())
        .arg(&state_dir)
        .args(&argv)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut running = py.spawn().expect("python3 mcp_client.py");
    let mut lines = BufReader::new(running.stdout.take().unwrap()).lines();
    // The port opens once the client is waiting for it.
    let mut stdout = String::new();
    while let Some(line) = within("the MCP client's lines", lines.next_line())
        .await
        .expect("its stdout")
    {
        let waiting = line == "calling wait_for_port";
        stdout.push_str(&line);
        stdout.push('\n');
        if waiting {
            break;
        }
    }
    let server = Server::start(&ns, "127.0.0.1", port, "mcp").await;
    while let Some(line) = within("the MCP client's lines", lines.next_line())
        .await
        .expect("its stdout")
    {
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let out = within("the MCP client", running.wait_with_output())
        .await
        .expect("the MCP client ran");
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(said["url"], format!("http://localhost:{port}"), "{said}");
    assert!(
        said["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "wait_for_port"),
        "{said}"
    );
    assert!(
        said["why"].as_str().unwrap().contains("monitor's own port"),
        "{said}"
    );
    drop(server);
}

/// The panel in a real headless Chromium: an existing tunnel is listed with
/// its link; a port opened in the container appears without a reload
/// within a second of the admin API having it; "Close" closes it. And what
/// a hostile page could send is refused: a foreign `Host` (DNS rebinding),
/// a foreign `Origin` (CSRF), no cookie, a used login link.
#[tokio::test(flavor = "multi_thread")]
async fn the_panel_is_live_in_chromium_and_refuses_strangers() {
    if !require_root() {
        return;
    }
    if common::webdriver::chromium().is_none() {
        skip_or_fail(
            "the_panel_is_live_in_chromium_and_refuses_strangers",
            "needs chromium and chromium-driver (apt-get install chromium chromium-driver)",
        );
        return;
    }
    let (first, later) = (unused_local_port(), unused_local_port());
    let ns = Netns::new();
    let monitor = MonitorProc::start(&ns, &[]).await;
    let tunnel = TunnelProc::follow(&ns, &monitor, &[]).await;
    let _one = Server::start(&ns, "127.0.0.1", first, "first").await;
    tunnel.wait_active(&format!("default:tcp:{first}")).await;
    let admin = tunnel.admin();

    // Strangers first, with plain HTTP.
    let get = |path: &'static str, headers: Vec<(&'static str, String)>| async move {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        common::http_request(admin, "GET", path, &h, b"")
            .await
            .unwrap()
            .status
    };
    assert_eq!(
        get("/", vec![("Host", "evil.example".into())]).await,
        403,
        "DNS rebinding"
    );
    assert_eq!(
        get(
            "/",
            vec![("Host", format!("evil.example:{}", admin.port()))]
        )
        .await,
        403
    );
    assert_eq!(get("/api/events", vec![]).await, 401, "no cookie");
    let (_, url) = run(&tunnel, &["ui"]).await;
    let url = url.trim().to_string();
    let path = url
        .trim_start_matches(&format!("http://{admin}"))
        .to_string();
    let login = common::http_request(admin, "GET", &path, &[], b"")
        .await
        .unwrap();
    assert_eq!(login.status, 303, "{login:?}");
    let cookie = login
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.split(';').next().unwrap().to_string())
        .expect("a cookie");
    let again = common::http_request(admin, "GET", &path, &[], b"")
        .await
        .unwrap();
    assert_eq!(again.status, 401, "a login link works once");
    let close_body = format!(r#"{{"id":"default:tcp:{first}"}}"#);
    let post = |origin: String| {
        let cookie = cookie.clone();
        let body = close_body.clone();
        async move {
            let h = [
                ("Cookie", cookie.as_str()),
                ("Origin", origin.as_str()),
                ("Content-Type", "application/json"),
            ];
            common::http_request(admin, "POST", "/api/close", &h, body.as_bytes())
                .await
                .unwrap()
                .status
        }
    };
    assert_eq!(post("http://evil.example".into()).await, 403, "CSRF");
    assert_eq!(post("null".into()).await, 403);

    // The browser, signed in with a fresh link.
    let browser = common::webdriver::Browser::start(ns.log_dir(), 1280, 800).await;
    let (_, url) = run(&tunnel, &["ui"]).await;
    browser.go(url.trim()).await;
    browser
        .run("window.loadedOnce = performance.timeOrigin; return 1")
        .await;
    let row = |port: u16| format!(r#"tr[data-id="default:tcp:{port}"]"#);
    let link = browser
        .wait_for(
            "the existing tunnel's row",
            &format!(
                r#"const a = document.querySelector('{} a'); return a && a.getAttribute('href')"#,
                row(first)
            ),
        )
        .await;
    assert_eq!(link, format!("http://localhost:{first}"));

    // A port opened in the container: on the page within a second of the
    // admin API having it, without a reload.
    let _two = Server::start(&ns, "127.0.0.1", later, "later").await;
    tunnel.wait_active(&format!("default:tcp:{later}")).await;
    let listed = std::time::Instant::now();
    browser
        .wait_for(
            "the new port's row",
            &format!(
                r#"const r = document.querySelector('{}'); return r && r.dataset.state === "active""#,
                row(later)
            ),
        )
        .await;
    let took = listed.elapsed();
    eprintln!(
        "on the page {} ms after ListTunnels had it",
        took.as_millis()
    );
    assert!(took < std::time::Duration::from_secs(1), "{took:?}");
    let usable = browser
        .run(&format!(
            r#"const c = document.querySelector('{} td:nth-last-child(2)'); return c && c.textContent"#,
            row(later)
        ))
        .await;
    assert!(
        usable.as_str().is_some_and(|u| u.ends_with(" ms")),
        "the page shows how long the port took to be usable: {usable}"
    );
    let same = browser
        .run("return window.loadedOnce === performance.timeOrigin")
        .await;
    assert_eq!(same, serde_json::json!(true), "no reload");

    // Close, clicked: CLOSED in ListTunnels, and on the page.
    browser
        .click(&format!(r#"{} button[data-action="close"]"#, row(later)))
        .await;
    tunnel
        .wait_tunnel(
            &format!("default:tcp:{later}"),
            "closed by the panel",
            |t| t.state == porthole::pb::v1::TunnelState::Closed as i32,
        )
        .await;
    browser
        .wait_for(
            "the closed row",
            &format!(
                r#"const r = document.querySelector('{}'); return r && r.dataset.state === "closed""#,
                row(later)
            ),
        )
        .await;
    // "Tell me when ready" on a port opened by hand before anything
    // listens: forwarded but not ready, then ready once its server answers.
    let third = unused_local_port();
    browser
        .run(&format!(
            "document.getElementById('open-port').value = '{third}'; \
             document.getElementById('ready-port').value = '{third}'; return 1"
        ))
        .await;
    browser.click("#open-form button").await;
    tunnel.wait_active(&format!("default:tcp:{third}")).await;
    browser.click("#ready-form button").await;
    let ready_text = "return document.getElementById('ready').textContent";
    let said = browser
        .wait_for(
            "the page to say it is not ready",
            &format!("const t = (function() {{ {ready_text} }})(); return t.includes('but') && t"),
        )
        .await;
    assert!(said.as_str().unwrap().contains("forwarded, but"), "{said}");
    let _three = Server::start(&ns, "127.0.0.1", third, "third").await;
    let said = browser
        .wait_for(
            "the page to say it is ready",
            &format!(
                "const t = (function() {{ {ready_text} }})(); return t.startsWith('ready:') && t"
            ),
        )
        .await;
    assert_eq!(said, format!("ready: http://localhost:{third}"));
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a screenshot");
    std::fs::write(ns.log_dir().join("panel.png"), png).unwrap();
}
