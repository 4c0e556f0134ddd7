"""Beam search with transformers' semantics (num_beams, length_penalty, early_stopping,
num_return_sequences), over the text decoder with a KV cache.

Each prompt keeps `num_beams` running hypotheses in consecutive cache slots and a set of at most
`num_beams` finished ones. A step scores every (beam, next id) by the beam's summed log-probability
plus the id's, keeps the best K = max(2, 1 + #eos) * num_beams candidates (enough that num_beams of
them do not end), lets the ones that end among the first num_beams enter the finished set under
the length penalty, and continues with the best num_beams that do not end. The cache follows the
beams by copying each surviving beam's slot (an index_select over slots). A prompt's images are
encoded and projected to cross-attention K/V once; every beam of the prompt reads the same K/V.

Rows of a left-padded batch run from their own real tokens, so each row equals itself alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mllama.cache import KVCache, KVWindow
from mllama.config import GenerationConfig
from mllama.outputs import ModelOutput
from mllama.sampling import (NgramBans, SamplingTensors, apply_min_p, apply_repetition_penalty, apply_temperature,
                             apply_top_k, apply_top_p, ban_ids, mark_seen)
from mllama.text import CrossAttentionDecoderLayer, CrossInputs, MllamaTextModel
from mllama.vision_cache import RequestVision, VisionJob, decode_cross

# transformers' stand-in for "no score": beams 1.. start with it so the first step expands beam 0 only,
# and ended candidates carry it so they are never continued.
NO_SCORE = -1.0e9


class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """return_dict_in_generate with num_beams > 1: `.sequences` (B * num_return_sequences, L),
    `.sequences_scores` (output_scores: length-penalized sums of log-probabilities), per step
    `.scores` (output_scores: the processed log-probabilities of every running beam, (B * num_beams, V)),
    `.logits` (output_logits: raw logits) and `.beam_indices` (the beam, numbered b * num_beams + j,
    each returned token came from; -1 past the sequence's end)."""

    _fields = ("sequences", "sequences_scores", "scores", "logits", "beam_indices", "attentions", "hidden_states",
               "past_key_values")
    sequences: torch.Tensor
    sequences_scores: torch.Tensor | None
    scores: tuple[torch.Tensor, ...] | None
    logits: tuple[torch.Tensor, ...] | None
    beam_indices: torch.Tensor | None


@dataclass(frozen=True)
class BeamSettings:
    num_beams: int
    max_new: int
    eos_ids: tuple[int, ...]
    fill_id: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    min_tokens: int = 0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    # Beam sampling (do_sample=True): candidates are drawn without replacement from the softmax of the
    # accumulated scores, after temperature / top-k / top-p / min-p on each step's log-probabilities.
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def validate(self) -> None:
        n = self.num_beams
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"num_beams must be an int >= 2 for beam search, got {n!r}")
        r = self.num_return_sequences
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= n:
            raise ValueError(f"num_return_sequences must be an int in [1, num_beams={n}], got {r!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or lp != lp:
            raise ValueError(f"length_penalty must be a real number, got {lp!r}")
        if self.max_new < 0:
            raise ValueError(f"max_new must be >= 0, got {self.max_new}")
        if self.sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for beam sampling, got {self.temperature}")


@dataclass
class Prompt:
    ids: torch.Tensor  # (S,) real tokens
    vision: RequestVision | None


class SlotDecoder:
    """The text decoder over a KV cache of B * num_beams slots; slot b * num_beams + j is beam j of prompt b."""

    def __init__(self, model: nn.Module, prompts: list[Prompt], num_beams: int, max_new: int) -> None:
        self.text_model: MllamaTextModel = getattr(model.model, "language_model", model.model)
        self.lm_head = model.lm_head
        weight = self.text_model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        layers = list(self.text_model.layers)
        self_attn = [i for i, layer in enumerate(layers) if not isinstance(layer, CrossAttentionDecoderLayer)]
        attn = layers[self_attn[0]].self_attn
        self.lengths = torch.tensor([p.ids.numel() for p in prompts], device=self.device)
        self.num_beams = num_beams
        self.kv = KVCache(layers=self_attn, slots=len(prompts) * num_beams, heads=attn.num_kv_heads,
                          max_len=int(self.lengths.max()) + max_new, head_dim=attn.head_dim, dtype=self.dtype,
                          device=self.device)
        self.prompts = prompts
        self.cross = decode_cross([p.vision for p in prompts for _ in range(num_beams)], dtype=self.dtype,
                                  device=self.device)
        self.cached = 0  # generated tokens whose K/V are in every slot

    def prefill(self) -> torch.Tensor:
        """Each prompt into its first beam's slot, copied to the others; (B * num_beams, V) logits."""
        rows = []
        for b, prompt in enumerate(self.prompts):
            slot, length = b * self.num_beams, prompt.ids.numel()
            positions = torch.arange(length, device=self.device)[None]
            window = KVWindow(self.kv, slots=torch.tensor([slot], device=self.device), positions=positions,
                              first=slot, length=length)
            cross = None
            if prompt.vision is not None:
                mask, text_rows = prompt.vision.cross_rows(0, length, self.dtype)
                if bool(text_rows.any()):  # rows that see no image are identities in cross layers
                    cross = CrossInputs(states=None, mask=mask, text_row_mask=text_rows, kv=prompt.vision.kv)
            hidden = self.text_model(prompt.ids[None], position_ids=positions, cross=cross, cache=window)
            for j in range(1, self.num_beams):
                self.kv.move(slot, slot + j, length)
            rows.append(self.lm_head(hidden[:, -1]).float().expand(self.num_beams, -1))
        return torch.cat(rows)

    def reorder(self, sources: torch.Tensor) -> None:
        """Slot i takes the cache of slot sources[i] (beams that survive, possibly several times)."""
        if torch.equal(sources, torch.arange(sources.numel(), device=sources.device)):
            return  # every beam continued itself: nothing moves
        length = int(self.lengths.max()) + self.cached
        for buffers in (self.kv.k, self.kv.v):
            for buf in buffers.values():
                buf[:, :, :length] = buf[:, :, :length].index_select(0, sources)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B * num_beams,) -> next (B * num_beams, V) logits."""
        positions = (self.lengths + self.cached).repeat_interleave(self.num_beams)[:, None]
        length = int(positions.max()) + 1
        mask = (torch.arange(length, device=self.device)[None] < positions + 1)[:, None, None]
        window = KVWindow(self.kv, slots=torch.arange(positions.shape[0], device=self.device), positions=positions,
                          first=0, length=length)
        hidden = self.text_model(tokens[:, None], position_ids=positions, mask=mask, cross=self.cross, cache=window)
        self.cached += 1
        return self.lm_head(hidden[:, -1]).float()


def encode_prompt(model: nn.Module, ids: torch.Tensor, images: tuple[torch.Tensor, ...] | None) -> Prompt:
    """A prompt's real ids and, with images (pixel_values, aspect_ratio_ids, aspect_ratio_mask,
    cross_attention_mask) of that row, their cross-attention K/V, computed once."""
    if images is None:
        return Prompt(ids, None)
    device = ids.device
    job = VisionJob(model, *(t.to(device) for t in images), cache=None, fast_vision=False, piece_layers=None)
    while not job.finished:
        job.run_piece()
    return Prompt(ids, job.result())


@dataclass
class BeamResult:
    """Per prompt, its num_return_sequences best finished hypotheses, best first."""

    tokens: list[list[list[int]]]  # [prompt][rank] -> generated ids
    sources: list[list[list[int]]]  # [prompt][rank] -> beam index (b * num_beams + j) of each id
    sequences_scores: torch.Tensor  # (B * num_return_sequences,)
    scores: tuple[torch.Tensor, ...]
    logits: tuple[torch.Tensor, ...]


@torch.inference_mode()
def beam_search(model: nn.Module, prompts: list[Prompt], settings: BeamSettings, *, keep_scores: bool = False,
                keep_logits: bool = False, generator: torch.Generator | None = None) -> BeamResult:
    settings.validate()
    if settings.max_new < 1:
        raise ValueError("beam search needs a budget of at least one new token")
    s, b, n, steps = settings, len(prompts), settings.num_beams, settings.max_new
    decoder = SlotDecoder(model, prompts, n, steps)
    device = decoder.device
    eos = torch.tensor(s.eos_ids, dtype=torch.long, device=device)
    k = max(2, 1 + len(s.eos_ids)) * n
    offsets = torch.arange(b, device=device)[:, None] * n  # beam j of prompt i is row i * n + j
    run_tokens = torch.full((b, n, steps), s.fill_id, dtype=torch.long, device=device)
    run_from = torch.full((b, n, steps), -1, dtype=torch.long, device=device)
    run_scores = torch.full((b, n), NO_SCORE, device=device)
    run_scores[:, 0] = 0.0  # identical beams at first: expand only one
    fin_tokens, fin_from = run_tokens.clone(), run_from.clone()
    fin_scores = torch.full((b, n), NO_SCORE, device=device)
    fin_real = torch.zeros(b, n, dtype=torch.bool, device=device)
    fin_len = torch.zeros(b, n, dtype=torch.long, device=device)
    improvable = torch.ones(b, dtype=torch.bool, device=device)
    ngrams = [NgramBans(s.no_repeat_ngram_size, p.ids.tolist()) for p in prompts for _ in range(n)] \
        if s.no_repeat_ngram_size else None
    logits = decoder.prefill()
    vocab = logits.shape[-1]
    presence = None
    if s.repetition_penalty != 1.0:
        presence = torch.zeros(b * n, vocab, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            mark_seen(presence[i * n:(i + 1) * n], p.ids[None].expand(n, -1))
        penalty = torch.full((b * n,), float(s.repetition_penalty), device=device)
    warp = SamplingTensors.from_rows([(s.temperature, s.top_k, s.top_p, s.min_p, 1.0)] * (b * n), device=device)
    scores, raw = [], []
    for t in range(steps):
        logp = logits.log_softmax(dim=-1)
        if presence is not None:
            logp = apply_repetition_penalty(logp, presence, penalty)
        bans = [g.banned() for g in ngrams] if ngrams is not None else [[] for _ in range(b * n)]
        if t < s.min_tokens:
            bans = [ids + list(s.eos_ids) for ids in bans]
        logp = ban_ids(logp, bans)
        if s.sample:
            logp = apply_temperature(logp, warp.temperature)
            logp = apply_min_p(apply_top_p(apply_top_k(logp, warp.top_k), warp.top_p), warp.min_p)
        if keep_scores:
            scores.append(logp.clone())
        if keep_logits:
            raw.append(logits.clone())
        total = (logp.view(b, n, vocab) + run_scores[..., None]).view(b, n * vocab)
        if s.sample:  # k draws without replacement, in the order drawn (transformers' order too)
            flat = torch.multinomial(total.softmax(dim=-1), k, generator=generator)
            cand_scores = total.gather(1, flat)
        else:
            cand_scores, flat = total.topk(k, dim=-1)
        cand_beam, cand_token = flat // vocab, flat % vocab
        ends = torch.isin(cand_token, eos) | (t + 1 >= steps)
        cand_tokens = run_tokens.gather(1, cand_beam[..., None].expand(b, k, steps)).clone()
        cand_tokens[:, :, t] = cand_token
        cand_from = run_from.gather(1, cand_beam[..., None].expand(b, k, steps)).clone()
        cand_from[:, :, t] = cand_beam + offsets

        # Finished set: only candidates ranked among the first num_beams may enter, and none once
        # the set cannot improve or (early_stopping=True) is full.
        full = fin_real.all(dim=-1)
        accepting = improvable & ~(full & (s.early_stopping is True))
        enters = ends & (torch.arange(k, device=device) < n)[None] & accepting[:, None]
        normed = cand_scores / float((t + 1) ** s.length_penalty)
        merged = torch.cat([fin_scores, torch.where(enters, normed, float("-inf"))], dim=1)
        fin_scores, keep = merged.topk(n, dim=-1)
        fin_tokens = torch.cat([fin_tokens, cand_tokens], 1).gather(1, keep[..., None].expand(b, n, steps))
        fin_from = torch.cat([fin_from, cand_from], 1).gather(1, keep[..., None].expand(b, n, steps))
        fin_real = torch.cat([fin_real, enters], 1).gather(1, keep)
        fin_len = torch.cat([fin_len, torch.full_like(cand_beam, t + 1)], 1).gather(1, keep)

        # Running set: the best num_beams candidates that did not end.
        run_scores, pick = torch.where(ends, cand_scores + NO_SCORE, cand_scores).topk(n, dim=-1)
        origin = cand_beam.gather(1, pick)
        run_tokens = cand_tokens.gather(1, pick[..., None].expand(b, n, steps))
        run_from = cand_from.gather(1, pick[..., None].expand(b, n, steps))
        chosen = cand_token.gather(1, pick)

        # Could a running beam still beat the worst finished one? Its best hoped-for score divides by
        # the current length, or (early_stopping="never", positive penalty) by the longest possible.
        longest = steps if s.early_stopping == "never" and s.length_penalty > 0 else t + 1
        hoped = run_scores[:, 0] / float(longest ** s.length_penalty)
        full = fin_real.all(dim=-1)
        worst = torch.where(full, fin_scores.min(dim=-1).values, torch.full_like(hoped, NO_SCORE))
        improvable &= hoped > worst
        done = ~improvable | (full & (s.early_stopping is True))
        if t + 1 == steps or bool(done.all()):
            break
        sources = (origin + offsets).flatten()
        decoder.reorder(sources)
        next_ids = chosen.flatten()
        if ngrams is not None:
            ngrams = [ngrams[i].copy() for i in sources.tolist()]
            for g, token in zip(ngrams, next_ids.tolist()):
                g.append(token)
        if presence is not None:
            presence = presence.index_select(0, sources)
            mark_seen(presence, next_ids[:, None])
        logits = decoder.step(next_ids)

    r = s.num_return_sequences
    lengths = fin_len[:, :r].tolist()
    tokens = [[fin_tokens[i, j, :lengths[i][j]].tolist() for j in range(r)] for i in range(b)]
    sources = [[fin_from[i, j, :lengths[i][j]].tolist() for j in range(r)] for i in range(b)]
    return BeamResult(tokens=tokens, sources=sources, sequences_scores=fin_scores[:, :r].flatten(),
                      scores=tuple(scores), logits=tuple(raw))


def generate_beams(model: nn.Module, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                   pixel_values: torch.Tensor | None = None, aspect_ratio_ids: torch.Tensor | None = None,
                   aspect_ratio_mask: torch.Tensor | None = None, cross_attention_mask: torch.Tensor | None = None,
                   config: GenerationConfig, num_return_sequences: int = 1, return_dict: bool = False,
                   output_scores: bool = False, output_logits: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor | GenerateBeamDecoderOnlyOutput:
    """generate() with config.extra num_beams > 1 (and length_penalty, early_stopping; do_sample for beam
    sampling, drawing from `generator` or torch's default one, as transformers does): (B *
    num_return_sequences, prompt_len + new) ids, each prompt's best hypotheses first, shorter ones
    filled as transformers fills them (the pad id, or the first eos id when the pad id is 0 or unset)."""
    from mllama.generate import check_generate_inputs, token_rules

    b, s, max_new, attention_mask, images = check_generate_inputs(
        model, input_ids, attention_mask=attention_mask, pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids,
        aspect_ratio_mask=aspect_ratio_mask, cross_attention_mask=cross_attention_mask, config=config)
    min_tokens, ngram = token_rules(config, prompt_len=s)
    eos = tuple(config.eos_token_ids)
    pad = config.pad_token_id
    settings = BeamSettings(num_beams=config.extra.get("num_beams", 1), max_new=max_new, eos_ids=eos,
                            fill_id=pad if pad else (eos[0] if eos else 0),
                            length_penalty=config.extra.get("length_penalty", 1.0),
                            early_stopping=config.extra.get("early_stopping", False),
                            num_return_sequences=num_return_sequences, min_tokens=min_tokens,
                            no_repeat_ngram_size=ngram, repetition_penalty=config.repetition_penalty,
                            sample=bool(config.do_sample), temperature=config.temperature, top_k=config.top_k or 0,
                            top_p=config.top_p if config.top_p is not None else 1.0, min_p=config.min_p or 0.0)
    settings.validate()
    if max_new == 0:  # nothing to search: the prompts as they are, as greedy generate returns them
        sequences = input_ids.repeat_interleave(num_return_sequences, dim=0)
        return GenerateBeamDecoderOnlyOutput(sequences=sequences) if return_dict else sequences
    real = attention_mask.bool()
    # The embedding's device: lm_head may be a quantized module without a plain weight.
    device = getattr(model.model, "language_model", model.model).embed_tokens.weight.device
    prompts = []
    for row in range(b):
        keep = real[row]
        row_images = None
        if images is not None:
            row_images = (images[0][row], images[1][row], images[2][row], images[3][row][keep])
        prompts.append(encode_prompt(model, input_ids[row][keep].to(device), row_images))
    result = beam_search(model, prompts, settings, keep_scores=output_scores and return_dict,
                         keep_logits=output_logits and return_dict, generator=generator)
    r = num_return_sequences
    width = max(len(t) for per_prompt in result.tokens for t in per_prompt)
    out = torch.full((b * r, width), settings.fill_id, dtype=input_ids.dtype)
    origins = torch.full((b * r, width), -1, dtype=torch.long)
    for i in range(b):
        for j in range(r):
            tokens = result.tokens[i][j]
            out[i * r + j, :len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
            origins[i * r + j, :len(tokens)] = torch.tensor(result.sources[i][j], dtype=torch.long)
    sequences = torch.cat([input_ids.repeat_interleave(r, dim=0), out.to(input_ids.device)], dim=1)
    if not return_dict:
        return sequences
    return GenerateBeamDecoderOnlyOutput(sequences=sequences,
                                         sequences_scores=result.sequences_scores if output_scores else None,
                                         scores=result.scores if output_scores else None,
                                         logits=result.logits if output_logits else None,
                                         beam_indices=origins.to(input_ids.device))
