//! Webhook delivery, as stages: [`encode`] turns records into a body,
//! [`request`] builds the HTTP request (URL, headers, signature), [`send`]
//! delivers it with timeouts and retries through a [`transport`], acting on
//! the [`decision`] each answer gets. The sink never sees SQL.
//!
//! Contract: delivery is at least once. A record counts as delivered only on
//! a 2xx answer to the request that carried it; the caller advances the
//! snapshot for exactly those records.
#![deny(missing_docs)]

pub mod config;
pub mod decision;
pub mod driver;
pub mod encode;
pub mod request;
pub mod send;
pub mod signing;
pub mod transport;
pub mod url;

pub use config::{
    Compression, DestinationConfig, Http2, Method, Proxy, RateLimit, RetryConfig, RouteConfig, SigningConfig,
    SigningScheme, TlsConfig,
};
pub use decision::Decision;
pub use driver::{Delivery, Driver};
pub use encode::MetaContext;
pub use request::{Batch, Batcher, Destination, HttpRequest, Settled, per_record};
pub use send::{Observer, Outcome, Sender};
pub use transport::{HyperTransport, Transport};

/// Why a destination could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// A `${VAR}` could not be resolved.
    #[error("destination.{field}: {source}")]
    Env {
        /// The field that references the variable.
        field: String,
        /// The missing variable.
        source: backflow_core::env::MissingVar,
    },
    /// The URL is not a valid absolute http(s) URL.
    #[error(
        "destination.{field}: `{url}` is not a valid http(s) URL ({reason}); write e.g. `https://api.example.com/users/{{id}}`"
    )]
    Url {
        /// The field (`url`, `on_removed.url`, …).
        field: String,
        /// The URL as configured (with `${VAR}` references unexpanded).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A header name or value is not allowed.
    #[error("destination.headers.{name}: {reason}")]
    Header {
        /// The header name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A setting is out of range or contradicts another.
    #[error("destination.{field}: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong and what would be right.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}
