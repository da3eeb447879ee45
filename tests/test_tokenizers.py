import pytest
import tiktoken

from gptexp.data.tokenizers import CharTokenizer, gpt2_tokenizer


def test_gpt2_bpe_offline():
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_id == 50256 and tok.vocab_size == 50257
    text = "Hello world <|endoftext|> naïve café 123"
    assert tok.decode(tok.encode(text)) == text


def test_gpt2_bpe_matches_tiktoken_r50k_ranks():
    """The bundled ranks file is tiktoken's r50k_base: same merges, same pattern."""
    ours = gpt2_tokenizer().encoding
    assert ours.n_vocab == 50257
    sample = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  It's 2024 -- they'll've\t done"
    ids = ours.encode_ordinary(sample)
    assert ids[:4] == [5962, 22307, 25, 198]
    assert ours.decode(ids) == sample
    assert isinstance(ours, tiktoken.Encoding)


def test_char_tokenizer_roundtrip_and_errors():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw" and tok.vocab_size == 8
    assert tok.decode(tok.encode("low")) == "low"
    assert tok.name == CharTokenizer(" dehlorw").name != CharTokenizer("abc").name
    with pytest.raises(ValueError, match="'z' is not in this 8-character vocabulary"):
        tok.encode("z")
