"""The inference engine: continuous batching over one base model, one adapter (or none) per row.

    submit(request) -> handle          (any thread; bounded queue, adapter acquired up front)
    step():  admit waiting requests -> prefill them together -> decode every running row once
             -> finished rows leave, their KV slots are refilled by the last row
    a row that fails (non-finite logits, an exception in its own handling) ends alone with
    GenerationFailedError; only a failed batched forward fails the rows that shared it
    handle.result() / handle.deltas()  (blocking) or an `on_delta` callback (streaming)

Models: decoder-only causal LMs with an LM head and grouped KV heads, full or sliding-window attention,
or both per layer (Llama, Qwen2/3, Mistral, Phi-3, Gemma 3; `attention_windows` reads the config).

The engine knows nothing of HTTP. It runs `step` in its own thread after `start()`, or in the
caller's thread through `generate(...)` (tests, benchmarks, the terminal chat). Each row's adapter
reaches the model through `AdaptedLayer.row_adapters`, where LoRA deltas for the whole batch are
computed at once; the model itself runs once per step whatever the mix of adapters.

Prompt tuning and P-tuning adapters (virtual tokens, `VirtualPromptAdapter`) are served per row as
well: at the prefill a row's learned prompt vectors go in front of its token embeddings, at positions
0..v-1, as the adapter itself does; its KV slot then holds them and later steps just count them.
Other model-level methods (prefix tuning, adaption prompts, ReFT) cannot be applied per row and are
refused (`unservable_model_level`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tuneforge.adapters.model import adapter_book, adapter_names, wrapped_layers
from tuneforge.adapters.model_level import model_adapters
from tuneforge.adapters.model_level.prompt_tuning import VirtualPromptAdapter
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.models.cache_keyword import cache_keyword
from tuneforge.eval.generation import PromptFormat, stop_token_ids
from tuneforge.serve.adapters import unservable_model_level
from tuneforge.serve.kv_cache import SlotKVCache, decode_mask, prefill_mask
from tuneforge.serve.metrics import EngineStats
from tuneforge.serve.sampling import NonFiniteLogitsError, SamplingParams, choose_token, find_stop, streamable_length
from tuneforge.serve.scheduler import Scheduler

DEFAULT_MAX_MODEL_LEN = 2048
log = logging.getLogger(__name__)


class RequestError(TuneforgeError, ValueError):
    """A request the engine cannot run as given (empty or too long prompt, bad parameters)."""


class EngineTimeoutError(TuneforgeError):
    """A request did not finish within the time its caller allowed."""


class EngineStoppedError(TuneforgeError):
    """The engine shut down (or failed) before the request finished."""


class GenerationFailedError(TuneforgeError):
    """This request's generation failed (its own row only); the message holds no internals."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # None: the base model


@dataclass(frozen=True)
class Delta:
    """What one step added to a request's output; the last delta carries the finish reason."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str | None = None  # "stop", "length" or "cancelled" once finished


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    finish_reason: str
    prompt_tokens: int
    stop_token_id: int | None = None  # the stop token that ended it (not in token_ids), if one did

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class RequestHandle:
    """The caller's side of one request: wait for the result, iterate deltas, or cancel."""

    def __init__(self, request_id: int, request: GenerationRequest, on_delta: Callable[[Delta], None] | None):
        self.id = request_id
        self.request = request
        self.submitted_at = time.perf_counter()
        self._on_delta = on_delta
        self._deltas: queue.Queue[Delta | BaseException] = queue.Queue()
        self._done = threading.Event()
        self._result: Completion | None = None
        self._error: BaseException | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating at the next step (a client went away); the handle finishes as 'cancelled'."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            self.cancel()
            raise EngineTimeoutError(f"request {self.id} did not finish within {timeout} s; it was cancelled")
        if self._error is not None:
            raise self._error
        return self._result

    def deltas(self, timeout: float | None = None) -> Iterator[Delta]:
        """Deltas as the engine produces them, ending with the one that has a finish reason."""
        while True:
            try:
                item = self._deltas.get(timeout=timeout)
            except queue.Empty:
                self.cancel()
                raise EngineTimeoutError(f"request {self.id} produced nothing for {timeout} s; it was cancelled") from None
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def _publish(self, delta: Delta) -> None:
        self._deltas.put(delta)
        if self._on_delta is not None:
            self._on_delta(delta)

    def _finish(self, completion: Completion | None, error: BaseException | None = None,
                last_delta: Delta | None = None) -> None:
        self._result, self._error = completion, error
        self._done.set()
        last = error if error is not None else last_delta
        if last is not None:
            self._deltas.put(last)
            if self._on_delta is not None:
                self._on_delta(last)


class _Sequence:
    """A running request's generation state; its index in the running list is its KV slot."""

    def __init__(self, handle: RequestHandle, device: torch.device, virtual_prompt: VirtualPromptAdapter | None = None):
        self.handle = handle
        self.virtual_prompt = virtual_prompt  # its vectors go in front of the prompt at the prefill
        self.virtual = virtual_prompt.num_virtual_tokens if virtual_prompt is not None else 0
        self.params = handle.request.params
        self.generator = self.params.make_generator(device)
        self.token_ids = list(handle.request.prompt_ids)
        self.generated: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.sent = 0  # characters of `text` already published
        self._unsent_tokens: list[int] = []
        self._unsent_logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.stop_token_id: int | None = None
        self.error: GenerationFailedError | None = None

    @property
    def cached_length(self) -> int:
        """Positions held in the KV cache: the virtual tokens, then every token except the last,
        which the next step feeds."""
        return self.virtual + len(self.token_ids) - 1

    def accept(self, token: int, logprob: float | None, tokenizer, stop_ids: set[int], max_length: int) -> None:
        if token in stop_ids and not self.params.ignore_eos:  # the end-of-turn token ends the reply, not part of it
            self.stop_token_id = token
            self._finish("stop")
            return
        self.token_ids.append(token)
        self.generated.append(token)
        self._unsent_tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
            self._unsent_logprobs.append(logprob)
        self.text = tokenizer.decode(self.generated, skip_special_tokens=True)
        cut = find_stop(self.text, self.params.stop)
        if cut is not None:
            self.text = self.text[:cut]
            self._finish("stop")
        elif len(self.generated) >= self.params.max_tokens or self.virtual + len(self.token_ids) >= max_length:
            self._finish("length")
        else:
            self._publish(streamable_length(self.text, self.params.stop), finish_reason=None)

    def _finish(self, reason: str) -> None:
        """Record the end; the last delta goes out with the result (`Engine._complete`), so whoever
        sees a finish reason can read the result at once."""
        self.finish_reason = reason

    def fail(self, error: BaseException, stage: str) -> None:
        """End this request with an error of its own; the server log keeps the details."""
        request_id = self.handle.id
        if isinstance(error, NonFiniteLogitsError):
            adapter = self.handle.request.adapter
            hint = f"; adapter '{adapter}' may hold NaN or infinite weights" if adapter else ""
            message = (f"generation failed: the model produced non-finite logits (NaN or infinity) during {stage} "
                       f"after {len(self.generated)} token(s){hint}")
            log.warning("request %d: %s", request_id, message)
        else:
            message = (f"generation failed during {stage}: an internal error (the server log has it under "
                       f"request {request_id}); other requests were not affected")
            log.error("request %d failed during %s", request_id, stage, exc_info=error)
        self.error = GenerationFailedError(message)
        self.finish_reason = "error"

    def _publish(self, end: int, finish_reason: str | None) -> None:
        self.handle._publish(self._take_delta(end, finish_reason))

    def _take_delta(self, end: int, finish_reason: str | None) -> Delta:
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        delta = Delta(piece, tuple(self._unsent_tokens), tuple(self._unsent_logprobs), finish_reason)
        self._unsent_tokens, self._unsent_logprobs = [], []
        return delta

    def completion(self) -> Completion:
        logprobs = tuple(self.logprobs) if self.params.logprobs else None
        return Completion(self.text, tuple(self.generated), logprobs, self.finish_reason,
                          len(self.handle.request.prompt_ids), self.stop_token_id)


class Engine:
    """Continuous batching over `model`; `adapters` (an AdapterManager) resolves adapter names."""

    def __init__(self, model: nn.Module, tokenizer, *, adapters=None, max_batch_size: int = 8,
                 max_queue: int = 64, max_model_len: int | None = None, template: str = "auto"):
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size={max_batch_size} must be >= 1")
        if max_queue < 1:
            raise ConfigError(f"max_queue={max_queue} must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.lock = adapters.model_lock if adapters is not None else threading.RLock()
        self.decoder, self.head = _decoder_and_head(model)
        self._cache_keyword = cache_keyword(self.decoder)
        self.device = next(model.parameters()).device
        config = model.config
        self.max_model_len = max_model_len or min(getattr(config, "max_position_embeddings", DEFAULT_MAX_MODEL_LEN),
                                                  DEFAULT_MAX_MODEL_LEN)
        self.cache = SlotKVCache(
            num_layers=config.num_hidden_layers, slots=max_batch_size, kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            max_length=self.max_model_len, dtype=next(model.parameters()).dtype, device=self.device,
        )
        self._windows = attention_windows(config)
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self.scheduler: Scheduler[_Sequence] = Scheduler(max_batch_size, max_queue)
        # The prompt format's end-of-turn marker ends every reply: as a token where it is one, as a
        # stop string where the tokenizer splits it (chatml's <|im_end|> on a tokenizer without it).
        self.end_of_turn = PromptFormat.for_tokenizer(template, tokenizer).end_of_turn(tokenizer)
        self.stop_ids = set(stop_token_ids(model, tokenizer)) | set(self.end_of_turn.token_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids)
        self.stats = EngineStats()
        self._ids = itertools.count(1)
        self._layers: list = []
        self._layers_version: int | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wakeup = threading.Event()
        # Set by a fine-tuning job waiting for `lock` between its optimizer steps: the loop then pauses
        # a moment after each step, since a lock released and at once retaken is rarely handed over.
        self.step_aside = threading.Event()

    # ---- submitting -------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, on_delta: Callable[[Delta], None] | None = None) -> RequestHandle:
        """Queue a request; raises RequestError (bad request), QueueFullError, or the adapter
        manager's errors (unknown adapter, no room to load it) before anything is queued."""
        self._check(request)
        request = self._with_end_of_turn(request)
        if request.adapter is not None:
            if self.adapters is not None:
                self.adapters.acquire(request.adapter)
            elif request.adapter not in adapter_names(self.model):  # adapters added to the model by hand
                from tuneforge.serve.adapters import UnknownAdapterError

                raise UnknownAdapterError(f"the model has no adapter named '{request.adapter}' "
                                          f"(it has {adapter_names(self.model) or 'none'})")
        handle = RequestHandle(next(self._ids), request, on_delta)
        try:
            virtual_prompt = self._virtual_prompt(request)
            self.scheduler.enqueue(_Sequence(handle, self.device, virtual_prompt))
        except BaseException:
            self._release(request)
            raise
        self._wakeup.set()
        return handle

    def _with_end_of_turn(self, request: GenerationRequest) -> GenerationRequest:
        """The request with the end-of-turn strings among its stops (unless it ignores eos)."""
        extra = [s for s in self.end_of_turn.strings if s not in request.params.stop]
        if not extra or request.params.ignore_eos:
            return request
        params = dataclasses.replace(request.params, stop=(*request.params.stop, *extra))
        return dataclasses.replace(request, params=params)

    def _virtual_prompt(self, request: GenerationRequest) -> VirtualPromptAdapter | None:
        """The request's prompt-tuning-style adapter, if it has one; refuses model-level adapters
        that cannot be applied to one row of a batch."""
        adapter = dict(model_adapters(self.model)).get(request.adapter) if request.adapter else None
        if adapter is None:
            return None
        if not isinstance(adapter, VirtualPromptAdapter):
            method = adapter_book(self.model).configs[request.adapter].method
            raise RequestError(unservable_model_level(request.adapter, method))
        total = len(request.prompt_ids) + adapter.num_virtual_tokens + request.params.max_tokens
        if total > self.max_model_len:
            raise RequestError(
                f"prompt ({len(request.prompt_ids)} tokens) + the adapter's {adapter.num_virtual_tokens} virtual tokens "
                f"+ max_tokens ({request.params.max_tokens}) exceeds the model's context of {self.max_model_len} tokens"
            )
        return adapter

    def _check(self, request: GenerationRequest) -> None:
        ids = request.prompt_ids
        if not ids:
            raise RequestError("the prompt is empty; send at least one token")
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) + request.params.max_tokens > self.max_model_len:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({request.params.max_tokens}) exceeds the model's "
                f"context of {self.max_model_len} tokens; shorten the prompt or lower max_tokens"
            )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Run `requests` to completion and return their results in order (blocking)."""
        pending = list(requests)
        handles: list[RequestHandle] = []
        while pending or not all(h.done for h in handles):
            while pending and self.scheduler.queue_depth < self.scheduler.max_queue:
                handles.append(self.submit(pending.pop(0)))
            if self.running_in_thread:
                time.sleep(0.005)
            else:
                self.step()
        return [h.result() for h in handles]

    def run_until_done(self, handle: RequestHandle) -> None:
        """Step in the calling thread until `handle` has finished (no engine thread needed)."""
        try:
            while not handle.done:
                self.step()
        except Exception as error:
            self._fail_all(EngineStoppedError(f"generation failed: {type(error).__name__}: {error}"))
            raise

    # ---- running ----------------------------------------------------------------------------

    @property
    def running_in_thread(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running_in_thread:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="tuneforge-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the engine thread; unfinished requests fail with EngineStoppedError."""
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._fail_all(EngineStoppedError("the engine stopped before this request finished"))

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                worked = self.step()
            except Exception as error:  # one broken step must not leave clients waiting forever
                self._fail_all(EngineStoppedError(f"generation failed: {type(error).__name__}: {error}"))
                continue
            if not worked:
                self._wakeup.wait(0.05)
                self._wakeup.clear()
            elif self.step_aside.is_set():
                time.sleep(0.001)

    def step(self) -> bool:
        """One scheduling iteration; returns False when there was nothing to do."""
        with self.lock:
            self._drop_cancelled()  # from the queue too: a request cancelled while waiting is never admitted
            admitted = self.scheduler.admit()
            if admitted:
                self._isolated(self._prefill, admitted, "prefill")  # a failed prefill fails only the new rows
                self._retire_finished()
            decoded = bool(self.scheduler.running)
            if decoded:
                self._isolated(self._decode, list(self.scheduler.running), "decoding")
                self._retire_finished()
            self.stats.set_load(self.scheduler.queue_depth, len(self.scheduler.running))
        return bool(admitted) or decoded

    def _prefill(self, admitted: list[_Sequence]) -> None:
        """Run the new prompts together (right-padded); each row's last real position gives its first token.
        Each prompt's keys and values go to the slot its request holds in the running list, looked up
        here rather than assumed (a slot holding another user's cache would leak that user's prompt)."""
        slot_of = {id(sequence): slot for slot, sequence in enumerate(self.scheduler.running)}
        slots = [slot_of[id(sequence)] for sequence in admitted]
        lengths = torch.tensor([s.virtual + len(s.token_ids) for s in admitted], device=self.device)  # (n,)
        padded = int(lengths.max())
        longest_prompt = max(len(s.token_ids) for s in admitted)
        input_ids = torch.full((len(admitted), longest_prompt), self.pad_id, dtype=torch.long, device=self.device)
        for row, sequence in enumerate(admitted):
            input_ids[row, : len(sequence.token_ids)] = torch.tensor(sequence.token_ids, device=self.device)
        positions = torch.arange(padded, device=self.device).expand(len(admitted), padded)  # (n, T)
        self.cache.plan_prefill(slots, padded)
        mask = self._masks(lambda window: prefill_mask(lengths, padded, self.cache.dtype, window))
        hidden = self._run(admitted, input_ids, positions, mask, with_virtual_tokens=True)  # (n, T, d)
        last = hidden[torch.arange(len(admitted), device=self.device), lengths - 1]  # (n, d)
        self._sample(admitted, last)

    def _masks(self, build):
        """One additive mask for every layer, or (hybrid models such as Gemma 3) one per layer type,
        keyed as the model's `config.layer_types` names them; `build(window)` makes one."""
        if isinstance(self._windows, dict):
            return {kind: build(window) for kind, window in self._windows.items()}
        return build(self._windows)

    def _isolated(self, stage, rows: list[_Sequence], name: str) -> None:
        """Run one batched forward; if it raises, the rows it was computing fail, nobody else
        (per-row faults are caught inside `_sample`, so this is for the forward itself)."""
        try:
            stage(rows)
        except Exception as error:
            for sequence in rows:
                if sequence.finish_reason is None:
                    sequence.fail(error, name)

    def _decode(self, running: list[_Sequence]) -> None:
        input_ids = torch.tensor([[s.token_ids[-1]] for s in running], device=self.device)  # (B, 1)
        positions = torch.tensor([s.cached_length for s in running], device=self.device)  # (B,)
        self.cache.plan_decode(positions)
        kv_length = int(positions.max()) + 1
        mask = self._masks(lambda window: decode_mask(positions, kv_length, self.cache.dtype, window))
        hidden = self._run(running, input_ids, positions[:, None], mask)  # (B, 1, d)
        self._sample(running, hidden[:, -1])

    def _run(self, sequences: list[_Sequence], input_ids, position_ids, mask,
             with_virtual_tokens: bool = False) -> torch.Tensor:
        row_names = tuple(s.handle.request.adapter for s in sequences)
        layers = self._adapted_layers()
        for layer in layers:
            layer.row_adapters = row_names
        try:
            with torch.inference_mode():
                inputs = {"input_ids": input_ids}
                if with_virtual_tokens and any(s.virtual for s in sequences):
                    inputs = {"inputs_embeds": self._embeddings_with_virtual_tokens(sequences, input_ids,
                                                                                   position_ids.shape[1])}
                output = self.decoder(**inputs, attention_mask=mask, position_ids=position_ids,
                                      use_cache=True, **{self._cache_keyword: self.cache})
        finally:
            for layer in layers:
                layer.row_adapters = None
        return output.last_hidden_state

    def _embeddings_with_virtual_tokens(self, sequences: list[_Sequence], input_ids, padded: int) -> torch.Tensor:
        """Each row's embeddings (n, T, d): its virtual prompt vectors (if any), then its tokens', then
        zeros up to T (padding no query attends to). Embedding the ids runs with the row adapters set,
        so an embedding LoRA of another row still applies."""
        embedded = self.decoder.get_input_embeddings()(input_ids)  # (n, L, d)
        rows = torch.zeros(len(sequences), padded, embedded.shape[-1], dtype=embedded.dtype, device=embedded.device)
        for row, sequence in enumerate(sequences):
            if sequence.virtual:
                rows[row, : sequence.virtual] = sequence.virtual_prompt.prompt().to(embedded.dtype)
            length = len(sequence.token_ids)
            rows[row, sequence.virtual: sequence.virtual + length] = embedded[row, :length]
        return rows

    def _adapted_layers(self) -> list:
        """The model's AdaptedLayers; with an adapter manager, listed again only after it changed them
        (walking a model that holds many adapters' modules costs more than a decoding step's LoRA math)."""
        version = self.adapters.version if self.adapters is not None else None
        if version is None or version != self._layers_version:
            self._layers = [layer for _, layer in wrapped_layers(self.model)]
            self._layers_version = version
        return self._layers

    def _sample(self, sequences: list[_Sequence], hidden: torch.Tensor) -> None:
        """Each row picks and takes its token on its own: a row that raises fails alone."""
        with torch.inference_mode():
            logits = self.head(hidden).float()  # (B, V)
            if self._softcap:  # Gemma's final logit soft-capping, as its ForCausalLM applies it
                logits = torch.tanh(logits / self._softcap) * self._softcap
            log_probs = torch.log_softmax(logits, dim=-1) if any(s.params.logprobs for s in sequences) else None
        for row, sequence in enumerate(sequences):
            try:
                token, logprob = choose_token(logits[row], sequence.params, sequence.generator,
                                              log_probs[row] if log_probs is not None else None)
                sequence.accept(token, logprob, self.tokenizer, self.stop_ids, self.max_model_len)
            except Exception as error:
                sequence.fail(error, "sampling")
        self.stats.add_tokens(len(sequences))

    def _retire_finished(self) -> None:
        """Finished rows leave; the last row moves into each freed slot so rows stay 0..B-1."""
        running = self.scheduler.running
        for index in range(len(running) - 1, -1, -1):
            if running[index].finish_reason is None:
                continue
            finished = running[index]
            last = len(running) - 1
            if index != last:
                self.cache.move_slot(last, index, running[last].cached_length)
                running[index] = running[last]
            running.pop()
            self._complete(finished)

    def _complete(self, sequence: _Sequence) -> None:
        self._release(sequence.handle.request)
        self.stats.observe_latency(time.perf_counter() - sequence.handle.submitted_at)
        if sequence.error is not None:
            sequence.handle._finish(None, sequence.error)
            return
        last = sequence._take_delta(len(sequence.text), sequence.finish_reason)
        sequence.handle._finish(sequence.completion(), last_delta=last)

    def _drop_cancelled(self) -> None:
        """Cancelled requests leave: running rows free their slots, waiting ones leave the queue."""
        for sequence in list(self.scheduler.running):
            if sequence.handle.cancelled and sequence.finish_reason is None:
                sequence._finish("cancelled")
        self._retire_finished()
        for sequence in self.scheduler.waiting():
            if sequence.handle.cancelled and self.scheduler.remove_waiting(sequence):
                sequence._finish("cancelled")
                self._complete(sequence)

    def _release(self, request: GenerationRequest) -> None:
        if request.adapter is not None and self.adapters is not None:
            self.adapters.release(request.adapter)

    def _fail_all(self, error: BaseException) -> None:
        with self.lock:
            sequences = self.scheduler.drain_waiting() + list(self.scheduler.running)
            self.scheduler.running.clear()
        for sequence in sequences:
            self._release(sequence.handle.request)
            sequence.handle._finish(None, error)


ATTENTION_KINDS = ("full_attention", "sliding_attention")


def attention_windows(config) -> int | None | dict[str, int | None]:
    """The attention window of every layer: None (all full causal), one int (every layer slides, as
    Mistral's and Phi-3's `sliding_window` say), or per layer type for hybrid models (Gemma 3, Qwen2 with
    sliding layers): {"full_attention": None, "sliding_attention": window}. The decoder takes a dict
    mask keyed by layer type and a single mask as-is."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return window
    unknown = sorted(set(layer_types) - set(ATTENTION_KINDS))
    if unknown:
        raise ConfigError(f"the serving engine supports full and sliding-window attention layers; this model also "
                          f"has {unknown} (config.layer_types)")
    if set(layer_types) == {"full_attention"}:
        return None
    return {kind: window if kind == "sliding_attention" else None for kind in set(layer_types)}


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack and the LM head, so that only the positions that are sampled get logits."""
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or head is None or not hasattr(model.config, "num_key_value_heads"):
        raise ConfigError(
            f"the serving engine supports decoder-only causal LMs with an LM head and grouped KV heads (Llama, "
            f"Qwen2/3, Mistral, Gemma 3, Phi-3 and their kin); {type(model).__name__} is not one"
        )
    return decoder, head
