#!/usr/bin/env python3
"""A generated point-of-sale export for the benchmarks: CSV rows of transaction id, time, store,
SKU, quantity, unit price, card last four and auth code, deterministic for a given size.

    scripts/pos-csv.py OUT SIZE_BYTES
"""
import random
import sys

path, size = sys.argv[1], int(sys.argv[2])
rng = random.Random(42)
written, txn, secs = 0, 88_000_000, 8 * 3600
with open(path, "w") as out:
    header = "txn_id,timestamp,store,sku,qty,unit_price,card_last4,auth_code\n"
    out.write(header[:size])
    written += min(len(header), size)
    while written < size:
        txn += 1
        secs += rng.randrange(7)
        sku = rng.randrange(300)
        row = (
            f"{txn},2026-12-01T{secs // 3600 % 24:02}:{secs // 60 % 60:02}:{secs % 60:02}Z,"
            f"store-0042,SKU-{sku:05},{1 + rng.randrange(3)},{1 + sku % 40}.{sku * 37 % 100:02},"
            f"{rng.randrange(10000):04},{rng.randrange(1000000):06}\n"
        )[: size - written]
        out.write(row)
        written += len(row)
