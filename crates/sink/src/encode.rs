//! Stage 1: a record becomes the JSON body the receiver reads (SPEC §3).

use backflow_core::{Mode, Record};
use serde_json::{Map, Value, json};

/// What every request of a run says about where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// The sync's name.
    pub sync: String,
    /// The sync's mode.
    pub mode: Mode,
    /// The run's id.
    pub run_id: String,
}

/// The payload with its metadata object under `meta_key` (when `Some`):
/// `{...payload, "_meta": {"op", "change", "sync", "mode", "run_id",
/// "row_num", "message_id", "key"}}`.
pub fn envelope(record: &Record, ctx: &MetaContext, meta_key: Option<&str>) -> Value {
    let mut body: Map<String, Value> = record.payload.clone();
    if let Some(key) = meta_key {
        body.insert(
            key.to_string(),
            json!({
                "op": record.op,
                "change": record.change,
                "sync": ctx.sync,
                "mode": ctx.mode,
                "run_id": ctx.run_id,
                "row_num": record.row_num,
                "message_id": record.message_id,
                "key": record.key,
            }),
        );
    }
    Value::Object(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use backflow_core::{Change, Op};

    #[test]
    fn metadata_follows_the_payload() {
        let record = Record {
            key: json!({"customer_id": 42}).as_object().unwrap().clone(),
            key_text: r#"{"customer_id":42}"#.into(),
            payload: json!({"email": "ryan@example.org"}).as_object().unwrap().clone(),
            route: Map::new(),
            fingerprint: 1,
            change: Change::Added,
            op: Op::Upsert,
            row_num: 7,
            message_id: "m".into(),
        };
        let ctx = MetaContext { sync: "crm".into(), mode: Mode::Mirror, run_id: "r".into() };
        assert_eq!(
            serde_json::to_string(&envelope(&record, &ctx, Some("_meta"))).unwrap(),
            r#"{"email":"ryan@example.org","_meta":{"op":"upsert","change":"added","sync":"crm","mode":"mirror","run_id":"r","row_num":7,"message_id":"m","key":{"customer_id":42}}}"#
        );
        assert_eq!(envelope(&record, &ctx, None), json!({"email": "ryan@example.org"}));
    }
}
