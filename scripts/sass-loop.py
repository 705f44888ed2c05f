#!/usr/bin/env python3
"""Instructions of each kernel's main loop in `cuobjdump -sass` output, without a GPU.

The loop is the backward branch whose body holds the most HMMAs; printed: its
instructions, HMMAs, instructions per HMMA and the commonest opcodes. How the kernel
pages in docs/bench/ counted a change's effect on a loop before it ran:

    pip download nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12 nvidia-cuda-cuobjdump --no-deps -d /tmp/nv
    (unzip each wheel with python3 -m zipfile -e)
    LD_LIBRARY_PATH=<nvrtc lib> COLOCATE_PTX_DIR=/tmp/ptx cargo test -p engine \\
        --features gpu-tests --test cuda_engine cuda_kernels_compile
    ptxas -arch=sm_90 -v /tmp/ptx/moe.ptx -o /tmp/moe.cubin
    cuobjdump -sass /tmp/moe.cubin > /tmp/moe.sass
    scripts/sass-loop.py /tmp/moe.sass 'fp8_(16|32|64)x128'
"""
import collections
import re
import sys


def main(path, pattern=None):
    text = open(path).read()
    for f in re.split(r"\n\s*Function : ", text)[1:]:
        name = f.split("\n", 1)[0].strip()
        if pattern and not re.search(pattern, name):
            continue
        ins = [(int(m.group(1), 16), m.group(2).strip())
               for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", f)]
        best = None
        for addr, op in ins:
            b = re.search(r"BRA (?:\S+, )?0x([0-9a-f]+)", op)
            if b and int(b.group(1), 16) < addr:
                body = [o for a, o in ins if int(b.group(1), 16) <= a <= addr]
                h = sum("HMMA" in o for o in body)
                if best is None or h > best[0]:
                    best = (h, body)
        if not best:
            continue
        h, body = best
        ops = collections.Counter(
            re.sub(r"^@!?U?P\w+ ", "", o).split()[0].split(".")[0] for o in body)
        common = ", ".join(f"{k} {v}" for k, v in ops.most_common(14))
        print(f"{name}: {len(body)} instrs, HMMA {h}, {len(body) / max(h, 1):.2f}/MMA; {common}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
