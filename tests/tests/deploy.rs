//! The deployment files, checked with real tools: every Kubernetes manifest
//! (and the privileged overlay, rendered) against the Kubernetes OpenAPI
//! schemas in strict mode (`kubernetes-validate` from the test venv), the
//! systemd unit with `systemd-analyze verify` and `security --offline`, and
//! what a user would check by eye: the capability set is the same in the
//! DaemonSet and the unit, the probes hit the port the config listens on,
//! the RBAC is exactly what Kubernetes metadata needs. Needs no root.

use std::{
    collections::BTreeSet,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};
use zerotrace_tests::{agent_bin, otlp::otel_python};

/// The newest Kubernetes release the validator knows, and an older one
/// still common in managed clusters.
const KUBERNETES_VERSIONS: [&str; 2] = ["latest", "1.30"];

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Runs the venv's python with `script`, `args` and `stdin`; returns
/// (success, stdout + stderr).
fn python(script: &str, args: &[&str], stdin: &str) -> (bool, String) {
    let python = otel_python().expect("the test venv (cargo xtask setup)");
    let mut child = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the venv's python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("No module named"),
        "the test venv lacks a module: run `cargo xtask setup`\n{text}"
    );
    (out.status.success(), text)
}

/// Every YAML document of a file (PyYAML, as kubectl would read it), as JSON.
fn load(path: &Path) -> Vec<Value> {
    const YAML_TO_JSON: &str = "import json, sys, yaml\n\
        docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]\n\
        json.dump(docs, sys.stdout)";
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    load_str(YAML_TO_JSON, &text, &path.display().to_string())
}

fn load_str(script: &str, text: &str, what: &str) -> Vec<Value> {
    let (ok, out) = python(script, &[], text);
    assert!(ok, "{what} is not valid YAML: {out}");
    serde_json::from_str(&out).unwrap()
}

/// Parses one YAML string (the agent config inside the ConfigMap).
fn load_yaml(text: &str, what: &str) -> Value {
    const ONE: &str = "import json, sys, yaml\njson.dump([yaml.safe_load(sys.stdin)], sys.stdout)";
    load_str(ONE, text, what).remove(0)
}

/// A kustomization's resources, with its strategic-merge patches applied: the
/// part of `kubectl kustomize` these manifests use (namespace, labels and
/// images transformers left out; they cannot make a valid manifest invalid).
/// Fails when a listed file is missing.
fn render(dir: &Path) -> Vec<Value> {
    let kfile = dir.join("kustomization.yaml");
    let k = load(&kfile).remove(0);
    assert_eq!(k["kind"], "Kustomization", "{}", kfile.display());
    let mut docs = Vec::new();
    for res in k["resources"].as_array().expect("resources") {
        let path = dir.join(res.as_str().unwrap());
        assert!(
            path.exists(),
            "{} lists {} which does not exist",
            kfile.display(),
            path.display()
        );
        if path.is_dir() {
            docs.extend(render(&path));
        } else {
            docs.extend(load(&path));
        }
    }
    for patch in k["patches"].as_array().into_iter().flatten() {
        let path = dir.join(patch["path"].as_str().expect("patch path"));
        let patch_doc = load(&path).remove(0);
        let kind = patch["target"]["kind"].as_str().unwrap_or_else(|| {
            patch_doc["kind"]
                .as_str()
                .expect("a patch names its target kind")
        });
        let name = patch["target"]["name"]
            .as_str()
            .unwrap_or_else(|| patch_doc["metadata"]["name"].as_str().unwrap());
        let mut hits = 0;
        for doc in docs
            .iter_mut()
            .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        {
            strategic_merge(doc, &patch_doc);
            hits += 1;
        }
        assert_eq!(hits, 1, "{} patches one {kind}/{name}", path.display());
    }
    docs
}

/// Strategic merge as Kubernetes does it for these fields: maps merge,
/// null deletes, lists of named objects (containers, volumes) merge by name,
/// other lists are replaced.
fn strategic_merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else if let Some(old) = b.get_mut(k) {
                    strategic_merge(old, v);
                } else {
                    b.insert(k.clone(), v.clone());
                }
            }
        }
        (Value::Array(b), Value::Array(p))
            if p.iter().chain(b.iter()).all(|v| v["name"].is_string()) =>
        {
            for item in p {
                match b.iter_mut().find(|x| x["name"] == item["name"]) {
                    Some(old) => strategic_merge(old, item),
                    None => b.push(item.clone()),
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// Validates documents with kubernetes-validate in strict mode (unknown
/// fields are errors) against one Kubernetes version; (all valid, report).
fn validate(docs: &[Value], version: &str) -> (bool, String) {
    const VALIDATE: &str = r#"
import json, sys
import kubernetes_validate
from kubernetes_validate import utils
version = sys.argv[1]
if version == "latest":
    version = utils.latest_version()
print(f"kubernetes-validate {kubernetes_validate.__version__}, Kubernetes {version}, strict")
bad = 0
for doc in json.load(sys.stdin):
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    try:
        checked = utils.validate(doc, version, strict=True)
        print(f"  valid {name} (schema {checked})")
    except Exception as e:
        bad += 1
        # jsonschema's message and where; not the whole schema it prints.
        where = ".".join(str(p) for p in getattr(e, "absolute_path", []))
        message = getattr(e, "message", None) or str(e)
        print(f"  INVALID {name} at {where or '(top)'}: {type(e).__name__}: {message}")
sys.exit(1 if bad else 0)
"#;
    python(VALIDATE, &[version], &serde_json::to_string(docs).unwrap())
}

fn base() -> Vec<Value> {
    render(&deploy().join("kubernetes/base"))
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<_> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

fn container(daemonset: &Value) -> &Value {
    let containers = daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

/// `KEY=...` of the systemd unit (one line), split into words.
fn unit_words(unit: &str, key: &str) -> Vec<String> {
    let lines: Vec<_> = unit
        .lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect();
    assert_eq!(lines.len(), 1, "one {key}= line in the unit");
    lines[0].split_whitespace().map(str::to_owned).collect()
}

fn unit() -> String {
    std::fs::read_to_string(deploy().join("systemd/zerotrace.service")).unwrap()
}

#[test]
fn kubernetes_manifests_are_valid_in_strict_mode() {
    let dir = deploy().join("kubernetes");
    let docs = base();
    let kinds: BTreeSet<_> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "Namespace",
            "ServiceAccount"
        ])
    );
    // `kubectl apply -k deploy/kubernetes` is the base, unchanged.
    assert_eq!(render(&dir), docs);
    for version in KUBERNETES_VERSIONS {
        let (ok, report) = validate(&docs, version);
        println!("{report}");
        assert!(ok, "deploy/kubernetes:\n{report}");
    }
}

#[test]
fn privileged_overlay_renders_and_validates() {
    let docs = render(&deploy().join("kubernetes/privileged"));
    assert_eq!(docs.len(), base().len());
    let ds = one(&docs, "DaemonSet");
    let sc = &container(ds)["securityContext"];
    assert_eq!(sc["privileged"], true, "{sc}");
    // The API server rejects privileged with allowPrivilegeEscalation false.
    assert_eq!(sc["allowPrivilegeEscalation"], true, "{sc}");
    assert!(sc.get("capabilities").is_none(), "{sc}");
    assert_eq!(sc["seccompProfile"]["type"], "Unconfined", "{sc}");
    assert_eq!(ds["spec"]["template"]["spec"]["hostPID"], true);
    // Nothing but the security context differs from the base.
    let mut unpatched = ds.clone();
    unpatched["spec"]["template"]["spec"]["containers"][0]["securityContext"] =
        container(one(&base(), "DaemonSet"))["securityContext"].clone();
    assert_eq!(&unpatched, one(&base(), "DaemonSet"));
    for version in KUBERNETES_VERSIONS {
        let (ok, report) = validate(&docs, version);
        println!("{report}");
        assert!(ok, "deploy/kubernetes/privileged:\n{report}");
    }
}

#[test]
fn validator_rejects_broken_manifests() {
    let docs = base();
    let ds = one(&docs, "DaemonSet");
    let mut unknown = ds.clone();
    unknown["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilitiez"] =
        json!({"add": ["BPF"]});
    let mut wrong_type = ds.clone();
    wrong_type["spec"]["template"]["spec"]["hostPID"] = json!("yes");
    let mut missing = ds.clone();
    missing["spec"].as_object_mut().unwrap().remove("selector");
    for (what, doc, needle) in [
        ("unknown field", unknown, "capabilitiez"),
        ("wrong type", wrong_type, "yes"),
        ("missing required field", missing, "selector"),
    ] {
        let (ok, report) = validate(&[doc], "latest");
        println!("{what}: {report}");
        assert!(!ok, "the validator accepted a DaemonSet with a {what}");
        assert!(report.contains("INVALID DaemonSet/zerotrace"), "{report}");
        assert!(report.contains(needle), "{what}: {report}");
    }
}

#[test]
fn daemonset_matches_the_unit_and_the_config() {
    let docs = base();
    let ds = one(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let c = container(ds);
    let sc = &c["securityContext"];

    // The same four capabilities as the systemd unit, nothing else.
    let k8s: BTreeSet<String> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("CAP_{}", c.as_str().unwrap()))
        .collect();
    let unit = unit();
    let bounding: BTreeSet<String> = unit_words(&unit, "CapabilityBoundingSet")
        .into_iter()
        .collect();
    let ambient: BTreeSet<String> = unit_words(&unit, "AmbientCapabilities")
        .into_iter()
        .collect();
    assert_eq!(
        k8s, bounding,
        "DaemonSet capabilities vs the unit's bounding set"
    );
    assert_eq!(ambient, bounding);
    assert_eq!(
        bounding,
        BTreeSet::from(
            [
                "CAP_BPF",
                "CAP_PERFMON",
                "CAP_SYS_PTRACE",
                "CAP_DAC_READ_SEARCH"
            ]
            .map(String::from)
        )
    );
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["runAsUser"], 0, "added capabilities reach uid 0 only");
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(pod["hostPID"], true);
    assert!(pod.get("hostNetwork").is_none(), "no host network needed");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["automountServiceAccountToken"], true);
    assert_eq!(
        pod["serviceAccountName"],
        one(&docs, "ServiceAccount")["metadata"]["name"]
    );
    assert_eq!(
        c["image"],
        format!("zerotrace:{}", env!("CARGO_PKG_VERSION")),
        "the workspace version"
    );
    let kustomization = load(&deploy().join("kubernetes/base/kustomization.yaml")).remove(0);
    assert_eq!(
        kustomization["images"],
        json!([{"name": "zerotrace", "newTag": env!("CARGO_PKG_VERSION")}])
    );

    // The node name comes from the downward API.
    let env = c["env"].as_array().unwrap();
    let var = |name: &str| env.iter().find(|e| e["name"] == name);
    assert_eq!(
        var("ZEROTRACE_NODE_NAME").expect("ZEROTRACE_NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert!(var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some());
    let protocol = &var("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap()["value"];
    assert!(
        protocol == "grpc" || protocol == "http/protobuf",
        "{protocol}"
    );

    // The config file the agent is started with is the ConfigMap's key.
    let cm = one(&docs, "ConfigMap");
    let mounts = c["volumeMounts"].as_array().unwrap();
    let volumes = pod["volumes"].as_array().unwrap();
    let mount_of = |vol: &Value| {
        mounts
            .iter()
            .find(|m| m["name"] == vol["name"])
            .unwrap_or_else(|| panic!("volume {} is not mounted", vol["name"]))
    };
    let config_vol = volumes
        .iter()
        .find(|v| v["configMap"]["name"] == cm["metadata"]["name"])
        .expect("the ConfigMap is a volume");
    let config_dir = mount_of(config_vol)["mountPath"].as_str().unwrap();
    let (key, text) = cm["data"].as_object().unwrap().iter().next().unwrap();
    let args: Vec<_> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args, ["run", "--config", &format!("{config_dir}/{key}")]);

    // tracefs from the host, read-only; every hostPath is read-only.
    let host_paths: Vec<_> = volumes
        .iter()
        .filter(|v| v["hostPath"].is_object())
        .collect();
    assert!(
        host_paths
            .iter()
            .any(|v| v["hostPath"]["path"] == "/sys/kernel/tracing"),
        "tracefs is mounted from the host"
    );
    for v in host_paths.iter().copied().chain([config_vol]) {
        assert_eq!(mount_of(v)["readOnly"], true, "{}", v["name"]);
    }

    // The probes and the port use the address telemetry.listen sets.
    let config = load_yaml(text.as_str().unwrap(), "the ConfigMap's config");
    let listen = config["telemetry"]["listen"].as_str().unwrap();
    let (host, port) = listen.rsplit_once(':').unwrap();
    assert_eq!(host, "0.0.0.0", "reachable by the kubelet and Prometheus");
    let port: u64 = port.parse().unwrap();
    let ports = c["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["containerPort"], port);
    let port_name = &ports[0]["name"];
    for (probe, path) in [("livenessProbe", "/health"), ("readinessProbe", "/ready")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(
            &get["port"] == port_name || get["port"] == port,
            "{probe} port {} is not {port}",
            get["port"]
        );
    }
    assert_eq!(
        ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
        port.to_string()
    );
}

#[test]
fn configmap_config_follows_the_example_config() {
    let docs = base();
    let cm = one(&docs, "ConfigMap");
    let text = cm["data"]["zerotrace.yaml"]
        .as_str()
        .expect("zerotrace.yaml key");
    let config = load_yaml(text, "the ConfigMap's config");
    let example = load(&deploy().join("zerotrace.yaml")).remove(0);
    // Same sections as deploy/zerotrace.yaml (which the agent's own tests
    // parse strictly), plus kubernetes.
    let sections =
        |v: &Value| -> BTreeSet<String> { v.as_object().unwrap().keys().cloned().collect() };
    let mut want = sections(&example);
    want.insert("kubernetes".into());
    assert_eq!(sections(&config), want);
    assert_eq!(config["kubernetes"]["metadata"], "auto");
    for (section, v) in config.as_object().unwrap() {
        if let (Some(ours), Some(theirs)) = (v.as_object(), example[section].as_object()) {
            for key in ours.keys() {
                assert!(
                    theirs.contains_key(key),
                    "{section}.{key} is not in deploy/zerotrace.yaml"
                );
            }
        }
    }
    // Tenant headers.
    assert_eq!(config["http"]["headers"], example["http"]["headers"]);
    assert_eq!(
        config["http"]["headers"],
        json!([
            {"header": "x-tenant-id", "attribute": "tenant.id"},
            {"header": "x-user-id", "attribute": "user.id"}
        ])
    );
    for path in ["/health", "/ready", "/metrics"] {
        assert!(
            config["exclude"]["paths"]
                .as_array()
                .unwrap()
                .contains(&json!(path)),
            "probe path {path} is excluded"
        );
    }
}

#[test]
fn rbac_is_exactly_what_metadata_needs() {
    let docs = base();
    let role = one(&docs, "ClusterRole");
    let mut rules = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        let strings = |key: &str| -> Vec<String> {
            rule[key]
                .as_array()
                .unwrap_or_else(|| panic!("{key} in {rule}"))
                .iter()
                .map(|s| s.as_str().unwrap().to_owned())
                .collect()
        };
        assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none());
        for group in strings("apiGroups") {
            for resource in strings("resources") {
                for verb in strings("verbs") {
                    assert!(rules.insert((group.clone(), resource.clone(), verb)));
                }
            }
        }
    }
    let want: BTreeSet<_> = [
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("apps", "replicasets", "get"),
        ("batch", "jobs", "get"),
    ]
    .into_iter()
    .map(|(g, r, v)| (g.to_owned(), r.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(rules, want);

    let binding = one(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let sa = one(&docs, "ServiceAccount");
    assert_eq!(
        binding["subjects"],
        json!([{
            "kind": "ServiceAccount",
            "name": sa["metadata"]["name"],
            "namespace": sa["metadata"]["namespace"],
        }])
    );
    let ds = one(&docs, "DaemonSet");
    assert_eq!(ds["metadata"]["namespace"], sa["metadata"]["namespace"]);
    assert_eq!(
        one(&docs, "Namespace")["metadata"]["name"],
        sa["metadata"]["namespace"]
    );
}

/// systemd-analyze, or None (skipped with a message; a failure under CI).
fn systemd_analyze() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("systemd-analyze"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "systemd-analyze is missing (Debian package systemd; cargo xtask setup)"
        );
        eprintln!("skipped: systemd-analyze missing (cargo xtask setup installs systemd)");
    }
    found
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let unit = unit();
    // The directives the agent depends on, and the ones it must not get.
    for line in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "EnvironmentFile=-/etc/zerotrace/zerotrace.env",
        "ExecStart=/usr/local/bin/zerotrace run --config /etc/zerotrace/zerotrace.yaml",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line}");
    }
    for key in [
        "ProtectProc=",
        "ProcSubset=",
        "PrivateUsers=",
        "PrivateNetwork=",
    ] {
        assert!(
            !unit.lines().any(|l| l.starts_with(key)),
            "{key} would hide processes or capabilities from the agent"
        );
    }

    let Some(analyze) = systemd_analyze() else {
        return;
    };
    // verify needs ExecStart's binary to exist: a copy runs the built agent.
    let dir = tempfile::tempdir().unwrap();
    let bin = agent_bin();
    let copy = unit.replace("/usr/local/bin/zerotrace", bin.to_str().unwrap());
    assert_ne!(copy, unit);
    let path = dir.path().join("zerotrace.service");
    std::fs::write(&path, copy).unwrap();

    // It warns on stderr and may still exit 0: any line about the unit counts.
    let verify = |path: &Path| {
        let out = Command::new(&analyze)
            .arg("verify")
            .arg(path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let clean = out.status.success() && !text.lines().any(|l| l.contains("zerotrace.service"));
        (clean, format!("({}) {:?}", out.status, text.trim()))
    };
    let (clean, report) = verify(&path);
    println!("systemd-analyze verify {report}");
    assert!(clean, "systemd-analyze verify: {report}");
    // The check is not vacuous: an unknown directive is reported.
    let bad_dir = tempfile::tempdir().unwrap();
    let bad = bad_dir.path().join("zerotrace.service");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &bad,
        text.replace("ProtectHome=yes", "ProtectHome=yes\nProtectFoo=yes"),
    )
    .unwrap();
    let (clean, report) = verify(&bad);
    println!("systemd-analyze verify, unknown directive: {report}");
    assert!(!clean && report.contains("ProtectFoo"), "{report}");

    // Exposure score (systemd ≥ 250 can rate a unit file offline).
    let out = Command::new(&analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let Some(line) = text
        .lines()
        .find(|l| l.contains("Overall exposure level for zerotrace.service"))
    else {
        eprintln!(
            "skipped the exposure score: this systemd-analyze cannot rate unit files offline: {}",
            text.trim()
        );
        return;
    };
    println!("systemd-analyze security --offline=true: {}", line.trim());
    let score: f64 = line
        .rsplit_once(": ")
        .and_then(|(_, s)| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score from {line:?}"));
    assert!(
        score < 5.0,
        "exposure {score} (OK/MEDIUM expected below 5.0):\n{text}"
    );
}
