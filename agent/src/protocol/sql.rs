//! SQL text: sanitization (literals → `?`) and the operation and table of
//! simple statements, for db.query.text, db.operation.name and
//! db.collection.name. Pure; never panics; linear in the input.
//!
//! # Finding literals without knowing the dialect
//!
//! The same bytes lex differently in PostgreSQL and MySQL/MariaDB, and in
//! each by server setting (`standard_conforming_strings`,
//! `NO_BACKSLASH_ESCAPES`, `ANSI_QUOTES`, versioned `/*!…*/` comments).
//! A wrong guess lets a literal through: `'C:\', 'p4ss'` is two strings
//! for PostgreSQL but one string and the bare word `p4ss` for MySQL. So
//! the text is lexed once per dialect reading (`DIALECTS`) — only the
//! readings that can differ for this text, usually one — and every byte
//! takes the strictest verdict any reading gives it: a byte some reading
//! sees inside a literal becomes `?`, one some reading sees inside a
//! comment is dropped. Only a byte that every reading sees as plain SQL
//! survives.
//!
//! A reading is *doubtful* when the text cannot be a statement in it (a
//! backslash outside any quotes) or only an odd one: a quote closed right
//! after a backslash and followed by a letter or digit, the mark of
//! MySQL's `'it\'s'` read without backslash escapes. Doubtful readings
//! are ignored when another reading is neither doubtful nor ends inside
//! an unterminated literal or comment; otherwise every reading counts.
//!
//! Hand-written scanners, no regular expressions: one pass per reading
//! for the verdicts, one to build the output, one over the kept tokens
//! for the operation and table. Memory: a verdict byte per input byte
//! (per reading when there are backslashes) and the kept tokens.

mod summaries;

pub use summaries::Summaries;

/// What a statement tells about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SqlSummary {
    /// First keyword, upper-case: SELECT, INSERT, UPDATE, DELETE, BEGIN …
    /// (for WITH, the main statement's verb). None unless it is a known
    /// statement keyword.
    pub operation: Option<&'static str>,
    /// The table of a simple single-table statement, schema-qualified as
    /// written, without quotes.
    pub collection: Option<String>,
    /// The statement with every literal replaced by `?` and comments
    /// removed, whitespace collapsed, capped at `max_len` bytes on a char
    /// boundary.
    pub sanitized: String,
}

/// Summarizes one SQL text (one statement, or several separated by `;`:
/// all are sanitized, the operation is the first's, the collection only
/// given for a single statement).
pub fn summarize(sql: &str, max_len: usize) -> SqlSummary {
    let present = Present::scan(sql.as_bytes());
    let mut readings: Vec<Dialect> = Vec::with_capacity(DIALECTS.len());
    for d in DIALECTS {
        let d = d.normalized(present);
        if !readings.contains(&d) {
            readings.push(d);
        }
    }
    // Without backslashes no reading is doubtful and all count. Otherwise
    // each reading's verdicts are kept apart until it is known which
    // count: doubtful ones only while no sound one is at hand.
    let mut verdict = vec![KEEP; sql.len()];
    let judge = |d: Dialect, verdict: &mut [u8]| {
        let mut judge = Judge::new(sql, verdict);
        let flags = lex(sql, d, |t| judge.token(t));
        judge.finish();
        flags
    };
    let counted: Vec<bool> = if present.backslash {
        let judged: Vec<(Flags, Vec<u8>)> = readings
            .iter()
            .map(|&d| {
                let mut own = vec![KEEP; sql.len()];
                (judge(d, &mut own), own)
            })
            .collect();
        let sound = judged.iter().any(|(f, _)| !f.doubtful && !f.unterminated);
        judged
            .iter()
            .map(|(f, own)| {
                let counts = !sound || !f.doubtful;
                if counts {
                    for (v, &o) in verdict.iter_mut().zip(own) {
                        *v = (*v).max(o);
                    }
                }
                counts
            })
            .collect()
    } else {
        for &d in &readings {
            judge(d, &mut verdict);
        }
        vec![true; readings.len()]
    };
    // The tokens the output is made of: the first reading that counts,
    // with backtick identifiers whole. Its own literals and comments count
    // too.
    let display = readings
        .iter()
        .zip(&counted)
        .find(|(_, c)| **c)
        .map_or(PG, |(&d, _)| d);
    let display = Dialect {
        backtick_ident: display.backtick_ident || present.backtick,
        ..display
    };
    let mut emitter = Emitter::new(sql, &verdict, max_len);
    lex(sql, display, |t| emitter.token(t));
    let (sanitized, sig) = emitter.finish();

    let mut statements = sig.split(|s| s.is_punct(";")).filter(|s| !s.is_empty());
    let first = statements.next();
    let single = statements.next().is_none();
    SqlSummary {
        operation: first.and_then(operation),
        collection: first.filter(|_| single).and_then(collection),
        sanitized,
    }
}

// ---------------------------------------------------------------------------
// Dialect readings

/// How block comments nest and whether MySQL's `/*!…*/` hold SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    /// PostgreSQL: nest to any depth.
    Nested,
    /// MySQL, `/*!NNNNN …*/` for this server's version or older: the
    /// content is SQL. Other comments do not nest.
    MysqlRun,
    /// MySQL, `/*!NNNNN …*/` for a newer server: skipped, nesting one
    /// level (as the server's `consume_comment` does).
    MysqlSkip,
}

/// One way to read SQL text. Fields are the points where servers differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dialect {
    /// PostgreSQL (a bare backslash is always an error).
    pg: bool,
    /// `\` escapes in '…' (MySQL default, PostgreSQL with
    /// standard_conforming_strings off) and in MySQL "…" strings.
    backslash: bool,
    /// E'…' has backslash escapes (PostgreSQL).
    e_strings: bool,
    /// "…" is a string, not an identifier (MySQL without ANSI_QUOTES).
    dq_string: bool,
    /// `…` is an identifier (MySQL).
    backtick_ident: bool,
    /// `#` starts a line comment (MySQL).
    hash_comment: bool,
    /// `--` starts a comment only before whitespace or a control (MySQL).
    dash_needs_space: bool,
    /// CR ends a line comment (PostgreSQL).
    line_end_cr: bool,
    /// NUL ends a line comment (MySQL).
    line_end_nul: bool,
    /// $tag$…$tag$ strings and $1 parameters (PostgreSQL).
    dollar_quotes: bool,
    /// Identifiers may start with `$` (MySQL).
    dollar_ident_start: bool,
    block: Block,
}

const PG: Dialect = Dialect {
    pg: true,
    backslash: false,
    e_strings: true,
    dq_string: false,
    backtick_ident: false,
    hash_comment: false,
    dash_needs_space: false,
    line_end_cr: true,
    line_end_nul: false,
    dollar_quotes: true,
    dollar_ident_start: false,
    block: Block::Nested,
};

const MYSQL: Dialect = Dialect {
    pg: false,
    backslash: true,
    e_strings: false,
    dq_string: true,
    backtick_ident: true,
    hash_comment: true,
    dash_needs_space: true,
    line_end_cr: false,
    line_end_nul: true,
    dollar_quotes: false,
    dollar_ident_start: true,
    block: Block::MysqlRun,
};

/// Every reading considered, the display preference first.
const DIALECTS: [Dialect; 10] = {
    const fn my(backslash: bool, dq_string: bool, block: Block) -> Dialect {
        Dialect {
            backslash,
            dq_string,
            block,
            ..MYSQL
        }
    }
    [
        PG,
        Dialect {
            backslash: true,
            ..PG
        },
        my(true, true, Block::MysqlRun),
        my(true, true, Block::MysqlSkip),
        my(true, false, Block::MysqlRun),
        my(true, false, Block::MysqlSkip),
        my(false, true, Block::MysqlRun),
        my(false, true, Block::MysqlSkip),
        my(false, false, Block::MysqlRun),
        my(false, false, Block::MysqlSkip),
    ]
};

/// Which distinguishing characters the text holds.
#[derive(Debug, Clone, Copy, Default)]
struct Present {
    backslash: bool,
    dquote: bool,
    backtick: bool,
    hash: bool,
    dollar: bool,
    block: bool,
    dashes: bool,
    cr: bool,
    nul: bool,
}

impl Present {
    fn scan(b: &[u8]) -> Self {
        let mut p = Present::default();
        let mut prev = 0u8;
        for &c in b {
            match c {
                b'\\' => p.backslash = true,
                b'"' => p.dquote = true,
                b'`' => p.backtick = true,
                b'#' => p.hash = true,
                b'$' => p.dollar = true,
                b'*' if prev == b'/' => p.block = true,
                b'-' if prev == b'-' => p.dashes = true,
                b'\r' => p.cr = true,
                0 => p.nul = true,
                _ => {}
            }
            prev = c;
        }
        p
    }
}

impl Dialect {
    /// The same reading with the features this text cannot exercise
    /// switched off, so that readings differing only there coincide.
    fn normalized(mut self, p: Present) -> Self {
        if !p.backslash {
            self.backslash = false;
            self.e_strings = false;
            self.pg = false;
        }
        if !p.dquote {
            self.dq_string = false;
        }
        if !p.backtick {
            self.backtick_ident = false;
        }
        if !p.hash {
            self.hash_comment = false;
        }
        if !p.dollar {
            self.dollar_quotes = false;
            self.dollar_ident_start = false;
        }
        if !p.block {
            self.block = Block::Nested;
        }
        if !p.dashes {
            self.dash_needs_space = false;
        }
        if !p.cr {
            self.line_end_cr = false;
        }
        if !p.nul {
            self.line_end_nul = false;
        }
        self
    }
}

// ---------------------------------------------------------------------------
// Lexing

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Space,
    Comment,
    Word,
    Number,
    /// Strings of every kind, and anything unterminated.
    Literal,
    /// "…" read as a string.
    DqString,
    /// "…" or `…` read as an identifier.
    QuotedIdent,
    /// $1
    Param,
    Punct,
}

#[derive(Debug, Clone, Copy)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

fn is_space(c: &u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn is_word_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_word_byte(c: &u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'$') || *c >= 0x80
}

fn skip_while(b: &[u8], mut i: usize, f: impl Fn(&u8) -> bool) -> usize {
    while b.get(i).is_some_and(&f) {
        i += 1;
    }
    i
}

/// Lexes `sql` as `d` reads it, handing each token to `sink`. Every token
/// boundary falls on an ASCII byte or the end, hence on a char boundary.
fn lex(sql: &str, d: Dialect, mut sink: impl FnMut(Token)) -> Flags {
    let b = sql.as_bytes();
    let n = b.len();
    let mut f = Flags::default();
    let mut in_run_comment = false;
    let mut i = 0;
    while i < n {
        let start = i;
        let c = b[i];
        let next = b.get(i + 1).copied();
        let kind = if is_space(&c) {
            i = skip_while(b, i, is_space);
            Kind::Space
        } else if c == b'-'
            && next == Some(b'-')
            && (!d.dash_needs_space || b.get(i + 2).is_none_or(|&x| x <= b' ' || x == 0x7f))
        {
            i = line_end(b, i + 2, d);
            Kind::Comment
        } else if c == b'#' && d.hash_comment {
            i = line_end(b, i + 1, d);
            Kind::Comment
        } else if c == b'/' && next == Some(b'*') {
            let (end, closed) = block_comment(b, i + 2, d, &mut in_run_comment);
            i = end;
            f.unterminated |= !closed;
            Kind::Comment
        } else if in_run_comment && c == b'*' && next == Some(b'/') {
            in_run_comment = false;
            i += 2;
            Kind::Comment
        } else if c == b'\'' {
            let (end, closed) = quoted(b, i + 1, b'\'', d.backslash);
            i = end;
            f.closed_at(b, end, closed);
            Kind::Literal
        } else if c == b'"' {
            let (end, closed) = quoted(b, i + 1, b'"', d.dq_string && d.backslash);
            i = end;
            match (f.closed_at(b, end, closed), d.dq_string) {
                (false, _) => Kind::Literal,
                (true, true) => Kind::DqString,
                (true, false) => Kind::QuotedIdent,
            }
        } else if c == b'`' && d.backtick_ident {
            // No escapes in any reading, so no odd closes either.
            let (end, closed) = quoted(b, i + 1, b'`', false);
            i = end;
            f.unterminated |= !closed;
            if closed {
                Kind::QuotedIdent
            } else {
                Kind::Literal
            }
        } else if c.is_ascii_digit() || (c == b'.' && next.is_some_and(|x| x.is_ascii_digit())) {
            i = number(b, i);
            Kind::Number
        } else if c == b'$' && d.dollar_quotes {
            if next.is_some_and(|x| x.is_ascii_digit()) {
                i = skip_while(b, i + 1, u8::is_ascii_digit);
                Kind::Param
            } else if let Some(open_end) = dollar_tag(b, i) {
                let tag = &sql[i..open_end];
                let close = sql[open_end..].find(tag);
                f.unterminated |= close.is_none();
                i = close.map_or(n, |p| open_end + p + tag.len());
                Kind::Literal
            } else {
                i += 1;
                Kind::Punct
            }
        } else if is_word_start(c) || (c == b'$' && d.dollar_ident_start) {
            i = skip_while(b, i + 1, is_word_byte);
            let word = &b[start..i];
            if b.get(i) == Some(&b'\'') && is_string_prefix(word) {
                let escapes = d.backslash || (d.e_strings && word.eq_ignore_ascii_case(b"e"));
                let (end, closed) = quoted(b, i + 1, b'\'', escapes);
                i = end;
                f.closed_at(b, end, closed);
                Kind::Literal
            } else {
                Kind::Word
            }
        } else {
            if c == b'\\' && (d.pg || next.is_some_and(|x| x != b'N')) {
                // Neither server has a token starting with a backslash
                // (old MySQL's `\N` aside).
                f.doubtful = true;
            }
            i += 1;
            Kind::Punct
        };
        sink(Token {
            kind,
            start,
            end: i,
        });
    }
    f.unterminated |= in_run_comment;
    f
}

/// What lexing a whole text in one reading found.
#[derive(Debug, Default)]
struct Flags {
    /// The text cannot be a statement in this reading, or only an odd one.
    doubtful: bool,
    /// The text ends inside a literal, quoted name or block comment.
    unterminated: bool,
}

impl Flags {
    /// Notes a '…' or "…" token ending at `end` (after its closing quote
    /// if `closed`); returns `closed`.
    fn closed_at(&mut self, b: &[u8], end: usize, closed: bool) -> bool {
        self.unterminated |= !closed;
        self.doubtful |= closed && odd_close(b, end);
        closed
    }
}

/// Whether a quote closing at `end - 1` follows an odd run of backslashes
/// and precedes a word byte: `'it\'s` read without backslash escapes.
fn odd_close(b: &[u8], end: usize) -> bool {
    let Some(quote) = end.checked_sub(1) else {
        return false;
    };
    if !b.get(end).is_some_and(|&c| c != b'$' && is_word_byte(&c)) {
        return false;
    }
    let run = b[..quote].iter().rev().take_while(|&&c| c == b'\\').count();
    run % 2 == 1
}

/// `E'…'`, `X'…'`, `B'…'`, `N'…'` and MySQL charset introducers
/// (`_utf8mb4'…'`).
fn is_string_prefix(word: &[u8]) -> bool {
    matches!(
        word,
        [b'e' | b'E' | b'x' | b'X' | b'b' | b'B' | b'n' | b'N']
    ) || (word.len() > 1 && word[0] == b'_')
}

/// The end of a quoted token whose opening quote precedes `i`, and
/// whether it was closed. A doubled quote stands for itself.
fn quoted(b: &[u8], mut i: usize, quote: u8, backslash: bool) -> (usize, bool) {
    while let Some(&c) = b.get(i) {
        if c == b'\\' && backslash {
            i += 2;
        } else if c == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return (i + 1, true);
            }
        } else {
            i += 1;
        }
    }
    (b.len(), false)
}

/// Digits, a fraction, an exponent, and whatever identifier bytes stick
/// to them (`0x1F`, `1_000`, `1e`, MySQL's `1abc`): all of it one literal.
fn number(b: &[u8], i: usize) -> usize {
    let mut i = skip_while(b, i, u8::is_ascii_digit);
    if b.get(i) == Some(&b'.') {
        i = skip_while(b, i + 1, u8::is_ascii_digit);
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        if b.get(j).is_some_and(u8::is_ascii_digit) {
            i = skip_while(b, j, u8::is_ascii_digit);
        }
    }
    // Not `$`: PostgreSQL reads `1$$x$$` as a number and a string.
    skip_while(b, i, |&c| {
        c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
    })
}

/// The end of a dollar-quote opener (`$$`, `$tag$`) starting at `i`.
fn dollar_tag(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    if b.get(j) == Some(&b'$') {
        return Some(j + 1);
    }
    if !b.get(j).is_some_and(|&c| is_word_start(c)) {
        return None;
    }
    j += 1;
    while let Some(&c) = b.get(j) {
        if c == b'$' {
            return Some(j + 1);
        }
        if !(c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80) {
            return None;
        }
        j += 1;
    }
    None
}

/// Where a line comment whose body starts at `i` ends (the terminator
/// itself is not part of it).
fn line_end(b: &[u8], i: usize, d: Dialect) -> usize {
    let rest = b.get(i..).unwrap_or_default();
    rest.iter()
        .position(|&c| c == b'\n' || (c == b'\r' && d.line_end_cr) || (c == 0 && d.line_end_nul))
        .map_or(b.len(), |p| i + p)
}

/// Where a block comment whose body starts at `i` (after `/*`) ends. For
/// MySQL's `/*!…` that runs, only the opener is the comment; its `*/`
/// is consumed later, when `in_run` is set.
fn block_comment(b: &[u8], i: usize, d: Dialect, in_run: &mut bool) -> (usize, bool) {
    match d.block {
        Block::Nested => skip_block(b, i, usize::MAX),
        Block::MysqlRun | Block::MysqlSkip => {
            let bang = b.get(i) == Some(&b'!');
            let mariadb = b.get(i) == Some(&b'M') && b.get(i + 1) == Some(&b'!');
            if (bang || mariadb) && !*in_run {
                let j = i + if bang { 1 } else { 2 };
                let versioned = mariadb || b.get(j).is_some_and(u8::is_ascii_digit);
                if versioned && d.block == Block::MysqlSkip {
                    skip_block(b, j, usize::from(bang))
                } else {
                    *in_run = true;
                    (skip_while(b, j, u8::is_ascii_digit), true)
                }
            } else {
                skip_block(b, i, 0)
            }
        }
    }
}

/// Skips to the `*/` closing a block comment, letting `/* */` nest up to
/// `max_depth` levels inside; and whether it was closed.
fn skip_block(b: &[u8], mut i: usize, max_depth: usize) -> (usize, bool) {
    let mut depth = 0usize;
    while let Some(&c) = b.get(i) {
        let next = b.get(i + 1).copied();
        if c == b'*' && next == Some(b'/') {
            i += 2;
            if depth == 0 {
                return (i, true);
            }
            depth -= 1;
        } else if c == b'/' && next == Some(b'*') && depth < max_depth {
            depth += 1;
            i += 2;
        } else {
            i += 1;
        }
    }
    (b.len(), false)
}

// ---------------------------------------------------------------------------
// Verdicts

const KEEP: u8 = 0;
const DROP: u8 = 1;
const MASK: u8 = 2;

/// Words after which a double-quoted token names something.
const NAME_AFTER: [&str; 6] = ["FROM", "JOIN", "INTO", "UPDATE", "TABLE", "AS"];

/// Raises the verdicts to what one reading's tokens say about each byte.
struct Judge<'s, 'v> {
    sql: &'s str,
    verdict: &'v mut [u8],
    /// The last token that is neither space nor comment.
    prev: Option<Token>,
    /// A "…" string waiting for the next token to tell whether it stands
    /// where a name does; and whether what came before says so already.
    pending: Option<(Token, bool)>,
}

impl<'s, 'v> Judge<'s, 'v> {
    fn new(sql: &'s str, verdict: &'v mut [u8]) -> Self {
        Self {
            sql,
            verdict,
            prev: None,
            pending: None,
        }
    }

    fn text(&self, t: &Token) -> &'s str {
        &self.sql[t.start..t.end]
    }

    fn mark(&mut self, t: Token, v: u8) {
        for x in &mut self.verdict[t.start..t.end] {
            *x = (*x).max(v);
        }
    }

    fn token(&mut self, t: Token) {
        let significant = !matches!(t.kind, Kind::Space | Kind::Comment);
        let is_dot = |t: &Token, text: &str| t.kind == Kind::Punct && text == ".";
        if significant && let Some((p, name_before)) = self.pending.take() {
            // A string where only a name can stand stays a name; anywhere
            // else it is a value.
            if !name_before && !is_dot(&t, self.text(&t)) {
                self.mark(p, MASK);
            }
        }
        match t.kind {
            Kind::Comment => self.mark(t, DROP),
            Kind::Number | Kind::Literal => self.mark(t, MASK),
            Kind::DqString => {
                let name_before = self.prev.is_some_and(|p| {
                    let text = self.text(&p);
                    is_dot(&p, text)
                        || (p.kind == Kind::Word
                            && NAME_AFTER.iter().any(|w| text.eq_ignore_ascii_case(w)))
                });
                self.pending = Some((t, name_before));
            }
            _ => {}
        }
        if significant {
            self.prev = Some(t);
        }
    }

    fn finish(mut self) {
        if let Some((p, false)) = self.pending.take() {
            self.mark(p, MASK);
        }
    }
}

// ---------------------------------------------------------------------------
// Output

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SigKind {
    Word,
    Quoted,
    Punct,
    /// `?` for a literal, $1 …
    Other,
}

/// Longest word compared with keywords (LOW_PRIORITY, HIGH_PRIORITY).
const KW_MAX: usize = 15;

/// A token that made it into the output, for the statement analysis.
#[derive(Debug, Clone, Copy)]
struct Sig<'a> {
    kind: SigKind,
    text: &'a str,
    /// A word of at most `KW_MAX` bytes, upper-case; else empty.
    upper: [u8; KW_MAX],
    upper_len: u8,
}

impl<'a> Sig<'a> {
    fn new(kind: SigKind, text: &'a str) -> Self {
        let mut upper = [0; KW_MAX];
        let mut upper_len = 0;
        if kind == SigKind::Word
            && let Some(dst) = upper.get_mut(..text.len())
        {
            dst.copy_from_slice(text.as_bytes());
            dst.make_ascii_uppercase();
            upper_len = text.len() as u8;
        }
        Self {
            kind,
            text,
            upper,
            upper_len,
        }
    }

    fn is_kw(&self, w: &str) -> bool {
        self.upper[..usize::from(self.upper_len)] == *w.as_bytes()
    }

    #[inline]
    fn is_punct(&self, p: &str) -> bool {
        self.kind == SigKind::Punct && self.text == p
    }
}

/// Builds the sanitized text from the display tokens and the verdicts,
/// and keeps the tokens that made it into the output.
struct Emitter<'a, 'v> {
    sql: &'a str,
    verdict: &'v [u8],
    max_len: usize,
    out: String,
    sig: Vec<Sig<'a>>,
    /// Space, or a dropped comment, since the last output.
    gap: bool,
    /// The last output is a `?` for a literal.
    after_mask: bool,
}

impl<'a, 'v> Emitter<'a, 'v> {
    fn new(sql: &'a str, verdict: &'v [u8], max_len: usize) -> Self {
        Self {
            sql,
            verdict,
            max_len,
            out: String::with_capacity(sql.len().min(max_len.saturating_add(1))),
            sig: Vec::with_capacity(sql.len() / 4),
            gap: false,
            after_mask: false,
        }
    }

    /// Appends unless already past the cap (cut to it at the end).
    fn push(&mut self, s: &str) {
        if self.out.len() <= self.max_len {
            if self.gap && !self.out.is_empty() {
                self.out.push(' ');
            }
            self.out.push_str(s);
        }
        self.gap = false;
    }

    fn token(&mut self, t: Token) {
        let own = match t.kind {
            Kind::Comment => DROP,
            Kind::Number | Kind::Literal => MASK,
            _ => KEEP,
        };
        let v = self.verdict[t.start..t.end]
            .iter()
            .fold(own, |a, &b| a.max(b));
        if v == MASK {
            if self.gap || !self.after_mask {
                self.push("?");
                self.sig.push(Sig::new(SigKind::Other, "?"));
            }
            self.after_mask = true;
        } else if v == DROP || t.kind == Kind::Space {
            self.gap = true;
        } else {
            let text = &self.sql[t.start..t.end];
            self.push(text);
            let kind = match t.kind {
                Kind::Word => SigKind::Word,
                Kind::QuotedIdent | Kind::DqString => SigKind::Quoted,
                Kind::Punct => SigKind::Punct,
                _ => SigKind::Other,
            };
            self.sig.push(Sig::new(kind, text));
            self.after_mask = false;
        }
    }

    fn finish(self) -> (String, Vec<Sig<'a>>) {
        let mut out = self.out;
        if out.len() > self.max_len {
            let mut cut = self.max_len;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            let trimmed = out.trim_end_matches(' ').len();
            out.truncate(trimmed);
        }
        (out, self.sig)
    }
}

// ---------------------------------------------------------------------------
// Statement analysis

/// Statement keywords reported as db.operation.name.
const VERBS: &[&str] = &[
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "MERGE",
    "REPLACE",
    "UPSERT",
    "WITH",
    "VALUES",
    "TABLE",
    "CREATE",
    "DROP",
    "ALTER",
    "TRUNCATE",
    "RENAME",
    "COMMENT",
    "GRANT",
    "REVOKE",
    "BEGIN",
    "START",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT",
    "RELEASE",
    "END",
    "ABORT",
    "SET",
    "RESET",
    "SHOW",
    "DESCRIBE",
    "DESC",
    "EXPLAIN",
    "ANALYZE",
    "ANALYSE",
    "VACUUM",
    "CALL",
    "DO",
    "EXECUTE",
    "EXEC",
    "PREPARE",
    "DEALLOCATE",
    "DECLARE",
    "FETCH",
    "MOVE",
    "CLOSE",
    "OPEN",
    "COPY",
    "LOCK",
    "UNLOCK",
    "LISTEN",
    "NOTIFY",
    "UNLISTEN",
    "USE",
    "LOAD",
    "HANDLER",
    "CHECKPOINT",
    "CLUSTER",
    "REINDEX",
    "REFRESH",
    "DISCARD",
    "REASSIGN",
    "SECURITY",
    "IMPORT",
    "KILL",
    "FLUSH",
    "OPTIMIZE",
    "REPAIR",
    "CHECK",
    "CHECKSUM",
    "INSTALL",
    "UNINSTALL",
    "PURGE",
    "CHANGE",
    "XA",
];

/// Verbs a WITH clause can lead to.
const MAIN_VERBS: &[&str] = &["SELECT", "INSERT", "UPDATE", "DELETE", "MERGE"];

fn operation(t: &[Sig]) -> Option<&'static str> {
    let i = t.iter().position(|s| !s.is_punct("("))?;
    let verb = *VERBS.iter().find(|v| t[i].is_kw(v))?;
    if verb == "WITH" {
        let mut depth = 0usize;
        for s in &t[i + 1..] {
            if s.is_punct("(") {
                depth += 1;
            } else if s.is_punct(")") {
                depth = depth.saturating_sub(1);
            } else if depth == 0
                && let Some(main) = MAIN_VERBS.iter().find(|v| s.is_kw(v))
            {
                return Some(main);
            }
        }
    }
    Some(verb)
}

/// Words that end a table reference or cannot be a table's name.
const NOT_A_NAME: &[&str] = &[
    "SELECT",
    "FROM",
    "WHERE",
    "JOIN",
    "ON",
    "USING",
    "SET",
    "VALUES",
    "VALUE",
    "AS",
    "GROUP",
    "ORDER",
    "LIMIT",
    "OFFSET",
    "HAVING",
    "WINDOW",
    "FETCH",
    "FOR",
    "LOCK",
    "UNION",
    "INTERSECT",
    "EXCEPT",
    "INTO",
    "RETURNING",
    "DEFAULT",
    "WITH",
    "INNER",
    "LEFT",
    "RIGHT",
    "FULL",
    "CROSS",
    "NATURAL",
    "OUTER",
    "LATERAL",
    "TABLE",
    "ONLY",
    "IF",
    "NOT",
    "EXISTS",
    "CASCADE",
    "RESTRICT",
];

/// What may follow the table of a simple SELECT.
const SELECT_TAIL: &[&str] = &[
    "WHERE", "GROUP", "ORDER", "LIMIT", "OFFSET", "FOR", "HAVING", "WINDOW", "FETCH", "LOCK",
];

struct Cursor<'s, 'a> {
    t: &'s [Sig<'a>],
    i: usize,
}

impl Cursor<'_, '_> {
    fn peek_kw(&self, w: &str) -> bool {
        self.t.get(self.i).is_some_and(|s| s.is_kw(w))
    }

    fn peek_any(&self, ws: &[&str]) -> bool {
        ws.iter().any(|w| self.peek_kw(w))
    }

    fn peek_punct(&self, p: &str) -> bool {
        self.t.get(self.i).is_some_and(|s| s.is_punct(p))
    }

    fn at_end(&self) -> bool {
        self.i >= self.t.len()
    }

    fn kw(&mut self, w: &str) -> bool {
        let hit = self.peek_kw(w);
        self.i += usize::from(hit);
        hit
    }

    fn skip_any(&mut self, ws: &[&str]) {
        while self.peek_any(ws) {
            self.i += 1;
        }
    }

    /// One part of a name: a word, a quoted identifier, `[word]`.
    fn part(&mut self) -> Option<String> {
        let s = self.t.get(self.i)?;
        let name = match s.kind {
            SigKind::Word if !NOT_A_NAME.iter().any(|w| s.is_kw(w)) => {
                self.i += 1;
                s.text.to_string()
            }
            SigKind::Quoted => {
                self.i += 1;
                unquote(s.text)
            }
            SigKind::Punct if s.text == "[" => {
                let w = self.t.get(self.i + 1).filter(|w| w.kind == SigKind::Word)?;
                if !self.t.get(self.i + 2)?.is_punct("]") {
                    return None;
                }
                self.i += 3;
                w.text.to_string()
            }
            _ => return None,
        };
        (!name.is_empty()).then_some(name)
    }

    /// A possibly qualified name: `a`, `a.b`, `"a"."b"`.
    fn name(&mut self) -> Option<String> {
        let mut name = self.part()?;
        while self.peek_punct(".") {
            self.i += 1;
            name.push('.');
            name.push_str(&self.part()?);
        }
        Some(name)
    }

    /// An optional alias: `AS x` or a bare word that is no keyword here.
    fn alias(&mut self, not: &[&str]) -> Option<()> {
        let bare = |c: &Self| {
            c.t.get(c.i)
                .is_some_and(|s| s.kind == SigKind::Word && !not.iter().any(|w| s.is_kw(w)))
        };
        if self.kw("AS") || bare(self) {
            self.part()?;
        }
        Some(())
    }

    fn rest_has(&self, ws: &[&str]) -> bool {
        self.t[self.i.min(self.t.len())..]
            .iter()
            .any(|s| ws.iter().any(|w| s.is_kw(w)))
    }
}

/// Strips the quotes of `"a""b"` or `` `a``b` ``.
fn unquote(quoted: &str) -> String {
    let Some(q) = quoted.chars().next() else {
        return String::new();
    };
    let inner = quoted
        .strip_prefix(q)
        .and_then(|s| s.strip_suffix(q))
        .unwrap_or_default();
    inner.replace(&format!("{q}{q}"), &q.to_string())
}

/// The one table of a simple statement.
fn collection(t: &[Sig]) -> Option<String> {
    let first = t.first()?;
    let mut c = Cursor { t, i: 1 };
    let verb = |w: &str| first.is_kw(w);
    if verb("SELECT") {
        let count = |w: &str| t.iter().filter(|s| s.is_kw(w)).count();
        if count("SELECT") != 1
            || count("FROM") != 1
            || t.iter().any(|s| {
                ["JOIN", "UNION", "INTERSECT", "EXCEPT", "LATERAL"]
                    .iter()
                    .any(|w| s.is_kw(w))
            })
        {
            return None;
        }
        c.i = t.iter().position(|s| s.is_kw("FROM"))? + 1;
        c.kw("ONLY");
        let name = c.name()?;
        c.alias(SELECT_TAIL)?;
        (c.at_end() || c.peek_any(SELECT_TAIL)).then_some(name)
    } else if verb("INSERT") || verb("REPLACE") {
        c.skip_any(&["LOW_PRIORITY", "DELAYED", "HIGH_PRIORITY", "IGNORE"]);
        c.kw("INTO");
        let name = c.name()?;
        let next_ok = c.at_end()
            || c.peek_punct("(")
            || c.peek_any(&["VALUES", "VALUE", "SET", "DEFAULT", "AS", "OVERRIDING"]);
        (next_ok && !c.rest_has(&["SELECT", "FROM", "JOIN", "TABLE"])).then_some(name)
    } else if verb("UPDATE") {
        c.skip_any(&["LOW_PRIORITY", "IGNORE"]);
        c.kw("ONLY");
        let name = c.name()?;
        c.alias(&["SET"])?;
        (c.kw("SET") && !c.rest_has(&["SELECT", "FROM", "JOIN"])).then_some(name)
    } else if verb("DELETE") {
        c.skip_any(&["LOW_PRIORITY", "QUICK", "IGNORE"]);
        if !c.kw("FROM") {
            return None;
        }
        c.kw("ONLY");
        let name = c.name()?;
        let tail = ["WHERE", "RETURNING", "ORDER", "LIMIT"];
        c.alias(&tail)?;
        let next_ok = c.at_end() || c.peek_any(&tail);
        (next_ok && !c.rest_has(&["SELECT", "USING", "JOIN"])).then_some(name)
    } else if verb("CREATE") {
        c.skip_any(&["TEMP", "TEMPORARY", "UNLOGGED", "GLOBAL", "LOCAL"]);
        if !c.kw("TABLE") || (c.kw("IF") && !(c.kw("NOT") && c.kw("EXISTS"))) {
            return None;
        }
        let name = c.name()?;
        let next_ok = c.at_end() || c.peek_punct("(");
        (next_ok && !c.rest_has(&["SELECT", "LIKE"])).then_some(name)
    } else if verb("DROP") {
        c.kw("TEMPORARY");
        if !c.kw("TABLE") || (c.kw("IF") && !c.kw("EXISTS")) {
            return None;
        }
        let name = c.name()?;
        (c.at_end() || c.peek_any(&["CASCADE", "RESTRICT"])).then_some(name)
    } else if verb("ALTER") {
        if !c.kw("TABLE") || (c.kw("IF") && !c.kw("EXISTS")) {
            return None;
        }
        c.kw("ONLY");
        let name = c.name()?;
        (!c.peek_punct(",")).then_some(name)
    } else if verb("TRUNCATE") {
        c.kw("TABLE");
        c.kw("ONLY");
        let name = c.name()?;
        let tail = ["RESTART", "CONTINUE", "CASCADE", "RESTRICT"];
        (c.at_end() || c.peek_any(&tail)).then_some(name)
    } else {
        None
    }
}

#[cfg(any(test, fuzzing))]
#[doc(hidden)]
/// Test oracle, shared by the unit tests and the `sql` fuzz target.
///
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
pub fn literal_digit_runs(sql: &str) -> Vec<&str> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn san(sql: &str) -> String {
        summarize(sql, usize::MAX).sanitized
    }

    fn op(sql: &str) -> Option<String> {
        summarize(sql, usize::MAX).operation.map(str::to_owned)
    }

    fn coll(sql: &str) -> Option<String> {
        summarize(sql, usize::MAX).collection
    }

    #[test]
    fn empty_and_garbage() {
        assert_eq!(summarize("", 100), SqlSummary::default());
        assert_eq!(summarize("   \n\t ", 100), SqlSummary::default());
        let s = summarize("\u{1}\u{2}\u{fffd}\u{fffd} ; ;", 100);
        assert_eq!(s.operation, None);
        assert_eq!(s.collection, None);
        assert_eq!(op("SELEC 1"), None);
        assert_eq!(op("'x' SELECT"), None);
        assert_eq!(op("42"), None);
    }

    #[test]
    fn single_quoted_strings() {
        assert_eq!(
            san("SELECT * FROM t WHERE a = 'x' AND b='y'"),
            "SELECT * FROM t WHERE a = ? AND b=?"
        );
        assert_eq!(san("SELECT 'O''Reilly', 'a'"), "SELECT ?, ?");
        assert_eq!(san("SELECT ''"), "SELECT ?");
        assert_eq!(san("SELECT 'a' 'b'"), "SELECT ? ?");
        assert_eq!(san("SELECT 'ünïcødé 日本'"), "SELECT ?");
        assert_eq!(san("SELECT 'unterminated and more"), "SELECT ?");
        assert_eq!(
            san("SELECT a FROM t WHERE b = '"),
            "SELECT a FROM t WHERE b = ?"
        );
    }

    #[test]
    fn backslash_escapes_both_ways() {
        // MySQL reading: one string. PostgreSQL reading: the string ends at
        // `\'`. The MySQL-only reading wins because `\` outside quotes
        // cannot be PostgreSQL.
        assert_eq!(
            san(r"INSERT INTO t (a, b) VALUES ('it\'s', 'x')"),
            "INSERT INTO t (a, b) VALUES (?, ?)"
        );
        assert_eq!(san(r"SELECT 'a\\', 'b'"), "SELECT ?, ?");
        // PostgreSQL with a trailing backslash: one reading says two strings,
        // the other one long unterminated one — both hidden.
        let s = san(r"SELECT * FROM t WHERE path = 'C:\' AND p = 'hunter22'");
        assert!(!s.contains("hunter22"), "{s}");
        assert!(s.starts_with("SELECT * FROM t WHERE path = ?"), "{s}");
        let s = san(r"SELECT 'C:\', 'pw' || 'sesame123'");
        assert!(!s.contains("sesame123"), "{s}");
        // An odd PostgreSQL reading (string closed after a backslash, right
        // before a letter) is only set aside when the other reading is
        // sound; here it is not (unterminated), so both count.
        let s = san(r"SELECT 'C:\'x, 'k3y_9876'");
        assert!(!s.contains("k3y_9876"), "{s}");
        // Two escaped quotes: the PostgreSQL reading has a bare backslash.
        assert_eq!(
            san(r"UPDATE t SET a = 'say \'hi\'' WHERE id = 7"),
            "UPDATE t SET a = ? WHERE id = ?"
        );
    }

    #[test]
    fn prefixed_strings() {
        assert_eq!(san(r"SELECT E'a\'b', e'x'"), "SELECT ?, ?");
        assert_eq!(
            san("SELECT X'DEADBEEF', x'00', B'1010', b'0', N'näme'"),
            "SELECT ?, ?, ?, ?, ?"
        );
        assert_eq!(
            san("SELECT _utf8mb4'secret' COLLATE utf8mb4_bin"),
            "SELECT ? COLLATE utf8mb4_bin"
        );
        assert_eq!(san("SELECT U&'d\\0061t\\+000061'"), "SELECT U&?");
        // E-string with an escaped quote: not cut short.
        let s = san(r"SELECT E'it\'s 4242 secret' AS x");
        assert_eq!(s, "SELECT ? AS x");
    }

    #[test]
    fn dollar_quotes() {
        assert_eq!(san("SELECT $$it's a secret$$"), "SELECT ?");
        assert_eq!(san("SELECT $tag$ a $$ b $ c $tag$, 1"), "SELECT ?, ?");
        assert_eq!(
            san("DO $body$ BEGIN RAISE NOTICE 'x'; END $body$;"),
            "DO ?;"
        );
        assert_eq!(san("SELECT $x$unterminated"), "SELECT ?");
        assert_eq!(san("SELECT $é$ü$é$"), "SELECT ?");
        // Not dollar quotes: parameters, identifiers containing `$`.
        assert_eq!(
            san("SELECT a$b, $1, $23 FROM t"),
            "SELECT a$b, $1, $23 FROM t"
        );
        assert_eq!(san("SELECT 1$$x$$"), "SELECT ?");
    }

    #[test]
    fn numbers() {
        assert_eq!(
            san("SELECT 1, 23, 4.5, .5, 6., 1e10, 1.5E-3, 2e+7, 0x1F, 0b101, 1_000"),
            "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?"
        );
        assert_eq!(
            san("SELECT t1.col2, x3 FROM t1"),
            "SELECT t1.col2, x3 FROM t1"
        );
        assert_eq!(san("SELECT -5, a-1, a - -2"), "SELECT -?, a-?, a - -?");
        assert_eq!(san("SELECT 12abc"), "SELECT ?");
    }

    #[test]
    fn keywords_stay() {
        assert_eq!(
            san("SELECT * FROM t WHERE a IS NULL AND b = TRUE OR c = false"),
            "SELECT * FROM t WHERE a IS NULL AND b = TRUE OR c = false"
        );
    }

    #[test]
    fn double_quotes() {
        // Name positions keep them; elsewhere they may be MySQL strings.
        assert_eq!(
            san(r#"SELECT "t"."id", "name" FROM "public"."t" JOIN "u" ON "u".id = "t".id"#),
            r#"SELECT "t"."id", ? FROM "public"."t" JOIN "u" ON "u".id = "t".id"#
        );
        assert_eq!(
            san(r#"SELECT * FROM t WHERE name = "alice" AND x = "bo""b""#),
            "SELECT * FROM t WHERE name = ? AND x = ?"
        );
        assert_eq!(
            san(r#"INSERT INTO "t" VALUES ("x")"#),
            r#"INSERT INTO "t" VALUES (?)"#
        );
        assert_eq!(san(r#"SELECT 1 AS "one""#), r#"SELECT ? AS "one""#);
        assert_eq!(san(r#"SELECT "unterminated"#), "SELECT ?");
        // MySQL backslash escape inside "…".
        let s = san(r#"SELECT * FROM t WHERE a = "x\"y 9876" AND b = 1"#);
        assert!(!s.contains("9876"), "{s}");
    }

    #[test]
    fn backticks() {
        assert_eq!(
            san("SELECT `id`, `my col` FROM `db`.`models` WHERE `id` = 3"),
            "SELECT `id`, `my col` FROM `db`.`models` WHERE `id` = ?"
        );
        assert_eq!(
            coll("SELECT `id` FROM `db`.`models` WHERE `id` = 3").as_deref(),
            Some("db.models")
        );
        assert_eq!(coll("SELECT * FROM `we``ird`").as_deref(), Some("we`ird"));
    }

    #[test]
    fn comments_removed() {
        assert_eq!(san("SELECT a -- secret 1234\nFROM t"), "SELECT a FROM t");
        assert_eq!(san("SELECT a /* secret */ FROM t"), "SELECT a FROM t");
        assert_eq!(san("SELECT/**/a/*x*/FROM/* y */t"), "SELECT a FROM t");
        assert_eq!(san("SELECT a # secret\nFROM t"), "SELECT a FROM t");
        assert_eq!(san("/* app:web,user=alice */ SELECT 1"), "SELECT ?");
        assert_eq!(san("SELECT 1 -- trailing"), "SELECT ?");
        assert_eq!(san("SELECT 1 /* unterminated"), "SELECT ?");
        // PostgreSQL nests; MySQL does not: whatever either reads as a
        // comment or literal is gone.
        let s = san("SELECT /* a /* b */ 'x' */ c FROM t");
        assert!(!s.contains('x'), "{s}");
        assert!(s.ends_with("c FROM t"), "{s}");
        // MySQL executable comment: its literals are literals.
        let s = san("/*!40101 SET @x = 'hunter2' */; SELECT 1");
        assert!(!s.contains("hunter2"), "{s}");
        let s = san("/*!99999 'a */ 'p4ssw0rd' */ SELECT 1");
        assert!(!s.contains("p4ssw0rd"), "{s}");
        // `--` without a space is MySQL's double minus.
        assert_eq!(san("SELECT 5--1"), "SELECT ?");
    }

    #[test]
    fn placeholders_stay() {
        assert_eq!(
            san("SELECT * FROM t WHERE a = $1 AND b = ? AND c = :name AND d = %s AND e = %(e)s"),
            "SELECT * FROM t WHERE a = $1 AND b = ? AND c = :name AND d = %s AND e = %(e)s"
        );
    }

    #[test]
    fn in_lists_keep_arity() {
        assert_eq!(
            san("SELECT * FROM t WHERE id IN (1, 2, 3) AND s IN ('a','b')"),
            "SELECT * FROM t WHERE id IN (?, ?, ?) AND s IN (?,?)"
        );
    }

    #[test]
    fn whitespace_collapses() {
        assert_eq!(
            san("  SELECT\n\ta ,\r\n b\tFROM   t  ;  "),
            "SELECT a , b FROM t ;"
        );
    }

    #[test]
    fn cap_on_char_boundary() {
        let s = summarize("SELECT ünï FROM t", 9);
        assert_eq!(s.sanitized, "SELECT ü");
        let s = summarize("SELECT ünï FROM t", 8);
        assert_eq!(s.sanitized, "SELECT");
        assert_eq!(summarize("SELECT 1", 0).sanitized, "");
        assert_eq!(summarize("SELECT 1", 8).sanitized, "SELECT ?");
        assert_eq!(summarize("SELECT 1", 7).sanitized, "SELECT");
        // Cut or not, the summary still comes from the whole text.
        let s = summarize("SELECT a FROM models WHERE id = 1", 6);
        assert_eq!(s.sanitized, "SELECT");
        assert_eq!(s.collection.as_deref(), Some("models"));
    }

    #[test]
    fn multiple_statements() {
        let s = summarize("BEGIN; UPDATE t SET a = 1 WHERE id = 2; COMMIT", 100);
        assert_eq!(
            s.sanitized,
            "BEGIN; UPDATE t SET a = ? WHERE id = ?; COMMIT"
        );
        assert_eq!(s.operation, Some("BEGIN"));
        assert_eq!(s.collection, None);
        let s = summarize(
            "SELECT 1; SELECT 2; UPDATE items SET price = 0 WHERE id = 9100",
            100,
        );
        assert_eq!(
            s.sanitized,
            "SELECT ?; SELECT ?; UPDATE items SET price = ? WHERE id = ?"
        );
        assert_eq!(s.operation, Some("SELECT"));
        // A trailing semicolon is still one statement.
        assert_eq!(
            coll("DELETE FROM items WHERE id = 9001;").as_deref(),
            Some("items")
        );
        assert_eq!(op(";; select 1").as_deref(), Some("SELECT"));
    }

    #[test]
    fn operations() {
        for (sql, want) in [
            ("select 1", "SELECT"),
            ("  Insert into t values (1)", "INSERT"),
            ("(SELECT 1) UNION (SELECT 2)", "SELECT"),
            ("WITH x AS (SELECT 1) SELECT * FROM x", "SELECT"),
            (
                "WITH RECURSIVE r(n) AS (VALUES (1) UNION ALL SELECT n+1 FROM r) SELECT n FROM r",
                "SELECT",
            ),
            (
                "WITH moved AS (DELETE FROM a RETURNING *) INSERT INTO b SELECT * FROM moved",
                "INSERT",
            ),
            ("WITH x AS (SELECT 1)", "WITH"),
            ("START TRANSACTION READ ONLY", "START"),
            ("set names utf8mb4", "SET"),
            ("SHOW TABLES", "SHOW"),
            ("EXPLAIN ANALYZE SELECT 1", "EXPLAIN"),
            ("CALL proc(1)", "CALL"),
            ("/* c */ rollback", "ROLLBACK"),
            ("TRUNCATE items", "TRUNCATE"),
        ] {
            assert_eq!(op(sql).as_deref(), Some(want), "{sql}");
        }
    }

    #[test]
    fn collections() {
        for (sql, want) in [
            ("SELECT a FROM t", Some("t")),
            ("SELECT a FROM t WHERE b = 1 ORDER BY a LIMIT 5", Some("t")),
            (
                "SELECT a FROM public.models AS m WHERE m.a = 1",
                Some("public.models"),
            ),
            ("SELECT a FROM models m", Some("models")),
            (r#"SELECT a FROM "Models""#, Some("Models")),
            (r#"SELECT a FROM "public"."models""#, Some("public.models")),
            (r#"SELECT a FROM "we""ird""#, Some("we\"ird")),
            ("SELECT a FROM [models]", Some("models")),
            ("SELECT a FROM ONLY t", Some("t")),
            ("SELECT a FROM t FOR UPDATE", Some("t")),
            ("SELECT a FROM t1, t2", None),
            ("SELECT a FROM t1 JOIN t2 ON t1.id = t2.id", None),
            ("SELECT a FROM t1 LEFT OUTER JOIN t2 USING (id)", None),
            ("SELECT a FROM (SELECT 1) AS s", None),
            ("SELECT a FROM t WHERE id IN (SELECT id FROM u)", None),
            ("SELECT a FROM t UNION SELECT a FROM u", None),
            ("SELECT 1", None),
            ("SELECT * FROM generate_series(1, 3)", None),
            ("SELECT EXTRACT(YEAR FROM d) FROM t", None),
            ("INSERT INTO t (a) VALUES (1)", Some("t")),
            ("INSERT IGNORE INTO s.t VALUES (1)", Some("s.t")),
            ("INSERT t SET a = 1", Some("t")),
            ("REPLACE INTO t VALUES (1)", Some("t")),
            ("INSERT INTO t DEFAULT VALUES", Some("t")),
            ("INSERT INTO t SELECT * FROM u", None),
            (
                "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = excluded.a",
                Some("t"),
            ),
            ("UPDATE t SET a = 1", Some("t")),
            ("UPDATE ONLY t AS x SET a = 1 WHERE x.b = 2", Some("t")),
            ("UPDATE LOW_PRIORITY t SET a = 1", Some("t")),
            ("UPDATE t SET a = u.a FROM u WHERE u.id = t.id", None),
            ("UPDATE t1, t2 SET t1.a = t2.a", None),
            ("UPDATE t1 JOIN t2 ON t1.id = t2.id SET t1.a = 1", None),
            ("DELETE FROM t", Some("t")),
            ("DELETE FROM t WHERE a = 1 RETURNING *", Some("t")),
            ("DELETE FROM t USING u WHERE t.id = u.id", None),
            ("DELETE t1 FROM t1 JOIN t2", None),
            ("CREATE TABLE t (id int)", Some("t")),
            ("CREATE TABLE IF NOT EXISTS s.t (id int)", Some("s.t")),
            ("CREATE TEMPORARY TABLE t (id int)", Some("t")),
            ("CREATE UNLOGGED TABLE t (id int)", Some("t")),
            ("CREATE TABLE t AS SELECT * FROM u", None),
            ("CREATE TABLE t LIKE u", None),
            ("CREATE INDEX i ON t (a)", None),
            ("DROP TABLE t", Some("t")),
            ("DROP TABLE IF EXISTS no_such_table;", Some("no_such_table")),
            ("DROP TABLE a, b", None),
            ("DROP TABLE t CASCADE", Some("t")),
            ("ALTER TABLE t ADD COLUMN c int", Some("t")),
            ("ALTER TABLE IF EXISTS ONLY s.t RENAME TO u", Some("s.t")),
            ("TRUNCATE t", Some("t")),
            ("TRUNCATE TABLE t RESTART IDENTITY", Some("t")),
            ("TRUNCATE a, b", None),
            ("BEGIN", None),
            ("WITH x AS (SELECT 1) SELECT * FROM x", None),
        ] {
            assert_eq!(coll(sql).as_deref(), want, "{sql}");
        }
    }

    #[test]
    fn pgbench() {
        let s = summarize(
            "UPDATE pgbench_accounts SET abalance = abalance + -1234 WHERE aid = 5678;",
            1000,
        );
        assert_eq!(
            s.sanitized,
            "UPDATE pgbench_accounts SET abalance = abalance + -? WHERE aid = ?;"
        );
        assert_eq!(s.operation, Some("UPDATE"));
        assert_eq!(s.collection.as_deref(), Some("pgbench_accounts"));
        let s = summarize(
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
            1000,
        );
        assert_eq!(
            s.sanitized,
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
        );
        assert_eq!(s.collection.as_deref(), Some("pgbench_accounts"));
        let s = summarize(
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (3, 1, 70213, -4171, CURRENT_TIMESTAMP);",
            1000,
        );
        assert_eq!(
            s.sanitized,
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (?, ?, ?, -?, CURRENT_TIMESTAMP);"
        );
        assert_eq!(s.collection.as_deref(), Some("pgbench_history"));
    }

    #[test]
    fn sqlalchemy() {
        let s = summarize(
            "INSERT INTO models (name, tenant) VALUES (%(name)s, %(tenant)s) RETURNING models.id",
            1000,
        );
        assert_eq!(
            s.sanitized,
            "INSERT INTO models (name, tenant) VALUES (%(name)s, %(tenant)s) RETURNING models.id"
        );
        assert_eq!(s.operation, Some("INSERT"));
        assert_eq!(s.collection.as_deref(), Some("models"));
        let s = summarize(
            "SELECT models.id, models.name FROM models WHERE models.id = $1::INTEGER",
            1000,
        );
        assert_eq!(
            s.sanitized,
            "SELECT models.id, models.name FROM models WHERE models.id = $1::INTEGER"
        );
        assert_eq!(s.collection.as_deref(), Some("models"));
        let s = summarize(
            "SELECT count(*) AS count_1 \nFROM (SELECT models.id AS models_id \nFROM models \nWHERE models.tenant = %(tenant_1)s) AS anon_1",
            1000,
        );
        assert_eq!(s.operation, Some("SELECT"));
        assert_eq!(s.collection, None);
        assert_eq!(op("select pg_catalog.version()").as_deref(), Some("SELECT"));
        assert_eq!(san("select current_schema()"), "select current_schema()");
    }

    #[test]
    fn pymysql_and_mysql_cli() {
        // As PyMySQL interpolates (escape_string: backslashes).
        let s = summarize(
            r"INSERT INTO items (id, name, price) VALUES (9100, 'secret \'name\'', 9.99e0)",
            1000,
        );
        assert_eq!(
            s.sanitized,
            "INSERT INTO items (id, name, price) VALUES (?, ?, ?)"
        );
        assert_eq!(s.collection.as_deref(), Some("items"));
        assert_eq!(
            san("SELECT id, name FROM items WHERE id BETWEEN 10 AND 14 ORDER BY id"),
            "SELECT id, name FROM items WHERE id BETWEEN ? AND ? ORDER BY id"
        );
        assert_eq!(
            san("SET NAMES 'utf8mb4' COLLATE 'utf8mb4_general_ci'"),
            "SET NAMES ? COLLATE ?"
        );
        assert_eq!(
            san("SET @@session.autocommit = ON"),
            "SET @@session.autocommit = ON"
        );
        let s = summarize(
            "LOAD DATA LOCAL INFILE '/tmp/zt-load.csv' INTO TABLE loaded FIELDS TERMINATED BY ','",
            1000,
        );
        assert_eq!(
            s.sanitized,
            "LOAD DATA LOCAL INFILE ? INTO TABLE loaded FIELDS TERMINATED BY ?"
        );
        assert_eq!(s.operation, Some("LOAD"));
        assert_eq!(
            san("INSERT INTO items (id, name, price) VALUES (9001, 'O''Reilly', 3.50)"),
            "INSERT INTO items (id, name, price) VALUES (?, ?, ?)"
        );
        let s = summarize(
            "/*!40101 SET @OLD_CHARACTER_SET_CLIENT=@@CHARACTER_SET_CLIENT */;",
            1000,
        );
        assert_eq!(s.sanitized, ";");
    }

    #[test]
    fn psql() {
        let s = summarize(
            "SELECT c.oid,\n  n.nspname,\n  c.relname\nFROM pg_catalog.pg_class c\n     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace\nWHERE c.relname OPERATOR(pg_catalog.~) '^(models)$' COLLATE pg_catalog.default\n  AND pg_catalog.pg_table_is_visible(c.oid)\nORDER BY 2, 3;",
            1000,
        );
        assert_eq!(
            s.sanitized,
            "SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relname OPERATOR(pg_catalog.~) ? COLLATE pg_catalog.default AND pg_catalog.pg_table_is_visible(c.oid) ORDER BY ?, ?;"
        );
        assert_eq!(s.collection, None);
        assert_eq!(
            san("SELECT g, repeat('x', 100) FROM generate_series(1, 300) g;"),
            "SELECT g, repeat(?, ?) FROM generate_series(?, ?) g;"
        );
        assert_eq!(san("NOTIFY zt_channel, 'hello';"), "NOTIFY zt_channel, ?;");
        assert_eq!(san("SELECT 1 / 0;"), "SELECT ? / ?;");
        // `#` is an operator to PostgreSQL but a comment to MySQL: what
        // follows on the line is dropped (its literals still hidden).
        assert_eq!(
            san("SELECT a::text, b->>'k', c #> '{a,b}' FROM t\nWHERE d = 1"),
            "SELECT a::text, b->>?, c ? WHERE d = ?"
        );
    }

    #[test]
    fn django_style_quoting() {
        let s = summarize(
            r#"SELECT "app_model"."id", "app_model"."name" FROM "app_model" WHERE "app_model"."id" = 1 LIMIT 21"#,
            1000,
        );
        assert_eq!(
            s.sanitized,
            r#"SELECT "app_model"."id", "app_model"."name" FROM "app_model" WHERE "app_model"."id" = ? LIMIT ?"#
        );
        assert_eq!(s.collection.as_deref(), Some("app_model"));
        assert_eq!(
            coll(r#"UPDATE "app_model" SET "name" = 'x' WHERE "app_model"."id" = 1"#).as_deref(),
            Some("app_model")
        );
    }

    /// Statements carrying secrets in every literal form; none may survive.
    #[test]
    fn secrets_never_survive() {
        let secrets = [
            "hunter2",
            "s3cr3t",
            "4111111111111111",
            "alice@example.com",
            "p@ss",
            "tok_live",
            "9999",
            "日本語",
            "zt-secret-literal",
        ];
        let statements = [
            "INSERT INTO users (email, pw) VALUES ('alice@example.com', 'hunter2')",
            "SELECT * FROM cards WHERE pan = 4111111111111111",
            "SELECT * FROM cards WHERE pan = '4111111111111111'",
            "UPDATE users SET pw = E'hunter2\\'s' WHERE id = 9999",
            r"UPDATE users SET pw = 'hunter2\'s', note = 's3cr3t' WHERE id = 9999",
            r"UPDATE users SET pw = 'C:\', note = 's3cr3t'",
            r"UPDATE users SET pw = 'C:\\', note = 's3cr3t'",
            r"SELECT 'a\', 's3cr3t', '\'hunter2'",
            "SELECT $$hunter2$$, $q$s3cr3t$q$",
            "SELECT $a$ ' $a$ hunter2 '",
            "SELECT 'x' -- s3cr3t\n, 'hunter2'",
            "SELECT 'x' # s3cr3t\n, 'hunter2'",
            "SELECT 1 # 'x\n 'hunter2'",
            "SELECT 1 /* s3cr3t */, 'hunter2'",
            "SELECT /* /* */ 'hunter2' */ 1",
            "SELECT /* /* */ ' */ s3cr3t '",
            "SELECT 1--'\n', 's3cr3t'",
            "SELECT 1 -- x\r 's3cr3t'",
            "SELECT \"hunter2\" , \"s3cr3t\"",
            "SELECT * FROM t WHERE a = \"hunter2\"",
            "SELECT * FROM t WHERE a = \"x\\\" , 's3cr3t' , \"",
            "SELECT `a'` , 's3cr3t'",
            "SELECT X'9999', B'9999', N'hunter2', _utf8mb4'hunter2', _binary 'tok_live'",
            "SELECT 9999.9999e9999, -9999, +9999",
            "SELECT 'hunter2",
            "SELECT \"hunter2",
            "SELECT $$hunter2",
            "SELECT E'\\\\' , 'hunter2'",
            "SELECT '日本語'",
            "INSERT INTO t VALUES ('p@ss'), ('tok_live')",
            "/*!50000 'x */ 'hunter2' */",
            "/*M! /* ' */ 's3cr3t' */",
            "SELECT 'x'\0 # y\n 'hunter2'",
            "SET PASSWORD = 'hunter2'",
            "CREATE USER bob IDENTIFIED BY 'hunter2'",
            "ALTER USER bob WITH PASSWORD 'hunter2'",
            "SELECT * FROM t WHERE a = 'zt-secret-literal' AND b IN (9999, 'hunter2')",
            "SELECT a FROM t WHERE b = @'hunter2' OR c = @\"s3cr3t\"",
        ];
        for sql in statements {
            for max_len in [usize::MAX, 40, 10] {
                let s = summarize(sql, max_len);
                for secret in secrets {
                    assert!(!s.sanitized.contains(secret), "{sql:?} → {:?}", s.sanitized);
                    for field in [s.operation, s.collection.as_deref()].into_iter().flatten() {
                        assert!(!field.contains(secret), "{sql:?} → {field:?}");
                    }
                }
            }
        }
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_sweep() {
        const PIECES: &[&str] = &[
            "'", "''", "\"", "`", "\\", "$", "$$", "$a$", "$1", "/*", "*/", "/*!", "/*!50000",
            "/*M!", "--", "-- ", "#", "\n", "\r", "\0", " ", "\t", ".", ",", "(", ")", ";", "?",
            ":", "=", "-", "+", "e", "E", "x", "N", "_cs", "0x", "1", "12", "1234", "98765",
            "SELECT", "FROM", "INTO", "UPDATE", "TABLE", "WITH", "t1", "name", "é", "日本", "🦀",
            "\u{fffd}", "[", "]", "@", "%s", "AS",
        ];
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for _ in 0..30_000 {
            let mut sql = String::new();
            for _ in 0..rng.below(24) {
                sql.push_str(PIECES[rng.below(PIECES.len())]);
            }
            let max_len = match rng.below(4) {
                0 => usize::MAX,
                _ => rng.below(64),
            };
            let s = summarize(&sql, max_len);
            assert!(s.sanitized.len() <= max_len, "{sql:?}");
            assert_eq!(s.sanitized, s.sanitized.trim(), "{sql:?}");
            for run in literal_digit_runs(&sql) {
                assert!(!s.sanitized.contains(run), "{sql:?} → {:?}", s.sanitized);
            }
            let full = summarize(&sql, usize::MAX);
            assert!(full.sanitized.starts_with(&s.sanitized), "{sql:?}");
            // Without backslashes every reading always counts, and the
            // output reads as itself. (With them, dropping the text's
            // doubtful readings can leave a form that no longer drops them.)
            if sql.contains('\\') {
                continue;
            }
            assert_eq!(
                summarize(&full.sanitized, usize::MAX).sanitized,
                full.sanitized,
                "not idempotent: {sql:?}"
            );
        }
    }

    #[test]
    fn long_inputs_stay_linear() {
        // Pathological shapes for the nested-comment, dollar-tag and
        // quote scanners; quadratic behaviour would take minutes here.
        let n = 200_000;
        for sql in [
            "/*".repeat(n),
            "$a".repeat(n),
            format!("$abcdef$ {}", "$abcde".repeat(n)),
            "'\\".repeat(n),
            "\"\"".repeat(n) + "\"",
            "a.\"x\" ".repeat(n),
            "--\n".repeat(n),
            "1e".repeat(n),
        ] {
            let s = summarize(&sql, 2048);
            assert!(s.sanitized.len() <= 2048);
        }
    }
}
