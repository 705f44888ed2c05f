"""The official `openai` Python client against colocate serve: completions, chat (plain and
streamed), embeddings with the client's defaults (it asks for base64), and the client's error
types on bad input. Run by crates/colocate/tests/python_clients.rs with the interpreter of
.venv (scripts/setup-python.sh). One line per check, then `N passed, M failed`.

    python openai_clients.py --gen URL --gen-model NAME --embed URL --embed-model NAME
"""

import argparse
import json
import math
import sys

import openai

results = []


def check(name):
    def wrap(fn):
        try:
            detail = fn() or ""
            results.append(True)
            print(f"PASS {name}: {detail}", flush=True)
        except Exception as e:  # noqa: BLE001 - any failure is reported, not raised
            results.append(False)
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        return fn

    return wrap


def need(cond, msg):
    if not cond:
        raise AssertionError(msg)


def error_body(e):
    """The OpenAI error object of an APIStatusError, checked for its four keys."""
    body = e.response.json()
    err = body.get("error")
    need(isinstance(err, dict), f"no error object in {body}")
    for k in ("message", "type", "param", "code"):
        need(k in err, f"error body lacks {k}: {body}")
    return err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gen", required=True)
    ap.add_argument("--gen-model", required=True)
    ap.add_argument("--embed", required=True)
    ap.add_argument("--embed-model", required=True)
    a = ap.parse_args()
    print(f"openai {openai.__version__}", flush=True)
    # no retries: every answer is the server's own
    gen = openai.OpenAI(base_url=a.gen + "/v1", api_key="unused", max_retries=0, timeout=60)
    emb = openai.OpenAI(base_url=a.embed + "/v1", api_key="unused", max_retries=0, timeout=60)
    gm, em = a.gen_model, a.embed_model

    @check("models.list")
    def _():
        ids = [m.id for m in gen.models.list()]
        need(gm in ids, f"{gm} not in {ids}")
        return str(ids)

    @check("completions.create")
    def _():
        r = gen.completions.create(model=gm, prompt="Hello, my name is", max_tokens=5,
                                   temperature=0, extra_body={"ignore_eos": True})
        need(len(r.choices) == 1 and isinstance(r.choices[0].text, str), r)
        need(r.choices[0].finish_reason == "length", r.choices[0].finish_reason)
        need(r.usage.completion_tokens == 5, r.usage)
        need(r.usage.prompt_tokens > 0, r.usage)
        return repr(r.choices[0].text)

    @check("completions.create, streamed with usage")
    def _():
        chunks = list(gen.completions.create(model=gm, prompt="Once upon a time", max_tokens=6,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        usage = [c.usage for c in chunks if c.usage]
        need(usage and usage[-1].completion_tokens == 6, f"usage {usage}")
        return f"{len(chunks)} chunks, {text!r}"

    @check("chat.completions.create")
    def _():
        r = gen.chat.completions.create(model=gm, messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hi."},
        ], max_tokens=5, extra_body={"ignore_eos": True})
        m = r.choices[0].message
        need(m.role == "assistant" and isinstance(m.content, str), m)
        need(r.usage.completion_tokens == 5, r.usage)
        return repr(m.content)

    @check("chat.completions.create, streamed")
    def _():
        stream = gen.chat.completions.create(model=gm, messages=[{"role": "user", "content": "Count."}],
                                             max_tokens=6, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
        parts, roles, finish, usage = [], set(), None, None
        for c in stream:
            if c.usage:
                usage = c.usage
            for ch in c.choices:
                if ch.delta.role:
                    roles.add(ch.delta.role)
                if ch.delta.content:
                    parts.append(ch.delta.content)
                finish = ch.finish_reason or finish
        need(roles == {"assistant"}, f"roles {roles}")
        need(finish == "length", f"finish_reason {finish}")
        need(usage is not None and usage.completion_tokens == 6, f"usage {usage}")
        return f"{len(parts)} deltas, {''.join(parts)!r}"

    @check("embeddings.create with the client's defaults (base64 on the wire)")
    def _():
        raw = emb.embeddings.with_raw_response.create(model=em, input=["The cat sat.", "A dog ran."])
        sent = json.loads(raw.http_request.content)
        need(sent.get("encoding_format") == "base64", f"the client sent {sent}")
        wire = raw.http_response.json()
        need(isinstance(wire["data"][0]["embedding"], str), "the server did not answer base64")
        r = raw.parse()
        need(len(r.data) == 2, r)
        v = r.data[0].embedding
        need(len(v) > 0 and all(isinstance(x, float) for x in v), "not floats")
        norm = math.sqrt(sum(x * x for x in v))
        need(0.99 < norm < 1.01, f"norm {norm}")
        f = emb.embeddings.create(model=em, input=["The cat sat.", "A dog ran."], encoding_format="float")
        for a_, b_ in zip(r.data, f.data):
            need(len(a_.embedding) == len(b_.embedding), "base64 and float differ in size")
            need(max(abs(x - y) for x, y in zip(a_.embedding, b_.embedding)) < 1e-6,
                 "base64 and float differ")
        need(r.usage.prompt_tokens > 0, r.usage)
        return f"{len(v)} dims, equal to encoding_format=float"

    @check("embeddings.create, one string")
    def _():
        r = emb.embeddings.create(model=em, input="hello")
        need(len(r.data) == 1 and r.data[0].index == 0, r)
        return f"{len(r.data[0].embedding)} dims"

    def expect_error(cls, status, fn):
        try:
            fn()
        except cls as e:
            need(e.status_code == status, f"status {e.status_code}")
            err = error_body(e)
            return f"{cls.__name__} {status}: {err['message'][:80]}"
        raise AssertionError(f"no {cls.__name__} raised")

    @check("BadRequestError: chat with top_p = 2")
    def _():
        return expect_error(openai.BadRequestError, 400, lambda: gen.chat.completions.create(
            model=gm, messages=[{"role": "user", "content": "hi"}], top_p=2))

    @check("BadRequestError: streamed chat with temperature = -1")
    def _():
        return expect_error(openai.BadRequestError, 400, lambda: list(gen.chat.completions.create(
            model=gm, messages=[{"role": "user", "content": "hi"}], temperature=-1, stream=True)))

    @check("BadRequestError: embeddings of an empty list")
    def _():
        return expect_error(openai.BadRequestError, 400, lambda: emb.embeddings.create(
            model=em, input=[], encoding_format="float"))

    @check("NotFoundError: unknown model (completions)")
    def _():
        return expect_error(openai.NotFoundError, 404, lambda: gen.completions.create(
            model="no-such-model", prompt="hi", max_tokens=2))

    @check("NotFoundError: unknown model (chat)")
    def _():
        return expect_error(openai.NotFoundError, 404, lambda: gen.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]))

    @check("NotFoundError: unknown model (embeddings)")
    def _():
        return expect_error(openai.NotFoundError, 404, lambda: emb.embeddings.create(
            model="no-such-model", input="hi"))

    @check("BadRequestError: max_tokens beyond the model length")
    def _():
        return expect_error(openai.BadRequestError, 400, lambda: gen.completions.create(
            model=gm, prompt="hi", max_tokens=10 ** 12))

    @check("BadRequestError: chat with max_tokens beyond the model length")
    def _():
        return expect_error(openai.BadRequestError, 400, lambda: gen.chat.completions.create(
            model=gm, messages=[{"role": "user", "content": "hi"}], max_tokens=10 ** 12))

    @check("still serving after the errors")
    def _():
        r = gen.completions.create(model=gm, prompt="ok", max_tokens=2)
        need(len(r.choices) == 1, r)
        return "200"

    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed", flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
