//! The producer id, bound to the database file it lives in (issue 11,
//! scenario 4). A copy of the file (a backup restored next to the original,
//! a `cp` to start a second service) is another history: numbers handed out
//! by the original would be handed out again under the same id, and a
//! consumer past them would take the new messages for duplicates. The file's
//! device and inode number are the fingerprint: a copy has other ones, so
//! its first relay gets a new id, numbering restarts at 1 and the change is
//! recorded in `custody_producer_history` (migration 0005). A file copied
//! *over* an existing one keeps that file's inode and is not detected
//! (docs/OPERATIONS.md, "After a restore").

use custody_core::{Error, Result};
use sqlx::SqlitePool;

use crate::error::map_err;

const OP: &str = "read producer id";

/// `dev:inode` of the main database file of `pool`, or None (in-memory
/// database, or a platform without inode numbers).
async fn fingerprint(pool: &SqlitePool) -> Result<Option<String>> {
    let rows: Vec<(i64, String, Option<String>)> = sqlx::query_as("PRAGMA database_list")
        .fetch_all(pool)
        .await
        .map_err(map_err(OP))?;
    let Some(file) = rows
        .into_iter()
        .find(|(_, name, _)| name == "main")
        .and_then(|(_, _, file)| file)
        .filter(|f| !f.is_empty())
    else {
        return Ok(None);
    };
    Ok(file_identity(std::path::Path::new(&file)))
}

#[cfg(unix)]
fn file_identity(path: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(format!("{}:{}", meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn file_identity(_path: &std::path::Path) -> Option<String> {
    None
}

/// The producer id of the outbox in `pool`, renewed first when the database
/// file is not the one the id was bound to. The check and the renewal run
/// under the write lock (`BEGIN IMMEDIATE`): two relays starting together
/// renew once.
pub(crate) async fn producer_id(pool: &SqlitePool, now_ms: i64) -> Result<String> {
    let fp = fingerprint(pool).await?;
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(map_err(OP))?;
    let row: Option<(String, Option<String>)> = sqlx::query_as(
        "SELECT id, fingerprint FROM custody_producer ORDER BY created_at, id LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await
    .map_err(map_err(OP))?;
    let Some((id, bound)) = row else {
        return Err(Error::store(
            "sqlite",
            OP,
            false,
            "custody_producer is empty; run `custody migrate` on a fresh database or insert the id back",
        ));
    };
    let Some(fp) = fp else {
        return Ok(id); // nothing to bind to
    };
    if bound.as_deref() == Some(fp.as_str()) {
        return Ok(id);
    }
    if bound.is_none() {
        sqlx::query("UPDATE custody_producer SET fingerprint = ?1 WHERE id = ?2")
            .bind(&fp)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?;
        tx.commit().await.map_err(map_err(OP))?;
        return Ok(id);
    }
    // Another file: a new producer. Numbering restarts at 1 for every
    // (partition, topic); pending rows numbered under the old id are
    // numbered again; published rows keep theirs (the old id's history).
    let fresh: String = sqlx::query_scalar("SELECT lower(hex(randomblob(16)))")
        .fetch_one(&mut *tx)
        .await
        .map_err(map_err(OP))?;
    sqlx::query("DELETE FROM custody_sequence")
        .execute(&mut *tx)
        .await
        .map_err(map_err(OP))?;
    let renumbered =
        sqlx::query("UPDATE custody_outbox SET seq = NULL WHERE status = 0 AND seq IS NOT NULL")
            .execute(&mut *tx)
            .await
            .map_err(map_err(OP))?
            .rows_affected();
    sqlx::query("UPDATE custody_producer SET id = ?1, fingerprint = ?2 WHERE id = ?3")
        .bind(&fresh)
        .bind(&fp)
        .bind(&id)
        .execute(&mut *tx)
        .await
        .map_err(map_err(OP))?;
    sqlx::query(
        "INSERT INTO custody_producer_history \
         (old_id, new_id, old_fingerprint, new_fingerprint, renumbered, changed_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .bind(&id)
    .bind(&fresh)
    .bind(bound)
    .bind(&fp)
    .bind(i64::try_from(renumbered).unwrap_or(i64::MAX))
    .bind(now_ms)
    .execute(&mut *tx)
    .await
    .map_err(map_err(OP))?;
    tx.commit().await.map_err(map_err(OP))?;
    tracing::warn!(old_id = %id, new_id = %fresh, renumbered, "this SQLite outbox is a copy of another file (a restore or a copy): it is a new producer, numbering restarts at 1 (docs/OPERATIONS.md, \"After a restore\")");
    Ok(fresh)
}
