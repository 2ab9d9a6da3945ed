//! Rows from the warehouse into the state's staging table: key, payload and
//! fingerprint per row, NULL keys counted on the way.

use backflow_core::mapping::CompiledMapping;
use backflow_core::{Mapping, fingerprint_request};
use backflow_diff::Stager;
use backflow_source::RowConsumer;
use serde_json::{Map, Value};

/// How many example keys or rows an invalid-key report names.
pub const EXAMPLES: usize = 5;

pub struct Staging<'a> {
    pub stager: Stager<'a>,
    pub mapping: Mapping,
    pub key_columns: Vec<String>,
    key_index: Vec<usize>,
    /// Columns the destination URL reads, and their positions.
    pub route_columns: Vec<String>,
    route_index: Vec<usize>,
    /// The metadata object's key, which no payload field may take.
    meta_key: Option<String>,
    compiled: Option<CompiledMapping>,
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
        progress: &'a dyn crate::Progress,
    ) -> Self {
        Staging {
            stager,
            mapping,
            key_columns,
            key_index: vec![],
            route_columns,
            route_index: vec![],
            meta_key,
            compiled: None,
            null_rows: 0,
            null_examples: vec![],
            rows: 0,
            progress,
        }
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
        self.key_index = positions("primary_key", &self.key_columns, names)?;
        self.route_index = positions("destination URL", &self.route_columns, names)?;
        let compiled = compile(&self.mapping, names, self.meta_key.as_deref())?;
        self.compiled = Some(compiled);
        Ok(())
    }

    fn row(&mut self, values: Vec<Value>) -> Result<(), String> {
        self.rows += 1;
        if self.rows.is_multiple_of(10_000) {
            self.progress.advance(10_000);
        }
        if self.key_index.iter().any(|&i| values[i].is_null()) {
            self.null_rows += 1;
            if self.null_examples.len() < EXAMPLES {
                let key = object_text(&self.key_columns, &self.key_index, &values);
                self.null_examples.push(format!("row {} {key}", self.rows));
            }
            return Ok(());
        }
        let payload = self.compiled.as_ref().expect("columns() comes first").payload(&values);
        let key_text = object_text(&self.key_columns, &self.key_index, &values);
        let route_text =
            (!self.route_columns.is_empty()).then(|| object_text(&self.route_columns, &self.route_index, &values));
        let fingerprint = fingerprint_request(&payload, route_text.as_deref());
        self.stager.push(&key_text, fingerprint, &payload, route_text.as_deref()).map_err(|e| e.to_string())
    }
}

/// The compact JSON object of `columns` (at `index` in `values`), in order:
/// the canonical text of a key, or of a URL's column values.
fn object_text(columns: &[String], index: &[usize], values: &[Value]) -> String {
    let mut out = Map::new();
    for (column, &i) in columns.iter().zip(index) {
        out.insert(column.clone(), values[i].clone());
    }
    Value::Object(out).to_string()
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
