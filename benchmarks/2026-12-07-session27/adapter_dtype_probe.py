"""The uneven later update's peak memory with the adapter in float32 (the default) or in the model's dtype (bf16).

One process per dtype: load the default model, a first update (one rejected reply), snapshot those moved weights,
then twice: restore them, the first update again, and the uneven update (``threshold_ab.uneven_rows``) with the
kernel's ``VmHWM`` reset before it. Prints JSON: each uneven update's seconds and peak over before (MiB), and the
last one's L2 shift. Usage: python adapter_dtype_probe.py float32|model"""

import json
import sys
import time
from pathlib import Path

from rosa2_dspy.coadapt import session_update_config
from rosa2_dspy.engine import LocalEngine
from rosa2_dspy.memory import peak_rss_since_reset_mib, reset_peak_rss
from rosa2_dspy.weights import LoRAUpdater

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "2026-12-07-session25"))
import threshold_ab  # noqa: E402  (session 25's script: its uneven_rows are the rows measured here)


def main(adapter_dtype: str) -> None:
    engine = LocalEngine.from_pretrained("default")
    first, uneven = threshold_ab.uneven_rows(engine.tokenizer)
    updater = LoRAUpdater(engine, session_update_config(adapter_dtype=adapter_dtype))
    updater.update(first)
    moved = engine.snapshot()
    runs = []
    for _ in range(2):
        engine.restore(moved)
        updater.update(first)
        reset_peak_rss()
        base, began = peak_rss_since_reset_mib(), time.perf_counter()
        result = updater.update(uneven)
        runs.append({"seconds": round(time.perf_counter() - began, 2),
                     "peak_over_before_mib": round(peak_rss_since_reset_mib() - base)})
    print(json.dumps({"adapter_dtype": adapter_dtype, "runs": runs, "shift": round(result.update_shift, 5)}))


if __name__ == "__main__":
    main(sys.argv[1])
