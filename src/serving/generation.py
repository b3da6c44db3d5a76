"""Sampling a stream's next token, and streaming its text.

Each stream samples on its own (TokenSampler: its settings, its seeded private
torch.Generator, its repetition history), whatever else runs in the same decode step
(src/serving/scheduler.py), so that a request's tokens do not depend on its neighbours; stop
sequences end a stream as soon as they appear, and text leaves as it is produced
(TextStream). Sampling itself uses transformers' logits processors.
"""

from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from src.seeds import derive_seed

REPLACEMENT_CHAR = "\ufffd"  # what a partial UTF-8 byte sequence decodes to


MIN_REPETITION_PENALTY = 0.01  # a seen token's logit divided by less can overflow to inf


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    min_new_tokens: int = -1  # -1: off
    temperature: float = 0.7
    top_p: float = 0.95  # 1: off
    top_k: int = -1  # -1: off
    repetition_penalty: float = 1.15  # 1 (or 0): off
    seed: int | None = None


def logits_processors(settings: SamplingSettings) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if settings.repetition_penalty not in (0.0, 1.0):
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    processors.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k > 0:
        processors.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        processors.append(CandidateTopPWarper(settings.top_p))
    return processors


class CandidateTopPWarper(TopPLogitsWarper):
    """transformers' top-p, without sorting the whole vocabulary when it need not.

    Top-p keeps a token when the probability of the tokens likelier than it is below p, that
    is (transformers' form) drops the least likely tokens while their total is at most
    1 - p. If the `candidates` likeliest tokens already hold p, every token beyond them is
    dropped, so they are all that needs sorting (a CPU sorts 32,000 logits in about 2 ms, a
    sixth of a decode step; it takes the 256 likeliest in 0.1 ms), else the `tail` (4,096)
    likeliest (0.4 ms). If instead the `tail` least likely tokens hold more than 1 - p (a
    flat distribution), all that is dropped is among them. Otherwise, transformers' sort.
    """

    def __init__(self, top_p: float, candidates: int = 256, tail: int = 4096) -> None:
        super().__init__(top_p)
        self.candidates, self.tail = candidates, tail

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != 1 or scores.shape[-1] <= self.tail:
            return super().__call__(input_ids, scores)
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
        if mass_from_below[0, -1] > 1 - self.top_p:  # what is dropped lies among them
            drop = mass_from_below <= 1 - self.top_p
            return scores.scatter(-1, indices, least.masked_fill(drop, self.filter_value))
        return super().__call__(input_ids, scores)


def sampling_distribution(
    scores: torch.Tensor,  # (1, V) float logits of the next token
    ids: torch.Tensor,  # (1, T) every token so far, for the repetition penalty
    processors: LogitsProcessorList,
    suppress_eos: bool,
    eos_token_id: int,
) -> torch.Tensor:
    """The probabilities (1, V) that the next token is drawn from."""
    if suppress_eos:  # min_new_tokens not reached yet
        scores[:, eos_token_id] = -float("inf")
    return processors(ids, scores).softmax(dim=-1)


def draw(probabilities: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token (1, 1) from `probabilities` (1, V), by the inverse of their cumulative sum
    at one uniform number of `generator`: one random number a token, where
    torch.multinomial draws one a vocabulary entry (0.65 ms on a CPU for 32,000, against
    0.03 here). A token of probability 0 is never drawn (its cumulative sum equals its
    predecessor's)."""
    cumulative = probabilities.cumsum(dim=-1)
    uniform = torch.rand((1, 1), generator=generator, device=probabilities.device)
    token = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)
    return token.clamp_(max=probabilities.shape[-1] - 1)


class TokenSampler:
    """The sampling state of one answer: its settings, its own seeded generator, the tokens
    so far (for the repetition penalty). `next_token` takes the next token's logits and
    returns the token drawn, or None once the answer has ended (EOS, or max_new_tokens
    reached). The single-stream loop below and the batching scheduler both draw through it,
    so a seed gives the same tokens whichever serves the request."""

    def __init__(
        self,
        prompt_ids: list[int],
        settings: SamplingSettings,
        eos_token_id: int,
        device: torch.device,
    ) -> None:
        self.settings = settings
        self.eos_token_id = eos_token_id
        self.generator = torch.Generator(device=device)
        if settings.seed is None:
            self.generator.seed()  # fresh entropy; the global RNG is left alone
        else:
            self.generator.manual_seed(derive_seed(settings.seed, "sampling"))
        self.processors = logits_processors(settings)
        self.ids = torch.tensor([prompt_ids], device=device)  # (1, T): all tokens so far
        self.produced = 0
        self.finished = settings.max_new_tokens < 1

    @torch.inference_mode()
    def next_token(self, logits: torch.Tensor) -> int | None:
        """Draw from the next token's logits (1, V); None when the answer ends here."""
        if self.finished:
            return None
        probabilities = sampling_distribution(
            logits.float(),
            self.ids,
            self.processors,
            suppress_eos=self.produced < self.settings.min_new_tokens,
            eos_token_id=self.eos_token_id,
        )
        token = draw(probabilities, self.generator)  # (1, 1)
        token_id = int(token.item())  # the one wait for the device per token: to stream it
        self.produced += 1
        if token_id == self.eos_token_id:
            self.finished = True
            return None
        self.ids = torch.cat([self.ids, token], dim=1)
        self.finished = self.produced >= self.settings.max_new_tokens
        return token_id


class TextStream:
    """Turns token ids into text pieces: whole characters only, stop sequences never emitted.

    Each token's text comes from a window of the last few tokens, not from the whole answer
    decoded again (which costs time that grows with the answer, per token): the window
    before the token and with it are decoded, and the difference is the new text, as vLLM
    and TGI detokenize. The window starts at the last token whose text was taken, so a Llama
    token's leading space, which depends on what precedes it, comes out as in the whole
    answer's decoding (tested against it). A token that ends in part of a UTF-8 character
    adds nothing until the character is whole; text that could still become a stop sequence
    is held back until it is decided.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_sequences: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop_sequences = [s for s in stop_sequences if s]
        self.ids: list[int] = []
        self.text = ""  # the answer's text so far, whole characters only
        self.prefix_offset = self.read_offset = 0  # the window: ids[prefix_offset:]
        self.emitted = 0  # characters of the text already given out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that can be given out now (may be empty)."""
        self.ids.append(token_id)
        self.text += self._new_text()
        pending = self.text[self.emitted :]
        cut = self._stop_position(pending)
        if cut is not None:
            self.stopped = True
            self.emitted += cut
            return pending[:cut]
        # Trailing whitespace waits for what follows: the format ends answers with " </s>".
        undecided = max(self._held_back(pending), len(pending) - len(pending.rstrip()))
        ready = len(pending) - undecided
        self.emitted += ready
        return pending[:ready]

    def _new_text(self) -> str:
        """The text the last token adds, from the window; "" while a character is partial."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        after = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """The rest, once generation has ended without a stop sequence."""
        if self.stopped:
            return ""
        window = self.ids[self.prefix_offset :]
        before = self.ids[self.prefix_offset : self.read_offset]
        decode = self.tokenizer.decode
        tail = decode(window, skip_special_tokens=True)[
            len(decode(before, skip_special_tokens=True)) :
        ]  # what a partial character at the end decodes to, as the whole answer would
        text = (self.text + tail).rstrip()
        rest = text[self.emitted :]
        self.emitted = len(text)
        return rest

    def _stop_position(self, pending: str) -> int | None:
        found = [i for i in (pending.find(s) for s in self.stop_sequences) if i >= 0]
        return min(found) if found else None

    def _held_back(self, pending: str) -> int:
        """Length of the longest end of `pending` that begins some stop sequence."""
        longest = 0
        for stop in self.stop_sequences:
            for size in range(min(len(stop) - 1, len(pending)), longest, -1):
                if pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest


@dataclass
class GenerationStats:
    """Token counts and timings of one answer, filled in while it streams."""

    input_tokens: int = 0
    output_tokens: int = 0
    time_to_first_token: float = 0.0  # seconds
    total_time: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        decode_time = self.total_time - self.time_to_first_token
        return (self.output_tokens - 1) / decode_time if self.output_tokens > 1 else 0.0
