"""Training rows: SFT, KTO and DPO rows of chat messages, and their conversion to TRL's format."""

from __future__ import annotations

from typing import Iterable

from rosa2_dspy.weights.config import UNPAIRED, UpdateError



def sft_row(prompt: list[dict], response: str) -> dict:
    return {"prompt": prompt, "completion": response, "label": True}


def kto_row(prompt: list[dict], response: str, desirable: bool) -> dict:
    return {"prompt": prompt, "completion": response, "label": bool(desirable)}


def dpo_row(prompt: list[dict], chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def rows_from_chat(items: Iterable[dict]) -> list[dict]:
    """DSPy's chat fine-tuning format (``{"messages": [..., assistant]}``) to SFT rows."""
    rows = []
    for item in items:
        messages = list(item.get("messages") or [])
        if not messages or messages[-1].get("role") != "assistant":
            raise UpdateError("each chat training item must end with an assistant message")
        rows.append(sft_row(messages[:-1], messages[-1]["content"]))
    return rows


def _to_trl(rows: list[dict], objective: str) -> list[dict]:
    """Rows to TRL's conversational prompt/completion format (loss on the completion tokens only)."""
    out = []
    for row in rows:
        prompt = [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
        if objective == "dpo":
            if "chosen" not in row or "rejected" not in row:
                raise UpdateError("dpo rows need 'chosen' and 'rejected'")
            out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": row["chosen"]}],
                        "rejected": [{"role": "assistant", "content": row["rejected"]}]})
            continue
        if "completion" not in row:
            raise UpdateError(f"{objective} rows need 'completion' (and 'label')")
        if objective == "sft" and not row.get("label", True):
            continue  # SFT learns from desirable responses only
        item = {"prompt": prompt, "completion": [{"role": "assistant", "content": row["completion"]}]}
        if objective in UNPAIRED:
            item["label"] = bool(row.get("label", True))
        out.append(item)
    return out
