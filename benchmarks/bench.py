"""mllama against transformers on one machine, in one run: load, vision, prefill, decode, overhead, preprocessing.

    python benchmarks/bench.py [--repeats 2] [--new-tokens 32] [--only load,vision,...] [--no-write]

The first run writes the random checkpoints under benchmarks/_work/ (see bench_checkpoints.py).
Every measurement runs in a fresh subprocess (bench_phases.py) with torch threads = cores, the
two implementations back to back, so each starts cold, owns its peak RSS, and sees the same
machine load. The table goes to stdout and, with the machine description and the command, to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_checkpoints import CONFIGS, ensure_checkpoint  # noqa: E402

PHASE_NAMES = ("bandwidth", "load", "vision", "generate", "tiny", "preprocess")


def run_phase(phase: str, impl: str, args: dict) -> dict:
    cmd = [sys.executable, str(HERE / "bench_phases.py"), phase, impl, json.dumps(args)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{phase}/{impl} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {phase:10s} {impl:8s} {time.perf_counter() - start:6.1f} s  {result}", flush=True)
    return result


def decode_bytes_per_token(config: dict, *, context: int, vision_tokens: int, dtype_bytes: int = 2) -> int:
    """Bytes one decode step must read: every weight it touches plus the caches it attends over.

    Per self-attention layer: q/k/v/o + MLP + 2 norms, and K/V of `context` positions. Per
    cross-attention layer: q/o + q_norm + MLP + 2 norms (its k/v projections ran once, at prefill),
    and the cached vision K/V. Plus the final norm, lm_head and one embedding row.
    """
    text = config["text_config"]
    h, inter = text["hidden_size"], text["intermediate_size"]
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = h // heads
    mlp = 3 * h * inter
    q_o = 2 * h * heads * head_dim
    kv_proj = 2 * h * kv_heads * head_dim
    cross = set(text["cross_attention_layers"])
    params = 0
    cache = 0
    for i in range(text["num_hidden_layers"]):
        if i in cross:
            params += q_o + head_dim + mlp + 2 * h + 2  # + q_norm, norms, gates
            cache += 2 * kv_heads * vision_tokens * head_dim
        else:
            params += q_o + kv_proj + mlp + 2 * h
            cache += 2 * kv_heads * context * head_dim
    params += h + h * text["vocab_size"] + h  # final norm, lm_head, one embedding row
    return (params + cache) * dtype_bytes


def machine() -> dict:
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem / 2**30, 1), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def fmt(value: float, unit: str) -> str:
    if unit == "GB":
        return f"{value / 1e9:.2f} GB"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    return f"{value:.2f} {unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs per large-model phase, best taken (one 4-tile encode is about a minute)")
    parser.add_argument("--warmup", action="store_true", help="an untimed run before the large-model timings")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens for the decode rate")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="text tokens after the image token")
    parser.add_argument("--tiny-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    parser.add_argument("--only", default=",".join(PHASE_NAMES), help="comma-separated subset of " + ", ".join(PHASE_NAMES))
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args()
    phases = [p for p in args.only.split(",") if p]
    unknown = set(phases) - set(PHASE_NAMES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}")

    bench_dir, tiny_dir = str(ensure_checkpoint("bench")), str(ensure_checkpoint("tiny"))
    for shard in Path(bench_dir).glob("*.safetensors"):  # both loads read from the page cache
        with open(shard, "rb") as f:
            while f.read(1 << 26):
                pass
    common = {"threads": args.threads}
    info = machine()
    load_before = load_average()
    print(f"machine: {info}; load average {load_before}", flush=True)
    rows: list[tuple[str, str, str, str, str, str]] = []  # metric, hf, ours, ratio, target, met
    r: dict[str, dict] = {}

    def both(phase: str, extra: dict, impls=("hf", "ours")) -> None:
        for impl in impls:
            r[f"{phase}/{impl}"] = run_phase(phase, impl, {**common, **extra})

    if "bandwidth" in phases:
        both("bandwidth", {"repeats": 10}, impls=("ours",))
    if "load" in phases:
        both("load", {"checkpoint": bench_dir})
    if "vision" in phases:
        both("vision", {"checkpoint": bench_dir, "repeats": args.repeats, "warmup": args.warmup})
    if "generate" in phases:
        gen_args = {"checkpoint": bench_dir, "repeats": args.repeats, "new_tokens": args.new_tokens + 1,
                    "prompt_tokens": args.prompt_tokens, "photo": "hubble_deep_field.jpg", "warmup": args.warmup}
        both("generate", gen_args, impls=("hf", "ours", "ours-compiled"))
    if "tiny" in phases:
        tiny_args = {"checkpoint": tiny_dir, "repeats": 5, "new_tokens": args.tiny_new_tokens, "prompt_tokens": 16}
        both("tiny", tiny_args, impls=("hf", "ours", "ours-compiled"))
        # One thread as well: on a shared machine, 2-thread OpenMP regions in every small op wait for
        # descheduled threads, which swamps the per-step overhead this row is about.
        for impl in ("hf", "ours", "ours-compiled"):
            r[f"tiny1/{impl}"] = run_phase("tiny", impl, {**tiny_args, "threads": 1})
    if "preprocess" in phases:
        both("preprocess", {"repeats": 5}, impls=("hf", "ours-pil", "ours"))

    def row(metric, hf, ours, ratio, target, ok):
        rows.append((metric, hf, ours, f"{ratio:.2f}x" if ratio == ratio else "-", target,
                     "yes" if ok else "NO"))

    if "bandwidth" in phases:
        rates = r["bandwidth/ours"]["readers_GBps"]
        row("memory read bandwidth at the start, GB/s (" + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()) + ")",
            "-", f"{max(rates.values()):.1f} GB/s", float("nan"), "-", True)
    if "load" in phases:
        hf, ours = r["load/hf"], r["load/ours"]
        row("from_pretrained time (bf16, files in page cache; transformers maps them lazily)",
            fmt(hf["seconds"], "s"), fmt(ours["seconds"], "s"), hf["seconds"] / ours["seconds"], "-", True)
        row("load + read every weight once", fmt(hf["seconds_touched"], "s"), fmt(ours["seconds_touched"], "s"),
            hf["seconds_touched"] / ours["seconds_touched"], "-", True)
        ratio_ours = ours["peak_over_baseline"] / ours["weights"]
        row(f"peak RSS while loading / weight bytes ({ours['weights'] / 1e9:.2f} GB)",
            f"{hf['peak_over_baseline'] / hf['weights']:.3f} (mapped, untouched)",
            f"{ratio_ours:.3f}", float("nan"), "<= 1.10", ratio_ours <= 1.10)
        row("peak RSS after reading every weight / weight bytes", f"{hf['peak_after_touch'] / hf['weights']:.3f}",
            f"{ours['peak_after_touch'] / ours['weights']:.3f}", float("nan"), "-", True)
    if "vision" in phases:
        hf, ours = r["vision/hf"], r["vision/ours"]
        for label in ("1tile", "4tile"):
            ratio = hf[f"seconds_{label}"] / ours[f"seconds_{label}"]
            row(f"exact vision encode, {ours[f'tiles_{label}']}-tile image", fmt(hf[f"seconds_{label}"], "s"),
                fmt(ours[f"seconds_{label}"], "s"), ratio, ">= 2x", ratio >= 2)
    if "generate" in phases:
        hf, ours = r["generate/hf"], r["generate/ours"]
        ratio = hf["ttft"] / ours["ttft"]
        row(f"time to first token ({ours['tiles']}-tile image, {ours['prompt_len']}-token prompt)",
            fmt(hf["ttft"], "s"), fmt(ours["ttft"], "s"), ratio, ">= 2x", ratio >= 2)
        ratio = hf["ttft_1tile"] / ours["ttft_1tile"]
        row(f"time to first token (1-tile image, {ours['prompt_len']}-token prompt)",
            fmt(hf["ttft_1tile"], "s"), fmt(ours["ttft_1tile"], "s"), ratio, ">= 2x", ratio >= 2)
        compiled = r["generate/ours-compiled"]
        for label, res in (("", ours), (f", compile=True (compiling took {compiled['warmup_seconds']:.0f} s)", compiled)):
            ratio = res["decode_tps"] / hf["decode_tps"]
            row(f"decode tokens/s (bf16, {args.new_tokens} tokens){label}", fmt(hf["decode_tps"], "tok/s"),
                fmt(res["decode_tps"], "tok/s"), ratio, ">= 1.6x", ratio >= 1.6)
        patches = (CONFIGS["bench"]["vision_config"]["image_size"]
                   // CONFIGS["bench"]["vision_config"]["patch_size"]) ** 2 + 1
        per_token = decode_bytes_per_token(CONFIGS["bench"], context=ours["prompt_len"] + args.new_tokens,
                                           vision_tokens=ours["tiles"] * patches)
        # Each run against the bandwidth its own process measured right after decoding.
        for label, res in (("", ours), (", compile=True", compiled)):
            limit, hf_limit = res["read_GBps"] * 1e9 / per_token, hf["read_GBps"] * 1e9 / per_token
            row(f"decode / bandwidth limit ({per_token / 1e9:.2f} GB per token; read bandwidth after decoding "
                f"{hf['read_GBps']:.1f} GB/s for transformers, {res['read_GBps']:.1f} GB/s for mllama){label}",
                f"{hf['decode_tps'] / hf_limit:.0%}", f"{res['decode_tps'] / limit:.0%}", float("nan"), ">= 85%",
                res["decode_tps"] / limit >= 0.85)
    if "tiny" in phases:
        for key, label in (("tiny", f"{r['tiny/ours']['threads']} threads"), ("tiny1", "1 thread")):
            hf = r[f"{key}/hf"]
            for impl, variant in (("ours", ""), ("ours-compiled", ", compile=True")):
                ours = r[f"{key}/{impl}"]
                ratio = hf["seconds"] / ours["seconds"]
                row(f"tiny model generate, 1 image + {ours['generated']} new tokens ({label}{variant})",
                    fmt(hf["seconds"], "s"), fmt(ours["seconds"], "s"), ratio, ">= 3x", ratio >= 3)
    if "preprocess" in phases:
        hf = r["preprocess/hf"]["images_per_s"]
        for impl, name in (("ours", "MllamaImageProcessor (torch)"), ("ours-pil", "MllamaImageProcessorPil")):
            ours = r[f"preprocess/{impl}"]["images_per_s"]
            target = impl == "ours"
            row(f"preprocessing images/s, {name}", fmt(hf, "img/s"), fmt(ours, "img/s"), ours / hf,
                ">= 3x" if target else "-", ours / hf >= 3 or not target)

    header = ("metric", "transformers 5.23", "mllama", "ratio", "target", "met")
    table = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    table += ["| " + " | ".join(cells) + " |" for cells in rows]
    load_after = load_average()
    print("\n" + "\n".join(table))
    print(f"\nload average before {load_before}, after {load_after}")
    if not args.no_write:
        command = "python benchmarks/bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        text = [
            "# Benchmark results", "",
            "Latest run of `benchmarks/bench.py` (ratios are transformers time / mllama time, or mllama",
            "rate / transformers rate; both measured in the same run). Random bf16 checkpoint of the",
            "\"bench\" shape (full width, 10 vision + 4 text layers, 2.23B parameters); see",
            "`benchmarks/bench_checkpoints.py`.", "",
            f"- machine: {info['cores']} cores, {info['cpu']}, {info['ram_gib']} GiB RAM",
            f"- torch {info['torch']}, Python {info['python']}, date {info['date']}",
            f"- load average (1/5/15 min) before {load_before}, after {load_after} (shared machine)",
            f"- command: `{command.strip()}`", "",
            *table, "",
        ]
        results = HERE / "RESULTS.md"
        # Hand-written analysis below a "## Notes" heading survives re-runs.
        old = results.read_text() if results.exists() else ""
        notes = old[old.index("## Notes"):] if "## Notes" in old else ""
        results.write_text("\n".join(text) + ("\n" + notes if notes else ""))
        print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
