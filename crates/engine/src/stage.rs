//! Rows from the warehouse into the state's staging table: key, payload and
//! fingerprint per row, NULL keys counted on the way.
//!
//! Columnar batches (DuckDB) are turned into JSON text on a conversion
//! thread while the staging thread stages the previous batch; rows of
//! values (Postgres, whose client already runs on its own thread) are
//! converted where they arrive.

use backflow_core::mapping::CompiledMapping;
use backflow_core::{Mapping, fingerprint_request};
use backflow_diff::{HashSet64, Stager, key_hash, pair_hash};
use backflow_source::json::ColumnWriter;
use backflow_source::{RecordBatch, RowConsumer};
use serde_json::Value;
use std::sync::mpsc::{Receiver, SyncSender, channel, sync_channel};

/// How many example keys or rows an invalid-key report names.
pub const EXAMPLES: usize = 5;

/// The most entries each of staging's two hash sets takes (about 16 bytes
/// an entry, 320 MB each at the limit): snapshots with more keys are not
/// loaded as pairs (every payload is staged), and past this many rows
/// duplicate keys are checked in SQL instead.
pub const HASH_SET_LIMIT: usize = 20_000_000;

/// Batches queued for the conversion thread.
const CONVERT_AHEAD: usize = 4;

pub struct Staging<'a> {
    pub stager: Stager<'a>,
    pub mapping: Mapping,
    pub key_columns: Vec<String>,
    /// Columns the destination URL reads.
    pub route_columns: Vec<String>,
    /// The metadata object's key, which no payload field may take.
    meta_key: Option<String>,
    /// How a row becomes text, once the columns are known.
    converter: Option<Converter>,
    /// The conversion thread, once batches arrive.
    thread: Option<ConversionThread>,
    /// Pair hashes of the snapshot's keys and fingerprints: a row found
    /// there is unchanged, and its payload is not staged.
    known: Option<HashSet64>,
    /// Hashes of the keys staged so far; a repeat means the key may be
    /// duplicated (checked exactly in SQL only then).
    seen: HashSet64,
    pub maybe_duplicates: bool,
    /// Rows converted on this thread (rows of values).
    local: Converted,
    pub null_rows: u64,
    pub null_examples: Vec<String>,
    pub rows: u64,
    pub progress: &'a dyn crate::Progress,
}

impl<'a> Staging<'a> {
    pub fn new(
        stager: Stager<'a>,
        mapping: Mapping,
        key_columns: Vec<String>,
        route_columns: Vec<String>,
        meta_key: Option<String>,
        known: Option<HashSet64>,
        progress: &'a dyn crate::Progress,
    ) -> Self {
        let seen = HashSet64::with_capacity_and_hasher(known.as_ref().map_or(0, |k| k.len()), Default::default());
        Staging {
            stager,
            mapping,
            key_columns,
            route_columns,
            meta_key,
            converter: None,
            thread: None,
            known,
            seen,
            maybe_duplicates: false,
            local: Converted::default(),
            null_rows: 0,
            null_examples: vec![],
            rows: 0,
            progress,
        }
    }

    /// Waits for the conversion thread and stages what it still holds;
    /// call once the stream has ended.
    pub fn finish(&mut self) -> Result<(), String> {
        if let Some(ConversionThread { input, output, handle }) = self.thread.take() {
            drop(input);
            for converted in output {
                self.absorb(&converted?)?;
            }
            handle.join().map_err(|_| "the conversion thread panicked".to_string())?;
        }
        Ok(())
    }

    /// Stages converted rows: NULL keys are counted, the rest staged (with
    /// their payload unless the snapshot holds the same key and fingerprint).
    fn absorb(&mut self, converted: &Converted) -> Result<(), String> {
        for (row, (key, payload, route)) in converted.rows().enumerate() {
            self.rows += 1;
            if self.rows.is_multiple_of(10_000) {
                self.progress.advance(10_000);
            }
            if converted.null_key[row] {
                self.null_rows += 1;
                if self.null_examples.len() < EXAMPLES {
                    self.null_examples.push(format!("row {} {key}", self.rows));
                }
                continue;
            }
            let (fingerprint, hash) = (converted.fingerprint[row], converted.key_hash[row]);
            if self.seen.len() >= HASH_SET_LIMIT || !self.seen.insert(hash) {
                self.maybe_duplicates = true;
            }
            let unchanged = self.known.as_ref().is_some_and(|known| known.contains(&pair_hash(hash, fingerprint)));
            self.stager.push(key, fingerprint, (!unchanged).then_some(payload), route).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Rows turned into text: per row its key, payload and URL values (JSON,
/// back to back in `text`, ending at `ends`), fingerprint and key hash.
#[derive(Default)]
pub(crate) struct Converted {
    routed: bool,
    text: Vec<u8>,
    ends: Vec<[usize; 3]>,
    pub null_key: Vec<bool>,
    pub fingerprint: Vec<u64>,
    key_hash: Vec<u64>,
}

impl Converted {
    /// Nothing converted yet; `routed` when the URL reads columns.
    pub fn new(routed: bool) -> Converted {
        Converted { routed, ..Converted::default() }
    }

    /// The key, payload and URL values of each row, in order.
    pub fn rows(&self) -> impl Iterator<Item = (&str, &str, Option<&str>)> {
        let mut start = 0;
        self.ends.iter().map(move |&[key_end, payload_end, route_end]| {
            let key = text(&self.text[start..key_end]);
            let payload = text(&self.text[key_end..payload_end]);
            let route = self.routed.then(|| text(&self.text[payload_end..route_end]));
            start = route_end;
            (key, payload, route)
        })
    }

    pub fn clear(&mut self) {
        self.text.clear();
        self.ends.clear();
        self.null_key.clear();
        self.fingerprint.clear();
        self.key_hash.clear();
    }
}

/// How a row becomes its key text, payload and URL values.
#[derive(Clone)]
pub(crate) struct Converter {
    pub compiled: CompiledMapping,
    pub key_index: Vec<usize>,
    /// The key and URL column names as JSON strings.
    pub key_names: Vec<String>,
    pub route_index: Vec<usize>,
    route_names: Vec<String>,
}

impl Converter {
    /// Compiles the mapping, key and URL columns against the query's
    /// column `names`.
    pub fn new(
        mapping: &Mapping,
        names: &[String],
        key_columns: &[String],
        route_columns: &[String],
        meta_key: Option<&str>,
    ) -> Result<Converter, String> {
        let json_names = |columns: &[String]| columns.iter().map(|c| Value::from(c.as_str()).to_string()).collect();
        Ok(Converter {
            compiled: compile(mapping, names, meta_key)?,
            key_index: positions("primary_key", key_columns, names)?,
            key_names: json_names(key_columns),
            route_index: positions("destination URL", route_columns, names)?,
            route_names: json_names(route_columns),
        })
    }

    /// Appends one row, whose values `cell(column, out)` writes as JSON.
    fn convert<E>(
        &self,
        null_key: bool,
        out: &mut Converted,
        cell: &mut impl FnMut(usize, &mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let start = out.text.len();
        write_object(&self.key_names, &self.key_index, &mut out.text, cell)?;
        let key_end = out.text.len();
        if !null_key {
            self.compiled.write_payload(&mut out.text, cell)?;
        }
        let payload_end = out.text.len();
        if !null_key && out.routed {
            write_object(&self.route_names, &self.route_index, &mut out.text, cell)?;
        }
        let route_end = out.text.len();
        let (key, payload) = (text(&out.text[start..key_end]), text(&out.text[key_end..payload_end]));
        let route = out.routed.then(|| text(&out.text[payload_end..route_end]));
        out.fingerprint.push(fingerprint_request(payload, route));
        out.key_hash.push(key_hash(key));
        out.null_key.push(null_key);
        out.ends.push([key_end, payload_end, route_end]);
        Ok(())
    }

    pub fn convert_batch(&self, batch: &RecordBatch, out: &mut Converted) -> Result<(), String> {
        let schema = batch.schema();
        let writers: Vec<ColumnWriter> =
            batch.columns().iter().zip(schema.fields()).map(|(c, f)| ColumnWriter::for_field(f, c.as_ref())).collect();
        let keys: Vec<_> = self.key_index.iter().map(|&k| batch.column(k)).collect();
        for i in 0..batch.num_rows() {
            let null_key = keys.iter().any(|k| k.is_null(i));
            self.convert(null_key, out, &mut |column, out: &mut Vec<u8>| writers[column].write(i, out))?;
        }
        Ok(())
    }
}

/// The thread that converts batches, in order.
struct ConversionThread {
    input: SyncSender<RecordBatch>,
    output: Receiver<Result<Converted, String>>,
    handle: std::thread::JoinHandle<()>,
}

impl ConversionThread {
    fn start(converter: Converter, routed: bool) -> ConversionThread {
        let (input, batches) = sync_channel::<RecordBatch>(CONVERT_AHEAD);
        // Unbounded, yet never more than the few batches in flight: the
        // staging thread takes everything ready after each batch it hands over.
        let (results, output) = channel();
        let handle = std::thread::spawn(move || {
            for batch in batches {
                let mut converted = Converted::new(routed);
                let result = converter.convert_batch(&batch, &mut converted).map(|()| converted);
                let failed = result.is_err();
                if results.send(result).is_err() || failed {
                    break;
                }
            }
        });
        ConversionThread { input, output, handle }
    }
}

/// Positions of the `wanted` columns among the query's `names`; the error
/// names the setting (`what`) that reads a missing column.
pub fn positions(what: &str, wanted: &[String], names: &[String]) -> Result<Vec<usize>, String> {
    wanted
        .iter()
        .map(|c| {
            names.iter().position(|n| n == c).ok_or_else(|| {
                format!(
                    "{what}: column `{c}` is not returned by the query (columns: {}); select it, or fix {what}",
                    names.join(", ")
                )
            })
        })
        .collect()
}

/// Compiles the mapping against the query's columns; a payload field named
/// like the metadata object would be overwritten by it, so it is refused.
pub fn compile(mapping: &Mapping, names: &[String], meta_key: Option<&str>) -> Result<CompiledMapping, String> {
    let compiled = mapping.compile(names).map_err(|e| format!("mapping: {e}"))?;
    if let Some(key) = meta_key.filter(|k| compiled.has_field(k)) {
        return Err(format!(
            "mapping: the payload has a field `{key}`, which is where the sync metadata goes; \
             rename the column or field, or set `destination.metadata_key` to another name"
        ));
    }
    Ok(compiled)
}

impl RowConsumer for Staging<'_> {
    fn columns(&mut self, names: &[String]) -> Result<(), String> {
        self.converter = Some(Converter::new(
            &self.mapping,
            names,
            &self.key_columns,
            &self.route_columns,
            self.meta_key.as_deref(),
        )?);
        self.local.routed = !self.route_columns.is_empty();
        Ok(())
    }

    fn row(&mut self, values: Vec<Value>) -> Result<(), String> {
        let converter = self.converter.as_ref().expect("columns() comes first");
        let null_key = converter.key_index.iter().any(|&i| values[i].is_null());
        let mut local = std::mem::take(&mut self.local);
        local.clear();
        converter
            .convert(null_key, &mut local, &mut |column, out: &mut Vec<u8>| serde_json::to_writer(out, &values[column]))
            .map_err(|e| e.to_string())?;
        let result = self.absorb(&local);
        self.local = local;
        result
    }

    fn batch(&mut self, batch: &RecordBatch) -> Result<(), String> {
        if self.thread.is_none() {
            let converter = self.converter.clone().expect("columns() comes first");
            self.thread = Some(ConversionThread::start(converter, self.local.routed));
        }
        let thread = self.thread.as_ref().expect("started above");
        if thread.input.send(batch.clone()).is_err() {
            // The thread stopped on an error, which is waiting in its output.
            return self.finish().and(Err("the conversion thread stopped".into()));
        }
        let ready: Vec<_> = thread.output.try_iter().collect();
        for converted in ready {
            self.absorb(&converted?)?;
        }
        Ok(())
    }
}

fn text(json: &[u8]) -> &str {
    std::str::from_utf8(json).expect("JSON is UTF-8")
}

/// Writes the compact JSON object of the columns at `index` (their names
/// already JSON text), in order: the canonical text of a key, or of a URL's
/// column values.
fn write_object<E>(
    names: &[String],
    index: &[usize],
    out: &mut Vec<u8>,
    cell: &mut impl FnMut(usize, &mut Vec<u8>) -> Result<(), E>,
) -> Result<(), E> {
    out.push(b'{');
    for (n, (name, &i)) in names.iter().zip(index).enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        cell(i, out)?;
    }
    out.push(b'}');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_field_named_like_the_metadata_key_is_refused() {
        let names = ["id".to_string(), "_meta".to_string()];
        let err = compile(&Mapping::default(), &names, Some("_meta")).unwrap_err();
        assert!(err.contains("`_meta`") && err.contains("metadata_key"), "{err}");
        assert!(compile(&Mapping::default(), &names, Some("meta")).is_ok());
        assert!(compile(&Mapping::default(), &names, None).is_ok());
    }
}
