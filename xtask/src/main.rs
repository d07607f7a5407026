//! `cargo xtask`: zerotrace's development tasks (see README.md, "Commands").

mod bench;
mod dist;
mod elf;
mod fuzz;
mod install;
mod setup;
mod util;
mod vm;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use util::{ChildFailed, Ctx, exec, run};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "zerotrace development tasks",
    disable_version_flag = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (nightly, rust-src, bpf-linker,
    /// Debian packages); skips what is present.
    Setup,
    /// Check the toolchain, then build the agent (and its eBPF programs).
    Build {
        /// Release profile (target/release/zerotrace).
        #[arg(long, short)]
        release: bool,
    },
    /// Build, then run `zerotrace ARGS` as root (through `sudo -E` if needed).
    #[command(
        after_help = "Examples:\n  cargo xtask run -- check\n  cargo xtask run -- events --exe curl"
    )]
    Run {
        /// Release profile (target/release/zerotrace).
        #[arg(long, short)]
        release: bool,
        /// Arguments for zerotrace [default: run].
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Full setup, then `cargo test EXTRA` over the default members (all but agent-ebpf) as root, one test at a time;
    /// without EXTRA, then a fuzz smoke (every target 10 s, $ZEROTRACE_FUZZ_SECONDS) and the kernel matrix (vm-test) too.
    #[command(after_help = "Example:\n  cargo xtask test -- -p zerotrace-tests -- --nocapture")]
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        extra: Vec<OsString>,
    },
    /// Run benchmarks and write their results under bench/ (all when none is named).
    Bench {
        #[arg(value_enum)]
        which: Option<Bench>,
        /// Seconds per measurement [default: 10 per overhead run, 5 per capture
        /// transport; micro keeps criterion's own timing].
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        seconds: Option<u32>,
        /// Overhead: rounds of every workload with the agent off and on.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        /// Overhead: run only these workloads (repeat or comma-separate); the
        /// report then goes to target/bench/, not bench/.
        #[arg(
            long,
            value_name = "WORKLOAD",
            value_delimiter = ',',
            value_parser = clap::builder::PossibleValuesParser::new(
                bench::overhead::WORKLOADS.iter().map(|(name, _)| *name)
            )
        )]
        only: Vec<String>,
        /// Overhead and flame: run this agent binary instead of building this
        /// tree's (another commit's release build, for a before/after pair).
        #[arg(long, value_name = "PATH")]
        agent: Option<PathBuf>,
    },
    /// Mixed traffic (nginx, Redis, PostgreSQL, the FastAPI app, short
    /// connections) for N minutes under one agent; writes bench/soak.md with
    /// its memory and CPU over time.
    Soak {
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        minutes: u64,
    },
    /// `cargo fmt --check` and clippy with warnings denied.
    Lint,
    /// Release build: a static x86_64 musl binary with the eBPF object
    /// embedded, packed under dist/ (directory, .tar.gz, .sha256).
    Dist,
    /// `dist`, then the `FROM scratch` image (deploy/Containerfile) built on
    /// the dist directory with buildah or podman, tagged zerotrace:VERSION and
    /// written to dist/ as an OCI archive.
    Image,
    /// Build the release agent and install it as a systemd service: the binary,
    /// the unit, and /etc/zerotrace/{zerotrace.yaml,zerotrace.env} unless they exist.
    #[command(after_help = "Example:\n  cargo xtask install --root /tmp/stage")]
    Install(install::InstallArgs),
    /// The cargo-fuzz targets (agent/fuzz): replay the committed regression
    /// inputs, then fuzz each target for --seconds; fails on any crash.
    #[command(after_help = "Example:\n  cargo xtask fuzz http event --seconds 30")]
    Fuzz(fuzz::FuzzArgs),
    /// Kernel matrix: boot Debian's 6.1 and 6.12 cloud kernels under QEMU (TCG)
    /// and check the fentry and kprobe paths over ring buffer and perf buffer.
    VmTest(vm::VmTestArgs),
}

/// The benchmarks; `cargo xtask bench` without a name runs them all, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Bench {
    /// Real workloads (nginx over HTTP and HTTPS, Redis, PostgreSQL, FastAPI)
    /// with the agent off and on.
    Overhead,
    /// Kernel → userspace event throughput and losses, ring buffer vs perf buffer.
    Capture,
    /// Userspace hot path under criterion: record decoding, protocol parsing,
    /// SQL sanitizing and span building, per core (no root, no eBPF).
    Micro,
    /// Client spans of a FastAPI app and of nginx under concurrency, scored
    /// against the parents their request ids name.
    Nesting,
    /// The agent's CPU profile at a workload's saturation (nginx unless
    /// --only names others), as a flame graph SVG per workload.
    Flame,
}

impl Bench {
    /// The name on the command line.
    fn name(self) -> String {
        self.to_possible_value()
            .map_or_else(|| format!("{self:?}"), |v| v.get_name().to_owned())
    }

    fn run(
        self,
        ctx: &Ctx,
        seconds: Option<u32>,
        rounds: u32,
        only: &[String],
        agent: Option<&Path>,
    ) -> Result<()> {
        match self {
            Bench::Overhead => bench::overhead::overhead(
                ctx,
                &bench::overhead::Options {
                    rounds,
                    seconds: seconds.unwrap_or(10).max(2),
                    only: only.to_vec(),
                    agent: agent.map(Path::to_path_buf),
                },
            ),
            Bench::Flame => bench::flame::flame(
                ctx,
                &bench::flame::Options {
                    seconds: u64::from(seconds.unwrap_or(10).max(2)),
                    only: only.to_vec(),
                    agent: agent.map(Path::to_path_buf),
                },
            ),
            Bench::Capture => bench::capture::capture(ctx, seconds.unwrap_or(5)),
            Bench::Micro => bench::micro::micro(ctx).map(drop),
            Bench::Nesting => bench::nesting::nesting(ctx, seconds.unwrap_or(8).max(2)),
        }
    }
}

/// Runs the named benchmark, or all of them: one failing does not stop the
/// others, and the run fails if any did.
fn run_benches(
    ctx: &Ctx,
    which: Option<Bench>,
    seconds: Option<u32>,
    rounds: u32,
    only: &[String],
    agent: Option<&Path>,
) -> Result<()> {
    let workloads = [Some(Bench::Overhead), Some(Bench::Flame)];
    if !only.is_empty() && !workloads.contains(&which) {
        bail!(
            "--only selects overhead workloads: name the benchmark, `bench overhead --only …` or `bench flame --only …`"
        );
    }
    if agent.is_some() && !workloads.contains(&which) {
        bail!("--agent is for `bench overhead` and `bench flame`");
    }
    let Some(which) = which else {
        let mut failed = Vec::new();
        for b in Bench::value_variants() {
            if let Err(e) = b.run(ctx, seconds, rounds, only, agent) {
                eprintln!("error: bench {}: {e:#}", b.name());
                failed.push(b.name());
            }
        }
        if !failed.is_empty() {
            bail!("benchmarks failed: {}", failed.join(", "));
        }
        return Ok(());
    };
    which.run(ctx, seconds, rounds, only, agent)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(child) = e.downcast_ref::<ChildFailed>() {
                eprintln!("error: {e:#}");
                return ExitCode::from(u8::try_from(child.code()).unwrap_or(1).max(1));
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cmd: Cmd) -> Result<()> {
    let ctx = Ctx::new()?;
    match cmd {
        Cmd::Setup => setup::full(&ctx),
        Cmd::Build { release } => build(&ctx, release),
        Cmd::Run { release, args } => {
            build(&ctx, release)?;
            let bin = ctx.zerotrace_bin(release);
            let mut c = ctx.as_root(&bin, "zerotrace")?;
            if args.is_empty() {
                c.arg("run");
            } else {
                c.args(&args);
            }
            say!("run", "{}", util::describe(&c));
            Err(exec(&mut c))
        }
        Cmd::Test { extra } => test(&ctx, extra),
        Cmd::Bench {
            which,
            seconds,
            rounds,
            only,
            agent,
        } => run_benches(&ctx, which, seconds, rounds, &only, agent.as_deref()),
        Cmd::Soak { minutes } => bench::soak::soak(&ctx, minutes),
        Cmd::Lint => lint(&ctx),
        Cmd::Dist => dist::dist(&ctx).map(drop),
        Cmd::Image => {
            let image = dist::image(&ctx, &dist::dist(&ctx)?)?;
            say!(
                "image",
                "{} (load elsewhere: podman load -i {})",
                image.tag,
                ctx.rel(&image.archive)
            );
            Ok(())
        }
        Cmd::Install(args) => install::install(&ctx, &args),
        Cmd::Fuzz(args) => fuzz::fuzz(&ctx, &args),
        Cmd::VmTest(args) => vm::run_matrix(&ctx, &args),
    }
}

fn build(ctx: &Ctx, release: bool) -> Result<()> {
    setup::toolchain(ctx, false)?;
    build_agent(ctx, release)
}

/// `cargo build -p agent`, without the toolchain check: one line before and
/// one after. cargo runs quietly (errors and warnings still show); the
/// nested eBPF build (agent/build.rs) shows its output only when it fails.
fn build_agent(ctx: &Ctx, release: bool) -> Result<()> {
    let bin = ctx.zerotrace_bin(release);
    let profile = if release { "release" } else { "debug" };
    say!(
        "build",
        "compiling the agent and its eBPF programs ({profile}{})…",
        if bin.is_file() {
            ""
        } else {
            "; the first build takes a few minutes"
        }
    );
    let started = std::time::Instant::now();
    let mut c = ctx.cargo();
    c.args(["build", "--quiet", "-p", "agent"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)?;
    if !bin.is_file() {
        bail!("cargo build succeeded but {} is missing", bin.display());
    }
    say!(
        "build",
        "{} ({:.0}s)",
        ctx.rel(&bin),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn test(ctx: &Ctx, extra: Vec<OsString>) -> Result<()> {
    setup::full(ctx)?;
    // The end-to-end tests run the zerotrace binary; build it in the profile
    // the tests use (the args before a second `--` are cargo's).
    let release = extra
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "--release" || a == "-r");
    build_agent(ctx, release)?;
    // The release build and its image, for tests/tests/dist.rs.
    let dist = dist::dist(ctx)?;
    let image = dist::image(ctx, &dist)?;

    let mut c = ctx.cargo();
    // Every test binary runs even after a failure, so the total is complete.
    c.args(["test", "--no-fail-fast"]).args(&extra);
    // eBPF end-to-end tests attach to the same syscalls; never run them concurrently.
    c.env("RUST_TEST_THREADS", "1");
    c.env("ZEROTRACE_BIN", ctx.zerotrace_bin(release));
    c.env("ZEROTRACE_DIST_BIN", &dist.bin);
    c.env("ZEROTRACE_DIST_IMAGE", &image.archive);
    // The Python OTel SDK and rotel that `setup` installed (tests/src/otlp.rs).
    c.env("ZEROTRACE_VENV", setup::otel_venv_dir()?);
    // Ubuntu's CET-built libssl that `setup` unpacked (tests/tests/tls.rs).
    c.env("ZEROTRACE_CET_LIBSSL", setup::cet_libssl_dir()?.join("lib"));
    if !ctx.is_root {
        // Build as the calling user (target/ stays theirs), run each test binary as root.
        ctx.require_sudo("cargo xtask test")?;
        c.env(
            format!("CARGO_TARGET_{}_RUNNER", host_triple_env(ctx)?),
            "sudo -E",
        );
        say!("test", "not root: test binaries run through `sudo -E`");
    }
    say!("test", "RUST_TEST_THREADS=1 {}", util::describe(&c));
    let (mut totals, tests_ok) = run_tallied(&mut c)?;
    // A full run also boots the kernel matrix: the kprobe and fentry paths
    // this host's kernel lacks. Each cell counts as one test.
    let full = extra.is_empty();
    if full {
        // And a short fuzz smoke: each target counts as one test.
        say!(
            "test",
            "fuzz smoke (cargo xtask fuzz --seconds {}, or ${})",
            fuzz::SMOKE_SECONDS,
            fuzz::SMOKE_SECONDS_ENV
        );
        match fuzz::smoke(ctx) {
            Ok(outcomes) => {
                for o in outcomes {
                    totals[usize::from(o.failure.is_some())] += 1;
                }
            }
            Err(e) => {
                eprintln!("fuzz smoke could not run: {e:#}");
                totals[1] += 1;
            }
        }
        say!("test", "kernel matrix (cargo xtask vm-test)");
        match vm::matrix(ctx, &vm::VmTestArgs::default()) {
            Ok(cells) => {
                totals[0] += cells.passed;
                totals[1] += cells.failed;
            }
            Err(e) => {
                eprintln!("vm-test could not run: {e:#}");
                totals[1] += 1;
            }
        }
    }
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals[0], totals[1], totals[2]
    );
    if !tests_ok {
        bail!("cargo test failed");
    }
    if totals[1] > 0 {
        bail!("{} tests failed", totals[1]);
    }
    Ok(())
}

/// Counts from one libtest line `test result: ok. 7 passed; 0 failed; 1 ignored; ...`.
fn parse_test_result(line: &str) -> Option<[u64; 3]> {
    let rest = line.strip_prefix("test result: ")?;
    let mut counts = [0u64; 3];
    for part in rest.split(['.', ';']) {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse() else { continue };
        match what {
            "passed" => counts[0] = n,
            "failed" => counts[1] = n,
            "ignored" => counts[2] = n,
            _ => {}
        }
    }
    Some(counts)
}

/// Runs `cargo test`, passing its output through, and totals every test
/// binary's counts (the last binary's own line may be a doc-test run of zero
/// tests, which says nothing about the whole). Returns the totals and
/// whether cargo test succeeded.
fn run_tallied(c: &mut std::process::Command) -> Result<([u64; 3], bool)> {
    use std::io::BufRead;
    let mut child = c.stdout(std::process::Stdio::piped()).spawn()?;
    let mut totals = [0u64; 3];
    let out = child.stdout.take().expect("piped stdout");
    for line in std::io::BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        if let Some(counts) = parse_test_result(&line) {
            for (total, n) in totals.iter_mut().zip(counts) {
                *total += n;
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        eprintln!("cargo test failed ({status})");
    }
    Ok((totals, status.success()))
}

/// The host triple in the form cargo's `CARGO_TARGET_<TRIPLE>_RUNNER` uses.
#[cfg(test)]
mod tally_tests {
    #[test]
    fn parses_libtest_summaries() {
        let line = "test result: ok. 7 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s";
        assert_eq!(super::parse_test_result(line), Some([7, 2, 1]));
        assert_eq!(super::parse_test_result("running 7 tests"), None);
    }
}

fn host_triple_env(ctx: &Ctx) -> Result<String> {
    let vv = util::output(ctx.cmd("rustc").arg("-vV"))?;
    let Some(host) = vv.lines().find_map(|l| l.strip_prefix("host:")) else {
        bail!("`rustc -vV` shows no host triple");
    };
    Ok(host.trim().to_uppercase().replace(['-', '.'], "_"))
}

fn lint(ctx: &Ctx) -> Result<()> {
    setup::toolchain(ctx, false)?;
    let fmt = run(ctx.cargo().args(["fmt", "--all", "--", "--check"]));
    let clippy = run(ctx.cargo().args([
        "clippy",
        "-p",
        "agent",
        "-p",
        "agent-common",
        "-p",
        "xtask",
        "-p",
        "zerotrace-tests",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]));
    match (fmt, clippy) {
        (Ok(()), Ok(())) => {
            say!("lint", "fmt and clippy clean");
            Ok(())
        }
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(f), Err(c)) => bail!("{f:#}; {c:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cmd {
        Cli::try_parse_from(std::iter::once("xtask").chain(args.iter().copied()))
            .unwrap()
            .cmd
    }

    #[test]
    fn cli_shapes() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        for (argv, want_release, want) in [
            (
                &["run", "--", "events", "--exe", "curl"][..],
                false,
                &["events", "--exe", "curl"][..],
            ),
            (
                &["run", "--release", "check", "--json"][..],
                true,
                &["check", "--json"][..],
            ),
            (&["run", "-r", "--", "--help"][..], true, &["--help"][..]),
            (&["run"][..], false, &[][..]),
        ] {
            let Cmd::Run { release, args } = parse(argv) else {
                panic!("{argv:?}")
            };
            assert_eq!(release, want_release, "{argv:?}");
            assert_eq!(args, want, "{argv:?}");
        }
        let Cmd::Test { extra } =
            parse(&["test", "--", "-p", "zerotrace-tests", "--", "--nocapture"])
        else {
            panic!()
        };
        assert_eq!(extra, ["-p", "zerotrace-tests", "--", "--nocapture"]);
        assert!(matches!(
            parse(&["bench"]),
            Cmd::Bench {
                which: None,
                seconds: None,
                rounds: 3,
                ref only,
                agent: None,
            } if only.is_empty()
        ));
        let Cmd::Bench { which, agent, .. } =
            parse(&["bench", "flame", "--agent", "/tmp/old/zerotrace"])
        else {
            panic!()
        };
        assert_eq!(which, Some(Bench::Flame));
        assert_eq!(agent.as_deref(), Some(Path::new("/tmp/old/zerotrace")));
        let Cmd::Bench { which, only, .. } = parse(&[
            "bench",
            "overhead",
            "--only",
            "nginx-https",
            "--only",
            "redis,nginx",
        ]) else {
            panic!()
        };
        assert_eq!(which, Some(Bench::Overhead));
        assert_eq!(only, ["nginx-https", "redis", "nginx"]);
        assert!(
            Cli::try_parse_from(["xtask", "bench", "overhead", "--only", "nginx-tls"]).is_err()
        );
        assert!(matches!(
            parse(&["bench", "capture", "--seconds", "2"]),
            Cmd::Bench {
                which: Some(Bench::Capture),
                seconds: Some(2),
                ..
            }
        ));
        assert!(matches!(
            parse(&["bench", "micro"]),
            Cmd::Bench {
                which: Some(Bench::Micro),
                ..
            }
        ));
        assert_eq!(
            Bench::value_variants(),
            [
                Bench::Overhead,
                Bench::Capture,
                Bench::Micro,
                Bench::Nesting,
                Bench::Flame
            ]
        );
        assert!(Cli::try_parse_from(["xtask", "bench", "--seconds", "0"]).is_err());
        let Cmd::Fuzz(f) = parse(&["fuzz"]) else {
            panic!()
        };
        assert!(f.targets.is_empty());
        assert_eq!(f.seconds, 60);
        let Cmd::Fuzz(f) = parse(&["fuzz", "http", "event", "--seconds", "20"]) else {
            panic!()
        };
        assert_eq!(
            (f.targets, f.seconds),
            (vec!["http".into(), "event".into()], 20)
        );
        let Cmd::Install(install) = parse(&["install"]) else {
            panic!()
        };
        assert_eq!(install.prefix, std::path::Path::new("/usr/local"));
        assert!(install.root.is_none());
        let Cmd::Install(install) = parse(&["install", "--prefix", "/usr", "--root", "/tmp/x"])
        else {
            panic!()
        };
        assert_eq!(install.prefix, std::path::Path::new("/usr"));
        assert_eq!(
            install.root.as_deref(),
            Some(std::path::Path::new("/tmp/x"))
        );
    }
}
