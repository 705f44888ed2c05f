#!/usr/bin/env python3
"""A sweep of hostile requests against running OpenAI-compatible servers (colocate serve or
its gateway). Starts nothing: give it the base URLs of a generator and/or an embedder.

    scripts/hostile-sweep.py --gen http://127.0.0.1:8100 --embed http://127.0.0.1:8200

Every answer must be a 4xx with an OpenAI error body
{"error": {"message", "type", "param", "code"}} (with the status the case names, vLLM's:
400 for bad fields and for prompt + max_tokens beyond the model length, 404 for unknown
models and routes, 405 for a wrong method, 413 for an oversized body) or, where the case
allows it, a valid success. Never a 5xx, a dropped connection or a hang. Connection abuse
(idle connections, slow senders, clients that disconnect mid-stream) must leave the server
answering. The sweep ends by checking that the servers are alive (a normal request works)
and, on /metrics, that their KV accounting is whole: no KV blocks used, nothing running or
waiting.

One line per case, then `N passed, M failed`; exit status 1 when any case failed.
Python 3 standard library only.
"""

import argparse
import base64
import json
import socket
import struct
import sys
import threading
import time
import urllib.parse

REQUEST_TIMEOUT = 30.0  # seconds for any one answer

# --------------------------------------------------------------------------- HTTP, raw


class Resp:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name):
        return self.headers.get(name.lower(), "")

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def short(self, n=200):
        t = self.body[:n].decode("utf-8", "replace").replace("\n", "\\n")
        return f"{self.status} {t!r}"


class Dropped(Exception):
    """The server closed the connection without an answer."""


class Fail(Exception):
    """A case's answer was wrong."""


DOWN = {}  # base URL -> the case suspected of taking it down, once it refuses connections
LAST = {}  # base URL -> the last case it accepted a connection in
DROPPED = {}  # base URL -> the first case whose connection it dropped without an answer
CURRENT = [""]  # the case running now


def connect(base, timeout=REQUEST_TIMEOUT):
    u = urllib.parse.urlsplit(base)
    try:
        s = socket.create_connection((u.hostname, u.port or 80), timeout=timeout)
    except ConnectionRefusedError:
        since = DOWN.setdefault(base, DROPPED.get(base, LAST.get(base, "?")))
        raise Fail(f"connection refused: {base} is down (suspect: case {since!r})")
    LAST[base] = CURRENT[0]
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def head_bytes(base, method, path, length, ctype="application/json", extra=()):
    u = urllib.parse.urlsplit(base)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {u.hostname}:{u.port}", "Connection: close"]
    if ctype is not None:
        lines.append(f"Content-Type: {ctype}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_response(s, deadline):
    """Reads one response (Content-Length, chunked or until close)."""
    buf = b""

    def more():
        nonlocal buf
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no complete answer within the time limit")
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            chunk = b""
        buf += chunk
        return bool(chunk)

    while b"\r\n\r\n" not in buf:
        if not more():
            raise Dropped(f"connection closed before a response ({len(buf)} bytes: {buf[:80]!r})")
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise Dropped(f"bad status line {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    buf = rest
    if "chunked" in headers.get("transfer-encoding", ""):
        body = b""
        while True:
            while b"\r\n" not in buf:
                if not more():
                    raise Dropped("connection closed inside a chunked body")
            size_line, _, buf = buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            while len(buf) < size + 2:
                if not more():
                    raise Dropped("connection closed inside a chunk")
            body += buf[:size]
            buf = buf[size + 2:]
            if size == 0:
                return Resp(status, headers, body)
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(buf) < n:
            if not more():
                raise Dropped("connection closed before the end of the body")
        return Resp(status, headers, buf[:n])
    while more():
        pass
    return Resp(status, headers, buf)


def request(base, method, path, body=None, ctype="application/json", extra=(), timeout=REQUEST_TIMEOUT):
    """One request on its own connection. `body` is bytes, str or a JSON-able object."""
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode("utf-8")
    deadline = time.monotonic() + timeout
    s = connect(base, timeout)
    try:
        data = head_bytes(base, method, path, len(body) if body is not None else 0, ctype, extra)
        data += body or b""
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer early (413) and stop reading: read what it said
        try:
            return read_response(s, deadline)
        except Dropped:
            DROPPED.setdefault(base, CURRENT[0])
            raise
    finally:
        s.close()


# --------------------------------------------------------------------------- checks


def check_error_body(r, statuses):
    if r.status not in statuses:
        raise Fail(f"want status {'/'.join(map(str, sorted(statuses)))}, got {r.short()}")
    if "json" not in r.header("content-type"):
        raise Fail(f"error without a JSON content type ({r.header('content-type')!r}): {r.short()}")
    try:
        j = r.json()
    except ValueError:
        raise Fail(f"error body is not JSON: {r.short()}")
    e = j.get("error") if isinstance(j, dict) else None
    if not isinstance(e, dict):
        raise Fail(f"no {{\"error\": {{...}}}} object: {r.short()}")
    missing = [k for k in ("message", "type", "param", "code") if k not in e]
    if missing:
        raise Fail(f"error body lacks {missing}: {r.short()}")
    if not isinstance(e["message"], str) or not e["message"]:
        raise Fail(f"error.message is not a non-empty string: {r.short()}")
    if not isinstance(e["type"], str) or not e["type"]:
        raise Fail(f"error.type is not a non-empty string: {r.short()}")
    if e["param"] is not None and not isinstance(e["param"], str):
        raise Fail(f"error.param is neither null nor a string: {r.short()}")
    return e


def sse_events(r):
    text = r.body.decode("utf-8")
    if not text.endswith("\n\n"):
        raise Fail(f"stream does not end with a blank line: {text[-80:]!r}")
    events = []
    for ev in text[:-2].split("\n\n"):
        if not ev.startswith("data: "):
            raise Fail(f"SSE event without `data: `: {ev[:80]!r}")
        events.append(ev[6:])
    if events[-1] != "[DONE]":
        raise Fail(f"stream does not end with [DONE]: {events[-1][:80]!r}")
    for ev in events[:-1]:
        json.loads(ev)
    return events


def check_success(r, route):
    if r.status != 200:
        raise Fail(f"want 200, got {r.short()}")
    if "text/event-stream" in r.header("content-type"):
        sse_events(r)
        return
    try:
        j = r.json()
    except ValueError:
        raise Fail(f"success body is not JSON: {r.short()}")
    key = "data" if route.endswith("embeddings") else "choices"
    if not isinstance(j, dict) or not isinstance(j.get(key), list):
        raise Fail(f"success body has no `{key}` list: {r.short()}")


def expect(statuses=(400,), ok=False):
    """A check: an error with one of `statuses`, or (when `ok`) a valid success."""
    statuses = set(statuses)

    def check(r, route):
        if ok and r.status == 200:
            check_success(r, route)
            return "200"
        if ok and 400 <= r.status < 500:
            check_error_body(r, {r.status})
            return str(r.status)
        check_error_body(r, statuses)
        return str(r.status)

    return check


E400 = expect((400,))
ANY = expect((400,), ok=True)  # a 4xx with an error body, or a valid success

# --------------------------------------------------------------------------- the sweep


class Sweep:
    def __init__(self, budget, only=None, skip=None):
        self.only = only
        self.skip = skip
        self.passed = 0
        self.failed = 0
        self.failures = []
        self.deadline = time.monotonic() + budget

    def case(self, name, fn):
        if (self.only and self.only not in name) or (self.skip and self.skip in name):
            return
        CURRENT[0] = name
        if time.monotonic() > self.deadline:
            self.record(name, False, "not run: the sweep's time budget is spent")
            return
        t0 = time.monotonic()
        try:
            detail = fn() or ""
            ok = True
        except Fail as e:
            ok, detail = False, str(e)
        except Dropped as e:
            ok, detail = False, f"dropped: {e}"
        except (OSError, TimeoutError) as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        except Exception as e:  # a bug of the sweep or a garbled answer: a failure either way
            ok, detail = False, f"{type(e).__name__}: {e}"
        self.record(name, ok, f"{detail} ({time.monotonic() - t0:.2f}s)")

    def record(self, name, ok, detail):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            self.failures.append(name)
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def wait_ready(base, secs=120):
    t0 = time.monotonic()
    while True:
        try:
            if request(base, "GET", "/health", timeout=5).status == 200:
                return
        except (Fail, OSError, Dropped):
            pass
        if time.monotonic() - t0 > secs:
            raise SystemExit(f"hostile-sweep: {base}/health not 200 after {secs}s")
        time.sleep(0.2)


def model_info(base):
    wait_ready(base)
    r = request(base, "GET", "/v1/models")
    if r.status != 200:
        raise SystemExit(f"hostile-sweep: GET {base}/v1/models answered {r.short()}")
    cards = r.json().get("data") or []
    if not cards:
        raise SystemExit(f"hostile-sweep: {base}/v1/models lists no model")
    return cards[0]["id"], cards[0].get("max_model_len")


def body_cases(sw, base, route, tag):
    """Malformed bodies, the same for every POST route."""

    def send(body, check, ctype="application/json"):
        return lambda: check(request(base, "POST", route, body, ctype=ctype), route)

    sw.case(f"{tag} empty body", send(b"", E400))
    sw.case(f"{tag} truncated JSON", send(b'{"model": ', E400))
    sw.case(f"{tag} trailing garbage", send(b'{"model": ""} xyz', E400))
    for lit in (b"[]", b'"text"', b"42", b"null", b"true"):
        sw.case(f"{tag} JSON {lit.decode()} instead of an object", send(lit, E400))
    sw.case(f"{tag} invalid UTF-8", send(b'{"model": "\xff\xfe\xfd", "prompt": "\xc3\x28"}', E400))
    sw.case(f"{tag} NaN literal", send(b'{"temperature": NaN}', E400))
    sw.case(f"{tag} deeply nested arrays", send(b"[" * 100000 + b"]" * 100000, E400))
    sw.case(
        f"{tag} deeply nested objects in an unknown field",
        send(b'{"x": ' + b'{"a": ' * 50000 + b"1" + b"}" * 50000 + b"}", E400),
    )
    sw.case(f"{tag} text/plain body", send(b'{"model": ""}', expect((400, 415)), ctype="text/plain"))
    big = b'{"model": "", "prompt": "' + b"a " * (4 * 1024 * 1024) + b'", "input": "x"}'
    sw.case(f"{tag} 8 MB body", send(big, expect((413,))))
    sw.case(f"{tag} unknown model", send({"model": "no-such-model", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "input": "hi", "max_tokens": 2}, expect((404,))))
    sw.case(f"{tag} model of the wrong type", send({"model": 42, "prompt": "hi", "input": "hi"}, E400))


def gen_cases(sw, base, model, max_len):
    c, ch = "/v1/completions", "/v1/chat/completions"

    def post(route, body, check):
        return lambda: check(request(base, "POST", route, body), route)

    def comp(check, **fields):
        body = {"model": model, "prompt": "hello there", "max_tokens": 2}
        body.update(fields)
        return post(c, body, check)

    def chat(check, **fields):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        body.update(fields)
        return post(ch, body, check)

    body_cases(sw, base, c, "completions:")
    body_cases(sw, base, ch, "chat:")

    # missing, unknown and mistyped fields
    sw.case("completions: no prompt", post(c, {"model": model, "max_tokens": 2}, E400))
    sw.case("chat: no messages", post(ch, {"model": model, "max_tokens": 2}, E400))
    sw.case("completions: unknown field", comp(ANY, frobnicate={"x": [1, 2]}))
    sw.case("chat: unknown field", chat(ANY, frobnicate=True))
    for field, val in [
        ("prompt", 42), ("prompt", {"text": "hi"}), ("prompt", ["a", 1]), ("prompt", [1.5]),
        ("max_tokens", "ten"), ("max_tokens", 1.5), ("max_tokens", [2]),
        ("temperature", "hot"), ("top_p", "all"), ("top_k", 1.5), ("n", "1"),
        ("stream", "yes"), ("stop", 5), ("stop", [1, 2]), ("seed", "s"), ("ignore_eos", "no"),
        ("min_tokens", "one"), ("stream_options", "on"),
    ]:
        sw.case(f"completions: {field} = {json.dumps(val)}", comp(E400, **{field: val}))
    for name, msgs in [
        ("a string", "hi"), ("an empty list", []), ("a message without role", [{"content": "hi"}]),
        ("role 1", [{"role": 1, "content": "hi"}]), ("content 42", [{"role": "user", "content": 42}]),
        ("a message that is a string", ["hi"]),
    ]:
        sw.case(f"chat: messages as {name}", chat(E400, messages=msgs))
    sw.case("chat: unknown role", chat(ANY, messages=[{"role": "wizard", "content": "hi"}]))
    sw.case("chat: content as text parts", chat(ANY, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]))

    # numbers out of range: huge, negative, beyond i64, infinities
    raw_num = lambda route, base_body, field, lit: (  # noqa: E731
        lambda: E400(request(base, "POST", route, base_body[:-1] + f', "{field}": {lit}}}'.encode()), route)
    )
    comp_raw = json.dumps({"model": model, "prompt": "hello"}).encode()
    for field in ("max_tokens", "temperature", "top_p", "top_k", "n", "min_tokens", "seed"):
        for lit in ("1e999", "-1e999", "99999999999999999999999"):
            if field == "temperature" and lit[0] == "9":
                continue  # 1e23 is a finite temperature: any answer but a crash will do (below)
            sw.case(f"completions: {field} = {lit}", raw_num(c, comp_raw, field, lit))
    for val in (-1, 0, 1_000_000_000_000, -(2 ** 63)):
        check = ANY if val == 0 else E400
        sw.case(f"completions: max_tokens = {val}", comp(check, max_tokens=val))
        sw.case(f"chat: max_tokens = {val}", chat(check, max_tokens=val))
    sw.case("chat: max_completion_tokens = 10^12", chat(E400, max_completion_tokens=1_000_000_000_000))
    if max_len:
        sw.case(f"completions: prompt + max_tokens > max_model_len ({max_len})", comp(E400, max_tokens=max_len))
        sw.case("chat: prompt + max_tokens > max_model_len", chat(E400, max_tokens=max_len))
        sw.case("completions: prompt longer than the model", comp(E400, prompt="word " * (max_len * 2), max_tokens=1))
    for field, val, check in [
        ("min_tokens", -1, E400), ("min_tokens", 1_000_000_000_000, E400), ("min_tokens", 5, E400),  # > max_tokens 2
        ("n", 0, E400), ("n", -1, E400), ("n", 1_000_000, E400), ("n", 2, ANY),
        ("top_k", -2, E400), ("top_k", 10 ** 12, ANY), ("top_k", -1, ANY),
        ("top_p", 0, E400), ("top_p", -0.5, E400), ("top_p", 1.5, E400),
        ("temperature", -1, E400), ("temperature", 1e30, ANY), ("temperature", 1e300, ANY), ("temperature", 0, ANY),
        ("seed", -1, ANY), ("seed", 2 ** 64, E400),
    ]:
        sw.case(f"completions: {field} = {val}", comp(check, **{field: val}))
        sw.case(f"chat: {field} = {val}", chat(check, **{field: val}))
    sw.case("completions: stream_options without stream", comp(ANY, stream_options={"include_usage": True}))

    # prompts: empty, token ids beyond the vocabulary, lone surrogates
    for name, prompt in [
        ("empty string", ""), ("empty list", []), ("empty token list", [[]]),
        ("token id beyond the vocabulary", [999_999_999]), ("token id beyond u32", [2 ** 32]),
        ("negative token id", [-1]), ("token ids beyond the vocabulary, batched", [[1, 2], [3, 999_999_999]]),
    ]:
        sw.case(f"completions: prompt {name}", comp(E400, prompt=prompt))
    sw.case(
        "completions: lone surrogate in the prompt",
        lambda: ANY(request(base, "POST", c, b'{"prompt": "a\\ud800b", "max_tokens": 2}'), c),
    )
    sw.case("chat: empty content", chat(ANY, messages=[{"role": "user", "content": ""}]))
    sw.case("completions: 1000 prompts in one request", comp(ANY, prompt=["hi"] * 1000, max_tokens=1))

    # wrong methods, unknown routes
    for method, path in [("GET", c), ("GET", ch), ("PUT", c), ("DELETE", ch), ("POST", "/v1/models"), ("POST", "/health")]:
        sw.case(f"{method} {path}", lambda m=method, p=path: expect((405, 404))(request(base, m, p, b"" if m != "GET" else None), p))


def embed_cases(sw, base, model, max_len):
    e = "/v1/embeddings"

    def emb(check, **fields):
        body = {"model": model, "input": "hello"}
        body.update(fields)
        return lambda: check(request(base, "POST", e, body), e)

    body_cases(sw, base, e, "embeddings:")
    sw.case("embeddings: no input", lambda: E400(request(base, "POST", e, {"model": model}), e))
    sw.case("embeddings: unknown field", emb(ANY, frobnicate=1))
    for name, inp, check in [
        ("42", 42, E400), ("an empty list", [], E400), ("a list with an empty token list", [[]], E400),
        ("a mixed list", ["a", 1], E400), ("nested objects", [{"text": "a"}], E400),
        ("token id beyond the vocabulary", [[999_999_999]], E400), ("negative token id", [[-1]], E400),
        ("an empty string", "", ANY), ("100000 inputs", ["a"] * 100_000, E400),
    ]:
        sw.case(f"embeddings: input {name}", emb(check, input=inp))
    if max_len:
        # sentence-transformers truncates at the model's max_seq_length; vLLM answers 400:
        # either is fine, as long as it answers
        sw.case(f"embeddings: input longer than the model ({max_len})", emb(ANY, input="word " * (max_len * 2)))

    def base64_ok():
        r = request(base, "POST", e, {"model": model, "input": ["hello", "world"], "encoding_format": "base64"})
        check_success(r, e)
        d = r.json()["data"]
        dims = set()
        for item in d:
            raw = base64.b64decode(item["embedding"], validate=True)
            if len(raw) % 4 or not raw:
                raise Fail(f"base64 embedding of {len(raw)} bytes is not float32s")
            v = struct.unpack(f"<{len(raw) // 4}f", raw)
            if not all(x == x and abs(x) < 1e6 for x in v):
                raise Fail("base64 embedding holds NaN or huge values")
            dims.add(len(v))
        if len(d) != 2 or len(dims) != 1:
            raise Fail(f"want 2 embeddings of one size, got {len(d)} of sizes {dims}")
        return f"200, {dims.pop()} dims"

    sw.case("embeddings: encoding_format base64 (the openai client's default)", base64_ok)
    for fmt, check in [("float", ANY), ("hex", E400), (42, E400)]:
        sw.case(f"embeddings: encoding_format {json.dumps(fmt)}", emb(check, encoding_format=fmt))
    for dims, check in [(0, E400), (-1, E400), (10 ** 9, E400), ("many", E400), (1, ANY)]:
        sw.case(f"embeddings: dimensions {json.dumps(dims)}", emb(check, dimensions=dims))
    for method in ("GET", "PUT"):
        sw.case(f"{method} {e}", lambda m=method: expect((405, 404))(request(base, m, e, b"" if m != "GET" else None), e))


def route_cases(sw, base, tag):
    for path in ("/", "/v1", "/v1/nope", "/v2/completions", "/v1/completions/extra", "/" + "x" * 8000):
        sw.case(f"{tag} GET unknown route {path[:24]}", lambda p=path: expect((404, 414))(request(base, "GET", p), p))
    sw.case(f"{tag} POST unknown route", lambda: expect((404,))(request(base, "POST", "/v1/nope", {"a": 1}), "/v1/nope"))

    def protocol(raw, ok=False):
        """Bytes below HTTP's parser: a 4xx or a closed connection (or a 200 when `ok`)."""
        def run():
            s = connect(base)
            try:
                try:
                    s.sendall(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                try:
                    r = read_response(s, time.monotonic() + REQUEST_TIMEOUT)
                except Dropped:
                    return "closed"  # closing a garbled connection is a fine answer
                if not (400 <= r.status < 500 or (ok and r.status == 200)):
                    raise Fail(f"want a 4xx or a close, got {r.short()}")
                return str(r.status)
            finally:
                s.close()
        return run

    sw.case(f"{tag} garbage instead of HTTP", protocol(b"\x00\x01\x02 hello\r\n\r\n"))
    sw.case(f"{tag} bad Content-Length", protocol(head_bytes(base, "POST", "/v1/completions", None, extra=["Content-Length: abc"]) + b"{}"))
    sw.case(f"{tag} negative Content-Length", protocol(head_bytes(base, "POST", "/v1/completions", None, extra=["Content-Length: -5"]) + b"{}"))
    sw.case(f"{tag} 60 KB header", protocol(head_bytes(base, "GET", "/health", None, extra=["X-Big: " + "a" * 60000]), ok=True))
    sw.case(f"{tag} 1 MB header", protocol(head_bytes(base, "GET", "/health", None, extra=["X-Big: " + "a" * 1048576])))


# --------------------------------------------------------------------------- connections


def metrics(base):
    r = request(base, "GET", "/metrics")
    if r.status != 200:
        raise Fail(f"/metrics answered {r.short()}")
    vals = {}
    for line in r.body.decode("utf-8").splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, v = line.rpartition(" ")
        name = name.split("{")[0]
        try:
            vals.setdefault(name, float(v))
        except ValueError:
            pass
    return vals


def wait_idle(base, secs=15.0):
    """Waits until /metrics shows no KV blocks used and nothing running or waiting."""
    names = ("colocate:kv_cache_blocks_used", "colocate:num_requests_running", "colocate:num_requests_waiting")
    t0 = time.monotonic()
    while True:
        m = metrics(base)
        if "colocate:kv_cache_blocks_used" not in m:
            raise Fail("/metrics has no colocate:kv_cache_blocks_used")
        busy = {n: m[n] for n in names if m.get(n, 0) != 0}
        if not busy:
            return "KV blocks 0, nothing running or waiting"
        if time.monotonic() - t0 > secs:
            raise Fail(f"still busy after {secs:.0f}s: {busy}")
        time.sleep(0.1)


def alive(base, route, body):
    r = request(base, "POST", route, body)
    check_success(r, route)
    return "200"


def connection_cases(sw, gen, gen_model, embed, embed_model, max_len):
    normal = {"model": gen_model, "prompt": "hello", "max_tokens": 4} if gen else None
    probe_route, probe = ("/v1/completions", normal) if gen else ("/v1/embeddings", {"model": embed_model, "input": "hi"})
    target = gen or embed

    def disconnect_mid_stream(route, body, n=4):
        def run():
            socks = []
            for _ in range(n):
                s = connect(gen)
                data = json.dumps(body).encode()
                s.sendall(head_bytes(gen, "POST", route, len(data)) + data)
                socks.append(s)
            for s in socks:  # wait for the first bytes of each stream
                s.settimeout(REQUEST_TIMEOUT)
                if not s.recv(1):
                    raise Fail("the stream closed before its first byte")
            t0 = time.monotonic()
            while True:  # until all are running (or 5 s)
                m = metrics(gen)
                held = m.get("colocate:kv_cache_blocks_used", 0)
                if m.get("colocate:num_requests_running", 0) >= n or time.monotonic() - t0 > 5:
                    break
                time.sleep(0.02)
            for s in socks:  # then hang up, long before they could finish
                s.close()
            if not held:
                raise Fail(f"no KV block in use while {n} streams were open: the case proves nothing")
            # the streams had thousands of tokens to go: only cancellation frees them this soon
            return f"{held:.0f} KV blocks held, then " + wait_idle(gen, secs=3)
        return run

    if gen:
        long = max(8, (max_len or 256) - 64)
        sw.case("completions: clients disconnect mid-stream (KV freed)", disconnect_mid_stream(
            "/v1/completions", {"model": gen_model, "prompt": "tell me a story", "max_tokens": long, "ignore_eos": True, "stream": True}))
        sw.case("chat: clients disconnect mid-stream (KV freed)", disconnect_mid_stream(
            "/v1/chat/completions", {"model": gen_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": long, "ignore_eos": True, "stream": True}))
        sw.case("completions: client disconnects before a non-streamed answer (KV freed)",
                lambda: _hang_up_early(gen, gen_model, long))

    def slow_sender():
        data = json.dumps(probe).encode()
        s = connect(target)
        try:
            s.sendall(head_bytes(target, "POST", probe_route, len(data)))
            for i in range(0, len(data), 8):  # 8 bytes every 50 ms
                s.sendall(data[i:i + 8])
                time.sleep(0.05)
            r = read_response(s, time.monotonic() + REQUEST_TIMEOUT)
        finally:
            s.close()
        check_success(r, probe_route)
        return "200"

    sw.case("slow sender (a body trickled in)", slow_sender)

    def served_while(n_conns, payload, what):
        def run():
            socks = []
            try:
                for _ in range(n_conns):
                    s = connect(target)
                    if payload:
                        s.sendall(payload)
                    socks.append(s)
                t0 = time.monotonic()
                alive(target, probe_route, probe)
                dt = time.monotonic() - t0
                if dt > 10:
                    raise Fail(f"a normal request took {dt:.1f}s beside {n_conns} {what}")
                return f"normal request in {dt:.2f}s beside {len(socks)} {what}"
            finally:
                for s in socks:
                    s.close()
        return run

    sw.case("300 idle connections", served_while(300, b"", "idle connections"))
    slow_head = f"POST {probe_route} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n".encode()
    sw.case("50 half-sent requests (slowloris)", served_while(50, slow_head, "half-sent requests"))
    sw.case("50 bodies that never finish", served_while(50, head_bytes(target, "POST", probe_route, 1000) + b'{"model"', "unfinished bodies"))

    def concurrent_bad():
        errs = []
        bodies = [b"", b"{", {"model": gen_model, "prompt": [999_999_999]}, {"max_tokens": -1, "prompt": "x"}]

        def worker(i):
            try:
                r = request(target, "POST", probe_route, bodies[i % len(bodies)])
                if not 400 <= r.status < 500:
                    errs.append(r.short())
            except Exception as e:  # noqa: BLE001
                errs.append(f"{type(e).__name__}: {e}")

        ts = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errs:
            raise Fail(f"{len(errs)} of 64 not a 4xx: {errs[:3]}")
        return "64 concurrent bad requests, all 4xx"

    sw.case("64 concurrent bad requests", concurrent_bad)


def _hang_up_early(gen, model, long):
    body = json.dumps({"model": model, "prompt": "hi", "max_tokens": long, "ignore_eos": True}).encode()
    s = connect(gen)
    s.sendall(head_bytes(gen, "POST", "/v1/completions", len(body)) + body)
    t0 = time.monotonic()
    while not metrics(gen).get("colocate:kv_cache_blocks_used", 0):
        if time.monotonic() - t0 > 5:
            break
        time.sleep(0.02)
    s.close()
    return wait_idle(gen, secs=3)


# --------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gen", help="base URL of a generator (completions and chat)")
    ap.add_argument("--embed", help="base URL of an embedder")
    ap.add_argument("--budget", type=float, default=240, help="seconds for the whole sweep (default 240)")
    ap.add_argument("--no-metrics", action="store_true", help="skip the /metrics checks (e.g. behind a gateway)")
    ap.add_argument("--only", metavar="TEXT", help="run only the cases whose name contains TEXT (and the final checks)")
    ap.add_argument("--skip", metavar="TEXT", help="skip the cases whose name contains TEXT")
    a = ap.parse_args()
    if not a.gen and not a.embed:
        ap.error("give --gen and/or --embed")
    sw = Sweep(a.budget, a.only, a.skip)
    gen_model = gen_len = embed_model = embed_len = None
    if a.gen:
        gen_model, gen_len = model_info(a.gen)
        print(f"generator {a.gen}: {gen_model}, max_model_len {gen_len}", flush=True)
    if a.embed:
        embed_model, embed_len = model_info(a.embed)
        print(f"embedder {a.embed}: {embed_model}, max_model_len {embed_len}", flush=True)

    if a.gen:
        gen_cases(sw, a.gen, gen_model, gen_len)
        route_cases(sw, a.gen, "gen:")
        sw.case("gen: embeddings on a generator", lambda: expect((400, 404), ok=True)(
            request(a.gen, "POST", "/v1/embeddings", {"model": gen_model, "input": "hi"}), "/v1/embeddings"))
    if a.embed:
        embed_cases(sw, a.embed, embed_model, embed_len)
        route_cases(sw, a.embed, "embed:")
        sw.case("embed: completions on an embedder", lambda: expect((400, 404))(
            request(a.embed, "POST", "/v1/completions", {"model": embed_model, "prompt": "hi", "max_tokens": 2}), "/v1/completions"))
    connection_cases(sw, a.gen, gen_model, a.embed, embed_model, gen_len)

    # the end: every server alive and its accounting whole, whatever the budget says
    sw.deadline = float("inf")
    sw.only = sw.skip = None
    if a.gen:
        sw.case("gen: alive (a normal completion)", lambda: alive(a.gen, "/v1/completions", {"model": gen_model, "prompt": "hello", "max_tokens": 4}))
        sw.case("gen: alive (a normal streamed chat)", lambda: alive(a.gen, "/v1/chat/completions", {"model": gen_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}))
        if not a.no_metrics:
            sw.case("gen: KV accounting whole (/metrics)", lambda: wait_idle(a.gen))
    if a.embed:
        sw.case("embed: alive (a normal embedding)", lambda: alive(a.embed, "/v1/embeddings", {"model": embed_model, "input": ["hello", "world"]}))
        if not a.no_metrics:
            sw.case("embed: nothing running (/metrics)", lambda: wait_idle(a.embed))
    print(f"{sw.passed} passed, {sw.failed} failed", flush=True)
    return 1 if sw.failed else 0


if __name__ == "__main__":
    sys.exit(main())
