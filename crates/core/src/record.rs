//! Modes, changes, ops and the record that carries one change to the sink.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// How a sync turns changes into operations (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Added and changed rows are upserted; removed rows are forgotten.
    Upsert,
    /// Added rows are created; changed rows send nothing; removed rows are forgotten.
    Create,
    /// Every added or changed row is a new event; removed rows are forgotten.
    Append,
    /// The target is kept equal to the query: removed rows are deleted.
    Mirror,
    /// The query lists records to delete; each key is deleted once.
    Delete,
}

impl Mode {
    /// Every mode, in documentation order.
    pub const ALL: [Mode; 5] = [Mode::Upsert, Mode::Create, Mode::Append, Mode::Mirror, Mode::Delete];

    /// The op sent for a change in this mode, or `None` when nothing is sent.
    ///
    /// This is the table of SPEC §2, in one place.
    pub fn op_for(self, change: Change) -> Option<Op> {
        use Change::*;
        match (self, change) {
            (Mode::Upsert, Added | Changed) => Some(Op::Upsert),
            (Mode::Create, Added) => Some(Op::Create),
            (Mode::Append, Added | Changed) => Some(Op::Append),
            (Mode::Mirror, Added | Changed) => Some(Op::Upsert),
            (Mode::Mirror, Removed) => Some(Op::Delete),
            (Mode::Delete, Added) => Some(Op::Delete),
            _ => None,
        }
    }

    /// Whether a removed key is forgotten (dropped from the snapshot without
    /// sending anything) rather than delivered as a delete.
    pub fn forgets_removed(self) -> bool {
        self != Mode::Mirror
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// The lowercase name used in YAML, payloads and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Upsert => "upsert",
            Mode::Create => "create",
            Mode::Append => "append",
            Mode::Mirror => "mirror",
            Mode::Delete => "delete",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a row differs from the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// The key is not in the snapshot.
    Added,
    /// The key is in the snapshot with another fingerprint.
    Changed,
    /// The key is in the snapshot but no longer in the query.
    Removed,
}

impl Change {
    /// Every change, in documentation order.
    pub const ALL: [Change; 3] = [Change::Added, Change::Changed, Change::Removed];

    /// The lowercase name used in payloads and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Changed => "changed",
            Change::Removed => "removed",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<Change> {
        Change::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the receiver is told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Create or update the record.
    Upsert,
    /// Create the record.
    Create,
    /// Record a new event.
    Append,
    /// Delete the record.
    Delete,
}

impl Op {
    /// Every op, in documentation order.
    pub const ALL: [Op; 4] = [Op::Upsert, Op::Create, Op::Append, Op::Delete];

    /// The lowercase name used in payloads and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Upsert => "upsert",
            Op::Create => "create",
            Op::Append => "append",
            Op::Delete => "delete",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A primary key in its canonical text form: the compact JSON object of the
/// key columns in primary-key order, e.g. `{"customer_id":42}`. This is the
/// identity under which the snapshot stores a record.
pub type KeyText = String;

/// One change on its way to the receiver.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The primary key in its canonical text form (a compact JSON object).
    pub key_text: KeyText,
    /// The mapped payload (without metadata) as compact JSON object text,
    /// exactly as fingerprinted and stored in the snapshot.
    pub payload: String,
    /// Values of the columns the request URL needs (placeholders and query
    /// parameters), by column name; empty when the URL needs none.
    pub route: Map<String, Value>,
    /// Fingerprint of `payload`.
    pub fingerprint: u64,
    /// How the row differs from the snapshot.
    pub change: Change,
    /// What the receiver is told to do.
    pub op: Op,
    /// 1-based position within the run.
    pub row_num: u64,
    /// Deterministic id of this occurrence of the change
    /// ([`message_id`]).
    pub message_id: String,
}

/// Fingerprint of a mapped payload: 64-bit XXH3 of its compact JSON text.
///
/// The payload keeps the mapping's field order, so the same mapping over the
/// same values always gives the same bytes, and any difference in what would
/// be sent gives (with overwhelming probability) another fingerprint.
pub fn fingerprint_text(payload_json: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(payload_json.as_bytes())
}

/// The fingerprint of what a request carries: the payload, and the column
/// values its URL is built from (a change there sends the record again).
pub fn fingerprint_request(payload_json: &str, route_json: Option<&str>) -> u64 {
    match route_json {
        None => fingerprint_text(payload_json),
        Some(route) => {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            h.update(payload_json.as_bytes());
            h.update(b"\0");
            h.update(route.as_bytes());
            h.digest()
        }
    }
}

/// The deterministic message id of one occurrence of a change: a UUIDv5
/// over the sync name, the key text, the op, the fingerprint and the key's
/// *generation* — a per-key count of the occurrences that may have reached
/// the receiver, kept in the state (the first occurrence of a key is
/// generation 1). A change re-sent after a retry or a crash keeps its
/// generation and so its id; a new occurrence (a value changing A→B→A, a key
/// deleted, listed again and deleted again) has a higher generation and so
/// a new id.
///
/// Generation 1 hashes no generation at all, which is the id earlier
/// versions gave every change: state they wrote is taken over with the ids
/// already sent.
pub fn message_id(sync: &str, key_text: &str, op: Op, fingerprint: u64, generation: u64) -> String {
    // `Uuid::new_v5(NAMESPACE, "{sync}\0{key}\0{op}\0{fingerprint:016x}")`,
    // followed by `\0{generation}` from generation 2, hashed in pieces
    // with a SHA-1 that uses the CPU's SHA instructions: ids are computed
    // for every record sent.
    use sha1::Digest;
    let mut fingerprint_hex = [0u8; 16];
    hex::encode_to_slice(fingerprint.to_be_bytes(), &mut fingerprint_hex).expect("16 hex digits");
    let mut sha = sha1::Sha1::new();
    sha.update(NAMESPACE.as_bytes());
    for part in [sync.as_bytes(), b"\0", key_text.as_bytes(), b"\0", op.as_str().as_bytes(), b"\0", &fingerprint_hex] {
        sha.update(part);
    }
    if generation > 1 {
        sha.update(b"\0");
        sha.update(itoa::Buffer::new().format(generation).as_bytes());
    }
    let digest = sha.finalize();
    let bytes: [u8; 16] = digest[..16].try_into().expect("a SHA-1 digest has 20 bytes");
    let id = uuid::Builder::from_sha1_bytes(bytes).into_uuid();
    id.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()).to_string()
}

/// Namespace for message ids (a fixed random UUID; never change it: ids
/// already delivered would no longer match re-sends).
const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6f1d_2c3a_8b4e_4f6a_9d1c_5e7b_3a2f_8c91);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn message_ids_are_the_uuidv5_of_sync_key_op_fingerprint_and_generation() {
        for (sync, key, op, fingerprint) in [
            ("crm", r#"{"id":1}"#, Op::Upsert, 0u64),
            ("s", r#"{"email":"é\u0000x"}"#, Op::Delete, u64::MAX),
            ("", "", Op::Append, 0x0123_4567_89ab_cdef),
        ] {
            let name = format!("{sync}\u{0}{key}\u{0}{op}\u{0}{fingerprint:016x}");
            assert_eq!(
                message_id(sync, key, op, fingerprint, 1),
                uuid::Uuid::new_v5(&NAMESPACE, name.as_bytes()).to_string(),
                "the first generation has the id earlier versions sent"
            );
            assert_eq!(
                message_id(sync, key, op, fingerprint, 12),
                uuid::Uuid::new_v5(&NAMESPACE, format!("{name}\u{0}12").as_bytes()).to_string()
            );
        }
    }

    #[test]
    fn op_table_matches_the_spec() {
        use Change::*;
        let table = [
            (Mode::Upsert, [Some(Op::Upsert), Some(Op::Upsert), None]),
            (Mode::Create, [Some(Op::Create), None, None]),
            (Mode::Append, [Some(Op::Append), Some(Op::Append), None]),
            (Mode::Mirror, [Some(Op::Upsert), Some(Op::Upsert), Some(Op::Delete)]),
            (Mode::Delete, [Some(Op::Delete), None, None]),
        ];
        for (mode, ops) in table {
            for (change, op) in [Added, Changed, Removed].into_iter().zip(ops) {
                assert_eq!(mode.op_for(change), op, "{mode} {change}");
            }
            assert_eq!(mode.forgets_removed(), mode != Mode::Mirror);
        }
    }

    #[test]
    fn message_id_is_deterministic_and_distinguishes_its_inputs() {
        let a = message_id("s", r#"{"id":1}"#, Op::Upsert, 7, 1);
        assert_eq!(a, message_id("s", r#"{"id":1}"#, Op::Upsert, 7, 1));
        assert_ne!(a, message_id("t", r#"{"id":1}"#, Op::Upsert, 7, 1));
        assert_ne!(a, message_id("s", r#"{"id":2}"#, Op::Upsert, 7, 1));
        assert_ne!(a, message_id("s", r#"{"id":1}"#, Op::Delete, 7, 1));
        assert_ne!(a, message_id("s", r#"{"id":1}"#, Op::Upsert, 8, 1));
        assert_ne!(a, message_id("s", r#"{"id":1}"#, Op::Upsert, 7, 2), "a later occurrence");
        assert_eq!(a.len(), 36);
    }

    #[test]
    fn fingerprint_follows_the_payload() {
        let a = json!({"a": 1, "b": "x"}).to_string();
        assert_eq!(fingerprint_text(&a), fingerprint_text(&a.clone()));
        assert_ne!(fingerprint_text(&a), fingerprint_text(&json!({"a": 1, "b": "y"}).to_string()));
        assert_ne!(fingerprint_text(&a), fingerprint_text(&json!({"a": 1, "c": "x"}).to_string()));
    }
}
