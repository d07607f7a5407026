//! Fuzzes SQL sanitization: arbitrary text (lossy UTF-8) and cap.
//!
//! Input layout: two bytes of cap (little-endian; 0xffff: no cap), then
//! the SQL text. Checks: no panic, the cap holds, a capped result is a
//! prefix of the uncapped one with the same operation and table, and no
//! run of ≥ 4 digits from inside a single-quoted string comes out (for
//! texts where servers read strings alike but for backslash escapes; see
//! `literal_digit_runs`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use zerotrace::protocol::sql::{literal_digit_runs, summarize};

fuzz_target!(|data: &[u8]| {
    let Some((cap, text)) = data.split_first_chunk::<2>() else {
        return;
    };
    let max_len = match u16::from_le_bytes(*cap) {
        0xffff => usize::MAX,
        n => usize::from(n % 512),
    };
    let sql = String::from_utf8_lossy(text);
    let capped = summarize(&sql, max_len);
    assert!(capped.sanitized.len() <= max_len, "cap exceeded");
    let full = summarize(&sql, usize::MAX);
    assert!(
        full.sanitized.starts_with(&capped.sanitized),
        "capped output is not a prefix"
    );
    assert_eq!(capped.operation, full.operation);
    assert_eq!(capped.collection, full.collection);
    for run in literal_digit_runs(&sql) {
        assert!(
            !full.sanitized.contains(run),
            "literal digits {run:?} survived: {:?}",
            full.sanitized
        );
        for field in [full.operation, full.collection.as_deref()]
            .into_iter()
            .flatten()
        {
            assert!(!field.contains(run), "literal digits {run:?} in {field:?}");
        }
    }
});
