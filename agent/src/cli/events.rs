//! `zerotrace events`: every captured record, one per line.

use std::{
    io::{BufWriter, Write},
    process::ExitCode,
    time::{Duration, Instant},
};

use agent_common::{Direction, Role};
use clap::{Args, ValueEnum};
use nix::time::{ClockId, clock_gettime};
use serde_json::json;

use super::CaptureArgs;
use crate::{
    capture::Data,
    conn::Connection,
    pipeline::{Consumer, Every, Pipeline, Record, stop_on_signals},
};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Text,
    /// One JSON object per line, payload as hex.
    Json,
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    #[command(flatten)]
    capture: CaptureArgs,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Payload characters shown in text format.
    #[arg(long, default_value_t = 64)]
    preview: usize,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Test hook: after attaching, exchange bytes over a loopback connection
    /// inside the agent process (which must not be captured).
    #[arg(long, hide = true)]
    self_traffic: bool,
}

/// Sends and receives a message over loopback from inside the agent.
fn self_traffic() -> anyhow::Result<u16> {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port))?;
    let (mut server, _) = listener.accept()?;
    client.write_all(b"zerotrace-self-traffic")?;
    let mut buf = [0u8; 22];
    server.read_exact(&mut buf)?;
    server.write_all(&buf)?;
    client.read_exact(&mut buf)?;
    Ok(port)
}

/// Converts kernel monotonic timestamps to wall-clock time.
struct Clock {
    offset_ns: i128,
}

impl Clock {
    fn new() -> Self {
        let ns = |id| {
            clock_gettime(id)
                .map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
                .unwrap_or(0)
        };
        Self {
            offset_ns: ns(ClockId::CLOCK_REALTIME) - ns(ClockId::CLOCK_MONOTONIC),
        }
    }

    /// "HH:MM:SS.micros" (UTC).
    fn format(&self, ts_ns: u64) -> String {
        let wall = (i128::from(ts_ns) + self.offset_ns).max(0) as u128;
        let secs = wall / 1_000_000_000;
        let micros = (wall % 1_000_000_000) / 1000;
        let day = secs % 86_400;
        format!(
            "{:02}:{:02}:{:02}.{micros:06}",
            day / 3600,
            day / 60 % 60,
            day % 60
        )
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Client => "client",
        Role::Server => "server",
        Role::Unknown => "unknown",
    }
}

/// Printable preview: ASCII as is, CR/LF/TAB escaped, the rest as '.'.
pub fn preview(bytes: &[u8], max: usize) -> String {
    let mut out = String::with_capacity(max.min(bytes.len()) + 8);
    for &b in bytes {
        if out.len() >= max {
            out.push('…');
            break;
        }
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'"' | b'\\' => {
                out.push('\\');
                out.push(b as char);
            }
            0x20..=0x7e => out.push(b as char),
            _ => out.push('.'),
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn conn_json(conn: &Connection) -> serde_json::Value {
    json!({
        "conn_id": conn.conn_id,
        "pid": conn.tgid,
        "fd": conn.fd,
        "comm": conn.comm,
        "role": role_name(conn.role),
        "transport": if conn.local.is_unix() { "unix" } else { "tcp" },
        "local": conn.local.to_string(),
        "remote": conn.remote.to_string(),
    })
}

fn data_json(conn: Option<&Connection>, data: &Data<'_>) -> serde_json::Value {
    let h = &data.header;
    let mut v = json!({
        "type": "data",
        "ts_ns": h.ts_ns,
        "pid": h.tgid,
        "tid": h.tid,
        "fd": h.fd,
        "conn_id": h.conn_id,
        "syscall": data.syscall.name(),
        "direction": match data.direction { Direction::Egress => "egress", Direction::Ingress => "ingress" },
        "bytes": data.total_bytes,
        "captured": data.payload.len(),
        "payload_hex": hex(data.payload),
    });
    if let Some(conn) = conn {
        v["comm"] = conn.comm.as_str().into();
        v["role"] = role_name(conn.role).into();
        v["local"] = conn.local.to_string().into();
        v["remote"] = conn.remote.to_string().into();
    }
    if data.unit != 0 {
        v["unit"] = format!("{:#x}", data.unit).into();
        v["unit_seq"] = data.unit_seq.into();
    }
    v
}

/// Prints each record as a line: what `events` plugs into the pipeline.
struct Printer<'a, W: Write> {
    args: &'a EventsArgs,
    clock: Clock,
    out: W,
    /// The first failed write; later records are not printed.
    write_error: Option<std::io::Error>,
    /// Readers of a pipe see records within this, not only at exit.
    flush_every: Every,
}

impl<W: Write> Printer<'_, W> {
    /// The record's line, if it has one.
    fn line(&self, record: Record<'_>) -> Option<String> {
        let clock = &self.clock;
        let line = match (self.args.format, record) {
            (
                _,
                Record::Evicted(_)
                | Record::Followed { .. }
                | Record::Unfollowed(_)
                | Record::OwnConnect(_),
            ) => {
                return None;
            }
            (Format::Json, Record::Unit(u)) => serde_json::json!({
                "type": "unit",
                "ts_ns": u.header.ts_ns,
                "pid": u.header.tgid,
                "tid": u.header.tid,
                "unit": format!("{:#x}", u.unit),
                "parent": format!("{:#x}", u.parent),
                "parent_seq": u.parent_seq,
            })
            .to_string(),
            (Format::Text, Record::Unit(u)) => format!(
                "{} {:>7}/{:<7} {:15} unit {:#x} made in {:#x} (seq {})",
                clock.format(u.header.ts_ns),
                u.header.tgid,
                u.header.tid,
                "",
                u.unit,
                u.parent,
                u.parent_seq
            ),
            (Format::Json, Record::Opened(c)) => {
                let mut v = conn_json(c);
                v["type"] = "open".into();
                v.to_string()
            }
            (Format::Json, Record::Closed(c)) => {
                let mut v = conn_json(c);
                v["type"] = "close".into();
                v["bytes_in"] = c.bytes_in.into();
                v["bytes_out"] = c.bytes_out.into();
                v.to_string()
            }
            (Format::Json, Record::Data(c, d)) => data_json(c, d).to_string(),
            (Format::Text, Record::Opened(c)) => format!(
                "{:15} {:>7}     {:15} {:7} {} - {} open fd {}",
                "",
                c.tgid,
                c.comm,
                role_name(c.role),
                c.local,
                c.remote,
                c.fd
            ),
            (Format::Text, Record::Closed(c)) => format!(
                "{:15} {:>7}     {:15} {:7} {} - {} close (in {} B, out {} B)",
                "",
                c.tgid,
                c.comm,
                role_name(c.role),
                c.local,
                c.remote,
                c.bytes_in,
                c.bytes_out
            ),
            (Format::Text, Record::Data(c, d)) => {
                let h = &d.header;
                let (comm, role, tuple) = match c {
                    Some(c) => {
                        let arrow = if d.direction == Direction::Egress {
                            '>'
                        } else {
                            '<'
                        };
                        (
                            c.comm.as_str(),
                            role_name(c.role),
                            format!("{} {arrow} {}", c.local, c.remote),
                        )
                    }
                    None => ("?", "?", format!("conn {:#x}", h.conn_id)),
                };
                format!(
                    "{} {:>7}/{:<7} {:15} {:7} {} {:8} {:>6} B \"{}\"",
                    clock.format(h.ts_ns),
                    h.tgid,
                    h.tid,
                    comm,
                    role,
                    tuple,
                    d.syscall.name(),
                    d.total_bytes,
                    preview(d.payload, self.args.preview)
                )
            }
        };
        Some(line)
    }
}

impl<W: Write> Consumer for Printer<'_, W> {
    fn record(&mut self, record: Record<'_>) {
        if self.write_error.is_some() {
            return;
        }
        if let Some(line) = self.line(record)
            && let Err(e) = writeln!(self.out, "{line}")
        {
            self.write_error = Some(e);
        }
    }

    fn tick(&mut self, _: &mut Pipeline) {
        if self.flush_every.due() {
            let _ = self.out.flush();
        }
    }
}

pub fn run(args: &EventsArgs) -> anyhow::Result<ExitCode> {
    let stop = stop_on_signals()?;
    let mut pipeline = Pipeline::start(&args.capture.load_options())?;
    eprintln!(
        "zerotrace: capturing ({} transport, kernel functions: {}); Ctrl-C to stop",
        pipeline.transport().name(),
        pipeline.probes.kernel_functions.describe()
    );
    if args.self_traffic {
        eprintln!("zerotrace: self traffic on port {}", self_traffic()?);
    }
    let stdout = std::io::stdout();
    let mut printer = Printer {
        args,
        clock: Clock::new(),
        out: BufWriter::new(stdout.lock()),
        write_error: None,
        flush_every: Every::new(Duration::from_millis(200)),
    };
    let deadline = args
        .duration
        .map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    pipeline.run(&stop, deadline, &mut printer)?;
    let Printer {
        mut out,
        write_error,
        ..
    } = printer;
    let stats = pipeline.stats();
    if matches!(args.format, Format::Json) {
        let mut v = serde_json::to_value(stats)?;
        v["type"] = "summary".into();
        v["lost"] = stats.lost().into();
        writeln!(out, "{v}")?;
    }
    out.flush()?;
    drop(out);
    if let Some(e) = write_error
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(e.into());
    }
    eprintln!(
        "zerotrace: {} data events ({} payload bytes), {} lost ({} refused in kernel, {} dropped by perf)",
        stats.data_events,
        stats.payload_bytes,
        stats.lost(),
        stats.kernel.events_lost,
        stats.reader.lost
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_escape_and_truncate() {
        assert_eq!(
            preview(b"GET / HTTP/1.1\r\nHost: x\r\n", 100),
            "GET / HTTP/1.1\\r\\nHost: x\\r\\n"
        );
        assert_eq!(preview(&[0, 1, b'a', 0xff], 100), "..a.");
        assert_eq!(preview(b"abcdef", 3), "abc…");
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }

    #[test]
    fn clock_formats_time_of_day() {
        let clock = Clock { offset_ns: 0 };
        assert_eq!(clock.format(3_723_000_001_000), "01:02:03.000001");
    }
}
