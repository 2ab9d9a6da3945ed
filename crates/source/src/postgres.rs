//! The Postgres warehouse: one sqlx connection per query. The query is
//! prepared (for its column names and types, checked before any row), then
//! its rows are read as `COPY (query) TO STDOUT (FORMAT binary)` output — as
//! psql's `\copy` reads them, one message per row — and streamed (never the
//! whole result in memory), each value turned into JSON from Postgres'
//! binary format by the same rules as DuckDB values (see [`crate::json`]).
//!
//! The connection runs on its own thread with its own small runtime and hands
//! rows over in bounded batches, so decoding overlaps with whatever the
//! consumer does with them, and callers stay synchronous.

use crate::json::{base64, date, exact_number, float, infinity, interval, shortest, time, time_text, timestamp};
use crate::{Message, Outbox, RowConsumer, SourceError, check_distinct};
use duckdb::arrow::datatypes::TimeUnit;
use futures_util::TryStreamExt;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgSslMode, PgTypeInfo, PgTypeKind};
use sqlx::{Column, Connection, Executor, SqlSafeStr, Statement, TypeInfo};
use std::str::FromStr;
use std::time::Duration;

/// Rows handed to the consumer at a time.
const BATCH: usize = 1024;
/// Batches decoded ahead of the consumer.
const AHEAD: usize = 4;
/// Microseconds from 1970-01-01 (Unix) to 2000-01-01 (Postgres' epoch).
const EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Days from 1970-01-01 to 2000-01-01.
const EPOCH_DAYS: i64 = 10_957;

/// A Postgres server to query.
#[derive(Debug, Clone)]
pub struct PostgresSource {
    options: PgConnectOptions,
    /// `user@host:port/database`, never the password.
    shown: String,
}

/// How a column's values become JSON.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    Float4,
    Float8,
    Numeric,
    Text,
    Char,
    Bytea,
    Uuid,
    Json,
    Jsonb,
    Date,
    Time,
    TimeTz,
    Timestamp,
    TimestampTz,
    Interval,
    Array(Box<Kind>),
}

impl PostgresSource {
    /// Reads the connection settings: a `postgres://` URL (which may carry
    /// `sslmode`, `sslrootcert` and other libpq parameters), with `ssl_mode`
    /// and `ssl_root_cert` overriding the URL's and `query_timeout` sent as
    /// the session's `statement_timeout`. Connects only when a query runs.
    pub fn open(
        url: &str,
        ssl_mode: Option<&str>,
        ssl_root_cert: Option<&std::path::Path>,
        query_timeout: Option<Duration>,
    ) -> Result<PostgresSource, SourceError> {
        let mut options = PgConnectOptions::from_str(url).map_err(|e| SourceError::Open {
            path: redact_url(url),
            message: format!(
                "not a Postgres connection URL ({}); write e.g. `postgres://user:password@127.0.0.1:5432/analytics`",
                redact_url(&e.to_string())
            ),
        })?;
        if let Some(mode) = ssl_mode {
            options = options.ssl_mode(PgSslMode::from_str(mode).map_err(|_| SourceError::Open {
                path: redact_url(url),
                message: format!(
                    "ssl_mode `{mode}` is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ),
            })?);
        }
        if let Some(cert) = ssl_root_cert {
            options = options.ssl_root_cert(cert);
        }
        if let Some(timeout) = query_timeout {
            options = options.options([("statement_timeout", format!("{}ms", timeout.as_millis()))]);
        }
        options = options.application_name("backflow");
        let shown = format!(
            "{}@{}:{}/{}",
            options.get_username(),
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or(options.get_username())
        );
        Ok(PostgresSource { options, shown })
    }

    /// Streams `query`'s rows to `consumer` in order.
    pub fn stream(&self, query: &str, consumer: &mut dyn RowConsumer) -> Result<u64, SourceError> {
        crate::stream_from_thread(AHEAD, consumer, move |tx| {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime.block_on(self.produce(query, tx)),
                Err(e) => Err(SourceError::Query(format!("cannot start the Postgres client: {e}"))),
            }
        })
    }

    /// Connects, prepares `query` and sends its columns, then its rows in
    /// batches. Returns early (quietly) when the consumer has gone.
    async fn produce(&self, query: &str, tx: &Outbox) -> Result<(), SourceError> {
        let mut conn = PgConnection::connect_with(&self.options)
            .await
            .map_err(|e| SourceError::Connect { target: self.shown.clone(), message: explain(&e) })?;
        let statement = conn
            .prepare(sqlx::AssertSqlSafe(query.to_string()).into_sql_str())
            .await
            .map_err(|e| SourceError::Query(explain(&e)))?;
        let names: Vec<String> = statement.columns().iter().map(|c| c.name().to_string()).collect();
        check_distinct(&names)?;
        let kinds = statement
            .columns()
            .iter()
            .map(|c| {
                kind(c.type_info()).ok_or_else(|| SourceError::UnsupportedType {
                    column: c.name().to_string(),
                    type_name: c.type_info().name().to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if tx.send(Ok(Message::Columns(names.clone()))).is_err() {
            return Ok(());
        }
        // The rows come as `COPY … TO STDOUT` in the binary format, as psql's
        // `\copy` reads them: one message per row, no per-row bookkeeping.
        let copy = format!("COPY (\n{}\n) TO STDOUT (FORMAT binary)", query.trim_end().trim_end_matches(';'));
        let mut chunks = conn.copy_out_raw(&copy).await.map_err(|e| SourceError::Query(explain(&e)))?;
        let mut buffer: Vec<u8> = Vec::new();
        let mut at = 0;
        let mut header = true;
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(chunk) = chunks.try_next().await.map_err(|e| SourceError::Query(explain(&e)))? {
            buffer.drain(..at);
            at = 0;
            buffer.extend_from_slice(&chunk);
            if header {
                match copy_header(&buffer).map_err(SourceError::Query)? {
                    Some(len) => (at, header) = (len, false),
                    None => continue,
                }
            }
            while let Some((fields, end)) = copy_tuple(&buffer, at).map_err(SourceError::Query)? {
                at = end;
                let Some(fields) = fields else { break };
                if fields.len() != kinds.len() {
                    return Err(SourceError::Query(format!(
                        "COPY sent {} columns where the query has {}",
                        fields.len(),
                        kinds.len()
                    )));
                }
                let mut values = Vec::with_capacity(kinds.len());
                for (i, (kind, field)) in kinds.iter().zip(fields).enumerate() {
                    values.push(match field {
                        None => Value::Null,
                        Some(range) => decode(kind, &buffer[range])
                            .map_err(|reason| SourceError::Value { column: names[i].clone(), reason })?,
                    });
                }
                batch.push(values);
                if batch.len() == BATCH && tx.send(Ok(Message::Rows(std::mem::take(&mut batch)))).is_err() {
                    return Ok(());
                }
            }
        }
        drop(chunks);
        if !batch.is_empty() {
            let _ = tx.send(Ok(Message::Rows(batch)));
        }
        let _ = conn.close().await;
        Ok(())
    }
}

/// The signature that opens `COPY … (FORMAT binary)` output.
const COPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// The length of the binary COPY header at the start of `buffer`, `None`
/// while it is incomplete.
fn copy_header(buffer: &[u8]) -> Result<Option<usize>, String> {
    if buffer.len() < COPY_SIGNATURE.len() + 8 {
        return Ok(None);
    }
    if !buffer.starts_with(COPY_SIGNATURE) {
        return Err("the server's COPY output does not start with the binary signature".into());
    }
    let extension = i32_at(buffer, COPY_SIGNATURE.len() + 4)?;
    let len = COPY_SIGNATURE.len() + 8 + usize::try_from(extension).map_err(|_| "a malformed COPY header")?;
    Ok((buffer.len() >= len).then_some(len))
}

/// The byte ranges of the fields (`None` for NULL) of the tuple at `at`,
/// and where the next one starts; `None` while the tuple is incomplete, and
/// no fields at the end marker.
#[allow(clippy::type_complexity)]
fn copy_tuple(
    buffer: &[u8],
    at: usize,
) -> Result<Option<(Option<Vec<Option<std::ops::Range<usize>>>>, usize)>, String> {
    let Ok(count) = i16_at(buffer, at) else { return Ok(None) };
    if count == -1 {
        return Ok(Some((None, at + 2)));
    }
    let mut fields = Vec::with_capacity(count.max(0) as usize);
    let mut pos = at + 2;
    for _ in 0..count {
        let Ok(len) = i32_at(buffer, pos) else { return Ok(None) };
        pos += 4;
        if len < 0 {
            fields.push(None);
        } else {
            let end = pos + len as usize;
            if end > buffer.len() {
                return Ok(None);
            }
            fields.push(Some(pos..end));
            pos = end;
        }
    }
    Ok(Some((Some(fields), pos)))
}

/// The JSON rule for a column type; `None` for a type without one.
fn kind(info: &PgTypeInfo) -> Option<Kind> {
    match info.kind() {
        PgTypeKind::Enum(_) => return Some(Kind::Text),
        PgTypeKind::Domain(base) => return kind(base),
        PgTypeKind::Array(element) => return kind(element).map(|k| Kind::Array(Box::new(k))),
        PgTypeKind::Simple => {}
        _ => return None,
    }
    Some(match info.oid()?.0 {
        16 => Kind::Bool,
        17 => Kind::Bytea,
        18 => Kind::Char,
        19 | 25 | 1042 | 1043 => Kind::Text,
        20 => Kind::Int8,
        21 => Kind::Int2,
        23 => Kind::Int4,
        26 => Kind::Oid,
        114 => Kind::Json,
        700 => Kind::Float4,
        701 => Kind::Float8,
        1082 => Kind::Date,
        1083 => Kind::Time,
        1114 => Kind::Timestamp,
        1184 => Kind::TimestampTz,
        1186 => Kind::Interval,
        1266 => Kind::TimeTz,
        1700 => Kind::Numeric,
        2950 => Kind::Uuid,
        3802 => Kind::Jsonb,
        // citext and similar extension types send their text.
        _ if info.name().eq_ignore_ascii_case("citext") => Kind::Text,
        _ => return None,
    })
}

/// Reads `N` bytes at `at`.
fn take<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N], String> {
    bytes.get(at..at + N).and_then(|b| b.try_into().ok()).ok_or_else(|| "the value is cut short".to_string())
}

fn i16_at(bytes: &[u8], at: usize) -> Result<i16, String> {
    Ok(i16::from_be_bytes(take(bytes, at)?))
}

fn i32_at(bytes: &[u8], at: usize) -> Result<i32, String> {
    Ok(i32::from_be_bytes(take(bytes, at)?))
}

fn i64_at(bytes: &[u8], at: usize) -> Result<i64, String> {
    Ok(i64::from_be_bytes(take(bytes, at)?))
}

fn utf8(bytes: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(bytes).map_err(|e| format!("text that is not UTF-8 ({e})"))
}

/// One non-NULL value in Postgres' binary format.
fn decode(kind: &Kind, bytes: &[u8]) -> Result<Value, String> {
    Ok(match kind {
        Kind::Bool => Value::Bool(take::<1>(bytes, 0)?[0] != 0),
        Kind::Int2 => i16_at(bytes, 0)?.into(),
        Kind::Int4 => i32_at(bytes, 0)?.into(),
        Kind::Int8 => i64_at(bytes, 0)?.into(),
        Kind::Oid => u32::from_be_bytes(take(bytes, 0)?).into(),
        Kind::Float4 => {
            let v = f32::from_be_bytes(take(bytes, 0)?);
            float(v as f64, |m| shortest(v, m))
        }
        Kind::Float8 => float(f64::from_be_bytes(take(bytes, 0)?), |v| shortest(v, v)),
        Kind::Numeric => numeric(bytes)?,
        Kind::Text | Kind::Char => Value::String(utf8(bytes)?.to_string()),
        Kind::Bytea => base64(bytes),
        Kind::Uuid => Value::String(
            uuid::Uuid::from_slice(bytes).map_err(|e| format!("a malformed uuid ({e})"))?.hyphenated().to_string(),
        ),
        Kind::Json => serde_json::from_slice(bytes).map_err(|e| format!("malformed JSON ({e})"))?,
        Kind::Jsonb => match bytes.split_first() {
            Some((1, text)) => serde_json::from_slice(text).map_err(|e| format!("malformed JSON ({e})"))?,
            _ => return Err("a jsonb value in an unknown format version".into()),
        },
        Kind::Date => match i32_at(bytes, 0)? {
            i32::MAX => infinity(1),
            i32::MIN => infinity(-1),
            days => date(days as i64 + EPOCH_DAYS),
        },
        Kind::Time => time(i64_at(bytes, 0)?, TimeUnit::Microsecond),
        Kind::TimeTz => {
            let mut text = time_text(i64_at(bytes, 0)?, TimeUnit::Microsecond);
            // The zone is stored in seconds west of UTC.
            let east = -i32_at(bytes, 8)?;
            let (sign, abs) = if east < 0 { ('-', -east) } else { ('+', east) };
            text.push_str(&format!("{sign}{:02}:{:02}", abs / 3600, abs / 60 % 60));
            if abs % 60 != 0 {
                text.push_str(&format!(":{:02}", abs % 60));
            }
            Value::String(text)
        }
        Kind::Timestamp | Kind::TimestampTz => match i64_at(bytes, 0)? {
            i64::MAX => infinity(1),
            i64::MIN => infinity(-1),
            micros => timestamp(micros + EPOCH_MICROS, TimeUnit::Microsecond, *kind == Kind::TimestampTz),
        },
        Kind::Interval => {
            let (micros, days, months) = (i64_at(bytes, 0)?, i32_at(bytes, 8)?, i32_at(bytes, 12)?);
            interval(months as i64, days as i64, micros as i128 * 1000)
        }
        Kind::Array(element) => array(element, bytes)?,
    })
}

/// `numeric`: base-10000 digits with a weight and a display scale; NaN and
/// the infinities as strings, like non-finite floats.
fn numeric(bytes: &[u8]) -> Result<Value, String> {
    let (ndigits, weight) = (i16_at(bytes, 0)? as usize, i16_at(bytes, 2)? as i64);
    let sign = u16::from_be_bytes(take(bytes, 4)?);
    let scale = i16_at(bytes, 6)?.max(0) as usize;
    match sign {
        0xC000 => return Ok(Value::String("NaN".into())),
        0xD000 => return Ok(Value::String("Infinity".into())),
        0xF000 => return Ok(Value::String("-Infinity".into())),
        _ => {}
    }
    let digits = (0..ndigits).map(|i| i16_at(bytes, 8 + 2 * i)).collect::<Result<Vec<_>, _>>()?;
    let digit = |position: i64| -> i16 {
        // Digit group `position` counts from the first group (weight) down.
        usize::try_from(weight - position).ok().and_then(|i| digits.get(i).copied()).unwrap_or(0)
    };
    let mut text = String::new();
    if sign == 0x4000 {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        for position in (0..=weight).rev() {
            let group = digit(position);
            if position == weight {
                text.push_str(&group.to_string());
            } else {
                text.push_str(&format!("{group:04}"));
            }
        }
    }
    if scale > 0 {
        text.push('.');
        let mut fraction = String::new();
        let mut position = -1;
        while fraction.len() < scale {
            fraction.push_str(&format!("{:04}", digit(position)));
            position -= 1;
        }
        text.push_str(&fraction[..scale]);
    }
    Ok(exact_number(&text))
}

/// An array (of any number of dimensions) as nested JSON arrays.
fn array(element: &Kind, bytes: &[u8]) -> Result<Value, String> {
    let ndim = i32_at(bytes, 0)?;
    if ndim == 0 {
        return Ok(Value::Array(vec![]));
    }
    let ndim = usize::try_from(ndim).map_err(|_| "an array with a negative dimension count".to_string())?;
    let mut dims = Vec::with_capacity(ndim);
    for d in 0..ndim {
        dims.push(usize::try_from(i32_at(bytes, 12 + 8 * d)?).map_err(|_| "an array with a negative length")?);
    }
    let mut at = 12 + 8 * ndim;
    let total: usize = dims.iter().product();
    let mut values = Vec::with_capacity(total);
    for _ in 0..total {
        let len = i32_at(bytes, at)?;
        at += 4;
        if len < 0 {
            values.push(Value::Null);
        } else {
            let end = at + len as usize;
            let item = bytes.get(at..end).ok_or("an array element is cut short")?;
            values.push(decode(element, item)?);
            at = end;
        }
    }
    // Fold the flat elements into nested arrays, innermost dimension first.
    for &len in dims[1..].iter().rev() {
        let mut outer = Vec::with_capacity(values.len() / len.max(1));
        let mut items = values.into_iter();
        loop {
            let chunk: Vec<Value> = items.by_ref().take(len).collect();
            if chunk.is_empty() {
                break;
            }
            outer.push(Value::Array(chunk));
        }
        values = outer;
    }
    Ok(Value::Array(values))
}

/// Explains a Postgres client error with what would fix it. Never carries
/// a password: neither sqlx nor the server puts one in an error.
fn explain(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            let hint = match code.as_str() {
                "28P01" => "; check the user and password in the warehouse `url` (or DATABASE_URL)",
                "28000" => "; the role does not exist or may not connect: check the user in the warehouse `url`",
                "3D000" => "; create the database (`createdb NAME`) or fix the database name in the warehouse `url`",
                "57014" => "; the query ran past the warehouse's `query_timeout`: raise it or make the query faster",
                "42P01" | "42703" | "42601" | "42883" => "; fix the sync's `query`",
                "42501" => "; grant the warehouse user SELECT on what the query reads",
                _ => "",
            };
            format!("{} (SQLSTATE {code}){hint}", db.message())
        }
        sqlx::Error::Io(io) => {
            format!("{io}; is the server running, and are the host and port in the warehouse `url` right?")
        }
        sqlx::Error::Tls(tls) => format!("TLS failed ({tls}); check `ssl_mode` and `ssl_root_cert`"),
        sqlx::Error::Protocol(p) => format!("protocol error: {p}"),
        other => other.to_string(),
    }
}

/// A connection URL with its password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return url.to_string() };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => {
            format!("{}{}:***{}", &url[..scheme_end + 3], &authority[..colon], &rest[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn numeric_bytes(ndigits: &[i16], weight: i16, sign: u16, scale: i16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend((ndigits.len() as i16).to_be_bytes());
        b.extend(weight.to_be_bytes());
        b.extend(sign.to_be_bytes());
        b.extend(scale.to_be_bytes());
        for d in ndigits {
            b.extend(d.to_be_bytes());
        }
        b
    }

    #[test]
    fn binary_copy_output_parses_across_any_split() {
        let mut out = COPY_SIGNATURE.to_vec();
        out.extend(0i32.to_be_bytes());
        out.extend(2i32.to_be_bytes()); // a header extension of 2 bytes
        out.extend([9, 9]);
        let header = out.len();
        out.extend(2i16.to_be_bytes());
        out.extend(3i32.to_be_bytes());
        out.extend(b"abc");
        out.extend((-1i32).to_be_bytes());
        let first_end = out.len();
        out.extend((-1i16).to_be_bytes());
        for cut in 0..out.len() {
            let part = &out[..cut];
            match copy_header(part).unwrap() {
                None => assert!(cut < header, "cut {cut}"),
                Some(len) => {
                    assert_eq!(len, header);
                    match copy_tuple(part, len).unwrap() {
                        None => assert!(cut < first_end, "cut {cut}"),
                        Some((fields, end)) => {
                            assert_eq!(fields, Some(vec![Some(header + 6..header + 9), None]));
                            assert_eq!(end, first_end);
                            let last = copy_tuple(part, end).unwrap();
                            assert_eq!(last.is_some(), cut == out.len(), "cut {cut}");
                        }
                    }
                }
            }
        }
        assert_eq!(copy_tuple(&out, first_end).unwrap(), Some((None, out.len())));
        assert!(copy_header(b"NOTCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0").is_err());
    }

    #[test]
    fn numerics_keep_every_digit_and_their_scale() {
        let n = |digits: &[i16], weight, sign, scale| numeric(&numeric_bytes(digits, weight, sign, scale)).unwrap();
        assert_eq!(n(&[12, 5000], 0, 0, 2).to_string(), "12.50");
        assert_eq!(n(&[1, 2345, 6789], 2, 0x4000, 0).to_string(), "-123456789");
        assert_eq!(n(&[1], -2, 0, 8).to_string(), "0.00000001");
        assert_eq!(n(&[], 0, 0, 3).to_string(), "0.000");
        assert_eq!(n(&[1], 3, 0, 0).to_string(), "1000000000000");
        assert_eq!(n(&[], 0, 0xC000, 0), json!("NaN"));
        assert_eq!(n(&[], 0, 0xF000, 0), json!("-Infinity"));
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("postgres://bob:s3cret@db:5432/x?sslmode=require"),
            "postgres://bob:***@db:5432/x?sslmode=require"
        );
        assert_eq!(redact_url("postgres://bob@db/x"), "postgres://bob@db/x");
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
    }
}
