//! How warehouse values become JSON. These rules are part of the wire
//! contract (README, "Type mapping"):
//!
//! | warehouse type | JSON |
//! |---|---|
//! | NULL | `null` |
//! | BOOLEAN | `true` / `false` |
//! | TINYINT … BIGINT, UTINYINT … UBIGINT, HUGEINT, UHUGEINT | number, every digit kept |
//! | DECIMAL(p, s) | number with exactly `s` decimals (`12.50`), never rounded through a float |
//! | FLOAT, DOUBLE | number (shortest form that reads back the same, `1e300` beyond 1e16 or below 1e-5); NaN and ±infinity as the strings `"NaN"`, `"Infinity"`, `"-Infinity"` |
//! | VARCHAR, ENUM, UUID | string |
//! | BIT | base64 of DuckDB's packed bits (cast `b::VARCHAR` for `"0101"`) |
//! | BLOB | string, standard base64 |
//! | DATE | `"2024-01-31"` |
//! | TIME | `"13:45:00"`, with `.ffffff` when there are sub-seconds |
//! | TIMESTAMP (any precision) | `"2024-01-31T13:45:00"`, with sub-seconds when present |
//! | TIMESTAMPTZ | `"2024-01-31T13:45:00Z"`, always in UTC |
//! | infinite DATE / TIMESTAMP | `"infinity"`, `"-infinity"` |
//! | INTERVAL | ISO-8601 duration: `"P1Y2M3DT4H5M6.5S"`, `"PT0S"` for zero; a negative part carries its sign (`"P-3D"`) |
//! | LIST, ARRAY | array |
//! | STRUCT | object, fields in declared order |
//! | MAP | object; non-text keys are written as their JSON text |
//! | UNION | the value of the member that is set |

use base64::Engine;
use chrono::{DateTime, NaiveDate};
use duckdb::arrow::array::{
    Array, AsArray, BooleanArray, Date32Array, Decimal128Array, LargeStringArray, StringArray, StringViewArray,
};
use duckdb::arrow::datatypes::{
    DataType, Date32Type, Date64Type, Decimal128Type, Decimal256Type, DurationMicrosecondType, DurationMillisecondType,
    DurationNanosecondType, DurationSecondType, Float16Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type,
    Int64Type, IntervalDayTimeType, IntervalMonthDayNanoType, IntervalUnit, IntervalYearMonthType,
    Time32MillisecondType, Time32SecondType, Time64MicrosecondType, Time64NanosecondType, TimeUnit,
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType, UInt8Type,
    UInt16Type, UInt32Type, UInt64Type,
};
use serde_json::{Number, Value};

use crate::SourceError;

/// Fails with [`SourceError::UnsupportedType`] when `data_type` (or a type
/// nested in it) has no JSON rule.
pub fn check_supported(column: &str, data_type: &DataType) -> Result<(), SourceError> {
    if supported(data_type) {
        Ok(())
    } else {
        Err(SourceError::UnsupportedType { column: column.to_string(), type_name: data_type.to_string() })
    }
}

fn supported(t: &DataType) -> bool {
    use DataType::*;
    match t {
        Null | Boolean | Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64 | Float16 | Float32
        | Float64 | Decimal128(..) | Decimal256(..) | Utf8 | LargeUtf8 | Utf8View | Binary | LargeBinary
        | BinaryView | FixedSizeBinary(_) | Date32 | Date64 | Time32(_) | Time64(_) | Timestamp(..) | Interval(_)
        | Duration(_) => true,
        List(f) | LargeList(f) | FixedSizeList(f, _) | Map(f, _) => supported(f.data_type()),
        Struct(fields) => fields.iter().all(|f| supported(f.data_type())),
        Union(fields, _) => fields.iter().all(|(_, f)| supported(f.data_type())),
        Dictionary(k, v) => k.is_dictionary_key_type() && supported(v),
        _ => false,
    }
}

/// The JSON value of row `i` of `array`. `Err` carries the name of a type
/// without a rule (callers check the schema first with [`check_supported`]).
pub fn cell(array: &dyn Array, i: usize) -> Result<Value, String> {
    if array.is_null(i) {
        return Ok(Value::Null);
    }
    use DataType::*;
    Ok(match array.data_type() {
        Null => Value::Null,
        Boolean => Value::Bool(array.as_boolean().value(i)),
        Int8 => array.as_primitive::<Int8Type>().value(i).into(),
        Int16 => array.as_primitive::<Int16Type>().value(i).into(),
        Int32 => array.as_primitive::<Int32Type>().value(i).into(),
        Int64 => array.as_primitive::<Int64Type>().value(i).into(),
        UInt8 => array.as_primitive::<UInt8Type>().value(i).into(),
        UInt16 => array.as_primitive::<UInt16Type>().value(i).into(),
        UInt32 => array.as_primitive::<UInt32Type>().value(i).into(),
        UInt64 => array.as_primitive::<UInt64Type>().value(i).into(),
        Float16 => float(array.as_primitive::<Float16Type>().value(i).to_f64(), |v| shortest(v, v)),
        Float32 => {
            let v = array.as_primitive::<Float32Type>().value(i);
            float(v as f64, |m| shortest(v, m))
        }
        Float64 => float(array.as_primitive::<Float64Type>().value(i), |v| shortest(v, v)),
        Decimal128(..) => exact_number(&array.as_primitive::<Decimal128Type>().value_as_string(i)),
        Decimal256(..) => exact_number(&array.as_primitive::<Decimal256Type>().value_as_string(i)),
        Utf8 => Value::String(array.as_string::<i32>().value(i).to_string()),
        LargeUtf8 => Value::String(array.as_string::<i64>().value(i).to_string()),
        Utf8View => Value::String(array.as_string_view().value(i).to_string()),
        Binary => base64(array.as_binary::<i32>().value(i)),
        LargeBinary => base64(array.as_binary::<i64>().value(i)),
        BinaryView => base64(array.as_binary_view().value(i)),
        FixedSizeBinary(_) => base64(array.as_fixed_size_binary().value(i)),
        Date32 => date(array.as_primitive::<Date32Type>().value(i) as i64),
        Date64 => date(array.as_primitive::<Date64Type>().value(i).div_euclid(86_400_000)),
        Time32(TimeUnit::Second) => time(array.as_primitive::<Time32SecondType>().value(i) as i64, TimeUnit::Second),
        Time32(unit) => time(array.as_primitive::<Time32MillisecondType>().value(i) as i64, *unit),
        Time64(TimeUnit::Nanosecond) => {
            time(array.as_primitive::<Time64NanosecondType>().value(i), TimeUnit::Nanosecond)
        }
        Time64(unit) => time(array.as_primitive::<Time64MicrosecondType>().value(i), *unit),
        Timestamp(unit, tz) => {
            let v = match unit {
                TimeUnit::Second => array.as_primitive::<TimestampSecondType>().value(i),
                TimeUnit::Millisecond => array.as_primitive::<TimestampMillisecondType>().value(i),
                TimeUnit::Microsecond => array.as_primitive::<TimestampMicrosecondType>().value(i),
                TimeUnit::Nanosecond => array.as_primitive::<TimestampNanosecondType>().value(i),
            };
            timestamp(v, *unit, tz.is_some())
        }
        Interval(IntervalUnit::MonthDayNano) => {
            let v = array.as_primitive::<IntervalMonthDayNanoType>().value(i);
            interval(v.months as i64, v.days as i64, v.nanoseconds as i128)
        }
        Interval(IntervalUnit::DayTime) => {
            let v = array.as_primitive::<IntervalDayTimeType>().value(i);
            interval(0, v.days as i64, v.milliseconds as i128 * 1_000_000)
        }
        Interval(IntervalUnit::YearMonth) => {
            interval(array.as_primitive::<IntervalYearMonthType>().value(i) as i64, 0, 0)
        }
        Duration(unit) => {
            let nanos = match unit {
                TimeUnit::Second => array.as_primitive::<DurationSecondType>().value(i) as i128 * 1_000_000_000,
                TimeUnit::Millisecond => array.as_primitive::<DurationMillisecondType>().value(i) as i128 * 1_000_000,
                TimeUnit::Microsecond => array.as_primitive::<DurationMicrosecondType>().value(i) as i128 * 1_000,
                TimeUnit::Nanosecond => array.as_primitive::<DurationNanosecondType>().value(i) as i128,
            };
            interval(0, 0, nanos)
        }
        List(_) => list(array.as_list::<i32>().value(i).as_ref())?,
        LargeList(_) => list(array.as_list::<i64>().value(i).as_ref())?,
        FixedSizeList(..) => list(array.as_fixed_size_list().value(i).as_ref())?,
        Struct(fields) => {
            let s = array.as_struct();
            let mut out = serde_json::Map::new();
            for (field, column) in fields.iter().zip(s.columns()) {
                out.insert(field.name().clone(), cell(column.as_ref(), i)?);
            }
            Value::Object(out)
        }
        Map(..) => {
            let entries = array.as_map().value(i);
            let (keys, values) = (entries.column(0), entries.column(1));
            let mut out = serde_json::Map::new();
            for j in 0..entries.len() {
                let key = match cell(keys.as_ref(), j)? {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                out.insert(key, cell(values.as_ref(), j)?);
            }
            Value::Object(out)
        }
        Dictionary(key_type, _) => {
            let key = match key_type.as_ref() {
                UInt8 => array.as_dictionary::<UInt8Type>().keys().value(i) as usize,
                UInt16 => array.as_dictionary::<UInt16Type>().keys().value(i) as usize,
                UInt32 => array.as_dictionary::<UInt32Type>().keys().value(i) as usize,
                UInt64 => array.as_dictionary::<UInt64Type>().keys().value(i) as usize,
                Int8 => array.as_dictionary::<Int8Type>().keys().value(i) as usize,
                Int16 => array.as_dictionary::<Int16Type>().keys().value(i) as usize,
                Int32 => array.as_dictionary::<Int32Type>().keys().value(i) as usize,
                Int64 => array.as_dictionary::<Int64Type>().keys().value(i) as usize,
                other => return Err(format!("dictionary keyed by {other}")),
            };
            cell(array.as_any_dictionary().values().as_ref(), key)?
        }
        Union(..) => {
            let u = array.as_union();
            cell(u.child(u.type_id(i)).as_ref(), u.value_offset(i))?
        }
        other => return Err(other.to_string()),
    })
}

/// Writes the JSON text of row `i` of `array` to `out`: byte for byte what
/// [`cell`] gives when serialized. For many rows of one array, make a
/// [`ColumnWriter`] once instead.
pub fn write_cell(array: &dyn Array, i: usize, out: &mut Vec<u8>) -> Result<(), String> {
    ColumnWriter::new(array).write(i, out)
}

/// Writes the JSON text of a column's values without building a JSON value
/// for the common scalar types (the staging hot path): the column's type is
/// looked at once, not per value.
pub enum ColumnWriter<'a> {
    /// BOOLEAN.
    Bool(&'a BooleanArray),
    /// Signed integers, widened.
    Int(Box<dyn Fn(usize) -> i64 + 'a>, &'a dyn Array),
    /// Unsigned integers, widened.
    UInt(Box<dyn Fn(usize) -> u64 + 'a>, &'a dyn Array),
    /// VARCHAR.
    Utf8(&'a StringArray),
    /// Large VARCHAR.
    LargeUtf8(&'a LargeStringArray),
    /// VARCHAR views.
    Utf8View(&'a StringViewArray),
    /// DECIMAL with a positive scale.
    Decimal(&'a Decimal128Array, usize),
    /// DATE.
    Date(&'a Date32Array),
    /// UHUGEINT, which Arrow carries as DECIMAL(38, 0) ([`UHUGEINT`]).
    UHugeInt(&'a Decimal128Array),
    /// Anything else, through [`cell`].
    Other(&'a dyn Array),
}

/// The field metadata key that marks a DECIMAL(38, 0) column as DuckDB's
/// UHUGEINT: Arrow has no unsigned 128-bit type, and DuckDB hands the bits
/// over as a signed decimal, which reads values from 2^127 up as negative.
/// The source marks such columns; their values are read unsigned.
pub const UHUGEINT: &str = "backflow.uhugeint";

/// Whether `field` is a UHUGEINT column ([`UHUGEINT`]).
pub fn is_uhugeint(field: &duckdb::arrow::datatypes::Field) -> bool {
    matches!(field.data_type(), DataType::Decimal128(_, 0)) && field.metadata().contains_key(UHUGEINT)
}

/// The JSON value of row `i` of `array`, the column `field`: [`cell`], with
/// UHUGEINT columns read unsigned.
pub fn field_cell(field: &duckdb::arrow::datatypes::Field, array: &dyn Array, i: usize) -> Result<Value, String> {
    if is_uhugeint(field) && !array.is_null(i) {
        return Ok(exact_number(&(array.as_primitive::<Decimal128Type>().value(i) as u128).to_string()));
    }
    cell(array, i)
}

impl<'a> ColumnWriter<'a> {
    /// The writer for `array`, the column `field`.
    pub fn for_field(field: &duckdb::arrow::datatypes::Field, array: &'a dyn Array) -> ColumnWriter<'a> {
        if is_uhugeint(field) {
            return ColumnWriter::UHugeInt(array.as_primitive::<Decimal128Type>());
        }
        ColumnWriter::new(array)
    }

    /// The writer for `array`.
    pub fn new(array: &'a dyn Array) -> ColumnWriter<'a> {
        use DataType::*;
        fn signed<T: duckdb::arrow::datatypes::ArrowPrimitiveType>(a: &dyn Array) -> Box<dyn Fn(usize) -> i64 + '_>
        where
            T::Native: Into<i64>,
        {
            let a = a.as_primitive::<T>();
            Box::new(move |i| a.value(i).into())
        }
        fn unsigned<T: duckdb::arrow::datatypes::ArrowPrimitiveType>(a: &dyn Array) -> Box<dyn Fn(usize) -> u64 + '_>
        where
            T::Native: Into<u64>,
        {
            let a = a.as_primitive::<T>();
            Box::new(move |i| a.value(i).into())
        }
        match array.data_type() {
            Boolean => ColumnWriter::Bool(array.as_boolean()),
            Int8 => ColumnWriter::Int(signed::<Int8Type>(array), array),
            Int16 => ColumnWriter::Int(signed::<Int16Type>(array), array),
            Int32 => ColumnWriter::Int(signed::<Int32Type>(array), array),
            Int64 => ColumnWriter::Int(signed::<Int64Type>(array), array),
            UInt8 => ColumnWriter::UInt(unsigned::<UInt8Type>(array), array),
            UInt16 => ColumnWriter::UInt(unsigned::<UInt16Type>(array), array),
            UInt32 => ColumnWriter::UInt(unsigned::<UInt32Type>(array), array),
            UInt64 => ColumnWriter::UInt(unsigned::<UInt64Type>(array), array),
            Utf8 => ColumnWriter::Utf8(array.as_string::<i32>()),
            LargeUtf8 => ColumnWriter::LargeUtf8(array.as_string::<i64>()),
            Utf8View => ColumnWriter::Utf8View(array.as_string_view()),
            Decimal128(_, scale) if *scale > 0 => {
                ColumnWriter::Decimal(array.as_primitive::<Decimal128Type>(), *scale as usize)
            }
            Date32 => ColumnWriter::Date(array.as_primitive::<Date32Type>()),
            _ => ColumnWriter::Other(array),
        }
    }

    /// Writes row `i`'s value.
    pub fn write(&self, i: usize, out: &mut Vec<u8>) -> Result<(), String> {
        let array: &dyn Array = match self {
            ColumnWriter::Bool(a) => *a,
            ColumnWriter::Int(_, a) | ColumnWriter::UInt(_, a) | ColumnWriter::Other(a) => *a,
            ColumnWriter::Utf8(a) => *a,
            ColumnWriter::LargeUtf8(a) => *a,
            ColumnWriter::Utf8View(a) => *a,
            ColumnWriter::Decimal(a, _) | ColumnWriter::UHugeInt(a) => *a,
            ColumnWriter::Date(a) => *a,
        };
        if array.is_null(i) {
            out.extend_from_slice(b"null");
            return Ok(());
        }
        match self {
            ColumnWriter::Bool(a) => out.extend_from_slice(if a.value(i) { b"true" } else { b"false" }),
            ColumnWriter::Int(value, _) => out.extend_from_slice(itoa::Buffer::new().format(value(i)).as_bytes()),
            ColumnWriter::UInt(value, _) => out.extend_from_slice(itoa::Buffer::new().format(value(i)).as_bytes()),
            ColumnWriter::Utf8(a) => string(a.value(i), out),
            ColumnWriter::LargeUtf8(a) => string(a.value(i), out),
            ColumnWriter::Utf8View(a) => string(a.value(i), out),
            ColumnWriter::Decimal(a, scale) => decimal(a.value(i), *scale, out),
            ColumnWriter::Date(a) => write_date(a.value(i) as i64, out),
            ColumnWriter::UHugeInt(a) => out.extend_from_slice((a.value(i) as u128).to_string().as_bytes()),
            ColumnWriter::Other(a) => serialize(&cell(*a, i)?, out),
        }
        Ok(())
    }
}

/// A date as [`date`] writes it, without building a value.
fn write_date(days: i64, out: &mut Vec<u8>) {
    match NaiveDate::from_ymd_opt(1970, 1, 1)
        .and_then(|epoch| epoch.checked_add_signed(chrono::TimeDelta::try_days(days)?))
    {
        Some(d) => {
            let mut text = String::with_capacity(10);
            push_ymd(d, &mut text);
            string(&text, out);
        }
        None => serialize(&date(days), out),
    }
}

/// `YYYY-MM-DD` as chrono's `%Y-%m-%d` writes it, digits written directly
/// for years 0–9999.
fn push_ymd(d: NaiveDate, out: &mut String) {
    use chrono::Datelike;
    let year = d.year();
    if !(0..=9999).contains(&year) {
        use std::fmt::Write;
        write!(out, "{}", d.format("%Y-%m-%d")).expect("writing to a String cannot fail");
        return;
    }
    let year = year as u32;
    push_two_digits(year / 100, out);
    push_two_digits(year % 100, out);
    out.push('-');
    push_two_digits(d.month(), out);
    out.push('-');
    push_two_digits(d.day(), out);
}

fn push_two_digits(n: u32, out: &mut String) {
    out.push(char::from(b'0' + (n / 10) as u8));
    out.push(char::from(b'0' + (n % 10) as u8));
}

fn serialize(value: &Value, out: &mut Vec<u8>) {
    serde_json::to_writer(out, value).expect("JSON values serialize");
}

fn string(text: &str, out: &mut Vec<u8>) {
    serde_json::to_writer(out, text).expect("strings serialize");
}

/// A decimal's digits with `scale` of them after the point, as Arrow's
/// `value_as_string` writes it (`-0.05`, `12.50`).
fn decimal(value: i128, scale: usize, out: &mut Vec<u8>) {
    if value < 0 {
        out.push(b'-');
    }
    let mut buffer = itoa::Buffer::new();
    let digits = buffer.format(value.unsigned_abs()).as_bytes();
    if digits.len() > scale {
        let (whole, fraction) = digits.split_at(digits.len() - scale);
        out.extend_from_slice(whole);
        out.push(b'.');
        out.extend_from_slice(fraction);
    } else {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat_n(b'0', scale - digits.len()));
        out.extend_from_slice(digits);
    }
}

fn list(values: &dyn Array) -> Result<Value, String> {
    (0..values.len()).map(|j| cell(values, j)).collect::<Result<Vec<_>, _>>().map(Value::Array)
}

/// A finite float as its shortest round-trip text (in exponent form when
/// very large or small); non-finite as a string.
pub(crate) fn float(v: f64, shortest: impl Fn(f64) -> String) -> Value {
    if v.is_nan() {
        Value::String("NaN".into())
    } else if v.is_infinite() {
        Value::String(if v > 0.0 { "Infinity" } else { "-Infinity" }.into())
    } else {
        exact_number(&shortest(v))
    }
}

/// Shortest round-trip text of a float: plain digits for everyday
/// magnitudes, exponent form (`1e300`) beyond them.
pub(crate) fn shortest<T: std::fmt::Display + std::fmt::LowerExp>(v: T, magnitude: f64) -> String {
    if magnitude != 0.0 && !(1e-5..1e16).contains(&magnitude.abs()) { format!("{v:e}") } else { v.to_string() }
}

/// A number that keeps every digit of `text`.
pub(crate) fn exact_number(text: &str) -> Value {
    match text.parse::<Number>() {
        Ok(n) => Value::Number(n),
        Err(_) => Value::String(text.to_string()),
    }
}

pub(crate) fn base64(bytes: &[u8]) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Days since 1970-01-01 as `YYYY-MM-DD`.
pub(crate) fn date(days: i64) -> Value {
    match NaiveDate::from_ymd_opt(1970, 1, 1)
        .and_then(|epoch| epoch.checked_add_signed(chrono::TimeDelta::try_days(days)?))
    {
        Some(d) => {
            let mut out = String::with_capacity(10);
            push_ymd(d, &mut out);
            Value::String(out)
        }
        None => infinity(days),
    }
}

pub(crate) fn infinity(sign: i64) -> Value {
    Value::String(if sign > 0 { "infinity" } else { "-infinity" }.into())
}

fn units_per_second(unit: TimeUnit) -> i64 {
    match unit {
        TimeUnit::Second => 1,
        TimeUnit::Millisecond => 1_000,
        TimeUnit::Microsecond => 1_000_000,
        TimeUnit::Nanosecond => 1_000_000_000,
    }
}

/// The fraction `.fff…` for `sub` units of `unit`, empty when zero.
fn fraction(sub: i64, unit: TimeUnit) -> String {
    match (sub, unit) {
        (0, _) | (_, TimeUnit::Second) => String::new(),
        (s, TimeUnit::Millisecond) => format!(".{s:03}"),
        (s, TimeUnit::Microsecond) => format!(".{s:06}"),
        (s, TimeUnit::Nanosecond) => format!(".{s:09}"),
    }
}

/// Time of day (may be 24:00:00) from units since midnight.
pub(crate) fn time(v: i64, unit: TimeUnit) -> Value {
    Value::String(time_text(v, unit))
}

/// `HH:MM:SS[.fff…]` from units since midnight.
pub(crate) fn time_text(v: i64, unit: TimeUnit) -> String {
    let per = units_per_second(unit);
    let (secs, sub) = (v.div_euclid(per), v.rem_euclid(per));
    format!("{:02}:{:02}:{:02}{}", secs / 3600, secs / 60 % 60, secs % 60, fraction(sub, unit))
}

pub(crate) fn timestamp(v: i64, unit: TimeUnit, utc: bool) -> Value {
    let per = units_per_second(unit);
    let (secs, sub) = (v.div_euclid(per), v.rem_euclid(per));
    match DateTime::from_timestamp(secs, 0) {
        Some(t) => {
            use chrono::Timelike;
            let t = t.naive_utc();
            let mut out = String::with_capacity(32);
            push_ymd(t.date(), &mut out);
            out.push('T');
            for (i, n) in [t.hour(), t.minute(), t.second()].into_iter().enumerate() {
                if i > 0 {
                    out.push(':');
                }
                push_two_digits(n, &mut out);
            }
            out.push_str(&fraction(sub, unit));
            if utc {
                out.push('Z');
            }
            Value::String(out)
        }
        None => infinity(v),
    }
}

/// ISO-8601 duration from months, days and nanoseconds.
pub(crate) fn interval(months: i64, days: i64, nanos: i128) -> Value {
    let mut out = String::from("P");
    let (years, months) = (months / 12, months % 12);
    for (n, unit) in [(years, 'Y'), (months, 'M'), (days, 'D')] {
        if n != 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    if nanos != 0 {
        out.push('T');
        let sign = if nanos < 0 { "-" } else { "" };
        let abs = nanos.unsigned_abs();
        let (h, m, s, ns) =
            (abs / 3_600_000_000_000, abs / 60_000_000_000 % 60, abs / 1_000_000_000 % 60, abs % 1_000_000_000);
        if h != 0 {
            out.push_str(&format!("{sign}{h}H"));
        }
        if m != 0 {
            out.push_str(&format!("{sign}{m}M"));
        }
        if s != 0 || ns != 0 {
            let frac = if ns == 0 { String::new() } else { format!(".{ns:09}").trim_end_matches('0').to_string() };
            out.push_str(&format!("{sign}{s}{frac}S"));
        }
    }
    if out == "P" {
        out.push_str("T0S");
    }
    Value::String(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_iso_8601() {
        assert_eq!(interval(14, 3, 4 * 3_600_000_000_000 + 5 * 60_000_000_000 + 6_500_000_000), "P1Y2M3DT4H5M6.5S");
        assert_eq!(interval(0, 0, 0), "PT0S");
        assert_eq!(interval(0, -3, 0), "P-3D");
    }

    #[test]
    fn times_and_dates() {
        assert_eq!(time(13 * 3600 * 1_000_000 + 45 * 60 * 1_000_000, TimeUnit::Microsecond), "13:45:00");
        assert_eq!(time(24 * 3600, TimeUnit::Second), "24:00:00");
        assert_eq!(date(19_753), "2024-01-31");
        assert_eq!(date(i32::MAX as i64), "infinity");
        assert_eq!(timestamp(1_500_000, TimeUnit::Microsecond, true), "1970-01-01T00:00:01.500000Z");
        // Digits written directly match chrono's formatting, and years
        // beyond four digits fall back to it.
        for days in [-719_528i64, -1, 0, 59, 10_957, 2_932_896, 2_932_897, 5_000_000, -800_000] {
            let chrono_date = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap() + chrono::TimeDelta::days(days);
            assert_eq!(date(days), chrono_date.format("%Y-%m-%d").to_string(), "day {days}");
            let mut written = Vec::new();
            write_date(days, &mut written);
            assert_eq!(String::from_utf8(written).unwrap(), date(days).to_string());
            let micros = days * 86_400_000_000 + 45_296_000_001;
            let chrono_time = DateTime::from_timestamp_micros(micros).unwrap().naive_utc();
            assert_eq!(
                timestamp(micros, TimeUnit::Microsecond, false),
                format!("{}.000001", chrono_time.format("%Y-%m-%dT%H:%M:%S"))
            );
        }
    }

    #[test]
    fn floats_keep_shortest_form_and_name_non_finite_values() {
        assert_eq!(float(0.1f32 as f64, |_| 0.1f32.to_string()).to_string(), "0.1");
        assert_eq!(float(f64::NAN, |v| v.to_string()), "NaN");
        assert_eq!(float(f64::NEG_INFINITY, |v| v.to_string()), "-Infinity");
        assert_eq!(exact_number("12.50").to_string(), "12.50");
    }

    #[test]
    fn written_decimals_match_arrow_text() {
        use duckdb::arrow::array::Decimal128Array;
        let values = [0i128, 5, -5, 50, 1250, -1250, 123_456_789, -100, 99_999, i64::MAX as i128 * 1000];
        for scale in [1i8, 2, 4, 9] {
            let array = Decimal128Array::from(values.to_vec()).with_precision_and_scale(38, scale).unwrap();
            for i in 0..values.len() {
                let mut out = Vec::new();
                write_cell(&array, i, &mut out).unwrap();
                assert_eq!(String::from_utf8(out).unwrap(), cell(&array, i).unwrap().to_string());
            }
        }
    }
}
