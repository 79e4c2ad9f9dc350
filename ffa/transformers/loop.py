"""FFA's own loop for `generate` (greedy search and sampling) on an FFA-enabled model.

Why: in transformers' loop the GPU idles between decode steps. Per token, `generate` runs its
logits processors and stopping criteria in Python and then waits for the GPU (it reads
`unfinished_sequences.max() == 0` on the host) before it queues the next step: 0.28 s of a
0.66 s `generate` at batch 10 on OPT-1.3b even with the step compiled (H100,
bench/results/h100/hf-generate-h100.md); eager steps are worse, bound by Python launching each op.

Here one decode step is: the model's forward (as it is, or under torch.compile with
enable(..., compile=True)), the token choice and the end-of-sequence bookkeeping, all on the
device and, on CUDA, captured once in a CUDA graph. The host replays the graph and reads the
"every row finished" flag a few steps late through pinned memory, so the GPU always has the
next steps queued and never waits for Python.

The loop computes exactly what transformers' loop computes: the same model inputs (prompt
mask, position ids from it, logits of the last position only), float32 logits, the repetition
penalty over every id of the sequence so far (prompt and padding included), EOS suppressed
while fewer than min_new_tokens (or min_length) tokens exist, for sampling transformers' own
temperature / top-k / top-p warpers and torch.multinomial, finished rows padded with
pad_token_id when there are EOS ids, a row finished by one of its EOS ids or a stop string
(transformers' StopStringCriteria, on the last ids of the sequence), generation ended when
every row has finished or max_new_tokens tokens exist, and the same returned ids (with
sampling on the CPU, the same draws for the same seed; in a CUDA graph the draws come from the
graph's own random offsets). A streamer gets what transformers' loop gives it: the prompt,
then each step's tokens (on the GPU with the stop flag, a few steps late), then end(). `plan`
admits only these cases: beams, any other logits processor or stopping criterion (max_time
included), dictionary outputs, tensor-parallel and multi-device models go through
transformers' loop. On the CPU the same step runs eagerly (no compile, no graph).
"""

import copy
import inspect
from dataclasses import dataclass

import torch
from transformers import (GenerationConfig, RepetitionPenaltyLogitsProcessor, StopStringCriteria,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

# Generation settings this loop reproduces.
HANDLED = {"max_new_tokens", "max_length", "min_new_tokens", "min_length", "eos_token_id", "pad_token_id",
           "bos_token_id", "decoder_start_token_id", "do_sample", "num_beams", "temperature", "top_k", "top_p",
           "repetition_penalty", "stop_strings", "_from_model_config", "transformers_version"}
# Settings that may be set only to these values (values without effect on this loop's decoding).
MUST_BE = {"use_cache": True, "output_attentions": False, "output_hidden_states": False, "output_scores": False,
           "output_logits": False, "return_dict_in_generate": False, "num_return_sequences": 1,
           "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
# What transformers uses for these settings when neither the call nor the model sets them
# (GenerationConfig._get_default_generation_params).
DEFAULTS = {"max_length": 20, "min_length": 0, "num_beams": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
# generate() parameters that change the decoding; any of them set sends the call to transformers.
OWN_PARAMETERS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                  "assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate")
# The host reads the "finished" flag and the streamed tokens this many steps late; the GPU
# keeps that many steps queued.
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
    repetition_penalty: float = None  # None: no penalty
    stop_strings: tuple = None    # a row ends once its text ends with one of them (needs `tokenizer`)
    tokenizer: object = None
    streamer: object = None       # transformers' BaseStreamer interface: put(ids), end()


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
    mask, streamer, tokenizer = (rest.pop(name, None) for name in ("attention_mask", "streamer", "tokenizer"))
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
    penalty = config.repetition_penalty
    if penalty is not None and penalty != 1.0:
        penalty = RepetitionPenaltyLogitsProcessor(penalty=penalty).penalty  # transformers' checks of the value
    else:
        penalty = None
    stop_strings = config.stop_strings
    if stop_strings is not None:
        if tokenizer is None:
            return None  # transformers' loop says what is missing
        stop_strings = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings)
    return Plan(inputs, mask.to(inputs.device, torch.long), new, minimum, eos, pad, sampling, penalty, stop_strings,
                tokenizer, streamer)


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
    first valid position from it), which rows are unfinished, how many tokens exist, the ids
    of the sequence (prompt, then generated tokens; with stop strings, after a margin of ids
    that match nothing, so that the last ids are always a window of one length) and, with a
    repetition penalty, which ids the sequence holds. `pick` turns the logits of the last
    position into the next token; the prefill's logits go through it too, so the first token
    follows the same rules. The EOS and pad ids, the sampling settings, the penalty and the stop
    strings are fixed per step (they are part of its key)."""

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
        self.eos = torch.tensor(eos, **long) if eos else None
        self.eos_columns = None
        self.pad = plan.pad
        self.warpers = _warpers(plan.sampling) if plan.sampling is not None else None
        self.penalty = plan.repetition_penalty
        self.seen = None  # bool [batch, vocab], allocated at the first prefill (the vocabulary from its logits)
        self.stop, self.tokenizer, margin = None, None, 0
        if plan.stop_strings is not None:
            self.stop, self.tokenizer = StopStringCriteria(plan.tokenizer, plan.stop_strings), plan.tokenizer
            margin = self.stop.maximum_token_len
            # The criterion clamps ids past its table to the table's last row, which matches nothing.
            self.no_match = self.stop.embedding_vec.shape[0] - 1
            self.window = torch.arange(-margin, 0, device=device)
        self.margin = margin
        self.ids = torch.zeros(batch, margin + cache.max_len, **long)
        self.end = torch.zeros((), **long)          # where the next id goes in self.ids
        # Logits of the last position only, where the model can (as generate asks for them).
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self.graph = None
        self.uncapturable = None  # why the step cannot be captured, once a capture has failed

    @staticmethod
    def key_of(cache, plan):
        """What the captured graph depends on: the cache's buffers (FFACache.storage), the batch
        size, the EOS and pad ids, the sampling settings, the penalty, the stop strings and their
        tokenizer."""
        stop = (plan.stop_strings, id(plan.tokenizer)) if plan.stop_strings is not None else None
        return (id(cache), cache.storage(), plan.input_ids.shape[0], plan.eos, plan.pad, plan.sampling,
                plan.repetition_penalty, stop)

    def start(self, plan):
        """Prefill (eager, the model's own attention), reset the state and pick the first token."""
        if plan.streamer is not None:
            plan.streamer.put(plan.input_ids.cpu())
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
        if self.margin:
            self.ids[:, :self.margin].fill_(self.no_match)
        self.ids[:, self.margin:self.margin + prompt].copy_(plan.input_ids)
        self.end.fill_(self.margin + prompt)
        if self.penalty is not None:
            if self.seen is None:
                self.seen = torch.zeros(out.logits.shape[0], out.logits.shape[-1], dtype=torch.bool,
                                        device=self.ids.device)
            self.seen.zero_().scatter_(1, plan.input_ids, True)
        self.pick(out.logits[:, -1])

    def pick(self, logits):
        """The next token and the bookkeeping, as transformers' greedy search or sampling does it:
        the repetition penalty, EOS suppression, the warpers, then the largest score or a draw
        from the softmax; then the stopping criteria (EOS ids, stop strings)."""
        scores = logits.to(torch.float32)
        if self.penalty is not None:  # RepetitionPenaltyLogitsProcessor's arithmetic, on the ids seen
            penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            scores = torch.where(self.seen, penalized, scores)
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
        self.ids.index_copy_(1, self.end.view(1), token[:, None])
        self.end.add_(1)
        if self.seen is not None:
            self.seen.scatter_(1, token[:, None], True)
        if self.eos is not None:
            self.unfinished.mul_(~torch.isin(token, self.eos))
        if self.stop is not None:
            self.unfinished.mul_(~self.stop(self.ids.index_select(1, self.end + self.window), None))
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
        again by the real steps before anything reads them. A step that cannot be captured (a
        model operation that copies from pageable host memory, as transformers' grouped-GEMM
        mixture-of-experts layers do) leaves `graph` None and says why in `uncapturable`: the
        loop then runs the step eagerly, with the same results."""
        state = [self.token, self.position, self.unfinished, self.count, self.live_steps, self.finished, self.ids,
                 self.end] + ([self.seen] if self.seen is not None else [])
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
        try:
            with torch.cuda.graph(self.graph):
                self.step()
        except RuntimeError as e:
            self.graph, self.uncapturable = None, str(e).splitlines()[0]
        finally:
            self.cache.restore(written)
            torch.cuda.set_rng_state(rng)
            for x, value in zip(state, saved):
                x.copy_(value)

    def run(self, plan):
        """Decode plan.new_tokens - 1 steps after start(), stopping early (a few steps late on
        the GPU, harmlessly) once every row has finished, and stream the tokens of the output.
        Returns transformers' output."""
        steps, stops = plan.new_tokens - 1, self.eos is not None or self.stop is not None
        if self.graph is None:
            self.run_eager(steps, stops, plan.streamer)
        else:
            self.run_graph(steps, stops, plan.streamer)
        length = min(plan.new_tokens, int(self.live_steps) + 1)
        prompt = plan.input_ids.shape[1]
        self.cache.count_written(prompt + length - 1)
        if plan.streamer is not None:
            plan.streamer.end()
        return self.ids[:, self.margin:self.margin + prompt + length].clone()

    def run_eager(self, steps, stops, streamer):
        """The CPU's loop (and a GPU call of one token): the flag and the tokens are at hand."""
        for i in range(steps + 1):
            if i > 0:
                if stops and bool(self.finished):
                    return
                self.step()
            if streamer is not None:
                streamer.put(self.token[:, 0].clone())

    def run_graph(self, steps, stops, streamer):
        """Replays of the graph; each step's "finished" flag and token are copied to pinned
        memory and read STOP_CHECK_LAG steps later, so the host never waits on the step it has
        just queued. A token is streamed when its flag is read; the first flag that says every
        row has finished ends the loop (the tokens after it are not part of the output)."""
        if not stops and streamer is None:
            for _ in range(steps):
                self.graph.replay()
            return
        lag = STOP_CHECK_LAG
        flags = [torch.zeros((), dtype=torch.bool, pin_memory=True) for _ in range(lag)]
        tokens = [torch.zeros(self.token.shape[0], dtype=torch.long, pin_memory=True) for _ in range(lag)]
        events = [torch.cuda.Event() for _ in range(lag)]

        def read(slot):
            """The flag and token copied into `slot`: streams the token, returns whether to stop."""
            events[slot].synchronize()
            if streamer is not None:
                streamer.put(tokens[slot].clone())
            return stops and bool(flags[slot])

        for i in range(steps + 1):  # pick i is the one copied at iteration i
            slot = i % lag
            if i >= lag and read(slot):  # pick i - lag
                return
            flags[slot].copy_(self.finished, non_blocking=True)
            if streamer is not None:
                tokens[slot].copy_(self.token[:, 0], non_blocking=True)
            events[slot].record()
            if i < steps:
                self.graph.replay()
        for i in range(max(steps + 1 - lag, 0), steps + 1):  # the picks not read yet
            if read(i % lag):
                return


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
    if plan.new_tokens > 1 and step.graph is None and step.uncapturable is None and on_gpu:
        step.capture()
    binding.decode_step = step
    return step.run(plan)
