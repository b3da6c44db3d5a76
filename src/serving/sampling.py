"""Sampling every row's next token on the device, inside the decode step.

Each row of a decode step (src/serving/batch_step.py) is a request with its own settings
(temperature, top-k, top-p, repetition penalty, min_new_tokens) and its own seed. Here those
settings are tensors of the rows (`SamplingRows`), so that one step samples all rows with
static shapes, without the host: the step can be captured in a CUDA graph with its sampling,
and the host reads the tokens while the next step already runs (src/serving/scheduler.py).

The distribution is transformers' (its repetition penalty, temperature, top-k and top-p
processors, in that order, and their arithmetic), written for rows that each carry their
own values. Its top-p sorts the vocabulary; on a CPU, where a step runs eagerly and a sort
of 32,000 logits costs as much as a sixth of a small model's step, each row instead takes
the exact shortcut of `CandidateTopPWarper` (the same tokens dropped, tested).

The random number a token is drawn with comes from a counter-based hash of the request's
seed and the token's index (`uniforms`), not from a torch.Generator: a generator is one
state per request, which a captured step over changing rows cannot hold, where the hash is
plain integer arithmetic on the rows' tensors. So a seed gives the same random numbers on
every device, whatever else runs in the same step.
"""

import secrets
from dataclasses import dataclass

import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from src.seeds import derive_seed

MASK_32 = 0xFFFFFFFF
UNIFORM_BITS = 24  # a float32's mantissa: uniforms in [0, 1) on a grid of 2**-24


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    min_new_tokens: int = -1  # -1: off
    temperature: float = 0.7
    top_p: float = 0.95  # 1: off
    top_k: int = -1  # -1: off
    repetition_penalty: float = 1.15  # 1 (or 0): off
    seed: int | None = None


def sampling_seed(settings: SamplingSettings) -> int:
    """The 63-bit seed a request's tokens are drawn with: from its seed, else fresh entropy."""
    if settings.seed is None:
        return secrets.randbits(63)
    return derive_seed(settings.seed, "sampling")


@dataclass
class SamplingRows:
    """The sampling settings and state of each row, on the device. The step reads them and
    advances `produced` and `seen`; the host writes a row when a stream takes it."""

    temperature: torch.Tensor  # (R,) float32
    top_k: torch.Tensor  # (R,) int64, the vocabulary size when off
    top_p: torch.Tensor  # (R,) float32
    drop_mass: torch.Tensor  # (R,) float32: 1 - top_p as transformers compares it, -1: off
    penalty: torch.Tensor  # (R,) float32, 1 when off
    min_new: torch.Tensor  # (R,) int64: EOS impossible while produced < min_new
    produced: torch.Tensor  # (R,) int64: tokens drawn so far (the hash's counter)
    seed: torch.Tensor  # (R, 2) int64: the seed's high and low 32 bits
    seen: torch.Tensor  # (R, V) bool: the prompt's and the answer's tokens (the penalty)

    @classmethod
    def empty(cls, rows: int, vocab: int, device: torch.device) -> "SamplingRows":
        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        ones = torch.ones(rows, device=device)
        return cls(
            ones.clone(), zeros(rows) + vocab, ones.clone(), zeros(rows, dtype=torch.float32) - 1,
            ones.clone(),
            zeros(rows), zeros(rows), zeros(rows, 2), zeros(rows, vocab, dtype=torch.bool),
        )  # fmt: skip

    def rows(self, start: int, stop: int) -> "SamplingRows":
        """Rows start..stop-1, as views (what the step writes, it writes here)."""
        return SamplingRows(*(getattr(self, f)[start:stop] for f in _FIELDS))

    def set_row(self, row: int, settings: SamplingSettings, seed: int, prompt_ids: list[int]):
        """A stream's settings into `row`, its prompt's tokens seen, nothing produced yet."""
        vocab = self.seen.shape[1]
        penalty = settings.repetition_penalty
        top_p = settings.top_p
        values = {
            "temperature": settings.temperature,
            "top_k": settings.top_k if settings.top_k > 0 else vocab,
            "top_p": top_p,
            "drop_mass": 1 - top_p if top_p < 1.0 else -1.0,  # -1: nothing is ever dropped
            "penalty": 1.0 if penalty in (0.0, 1.0) else penalty,
            "min_new": settings.min_new_tokens,
            "produced": 0,
        }
        for name, value in values.items():
            getattr(self, name)[row] = value
        self.seed[row, 0], self.seed[row, 1] = seed >> 32, seed & MASK_32
        self.seen[row] = False
        ids = torch.tensor(prompt_ids, dtype=torch.int64).to(self.seen.device, non_blocking=True)
        self.seen[row].index_fill_(0, ids, True)

    def move_row(self, source: int, target: int) -> None:
        for name in _FIELDS:
            tensor = getattr(self, name)
            tensor[target].copy_(tensor[source])


_FIELDS = (
    "temperature",
    "top_k",
    "top_p",
    "drop_mass",
    "penalty",
    "min_new",
    "produced",
    "seed",
    "seen",
)


def _times_mod_2_32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for x in [0, 2**32), in int64 without overflow: by 16-bit
    halves of the constant (the products stay under 2**48)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK_32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of x in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _times_mod_2_32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _times_mod_2_32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """(R,) float32 in [0, 1): a hash of each row's seed (R, 2) and counter (R,)."""
    # (the golden ratio's bits offset the counter: the hash maps 0 to 0)
    hashed = _mix(seed[:, 1] ^ _mix(seed[:, 0] ^ _mix((counter + 0x9E3779B9) & MASK_32)))
    return (hashed >> (32 - UNIFORM_BITS)).float() * 2.0**-UNIFORM_BITS


def sample_rows(
    logits: torch.Tensor,  # (R, V) the next token's logits of each row
    rows: SamplingRows,  # the same R rows
    eos_token_id: int,
    shortcuts: bool,
) -> torch.Tensor:
    """Each row's next token (R,) int64, drawn from its own distribution with its own seed;
    advances the rows' `produced` and `seen`. `shortcuts`: the per-row exact top-p of an
    eager step (a CPU's); else one batched sort (a captured or compiled step's)."""
    scores = logits.float()
    scores = torch.where(
        rows.seen, torch.where(scores < 0, scores * rows.penalty[:, None],
                               scores / rows.penalty[:, None]), scores,
    )  # fmt: skip  # a penalty of 1 leaves every score as it is
    suppress = rows.produced < rows.min_new
    scores[:, eos_token_id] = torch.where(suppress, -torch.inf, scores[:, eos_token_id])
    scores = scores / rows.temperature[:, None]
    if shortcuts:
        scores = _filter_each_row(scores, rows)
    else:
        scores = filter_sorted(scores, rows.top_k, rows.drop_mass)
    token = draw(scores.softmax(dim=-1), uniforms(rows.seed, rows.produced))
    rows.seen.scatter_(1, token[:, None], True)
    rows.produced.add_(1)
    return token


def filter_sorted(
    scores: torch.Tensor, top_k: torch.Tensor, drop_mass: torch.Tensor
) -> torch.Tensor:
    """transformers' top-k then top-p, each row its own k (R,) and 1 - p (R,), over one
    ascending sort of the scores: the scores with what they drop set to -inf."""
    vocab = scores.shape[-1]
    ordered, order = scores.sort(dim=-1)  # ascending, as transformers' top-p sorts
    kth_largest = ordered.gather(1, (vocab - top_k.clamp(1, vocab))[:, None])
    ordered = ordered.masked_fill(ordered < kth_largest, -torch.inf)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= drop_mass[:, None]
    drop[:, -1] = False  # the likeliest token always stays
    return scores.scatter(1, order, ordered.masked_fill(drop, -torch.inf))


def _filter_each_row(scores: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """The same, row by row through transformers' top-k and the candidate top-p."""
    vocab = scores.shape[-1]
    out = []
    settings = zip(rows.top_k.tolist(), rows.top_p.tolist(), rows.drop_mass.tolist(), strict=True)
    for index, (k, top_p, drop_mass) in enumerate(settings):
        row = scores[index : index + 1]
        if k < vocab:
            row = TopKLogitsWarper(k)(None, row)
        if drop_mass >= 0:
            row = CandidateTopPWarper(top_p, drop_mass=drop_mass)(None, row)
        out.append(row)
    return torch.cat(out)


class CandidateTopPWarper(TopPLogitsWarper):
    """transformers' top-p, without sorting the whole vocabulary when it need not.

    Top-p keeps a token when the probability of the tokens likelier than it is below p, that
    is (transformers' form) drops the least likely tokens while their total is at most
    1 - p. If the `candidates` likeliest tokens already hold p, every token beyond them is
    dropped, so they are all that needs sorting (a CPU sorts 32,000 logits in about 2 ms, a
    sixth of a decode step; it takes the 256 likeliest in 0.1 ms), else the `tail` (4,096)
    likeliest (0.4 ms). If instead the `tail` least likely tokens hold more than 1 - p (a
    flat distribution), all that is dropped is among them. Otherwise, transformers' sort.
    `drop_mass`: 1 - p as the batched filter holds it (float32), compared the same way.
    """

    def __init__(
        self, top_p: float, candidates: int = 256, tail: int = 4096, drop_mass: float | None = None
    ) -> None:
        super().__init__(top_p)
        self.candidates, self.tail = candidates, tail
        self.drop_mass = 1 - top_p if drop_mass is None else drop_mass

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != 1 or scores.shape[-1] <= self.tail:
            return self._sorted(scores)
        total = scores.logsumexp(-1, keepdim=True)
        for candidates in (self.candidates, self.tail):
            likeliest, indices = scores.topk(candidates, dim=-1)  # (1, k), descending
            probabilities = (likeliest - total).exp()  # each candidate's share of the whole
            mass_before = probabilities.cumsum(-1) - probabilities
            if mass_before[0, -1] + probabilities[0, -1] >= self.top_p:
                keep = mass_before < self.top_p
                keep[..., 0] = True  # the likeliest token always stays, as in transformers
                kept = torch.full_like(scores, self.filter_value)
                return kept.scatter(-1, indices, torch.where(keep, likeliest, self.filter_value))
        least, indices = scores.topk(self.tail, dim=-1, largest=False)  # (1, m), ascending
        mass_from_below = (least - total).exp().cumsum(-1)
        if mass_from_below[0, -1] > self.drop_mass:  # what is dropped lies among them
            drop = mass_from_below <= self.drop_mass
            return scores.scatter(-1, indices, least.masked_fill(drop, self.filter_value))
        return self._sorted(scores)

    def _sorted(self, scores: torch.Tensor) -> torch.Tensor:
        rows = scores.shape[0]
        drop_mass = torch.full((rows,), self.drop_mass, device=scores.device)
        return filter_sorted(scores, torch.full((rows,), scores.shape[-1]), drop_mass)


def draw(probabilities: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token (R,) from each row of `probabilities` (R, V), by the inverse of their
    cumulative sum at the row's `uniform` (R,): one random number a token, where
    torch.multinomial draws one a vocabulary entry. A token of probability 0 is never drawn
    (its cumulative sum equals its predecessor's)."""
    cumulative = probabilities.cumsum(dim=-1)
    target = uniform[:, None] * cumulative[:, -1:]
    token = torch.searchsorted(cumulative, target, right=True)[:, 0]
    return token.clamp_(max=probabilities.shape[-1] - 1)
