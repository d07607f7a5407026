//! The watch thread: a kube-runtime watcher on this node's pods
//! (`fieldSelector=spec.nodeName=<node>`) on a single-threaded tokio
//! runtime, feeding the [`Metadata`] index. Owner look-ups (ReplicaSet →
//! Deployment, Job → CronJob) are GETs made on demand and cached, so the
//! agent needs exactly: pods [list, watch], apps replicasets [get],
//! batch jobs [get].
//!
//! Errors are logged and retried with kube-runtime's default backoff; the
//! tracer keeps tracing without metadata meanwhile.

use std::{collections::HashMap, path::PathBuf, sync::mpsc, thread, time::Duration};

use anyhow::Context;
use futures_util::StreamExt;
use k8s_openapi::api::{apps::v1::ReplicaSet, batch::v1::Job, core::v1::Pod};
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};

use super::{Metadata, OwnerRef, PodEntry, controller_of};

/// How the agent reaches the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAccess {
    /// The pod's service account (KUBERNETES_SERVICE_HOST/PORT and
    /// /var/run/secrets/kubernetes.io/serviceaccount).
    InCluster,
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
}

impl ApiAccess {
    pub fn describe(&self) -> String {
        match self {
            Self::InCluster => "the in-cluster service account".to_owned(),
            Self::Kubeconfig(path) => format!("kubeconfig {}", path.display()),
        }
    }
}

/// Most owner look-ups remembered.
const MAX_OWNERS: usize = 1024;
/// A look-up taking longer is given up (and retried with the next pod event).
const GET_TIMEOUT: Duration = Duration::from_secs(5);

/// A change to the index, from one watcher event.
#[derive(Debug)]
pub enum Change {
    /// A (re-)list begins.
    Init,
    InitApply(PodEntry),
    /// The list is complete: it replaces the index.
    InitDone,
    Apply(PodEntry),
    /// A pod, by UID, was deleted.
    Delete(String),
}

/// Applies [`Change`]s, buffering a re-list until it is complete so the
/// index never shows half a list.
#[derive(Debug, Default)]
pub struct Applier {
    listing: Option<Vec<PodEntry>>,
    pub listed_once: bool,
}

impl Applier {
    pub fn apply(&mut self, metadata: &Metadata, change: Change) {
        match change {
            Change::Init => self.listing = Some(Vec::new()),
            Change::InitApply(entry) => match &mut self.listing {
                Some(list) if list.len() < super::MAX_PODS => list.push(entry),
                Some(_) => {}
                None => {
                    metadata.update(|i| i.upsert(entry));
                }
            },
            Change::InitDone => {
                let list = self.listing.take().unwrap_or_default();
                metadata.update(|i| i.replace_all(list));
                self.listed_once = true;
            }
            Change::Apply(entry) => {
                let indexed = metadata.update(|i| i.upsert(entry));
                if !indexed {
                    log::warn!(
                        "kubernetes: more than {} pods, not indexed",
                        super::MAX_PODS
                    );
                }
            }
            Change::Delete(uid) => metadata.update(|i| i.remove(&uid)),
        }
    }
}

/// The running watch; stops (and joins its thread) when dropped.
pub struct Watch {
    metadata: Metadata,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Watch {
    /// Builds the client (reading the kubeconfig or the service account:
    /// no network yet) and starts watching. A client that cannot be built
    /// is an error; an API server that does not answer is not.
    pub fn start(access: &ApiAccess, node_name: &str) -> anyhow::Result<Self> {
        let metadata = Metadata::new(node_name);
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (access, shared) = (access.clone(), metadata.clone());
        let thread = thread::Builder::new()
            .name("zerotrace-k8s".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let client = match client(&access).await {
                        Ok(client) => {
                            let _ = ready_tx.send(Ok(()));
                            client
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    tokio::select! {
                        _ = stopped => {}
                        () = watch_pods(client, shared) => {}
                    }
                });
            })
            .context("spawning the kubernetes watch thread")?;
        let ready = ready_rx
            .recv_timeout(Duration::from_secs(30))
            .context("kubernetes client did not start")?;
        let watch = Self {
            metadata,
            stop: Some(stop),
            thread: Some(thread),
        };
        ready?;
        Ok(watch)
    }

    pub fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn client(access: &ApiAccess) -> anyhow::Result<Client> {
    let config = match access {
        ApiAccess::InCluster => {
            kube::Config::incluster().context("in-cluster Kubernetes configuration")?
        }
        ApiAccess::Kubeconfig(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// Watches this node's pods until the stream ends (it does not: the
/// watcher re-lists and re-watches after errors, with backoff).
async fn watch_pods(client: Client, metadata: Metadata) {
    let node = metadata.node_name().to_owned();
    let pods: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(pods, config).default_backoff().boxed();
    let mut owners = Owners::new(client);
    let mut applier = Applier::default();
    while let Some(event) = events.next().await {
        let change = match event {
            Ok(watcher::Event::Init) => Change::Init,
            Ok(watcher::Event::InitDone) => Change::InitDone,
            Ok(watcher::Event::InitApply(pod)) => match owners.entry(&pod).await {
                Some(entry) => Change::InitApply(entry),
                None => continue,
            },
            Ok(watcher::Event::Apply(pod)) => match owners.entry(&pod).await {
                Some(entry) => Change::Apply(entry),
                None => continue,
            },
            Ok(watcher::Event::Delete(pod)) => match pod.metadata.uid {
                Some(uid) => Change::Delete(uid),
                None => continue,
            },
            Err(e) => {
                log::warn!("kubernetes: watching pods on node {node}: {e} (retrying)");
                continue;
            }
        };
        let done = matches!(change, Change::InitDone);
        applier.apply(&metadata, change);
        if done {
            let (pods, containers) = metadata.sizes();
            log::info!("kubernetes: {pods} pods, {containers} containers on node {node}");
        }
    }
}

/// Owner look-ups, cached: (kind, namespace, name) → that object's controller.
struct Owners {
    client: Client,
    cache: HashMap<(String, String, String), Option<OwnerRef>>,
}

impl Owners {
    fn new(client: Client) -> Self {
        Self {
            client,
            cache: HashMap::new(),
        }
    }

    /// The index entry of a pod, with its workload resolved as far as the
    /// API server answers.
    async fn entry(&mut self, pod: &Pod) -> Option<PodEntry> {
        let parent = match controller_of(&pod.metadata) {
            Some(c) => {
                let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
                self.parent(ns, &c).await.or_else(|| guess_parent(pod, &c))
            }
            None => None,
        };
        PodEntry::from_pod(pod, parent.as_ref())
    }

    /// The controller of a ReplicaSet or Job (Deployment, CronJob).
    async fn parent(&mut self, ns: &str, owner: &OwnerRef) -> Option<OwnerRef> {
        if owner.kind != "ReplicaSet" && owner.kind != "Job" {
            return None;
        }
        let key = (owner.kind.clone(), ns.to_owned(), owner.name.clone());
        if let Some(cached) = self.cache.get(&key) {
            return cached.clone();
        }
        let got = if owner.kind == "ReplicaSet" {
            let api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), ns);
            tokio::time::timeout(GET_TIMEOUT, api.get_opt(&owner.name))
                .await
                .map(|r| r.map(|rs| rs.map(|rs| controller_of(&rs.metadata))))
        } else {
            let api: Api<Job> = Api::namespaced(self.client.clone(), ns);
            tokio::time::timeout(GET_TIMEOUT, api.get_opt(&owner.name))
                .await
                .map(|r| r.map(|job| job.map(|job| controller_of(&job.metadata))))
        };
        match got {
            // Found (with or without a controller), or gone (404): remember.
            Ok(Ok(found)) => {
                let parent = found.flatten();
                if self.cache.len() >= MAX_OWNERS {
                    self.cache.clear();
                }
                self.cache.insert(key, parent.clone());
                parent
            }
            Ok(Err(e)) => {
                log::warn!(
                    "kubernetes: getting {} {ns}/{}: {e}",
                    owner.kind,
                    owner.name
                );
                None
            }
            Err(_) => {
                log::warn!(
                    "kubernetes: getting {} {ns}/{}: timed out",
                    owner.kind,
                    owner.name
                );
                None
            }
        }
    }
}

/// Without an answer for a ReplicaSet: a Deployment's ReplicaSets are
/// named `<deployment>-<pod-template-hash>`, and the pod carries the hash.
fn guess_parent(pod: &Pod, owner: &OwnerRef) -> Option<OwnerRef> {
    if owner.kind != "ReplicaSet" {
        return None;
    }
    let hash = pod.metadata.labels.as_ref()?.get("pod-template-hash")?;
    let name = owner.name.strip_suffix(hash.as_str())?.strip_suffix('-')?;
    (!name.is_empty()).then(|| OwnerRef {
        kind: "Deployment".into(),
        name: name.to_owned(),
    })
}
