"""The spelling table on real vocabularies (SmolLM2, Mistral; Llama-3 and Qwen2 marked slow) and on
small hand-made ones."""

import json
import re
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spellm_jax.spelling import (
    MAX_K,
    DeviceSpelling,
    Respeller,
    SpellingTable,
    SpellingTableMismatchError,
    UnsupportedTokenizerError,
    choose_k,
    coverage,
    coverage_report,
)
from spellm_jax.spelling.pieces import gpt2_unicode_to_byte
from spellm_jax.tokenizers import load_tokenizer

K = 16
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Vocab(NamedTuple):
    name: str
    tokenizer: Any
    spelling: SpellingTable


_LOADED: dict[str, Vocab] = {}


def _vocab(name: str, request: pytest.FixtureRequest) -> Vocab:
    """A session-wide (tokenizer, k=16 table) pair; SmolLM2 shares conftest's tokenizer."""
    if name not in _LOADED:
        tokenizer = (request.getfixturevalue("smollm2_tokenizer") if name == "smollm2"
                     else load_tokenizer(name))
        _LOADED[name] = Vocab(name, tokenizer, SpellingTable.from_tokenizer(tokenizer, K))
    return _LOADED[name]


SLOW = pytest.mark.slow


@pytest.fixture(scope="session", params=["smollm2", "mistral", pytest.param("llama3", marks=SLOW),
                                         pytest.param("qwen2", marks=SLOW)])
def vocab(request) -> Vocab:
    return _vocab(request.param, request)


@pytest.fixture(scope="session", params=["smollm2", "mistral"])
def fast_vocab(request) -> Vocab:
    return _vocab(request.param, request)


@pytest.fixture(scope="session")
def smollm2(request) -> Vocab:
    return _vocab("smollm2", request)


@pytest.fixture(scope="session")
def mistral(request) -> Vocab:
    return _vocab("mistral", request)


_RESPELLERS: dict[tuple[int, int], Respeller] = {}


def respeller(spelling: SpellingTable, tokenizer: Any = None) -> Respeller:
    """One Respeller per (table, tokenizer), so the property tests build its index once."""
    key = (id(spelling), id(tokenizer))
    if key not in _RESPELLERS:
        _RESPELLERS[key] = Respeller(spelling, tokenizer)
    return _RESPELLERS[key]


def _spelled(spelling: SpellingTable, ids: list[int]) -> bytes:
    return b"".join(spelling.spellings[i] for i in ids)


# -- the alphabet --------------------------------------------------------------------------------


def test_gpt2_byte_alphabet_is_a_bijection_with_known_points():
    table = gpt2_unicode_to_byte()
    assert sorted(table.values()) == list(range(256))
    assert len(table) == 256
    # Printable bytes are themselves; the 68 others are U+0100.. in byte order.
    assert table["A"] == 0x41 and table["~"] == 0x7E and table["ÿ"] == 0xFF and table["®"] == 0xAE
    assert table["Ā"] == 0x00 and table["Ġ"] == 0x20 and table["Ċ"] == 0x0A and table["ĉ"] == 0x09
    assert table["ġ"] == 0x7F and table["Ń"] == 0xAD
    assert max(map(ord, table)) == 0x100 + 67


def test_k_must_be_between_1_and_max(smollm2):
    for bad in (0, -1, MAX_K + 1):
        with pytest.raises(ValueError, match="k="):
            SpellingTable.from_tokenizer(smollm2.tokenizer, bad)
    assert SpellingTable.from_tokenizer(smollm2.tokenizer, 1).table.shape == (len(smollm2.tokenizer), 1)


def test_wordpiece_tokenizer_is_unsupported():
    import tokenizers
    import transformers

    backend = tokenizers.Tokenizer(tokenizers.models.WordPiece(
        {"[UNK]": 0, "[CLS]": 1, "hello": 2, "##s": 3}, unk_token="[UNK]"))
    backend.decoder = tokenizers.decoders.WordPiece()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(UnsupportedTokenizerError, match=r"WordPiece.*byte-level BPE.*SentencePiece"):
        SpellingTable.from_tokenizer(tokenizer, K)


def test_unknown_tokenizer_name():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer("bert")


# -- every token of real vocabularies -------------------------------------------------------------


def test_every_token_round_trips_through_its_row(vocab):
    spelling, tokenizer = vocab.spelling, vocab.tokenizer
    print(f"\n{vocab.name}:\n{coverage_report(spelling)}")
    assert spelling.vocab_size == len(tokenizer)
    assert spelling.table.shape == (spelling.vocab_size, K) and spelling.table.dtype == np.int32
    assert spelling.num_symbols == 256 + len(spelling.special_ids) + 1
    assert spelling.valid.all()  # every id of these tokenizers is a token
    checked = 0
    for token_id, row in enumerate(spelling.table):
        length = spelling.lengths[token_id]
        text, special = spelling.unspell(row)
        if token_id in spelling.special_ids:
            assert (text, special) == (b"", token_id)
            assert row[0] == spelling.special_symbol(token_id) and (row[1:] == spelling.pad_symbol).all()
            continue
        assert special is None
        assert text == spelling.spellings[token_id][:K], token_id
        assert (row[min(length, K):] == spelling.pad_symbol).all()
        assert spelling.spell(token_id) == list(spelling.spellings[token_id])
        checked += length <= K
    assert checked > 0.98 * spelling.vocab_size


def test_spellings_agree_with_the_tokenizers_decoding(vocab):
    """`decode([anchor, i])` is the anchor's text then token i's: the spelling (SentencePiece's decoder
    strips a leading space only at the start of the text, hence the anchor)."""
    spelling, tokenizer = vocab.spelling, vocab.tokenizer
    anchor = Respeller(spelling).ids_for_bytes(b"a")[0]
    ids = [i for i in range(spelling.vocab_size) if spelling.spellings[i]]
    texts = tokenizer.batch_decode([[anchor, i] for i in ids])
    compared = [(i, text) for i, text in zip(ids, texts, strict=True) if "\ufffd" not in text]
    assert len(compared) > 0.95 * len(ids)  # the rest hold part of a UTF-8 character
    mismatched = [(i, text) for i, text in compared if text.encode() != b"a" + spelling.spellings[i]]
    assert mismatched == []


def test_smollm2_single_token_decoding_is_the_spelling(smollm2):
    spelling, tokenizer = smollm2.spelling, smollm2.tokenizer
    ids = [i for i in range(spelling.vocab_size) if i not in spelling.special_ids]
    texts = tokenizer.batch_decode([[i] for i in ids])
    compared = [(i, text) for i, text in zip(ids, texts, strict=True) if "\ufffd" not in text]
    assert len(compared) > 0.99 * len(ids)
    assert [i for i, text in compared if text.encode() != spelling.spellings[i]] == []
    assert spelling.spellings[tokenizer.encode(" the")[0]] == b" the"
    assert spelling.kind == "byte_level"
    assert spelling.special_ids == tuple(range(17))


def test_sentencepiece_pieces(mistral):
    spelling, tokenizer = mistral.spelling, mistral.tokenizer
    assert spelling.kind == "sentencepiece"
    assert spelling.special_ids == (0, 1, 2)  # <unk>, <s>, </s>
    assert spelling.spellings[tokenizer.convert_tokens_to_ids("▁the")] == b" the"
    newline = tokenizer.convert_tokens_to_ids("<0x0A>")
    assert spelling.spellings[newline] == b"\n" and newline in spelling.byte_fallback_ids
    assert len(spelling.byte_fallback_ids) == 256


def test_special_tokens(vocab):
    spelling, tokenizer = vocab.spelling, vocab.tokenizer
    assert set(tokenizer.all_special_ids) <= set(spelling.special_ids)
    assert list(spelling.special_ids) == sorted(spelling.special_ids)
    for n, token_id in enumerate(spelling.special_ids):
        assert spelling.special_symbol(token_id) == 256 + n
        assert spelling.spell(token_id) == [256 + n]
        assert spelling.lengths[token_id] == 1 and spelling.spellings[token_id] == b""
    eos = tokenizer.eos_token_id
    symbols = [*b"hi", spelling.special_symbol(eos), *b"ignored", spelling.pad_symbol]
    assert spelling.unspell(symbols) == (b"hi", eos)
    assert spelling.unspell([*b"hi", spelling.pad_symbol, spelling.special_symbol(eos)]) == (b"hi", None)
    with pytest.raises(ValueError, match="not a special token"):
        spelling.special_symbol(Respeller(spelling).ids_for_bytes(b"a")[0])
    with pytest.raises(ValueError, match="outside the alphabet"):
        spelling.unspell([spelling.num_symbols])


def test_canonical_is_one_token_per_distinct_row(vocab):
    spelling = vocab.spelling
    canonical = spelling.canonical
    rows = spelling.table[spelling.valid]
    distinct = np.unique(rows, axis=0)
    assert canonical.sum() == len(distinct)
    assert len(np.unique(spelling.table[canonical], axis=0)) == canonical.sum()
    assert not canonical[~spelling.valid].any()
    # Duplicated rows keep a token spelled in full, never a truncated one.
    full = spelling.lengths <= K
    row_keys = {tuple(row) for row in spelling.table[full & spelling.valid]}
    for token_id in np.flatnonzero(canonical & ~full):
        assert tuple(spelling.table[token_id]) not in row_keys


def test_host_row_lookup_matches_the_device_lookup(fast_vocab):
    """`token_for_row` (the PyTorch module's and the host's lookup) finds exactly the tokens that
    `DeviceSpelling.lookup` finds on device, also for rows with symbols after the first PAD."""
    spelling = fast_vocab.spelling
    rng = np.random.default_rng(0)
    rows = spelling.table[rng.choice(spelling.vocab_size, 512)].copy()
    rows[:64, -1] = rng.integers(0, 256, 64)  # noise after PAD (or a changed last symbol)
    rows[64:96] = rng.integers(0, 256, (32, spelling.k))  # mostly not tokens
    on_device = np.asarray(DeviceSpelling.of(spelling).lookup(rows))
    on_host = [spelling.token_for_row(row) for row in rows]
    assert [-1 if t is None else t for t in on_host] == on_device.tolist()
    assert sum(t is None for t in on_host) >= 30
    single_bytes = {s[0] for s in spelling.spellings if len(s) == 1}
    respeller = Respeller(spelling)
    for row, token in zip(rows, on_host, strict=True):
        ids = respeller.ids_for_row(row)
        if token is not None:
            assert ids == [token]
        else:  # the host feeds tokens spelling the row's bytes, less those no token is spelled as
            text, _ = spelling.unspell(row)
            assert _spelled(spelling, ids) == bytes(b for b in text if b in single_bytes)


REAL_TEXT = ("Photosynthèse — 光合作用 — converts light into chemical energy, wrote Dr. O'Neil "
             "in 1897: «the leaf is a factory». Ça va? Нет. def f(x):\n\treturn x ** 2\n")


def test_device_segmentation_spells_every_row_as_its_host_twin_does(fast_vocab):
    """`DeviceSpelling.segment` (free decoding's on-device respelling) gives exactly the host's
    `ids_for_row(row, "device")` for rows of random bytes, of real text, ended by a special
    symbol or followed by noise after PAD; the ids spell the row's bytes, less those no token
    is spelled as, then the special token."""
    spelling, tokenizer = fast_vocab.spelling, fast_vocab.tokenizer
    rng, k, text = np.random.default_rng(1), spelling.k, REAL_TEXT.encode()
    rows = np.full((384, k), spelling.pad_symbol, np.int32)
    lengths = rng.integers(1, k + 1, len(rows))
    for index, n in enumerate(lengths):
        start = rng.integers(0, len(text) - n)
        rows[index, :n] = rng.integers(0, 256, n) if index < 128 else list(text[start:start + n])
        if n < k and index % 3 == 0:
            rows[index, n] = spelling.special_symbol(spelling.special_ids[index % 2])
        if n < k - 1 and index % 4 == 1:
            rows[index, n + 1:] = rng.integers(0, spelling.num_symbols, k - n - 1)
    ids, counts = (np.asarray(x) for x in DeviceSpelling.of(spelling).segment(rows))
    single_bytes = {s[0] for s in spelling.spellings if len(s) == 1}
    host, differ = respeller(spelling, tokenizer), 0
    for row, row_ids, count in zip(rows, ids, counts, strict=True):
        on_device = row_ids[:count].tolist()
        assert on_device == host.ids_for_row(row, "device"), row
        assert (row_ids[count:] == -1).all()
        data, special = spelling.unspell(row)
        tail = [] if special is None else [special]
        assert on_device[len(on_device) - len(tail):] == tail
        spelled = on_device[:len(on_device) - len(tail)]
        assert _spelled(spelling, spelled) == bytes(b for b in data if b in single_bytes)
        assert all(spelling.lengths[i] <= k and i not in spelling.special_ids for i in spelled)
        differ += on_device != host.ids_for_row(row, "tokenizer")
    print(f"{fast_vocab.name}: the tokenizer segments {differ} of {len(rows)} rows differently")


def test_canonical_prefers_real_pieces_over_byte_fallback(mistral):
    spelling = mistral.spelling
    piece_a = mistral.tokenizer.convert_tokens_to_ids("a")
    byte_a = mistral.tokenizer.convert_tokens_to_ids("<0x61>")
    assert byte_a < piece_a and spelling.spellings[byte_a] == spelling.spellings[piece_a] == b"a"
    assert spelling.canonical[piece_a] and not spelling.canonical[byte_a]


# -- text -> ids ----------------------------------------------------------------------------------


def _check_ids_for_bytes(vocab: Vocab, data: bytes) -> None:
    """ids spell `data` exactly, or a ValueError names a byte of it that no token is spelled as (SmolLM2
    lacks 21 single bytes, e.g. 0x04 and 0xF5..0xFF; its tokenizer drops them)."""
    spelling = vocab.spelling
    single_bytes = {s[0] for s in spelling.spellings if len(s) == 1}
    for tokenizer in (vocab.tokenizer, None):
        try:
            ids = respeller(spelling, tokenizer).ids_for_bytes(data)
        except ValueError as error:
            named = int(re.search(r"byte 0x([0-9a-f]{2})", str(error))[1], 16)
            assert named in data and named not in single_bytes
            continue
        assert _spelled(spelling, ids) == data
        assert all(spelling.valid[i] and i not in spelling.special_ids for i in ids)


@PROPERTY_SETTINGS
@given(text=st.text())
def test_ids_for_text_spell_it_exactly(fast_vocab, text):
    _check_ids_for_bytes(fast_vocab, text.encode())


@PROPERTY_SETTINGS
@given(data=st.binary())
def test_ids_for_random_bytes_spell_them_exactly(fast_vocab, data):
    _check_ids_for_bytes(fast_vocab, data)


@PROPERTY_SETTINGS
@given(picks=st.lists(st.integers(min_value=0), max_size=12))
def test_ids_for_concatenated_token_spellings(fast_vocab, picks):
    spelling = fast_vocab.spelling
    _check_ids_for_bytes(fast_vocab, _spelled(spelling, [p % spelling.vocab_size for p in picks]))


@PROPERTY_SETTINGS
@given(pick=st.integers(min_value=0), tail=st.lists(st.integers(min_value=0, max_value=255), max_size=4))
def test_unspell_of_spell_then_pad(fast_vocab, pick, tail):
    spelling = fast_vocab.spelling
    token_id = pick % spelling.vocab_size
    expected = ((b"", token_id) if token_id in spelling.special_ids
                else (spelling.spellings[token_id], None))
    assert spelling.unspell([*spelling.spell(token_id), spelling.pad_symbol, *tail]) == expected


def test_ids_for_bytes_examples(smollm2, mistral):
    spelling, tokenizer = smollm2.spelling, smollm2.tokenizer
    assert Respeller(spelling).ids_for_bytes(b"") == []
    assert Respeller(spelling, tokenizer).ids_for_bytes(b" the") == tokenizer.encode(" the")
    text = "Hello, world! The capital of France is Paris.\n\tdef f(x): return x ** 2"
    assert Respeller(spelling, tokenizer).ids_for_bytes(text.encode()) == tokenizer.encode(text)
    # The tokenizer turns "<|im_end|>" into the special token; the spelling of the text must stay text.
    ids = Respeller(spelling, tokenizer).ids_for_bytes(b"a<|im_end|>b")
    assert _spelled(spelling, ids) == b"a<|im_end|>b" and tokenizer.eos_token_id not in ids
    # SentencePiece spells "a" twice ("a" and "<0x61>"): the real piece wins, with or without tokenizer.
    piece_a = mistral.tokenizer.convert_tokens_to_ids("a")
    assert Respeller(mistral.spelling, mistral.tokenizer).ids_for_bytes(b"a") == [piece_a]
    assert Respeller(mistral.spelling).ids_for_bytes(b"a") == [piece_a]
    byte_ff = mistral.tokenizer.convert_tokens_to_ids("<0xFF>")
    assert Respeller(mistral.spelling).ids_for_bytes(b"\xff") == [byte_ff]
    with pytest.raises(ValueError, match=re.escape("byte 0x04 (offset 1)")):
        # the tokenizer drops it: ids for "ab" would lie
        Respeller(spelling, tokenizer).ids_for_bytes(b"a\x04b")


# -- hand-made tables -----------------------------------------------------------------------------


def _tiny(spellings: tuple[bytes, ...], k: int = 4, special_ids=(), byte_fallback_ids=()) -> SpellingTable:
    return SpellingTable(kind="sentencepiece", k=k, vocab_size=len(spellings), spellings=spellings,
                         special_ids=tuple(special_ids), byte_fallback_ids=tuple(byte_fallback_ids))


def test_greedy_longest_match_and_unspellable_bytes():
    spelling = _tiny((b"a", b"ab", b"b", b"", b"abc"), special_ids=(3,))
    assert Respeller(spelling).ids_for_bytes(b"ab") == [1]
    assert Respeller(spelling).ids_for_bytes(b"aab") == [0, 1]
    assert Respeller(spelling).ids_for_bytes(b"abcab") == [4, 1]
    with pytest.raises(ValueError, match="byte 0x63"):
        Respeller(spelling).ids_for_bytes(b"bc")


def test_table_truncates_and_canonical_prefers_full_then_real_pieces():
    spellings = (b"", b"abcde", b"abcd", b"abcdX", b"x", b"x", b"y", b"zzzzzz", b"zzzzzy")
    spelling = _tiny(spellings, special_ids=(0,), byte_fallback_ids=(4,))
    pad = spelling.pad_symbol
    assert spelling.num_symbols == 258 and pad == 257
    assert spelling.table[0].tolist() == [256, pad, pad, pad]
    assert spelling.table[1].tolist() == list(b"abcd") == spelling.table[3].tolist()
    assert spelling.table[4].tolist() == [ord("x"), pad, pad, pad]
    assert spelling.lengths.tolist() == [1, 5, 4, 5, 1, 1, 1, 6, 6]
    # abcd: the full spelling (2) over truncated ones; x: 5 over the byte fallback 4; zzzz: lowest id.
    assert np.flatnonzero(spelling.canonical).tolist() == [0, 2, 5, 6, 7]


def test_padded_model_vocabulary(smollm2):
    tokenizer = smollm2.tokenizer
    extra = 64
    spelling = SpellingTable.from_tokenizer(tokenizer, 8, vocab_size=len(tokenizer) + extra)
    assert spelling.table.shape == (len(tokenizer) + extra, 8)
    assert (spelling.table[-extra:] == spelling.pad_symbol).all()
    assert not spelling.valid[-extra:].any() and not spelling.canonical[-extra:].any()
    assert (spelling.lengths[-extra:] == 0).all() and spelling.valid[:-extra].all()
    with pytest.raises(ValueError, match="no spelling"):
        spelling.spell(len(tokenizer))
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        SpellingTable.from_tokenizer(tokenizer, 8, vocab_size=len(tokenizer) - 1)


@SLOW
def test_llama3_model_vocab_without_the_trailing_added_token(request):
    """transformers' GGUF reader appends `<|endoftext|>` after Llama-3's 128256 tokens."""
    tokenizer = _vocab("llama3", request).tokenizer
    assert len(tokenizer) == 128257
    spelling = SpellingTable.from_tokenizer(tokenizer, 8, vocab_size=128256)
    assert spelling.table.shape == (128256, 8) and max(spelling.special_ids) < 128256


# -- coverage and choice of k ---------------------------------------------------------------------


def test_choose_k_on_synthetic_counts():
    lengths = np.array([0, 1, 2, 3, 10])
    counts = np.array([0, 500, 300, 199, 1])
    assert choose_k(lengths, counts) == 3  # 999 of 1000 occurrences
    assert choose_k(lengths, counts, target=0.5) == 1
    assert choose_k(lengths, counts, target=0.8) == 2
    assert choose_k(lengths, counts, target=1.0) == 10
    with pytest.raises(ValueError, match="no occurrences"):
        choose_k(lengths, np.zeros(5))
    with pytest.raises(ValueError, match="target"):
        choose_k(lengths, counts, target=0.0)


def test_coverage_is_a_monotone_share(smollm2):
    spelling = smollm2.spelling
    counts = np.random.default_rng(0).zipf(1.3, spelling.vocab_size) % 10_000
    ks = (1, 2, 4, 8, 12, 16, 24, 100)
    rows = coverage(spelling, ks, counts)
    assert [row["k"] for row in rows] == list(ks)
    for key in ("type_coverage", "occurrence_coverage"):
        shares = [row[key] for row in rows]
        assert all(0.0 <= share <= 1.0 for share in shares)
        assert shares == sorted(shares) and shares[-1] == 1.0
    for row in rows:
        assert row["truncated_types"] == int((spelling.lengths > row["k"]).sum())
        expected = counts[spelling.lengths <= row["k"]].sum() / counts.sum()
        assert row["occurrence_coverage"] == pytest.approx(expected, abs=1e-12)
    chosen = choose_k(spelling.lengths, counts, target=0.99)
    rows = coverage(spelling, (chosen - 1, chosen), counts)
    shares = {row["k"]: row["occurrence_coverage"] for row in rows}
    assert shares[chosen] >= 0.99 > shares[chosen - 1]
    assert coverage(spelling, (8,))[0]["occurrence_coverage"] is None
    report = coverage_report(spelling, counts=counts)
    assert "| 16 |" in report and "%" in report


# -- identity and files ---------------------------------------------------------------------------


def test_save_load_keeps_the_hash_and_refuses_tampering(smollm2, tmp_path):
    spelling = smollm2.spelling
    path = tmp_path / "spelling.json"
    spelling.save(path)
    loaded = SpellingTable.load(path)
    assert loaded.content_hash == spelling.content_hash
    assert loaded == spelling and np.array_equal(loaded.table, spelling.table)
    spelling.save(path)  # the same table again: nothing to do

    other = SpellingTable.from_tokenizer(smollm2.tokenizer, 8)
    assert other.content_hash != spelling.content_hash
    with pytest.raises(FileExistsError, match="different spelling table"):
        other.save(path)
    assert SpellingTable.load(path).content_hash == spelling.content_hash

    contents = json.loads(path.read_text())
    contents["spellings"][1000] = b"tampered".hex()
    path.write_text(json.dumps(contents))
    with pytest.raises(SpellingTableMismatchError, match="edited or is corrupt"):
        SpellingTable.load(path)
    other.save(path, overwrite=True)
    assert SpellingTable.load(path).k == 8


def test_check_hash(smollm2, mistral):
    spelling = smollm2.spelling
    spelling.check_hash(spelling.content_hash, "checkpoint 100")
    other_k = SpellingTable.from_tokenizer(smollm2.tokenizer, K + 1)
    for other in (other_k, mistral.spelling):
        with pytest.raises(SpellingTableMismatchError) as error:
            other.check_hash(spelling.content_hash, "checkpoint 100")
        message = str(error.value)
        assert "checkpoint 100" in message and spelling.content_hash in message
        assert other.content_hash in message and "rebuild with the same tokenizer and k" in message
