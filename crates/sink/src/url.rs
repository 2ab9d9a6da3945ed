//! Request URLs: a base URL whose static query is kept as written, `{column}`
//! placeholders filled per record, and per-record query parameters. Every
//! value from a row is percent-encoded, so data can never change the host,
//! the path's structure or the set of parameters.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Map, Value};

/// Everything but the unreserved characters of RFC 3986 is encoded.
const STRICT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Percent-encodes one value (path segment, query name or query value). A
/// value of dots only is written as `%2E`s, so that it cannot pass for a
/// `.` or `..` path segment.
pub fn encode(text: &str) -> String {
    if !text.is_empty() && text.bytes().all(|b| b == b'.') {
        return "%2E".repeat(text.len());
    }
    utf8_percent_encode(text, STRICT).to_string()
}

/// A URL with `{column}` placeholders in its path or query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Column(String),
}

impl UrlTemplate {
    /// Parses and checks `url` (already `${VAR}`-expanded): an absolute
    /// http(s) URL whose scheme and host hold no placeholder.
    pub fn parse(url: &str) -> Result<UrlTemplate, String> {
        if let Some((_, rest)) = url.split_once("://")
            && rest.split(['/', '?', '#']).next().is_none_or(|authority| authority.rsplit('@').next() == Some(""))
        {
            return Err("it has no host after `://` (write e.g. `https://api.example.com/hook`)".into());
        }
        if !url.contains("://") {
            return Err("it is not an absolute URL (write e.g. `https://api.example.com/hook`)".into());
        }
        let mut parts = Vec::new();
        let mut rest = url;
        while let Some(open) = rest.find('{') {
            let close = rest[open..].find('}').ok_or("a `{` has no closing `}`")? + open;
            let name = &rest[open + 1..close];
            if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                return Err(format!("`{{{name}}}` is not a column placeholder (write e.g. `{{customer_id}}`)"));
            }
            parts.push(Part::Text(rest[..open].to_string()));
            parts.push(Part::Column(name.to_string()));
            rest = &rest[close + 1..];
        }
        parts.push(Part::Text(rest.to_string()));
        let template = UrlTemplate { parts };
        let sample = template.fill(&|_| Some("x".to_string()));
        let parsed = url::Url::parse(&sample).map_err(|e| e.to_string())?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("scheme `{}` is not http or https", parsed.scheme()));
        }
        if parsed.host().is_none() {
            return Err("it has no host".into());
        }
        let authority_end =
            url.find("://").map(|i| i + 3).map(|i| url[i..].find(['/', '?', '#']).map_or(url.len(), |j| i + j));
        if url.find('{').is_some_and(|first| authority_end.is_some_and(|end| first < end)) {
            return Err("placeholders may stand only in the path or the query, never in the host".into());
        }
        Ok(template)
    }

    /// The columns the placeholders read.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Column(c) => Some(c.as_str()),
            Part::Text(_) => None,
        })
    }

    fn fill(&self, value: &dyn Fn(&str) -> Option<String>) -> String {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.clone(),
                Part::Column(c) => value(c).map(|v| encode(&v)).unwrap_or_default(),
            })
            .collect()
    }

    /// The URL for one record: placeholders filled from `values`, then
    /// `params` appended to the query (before any fragment).
    pub fn render(&self, values: &Map<String, Value>, params: &[(String, String)]) -> Result<String, String> {
        for column in self.columns() {
            if values.get(column).is_none_or(Value::is_null) {
                return Err(format!("the URL placeholder {{{column}}} is NULL or missing for this record"));
            }
        }
        let mut url = self.fill(&|c| values.get(c).map(scalar_text));
        if let Some(segment) = dot_segment_from_data(&url) {
            return Err(format!(
                "the URL placeholders make the path segment `{segment}`, which servers and proxies read as a step \
                 in the path (`.` or `..`), not as a value; the record is not sent"
            ));
        }
        if params.is_empty() {
            return Ok(url);
        }
        let fragment = url.find('#').map(|i| url.split_off(i)).unwrap_or_default();
        let mut sep = if url.contains('?') { if url.ends_with(['?', '&']) { "" } else { "&" } } else { "?" };
        for (name, value) in params {
            url.push_str(sep);
            url.push_str(&encode(name));
            url.push('=');
            url.push_str(&encode(value));
            sep = "&";
        }
        url.push_str(&fragment);
        Ok(url)
    }
}

/// A path segment of `url` that is `.` or `..` once decoded and was made
/// so by a placeholder value (its dots are percent-encoded: [`encode`]
/// encodes a value of dots only as `%2E`s).
fn dot_segment_from_data(url: &str) -> Option<String> {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let path_start = url[after_scheme..].find('/').map(|i| after_scheme + i)?;
    let path_end = url[path_start..].find(['?', '#']).map_or(url.len(), |i| path_start + i);
    url[path_start..path_end]
        .split('/')
        .find(|segment| {
            let upper = segment.to_ascii_uppercase();
            upper.contains("%2E") && matches!(upper.replace("%2E", ".").as_str(), "." | "..")
        })
        .map(str::to_string)
}

/// A value as URL text: strings as they are, everything else as JSON text.
pub fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The payload flattened into query parameters (SPEC §3): nested keys joined
/// by `separator`, array items by index, nulls (and empty objects and
/// arrays) left out, booleans as `true`/`false`.
pub fn flatten(value: &Value, separator: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    walk(value, String::new(), separator, &mut out);
    out
}

fn walk(value: &Value, prefix: String, sep: &str, out: &mut Vec<(String, String)>) {
    let join = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}{sep}{k}") };
    match value {
        Value::Null => {}
        Value::Object(map) => {
            for (k, v) in map {
                walk(v, join(k), sep, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                walk(v, join(&i.to_string()), sep, out);
            }
        }
        other => out.push((prefix, scalar_text(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn placeholders_and_params_are_encoded_and_cannot_change_the_target() {
        let t = UrlTemplate::parse("https://api.example.com/users/{id}?foo=bar").unwrap();
        let evil = map(json!({"id": "1/../admin?x=1#frag&y=%41\r\né"}));
        let url = t.render(&evil, &[("email".into(), "a&b=c@x.org".into())]).unwrap();
        assert_eq!(
            url,
            "https://api.example.com/users/1%2F..%2Fadmin%3Fx%3D1%23frag%26y%3D%2541%0D%0A%C3%A9?foo=bar&email=a%26b%3Dc%40x.org"
        );
        let parsed = url::Url::parse(&url).unwrap();
        assert_eq!(parsed.host_str(), Some("api.example.com"));
        assert_eq!(parsed.path_segments().unwrap().count(), 2);
        assert_eq!(parsed.query_pairs().count(), 2);
        assert_eq!(parsed.fragment(), None);
    }

    #[test]
    fn placeholders_stay_out_of_the_host_and_must_have_values() {
        assert!(UrlTemplate::parse("https://{tenant}.example.com/x").unwrap_err().contains("host"));
        assert!(UrlTemplate::parse("https://example.com/{a b}").is_err());
        let t = UrlTemplate::parse("http://h/u/{id}").unwrap();
        assert!(t.render(&map(json!({"id": null})), &[]).unwrap_err().contains("{id}"));
        assert_eq!(t.columns().collect::<Vec<_>>(), ["id"]);
    }

    #[test]
    fn dot_segments_from_data_are_refused_and_dots_inside_values_kept() {
        let t = UrlTemplate::parse("https://api.example.com/users/{id}/x{suffix}").unwrap();
        for id in [".", ".."] {
            let err = t.render(&map(json!({"id": id, "suffix": "1"})), &[]).unwrap_err();
            assert!(err.contains("path segment `%2E"), "{id}: {err}");
        }
        let url = t.render(&map(json!({"id": "a.b", "suffix": "..."})), &[]).unwrap();
        assert_eq!(url, "https://api.example.com/users/a.b/x%2E%2E%2E");
        let split = UrlTemplate::parse("https://h/u/{a}{b}").unwrap();
        assert!(split.render(&map(json!({"a": ".", "b": "."})), &[]).is_err(), "two values that make `..`");
        let prefixed = UrlTemplate::parse("https://h/u/.{a}").unwrap();
        assert!(prefixed.render(&map(json!({"a": "."})), &[]).is_err(), "a value that completes `..`");
        let query = UrlTemplate::parse("https://h/u?x={a}").unwrap();
        assert_eq!(query.render(&map(json!({"a": ".."})), &[]).unwrap(), "https://h/u?x=%2E%2E");
    }

    #[test]
    fn flattening_follows_the_spec() {
        let payload: Value =
            serde_json::from_str(r#"{"a": {"b": 1, "c": [true, null, "x y"]}, "n": null, "e": {}, "f": 2.50}"#)
                .unwrap();
        let pairs = flatten(&payload, "__");
        assert_eq!(
            pairs,
            [
                ("a__b".to_string(), "1".to_string()),
                ("a__c__0".into(), "true".into()),
                ("a__c__2".into(), "x y".into()),
                ("f".into(), "2.50".into()),
            ]
        );
        assert_eq!(flatten(&json!({"a": {"b": 1}}), ".")[0].0, "a.b");
    }
}
