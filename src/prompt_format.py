"""The Llama-2 chat format, defined once for training and inference.

One turn renders exactly as Meta's reference code and the chat template of
meta-llama/Llama-2-7b-chat-hf do:

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{prompt} [/INST] {completion} </s>

without the <<SYS>> block when there is no system prompt. Token ids are assembled piece by
piece (BOS, the user turn, the completion, EOS) so that the ids of a prompt at inference are
exactly the ids that preceded its completion in training, and so that labels cover only the
completion and the EOS.
"""

import hashlib
import re
from dataclasses import asdict, dataclass
from itertools import chain
from typing import Any, NamedTuple, Protocol

import numpy as np

from src.errors import UserInputError

FORMAT_NAME = "llama-2-chat"
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
IGNORE_INDEX = -100  # label of a token that is not trained on
# The system prompt of Replicate's llama-2-7b-chat: what the plain base is prompted with when
# a request gives none, and an adapter whose training did not use the chat format.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# In a prompt written in chat form, what separates turns: EOS, then BOS before the next
# "[INST]" (Meta's reference encodes each turn on its own and adds the ids). Anywhere else
# "<s>" and "</s>" are text.
TURN_SEPARATOR = re.compile(r"</s>\s*<s>(?=\s*\[INST\])")


class Tokenizer(Protocol):
    bos_token_id: int
    eos_token_id: int

    def __call__(
        self, text: list[str], add_special_tokens: bool, split_special_tokens: bool
    ) -> dict: ...


def encode_texts(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, in one batched call."""
    return token_ids(encode_batch(tokenizer, texts))


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list:
    """The tokenizer's encodings of `texts` (read their ids with `token_ids`); the Rust
    tokenizer releases the GIL and uses every core meanwhile.

    User text is text: "<s>", "</s>" or "<unk>" written in it are encoded as the characters
    they are, as Meta's sentencepiece reference does, never as control tokens, so a row cannot
    end its example early. Straight to the Rust tokenizer where there is one: the
    transformers wrapper around it costs more than the tokenization itself on large files
    (and resets the flag from its own `split_special_tokens` on every call).
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.encode_special_tokens = True
        return backend.encode_batch_fast(texts, add_special_tokens=False)
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def token_ids(encoded: list) -> list[list[int]]:
    """The ids of what `encode_batch` returned."""
    return [e if isinstance(e, list) else e.ids for e in encoded]


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels of one example; labels[i] is IGNORE_INDEX where no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_supervised(self) -> int:
        # The first token is never a target: nothing precedes it.
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def render_user_turn(prompt: str, system: str | None = None) -> str:
    """`[INST] ... [/INST]` for one user message; no <<SYS>> block without a system prompt."""
    content = f"{B_SYS}{system}{E_SYS}{prompt}" if system else prompt
    return f"{B_INST} {content.strip()} {E_INST}"


def render_completion(completion: str) -> str:
    # Meta's reference encodes f"{prompt} [/INST] {answer.strip()} " + EOS: the trailing space
    # is part of the format. The leading space comes from the tokenizer's "▁" prefix.
    return f"{completion.strip()} "


@dataclass(frozen=True)
class Turn:
    """A user message and the assistant's answer (None: the answer the model is to give)."""

    user: str
    answer: str | None = None
    trained: bool = True  # False: shown to the model, no loss on it (a weight of 0)


@dataclass(frozen=True)
class Dialog:
    """A conversation: an optional system prompt, then turns. A prompt/completion row is a
    dialog of one turn."""

    turns: tuple[Turn, ...]
    system: str | None = None


class Piece(NamedTuple):
    """A stretch of text tokenized on its own, with the special tokens around it."""

    text: str
    bos: bool  # BOS before the text (never trained)
    eos: bool  # EOS after it
    trained: bool  # loss on the text's tokens and on its EOS


def dialog_pieces(dialog: Dialog) -> list[Piece]:
    """A dialog as Meta's reference encodes it: each turn is BOS, `[INST] {user} [/INST]`,
    then, where answered, `{answer} ` and EOS; the system prompt is folded into the first
    user message. Labels cover the answers of the trained turns and their EOS, nothing else.
    The parts are tokenized apart, which gives the ids of tokenizing each turn whole: no
    vocabulary token spans the space before an answer."""
    pieces = []
    for number, turn in enumerate(dialog.turns):
        user = render_user_turn(turn.user, dialog.system if number == 0 else None)
        pieces.append(Piece(user, bos=True, eos=False, trained=False))
        if turn.answer is not None:
            answer = render_completion(turn.answer)
            pieces.append(Piece(answer, bos=False, eos=True, trained=turn.trained))
    return pieces


def text_pieces(text: str) -> list[Piece]:
    """A plain text row, trained whole: BOS + text + EOS (BOS is never a label)."""
    return [Piece(text, bos=True, eos=True, trained=True)]


def assemble_pieces(
    pieces: list[Piece], piece_ids: list[list[int]], bos_id: int, eos_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids (int32), trained flags (bool) and per-piece lengths of `pieces` end to end,
    their special tokens added; `piece_ids` are the ids of each piece's text.

    One vectorised pass per batch: the data stage assembles hundreds of millions of tokens.
    """
    count = len(pieces)
    text_lengths = np.fromiter(map(len, piece_ids), np.int64, count)
    bos = np.fromiter((p.bos for p in pieces), bool, count)
    eos = np.fromiter((p.eos for p in pieces), bool, count)
    trained = np.fromiter((p.trained for p in pieces), bool, count)
    lengths = text_lengths + bos + eos
    starts = np.cumsum(lengths) - lengths
    total = int(lengths.sum())
    ids = np.empty(total, np.int32)
    ids[starts[bos]] = bos_id
    ids[(starts + bos + text_lengths)[eos]] = eos_id
    texts = np.fromiter(chain.from_iterable(piece_ids), np.int32, int(text_lengths.sum()))
    text_starts = np.cumsum(text_lengths) - text_lengths
    ids[np.repeat(starts + bos - text_starts, text_lengths) + np.arange(len(texts))] = texts
    labels = np.repeat(trained, lengths)
    labels[starts[bos]] = False
    return ids, labels, lengths


def encode_pieces(tokenizer: Tokenizer, pieces: list[Piece]) -> list[TokenizedExample]:
    """Each piece's tokens and labels, special tokens added (for one example, join them)."""
    ids, trained, lengths = assemble_pieces(
        pieces,
        encode_texts(tokenizer, [p.text for p in pieces]),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    labels = np.where(trained, ids, IGNORE_INDEX)
    bounds = np.cumsum(lengths)[:-1]
    return [
        TokenizedExample(piece.tolist(), piece_labels.tolist())
        for piece, piece_labels in zip(np.split(ids, bounds), np.split(labels, bounds), strict=True)
    ]


def encode_dialogs(tokenizer: Tokenizer, dialogs: list[Dialog]) -> list[TokenizedExample]:
    """Dialogs as `dialog_pieces` defines them, in one batched tokenizer call."""
    pieces = [dialog_pieces(d) for d in dialogs]
    encoded = iter(encode_pieces(tokenizer, [p for each in pieces for p in each]))
    examples = []
    for each in pieces:
        parts = [next(encoded) for _ in each]
        examples.append(
            TokenizedExample(
                [i for part in parts for i in part.input_ids],
                [label for part in parts for label in part.labels],
            )
        )
    return examples


def encode_chat_prompts(
    tokenizer: Tokenizer, prompts: list[str], systems: list[str | None]
) -> list[list[int]]:
    """BOS + user turn, for a batch of prompts: what the model sees before its answer."""
    dialogs = [Dialog((Turn(p),), s) for p, s in zip(prompts, systems, strict=True)]
    return [example.input_ids for example in encode_dialogs(tokenizer, dialogs)]


def encode_chat_prompt(tokenizer: Tokenizer, prompt: str, system: str | None = None) -> list[int]:
    return encode_chat_prompts(tokenizer, [prompt], [system])[0]


def encode_chat_examples(
    tokenizer: Tokenizer, prompts: list[str], completions: list[str], systems: list[str | None]
) -> list[TokenizedExample]:
    """Prompt/completion pairs: loss on the completion and the EOS only."""
    dialogs = [
        Dialog((Turn(p, c),), s) for p, c, s in zip(prompts, completions, systems, strict=True)
    ]
    return encode_dialogs(tokenizer, dialogs)


def encode_text_examples(tokenizer: Tokenizer, texts: list[str]) -> list[TokenizedExample]:
    """Plain text rows, trained whole: BOS + text + EOS."""
    return encode_pieces(tokenizer, [piece for text in texts for piece in text_pieces(text)])


def is_preformatted(prompt: str) -> bool:
    """True for a prompt the user already wrapped in [INST] ... [/INST], as the seed page allows."""
    return prompt.lstrip().startswith((B_INST, "<s>"))


def encode_user_prompt(tokenizer: Tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """What the model sees before answering a user's prompt (validation_prompt, predict.py):
    a prompt already in Llama-2 chat form as is, as training encodes that conversation (its
    own <<SYS>> block, if any; `system` is not added), any other in one [INST] turn."""
    if is_preformatted(prompt):
        return encode_preformatted(tokenizer, prompt)
    return encode_chat_prompt(tokenizer, prompt, system)


def encode_preformatted(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """A prompt the user wrote in chat form, used as is, as Meta's reference encodes a dialog:
    each turn on its own, BOS before it, EOS after every turn but the last. A leading "<s>"
    and the "</s><s>" between turns are those ids; every other character is text."""
    turns = TURN_SEPARATOR.split(prompt.strip().removeprefix("<s>"))
    ids: list[int] = []
    for turn in encode_texts(tokenizer, [t.lstrip() for t in turns]):
        if ids:
            ids.append(tokenizer.eos_token_id)
        ids += [tokenizer.bos_token_id, *turn]
    return ids


# The `prompt_template` input of Replicate's llama-2-7b-chat. Left at this default, the prompt
# is encoded by encode_chat_prompt, token for token as in training.
DEFAULT_PROMPT_TEMPLATE = f"{B_INST} {B_SYS}{{system_prompt}}{E_SYS}{{prompt}} {E_INST}"


def encode_inference_prompt(
    tokenizer: Tokenizer,
    prompt: str,
    system_prompt: str | None,
    template: str = DEFAULT_PROMPT_TEMPLATE,
) -> list[int]:
    """BOS + the prompt as the model should see it before answering (`system_prompt` None or
    "": no <<SYS>> block). Left at the default template, a prompt already in chat form (a
    dialog, say) is used as is."""
    if template == DEFAULT_PROMPT_TEMPLATE:
        return encode_user_prompt(tokenizer, prompt, system_prompt or None)
    if "{prompt}" not in template:
        raise UserInputError(f"prompt_template must contain {{prompt}}, got {template!r}")
    system = system_prompt or ""
    text = template.replace("{system_prompt}", system).replace("{prompt}", prompt)
    return [tokenizer.bos_token_id, *encode_texts(tokenizer, [text])[0]]


@dataclass(frozen=True)
class TrainedSystemPrompt:
    """The system prompt a training's chat rows used, as its metadata records it: the one
    all rows shared, or (rows differ) the most frequent, with how many rows had it.

    `text` None means no <<SYS>> block. A training of `{"text"}` rows only has no chat rows
    (`chat_rows` 0): those rows carry no chat format to follow.
    """

    text: str | None
    rows: int  # chat rows with `text` as their system prompt
    chat_rows: int  # prompt/completion and conversation rows
    distinct: int  # distinct system prompts among them (none counts as one)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, values: Any) -> "TrainedSystemPrompt | None":
        """What `as_json` wrote; None for anything else (an archive without the record)."""
        if not isinstance(values, dict):
            return None
        text, counts = values.get("text"), [values.get(k) for k in ("rows", "chat_rows")]
        if not (text is None or isinstance(text, str)) or not all(
            isinstance(c, int) and not isinstance(c, bool) for c in counts
        ):
            return None
        return cls(text, counts[0], counts[1], int(values.get("distinct") or 1))


class SystemPromptTally:
    """Counts the system prompts of chat rows as a file streams by, in memory that grows
    with the number of distinct prompts (a 64-bit hash and a count each), never with the
    rows; the text is kept only for the prompt that leads."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.chat_rows = 0
        self.leader: tuple[int, str | None] | None = None  # (count, text) of the most frequent

    def add(self, system: str | None) -> None:
        self.chat_rows += 1
        key = _text_hash(system)
        count = self.counts[key] = self.counts.get(key, 0) + 1
        if self.leader is None or count > self.leader[0]:  # ties: the first to get there
            self.leader = (count, system)

    def result(self) -> TrainedSystemPrompt:
        if self.leader is None:
            return TrainedSystemPrompt(None, 0, 0, 0)
        count, text = self.leader
        return TrainedSystemPrompt(text, count, self.chat_rows, len(self.counts))


def _text_hash(text: str | None) -> int:
    if text is None:
        return 0
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") | 1  # never 0, which is "no system prompt"


def choose_system_prompt(
    asked: str | None, trained: TrainedSystemPrompt | None, adapter: bool
) -> tuple[str | None, str]:
    """The system prompt to prompt with (None: no <<SYS>> block) and why, for the logs.

    `asked` is what the request gave: "" is no block, any other text is used as given.
    None means "as this adapter was trained": the system prompt its chat rows used (none,
    if they used none); the plain base (`adapter` False), an adapter trained on text rows
    only and an archive without the record take the base model's usual default.
    """
    if asked is not None:
        return (asked or None), ("as the request gave it" if asked else "the request's empty one")
    if not adapter:
        return DEFAULT_SYSTEM_PROMPT, "the base model's default (no adapter)"
    if trained is None:
        return DEFAULT_SYSTEM_PROMPT, (
            "the base model's default (the adapter's archive does not record its training's "
            "system prompt)"
        )
    if trained.chat_rows == 0:
        return DEFAULT_SYSTEM_PROMPT, (
            "the base model's default (the adapter was trained on text rows, without the chat "
            "format)"
        )
    share = (
        f"all {trained.chat_rows} of its chat rows"
        if trained.rows == trained.chat_rows
        else f"the most frequent: {trained.rows} of its {trained.chat_rows} chat rows"
    )
    return trained.text, f"as the adapter was trained ({share})"


def describe_system_prompt(system: str | None) -> str:
    """A system prompt for a log line: quoted and cut short, or "none"."""
    if system is None:
        return "none"
    return repr(system if len(system) <= 80 else system[:77] + "...")
