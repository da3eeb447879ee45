"""LLaMA-2's chat template, token by token as Meta's reference code builds it (llama/generation.py).

Every finished exchange is BOS + "[INST] {user} [/INST] {answer} " + EOS; the open one is BOS + "[INST] {user}
[/INST]"; a system prompt goes inside the first user message as "<<SYS>>\\n{system}\\n<</SYS>>\\n\\n".
"""

from __future__ import annotations

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def chat_ids(tokenizer, history: list[tuple[str, str]], message: str, system: str | None = None) -> list[int]:
    """The prompt for `message` after the finished (user, answer) exchanges of `history`."""
    if tokenizer.bos_id is None or getattr(tokenizer, "eos_id", None) is None:
        raise ValueError("the chat template needs a tokenizer with BOS and EOS tokens (a LLaMA SentencePiece model)")
    users = [user for user, _ in history] + [message]
    if system:
        users[0] = B_SYS + system + E_SYS + users[0]
    ids: list[int] = []
    for user, (_, answer) in zip(users, history):
        ids += [tokenizer.bos_id] + tokenizer.encode(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ")
        ids.append(tokenizer.eos_id)
    return ids + [tokenizer.bos_id] + tokenizer.encode(f"{B_INST} {users[-1].strip()} {E_INST}")


def fitting_history(tokenizer, history: list[tuple[str, str]], message: str, system: str | None,
                    room: int) -> tuple[list[tuple[str, str]], list[int]]:
    """The newest exchanges of `history` whose prompt for `message` fits in `room` tokens, and that prompt
    (the oldest exchanges are dropped first; the system prompt stays)."""
    for start in range(len(history) + 1):
        ids = chat_ids(tokenizer, history[start:], message, system)
        if len(ids) <= room:
            return history[start:], ids
    raise ValueError(f"the message alone is {len(ids)} tokens with the template, more than the {room} the context "
                     f"leaves after max_new_tokens; shorten it or lower max_new_tokens")
