//! The delivery decision, as data: what an answer — or its absence — means
//! for the records a request carried. One place decides; the sender acts on
//! it, and the run counts it.

use crate::config::Method;
use crate::send::parse_retry_after;
use std::time::Duration;

/// What to do about a request's answer, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Delivered: a 2xx, or a `DELETE` of one record answered 404 or 410
    /// (what it removes is gone — a delete sent again after a crash).
    Deliver,
    /// Worth another attempt, after `wait` when the receiver said
    /// (`Retry-After`), else after the backoff.
    Retry {
        /// Why.
        reason: String,
        /// How long the receiver asked to wait.
        wait: Option<Duration>,
    },
    /// The records are refused (a bad row, too large…): a batch is split to
    /// isolate them; they are tried again next run.
    RejectRecord {
        /// Why.
        reason: String,
    },
    /// The destination refuses every request (credentials, URL, method,
    /// TLS, DNS): the run stops for it, nothing is split, the rest stays
    /// pending.
    RejectDestination {
        /// Why, and what to check.
        reason: String,
    },
}

/// What an answer said, as far as the decision goes.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    /// The status.
    pub status: u16,
    /// The request's method.
    pub method: Method,
    /// Whether the request carried one record.
    pub single: bool,
    /// Whether its URL holds values of the record (placeholders): a 404 or
    /// 410 then speaks of that record, not of the destination.
    pub per_record_url: bool,
    /// The `Location` header.
    pub location: Option<&'a str>,
    /// The `Retry-After` header.
    pub retry_after: Option<&'a str>,
}

/// Statuses worth retrying (SPEC §4).
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 425 | 429 | 500 | 502 | 503 | 504)
}

impl Decision {
    /// The decision for an answer.
    pub fn for_answer(a: Answer) -> Decision {
        let s = a.status;
        let destination = |what: &str| Decision::RejectDestination {
            reason: format!("HTTP {s}: {what}; every request would get the same answer, so the run stops"),
        };
        match s {
            200..=299 => Decision::Deliver,
            // A DELETE of one record answered 404 or 410: it is gone. A
            // batch's answer says nothing of each record: split it.
            404 | 410 if a.method == Method::Delete && a.single => Decision::Deliver,
            404 | 410 if a.method == Method::Delete || a.per_record_url => {
                Decision::RejectRecord { reason: format!("HTTP {s}: the receiver has no such record") }
            }
            401 => destination("the receiver refuses the credentials (check the destination's headers)"),
            403 => destination("the receiver forbids these requests (check the credentials' rights)"),
            407 => destination("the proxy refuses the credentials; put them in the proxy URL"),
            404 => destination("the receiver has no such endpoint (check the destination's URL)"),
            405 => destination("the receiver does not allow this method (check `method` and `on_*`)"),
            410 => destination("the endpoint is gone (check the destination's URL)"),
            300..=399 => Decision::RejectDestination {
                reason: format!(
                    "HTTP {s}: redirects are not followed (Location: {}); configure the final URL",
                    a.location.unwrap_or("none")
                ),
            },
            s if is_retryable_status(s) => {
                Decision::Retry { reason: format!("HTTP {s}"), wait: a.retry_after.and_then(parse_retry_after) }
            }
            s => Decision::RejectRecord { reason: format!("HTTP {s}: rejected by the receiver") },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(status: u16, method: Method, single: bool) -> Decision {
        let per_record_url = false;
        Decision::for_answer(Answer { status, method, single, per_record_url, location: None, retry_after: Some("7") })
    }

    #[test]
    fn each_status_has_its_decision() {
        assert_eq!(decide(204, Method::Post, false), Decision::Deliver);
        for s in [401, 403, 404, 405, 410, 301, 302, 307] {
            assert!(matches!(decide(s, Method::Post, true), Decision::RejectDestination { .. }), "{s}");
        }
        for s in [400, 413, 422, 409, 501] {
            assert!(matches!(decide(s, Method::Post, false), Decision::RejectRecord { .. }), "{s}");
        }
        for s in [408, 425, 429, 500, 502, 503, 504] {
            assert_eq!(
                decide(s, Method::Post, true),
                Decision::Retry { reason: format!("HTTP {s}"), wait: Some(Duration::from_secs(7)) },
                "Retry-After honoured on {s}"
            );
        }
        // A record already gone is deleted; a batch's 404 says nothing of
        // each (split); a 404 at a URL made from the record speaks of it.
        assert_eq!(decide(404, Method::Delete, true), Decision::Deliver);
        assert_eq!(decide(410, Method::Delete, true), Decision::Deliver);
        assert!(matches!(decide(404, Method::Delete, false), Decision::RejectRecord { .. }));
        let at_record = Answer {
            status: 404,
            method: Method::Patch,
            single: true,
            per_record_url: true,
            location: None,
            retry_after: None,
        };
        assert!(matches!(Decision::for_answer(at_record), Decision::RejectRecord { .. }));
    }
}
