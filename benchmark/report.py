"""docs/performance.md and its plot, generated from run_all.py's results JSON only.

Every number in the page comes from the results; the prose only names what was measured.

    python benchmark/report.py benchmark/results/latest.json   # re-render without re-running

perplexity.py's and load_memory.py's results, where they lie next to the results file, add a
section each; so does quantized.py's (quantized.json) where the run had no quantized phase, and
perplexity.py's per quantization method (perplexity-METHOD.json) join the quantized models'
table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

Results = dict[str, Any]
REPO = Path(__file__).resolve().parents[1]
SERVER_LABELS = {"sluice": "Sluice", "vllm": "vLLM", "llama": "llama.cpp"}
PEERS = ("vllm", "llama")
ROUTE_PATHS = {
    "completions": "POST /v1/completions",
    "chat": "POST /v1/chat/completions",
    "generate_stream": "POST /generate_stream",
}
# How load.py counted output tokens (LevelResult.tokens_counted_from).
TOKEN_COUNTS = {
    "server": "each server's own count (the usage chunk, or `details` on /generate_stream)",
    "chunks": "the streamed chunks carrying text, counted by the client",
    "unrecorded": "the streamed chunks, counted by the client",
}
# Results from before the route was recorded: Sluice took TGI's route, vLLM OpenAI's.
UNRECORDED_ROUTES = {"sluice": "generate_stream", "vllm": "completions", "llama": "completions"}
BYTES_PER_WEIGHT = {"float32": 4, "bfloat16": 2, "float16": 2}
CONTENTION_WARNING = 0.05  # above this share of the CPUs used by others, the numbers are suspect
# Results of the scripts run apart from run_all.py (perplexity.py, load_memory.py), rendered when
# their file lies next to the throughput results.
PERPLEXITY_FILE = "perplexity.json"
LOAD_MEMORY_FILE = "load_memory.json"
QUANTIZED_FILE = "quantized.json"
OVERLAP_FILE = "overlap.json"
# perplexity.py's results for a quantization method: perplexity-METHOD.json.
QUANTIZED_PERPLEXITY_FILE = "perplexity-{}.json"


# --- formatting ------------------------------------------------------------------------------


def num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def count(value: float | str) -> str:
    """A whole number as one (medians over rounds come back as floats)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else num(seconds * 1e3, 1)


def gib(size: int | None) -> str:
    return "n/a" if not size else f"{size / 2**30:.2f} GiB"


def mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"


def relative(difference: float) -> str:
    """A relative difference in percent, in exponent notation where 3 decimals would show 0."""
    if abs(difference) < 5e-6:
        return f"{difference * 100:+.1e} %"
    return f"{difference:+.3%}".replace("%", " %")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- derived numbers -------------------------------------------------------------------------


def workloads(results: Results) -> list[dict[str, Any]]:
    """The run's workloads, the short one first (results from before workloads: that one only)."""
    s = results["settings"]
    if "workloads" in s:
        return s["workloads"]
    name = f"{s['prompt_tokens']}/{s['output_tokens']}"
    return [
        {
            "name": name,
            "prompt_tokens": s["prompt_tokens"],
            "output_tokens": s["output_tokens"],
            "concurrency": s["concurrency"],
            "turns": 1,
        }
    ]


def short_name(results: Results) -> str:
    return workloads(results)[0]["name"]


def all_levels(results: Results, server: str) -> list[dict[str, Any]]:
    data = results["servers"].get(server, {})
    return [{"workload": short_name(results)} | lv for lv in data.get("levels", [])]


def levels(results: Results, server: str, workload: str | None = None) -> list[dict[str, Any]]:
    """A server's levels of one workload (default: the short one)."""
    name = workload or short_name(results)
    return [lv for lv in all_levels(results, server) if lv["workload"] == name]


def level_at(
    results: Results, server: str, concurrency: int, workload: str | None = None
) -> dict[str, Any] | None:
    return next(
        (lv for lv in levels(results, server, workload) if lv["concurrency"] == concurrency), None
    )


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def decode_gflop(results: Results, batch: int) -> float | None:
    """≈ 2 FLOPs per weight per token: the step's matmuls, attention over the context left out."""
    params = results.get("model", {}).get("decode_params")
    return 2 * params * batch / 1e9 if params else None


def decode_weights(results: Results) -> tuple[str, float]:
    """The dtype Sluice served in and the bytes a decode step reads its weights in, once."""
    dtype = results["settings"].get("sluice_dtype", "bfloat16")
    return dtype, results["model"]["decode_params"] * BYTES_PER_WEIGHT.get(dtype, 2)


def matmul_peak(results: Results) -> float | None:
    return ((results.get("machine") or {}).get("matmul") or {}).get("gflops")


# --- sections --------------------------------------------------------------------------------


def machine_section(results: Results) -> str:
    m = results.get("machine") or {}
    if "cpu_model" not in m:
        return f"Machine description failed: {m.get('error', 'no data')}\n"
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m["cpu_flags"].items())
    peak = m.get("matmul") or {}
    rows = [
        ["CPU", m["cpu_model"]],
        ["cores (usable by this run)", f"{m['logical_cpus']} ({m['usable_cpus']})"],
        ["memory", f"{m['memory_gib']} GiB"],
        ["CPU flags", flags],
        ["torch (threads)", f"{m['torch']} ({m['torch_threads']})"],
        ["vLLM (peer)", m["vllm"]],
        *llama_build_rows(m),
        *isa_cap_rows(m),
        [
            f"{peak.get('dtype', 'bfloat16')} matmul peak" if peak else "matmul peak",
            f"{num(peak.get('gflops'))} GFLOP/s "
            f"({peak.get('size')}² `torch.matmul`, best of {peak.get('runs')})"
            if peak
            else "not measured",
        ],
    ]
    return table(["", ""], rows) + "\n"


def llama_build_rows(m: dict[str, Any]) -> list[list[str]]:
    build = m.get("llama_build") or {}
    if not build:
        return []
    if build.get("GGML_NATIVE") == "ON":
        return [["llama.cpp build (peer)", "for this CPU (`GGML_NATIVE`)"]]
    enabled = [name for name, value in build.items() if value == "ON"]
    return [["llama.cpp build (peer)", ", ".join(f"`{n}`" for n in enabled) or "generic x86-64"]]


def isa_cap_rows(m: dict[str, Any]) -> list[list[str]]:
    caps = m.get("isa_caps") or {}
    if not caps:
        return []
    return [["instruction sets capped by", ", ".join(f"`{k}={v}`" for k, v in caps.items())]]


def capped_note(results: Results) -> str:
    """What a run with capped instruction sets measured (benchmark/README.md), or nothing."""
    m = results.get("machine") or {}
    caps = m.get("isa_caps") or {}
    if not caps:
        return ""
    llama = m.get("llama_build") or {}
    llama_capped = llama.get("GGML_NATIVE") == "OFF" and llama.get("GGML_AVX512") != "ON"
    return (
        "\n> **Instruction sets capped** (`"
        + "`, `".join(f"{k}={v}" for k, v in caps.items())
        + "`): on this CPU, the paths a CPU without AVX-512 takes. Sluice ran its AVX2 kernels "
        "and made its choices as on such a CPU; PyTorch's operators, oneDNN and MKL ran capped "
        "in every server and the baseline; llama.cpp's server was "
        + ("built for AVX2 (no AVX-512)" if llama_capped else "built for this CPU, uncapped")
        + ". "
        + (
            "vLLM chose its compiled kernels' AVX2 build (`vllm._C_AVX2`): PyTorch's checks of "
            "AVX-512 and AMX, which it asks, answered no (benchmark/avx2_peer). "
            if caps.get("ATEN_CPU_CAPABILITY") == "avx2"
            else "vLLM's own compiled kernels were not capped: it chooses their build from the "
            "CPU's flags. "
        )
        + "Memory and caches are this machine's, not those of a CPU without AVX-512.\n"
    )


def results_section(results: Results) -> str:
    rows = []
    for server, label in SERVER_LABELS.items():
        data = results["servers"].get(server, {})
        if "error" in data or data.get("skipped"):
            why = data.get("error", "skipped").splitlines()[0]
            rows.append([label, "–", "–", *["–"] * 9, f"not run: {why}"])
            continue
        for lv in all_levels(results, server):
            rows.append(
                [
                    label,
                    lv["workload"],
                    count(lv["concurrency"]),
                    count(lv["requests"]),
                    num(lv["output_tokens_per_s"]),
                    num(lv["request_throughput"], 2),
                    ms(lv["ttft_p50_s"]),
                    ms(lv["ttft_p95_s"]),
                    ms(lv["itl_p50_s"]),
                    ms(lv["itl_p95_s"]),
                    ms(lv.get("itl_max_s")),  # n/a in results from before it was recorded
                    str(lv["errors"]),
                    f"{gib(lv['peak_rss_bytes'])} (PSS {gib(lv['peak_pss_bytes'])})",
                ]
            )
    header = [
        "server",
        "workload",
        "concurrency",
        "requests",
        "output tok/s",
        "req/s",
        "TTFT p50 ms",
        "TTFT p95 ms",
        "ITL p50 ms",
        "ITL p95 ms",
        "longest ITL ms",
        "errors",
        "peak RSS (PSS at end)",
    ]
    return table(header, rows) + "\n"


def per_round(level: dict[str, Any] | None) -> str:
    rounds = (level or {}).get("rounds_output_tokens_per_s") or []
    return ", ".join(num(x) for x in rounds) or "–"


def ratio_section(results: Results) -> str:
    peers = [p for p in PEERS if "levels" in results["servers"].get(p, {})]
    rows = []
    for lv in all_levels(results, "sluice"):
        row = [lv["workload"], count(lv["concurrency"]), num(lv["output_tokens_per_s"])]
        row.append(per_round(lv))
        ttfts = [ms(lv["ttft_p95_s"])]
        for peer in peers:
            other = level_at(results, peer, lv["concurrency"], lv["workload"])
            theirs = other["output_tokens_per_s"] if other else None
            r = ratio(lv["output_tokens_per_s"], theirs)
            row += [num(theirs), "n/a" if r is None else f"{r:.2f}×"]
            ttfts.append(ms(other["ttft_p95_s"]) if other else "–")
        rows.append(row + ttfts)
    if not rows:
        return "No Sluice results.\n"
    header = ["workload", "concurrency", "Sluice tok/s", "Sluice rounds"]
    for peer in peers:
        header += [f"{SERVER_LABELS[peer]} tok/s", f"Sluice / {SERVER_LABELS[peer]}"]
    header += ["TTFT p95 ms: Sluice", *(SERVER_LABELS[p] for p in peers)]
    return table(header, rows) + "\n"


def chat_section(results: Results) -> str:
    """TTFT per turn of each chat workload, per server."""
    parts = []
    for workload in workloads(results):
        if workload.get("turns", 1) <= 1:
            continue
        columns = {
            SERVER_LABELS[server]: lv["ttft_p50_s_by_turn"]
            for server in SERVER_LABELS
            for lv in levels(results, server, workload["name"])
            if lv.get("ttft_p50_s_by_turn")
        }
        if not columns:
            continue
        turns = max(len(v) for v in columns.values())
        rows = [
            [str(turn + 1), *(ms(v[turn]) if turn < len(v) else "–" for v in columns.values())]
            for turn in range(turns)
        ]
        parts.append(
            f"{workload['name']}: {count(workload['concurrency'][0])} conversations at once, "
            f"each turn adding a user message of {workload['prompt_tokens']} tokens and an "
            f"answer of {workload['output_tokens']}; every prompt is the whole conversation so "
            "far, so a server's prefix cache can skip all but the new message. TTFT p50 per "
            "turn, ms (the median over the conversations, the median over rounds):\n\n"
            + table(["turn", *columns], rows)
            + "\n"
        )
    return "\n".join(parts) or "No chat workload in this run.\n"


def baseline_section(results: Results) -> str:
    base = results.get("baseline") or {}
    if "modes" not in base:
        return f"Not run: {base.get('error', base.get('skipped', 'no data'))}\n"
    rows = []
    for mode in base["modes"]:
        ours = level_at(results, "sluice", mode["batch"])
        r = ratio(ours["output_tokens_per_s"] if ours else None, mode["output_tokens_per_s"])
        rows.append(
            [
                mode["mode"].replace("_", " "),
                str(mode["batch"]),
                count(mode["requests"]),
                num(mode["output_tokens_per_s"]),
                "n/a" if r is None else f"{r:.1f}×",
            ]
        )
    intro = (
        f"`transformers` `generate`, greedy, {base['new_tokens']} new tokens with EOS "
        f"ignored, {base['dtype']}, {base['threads']} threads, the same prompts; a static "
        "batch is left-padded and decodes as one.\n\n"
    )
    header = ["mode", "batch", "requests", "output tok/s", "Sluice at that concurrency ÷ this"]
    return intro + table(header, rows) + "\n"


def compute_section(results: Results) -> str:
    prof = results.get("profile_step") or {}
    peak = matmul_peak(results)
    model = results.get("model") or {}
    if "step_ms" not in prof or not peak or not model.get("decode_params"):
        return "Not available (profile_step, the matmul peak or the parameter count is missing).\n"
    batch = prof["batch"]
    flop = decode_gflop(results, batch)
    floor_ms, floor_text = step_floor(results, flop, peak)
    rows = []
    for what, step_ms in (
        ("whole engine step", prof["step_ms"]),
        ("model forward only", prof["forward_ms"]),
    ):
        achieved = flop / (step_ms / 1e3)
        row = [what, num(step_ms, 2), num(achieved), f"{100 * achieved / peak:.1f} %"]
        if floor_ms is not None:
            row.append(f"{100 * floor_ms / step_ms:.1f} %")
        rows.append(row)
    intro = (
        f"A decode step of batch {batch} costs ≈ 2 × {model['decode_params'] / 1e6:.1f} M "
        f"weights × {batch} = {flop:.2f} GFLOP (parameters without the embedding table, "
        f"the {'tied ' if model.get('tied_embeddings') else ''}LM head counted once; "
        "attention over the context is left out). The step is timed with "
        "`benchmark/profile_step.py` (the shard's engine, no gRPC, no router) and set against "
        f"the matmul peak of {num(peak)} GFLOP/s above. That peak is `torch.matmul`'s, a "
        "lower bound on the machine's: Sluice's own matmul runs large inputs faster "
        f"(`benchmark/linear_kernel.py`, docs/architecture.md).{floor_text}\n\n"
    )
    header = ["", "ms", "GFLOP/s", "of peak"] + (["of the floor"] if floor_ms is not None else [])
    return intro + table(header, rows) + "\n"


def step_floor(results: Results, flop: float, peak: float) -> tuple[float | None, str]:
    """The least time a decode step can take: its arithmetic at the matmul peak, or reading its
    weights once at the machine's read bandwidth, whichever is longer (a roofline without the KV
    cache's reads, so the true floor is higher). With the sentence that says so."""
    bw = ((results.get("machine") or {}).get("bandwidth") or {}).get("read_gb_s")
    if not bw:
        return None, ""
    _, weight_bytes = decode_weights(results)
    compute_ms = flop / peak * 1e3
    memory_ms = weight_bytes / (bw * 1e9) * 1e3
    bound = "memory" if memory_ms > compute_ms else "arithmetic"
    text = (
        f" A step can take no less than the larger of its arithmetic at that peak "
        f"({num(compute_ms, 2)} ms) and reading its {weight_bytes / 1e6:,.0f} MB of weights "
        f"once at the machine's read bandwidth ({num(bw)} GB/s, below: {num(memory_ms, 2)} ms); "
        f"here {bound} sets that floor, and the last column is its share of the step's time "
        "(a lower bound: with the KV cache's reads the floor would be higher)."
    )
    return max(compute_ms, memory_ms), text


def workload_text(results: Results) -> str:
    parts = []
    for w in workloads(results):
        levels_text = ", ".join(count(c) for c in w["concurrency"])
        if w.get("turns", 1) > 1:
            parts.append(
                f"{w['name']}: {w['turns']} turns of {w['prompt_tokens']}-token user messages "
                f"and {w['output_tokens']}-token answers, {levels_text} conversations at once"
            )
        else:
            sampling = ""
            if w.get("temperature", 0.0) > 0:
                sampling = f", sampled at temperature {w['temperature']:g}"
                if w.get("top_p", 1.0) < 1:
                    sampling += f" with top_p {w['top_p']:g}"
            parts.append(
                f"{w['name']}: {w['prompt_tokens']}-token prompts, {w['output_tokens']} output "
                f"tokens, at {levels_text} concurrent requests{sampling}"
            )
    return "Workloads: " + "; ".join(parts) + "."


def bandwidth_section(results: Results) -> str:
    """What each server's one-request decoding reads per second, against the machine's."""
    bw = (results.get("machine") or {}).get("bandwidth") or {}
    model = results.get("model") or {}
    if not bw or not model.get("decode_params"):
        return "Not measured (run machine.py with --bandwidth-mib).\n"
    dtype, weight_bytes = decode_weights(results)
    rows = []
    for server, label in SERVER_LABELS.items():
        lv = level_at(results, server, 1)
        if not lv or not lv.get("itl_p50_s"):
            continue
        rate = weight_bytes / lv["itl_p50_s"] / 1e9
        rows.append(
            [label, ms(lv["itl_p50_s"]), num(rate), f"{100 * rate / bw['read_gb_s']:.0f} %"]
        )
    intro = (
        f"The machine reads memory at {num(bw['read_gb_s'])} GB/s (copy {num(bw['copy_gb_s'])}, "
        f"triad {num(bw['triad_gb_s'])}; `benchmark/machine.py`, STREAM's kernels over "
        f"{bw['array_mib']} MiB arrays, best of {bw['runs']}). Decoding one request reads every "
        f"weight once per token: {weight_bytes / 1e6:,.0f} MB in {dtype} (the decode "
        "parameters of the compute section). The rate below is that size over the inter-token "
        "latency p50 at concurrency 1 of the short workload: over the whole step, so the "
        "matmuls themselves read faster, and the gap to the machine's rate is what the rest of "
        "a step (attention, norms, sampling, the server) and slower reading cost together.\n\n"
    )
    header = ["server", "ITL p50 ms", "weights read GB/s", "of the machine's read bandwidth"]
    return intro + table(header, rows) + "\n"


def breakdown_section(results: Results) -> str:
    prof = results.get("profile_step") or {}
    lines = []
    if "step_ms" in prof:
        lines.append(
            f"Engine only (`profile_step.py`, batch {prof['batch']}, decode steps, "
            f"median): step {num(prof['step_ms'], 2)} ms, of which forward "
            f"{num(prof['forward_ms'], 2)} ms and outside the forward "
            f"{num(prof['outside_forward_ms'], 2)} ms.\n"
        )
    rows = []
    for lv in all_levels(results, "sluice"):
        s = lv.get("step_means") or {}
        rows.append(
            [
                lv["workload"],
                count(lv["concurrency"]),
                ms(s.get("shard_forward_s")),
                ms(s.get("shard_step_s")),
                ms(s.get("router_step_s")),
                ms(lv["itl_p50_s"]),
                num(s.get("decode_tokens_per_step")),
                count(s.get("steps", "n/a")),
            ]
        )
    if rows:
        lines.append(
            "Under load, means over each level's steps from Sluice's `/metrics` "
            "(prefill chunks included), next to the inter-token latency the client "
            "saw:\n"
        )
        header = [
            "workload",
            "concurrency",
            "shard forward ms",
            "shard step ms",
            "router round trip ms",
            "client ITL p50 ms",
            "decode tokens / step",
            "steps",
        ]
        lines.append(table(header, rows) + "\n")
    return "\n".join(lines) if lines else "Not available.\n"


def foreign_cpu(results: Results) -> list[tuple[str, float]]:
    """(part, share of the CPUs other processes used meanwhile) for every measured part."""
    parts = [
        (
            f"{SERVER_LABELS[server]} {lv['workload']} c={count(lv['concurrency'])}",
            lv["foreign_cpu_share"],
        )
        for server in SERVER_LABELS
        for lv in all_levels(results, server)
        if "foreign_cpu_share" in lv
    ]
    for key in ("machine", "baseline", "profile_step"):
        share = (results.get(key) or {}).get("foreign_cpu_share")
        if share is not None:
            parts.append((key, share))
    return parts


def contention(results: Results) -> str:
    parts = foreign_cpu(results)
    if not parts:
        return ""
    worst = max(parts, key=lambda p: p[1])
    text = (
        f"Processes outside the benchmark used at most {worst[1]:.0%} of the CPUs during any "
        f"measured part ({worst[0]})."
    )
    if worst[1] > CONTENTION_WARNING:
        text = f"**Warning: the machine was not idle.** {text} Those numbers are low; rerun."
    return text


def commands(results: Results) -> str:
    """How each server was started, with this run's paths and ports."""
    lines = []
    for server, label in SERVER_LABELS.items():
        data = results["servers"].get(server, {})
        if "argv" in data:
            argv = [Path(a).name if i == 0 else a for i, a in enumerate(data["argv"])]
            lines.append(
                f"- {label} (healthy after {num(data['startup_s'], 0)} s): `{' '.join(argv)}`"
            )
    return "\n".join(lines) + "\n" if lines else ""


def summary(results: Results) -> str:
    """One factual sentence per comparison, from the numbers."""
    out = []
    short = sorted(levels(results, "sluice"), key=lambda lv: lv["concurrency"])
    for lv in {id(lv): lv for lv in short[:1] + short[-1:]}.values():
        text = (
            f"At concurrency {count(lv['concurrency'])} ({lv['workload']}) Sluice produced "
            f"{num(lv['output_tokens_per_s'])} output tokens/s"
        )
        for peer in PEERS:
            other = level_at(results, peer, lv["concurrency"])
            if other:
                r = ratio(lv["output_tokens_per_s"], other["output_tokens_per_s"])
                text += (
                    f", {SERVER_LABELS[peer]} {num(other['output_tokens_per_s'])} "
                    f"(Sluice / {SERVER_LABELS[peer]} {r:.2f}×)"
                )
        out.append(text + ".")
    out.append(contention(results))
    errors = results.get("errors") or []
    if errors:
        out.append(
            f"{len(errors)} part(s) of the run failed: "
            + "; ".join(e.splitlines()[0] for e in errors)
            + "."
        )
    return " ".join(x for x in out if x)


def dtypes(results: Results) -> str:
    """Which dtype each server ran in, and why."""
    settings = results["settings"]
    sluice = settings.get("sluice_dtype", settings.get("dtype", "bfloat16"))
    peers = settings.get("peer_dtype", settings.get("dtype", "bfloat16"))
    llama = (
        f" llama.cpp serves the same weights converted to a {sluice} GGUF by llama.cpp's own "
        "converter: Sluice's precision."
        if "levels" in results["servers"].get("llama", {})
        else ""
    )
    if settings.get("dtype_requested"):
        return f"Every server and the baseline in {sluice}, as `--dtype` asked." + llama
    if sluice == peers:
        return (
            f"Every server and the baseline in {sluice}, the fastest for each on this CPU." + llama
        )
    return (
        f"Each server at its fastest dtype on this CPU: Sluice in {sluice} (its compiled matmul "
        "widens bfloat16 weights in registers and multiplies in float32, reading half the bytes "
        f"of float32 weights), vLLM and the baseline in {peers} (their bfloat16 is emulated "
        "here, slower). The two precisions round weights and activations differently; the "
        "throughput compares what each server does best on this machine." + llama
    )


def route_of(results: Results, server: str) -> str | None:
    data = results["servers"].get(server, {})
    return data.get("route", UNRECORDED_ROUTES[server]) if "levels" in data else None


def routes(results: Results) -> str:
    """Which route each measured server answered, and how its tokens were counted."""
    measured = {
        label: route
        for server, label in SERVER_LABELS.items()
        if (route := route_of(results, server)) is not None
    }
    if not measured:
        return "streamed"
    if len(set(measured.values())) == 1:
        route = next(iter(measured.values()))
        text = f"streamed through `{ROUTE_PATHS[route]}` on " + (
            "every server" if len(measured) > 1 else next(iter(measured))
        )
        if route != "generate_stream":
            text += " (the OpenAI front-end, with `ignore_eos`)"
        if route == "chat":
            text += ", the prompt as one user message wrapped by the model's chat template"
    else:
        text = "streamed through " + ", ".join(
            f"`{ROUTE_PATHS[route]}` on {label}" for label, route in measured.items()
        )
    sources = {
        source
        for server in SERVER_LABELS
        for lv in all_levels(results, server)
        for source in lv.get("tokens_counted_from", "unrecorded").split("+")
    }
    counted = (
        TOKEN_COUNTS[next(iter(sources))]
        if len(sources) == 1
        else "each server's own count where it sent one, else its chunks carrying text"
    )
    first = "streamed token" if "unrecorded" in sources else "chunk carrying text"
    return (
        f"{text}. Output tokens are {counted}; TTFT is the time to the first {first}, "
        "ITL the time between consecutive ones, and the longest ITL the longest any request "
        "waited between two of its tokens (a step that reads a prompt chunk holds up every "
        "request decoding through it)"
    )


def perplexity_section(ppl: Results) -> str:
    rows = [
        [
            row["dtype"],
            num(row["sluice"], 4),
            num(row["transformers"], 4),
            relative(row["relative_difference"]),
            f"{row['mean_abs_logprob_difference']:.2g}",
            f"{row['max_abs_logprob_difference']:.2g}",
        ]
        for row in ppl["dtypes"]
    ]
    scored = ppl["dtypes"][0]["scored_tokens"] if ppl["dtypes"] else 0
    verdict = "within" if ppl["passed"] else "**not** within"
    intro = (
        f"`{ppl['command']}` on {ppl['generated_at']}, from `benchmark/results/{PERPLEXITY_FILE}`: "
        f"the model's perplexity on `{ppl['text']['path']}` ({ppl['text']['tokens']} tokens of "
        f"public-domain English) in {ppl['windows']} windows of {ppl['window']} tokens without "
        f"overlap, as Sluice serves it and as `transformers` {ppl['transformers']} computes it "
        "from the same directory. Sluice scores each window through `POST /generate` with "
        "`decoder_input_details` (the logprobs in `details.prefill`, whose token ids are checked "
        "against the window's); `transformers` runs one forward pass per window and takes "
        "`log_softmax` of its logits in float32. A window's first token is scored on neither "
        f"side; perplexity = exp(−mean logprob) over the {scored} scored tokens. Sluice is "
        f"{verdict} {ppl['tolerance']:.1%} of `transformers` at every dtype.\n\n"
    )
    header = [
        "dtype",
        "Sluice",
        "transformers",
        "Sluice / transformers − 1",
        "mean abs Δ logprob",
        "max abs Δ logprob",
    ]
    return intro + table(header, rows) + "\n"


def sluice_perplexity(ppl: Results | None, dtype: str) -> float | None:
    """Sluice's perplexity in `dtype` from a perplexity.py result."""
    rows = ppl["dtypes"] if ppl else []
    return next((row["sluice"] for row in rows if row["dtype"] == dtype), None)


def quantized_section(quantized: Results, perplexities: dict[str, Results], origin: str) -> str:
    """Each method's weights, perplexity and tok/s against bfloat16 served in the same run of
    quantized.py; `origin` says where that run stood to the page's."""
    if "error" in quantized or "skipped" in quantized:
        return f"Not measured: {quantized.get('error') or quantized['skipped']}.\n"
    summary = quantized["summary"]
    # quantized.py run without bfloat16 has no reference: its ratios read n/a.
    reference = summary.get("bfloat16", {}).get("output_tokens_per_s", {})
    concurrency = [str(c) for c in quantized["workload"]["concurrency"]]
    reference_ppl = sluice_perplexity(perplexities.get("bfloat16"), "float32")

    def speed(variant: str, level: str) -> str:
        tok_s = summary[variant]["output_tokens_per_s"].get(level)
        against = ratio(tok_s, reference.get(level))
        if variant == "bfloat16" or against is None:
            return num(tok_s)
        return f"{num(tok_s)} ({num(against, 2)}x)"

    rows = []
    for variant, data in summary.items():
        ppl = sluice_perplexity(perplexities.get(variant), "float32")
        change = relative(ppl / reference_ppl - 1) if ppl and reference_ppl else "n/a"
        in_bfloat16 = sluice_perplexity(perplexities.get(variant), "bfloat16")
        rows.append(
            [
                f"`{variant}`",
                num(data["weights_mib"]),
                f"{num(ppl, 3)} / {num(in_bfloat16, 3)}" if ppl or in_bfloat16 else "n/a",
                "—" if variant == "bfloat16" else change,
                *(speed(variant, level) for level in concurrency),
            ]
        )
    w = quantized["workload"]
    intro = (
        f"`{quantized['command']}`, {origin}, on {quantized['generated_at']} "
        f"(`{quantized.get('results_file', 'benchmark/results/' + QUANTIZED_FILE)}`): the "
        "default model served quantized by each method and in bfloat16 (the reference), taking "
        f"turns for {w['rounds']} round(s); {w['prompt_tokens']} prompt / "
        f"{w['output_tokens']} output tokens, streamed, EOS ignored; tok/s is the median over "
        "the rounds. Weights: what the shard reports holding (llama.cpp: its GGUF file). "
        "Perplexity: Sluice's on the perplexity text with float32 and with bfloat16 activations "
        "(`perplexity.py`, its file `perplexity-METHOD.json`, whose command says how it was run; "
        "n/a where there is none); the change against the unquantized model's is taken in "
        "float32, where bfloat16's rounding of activations (about ±0.5 %) does not blur it. The "
        "default model ships as a 4-bit GGUF file: the AWQ, GPTQ 4-bit, NF4 and FP4 models are "
        "its weights rounded to 4 bits a second time, without calibration, and their perplexity "
        "measures that (docs/quantization.md).\n\n"
    )
    header = [
        "method",
        "weights MiB",
        "perplexity: float32 / bfloat16",
        "vs unquantized",
        *(f"tok/s c={level} (vs bfloat16)" for level in concurrency),
    ]
    memory = quantized.get("llama3_8b_weight_gib", {})
    memory_table = (
        "\n\nWeights of a Llama 3 8B per format, computed from its shapes (codes, scales and "
        "offsets as Sluice holds them; the embedding table in bfloat16):\n\n"
        + table(["format", "GiB"], [[name, num(size, 2)] for name, size in memory.items()])
        if memory
        else ""
    )
    return intro + table(header, rows) + retried_note(quantized) + memory_table + "\n"


def retried_note(quantized: Results) -> str:
    """The servers started again with extra flags after a crashed start (quantized.py's
    `serving`), if any."""
    retried = {
        row["variant"]: " ".join(row["retried_with"])
        for row in quantized.get("rounds", [])
        if row.get("retried_with")
    }
    if not retried:
        return ""
    listed = ", ".join(f"`{variant}` with `{flags}`" for variant, flags in retried.items())
    return (
        f"\n\nStarted again after their default start crashed on this CPU: {listed} "
        "(llama-server's repacking of Q4 weights at load; quantized.py, `serving`)."
    )


def anon_and_file(row: Results) -> str:
    """Anonymous / file-backed RSS before loading, at their sampled peaks, and after."""
    moments = ("before_loading", "peak", "after_loading")
    pairs = [
        f"{row[f'anon_{m}_bytes'] / 2**20:,.0f} / {row[f'file_{m}_bytes'] / 2**20:,.0f}"
        for m in moments
    ]
    return " → ".join(pairs) + " MiB"


def load_memory_section(memory: Results) -> str:
    rows = [
        [
            row["dtype"],
            mib(row["weights_bytes"]),
            mib(row["rss_before_loading_bytes"]),
            mib(row["peak_rss_bytes"]),
            mib(row["rss_after_loading_bytes"]),
            f"{mib(row['loading_cost_bytes'])} "
            f"({row['loading_cost_bytes'] / row['weights_bytes']:.1f}× the weights)",
            anon_and_file(row),
        ]
        for row in memory["dtypes"]
    ]
    intro = (
        f"`{memory['command']}` on {memory['generated_at']}, from "
        f"`benchmark/results/{LOAD_MEMORY_FILE}`: the shard process of the real launcher, from "
        "its start until it serves (the KV cache is allocated after that, at the router's "
        f"warm-up). The checkpoint is {mib(memory['checkpoint_bytes'])} of "
        f'{", ".join(memory["checkpoint_dtypes"])} safetensors; "weights" is its '
        f'{memory["parameters"] / 1e6:.1f} M parameters in the dtype served. "Before loading" '
        "is the process's RSS when the shard starts reading the weights (Python, torch and the "
        "kernels); the peak is the kernel's own high-water mark (VmHWM) when the shard serves; "
        f"anonymous and file-backed RSS are sampled every {memory['period_s'] * 1e3:.0f} ms "
        "(file-backed pages include the memory-mapped checkpoint).\n\n"
    )
    header = [
        "dtype",
        "weights",
        "RSS before loading",
        "peak RSS while loading",
        "RSS after loading",
        "peak − before",
        "anonymous / file-backed RSS: before → sampled peak → after",
    ]
    return intro + table(header, rows) + "\n"


def overlap_section(overlap: Results) -> str:
    return (
        f"`{overlap['command']}` on {overlap['generated_at']}, from "
        f"`benchmark/results/{OVERLAP_FILE}`"
        + (f" ({overlap['cpu']})" if "cpu" in overlap else "")
        + f": Sluice in {overlap['sluice_dtype']}, served with "
        "`--overlap-steps true` and `false`, the two taking turns for "
        f"{overlap['rounds_run']} round(s) (medians), 128-token prompts unless the workload says "
        "otherwise, EOS ignored. Forward and shard step: means from Sluice's /metrics; wall per "
        "step: the level's duration over its steps; the gap: what the wall time per step leaves "
        "beyond the shard's step, the time the shard waited between steps.\n\n" + overlap["table"]
    )


def extra_sections(
    perplexity: Results | None, load_memory: Results | None, overlap: Results | None = None
) -> str:
    sections = []
    if overlap:
        sections.append(
            "\n## Overlapped steps against steps one after another\n\n" + overlap_section(overlap)
        )
    if perplexity:
        sections.append(
            "\n## Quality: perplexity against transformers\n\n" + perplexity_section(perplexity)
        )
    if load_memory:
        sections.append(
            "\n## Memory while loading the model\n\n" + load_memory_section(load_memory)
        )
    return "".join(sections)


def render(
    results: Results,
    plot_link: str,
    perplexity: Results | None = None,
    load_memory: Results | None = None,
    quantized_perplexities: dict[str, Results] | None = None,
    quantized_apart: Results | None = None,
    overlap: Results | None = None,
) -> str:
    s = results["settings"]
    quick = (
        "\n> **Quick smoke run** (`--quick`): tiny request counts and 16 output tokens; not "
        "representative.\n"
        if results["quick"]
        else ""
    )
    return f"""# Performance
{quick}{capped_note(results)}
Sluice against vLLM's CPU build and llama.cpp's server on the same machine, model and prompts,
one server at a time, plus a naive `transformers` baseline. Generated by `benchmark/run_all.py`
on {results["generated_at"]} from `{results["results_file"]}`; every number below is measured.

Model: `{Path(results["model"].get("path", "?")).name}`. {dtypes(results)} {workload_text(results)}
Every request has its output length with EOS ignored, {routes(results)}. Each
concurrency level sends max({s["requests_factor"]} × concurrency, {s["min_requests"]}) requests
after {s["warmup"]} warm-up requests. The servers take turns for {s.get("rounds", 1)} round(s),
each round starting each server afresh; every figure is the median over the rounds (the
per-round throughputs are listed under "Sluice against the peers"). {summary(results)}

Rerun: `{results["command"]}`. Single parts (kernels, prefix-cache eviction) are measured in
[microbenchmarks.md](microbenchmarks.md).

{commands(results)}
## Machine

{machine_section(results)}
## Results

{results_section(results)}
Peak RSS is sampled every {s["memory_period_s"]} s during each level and summed over the
server's whole process tree (RSS counts shared pages once per process). PSS, which splits shared
pages, is read once at the end of each level: reading it walks every page table (about 70 ms of
kernel time for a server with a 5 GiB KV cache), which would tax the server under test.

![output tokens/s and TTFT p95 vs concurrency]({plot_link})

## Sluice against the peers

{ratio_section(results)}
## Chat replay: TTFT per turn

{chat_section(results)}
## Naive baseline

{baseline_section(results)}
## Compute efficiency

{compute_section(results)}
## Memory bandwidth, one request at a time

{bandwidth_section(results)}
## Where a step's time goes

{breakdown_section(results)}\
{quantized_part(results, perplexity, quantized_perplexities, quantized_apart)}\
{extra_sections(perplexity, load_memory, overlap)}"""


# --- plot ------------------------------------------------------------------------------------


def plot(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    fig, (tps, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs: set[int] = set()
    for server, label in SERVER_LABELS.items():
        lvs = levels(results, server)
        if not lvs:
            continue
        x = [int(lv["concurrency"]) for lv in lvs]  # medians over rounds come back as floats
        xs.update(x)
        tps.plot(x, [lv["output_tokens_per_s"] for lv in lvs], marker="o", label=label)
        ttft.plot(x, [lv["ttft_p95_s"] * 1e3 for lv in lvs], marker="o", label=label)
    modes = (results.get("baseline") or {}).get("modes", [])
    if modes:
        x = [m["batch"] for m in modes]
        xs.update(x)
        tps.plot(
            x,
            [m["output_tokens_per_s"] for m in modes],
            marker="s",
            linestyle="--",
            label="transformers (sequential / static batch)",
        )
    for ax, title, ylabel in (
        (tps, "Output throughput", "output tokens/s"),
        (ttft, "Time to first token, p95", "ms"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(xs), [str(x) for x in sorted(xs)])
        ax.set_xlabel("concurrency (batch for the baseline)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    if results["quick"]:
        fig.suptitle("quick smoke run (--quick): not representative")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quantized_part(
    results: Results,
    perplexity: Results | None,
    perplexities: dict[str, Results] | None,
    apart: Results | None,
) -> str:
    """The quantized models' section: run_all.py's quantized phase, else quantized.py's results
    from a run of their own."""
    if "quantized" in results:
        quantized, origin = results["quantized"], "a part of this run"
    elif apart:
        quantized, origin = apart, "run apart from the servers above"
    else:
        return ""
    known = {"bfloat16": perplexity} if perplexity else {}
    body = quantized_section(quantized, known | (perplexities or {}), origin)
    return "\n## Quantized models against bfloat16\n\n" + body


def read_if_present(path: Path) -> Results | None:
    return json.loads(path.read_text()) if path.is_file() else None


def quantized_perplexities(folder: Path) -> dict[str, Results]:
    """perplexity.py's results per quantization method found in `folder`."""
    prefix, suffix = QUANTIZED_PERPLEXITY_FILE.split("{}")
    return {
        path.name.removeprefix(prefix).removesuffix(suffix): json.loads(path.read_text())
        for path in sorted(folder.glob(QUANTIZED_PERPLEXITY_FILE.format("*")))
    }


def portable(text: str, repo: Path = REPO) -> str:
    """`text` with the paths of this checkout, of the folder beside it (the peers' scripts) and
    of the home directory written as a reader would type them from the repository's root."""
    for folder, shown in ((repo, ""), (repo.parent, "../"), (Path.home(), "~/")):
        text = text.replace(f"{folder}/", shown)
    return text


def write(results: Results, doc: Path, png: Path, extras: Path | None = None) -> None:
    """The page and its plot; `extras`: the folder where perplexity.py's, load_memory.py's,
    quantized.py's and overlap.py's results are looked for."""
    plot(results, png)
    doc.parent.mkdir(parents=True, exist_ok=True)
    perplexity = read_if_present(extras / PERPLEXITY_FILE) if extras else None
    load_memory = read_if_present(extras / LOAD_MEMORY_FILE) if extras else None
    per_method = quantized_perplexities(extras) if extras else {}
    quantized_apart = read_if_present(extras / QUANTIZED_FILE) if extras else None
    overlap = read_if_present(extras / OVERLAP_FILE) if extras else None
    link = os.path.relpath(png, doc.parent)
    doc.write_text(
        portable(
            render(results, link, perplexity, load_memory, per_method, quantized_apart, overlap)
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--doc", type=Path, default=Path("docs/performance.md"))
    parser.add_argument("--plot", type=Path, default=Path("docs/performance.png"))
    args = parser.parse_args()
    write(json.loads(args.results.read_text()), args.doc, args.plot, extras=args.results.parent)


if __name__ == "__main__":
    main()
