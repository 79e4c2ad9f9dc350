"""FastForwardAttn: a preallocated KV cache and the decode step over it.

    ffa = FastForwardAttn(K, V, max_len, use_default_kernel_launch=False)
    out = ffa.attention(q, k, v, softmax_scale, t, p=0.0, softcap=None, sinks=None)

K, V: [batch, kv_heads, prompt_len, head_dim], copied once into a cache of max_len positions.
q: [batch, heads, 1, head_dim] (or [batch, heads, head_dim]); k, v: [batch, kv_heads, 1,
head_dim] (or without the 1). attention() writes k, v at position t and returns the attention
of q over positions start .. t as [batch, heads, head_dim]. t (and start) may be ints or
integer tensors of shape [batch], one position per sequence; tensors on the GPU are read by
the kernel itself, so a captured CUDA graph sees their new values on every replay.

p is the pruning threshold: value rows whose softmax weight is below p may be skipped, which
bounds the error of each output element by sum_{w_i < p} w_i |v_i|; p = 0 is exact.
softcap caps the attention logits before the softmax: s becomes softcap * tanh(s / softcap)
(Gemma 2's attention-logit softcapping); None: no cap. sinks, a tensor [heads] of the cache's
dtype, are attention sinks (gpt-oss): head h's logit sinks[h] joins the softmax's denominator
without a value row; None: none. reference.py is the specification.
"""

import math
import numbers

import torch

from . import _lib, ops, tuner
from .launch import (LaunchConfig, default_launch, fit_splits, head_dims, heuristic, length_bucket, tensor_cores_apply,
                     tma_applies)

GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CPU_DTYPES = GPU_DTYPES + (torch.float64,)
KERNELS = ("ffa", "sdpa")  # what computes a step: FFA's kernel, or two cache copies + torch's SDPA
# softcap values the kernel holds in float32 after its base-2 conversion (csrc/ffa_api.cu).
SOFTCAP_RANGE = (1e-30, 1e30)


def _expect_tensor(name, x, ndim_options):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ndim_options:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim_options))} dimensions, "
                         f"got shape {tuple(x.shape)}")


def _is_int(x):
    """An integer other than a bool (plain ints skip the slower abstract-class check)."""
    return type(x) is int or (not isinstance(x, bool) and isinstance(x, numbers.Integral))


def _is_real(x):
    """A real number other than a bool (plain floats skip the slower abstract-class check)."""
    return type(x) is float or (not isinstance(x, bool) and isinstance(x, numbers.Real))


def _check_rows(name, x, batch, heads, head_dim, dtype, device):
    """Check that x is [batch, heads, 1, head_dim] or [batch, heads, head_dim] of the cache's
    dtype and on its device. Makes no view (see _row_view): every step of every layer passes
    here, so an accepted x costs one comparison per property, and only a rejected shape is
    looked at closely for the message."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    shape = x.shape
    if shape != (batch, heads, 1, head_dim) and shape != (batch, heads, head_dim):
        _expect_tensor(name, x, (3, 4))
        if x.dim() == 4 and shape[2] != 1:
            raise ValueError(f"{name} must hold one position (dim 2 of size 1), got shape {tuple(shape)}")
        raise ValueError(f"{name} must have shape [{batch}, {heads}, 1, {head_dim}], got {tuple(shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, the cache holds {dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, the cache is on {device}")


def _row_view(x):
    """The [batch, heads, head_dim] view of rows that _check_rows accepted."""
    return x[:, :, 0] if x.dim() == 4 else x


def _positions(name, value, batch, device, low, high):
    """An int in [low, high] or an integer tensor [batch]; returns (tensor or None, int, the
    values as the host knows them: the int, a CPU tensor, or None when they live on the GPU)."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must have dtype int32 or int64, got {value.dtype}")
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if value.shape != (batch,):
            raise ValueError(f"{name} must have shape [{batch}], got {tuple(value.shape)}")
        host = None
        if value.is_cuda and device.type == "cuda":
            # Device values are checked by the kernel, which gives a sequence with an
            # out-of-range position a NaN output and no cache write.
            if value.device != device:
                raise ValueError(f"{name} is on {value.device}, the cache is on {device}")
        else:
            if not torch.compiler.is_compiling():  # host values are checked here
                bad = (value < low) | (value > high)
                if bool(bad.any()):
                    raise ValueError(f"{name} holds {value[bad][0].item()}, outside [{low}, {high}]")
                host = value.cpu()
            value = value.to(device)
        return value.contiguous(), 0, host
    if not _is_int(value):
        raise TypeError(f"{name} must be an int or an integer tensor of shape [{batch}], "
                        f"got {type(value).__name__}")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is outside [{low}, {high}]")
    return None, value, value


def _check_start_before_t(start, t):
    """start <= t for every sequence, where the host knows both (ints or CPU tensors)."""
    if start is None or t is None:
        return
    beyond = start > t
    if isinstance(beyond, torch.Tensor):
        if bool(beyond.any()):
            b = int(beyond.nonzero()[0, 0])
            s_b, t_b = (int(x[b]) if isinstance(x, torch.Tensor) else x for x in (start, t))
            raise ValueError(f"start={s_b} is beyond t={t_b} for sequence {b}")
    elif beyond:
        raise ValueError(f"start={start} is beyond t={t}")


def _softcap(softcap):
    """The softcap as the library takes it: a float in SOFTCAP_RANGE, or 0.0 for None."""
    if softcap is None:
        return 0.0
    low, high = SOFTCAP_RANGE
    if not _is_real(softcap) or not low <= softcap <= high:
        raise ValueError(f"softcap must be None or a number in [{low:g}, {high:g}], got {softcap!r}")
    return float(softcap)


def _check_sinks(sinks, heads, dtype, device):
    """Attention sinks as the library takes them: None, or a contiguous [heads] tensor of the
    cache's dtype on its device (read by the kernel where it is: no copy per step)."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be None or a torch.Tensor, got {type(sinks).__name__}")
    if sinks.shape != (heads,) or not sinks.is_contiguous():
        raise ValueError(f"sinks must be a contiguous tensor of shape [{heads}] (one logit per query head), "
                         f"got shape {tuple(sinks.shape)}")
    if sinks.dtype != dtype:
        raise TypeError(f"sinks has dtype {sinks.dtype}, the cache holds {dtype}")
    if sinks.device != device:
        raise ValueError(f"sinks is on {sinks.device}, the cache is on {device}")


def _mark_static(*tensors):
    """Tell torch.compile these buffers keep their address: CUDA graphs replay in-place writes
    only into inputs marked static (as transformers' StaticCache marks its buffers). Skipped
    while tracing, where a buffer allocated mid-graph cannot be marked."""
    if not torch.compiler.is_compiling():
        for x in tensors:
            torch._dynamo.mark_static_address(x, guard=False)


class FastForwardAttn:
    """Decode attention over a preallocated KV cache (see the module docstring)."""

    def __init__(self, K, V, max_len, use_default_kernel_launch=False, *, launch=None, kernel="ffa"):
        """`launch` (a LaunchConfig) fixes the launch instead of the tuner cache or heuristic.
        `kernel="sdpa"` replaces FFA's kernel by what a static-cache user runs instead
        (ops.sdpa_decode_into: two cache copies, then torch's SDPA over the whole cache with a
        mask), to measure what FFA's kernel contributes to a decode loop (bench/hf_generate.py)."""
        _expect_tensor("K", K, (4,))
        _expect_tensor("V", V, (4,))
        if K.shape != V.shape:
            raise ValueError(f"K and V must have the same shape, got {tuple(K.shape)} and {tuple(V.shape)}")
        if K.dtype != V.dtype or K.device != V.device:
            raise TypeError(f"K and V must share dtype and device, got {K.dtype}/{K.device} and {V.dtype}/{V.device}")
        allowed = GPU_DTYPES if K.is_cuda else CPU_DTYPES
        if K.dtype not in allowed:
            raise TypeError(f"K has dtype {K.dtype}; supported on {K.device.type}: "
                            f"{', '.join(str(d) for d in allowed)}")
        batch, kv_heads, prompt_len, head_dim = K.shape
        if kv_heads == 0:
            raise ValueError(f"K must have at least one kv head (dim 1), got shape {tuple(K.shape)}")
        if head_dim not in head_dims():
            raise ValueError(f"K has head_dim {head_dim}; supported: {', '.join(map(str, head_dims()))}")
        if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral):
            raise TypeError(f"max_len must be an int, got {type(max_len).__name__}")
        if not max(prompt_len, 1) <= max_len <= 2**30:
            raise ValueError(f"max_len={max_len} must be in [{max(prompt_len, 1)}, 2**30] (at least the prompt)")
        if K.is_cuda:
            try:
                _lib.check_device(K.device.index)
            except _lib.FFAError as e:
                raise ValueError(f"K is on {K.device}, which FFA cannot run on: {e}") from None

        self.batch, self.kv_heads, self.head_dim, self.max_len = batch, kv_heads, head_dim, int(max_len)
        self.prompt_len = prompt_len
        self.dtype, self.device = K.dtype, K.device
        self._cuda = K.is_cuda
        self.use_default_kernel_launch = bool(use_default_kernel_launch)
        if launch is not None and not isinstance(launch, LaunchConfig):
            raise TypeError(f"launch must be a LaunchConfig, got {type(launch).__name__}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {kernel!r}")
        self.launch, self.kernel = launch, kernel
        shape = (batch, kv_heads, self.max_len, head_dim)
        # FFA's kernel never reads a position it has not written; SDPA's masked rows must hold numbers.
        alloc = torch.zeros if kernel == "sdpa" else torch.empty
        self.k_cache = alloc(shape, dtype=K.dtype, device=K.device)
        self.v_cache = alloc(shape, dtype=K.dtype, device=K.device)
        self.k_cache[:, :, :prompt_len] = K
        self.v_cache[:, :, :prompt_len] = V
        _mark_static(self.k_cache, self.v_cache)
        # Per-process device facts and the tuner's table, read here so that attention() is
        # plain arithmetic that torch.compile can trace.
        self._configs = {}
        self._sm_count = torch.cuda.get_device_properties(K.device).multi_processor_count if K.is_cuda else 1
        capability = torch.cuda.get_device_capability(K.device) if K.is_cuda else (0, 0)
        self._tensor_cores = tensor_cores_apply(self.dtype, self.head_dim, capability)
        self._tma = tma_applies(self.dtype, self.head_dim, capability)
        self._tuned = tuner.load_table(K.device) if K.is_cuda else None
        self._workspaces = {}  # query heads -> split workspace (see _workspace_for)
        self._no_workspace = torch.empty(0, dtype=torch.uint8, device=K.device)
        self._params = {}  # (heads, LaunchConfig) -> ops.launch_params, for eager CUDA steps

    def get_cache(self):
        """The cache tensors [batch, kv_heads, max_len, head_dim] (views, not copies)."""
        return self.k_cache, self.v_cache

    def launch_config(self, heads, length, prune=False):
        """The LaunchConfig used for `heads` query heads at sequence length `length`; `prune`:
        for a step with p > 0, which grouped heads take on tensor cores where they apply (the
        tuner measures p = 0 only)."""
        if self.use_default_kernel_launch:
            return default_launch()
        if self.launch is not None:
            return self.launch
        group = heads // self.kv_heads
        prune = prune and self._tensor_cores and group > 1
        key = (heads, length_bucket(length), prune)
        config = self._configs.get(key)
        if config is None:
            if self._tuned is not None and not prune:
                config = self._tuned.launch(self.dtype, self.head_dim, group, self.batch * self.kv_heads, length,
                                            self.max_len)
            if config is None:
                config = self.heuristic_config(heads, length, prune)
            self._configs[key] = config
        return config

    def heuristic_config(self, heads, length, prune=False):
        """The launch heuristic's choice for `heads` query heads at sequence length `length`
        (for the length's bucket, capped at the cache): what launch_config takes where the
        tuner cache has no entry."""
        group = heads // self.kv_heads
        config = heuristic(self.batch, self.kv_heads, group, min(length_bucket(length), self.max_len), self._sm_count,
                           self.head_dim, self._tensor_cores, prune and self._tensor_cores and group > 1, self._tma)
        return fit_splits(config, self.max_len)

    def prepare(self, heads, p=0.0):
        """Pick the launch and allocate the split workspace for `heads` query heads with
        positions given as device tensors (the CUDA-graph path) and pruning threshold p, so that
        a compiled or captured step that follows allocates nothing. Returns the LaunchConfig."""
        config = self.launch_config(heads, self.max_len, p > 0)
        self._workspace_for(heads, config)
        return config

    def attention(self, q, k, v, softmax_scale=None, t=None, p=0.0, *, start=0, out=None, softcap=None,
                  sinks=None):
        """Append k, v at position t and attend q over start .. t; returns [batch, heads, head_dim]
        (written into `out` when given: a contiguous tensor of that shape and q's dtype). softcap:
        logits s become softcap * tanh(s / softcap) before the softmax (None: not capped). sinks: None,
        or [heads] attention sinks of the cache's dtype, one logit per head in the denominator."""
        _expect_tensor("q", q, (3, 4))
        heads = q.shape[1]
        if heads == 0 or heads % self.kv_heads:
            raise ValueError(f"q has {heads} heads, not a positive multiple of the cache's {self.kv_heads} kv heads")
        _check_rows("q", q, self.batch, heads, self.head_dim, self.dtype, self.device)
        _check_rows("k", k, self.batch, self.kv_heads, self.head_dim, self.dtype, self.device)
        _check_rows("v", v, self.batch, self.kv_heads, self.head_dim, self.dtype, self.device)
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(self.head_dim)
        if not _is_real(softmax_scale) or not math.isfinite(softmax_scale):
            raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale!r}")
        if t is None:
            raise TypeError("t (the position to write and attend up to) is required")
        pos, pos_int, t_host = _positions("t", t, self.batch, self.device, 0, self.max_len - 1)
        start_t, start_int, start_host = _positions("start", start, self.batch, self.device, 0, self.max_len - 1)
        _check_start_before_t(start_host, t_host)
        if not _is_real(p) or not 0.0 <= p < 1.0:
            raise ValueError(f"p must be a number in [0, 1), got {p!r}")
        cap = _softcap(softcap)
        _check_sinks(sinks, heads, self.dtype, self.device)

        shape = (self.batch, heads, self.head_dim)
        if out is None:
            out = q.new_empty(*shape)
        elif not isinstance(out, torch.Tensor) or out.shape != shape or out.dtype != self.dtype \
                or out.device != self.device or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {self.dtype} tensor of shape {shape} on {self.device}")
        if self.batch == 0:  # nothing to write or attend to
            return out

        length = self.max_len if pos is not None else pos_int + 1
        scale, p = float(softmax_scale), float(p)
        if self.kernel == "sdpa":
            if p > 0 or cap or sinks is not None:
                raise ValueError(f"p={p}, softcap={softcap}, sinks {'given' if sinks is not None else 'None'}: "
                                 "pruning, softcapping and sinks need FFA's kernel (kernel='ffa'), not kernel='sdpa'")
            ops.sdpa_decode_into(out, _row_view(q), _row_view(k), _row_view(v), self.k_cache, self.v_cache, pos,
                                 pos_int, start_t, start_int, scale)
            return out
        config = self.launch_config(heads, length, p > 0)
        if self._cuda and not torch.compiler.is_compiling():  # the eager fast path: no op, no views
            ops.cuda_decode(self._launch_params(heads, config), out, q, k, v, pos, pos_int, start_t, start_int,
                            scale, p, cap, sinks)
            return out
        op = ops.decode if torch.compiler.is_compiling() else ops.decode_into
        op(out, _row_view(q), _row_view(k), _row_view(v), self.k_cache, self.v_cache, pos, pos_int, start_t,
           start_int, scale, p, cap, sinks, config.fields(), self._workspace_for(heads, config))
        return out

    def _launch_params(self, heads, config):
        """The fixed fields of an eager CUDA launch (ops.launch_params), built once per head
        count and launch: filling in a copy costs a fraction of building the struct anew."""
        params = self._params.get((heads, config))
        if params is None:
            workspace = self._workspace_for(heads, config)
            params = ops.launch_params(self.k_cache, self.v_cache, heads, config, workspace)
            self._params[heads, config] = params
        return params

    def _workspace_for(self, heads, config):
        """The split workspace for `heads` query heads: one per head count, because its layout
        depends on it. The completion counters at its start (zero between launches) take
        batch x heads ints, and the partial outputs follow right after them: a launch for
        fewer heads would write partials over the counters of a launch for more heads."""
        if not self._cuda or config.split_len == 0:
            return self._no_workspace
        need = ops.workspace_bytes(self.batch, heads, self.head_dim, self.max_len, config)
        workspace = self._workspaces.get(heads)
        if workspace is None or workspace.numel() < need:
            workspace = torch.zeros(need, dtype=torch.uint8, device=self.device)
            self._workspaces[heads] = workspace
            self._params = {key: p for key, p in self._params.items() if key[0] != heads}  # they point into the old one
            _mark_static(workspace)
        return workspace
