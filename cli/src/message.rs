//! `dmq message get|query|delete`: stored messages through the admin API.
//!
//! - `get ID` searches every topic; shows the fields, headers, a payload
//!   preview and the message's state in each group.
//! - `query --topic T <selector>` lists messages page by page (`--all`
//!   follows the cursor to the end, printing as it goes).
//! - `delete --topic T <selector>` counts first (a dry run), then asks for
//!   the topic name before deleting, unless `--yes` (scripts) or
//!   `--dry-run`.
//!
//! A selector is exactly one of `--id`, `--key`, `--from/--to` (a time
//! range: RFC 3339 or ms since the epoch, `--to` exclusive) and
//! `--partition/--from-offset/--to-offset` (`--to-offset` exclusive).

use std::io::{BufRead, IsTerminal, Write};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use serde_json::{json, Map, Value};

use crate::admin::{segment, Admin};
use crate::output::{
    cell, print_json, render_fields, render_table, time_cell, time_ms, truncate, Format,
    TableStream,
};
use crate::Cli;

/// Characters of a preview in the `message query` table.
const PREVIEW_CHARS: usize = 60;
/// Characters of a key in the `message query` table.
const KEY_CHARS: usize = 32;

/// Message commands.
#[derive(Debug, Subcommand)]
pub enum MessageCommand {
    /// Show one message (searched in every topic): fields, headers,
    /// preview and its state in each group.
    Get {
        /// Message id (32 hex digits, as `dmq produce` prints it).
        message_id: String,
        /// Force the preview format (default: json if it parses, else
        /// text if UTF-8, else hex).
        #[arg(long, value_enum)]
        preview: Option<PreviewFormat>,
    },
    /// List a topic's messages matching a selector.
    Query(QueryArgs),
    /// Delete a topic's messages matching a selector (durably; they are
    /// never delivered again).
    Delete(DeleteArgs),
}

/// `--preview`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PreviewFormat {
    /// Hex dump of the bytes.
    Hex,
    /// UTF-8 text.
    Text,
    /// JSON.
    Json,
}

impl PreviewFormat {
    fn name(self) -> &'static str {
        match self {
            PreviewFormat::Hex => "hex",
            PreviewFormat::Text => "text",
            PreviewFormat::Json => "json",
        }
    }
}

/// Which messages: exactly one of id, key, time range, offset range.
#[derive(Debug, Clone, Args)]
#[command(group(
    ArgGroup::new("selector")
        .required(true)
        .args(["id", "key", "from", "partition"])
))]
pub struct Selector {
    /// The message with this id.
    #[arg(long)]
    pub id: Option<String>,
    /// Messages with this key (text).
    #[arg(long)]
    pub key: Option<String>,
    /// Time range start, inclusive: RFC 3339 (2016-01-01T00:00:00Z,
    /// 2016-01-01, 2016-01-01T01:00:00+01:00) or ms since the epoch.
    #[arg(long, requires = "to", value_parser = parse_time_ms)]
    pub from: Option<u64>,
    /// Time range end, exclusive (same forms as --from).
    #[arg(long, requires = "from", value_parser = parse_time_ms)]
    pub to: Option<u64>,
    /// Partition of an offset range (with --from-offset and --to-offset).
    #[arg(long, requires_all = ["from_offset", "to_offset"])]
    pub partition: Option<u32>,
    /// Offset range start, inclusive.
    #[arg(long, requires = "partition")]
    pub from_offset: Option<u64>,
    /// Offset range end, exclusive.
    #[arg(long, requires = "partition")]
    pub to_offset: Option<u64>,
}

/// `dmq message query` arguments.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Topic.
    #[arg(long)]
    pub topic: String,
    /// Which messages.
    #[command(flatten)]
    pub selector: Selector,
    /// Messages per request (1 to 1000); with --all, the page size.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
    /// Follow the cursor to the last page, printing as it goes (JSON: one
    /// message per line).
    #[arg(long)]
    pub all: bool,
    /// Start at this page (the `next_cursor` of a previous query).
    #[arg(long, conflicts_with = "all")]
    pub cursor: Option<String>,
    /// Force the preview format.
    #[arg(long, value_enum)]
    pub preview: Option<PreviewFormat>,
}

/// `dmq message delete` arguments.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Topic.
    #[arg(long)]
    pub topic: String,
    /// Which messages.
    #[command(flatten)]
    pub selector: Selector,
    /// Only count the messages that would be deleted.
    #[arg(long, conflicts_with = "yes")]
    pub dry_run: bool,
    /// Delete without asking (for scripts).
    #[arg(long)]
    pub yes: bool,
}

/// Parses a time: ms since the epoch (digits only), or RFC 3339 — `Z` or a
/// `±HH:MM` offset (none means UTC), fractional seconds allowed, `T` or a
/// space between date and time; a date alone means its midnight UTC.
pub fn parse_time_ms(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let invalid = |why: &str| {
        format!(
            "invalid time `{text}`: {why} (expected RFC 3339 like 2016-01-01T00:00:00Z, or ms since the epoch)"
        )
    };
    if text.is_empty() {
        return Err(invalid("empty"));
    }
    if text.bytes().all(|byte| byte.is_ascii_digit()) {
        return text.parse::<u64>().map_err(|_| invalid("too large"));
    }
    let (local, offset_secs) = split_offset(text).map_err(|why| invalid(&why))?;
    let local = if local.len() == 10 {
        format!("{local}T00:00:00")
    } else {
        local.to_string()
    };
    let parsed =
        humantime::parse_rfc3339_weak(&local).map_err(|error| invalid(&error.to_string()))?;
    let since_epoch = parsed
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| invalid("before 1970"))?;
    let millis = i128::try_from(since_epoch.as_millis()).map_err(|_| invalid("too large"))?;
    let utc = millis - i128::from(offset_secs) * 1000;
    u64::try_from(utc).map_err(|_| invalid("before 1970"))
}

/// Splits a trailing zone off: `Z` → 0, `+01:00` → 3600, none → 0.
fn split_offset(text: &str) -> Result<(&str, i64), String> {
    if let Some(local) = text.strip_suffix(['Z', 'z']) {
        return Ok((local, 0));
    }
    let bytes = text.as_bytes();
    let n = bytes.len();
    // A zone needs a time before it: the `-` of a date is not one.
    if n > 16 && (bytes[n - 6] == b'+' || bytes[n - 6] == b'-') && bytes[n - 3] == b':' {
        let hours: i64 = text[n - 5..n - 3]
            .parse()
            .map_err(|_| "bad zone offset".to_string())?;
        let minutes: i64 = text[n - 2..]
            .parse()
            .map_err(|_| "bad zone offset".to_string())?;
        if hours > 23 || minutes > 59 {
            return Err("bad zone offset".to_string());
        }
        let sign = if bytes[n - 6] == b'-' { -1 } else { 1 };
        return Ok((&text[..n - 6], sign * (hours * 3600 + minutes * 60)));
    }
    Ok((text, 0))
}

impl Selector {
    /// The selector's fields, named as in the API.
    fn fields(&self) -> Result<Vec<(&'static str, Value)>> {
        let mut fields = Vec::new();
        if let Some(id) = &self.id {
            fields.push(("id", json!(id)));
        }
        if let Some(key) = &self.key {
            fields.push(("key", json!(key)));
        }
        if let (Some(from), Some(to)) = (self.from, self.to) {
            if from >= to {
                bail!("--from must be before --to (--to is exclusive)");
            }
            fields.push(("from_ms", json!(from)));
            fields.push(("to_ms", json!(to)));
        }
        if let (Some(partition), Some(from), Some(to)) =
            (self.partition, self.from_offset, self.to_offset)
        {
            if from >= to {
                bail!("--from-offset must be below --to-offset (--to-offset is exclusive)");
            }
            fields.push(("partition", json!(partition)));
            fields.push(("from_offset", json!(from)));
            fields.push(("to_offset", json!(to)));
        }
        Ok(fields)
    }

    /// As query parameters.
    pub fn query(&self) -> Result<Vec<(&'static str, String)>> {
        Ok(self
            .fields()?
            .into_iter()
            .map(|(name, value)| {
                (
                    name,
                    value
                        .as_str()
                        .map_or_else(|| value.to_string(), str::to_string),
                )
            })
            .collect())
    }

    /// As the JSON body of a deletion.
    pub fn body(&self, dry_run: bool) -> Result<Value> {
        let mut body: Map<String, Value> = self
            .fields()?
            .into_iter()
            .map(|(name, value)| (name.to_string(), value))
            .collect();
        body.insert("dry_run".to_string(), json!(dry_run));
        Ok(Value::Object(body))
    }

    /// In words, for messages to the user (times in RFC 3339).
    fn describe(&self) -> String {
        match (&self.id, &self.key, self.from, self.to) {
            (Some(id), _, _, _) => format!("id {id}"),
            (_, Some(key), _, _) => format!("key {key:?}"),
            (_, _, Some(from), Some(to)) => format!("from {} to {}", time_ms(from), time_ms(to)),
            _ => format!(
                "partition {} offsets {}..{}",
                self.partition.unwrap_or(0),
                self.from_offset.unwrap_or(0),
                self.to_offset.unwrap_or(0)
            ),
        }
    }
}

/// Runs a message command.
pub fn run(cli: &Cli, command: &MessageCommand) -> Result<()> {
    let admin = Admin::new(cli);
    match command {
        MessageCommand::Get {
            message_id,
            preview,
        } => get(cli, &admin, message_id, *preview),
        MessageCommand::Query(args) => query(cli, &admin, args),
        MessageCommand::Delete(args) => delete(cli, &admin, args),
    }
}

fn get(cli: &Cli, admin: &Admin, message_id: &str, preview: Option<PreviewFormat>) -> Result<()> {
    let mut params = Vec::new();
    if let Some(format) = preview {
        params.push(("format", format.name().to_string()));
    }
    let answer = admin.get(&format!("/api/messages/{}", segment(message_id)), &params)?;
    match cli.format {
        Format::Json => print_json(&answer),
        Format::Table => print!("{}", render_message(&answer)),
    }
    Ok(())
}

/// The table form of `GET /api/messages/{id}`: fields, headers, preview,
/// then one row per group.
pub fn render_message(answer: &Value) -> String {
    let message = &answer["message"];
    let key = match (&message["key"], &message["key_hex"]) {
        (Value::String(key), Value::String(hex)) => format!("{key} (hex {hex})"),
        (_, Value::String(hex)) => format!("hex {hex}"),
        _ => "-".to_string(),
    };
    let mut out = render_fields(&[
        ("id", cell(&message["message_id"])),
        ("topic", cell(&message["topic"])),
        ("partition", cell(&message["partition"])),
        ("offset", cell(&message["offset"])),
        ("time", time_cell(&message["timestamp_ms"])),
        ("key", key),
        ("size", format!("{} bytes", cell(&message["size_bytes"]))),
        ("deliver_at", time_cell(&message["deliver_at_ms"])),
        ("expires_at", time_cell(&message["expires_at_ms"])),
        ("deleted", cell(&message["deleted"])),
    ]);
    match message["headers"].as_object() {
        Some(headers) if !headers.is_empty() => {
            out.push_str("headers:\n");
            for (name, value) in headers {
                out.push_str(&format!("  {name}: {}\n", cell(value)));
            }
        }
        _ => out.push_str("headers: (none)\n"),
    }
    let preview = &message["preview"];
    let truncated = preview["truncated"].as_bool().unwrap_or(false);
    out.push_str(&format!(
        "preview ({}{}):\n",
        cell(&preview["format"]),
        if truncated { ", truncated" } else { "" }
    ));
    let text = preview["text"].as_str().unwrap_or("");
    out.push_str(text);
    if !text.ends_with('\n') {
        out.push('\n');
    }
    let groups = answer["groups"].as_array().map_or(&[][..], Vec::as_slice);
    if groups.is_empty() {
        out.push_str("groups: (none)\n");
    } else {
        let rows: Vec<Vec<String>> = groups
            .iter()
            .map(|group| {
                vec![
                    cell(&group["group"]),
                    cell(&group["member"]),
                    cell(&group["acked"]),
                    cell(&group["attempts"]),
                    cell(&group["in_flight"]),
                    time_cell(&group["next_delivery_ms"]),
                    cell(&group["dead_lettered"]),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&render_table(
            &[
                "GROUP",
                "MEMBER",
                "ACKED",
                "ATTEMPTS",
                "IN_FLIGHT",
                "NEXT_DELIVERY",
                "DEAD_LETTERED",
            ],
            &rows,
        ));
    }
    out
}

/// Headers of the `message query` table.
pub const QUERY_HEADERS: [&str; 7] = [
    "PARTITION",
    "OFFSET",
    "TIME",
    "ID",
    "KEY",
    "DELETED",
    "PREVIEW",
];

/// One `message query` row: partition, offset, time, id, key (text, else
/// `0x` and hex), deleted, preview (one line, truncated).
pub fn query_row(message: &Value) -> Vec<String> {
    let key = match (&message["key"], &message["key_hex"]) {
        (Value::String(key), _) => truncate(key, KEY_CHARS, false),
        (_, Value::String(hex)) => truncate(&format!("0x{hex}"), KEY_CHARS, false),
        _ => "-".to_string(),
    };
    let preview = &message["preview"];
    vec![
        cell(&message["partition"]),
        cell(&message["offset"]),
        time_cell(&message["timestamp_ms"]),
        cell(&message["message_id"]),
        key,
        cell(&message["deleted"]),
        truncate(
            preview["text"].as_str().unwrap_or(""),
            PREVIEW_CHARS,
            preview["truncated"].as_bool().unwrap_or(false),
        ),
    ]
}

fn query(cli: &Cli, admin: &Admin, args: &QueryArgs) -> Result<()> {
    let path = format!("/api/topics/{}/messages", segment(&args.topic));
    let mut params = args.selector.query()?;
    params.push(("limit", args.limit.to_string()));
    if let Some(format) = args.preview {
        params.push(("format", format.name().to_string()));
    }
    let mut table = TableStream::new(&QUERY_HEADERS);
    let mut cursor = args.cursor.clone();
    let mut total = 0usize;
    loop {
        let mut page_params = params.clone();
        if let Some(cursor) = &cursor {
            page_params.push(("cursor", cursor.clone()));
        }
        let answer = admin.get(&path, &page_params)?;
        let messages = answer["messages"].as_array().map_or(&[][..], Vec::as_slice);
        let next = answer["next_cursor"].as_str().map(str::to_string);
        total += messages.len();
        match (cli.format, args.all) {
            (Format::Json, false) => print_json(&answer),
            (Format::Json, true) => messages.iter().for_each(print_json),
            (Format::Table, _) => {
                // With --all, a page may be empty (the broker bounds how far
                // one page scans): the header waits for the first rows.
                let rows: Vec<Vec<String>> = messages.iter().map(query_row).collect();
                if !args.all || !rows.is_empty() || (total == 0 && next.is_none()) {
                    table.print_page(&rows);
                }
            }
        }
        std::io::stdout().flush().context("writing stdout")?;
        match next {
            Some(next) if args.all && cursor.as_deref() != Some(next.as_str()) => {
                cursor = Some(next);
            }
            Some(next) => {
                if cli.format == Format::Table {
                    println!("more: add --all, or --cursor {next}");
                }
                break;
            }
            None => break,
        }
    }
    if cli.format == Format::Table && args.all {
        println!("{total} message{}", if total == 1 { "" } else { "s" });
    }
    Ok(())
}

fn delete(cli: &Cli, admin: &Admin, args: &DeleteArgs) -> Result<()> {
    let path = format!("/api/topics/{}/messages/delete", segment(&args.topic));
    if args.yes {
        return report_deletion(
            cli,
            &args.topic,
            &admin.post(&path, &args.selector.body(false)?)?,
        );
    }
    let dry = admin.post(&path, &args.selector.body(true)?)?;
    let matched = dry["matched"].as_u64().unwrap_or(0);
    if args.dry_run {
        match cli.format {
            Format::Json => print_json(&dry),
            Format::Table => println!(
                "{} in {} ({}); dry run: nothing deleted",
                matching(matched),
                args.topic,
                args.selector.describe()
            ),
        }
        return Ok(());
    }
    // Interactive: count, then ask for the topic name.
    if matched == 0 {
        match cli.format {
            Format::Json => print_json(&dry),
            Format::Table => println!("0 messages match in {}: nothing to delete", args.topic),
        }
        return Ok(());
    }
    eprintln!(
        "{} in {} ({})",
        matching(matched),
        args.topic,
        args.selector.describe()
    );
    eprint!("type the topic name to delete them: ");
    std::io::stderr().flush().context("writing stderr")?;
    let mut answer = String::new();
    let read = std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("reading the confirmation from stdin")?;
    if read == 0 || !std::io::stdin().is_terminal() {
        // Not typed at a terminal: end the prompt's line.
        eprintln!();
    }
    if answer.trim_end_matches(['\n', '\r']) != args.topic {
        bail!("not confirmed: nothing deleted (type the topic name exactly, or pass --yes)");
    }
    let done = admin.post(&path, &args.selector.body(false)?)?;
    report_deletion(cli, &args.topic, &done)
}

fn report_deletion(cli: &Cli, topic: &str, answer: &Value) -> Result<()> {
    match cli.format {
        Format::Json => print_json(answer),
        Format::Table => {
            let matched = answer["matched"].as_u64().unwrap_or(0);
            println!("deleted {matched} message{} from {topic}", plural(matched));
        }
    }
    Ok(())
}

/// `1 message matches`, `2 messages match`.
fn matching(count: u64) -> String {
    if count == 1 {
        "1 message matches".to_string()
    } else {
        format!("{count} messages match")
    }
}

fn plural(count: u64) -> &'static str {
    if count == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_ms_and_rfc3339() {
        assert_eq!(parse_time_ms("0"), Ok(0));
        assert_eq!(parse_time_ms("1451606400000"), Ok(1_451_606_400_000));
        assert_eq!(parse_time_ms("2016-01-01T00:00:00Z"), Ok(1_451_606_400_000));
        assert_eq!(parse_time_ms("2017-01-01T00:00:00Z"), Ok(1_483_228_800_000));
        assert_eq!(parse_time_ms("2016-01-01"), Ok(1_451_606_400_000));
        assert_eq!(parse_time_ms("2016-01-01 00:00:00"), Ok(1_451_606_400_000));
        assert_eq!(
            parse_time_ms("2016-01-01T00:00:00.250Z"),
            Ok(1_451_606_400_250)
        );
        assert_eq!(
            parse_time_ms("2016-01-01T01:00:00+01:00"),
            Ok(1_451_606_400_000)
        );
        assert_eq!(
            parse_time_ms("2015-12-31T19:30:00-04:30"),
            Ok(1_451_606_400_000)
        );
        assert_eq!(
            parse_time_ms(" 2016-01-01T00:00:00z "),
            Ok(1_451_606_400_000)
        );
    }

    #[test]
    fn bad_times_are_refused() {
        for text in [
            "",
            "yesterday",
            "2016-13-01T00:00:00Z",
            "2016-01-01T25:00:00Z",
            "2016-01-01T00:00:00+25:00",
            "1970-01-01T00:00:00+01:00",
            "99999999999999999999999",
            "-5",
        ] {
            let error = parse_time_ms(text).expect_err(text);
            assert!(error.contains("invalid time"), "{error}");
        }
    }

    fn selector() -> Selector {
        Selector {
            id: None,
            key: None,
            from: None,
            to: None,
            partition: None,
            from_offset: None,
            to_offset: None,
        }
    }

    #[test]
    fn selectors_as_query_and_body() {
        let range = Selector {
            from: Some(1_451_606_400_000),
            to: Some(1_483_228_800_000),
            ..selector()
        };
        assert_eq!(
            range.query().expect("valid"),
            vec![
                ("from_ms", "1451606400000".to_string()),
                ("to_ms", "1483228800000".to_string())
            ]
        );
        assert_eq!(
            range.body(false).expect("valid"),
            json!({"from_ms": 1_451_606_400_000_u64, "to_ms": 1_483_228_800_000_u64, "dry_run": false})
        );
        let key = Selector {
            key: Some("order 17".into()),
            ..selector()
        };
        assert_eq!(
            key.query().expect("valid"),
            vec![("key", "order 17".to_string())]
        );
        let offsets = Selector {
            partition: Some(2),
            from_offset: Some(10),
            to_offset: Some(20),
            ..selector()
        };
        assert_eq!(
            offsets.body(true).expect("valid"),
            json!({"partition": 2, "from_offset": 10, "to_offset": 20, "dry_run": true})
        );
        assert_eq!(
            range.describe(),
            "from 2016-01-01T00:00:00.000Z to 2017-01-01T00:00:00.000Z"
        );
        assert_eq!(key.describe(), "key \"order 17\"");
        assert_eq!(offsets.describe(), "partition 2 offsets 10..20");
        let inverted = Selector {
            from: Some(5),
            to: Some(5),
            ..selector()
        };
        assert!(inverted.query().is_err());
    }

    fn sample_message() -> Value {
        json!({
            "message_id": "0000019ac3d1e2f0000000000000002a",
            "topic": "prod.payments.order-paid", "partition": 0, "offset": 42,
            "timestamp_ms": 1_451_606_400_000_u64,
            "key": "order-17", "key_hex": "6f726465722d3137",
            "headers": {"trace-id": "abc"},
            "size_bytes": 74,
            "deliver_at_ms": null, "expires_at_ms": null,
            "deleted": false,
            "preview": {"format": "json", "text": "{\"order\":17}", "truncated": false}
        })
    }

    #[test]
    fn query_rows_truncate_keys_and_previews() {
        let row = query_row(&sample_message());
        assert_eq!(
            row,
            vec![
                "0",
                "42",
                "2016-01-01T00:00:00.000Z",
                "0000019ac3d1e2f0000000000000002a",
                "order-17",
                "false",
                "{\"order\":17}"
            ]
        );
        let mut long = sample_message();
        long["key"] = Value::Null;
        long["key_hex"] = json!("ff".repeat(40));
        long["preview"] = json!({"format": "text", "text": format!("line 1\nline 2 {}", "x".repeat(100)), "truncated": false});
        let row = query_row(&long);
        assert_eq!(row[4].chars().count(), KEY_CHARS);
        assert!(row[4].starts_with("0xffff") && row[4].ends_with('…'));
        assert_eq!(row[6].chars().count(), PREVIEW_CHARS);
        assert!(row[6].starts_with("line 1 line 2 "));
        let mut cut = sample_message();
        cut["preview"]["truncated"] = json!(true);
        cut["key"] = Value::Null;
        cut["key_hex"] = Value::Null;
        let row = query_row(&cut);
        assert_eq!(row[4], "-");
        assert_eq!(row[6], "{\"order\":17}…");
    }

    #[test]
    fn message_rendering() {
        let answer = json!({
            "message": sample_message(),
            "groups": [
                {"group": "shipping", "member": null, "acked": false, "attempts": 2,
                 "in_flight": true, "next_delivery_ms": null, "dead_lettered": false}
            ]
        });
        let text = render_message(&answer);
        assert!(
            text.contains("topic       prod.payments.order-paid\n"),
            "{text}"
        );
        assert!(
            text.contains("key         order-17 (hex 6f726465722d3137)\n"),
            "{text}"
        );
        assert!(
            text.contains("time        2016-01-01T00:00:00.000Z\n"),
            "{text}"
        );
        assert!(text.contains("headers:\n  trace-id: abc\n"), "{text}");
        assert!(text.contains("preview (json):\n{\"order\":17}\n"), "{text}");
        assert!(
            text.contains(
                "GROUP     MEMBER  ACKED  ATTEMPTS  IN_FLIGHT  NEXT_DELIVERY  DEAD_LETTERED\n\
             shipping  -       false  2         true       -              false\n"
            ),
            "{text}"
        );
    }
}
