//! From query rows to payloads: destination fields mapped from columns, plus
//! static fields. Dotted destination names (`address.city`) nest.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    /// The payload's top-level fields, in order.
    fields: Vec<Field>,
}

/// One field of a payload object: its name, already JSON-escaped, and where
/// its value comes from.
#[derive(Debug, Clone)]
struct Field {
    name: String,
    json_name: String,
    slot: Slot,
}

#[derive(Debug, Clone)]
enum Slot {
    /// The value of the query's column at this position.
    Column(usize),
    /// A static value, as JSON text.
    Static(String),
    /// A nested object (from dotted names).
    Object(Vec<Field>),
}

/// Adds the field at `path` to `fields`, nesting objects for dotted names;
/// an object already started keeps its place (the first name that opened it).
fn place(fields: &mut Vec<Field>, path: &[&str], slot: Slot) {
    let Some((first, rest)) = path.split_first() else { return };
    let index = match fields.iter().position(|f| f.name == *first) {
        Some(i) => i,
        None => {
            let json_name = Value::from(*first).to_string();
            let slot = if rest.is_empty() { slot.clone() } else { Slot::Object(Vec::new()) };
            fields.push(Field { name: first.to_string(), json_name, slot });
            fields.len() - 1
        }
    };
    if rest.is_empty() {
        fields[index].slot = slot;
    } else if let Slot::Object(children) = &mut fields[index].slot {
        place(children, rest, slot);
    }
}

fn write_object<E>(
    fields: &[Field],
    out: &mut Vec<u8>,
    cell: &mut impl FnMut(usize, &mut Vec<u8>) -> Result<(), E>,
) -> Result<(), E> {
    out.push(b'{');
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(field.json_name.as_bytes());
        out.push(b':');
        match &field.slot {
            Slot::Column(index) => cell(*index, out)?,
            Slot::Static(text) => out.extend_from_slice(text.as_bytes()),
            Slot::Object(children) => write_object(children, out, cell)?,
        }
    }
    out.push(b'}');
    Ok(())
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
        let mut fields = Vec::new();
        if self.fields.is_empty() {
            for (i, column) in columns.iter().enumerate() {
                place(&mut fields, &[column.as_str()], Slot::Column(i));
            }
        } else {
            for (field, column) in &self.fields {
                let index = columns.iter().position(|c| c == column).ok_or_else(|| MappingError::UnknownColumn {
                    field: field.clone(),
                    column: column.clone(),
                    available: columns.join(", "),
                })?;
                place(&mut fields, &field.split('.').collect::<Vec<_>>(), Slot::Column(index));
            }
        }
        for (field, value) in &self.statics {
            place(&mut fields, &field.split('.').collect::<Vec<_>>(), Slot::Static(value.to_string()));
        }
        Ok(CompiledMapping { fields })
    }
}

impl CompiledMapping {
    /// The positions of the query's columns the payload reads, in payload
    /// order.
    pub fn columns(&self) -> Vec<usize> {
        fn collect(fields: &[Field], out: &mut Vec<usize>) {
            for field in fields {
                match &field.slot {
                    Slot::Column(index) => out.push(*index),
                    Slot::Static(_) => {}
                    Slot::Object(children) => collect(children, out),
                }
            }
        }
        let mut out = Vec::new();
        collect(&self.fields, &mut out);
        out
    }

    /// Whether the payload has a top-level field called `name`.
    pub fn has_field(&self, name: &str) -> bool {
        self.fields.iter().any(|f| f.name == name)
    }

    /// Writes the payload of one row as compact JSON: fields in mapping
    /// order, then statics; nested objects where a dotted name first opened
    /// them. `cell(column, out)` writes the JSON text of the row's value in
    /// a column (given by its position in the query's columns), so rows
    /// need not be held as values.
    pub fn write_payload<E>(
        &self,
        out: &mut Vec<u8>,
        cell: &mut impl FnMut(usize, &mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        write_object(&self.fields, out, cell)
    }

    /// The payload of one row of values (in query column order) as compact
    /// JSON text.
    pub fn payload(&self, row: &[Value]) -> String {
        let mut out = Vec::with_capacity(256);
        self.write_payload(&mut out, &mut |index, out: &mut Vec<u8>| serde_json::to_writer(out, &row[index]))
            .expect("JSON values serialize");
        String::from_utf8(out).expect("JSON is UTF-8")
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
        assert_eq!(p, r#"{"email":"a@b.c","address":{"city":"Zurich","zip":"8000"},"automation_id":"welcome-42"}"#);
        assert_eq!(m.compile(&cols).unwrap().columns(), [1, 2, 0], "the columns read, in payload order");
        assert_eq!(Mapping::default().compile(&cols).unwrap().columns(), [0, 1, 2]);
    }

    #[test]
    fn statics_join_objects_opened_by_fields() {
        let m = mapping(&[("address.city", "city"), ("id", "id")], &[("address.zone", json!({"n": 1}))]);
        let p = m.compile(&["id".into(), "city".into()]).unwrap().payload(&[json!(7), json!("Oslo \"N\"")]);
        assert_eq!(p, r#"{"address":{"city":"Oslo \"N\"","zone":{"n":1}},"id":7}"#);
    }

    #[test]
    fn empty_mapping_sends_every_column() {
        let cols = ["id", "name"].map(String::from);
        let p = Mapping::default().compile(&cols).unwrap().payload(&[json!(1), json!("x")]);
        assert_eq!(p, r#"{"id":1,"name":"x"}"#);
    }

    #[test]
    fn unknown_columns_and_collisions_are_errors() {
        let err = mapping(&[("email", "mail")], &[]).compile(&["id".into()]).unwrap_err();
        assert!(err.to_string().contains("column `mail`, which the query does not return (columns: id)"));
        let err = mapping(&[("a", "x"), ("a.b", "y")], &[]).validate().unwrap_err();
        assert!(matches!(err, MappingError::Collision { .. }));
    }
}
