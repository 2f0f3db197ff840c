#!/usr/bin/env python3
"""The atProtocol reply framer against the baseline it replaced, side by side.

Not a test; prints a table and asserts nothing. Baseline: what the asyncio client did before
``noports.atprotocol.wire`` existed: ``asyncio.StreamReader.readline`` per reply plus a
prompt strip (``strip_prompt``) on each line. Framer: ``ReplyFramer.feed`` on the same bytes
in the same chunk size. Two streams: many small replies (``data:<n>\\n@alice@``) and one long
reply (a large value) arriving in 64 KiB chunks, the size a TLS read returns.

    .venv/bin/python -m bench.wire_framer            # 100,000 small replies, a 16 MiB reply
    .venv/bin/python -m bench.wire_framer --quick    # 10,000 small, 4 MiB
"""

from __future__ import annotations

import argparse
import asyncio
import time

from noports.atprotocol.wire import ReplyFramer, strip_prompt

CHUNK = 64 * 1024


def chunks(data: bytes) -> list[bytes]:
    return [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]


def framer_run(parts: list[bytes]) -> tuple[float, int]:
    t0 = time.perf_counter()
    f = ReplyFramer()
    n = 0
    for p in parts:
        n += sum(1 for r in f.feed(p) if r.kind != "prompt")
    return time.perf_counter() - t0, n


def baseline_run(parts: list[bytes], expect: int) -> tuple[float, int]:
    async def run() -> tuple[float, int]:
        reader = asyncio.StreamReader(limit=32 * 1024 * 1024)
        t0 = time.perf_counter()
        n = 0
        for p in parts:
            reader.feed_data(p)
            while n < expect and b"\n" in reader._buffer:  # what is complete so far
                line = await reader.readline()
                strip_prompt(line.decode("utf-8", "replace").rstrip("\r\n"))
                n += 1
        return time.perf_counter() - t0, n

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_small = 10_000 if args.quick else 100_000
    big_mib = 4 if args.quick else 16
    small = chunks(b"".join(b"data:%d\n@alice@" % i for i in range(n_small)))
    big = chunks(b"data:" + b"v" * (big_mib << 20) + b"\n@alice@")
    print(f"{'stream':<34} {'baseline (readline)':>20} {'framer':>12}")
    for name, parts, expect in ((f"{n_small} small replies", small, n_small),
                                (f"one {big_mib} MiB reply, 64 KiB reads", big, 1)):
        b_s, b_n = baseline_run(parts, expect)
        f_s, f_n = framer_run(parts)
        print(f"{name:<34} {b_s * 1000:>17.0f} ms {f_s * 1000:>9.0f} ms"
              + ("" if b_n == f_n == expect else f"   (counts differ: {b_n} vs {f_n})"))


if __name__ == "__main__":
    main()
