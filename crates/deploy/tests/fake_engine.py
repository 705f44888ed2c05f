#!/usr/bin/env python3
"""A tiny OpenAI-ish engine for the supervisor and gateway tests: a real HTTP server
process on 127.0.0.1.

Usage: fake_engine.py PORT MODEL
Env: READY_AFTER (seconds before /health says 200), LIST_AFTER (seconds before /v1/models
     lists MODEL, as vLLM answers /health before its API serves the model),
     EXIT_AFTER (seconds, then exit 1),
     EXIT_AT_START (exit 2 at once, printing a reason).
POST /v1/completions: {"model", "prompt", "stream"} -> the answer names the port (so tests
see which replica served), streamed as SSE in 5 chunks 50 ms apart when "stream" is true.
  "prompt": "die" streams 2 chunks and then the process exits (an engine dying mid-stream);
  "max_tokens" below 0 gets a 400 OpenAI error body (the engine's own validation).
"""
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port = int(sys.argv[1])
model = sys.argv[2]
started = time.time()
ready_after = float(os.environ.get("READY_AFTER", "0"))
list_after = float(os.environ.get("LIST_AFTER", "0"))

if os.environ.get("EXIT_AT_START"):
    print("fake engine: cannot load model (EXIT_AT_START)", flush=True)
    sys.exit(2)


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send_json(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            if time.time() - started >= ready_after:
                self.send_json(200, {"ok": True})
            else:
                self.send_json(503, {"loading": True})
        elif self.path == "/v1/models":
            listed = time.time() - started >= list_after
            self.send_json(200, {"object": "list", "data": [{"id": model, "object": "model"}] if listed else []})
        else:
            self.send_json(404, {"error": "no route"})

    def do_POST(self):
        n = int(self.headers.get("content-length", "0"))
        req = json.loads(self.rfile.read(n) or b"{}")
        text = f"port {port} says {req.get('prompt', '')}"
        if isinstance(req.get("max_tokens"), int) and req["max_tokens"] < 0:
            self.send_json(400, {"error": {"message": f"max_tokens must be at least 0, got {req['max_tokens']}",
                                           "type": "invalid_request_error", "param": "max_tokens", "code": 400}})
            return
        if req.get("stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(5):
                chunk = json.dumps({"model": model, "choices": [{"index": 0, "text": f"{text} #{i}"}]})
                data = f"data: {chunk}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(0.05)
                if i == 1 and req.get("prompt") == "die":
                    print("fake engine: dying mid-stream", flush=True)
                    os._exit(1)
            done = b"data: [DONE]\n\n"
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            self.wfile.flush()
        else:
            self.send_json(200, {"model": model, "port": port, "choices": [{"index": 0, "text": text}]})


if os.environ.get("EXIT_AFTER"):
    def die():
        time.sleep(float(os.environ["EXIT_AFTER"]))
        print("fake engine: crashing (EXIT_AFTER)", flush=True)
        os._exit(1)
    threading.Thread(target=die, daemon=True).start()

print(f"fake engine {model} on {port}", flush=True)
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
