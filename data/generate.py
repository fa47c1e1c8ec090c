"""Generate the course's seed data: a small, deterministic e-commerce shop.

    python data/generate.py        # rewrites data/*.csv.gz and data/manifest.json

Same output on every machine and every run (a fixed random seed, gzip without timestamps),
so the committed files only change when this script does. Loaded with COPY by
``helpers.seed`` and by docker compose's init scripts (``02-load.sh``).
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import hashlib
import io
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261125
N_USERS = 100_000
N_PRODUCTS = 1_000
N_ORDERS = 50_000

FIRST = ("ada alan anna ben carla dev elif emma finn grace hana ivan jade kofi lena liam "
         "maya mia noah omar priya rosa sam sara tom uma vera wei yara zoe").split()
LAST = ("baker chen diaz evans fischer garcia hughes ito jones kim lopez meyer nakamura "
        "okafor patel quinn rossi silva tanaka ueda vance wang xu young zhang").split()
ADJ = "compact classic deluxe eco fresh handy light mini pro smart sturdy swift".split()
NOUN = "backpack blender bottle chair desk kettle lamp mug pan pillow shelf speaker".split()
CATEGORIES = ("home", "kitchen", "office", "outdoor", "travel")


def users(rng: random.Random) -> list[tuple]:
    rows = []
    for i in range(1, N_USERS + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        rows.append((i, f"{first.title()} {last.title()}", rng.randint(18, 90),
                     f"{first}.{last}.{i}@example.com"))
    return rows


def products(rng: random.Random) -> list[tuple]:
    return [(i, f"{rng.choice(ADJ).title()} {rng.choice(NOUN)}", rng.choice(CATEGORIES),
             rng.randint(199, 19_999), rng.randint(0, 500)) for i in range(1, N_PRODUCTS + 1)]


def orders(rng: random.Random) -> list[tuple]:
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    return [(i, rng.randint(1, N_USERS), rng.randint(1, N_PRODUCTS), rng.randint(1, 5),
             (start + dt.timedelta(seconds=rng.randrange(365 * 86400))).isoformat())
            for i in range(1, N_ORDERS + 1)]


TABLES = {
    "users": ("id", "name", "age", "email"),
    "products": ("id", "name", "category", "price_cents", "stock"),
    "orders": ("id", "user_id", "product_id", "quantity", "ordered_at"),
}


def write_csv_gz(path: Path, header: tuple[str, ...], rows: list[tuple]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    raw = text.getvalue().encode()
    path.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
    return hashlib.sha256(raw).hexdigest()


def main() -> None:
    rng = random.Random(SEED)
    data = {"users": users(rng), "products": products(rng), "orders": orders(rng)}
    manifest: dict = {"seed": SEED, "tables": {}}
    for name, rows in data.items():
        digest = write_csv_gz(HERE / f"{name}.csv.gz", TABLES[name], rows)
        manifest["tables"][name] = {"rows": len(rows), "sha256": digest}
    combined = "".join(t["sha256"] for t in manifest["tables"].values())
    manifest["version"] = hashlib.sha256(combined.encode()).hexdigest()[:16]
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"seed version {manifest['version']}:",
          ", ".join(f"{k} {v['rows']:,}" for k, v in manifest["tables"].items()))


if __name__ == "__main__":
    main()
