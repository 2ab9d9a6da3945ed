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
        progress: &'a dyn crate::Progress,
    ) -> Self {
        Staging {
            stager,
            mapping,
            key_columns,
            key_index: vec![],
            route_columns,
            route_index: vec![],
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

impl RowConsumer for Staging<'_> {
    fn columns(&mut self, names: &[String]) -> Result<(), String> {
        self.key_index = positions("primary_key", &self.key_columns, names)?;
        self.route_index = positions("destination URL", &self.route_columns, names)?;
        self.compiled = Some(self.mapping.compile(names).map_err(|e| format!("mapping: {e}"))?);
        Ok(())
    }

    fn row(&mut self, values: Vec<Value>) -> Result<(), String> {
        self.rows += 1;
        if self.rows.is_multiple_of(10_000) {
            self.progress.advance(10_000);
        }
        let mut key = Map::new();
        for (column, &i) in self.key_columns.iter().zip(&self.key_index) {
            key.insert(column.clone(), values[i].clone());
        }
        if key.values().any(Value::is_null) {
            self.null_rows += 1;
            if self.null_examples.len() < EXAMPLES {
                self.null_examples.push(format!("row {} {}", self.rows, Value::Object(key)));
            }
            return Ok(());
        }
        let payload = self.compiled.as_ref().expect("columns() comes first").payload(&values);
        let key_text = Value::Object(key).to_string();
        let payload_text = Value::Object(payload).to_string();
        let route_text = (!self.route_columns.is_empty()).then(|| {
            let route: Map<String, Value> = self
                .route_columns
                .iter()
                .zip(&self.route_index)
                .map(|(c, &i)| (c.clone(), values[i].clone()))
                .collect();
            Value::Object(route).to_string()
        });
        let fingerprint = fingerprint_request(&payload_text, route_text.as_deref());
        self.stager.push(&key_text, fingerprint, &payload_text, route_text.as_deref()).map_err(|e| e.to_string())
    }
}
