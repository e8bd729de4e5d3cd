//! Service B's handler: apply OrderPlaced to the ledger and derive an
//! InvoiceIssued event into B's own outbox, all in the inbox transaction.

use custody::{headers, Handler, HandlerError, Message};

use super::OrderPlaced;

/// Service A's business table.
pub const A_SCHEMA_SQLITE: &str = "CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY, customer TEXT NOT NULL, amount_cents INTEGER NOT NULL, seq INTEGER NOT NULL)";
/// Service B's business table. No unique constraint on order_id on purpose:
/// a double effect must be visible to the report, not hidden by a constraint.
pub const B_SCHEMA_SQLITE: &str = "CREATE TABLE IF NOT EXISTS ledger (
    entry INTEGER PRIMARY KEY AUTOINCREMENT, order_id TEXT NOT NULL, customer TEXT NOT NULL,
    amount_cents INTEGER NOT NULL, seq INTEGER NOT NULL)";
/// PostgreSQL versions.
pub const A_SCHEMA_PG: &str = "CREATE TABLE IF NOT EXISTS orders (
    order_id UUID PRIMARY KEY, customer TEXT NOT NULL, amount_cents BIGINT NOT NULL, seq BIGINT NOT NULL)";
/// See [`B_SCHEMA_SQLITE`].
pub const B_SCHEMA_PG: &str = "CREATE TABLE IF NOT EXISTS ledger (
    entry BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, order_id UUID NOT NULL, customer TEXT NOT NULL,
    amount_cents BIGINT NOT NULL, seq BIGINT NOT NULL)";

fn decode(msg: &Message) -> Result<OrderPlaced, HandlerError> {
    if msg.message_type != "OrderPlaced" {
        return Err(HandlerError::UnknownType(msg.message_type.clone()));
    }
    Ok(msg.decode_json::<OrderPlaced>()?)
}

fn invoice(msg: &Message, o: &OrderPlaced) -> Result<Message, HandlerError> {
    Ok(
        Message::builder("invoices", o.customer.clone(), "InvoiceIssued")
            .json(&serde_json::json!({ "order_id": o.order_id, "amount_cents": o.amount_cents }))?
            .header(headers::CAUSATION_ID, msg.id.to_string())?
            .build()?,
    )
}

/// Billing on SQLite.
pub struct SqliteBilling {
    /// B's outbox (InvoiceIssued is derived into it).
    pub outbox: custody::sqlite::SqliteOutbox,
}

impl Handler<sqlx::Transaction<'static, sqlx::Sqlite>> for SqliteBilling {
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        msg: &Message,
    ) -> Result<(), HandlerError> {
        let o = decode(msg)?;
        sqlx::query(
            "INSERT INTO ledger (order_id, customer, amount_cents, seq) VALUES (?, ?, ?, ?)",
        )
        .bind(o.order_id.to_string())
        .bind(&o.customer)
        .bind(o.amount_cents)
        .bind(o.seq)
        .execute(&mut **tx)
        .await
        .map_err(HandlerError::transient)?;
        self.outbox.enqueue(tx, &invoice(msg, &o)?).await?;
        Ok(())
    }
}

/// Billing on PostgreSQL.
pub struct PgBilling {
    /// B's outbox (InvoiceIssued is derived into it).
    pub outbox: custody::postgres::PgOutbox,
}

impl Handler<sqlx::Transaction<'static, sqlx::Postgres>> for PgBilling {
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        msg: &Message,
    ) -> Result<(), HandlerError> {
        let o = decode(msg)?;
        sqlx::query(
            "INSERT INTO ledger (order_id, customer, amount_cents, seq) VALUES ($1, $2, $3, $4)",
        )
        .bind(o.order_id)
        .bind(&o.customer)
        .bind(o.amount_cents)
        .bind(o.seq)
        .execute(&mut **tx)
        .await
        .map_err(HandlerError::transient)?;
        self.outbox.enqueue(tx, &invoice(msg, &o)?).await?;
        Ok(())
    }
}
