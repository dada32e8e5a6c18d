"""Mid-stream continuation's pure core: a broken stream read back, the continuing request, the
next host's stream spliced into the client's, and the closing of a stream with nothing left.

The streams are shaped as the engines write them: vLLM (pydantic, exclude_unset: id first, a
role chunk with content "", a final usage chunk with choices [], usage on every chunk with
continuous_usage_stats), SGLang (every field, nulls included: "usage": null, deltas with "role":
null, "reasoning_content": null, "tool_calls": null, "matched_stop"), llama.cpp (choices first,
system_fingerprint on every chunk, a role chunk with content null, usage and timings on the
finish chunk).
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from edge.proxy.splice import Broken, Splice, broken, closing, continuation_body

CREATED = 1754523863


# -- the engines' chunks ---------------------------------------------------------------------


def vllm_chat(
    texts: list[str],
    finish: str | None = "stop",
    usage: bool = False,
    continuous: bool = False,
    prompt: int = 10,
    ident: str = "chatcmpl-v1",
    model: str = "m",
) -> list[dict[str, Any]]:
    def chunk(choices: list[Any], done: int | None) -> dict[str, Any]:
        out = {
            "id": ident, "object": "chat.completion.chunk", "created": CREATED,
            "model": model, "choices": choices,
        }  # fmt: skip
        if continuous and done is not None:
            out["usage"] = {
                "prompt_tokens": prompt, "total_tokens": prompt + done, "completion_tokens": done,
            }  # fmt: skip
        return out

    def choice(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}

    events = [chunk([choice({"role": "assistant", "content": ""})], 0)]
    for i, text in enumerate(texts):
        events.append(chunk([choice({"content": text})], i + 1))
    if finish is not None:
        events.append(chunk([choice({"content": ""}, finish)], len(texts)))
        if usage:
            final = chunk([], None)
            final["usage"] = {
                "prompt_tokens": prompt, "total_tokens": prompt + len(texts),
                "completion_tokens": len(texts),
            }  # fmt: skip
            events.append(final)
    return events


def sglang_chat(
    texts: list[str], finish: str | None = "stop", usage: bool = False, prompt: int = 10
) -> list[dict[str, Any]]:
    def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        full = {"role": None, "content": None, "reasoning_content": None, "tool_calls": None}
        full.update(delta)
        return {
            "id": "sg-1", "object": "chat.completion.chunk", "created": CREATED, "model": "m",
            "choices": [{
                "index": 0, "delta": full, "logprobs": None, "finish_reason": reason,
                "matched_stop": 151645 if reason else None,
            }],
            "usage": None,
        }  # fmt: skip

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": text}) for text in texts]
    if finish is not None:
        events.append(chunk({}, finish))
        if usage:
            events.append({
                "id": "sg-1", "object": "chat.completion.chunk", "created": CREATED,
                "model": "m", "choices": [],
                "usage": {
                    "prompt_tokens": prompt, "total_tokens": prompt + len(texts),
                    "completion_tokens": len(texts), "prompt_tokens_details": None,
                },
            })  # fmt: skip
    return events


def llama_chat(
    texts: list[str], finish: str | None = "stop", prompt: int = 10
) -> list[dict[str, Any]]:
    def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {
            "choices": [{"finish_reason": reason, "index": 0, "delta": delta}],
            "created": CREATED, "id": "chatcmpl-L", "model": "gpt-oss:20b",
            "system_fingerprint": "b6097-9515c613", "object": "chat.completion.chunk",
        }  # fmt: skip

    events = [chunk({"role": "assistant", "content": None})]
    events += [chunk({"content": text}) for text in texts]
    if finish is not None:
        last = chunk({}, finish)
        last["usage"] = {
            "completion_tokens": len(texts), "prompt_tokens": prompt,
            "total_tokens": prompt + len(texts),
        }  # fmt: skip
        last["timings"] = {"prompt_n": prompt, "predicted_n": len(texts)}
        events.append(last)
    return events


def llama_text(texts: list[str], finish: str | None = "stop") -> list[dict[str, Any]]:
    def chunk(text: str, reason: str | None = None) -> dict[str, Any]:
        return {
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}],
            "created": CREATED, "model": "m", "system_fingerprint": "b1", "object":
            "text_completion", "id": "cmpl-L",
        }  # fmt: skip

    events = [chunk(text) for text in texts]
    if finish is not None:
        events.append(chunk("", finish))
    return events


def vllm_text(
    texts: list[str], finish: str | None = "stop", usage: bool = False, prompt: int = 4
) -> list[dict[str, Any]]:
    def chunk(text: str, reason: str | None = None) -> dict[str, Any]:
        return {
            "id": "cmpl-v", "object": "text_completion", "created": CREATED, "model": "m",
            "choices": [{
                "index": 0, "text": text, "logprobs": None, "finish_reason": reason,
                "stop_reason": None,
            }],
        }  # fmt: skip

    events = [chunk(text) for text in texts]
    if finish is not None:
        events.append(chunk("", finish))
        if usage:
            events.append({
                "id": "cmpl-v", "object": "text_completion", "created": CREATED, "model": "m",
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt, "total_tokens": prompt + len(texts),
                    "completion_tokens": len(texts),
                },
            })  # fmt: skip
    return events


def sse(events: list[dict[str, Any]], done: bool = False, crlf: bool = False) -> bytes:
    out = b"".join(b"data: " + orjson.dumps(event) + b"\n\n" for event in events)
    if done:
        out += b"data: [DONE]\n\n"
    return out.replace(b"\n", b"\r\n") if crlf else out


def chunks(data: bytes) -> list[Any]:
    """The events of a stream the splice wrote: each `data: <one line>` and a blank line."""
    out: list[Any] = []
    for event in data.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: ") and b"\n" not in event
        payload = event[6:]
        out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    assert data.endswith(b"\n\n") or not data
    return out


def had(**fields: Any) -> Broken:
    base: dict[str, Any] = {
        "id": "chatcmpl-v1", "created": CREATED, "model": "m", "system_fingerprint": None,
        "object": "chat.completion.chunk", "text": "Hello", "tokens": 2, "finish_reason": None,
        "role_sent": True, "usage": None,
    }  # fmt: skip
    base.update(fields)
    return Broken(**base)


# -- broken: what the client has -------------------------------------------------------------


def test_a_vllm_stream_read_back():
    got = broken(sse(vllm_chat(["Hel", "lo", " wo"], finish=None)), chat=True)
    assert got == Broken(
        id="chatcmpl-v1", created=CREATED, model="m", system_fingerprint=None,
        object="chat.completion.chunk", text="Hello wo", tokens=3, finish_reason=None,
        role_sent=True, usage=None,
    )  # fmt: skip


def test_continuous_usage_counts_tokens_not_chunks():
    events = vllm_chat(["Hel", "lo"], finish=None, continuous=True, prompt=7)
    events[2]["usage"]["completion_tokens"] = 5  # a chunk of several tokens (speculative)
    got = broken(sse(events), chat=True)
    assert got is not None and got.tokens == 5
    assert got.usage == {"prompt_tokens": 7, "total_tokens": 9, "completion_tokens": 5}


def test_chunks_with_text_after_the_last_usage_count_one_each():
    # A first host with continuous usage, a second (spliced) one without: both counted.
    events = vllm_chat(["a", "b"], finish=None, continuous=True)
    events += [{"id": "x", "choices": [{"index": 0, "delta": {"content": "c"}}]}] * 2
    got = broken(sse(events), chat=True)
    assert got is not None and (got.tokens, got.text) == (4, "abcc")


def test_an_sglang_stream_and_its_null_fields():
    got = broken(sse(sglang_chat(["x", "y"], finish=None)), chat=True)
    assert got is not None
    assert (got.id, got.text, got.tokens, got.role_sent) == ("sg-1", "xy", 2, True)
    assert got.usage is None and got.finish_reason is None


def test_a_llama_cpp_stream_keeps_its_fingerprint_and_object():
    got = broken(sse(llama_chat(["Hi", " there"], finish=None)), chat=True)
    assert got is not None
    assert (got.id, got.model, got.system_fingerprint) == (
        "chatcmpl-L", "gpt-oss:20b", "b6097-9515c613",
    )  # fmt: skip
    assert (got.text, got.tokens, got.object) == ("Hi there", 2, "chat.completion.chunk")


def test_the_first_chunk_names_the_stream():
    # SGLang stamps each chunk with its own time; an id is the first one's all the same.
    events = sglang_chat(["a", "b"], finish=None)
    events[1]["created"], events[2]["created"], events[2]["id"] = CREATED + 1, CREATED + 2, "x"
    got = broken(sse(events), chat=True)
    assert got is not None and (got.id, got.created) == ("sg-1", CREATED)


def test_a_finished_choice_is_reported():
    got = broken(sse(vllm_chat(["a"], finish="length", usage=True)), chat=True)
    assert got is not None and got.finish_reason == "length"
    assert got.usage is not None and got.usage["completion_tokens"] == 1


def test_completions_read_back():
    got = broken(sse(llama_text(["Once", " upon"], finish=None)), chat=False)
    assert got is not None
    assert (got.id, got.object, got.text, got.tokens) == (
        "cmpl-L",
        "text_completion",
        "Once upon",
        2,
    )
    assert not got.role_sent
    got = broken(sse(vllm_text(["a"], finish=None)), chat=False)
    assert got is not None and got.text == "a"


def test_crlf_comments_and_event_lines_are_read():
    data = b": ping\r\n\r\nevent: message\r\n" + sse(vllm_chat(["é", "!"], finish=None), crlf=True)
    got = broken(data, chat=True)
    assert got is not None and got.text == "é!"


def test_a_comment_the_client_holds_whole_and_trailing_whitespace_are_fine():
    data = sse(vllm_chat(["a"], finish=None))
    assert broken(data + b": ping\n", chat=True) is not None
    assert broken(data + b"\r", chat=True) is not None
    assert broken(data + b"\n\n", chat=True) is not None


def test_multi_line_data_joins():
    data = b'data: {"id": "a",\ndata: "choices": [{"index": 0, "delta": {"content": "z"}}]}\n\n'
    got = broken(data, chat=True)
    assert got is not None and got.text == "z"


CALL = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}
NOT_CONTINUABLE = {
    "nothing yet": b"",
    "only comments": b": ping\n\n",
    "no id": b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n',
    "n > 1": sse([{"id": "a", "choices": [{"index": 1, "delta": {"content": "b"}}]}]),
    "tool calls": sse([{"id": "a", "choices": [{"index": 0, "delta": {"tool_calls": [CALL]}}]}]),
    "function call": sse([{"id": "a", "choices": [{"delta": {"function_call": {"name": "f"}}}]}]),
    "reasoning_content": sse([{"id": "a", "choices": [{"delta": {"reasoning_content": "hm"}}]}]),
    "reasoning": sse([{"id": "a", "choices": [{"delta": {"reasoning": "hm"}}]}]),
    "error data": sse(vllm_chat(["a"], finish=None)) + b'data: {"error": {"message": "x"}}\n\n',
    "error object": sse(vllm_chat(["a"], finish=None)) + b'data: {"object": "error"}\n\n',
    "event error": sse(vllm_chat(["a"], finish=None)) + b'event: error\ndata: {"x": 1}\n\n',
    "error field": sse(llama_chat(["a"], finish=None)) + b'error: {"code": 500}\n\n',
    "done": sse(vllm_chat(["a"]), done=True),
    "half a line": sse(vllm_chat(["a"], finish=None)) + b'data: {"id": "chatcmpl-v1", "cho',
    "a line without its blank line": sse(vllm_chat(["a"], finish=None))
    + b'data: {"id": "chatcmpl-v1", "choices": []}\n',
    "an event line without its data": sse(vllm_chat(["a"], finish=None)) + b"event: message\n",
    "half a comment": sse(vllm_chat(["a"], finish=None)) + b": pi",
    "bad json": b'data: {"id": "a", \n\n',
    "bad utf-8": b'data: {"id": "a\xc3"}\n\n',
    "not an object": sse(vllm_chat(["a"], finish=None)) + b"data: [1]\n\n",
    "a choice not an object": b'data: {"id": "a", "choices": [3]}\n\n',
}


@pytest.mark.parametrize("data", NOT_CONTINUABLE.values(), ids=NOT_CONTINUABLE.keys())
def test_what_cannot_be_continued(data: bytes):
    assert broken(data, chat=True) is None


def test_sglang_s_null_tool_and_reasoning_fields_are_no_tool_call():
    events = sglang_chat(["a"], finish=None)
    events[1]["choices"][0]["delta"]["tool_calls"] = []
    events[1]["choices"][0]["delta"]["reasoning_content"] = ""
    assert broken(sse(events), chat=True) is not None


# -- continuation_body -----------------------------------------------------------------------

USER = {"role": "user", "content": "Say hello"}


def body(doc: dict[str, Any], h: Broken | None = None, chat: bool = True) -> Any:
    out = continuation_body(doc, h or had(), chat)
    return None if out is None else orjson.loads(out)


def test_chat_continues_a_new_final_assistant_message():
    doc = {
        "model": "m", "stream": True, "messages": [USER], "max_tokens": 10,
        "stream_options": {"include_usage": True}, "temperature": 0.2,
    }  # fmt: skip
    assert body(doc) == {
        "model": "m", "stream": True,
        "messages": [USER, {"role": "assistant", "content": "Hello"}],
        "max_tokens": 8, "stream_options": {"include_usage": True}, "temperature": 0.2,
        "continue_final_message": True, "add_generation_prompt": False,
    }  # fmt: skip
    assert doc["messages"] == [USER] and doc["max_tokens"] == 10  # the client's doc untouched


def test_chat_extends_the_client_s_own_prefill():
    prefill = {"role": "assistant", "content": "Sure: ", "name": "bot"}
    doc = {"messages": [USER, prefill], "continue_final_message": True}
    got = body(doc)
    assert got["messages"] == [USER, {"role": "assistant", "content": "Sure: Hello", "name": "bot"}]
    assert got["continue_final_message"] is True and got["add_generation_prompt"] is False
    # llama.cpp's prefill: no flags sent, the final assistant message is continued all the same.
    assert body({"messages": [USER, prefill]})["messages"][-1]["content"] == "Sure: Hello"


@pytest.mark.parametrize(
    "doc",
    [
        {"messages": [USER, {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]},
        {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": []}]},
        {"messages": [USER, {"role": "assistant", "content": "a"}], "add_generation_prompt": True},
        {
            "messages": [USER, {"role": "assistant", "content": "a"}],
            "continue_final_message": False,
        },
        {"messages": []},
        {"messages": "hi"},
        {},
    ],
)
def test_chat_messages_that_cannot_be_continued(doc: dict[str, Any]):
    assert continuation_body(doc, had(), chat=True) is None


def test_no_text_yet_sends_the_client_s_body():
    doc = {"messages": [USER], "max_completion_tokens": 5}
    assert body(doc, had(text="", tokens=0)) == doc


def test_limits_are_lowered_by_what_was_spent():
    h = had(tokens=3)
    assert body({"messages": [USER], "max_completion_tokens": 4}, h)["max_completion_tokens"] == 1
    both = body({"messages": [USER], "max_tokens": 9, "max_completion_tokens": 5}, h)
    assert (both["max_tokens"], both["max_completion_tokens"]) == (6, 2)
    assert body({"messages": [USER], "n_predict": 7}, h)["n_predict"] == 4
    assert body({"messages": [USER], "n_predict": -1}, h)["n_predict"] == -1  # llama.cpp: no limit
    assert "max_tokens" not in body({"messages": [USER]}, h)
    assert body({"messages": [USER], "max_tokens": None}, h)["max_tokens"] is None


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens", "n_predict"])
def test_nothing_left_to_generate(key: str):
    assert continuation_body({"messages": [USER], key: 3}, had(tokens=3), chat=True) is None
    assert continuation_body({"prompt": "a", key: 2}, had(tokens=3), chat=False) is None


def test_n_and_echo():
    assert body({"messages": [USER], "n": 1}) is not None
    assert body({"messages": [USER], "n": None}) is not None
    assert body({"messages": [USER], "n": 2}) is None
    assert body({"prompt": "a", "echo": True}, chat=False) is None
    assert body({"prompt": "a", "echo": False}, chat=False) is not None


@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": {}}},
        {"guided_json": {"type": "object"}},
        {"structured_outputs": {"regex": "a+"}},
        {"grammar": "root ::= 'a'"},
        {"json_schema": {}},
    ],
)
def test_constrained_decoding_is_not_continued(extra: dict[str, Any]):
    assert body({"messages": [USER], **extra}) is None
    assert body({"messages": [USER], "response_format": {"type": "text"}}) is not None


def test_completions_append_the_answer_to_the_prompt():
    doc = {"model": "m", "prompt": "Once", "max_tokens": 5, "stream": True}
    got = body(doc, had(text=" upon", tokens=1, object="text_completion"), chat=False)
    assert got == {"model": "m", "prompt": "Once upon", "max_tokens": 4, "stream": True}
    assert body({"prompt": ["a", "b"]}, chat=False) is None
    assert body({"prompt": [1, 2, 3]}, chat=False) is None
    assert body({}, chat=False) is None


def test_non_ascii_survives_the_body():
    got = body({"messages": [USER]}, had(text="héllo 🙂"))
    assert got["messages"][-1]["content"] == "héllo 🙂"


# -- closing ---------------------------------------------------------------------------------


def test_closing_a_chat_stream():
    out = closing(
        had(system_fingerprint="fp"), chat=True, finish_reason="length", include_usage=False
    )
    assert chunks(out) == [
        {
            "id": "chatcmpl-v1", "object": "chat.completion.chunk", "created": CREATED,
            "model": "m", "system_fingerprint": "fp",
            "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
        },
        "[DONE]",
    ]  # fmt: skip


def test_closing_with_usage_takes_the_prompt_from_the_last_usage_seen():
    h = had(tokens=4, usage={"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13})
    usage = chunks(closing(h, chat=True, finish_reason="length", include_usage=True))[1]
    assert usage["choices"] == [] and "system_fingerprint" not in usage
    assert usage["usage"] == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    unknown = chunks(closing(had(tokens=4), chat=True, finish_reason="length", include_usage=True))
    assert unknown[1]["usage"] == {"prompt_tokens": 0, "completion_tokens": 4, "total_tokens": 4}


def test_closing_a_completions_stream():
    h = had(id="cmpl-1", object="text_completion")
    got = chunks(closing(h, chat=False, finish_reason="length", include_usage=False))
    assert got[0]["object"] == "text_completion"
    assert got[0]["choices"] == [
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
    ]
    assert got[1] == "[DONE]"


def test_a_closed_stream_reads_back_as_finished():
    first = sse(vllm_chat(["a", "b"], finish=None))
    h = broken(first, chat=True)
    assert h is not None
    end = closing(h, chat=True, finish_reason="length", include_usage=True)
    assert end.endswith(b"data: [DONE]\n\n")
    again = broken(first + end[: -len(b"data: [DONE]\n\n")], chat=True)
    assert again is not None and again.finish_reason == "length" and again.tokens == 2


# -- Splice ----------------------------------------------------------------------------------


def splice(data: bytes, h: Broken, chat: bool = True) -> tuple[Splice, bytes]:
    s = Splice(h, chat)
    return s, s.feed(data) + s.end()


def test_a_vllm_continuation_becomes_the_client_s_stream():
    h = had(id="chatcmpl-first", created=1, model="client-model", tokens=2)
    s, out = splice(sse(vllm_chat([" wor", "ld"], usage=True, prompt=14), done=True), h)
    got = chunks(out)
    assert got == [
        {
            "id": "chatcmpl-first", "object": "chat.completion.chunk", "created": 1,
            "model": "client-model",
            "choices": [{"index": 0, "delta": {"content": " wor"}, "logprobs": None,
                         "finish_reason": None}],
        },
        {
            "id": "chatcmpl-first", "object": "chat.completion.chunk", "created": 1,
            "model": "client-model",
            "choices": [{"index": 0, "delta": {"content": "ld"}, "logprobs": None,
                         "finish_reason": None}],
        },
        {
            "id": "chatcmpl-first", "object": "chat.completion.chunk", "created": 1,
            "model": "client-model",
            "choices": [{"index": 0, "delta": {"content": ""}, "logprobs": None,
                         "finish_reason": "stop"}],
        },
        {
            "id": "chatcmpl-first", "object": "chat.completion.chunk", "created": 1,
            "model": "client-model", "choices": [],
            "usage": {"prompt_tokens": 12, "total_tokens": 16, "completion_tokens": 4},
        },
        "[DONE]",
    ]  # fmt: skip
    assert s.done and not s.failed and s.text == " world" and s.finish_reason == "stop"


def test_continuous_usage_is_billed_on_every_chunk():
    s, out = splice(sse(vllm_chat(["x"], continuous=True, prompt=12), done=True), had(tokens=2))
    usages = [c["usage"] for c in chunks(out)[:-1]]
    assert usages == [
        {"prompt_tokens": 10, "total_tokens": 12, "completion_tokens": 2},  # the role chunk
        {"prompt_tokens": 10, "total_tokens": 13, "completion_tokens": 3},
        {"prompt_tokens": 10, "total_tokens": 13, "completion_tokens": 3},
    ]
    assert "role" not in chunks(out)[0]["choices"][0]["delta"]


def test_prompt_tokens_are_floored_at_zero():
    s, out = splice(sse(vllm_chat(["x"], usage=True, prompt=1)), had(tokens=5))
    assert chunks(out)[-1]["usage"] == {
        "prompt_tokens": 0, "total_tokens": 6, "completion_tokens": 6,
    }  # fmt: skip


def test_an_sglang_continuation():
    s, out = splice(sse(sglang_chat(["x", "ÿ"], usage=True), done=True), had(tokens=3))
    got = chunks(out)
    assert [c["choices"][0]["delta"]["content"] for c in got[:2]] == ["x", "ÿ"]
    assert got[0]["choices"][0]["delta"]["role"] is None  # SGLang's null: left as it came
    assert got[2]["choices"][0]["finish_reason"] == "stop"
    assert got[3]["usage"] == {
        "prompt_tokens": 7, "total_tokens": 12, "completion_tokens": 5,
        "prompt_tokens_details": None,
    }  # fmt: skip
    assert got[-1] == "[DONE]" and len(got) == 5 and s.text == "xÿ"
    assert all(c["id"] == "chatcmpl-v1" for c in got[:-1])


def test_a_llama_cpp_continuation_keeps_its_key_order():
    h = had(system_fingerprint=None)
    s, out = splice(sse(llama_chat(["a"], prompt=20), done=True), h)
    got = chunks(out)
    assert list(got[0]) == ["choices", "created", "id", "model", "object"]
    assert got[0]["choices"] == [{"finish_reason": None, "index": 0, "delta": {"content": "a"}}]
    assert got[1]["usage"] == {"completion_tokens": 3, "prompt_tokens": 18, "total_tokens": 21}
    assert got[1]["timings"] == {"prompt_n": 20, "predicted_n": 1}
    assert len(got) == 3 and s.done


def test_the_fingerprint_is_the_client_s():
    h = had(system_fingerprint="fp-first")
    got = chunks(splice(sse(llama_chat(["a"])), h)[1])
    assert {c["system_fingerprint"] for c in got} == {"fp-first"}
    got = chunks(splice(sse(vllm_chat(["a"])), h)[1])  # vLLM leaves it out: set all the same
    assert {c["system_fingerprint"] for c in got} == {"fp-first"}
    assert list(got[0])[-1] == "system_fingerprint"


def test_the_role_passes_when_the_client_has_none_yet():
    got = chunks(splice(sse(vllm_chat(["a"])), had(role_sent=False, text=""))[1])
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "role" not in got[1]["choices"][0]["delta"]


def test_a_choice_index_is_zero_and_logprobs_keep_a_chunk():
    event = {
        "id": "x", "choices": [{"index": 3, "delta": {}, "logprobs": {"content": []},
                                "finish_reason": None}],
    }  # fmt: skip
    got = chunks(splice(sse([event]), had())[1])
    assert got[0]["choices"][0]["index"] == 0


def test_chunks_with_nothing_to_say_are_dropped():
    empty: list[dict[str, Any]] = [
        {"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {"id": "x", "choices": [{"index": 0, "delta": {"content": None}}]},
        {"id": "x", "choices": []},
        {"id": "x", "choices": [{"index": 0, "delta": {"tool_calls": []}, "logprobs": None}]},
        {"id": "x"},
    ]
    assert splice(sse(empty), had())[1] == b""
    text_empty = [{"id": "x", "choices": [{"index": 0, "text": "", "finish_reason": None}]}]
    assert splice(sse(text_empty), had(object="text_completion"), chat=False)[1] == b""


def test_completions_continuations():
    h = had(id="cmpl-first", object="text_completion", text="Once", tokens=1)
    s, out = splice(sse(vllm_text([" upon", " a"], usage=True), done=True), h, chat=False)
    got = chunks(out)
    assert [c["choices"][0]["text"] for c in got[:3]] == [" upon", " a", ""]
    assert got[3]["usage"] == {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3}
    assert all(c["id"] == "cmpl-first" and c["object"] == "text_completion" for c in got[:-1])
    assert s.text == " upon a" and s.done
    s, out = splice(sse(llama_text([" time"]), done=True), h, chat=False)
    assert s.text == " time" and len(chunks(out)) == 3


def test_crlf_and_comments_from_the_host():
    data = b": ping\r\n\r\n" + sse(vllm_chat(["a"]), done=True, crlf=True) + b": bye\r\n\r\n"
    s, out = splice(data, had())
    assert b"\r" not in out and b": " not in out.replace(b"data: ", b"")
    assert len(chunks(out)) == 3 and s.done


def test_done_passes_once_and_nothing_after_it():
    data = sse(vllm_chat(["a"]), done=True) + b"data: [DONE]\n\n" + sse(vllm_chat(["b"]))
    s, out = splice(data, had())
    assert out.count(b"[DONE]") == 1 and out.endswith(b"data: [DONE]\n\n")
    assert s.text == "a" and s.feed(b"data: [DONE]\n\n") == b"" and s.end() == b""


ERRORS = {
    "data error": b'data: {"error": {"message": "boom", "code": 500}}\n\n',
    "vllm's old error object": b'data: {"object": "error", "message": "boom"}\n\n',
    "event error": b'event: error\ndata: {"message": "boom"}\n\n',
    "llama.cpp's error field": b'error: {"code": 500, "message": "boom"}\n\n',
    "bad json": b"data: {oops\n\n",
    "not an object": b'data: "text"\n\n',
}


@pytest.mark.parametrize("error", ERRORS.values(), ids=ERRORS.keys())
def test_an_error_from_the_host_stops_the_splice(error: bytes):
    before = sse(vllm_chat(["a"], finish=None))
    s = Splice(had(), chat=True)
    out = s.feed(before + error + sse(vllm_chat(["b"]), done=True))
    assert s.failed and not s.done and s.text == "a"
    assert chunks(out) == chunks(splice(before, had())[1])
    assert s.feed(b"data: [DONE]\n\n") == b"" and s.end() == b""


def test_an_event_past_the_bound_fails():
    s = Splice(had(), chat=True, max_event=64)
    assert s.feed(b"data: " + b"x" * 100) == b"" and s.failed
    s = Splice(had(), chat=True, max_event=64)
    assert s.feed(b"data: " + b"x" * 30 + b"\ndata: " + b"y" * 40 + b"\n") == b"" and s.failed
    s = Splice(had(), chat=True, max_event=64)
    s.feed(b"data: " + b"x" * 40)
    s.feed(b"x" * 40)
    assert s.failed


def test_end_passes_a_last_event_without_its_blank_line():
    data = sse(vllm_chat(["a"]))
    s = Splice(had(), chat=True)
    out = s.feed(data + b"data: [DONE]")
    assert not s.done
    assert s.end() == b"data: [DONE]\n\n" and s.done
    assert len(chunks(out)) == 2
    s = Splice(had(), chat=True)
    s.feed(b'data: {"id": "x", "choi')
    assert s.end() == b"" and s.failed  # half an event at the end of the body


def test_a_body_that_ends_early_is_neither_done_nor_failed():
    s, out = splice(sse(vllm_chat(["a", "b"], finish=None)), had())
    assert not s.done and not s.failed and s.finish_reason is None and s.text == "ab"


STREAM = (
    sse(vllm_chat(["Grüße", " 🙂", " ok"], usage=True, continuous=True), done=True)
    .replace(b"\n\n", b"\r\n\r\n", 2)
    .replace(b"data: {", b": keep\n\ndata: {", 1)
)


def test_bytes_split_anywhere_splice_alike():
    whole = splice(STREAM, had())[1]
    assert "Grüße".encode() in whole and "🙂".encode() in whole  # orjson writes UTF-8
    one = Splice(had(), chat=True)
    assert b"".join(one.feed(STREAM[i : i + 1]) for i in range(len(STREAM))) + one.end() == whole
    for cut in range(len(STREAM) + 1):
        two = Splice(had(), chat=True)
        assert two.feed(STREAM[:cut]) + two.feed(STREAM[cut:]) + two.end() == whole
    rng = random.Random(18)
    for _ in range(50):
        s, at, pieces = Splice(had(), chat=True), 0, []
        while at < len(STREAM):
            step = rng.randint(1, 40)
            pieces.append(s.feed(STREAM[at : at + step]))
            at += step
        assert b"".join(pieces) + s.end() == whole
        assert s.text == "Grüße 🙂 ok"


def test_every_feed_returns_whole_events():
    s = Splice(had(), chat=True)
    for i in range(len(STREAM)):
        out = s.feed(STREAM[i : i + 1])
        assert out == b"" or (out.startswith(b"data: ") and out.endswith(b"\n\n"))
        out.decode()  # never half a UTF-8 sequence


def test_the_text_accumulates_without_rejoining_every_piece():
    s = Splice(had(), chat=True)
    for i in range(1000):
        s.feed(sse([{"id": "x", "choices": [{"index": 0, "delta": {"content": str(i % 10)}}]}]))
        if i % 100 == 0:
            assert len(s.text) == i + 1
    assert s.text == "0123456789" * 100


# -- a second break: the client's whole stream read back ------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (vllm_chat(["Hel", "lo"], finish=None), vllm_chat([" wor", "ld"], usage=True)),
        (
            vllm_chat(["Hel", "lo"], finish=None, continuous=True),
            vllm_chat([" wor", "ld"], continuous=True, prompt=12),
        ),
        (vllm_chat(["Hel", "lo"], finish=None, continuous=True), sglang_chat([" wor", "ld"])),
        (llama_chat(["Hel", "lo"], finish=None), sglang_chat([" wor", "ld"])),
        (sglang_chat(["Hel", "lo"], finish=None), llama_chat([" wor", "ld"])),
    ],
)
def test_a_spliced_stream_reads_back_whole(first: list[Any], second: list[Any]):
    client = sse(first)
    h = broken(client, chat=True)
    assert h is not None and h.text == "Hello" and h.tokens == 2
    # The second host breaks before its finish: what the client got reads back as one answer.
    s = Splice(h, chat=True)
    client += s.feed(sse(second[:3]))
    again = broken(client, chat=True)
    assert again is not None
    assert (again.id, again.text, again.tokens) == (h.id, "Hello world", 4)
    assert again.role_sent and again.finish_reason is None
    # And a third host continues from there.
    third = Splice(again, chat=True)
    client += third.feed(sse(vllm_chat(["!"], usage=True, prompt=15), done=True))
    assert third.done and third.text == "!"
    final = chunks(client)
    assert final[-2]["usage"] == {"prompt_tokens": 11, "total_tokens": 16, "completion_tokens": 5}
    assert {c["id"] for c in final[:-1]} == {h.id}
    roles = [c for c in final[:-1] if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert len(roles) == 1


def test_a_spliced_completions_stream_reads_back_whole():
    client = sse(vllm_text(["Once", " upon"], finish=None))
    h = broken(client, chat=False)
    assert h is not None
    client += Splice(h, chat=False).feed(sse(llama_text([" a", " time"], finish=None)))
    again = broken(client, chat=False)
    assert again is not None and (again.text, again.tokens) == ("Once upon a time", 4)
    assert again.system_fingerprint is None and again.id == "cmpl-v"


def test_a_splice_that_failed_leaves_a_stream_that_reads_back():
    client = sse(vllm_chat(["a"], finish=None))
    h = broken(client, chat=True)
    assert h is not None
    s = Splice(h, chat=True)
    client += s.feed(sse(vllm_chat(["b"], finish=None)) + ERRORS["data error"])
    assert s.failed
    again = broken(client, chat=True)
    assert again is not None and again.text == "ab"
