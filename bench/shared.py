"""What every benchmark program (bench/*.py, summarize.py) shares: the decode shapes, the line
printer, and what a record carries beside its figures (date, commit, command, versions). The
timing protocol itself is ffa.measure, which the tuner uses too."""

import datetime
import json
import math
import os
import platform
import subprocess
from pathlib import Path

# The kernel grid: 32 query heads; (batch, context) pairs crossed with kv heads {32, 8} and
# head_dim {64, 128}.
HEADS = 32
PAIRS = [(1, 1024), (1, 16384), (1, 65536), (8, 4096), (16, 1024), (32, 4096), (64, 8192), (128, 2048)]
GRID = [(batch, kv_heads, context, head_dim) for kv_heads in (32, 8) for head_dim in (64, 128)
        for batch, context in PAIRS]
# (heads, batch, kv_heads, context, head_dim): 32 heads in groups of 4, 16 and 32 over the same bytes
# (67 MB and 537 MB of K+V, head_dim 128), and Gemma-3-4B's attention (8 heads over 4 kv heads,
# head_dim 256) from batch 1 to 16.
GROUP_SHAPES = ([(32, b, kv, n, 128) for kv, b, n in ((8, 1, 16384), (2, 1, 65536), (1, 2, 65536))]
                + [(32, b, kv, n, 128) for kv, b, n in ((8, 8, 16384), (2, 32, 16384), (1, 64, 16384))]
                + [(8, b, 4, n, 256) for b, n in ((1, 4096), (1, 32768), (16, 4096))])


def say(*parts):
    """print, flushed at once (the GPU machine's logs are read while a program runs)."""
    print(*parts, flush=True)


def geomean(xs):
    """Geometric mean of the positive numbers in xs (None entries skipped); NaN when none."""
    xs = [x for x in xs if x]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def write_json(path, record):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


def source_commit():
    """The commit measured: $FFA_COMMIT where it is set (the GPU machine's copy of the tree has
    no .git, see scripts/gpu_session.sh), else git's short HEAD of this checkout, else None."""
    if os.environ.get("FFA_COMMIT"):
        return os.environ["FFA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def token_agreement(tokens, reference, head=32):
    """How far two greedy generations [batch, new tokens] agree: whether all tokens and the
    first `head` of every row are identical, the share of identical tokens, and the first
    position (minimum over rows) where they differ (the length when none does)."""
    equal = tokens == reference
    first = (~equal).int().argmax(1).masked_fill(equal.all(1), equal.shape[1]).min()
    return {"all_identical": bool(equal.all()), f"first_{head}_identical": bool(equal[:, :head].all()),
            "identical_share": equal.double().mean().item(), "first_difference": int(first)}


def environment(command, device):
    """What every record of a Hugging Face benchmark starts with: date, commit, command line,
    device and the versions of Python, torch, transformers and ffa."""
    import torch
    import transformers

    import ffa
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": source_commit(),
            "command": command, "device": device, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "ffa": ffa.__version__}
