"""Corpus, tokenizer and data streams for scripts/train_tiny.py (the bundled "tiny" models).

Everything here is CPU work: reading /work/shared/corpus-style text files, training the byte-level
BPE tokenizer, formatting TinyStories stories as ChatML conversations, and cutting token streams
into fixed-length rows. Nothing from the corpus is written into the repo; only the trained
tokenizer files are saved next to the model weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS = "<|endoftext|>"  # eos, and bos at the start of every document
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END, PAD]  # ids 0..3, in this order

# ChatML. The leading <|endoftext|> is written as a literal (not `bos_token`) so that any Jinja
# renderer gives the same text, whatever variables it passes.
CHAT_TEMPLATE = (
    "{{ '<|endoftext|>' }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAIN_STORIES = "tinystories_train_slice.txt"
VALID_STORIES = "tinystories_valid_slice.txt"
BOOK_FILES = ("gutenberg_books.txt", "plays_dialogue.txt", "tinyshakespeare.txt")

_DOC_SEP = re.compile(r"^<\|endoftext\|>$", re.M)
# The valid slice marks no story boundaries (stories and paragraphs are both separated by one
# blank line); a paragraph opening like this starts a new story. About 90% of TinyStories
# stories open this way; the rest stay joined to the story before them.
_STORY_START = re.compile(r"^(Once upon a time|Once,? there (was|were|lived|is))\b")


def split_docs(text: str) -> list[str]:
    """Documents of a corpus file, split on `<|endoftext|>` lines, outer blank lines stripped."""
    return [d.strip("\n") for d in _DOC_SEP.split(text) if d.strip()]


def read_corpus(corpus: Path) -> tuple[list[str], list[str]]:
    """(TinyStories train stories, book/play documents)."""
    stories = split_docs((corpus / TRAIN_STORIES).read_text(encoding="utf-8"))
    books: list[str] = []
    for name in BOOK_FILES:
        books += split_docs((corpus / name).read_text(encoding="utf-8"))
    return stories, books


def read_valid_stories(corpus: Path) -> list[str]:
    """Held-out stories in the train slice's format: paragraphs joined by one newline."""
    paragraphs = [p.strip() for p in (corpus / VALID_STORIES).read_text("utf-8").split("\n\n")]
    stories: list[list[str]] = []
    for p in paragraphs:
        if not p:
            continue
        if not stories or _STORY_START.match(p):
            stories.append([])
        stories[-1].append(p)
    return ["\n".join(s) for s in stories]


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(stories: list[str], books: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization, no prefix space): decode(encode(t)) == t."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts():
        # Stories count three times so the merges favour the text the model is mostly for.
        for _ in range(3):
            yield from stories
        for b in books:  # books are long: feed them in ~1 MB pieces
            for i in range(0, len(b), 1 << 20):
                yield b[i : i + (1 << 20)]

    tok.train_from_iterator(texts(), trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def save_tokenizer(tok: Tokenizer, out: Path) -> PreTrainedTokenizerFast:
    """Write tokenizer.json, tokenizer_config.json (+ chat_template), special_tokens_map.json."""
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=None,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=1024,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    # The brief wants the template inside tokenizer_config.json (some engines read only that),
    # while recent transformers writes it to a separate chat_template.jinja.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    # Names older transformers releases also understand (v5 reads both).
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["additional_special_tokens"] = [IM_START, IM_END]
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()
    stm = {
        "bos_token": EOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [IM_START, IM_END],
    }
    (out / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n")
    loaded = AutoTokenizer.from_pretrained(str(out))
    check_tokenizer(loaded)
    return loaded


def check_tokenizer(tok) -> None:
    """Exact round trip and the chat template, as AutoTokenizer loads them."""
    sample = 'Once upon a time,  "Hi!"\n\n\tsaid Tom — naïve café 42.  \n'
    ids = tok(sample, add_special_tokens=True)["input_ids"]
    assert tok.decode(ids) == sample, tok.decode(ids)
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    want = (
        f"{EOS}{IM_START}system\nBe kind.{IM_END}\n{IM_START}user\nHi{IM_END}\n"
        f"{IM_START}assistant\n"
    )
    assert text == want, repr(text)
    assert tok.convert_tokens_to_ids([EOS, IM_START, IM_END, PAD]) == [0, 1, 2, 3]


def encode_docs(tok: Tokenizer, docs: list[str]) -> list[np.ndarray]:
    """Token ids of each document (no special tokens added)."""
    encs = tok.encode_batch(docs, add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encs]


# Between the two newlines of a paragraph break: the byte-level pre-tokenizer already splits
# there ("\n", "\n", "Word"), so encoding the pieces apart gives exactly the ids of the whole.
_PARA_SPLIT = re.compile(r"(?<=\S\n)(?=\n\S)")


def encode_long(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """One stream of ids for long documents, encoded paragraph by paragraph (in parallel)."""
    pieces = [p for d in docs for p in _PARA_SPLIT.split(d)]
    return np.concatenate(encode_docs(tok, pieces))


# ---------------------------------------------------------------------------------------------
# Chat formatting of stories

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a friendly storyteller.",
    "You write short, simple stories for young children.",
    "You are a helpful assistant who tells short stories.",
    "You are a kind storyteller. Keep stories short and happy.",
]
TOPIC_PROMPTS = [
    "Tell me a story about {}.",
    "Tell me a story about {}.",
    "Tell me a story about {}.",
    "Tell me a short story about {}.",
    "Can you tell me a story about {}?",
    "Write a story about {}.",
    "Please write a short story about {}.",
    "I want a story about {}.",
    "Tell me a bedtime story about {}.",
    "Write a short story for kids about {}.",
]
PLAIN_PROMPTS = [
    "Tell me a short story.",
    "Tell me a story.",
    "Can you tell me a story?",
    "Write a short story for kids.",
    "Tell me a bedtime story.",
    "Please tell me a short story.",
]
# Concrete nouns frequent in TinyStories; a story's keyword is the one it mentions most.
NOUNS = (
    "dog cat bird ball tree car toy boat rabbit bear fish frog duck mouse puppy kitten kitty "
    "bunny horse cow pig sheep lion tiger monkey elephant fox owl bee bug butterfly snake turtle "
    "squirrel "
    "dragon monster robot princess prince king queen fairy witch farmer doctor teacher pirate "
    "balloon kite doll truck train plane cake cookie apple flower garden house box hat dress shoe "
    "book picture drum ship rocket castle cave hill river lake pond beach rock star rainbow "
    "treasure key shell sandwich pizza ice cream snowman swing slide sandcastle airplane crayon "
    "blanket teddy giraffe penguin dinosaur lamb chicken goat bike bicycle wagon"
).split()
# Nouns that read better with "the" ("a story about the sun").
THE_NOUNS = set("sun moon sky sea ocean park forest beach river lake rain snow wind".split())
NOUNS_ALL = NOUNS + sorted(THE_NOUNS - set(NOUNS))
_NAMED = re.compile(r"\b(?:a|an)\s+(?:[a-z]+\s+){0,2}?([a-z]+)\s+named\s+([A-Z][a-z]+)")
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class StoryTopic:
    noun: str | None  # a concrete noun from the story, e.g. "dog"
    name: str | None  # the name after "a <noun> named", e.g. "Max"


def _article(noun: str) -> str:
    if noun in THE_NOUNS:
        return f"the {noun}"
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def story_topic(story: str) -> StoryTopic:
    m = _NAMED.search(story)
    if m and m.group(1) in NOUNS_ALL + ["girl", "boy"]:
        return StoryTopic(m.group(1), m.group(2))
    counts: dict[str, int] = {}
    for w in _WORD.findall(story.lower()):
        if w in NOUNS_ALL:
            counts[w] = counts.get(w, 0) + 1
    if not counts:
        return StoryTopic(None, None)
    best = max(counts.items(), key=lambda kv: (kv[1], -NOUNS_ALL.index(kv[0])))
    return StoryTopic(best[0], None)


def chat_messages(story: str, topic: StoryTopic, rng: np.random.Generator) -> list[dict]:
    """A user request answered by the story; the request varies from epoch to epoch."""
    msgs = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": str(rng.choice(SYSTEM_PROMPTS))})
    r = rng.random()
    if topic.noun is None or r < 0.15:
        user = str(rng.choice(PLAIN_PROMPTS))
    elif topic.name is not None and r < 0.35:
        user = f"Tell me a story about {_article(topic.noun)} named {topic.name}."
    else:
        user = str(rng.choice(TOPIC_PROMPTS)).format(_article(topic.noun))
    msgs.append({"role": "user", "content": user})
    msgs.append({"role": "assistant", "content": story})
    return msgs


def render_chat(msgs: list[dict], add_generation_prompt: bool = False) -> str:
    """The same text as CHAT_TEMPLATE renders (checked against the tokenizer at startup)."""
    s = EOS + "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in msgs)
    return s + (f"{IM_START}assistant\n" if add_generation_prompt else "")


# ---------------------------------------------------------------------------------------------
# Training and evaluation streams


class MixedStream:
    """Rows of seq_len+1 tokens: a share from the books, the rest from the stories.

    The stories side is one epoch at a time: every story once as a raw document
    (`<|endoftext|>story`) and once as a ChatML conversation with a freshly drawn request, in a
    shuffled order, read sequentially. Books rows are random windows of the book stream.
    """

    def __init__(
        self,
        tok: Tokenizer,
        stories: list[str],
        books: list[str],
        seq_len: int,
        books_share: float,
        seed: int,
    ) -> None:
        self.tok = tok
        self.seq_len = seq_len
        self.books_share = books_share
        self.rng = np.random.default_rng(seed)
        self.stories = stories
        self.topics = [story_topic(s) for s in stories]
        eos = np.array([tok.token_to_id(EOS)], dtype=np.int32)
        self.story_ids = encode_docs(tok, stories)  # without the leading eos
        self.raw_docs = [np.concatenate([eos, ids]) for ids in self.story_ids]
        self.books = encode_long(tok, [EOS + b for b in books])  # [n_book_tokens]
        self.im_end_nl = np.asarray(tok.encode(IM_END + "\n").ids, dtype=np.int32)
        self._header_cache: dict[str, np.ndarray] = {}
        self.epoch = 0
        self._check_chat_encoding()
        self._new_epoch()

    def _header(self, text: str) -> np.ndarray:
        ids = self._header_cache.get(text)
        if ids is None:
            ids = np.asarray(self.tok.encode(text).ids, dtype=np.int32)
            self._header_cache[text] = ids
        return ids

    def chat_doc(self, i: int, msgs: list[dict] | None = None) -> np.ndarray:
        """Conversation i as ids: header + story + <|im_end|>\\n.

        Concatenating separately encoded pieces is exact here: the header ends in a newline and
        the story starts with a letter (the byte-level pre-tokenizer splits there), and
        <|im_end|> is a special token. _check_chat_encoding asserts it.
        """
        if msgs is None:
            msgs = chat_messages(self.stories[i], self.topics[i], self.rng)
        header = render_chat(msgs[:-1], add_generation_prompt=True)
        return np.concatenate([self._header(header), self.story_ids[i], self.im_end_nl])

    def _check_chat_encoding(self) -> None:
        for i in range(min(50, len(self.stories))):
            msgs = chat_messages(self.stories[i], self.topics[i], np.random.default_rng(i))
            want = self.tok.encode(render_chat(msgs)).ids
            assert list(self.chat_doc(i, msgs)) == want, f"chat encoding mismatch on story {i}"

    def _new_epoch(self) -> None:
        docs = self.raw_docs + [self.chat_doc(i) for i in range(len(self.stories))]
        order = self.rng.permutation(len(docs))
        self.stream = np.concatenate([docs[j] for j in order])  # [n_story_tokens]
        self.cursor = 0
        self.epoch += 1

    @property
    def epoch_tokens(self) -> int:
        return len(self.stream)

    def batch(self, batch_size: int) -> np.ndarray:
        """[batch_size, seq_len + 1] int64 token ids."""
        n = self.seq_len + 1
        rows = np.empty((batch_size, n), dtype=np.int64)
        from_books = self.rng.random(batch_size) < self.books_share
        for r in range(batch_size):
            if from_books[r]:
                start = int(self.rng.integers(0, len(self.books) - n))
                rows[r] = self.books[start : start + n]
            else:
                if self.cursor + n > len(self.stream):
                    self._new_epoch()
                rows[r] = self.stream[self.cursor : self.cursor + n]
                self.cursor += n
        return rows


def eval_streams(
    tok: Tokenizer, valid_stories: list[str], eval_tokens: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """(report stream, monitor stream, number of stories in the report stream).

    The report stream is the first `eval_tokens` tokens of the held-out stories, each story
    starting with <|endoftext|>. The monitor stream (used only to pick the checkpoint) is every
    held-out story that starts after those tokens, so the two never overlap.
    """
    docs = encode_docs(tok, [EOS + s for s in valid_stories])
    lens = np.cumsum([len(d) for d in docs])
    total = int(lens[-1])
    if total < eval_tokens + 5000:
        raise SystemExit(f"held-out set has {total} tokens; --eval-tokens {eval_tokens} too many")
    full = np.concatenate(docs)
    report = full[:eval_tokens]
    first_after = int(np.searchsorted(lens, eval_tokens, side="left")) + 1
    monitor = np.concatenate(docs[first_after:])
    return report, monitor, first_after
