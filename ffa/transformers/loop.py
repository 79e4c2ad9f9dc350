"""FFA's own loop for `generate` (greedy search and sampling) on an FFA-enabled model.

Why: in transformers' loop the GPU idles between decode steps. Per token, `generate` runs its
logits processors and stopping criteria in Python and then waits for the GPU (it reads
`unfinished_sequences.max() == 0` on the host) before it queues the next step: 0.28 s of a
0.66 s `generate` at batch 10 on OPT-1.3b even with the step compiled (H100,
bench/results/hf-generate-h100.md); eager steps are worse, bound by Python launching each op.

Here one decode step is: the model's forward (as it is, or under torch.compile with
enable(..., compile=True)), the token choice and the end-of-sequence bookkeeping, all on the
device and, on CUDA, captured once in a CUDA graph. The host replays the graph and reads the
"every row finished" flag a few steps late through pinned memory, so the GPU always has the
next steps queued and never waits for Python.

The loop computes exactly what transformers' loop computes: the same model inputs (prompt
mask, position ids from it, logits of the last position only), float32 logits, EOS suppressed
while fewer than min_new_tokens (or min_length) tokens exist, for sampling transformers' own
temperature / top-k / top-p warpers and torch.multinomial, finished rows padded with
pad_token_id, generation ended when every row has produced an EOS or max_new_tokens tokens
exist, and the same returned ids (with sampling on the CPU, the same draws for the same seed;
in a CUDA graph the draws come from the graph's own random offsets). `plan` admits only these
cases: beams, any other logits processor or stopping criterion, streamers, dictionary outputs,
tensor-parallel and multi-device models go through transformers' loop. On the CPU the same
step runs eagerly (no compile, no graph).
"""

import copy
import inspect
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

# Generation settings this loop reproduces.
HANDLED = {"max_new_tokens", "max_length", "min_new_tokens", "min_length", "eos_token_id", "pad_token_id",
           "bos_token_id", "decoder_start_token_id", "do_sample", "num_beams", "temperature", "top_k", "top_p",
           "_from_model_config", "transformers_version"}
# Settings that may be set only to these values (values without effect on this loop's decoding).
MUST_BE = {"use_cache": True, "output_attentions": False, "output_hidden_states": False, "output_scores": False,
           "output_logits": False, "return_dict_in_generate": False, "num_return_sequences": 1,
           "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
# What transformers uses for these settings when neither the call nor the model sets them
# (GenerationConfig._get_default_generation_params).
DEFAULTS = {"max_length": 20, "min_length": 0, "num_beams": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
# generate() parameters that change the decoding; any of them set sends the call to transformers.
OWN_PARAMETERS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                  "assistant_model", "streamer", "negative_prompt_ids", "negative_prompt_attention_mask",
                  "custom_generate")
# The host reads the "finished" flag this many steps late; the GPU keeps that many steps queued.
STOP_CHECK_LAG = 4


@dataclass
class Plan:
    """What one `generate` call asks for, in the loop's terms."""
    input_ids: torch.Tensor       # [batch, prompt]
    attention_mask: torch.Tensor  # [batch, prompt], 1 = token, 0 = left padding
    new_tokens: int               # at most this many generated tokens
    min_new_tokens: int           # EOS is suppressed until this many exist
    eos: tuple                    # end-of-sequence ids (empty: generation runs to new_tokens)
    pad: int                      # written for rows that have finished
    sampling: tuple = None        # (temperature, top_k, top_p) when sampling; None: greedy search


def merged_config(model, call):
    """The generation config transformers builds for generate(**call): the call's
    generation_config (else an empty one), the model's for what it leaves unset, then the
    call's keywords. Returns it and the keywords that are not settings (transformers' global
    defaults, DEFAULTS here, are left unapplied so that the config's differences from an empty
    one are what the call and the model asked for)."""
    call = dict(call)
    given = call.pop("generation_config", None)
    config = copy.deepcopy(given) if given is not None else GenerationConfig()
    config.update(**model.generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    return config, config.update(**call)


def setting(config, name):
    """A setting of a merged config, transformers' default where it is unset."""
    value = getattr(config, name)
    return DEFAULTS[name] if value is None else value


def plan(model, config, inputs, rest):
    """A Plan when generate() with this merged config, these input ids and `rest` (its
    keywords that are not settings, input ids excluded) is a greedy search or a sampling with
    temperature / top-k / top-p that this loop reproduces exactly, else None (transformers'
    loop then runs it)."""
    rest = dict(rest)
    mask = rest.pop("attention_mask", None)
    if any(rest.pop(name, None) is not None for name in OWN_PARAMETERS) or rest:
        return None  # another decoding, or model inputs this loop does not pass on
    if not _is_supported(config) or _is_distributed(model):
        return None  # (collectives inside the captured step are not validated)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 or inputs.dtype != torch.long:
        return None
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return None  # the loop feeds positions; a model that derives them itself is left to transformers
    prompt = inputs.shape[1]
    if config.max_new_tokens is not None:
        new = config.max_new_tokens
    elif config.max_length is not None:
        new = config.max_length - prompt
    else:  # transformers' default: max_length new tokens, within the model's positions
        positions = getattr(model.config, "max_position_embeddings", None) or prompt + DEFAULTS["max_length"]
        new = min(DEFAULTS["max_length"], positions - prompt)
    if prompt < 1 or new < 1:
        return None
    eos = config.eos_token_id
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    pad = config.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    if mask is None:
        mask = _default_mask(inputs, config.pad_token_id, eos)
    minimum = max(config.min_new_tokens or 0, setting(config, "min_length") - prompt)
    sampling = tuple(setting(config, name) for name in ("temperature", "top_k", "top_p")) if config.do_sample else None
    return Plan(inputs, mask.to(inputs.device, torch.long), new, minimum, eos, pad, sampling)


def _warpers(sampling):
    """transformers' own warpers for these sampling settings, in the order its sampling applies them."""
    temperature, top_k, top_p = sampling
    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    return warpers


def _is_distributed(model):
    """Tensor-parallel ranks and models spread over several devices."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True
    return len(set(getattr(model, "hf_device_map", {}).values())) > 1


def _is_supported(config):
    """Greedy search or plain sampling, no setting this loop does not reproduce."""
    if (config.num_beams or 1) != 1:
        return False
    for key, value in config.to_diff_dict().items():
        if key not in HANDLED and not (key in MUST_BE and value == MUST_BE[key]):
            return False
    return True


def _default_mask(inputs, pad, eos):
    """transformers' mask for a call without one: padding is inferred from pad_token_id when
    the prompt holds it and it is not also an EOS id."""
    if pad is None or pad in eos or not bool((inputs == pad).any()):
        return torch.ones_like(inputs)
    return (inputs != pad).long()


class DecodeStep:
    """One decode step over static buffers (its CUDA graph on the GPU).

    The buffers hold the state between steps: the token to feed and its position, the prompt's
    mask padded with ones to the cache length (the "ffa" mask function reads only each row's
    first valid position from it), which rows are unfinished, how many tokens exist, and the
    generated tokens. `pick` turns the logits of the last position into the next token; the
    prefill's logits go through it too, so the first token follows the same rules. The EOS and
    pad ids and the sampling settings are fixed per step (they are part of its key)."""

    def __init__(self, model, forward, cache, plan):
        batch, eos, device = plan.input_ids.shape[0], plan.eos, model.device
        long = dict(dtype=torch.long, device=device)
        self.model, self.forward, self.cache = model, forward, cache
        self.key = None  # key_of() once the prefill has allocated the cache's buffers
        self.token = torch.zeros(batch, 1, **long)
        self.position = torch.zeros(batch, 1, **long)
        self.mask = torch.ones(batch, cache.max_len, **long)
        self.unfinished = torch.ones(batch, **long)
        self.count = torch.zeros((), **long)        # tokens generated so far
        self.minimum = torch.zeros((), **long)      # min_new_tokens
        self.live_steps = torch.zeros((), **long)   # picks after which some row was unfinished
        self.finished = torch.zeros((), dtype=torch.bool, device=device)
        self.tokens = torch.zeros(batch, cache.max_len, **long)
        self.eos = torch.tensor(eos, **long) if eos else None
        self.eos_columns = None
        self.pad = plan.pad
        self.warpers = _warpers(plan.sampling) if plan.sampling is not None else None
        # Logits of the last position only, where the model can (as generate asks for them).
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self.graph = None

    @staticmethod
    def key_of(cache, plan):
        """What the captured graph depends on: the cache's buffers, the batch size, the EOS and
        pad ids and the sampling settings."""
        layer = cache.layers[0]
        return (id(cache), layer.keys.data_ptr() if layer.is_initialized else None, plan.input_ids.shape[0],
                plan.eos, plan.pad, plan.sampling)

    def start(self, plan):
        """Prefill (eager, the model's own attention), reset the state and pick the first token."""
        prompt = plan.input_ids.shape[1]
        position = plan.attention_mask.cumsum(-1) - 1
        position = position.masked_fill(plan.attention_mask == 0, 0)
        out = self.model(input_ids=plan.input_ids, attention_mask=plan.attention_mask, position_ids=position,
                         past_key_values=self.cache, use_cache=True, return_dict=True, **self.extra)
        self.mask[:, :prompt].copy_(plan.attention_mask)
        self.mask[:, prompt:].fill_(1)
        self.position.copy_(position[:, -1:])
        self.unfinished.fill_(1)
        self.count.zero_()
        self.live_steps.zero_()
        self.minimum.fill_(plan.min_new_tokens)
        self.pick(out.logits[:, -1])

    def pick(self, logits):
        """The next token and the bookkeeping, as transformers' greedy search or sampling does it:
        EOS suppression, the warpers, then the largest score or a draw from the softmax."""
        scores = logits.to(torch.float32)
        if self.eos is not None:
            if self.eos_columns is None:
                self.eos_columns = torch.isin(torch.arange(scores.shape[-1], device=scores.device), self.eos)
            scores = scores.masked_fill(self.eos_columns & (self.count < self.minimum), -float("inf"))
        if self.warpers is None:
            token = scores.argmax(-1)
        else:
            for warper in self.warpers:
                scores = warper(None, scores)  # transformers' warpers do not read the ids
            token = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
        if self.eos is not None:
            token = token * self.unfinished + self.pad * (1 - self.unfinished)
            self.unfinished.mul_(~torch.isin(token, self.eos))
        self.tokens.index_copy_(1, self.count.view(1), token[:, None])
        self.count.add_(1)
        self.finished.copy_(self.unfinished.max() == 0)
        self.live_steps.add_((~self.finished).long())
        self.token.copy_(token[:, None])
        self.position.add_(1)

    def step(self):
        out = self.forward(input_ids=self.token, attention_mask=self.mask, position_ids=self.position,
                           past_key_values=self.cache, use_cache=True, return_dict=True, **self.extra)
        self.pick(out.logits[:, -1])

    def capture(self):
        """Capture one step in a CUDA graph, after two warm-up steps (which compile a compiled
        forward and allocate FFA's split workspaces). The warm-up steps change the state and
        write K/V past the prompt; the state is restored, and those positions are written
        again by the real steps before anything reads them."""
        state = [self.token, self.position, self.unfinished, self.count, self.live_steps, self.finished,
                 self.tokens]
        saved, written = [x.clone() for x in state], self.cache.checkpoint()
        rng = torch.cuda.get_rng_state()  # the warm-up steps' draws must not move a seeded sequence
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.cache.restore(written)  # eager steps count on the host: keep it below max_len
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()
        self.cache.restore(written)
        torch.cuda.set_rng_state(rng)
        for x, value in zip(state, saved):
            x.copy_(value)

    def run(self, plan):
        """Decode plan.new_tokens - 1 steps after start(), stopping early (a few steps late on
        the GPU, harmlessly) once every row has finished. Returns transformers' output."""
        steps = plan.new_tokens - 1
        if self.eos is None:
            for _ in range(steps):
                self.advance()
        else:
            self.run_until_finished(steps)
        length = min(plan.new_tokens, int(self.live_steps) + 1)
        self.cache.count_written(plan.input_ids.shape[1] + length - 1)
        return torch.cat([plan.input_ids, self.tokens[:, :length]], dim=-1)

    def advance(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()

    def run_until_finished(self, steps):
        if self.graph is None:  # CPU: the flag is at hand
            for _ in range(steps):
                if bool(self.finished):
                    return
                self.step()
            return
        flags = [torch.zeros((), dtype=torch.bool, pin_memory=True) for _ in range(STOP_CHECK_LAG)]
        events = [torch.cuda.Event() for _ in range(STOP_CHECK_LAG)]
        for i in range(steps + 1):
            slot = i % STOP_CHECK_LAG
            if i >= STOP_CHECK_LAG:  # the flag copied STOP_CHECK_LAG steps ago
                events[slot].synchronize()
                if bool(flags[slot]):
                    return
            flags[slot].copy_(self.finished, non_blocking=True)
            events[slot].record()
            if i < steps:
                self.graph.replay()


def generate(binding, model, cache, plan):
    """Generation through a DecodeStep kept on the binding while its key holds."""
    on_gpu = model.device.type == "cuda"
    step = binding.decode_step
    if step is None or step.key != DecodeStep.key_of(cache, plan):
        forward = model
        if binding.compile and on_gpu:
            if binding.compiled_forward is None:
                binding.compiled_forward = torch.compile(model, fullgraph=True, dynamic=False)
            forward = binding.compiled_forward
        step = DecodeStep(model, forward, cache, plan)
    step.start(plan)
    # The prefill may have reallocated the cache (the model changed dtype since the capture):
    # a graph over the old buffers must not be replayed.
    key = DecodeStep.key_of(cache, plan)
    if key != step.key:
        step.graph, step.key = None, key
    if plan.new_tokens > 1 and step.graph is None and on_gpu:
        step.capture()
    binding.decode_step = step
    return step.run(plan)
