#!/bin/sh
# docker compose init script: load the seed CSVs into the schema made by 01-schema.sql.
# (helpers/seed.py does the same from Python when the course starts its own server.)
set -eu
here=/docker-entrypoint-initdb.d
for table in users products orders; do
    gunzip -c "$here/$table.csv.gz" | psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" \
        --dbname "$POSTGRES_DB" -c "\\copy shop.$table FROM STDIN WITH (FORMAT csv, HEADER true)"
done
version=$(sed -n 's/.*"version": *"\([0-9a-f]*\)".*/\1/p' "$here/manifest.json")
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -c "ANALYZE shop.users, shop.products, shop.orders" \
    -c "INSERT INTO shop.seed_info (version) VALUES ('$version')"
