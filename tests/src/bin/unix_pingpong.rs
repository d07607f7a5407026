//! A busy Unix-socket workload of a protocol the agent does not know: a
//! client does request/response ping-pong of small binary frames with an
//! echo server, over several connections at once. The overhead benchmark's
//! `unix-unknown` row (`cargo xtask bench overhead --only unix-unknown`)
//! runs it to show what such traffic costs once the agent has given up on
//! it (muted: the kernel stops copying its data).
//!
//! ```text
//! unix_pingpong server PATH
//! unix_pingpong client PATH [--connections N] [--seconds S]
//! ```
//!
//! A frame is a 4-byte header — 0xfe, then the payload length as 3 bytes
//! big-endian — and [`PAYLOAD`] pseudo-random bytes; the server answers
//! each frame with the same frame. Nothing about it looks like HTTP,
//! PostgreSQL, MySQL or Redis: no ASCII start, no `*`, a first byte that
//! is not 0 (PostgreSQL's untyped messages) and a MySQL sequence number
//! that is not 0.
//!
//! The client prints one JSON line: round trips completed (`requests`),
//! the run length (`seconds`), the median and 99th percentile round-trip
//! time (`p50_ms`, `p99_ms`) and `errors` (failed connects, reads or
//! writes, and answers that were not the frame sent). Standard library
//! only; a thread per connection on both ends.

use std::{
    io::{self, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::Path,
    process::ExitCode,
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

/// First byte of every frame.
const MAGIC: u8 = 0xfe;
/// Header bytes: the magic and a 3-byte length.
const HEADER: usize = 4;
/// Payload bytes per frame.
const PAYLOAD: usize = 60;
/// Largest payload the server accepts.
const MAX_PAYLOAD: usize = 64 * 1024;

const USAGE: &str =
    "usage: unix_pingpong server PATH | unix_pingpong client PATH [--connections N] [--seconds S]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("server") if args.len() == 2 => server(Path::new(&args[1])),
        Some("client") if args.len() >= 2 => client_args(&args[2..])
            .and_then(|(connections, seconds)| client(Path::new(&args[1]), connections, seconds)),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, USAGE)),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("unix_pingpong: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--connections N --seconds S` (defaults 8 and 10).
fn client_args(args: &[String]) -> io::Result<(usize, f64)> {
    let (mut connections, mut seconds) = (8usize, 10.0f64);
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{what}; {USAGE}"));
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| bad("a flag without a value"))?;
        match flag.as_str() {
            "--connections" => {
                connections = value
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad("bad --connections"))?;
            }
            "--seconds" => {
                seconds = value
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| bad("bad --seconds"))?;
            }
            _ => return Err(bad(&format!("unknown flag {flag:?}"))),
        }
    }
    Ok((connections, seconds))
}

/// Listens on `path` (replacing a stale socket file) and echoes every
/// frame on every connection until killed.
fn server(path: &Path) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    for conn in listener.incoming() {
        match conn {
            Ok(conn) => {
                thread::spawn(move || {
                    // A client that leaves ends its connection; nothing to report.
                    let _ = echo(conn);
                });
            }
            Err(e) => eprintln!("unix_pingpong: accept: {e}"),
        }
    }
    Ok(())
}

/// Answers each frame with itself until the peer closes.
fn echo(mut conn: UnixStream) -> io::Result<()> {
    let mut buf = vec![0u8; HEADER + PAYLOAD];
    loop {
        if let Err(e) = conn.read_exact(&mut buf[..HEADER]) {
            return if e.kind() == io::ErrorKind::UnexpectedEof {
                Ok(())
            } else {
                Err(e)
            };
        }
        let len = payload_len(&buf[..HEADER])?;
        buf.resize(HEADER + len, 0);
        conn.read_exact(&mut buf[HEADER..])?;
        // One write per answer, as a request/response server does.
        conn.write_all(&buf)?;
    }
}

/// The payload length a header announces.
fn payload_len(header: &[u8]) -> io::Result<usize> {
    let len = usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
    if header[0] != MAGIC || len > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a frame header: {header:02x?}"),
        ));
    }
    Ok(len)
}

/// Writes a frame with `PAYLOAD` bytes drawn from `state` into `frame`.
fn fill_frame(frame: &mut [u8; HEADER + PAYLOAD], state: &mut u64) {
    frame[0] = MAGIC;
    frame[1] = (PAYLOAD >> 16) as u8;
    frame[2] = (PAYLOAD >> 8) as u8;
    frame[3] = PAYLOAD as u8;
    for chunk in frame[HEADER..].chunks_mut(8) {
        // xorshift64: cheap, and a different frame every time.
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// What one connection's thread measured.
#[derive(Default)]
struct Tally {
    /// Round-trip times, nanoseconds.
    rtt_ns: Vec<u64>,
    errors: u64,
}

/// `connections` threads, each on its own connection to `path`, send a
/// frame and wait for its echo for `seconds`; prints the JSON summary.
fn client(path: &Path, connections: usize, seconds: f64) -> io::Result<()> {
    let start = Arc::new(Barrier::new(connections + 1));
    let threads: Vec<_> = (0..connections)
        .map(|i| {
            let path = path.to_path_buf();
            let start = Arc::clone(&start);
            thread::spawn(move || {
                let conn = UnixStream::connect(&path);
                start.wait();
                let deadline = Instant::now() + Duration::from_secs_f64(seconds);
                ping(conn, &path, deadline, i as u64)
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    let mut tallies = Vec::new();
    for t in threads {
        tallies.push(
            t.join()
                .map_err(|_| io::Error::other("a client thread panicked"))?,
        );
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let errors: u64 = tallies.iter().map(|t| t.errors).sum();
    let mut rtt: Vec<u64> = tallies.into_iter().flat_map(|t| t.rtt_ns).collect();
    rtt.sort_unstable();
    let rank = |p: f64| -> f64 {
        if rtt.is_empty() {
            return 0.0;
        }
        let i = ((p * rtt.len() as f64).ceil() as usize).clamp(1, rtt.len());
        rtt[i - 1] as f64 / 1e6
    };
    println!(
        r#"{{"requests":{},"seconds":{elapsed:.6},"p50_ms":{:.6},"p99_ms":{:.6},"errors":{errors},"connections":{connections},"frame_bytes":{}}}"#,
        rtt.len(),
        rank(0.50),
        rank(0.99),
        HEADER + PAYLOAD,
    );
    if rtt.is_empty() {
        return Err(io::Error::other(format!(
            "no round trip completed ({errors} errors)"
        )));
    }
    Ok(())
}

/// Ping-pong on one connection until `deadline`; reconnects after an error.
fn ping(conn: io::Result<UnixStream>, path: &Path, deadline: Instant, seed: u64) -> Tally {
    let mut tally = Tally {
        rtt_ns: Vec::with_capacity(1 << 16),
        errors: 0,
    };
    let mut state = 0x9e37_79b9_7f4a_7c15 ^ (seed + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut frame = [0u8; HEADER + PAYLOAD];
    let mut answer = [0u8; HEADER + PAYLOAD];
    let mut conn = conn.ok();
    while Instant::now() < deadline {
        let Some(c) = conn.as_mut() else {
            tally.errors += 1;
            thread::sleep(Duration::from_millis(10));
            conn = UnixStream::connect(path).ok();
            continue;
        };
        fill_frame(&mut frame, &mut state);
        let sent = Instant::now();
        let ok = c.write_all(&frame).is_ok() && c.read_exact(&mut answer).is_ok();
        if !ok {
            tally.errors += 1;
            conn = None;
            continue;
        }
        if answer == frame {
            tally.rtt_ns.push(sent.elapsed().as_nanos() as u64);
        } else {
            tally.errors += 1;
        }
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_start_with_the_magic_and_announce_their_payload() {
        let mut state = 1;
        let (mut a, mut b) = ([0u8; HEADER + PAYLOAD], [0u8; HEADER + PAYLOAD]);
        fill_frame(&mut a, &mut state);
        fill_frame(&mut b, &mut state);
        assert_eq!(a[..HEADER], [0xfe, 0, 0, 60]);
        assert_eq!(payload_len(&a[..HEADER]).unwrap(), PAYLOAD);
        assert_ne!(a[HEADER..], b[HEADER..]);
        assert!(payload_len(b"*1\r\n").is_err());
    }

    #[test]
    fn echo_server_and_client_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let p = path.clone();
        thread::spawn(move || server(&p));
        let deadline = Instant::now() + Duration::from_secs(5);
        let conn = loop {
            match UnixStream::connect(&path) {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("{e}"),
            }
        };
        let t = ping(
            Ok(conn),
            &path,
            Instant::now() + Duration::from_millis(100),
            0,
        );
        assert_eq!(t.errors, 0);
        assert!(!t.rtt_ns.is_empty());
    }
}
