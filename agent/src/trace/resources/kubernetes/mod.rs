//! Kubernetes metadata for container processes: an index of this node's
//! pods by container id, kept current by a watch on the API server
//! ([`watch`]), read by the tracer without ever waiting on the network.
//!
//! The index is shared as `Arc<RwLock<…>>`: the watch thread writes it
//! briefly after each event (never across a request), the tracer reads it
//! when it builds a process's resource. A generation counter tells the
//! tracer that the index learned something since it last looked.

pub mod watch;

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use k8s_openapi::api::core::v1::Pod;

/// Most pods indexed (kubelets run at most a few hundred per node).
pub const MAX_PODS: usize = 4096;

/// Label that names a pod's application (Kubernetes recommended labels).
pub const APP_NAME_LABEL: &str = "app.kubernetes.io/name";

/// What a pod contributes to the resources of its processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub node_name: Option<String>,
    /// The `app.kubernetes.io/name` label.
    pub app_name: Option<String>,
    /// Workload attributes, e.g. (`k8s.replicaset.name`, …), (`k8s.deployment.name`, …).
    pub workload: Vec<(&'static str, String)>,
    /// The outermost workload's name (Deployment, StatefulSet, DaemonSet,
    /// CronJob, Job, ReplicaSet).
    pub workload_name: Option<String>,
}

/// A container of an indexed pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerMeta {
    pub pod: Arc<PodMeta>,
    /// `None` when the pod is known (by UID) but not yet this container.
    pub container_name: Option<String>,
}

/// A workload object a pod's controller reference (or that object's own
/// controller reference) points at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OwnerRef {
    pub kind: String,
    pub name: String,
}

/// The controller of a Kubernetes object, from its ownerReferences.
pub fn controller_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<OwnerRef> {
    meta.owner_references
        .as_deref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| OwnerRef {
            kind: o.kind.clone(),
            name: o.name.clone(),
        })
}

/// Workload attributes from a pod's controller and that controller's own
/// controller (`parent`, looked up for ReplicaSets and Jobs).
pub fn workload(
    controller: Option<&OwnerRef>,
    parent: Option<&OwnerRef>,
) -> (Vec<(&'static str, String)>, Option<String>) {
    let Some(c) = controller else {
        return (Vec::new(), None);
    };
    let own_key = match c.kind.as_str() {
        "ReplicaSet" => "k8s.replicaset.name",
        "StatefulSet" => "k8s.statefulset.name",
        "DaemonSet" => "k8s.daemonset.name",
        "Job" => "k8s.job.name",
        _ => return (Vec::new(), None),
    };
    let mut attrs = vec![(own_key, c.name.clone())];
    let mut top = c.name.clone();
    let parent_key = match (c.kind.as_str(), parent.map(|p| p.kind.as_str())) {
        ("ReplicaSet", Some("Deployment")) => Some("k8s.deployment.name"),
        ("Job", Some("CronJob")) => Some("k8s.cronjob.name"),
        _ => None,
    };
    if let (Some(key), Some(p)) = (parent_key, parent) {
        attrs.push((key, p.name.clone()));
        top = p.name.clone();
    }
    (attrs, Some(top))
}

/// A pod as indexed: its metadata and its containers' (id, name).
#[derive(Debug, Clone)]
pub struct PodEntry {
    pub meta: Arc<PodMeta>,
    pub containers: Vec<(String, String)>,
}

impl PodEntry {
    /// `parent` is the controller's controller (see [`workload`]).
    pub fn from_pod(pod: &Pod, parent: Option<&OwnerRef>) -> Option<Self> {
        let m = &pod.metadata;
        let controller = controller_of(m);
        let (workload, workload_name) = workload(controller.as_ref(), parent);
        let meta = PodMeta {
            name: m.name.clone()?,
            namespace: m.namespace.clone().unwrap_or_else(|| "default".into()),
            uid: m.uid.clone()?,
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            app_name: m
                .labels
                .as_ref()
                .and_then(|l| l.get(APP_NAME_LABEL))
                .filter(|v| !v.is_empty())
                .cloned(),
            workload,
            workload_name,
        };
        let status = pod.status.as_ref();
        let containers = status
            .into_iter()
            .flat_map(|s| {
                let all = [
                    &s.container_statuses,
                    &s.init_container_statuses,
                    &s.ephemeral_container_statuses,
                ];
                all.into_iter().flatten().flatten()
            })
            .filter_map(|c| Some((strip_runtime(c.container_id.as_deref()?)?, c.name.clone())))
            .collect();
        Some(Self {
            meta: Arc::new(meta),
            containers,
        })
    }
}

/// `containerd://<id>`, `cri-o://<id>`, `docker://<id>` → `<id>`.
pub fn strip_runtime(container_id: &str) -> Option<String> {
    let id = container_id
        .split_once("://")
        .map_or(container_id, |(_, id)| id);
    (!id.is_empty()).then(|| id.to_ascii_lowercase())
}

/// This node's pods by UID and by container id.
#[derive(Debug, Default)]
pub struct PodIndex {
    pods: HashMap<String, PodEntry>,
    containers: HashMap<String, (Arc<PodMeta>, String)>,
}

impl PodIndex {
    /// Adds or replaces a pod (by UID). Beyond [`MAX_PODS`], new pods are
    /// not indexed; returns whether it was.
    pub fn upsert(&mut self, entry: PodEntry) -> bool {
        let uid = entry.meta.uid.clone();
        if !self.pods.contains_key(&uid) && self.pods.len() >= MAX_PODS {
            return false;
        }
        self.remove(&uid);
        for (id, name) in &entry.containers {
            self.containers
                .insert(id.clone(), (Arc::clone(&entry.meta), name.clone()));
        }
        self.pods.insert(uid, entry);
        true
    }

    /// Forgets a pod and its containers.
    pub fn remove(&mut self, uid: &str) {
        if let Some(old) = self.pods.remove(uid) {
            for (id, _) in &old.containers {
                // Only if no newer pod claimed the id.
                if self.containers.get(id).is_some_and(|(p, _)| p.uid == uid) {
                    self.containers.remove(id);
                }
            }
        }
    }

    /// Replaces everything (a completed list).
    pub fn replace_all(&mut self, entries: Vec<PodEntry>) {
        *self = Self::default();
        for entry in entries {
            self.upsert(entry);
        }
    }

    pub fn pods(&self) -> usize {
        self.pods.len()
    }

    pub fn containers(&self) -> usize {
        self.containers.len()
    }

    /// The container with this runtime id, else (pod known, container not
    /// yet in its status) the pod with this UID.
    pub fn lookup(&self, container_id: &str, pod_uid: Option<&str>) -> Option<ContainerMeta> {
        if let Some((pod, name)) = self.containers.get(container_id) {
            return Some(ContainerMeta {
                pod: Arc::clone(pod),
                container_name: Some(name.clone()),
            });
        }
        let entry = self.pods.get(pod_uid?)?;
        Some(ContainerMeta {
            pod: Arc::clone(&entry.meta),
            container_name: None,
        })
    }
}

/// The index as shared between the watch thread and the tracer.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    index: Arc<RwLock<PodIndex>>,
    generation: Arc<AtomicU64>,
    node_name: Arc<str>,
}

impl Metadata {
    pub fn new(node_name: &str) -> Self {
        Self {
            node_name: node_name.into(),
            ..Self::default()
        }
    }

    /// The node this agent runs on (its pods are the ones indexed).
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Changes whenever the index changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn lookup(&self, container_id: &str, pod_uid: Option<&str>) -> Option<ContainerMeta> {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        index.lookup(container_id, pod_uid)
    }

    /// Changes the index (briefly: no I/O in `f`) and bumps the generation.
    pub fn update<T>(&self, f: impl FnOnce(&mut PodIndex) -> T) -> T {
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        let out = f(&mut index);
        self.generation.fetch_add(1, Ordering::AcqRel);
        out
    }

    /// (pods, containers) indexed.
    pub fn sizes(&self) -> (usize, usize) {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        (index.pods(), index.containers())
    }
}

#[cfg(test)]
mod tests;
