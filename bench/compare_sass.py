"""Two builds of libffa.so compared instruction by instruction, without a GPU: for refactors.

    python bench/compare_sass.py BASE/libffa.so NEW/libffa.so [--kernel decode_kernel] [--out f.md]

For every kernel whose name contains --kernel, in both builds (cuobjdump -sass, which needs
nvdisasm beside it or on PATH, and --dump-resource-usage): whether its machine code is identical,
whether it has as many instructions, and whether it has as many of each instruction that does the
work (memory, shuffles, floating point, barriers, atomics), with its registers and stack in both.
A refactor that leaves every kernel's work instructions and registers as they were changes at most
integer arithmetic and the scheduler's order; one that does not needs the GPU benchmarks
(bench/compare_builds.py) before it lands.
"""

import argparse
import collections
import datetime
import re
import shutil
import subprocess
import sys
from pathlib import Path

from shared import source_commit

# Opcodes of the instructions that do a kernel's work. HFMA2.MMA is left out: ptxas also uses it to
# move constants into registers, so its count changes with register allocation alone.
WORK = re.compile(r"^(LDG|STG|LDS|STS|LDGSTS|LDSM|LD|ST|SHFL|FFMA|FMUL|FADD|FMNMX|MUFU|HMMA|BAR|DEPBAR|ATOM|RED|"
                   r"F2F|SYNCS|UBLKCP|UTMALDG|MEMBAR|ERRBAR|CCTL)(\.|$)")
PREDICATE = re.compile(r"^@!?U?P\w+\s+")


def tool(name):
    found = shutil.which(name)
    if found is None:
        sys.exit(f"compare_sass: {name} is not on PATH (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    return found


def stable(name):
    """A kernel's name without the hash nvcc gives an anonymous namespace (it changes with the source's path)."""
    return re.sub(r"_GLOBAL__N__[0-9a-f]+_", "_GLOBAL__N_", name)


def functions(library):
    """{kernel name: [instruction text]} of cuobjdump -sass."""
    out = subprocess.run([tool("cuobjdump"), "-sass", str(library)], check=True, capture_output=True, text=True).stdout
    found, current = {}, None
    for line in out.splitlines():
        name = re.match(r"\s*Function : (\S+)", line)
        if name:
            current = found.setdefault(stable(name.group(1)), [])
            continue
        instruction = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s*(.*?)\s*;", line)
        if instruction and current is not None:
            current.append(instruction.group(1))
    return found


def resources(library):
    """{kernel name: (registers, stack bytes)} of cuobjdump --dump-resource-usage."""
    out = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", str(library)], check=True, capture_output=True,
                         text=True).stdout
    found, current = {}, None
    for line in out.splitlines():
        name = re.search(r"Function (\S+?):?$", line.strip())
        if name:
            current = stable(name.group(1))
        usage = re.search(r"REG:(\d+) STACK:(\d+)", line)
        if usage and current:
            found[current] = (int(usage.group(1)), int(usage.group(2)))
    return found


def work(instructions):
    opcodes = (PREDICATE.sub("", i).split()[0] for i in instructions)
    return collections.Counter(op for op in opcodes if WORK.match(op))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--kernel", default="", help="compare the kernels whose mangled name contains this")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    base, new = functions(args.base), functions(args.new)
    base_res, new_res = resources(args.base), resources(args.new)
    names = sorted(n for n in set(base) | set(new) if args.kernel in n)
    rows, tally = [], collections.Counter()
    for name in names:
        a, b = base.get(name), new.get(name)
        if a is None or b is None:
            verdict = "only in base" if b is None else "only in new"
        elif a == b:
            verdict = "identical"
        elif work(a) == work(b):
            verdict = "same work instructions" + (", same count" if len(a) == len(b) else "")
        else:
            changed = sorted(op for op in set(work(a)) | set(work(b)) if work(a)[op] != work(b)[op])
            verdict = "work differs: " + ", ".join(f"{op} {work(a)[op]} -> {work(b)[op]}" for op in changed)
        tally[verdict.split(":")[0]] += 1
        rows.append((name, verdict, len(a or ()), len(b or ()), base_res.get(name), new_res.get(name)))
    lines = [f"{datetime.date.today()}, commit {source_commit()}; "
             f"`python bench/compare_sass.py {args.base} {args.new} --kernel '{args.kernel}'`", "",
             "| kernel | verdict | instructions | registers, stack |", "|---|---|---|---|"]
    for name, verdict, na, nb, ra, rb in rows:
        res = f"{ra[0]}, {ra[1]}" if ra == rb and ra else f"{ra} -> {rb}"
        lines.append(f"| `{name}` | {verdict} | {na} -> {nb} | {res} |")
    lines += ["", ", ".join(f"{count} {verdict}" for verdict, count in tally.most_common())]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
