"""What the benchmark programs (bench/*.py, summarize.py) record beside their figures."""

import datetime
import os
import platform
import subprocess
from pathlib import Path


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
