"""Instruction, chat and preference data (data=instruct and its presets): records become conversations, written
in a template (gptexp.data.templates) as tokens whose answers are marked as the targets.

Records, one format per dataset (found from the first record's fields, after data.columns renames them):
- alpaca: instruction, input (optional), output
- completion: prompt, completion
- messages: messages = [{role: system | user | assistant, content}, ...] (OpenAI's chat format)
- sharegpt: conversations = [{from: system | human | gpt, value}, ...]
- preference: prompt, chosen, rejected; each a text or a message list (UltraFeedback's chosen and rejected hold
  the whole conversation, their last assistant message being the answer)

Sources: local files (data.files, data.val_files: .json, .jsonl or .parquet), a hub dataset (data.path, data.subset,
data.split, data.val_split) or a builder (data.builder, below). Without a validation source every
round(1 / data.val_fraction)-th record validates, counting from the first.

Builders, from the bundled TinyStories sample, by one rule: a story's content words are its words of four
letters or more that appear in at most 5% of the stories; three of those in its first two sentences, drawn at
random (seeded by the story's index) and listed in the order the story uses them, make the request "Write a story
that uses the words: {a}, {b}, {c}." whose answer is the story itself (story_words; a story with fewer than three
such words is left out). story_word_pairs prefers that story to the same story with each of the three words, wherever
it stands, replaced by a content word of another story (drawn at random, seeded by the story's index): the two
answers differ in nothing but using the words asked for.

Each split is tokenized once, cached by the records, the tokenizer, the template and the system prompt. An
example longer than the window is cut to fit with its closing EOS kept (the answer's last trained token); one
whose prompt alone fills the window is dropped and counted.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from gptexp.core.config import ConfigError
from gptexp.data import templates, tinystories
from gptexp.data.templates import Conversation, Exchange
from gptexp.data.text_file import read_utf8
from gptexp.data.token_files import save_atomically

log = logging.getLogger(__name__)

FORMATS = {"alpaca": ("instruction", "output"), "completion": ("prompt", "completion"), "messages": ("messages",),
           "sharegpt": ("conversations",), "preference": ("prompt", "chosen", "rejected")}
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
FORMAT_FIELDS = ("alpaca (instruction, output), completion (prompt, completion), messages, conversations (ShareGPT) "
                 "or preference (prompt, chosen, rejected)")
READERS = (".json", ".jsonl", ".parquet")
STORY_REQUEST = "Write a story that uses the words: {}."


class DataError(ConfigError):
    """A record that does not hold what its format needs; the message names the file and the row or line."""


@dataclass
class Pair:
    """A preference: one conversation (its last exchange open), a better and a worse answer to it."""

    conversation: Conversation
    chosen: str
    rejected: str


# --- records -----------------------------------------------------------------------------------------------

def read_file(path: Path) -> list[tuple[str, dict]]:
    """(where, record) of each record of a .json (a list), .jsonl or .parquet file; `where` names the line or row."""
    records = parquet_rows(path) if path.suffix == ".parquet" else json_rows(path)
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object with the fields of one format, "
                            f"{FORMAT_FIELDS}; found {type(record).__name__} {json.dumps(record)[:40]}")
    return records


def parquet_rows(path: Path) -> list[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except pa.ArrowException as error:
        raise DataError(f"{path} is not a readable Parquet file ({error}); give .parquet files that pyarrow reads, "
                        f"or .json / .jsonl ones") from None
    return [(f"{path}, row {i + 1}", row) for i, row in enumerate(rows)]


def json_rows(path: Path) -> list[tuple[str, object]]:
    """The values of a UTF-8 .json list, else of each line (JSON lines), whatever their shape."""
    text = read_utf8(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {error.lineno}: not JSON ({error.msg}); a .json file holds one list of "
                            f"records") from None
        return [(f"{path}, record {i + 1}", row) for i, row in enumerate(rows)]
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{path}, line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: not a JSON record ({error})") from None
    return rows


def read_files(pattern: str, key: str) -> list[tuple[str, dict]]:
    paths = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser())))
    if not paths:
        raise ConfigError(f"{key}={pattern} matches no file; give .json, .jsonl or .parquet files")
    unread = [p.name for p in paths if p.suffix not in READERS]
    if unread:
        raise ConfigError(f"{key}={pattern}: {unread[0]} is not .json, .jsonl or .parquet")
    return [record for path in paths for record in read_file(path)]


def read_hub(config, split: str, key: str) -> list[tuple[str, dict]]:
    import datasets

    from gptexp.data.hf import check_hub_reachable

    check_hub_reachable(config.path)
    datasets.logging.set_verbosity_error()
    try:
        rows = datasets.load_dataset(config.path, config.subset, split=split)
    except (ConnectionError, FileNotFoundError, ValueError) as error:
        raise ConfigError(f"data.path={config.path} ({key}={split}): {str(error).splitlines()[0]}; offline, give "
                          f"local copies with data.files=<.jsonl / .parquet files> and data.path=null") from None
    return [(f"{config.path} {split}, row {i + 1}", row) for i, row in enumerate(rows)]


def described(config) -> str:
    """Where a data=instruct dataset's records come from, for messages."""
    return (f"data.files={config.files}" if config.files else f"data.path={config.path}" if config.path
            else f"data.builder={config.builder}")


def read_records(config) -> dict[str, list[tuple[str, dict]]]:
    """(where, record) per split, with data.columns' renames applied."""
    sources = [config.builder is not None, config.files is not None, config.path is not None]
    if sum(sources) != 1:
        raise ConfigError("data=instruct reads one source: data.files=<local .json / .jsonl / .parquet files>, "
                          "data.path=<hub dataset> or data.builder=<story_words | story_word_pairs>")
    if config.builder is not None:
        train = BUILDERS[config.builder]() if config.builder in BUILDERS else None
        if train is None:
            raise ConfigError(f"data.builder={config.builder!r}: choose one of {', '.join(BUILDERS)}")
        val = None
    elif config.files is not None:
        train = read_files(config.files, "data.files")
        val = read_files(config.val_files, "data.val_files") if config.val_files else None
    else:
        train = read_hub(config, config.split, "data.split")
        val = read_hub(config, config.val_split, "data.val_split") if config.val_split else None
    if val is None:
        every = max(2, round(1 / config.val_fraction))
        train, val = [r for i, r in enumerate(train) if i % every], train[::every]
    renames = config.columns or {}
    return {split: [(where, {renames.get(k, k): v for k, v in row.items()}) for where, row in rows]
            for split, rows in (("train", train), ("val", val))}


def detect_format(records: list[tuple[str, dict]], asked: str) -> str:
    if asked != "auto":
        if asked not in FORMATS:
            raise ConfigError(f"data.format={asked!r}: choose auto or one of {', '.join(FORMATS)}")
        return asked
    if not records:
        raise ConfigError("data=instruct: the dataset holds no record")
    where, first = records[0]
    for name in ("preference", "messages", "sharegpt", "alpaca", "completion"):
        if all(field in first for field in FORMATS[name]):
            return name
    raise DataError(f"{where}: fields {sorted(first)} fit no format: {FORMAT_FIELDS}; rename yours with "
                    f"data.columns={{yours: ours}}")


def text_field(record: dict, field: str, where: str, optional: bool = False) -> str | None:
    value = record.get(field)
    if value is None and optional:
        return None
    if not isinstance(value, str) or (not value.strip() and not optional):
        found = "nothing" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
        raise DataError(f"{where}: field {field!r} must be non-empty text, found {found}")
    return value


def from_messages(messages, where: str, role_key: str, text_key: str, open_last: bool = False) -> Conversation:
    """A conversation from role-tagged messages: an optional system message, then user and assistant in turn,
    the last an assistant's (or a user's, left open, with `open_last`)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: the messages must be a non-empty list of {{{role_key}, {text_key}}}")
    system, turns = None, []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or ROLES.get(message.get(role_key)) is None:
            raise DataError(f"{where}: message {i + 1} needs {role_key!r} (system, user or assistant), found "
                            f"{str(message)[:60]}")
        role, text = ROLES[message[role_key]], message.get(text_key)
        if not isinstance(text, str):
            raise DataError(f"{where}: message {i + 1} needs its text in {text_key!r}")
        if role == "system" and i == 0:
            system = text
        elif role != ("user" if len(turns) % 2 == 0 else "assistant"):
            raise DataError(f"{where}: message {i + 1} is {message[role_key]!r}; expected user and assistant "
                            f"messages in turn (a system message only first)")
        else:
            turns.append(text)
    if len(turns) % 2 != (1 if open_last else 0):
        raise DataError(f"{where}: the conversation must end with {'a user' if open_last else 'an assistant'} "
                        f"message")
    exchanges = [Exchange(user, answer) for user, answer in zip(turns[::2], turns[1::2] + [None] * open_last)]
    return Conversation(exchanges, system)


def conversation(record: dict, kind: str, where: str) -> Conversation:
    if kind == "alpaca":
        return Conversation([Exchange(text_field(record, "instruction", where), text_field(record, "output", where),
                                      text_field(record, "input", where, optional=True) or None)])
    if kind == "completion":
        return Conversation([Exchange(text_field(record, "prompt", where), text_field(record, "completion", where))])
    if kind == "messages":
        return from_messages(record.get("messages"), where, "role", "content")
    return from_messages(record.get("conversations"), where, "from", "value")


def preference(record: dict, where: str) -> Pair:
    """UltraFeedback-style (chosen / rejected as whole conversations) or plain (prompt, chosen, rejected texts)."""
    answers = []
    for field in ("chosen", "rejected"):
        value = record.get(field)
        if isinstance(value, list):
            whole = from_messages(value, f"{where}, {field}", "role", "content")
            prompt, answers_text = whole.exchanges[:-1] + [Exchange(whole.exchanges[-1].user)], whole.exchanges[-1].answer
            answers.append((Conversation(prompt, whole.system), answers_text))
        else:
            answers.append((None, text_field(record, field, where)))
    if answers[0][1] == answers[1][1]:
        raise DataError(f"{where}: chosen and rejected are the same answer; a preference needs two different ones")
    context = answers[0][0]
    if context is None:
        prompt = record.get("prompt")
        context = (from_messages(prompt, f"{where}, prompt", "role", "content", open_last=True)
                   if isinstance(prompt, list) else Conversation([Exchange(text_field(record, "prompt", where))]))
    return Pair(context, answers[0][1], answers[1][1])


# --- the bundled story requests --------------------------------------------------------------------------

def story_words() -> list[tuple[str, dict]]:
    """The bundled stories as requests to write them: see the module docstring for the rule."""
    return [(f"story {i + 1}", {"instruction": STORY_REQUEST.format(", ".join(words)), "output": story})
            for i, (story, words) in enumerate(stories_with_words())]


def story_word_pairs() -> list[tuple[str, dict]]:
    """Each request of story_words, its story chosen over the same story with the requested words replaced."""
    stories = stories_with_words()
    others = sorted({word for _, words in stories for word in words})
    pairs = []
    for i, (story, words) in enumerate(stories):
        rng = random.Random(i)
        swap = {word: rng.choice([o for o in others if o not in words]) for word in words}
        rejected = re.sub(r"[A-Za-z]+", lambda m: same_case(swap.get(m.group().lower()), m.group()), story)
        pairs.append((f"story {i + 1}", {"prompt": STORY_REQUEST.format(", ".join(words)), "chosen": story,
                                         "rejected": rejected}))
    return pairs


def same_case(replacement: str | None, word: str) -> str:
    if replacement is None:
        return word
    return replacement.capitalize() if word[0].isupper() else replacement


def word_list(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def stories_with_words() -> list[tuple[str, list[str]]]:
    stories = tinystories.stories((resources.files("gptexp.assets") / "tinystories_sample.txt").read_text("utf-8"))
    counts: dict[str, int] = {}
    for story in stories:
        for word in set(word_list(story)):
            counts[word] = counts.get(word, 0) + 1
    common = {word for word, n in counts.items() if n > 0.05 * len(stories)}
    chosen = []
    for i, story in enumerate(stories):
        opening = " ".join(re.split(r"(?<=[.!?])\s+", story)[:2])
        order = {}
        for word in word_list(opening):
            if len(word) >= 4 and word not in common:
                order.setdefault(word, len(order))
        if len(order) >= 3:
            words = random.Random(i).sample(sorted(order), 3)
            chosen.append((story, sorted(words, key=order.get)))
    return chosen


BUILDERS = {"story_words": story_words, "story_word_pairs": story_word_pairs}


def story_request_words(request: str) -> list[str]:
    """The words a story request asks for (benchmarks/instruction_following.py)."""
    found = re.search(r"uses the words: (.*)\.$", request.strip())
    return found.group(1).split(", ") if found else []


# --- tokens ------------------------------------------------------------------------------------------------

@dataclass
class Examples:
    """Tokenized examples of a split: example i is ids[offsets[i]:offsets[i + 1]], `trained` marking the targets
    (the answers and their EOS); preference splits hold the chosen examples, then the rejected, pair by pair."""

    ids: np.ndarray
    trained: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.ids[start:end], self.trained[start:end]

    @classmethod
    def of(cls, encoded: list[templates.Encoded]) -> Examples:
        lengths = [len(e.ids) for e in encoded]
        return cls(np.array([i for e in encoded for i in e.ids], dtype=np.int32),
                   np.array([t for e in encoded for t in e.trained], dtype=bool),
                   np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


class InstructExamples:
    """A data=instruct dataset: its records read and checked at once (bad records fail before any work); once
    given its tokenizer (`use`), its examples are tokenized once into `directory` by prepare() and loaded by load().
    `template`: the one to write them in (a run's own), else data.template, else the tokenizer's default."""

    def __init__(self, config, template: str | None = None):
        self.config, self.template_name = config, template or config.template
        self.records = read_records(config)
        self.kind = detect_format(self.records["train"], config.format)
        self.parsed = {split: [self.parse(where, record) for where, record in rows]
                       for split, rows in self.records.items()}
        for split, items in self.parsed.items():
            if not items:
                raise ConfigError(f"data=instruct: the {split} split is empty after reading; give more records, "
                                  f"or data.val_files=<file> for validation")
        self.tokenizer = self.template = self.directory = None

    def use(self, tokenizer) -> InstructExamples:
        """Write the examples with `tokenizer` (in the template, checked against it)."""
        self.tokenizer = tokenizer
        try:
            self.template = templates.get(self.template_name or templates.default_for(tokenizer))
            self.template.check(tokenizer)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        described = json.dumps([self.kind, self.template.name, self.config.system, tokenizer.name,
                                {s: [r for _, r in rows] for s, rows in self.records.items()}], sort_keys=True,
                               default=str)
        key = hashlib.sha1(described.encode()).hexdigest()[:12]
        self.directory = Path(self.config.cache_dir).expanduser() / f"{self.config.name}-{key}" / tokenizer.name
        return self

    @property
    def pairs(self) -> bool:
        return self.kind == "preference"

    def parse(self, where: str, record: dict):
        if self.kind == "preference":
            missing = [f for f in FORMATS["preference"][1:] if f not in record]
        else:
            missing = [f for f in FORMATS[self.kind] if f not in record]
        if missing:
            raise DataError(f"{where}: no field {missing[0]!r}, which {self.kind} records need; its fields: "
                            f"{sorted(record)}")
        item = preference(record, where) if self.pairs else conversation(record, self.kind, where)
        conversation_of = item.conversation if self.pairs else item
        if self.config.system and conversation_of.system is None:
            conversation_of.system = self.config.system
        return item

    def encode(self, item) -> list[templates.Encoded]:
        try:
            if not self.pairs:
                return [self.template.encode(self.tokenizer, item)]
            open_turn = item.conversation.exchanges[-1]
            return [self.template.encode(self.tokenizer, Conversation(
                item.conversation.exchanges[:-1] + [Exchange(open_turn.user, answer, open_turn.input)],
                item.conversation.system)) for answer in (item.chosen, item.rejected)]
        except ValueError as error:  # a character the vocabulary lacks, a template the tokenizer cannot serve
            raise ConfigError(f"data=instruct: {error}") from None

    def prompts(self, split: str) -> list[tuple[list[int], str, str]]:
        """Each example of `split` as (the token ids of its prompt: the conversation up to its last answer, in the
        template; that last request's text; the dataset's answer to it), for a policy to answer (finetune=grpo)."""
        if self.pairs:
            raise ConfigError("preference pairs hold answers to compare; prompts for a policy to answer come from "
                              "instruction data (data=instruct, data=stories_instruct, ...)")
        prompts = []
        for conversation in self.parsed[split]:
            *history, last = conversation.exchanges
            open_turn = Conversation([*history, Exchange(last.user, None, last.input)], conversation.system)
            try:
                ids = self.template.encode(self.tokenizer, open_turn).ids
            except ValueError as error:
                raise ConfigError(f"data=instruct: {error}") from None
            prompts.append((ids, last.user, last.answer))
        return prompts

    def prepare(self) -> None:
        if (self.directory / "meta.json").exists():
            return
        counts = {}
        for split, items in self.parsed.items():
            encoded = [e for item in items for e in self.encode(item)]
            if self.pairs:  # chosen first, then rejected: pair i is examples i and n + i
                encoded = encoded[0::2] + encoded[1::2]
            examples = Examples.of(encoded)
            for name in ("ids", "trained", "offsets"):
                save_atomically(self.directory / f"{split}_{name}.npy", getattr(examples, name))
            counts[split] = {"examples": len(items), "tokens": int(examples.offsets[-1])}
            log.info("tokenized %s: %d %s records -> %d %s tokens in template %s", split, len(items), self.kind,
                     counts[split]["tokens"], self.tokenizer.name, self.template.name)
        tmp = self.directory / "meta.tmp"
        tmp.write_text(json.dumps({"format": self.kind, "template": self.template.name, "counts": counts}))
        tmp.replace(self.directory / "meta.json")

    def load(self) -> dict[str, Examples]:
        self.prepare()
        return {split: Examples(*(np.load(self.directory / f"{split}_{name}.npy", mmap_mode="r")
                                  for name in ("ids", "trained", "offsets"))) for split in ("train", "val")}

    def vocabulary_text(self) -> str:
        """Every character a character-level tokenizer must hold: the records written in the template (plain
        unless data.template says), and the end marker."""
        try:
            self.template = templates.get(self.template_name or "plain")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        text = []
        for items in self.parsed.values():
            for item in items:
                conv = item.conversation if self.pairs else item
                answers = [item.chosen, item.rejected] if self.pairs else [e.answer for e in conv.exchanges]
                for index, exchange in enumerate(conv.exchanges):
                    prompt = self.template.prompt_text(exchange, conv.system if index == 0 else None, index)
                    text += [prompt] + [self.template.answer_text(prompt, a) for a in answers if a]
        return "".join(text) + templates.END_MARKER
