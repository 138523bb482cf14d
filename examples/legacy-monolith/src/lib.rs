//! strangler's example: `legacy-shop`, a small monolith (customers, products,
//! orders; HTML pages and a JSON API on one PostgreSQL database), and
//! `orders-service`, the new service that takes over `/api/orders*` with its own
//! database and schema.
//!
//! The new service has one deliberate behavioural difference for shadow
//! comparison to catch: it answers `"total": 12.3` (a number) where the legacy
//! shop answers `"total": "12.30"` (a string). `--compat` is the fixed version.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_postgres::Client;

/// The legacy shop's schema.
pub const LEGACY_SCHEMA: &str = include_str!("../sql/legacy.sql");
/// The legacy shop's seed data (idempotent).
pub const LEGACY_SEED: &str = include_str!("../sql/legacy_seed.sql");
/// The orders service's schema.
pub const ORDERS_SCHEMA: &str = include_str!("../sql/orders_service.sql");

/// Connects to PostgreSQL, driving the connection on a background task.
pub async fn connect(url: &str) -> Result<Arc<Client>, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::error!("database connection lost: {e}");
        }
    });
    Ok(Arc::new(client))
}

/// A database handle that opens a new connection when the last one was lost (the
/// server restarted, the network dropped), as a connection pool would: requests
/// fail while the database is away and work again once it is back. A handle made
/// from a bare client (`From<Arc<Client>>`) cannot reconnect.
#[derive(Clone)]
pub struct Db {
    url: Option<Arc<str>>,
    client: Arc<tokio::sync::Mutex<Arc<Client>>>,
}

impl Db {
    /// Connects to `url`, reconnecting later as needed.
    pub async fn connect(url: &str) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            url: Some(url.into()),
            client: Arc::new(tokio::sync::Mutex::new(connect(url).await?)),
        })
    }

    /// The live connection, reopened first if it was lost.
    pub async fn get(&self) -> Result<Arc<Client>, tokio_postgres::Error> {
        let mut client = self.client.lock().await;
        if client.is_closed()
            && let Some(url) = &self.url
        {
            *client = connect(url).await?;
        }
        Ok(Arc::clone(&client))
    }
}

impl From<Arc<Client>> for Db {
    fn from(client: Arc<Client>) -> Self {
        Self {
            url: None,
            client: Arc::new(tokio::sync::Mutex::new(client)),
        }
    }
}

/// A handler's connection, from the app's [`Db`].
struct Conn(Arc<Client>);

impl axum::extract::FromRequestParts<Db> for Conn {
    type Rejection = ApiError;

    async fn from_request_parts(
        _parts: &mut axum::http::request::Parts,
        db: &Db,
    ) -> Result<Self, ApiError> {
        db.get().await.map(Conn).map_err(db_error)
    }
}

/// Serves `app` on `listen` until the process ends.
pub async fn serve(listen: std::net::SocketAddr, app: axum::Router) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app).await
}

/// "12.30" from 1230 cents, as the legacy shop prints money.
pub fn money(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let c = cents.unsigned_abs();
    format!("{sign}{}.{:02}", c / 100, c % 100)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Adds `X-Served-By: <name>` to every answer, as many real apps do; the demo
/// uses it to show which side served a customer.
async fn tag(name: &'static str, mut response: Response) -> Response {
    response
        .headers_mut()
        .insert("x-served-by", axum::http::HeaderValue::from_static(name));
    response
}

/// An error answered as JSON with its status.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn db_error(e: tokio_postgres::Error) -> ApiError {
    tracing::error!("database: {e}");
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, "database error".into())
}

/// An order as clients send it.
#[derive(Debug, Deserialize)]
pub struct NewOrder {
    /// Who orders.
    pub customer_id: i32,
    /// What.
    pub items: Vec<NewItem>,
    /// Free text.
    pub note: Option<String>,
}

/// One line of a new order.
#[derive(Debug, Deserialize)]
pub struct NewItem {
    /// The product.
    pub product_id: i32,
    /// How many.
    pub qty: i32,
}

#[derive(Debug, Deserialize)]
struct ByCustomer {
    customer_id: Option<i32>,
}

const TS: &str = r#"to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')"#;

/// The legacy monolith.
pub mod legacy {
    use super::*;

    /// Creates the schema and, with `seed`, the demo data.
    pub async fn migrate(db: &Client, seed: bool) -> Result<(), tokio_postgres::Error> {
        db.batch_execute(LEGACY_SCHEMA).await?;
        if seed {
            db.batch_execute(LEGACY_SEED).await?;
        }
        Ok(())
    }

    /// All routes of the shop.
    pub fn app(db: impl Into<Db>) -> axum::Router {
        let db: Db = db.into();
        use axum::routing::get;
        axum::Router::new()
            .route("/", get(home))
            .route("/health", get(|| async { "ok\n" }))
            .route("/customers/{id}", get(customer_page))
            .route("/api/products", get(products))
            .route("/api/customers/{id}", get(customer))
            .route("/api/orders", get(orders).post(place_order))
            .route("/api/orders/{id}", get(order))
            .with_state(db)
            .layer(axum::middleware::map_response(|r: Response| {
                tag("legacy-shop", r)
            }))
    }

    async fn home(Conn(db): Conn) -> Result<Html<String>, ApiError> {
        let rows = db
            .query(
                "SELECT id, sku, name, price_cents FROM products ORDER BY id",
                &[],
            )
            .await
            .map_err(db_error)?;
        let mut html = String::from(
            "<!doctype html><html><head><title>Legacy Shop</title></head><body><h1>Legacy Shop</h1><ul>",
        );
        for r in rows {
            html.push_str(&format!(
                "<li>{} — {} — {} EUR</li>",
                escape(r.get(1)),
                escape(r.get(2)),
                money(i64::from(r.get::<_, i32>(3)))
            ));
        }
        html.push_str("</ul></body></html>");
        Ok(Html(html))
    }

    async fn customer_page(Conn(db): Conn, Path(id): Path<i32>) -> Result<Html<String>, ApiError> {
        let Some(c) = db
            .query_opt("SELECT name, email FROM customers WHERE id = $1", &[&id])
            .await
            .map_err(db_error)?
        else {
            return Err(ApiError(StatusCode::NOT_FOUND, format!("no customer {id}")));
        };
        let orders = db
            .query(
                "SELECT id, status, total_cents FROM orders WHERE customer_id = $1 ORDER BY id",
                &[&id],
            )
            .await
            .map_err(db_error)?;
        let mut html = format!(
            "<!doctype html><html><body><h1>{}</h1><p>{}</p><table>",
            escape(c.get(0)),
            escape(c.get(1))
        );
        for o in orders {
            html.push_str(&format!(
                "<tr><td>#{}</td><td>{}</td><td>{} EUR</td></tr>",
                o.get::<_, i64>(0),
                escape(o.get(1)),
                money(o.get(2))
            ));
        }
        html.push_str("</table></body></html>");
        Ok(Html(html))
    }

    async fn products(Conn(db): Conn) -> Result<Json<Value>, ApiError> {
        let rows = db
            .query(
                "SELECT id, sku, name, price_cents FROM products ORDER BY id",
                &[],
            )
            .await
            .map_err(db_error)?;
        Ok(Json(Value::Array(
            rows.iter()
                .map(|r| {
                    json!({"id": r.get::<_, i32>(0), "sku": r.get::<_, String>(1), "name": r.get::<_, String>(2),
                           "price": money(i64::from(r.get::<_, i32>(3)))})
                })
                .collect(),
        )))
    }

    async fn customer(Conn(db): Conn, Path(id): Path<i32>) -> Result<Json<Value>, ApiError> {
        let row = db
            .query_opt(
                "SELECT id, email, name FROM customers WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(db_error)?
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no customer {id}")))?;
        Ok(Json(
            json!({"id": row.get::<_, i32>(0), "email": row.get::<_, String>(1), "name": row.get::<_, String>(2)}),
        ))
    }

    async fn order_json(db: &Client, id: i64) -> Result<Option<Value>, ApiError> {
        let Some(o) = db
            .query_opt(
                &format!("SELECT id, customer_id, status, total_cents, email, {TS} FROM orders WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(db_error)?
        else {
            return Ok(None);
        };
        let items = db
            .query(
                "SELECT product_id, qty, price_cents FROM order_items WHERE order_id = $1 ORDER BY product_id",
                &[&id],
            )
            .await
            .map_err(db_error)?;
        Ok(Some(json!({
            "id": o.get::<_, i64>(0),
            "customer_id": o.get::<_, i32>(1),
            "status": o.get::<_, String>(2),
            "total": money(o.get(3)),
            "email": o.get::<_, String>(4),
            "created_at": o.get::<_, String>(5),
            "items": items.iter().map(|i| json!({
                "product_id": i.get::<_, i32>(0),
                "qty": i.get::<_, i32>(1),
                "price": money(i64::from(i.get::<_, i32>(2))),
            })).collect::<Vec<_>>(),
        })))
    }

    async fn order(Conn(db): Conn, Path(id): Path<i64>) -> Result<Json<Value>, ApiError> {
        order_json(&db, id)
            .await?
            .map(Json)
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no order {id}")))
    }

    async fn orders(Conn(db): Conn, Query(q): Query<ByCustomer>) -> Result<Json<Value>, ApiError> {
        let ids: Vec<i64> = match q.customer_id {
            Some(c) => {
                db.query(
                    "SELECT id FROM orders WHERE customer_id = $1 ORDER BY id",
                    &[&c],
                )
                .await
            }
            None => {
                db.query("SELECT id FROM orders ORDER BY id DESC LIMIT 20", &[])
                    .await
            }
        }
        .map_err(db_error)?
        .iter()
        .map(|r| r.get(0))
        .collect();
        let mut out = Vec::new();
        for id in ids {
            if let Some(o) = order_json(&db, id).await? {
                out.push(o);
            }
        }
        Ok(Json(Value::Array(out)))
    }

    async fn place_order(Conn(db): Conn, Json(new): Json<NewOrder>) -> Result<Response, ApiError> {
        if new.items.is_empty() || new.items.iter().any(|i| i.qty <= 0) {
            return Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                "an order needs items with qty > 0".into(),
            ));
        }
        let email: String = db
            .query_opt(
                "SELECT email FROM customers WHERE id = $1",
                &[&new.customer_id],
            )
            .await
            .map_err(db_error)?
            .ok_or_else(|| {
                ApiError(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("no customer {}", new.customer_id),
                )
            })?
            .get(0);
        let mut total: i64 = 0;
        let mut lines = Vec::new();
        for item in &new.items {
            let price: i32 = db
                .query_opt(
                    "SELECT price_cents FROM products WHERE id = $1",
                    &[&item.product_id],
                )
                .await
                .map_err(db_error)?
                .ok_or_else(|| {
                    ApiError(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("no product {}", item.product_id),
                    )
                })?
                .get(0);
            total += i64::from(price) * i64::from(item.qty);
            lines.push((item.product_id, item.qty, price));
        }
        // One statement, so a crash never leaves an order without its items.
        let products: Vec<i32> = lines.iter().map(|l| l.0).collect();
        let qtys: Vec<i32> = lines.iter().map(|l| l.1).collect();
        let prices: Vec<i32> = lines.iter().map(|l| l.2).collect();
        let id: i64 = db
            .query_one(
                "WITH o AS (INSERT INTO orders (customer_id, total_cents, email, note) VALUES ($1, $2, $3, $4) RETURNING id),
                      i AS (INSERT INTO order_items (order_id, product_id, qty, price_cents)
                            SELECT o.id, u.p, u.q, u.c FROM o, unnest($5::int[], $6::int[], $7::int[]) AS u(p, q, c))
                 SELECT id FROM o",
                &[&new.customer_id, &total, &email, &new.note, &products, &qtys, &prices],
            )
            .await
            .map_err(db_error)?
            .get(0);
        let body = order_json(&db, id).await?.unwrap_or(Value::Null);
        Ok((StatusCode::CREATED, Json(body)).into_response())
    }
}

/// The new orders service.
pub mod orders {
    use super::*;

    /// Creates the service's schema.
    pub async fn migrate(db: &Client) -> Result<(), tokio_postgres::Error> {
        db.batch_execute(ORDERS_SCHEMA).await
    }

    #[derive(Clone)]
    struct Ctx {
        db: Db,
        compat: Arc<std::sync::atomic::AtomicBool>,
    }

    /// The service's routes; `compat` answers money exactly as the legacy shop does.
    pub fn app(db: impl Into<Db>, compat: bool) -> axum::Router {
        switchable(db, Arc::new(std::sync::atomic::AtomicBool::new(compat)))
    }

    /// Like [`app`], with the fix switched on and off while it runs (the demo's
    /// "deploy"; a restart would leave the router's pooled connections on the old
    /// process for a while).
    pub fn switchable(
        db: impl Into<Db>,
        compat: Arc<std::sync::atomic::AtomicBool>,
    ) -> axum::Router {
        use axum::routing::get;
        let db: Db = db.into();
        axum::Router::new()
            .route("/health", get(|| async { "ok\n" }))
            .route("/api/orders", get(orders).post(place_order))
            .route("/api/orders/{id}", get(order))
            .with_state(Ctx { db, compat })
            .layer(axum::middleware::map_response(|r: Response| {
                tag("orders-service", r)
            }))
    }

    fn total(text: &str, compat: bool) -> Value {
        if compat {
            // numeric(12,2) prints with two decimals, like the legacy shop.
            Value::String(text.to_string())
        } else {
            // The deliberate difference: a number (12.3), not "12.30".
            text.parse::<f64>().map(Value::from).unwrap_or(Value::Null)
        }
    }

    async fn order_json(ctx: &Ctx, id: i64) -> Result<Option<Value>, ApiError> {
        let ts = TS.replace("created_at", "placed_at");
        let Some(o) = ctx
            .db
            .get()
            .await
            .map_err(db_error)?
            .query_opt(
                &format!("SELECT id, buyer_id, state, total::text, email, {ts} FROM orders_v2 WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(db_error)?
        else {
            return Ok(None);
        };
        let items = ctx
            .db
            .get()
            .await
            .map_err(db_error)?
            .query(
                "SELECT product_id, qty, unit_price::text FROM order_lines WHERE order_id = $1 ORDER BY product_id",
                &[&id],
            )
            .await
            .map_err(db_error)?;
        Ok(Some(json!({
            "id": o.get::<_, i64>(0),
            "customer_id": o.get::<_, i32>(1),
            "status": o.get::<_, String>(2),
            "total": total(
                &o.get::<_, String>(3),
                ctx.compat.load(std::sync::atomic::Ordering::Relaxed),
            ),
            "email": o.get::<_, String>(4),
            "created_at": o.get::<_, String>(5),
            "items": items.iter().map(|i| json!({
                "product_id": i.get::<_, i32>(0),
                "qty": i.get::<_, i32>(1),
                "price": i.get::<_, String>(2),
            })).collect::<Vec<_>>(),
        })))
    }

    async fn order(State(ctx): State<Ctx>, Path(id): Path<i64>) -> Result<Json<Value>, ApiError> {
        order_json(&ctx, id)
            .await?
            .map(Json)
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no order {id}")))
    }

    async fn orders(
        State(ctx): State<Ctx>,
        Query(q): Query<ByCustomer>,
    ) -> Result<Json<Value>, ApiError> {
        let ids: Vec<i64> = match q.customer_id {
            Some(c) => {
                ctx.db
                    .get()
                    .await
                    .map_err(db_error)?
                    .query(
                        "SELECT id FROM orders_v2 WHERE buyer_id = $1 ORDER BY id",
                        &[&c],
                    )
                    .await
            }
            None => {
                ctx.db
                    .get()
                    .await
                    .map_err(db_error)?
                    .query("SELECT id FROM orders_v2 ORDER BY id DESC LIMIT 20", &[])
                    .await
            }
        }
        .map_err(db_error)?
        .iter()
        .map(|r| r.get(0))
        .collect();
        let mut out = Vec::new();
        for id in ids {
            if let Some(o) = order_json(&ctx, id).await? {
                out.push(o);
            }
        }
        Ok(Json(Value::Array(out)))
    }

    async fn place_order(
        State(ctx): State<Ctx>,
        Json(new): Json<NewOrder>,
    ) -> Result<Response, ApiError> {
        if new.items.is_empty() || new.items.iter().any(|i| i.qty <= 0) {
            return Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                "an order needs items with qty > 0".into(),
            ));
        }
        let products: Vec<i32> = new.items.iter().map(|i| i.product_id).collect();
        let qtys: Vec<i32> = new.items.iter().map(|i| i.qty).collect();
        // Prices and e-mail come from the catalog and buyers tables CDC keeps in sync.
        let row = ctx
            .db
            .get()
            .await
            .map_err(db_error)?
            .query_opt(
                "WITH b AS (SELECT email FROM buyers WHERE id = $1),
                      lines AS (SELECT u.p AS product_id, u.q AS qty, c.unit_price
                                FROM unnest($2::int[], $3::int[]) AS u(p, q) JOIN catalog c ON c.product_id = u.p),
                      o AS (INSERT INTO orders_v2 (id, buyer_id, state, total, email, placed_at)
                            SELECT nextval('orders_v2_id'), $1, 'placed', (SELECT sum(qty * unit_price) FROM lines), b.email, now()
                            FROM b WHERE (SELECT count(*) FROM lines) = cardinality($2::int[])
                            RETURNING id),
                      l AS (INSERT INTO order_lines (order_id, product_id, qty, unit_price)
                            SELECT o.id, lines.product_id, lines.qty, lines.unit_price FROM o, lines)
                 SELECT id FROM o",
                &[&new.customer_id, &products, &qtys],
            )
            .await
            .map_err(db_error)?;
        let Some(row) = row else {
            return Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown customer or product".into(),
            ));
        };
        let body = order_json(&ctx, row.get(0)).await?.unwrap_or(Value::Null);
        Ok((StatusCode::CREATED, Json(body)).into_response())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn money_prints_cents_like_the_legacy_shop() {
        assert_eq!(super::money(1230), "12.30");
        assert_eq!(super::money(5), "0.05");
        assert_eq!(super::money(-199), "-1.99");
    }
}
