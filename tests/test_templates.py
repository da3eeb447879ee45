"""Templates (gptexp.data.templates): LLaMA-2's chat format is Meta's reference construction token for token,
the answers and their EOS are what trains, and each template refuses a tokenizer it cannot serve."""

import string

import pytest
from test_sample import meta_dialog_tokens

from gptexp.core.config import asset_path
from gptexp.data import templates
from gptexp.data.templates import Conversation, Exchange
from gptexp.data.tokenizers import CHAR_END, CharTokenizer, encode_with_specials, gpt2_tokenizer, load_tokenizer

LLAMA = load_tokenizer(asset_path("stories260K/tok512.model"))
DIALOG = [("Tell me a story.", "Once upon a time, there was a cat."), ("  What happened next? ", " It slept. "),
          ("And then?", "It woke up.")]


def trained_text(tokenizer, encoded) -> list[str]:
    """The runs of trained tokens, decoded (EOS decodes to nothing)."""
    runs, current = [], []
    for token, trained in zip(encoded.ids, encoded.trained):
        if trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


@pytest.mark.parametrize("system", [None, "Be kind.", ""])
def test_llama2_chat_is_metas_reference_token_for_token(system):
    dialog = ([{"role": "system", "content": system}] if system is not None else [])
    for user, answer in DIALOG:
        dialog += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    conversation = Conversation([Exchange(u, a) for u, a in DIALOG], system)
    encoded = templates.get("llama2_chat").encode(LLAMA, conversation)
    reference = meta_dialog_tokens(LLAMA, dialog + [{"role": "user", "content": "x"}])
    assert encoded.ids == reference[:len(encoded.ids)] and len(reference) > len(encoded.ids)  # the open turn follows
    assert encoded.ids.count(LLAMA.bos_id) == 3 and encoded.ids.count(LLAMA.eos_id) == 3  # BOS ... EOS each exchange
    assert LLAMA.decode(encoded.ids).count("<<SYS>>") == (system is not None)  # the system prompt once, first
    # trained: each answer (from its leading space) and its EOS; never BOS, [INST] or the user's words
    assert [t.strip() for t in trained_text(LLAMA, encoded)] == ["Once upon a time, there was a cat.", "It slept.",
                                                                 "It woke up."]
    eos_positions = [i for i, t in enumerate(encoded.ids) if t == LLAMA.eos_id]
    assert all(encoded.trained[i] for i in eos_positions)
    assert not any(encoded.trained[i] for i, t in enumerate(encoded.ids) if t == LLAMA.bos_id)
    open_turn = templates.prompt_ids(templates.get("llama2_chat"), LLAMA, [(u, a) for u, a in DIALOG], "Why?", system)
    assert open_turn == meta_dialog_tokens(LLAMA, dialog + [{"role": "user", "content": "Why?"}])


def test_alpaca_and_plain_write_their_prompts():
    gpt2 = gpt2_tokenizer()
    alpaca = templates.get("alpaca").encode(LLAMA, Conversation([Exchange("Add the numbers.", "5", "2 and 3")]))
    assert alpaca.ids[0] == LLAMA.bos_id and alpaca.ids[-1] == LLAMA.eos_id
    assert LLAMA.decode(alpaca.ids[:alpaca.prompt_length]).endswith("### Input:\n2 and 3\n\n### Response:\n")
    assert trained_text(LLAMA, alpaca) == ["5"]
    plain = templates.get("plain").encode(gpt2, Conversation([Exchange("Q: two plus two?", "four")]))
    assert plain.ids == gpt2.encode("Q: two plus two?\nfour") + [gpt2.eot_id]  # no BOS: GPT-2 has none
    assert trained_text(gpt2, plain) == ["\nfour<|endoftext|>"]
    chars = CharTokenizer.from_text("abc: ?\n" + CHAR_END)
    encoded = templates.get("plain").encode(chars, Conversation([Exchange("abc?", "cab")]))
    assert encoded.ids[-1] == chars.eot_id == chars.chars.index(CHAR_END)


@pytest.mark.parametrize("template, tokenizer, message", [
    ("llama2_chat", gpt2_tokenizer(), "template=llama2_chat starts every exchange with BOS, which the tokenizer gpt2"),
    ("plain", CharTokenizer.from_text("abc"), "template=plain closes every answer with an end-of-sequence token"),
    ("chatml", LLAMA, "template='chatml' is not a template; choose one of llama2_chat, alpaca, plain"),
])
def test_a_template_the_tokenizer_cannot_serve_is_refused(template, tokenizer, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?")):
        templates.get(template).check(tokenizer)


CHATS = [(None, [("hi there", None)]), ("", [("hi", None)]), ("Be kind.", [("a b", "c d"), ("e", None)]),
         (None, [("a b ", " c d"), ("e\n", "f"), ("g", None)]), ("sys", [("", "x"), ("y", None)])]


@pytest.mark.parametrize("name", list(templates.TEMPLATES))
@pytest.mark.parametrize("tokenizer", [LLAMA, gpt2_tokenizer(), CharTokenizer.from_text(string.printable + CHAR_END)],
                         ids=["sentencepiece", "gpt2", "characters"])
def test_each_template_as_a_jinja_chat_template_writes_its_own_tokens(name, tokenizer):
    """The Jinja chat template gptexp hands out (a server's /tokenizer_info, the harness's apply_chat_template) writes
    every conversation as the text whose tokens, special tokens' texts read as those tokens, are the template's own;
    with a default system prompt (a run's) where the messages give none."""
    template = templates.get(name)
    try:
        template.check(tokenizer)
    except ValueError:
        pytest.skip(f"{name} cannot write with {tokenizer.name}")
    for system, exchanges in CHATS:
        for default in (None, "A run's own."):
            messages = [{"role": "system", "content": system}] if system is not None else []
            for user, answer in exchanges:
                messages.append({"role": "user", "content": user})
                messages += [{"role": "assistant", "content": answer}] if answer is not None else []
            expected = template.encode(tokenizer, Conversation([Exchange(u, a) for u, a in exchanges],
                                                               default if system is None else system)).ids
            text = templates.render_chat(template.chat_template(tokenizer, default), messages)
            assert encode_with_specials(tokenizer, text) == expected, (system, default, exchanges)
