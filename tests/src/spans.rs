//! Running the agent against an OTLP receiver, and picking spans out of
//! what it received.

use std::time::Duration;

use crate::{
    Agent,
    otlp::{ReceivedSpan, Receiver},
};

/// How long tests wait for spans.
pub const WAIT: Duration = Duration::from_secs(30);

/// `zerotrace run ARGS` exporting to `rx`, with quick batches.
pub fn agent_for(rx: &Receiver, args: &[&str]) -> Agent {
    Agent::run(
        args,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", rx.protocol_name()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    )
    .unwrap()
}

/// One line per span, for assertion messages.
pub fn briefs(spans: &[ReceivedSpan]) -> String {
    spans.iter().map(|s| format!("\n  {}", s.brief())).collect()
}

/// The one span matching `pred`; fails listing all spans otherwise.
pub fn one<'a>(
    spans: &'a [ReceivedSpan],
    what: &str,
    pred: impl Fn(&ReceivedSpan) -> bool,
) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| pred(s)).collect();
    assert_eq!(found.len(), 1, "want one {what}, got:{}", briefs(spans));
    found[0]
}

/// Whether the span's service.name starts with `prefix`.
pub fn is_service(s: &ReceivedSpan, prefix: &str) -> bool {
    s.service().is_some_and(|n| n.starts_with(prefix))
}

/// No attribute or resource value of any span contains `secret`.
pub fn assert_nowhere(spans: &[ReceivedSpan], secret: &str) {
    for s in spans {
        let all = format!("{:?} {:?} {}", s.attributes, s.resource, s.name);
        assert!(!all.contains(secret), "{secret:?} exported: {}", s.brief());
    }
}
