"""Draw bench/results/benchmarks.png from the latest latency.json and throughput.json.

Left: p50 and p99 time to the final `message` against concurrency, R2D2 and the
direct AsyncOpenAI baseline (log scale). Right: turns per second against
concurrency, R2D2 and the bare websockets relay.

    .venv/bin/python bench/plot.py
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from common import RESULTS


def main() -> None:
    latency = json.loads((RESULTS / "latency.json").read_text())
    throughput = json.loads((RESULTS / "throughput.json").read_text())
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))

    levels = latency["levels"]
    x = [lv["sessions"] for lv in levels]
    for key, label, style in (("r2d2_ms", "R2D2", "-o"), ("direct_ms", "direct AsyncOpenAI", "--s")):
        for q, alpha in (("p50", 1.0), ("p99", 0.5)):
            left.plot(x, [lv[key]["message"][q] for lv in levels], style, alpha=alpha, label=f"{label} {q}")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("concurrent sessions")
    left.set_ylabel("time to final message (ms)")
    m = latency["model_server"]
    left.set_title(f"Latency (model: first token {m['ttft_s'] * 1000:g} ms, {m['token_delay_s'] * 1000:g} ms/token)")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)

    tl = throughput["levels"]
    x = [lv["sessions"] for lv in tl]
    right.plot(x, [lv["r2d2"]["turns_per_s"] for lv in tl], "-o", label="R2D2 (Daphne + PostgreSQL + Redis)")
    right.plot(x, [lv["bare_relay"]["turns_per_s"] for lv in tl], "--s", label="bare websockets relay")
    for lv in tl:
        right.annotate(
            f"{lv['ratio']:.2f}x",
            (lv["sessions"], lv["r2d2"]["turns_per_s"]),
            fontsize=8,
            textcoords="offset points",
            xytext=(4, -12),
        )
    right.set_xscale("log")
    right.set_xlabel("concurrent sessions (5 turns each)")
    right.set_ylabel("turns per second")
    kind = "streamed" if throughput["model_server"].get("stream") else "one message"
    right.set_title(f"Throughput, {kind} (model answers in {throughput['model_server']['ttft_s'] * 1000:g} ms)")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)

    machine = latency["machine"]
    fig.suptitle(
        f"R2D2 benchmarks, {latency['date'][:10]}: {machine['cores']} cores ({machine['cpu']}), "
        "server, model server and client on the same cores",
        fontsize=9,
    )
    fig.tight_layout()
    out = RESULTS / "benchmarks.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
