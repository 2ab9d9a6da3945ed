//! `${VAR}` references to environment variables inside configuration strings.
//!
//! `${NAME}` is replaced by the variable's value; `${NAME:-fallback}` uses
//! `fallback` when the variable is unset or empty. Anything else that starts
//! with `$` is kept as written. Expansion happens when a value is used, so
//! configuration that is printed (plans, errors) shows the reference, never
//! the secret behind it.

use std::collections::HashMap;

/// One `${...}` reference found in a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The variable name.
    pub name: String,
    /// The fallback after `:-`, if any.
    pub fallback: Option<String>,
    /// Byte offset of the `$` in the scanned text.
    pub offset: usize,
}

/// A variable that is referenced but not set, and has no fallback.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable {name} is not set (referenced as ${{{name}}}; set it, or write ${{{name}:-fallback}})")]
pub struct MissingVar {
    /// The variable name.
    pub name: String,
}

/// Where variables are read from: the process environment, with optional
/// overrides (used by `backflow demo` and by tests).
#[derive(Debug, Clone, Default)]
pub struct Env {
    overrides: HashMap<String, String>,
    /// Every value a reference was expanded to, with the variable's name
    /// (shared by clones), for [`Env::redact`].
    expanded: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

/// Values shorter than this are not redacted: they cannot be secrets, and
/// replacing them would garble messages.
const SECRET_LEN: usize = 6;

impl Env {
    /// The process environment.
    pub fn process() -> Env {
        Env::default()
    }

    /// The process environment with `name` set to `value` for this process's
    /// configuration only.
    pub fn with(mut self, name: &str, value: &str) -> Env {
        self.overrides.insert(name.to_string(), value.to_string());
        self
    }

    /// The value of `name`, if set and not empty.
    pub fn get(&self, name: &str) -> Option<String> {
        self.overrides.get(name).cloned().or_else(|| std::env::var(name).ok()).filter(|v| !v.is_empty())
    }

    /// Replaces every reference in `text`.
    pub fn expand(&self, text: &str) -> Result<String, MissingVar> {
        let mut out = String::with_capacity(text.len());
        let mut rest = 0;
        for r in references(text) {
            out.push_str(&text[rest..r.offset]);
            let value = match (self.get(&r.name), &r.fallback) {
                (Some(v), _) => {
                    self.remember(&r.name, &v);
                    v
                }
                (None, Some(f)) => f.clone(),
                (None, None) => return Err(MissingVar { name: r.name }),
            };
            out.push_str(&value);
            rest = r.offset + reference_len(&text[r.offset..]);
        }
        out.push_str(&text[rest..]);
        Ok(out)
    }

    fn remember(&self, name: &str, value: &str) {
        if value.len() < SECRET_LEN {
            return;
        }
        let mut expanded = self.expanded.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !expanded.iter().any(|(v, _)| v == value) {
            expanded.push((value.to_string(), name.to_string()));
            // Longest first, so a value inside another is not replaced first.
            expanded.sort_by_key(|(v, _)| std::cmp::Reverse(v.len()));
        }
    }

    /// `text` with every value a reference was expanded to (of six
    /// characters or more) written back as the reference, `${NAME}`: for
    /// messages that may echo expanded configuration, such as a warehouse's
    /// error quoting the query, or a receiver's answer echoing a header.
    pub fn redact(&self, text: &str) -> String {
        let expanded = self.expanded.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut out = text.to_string();
        for (value, name) in expanded.iter() {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), &format!("${{{name}}}"));
            }
        }
        out
    }

    /// The first reference in `text` that cannot be resolved, if any.
    pub fn first_missing(&self, text: &str) -> Option<Reference> {
        references(text).into_iter().find(|r| r.fallback.is_none() && self.get(&r.name).is_none())
    }
}

/// Every well-formed `${NAME}` or `${NAME:-fallback}` reference in `text`.
pub fn references(text: &str) -> Vec<Reference> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(pos) = text[from..].find("${") {
        let offset = from + pos;
        let len = reference_len(&text[offset..]);
        if len == 0 {
            from = offset + 2;
            continue;
        }
        let inner = &text[offset + 2..offset + len - 1];
        let (name, fallback) = match inner.split_once(":-") {
            Some((n, f)) => (n, Some(f.to_string())),
            None => (inner, None),
        };
        found.push(Reference { name: name.to_string(), fallback, offset });
        from = offset + len;
    }
    found
}

/// Length of the reference starting at `text[0]`, or 0 when it is not one.
fn reference_len(text: &str) -> usize {
    let Some(close) = text.find('}') else { return 0 };
    let inner = &text[2..close];
    let name = inner.split_once(":-").map_or(inner, |(n, _)| n);
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid { close + 1 } else { 0 }
}

/// Whether a header usually carries credentials (its value is never
/// printed): `Authorization`, `Cookie`, and names with `auth`, `token`,
/// `secret`, `key` or `password` (but `Idempotency-Key`).
pub fn is_credential_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name == "cookie"
        || ["auth", "token", "secret", "key", "password"].iter().any(|w| name.contains(w) && name != "idempotency-key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_set_variables_and_fallbacks() {
        let env = Env::default().with("BF_TEST_TOKEN", "s3cret");
        assert_eq!(env.expand("Bearer ${BF_TEST_TOKEN}").unwrap(), "Bearer s3cret");
        assert_eq!(env.expand("${BF_TEST_UNSET_1:-http://x}/a").unwrap(), "http://x/a");
        assert_eq!(env.expand("cost: $5 ${not a ref}").unwrap(), "cost: $5 ${not a ref}");
    }

    #[test]
    fn expanded_values_are_redacted_back_to_their_reference() {
        let env = Env::default().with("BF_TEST_TOKEN", "s3cret-token").with("BF_TEST_SHORT", "on");
        let clone = env.clone();
        assert_eq!(env.expand("${BF_TEST_TOKEN} ${BF_TEST_SHORT}").unwrap(), "s3cret-token on");
        assert_eq!(
            clone.redact("error near 's3cret-token' (on)"),
            "error near '${BF_TEST_TOKEN}' (on)",
            "clones share what was expanded; short values are left"
        );
    }

    #[test]
    fn missing_variable_is_named() {
        let err = Env::default().expand("a ${BF_TEST_UNSET_2} b").unwrap_err();
        assert_eq!(err.name, "BF_TEST_UNSET_2");
        assert!(err.to_string().contains("BF_TEST_UNSET_2 is not set"));
        let r = Env::default().first_missing("x\n  ${BF_TEST_UNSET_2}").unwrap();
        assert_eq!(r.offset, 4);
    }
}
