"""How FFA measures a decode kernel: the protocol of the tuner (ffa.tuner) and of the
benchmarks (bench/).

A model runs its decode step once per layer, each layer over its own cache, back to back, and a
decode loop (FFA's own, or any CUDA-graph server's) replays those steps from a CUDA graph. A
kernel is timed the same way (the layer-rotation protocol):
  * `copies_for` distinct caches, like a model's layers, together at least COLD_FACTOR times the
    L2 size, so that every call finds its cache in device memory and not in L2;
  * one call per cache, captured back to back in one CUDA graph: no Python launch cost and no
    gaps between calls (`capture`);
  * time per call = replay time / number of calls, median over replays (`RotationTimer`).
A kernel that must read a cache cannot beat a plain read of the same bytes in the same
protocol: `read_bytes` is that read (csrc/read.cu: 16-byte loads, or the bulk copy engine on
compute capability 9.0+). `Progress` is the progress line of long measurements.
"""

import math
import statistics
import sys

import torch

from . import _lib

COLD_FACTOR = 3  # distinct caches of a measurement hold at least this many times the L2 size


def l2_bytes(device):
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "L2_cache_size", 0) or (64 << 20)


def copies_for(nbytes, l2, most=4096):
    """How many distinct caches of `nbytes` bytes a measurement rotates through: together at
    least COLD_FACTOR x `l2` bytes, and never fewer than 2 (a single cache larger than the L2
    still leaves its last lines there for the next replay's start)."""
    return max(2, min(most, math.ceil(COLD_FACTOR * l2 / max(nbytes, 1))))


def capture(calls):
    """`calls` run once each (warm-up: lazy allocations, launch choices, compilation) on a side
    stream, then captured back to back in one CUDA graph, which is returned."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph


class RotationTimer:
    """Seconds per call of `calls` (zero-argument callables, one per distinct cache) in the
    layer-rotation protocol: the median over replays of one CUDA graph holding every call, each
    replay timed with CUDA events and divided by the number of calls. The replays are as many
    as fit in about `target_s` of GPU time, within [min_replays, max_replays]."""

    def __init__(self, target_s=2e-3, min_replays=5, max_replays=30):
        self.target_s, self.min_replays, self.max_replays = target_s, min_replays, max_replays

    def samples(self, calls):
        """Seconds per call of each timed replay."""
        graph = capture(calls)
        try:
            first = min(self._replays(graph, 2))  # the first replay of a graph also uploads it
            repeats = int(min(self.max_replays, max(self.min_replays, self.target_s // max(first, 1e-7))))
            return [s / len(calls) for s in self._replays(graph, repeats)]
        finally:
            graph.reset()

    def __call__(self, calls):
        return statistics.median(self.samples(calls))

    @staticmethod
    def _replays(graph, repeats):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) * 1e-3 for start, end in events]


def read_bytes(*tensors, bulk=False):
    """Read every byte of one or two contiguous CUDA tensors once, on the current stream, and
    write nothing: the read ceiling of a kernel that must read them. `bulk`: with the bulk copy
    engine instead of 16-byte loads (UnsupportedError on a GPU without it). Each tensor's size
    must be a multiple of 16 bytes."""
    if not 1 <= len(tensors) <= _lib.READ_RANGES:
        raise ValueError(f"read_bytes takes 1 to {_lib.READ_RANGES} tensors, got {len(tensors)}")
    params = _lib.ReadParams(abi_version=_lib.ABI_VERSION, bulk=int(bool(bulk)))
    for i, x in enumerate(tensors):
        if not isinstance(x, torch.Tensor) or not x.is_cuda or not x.is_contiguous():
            raise ValueError(f"read_bytes: tensor {i} must be a contiguous CUDA tensor")
        params.ptr[i], params.bytes[i] = x.data_ptr(), x.numel() * x.element_size()
    params.stream = torch.cuda.current_stream(tensors[0].device).cuda_stream
    with torch.cuda.device(tensors[0].device):
        _lib.read(params)


class Progress:
    """A progress line for a long measurement: tqdm's bar when tqdm is installed, else a plain
    counter (`file`, stderr by default)."""

    def __init__(self, total, unit="shape", desc="ffa", enabled=True, file=None):
        self.total, self.done, self.enabled, self.bar = total, 0, enabled, None
        self.file = file or sys.stderr
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.file)
            except ImportError:
                pass
        self.desc = desc

    def step(self, label):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"\r{self.desc} [{self.done}/{self.total}] {label:<32}", end="", file=self.file, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=self.file)
