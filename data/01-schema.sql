-- The course's seed schema: a small shop. Lessons read it; they write in their own schemas.
-- Loaded by helpers/seed.py (COPY from the *.csv.gz files) and, under docker compose, by
-- /docker-entrypoint-initdb.d (this file, then 02-load.sh).
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;

CREATE SCHEMA shop;

CREATE TABLE shop.users (
    id     integer PRIMARY KEY,
    name   text    NOT NULL,
    age    integer NOT NULL CHECK (age BETWEEN 0 AND 150),
    email  text    NOT NULL UNIQUE
);

CREATE TABLE shop.products (
    id           integer PRIMARY KEY,
    name         text    NOT NULL,
    category     text    NOT NULL,
    price_cents  integer NOT NULL CHECK (price_cents >= 0),
    stock        integer NOT NULL CHECK (stock >= 0)
);

CREATE TABLE shop.orders (
    id          integer     PRIMARY KEY,
    user_id     integer     NOT NULL REFERENCES shop.users,
    product_id  integer     NOT NULL REFERENCES shop.products,
    quantity    integer     NOT NULL CHECK (quantity > 0),
    ordered_at  timestamptz NOT NULL
);
CREATE INDEX orders_user_id_idx ON shop.orders (user_id);

-- Which seed is loaded (data/manifest.json "version"); written last, after the data.
CREATE TABLE shop.seed_info (
    version    text        NOT NULL,
    loaded_at  timestamptz NOT NULL DEFAULT now()
);
