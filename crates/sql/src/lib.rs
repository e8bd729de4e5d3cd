//! custody-sql: what custody's SQL backends (`custody-postgres`,
//! `custody-sqlite`) share, written once (not for direct use; see `custody`).
//!
//! - [`migrate`]: custody's migration runner, recording into its own
//!   `custody_migrations` table (the Rust around it is [`migrate_impl!`]).
//! - [`check`], [`lease`], [`history`], [`log_relay`],
//!   [`projection`]: SQL texts that are the same on every
//!   backend. They use numbered `$N` parameters, which PostgreSQL and
//!   sqlx-sqlite both accept (SQLite reads `$1` as a named parameter and
//!   sqlx binds it by its number).
//! - the `*_impl!` macros: the Rust around those statements, expanded once per
//!   backend with its pool type, error mapping and value conversions, as sqlx
//!   expands its own per-database impls. Generic functions over
//!   `DB: sqlx::Database` would need higher-ranked executor, encode and
//!   decode bounds on every function; a macro keeps the body readable and
//!   still written once.
//!
//! A new SQL backend invokes the macros and provides its own statements only
//! where its SQL differs (docs/ARCHITECTURE.md, "Layers").
#![forbid(unsafe_code)]

pub mod check;
pub mod history;
pub mod lease;
pub mod log_relay;
mod macros;
pub mod migrate;
pub mod projection;

// For the macros: the expanding crate need not name these itself.
#[doc(hidden)]
pub use chrono;
#[doc(hidden)]
pub use custody_core;
#[doc(hidden)]
pub use sqlx;
#[doc(hidden)]
pub use tokio;
#[doc(hidden)]
pub use tracing;
#[doc(hidden)]
pub use uuid;
