"""What passes between the engine's parts: a request's generation settings and what it produced."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class GenSettings:
    """Settings that must agree for requests to share one batched ``generate`` call."""

    max_tokens: int
    do_sample: bool
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    weights: str | None = None  # a pinned weights id (see LocalEngine.pin), else the weights in use

    def batch_key(self) -> GenSettings:
        """What rows of one batch must share: the seed and the weights are per row (each row samples
        from its own generator; rows with different pinned weights run through PEFT's mixed-adapter
        batches)."""
        return replace(self, seed=None, weights=None)


@dataclass
class Completion:
    """What one request produced: text, token counts and why it ended."""

    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str
    compute_seconds: float = 0.0  # this row's share of its batch's generate time
    shared: bool = False  # another identical request's generation (no tokens, no time of its own)
