//! Backflow's shared vocabulary: what a sync mode does with each change, the
//! records that travel from the diff to the sink, and their stable identities.
#![deny(missing_docs)]

pub mod duration;
pub mod env;
pub mod mapping;
mod record;

pub use duration::Duration;
pub use mapping::{CompiledMapping, Mapping, MappingError};
pub use record::{Change, KeyText, Mode, Op, Record, fingerprint_request, fingerprint_text, message_id};
