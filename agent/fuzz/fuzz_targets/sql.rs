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
use zerotrace::protocol::sql::summarize;

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
        for field in [&full.operation, &full.collection].into_iter().flatten() {
            assert!(!field.contains(run), "literal digits {run:?} in {field:?}");
        }
    }
});

/// Runs of ≥ 4 digits inside single-quoted strings that must not come
/// out, for "simple" texts: none of the characters on which servers read
/// strings differently other than by backslash escapes (`"`, `` ` ``, `$`,
/// `#`, `--`, `/*`, and `E'` once there are backslashes). The strings are
/// taken from both readings, with and without backslash escapes ('' is a
/// quote in both), except that a doubtful reading (a backslash outside
/// quotes other than `\N`, or a quote closed right after an odd run of
/// backslashes and followed by a letter or digit) is left out when the
/// other reading is not doubtful and terminates all its strings — the
/// sanitizer's documented rule. Runs that also occur outside the counted
/// strings are skipped.
fn literal_digit_runs(sql: &str) -> Vec<&str> {
    struct Reading {
        inside: Vec<bool>,
        doubtful: bool,
        unterminated: bool,
    }
    fn read(b: &[u8], backslash: bool) -> Reading {
        let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
        let mut r = Reading {
            inside: vec![false; b.len()],
            doubtful: false,
            unterminated: false,
        };
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'\'' => {
                    let start = i;
                    let mut closed = false;
                    i += 1;
                    while i < b.len() {
                        if backslash && b[i] == b'\\' {
                            i += 2;
                        } else if b[i] == b'\'' {
                            if b.get(i + 1) == Some(&b'\'') {
                                i += 2;
                            } else {
                                closed = true;
                                i += 1;
                                break;
                            }
                        } else {
                            i += 1;
                        }
                    }
                    let end = i.min(b.len());
                    r.inside[start..end].fill(true);
                    if closed {
                        let run = b[start + 1..end - 1]
                            .iter()
                            .rev()
                            .take_while(|&&c| c == b'\\')
                            .count();
                        r.doubtful |= run % 2 == 1 && b.get(end).is_some_and(|&c| word(c));
                    } else {
                        r.unterminated = true;
                    }
                }
                b'\\' => {
                    r.doubtful |= b.get(i + 1).is_some_and(|&c| c != b'N');
                    i += 1;
                }
                _ => i += 1,
            }
        }
        r
    }

    let b = sql.as_bytes();
    let backslash = b.contains(&b'\\');
    if b.iter().any(|c| matches!(c, b'"' | b'`' | b'$' | b'#'))
        || sql.contains("--")
        || sql.contains("/*")
        || (backslash && (sql.contains("E'") || sql.contains("e'")))
    {
        return Vec::new();
    }
    let readings = if backslash {
        vec![read(b, false), read(b, true)]
    } else {
        vec![read(b, false)]
    };
    let sound = readings.iter().any(|r| !r.doubtful && !r.unterminated);
    let counted: Vec<&Reading> = readings.iter().filter(|r| !sound || !r.doubtful).collect();
    let inside: Vec<bool> = (0..b.len())
        .map(|i| counted.iter().any(|r| r.inside[i]))
        .collect();
    let outside: Vec<u8> = b
        .iter()
        .zip(&inside)
        .map(|(&c, &ins)| if ins { b' ' } else { c })
        .collect();
    let mut runs = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !(inside[i] && b[i].is_ascii_digit()) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && inside[i] && b[i].is_ascii_digit() {
            i += 1;
        }
        let run = &sql[start..i];
        if run.len() >= 4 && !outside.windows(run.len()).any(|w| w == run.as_bytes()) {
            runs.push(run);
        }
    }
    runs
}
