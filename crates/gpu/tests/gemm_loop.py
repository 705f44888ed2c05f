# A GEMM loop for the GPU tests: bf16 matrix products for a fixed time, then the rate.
# usage: python3 gemm_loop.py SECONDS [N]
import sys, time, torch
secs = float(sys.argv[1]); n = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    c = a @ b
torch.cuda.synchronize()
print("ready", flush=True)
t0 = time.time(); it = 0
while time.time() - t0 < secs:
    for _ in range(4):
        c = a @ b
    it += 4
    torch.cuda.synchronize()
dt = time.time() - t0
print(f"tflops {2 * n**3 * it / dt / 1e12:.1f} iters {it} secs {dt:.2f}", flush=True)
