"""Streaming a stream's text: whole characters as its tokens arrive, stop sequences never
emitted (TextStream), and its timings. Its tokens are sampled inside the decode step
(src/serving/sampling.py).
"""

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"  # what a partial UTF-8 byte sequence decodes to


MIN_REPETITION_PENALTY = 0.01  # a seen token's logit divided by less can overflow to inf


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
