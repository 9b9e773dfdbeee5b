"""Measure the peak extra resident memory of one `score_tokens` call, in a fresh process.

Prints one JSON line: {"peak_extra_memory_mb", "length", "chunk_size", "vocab_size", "batch_size"}.
The peak is the kernel's resident-set high-water mark (VmHWM), reset just before scoring through
/proc/self/clear_refs, minus the resident set at that moment (Linux only).

    python benchmarks/memory_probe.py --model tiny --length 1024 --chunk-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status; this probe needs Linux.")


def peak_extra_memory_mb(fn) -> float:
    """Run `fn()` and return its peak resident memory above the resident memory before it, in MiB."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) / 1024


def tiny_models(vocab_size: int):
    from conftest import tiny_llama

    target = tiny_llama(0, vocab_size=vocab_size)
    drafts = [tiny_llama(10 + k, hidden_size=8, num_layers=1, vocab_size=vocab_size) for k in range(3)]
    return target, drafts, tiny_llama(20, hidden_size=8, num_layers=1, vocab_size=vocab_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny"], default="tiny")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=16000)
    args = parser.parse_args()
    from hf_eu import get_estimator, score_tokens

    torch.set_num_threads(1)
    target, drafts, proxy = tiny_models(args.vocab_size)
    input_ids = torch.randint(3, args.vocab_size, (args.batch_size, args.length))

    def run(length: int):
        score_tokens(get_estimator("hf_eu"), input_ids[:, :length], 8, drafts=drafts, proxy=proxy, target=target,
                     chunk_size=args.chunk_size)

    run(16)  # warm-up: one-off allocations of the first call are not scoring memory
    peak = peak_extra_memory_mb(lambda: run(args.length))
    print(json.dumps({"peak_extra_memory_mb": round(peak, 2), "length": args.length, "chunk_size": args.chunk_size,
                      "vocab_size": args.vocab_size, "batch_size": args.batch_size}))


if __name__ == "__main__":
    main()
