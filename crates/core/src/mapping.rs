//! From query rows to payloads: destination fields mapped from columns, plus
//! static fields. Dotted destination names (`address.city`) nest.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The mapping part of a sync: what the payload holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Mapping {
    /// Destination field ← source column. When empty, every column of the
    /// query is sent under its own name, in query order.
    pub fields: IndexMap<String, String>,
    /// Static fields added to every payload (any JSON value).
    pub statics: IndexMap<String, Value>,
}

/// A mapping that does not fit the query or is contradictory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MappingError {
    /// A mapped column is not returned by the query.
    #[error("mapping field `{field}` reads column `{column}`, which the query does not return (columns: {available})")]
    UnknownColumn {
        /// Destination field.
        field: String,
        /// The missing source column.
        column: String,
        /// The query's columns, comma separated.
        available: String,
    },
    /// Two destination names collide (`a` and `a.b`, or the same name twice).
    #[error("destination field `{field}` collides with `{other}`: a field cannot be both a value and an object")]
    Collision {
        /// One of the two names.
        field: String,
        /// The other.
        other: String,
    },
}

/// A mapping checked against the query's columns, ready to build payloads.
#[derive(Debug, Clone)]
pub struct CompiledMapping {
    /// (destination path, column index) in mapping order.
    fields: Vec<(Vec<String>, usize)>,
    /// Static fields with their paths.
    statics: Vec<(Vec<String>, Value)>,
}

impl Mapping {
    /// Checks destination names for collisions (no query needed).
    pub fn validate(&self) -> Result<(), MappingError> {
        let names: Vec<&str> =
            self.fields.keys().map(String::as_str).chain(self.statics.keys().map(String::as_str)).collect();
        for (i, a) in names.iter().enumerate() {
            for b in &names[i + 1..] {
                let nested = |x: &str, y: &str| y.strip_prefix(x).is_some_and(|r| r.starts_with('.'));
                if a == b || nested(a, b) || nested(b, a) {
                    return Err(MappingError::Collision { field: a.to_string(), other: b.to_string() });
                }
            }
        }
        Ok(())
    }

    /// Resolves column names to positions in the query's rows.
    pub fn compile(&self, columns: &[String]) -> Result<CompiledMapping, MappingError> {
        self.validate()?;
        let path = |name: &str| name.split('.').map(str::to_string).collect::<Vec<_>>();
        let fields = if self.fields.is_empty() {
            columns.iter().enumerate().map(|(i, c)| (vec![c.clone()], i)).collect()
        } else {
            self.fields
                .iter()
                .map(|(field, column)| {
                    let index =
                        columns.iter().position(|c| c == column).ok_or_else(|| MappingError::UnknownColumn {
                            field: field.clone(),
                            column: column.clone(),
                            available: columns.join(", "),
                        })?;
                    Ok((path(field), index))
                })
                .collect::<Result<_, _>>()?
        };
        let statics = self.statics.iter().map(|(k, v)| (path(k), v.clone())).collect();
        Ok(CompiledMapping { fields, statics })
    }
}

impl CompiledMapping {
    /// Builds the payload of one row (values in query column order).
    pub fn payload(&self, row: &[Value]) -> Map<String, Value> {
        let mut out = Map::new();
        for (path, index) in &self.fields {
            insert(&mut out, path, row[*index].clone());
        }
        for (path, value) in &self.statics {
            insert(&mut out, path, value.clone());
        }
        out
    }
}

fn insert(map: &mut Map<String, Value>, path: &[String], value: Value) {
    match path {
        [] => {}
        [last] => {
            map.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let child = map.entry(first.clone()).or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(child) = child {
                insert(child, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mapping(fields: &[(&str, &str)], statics: &[(&str, Value)]) -> Mapping {
        Mapping {
            fields: fields.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
            statics: statics.iter().map(|(a, b)| (a.to_string(), b.clone())).collect(),
        }
    }

    #[test]
    fn dotted_names_nest_and_statics_follow_fields() {
        let m = mapping(
            &[("email", "mail"), ("address.city", "city"), ("address.zip", "zip")],
            &[("automation_id", json!("welcome-42"))],
        );
        let cols = ["zip", "mail", "city"].map(String::from);
        let p = m.compile(&cols).unwrap().payload(&[json!("8000"), json!("a@b.c"), json!("Zurich")]);
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"email":"a@b.c","address":{"city":"Zurich","zip":"8000"},"automation_id":"welcome-42"}"#
        );
    }

    #[test]
    fn empty_mapping_sends_every_column() {
        let cols = ["id", "name"].map(String::from);
        let p = Mapping::default().compile(&cols).unwrap().payload(&[json!(1), json!("x")]);
        assert_eq!(Value::Object(p), json!({"id": 1, "name": "x"}));
    }

    #[test]
    fn unknown_columns_and_collisions_are_errors() {
        let err = mapping(&[("email", "mail")], &[]).compile(&["id".into()]).unwrap_err();
        assert!(err.to_string().contains("column `mail`, which the query does not return (columns: id)"));
        let err = mapping(&[("a", "x"), ("a.b", "y")], &[]).validate().unwrap_err();
        assert!(matches!(err, MappingError::Collision { .. }));
    }
}
