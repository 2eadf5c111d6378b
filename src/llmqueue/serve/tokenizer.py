"""Text <-> token ids for the server, with nothing downloaded (docs/serving.md, "Tokenizer").

:class:`ByteTokenizer` is shipped with the package: ids 0, 1, 2 are ``<pad>``, ``<s>``, ``</s>``
(end of sequence), ids 3..258 the 256 bytes of UTF-8 text, so any text encodes and decodes back
exactly; the ids a model of a larger vocabulary may emit above 258 decode to pseudo-words
(`` " ka"``, `` " temu"``: consonant-vowel syllables spelling the id), so every id has text.
It fits any model with at least 259 ids (all presets of :mod:`llmqueue.real.model`).

:class:`HFTokenizer` reads ``tokenizer.json`` of a local Hugging Face folder with the
``tokenizers`` library (in the serve extra); its end-of-sequence id comes from
``tokenizer_config.json`` or ``config.json``.

Streaming emits one chunk per generated token; a :class:`Detokenizer` turns each token into the
text it adds (possibly ``""``: the first bytes of a multi-byte character wait for the rest).
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

from llmqueue.errors import ConfigError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
NUM_BYTE_IDS = BYTE_OFFSET + 256
_SYLLABLES = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"]


def _pseudo_word(index: int) -> str:
    """`` " " +`` the syllables spelling ``index`` in base 75 (index 0: "ba")."""
    syllables = []
    while True:
        index, digit = divmod(index, len(_SYLLABLES))
        syllables.append(_SYLLABLES[digit])
        if index == 0:
            return " " + "".join(reversed(syllables))
        index -= 1


class ByteTokenizer:
    """UTF-8 bytes as tokens (see the module note)."""

    name = "byte"

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < NUM_BYTE_IDS:
            raise ConfigError("real.model.vocab_size", vocab_size,
                              f"at least {NUM_BYTE_IDS} for the byte tokenizer (3 special ids and 256 bytes)")
        self.vocab_size = vocab_size
        self.eos_id = EOS_ID

    def encode(self, text: str) -> list[int]:
        return [b + BYTE_OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        d = self.detokenizer()
        return "".join(d.step(i) for i in ids) + d.flush()

    def detokenizer(self) -> Detokenizer:
        return _ByteDetokenizer()


class _ByteDetokenizer:
    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_id: int) -> str:
        if BYTE_OFFSET <= token_id < NUM_BYTE_IDS:
            return self._utf8.decode(bytes((token_id - BYTE_OFFSET,)))
        pending = self.flush()   # an unfinished character before a special id or a word is invalid
        if token_id < BYTE_OFFSET:
            return pending
        return pending + _pseudo_word(token_id - NUM_BYTE_IDS)

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class HFTokenizer:
    """``tokenizer.json`` of a local Hugging Face folder (the ``tokenizers`` library)."""

    name = "hf"

    def __init__(self, folder: Path, vocab_size: int) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("serve.tokenizer", str(folder), "a folder readable with the tokenizers library: "
                              "pip install 'llmqueue[serve]'") from None
        path = folder / "tokenizer.json"
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:   # the library raises its own exception type for unreadable files
            raise ConfigError("serve.tokenizer", str(folder), f"a folder with a readable tokenizer.json ({exc})") from None
        self.vocab_size = vocab_size
        self.eos_id = _hf_eos_id(folder, self._tok)
        if self._tok.get_vocab_size() > vocab_size:
            raise ConfigError("serve.tokenizer", str(folder), f"a tokenizer of at most the model's {vocab_size} ids "
                              f"(it has {self._tok.get_vocab_size()})")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def detokenizer(self) -> Detokenizer:
        return _PrefixDetokenizer(self)


class _PrefixDetokenizer:
    """Decode everything so far and emit what was added (held back while it ends in U+FFFD,
    an unfinished character); quadratic in the output, fine for the short outputs served here."""

    def __init__(self, tokenizer: HFTokenizer) -> None:
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return new


Detokenizer = _ByteDetokenizer | _PrefixDetokenizer
Tokenizer = ByteTokenizer | HFTokenizer


def _hf_eos_id(folder: Path, tok) -> int | None:
    for name, key in (("tokenizer_config.json", "eos_token"), ("config.json", "eos_token_id")):
        try:
            value = json.loads((folder / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError):
            continue
        if isinstance(value, dict):   # {"content": "</s>", ...}
            value = value.get("content")
        if isinstance(value, str):
            value = tok.token_to_id(value)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return None


def load_tokenizer(spec: str, vocab_size: int, base_dir: Path | None = None) -> Tokenizer:
    """``"byte"`` (shipped), or a folder holding ``tokenizer.json`` (relative to ``base_dir``)."""
    if spec == "byte":
        return ByteTokenizer(vocab_size)
    folder = Path(spec)
    if not folder.is_absolute() and base_dir is not None:
        folder = Path(base_dir) / folder
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError("serve.tokenizer", spec, '"byte" or a folder with a tokenizer.json')
    return HFTokenizer(folder, vocab_size)


def chat_prompt(messages: list[dict]) -> str:
    """The prompt of a chat: ``role: content`` lines, then ``assistant:`` (one fixed template;
    a Hugging Face folder's Jinja chat template is not applied)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
