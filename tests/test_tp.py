"""Tensor parallelism: bench/tp_generate.py under torchrun on a tiny random Llama (2 layers,
4 query heads over 2 kv heads, head_dim 32), sharded by transformers' tp_plan="auto" over two
processes (gloo on the CPU; NCCL on two GPUs, marked gpu). In float32 FFA's greedy tokens equal
Hugging Face's default path under the same plan, and each rank's FFA cache holds its own share
of the heads only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import accelerate  # noqa: F401 (transformers loads a tensor-parallel model only with it installed)
import pytest
import torch
import transformers

import ffa
import ffa.transformers as fft

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "tp_generate.py"
KV_HEADS, HEADS = 2, 4  # the script's "tiny" shape
TIMEOUT_S = 300  # compiling on two GPUs takes a minute or two; a hang takes forever

needs_script = pytest.mark.skipif(not SCRIPT.exists(), reason="bench/ is not beside tests/ (installed-wheel run)")


def tp_generate(tmp_path, processes, *flags):
    """Run the script (under torchrun when processes > 1) and return rank 0's JSON record. A run
    that overruns is stopped, so that a stuck collective fails the test instead of hanging it."""
    out = tmp_path / "record.json"
    launcher = [sys.executable]
    if processes > 1:  # --standalone: a rendezvous on a free local port
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = launcher + [str(SCRIPT), "--shape", "tiny", "--dtype", "fp32", "--batch", "3", "--prompt_len", "12",
                          "--new_tokens", "8", "--repeats", "1", "--weights_dir", str(tmp_path / "weights"),
                          "--out", str(out), *flags]
    path = os.pathsep.join(p for p in (str(Path(ffa.__file__).parent.parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "log.txt"
    with log.open("w") as sink:  # a file, not a pipe: a stray worker holding it open cannot block the test
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun passes SIGTERM on to its workers (which run in sessions of their own)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            pytest.fail(f"{' '.join(command)} did not finish in {TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
    assert proc.returncode == 0, log.read_text()[-4000:]
    return json.loads(out.read_text())


def check(record, processes, backend):
    assert (record["processes"], record["backend"]) == (processes, backend)
    assert (record["heads"], record["kv_heads"]) == (HEADS, KV_HEADS)
    assert record["agreement"]["all_identical"], record["agreement"]
    assert 0.0 <= record["yardstick"]["identical_share"] <= 1.0  # HF eager vs SDPA ran, and SDPA came back
    local = {"kv_heads": KV_HEADS // processes, "heads": HEADS // processes}
    assert record["ffa_cache_per_rank"] == [local] * processes


@needs_script
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compile"])
def test_tp_two_processes_gloo(tmp_path, compile):
    flags = ["--device", "cpu"] + (["--compile"] if compile else [])
    check(tp_generate(tmp_path, 2, *flags), 2, "gloo")


@needs_script
def test_one_process_holds_every_head(tmp_path):
    """The one-GPU figure's path: plain python, no process group, the whole model."""
    check(tp_generate(tmp_path, 1, "--device", "cpu"), 1, None)


def test_cache_takes_its_heads_from_the_kv_it_gets():
    """A tensor-parallel rank's prompt K/V carries its share of the kv heads: the cache serves
    that many times the model's group size of query heads, not the config's head count."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=32)
    model = fft.enable(transformers.LlamaForCausalLM(config).eval(), compile=True)
    cache = fft.FFACache(model, 8)
    shard = torch.randn(2, 1, 3, 32)  # one of the two kv heads
    cache.update(shard, shard, 0)
    assert cache.layers[0].keys.shape[1] == 1
    assert cache.layers[0].heads == HEADS // KV_HEADS


@pytest.mark.gpu
@needs_script
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compile"])
def test_tp_two_gpus_nccl(tmp_path, compile):
    """On the GPU, compile=True makes generate compile the sharded decode step (CUDA graphs)."""
    flags = ["--device", "cuda"] + (["--compile"] if compile else [])
    check(tp_generate(tmp_path, 2, *flags), 2, "nccl")
