//! Rendering: the `--format` switch, aligned tables, JSON values, and the
//! formatting of times, durations, bytes and message payloads.

use std::time::{Duration, SystemTime};

use clap::ValueEnum;
use serde_json::Value;

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable table or lines.
    Table,
    /// JSON: one document per command; one object per line for produce
    /// and consume.
    Json,
}

/// Prints rows under headers, columns aligned.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    print!("{}", render_table(headers, rows));
}

/// Rows under headers, columns aligned (two spaces apart), one line each,
/// trailing spaces trimmed.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let widths = column_widths(headers, rows);
    let mut out = render_row(headers, &widths);
    for row in rows {
        out.push_str(&render_row(row, &widths));
    }
    out
}

fn column_widths(headers: &[&str], rows: &[Vec<String>]) -> Vec<usize> {
    let mut widths: Vec<usize> = headers
        .iter()
        .map(|header| header.chars().count())
        .collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    widths
}

/// One line: each cell padded to its column's width (a longer cell
/// overflows), trailing spaces trimmed, `\n` at the end.
fn render_row<S: AsRef<str>>(cells: &[S], widths: &[usize]) -> String {
    let padded: Vec<String> = cells
        .iter()
        .enumerate()
        .map(|(index, cell)| {
            let width = widths.get(index).copied().unwrap_or(0);
            format!("{:<width$}", cell.as_ref())
        })
        .collect();
    let mut line = padded.join("  ").trim_end().to_string();
    line.push('\n');
    line
}

/// A table printed page by page (`--all`): the header and the column
/// widths come from the first page; later rows are padded to those widths
/// (a longer cell overflows its column rather than holding back output).
#[derive(Debug)]
pub struct TableStream {
    headers: Vec<String>,
    widths: Option<Vec<usize>>,
}

impl TableStream {
    /// A table with these headers; nothing is printed yet.
    pub fn new(headers: &[&str]) -> TableStream {
        TableStream {
            headers: headers.iter().map(|header| (*header).to_string()).collect(),
            widths: None,
        }
    }

    /// The text of the next page: with the header if it is the first.
    pub fn render_page(&mut self, rows: &[Vec<String>]) -> String {
        let mut out = String::new();
        let widths = match &self.widths {
            Some(widths) => widths.clone(),
            None => {
                let headers: Vec<&str> = self.headers.iter().map(String::as_str).collect();
                let widths = column_widths(&headers, rows);
                out.push_str(&render_row(&headers, &widths));
                self.widths = Some(widths.clone());
                widths
            }
        };
        for row in rows {
            out.push_str(&render_row(row, &widths));
        }
        out
    }

    /// Prints the next page.
    pub fn print_page(&mut self, rows: &[Vec<String>]) {
        print!("{}", self.render_page(rows));
    }
}

/// `name  value` lines, names aligned.
pub fn render_fields(fields: &[(&str, String)]) -> String {
    let width = fields
        .iter()
        .map(|(name, _)| name.chars().count())
        .max()
        .unwrap_or(0);
    fields
        .iter()
        .map(|(name, value)| format!("{name:<width$}  {value}").trim_end().to_string() + "\n")
        .collect()
}

/// Prints one JSON value on one line.
pub fn print_json(value: &Value) {
    println!("{value}");
}

/// RFC 3339 with milliseconds, UTC.
pub fn time(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// Milliseconds since the Unix epoch as RFC 3339 with milliseconds, UTC.
pub fn time_ms(ms: u64) -> String {
    time(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

/// At most `max` characters of `text` on one line: line breaks and other
/// control characters shown as spaces, `…` at the end when cut (or when
/// `cut_before` says the text was already cut).
pub fn truncate(text: &str, max: usize, cut_before: bool) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() > max {
        let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    } else if cut_before {
        one_line + "…"
    } else {
        one_line
    }
}

/// `1h 2m 3s`-style duration.
pub fn duration(duration: Duration) -> String {
    humantime::format_duration(Duration::from_millis(
        u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
    ))
    .to_string()
}

/// Bytes as UTF-8 text, invalid sequences replaced.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A JSON value as a table cell: strings as they are, `null` (or a
/// missing field) as `-`, anything else as JSON.
pub fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// A JSON number of milliseconds since the epoch as an RFC 3339 cell;
/// `-` when it is not a number.
pub fn time_cell(value: &Value) -> String {
    value.as_u64().map_or_else(|| "-".to_string(), time_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows(cells: &[&[&str]]) -> Vec<Vec<String>> {
        cells
            .iter()
            .map(|row| row.iter().map(|cell| (*cell).to_string()).collect())
            .collect()
    }

    #[test]
    fn tables_align_columns_and_trim() {
        assert_eq!(
            render_table(
                &["A", "LONG_HEADER", "C"],
                &rows(&[&["wide cell", "1", ""], &["x", "", "z"]])
            ),
            "A          LONG_HEADER  C\n\
             wide cell  1\n\
             x                       z\n"
        );
        assert_eq!(render_table(&["ONLY"], &[]), "ONLY\n");
        // Widths count characters, not bytes.
        assert_eq!(
            render_table(&["K", "V"], &rows(&[&["é…", "1"]])),
            "K   V\né…  1\n"
        );
    }

    #[test]
    fn streamed_tables_keep_the_first_page_widths() {
        let mut table = TableStream::new(&["ID", "VALUE"]);
        assert_eq!(
            table.render_page(&rows(&[&["1", "a"], &["22", "b"]])),
            "ID  VALUE\n1   a\n22  b\n"
        );
        assert_eq!(table.render_page(&[]), "");
        assert_eq!(
            table.render_page(&rows(&[&["3", "c"], &["4444", "d"]])),
            "3   c\n4444  d\n"
        );
    }

    #[test]
    fn fields_align_names() {
        assert_eq!(
            render_fields(&[
                ("id", "7".into()),
                ("topic", "t".into()),
                ("empty", String::new())
            ]),
            "id     7\ntopic  t\nempty\n"
        );
    }

    #[test]
    fn truncation() {
        assert_eq!(truncate("short", 10, false), "short");
        assert_eq!(truncate("short", 10, true), "short…");
        assert_eq!(truncate("0123456789abc", 10, false), "012345678…");
        assert_eq!(truncate("a\nb\tc", 10, false), "a b c");
        assert_eq!(truncate("ééééé", 3, false), "éé…");
    }

    #[test]
    fn cells_and_times() {
        assert_eq!(cell(&json!(null)), "-");
        assert_eq!(cell(&json!("text")), "text");
        assert_eq!(cell(&json!(42)), "42");
        assert_eq!(cell(&json!(true)), "true");
        assert_eq!(time_ms(1_451_606_400_000), "2016-01-01T00:00:00.000Z");
        assert_eq!(
            time_cell(&json!(1_451_606_400_123_u64)),
            "2016-01-01T00:00:00.123Z"
        );
        assert_eq!(time_cell(&json!(null)), "-");
    }
}
