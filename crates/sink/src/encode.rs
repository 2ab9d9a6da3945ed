//! Stage 1: a record becomes the JSON body the receiver reads (SPEC §3).
//!
//! The payload arrives as the compact JSON text that was fingerprinted and
//! stored; the metadata object is spliced in after its last field, so a
//! payload is never parsed and serialized again on the way out.

use backflow_core::{Mode, Record};
use serde_json::Value;

/// What every request of a run says about where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// The sync's name.
    pub sync: String,
    /// The sync's mode.
    pub mode: Mode,
    /// The run's id.
    pub run_id: String,
    /// A test request (`check --send-test`): the metadata says `"test": true`.
    pub test: bool,
}

/// Writes record envelopes: the payload with its metadata object under the
/// metadata key (when there is one): `{...payload, "_meta": {"op", "change",
/// "sync", "mode", "run_id", "row_num", "message_id", "key"}}`.
#[derive(Debug, Clone)]
pub struct Encoder {
    /// `"_meta":{"op":"` (escaped), or `None` without metadata.
    meta_open: Option<String>,
    /// `","sync":…,"mode":…,"run_id":…,"row_num":` after op and change.
    run_part: String,
}

impl Encoder {
    /// An encoder for one run's records.
    pub fn new(ctx: &MetaContext, meta_key: Option<&str>) -> Encoder {
        let text = |s: &str| Value::from(s).to_string();
        Encoder {
            meta_open: meta_key.map(|key| format!("{}:{{\"op\":\"", text(key))),
            run_part: format!(
                "\",\"sync\":{},\"mode\":\"{}\",\"run_id\":{},{}\"row_num\":",
                text(&ctx.sync),
                ctx.mode.as_str(),
                text(&ctx.run_id),
                if ctx.test { "\"test\":true," } else { "" }
            ),
        }
    }

    /// Appends the envelope of `record` to `out`.
    pub fn write(&self, record: &Record, out: &mut Vec<u8>) {
        let payload = record.payload.trim_end();
        let Some(open) = &self.meta_open else {
            out.extend_from_slice(payload.as_bytes());
            return;
        };
        let fields = payload.strip_suffix('}').unwrap_or("{");
        out.extend_from_slice(fields.as_bytes());
        if fields.trim_end() != "{" {
            out.push(b',');
        }
        out.extend_from_slice(open.as_bytes());
        out.extend_from_slice(record.op.as_str().as_bytes());
        out.extend_from_slice(b"\",\"change\":\"");
        out.extend_from_slice(record.change.as_str().as_bytes());
        out.extend_from_slice(self.run_part.as_bytes());
        out.extend_from_slice(record.row_num.to_string().as_bytes());
        out.extend_from_slice(b",\"message_id\":\"");
        out.extend_from_slice(record.message_id.as_bytes());
        out.extend_from_slice(b"\",\"key\":");
        out.extend_from_slice(record.key_text.as_bytes());
        out.extend_from_slice(b"}}");
    }

    /// The envelope of `record` as bytes.
    pub fn encode(&self, record: &Record) -> Vec<u8> {
        let mut out = Vec::with_capacity(record.payload.len() + 256);
        self.write(record, &mut out);
        out
    }

    /// The envelope of `record` as a JSON value (for GET flattening).
    pub fn value(&self, record: &Record) -> Value {
        serde_json::from_slice(&self.encode(record)).expect("envelopes are valid JSON")
    }

    /// A JSON array of the envelopes of `records`.
    pub fn array(&self, records: &[Record]) -> Vec<u8> {
        let size: usize = records.iter().map(|r| r.payload.len() + 256).sum();
        let mut out = Vec::with_capacity(size + 2);
        out.push(b'[');
        for (i, record) in records.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            self.write(record, &mut out);
        }
        out.push(b']');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backflow_core::{Change, Op};
    use serde_json::json;

    fn record(payload: &str) -> Record {
        Record {
            key_text: r#"{"customer_id":42}"#.into(),
            payload: payload.into(),
            route: Default::default(),
            fingerprint: 1,
            change: Change::Added,
            op: Op::Upsert,
            row_num: 7,
            message_id: "m".into(),
        }
    }

    fn ctx() -> MetaContext {
        MetaContext { sync: "crm".into(), mode: Mode::Mirror, run_id: "r".into(), test: false }
    }

    #[test]
    fn metadata_follows_the_payload() {
        let encoder = Encoder::new(&ctx(), Some("_meta"));
        assert_eq!(
            String::from_utf8(encoder.encode(&record(r#"{"email":"ryan@example.org"}"#))).unwrap(),
            r#"{"email":"ryan@example.org","_meta":{"op":"upsert","change":"added","sync":"crm","mode":"mirror","run_id":"r","row_num":7,"message_id":"m","key":{"customer_id":42}}}"#
        );
        assert_eq!(
            Encoder::new(&ctx(), None).value(&record(r#"{"email":"ryan@example.org"}"#)),
            json!({"email": "ryan@example.org"})
        );
    }

    #[test]
    fn an_empty_payload_and_odd_names_stay_valid_json() {
        let odd = MetaContext { sync: "a\"b\\c".into(), mode: Mode::Upsert, run_id: "r\n1".into(), test: false };
        let encoder = Encoder::new(&odd, Some("meta \"x\""));
        let value = encoder.value(&record("{}"));
        assert_eq!(value["meta \"x\""]["sync"], "a\"b\\c");
        assert_eq!(value["meta \"x\""]["run_id"], "r\n1");
        let array: Value =
            serde_json::from_slice(&encoder.array(&[record("{}"), record(r#"{"a":[1,{"b":2}]}"#)])).unwrap();
        assert_eq!(array[1]["a"], json!([1, {"b": 2}]));
        assert_eq!(array[1]["meta \"x\""]["row_num"], 7);
    }
}
