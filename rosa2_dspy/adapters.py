"""A DSPy adapter for small chat models: free text in, free text out, the answer from the last \\boxed{}.

DSPy's ChatAdapter asks the model to write ``[[ ## field ## ]]`` markers; a 135M model mostly
cannot (it writes code or repeats the problem), and every such reply is an AdapterParseError.
``BoxedAdapter`` asks for nothing but the solution: the system message is the instruction, the
user message is the input text, the whole reply is the reasoning, and the answer field is the
reply's last ``\\boxed{...}`` (kept boxed, as the signature asks). A reply without one raises
AdapterParseError, which evaluation records as a wrong answer with its reason.

Signatures it does not fit (several non-answer outputs) are handed to ChatAdapter unchanged.
"""

from __future__ import annotations

from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError

from rosa2_dspy.math.grading import last_boxed

REASONING_FIELDS = ("reasoning", "rationale")
FORMAT_REMINDER = "Please reason step by step, and put your final answer within \\boxed{}."


class BoxedAdapter(dspy.ChatAdapter):
    """Plain-text prompts; ``answer_field`` is read from the last ``\\boxed{}`` of the reply.

    A ChatAdapter subclass (with every formatting and parsing method replaced) so that DSPy's
    fine-tuning tools recognise its chat data format; its JSON fallback is off.
    """

    def __init__(self, answer_field: str = "answer", **kwargs):
        kwargs.setdefault("use_json_adapter_fallback", False)
        super().__init__(**kwargs)
        self.answer_field = answer_field
        self._fallback = dspy.ChatAdapter()

    def _fits(self, signature) -> bool:
        free = [n for n in signature.output_fields if n not in REASONING_FIELDS and n != self.answer_field]
        return len(free) + (self.answer_field in signature.output_fields) == 1

    # -- formatting ----------------------------------------------------------------

    def format(self, signature, demos, inputs):
        if not self._fits(signature):
            return self._fallback.format(signature, demos, inputs)
        return dspy.Adapter.format(self, signature, demos, inputs)

    def format_system_message(self, signature) -> str:
        return signature.instructions.strip()

    def format_user_message_content(self, signature, inputs, prefix="", suffix="", main_request=False) -> str:
        fields = [(name, inputs.get(name)) for name in signature.input_fields]
        fields = [(name, value) for name, value in fields if value not in (None, "")]
        if len(fields) == 1:
            body = str(fields[0][1])
        else:
            body = "\n\n".join(f"{signature.input_fields[n].json_schema_extra.get('prefix', n).rstrip(':')}:\n{v}"
                               for n, v in fields)
        if self.answer_field in signature.output_fields and main_request:
            # small models follow the last user turn far better than the system message
            suffix = (suffix + "\n\n" if suffix else "") + FORMAT_REMINDER
        return "\n\n".join(part for part in (prefix, body, suffix) if part)

    def format_assistant_message_content(self, signature, outputs, missing_field_message=None) -> str:
        parts = [str(outputs[n]) for n in REASONING_FIELDS if outputs.get(n)]
        for name in signature.output_fields:
            if name in REASONING_FIELDS or outputs.get(name) in (None, ""):
                continue
            value = str(outputs[name])
            if parts and name == self.answer_field and last_boxed(parts[-1]) in (last_boxed(value), value) \
                    and last_boxed(parts[-1]) is not None:
                continue  # the reasoning is the whole reply and already ends with this boxed answer
            if name == self.answer_field and last_boxed(value) is None:
                value = f"The final answer is \\boxed{{{value}}}."
            parts.append(value)
        return "\n\n".join(parts) or (missing_field_message or "")

    # -- parsing -------------------------------------------------------------------

    def parse(self, signature, completion: str) -> dict[str, Any]:
        if not self._fits(signature):
            return self._fallback.parse(signature, completion)
        text = completion.strip()
        values: dict[str, Any] = {}
        for name in signature.output_fields:
            if name in REASONING_FIELDS:
                values[name] = text
            elif name == self.answer_field:
                boxed = last_boxed(text)
                if boxed is None:
                    raise AdapterParseError(adapter_name=type(self).__name__, signature=signature,
                                            lm_response=completion, message="no \\boxed{} answer in the reply")
                values[name] = f"\\boxed{{{boxed}}}"
            else:
                if not text:
                    raise AdapterParseError(adapter_name=type(self).__name__, signature=signature,
                                            lm_response=completion, message=f"empty reply for {name!r}")
                values[name] = text
        return values


ADAPTERS = {"boxed": BoxedAdapter, "chat": dspy.ChatAdapter, "json": dspy.JSONAdapter, "xml": dspy.XMLAdapter}


def make_adapter(name: str) -> dspy.Adapter:
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; choose from: {', '.join(ADAPTERS)}")
    return ADAPTERS[name]()
