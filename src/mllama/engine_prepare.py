"""The engine's preparation of new requests: an image through the vision tower a piece at a time,
the prompt in chunks (or several queued text prompts in one padded forward), then the first token.

A mixin of mllama.engine.Engine (it uses the engine's cache, slots, caches and settings); it is
apart only to keep the engine's loop and slots readable on their own (the decode step is
mllama.engine_decode).
"""

from __future__ import annotations

import functools
import time

import torch

from mllama.cache import KVWindow
from mllama.engine_sequence import Sequence
from mllama.request import Event, Request
from mllama.sampling import SamplingTensors, ban_ids, mark_seen, select_next
from mllama.text import CrossInputs, TextPart
from mllama.vision_cache import VisionJob


# The least a ratio budget allows: a piece any smaller costs more in decode steps than it saves.
MIN_BUDGET_S = 0.02
# While an image is encoded, vision pieces per turn of prompt work (engine.Engine._step).
VISION_TURNS = 2
# Requests whose images are encoded that may wait for the prompt line before the encoder takes the
# next one: the encoder goes on while a slot or the prompt line is busy, but each holds its cross K/V.
ENCODED_AHEAD = 2


class PrepareRequests:
    """Engine methods that bring a queued request to its first token (see the module docstring)."""

    def _vision_job(self, request: Request, length: int) -> VisionJob | None:
        if request.pixel_values is None:
            return None
        if not self.has_vision:
            raise ValueError("this model is text-only; it cannot take images")
        parts = (request.aspect_ratio_ids, request.aspect_ratio_mask, request.cross_attention_mask)
        if any(p is None for p in parts):
            raise ValueError("pixel_values needs aspect_ratio_ids, aspect_ratio_mask and cross_attention_mask")
        cam = request.cross_attention_mask
        if cam.dim() != 3 or cam.shape[0] != length:
            raise ValueError(f"cross_attention_mask has shape {tuple(cam.shape)}, expected "
                             f"({length}, N_images, N_tiles)")
        return VisionJob(self.model, request.pixel_values.to(self.device), request.aspect_ratio_ids.to(self.device),
                         request.aspect_ratio_mask.to(self.device), cam.to(self.device),
                         cache=self.image_cache if self.image_cache.max_bytes else None,
                         fast_vision=self.fast_vision, piece_layers=self.vision_piece_layers,
                         piece_s=self.prefill_budget_s)

    def _encode_pending(self) -> bool:
        """A request's images are in the vision encoder, not finished."""
        return self._encoding is not None and not self._encoding.vision_job.finished

    def _admit_encode(self) -> None:
        """A request whose images are encoded moves to _encoded; the encoder, when free, takes the
        first queued request with images (an image cache hit finishes it at once), unless
        ENCODED_AHEAD encoded ones already wait."""
        while True:
            if self._encoding is not None and self._encoding.vision_job.finished:
                self._encoded.append(self._encoding)
                self._encoding = None
            if self._encoding is None and self._staged is not None:  # admitted already; it may be running
                with self._vision_lock:
                    self._encoding, self._staged, self._staged_after = self._staged, None, None
                continue
            if self._encoding is not None or len(self._encoded) >= ENCODED_AHEAD:
                return
            seq = self._next_to_encode()
            if seq is None:
                return
            self._encoding = seq

    def _next_to_encode(self, *, besides: VisionJob | None = None) -> Sequence | None:
        """The first queued request with images, out of the queue, its image cache hits taken; None
        if it has an image of `besides` (the running encode's: it waits to find it in the cache)."""
        with self._lock:
            seq = next((s for s in self._queue if s.vision_job is not None), None)
            if seq is None or not self._may_admit(seq):
                return None
            if besides is not None and not set(seq.vision_job.keys.values()).isdisjoint(besides.keys.values()):
                return None
            self._queue.remove(seq)
        seq.vision_job.lookup()
        return seq

    def _stage_next(self) -> None:
        """While the encoding request's images run in the background, the next request with images
        waits staged: the vision thread starts it the moment the running one ends, with no step in
        between (if, with the running one encoded too, fewer than ENCODED_AHEAD would wait)."""
        if self._staged is not None or len(self._encoded) + 1 >= ENCODED_AHEAD:
            return
        running = self._encoding.vision_job
        seq = self._next_to_encode(besides=running)
        if seq is None:
            return
        with self._vision_lock:
            self._staged, self._staged_after = seq, running
            if running.poll_ready:  # it ended before it could see the staged one
                self._start_background(seq.vision_job)

    def _start_background(self, job: VisionJob) -> None:
        """Under _vision_lock: start job's background run unless it has started or needs none."""
        if not job.finished and not job.in_background:
            job.run_background(self.vision_threads, on_done=functools.partial(self._vision_ended, job))

    def _drop_staged(self, reason: str | None) -> None:
        """The staged request leaves (cancelled: finished with `reason`; None: failed by the caller)."""
        with self._vision_lock:
            seq, self._staged, self._staged_after = self._staged, None, None
        seq.vision_job.abort()
        if reason is not None:
            self._finish(seq, reason, Event(token=None))

    def _vision_background(self) -> bool:
        """With vision_threads: the encoding request's images run in a thread of their own on
        vision_threads torch threads while this thread decodes and prefills on the others (started
        here, collected here when done; this thread gets all its threads back then, or after a
        cancel). An encode that fails ends its own request with the error. Whether it is running
        after this call."""
        if self.vision_threads is None:
            return False
        running = self._poll_background()
        if not running:  # the encoder is free: the next queued image starts now, not a step later
            self._admit_encode()
            running = self._poll_background()
        if running:
            self._encoding.vision_job.set_threads(self.vision_threads)  # its share again, should an idle wait have lent it all
            self._stage_next()
        threads = self._threads - self.vision_threads if running else self._threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return running

    def _halt_vision(self) -> None:
        """Stop a background encode that has not ended (and a staged one its end may have started) at
        its next module boundary and wait for its thread: nothing runs once the engine is stopped.
        The requests keep their places; their images are encoded from the start when steps resume."""
        with self._vision_lock:
            self._staged_after = None  # an encode ending now must not start the staged one
        for seq in (self._encoding, self._staged):
            if seq is not None and seq.vision_job.in_background and not seq.vision_job.poll_ready:
                seq.vision_job.abort()

    def _poll_background(self) -> bool:
        """Starts the encoding request's background run if it has not started; whether it runs."""
        job = self._encoding.vision_job if self._encoding is not None else None
        running = job is not None and not job.finished
        if running and not job.in_background:
            with self._vision_lock:
                self._start_background(job)
        if running:
            try:
                running = not job.poll()  # ended: its results are in the job (and the image cache)
            except Exception as error:
                self._vision_failed(error)
                running = False
        return running

    def _vision_failed(self, error: Exception) -> None:
        """The encoding request's vision work raised: that request ends with the error, the others go
        on (its encode touched nothing of theirs)."""
        seq, self._encoding = self._encoding, None
        seq.vision_job.abort()
        seq.handle._fail(error)

    def _run_vision_piece(self, seconds: float | None) -> None:
        try:
            self._encoding.vision_job.run_piece(seconds=seconds)
        except Exception as error:
            self._vision_failed(error)

    def _vision_ended(self, job: VisionJob) -> None:
        """Called from the vision thread when job's run ends: the request staged after it starts at
        once; an idle engine waiting on it goes on."""
        with self._vision_lock:
            if self._staged is not None and self._staged_after is job:
                self._start_background(self._staged.vision_job)
        with self._lock:
            self._wake.notify_all()

    def _wait_for_vision(self) -> None:
        """Nothing to decode or prefill while the vision thread runs: it takes every torch thread
        until it ends or work it does not hold up arrives (a text request, a cancel, stop)."""
        job = self._encoding.vision_job
        job.set_threads(self._threads)
        with self._lock:
            self._wake.wait_for(lambda: job.poll_ready or self._stopping or bool(self._cancels)
                                or any(s.vision_job is None for s in self._queue), timeout=1.0)

    def _encode_piece(self) -> None:
        """One bounded piece of the encoding request's vision work; with nobody decoding (nobody to
        stall) all of it, and its prompt too. A piece that raises ends that request (_vision_failed)."""
        self._run_vision_piece(self._budget_s())
        while not self._decoding and self._incoming is None and self._encoding is not None:
            if self._encode_pending():
                self._run_vision_piece(None)
                continue
            self._admit()  # the encoded request takes the prompt line (no slot is in use)
            while self._incoming is not None and not self._decoding:
                self._prepare_piece()

    def _prepare_piece(self) -> None:
        """One chunk of the incoming request's prompt (the last chunk also samples its first token);
        a request with images comes here with its vision K/V (engine._admit)."""
        seq = self._incoming
        part, end = self._prompt_chunk(seq)
        started = time.perf_counter()
        hidden = self.text_model(part.input_ids, position_ids=part.position_ids, mask=part.mask, cross=part.cross,
                                 cache=part.cache)
        self._measured_prefill((time.perf_counter() - started) / (end - seq.prefilled))
        seq.prefilled = seq.cached = end
        self._chunk_done(seq, hidden)

    def _prompt_chunk(self, seq: Sequence) -> tuple[TextPart, int]:
        """The next chunk of seq's prompt (at slot len(_decoding)) as a forward's part, and where it ends."""
        slot = len(self._decoding)
        if not seq.prefilled:  # first piece of its prompt: start after a stored prefix if one fits
            seq.prefilled = seq.cached = self.prefix_cache.restore(self.kv, slot, prompt=seq.prompt, vision=seq.vision)
        start = seq.prefilled
        end = min(start + self._chunk_size(), seq.prompt.numel())
        positions = torch.arange(start, end, device=self.device)[None]
        window = KVWindow(self.kv, slots=torch.tensor([slot], device=self.device), positions=positions,
                          first=slot, length=end)
        mask = None
        if start:  # causal over the whole slot so far
            keys = torch.arange(end, device=self.device)
            mask = (keys[None, :] <= positions[0, :, None])[None, None]
        cross = None
        if seq.vision is not None:
            vmask, rows = seq.vision.cross_rows(start, end, self.dtype)
            if bool(rows.any()):  # rows that see no image are exact identities in cross layers
                cross = CrossInputs(states=None, mask=vmask, text_row_mask=rows, kv=seq.vision.kv)
        return TextPart(seq.prompt[start:end][None], positions, mask, cross, window), end

    def _measured_prefill(self, rate: float) -> None:
        """Seconds a prompt token took; kept up at once, down slowly: a chunk rather short than long."""
        old = self._prefill_s_per_token
        self._prefill_s_per_token = rate if old is None or rate > old else 0.5 * (old + rate)

    def _chunk_done(self, seq: Sequence, hidden: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        """After a chunk's forward (seq.prefilled already past it): the last one samples the first token
        (from `logits` (1, V) where the caller has them already)."""
        if seq.prefilled < seq.prompt.numel():
            return
        self._incoming = None
        self._start_decoding(seq, len(self._decoding), self.lm_head(hidden[:, -1]) if logits is None else logits)

    def _start_decoding(self, seq: Sequence, slot: int, logits: torch.Tensor) -> None:
        """Sample the first token from the prompt's last logits (1, V); unless that ends the request,
        it decodes from the next step on. Its K/V must be in `slot`; they move to the next decoding
        slot if that is another one."""
        if seq.params.repetition_penalty != 1.0:
            seq.presence = torch.zeros(1, self.vocab, dtype=torch.bool, device=self.device)
            mark_seen(seq.presence, seq.prompt[None])
        settings = SamplingTensors.from_rows([seq.setting_row], device=self.device)
        token = select_next(ban_ids(logits, [seq.banned()]), settings, presence=seq.presence,
                            generators=[seq.generator])
        if self._emit(seq, int(token[0]), logits[0]):
            self._keep(seq, slot)
            return
        target = len(self._decoding)
        if slot != target:
            self.kv.move(slot, target, seq.cached)
        self._presence[target] = False
        if seq.presence is not None:
            self._presence[target] = seq.presence[0]
        self._decoding.append(seq)
        self._batch_dirty = True

    def _take_group(self) -> list[Sequence]:
        """Two or more queued text-only requests whose prompts each fit one chunk, taken together so
        one forward prefills them all (a prompt alone is a GEMM of few rows, which wastes the weight
        read, and on CPUs without native bf16 misses the float32 route). At most 4 chunks of tokens,
        padded, and with a time budget while others decode (`_budget_s`), no more than the measured prefill rate
        does within the budget; none while another request is being prepared or an encoded one waits
        for its turn. Requests with images are skipped: they queue for the vision encoder."""
        if self._incoming is not None or self._encoded:
            return []
        cap = 4 * self.prefill_chunk  # padded tokens
        budget = self._budget_s()
        if budget is not None:
            rate = self._prefill_s_per_token
            cap = min(cap, int(budget / rate)) if rate is not None else 0
        group: list[Sequence] = []
        longest = 0
        with self._lock:
            free = self.max_slots - len(self._decoding)
            for seq in self._queue:
                if seq.vision_job is not None:
                    continue
                longest = max(longest, seq.prompt.numel())  # the padded width if seq joins
                if (len(group) >= free or seq.prompt.numel() > self.prefill_chunk
                        or longest * (len(group) + 1) > cap or not self._may_admit(seq)
                        or self._reuses_much(seq)):
                    break
                group.append(seq)
            if len(group) < 2:
                return []
            for seq in group:
                self._queue.remove(seq)
        return group

    def _reuses_much(self, seq: Sequence) -> bool:
        """Whether a stored prefix covers half of seq's prompt: then it goes alone, to reuse it (a
        shared start of a few tokens, as a chat template's header, is not worth losing the group)."""
        return 2 * self.prefix_cache.reusable(seq.prompt, None)[1] >= seq.prompt.numel()

    def _prefill_group(self, group: list[Sequence]) -> None:
        """Whole prompts of text-only requests in one forward: row i writes slot len(decoding) + i.
        Shorter rows are padded at the end; their padding writes K/V past the prompt that no query
        reads (each row's decode steps mask keys beyond their own position, and overwrite them)."""
        first = len(self._decoding)
        lengths = [seq.prompt.numel() for seq in group]
        width = max(lengths)
        tokens = torch.zeros(len(group), width, dtype=torch.long, device=self.device)
        for row, seq in enumerate(group):
            tokens[row, :lengths[row]] = seq.prompt
        positions = torch.arange(width, device=self.device).expand(len(group), width)
        window = KVWindow(self.kv, slots=torch.arange(first, first + len(group), device=self.device),
                          positions=positions, first=first, length=width)
        hidden = self.text_model(tokens, position_ids=positions, mask=None, cross=None, cache=window)
        last = hidden[torch.arange(len(group), device=self.device), torch.tensor(lengths, device=self.device) - 1]
        logits = self.lm_head(last)  # (rows, V)
        for row, seq in enumerate(group):
            seq.prefilled = seq.cached = lengths[row]
            self._start_decoding(seq, first + row, logits[row:row + 1])

    def _budget_s(self) -> float | None:
        """Seconds a new request's work may take in this step while others decode (None: no bound):
        the smaller of prefill_budget_s and what keeps this step's decode plus the piece within
        1 + prefill_budget_ratio decode steps on all threads (ratio times the step, with no vision thread)."""
        if not self._decoding:
            return None
        bounds = [] if self.prefill_budget_s is None else [self.prefill_budget_s]
        if self.prefill_budget_ratio is not None and self._decode_s is not None:
            # The others' gap, this step and the piece, within 1 + ratio idle steps: a step slowed by
            # a vision thread beside it (vision_threads) leaves less room for the piece.
            idle = self._decode_s if self._idle_decode_s is None else self._idle_decode_s
            bounds.append(max(MIN_BUDGET_S, (1 + self.prefill_budget_ratio) * idle - self._decode_s))
        return min(bounds, default=None)

    def _chunk_size(self) -> int:
        budget = self._budget_s()
        if budget is None:
            return self.prefill_chunk
        if self._prefill_s_per_token is None:  # no measurement yet: a small first chunk
            return min(self.prefill_chunk, 16)
        return max(8, min(self.prefill_chunk, int(budget / self._prefill_s_per_token)))
