//! Trace context: W3C traceparent/tracestate, id generation and
//! parent-based ratio sampling (OTEL_TRACES_SAMPLER[_ARG]).

use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};

use crate::config::{ConfigError, SamplingConfig, env};

/// A parent for a new span.
#[derive(Debug, Clone, PartialEq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
    pub trace_state: TraceState,
    /// From another process's traceparent header rather than a span of ours.
    pub remote: bool,
}

/// Parses a W3C `traceparent` (version 00 and future versions, per the
/// spec's forward-compatibility rules); `None` when malformed.
pub fn parse_traceparent(value: &str, tracestate: Option<&str>) -> Option<Parent> {
    // version "-" trace-id "-" parent-id "-" flags [ "-" more, versions > 00 ]:
    // fixed widths, lower-case hex.
    let b = value.trim().as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let more = match b.get(55) {
        None => false,
        Some(b'-') => true,
        Some(_) => return None,
    };
    let version = lower_hex(&b[..2])?;
    if version == 0xff {
        return None;
    }
    // Version 00 has exactly four fields; later versions may add more.
    if version == 0 && more {
        return None;
    }
    let trace_id =
        TraceId::from(u128::from(lower_hex(&b[3..19])?) << 64 | u128::from(lower_hex(&b[19..35])?));
    let span_id = SpanId::from(lower_hex(&b[36..52])?);
    let flags = lower_hex(&b[53..55])?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let trace_state = tracestate
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    Some(Parent {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
        trace_state,
        remote: true,
    })
}

/// The value of at most 16 lower-case hex digits; `None` on any other byte.
/// (A trace id is read as two halves: 64-bit arithmetic per digit costs a
/// third of 128-bit.)
fn lower_hex(digits: &[u8]) -> Option<u64> {
    debug_assert!(digits.len() <= 16);
    digits.iter().try_fold(0u64, |n, &c| {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        Some(n << 4 | u64::from(d))
    })
}

/// Root sampling decision, applied to spans without a parent; spans with a
/// parent follow the parent's sampled flag when parent-based.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// Probability of sampling a new trace.
    ratio: f64,
    /// Whether spans with a parent follow its decision.
    parent_based: bool,
}

impl Default for Sampler {
    fn default() -> Self {
        Self {
            ratio: 1.0,
            parent_based: true,
        }
    }
}

impl Sampler {
    /// From OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, else the config file.
    pub fn from_env_or(config: &SamplingConfig) -> Result<Self, ConfigError> {
        let (name, arg) = match env("OTEL_TRACES_SAMPLER") {
            Some(name) => (name, env("OTEL_TRACES_SAMPLER_ARG")),
            None => (
                config
                    .sampler
                    .clone()
                    .unwrap_or_else(|| "parentbased_always_on".into()),
                config.ratio.map(|r| r.to_string()),
            ),
        };
        let ratio = || -> Result<f64, ConfigError> {
            match &arg {
                None => Ok(1.0),
                Some(a) => a
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        ConfigError::new(format!(
                            "sampler ratio {a:?} must be a number between 0 and 1"
                        ))
                    }),
            }
        };
        let (ratio, parent_based) = match name.trim() {
            "always_on" => (1.0, false),
            "always_off" => (0.0, false),
            "traceidratio" => (ratio()?, false),
            "parentbased_always_on" => (1.0, true),
            "parentbased_always_off" => (0.0, true),
            "parentbased_traceidratio" => (ratio()?, true),
            other => {
                return Err(ConfigError::new(format!(
                    "unsupported sampler {other:?} (use always_on, always_off, traceidratio \
                     or their parentbased_ forms)"
                )));
            }
        };
        Ok(Self {
            ratio,
            parent_based,
        })
    }

    pub fn ratio(ratio: f64) -> Self {
        Self {
            ratio,
            parent_based: true,
        }
    }

    /// Whether a span in `trace_id` with `parent` is recorded and exported.
    pub fn sample(&self, trace_id: TraceId, parent: Option<&Parent>) -> bool {
        match parent {
            Some(parent) if self.parent_based => parent.sampled,
            _ => self.by_trace_id(trace_id),
        }
    }

    /// The TraceIdRatioBased rule of the OpenTelemetry SDKs: compare the
    /// trace id's low 63 bits with the ratio, so every agent agrees.
    fn by_trace_id(&self, trace_id: TraceId) -> bool {
        if self.ratio >= 1.0 {
            return true;
        }
        if self.ratio <= 0.0 {
            return false;
        }
        let bytes = trace_id.to_bytes();
        let low = u64::from_be_bytes(bytes[8..16].try_into().unwrap_or_default()) >> 1;
        let bound = (self.ratio * (1u64 << 63) as f64) as u64;
        low < bound
    }
}

/// Random trace and span ids.
#[derive(Debug, Default)]
pub struct Ids(RandomIdGenerator);

impl Ids {
    pub fn trace_id(&self) -> TraceId {
        self.0.new_trace_id()
    }
    pub fn span_id(&self) -> SpanId {
        self.0.new_span_id()
    }
}

pub fn flags(sampled: bool) -> TraceFlags {
    if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn valid_traceparent() {
        let p = parse_traceparent(VALID, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(
            p.trace_id,
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(p.span_id, SpanId::from_hex("00f067aa0ba902b7").unwrap());
        assert!(p.sampled && p.remote);
        assert_eq!(p.trace_state.get("congo"), Some("t61rcWkgMzE"));
        let unsampled = parse_traceparent(&VALID.replace("-01", "-00"), None).unwrap();
        assert!(!unsampled.sampled);
        // A future version may carry more fields.
        assert!(parse_traceparent(&format!("01{}-extra", &VALID[2..]), None).is_some());
    }

    #[test]
    fn malformed_traceparents_are_rejected() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
        ] {
            assert!(parse_traceparent(bad, None).is_none(), "{bad:?}");
        }
    }

    /// The split-and-validate parser this one replaced, as the reference.
    fn reference(value: &str) -> Option<Parent> {
        fn is_lower_hex(s: &str) -> bool {
            s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        }
        let value = value.trim();
        let mut parts = value.split('-');
        let version = parts.next()?;
        let trace_id = parts.next()?;
        let span_id = parts.next()?;
        let flags = parts.next()?;
        let rest = parts.next();
        if version.len() != 2 || !is_lower_hex(version) || version == "ff" {
            return None;
        }
        if version == "00" && rest.is_some() {
            return None;
        }
        if trace_id.len() != 32 || span_id.len() != 16 || flags.len() != 2 {
            return None;
        }
        if !is_lower_hex(trace_id) || !is_lower_hex(span_id) || !is_lower_hex(flags) {
            return None;
        }
        let trace_id = TraceId::from_hex(trace_id).ok()?;
        let span_id = SpanId::from_hex(span_id).ok()?;
        if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Parent {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
            trace_state: TraceState::default(),
            remote: true,
        })
    }

    #[test]
    fn agrees_with_the_reference_parser() {
        let mut inputs = vec![
            format!(" {VALID}\t"),
            format!("01{}-", &VALID[2..]),
            format!("01{}--", &VALID[2..]),
            format!("cc{}-x-y", &VALID[2..]),
            format!("{VALID}x"),
            format!("{VALID}-"),
            format!("{}\u{e9}", &VALID[..54]),
            format!("0{}", &VALID[..54]),
            VALID.replace('-', "+"),
        ];
        // Every byte position replaced by a few interesting bytes.
        for at in 0..VALID.len() {
            for c in ['-', '0', 'f', 'g', 'F', ' ', '\u{e9}'] {
                let mut v: Vec<char> = VALID.chars().collect();
                v[at] = c;
                inputs.push(v.into_iter().collect());
            }
            inputs.push(format!("{}{}", &VALID[..at], &VALID[at + 1..]));
            inputs.push(format!("{}-{}", &VALID[..at], &VALID[at..]));
        }
        for input in &inputs {
            assert_eq!(
                parse_traceparent(input, None),
                reference(input),
                "{input:?}"
            );
        }
    }

    #[test]
    fn ratio_sampling_is_by_trace_id_and_parent_based() {
        let ids = Ids::default();
        let half = Sampler::ratio(0.5);
        let sampled = (0..4000)
            .filter(|_| half.sample(ids.trace_id(), None))
            .count();
        assert!((1600..2400).contains(&sampled), "{sampled} of 4000");
        let parent = parse_traceparent(VALID, None).unwrap();
        assert!(Sampler::ratio(0.0).sample(ids.trace_id(), Some(&parent)));
        let off = Sampler {
            ratio: 0.0,
            parent_based: false,
        };
        assert!(!off.sample(ids.trace_id(), Some(&parent)));
    }
}
