"""Input policy and bad-input handling: every request gets a decision, never an exception."""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router import InputPolicy, Reason, Router
from router.inputs import BadInput, check_text, request_text

CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "second"}, {"type": "image_url", "image_url": {}}],
    },
]


def test_last_user_takes_the_last_user_message_and_joins_text_parts() -> None:
    assert request_text(CHAT, InputPolicy()) == "second"
    assert request_text({"messages": CHAT}, InputPolicy()) == "second"


def test_last_k_and_conversation_join_turns_in_order() -> None:
    assert request_text(CHAT, InputPolicy(mode="last_k", k=2)) == "first answer\n\nsecond"
    assert (
        request_text(CHAT, InputPolicy(mode="conversation"))
        == "first question\n\nfirst answer\n\nsecond"
    )
    with_system = InputPolicy(mode="conversation", include_system=True)
    assert request_text(CHAT, with_system).startswith("You are helpful.\n\nfirst question")


def test_joined_turns_keep_the_newest_tail() -> None:
    chat = [{"role": "user", "content": "old " * 500}, {"role": "user", "content": "newest"}]
    text = request_text(chat, InputPolicy(mode="conversation", tail_chars=50))
    assert isinstance(text, str) and len(text) == 50 and text.endswith("newest")


def test_text_and_prompt_keys() -> None:
    assert request_text({"text": "hello"}, InputPolicy()) == "hello"
    assert request_text({"prompt": "hi"}, InputPolicy()) == "hi"


@pytest.mark.parametrize(
    ("request_", "reason", "detail"),
    [
        (None, Reason.INVALID_INPUT, "NoneType"),
        (42, Reason.INVALID_INPUT, "int"),
        (b"bytes", Reason.INVALID_INPUT, "bytes"),
        ({"text": 3}, Reason.INVALID_INPUT, "'text' is int"),
        ({"foo": "bar"}, Reason.INVALID_INPUT, "none of"),
        ({"messages": "hi"}, Reason.INVALID_INPUT, "not a list"),
        ([{"role": "user", "content": 5}], Reason.INVALID_INPUT, "messages[0].content is int"),
        (["hello"], Reason.INVALID_INPUT, "messages[0] is str"),
        ([{"content": "x"}], Reason.INVALID_INPUT, "messages[0].role"),
        (
            [{"role": "assistant", "content": "x"}],
            Reason.NO_USER_TURN,
            "no message with role 'user'",
        ),
        ([], Reason.NO_USER_TURN, "among 0"),
    ],
)
def test_bad_requests_name_the_problem(request_: object, reason: Reason, detail: str) -> None:
    bad = request_text(request_, InputPolicy())
    assert isinstance(bad, BadInput)
    assert bad.reason is reason
    assert detail in bad.detail


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", Reason.EMPTY_INPUT),
        (" \n\t ", Reason.EMPTY_INPUT),
        ("\x00\x01\x02\x03abc\x04\x05", Reason.INVALID_INPUT),
        ("\ufffd" * 20 + "abc", Reason.INVALID_INPUT),
        ("这是一个关于法律合同的问题吗", Reason.UNSUPPORTED_LANGUAGE),
        ("Что такое договор аренды?", Reason.UNSUPPORTED_LANGUAGE),
    ],
)
def test_check_text_rejects(text: str, reason: Reason) -> None:
    bad = check_text(text, InputPolicy())
    assert bad is not None and bad.reason is reason


@pytest.mark.parametrize(
    "text", ["What is a tort?", "¿Qué es un contrato?", "12345 + 678", "def f(x): return x"]
)
def test_check_text_accepts(text: str) -> None:
    assert check_text(text, InputPolicy()) is None


def test_non_latin_text_is_accepted_when_not_english_only() -> None:
    assert check_text("这是一个关于法律合同的问题吗", InputPolicy(english_only=False)) is None


def test_policy_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="mode"):
        InputPolicy(mode="everything")
    with pytest.raises(ValueError, match="k must be"):
        InputPolicy(mode="last_k", k=0)


def test_specific_bad_inputs_get_base_with_reason(toy_router: Router) -> None:
    cases = {
        "": Reason.EMPTY_INPUT,
        "   ": Reason.EMPTY_INPUT,
        "\x00\x01\x02\x03\x04": Reason.INVALID_INPUT,
        "日本語の質問です": Reason.UNSUPPORTED_LANGUAGE,
    }
    for text, reason in cases.items():
        d = toy_router.route(text)
        assert (d.label, d.reason, d.probs, d.predicted) == ("base", reason, {}, None)


def test_very_long_input_is_truncated_not_an_error(toy_router: Router) -> None:
    d = toy_router.route("court statute contract " * 200_000)
    assert d.label == "law" and d.reason is Reason.CONFIDENT


def test_lone_surrogates_are_routed(toy_router: Router) -> None:
    d = toy_router.route("patient fever \ud800 diagnosis treatment")
    assert d.label == "medical"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "tool", 3]),
            "content": json_values,
        }
    ),
    max_size=5,
)
requests = (
    st.text(max_size=200)
    | st.binary(max_size=50).map(lambda b: b.decode("latin-1"))
    | json_values
    | messages
    | messages.map(lambda m: {"messages": m})
    | st.text(alphabet=string.printable, max_size=80).map(lambda t: {"text": t})
)
REASONS = set(Reason)
LIGHT = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@LIGHT
@given(request=requests, mode=st.sampled_from(["last_user", "last_k", "conversation"]))
def test_any_request_gets_a_well_formed_decision(
    toy_router: Router, request: object, mode: str
) -> None:
    from dataclasses import replace

    router = replace(toy_router, policy=InputPolicy(mode=mode, k=2))
    d = router.route(request)
    assert d.reason in REASONS
    assert d.label in router.labels
    if d.reason is not Reason.CONFIDENT:
        assert d.label == "base"
    if d.probs:
        assert set(d.probs) == set(router.labels)
        assert abs(sum(d.probs.values()) - 1.0) < 1e-4
        top, second = sorted(d.probs.values())[-2:][::-1]
        assert d.margin == pytest.approx(top - second, abs=1e-6)
        assert d.predicted is not None and d.probs[d.predicted] == top
        if d.reason is Reason.CONFIDENT:
            assert d.label == d.predicted
    d.to_json()  # always serialisable


@LIGHT
@given(batch=st.lists(requests, max_size=6))
def test_batch_equals_one_by_one(toy_router: Router, batch: list[object]) -> None:
    together = [(d.label, d.reason, d.probs) for d in toy_router.route_batch(batch)]
    alone = [(d.label, d.reason, d.probs) for d in (toy_router.route(r) for r in batch)]
    assert len(together) == len(batch)
    assert [t[:2] for t in together] == [a[:2] for a in alone]
    for (_, _, p), (_, _, q) in zip(together, alone, strict=True):
        assert p.keys() == q.keys()
        assert all(abs(p[k] - q[k]) < 1e-5 for k in p)
