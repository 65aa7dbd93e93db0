//! A real headless Chromium driven over WebDriver (Debian's `chromium` and
//! `chromium-driver`): the few commands the panel's test needs, over the
//! kit's plain HTTP client.

use crate::{http_request, unused_local_port, which, Proc, DEADLINE, POLL};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

/// A chromedriver with one browser session; both end when it drops.
pub struct Browser {
    driver: Proc,
    addr: SocketAddr,
    session: String,
    _profile: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Where Debian puts the browser and its driver, if both are installed.
pub fn chromium() -> Option<(PathBuf, PathBuf)> {
    let browser = which("chromium")?;
    let driver = which("chromedriver").or_else(|| {
        let p = PathBuf::from("/usr/lib/chromium/chromedriver");
        p.is_file().then_some(p)
    })?;
    Some((browser, driver))
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session (`width` ×
    /// `height` window) whose logs go to `log_dir`.
    pub async fn start(log_dir: &std::path::Path, width: u32, height: u32) -> Browser {
        let (browser, driver) = chromium().expect("chromium and chromium-driver");
        let port = unused_local_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = std::process::Command::new(driver);
        cmd.arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1");
        let driver = Proc::start("chromedriver", cmd, log_dir.join("chromedriver.log"), false);
        let deadline = Instant::now() + DEADLINE;
        while http_request(addr, "GET", "/status", &[], b"")
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "chromedriver did not answer");
            tokio::time::sleep(POLL).await;
        }
        let profile = tempdir::Dir(log_dir.join(format!("chromium-{port}")));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": browser,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-background-networking", "--disable-sync",
                    "--disable-component-update", "--disable-default-apps",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.0.display()),
                ],
            },
        }}});
        let mut b = Browser {
            driver,
            addr,
            session: String::new(),
            _profile: profile,
        };
        let v = b.call("POST", "/session", Some(caps)).await;
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        b
    }

    /// One WebDriver command; its `value`.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let r = http_request(
            self.addr,
            method,
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .await
        .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let v: Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}: {}", r.body));
        assert!(
            r.status == 200,
            "WebDriver {method} {path}: {} {}",
            r.status,
            v["value"]
        );
        v["value"].clone()
    }

    fn at(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub async fn go(&self, url: &str) {
        self.call("POST", &self.at("/url"), Some(json!({ "url": url })))
            .await;
    }

    /// Runs `script` (a function body) in the page; what it returns.
    pub async fn run(&self, script: &str) -> Value {
        let body = json!({ "script": script, "args": [] });
        self.call("POST", &self.at("/execute/sync"), Some(body))
            .await
    }

    /// Clicks the first element matching CSS `selector`, as a user would.
    pub async fn click(&self, selector: &str) {
        let body = json!({ "using": "css selector", "value": selector });
        let found = self.call("POST", &self.at("/element"), Some(body)).await;
        let id = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {selector}: {found}"))
            .to_string();
        self.call(
            "POST",
            &self.at(&format!("/element/{id}/click")),
            Some(json!({})),
        )
        .await;
    }

    /// The page as a PNG.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let v = self.call("GET", &self.at("/screenshot"), None).await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64"))
            .expect("a PNG")
    }

    /// Polls `script` until it returns something truthy, within the
    /// deadline; what it returned.
    pub async fn wait_for(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let v = self.run(script).await;
            let truthy =
                !matches!(v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the browser; the driver goes with its Proc.
        let (addr, path) = (self.addr, self.at(""));
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                let _ = rt.block_on(http_request(addr, "DELETE", &path, &[], b""));
            }
        })
        .join();
        let _ = &self.driver;
    }
}
