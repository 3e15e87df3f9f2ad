//! The hex examples in PROTOCOL.md are real frames: each fenced block
//! tagged ```` ```hex example=NAME ```` decodes to the sample frame NAME of
//! `common::sample_frames`, consumes every byte, and re-encodes to the same
//! bytes. Comments (`#` to end of line) and whitespace are ignored.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use dmq_protocol::{decode_frame, encode_frame_to_vec, DEFAULT_MAX_FRAME_BYTES};

/// `name -> bytes` of every example block.
fn examples(markdown: &str) -> BTreeMap<String, Vec<u8>> {
    let mut examples = BTreeMap::new();
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix("```hex example=") else {
            continue;
        };
        let mut bytes = Vec::new();
        for line in lines.by_ref() {
            if line.trim_start().starts_with("```") {
                break;
            }
            let code = line.split('#').next().unwrap_or("");
            for pair in code.split_whitespace() {
                assert_eq!(pair.len(), 2, "example {name}: `{pair}` is not one byte");
                bytes.push(
                    u8::from_str_radix(pair, 16)
                        .unwrap_or_else(|e| panic!("example {name}: `{pair}`: {e}")),
                );
            }
        }
        let previous = examples.insert(name.trim().to_string(), bytes);
        assert!(previous.is_none(), "example {name} appears twice");
    }
    examples
}

#[test]
fn protocol_md_examples_decode_to_their_frames() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../PROTOCOL.md");
    let markdown = std::fs::read_to_string(&path).expect("reading PROTOCOL.md");
    let examples = examples(&markdown);
    for required in ["hello", "produce", "error", "deliver"] {
        assert!(
            examples.contains_key(required),
            "PROTOCOL.md lacks the {required} example"
        );
    }
    let samples: BTreeMap<_, _> = common::sample_frames().into_iter().collect();
    for (name, bytes) in &examples {
        let expected = samples
            .get(name.as_str())
            .unwrap_or_else(|| panic!("example {name} has no sample frame"));
        let decoded = decode_frame(bytes, DEFAULT_MAX_FRAME_BYTES)
            .unwrap_or_else(|e| panic!("example {name}: {e}"));
        assert_eq!(
            decoded,
            Some((expected.clone(), bytes.len())),
            "example {name}"
        );
        assert_eq!(
            &encode_frame_to_vec(expected).expect("encodes"),
            bytes,
            "example {name} re-encodes differently"
        );
    }
    eprintln!("{} examples checked", examples.len());
}

/// `tests/vectors.json` holds the same examples, machine-readable, for the
/// Python client's tests: the spec, this codec and that one read the same
/// bytes, and this test keeps the file equal to PROTOCOL.md.
#[test]
fn vectors_json_holds_exactly_the_protocol_md_examples() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let markdown =
        std::fs::read_to_string(root.join("../PROTOCOL.md")).expect("reading PROTOCOL.md");
    let json =
        std::fs::read_to_string(root.join("tests/vectors.json")).expect("reading vectors.json");
    let vectors: serde_json::Value = serde_json::from_str(&json).expect("vectors.json is JSON");
    let in_json: BTreeMap<String, String> = vectors["examples"]
        .as_object()
        .expect("an \"examples\" object")
        .iter()
        .map(|(name, hex)| (name.clone(), hex.as_str().expect("hex string").to_string()))
        .collect();
    let in_markdown: BTreeMap<String, String> = examples(&markdown)
        .into_iter()
        .map(|(name, bytes)| (name, bytes.iter().map(|b| format!("{b:02x}")).collect()))
        .collect();
    assert_eq!(
        in_json, in_markdown,
        "protocol/tests/vectors.json differs from PROTOCOL.md section 10: regenerate it"
    );
}
