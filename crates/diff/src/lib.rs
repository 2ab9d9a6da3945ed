//! Snapshots and change computation.
//!
//! Each sync keeps its state in its own embedded DuckDB file
//! (`<state dir>/<sync>.duckdb`): the snapshot of what was last *delivered*
//! per key, the record of every run, and every rejected record. Opening the
//! file takes DuckDB's exclusive file lock, which is also the sync's run lock:
//! a second process that opens the same sync's state is refused with
//! [`DiffError::Busy`], and the lock dies with its process, so a crash never
//! leaves a stale lock behind.
//!
//! Contract: the snapshot advances only through [`StateStore::ack`], which the
//! caller invokes after a 2xx for those records; each call is committed to an
//! append-only ack log before it returns, and the log is folded into the
//! snapshot at the end of a run (or, after a crash, when the state is next
//! opened), so acknowledging costs an append, not an index update.
//! What was sent but not acknowledged is computed as a change again by the
//! next run, with the same fingerprint and so the same message id.
#![deny(missing_docs)]

mod store;
mod warehouse;

pub use store::{
    Delivered, DiffCounts, HashSet64, InvalidKeys, KeyRecord, OutboxRow, Rejection, RunRecord, Stager, StateStore,
    key_hash, now, pair_hash,
};
pub use warehouse::{CandidateColumns, InWarehouse, OutboxWriter, Scan};

/// Why state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiffError {
    /// Another process holds this sync's state (a run is in progress).
    #[error("sync `{sync}` is already running in another process ({detail}); wait for it to finish")]
    Busy {
        /// The sync.
        sync: String,
        /// DuckDB's description of the lock holder.
        detail: String,
    },
    /// The state file could not be opened or created.
    #[error("cannot open state for sync `{sync}` at {path}: {message}")]
    Open {
        /// The sync.
        sync: String,
        /// The state file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A state query failed.
    #[error("state store error: {0}")]
    Store(#[from] duckdb::Error),
}

impl DiffError {
    /// Whether the error means another run holds the sync.
    pub fn is_busy(&self) -> bool {
        matches!(self, DiffError::Busy { .. })
    }
}
