//! A Kubernetes API server stand-in: serves recorded API JSON
//! (tests/fixtures/kubernetes) over plain HTTP/1.1 the way kube-apiserver
//! does, streams watch events the test pushes, and records every request
//! so a test can check what the agent asked for (its RBAC needs).
//!
//! - `GET /api/v1/pods?fieldSelector=spec.nodeName=NODE&limit=…`: the PodList
//!   (empty for another node);
//! - `GET /api/v1/pods?watch=true&resourceVersion=RV&…`: a chunked stream,
//!   one JSON event per line, of the pushed events newer than RV;
//! - `GET /apis/apps/v1/namespaces/NS/replicasets/NAME`,
//!   `GET /apis/batch/v1/namespaces/NS/jobs/NAME`: the fixture, if any;
//! - anything else: a 404 `Status`, as the API server answers.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context as TaskContext, Poll},
    thread,
    time::Duration,
};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame, header};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

/// The recorded fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/kubernetes")
}

/// A fixture file, parsed.
pub fn fixture(name: &str) -> Value {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One request the stand-in answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Percent-decoded query parameters.
    pub query: BTreeMap<String, String>,
    pub authorization: Option<String>,
}

impl Seen {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str)
    }

    pub fn is_watch(&self) -> bool {
        self.param("watch") == Some("true")
    }
}

#[derive(Default)]
struct State {
    seen: Vec<Seen>,
    /// Watch events pushed so far: (resourceVersion, line).
    events: Vec<(u64, String)>,
}

pub struct KubeApi {
    port: u16,
    node: String,
    state: Arc<Mutex<State>>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl KubeApi {
    /// Serves the fixtures for the pods of `node` on 127.0.0.1:0.
    pub fn start(node: &str) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(Mutex::new(State::default()));
        let (shutdown, mut stop) = oneshot::channel::<()>();
        let (shared, node_name) = (Arc::clone(&state), node.to_owned());
        let thread = thread::Builder::new()
            .name(format!("kube-api-{port}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("kube-api runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("kube-api listener");
                    loop {
                        let stream = tokio::select! {
                            _ = &mut stop => break,
                            accepted = listener.accept() => match accepted {
                                Ok((stream, _)) => stream,
                                Err(_) => continue,
                            },
                        };
                        let (state, node) = (Arc::clone(&shared), node_name.clone());
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |req| {
                                let (state, node) = (Arc::clone(&state), node.clone());
                                async move { Ok::<_, Infallible>(handle(req, &state, &node)) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        });
                    }
                });
            })
            .context("spawning the kube-api stand-in")?;
        Ok(Self {
            port,
            node: node.to_owned(),
            state,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Writes a kubeconfig for this server into `dir`; returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig.yaml");
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: zt-test\n  cluster:\n    server: {url}\n\
             contexts:\n\
             - name: zt-test\n  context:\n    cluster: zt-test\n    user: zerotrace\n\
             current-context: zt-test\n\
             users:\n\
             - name: zerotrace\n  user:\n    token: zt-test-token\n",
            url = self.url()
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Appends watch events (one JSON per line, as recorded); open watches
    /// stream them at once.
    pub fn push_events(&self, jsonl: &str) {
        let mut state = self.state.lock().unwrap();
        for line in jsonl.lines().filter(|l| !l.trim().is_empty()) {
            let event: Value = serde_json::from_str(line).expect("a watch event per line");
            let rv = event["object"]["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            state.events.push((rv, line.to_owned()));
        }
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Waits until a request matching `pred` came in.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Seen) -> bool) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.requests().iter().any(&pred) {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn node(&self) -> &str {
        &self.node
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn handle(
    req: Request<hyper::body::Incoming>,
    state: &Arc<Mutex<State>>,
    node: &str,
) -> Response<Body> {
    let seen = Seen {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().map(parse_query).unwrap_or_default(),
        authorization: req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    state.lock().unwrap().seen.push(seen.clone());
    if seen.method != "GET" {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "only GET here",
            None,
        );
    }
    let parts: Vec<&str> = seen.path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "pods"] if seen.is_watch() => watch(&seen, state),
        ["api", "v1", "pods"] => {
            let mut list = fixture("pods.json");
            let mine = seen.param("fieldSelector") == Some(&format!("spec.nodeName={node}"));
            if !mine {
                list["items"] = json!([]);
            }
            ok(&list)
        }
        ["apis", "apps", "v1", "namespaces", _ns, "replicasets", name] => get_fixture(
            &format!("replicaset-{name}.json"),
            "replicasets",
            "apps",
            name,
        ),
        ["apis", "batch", "v1", "namespaces", _ns, "jobs", name] => {
            get_fixture(&format!("job-{name}.json"), "jobs", "batch", name)
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
            None,
        ),
    }
}

fn get_fixture(file: &str, kind: &str, group: &str, name: &str) -> Response<Body> {
    if fixtures().join(file).exists() {
        ok(&fixture(file))
    } else {
        let message = format!("{kind}.{group} \"{name}\" not found");
        status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &message,
            Some((name, group, kind)),
        )
    }
}

fn ok(body: &Value) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("static response parts")
}

/// A `Status` object, as kube-apiserver sends with errors.
fn status(
    code: StatusCode,
    reason: &str,
    message: &str,
    details: Option<(&str, &str, &str)>,
) -> Response<Body> {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    if let Some((name, group, kind)) = details {
        body["details"] = json!({"name": name, "group": group, "kind": kind});
    }
    let mut response = ok(&body);
    *response.status_mut() = code;
    response
}

/// A watch: every pushed event newer than the requested resourceVersion,
/// now and as they are pushed, until the client goes away.
fn watch(seen: &Seen, state: &Arc<Mutex<State>>) -> Response<Body> {
    let since: u64 = seen
        .param("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let state = Arc::clone(state);
    tokio::spawn(async move {
        let mut sent = 0;
        loop {
            let lines: Vec<String> = {
                let state = state.lock().unwrap();
                let new = state.events[sent..]
                    .iter()
                    .filter(|(rv, _)| *rv == 0 || *rv > since)
                    .map(|(_, line)| format!("{line}\n"))
                    .collect();
                sent = state.events.len();
                new
            };
            for line in lines {
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Streamed(rx).boxed())
        .expect("static response parts")
}

/// A chunked body fed by a channel.
struct Streamed(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Streamed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    // kube's URLs start `?&…`: skip empty pairs.
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                None => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_decoded() {
        let q = parse_query("fieldSelector=spec.nodeName%3Dzt-node-1&watch=true&x=a+b&bad=%zz");
        assert_eq!(q["fieldSelector"], "spec.nodeName=zt-node-1");
        assert_eq!(q["watch"], "true");
        assert_eq!(q["x"], "a b");
        assert_eq!(q["bad"], "%zz");
    }
}
