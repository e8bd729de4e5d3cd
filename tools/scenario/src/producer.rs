//! Service A's transaction, shared by the demo and `custody chaos`: an order
//! row and its OrderPlaced event in one transaction (or a bad message alone).
//! Only the order insert differs per backend (placeholders, uuid type).

use custody::postgres::PgOutbox;
use custody::sqlite::SqliteOutbox;
use sqlx::{PgPool, SqlitePool};
use uuid::Uuid;

use super::{new_order, OrderPlaced, Step};

/// One producer transaction on PostgreSQL. For an order that is rolled
/// back, `before_rollback(order_id)` runs just before the rollback.
pub async fn produce_pg(
    a: &PgPool,
    outbox: &PgOutbox,
    step: &Step,
    before_rollback: impl FnOnce(Uuid) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut tx = a.begin().await?;
    match step {
        Step::Order {
            customer,
            roll_back,
        } => {
            let (order_id, amount_cents) = new_order();
            // one producer at a time: seq per customer in commit order
            let seq: i64 = sqlx::query_scalar(
                "INSERT INTO orders (order_id, customer, amount_cents, seq)
                 VALUES ($1, $2, $3, (SELECT COALESCE(MAX(seq), 0) + 1 FROM orders WHERE customer = $2))
                 RETURNING seq",
            )
            .bind(order_id)
            .bind(customer)
            .bind(amount_cents)
            .fetch_one(&mut *tx)
            .await?;
            let event = OrderPlaced {
                order_id,
                customer: customer.clone(),
                amount_cents,
                seq,
            };
            outbox.enqueue(&mut tx, &event.message()?).await?;
            if *roll_back {
                before_rollback(order_id)?;
                tx.rollback().await?;
                return Ok(());
            }
        }
        Step::Event(msg) => {
            outbox.enqueue(&mut tx, msg).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// [`produce_pg`] on SQLite.
pub async fn produce_sqlite(
    a: &SqlitePool,
    outbox: &SqliteOutbox,
    step: &Step,
    before_rollback: impl FnOnce(Uuid) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut tx = a.begin().await?;
    match step {
        Step::Order {
            customer,
            roll_back,
        } => {
            let (order_id, amount_cents) = new_order();
            // the first statement writes, so SQLite takes the write lock at once
            // (a read-then-write transaction could fail to upgrade)
            let seq: i64 = sqlx::query_scalar(
                "INSERT INTO orders (order_id, customer, amount_cents, seq)
                 VALUES (?1, ?2, ?3, (SELECT COALESCE(MAX(seq), 0) + 1 FROM orders WHERE customer = ?2))
                 RETURNING seq",
            )
            .bind(order_id.to_string())
            .bind(customer)
            .bind(amount_cents)
            .fetch_one(&mut *tx)
            .await?;
            let event = OrderPlaced {
                order_id,
                customer: customer.clone(),
                amount_cents,
                seq,
            };
            outbox.enqueue(&mut tx, &event.message()?).await?;
            if *roll_back {
                before_rollback(order_id)?;
                tx.rollback().await?;
                return Ok(());
            }
        }
        Step::Event(msg) => {
            outbox.enqueue(&mut tx, msg).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}
