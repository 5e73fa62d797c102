"""Decayed linear attention side by side with linear attention (d_model 768, 12 heads, batch 1, float32).

    python benchmarks/bench_decay.py [--quick] [--threads N] [--cpu-time] [--json results.json]

The method and the goals are ``bench_delta``'s (one run, every layer called in turn each repeat, medians
after warm-up): forward at T = 4096 ≤ 1.5× ``linear_attention``'s chunked forward; time per token at
T = 16384 over T = 1024 ≤ 1.3; decode time per token at position 8192 over 64 ≤ 1.3. The layers run at
fla's defaults (``retnet``: key width d_model, value width 2·d_model; ``gla``: key width d_model/2;
``hgrn2``: d_model/12 = 64 forget features per head), each with its output gate where it has one; the
rows at linear attention's widths (key and value width d_model) are the ones the goals are for.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_delta import main  # noqa: E402

ROWS = {
    "linear_attention": ("linear_attention", {}),
    "retnet (expand_v=1)": ("retnet", {"expand_v": 1.0}),
    "retnet (default, expand_v=2)": ("retnet", {}),
    "gla (expand_k=1)": ("gla", {"expand_k": 1.0}),
    "gla (default, expand_k=0.5)": ("gla", {}),
    "hgrn2": ("hgrn2", {}),
}
GOAL_ROWS = ["retnet (expand_v=1)", "gla (expand_k=1)", "gla (default, expand_k=0.5)", "hgrn2"]

if __name__ == "__main__":
    main(rows=ROWS, goal_layers=GOAL_ROWS, doc=__doc__)
