//! Service A, orders: `POST /orders` commits an order row and its
//! `OrderPlaced` message in one PostgreSQL transaction (the transactional
//! outbox). The relay (`relay` beside this program, or `custody relay`)
//! moves committed messages to NATS.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use clap::Parser;
use custody::postgres::PgOutbox;
use custody::Message;
use example_orders_postgres::{open_database, start, OrderPlaced};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// The orders service: an HTTP endpoint that places orders.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// The orders service's database (it must exist; custody's tables are created in it).
    #[arg(long, env = "ORDERS_DATABASE_URL")]
    database_url: String,
    /// Address of the HTTP endpoint; port 0 picks a free port (the address is printed).
    #[arg(long, env = "ORDERS_LISTEN", default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9464.
    #[arg(long, env = "ORDERS_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
}

/// The service's own table; custody's tables come from `open_database` (`migrate`).
const CREATE_ORDERS: &str = "CREATE TABLE IF NOT EXISTS orders (
    id BIGSERIAL PRIMARY KEY,
    customer TEXT NOT NULL,
    amount_cents BIGINT NOT NULL
)";

#[derive(Clone)]
struct App {
    pool: PgPool,
    outbox: PgOutbox,
}

#[derive(Deserialize)]
struct NewOrder {
    customer: String,
    amount_cents: i64,
}

#[derive(Serialize)]
struct Placed {
    order_id: i64,
    message_id: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    start(args.metrics_addr)?;
    let pool = open_database(&args.database_url).await?; // with custody's tables (the outbox)
    sqlx::query(CREATE_ORDERS).execute(&pool).await?;
    let app = App {
        outbox: PgOutbox::new(pool.clone()),
        pool,
    };
    let router = Router::new()
        .route("/orders", post(place_order))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}; is the port in use?", args.listen))?;
    println!("producer listening on http://{}", listener.local_addr()?);
    let cancel = custody::shutdown_token(); // cancelled on SIGINT or SIGTERM
    axum::serve(listener, router)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await?;
    println!("producer stopped");
    Ok(())
}

async fn place_order(
    State(app): State<App>,
    Json(order): Json<NewOrder>,
) -> Result<(StatusCode, Json<Placed>), AppError> {
    let mut tx = app.pool.begin().await?;
    let order_id: i64 = sqlx::query_scalar(
        "INSERT INTO orders (customer, amount_cents) VALUES ($1, $2) RETURNING id",
    )
    .bind(&order.customer)
    .bind(order.amount_cents)
    .fetch_one(&mut *tx)
    .await?;
    let event = OrderPlaced {
        order_id,
        customer: order.customer.clone(),
        amount_cents: order.amount_cents,
    };
    let msg = Message::builder("orders", &order.customer, "OrderPlaced") // topic, ordering key, type
        .json(&event)?
        .build()?;
    app.outbox.enqueue(&mut tx, &msg).await?; // joins the order's transaction
    tx.commit().await?; // the order and its message commit together, or neither
    metrics::counter!("orders_placed_total").increment(1);
    let message_id = msg.id.to_string();
    Ok((
        StatusCode::CREATED,
        Json(Placed {
            order_id,
            message_id,
        }),
    ))
}

/// Any failure: 500 with the reason (nothing was committed).
struct AppError(anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for AppError {
    fn from(e: E) -> Self {
        AppError(e.into())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        tracing::error!(error = %format!("{:#}", self.0), "order not placed");
        let body = format!("order not placed: {:#}", self.0);
        (StatusCode::INTERNAL_SERVER_ERROR, body).into_response()
    }
}
