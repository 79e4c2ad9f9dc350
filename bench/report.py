"""Turn bench/kernel_bench.py's JSON into its committed summary: a Markdown report (headline ratios,
the targets of the Hopper-kernel issue checked, every table) and a PNG (the grid as multiples of
the read ceiling, and the original release's protocol).

    python bench/report.py bench/results/kernel-bench-h200.json     # writes kernel-bench-h200.md/.png beside it
"""

import json
import sys
from pathlib import Path

from shared import geomean

SDPA = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math")


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def ratio(a, b, digits=2):
    return "-" if a is None or b is None else f"{a / b:.{digits}f}"


def best_sdpa(row):
    """(µs, backend) of the fastest SDPA backend that ran the shape, or (None, None)."""
    times = {m: row["us"][m] for m in SDPA if m in row["us"]}
    if not times:
        return None, None
    m = min(times, key=times.get)
    return times[m], m[5:]


def ceiling(row):
    """The faster of the two read kernels over the shape's bytes, µs."""
    reads = [row["us"][m] for m in ("read_loads", "read_bulk") if m in row["us"]]
    return min(reads) if reads else None


def shape(row):
    return f"b{row['batch']} kv{row['kv_heads']} L{row['context']} d{row['head_dim']}"


def headline_section(res):
    out = ["## Headline", ""]
    for dtype in sorted({r["dtype"] for r in res["grid"]}):
        rows = [r for r in res["grid"] if r["dtype"] == dtype and "ffa_tuned" in r["us"]]
        cudnn = [r for r in rows if "sdpa_cudnn" in r["us"]]
        vs_cudnn = [r["us"]["sdpa_cudnn"] / r["us"]["ffa_tuned"] for r in cudnn]
        vs_best = [best_sdpa(r)[0] / r["us"]["ffa_tuned"] for r in rows if best_sdpa(r)[0]]
        steps = [r["us"]["step_sdpa"] / r["us"]["ffa_tuned"] for r in rows if "step_sdpa" in r["us"]]
        faster = sum(x > 1 for x in vs_cudnn)
        worst = min(zip(vs_cudnn, cudnn), key=lambda x: x[0]) if cudnn else None
        out.append(f"- **{dtype}**, {len(rows)} shapes: cuDNN SDPA time / FFA time, geometric mean "
                   f"**{geomean(vs_cudnn):.2f}** (FFA faster on {faster} of {len(vs_cudnn)}"
                   + (f"; worst {worst[0]:.2f} at {shape(worst[1])}" if worst else "") + "); "
                   f"fastest SDPA backend / FFA {geomean(vs_best):.2f}; "
                   f"the decode step (two cache copies + fastest SDPA, against FFA's fused step) {geomean(steps):.2f}. "
                   f"FFA / read ceiling {geomean([r['us']['ffa_tuned'] / ceiling(r) for r in rows if ceiling(r)]):.2f}, "
                   f"cuDNN / read ceiling {geomean([r['us']['sdpa_cudnn'] / ceiling(r) for r in cudnn if ceiling(r)]):.2f}.")
    return out


def targets_section(res):
    """The kernel targets of the Hopper-kernel issue, checked on this run (the issue's numbers)."""
    bw = res["bandwidth"]
    bulk = bw.get("read_bulk_GBps")
    out = ["## Targets of the Hopper kernel issue, on this run", "",
           "| dtype | cuDNN / FFA geomean (>= 1.20) | min over shapes (>= 0.98) | batch 1, KV <= 32 MB: cuDNN / FFA "
           "(>= 1.7) | ... FFA / read (<= 1.5, worst) | KV >= 256 MB: fraction of the bulk read ceiling (>= 0.95, "
           "worst) | step ratio geomean (>= 1.35) |", "|---|---|---|---|---|---|---|"]
    for dtype in sorted({r["dtype"] for r in res["grid"]}):
        rows = [r for r in res["grid"] if r["dtype"] == dtype and "ffa_tuned" in r["us"] and "sdpa_cudnn" in r["us"]]
        vs = [r["us"]["sdpa_cudnn"] / r["us"]["ffa_tuned"] for r in rows]
        small = [r for r in rows if r["batch"] == 1 and r["kv_MB"] <= 32 * 1.048576]
        large = [r for r in rows if r["kv_MB"] >= 256]
        fraction = [r["kv_MB"] * 1e6 / (r["us"]["ffa_tuned"] * 1e-6) / (bulk * 1e9) for r in large] if bulk else []
        steps = [r["us"]["step_sdpa"] / r["us"]["ffa_tuned"] for r in rows if "step_sdpa" in r["us"]]
        reads = [r["us"]["ffa_tuned"] / ceiling(r) for r in small if ceiling(r)]
        out.append(f"| {dtype} | {geomean(vs):.2f} | {min(vs):.2f} | "
                   f"{geomean([r['us']['sdpa_cudnn'] / r['us']['ffa_tuned'] for r in small]):.2f} | "
                   f"{max(reads) if reads else float('nan'):.2f} | {min(fraction) if fraction else float('nan'):.2f} | "
                   f"{geomean(steps):.2f} |")
    return out


def grid_section(res):
    out = ["## Decode shapes (32 query heads; µs per call, layer rotation in a CUDA graph)", "",
           "floor = K+V bytes / the faster read kernel's bandwidth over 4 GiB; read = the faster of the library's "
           "two read kernels (16-byte loads, bulk copies) over the same bytes in the same protocol. SDPA backends "
           "run with native GQA. step: two cache copies + the fastest SDPA backend (named), against FFA's fused "
           "step (= FFA tuned). `-`: no number (the JSON's `failures` says why).", "",
           "| dtype | shape | KV MB | caches | floor | read | FFA tuned | heuristic | default | cuDNN | flash | "
           "efficient | math | cuDNN / FFA | best SDPA / FFA | FFA / read | step SDPA | step ratio |",
           "|" + "---|" * 18]
    for r in res["grid"]:
        us = r["us"]
        t = us.get("ffa_tuned")
        best, _ = best_sdpa(r)
        step = us.get("step_sdpa")
        out.append(f"| {r['dtype']} | {shape(r)} | {r['kv_MB']:.0f} | {r['copies']} | {r['floor_us']:.1f} | "
                   f"{fmt(ceiling(r))} | {fmt(t)} | {fmt(us.get('ffa_heuristic'))} | {fmt(us.get('ffa_default'))} | "
                   + " | ".join(fmt(us.get(m)) for m in SDPA)
                   + f" | {ratio(us.get('sdpa_cudnn'), t)} | {ratio(best, t)} | {ratio(t, ceiling(r))} | "
                   f"{fmt(step)} ({r.get('step_sdpa_backend') or '-'}) | {ratio(step, t)} |")
    return out


def groups_section(res):
    """Per-byte cost by group size (the Hopper kernel issue: groups of 16 cost no more per byte than
    groups of 4) and head_dim 256."""
    out = ["## Head groups and head_dim 256 (µs per call; per MB of K+V)", "",
           "| dtype | heads / kv heads | shape | KV MB | read | FFA tuned | cuDNN | FFA µs per MB | cuDNN µs per MB | "
           "cuDNN / FFA | FFA / read |", "|" + "---|" * 11]
    for r in res["groups"]:
        us, mb = r["us"], r["kv_MB"]
        t, c = us.get("ffa_tuned"), us.get("sdpa_cudnn")
        out.append(f"| {r['dtype']} | {r['heads']} / {r['kv_heads']} | {shape(r)} | {mb:.0f} | {fmt(ceiling(r))} | "
                   f"{fmt(t)} | {fmt(c)} | {fmt(t and t / mb, 3)} | {fmt(c and c / mb, 3)} | {ratio(c, t)} | "
                   f"{ratio(t, ceiling(r))} |")
    return out


def failures_section(res):
    lines = [f"- {r['dtype']} {shape(r)}: " + "; ".join(f"{m}: {why}" for m, why in r["failures"].items())
             for r in res["grid"] if r["failures"]]
    return (["## Methods without a number", ""] + lines) if lines else []


def original_section(res):
    out = ["## The original FFA release's protocol (32 heads, head_dim 64, fp16; prompt x-128, 128 steps)", "",
           "graph: the 128 steps replayed from one CUDA graph (GPU time); eager: the 128 calls from Python "
           "(host launch overhead included). One cache, as the original release measured it.", "",
           "| batch | x | optimized µs (graph) | default µs (graph) | optimized / default (graph) | (eager) |",
           "|---|---|---|---|---|---|"]
    for r in res["original"]:
        out.append(f"| {r['batch']} | {r['x']} | {r['optimized_graph_us']:.0f} | {r['default_graph_us']:.0f} | "
                   f"{r['ratio_graph']:.3f} | {r['ratio_eager']:.3f} |")
    return out


def prune_section(res):
    out = ["## Pruning: p = 1e-3 against p = 0, attention sink at position 0 (fp16, head_dim 128)", "",
           "launch: `ffa` = FastForwardAttn's own choice, `default` = the default launch, else threads/heads per "
           "block/split length, `/tc` on tensor cores, `/tma<stages>x<rows>` the TMA kernel (LaunchConfig.key).", "",
           "| batch | kv heads | context | launch | p=0 µs | p=1e-3 µs | speedup |", "|---|---|---|---|---|---|---|"]
    for r in res["prune"]:
        out.append(f"| {r['batch']} | {r['kv_heads']} | {r['context']} | {r['launch']} | {r['p0_us']:.1f} | "
                   f"{r['p0.001_us']:.1f} | {r['speedup']:.2f}x |")
    return out


def pdl_section(res):
    out = ["## Programmatic dependent launch where the kernel before is not FFA's (fp16, batch 1, µs per call)", "",
           "FFA's heuristic launch with pdl and without, and cuDNN's SDPA: alone (each call follows the previous "
           "layer's) and after a copy into q (each call preceded by one small kernel the attention depends on, as "
           "a projection is in a model; the pair's time); `copy`: the copy alone.", "",
           "| shape | launch | FFA pdl | FFA no pdl | cuDNN | after copy: FFA pdl | FFA no pdl | cuDNN | copy | "
           "cuDNN / FFA pdl, alone | after copy |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["pdl"]:
        us = r["us"]
        cells = [us[m] for m in ("ffa_pdl", "ffa_no_pdl", "sdpa_cudnn")]
        cells += [us[f"{m}_after_copy"] for m in ("ffa_pdl", "ffa_no_pdl", "sdpa_cudnn")] + [us["copy"]]
        ratios = [us["sdpa_cudnn"] / us["ffa_pdl"], us["sdpa_cudnn_after_copy"] / us["ffa_pdl_after_copy"]]
        out.append(f"| b{r['batch']} kv{r['kv_heads']} L{r['context']} d{r['head_dim']} | {r['launch']} | "
                   + " | ".join(f"{x:.2f}" for x in cells) + " | " + " | ".join(f"{x:.2f}" for x in ratios) + " |")
    return out


def plots(res, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [k for k in ("grid", "original") if k in res]
    if not panels:  # e.g. only the bandwidth and groups sections: nothing to draw
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(9 * len(panels), 5), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        if kind == "grid":
            rows = [r for r in res["grid"] if r["dtype"] == "float16"] or res["grid"]
            xs = range(len(rows))
            for label, style, get in (("FFA tuned", "o-", lambda r: r["us"].get("ffa_tuned")),
                                      ("FFA default launch", "x:", lambda r: r["us"].get("ffa_default")),
                                      ("cuDNN SDPA", "s--", lambda r: r["us"].get("sdpa_cudnn")),
                                      ("fastest SDPA", "^--", lambda r: best_sdpa(r)[0])):
                ax.plot(xs, [get(r) / ceiling(r) if get(r) and ceiling(r) else None for r in rows], style, label=label)
            ax.set_yscale("log")
            ax.axhline(1, color="k", lw=0.8)
            ax.set_xticks(list(xs), [shape(r) for r in rows], rotation=90, fontsize=7)
            ax.set_ylabel("time / a plain read of the same bytes")
            ax.set_title(f"{rows[0]['dtype']} decode, {res['device']}, layer rotation in a CUDA graph")
            ax.legend()
        else:
            for batch in sorted({r["batch"] for r in res["original"]}):
                rs = [r for r in res["original"] if r["batch"] == batch]
                ax.plot([r["x"] for r in rs], [r["ratio_graph"] for r in rs], "o-", label=f"batch {batch}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("max tokens x (prompt x-128, 128 generated)")
            ax.set_ylabel("attention time (CUDA graph), optimized / default launch")
            ax.set_title("The original FFA release's protocol")
            ax.axhline(1, color="k", lw=0.8)
            ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(path):
    path = Path(path)
    res = json.loads(path.read_text())
    lines = [f"# Kernel benchmark: {res['device']}", "",
             f"date {res['date']}, commit {res['commit']}, torch {res['torch']}, cuDNN {res.get('cudnn')}, "
             f"{res['sm_count']} SMs, L2 {res.get('l2_MB', 0):.0f} MB, tuner cache {res.get('tuner_cache')}. "
             f"Command: `{res['command']}`.", "",
             "Protocol: for each shape, distinct caches (a model's layers) together at least 3x the L2, one call "
             "per cache back to back in one CUDA graph, time per call = replay time / calls, median of the "
             "replays (ffa.measure, which the tuner uses too).", ""]
    lines += [f"Note: {res[k]}." for k in ("commit_note", "sections_note") if res.get(k)] + [""] * any(
        res.get(k) for k in ("commit_note", "sections_note"))
    if "bandwidth" in res:
        bw = res["bandwidth"]
        lines += ["Reading 4 GiB in that protocol: " + ", ".join(
            f"{k[:-5].replace('_', ' ')} {v:.0f} GB/s" for k, v in bw.items() if k.endswith("_GBps"))
            + " (copy: read + write bytes).", ""]
    sections = [("grid", headline_section), ("grid", targets_section), ("grid", grid_section),
                ("grid", failures_section), ("groups", groups_section), ("original", original_section),
                ("prune", prune_section), ("pdl", pdl_section)]
    for key, section in sections:
        if key in res:
            lines += section(res) + [""]
    path.with_suffix(".md").write_text("\n".join(lines))
    try:
        plots(res, path.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no PNG")
    print(f"wrote {path.with_suffix('.md')}")


if __name__ == "__main__":
    main(sys.argv[1])
