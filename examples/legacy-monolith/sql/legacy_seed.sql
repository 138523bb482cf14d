-- 50 customers, 20 products, 200 orders with one to three items each.
INSERT INTO customers (email, name)
SELECT 'customer' || g || '@example.com', 'Customer ' || g FROM generate_series(1, 50) g
ON CONFLICT DO NOTHING;
INSERT INTO products (sku, name, price_cents)
SELECT 'SKU-' || lpad(g::text, 3, '0'), 'Product ' || g, 199 + g * 137 FROM generate_series(1, 20) g
ON CONFLICT DO NOTHING;
INSERT INTO orders (customer_id, status, total_cents, email, created_at)
SELECT g % 50 + 1, (ARRAY['placed', 'paid', 'shipped'])[g % 3 + 1], 0,
       'customer' || (g % 50 + 1) || '@example.com', now() - (g || ' hours')::interval
FROM generate_series(1, 200) g
WHERE NOT EXISTS (SELECT 1 FROM orders);
INSERT INTO order_items (order_id, product_id, qty, price_cents)
SELECT o.id, p.id, (o.id + p.id) % 3 + 1, p.price_cents
FROM orders o JOIN products p ON p.id IN (o.id % 20 + 1, (o.id * 7) % 20 + 1)
ON CONFLICT DO NOTHING;
UPDATE orders o SET total_cents = s.total
FROM (SELECT order_id, sum(qty * price_cents) AS total FROM order_items GROUP BY order_id) s
WHERE s.order_id = o.id AND o.total_cents = 0;
