"""The incremental detokenizer emits exactly what decoding all ids at once would, chunk by chunk.

The reference below is the definition: decode every output id so far, hold back trailing U+FFFD
(an incomplete character) and any tail that could still become a stop string, cut at the first
stop string. The detokenizer must match it call for call on byte-level BPE (the byte tokenizer,
SmolLM2's), also for invalid UTF-8, and on valid text with a SentencePiece-style decoder (Llama's:
byte fallback, a leading space stripped), where decoding everything is not prefix-stable.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from runtime.engine.detokenizer import IncrementalDetokenizer
from runtime.models.loader import load_model
from runtime.models.tokenizer import byte_tokenizer


class FullDecode:
    """The reference: every call decodes all ids."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self.text = ""
        self.stopped = False

    def add(self, token_ids: list[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        full = self._tok.decode(self._ids, skip_special_tokens=True)
        if self._stop:
            start = max(0, len(self.text) - self._hold)
            hits = [i for i in (full.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._emit(full[: min(hits)])
        if not final:
            full = full.rstrip("\ufffd")
            if self._hold:
                full = full[: max(len(self.text), len(full) - self._hold)]
        return self._emit(full)

    def _emit(self, upto: str) -> str:
        delta = upto[len(self.text):]
        self.text = upto if len(upto) > len(self.text) else self.text
        return delta


def sentencepiece_tokenizer() -> Any:
    """A Llama-shaped tokenizer built offline: '▁'-prefixed pieces, byte fallback, and a decoder
    that strips the text's leading space (so a window decoded alone loses it)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "▁the", "▁cat", "▁sat", "on", "▁mat", ".", ",", "▁é", "é", "▁日本", "語", "\n", "▁▁"]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], byte_fallback=True,
                               unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(s, special=True) for s in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def smollm_tokenizer() -> Any:
    return load_model("bundled:smollm2-135m-instruct").tokenizer


CHARS = "ab \n.,é日本語🙂"


def byte_ids(tok: Any, data: bytes) -> list[int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spell = bytes_to_unicode()
    return [tok.convert_tokens_to_ids(spell[b]) for b in data]


def utf8_ids(tok: Any, rng: random.Random, n: int) -> list[int]:
    """Byte-tokenizer ids of text with 1-4 byte characters, plus stray specials and now and
    then a lone continuation byte (invalid UTF-8); cut at n ids, maybe mid-character."""
    out: list[int] = []
    while len(out) < n:
        r = rng.random()
        if r < 0.05:
            out.append(rng.randrange(3))
        elif r < 0.08:
            out += byte_ids(tok, bytes([rng.randrange(0x80, 0xC0)]))
        else:
            out += byte_ids(tok, rng.choice(CHARS).encode())
    return out[:n]


def fallback_ids(tok: Any, rng: random.Random, n: int) -> list[int]:
    """Valid text for the SentencePiece-style tokenizer: whole pieces, and characters it has no
    piece for spelled as byte tokens, as its encoder would."""
    pieces = [i for t, i in tok.get_vocab().items() if not t.startswith("<")]
    out: list[int] = []
    while len(out) < n:
        if rng.random() < 0.5:
            out.append(rng.choice(pieces))
        else:
            out += tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in rng.choice(CHARS).encode()])
        if rng.random() < 0.03:
            out.append(tok.eos_token_id)
    return out


def compare(tokenizer: Any, ids: list[int], rng: random.Random) -> None:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    stop: tuple[str, ...] = ()
    if rng.random() < 0.6 and len(text) > 4:
        at = rng.randrange(len(text) - 2)
        stop = tuple(text[at: at + rng.randint(1, 3)] for _ in range(rng.randint(1, 2)))
        if rng.random() < 0.3:
            stop += ("never appears \x00",)
    ref, inc = FullDecode(tokenizer, stop), IncrementalDetokenizer(tokenizer, stop)
    i = 0
    while i < len(ids):
        k = rng.choice((1, 1, 1, 2, 3, 7))
        chunk = ids[i: i + k]
        i += k
        final = i >= len(ids) and rng.random() < 0.7
        assert inc.add(chunk, final) == ref.add(chunk, final), (ids, stop, i)
        assert inc.stopped == ref.stopped
    assert inc.add([], True) == ref.add([], True)
    assert inc.text == ref.text
    if not stop:
        assert inc.text == text


def test_byte_level_matches_decoding_everything() -> None:
    tok = byte_tokenizer()
    assert tok.decode(byte_ids(tok, "日本".encode())) == "日本"
    rng = random.Random(0)
    for _ in range(300):
        compare(tok, utf8_ids(tok, rng, rng.randint(1, 60)), rng)


def test_sentencepiece_style_matches_decoding_everything() -> None:
    tok = sentencepiece_tokenizer()
    assert tok.decode(tok.convert_tokens_to_ids(["▁the", "▁cat"])) == "the cat"  # the stripped space
    rng = random.Random(1)
    for _ in range(300):
        compare(tok, fallback_ids(tok, rng, rng.randint(1, 60)), rng)


def test_byte_fallback_streams_whole_characters() -> None:
    """Decoding everything turns a run of byte tokens into U+FFFD while its last character is
    incomplete, also the characters before it: two emoji streamed as "\ufffd" and nothing more."""
    tok = sentencepiece_tokenizer()
    ids = tok.convert_tokens_to_ids(["▁the"] + [f"<0x{b:02X}>" for b in "🙂🙂あ".encode()])
    assert tok.decode(ids[:6]) == "the" + "\ufffd" * 5  # the garbling, for the record
    det = IncrementalDetokenizer(tok)
    streamed = [det.add([i]) for i in ids]
    assert "".join(streamed) == "the🙂🙂あ"
    assert streamed[4:6] == ["🙂", ""]  # each character as soon as its last byte is in


def test_smollm_matches_decoding_everything(smollm_tokenizer: Any) -> None:
    tok = smollm_tokenizer
    rng = random.Random(2)
    text = "Paris is the capital of France. Ünïcödé 日本語 🙂🙂 and code: `x = {'a': 1}`\n\n" * 4
    real = tok.encode(text)
    for _ in range(60):
        compare(tok, real[: rng.randint(1, len(real))], rng)
        compare(tok, [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))], rng)


def test_each_call_decodes_a_bounded_window() -> None:
    """The point of the offsets: the ids decoded per call do not grow with the output."""
    tok = byte_tokenizer()
    seen: list[int] = []
    decode = tok.decode

    def counting(ids: list[int], **kw: Any) -> str:
        seen.append(len(ids))
        return decode(ids, **kw)

    tok.decode = counting  # type: ignore[method-assign]
    ids = byte_ids(tok, ("hello world " * 200).encode())
    det = IncrementalDetokenizer(tok, ("zz",))
    for i in ids:
        det.add([i])
    assert det.text == ("hello world " * 200)[:-1]  # one char held for the 2-char stop string
    assert max(seen) <= 3, max(seen)
