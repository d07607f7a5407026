//! Least privilege, proven: the agent traces HTTP with exactly the
//! capability set the shipped systemd unit grants (the DaemonSet grants the
//! same set; tests/tests/deploy.rs checks that), as an unprivileged user and
//! as a capability-limited root, and refuses to start, naming the missing
//! capability, when any one of them is taken away.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::Duration,
};

use zerotrace_tests::{
    Agent, Guard, agent_bin, can_trace, free_port,
    otlp::{Protocol, ReceivedSpan, Receiver},
    servers::{Nginx, curl},
    spans::WAIT,
    tls::TestCa,
    wait_for_port, wait_timeout,
};

/// An HTTP/1.1 keep-alive server on asyncio: it reads a socket only once
/// epoll says it is readable, so a connection accepted before the agent
/// started has no read in flight and its next request is seen whole.
const APP: &str = r#"
import asyncio, sys
async def serve(reader, writer):
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return
        path = head.split(b" ")[1]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
        await writer.drain()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
"#;

const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/systemd/zerotrace.service"
);

/// `CapabilityBoundingSet=` of the shipped unit, as CAP_ names.
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(UNIT).expect("reading the systemd unit");
    let caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.trim().strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet=")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let ambient = unit
        .lines()
        .find_map(|l| l.trim().strip_prefix("AmbientCapabilities="))
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>());
    assert!(
        ambient.as_ref().is_none_or(|a| *a == caps),
        "AmbientCapabilities differs from CapabilityBoundingSet"
    );
    assert!(!caps.is_empty() && caps.iter().all(|c| c.starts_with("CAP_")));
    caps
}

/// How the agent is started.
#[derive(Clone, Copy, Debug)]
enum Identity {
    /// The systemd unit: a non-root user with ambient capabilities.
    User,
    /// A Kubernetes container: uid 0 with a limited bounding set.
    LimitedRoot,
}

/// `setpriv` that runs the agent with exactly `caps`, and no_new_privs.
fn with_caps(identity: Identity, caps: &[String]) -> Command {
    let list: String = caps
        .iter()
        .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let mut cmd = Command::new("setpriv");
    if let Identity::User = identity {
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        cmd.arg(format!("--ambient-caps=-all{list}"));
    }
    cmd.arg("--no-new-privs")
        .arg(format!("--inh-caps=-all{list}"))
        .arg(format!("--bounding-set=-all{list}"))
        .arg("--")
        .arg(agent_bin());
    cmd
}

/// The effective capability mask of a running process.
fn effective_caps(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn the_documented_capabilities_are_enough_to_trace_http() {
    if !can_trace() {
        return;
    }
    let caps = unit_capabilities();
    for identity in [Identity::User, Identity::LimitedRoot] {
        // The app runs as root, the agent as someone else (User): naming the
        // executable needs CAP_SYS_PTRACE, seeding its connection
        // CAP_DAC_READ_SEARCH as well.
        let port = free_port();
        let app = Guard(
            Command::new("python3")
                .args(["-c", APP, &port.to_string()])
                .spawn()
                .unwrap(),
        );
        wait_for_port(port, Duration::from_secs(10)).unwrap();
        let mut early = TcpStream::connect(("127.0.0.1", port)).unwrap();
        early
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));

        let rx = Receiver::start(Protocol::Grpc).unwrap();
        let mut cmd = with_caps(identity, &caps);
        cmd.args(["run", "--pid", &app.0.id().to_string(), "--listen", "off"])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint())
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol_name())
            .env("OTEL_BSP_SCHEDULE_DELAY", "200");
        let agent = Agent::spawn(cmd, "tracing")
            .unwrap_or_else(|e| panic!("{identity:?} with {caps:?}: {e:#}"));
        // The documented capabilities keep the cheaper receive path (the
        // verifier lets only CAP_PERFMON read the registers it uses).
        assert!(
            !agent
                .stderr_lines
                .iter()
                .any(|l| l.contains("receives keep their enter hooks")),
            "{identity:?}: {:?}",
            agent.stderr_lines
        );
        let eff = effective_caps(agent.pid());
        // setpriv execs the agent: this is the agent's own mask. Four bits,
        // not the 40-odd of full root.
        assert_eq!(
            eff.count_ones() as usize,
            caps.len(),
            "{identity:?}: CapEff {eff:#x}"
        );

        early
            .write_all(b"GET /early HTTP/1.1\r\nHost: app\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 512];
        let n = early.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        curl(&[&format!("http://127.0.0.1:{port}/late")]).unwrap();

        let paths = ["/early", "/late"];
        let spans = rx
            .wait_for(WAIT, "server spans for /early and /late", |spans| {
                paths
                    .iter()
                    .all(|p| spans.iter().any(|s| s.attr_str("url.path") == Some(p)))
            })
            .unwrap_or_else(|e| panic!("{identity:?}: {e:#}"));
        // From /proc/PID/exe ("python3.11"), not the thread name ("python3").
        let exe = std::fs::read_link(format!("/proc/{}/exe", app.0.id())).unwrap();
        let exe = exe.file_name().unwrap().to_str().unwrap();
        for s in spans.iter().filter(|s| s.attr_str("url.path").is_some()) {
            let named = s.resource.get("process.executable.name");
            assert_eq!(
                named.and_then(|v| v.as_str()),
                Some(exe),
                "{identity:?}: {}",
                s.brief()
            );
        }
        agent.stop().unwrap();
    }
}

#[test]
fn without_any_one_required_capability_the_agent_names_it() {
    if !can_trace() {
        return;
    }
    let caps = unit_capabilities();
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let mut child = with_caps(Identity::User, &fewer)
            .args(["run", "--listen", "off", "--exporter", "console"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_timeout(&mut child, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("without {missing} the agent kept running"));
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert_eq!(status.code(), Some(1), "without {missing}: {stderr}");
        let line = stderr
            .lines()
            .find(|l| l.contains("missing capability"))
            .unwrap_or_else(|| panic!("without {missing}, no message: {stderr}"));
        assert!(
            line.contains(missing.as_str()) && fewer.iter().all(|c| !line.contains(c.as_str())),
            "without {missing}: {line}"
        );
    }
}

/// TLS plaintext takes probes on user-space code (uprobes). Kernels since
/// 6.16 (and the stable updates of older lines) allow those to
/// `CAP_SYS_ADMIN` only: with the unit's capabilities the agent either reads
/// HTTPS or says exactly that; with `CAP_SYS_ADMIN` added it reads it.
#[test]
fn tls_plaintext_takes_cap_sys_admin_where_the_kernel_asks_for_it() {
    if !can_trace() {
        return;
    }
    let ca = TestCa::new().unwrap();
    let nginx = Nginx::start_tls(free_port(), &ca).unwrap();
    let unit = unit_capabilities();
    let mut with_admin = unit.clone();
    with_admin.push("CAP_SYS_ADMIN".into());
    for (caps, must_read) in [(unit, false), (with_admin, true)] {
        let rx = Receiver::start(Protocol::Grpc).unwrap();
        let mut cmd = with_caps(Identity::User, &caps);
        cmd.args([
            "run",
            "--pid",
            &nginx.master_pid().to_string(),
            "--listen",
            "off",
        ])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol_name())
        .env("OTEL_BSP_SCHEDULE_DELAY", "200");
        let agent = Agent::spawn(cmd, "tracing").unwrap_or_else(|e| panic!("{caps:?}: {e:#}"));
        let refused = agent
            .stderr_lines
            .iter()
            .any(|l| l.contains("libssl") && l.contains("only CAP_SYS_ADMIN attach probes"));
        ca.curl(&["-o", "/dev/null", &nginx.url("/a.txt")]).unwrap();
        let https = |spans: &[ReceivedSpan]| {
            spans.iter().any(|s| {
                s.attr_str("url.path") == Some("/a.txt")
                    && s.attr_str("url.scheme") == Some("https")
            })
        };
        if must_read || !refused {
            rx.wait_for(WAIT, "nginx's HTTPS server span", https)
                .unwrap_or_else(|e| panic!("{caps:?}: {e:#}"));
        } else {
            // Said so, and nothing made of the ciphertext meanwhile.
            let spans = rx.spans();
            assert!(
                !spans.iter().any(|s| s.attr_str("url.path").is_some()),
                "spans from ciphertext: {spans:?}"
            );
        }
        agent.stop().unwrap();
    }
}
