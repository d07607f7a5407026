//! SQL text: sanitization (literals → `?`) and the operation and table of
//! simple statements, for db.query.text, db.operation.name and
//! db.collection.name. Pure; never panics.

/// What a statement tells about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SqlSummary {
    /// First keyword, upper-case: SELECT, INSERT, UPDATE, DELETE, BEGIN …
    pub operation: Option<String>,
    /// The table of a simple single-table statement.
    pub collection: Option<String>,
    /// The statement with every literal replaced by `?`, capped at
    /// `max_len` bytes on a char boundary.
    pub sanitized: String,
}

/// Summarizes one SQL statement.
pub fn summarize(sql: &str, max_len: usize) -> SqlSummary {
    // Placeholder until the tokenizer lands: keeps only the first keyword.
    let operation = sql
        .split_whitespace()
        .next()
        .map(|w| w.to_ascii_uppercase());
    let _ = max_len;
    SqlSummary {
        operation,
        collection: None,
        sanitized: String::from("?"),
    }
}
