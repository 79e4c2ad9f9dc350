"""Prints the README's Quick start commands, one a line, for .ci/run to run as they stand: the
bash blocks of the "## Quick start" section, in order. There must be two, of one line each
(install and run the example; install the tests' dependencies and run the tests); otherwise this
exits non-zero, saying what it found."""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start_commands(text):
    """[install-and-example command, test command] from the README's text; ValueError otherwise."""
    section = re.search(r"^## Quick start\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if section is None:
        raise ValueError("README.md has no '## Quick start' section")
    commands = [block.strip() for block in re.findall(r"^```bash\n(.*?)^```", section.group(1), re.M | re.S)]
    if len(commands) != 2 or any(not c or "\n" in c for c in commands):
        raise ValueError("README.md's Quick start must hold two bash blocks of one line each (install and run "
                         f"the example; the tests), found {commands!r}")
    return commands


if __name__ == "__main__":
    try:
        print("\n".join(quick_start_commands(README.read_text())))
    except ValueError as e:
        sys.exit(f"{Path(__file__).name}: {e}")
