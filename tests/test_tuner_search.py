"""The tuner's search on the CPU with an injected timer (FastForwardAttn on CPU tensors runs the
reference whatever the launch), the grid and its command-line flags, and one GPU run of the
quick sweep."""

import json
import os
import subprocess
import sys

from dataclasses import replace

import pytest
import torch

from cases import exact, rel_l2
from ffa import FastForwardAttn, LaunchConfig, _lib
from ffa.launch import cluster_sizes, heuristic
from ffa.measure import Progress
from ffa.tuner import cache
from ffa.tuner import search
from ffa.tuner.__main__ import grid_for, main, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = cache.DeviceInfo("Fake GPU 80GB", (9, 0), 132)


# ---- what is searched ----------------------------------------------------------------------

def test_candidate_space():
    space = search.candidates(6, 256)
    assert len(space) == len(set(space)) == 3 * 4 * 3
    assert {c.threads for c in space} == {64, 128, 256}
    assert {c.heads_per_block for c in space} == {1, 2, 3, 6}
    assert {c.split_len for c in space} == {0, 64, 128}
    assert {c.heads_per_block for c in search.candidates(16, 8192)} == {1, 2, 4, 8}
    assert {c.split_len for c in search.candidates(16, 8192)} == set(search.SPLIT_LENS)
    assert {c.heads_per_block for c in search.candidates(7, 128)} == {1, 7}
    assert set(search.coarse_candidates(8, 1024)) == {LaunchConfig(128, 8, s) for s in (0, 64, 128, 256, 512)}


def test_tensor_core_candidates_double_the_space():
    """Where tensor cores apply, every CUDA-core candidate has its tensor-core twin."""
    cuda_cores = search.candidates(4, 1024)
    both = search.candidates(4, 1024, tensor_cores=True)
    assert not any(c.tensor_cores for c in cuda_cores)
    assert set(both) == set(cuda_cores) | {replace(c, tensor_cores=True) for c in cuda_cores}
    assert set(search.coarse_candidates(8, 256, True)) == {LaunchConfig(128, 8, s, tc) for s in (0, 64, 128)
                                                           for tc in (False, True)}
    assert len(search.refine_candidates(2, 64, True)) == 2 * len(search.refine_candidates(2, 64))


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 8, 16, 32])
def test_tma_candidates_are_launches_the_library_takes(group, head_dim):
    """Every TMA candidate of the coarse and refine stages is one the library runs: clusters only on
    split launches; the coarse stage has none, whatever the heuristic's launch (the refine stage
    tries them on the best split launch)."""
    coarse = [c for c in search.coarse_candidates(group, 65536, True, True, head_dim) if c.tma]
    assert coarse and all(c.cluster == 1 for c in coarse)
    assert {c.split_len for c in coarse} == set(search.split_options(65536))
    for c in coarse + [c for s in search.SPLIT_LENS for c in search.refine_candidates(group, s, True, True) if c.tma]:
        assert c.cluster == 1 or c.split_len > 0, c
        assert c.heads_per_block == min(group, 32) and c.stages > 0 and c.tile_rows > 0


def test_default_and_quick_grids():
    default, quick = search.DEFAULT_GRID.workloads(), search.QUICK_GRID.workloads()
    assert 100 <= len(default) <= 300 and len(quick) <= len(default) // 8
    assert all(w.kv_bytes <= search.DEFAULT_GRID.max_kv_bytes for w in default)
    assert {w.dtype for w in default} == {torch.float16, torch.bfloat16}
    assert {w.group for w in default} == {1, 2, 4, 8} and {w.head_dim for w in default} == {64, 128}
    assert max(w.kv_bytes for w in default) == 1 << 30  # the cap is reached, not exceeded
    assert len({(w.dtype, w.head_dim, w.group, w.batch_kv_heads, w.length) for w in default}) == len(default)


def test_model_flags_restrict_the_grid():
    args = parse_args(["--heads", "32", "--kv-heads", "8", "--head-dim", "128", "--dtype", "bf16",
                       "--context", "3000", "20000"])
    workloads = grid_for(args).workloads()
    assert workloads and all(w.group == 4 and w.kv_heads == 8 and w.head_dim == 128 and w.dtype == torch.bfloat16
                             for w in workloads)
    assert {w.length for w in workloads} == {4096, 32768}
    quick = grid_for(parse_args(["--quick", "--batch", "2"])).workloads()
    assert {w.batch for w in quick} == {2} and {w.head_dim for w in quick} == {128}


@pytest.mark.parametrize("argv", [["--heads", "32"], ["--heads", "30", "--kv-heads", "8"],
                                  ["--head-dim", "100"], ["--dtype", "fp8"], ["--batch", "0"],
                                  ["--show", "--clear"]])
def test_bad_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


# ---- one workload ------------------------------------------------------------------------

def test_problem_reference_is_float64_attention():
    w = search.Workload(torch.float32, 64, 3, 5, 2, 256)
    p = search.Problem(w, "cpu", seed=1)
    kc, vc = p.attn.get_cache()
    K, V = kc[:, :, : w.length - 1].double(), vc[:, :, : w.length - 1].double()
    t = torch.full((w.batch,), p.t)
    ref, _, _ = exact(K, V, p.q.double(), p.k.double(), p.v.double(), t, torch.zeros(w.batch, dtype=torch.long),
                      p.scale, w.length)
    assert p.reference.dtype == torch.float64 and rel_l2(p.reference, ref) < 1e-12
    kc, vc = p.attn.get_cache()
    chunked = search.upcast_reference(p.q, p.k, p.v, kc, vc, p.t, p.scale, chunk_bytes=1)  # a sequence at a time
    assert torch.equal(chunked, p.reference)
    assert search.relative_error(search.run_candidate(p, LaunchConfig(64, 3, 64)), p.reference) < 1e-5


def test_candidates_are_timed_over_every_cache_copy():
    """The timer gets one call per cache copy (the rotation protocol); the copies are distinct
    caches holding the same rows, and a candidate's check runs on the first."""
    w = search.Workload(torch.float32, 64, 2, 1, 2, 256)
    p = search.Problem(w, "cpu", seed=2, copies=3)
    caches = [a.get_cache()[0] for a in p.attns]
    assert len({c.data_ptr() for c in caches}) == 3 and all(torch.equal(c[:, :, :255], caches[0][:, :, :255])
                                                            for c in caches)
    ran, timed = [], []

    def run(problem, config, copy=0):
        ran.append(copy)
        return search.run_candidate(problem, config, copy)

    def timer(calls):
        before = len(ran)
        for call in calls:
            call()
        timed.append(ran[before:])
        return 1e-6

    result = search.tune(p, 132, timer, run, refine=1)
    assert result.timings and timed and all(copies == [0, 1, 2] for copies in timed)
    assert all(p.attns[i].launch is not None for i in range(3))


class FakeGPU:
    """run/timer pair for the search: `run` is the real CPU step, except that `wrong` gives a
    corrupted output, `broken` raises ValueError, `unsupported` raises UnsupportedError (a launch
    the GPU cannot run) and `silent` writes nothing; `timer` runs the first of its calls once
    and reports seconds(workload, config) of the last step run."""

    def __init__(self, seconds, wrong=(), broken=(), silent=(), unsupported=()):
        self.seconds, self.wrong, self.broken, self.silent = seconds, set(wrong), set(broken), set(silent)
        self.unsupported = set(unsupported)
        self.last, self.timed = None, []

    def run(self, problem, config, copy=0):
        self.last, self.workload = config, problem.workload
        if config in self.broken:
            raise ValueError(f"{config} is not supported")
        if config in self.unsupported:
            raise _lib.UnsupportedError("tensor_cores: device 0 cannot run this launch")
        if config in self.silent:
            return problem.out
        out = search.run_candidate(problem, config, copy)
        return out + 0.01 * out.abs().max() if config in self.wrong else out

    def timer(self, calls):
        calls[0]()
        self.timed.append(self.last)
        return self.seconds(self.workload, self.last)


def separable(config):
    """A made-up landscape whose best split is 128, best threads 64, best heads_per_block 2."""
    split = {0: 9.0, 64: 3.0, 128: 1.0, 256: 2.0}.get(config.split_len, 5.0)
    return 1e-6 * (split + {64: 0.1, 128: 0.3, 256: 0.2}[config.threads] + abs(config.heads_per_block - 2) * 0.05)


def test_search_picks_the_fastest_and_rejects_wrong_candidates():
    w = search.Workload(torch.float32, 64, 4, 1, 2, 512)
    too_good = LaunchConfig(256, 4, 128)  # would win on time, but its output is wrong
    raises, silent = LaunchConfig(128, 4, 0), LaunchConfig(64, 4, 128)
    gpu = FakeGPU(lambda w, c: 1e-9 if c == too_good else separable(c), wrong=[too_good], broken=[raises],
                  silent=[silent])
    result = search.tune(search.Problem(w, "cpu"), 132, gpu.timer, gpu.run, refine=2)

    honest = [c for c in search.candidates(4, 512) if c not in (too_good, raises, silent)]
    assert result.config == min(honest, key=separable) == LaunchConfig(64, 2, 128)
    assert result.seconds == separable(result.config)
    assert set(result.rejected) == {too_good, raises, silent}
    assert "relative error" in result.rejected[too_good] and "not supported" in result.rejected[raises]
    assert "nan" in result.rejected[silent]
    assert not {too_good, raises, silent} & set(gpu.timed)
    assert len(gpu.timed) == len(set(gpu.timed)) < len(search.candidates(4, 512))  # pruned, each once
    assert result.heuristic == heuristic(1, 2, 4, 512, 132) and result.heuristic in result.timings
    e = result.entry()
    assert (e.config, e.time_us, e.heuristic) == (result.config, round(separable(result.config) * 1e6, 3),
                                                  result.heuristic)


@pytest.mark.parametrize("dtype,head_dim,capability,tried", [
    (torch.float16, 128, (9, 0), True), (torch.bfloat16, 64, (8, 0), True), (torch.float16, 128, (7, 5), False),
    (torch.float32, 128, (9, 0), False), (torch.float16, 80, (9, 0), False), (torch.float16, 128, None, False)])
def test_search_tries_tensor_cores_where_they_apply(dtype, head_dim, capability, tried):
    """Tensor-core launches are searched only for fp16/bf16, head_dim 64/128 on compute
    capability 8.0+; they win where they are faster; one the GPU cannot run (UnsupportedError)
    is noted apart, neither timed nor counted as a wrong launch."""
    w = search.Workload(dtype, head_dim, 4, 1, 2, 512)
    too_big = LaunchConfig(256, 4, 128, tensor_cores=True)
    gpu = FakeGPU(lambda w, c: separable(c) * (0.5 if c.tensor_cores else 1.0), unsupported=[too_big])
    result = search.tune(search.Problem(w, "cpu"), 132, gpu.timer, gpu.run, refine=2, capability=capability)
    assert any(c.tensor_cores for c in result.timings) == tried
    assert result.config == LaunchConfig(64, 2, 128, tensor_cores=tried)
    assert not result.rejected
    assert set(result.unsupported) == ({too_big} if tried else set())
    assert too_big not in result.timings


@pytest.mark.parametrize("capability,features", [((9, 0), True), ((8, 0), False)])
def test_search_tries_launch_features_on_tensor_cores(capability, features):
    """On compute capability 9.0 the best tensor-core launch of each refined split length is timed in
    every cluster size, and the fastest launch with programmatic dependent launch too; where they
    win the search keeps them. On 8.0 neither is tried."""
    w = search.Workload(torch.float16, 128, 4, 1, 2, 512)

    def seconds(w, c):  # tensor cores fastest, in clusters of 4 more so, with pdl more still
        return separable(c) * (0.5 if c.tensor_cores else 1.0) * (0.8 if c.cluster == 4 else 1.0) \
            * (0.9 if c.pdl else 1.0)
    gpu = FakeGPU(seconds)
    result = search.tune(search.Problem(w, "cpu"), 132, gpu.timer, gpu.run, refine=2, capability=capability)
    tried = [c for c in result.timings if c.tensor_cores and (c.pdl or c.cluster > 1)]
    assert bool(tried) == features
    assert all(c.split_len > 0 for c in tried if c.cluster > 1)
    best = LaunchConfig(64, 2, 128, tensor_cores=True)
    assert result.config == (replace(best, cluster=4, pdl=True) if features else best)
    assert set(cluster_sizes()) - {1} <= {c.cluster for c in tried} or not features


def test_sweep_saves_winners_that_attention_then_uses(capsys):
    workloads = [search.Workload(torch.float32, 64, 2, b, 2, n) for b in (1, 4) for n in (256, 1024)]
    best = {256: LaunchConfig(64, 1, 64), 1024: LaunchConfig(256, 2, 512)}

    def seconds(w, c):  # separable, fastest at best[w.length]
        b = best[w.length]
        return 1e-6 * (1 + (c.split_len != b.split_len) + (c.threads != b.threads) / 2
                       + (c.heads_per_block != b.heads_per_block) / 2)
    gpu = FakeGPU(seconds)
    results = search.sweep(workloads, "cpu", 132, gpu.timer, run=gpu.run, progress=True,
                           on_result=lambda r: cache.save(DEVICE, [r.entry()]))
    assert [r.config for r in results] == [best[w.length] for w in workloads]
    assert "4/4" in capsys.readouterr().err  # tqdm's bar or the plain counter

    table = cache.load_table(DEVICE)
    assert len(table.entries) == 4
    K = torch.randn(4, 2, 700, 64)  # batch x kv_heads = 8: the buckets of batch 4
    f = FastForwardAttn(K, K.clone(), 1024)
    f._tuned = table  # what __init__ sets from load_table for CUDA tensors
    assert f.launch_config(4, 1000) == best[1024] and f.launch_config(4, 200) == best[256]
    out = f.attention(torch.randn(4, 4, 1, 64), torch.randn(4, 2, 1, 64), torch.randn(4, 2, 1, 64), 0.125, 700)
    assert torch.isfinite(out).all()


def test_plain_counter_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now fails
    bar = Progress(3)
    for i in range(3):
        bar.step(f"shape {i}")
    bar.close()
    err = capsys.readouterr().err
    assert "[3/3] shape 2" in err and err.endswith("\n")


# ---- the command -------------------------------------------------------------------------

def _command(*argv, env_dir):
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)  # keep an installed ffa reachable
    env = dict(os.environ, PYTHONPATH=path, **{cache.ENV_DIR: str(env_dir)})
    return subprocess.run([sys.executable, "-m", "ffa.tuner", *argv], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_command_without_gpu(cache_dir):
    cache.save(DEVICE, [cache.Entry("float16", 128, 4, 8, 4096, LaunchConfig(128, 4, 256), 20.0,
                                    LaunchConfig(128, 4, 0), 30.0)])
    shown = _command("--show", env_dir=cache_dir)
    assert shown.returncode == 0 and "Fake GPU 80GB" in shown.stdout and "1.50x" in shown.stdout
    swept = _command("--quick", env_dir=cache_dir)
    assert swept.returncode == 2 and "no CUDA GPU" in swept.stderr
    cleared = _command("--clear", env_dir=cache_dir)
    assert cleared.returncode == 2 and cache.cache_file(DEVICE).exists()


@pytest.mark.gpu
def test_quick_sweep_on_the_gpu(cache_dir):
    """The real thing, restricted to two shapes: every candidate passes its check, winners
    are saved under this GPU's key, and the runtime picks them up."""
    done = _command("--quick", "--dtype", "fp16", "--heads", "8", "--kv-heads", "2", "--batch", "1",
                    env_dir=cache_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    info = cache.describe_device(torch.device("cuda"))
    doc = json.loads(cache.cache_file(info).read_text())
    assert doc["key"] == cache.device_key(info) and len(doc["entries"]) == 2
    assert all(0 < e["time_us"] < 1e4 and e["heuristic_us"] > 0 for e in doc["entries"])
    table = cache.load_table(torch.device("cuda"))
    e = doc["entries"][0]
    assert table.lookup(torch.float16, 128, 4, 2, e["length"]) == LaunchConfig(**e["config"])
    assert main(["--show"]) == 0
