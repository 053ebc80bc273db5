"""A worker that fails as a known failure does: it writes what that failure writes to stderr and exits as it
would (an uncaught Python exception exits 1; an uncaught C++ exception in MLX's Metal threads aborts).

usage: crash_with.py KIND   (KIND: resource_limit, insufficient_memory, bad_alloc, memory_error, usage,
value_error, runtime_error)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ABORTS = {
    "insufficient_memory": "libc++abi: terminating due to uncaught exception of type std::runtime_error: [METAL] "
                           "Command buffer execution failed: Insufficient Memory "
                           "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",
    "bad_alloc": "libc++abi: terminating due to uncaught exception of type std::bad_alloc: std::bad_alloc",
}

parser = argparse.ArgumentParser(prog="crash_with.py")
parser.add_argument("kind", choices=[*ABORTS, "resource_limit", "memory_error", "usage", "value_error",
                                     "runtime_error"])
parser.add_argument("--seconds", type=float, default=0.2, help="run this long first")
args = parser.parse_args()
print("loading", file=sys.stderr, flush=True)
time.sleep(args.seconds)
if args.kind in ABORTS:
    print(ABORTS[args.kind], file=sys.stderr, flush=True)
    os.abort()
if args.kind == "usage":
    parser.error("argument --num-layers: expected one argument")
if args.kind == "resource_limit":
    raise RuntimeError("[metal::malloc] Resource limit (499000) exceeded.")
if args.kind == "memory_error":
    raise MemoryError
if args.kind == "value_error":
    raise ValueError("num_layers = 16, but the model has only 4 layers")
raise RuntimeError("something else went wrong")
