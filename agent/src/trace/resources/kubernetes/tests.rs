//! The index against the recorded API server responses the end-to-end test
//! serves (tests/fixtures/kubernetes).

use k8s_openapi::api::{apps::v1::ReplicaSet, batch::v1::Job, core::v1::Pod};
use kube::core::WatchEvent;
use serde_json::Value;

use super::{
    watch::{Applier, Change},
    *,
};

const PODS: &str = include_str!("../../../../../tests/fixtures/kubernetes/pods.json");
const IDS: &str = include_str!("../../../../../tests/fixtures/kubernetes/container-ids.json");
const RS_CHECKOUT: &str =
    include_str!("../../../../../tests/fixtures/kubernetes/replicaset-checkout-7c9d8f6b5d.json");
const RS_CART: &str =
    include_str!("../../../../../tests/fixtures/kubernetes/replicaset-cart-5f6d7c8b9.json");
const JOB: &str = include_str!("../../../../../tests/fixtures/kubernetes/job-report-28930140.json");
const CART_ADDED: &str =
    include_str!("../../../../../tests/fixtures/kubernetes/watch-cart-added.jsonl");
const CHECKOUT_DELETED: &str =
    include_str!("../../../../../tests/fixtures/kubernetes/watch-checkout-deleted.jsonl");

fn id(name: &str) -> String {
    let ids: Value = serde_json::from_str(IDS).unwrap();
    ids[name].as_str().unwrap().to_owned()
}

fn listed_pods() -> Vec<Pod> {
    let list: Value = serde_json::from_str(PODS).unwrap();
    assert_eq!(list["kind"], "PodList");
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| serde_json::from_value(p.clone()).unwrap())
        .collect()
}

/// What the watch thread's GETs would answer, from the fixtures.
fn parent(pod: &Pod) -> Option<OwnerRef> {
    let c = controller_of(&pod.metadata)?;
    match (c.kind.as_str(), c.name.as_str()) {
        ("ReplicaSet", "checkout-7c9d8f6b5d") => controller_of(
            &serde_json::from_str::<ReplicaSet>(RS_CHECKOUT)
                .unwrap()
                .metadata,
        ),
        ("ReplicaSet", "cart-5f6d7c8b9") => controller_of(
            &serde_json::from_str::<ReplicaSet>(RS_CART)
                .unwrap()
                .metadata,
        ),
        ("Job", "report-28930140") => {
            controller_of(&serde_json::from_str::<Job>(JOB).unwrap().metadata)
        }
        _ => None,
    }
}

fn entry(pod: &Pod) -> PodEntry {
    PodEntry::from_pod(pod, parent(pod).as_ref()).unwrap()
}

/// Watch events as kube decodes them.
fn changes(lines: &str) -> Vec<Change> {
    lines
        .lines()
        .filter_map(
            |line| match serde_json::from_str::<WatchEvent<Pod>>(line).unwrap() {
                WatchEvent::Added(pod) | WatchEvent::Modified(pod) => {
                    Some(Change::Apply(entry(&pod)))
                }
                WatchEvent::Deleted(pod) => Some(Change::Delete(pod.metadata.uid.unwrap())),
                WatchEvent::Bookmark(_) => None,
                WatchEvent::Error(e) => panic!("{e:?}"),
            },
        )
        .collect()
}

fn listed() -> (Metadata, Applier) {
    let metadata = Metadata::new("zt-node-1");
    let mut applier = Applier::default();
    applier.apply(&metadata, Change::Init);
    for pod in listed_pods() {
        applier.apply(&metadata, Change::InitApply(entry(&pod)));
    }
    // Nothing shows before the list is complete.
    assert!(metadata.lookup(&id("checkout"), None).is_none());
    applier.apply(&metadata, Change::InitDone);
    (metadata, applier)
}

fn attrs(c: &ContainerMeta) -> Vec<(&'static str, String)> {
    c.pod.workload.clone()
}

#[test]
fn a_listed_pod_is_found_by_its_container_ids_with_its_workload() {
    let (metadata, _) = listed();
    assert_eq!(metadata.sizes(), (4, 5));

    let checkout = metadata.lookup(&id("checkout"), None).unwrap();
    assert_eq!(checkout.pod.name, "checkout-7c9d8f6b5d-x2k4p");
    assert_eq!(checkout.pod.namespace, "shop");
    assert_eq!(checkout.pod.node_name.as_deref(), Some("zt-node-1"));
    assert_eq!(checkout.pod.app_name.as_deref(), Some("checkout"));
    assert_eq!(checkout.container_name.as_deref(), Some("checkout"));
    assert_eq!(
        attrs(&checkout),
        [
            ("k8s.replicaset.name", "checkout-7c9d8f6b5d".to_owned()),
            ("k8s.deployment.name", "checkout".to_owned()),
        ]
    );
    assert_eq!(checkout.pod.workload_name.as_deref(), Some("checkout"));
    // The init container is the same pod.
    let migrate = metadata.lookup(&id("checkout-migrate"), None).unwrap();
    assert_eq!(migrate.container_name.as_deref(), Some("migrate"));
    assert_eq!(migrate.pod.uid, checkout.pod.uid);

    let pg = metadata.lookup(&id("postgres"), None).unwrap();
    assert_eq!(
        attrs(&pg),
        [("k8s.statefulset.name", "postgres".to_owned())]
    );
    assert_eq!(pg.pod.app_name, None);
    let ne = metadata.lookup(&id("node-exporter"), None).unwrap();
    assert_eq!(
        attrs(&ne),
        [("k8s.daemonset.name", "node-exporter".to_owned())]
    );
    let report = metadata.lookup(&id("report"), None).unwrap();
    assert_eq!(
        attrs(&report),
        [
            ("k8s.job.name", "report-28930140".to_owned()),
            ("k8s.cronjob.name", "report".to_owned()),
        ]
    );
    assert_eq!(report.pod.workload_name.as_deref(), Some("report"));
    assert!(metadata.lookup(&id("cart"), None).is_none());
}

#[test]
fn watch_events_add_and_delete_pods() {
    let (metadata, mut applier) = listed();
    let before = metadata.generation();
    let mut added = changes(CART_ADDED).into_iter();
    // ADDED while its container is still being created: known by pod UID only.
    applier.apply(&metadata, added.next().unwrap());
    assert!(metadata.generation() > before);
    assert!(metadata.lookup(&id("cart"), None).is_none());
    let uid = "a4d309ba-900a-4547-a807-8b402918cdba";
    let pending = metadata.lookup(&id("cart"), Some(uid)).unwrap();
    assert_eq!(pending.pod.name, "cart-5f6d7c8b9-q7w8e");
    assert_eq!(pending.container_name, None);
    // MODIFIED with the running container's id.
    applier.apply(&metadata, added.next().unwrap());
    let cart = metadata.lookup(&id("cart"), None).unwrap();
    assert_eq!(cart.container_name.as_deref(), Some("cart"));
    assert_eq!(cart.pod.app_name, None);
    assert_eq!(cart.pod.workload_name.as_deref(), Some("cart"));

    for change in changes(CHECKOUT_DELETED) {
        applier.apply(&metadata, change);
    }
    assert!(metadata.lookup(&id("checkout"), None).is_none());
    assert!(metadata.lookup(&id("checkout-migrate"), None).is_none());
    assert_eq!(metadata.sizes(), (4, 4));
}

#[test]
fn a_relist_replaces_the_index() {
    let (metadata, mut applier) = listed();
    for change in changes(CART_ADDED) {
        applier.apply(&metadata, change);
    }
    // The watch broke (410 Gone) and the new list only has postgres.
    applier.apply(&metadata, Change::Init);
    let pg = listed_pods()
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some("postgres-0"))
        .unwrap();
    applier.apply(&metadata, Change::InitApply(entry(&pg)));
    // Until the list completes, the old index answers.
    assert!(metadata.lookup(&id("cart"), None).is_some());
    applier.apply(&metadata, Change::InitDone);
    assert!(metadata.lookup(&id("cart"), None).is_none());
    assert!(metadata.lookup(&id("postgres"), None).is_some());
    assert_eq!(metadata.sizes(), (1, 1));
}

#[test]
fn the_index_is_bounded() {
    let mut index = PodIndex::default();
    let pod = &listed_pods()[0];
    for i in 0..MAX_PODS + 10 {
        let mut e = entry(pod);
        let mut meta = (*e.meta).clone();
        meta.uid = format!("uid-{i}");
        e.meta = Arc::new(meta);
        e.containers = vec![(format!("{i:064x}"), "c".into())];
        index.upsert(e);
    }
    assert_eq!(index.pods(), MAX_PODS);
    assert_eq!(index.containers(), MAX_PODS);
}

#[test]
fn runtime_schemes_are_stripped() {
    let hex = id("cart");
    for scheme in ["containerd://", "cri-o://", "docker://", ""] {
        assert_eq!(strip_runtime(&format!("{scheme}{hex}")), Some(hex.clone()));
    }
    assert_eq!(strip_runtime("containerd://"), None);
}

#[test]
fn owners_without_a_known_parent() {
    let rs = OwnerRef {
        kind: "ReplicaSet".into(),
        name: "web-abc".into(),
    };
    // The ReplicaSet could not be read: it alone names the workload.
    assert_eq!(
        workload(Some(&rs), None),
        (
            vec![("k8s.replicaset.name", "web-abc".into())],
            Some("web-abc".into())
        )
    );
    let other = OwnerRef {
        kind: "Node".into(),
        name: "zt-node-1".into(),
    };
    assert_eq!(workload(Some(&other), None), (Vec::new(), None));
    assert_eq!(workload(None, None), (Vec::new(), None));
}
