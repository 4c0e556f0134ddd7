"""The engine's decode step: one batched forward for every decoding slot (with the incoming prompt's
next chunk in the same forward where it fuses), then sampling and delivery.

A mixin of mllama.engine.Engine (it uses the engine's cache, slots and settings); apart only to keep
the engine's loop and slots readable on their own, as mllama.engine_prepare.
"""

from __future__ import annotations

import time

import torch

from mllama.cache import KVWindow
from mllama.decode_step import compiled_step, forward_step
from mllama.engine_sequence import Sequence
from mllama.sampling import SamplingTensors, ban_ids, mark_seen, select_next
from mllama.text import TextPart
from mllama.vision_cache import decode_cross


class DecodeStep:
    """Engine methods that run the decode step (see the module docstring)."""

    def _fuses(self, seq: Sequence | None) -> bool:
        """Whether the incoming request's next prompt chunk joins this decode step's forward (one pass
        over the weights for both; eager steps only; a request with images is encoded before it takes
        the prompt line)."""
        return self.fuse_prefill and not self.compile and seq is not None and seq.prefilled < seq.prompt.numel()

    def _decode(self, *, fuse: bool = True) -> bool:
        """One decode step for every decoding request, with the incoming prompt's next chunk in the same
        forward where `fuse` and _fuses say so. Returns whether it took that chunk."""
        seqs = self._decoding
        n = len(seqs)
        rows = min(1 << (n - 1).bit_length(), self.max_slots) if self.compile else n
        if self._batch_dirty:
            self._rebuild_batch(rows)
        tokens = torch.tensor([[s.next_token] for s in seqs] + [[0]] * (rows - n), device=self.device)
        positions = torch.tensor([[s.cached] for s in seqs] + [[0]] * (rows - n), device=self.device)
        slots = torch.arange(rows, device=self.device)
        if rows > n:  # padding rows of a compiled step write into the spare slot
            slots[n:] = self.max_slots
        length = self.max_len if self.compile else max(s.cached for s in seqs) + 1
        mask = None
        if self.compile or any(s.cached + 1 != length for s in seqs):
            mask = (torch.arange(length, device=self.device)[None] < positions + 1)[:, None, None]
        window = KVWindow(self.kv, slots=slots, positions=positions, first=0, length=length)
        incoming = self._incoming
        fused = fuse and self._fuses(incoming)
        if fused:
            started = time.perf_counter()
            part, end = self._prompt_chunk(incoming)
            hidden, chunk = self.text_model.forward_parts([TextPart(tokens, positions, mask, self._cross, window), part])
            ends = end == incoming.prompt.numel()  # its first token's logits in the same pass over lm_head
            logits = self.lm_head(torch.cat([hidden[:n, -1], chunk[:, -1]]) if ends else hidden[:n, -1])
            first, logits = (logits[n:] if ends else None), logits[:n]
            if self._decode_s is not None:  # what the chunk added to the step, per token
                self._measured_prefill(max(0.0, time.perf_counter() - started - self._decode_s) / (end - incoming.prefilled))
            incoming.prefilled = incoming.cached = end  # before _free below, which moves its K/V with the slots
        else:
            step = compiled_step(self._custom_linears) if self.compile else forward_step
            logits = step(self.text_model, self.lm_head, tokens, positions, mask, self._cross, window)[:n]
        for s in seqs:
            s.cached += 1
        penalized = any(s.params.repetition_penalty != 1.0 for s in seqs)
        presence = self._presence[:n] if penalized else None
        if penalized:
            mark_seen(presence, tokens)
        # Bans act on the choice only: events keep the raw logits (logprobs, return_logits).
        chosen = select_next(ban_ids(logits, [s.banned() for s in seqs]), self._settings, presence=presence,
                             generators=[s.generator for s in seqs])
        done = [slot for slot, (seq, token) in enumerate(zip(seqs, chosen.tolist()))
                if self._emit(seq, token, logits[slot])]
        for slot in done:
            self._keep(seqs[slot], slot)
        self._free(done)
        if fused:
            self._chunk_done(incoming, chunk, first)
        return fused

    def _rebuild_batch(self, n: int) -> None:
        """Per-row settings and the cross-attention K/V of the decoding slots, padded to the widest
        row and to n rows, rebuilt only when the set of decoding requests (or their order) changes."""
        seqs = self._decoding
        self._settings = SamplingTensors.from_rows([s.setting_row for s in seqs], device=self.device)
        self._batch_dirty = False
        visions = [s.vision for s in seqs] + [None] * (n - len(seqs))
        self._cross = decode_cross(visions, dtype=self.dtype, device=self.device)
