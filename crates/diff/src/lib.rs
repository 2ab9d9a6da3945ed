//! Snapshots and change computation.
//!
//! Each sync keeps its state in its own embedded DuckDB file
//! (`<state dir>/<sync>.duckdb`): the snapshot of what was last *delivered*
//! per key, the record of every run, and every rejected record. Opening the
//! state takes an exclusive lock on `<sync>.lock` beside it, the sync's run
//! lock: a second process that opens the same sync's state is refused with
//! [`DiffError::Busy`], and the lock dies with its process, so a crash never
//! leaves a stale lock behind.
//!
//! # Durability contract
//!
//! - The snapshot advances only through [`StateStore::ack`], which the
//!   caller invokes after a 2xx for those records; each call is committed to
//!   an append-only ack log before it returns (the engine commits the first
//!   acknowledgements at once, then every 250 ms or 250,000 records), and the
//!   log is folded into the snapshot at the end of a run or, after a crash,
//!   when the state is next opened.
//! - [`StateStore::begin_delivery`] is committed before the first request
//!   is sent. From then on, every record of the outbox that is not
//!   acknowledged when the run ends — or when the process dies — is an
//!   *unconfirmed delivery*: it may have reached the receiver. The fold keeps
//!   it (key, op, payload, generation) in the `pending` table, and the next
//!   diff treats it so: the same change is sent again with the same message
//!   id; a key whose row changed, or changed back, is sent as changed; a key
//!   the query no longer returns is deleted in mirror mode, carrying the
//!   payload that may have been delivered (the other modes send the
//!   unconfirmed record again as it was); a delete is sent again.
//! - Each key has a *generation*, one more for every occurrence that may
//!   have reached the receiver, kept in the snapshot, in `pending` and — for
//!   keys deleted or forgotten — in `retired`; it goes into the message id
//!   ([`backflow_core::message_id`]), so a new occurrence never reuses an id.
//! - A crash can therefore cause re-sends (with the same ids), deletes of
//!   records the receiver may never have had, never a lost change. Each
//!   fold and reset is one transaction (a fold that turns the outbox into
//!   the snapshot sets its NOT NULL constraints in a second one); the outbox
//!   and its generations are committed before the mark that its delivery
//!   began, so a crash in between leaves an outbox that is computed again.
#![deny(missing_docs)]

mod delivery;
mod store;
mod warehouse;

pub use store::{
    Delivered, DiffCounts, HashSet64, InvalidKeys, KeyRecord, OutboxRow, Rejection, RunRecord, Stager, StateStore,
    Unconfirmed, key_hash, now, pair_hash,
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
    /// The state file cannot be read, or holds what Backflow never writes.
    /// Nothing is overwritten.
    #[error(
        "the state of sync `{sync}` at {path} is damaged ({detail}); nothing was changed. Restore the file from a \
         backup, or move it aside to start the sync over: its next run sends every row as added, and a receiver \
         that dedupes by message id may take some for ones it had"
    )]
    Damaged {
        /// The sync.
        sync: String,
        /// The state file.
        path: String,
        /// What was found.
        detail: String,
    },
    /// A state query failed.
    #[error("the state store failed: {0}")]
    Store(#[from] duckdb::Error),
}

impl DiffError {
    /// Whether the error means another run holds the sync.
    pub fn is_busy(&self) -> bool {
        matches!(self, DiffError::Busy { .. })
    }

    /// Whether the state file is damaged (nothing was overwritten).
    pub fn is_damaged(&self) -> bool {
        matches!(self, DiffError::Damaged { .. })
    }
}
