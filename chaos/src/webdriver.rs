//! A real browser for the console's tests: Debian's headless Chromium, driven through
//! chromedriver with the W3C WebDriver protocol (JSON over HTTP). The handful of commands the
//! tests use are spoken here over reqwest, already a dependency, rather than through a client
//! crate and its dependency tree.
//!
//! Chromium and chromedriver are required (deploy/dev/setup.sh installs them): a machine
//! without them fails the tests, it does not skip them.

use serde_json::{json, Value};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The W3C element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A running chromedriver. On drop its browsers are closed (a test that panicked never
/// reached [`Browser::close`]; killing chromedriver alone leaves them running), then it is
/// killed.
pub struct Driver {
    child: Child,
    port: u16,
    url: String,
    http: reqwest::Client,
    sessions: Mutex<Vec<String>>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let sessions =
            std::mem::take(&mut *self.sessions.lock().unwrap_or_else(|p| p.into_inner()));
        for id in sessions {
            // Blocking, in drop: a plain HTTP/1.1 DELETE, chromedriver answers once the
            // browser has quit.
            let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", self.port)) else {
                break;
            };
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
            let request = format!(
                "DELETE /session/{id} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            if tcp.write_all(request.as_bytes()).is_ok() {
                let _ = tcp.read_to_end(&mut Vec::new());
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    pub async fn start() -> Self {
        for path in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: run deploy/dev/setup.sh (Debian packages chromium, chromium-driver)"
            );
        }
        let port = crate::free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver = Self {
            child,
            port,
            sessions: Mutex::new(Vec::new()),
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = driver
                .http
                .get(format!("{}/status", driver.url))
                .send()
                .await
            {
                if let Ok(v) = r.json::<Value>().await {
                    if v["value"]["ready"] == json!(true) {
                        return driver;
                    }
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not get ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new headless browser window (1280 px wide). The console's certificate is the node's
    /// generated one, so certificate errors are accepted.
    pub async fn browser(&self) -> Browser {
        let caps = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "acceptInsecureCerts": true,
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                        "--disable-gpu", "--window-size=1280,1000", "--ignore-certificate-errors",
                    ],
                },
            }},
        });
        let v = send(self.http.post(format!("{}/session", self.url)).json(&caps)).await;
        let id = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id.clone());
        Browser {
            http: self.http.clone(),
            base: format!("{}/session/{id}", self.url),
        }
    }
}

async fn send(req: reqwest::RequestBuilder) -> Value {
    try_send(req)
        .await
        .unwrap_or_else(|e| panic!("webdriver error: {e}"))
}

/// The command's value, or WebDriver's error (a page still loading has no elements yet and
/// runs no script).
async fn try_send(req: reqwest::RequestBuilder) -> Result<Value, Value> {
    let res = req.send().await.expect("chromedriver answers");
    let ok = res.status().is_success();
    let v: Value = res.json().await.expect("chromedriver answers JSON");
    if ok {
        Ok(v["value"].clone())
    } else {
        Err(v["value"].clone())
    }
}

/// One browser window.
pub struct Browser {
    http: reqwest::Client,
    base: String,
}

impl Browser {
    async fn post(&self, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.base);
        send(self.http.post(url).json(&body)).await
    }

    async fn get(&self, path: &str) -> Value {
        let url = format!("{}{path}", self.base);
        send(self.http.get(url)).await
    }

    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    pub async fn url(&self) -> String {
        self.get("/url")
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The element `css` selects, waiting up to `timeout` for it to exist.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let url = format!("{}/elements", self.base);
            let body = json!({ "using": "css selector", "value": css });
            let found = try_send(self.http.post(url).json(&body)).await;
            if let Some(e) = found.ok().as_ref().and_then(|f| f.as_array()?.first()) {
                return e[ELEMENT].as_str().expect("an element id").to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no {css} after {timeout:?} on {}",
                self.url().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The element `css` selects once its text is `text` (a page fills some in after it
    /// loads), waiting up to `timeout` for both.
    pub async fn wait_for_text(&self, css: &str, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let element = self.wait_for(css, timeout).await;
        loop {
            let shown = self.text(&element).await;
            if shown == text {
                return element;
            }
            assert!(
                Instant::now() < deadline,
                "{css} shows {shown:?}, not {text:?}, after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn click(&self, element: &str) {
        self.post(&format!("/element/{element}/click"), json!({}))
            .await;
    }

    pub async fn type_into(&self, element: &str, text: &str) {
        self.post(
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    pub async fn text(&self, element: &str) -> String {
        let v = self.get(&format!("/element/{element}/text")).await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page; its return value.
    pub async fn execute(&self, script: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({ "script": script, "args": args }))
            .await
    }

    /// Like [`Self::execute`], but a page in the middle of loading is not an error.
    pub async fn try_execute(&self, script: &str, args: Value) -> Result<Value, Value> {
        let url = format!("{}/execute/sync", self.base);
        try_send(
            self.http
                .post(url)
                .json(&json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Every cookie of the current page, HttpOnly ones included.
    pub async fn cookies(&self) -> Vec<Value> {
        self.get("/cookie")
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Resizes the window (the page then lays out at `width` CSS pixels, less scrollbars).
    pub async fn resize(&self, width: u32, height: u32) {
        self.post("/window/rect", json!({ "width": width, "height": height }))
            .await;
    }

    /// A PNG of the window, written to `path`.
    pub async fn screenshot(&self, path: &Path) {
        use base64::Engine as _;
        let v = self.get("/screenshot").await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64"))
            .expect("a PNG");
        std::fs::write(path, png).expect("screenshot written");
    }

    pub async fn close(self) {
        let _ = self.http.delete(&self.base).send().await;
    }
}

/// Where a test's artefacts go: `$VIGIL_TEST_ARTEFACTS/<test>` (CI), else
/// `<target dir>/test-artefacts/<test>` (the directory above `debug/`).
pub fn artefact_dir(test: &str) -> PathBuf {
    let root = std::env::var_os("VIGIL_TEST_ARTEFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("test executable");
            // target/<profile>/deps/<test>-<hash>
            exe.ancestors()
                .nth(3)
                .expect("the target directory")
                .join("test-artefacts")
        });
    let dir = root.join(test);
    std::fs::create_dir_all(&dir).expect("artefact directory");
    dir
}
