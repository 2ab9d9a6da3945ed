//! What the sink's tests share: records, the run context and destination
//! settings.
#![allow(dead_code)]

use backflow_core::{Change, Mode, Op, Record};
use backflow_sink::{DestinationConfig, MetaContext};
use serde_json::{Value, json};

/// Record `id`: key `{"id":id}`, payload `{"id":id,"name":"n<id>"}`,
/// message id `m<id>`.
pub fn record(id: u64) -> Record {
    Record {
        key_text: format!(r#"{{"id":{id}}}"#),
        payload: format!(r#"{{"id":{id},"name":"n{id}"}}"#),
        route: Default::default(),
        fingerprint: id,
        change: Change::Added,
        op: Op::Upsert,
        row_num: id,
        message_id: format!("m{id}"),
    }
}

pub fn ctx() -> MetaContext {
    MetaContext { sync: "s".into(), mode: Mode::Upsert, run_id: "r".into(), test: false }
}

/// A destination at `url` with `base` settings, overridden by `extra`.
pub fn config_with(url: &str, base: Value, extra: Value) -> DestinationConfig {
    let mut c = base;
    c["url"] = json!(url);
    c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    serde_json::from_value(c).unwrap()
}
