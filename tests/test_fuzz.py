"""Hostile inputs, property-based (hypothesis): random shapes, dtypes, memory layouts
(non-contiguous, misaligned, overlapping expand() views, the 3-D form), values (NaN and inf
in q/k/v and the prompt, logits of +-1e4), empty batches and prompts, positions of every form
(int, numpy int, int32/int64 tensors on either device, 0-dim tensors, ragged, at both ends),
p at its edges, softcaps from none to 1e-30, attention sinks from -inf to 1e4, and one bad argument at a
time.

Every call either matches a float64 model of the decode step or raises a ValueError or
TypeError whose message names the bad argument, and a rejected call changes nothing. The model
keeps the cache in float64, with NaN in every row never written: the test poisons the real
cache there too (past the prompt it is uninitialized memory), so a read outside start..t
shows. Output row [b, h] must be finite and close to the reference unless a non-finite number
is among its own inputs: q[b, h], or the K/V rows start[b]..t[b] of its kv head. On the GPU, a
device position out of range (or a start beyond t) must give NaN for that sequence and write
nothing.

FFA_FUZZ_EXAMPLES sets the number of sessions (default: 500 on the CPU, 200 on the GPU); the
count of calls tried and their outcomes is printed at the end of the run.
"""

import collections
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

from cases import pruning_bound
from ffa import FastForwardAttn, LaunchConfig
from ffa.launch import features_apply, head_dims, tensor_cores_apply, thread_counts, tma_applies, tma_max_threads
from ffa.reference import decode_reference
from test_gpu_kernel import TOL as GPU_TOL

TOL = {torch.float64: 1e-12, **GPU_TOL}  # output error allowed, relative to the largest |v|
# Logit error allowed, relative to scale * sum |q_i k_i| (float32 or float64 accumulation).
LOGIT_TOL = {torch.float64: 1e-13, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
DTYPES = {"cpu": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
          "cuda": [torch.float16, torch.bfloat16, torch.float32]}
EXAMPLES = {"cpu": 500, "cuda": 200}
# (stages, tile_rows) of the TMA launches drawn: each fits a block's shared memory at every head_dim
# (4 stages of 64 rows at head_dim 256 would not: the library refuses that as UnsupportedError).
TMA_RINGS = [(2, 32), (3, 32), (4, 32), (3, 64)]
LAYOUTS = ["contiguous", "permuted", "strided", "offset", "expanded"]
TRIED = collections.Counter()


def fuzz_settings(device):
    return settings(max_examples=int(os.environ.get("FFA_FUZZ_EXAMPLES", EXAMPLES[device])), deadline=None,
                    database=None, print_blob=True, suppress_health_check=list(HealthCheck))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one CPU thread


@pytest.fixture(scope="module", autouse=True)
def report_counts(pytestconfig):
    """Prints how many sessions and calls were tried, and their outcomes, after the module."""
    yield
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    for device in ("cpu", "cuda"):
        if TRIED[device, "sessions"]:
            outcomes = ", ".join(f"{n} {what}" for (d, what), n in sorted(TRIED.items())
                                 if d == device and what not in ("sessions", "calls"))
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"\ntest_fuzz [{device}]: {TRIED[device, 'sessions']} sessions, "
                                    f"{TRIED[device, 'calls']} calls: {outcomes}")


def tally(device, outcome):
    TRIED[device, outcome] += 1
    TRIED[device, "calls"] += 1
    event(outcome)


# ---- building inputs -----------------------------------------------------------------------

def lay_out(x, layout, expand_dim=0):
    """x (4-D, contiguous) in another memory layout; "expanded" changes the values too: every
    slice along expand_dim becomes the first one, all read from the same memory."""
    if layout == "permuted":  # heads outermost in memory
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "strided":  # every other element of a wider buffer
        wide = x.new_zeros(*x.shape[:-1], 2 * x.shape[-1])
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "offset":  # one element past an aligned address
        flat = x.new_empty(x.numel() + 1)
        flat[1:] = x.reshape(-1)
        return flat[1:].view(x.shape)
    if layout == "expanded" and x.shape[expand_dim]:
        return x.narrow(expand_dim, 0, 1).expand_as(x)
    return x


def make_values(shape, gen, magnitude, dtype, device, specials):
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * magnitude
    flat = x.view(-1)
    for where, value in specials:
        if flat.numel():
            flat[int(where * flat.numel())] = value
    return x.to(device, dtype)


@dataclass
class Session:
    device: str
    dtype: torch.dtype
    batch: int
    kv_heads: int
    group: int
    head_dim: int
    prompt_len: int
    max_len: int
    launch: object  # "heuristic", "default" or a LaunchConfig
    layout: str
    magnitude: float
    seed: int
    steps: int
    specials: list

    @property
    def heads(self):
        return self.kv_heads * self.group


SPECIAL = st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from([math.nan, math.inf, -math.inf]))


@st.composite
def sessions(draw, device):
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    long = draw(st.sampled_from([False] * 4 + [True]))  # past one 256-row sub-chunk of the kernel
    prompt_len = draw(st.integers(250, 300) if long else st.integers(0, 24))
    launch = draw(st.one_of(st.sampled_from(["heuristic", "default"]), st.builds(
        LaunchConfig, st.sampled_from(thread_counts()),
        st.sampled_from([d for d in range(1, min(group, 8) + 1) if group % d == 0]),
        st.sampled_from([0, 16, 48, 64])), st.builds(  # the tensor-core kernel (heuristic where it does not apply)
        lambda threads, hpb, split, pdl, cluster: LaunchConfig(threads, hpb, split, tensor_cores=True, pdl=pdl,
                                                               cluster=cluster if split else 1),
        st.sampled_from(thread_counts()), st.sampled_from([d for d in range(1, min(group, 8) + 1) if group % d == 0]),
        st.sampled_from([0, 16, 48, 64]), st.booleans(), st.sampled_from([1, 2, 4])), st.builds(
        # the TMA kernel (heuristic where it does not apply)
        lambda threads, split, ring, pdl, cluster: LaunchConfig(threads, group, split, tma=True, stages=ring[0],
                                                                tile_rows=ring[1], pdl=pdl,
                                                                cluster=cluster if split else 1),
        st.sampled_from(thread_counts()), st.sampled_from([0, 16, 48, 64]),
        st.sampled_from(TMA_RINGS), st.booleans(), st.sampled_from([1, 2, 8]))))
    return Session(
        device=device, dtype=draw(st.sampled_from(DTYPES[device])), batch=draw(st.integers(0, 3)),
        kv_heads=draw(st.integers(1, 3)), group=group, head_dim=draw(st.sampled_from(head_dims())),
        prompt_len=prompt_len, max_len=draw(st.integers(max(prompt_len, 1), prompt_len + 40)), launch=launch,
        layout=draw(st.sampled_from(LAYOUTS)), magnitude=draw(st.sampled_from([1.0, 1e-3, 30.0])),
        seed=draw(st.integers(0, 2**32 - 1)), steps=draw(st.integers(1, 3)),
        specials=draw(st.lists(st.tuples(st.sampled_from("KV"), SPECIAL), max_size=2)))


def prompt(s, gen):
    """The constructor's arguments: K, V [batch, kv_heads, prompt_len, head_dim] in s.layout."""
    kv = []
    for name in "KV":
        x = make_values((s.batch, s.kv_heads, s.prompt_len, s.head_dim), gen, s.magnitude, s.dtype, s.device,
                        [sp for n, sp in s.specials if n == name])
        kv.append(lay_out(x, s.layout))
    launch = s.launch if isinstance(s.launch, LaunchConfig) else None
    capability = torch.cuda.get_device_capability() if s.device == "cuda" else (0, 0)
    if launch is not None and launch.tma and (not tma_applies(s.dtype, s.head_dim, capability)
                                              or launch.threads > tma_max_threads(s.head_dim)):
        launch = None  # the library refuses it on this GPU or at this head_dim: the heuristic's instead
    if launch is not None and launch.tensor_cores and not (
            tensor_cores_apply(s.dtype, s.head_dim, capability)
            and (features_apply("tensor_cores", capability) or not (launch.pdl or launch.cluster > 1))):
        launch = None
    return dict(K=kv[0], V=kv[1], max_len=s.max_len, use_default_kernel_launch=s.launch == "default",
                launch=launch)


# ---- the model -------------------------------------------------------------------------------

class Model:
    """The cache in float64 (NaN where never written) and the expected result of a step."""

    def __init__(self, s, K, V):
        shape = (s.batch, s.kv_heads, s.max_len, s.head_dim)
        self.s = s
        self.k = torch.full(shape, math.nan, dtype=torch.float64)
        self.v = self.k.clone()
        self.k[:, :, :s.prompt_len] = K.double().cpu()
        self.v[:, :, :s.prompt_len] = V.double().cpu()
        self.filled = torch.full((s.batch,), s.prompt_len)  # rows 0 .. filled-1 hold data

    def step(self, q, k, v, scale, t, start, p, softcap, sinks, valid):
        """Writes the new rows of the valid sequences; returns (expected output, allowed error,
        rows that may be anything) for q [b, h, d], t and start int64 [b], valid bool [b], sinks
        None or float64 [h]."""
        s, rows = self.s, valid.nonzero()[:, 0]
        self.k[rows, :, t[rows]] = k[rows]
        self.v[rows, :, t[rows]] = v[rows]
        for b in rows.tolist():
            if t[b] == self.filled[b]:
                self.filled[b] += 1
        expected = torch.full((s.batch, s.heads, s.head_dim), math.nan, dtype=torch.float64)
        allowed = torch.zeros_like(expected)
        free = ~valid[:, None].expand(s.batch, s.heads).clone()  # invalid sequences: NaN checked apart
        if rows.numel() == 0:
            return expected, allowed, free
        tv, sv = t[rows], start[rows]
        length = int(tv.max()) + 1
        positions = torch.arange(length)
        attended = (positions >= sv[:, None]) & (positions <= tv[:, None])  # [n, length]
        keys, values = self.k[rows, :, :length], self.v[rows, :, :length]
        clean_k = keys.masked_fill(~attended[:, None, :, None], 0)  # the reference's inputs
        clean_v = values.masked_fill(~attended[:, None, :, None], 0)
        qr = q[rows]
        expected[rows] = decode_reference(qr, k[rows], v[rows], clean_k.clone(), clean_v.clone(), tv, sv, scale, p,
                                          softcap or 0.0, sinks)

        bad_rows = ~(keys.isfinite().all(-1) & values.isfinite().all(-1)) & attended[:, None]
        tainted = bad_rows.any(-1).repeat_interleave(s.group, 1) | ~qr.isfinite().all(-1)
        free[rows] = tainted
        qg = qr.abs().view(len(rows), s.kv_heads, s.group, s.head_dim)
        abs_logit = abs(scale) * torch.einsum("bkgd,bkld->bkgl", qg, clean_k.abs()).amax(-1).flatten(1)
        vmax = clean_v.abs().amax((-1, -2)).repeat_interleave(s.group, 1)
        bound = vmax * (TOL[s.dtype] + LOGIT_TOL[s.dtype] * abs_logit)
        allowed[rows] = bound[..., None].expand(-1, -1, s.head_dim)
        if p > 0:  # rows whose weight is within 0.1% of p may go either way
            allowed[rows] += pruning_bound(qr[:, :, None], clean_k, clean_v, tv, sv, scale, p * (1 + 1e-3),
                                           softcap or 0.0, sinks)
        return expected, allowed, free


# ---- one step's call -------------------------------------------------------------------------

def positions_arg(values, scalar, form, device):
    """values (int64 [b], all equal to `scalar` for the scalar forms) as an attention() argument."""
    if form == "int":
        return scalar
    if form == "numpy":
        return np.int64(scalar)
    if form == "scalar tensor":
        return torch.tensor(scalar, device=device)
    on = "cpu" if form.startswith("host") else device
    return values.to(on, torch.int32 if form.endswith("32") else torch.int64)


SCALAR_FORMS = ["int", "numpy", "scalar tensor"]
TENSOR_FORMS = {"cpu": ["int64", "int32"], "cuda": ["int64", "int32", "host64", "host32"]}


def on_device(x):
    return isinstance(x, torch.Tensor) and x.is_cuda


@st.composite
def step_positions(draw, s, filled):
    """(t, start) as attention() arguments and as int64 tensors [batch], for the next step:
    mostly at or before the first unwritten row of each sequence (so every attended row holds
    data), sometimes anywhere; on the GPU sometimes out of range in a device tensor."""
    last = s.max_len - 1
    reach = [last] * s.batch if draw(st.integers(0, 4)) == 0 else [min(int(f), last) for f in filled]
    if s.batch and draw(st.booleans()):
        t = [draw(st.integers(0, r)) for r in reach]
        t_scalar, t_form = None, draw(st.sampled_from(TENSOR_FORMS[s.device]))
    else:
        t_scalar = draw(st.integers(0, min(reach, default=last)))
        t = [t_scalar] * s.batch
        t_form = draw(st.sampled_from(SCALAR_FORMS + TENSOR_FORMS[s.device]))
    start_form = draw(st.sampled_from(["default"] + SCALAR_FORMS + TENSOR_FORMS[s.device]))
    start_scalar = 0 if start_form == "default" else None
    if start_form in SCALAR_FORMS:
        start_scalar = draw(st.integers(0, min(t, default=0)))
    start = [start_scalar] * s.batch if start_scalar is not None else [draw(st.integers(0, x)) for x in t]
    if s.device == "cuda" and s.batch and t_form in ("int64", "int32") and draw(st.integers(0, 5)) == 0:
        b = draw(st.integers(0, s.batch - 1))  # out of range on the device: NaN, no write
        t[b] = draw(st.sampled_from([-1, s.max_len, 2**31 - 1 if t_form == "int32" else 2**40]))
    t, start = torch.tensor(t, dtype=torch.long), torch.tensor(start, dtype=torch.long)
    args = {"t": positions_arg(t, t_scalar, t_form, s.device)}
    if start_form != "default":
        args["start"] = positions_arg(start, start_scalar, start_form, s.device)
    return args, t, start


@st.composite
def step_calls(draw, s, model):
    """A valid attention() call: (kwargs, t values, start values, valid mask)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    specials = draw(st.lists(st.tuples(st.sampled_from("qkv"), SPECIAL), max_size=2))
    args = {}
    for name, heads in (("q", s.heads), ("k", s.kv_heads), ("v", s.kv_heads)):
        x = make_values((s.batch, heads, 1, s.head_dim), gen, s.magnitude, s.dtype, s.device,
                        [sp for n, sp in specials if n == name])
        layout = draw(st.sampled_from(LAYOUTS))
        x = lay_out(x, layout, expand_dim=1 if name == "q" else 0)  # one query for all heads
        args[name] = x[:, :, 0] if draw(st.booleans()) else x
    positions, t, start = draw(step_positions(s, model.filled))
    args.update(positions)
    args["p"] = draw(st.one_of(st.sampled_from([0.0, 1e-6, 0.01, 0.3, math.nextafter(1.0, 0.0)]),
                               st.floats(0, 1, exclude_max=True)))
    scale = draw(st.sampled_from([None, 1 / math.sqrt(s.head_dim), 0.0, "logits +1e4", "logits -1e4"]))
    if isinstance(scale, str):  # the largest |logit| of the step becomes 1e4, of either sign
        scale = (1e4 if "+" in scale else -1e4) / largest_dot(args, s, model, t, start)
    if scale is not None:
        args["softmax_scale"] = scale
    softcap = draw(st.sampled_from([None, None, None, 30.0, 1.0, 1e-30]))
    if softcap is not None:  # capping is a contraction: the logits' error bound holds for capped logits
        args["softcap"] = softcap
    sinks = draw(st.sampled_from([None, None, None, "random", "edges"]))
    if sinks == "random":  # from little weight to most of it
        args["sinks"] = (math.log(s.prompt_len + 1) + 3 * torch.randn(s.heads, generator=gen, dtype=torch.float64)
                         ).to(s.device, s.dtype)
    elif sinks == "edges":  # no weight, and (where the logits are of order 1) all of it
        edges = torch.tensor([-math.inf, -1e4, 0.0, 1e4], dtype=torch.float64)
        args["sinks"] = edges[torch.arange(s.heads) % 4].to(s.device, s.dtype)
    if draw(st.booleans()):
        args["out"] = torch.full((s.batch, s.heads, s.head_dim), math.nan, dtype=s.dtype, device=s.device)
    device_positions = on_device(args["t"]) or on_device(args.get("start"))
    valid = (t >= 0) & (t < s.max_len) & (start <= t) if device_positions else torch.ones(s.batch, dtype=torch.bool)
    return args, t, start, valid


def rows3(x):
    return (x[:, :, 0] if x.dim() == 4 else x).double().cpu()


def largest_dot(args, s, model, t, start):
    """max |q . k| over the rows the step attends to (1 when there are none, or it is 0 or inf)."""
    best = 0.0
    q, k = rows3(args["q"]), rows3(args["k"])
    for b in range(s.batch):
        if not 0 <= start[b] <= t[b] < s.max_len:
            continue
        keys = model.k[b, :, start[b]:t[b] + 1].clone()
        keys[:, -1] = k[b]
        dots = torch.einsum("kgd,kld->kgl", q[b].view(s.kv_heads, s.group, -1), keys).abs()
        best = max(best, float(dots.nan_to_num(0, 0, 0).max()))
    return best if 0 < best < math.inf else 1.0


# ---- bad arguments ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Bad:
    """One bad argument: `make(s, x)` turns x, the argument's good value, into a bad one (for
    every name in `keys`); the call must raise `exc` with a message naming `name`."""
    label: str
    keys: tuple
    make: object
    exc: type
    name: str
    applies: object = lambda s: True


def other_dtype(s):
    return torch.float32 if s.dtype != torch.float32 else torch.float16


def bad(label, keys, make, exc, name=None, applies=lambda s: True):
    return Bad(label, tuple(keys.split(",")), make, exc, name or keys, applies)


def each(label, key, values, exc):
    return [bad(f"{label} {x!r}", key, lambda s, _, x=x: x, exc) for x in values]


ON_GPU = lambda s: s.device == "cuda"
MULTI_GPU = lambda s: s.device == "cuda" and torch.cuda.device_count() > 1
HAS_BATCH = lambda s: s.batch > 0
BAD_CALLS = [
    bad("q not a tensor", "q", lambda s, x: x.tolist(), TypeError),
    bad("q dtype", "q", lambda s, x: x.to(other_dtype(s)), TypeError),
    bad("q head_dim", "q", lambda s, x: x[..., : s.head_dim // 2], ValueError),
    bad("q 2 positions", "q", lambda s, x: x.new_zeros(s.batch, s.heads, 2, s.head_dim), ValueError),
    bad("q 2-D", "q", lambda s, x: x.reshape(-1, s.head_dim), ValueError),
    bad("q batch", "q", lambda s, x: x.new_zeros(s.batch + 1, s.heads, s.head_dim), ValueError),
    bad("q no heads", "q", lambda s, x: x.new_zeros(s.batch, 0, s.head_dim), ValueError),
    bad("q heads not a multiple", "q", lambda s, x: x.new_zeros(s.batch, s.heads + 1, 1, s.head_dim), ValueError,
        applies=lambda s: s.kv_heads > 1),
    bad("q on the CPU", "q", lambda s, x: x.cpu(), ValueError, applies=ON_GPU),
    bad("q on another GPU", "q", lambda s, x: x.to("cuda:1"), ValueError, applies=MULTI_GPU),
    bad("k not a tensor", "k", lambda s, x: 1.0, TypeError),
    bad("k dtype", "k", lambda s, x: x.to(other_dtype(s)), TypeError),
    bad("k heads", "k", lambda s, x: x.new_zeros(s.batch, s.kv_heads + 1, s.head_dim), ValueError),
    bad("v batch", "v", lambda s, x: x.new_zeros(s.batch + 1, s.kv_heads, 1, s.head_dim), ValueError),
    bad("v on the CPU", "v", lambda s, x: x.cpu(), ValueError, applies=ON_GPU),
    *each("softmax_scale", "softmax_scale", (math.nan, math.inf, -math.inf, "0.1", torch.tensor(0.1), 1j),
          ValueError),
    *each("t", "t", (None, 3.0, True, "3"), TypeError),
    *[bad(f"t {d}", "t", lambda s, x, d=d: torch.zeros(s.batch, dtype=d), TypeError)
      for d in (torch.float32, torch.int16, torch.uint8, torch.bool)],
    bad("t length", "t", lambda s, x: torch.zeros(s.batch + 1, dtype=torch.long), ValueError),
    bad("t 2-D", "t", lambda s, x: torch.zeros(s.batch, 1, dtype=torch.long), ValueError),
    bad("t = max_len", "t", lambda s, x: s.max_len, ValueError),
    *each("t", "t", (-1, 2**63 - 1), ValueError),
    bad("t host tensor at max_len", "t", lambda s, x: torch.full((s.batch,), s.max_len), ValueError,
        applies=HAS_BATCH),
    bad("t on another GPU", "t", lambda s, x: torch.zeros(s.batch, dtype=torch.long, device="cuda:1"), ValueError,
        applies=MULTI_GPU),
    bad("start 1.5", "start", lambda s, x: 1.5, TypeError),
    bad("start float tensor", "start", lambda s, x: torch.zeros(s.batch), TypeError),
    bad("start length", "start", lambda s, x: torch.zeros(s.batch + 2, dtype=torch.long), ValueError),
    *each("start", "start", (-1, 2**40), ValueError),
    *each("p", "p", (1.0, -1e-9, math.nan, math.inf, True, None, "0.1", torch.tensor(0.1)), ValueError),
    *each("softcap", "softcap", (0.0, -1.0, math.nan, math.inf, 1e31, "30", True), ValueError),
    bad("sinks not a tensor", "sinks", lambda s, x: [0.0] * s.heads, TypeError),
    bad("sinks shape", "sinks", lambda s, x: torch.zeros(s.heads + 1, dtype=s.dtype, device=s.device), ValueError),
    bad("sinks per kv head", "sinks", lambda s, x: torch.zeros(s.kv_heads, dtype=s.dtype, device=s.device),
        ValueError, applies=lambda s: s.group > 1),
    bad("sinks dtype", "sinks", lambda s, x: torch.zeros(s.heads, dtype=other_dtype(s), device=s.device), TypeError),
    bad("sinks on the CPU", "sinks", lambda s, x: torch.zeros(s.heads, dtype=s.dtype), ValueError, applies=ON_GPU),
    bad("out shape", "out", lambda s, x: torch.empty(s.batch, s.heads, s.head_dim + 1, dtype=s.dtype,
                                                      device=s.device), ValueError),
    bad("out dtype", "out", lambda s, x: torch.empty(s.batch, s.heads, s.head_dim, dtype=other_dtype(s),
                                                      device=s.device), ValueError),
    bad("out strided", "out", lambda s, x: torch.empty(s.batch, s.heads, 2 * s.head_dim, dtype=s.dtype,
                                                        device=s.device)[..., ::2], ValueError, applies=HAS_BATCH),
    bad("out not a tensor", "out", lambda s, x: [], ValueError),
    bad("out on the CPU", "out", lambda s, x: torch.empty(s.batch, s.heads, s.head_dim, dtype=s.dtype),
        ValueError, applies=ON_GPU),
]
# A host start one past the smallest host t; the session decides whether it applies.
START_BEYOND_T = bad("start beyond t", "start", None, ValueError)

BAD_CONSTRUCTIONS = [
    bad("K not a tensor", "K", lambda s, x: x.tolist(), TypeError),
    bad("K 3-D", "K", lambda s, x: x.new_zeros(s.batch, s.kv_heads, s.head_dim), ValueError),
    bad("K int", "K", lambda s, x: x.to(torch.int32), TypeError),
    bad("no kv heads", "K,V", lambda s, x: x[:, :0], ValueError, "K"),
    bad("float64 on the GPU", "K,V", lambda s, x: x.double(), TypeError, "K", applies=ON_GPU),
    bad("head_dim 72", "K,V", lambda s, x: x.new_zeros(s.batch, s.kv_heads, s.prompt_len, 72), ValueError,
        "head_dim"),
    bad("V shape", "V", lambda s, x: x.new_zeros(s.batch, s.kv_heads, s.prompt_len + 1, s.head_dim), ValueError),
    bad("V dtype", "V", lambda s, x: x.to(other_dtype(s)), TypeError),
    bad("V on the CPU", "V", lambda s, x: x.cpu(), TypeError, applies=ON_GPU),
    bad("max_len below the prompt", "max_len", lambda s, x: s.prompt_len - 1, ValueError,
        applies=lambda s: s.prompt_len > 1),
    *each("max_len", "max_len", (0, 2**31), ValueError),
    *each("max_len", "max_len", (16.0, True, None), TypeError),
    bad("launch a tuple", "launch", lambda s, x: (128, 1, 0), TypeError),
]


def names(message, name):
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message) is not None


def expect_rejected(call, bad, device):
    try:
        call()
    except (ValueError, TypeError) as e:
        assert isinstance(e, bad.exc), f"{bad.label}: {type(e).__name__} instead of {bad.exc.__name__}: {e}"
        assert names(str(e), bad.name), f"{bad.label}: the message does not name {bad.name!r}: {e}"
        tally(device, f"raised {bad.exc.__name__}")
        return
    raise AssertionError(f"{bad.label}: accepted")


# ---- the property ----------------------------------------------------------------------------

def same_cache(f, model):
    for real, want in zip(f.get_cache(), (model.k, model.v)):
        real = real.double().cpu()
        assert bool(((real == want) | (real.isnan() & want.isnan())).all()), "the cache differs from the model"


def run_session(data, device):
    s = data.draw(sessions(device), label="session")
    TRIED[device, "sessions"] += 1
    gen = torch.Generator().manual_seed(s.seed)
    ctor = prompt(s, gen)
    usable = [b for b in BAD_CONSTRUCTIONS if b.applies(s)]
    if data.draw(st.integers(0, 9), label="bad constructor?") == 0:
        wrong = data.draw(st.sampled_from(usable), label="bad constructor")
        ctor.update({key: wrong.make(s, ctor[key]) for key in wrong.keys})
        expect_rejected(lambda: FastForwardAttn(**ctor), wrong, device)
        return
    f = FastForwardAttn(**ctor)
    for cache in f.get_cache():  # uninitialized past the prompt: make any read of it show
        cache[:, :, s.prompt_len:] = math.nan
    model = Model(s, ctor["K"], ctor["V"])

    for _ in range(s.steps):
        args, t, start, valid = data.draw(step_calls(s, model), label="call")
        start_can_pass_t = not on_device(args["t"]) and s.batch > 0 and int(t.min()) < s.max_len - 1
        usable = [b for b in BAD_CALLS if b.applies(s)] + ([START_BEYOND_T] if start_can_pass_t else [])
        if data.draw(st.integers(0, 2), label="bad call?") == 0:
            wrong = data.draw(st.sampled_from(usable), label="bad call")
            for key in wrong.keys:
                args[key] = int(t.min()) + 1 if wrong is START_BEYOND_T else wrong.make(s, args.get(key))
            expect_rejected(lambda: f.attention(**args), wrong, device)
            same_cache(f, model)  # a rejected call changes nothing
            continue

        q, k, v = (rows3(args[n]) for n in "qkv")
        scale = args.get("softmax_scale", 1 / math.sqrt(s.head_dim))
        sinks = args["sinks"].double().cpu() if "sinks" in args else None
        expected, allowed, free = model.step(q, k, v, scale, t, start, args["p"], args.get("softcap"), sinks, valid)
        out = f.attention(**args)
        if "out" in args:
            assert out is args["out"]
        assert out.shape == (s.batch, s.heads, s.head_dim) and out.dtype == s.dtype and out.device.type == device
        same_cache(f, model)
        got = out.double().cpu()
        assert got[~valid].isnan().all(), "a sequence with a device position out of range got a number"
        checked = ~free
        assert got[checked].isfinite().all(), "non-finite output for finite inputs"
        excess = ((got - expected).abs() - allowed)[checked]
        assert excess.numel() == 0 or excess.max() <= 0, f"output off the reference by {excess.max():.3g} too much"
        tally(device, "matched the reference" if checked.any() or s.batch == 0 else "non-finite inputs")


@fuzz_settings("cpu")
@given(data=st.data())
def test_hostile_inputs_cpu(data):
    run_session(data, "cpu")


@pytest.mark.gpu
@fuzz_settings("cuda")
@given(data=st.data())
def test_hostile_inputs_gpu(data):
    run_session(data, "cuda")
