#!/usr/bin/env python3
"""A real CUDA client behind a tiny HTTP server, for the on-device MPS check of `up`:
initialises CUDA with torch, keeps a GEMM loop running on the GPU, answers /health once
CUDA works and POST /v1/completions with what it sees (device, MPS env).
POST /fault makes this client write through a wild pointer (a CuPy kernel in the same CUDA
context, as in testdata/mps/mps-client-fault-h100.log): under MPS every client of the
server gets a sticky error, yet each process lives on and /health still answers, so only
the MPS log tells the supervisor (tests/gpu/mps-fault.sh).
Usage: torch_engine.py PORT MODEL"""
import json, os, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import torch

port, model = int(sys.argv[1]), sys.argv[2]
a = torch.randn(2048, 2048, device="cuda")
torch.cuda.synchronize()
free, total = torch.cuda.mem_get_info()
print(f"torch engine {model} on {port}: cuda ok, mem_get_info total {total >> 20} MiB", flush=True)

def pinned_limit_mib():
    """CUDA_MPS_PINNED_DEVICE_MEM_LIMIT for device 0 (`0=4096M`), in MiB, or None."""
    for part in os.environ.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "").split(","):
        dev, _, v = part.partition("=")
        if dev.strip() == "0" and v:
            unit = {"M": 1, "G": 1024}.get(v[-1].upper())
            return int(v[:-1]) * unit if unit else int(v) >> 20
    return None

def allocatable_mib(cap_mib):
    """What this client can really allocate: 256 MiB blocks until out of memory or past
    `cap_mib` (the pinned limit plus 1 GiB, so that an unenforced limit shows)."""
    step, blocks = 256 << 20, []
    try:
        while len(blocks) * 256 < cap_mib:
            blocks.append(torch.empty(step, dtype=torch.uint8, device="cuda"))
    except torch.cuda.OutOfMemoryError:
        pass
    got = len(blocks) * 256
    del blocks
    torch.cuda.empty_cache()
    return got

limit = pinned_limit_mib()
probe = allocatable_mib(limit + 1024) if limit else None
free_after, _ = torch.cuda.mem_get_info()
print(f"torch engine {model}: pinned limit {limit} MiB, allocatable {probe} MiB, mem_get_info free {free_after >> 20} MiB", flush=True)

def spin():
    b = a
    try:
        while True:
            b = (a @ b).tanh()
            torch.cuda.synchronize()
    except Exception as e:  # the GPU work dies; the HTTP server lives on (a wedged client)
        print(f"torch engine {model}: GPU work failed: {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)

def wild_write():
    import cupy as cp
    k = cp.RawKernel(r'extern "C" __global__ void bad(float* p){ p[threadIdx.x * 1000000007ULL] = 1.0f; }', 'bad')
    try:
        k((1,), (32,), (cp.cuda.runtime.malloc(4),)); cp.cuda.runtime.deviceSynchronize()
        return "no error"
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:200]}"
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
        if self.path == "/fault":
            err = wild_write()
            print(f"torch engine {model}: wild write: {err}", flush=True)
            return self.reply(200, {"fault": err})
        self.reply(200, {"model": model, "device": torch.cuda.get_device_name(0), "total_mib": total >> 20, "free_mib": free >> 20,
                         "pinned_limit_mib": limit, "allocatable_mib": probe,
                         "sm_percent": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
                         "pipe": os.environ.get("CUDA_MPS_PIPE_DIRECTORY")})

ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
