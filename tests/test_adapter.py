import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError

from rosa2_dspy.adapters import FORMAT_REMINDER, BoxedAdapter, make_adapter
from rosa2_dspy.signatures import Answer, Clarify

COT_ANSWER = dspy.ChainOfThought(Answer).predict.signature


def test_reply_becomes_reasoning_and_last_box_the_answer():
    parsed = BoxedAdapter().parse(COT_ANSWER, "2+3 is 5, not \\boxed{4}. So \\boxed{5}.")
    assert parsed == {"reasoning": "2+3 is 5, not \\boxed{4}. So \\boxed{5}.", "answer": "\\boxed{5}"}


def test_reply_without_a_box_is_a_parse_error_with_its_reason():
    with pytest.raises(AdapterParseError, match="no \\\\boxed"):
        BoxedAdapter().parse(COT_ANSWER, "The answer is 5")


def test_format_is_plain_text_with_instruction_and_reminder():
    messages = BoxedAdapter().format(COT_ANSWER, demos=[], inputs={"problem": "What is 2+3?"})
    assert messages[0] == {"role": "system", "content": Answer.instructions.strip()}
    assert messages[-1]["role"] == "user"
    assert messages[-1]["content"].startswith("What is 2+3?")
    assert messages[-1]["content"].endswith(FORMAT_REMINDER)
    assert "[[ ##" not in messages[-1]["content"]


def test_demos_are_rendered_with_boxed_answers():
    demo = {"problem": "1+1?", "reasoning": "One and one.", "answer": "2"}
    messages = BoxedAdapter().format(COT_ANSWER, demos=[demo], inputs={"problem": "2+2?"})
    assert messages[1] == {"role": "user", "content": "1+1?"}
    assert messages[2]["content"] == "One and one.\n\nThe final answer is \\boxed{2}."


def test_clarify_gets_the_whole_reply_and_labelled_inputs():
    adapter = BoxedAdapter()
    messages = adapter.format(Clarify, demos=[], inputs={"problem": "Find x.", "feedback": "I meant x > 0"})
    assert "Find x." in messages[-1]["content"] and "I meant x > 0" in messages[-1]["content"]
    assert FORMAT_REMINDER not in messages[-1]["content"]
    assert adapter.parse(Clarify, " Find the positive x. ") == {"clarified_problem": "Find the positive x."}


def test_signatures_it_does_not_fit_fall_back_to_chat_adapter():
    sig = dspy.Signature("question -> title, body")
    messages = BoxedAdapter().format(sig, demos=[], inputs={"question": "q"})
    assert "[[ ## title ## ]]" in messages[0]["content"]
    assert BoxedAdapter().parse(sig, "[[ ## title ## ]]\nT\n[[ ## body ## ]]\nB\n[[ ## completed ## ]]") == \
        {"title": "T", "body": "B"}


def test_make_adapter_names():
    assert isinstance(make_adapter("boxed"), BoxedAdapter)
    assert isinstance(make_adapter("chat"), dspy.ChatAdapter)
    with pytest.raises(ValueError, match="unknown adapter"):
        make_adapter("yaml")


def test_program_runs_clarify_then_answer_through_a_scripted_engine():
    from dspy.lm15 import Message, Response, TextPart, Usage
    from math_solver import MathSolver

    replies = iter(["Find 2+3 exactly.", "2+3=5 so \\boxed{5}"])

    class ScriptEngine:
        def __init__(self):
            self.requests = []

        def complete(self, request):
            self.requests.append(request)
            return Response(id=None, model=request.model, message=Message.assistant([TextPart(next(replies))]),
                            finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2))

        def stream(self, request):
            raise NotImplementedError

        def close(self):
            pass

    engine = ScriptEngine()
    dspy.configure(lm=dspy.LM("local/script", engine=engine, cache=False))
    pred = MathSolver(clarify=True)(problem="What is 2+3?", feedback="use exact arithmetic")
    assert pred.clarified_problem == "Find 2+3 exactly."
    assert pred.answer == "\\boxed{5}"
    assert "use exact arithmetic" in engine.requests[0].messages[-1].text
    assert engine.requests[1].messages[-1].text.startswith("Find 2+3 exactly.")
