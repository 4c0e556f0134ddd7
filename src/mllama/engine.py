"""The engine: continuous batching of requests over the slots of one KV cache.

Each request owns a slot: its prompt and generated tokens sit at positions 0.. of that slot, and
its own cross-attention K/V (its images, visible tiles only) live beside it. Every `step()` runs one
batched decode forward for all decoding slots, then one bounded piece of a new request's work
(a piece of one image through the vision tower, or one chunk of a prompt), so a long prompt or a
large image never freezes the running streams. Images are encoded in a line of their own, one
request at a time, taking turns with the prompts of text requests, which do not wait behind them.
Decoding slots are kept at the front of the cache ([0, n)): a finished request's slot is refilled
by moving the last one in, so a step reads one contiguous view. Requests beyond max_slots wait in
a queue, in order (text-only ones may pass one whose images wait for the encoder). A finished request's K/V are kept
in a prefix cache (mllama.prefix_cache): a later prompt that starts the same way (a chat follow-up)
copies them into its slot and prefills only the rest.

The model only runs forwards; the engine owns the cache, the slots, scheduling and sampling.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time

import torch
from torch import nn

from mllama.cache import KVCache
from mllama.checks import check_pixel_values
from mllama.engine_decode import DecodeStep
from mllama.engine_prepare import VISION_TURNS, PrepareRequests
from mllama.engine_sequence import Sequence
from mllama.prefix_cache import PrefixCache
from mllama.request import Event, Request, RequestHandle
from mllama.sampling import SamplingTensors
from mllama.text import CrossAttentionDecoderLayer, CrossInputs, MllamaTextModel, check_ids
from mllama.tokenizer import StreamDetokenizer
from mllama.vision_cache import ImageCache, VisionJob


class Engine(PrepareRequests, DecodeStep):
    """Serve many requests with one model: `submit()` returns a handle streaming Events;
    `step()` advances every request by one token (and new ones by a bounded amount of prefill);
    `start()` runs steps in a background thread until `stop()`.

    max_slots: requests decoded together; max_len: positions per slot (prompt + generated tokens);
    tokenizer (anything with `decode(ids, skip_special_tokens=)`): needed for text and stop strings;
    prefill_chunk: prompt tokens per step while other requests decode; vision_piece_layers: vision
    encoder layers of a new image per step (None: a whole image per step); prefill_budget_s: if set,
    while others decode a prompt chunk is sized from the measured prefill rate to take about this
    long (at most prefill_chunk tokens; results equal to within float rounding, as any chunking),
    and a new image's vision work pauses at the first module boundary after that long;
    prefill_budget_ratio: the same bound as a multiple of the step's decode time (so the others'
    inter-token latency stays within 1 + ratio times its idle value; at least 20 ms); with both,
    the smaller bound holds;
    image_cache_bytes: budget of the LRU of encoded images (0 disables it); prefix_cache_bytes:
    budget of the LRU of ended requests' self-attention K/V, reused by prompts that begin with the
    same tokens and images (0 disables it); fast_vision: encode only real tiles (not exact);
    compile: decode steps through torch.compile, one graph per slot bucket (1, 2, 4, ...) and
    vision-token width, attending over the whole max_len under a length mask; fuse_prefill: a new
    prompt's chunks (once its images are encoded) join the eager decode steps' forward, so its prefill
    and the others' decoding read the weights once (MllamaTextModel.forward_parts); off, each chunk is
    a forward of its own; vision_threads: a new image is encoded in a thread of its own on this many
    torch threads, in parallel with the decode steps and prompts, which take the other threads
    meanwhile (all of them once it ends; the vision thread all while nothing else runs); None: the
    image's vision pieces take turns with the steps in the engine's thread.
    """

    def __init__(self, model: nn.Module, *, max_slots: int = 8, max_len: int = 2048, tokenizer=None,
                 prefill_chunk: int = 128, vision_piece_layers: int | None = 4, image_cache_bytes: int = 1 << 30,
                 prefix_cache_bytes: int = 1 << 30, prefill_budget_s: float | None = None, fast_vision: bool = False,
                 compile: bool = False, prefill_budget_ratio: float | None = None, fuse_prefill: bool = True,
                 vision_threads: int | None = None) -> None:
        if max_slots < 1 or max_len < 2 or prefill_chunk < 1:
            raise ValueError(f"need max_slots >= 1, max_len >= 2, prefill_chunk >= 1; got {max_slots}, "
                             f"{max_len}, {prefill_chunk}")
        self._threads = torch.get_num_threads()  # the engine thread's, restored after a background encode
        if vision_threads is not None and not 1 <= vision_threads < self._threads:
            raise ValueError(f"vision_threads must be None or 1..{self._threads - 1} (torch has {self._threads} "
                             f"threads here; the engine keeps at least one), got {vision_threads}")
        self.vision_threads = vision_threads
        self.model = model
        self.text_model: MllamaTextModel = getattr(model.model, "language_model", model.model)
        self.lm_head = model.lm_head
        self.has_vision = hasattr(model.model, "vision_model")
        self.max_slots, self.max_len, self.prefill_chunk = max_slots, max_len, prefill_chunk
        if prefill_budget_s is not None and prefill_budget_s <= 0:
            raise ValueError(f"prefill_budget_s must be > 0 or None, got {prefill_budget_s}")
        if prefill_budget_ratio is not None and not prefill_budget_ratio > 0:
            raise ValueError(f"prefill_budget_ratio must be > 0 or None, got {prefill_budget_ratio}")
        self.prefill_budget_s, self.prefill_budget_ratio = prefill_budget_s, prefill_budget_ratio
        self.fuse_prefill = fuse_prefill
        self._prefill_s_per_token: float | None = None  # measured, for the budgets
        self._decode_s: float | None = None  # the last decode step's time, for prefill_budget_ratio
        self._idle_decode_s: float | None = None  # the same with no vision thread beside it
        self.tokenizer, self.fast_vision, self.vision_piece_layers = tokenizer, fast_vision, vision_piece_layers
        embed = self.text_model.embed_tokens.weight
        self.dtype, self.device = embed.dtype, embed.device
        if vision_threads is not None and self.device.type != "cpu":
            raise ValueError(f"vision_threads encodes images beside the steps on CPU threads; this model is on "
                             f"{self.device.type} (its work would queue on one stream): leave it None")
        self.vocab = self.text_model.config.vocab_size
        layers = list(self.text_model.layers)
        self_attn = [i for i, layer in enumerate(layers) if not isinstance(layer, CrossAttentionDecoderLayer)]
        attn = layers[self_attn[0]].self_attn
        self.compile = compile
        # Linears swapped for kernel or quantized modules call custom ops (see decode_step.compiled_step).
        # So do the collectives of a tensor-parallel model (mllama.tp), which the C++ wrapper cannot call.
        self._custom_linears = any(type(m).__module__ in ("mllama.linear", "mllama.quantize")
                                   for m in model.modules()) or getattr(model, "tensor_parallel", None) is not None
        # A compiled step pads its rows up to a bucket; the padding rows write into one spare slot.
        self.kv = KVCache(layers=self_attn, slots=max_slots + compile, heads=attn.num_kv_heads, max_len=max_len,
                          head_dim=attn.head_dim, dtype=self.dtype, device=self.device)
        self.image_cache = ImageCache(image_cache_bytes)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self._presence = torch.zeros(max_slots, self.vocab, dtype=torch.bool, device=self.device)
        self._queue: collections.deque[Sequence] = collections.deque()
        self._incoming: Sequence | None = None  # in prefill, at slot len(_decoding)
        # Its images in the vision encoder (a piece per step, or in a thread of its own) while other
        # requests start and decode; then it waits in _encoded for its turn as _incoming.
        self._encoding: Sequence | None = None
        self._encoded: collections.deque[Sequence] = collections.deque()
        # With vision_threads: the next request with images, started by the vision thread itself when
        # the one it encodes (_staged_after) ends; _vision_lock orders that against this thread.
        self._staged: Sequence | None = None
        self._staged_after: VisionJob | None = None
        self._vision_lock = threading.Lock()
        self._vision_turns = 0  # vision pieces since the last prompt work
        self._decoding: list[Sequence] = []  # index = slot
        self._cancels: set[int] = set()
        self._ids = itertools.count()
        self._lock = threading.Lock()  # queue and cancels, touched by submitting threads
        self._step_lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._batch_dirty = True
        self._cross: CrossInputs | None = None
        self._settings: SamplingTensors | None = None

    # ---- public API -----------------------------------------------------------------------------
    def submit(self, request: Request) -> RequestHandle:
        """Queue a request; its Events stream through the returned handle. Validates it first."""
        params = request.sampling
        params.validate()
        prompt = torch.as_tensor(request.input_ids)
        if prompt.dim() != 1 or prompt.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty 1-d sequence, got shape {tuple(prompt.shape)}")
        check_ids(prompt, self.text_model.embed_tokens.num_embeddings)
        if prompt.numel() > self.max_len:
            raise ValueError(f"prompt of {prompt.numel()} tokens does not fit max_len={self.max_len}")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need an engine tokenizer= to decode the output")
        if request.pixel_values is not None:  # finite floats, before any vision work is queued
            check_pixel_values(request.pixel_values)
        job = self._vision_job(request, prompt.numel())
        handle = RequestHandle(self, next(self._ids))
        generator = request.generator
        if generator is None and params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        detok = StreamDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens) \
            if self.tokenizer is not None else None
        seq = Sequence(handle, prompt.to(self.device, torch.long), params, generator, job, detok)
        with self._lock:
            self._queue.append(seq)
            self._wake.notify_all()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """End a request at the next step (its slot is free after that step); no-op once finished."""
        with self._lock:
            self._cancels.add(handle.id)
            self._wake.notify_all()

    @property
    def has_work(self) -> bool:
        return bool(self._queue or self._incoming is not None or self._encoding is not None or self._encoded
                    or self._staged is not None or self._decoding or self._cancels)

    @property
    def num_decoding(self) -> int:
        return len(self._decoding)

    @property
    def num_waiting(self) -> int:
        """Requests not started yet: queued, with their images in the encoder (or next), or encoded."""
        return len(self._queue) + (self._encoding is not None) + (self._staged is not None) + len(self._encoded)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        """Run steps in a daemon thread whenever there is work."""
        if self._thread is not None:
            raise RuntimeError("engine thread already started")
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="mllama-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread of start() after its step; an image encoding in a thread of its own stops
        at its next module boundary (its request stays queued: encoded again by the next steps)."""
        if self._thread is None:
            return
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join()
        self._thread = None
        self._halt_vision()

    def step(self) -> bool:
        """One decode step for all decoding requests plus one piece of a new request's work.
        Returns whether there was anything to do."""
        with self._step_lock, torch.inference_mode():
            try:
                return self._step()
            except BaseException as error:
                self._fail_all(error)
                raise

    # ---- scheduling -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.has_work:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # already delivered to the requests' handles
                pass

    def _step(self) -> bool:
        self._apply_cancels()
        # With vision_threads an image being encoded runs in a thread of its own and the steps go on
        # beside it. Otherwise it and prompt work take turns, VISION_TURNS vision pieces to one of
        # prompt work (a prompt chunk in the decode step's forward counts too): neither waits for the
        # other to end, and a step carries one of them, so the others' inter-token latency stays
        # bounded by one piece. The image gets more turns: it is the longer work.
        in_background = self._vision_background()
        vision_due = not in_background and self._encode_pending() and self._vision_turns < VISION_TURNS
        group = [] if vision_due else self._take_group()
        if not group:
            self._admit()
        worked = fused = False
        if self._decoding:
            started = time.perf_counter()
            fused = self._decode(fuse=not vision_due)
            if not fused:  # the ratio budget is relative to a step without new work
                self._decode_s = time.perf_counter() - started
                if not in_background:  # and to one on all of the engine's threads (see _budget_s)
                    self._idle_decode_s = self._decode_s
            worked = True
        work = None
        if group or fused:
            work = "prompt"
            if group:
                self._prefill_group(group)
        elif self._incoming is not None and not vision_due:
            work = "prompt"
            self._prepare_piece()
            while self._incoming is not None and not self._decoding:  # nobody to stall: go on
                self._prepare_piece()
        elif self._encode_pending() and self.vision_threads is not None:
            in_background = self._vision_background()  # admitted in this step
        elif self._encode_pending():
            work = "vision"
            self._encode_piece()
        if work is not None:
            self._vision_turns = self._vision_turns + 1 if work == "vision" else 0
        elif not worked and in_background:
            self._wait_for_vision()
        return worked or work is not None or in_background

    def _may_admit(self, seq: Sequence) -> bool:
        """Whether a queued request may start now (a tensor-parallel rank 0 holds back the ones its
        followers have not been sent yet)."""
        return True

    def _admit(self) -> None:
        """The first queued request with images goes to the vision encoder when it is free
        (_admit_encode); the prompt line (_incoming, which needs a free slot) takes an encoded request
        first, else the first queued text-only one: text requests do not wait behind another
        request's images."""
        self._admit_encode()
        if self._incoming is not None or len(self._decoding) >= self.max_slots:
            return
        if self._encoded:
            seq = self._incoming = self._encoded.popleft()
            seq.vision, seq.vision_job = seq.vision_job.result(), None  # its first chunk may fuse (_fuses) too
            self._admit_encode()  # room for one more encoded request
            return
        with self._lock:
            seq = next((s for s in self._queue if s.vision_job is None), None)
            if seq is None or not self._may_admit(seq):
                return
            self._queue.remove(seq)
        self._incoming = seq

    def _apply_cancels(self) -> None:
        with self._lock:
            cancels, self._cancels = self._cancels, set()
            queued = [s for s in self._queue if s.handle.id in cancels]
            for seq in queued:
                self._queue.remove(seq)
        for seq in queued:
            self._finish(seq, "cancelled", Event(token=None))
        if self._incoming is not None and self._incoming.handle.id in cancels:
            seq, self._incoming = self._incoming, None
            self._keep(seq, len(self._decoding))  # a partial prompt is still a valid prefix
            self._finish(seq, "cancelled", Event(token=None))
        if self._staged is not None and self._staged.handle.id in cancels:  # first: the encoding one's end starts it
            self._drop_staged("cancelled")
        if self._encoding is not None and self._encoding.handle.id in cancels:
            seq, self._encoding = self._encoding, None
            seq.vision_job.abort()
            self._finish(seq, "cancelled", Event(token=None))
        for seq in [s for s in self._encoded if s.handle.id in cancels]:
            self._encoded.remove(seq)
            self._finish(seq, "cancelled", Event(token=None))
        gone = [slot for slot, seq in enumerate(self._decoding) if seq.handle.id in cancels]
        for slot in gone:
            # A chat client that stops an answer sends it back as the start of its next prompt.
            self._keep(self._decoding[slot], slot)
            self._finish(self._decoding[slot], "cancelled", Event(token=None))
        self._free(gone)

    def _free(self, slots: list[int]) -> None:
        """Release decoding slots, moving the last slot into each hole (highest first, so the last
        slot is always a live one)."""
        if not slots:
            return
        old_end = len(self._decoding)
        for slot in sorted(slots, reverse=True):
            last = len(self._decoding) - 1
            if slot != last:
                moved = self._decoding[last]
                self.kv.move(last, slot, moved.cached)
                self._presence[slot] = self._presence[last]
                self._decoding[slot] = moved
            self._decoding.pop()
        seq = self._incoming
        if seq is not None and seq.prefilled:  # its partial prompt follows the decoding slots
            self.kv.move(old_end, len(self._decoding), seq.prefilled)
        self._batch_dirty = True

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            seqs = (list(self._queue) + [s for s in (self._encoding, self._staged, self._incoming) if s]
                    + list(self._encoded) + self._decoding)
            self._queue.clear()
        if self._staged is not None:
            self._drop_staged(None)
        if self._encoding is not None:
            self._encoding.vision_job.abort()
        self._incoming, self._encoding, self._decoding, self._batch_dirty = None, None, [], True
        self._encoded.clear()
        for seq in seqs:
            seq.handle._fail(error)

    def _keep(self, seq: Sequence, slot: int) -> None:
        """Store the K/V of an ended request (in `slot`) in the prefix cache."""
        self.prefix_cache.store(self.kv, slot, prompt=seq.prompt, output=seq.output, length=seq.cached,
                                vision=seq.vision)

    def _emit(self, seq: Sequence, token: int, logits: torch.Tensor) -> bool:
        """Deliver one sampled token; returns whether the request has finished."""
        return seq.emit(token, logits, max_len=self.max_len)

    def _finish(self, seq: Sequence, reason: str, event: Event) -> None:
        seq.finish(reason, event)
