-- The new orders service's schema: its own names, money as numeric, and ids from
-- a separate range so orders created here never collide with legacy ones while
-- both databases are kept in sync.
CREATE TABLE IF NOT EXISTS orders_v2 (
    id bigint PRIMARY KEY,
    buyer_id integer NOT NULL,
    state text NOT NULL,
    total numeric(12,2) NOT NULL,
    email text NOT NULL,
    placed_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS order_lines (
    order_id bigint NOT NULL,
    product_id integer NOT NULL,
    qty integer NOT NULL,
    unit_price numeric(12,2) NOT NULL,
    PRIMARY KEY (order_id, product_id)
);
CREATE TABLE IF NOT EXISTS catalog (
    product_id integer PRIMARY KEY,
    unit_price numeric(12,2) NOT NULL
);
CREATE TABLE IF NOT EXISTS buyers (
    id integer PRIMARY KEY,
    email text NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS orders_v2_id START 1000000;
