-- The legacy shop's schema, as it grew: money in cents, status as free text,
-- the customer's e-mail copied onto each order "for the invoice".
CREATE TABLE IF NOT EXISTS customers (
    id serial PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS products (
    id serial PRIMARY KEY,
    sku text NOT NULL UNIQUE,
    name text NOT NULL,
    price_cents integer NOT NULL CHECK (price_cents >= 0)
);
CREATE TABLE IF NOT EXISTS orders (
    id bigserial PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES customers (id),
    status text NOT NULL DEFAULT 'placed',
    total_cents bigint NOT NULL,
    email text NOT NULL,
    note text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS order_items (
    order_id bigint NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    product_id integer NOT NULL REFERENCES products (id),
    qty integer NOT NULL CHECK (qty > 0),
    price_cents integer NOT NULL,
    PRIMARY KEY (order_id, product_id)
);
