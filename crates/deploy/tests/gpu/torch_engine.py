#!/usr/bin/env python3
"""A real CUDA client behind a tiny HTTP server, for the on-device MPS check of `up`:
initialises CUDA with torch, keeps a GEMM loop running on the GPU, answers /health once
CUDA works and POST /v1/completions with what it sees (device, MPS env).
Usage: torch_engine.py PORT MODEL"""
import json, os, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import torch

port, model = int(sys.argv[1]), sys.argv[2]
a = torch.randn(2048, 2048, device="cuda")
torch.cuda.synchronize()
free, total = torch.cuda.mem_get_info()
print(f"torch engine {model} on {port}: cuda ok, mem_get_info total {total >> 20} MiB", flush=True)

def spin():
    b = a
    while True:
        b = (a @ b).tanh()
        torch.cuda.synchronize()
threading.Thread(target=spin, daemon=True).start()

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *x): pass
    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_GET(self):
        self.reply(200 if self.path == "/health" else 404, {"ok": True})
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.reply(200, {"model": model, "device": torch.cuda.get_device_name(0), "total_mib": total >> 20,
                         "sm_percent": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
                         "pipe": os.environ.get("CUDA_MPS_PIPE_DIRECTORY")})

ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
