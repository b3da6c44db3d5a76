"""Rebuild Meta's Llama-2 tokenizer offline as a Hugging Face fast tokenizer.

Meta's ``tokenizer.model`` ships in no package, but the npm package
``llama-tokenizer-js@1.2.2`` (MIT, belladore.ai) embeds its data in ``llama-tokenizer.js``:

* ``llama_vocab_base64``: base64 of the 32,000 tokens joined with ``"\\n"`` (id = position);
* ``llama_merges_binary``: base64 of little-endian uint16 pairs of token ids, one pair per
  merge, in priority order (pair ``(a, b)`` merges ``vocab[a] + vocab[b]``).

This script turns that data into a ``tokenizers`` BPE pipeline equivalent to the one in
``meta-llama/Llama-2-7b-chat-hf`` and saves ``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json`` and a licence notice. ``tokenizer_class`` is deliberately
``PreTrainedTokenizerFast``: with ``LlamaTokenizer`` transformers 5 rebuilds the pipeline and
mis-tokenizes leading spaces.

Usage::

    python tools/build_llama2_tokenizer.py [--package-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

NPM_PACKAGE = "llama-tokenizer-js@1.2.2"
JS_FILE = "llama-tokenizer.js"
JS_SHA256 = "34a7b9f7579d40486444590c37cba6564ef40c3dd98ecdfc2f7c886ae72c898d"
DEFAULT_OUT = Path("tests/fixtures/llama2-tokenizer")
VOCAB_SIZE = 32000
N_MERGES = 61249
SPACE = "\u2581"  # "▁", SentencePiece's whitespace marker
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
MODEL_MAX_LENGTH = 4096

# Verbatim from meta-llama/Llama-2-7b-chat-hf tokenizer_config.json ("\\n" stays a Jinja escape).
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

LICENSE_NOTICE = """\
# Llama 2 tokenizer data: licence notice

The vocabulary and merges in `tokenizer.json` are Meta's Llama 2 tokenizer data
(derived from Meta's Llama 2 `tokenizer.model`), distributed under the
**Llama 2 Community License Agreement**: https://ai.meta.com/llama/license/

> Llama 2 is licensed under the LLAMA 2 Community License,
> Copyright (c) Meta Platforms, Inc. All Rights Reserved.

Use of these files is subject to that agreement, including its Acceptable Use Policy.

The data was extracted from the npm package `{package}` (llama-tokenizer-js,
MIT licence, Copyright 2023 belladore.ai, https://github.com/belladoreai/llama-tokenizer),
which embeds the vocabulary and merges, and rebuilt as a Hugging Face fast tokenizer by
`tools/build_llama2_tokenizer.py`. The MIT licence covers belladore.ai's code and encoding,
not Meta's tokenizer data.
"""


def npm_pack(dest: Path) -> Path:
    """Download and unpack the npm package into ``dest``; return the unpacked folder."""
    cmd = ["npm", "pack", NPM_PACKAGE, "--pack-destination", str(dest), "--silent"]
    tarball = dest / subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    with tarfile.open(tarball) as tar:
        tar.extractall(dest, filter="data")
    return dest / "package"


def read_js_source(package_dir: Path) -> str:
    """Read the package's JS source, refusing a file other than the pinned 1.2.2 one."""
    raw = (package_dir / JS_FILE).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != JS_SHA256:
        raise ValueError(f"{JS_FILE} sha256 {digest} != pinned {JS_SHA256} ({NPM_PACKAGE})")
    return raw.decode("utf-8")


def js_string_constant(source: str, name: str) -> str:
    """Return the value of ``const <name> = "...";`` in the JS source."""
    match = re.search(rf'const {name} = "([^"]*)"', source)
    if match is None:
        raise ValueError(f"constant {name} not found in {JS_FILE}")
    return match.group(1)


def decode_vocab(vocab_base64: str) -> list[str]:
    """Decode the newline-joined vocabulary; the token id is the list position."""
    vocab = base64.b64decode(vocab_base64).decode("utf-8").split("\n")
    if len(vocab) != VOCAB_SIZE or len(set(vocab)) != VOCAB_SIZE:
        raise ValueError(f"expected {VOCAB_SIZE} distinct tokens, got {len(vocab)}")
    if tuple(vocab[:3]) != SPECIAL_TOKENS:
        raise ValueError(f"unexpected special tokens {vocab[:3]}")
    return vocab


def decode_merges(merges_base64: str, vocab: list[str]) -> list[tuple[str, str]]:
    """Decode the uint16 id pairs into (left, right) token-string merges, in priority order."""
    data = base64.b64decode(merges_base64)
    ids = [int.from_bytes(data[i : i + 2], "little") for i in range(0, len(data), 2)]
    merges = [(vocab[a], vocab[b]) for a, b in zip(ids[::2], ids[1::2], strict=True)]
    if len(merges) != N_MERGES:
        raise ValueError(f"expected {N_MERGES} merges, got {len(merges)}")
    return merges


def build_tokenizer(vocab: list[str], merges: list[tuple[str, str]]) -> Tokenizer:
    """Assemble the Llama-2 (SentencePiece-equivalent) BPE pipeline."""
    model = BPE(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=merges,
        unk_token="<unk>",
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tokenizer.add_special_tokens([special_added_token(t) for t in SPECIAL_TOKENS])
    return tokenizer


def special_added_token(content: str) -> AddedToken:
    """A special token matched verbatim (not normalized, no stripping)."""
    return AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False)


def added_token_dict(content: str) -> dict[str, object]:
    """The JSON form of :func:`special_added_token`, as transformers writes it."""
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def tokenizer_config() -> dict[str, object]:
    """tokenizer_config.json: fast tokenizer, Llama-2 special tokens and chat template."""
    return {
        "added_tokens_decoder": {str(i): added_token_dict(t) for i, t in enumerate(SPECIAL_TOKENS)},
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": None,
        "padding_side": "right",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }


def special_tokens_map() -> dict[str, object]:
    """special_tokens_map.json: bos/eos/unk, no pad token."""
    return {
        "bos_token": added_token_dict("<s>"),
        "eos_token": added_token_dict("</s>"),
        "unk_token": added_token_dict("<unk>"),
    }


def write_json(path: Path, data: dict[str, object]) -> None:
    """Write UTF-8, indented JSON with a trailing newline."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save(tokenizer: Tokenizer, out: Path) -> None:
    """Write the tokenizer files and the licence notice into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    write_json(out / "tokenizer_config.json", tokenizer_config())
    write_json(out / "special_tokens_map.json", special_tokens_map())
    notice = LICENSE_NOTICE.format(package=NPM_PACKAGE)
    (out / "LICENSE-LLAMA2.md").write_text(notice, encoding="utf-8")


def build_from_package(package_dir: Path, out: Path) -> None:
    """Parse the npm package's data and save the fast tokenizer into ``out``."""
    source = read_js_source(package_dir)
    vocab = decode_vocab(js_string_constant(source, "llama_vocab_base64"))
    merges = decode_merges(js_string_constant(source, "llama_merges_binary"), vocab)
    save(build_tokenizer(vocab, merges), out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--package-dir",
        type=Path,
        help=f"unpacked {NPM_PACKAGE} folder (default: `npm pack` it into a temp dir)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the tokenizer from the given or freshly packed npm package."""
    args = parse_args(argv)
    if args.package_dir is not None:
        build_from_package(args.package_dir, args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            build_from_package(npm_pack(Path(tmp)), args.out)
    print(f"wrote Llama-2 tokenizer to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
