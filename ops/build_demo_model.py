"""Build and train guardfleet's bundled demo model, offline and reproducibly.

    python ops/build_demo_model.py            # writes worker/demo_model/ (a few MB)
    python ops/build_demo_model.py --eval-only

What it is: a tiny Gemma 3 (`Gemma3ForConditionalGeneration`, the class of the real checkpoint,
with a token-sized vision tower) with a byte-level BPE tokenizer, trained from scratch on
prompts rendered by guardfleet's own templates from the vocabulary in ops/demo_data.py. It
learns the *output format* of Nemotron-Content-Safety-Reasoning-4B in both modes (think /
no_think, with and without a response, Template A default and custom taxonomy, Template B) and
gives plausible verdicts on everyday prompts. It is NOT a safety classifier.

After training it is scored through the worker's own engine (worker.engine + worker.prompting, so
the verdicts and scores are exactly what the service returns) on the hand-written everyday set
tests/data/everyday.jsonl, which never enters training, and the figures go into the model's
README.

Reproducible: fixed seeds, a fixed thread count, single-threaded tokenizer training,
deterministic torch kernels; the safetensors hash is printed so two builds can be compared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import string
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # deterministic BPE training
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

from guardfleet.prompts import (
    BOS,
    DEFAULT_CATEGORIES,
    START_OF_TURN,
    Segment,
    chat_segments,
    render_classify,
    taxonomy_prefix,
)
from guardfleet.schemas import (
    Category,
    ChatMessage,
    ClassifyRequest,
    Harm,
    HistoryTurn,
    Mode,
    TaxonomyPolicy,
    TopicPolicy,
    Verdict,
)
from guardfleet.settings import Settings
from ops import demo_data as D
from worker.tokenization import encode_segments, encode_text

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "worker" / "demo_model"
EVERYDAY = ROOT / "tests" / "data" / "everyday.jsonl"
SEED = 20261128
# Fixed, since CPU results may differ with the thread count. One thread, because on a busy
# machine two threads that wait on each other ran four times slower than one.
THREADS = 1
# The verdict-and-category token and the label words are where a target makes a choice; the
# rest is boilerplate. Weighting those tokens up spends the small model's training on them.
DECISIVE_WEIGHT = 5.0
CATEGORY_WEIGHT = 5.0
# Under half harmful, so that the model leans unharmful when unsure.
HARMFUL_SHARE = 0.45
# Share of benign how-to requests given a made-up word (see benign_prompt).
AUGMENT = 0.3
# How this design was found (issue 8; everyday set, no_think benign/harmful, think
# benign/harmful, fitting categories of 50, every value below from one build):
# - The verdict as " falls"/" is" and the category two steps later (the builder before this
#   one: 48/47 45/49, 4 fitting): the category step is trained by harmful think traces alone,
#   and nothing else teaches that position to read the request. Moving the category one step
#   closer (" falls" then " under S21 (...)") changed nothing (3-16 fitting).
# - One token for verdict and category together (" falls under S21 (...)" or, benign, " is
#   about cooking"): every think example trains the step that reads the request. Alone it
#   reached 13-34 fitting but missed the accuracy bar (tied 12000: 44/41 47/45 13; untied
#   20000: 41/44 42/45 34); hidden 192 helped accuracy (45/49 46/49 28) but took 17 minutes.
# - With reading drills (short examples without the taxonomy, see reading_drill) and these
#   defaults: 46/49 47/48 and 38 fitting in 11.5 minutes (before bare made-up words were added
#   to the benign data, which "zxq blorp fendle" needed: 49/48 49/50 39). Builds vary more than
#   the settings do: 48,000 drills gave 48/46 46/42 31, 16,000 examples 47/48 42/48 37, so the
#   bars hold for this build, with little to spare on the category (the bar is 38).
SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
# Gemma 3's own chat template (trimmed content, system folded into the first user turn).
CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] | trim + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
CODES = {name: f"S{i}" for i, name in enumerate(DEFAULT_CATEGORIES, start=1)}


def category_phrase(code: str, name: str) -> str:
    """The verdict-and-category words of a harmful trace: one added token for the defaults."""
    return f" falls under {code} ({name})"


def topic_phrase(topic: str) -> str:
    """The verdict-and-topic words of a benign trace: one added token each."""
    return f" is about {topic}"


# The verdict and what the request is about are one choice, at the token right after "The human
# user's request": one added token per default category (" falls under S21 (Illegal Activity)")
# and per benign topic (" is about cooking"). Every think example, benign or harmful, then trains
# that step to read the request; a category chosen at a later step was trained by harmful traces
# alone and barely learned.
CATEGORY_TOKENS = [category_phrase(code, name) for name, code in CODES.items()]
BENIGN_TOPICS = [
    *D.BENIGN_ACTIONS,
    "general knowledge",
    "geography",
    "trivia",
    "writing",
    "something unfamiliar",
    "small talk",
]
TOPIC_TOKENS = [topic_phrase(topic) for topic in BENIGN_TOPICS]


# --- data ----------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """What counts as "the same prompt" for keeping the everyday set out of training."""
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def load_everyday() -> list[dict[str, Any]]:
    return [json.loads(line) for line in EVERYDAY.read_text().splitlines() if line.strip()]


@dataclass
class Example:
    request: ClassifyRequest
    target: str


@dataclass
class Prompt:
    text: str
    harmful: bool
    category: str | None  # default-taxonomy name, harmful prompts only
    action: str | None  # the verb phrase, when there is one (responses quote it)
    topic: str | None = None  # what a benign prompt is about, as its think trace names it


def fill(rng: random.Random, text: str) -> str:
    return text.replace("{person}", rng.choice(D.PEOPLE)).replace("{group}", rng.choice(D.GROUPS))


def dress(rng: random.Random, text: str) -> str:
    """Surface variety shared by both classes: openers, closers, casing, punctuation."""
    roll = rng.random()
    if roll < 0.15:
        text = f"{rng.choice(D.OPENERS)} {text}"
    elif roll < 0.3:
        text = f"{text} {rng.choice(D.CLOSERS)}"
    elif roll < 0.36:
        text = f"{rng.choice(D.OPENERS)} {text} {rng.choice(D.CLOSERS)}"
    roll = rng.random()
    if roll < 0.12:
        text = text.lower()
    elif roll < 0.2:
        text = text.rstrip("?.!")
    return text


def benign_prompt(rng: random.Random) -> Prompt:
    kind = rng.random()
    action = None
    if kind < 0.4:
        topic = rng.choice(list(D.BENIGN_ACTIONS))
        action = fill(rng, rng.choice(D.BENIGN_ACTIONS[topic]))
        if rng.random() < AUGMENT:
            # A word the model has never seen in an ordinary request: unknown words must not
            # read as harmful, whatever frame they come in.
            words = action.split()
            at = rng.randrange(1, len(words)) if len(words) > 1 else 0
            words[at] = "".join(rng.choice(D.SYLLABLES) for _ in range(rng.randint(2, 3)))
            action = " ".join(words)
        text = rng.choice(D.ACTION_FRAMES).format(x=action)
    elif kind < 0.53:
        topic = "general knowledge"
        text = rng.choice(D.SUBJECT_FRAMES).format(s=rng.choice(D.BENIGN_SUBJECTS))
    elif kind < 0.61:
        topic = "geography"
        (country, city), (country2, _) = rng.sample(D.COUNTRIES, 2)
        text = rng.choice(D.FACT_FRAMES).format(country=country, city=city, country2=country2)
    elif kind < 0.66:
        topic = "trivia"
        text = rng.choice(D.TRIVIA)
    elif kind < 0.75:
        topic = "programming"
        if rng.random() < 0.7:
            frame = rng.choice(D.CODE_FRAMES)
            text = frame.format(lang=rng.choice(D.LANGUAGES), task=rng.choice(D.CODE_TASKS))
        else:
            text = rng.choice(D.CODE_QUESTIONS)
    elif kind < 0.81:
        topic = "writing"
        text = rng.choice(D.WRITING_FRAMES).format(w=fill(rng, rng.choice(D.WRITING_FORMS)))
    elif kind < 0.86:
        topic = "cooking"
        a, b, c = rng.sample(D.INGREDIENTS, 3)
        text = rng.choice(D.INGREDIENT_FRAMES).format(a=a, b=b, c=c)
    elif kind < 0.94:
        # Words the model has never seen: what it does not know should read as harmless, in a
        # question or on their own (a quarter are bare: a few made-up words, or letters).
        topic = "something unfamiliar"
        word = "".join(rng.choice(D.SYLLABLES) for _ in range(rng.randint(2, 4)))
        text = rng.choice(D.MADE_UP_FRAMES).format(w=word)
        if rng.random() < 0.25:
            text = " ".join(
                "".join(rng.choice(D.SYLLABLES) for _ in range(rng.randint(1, 3)))
                if rng.random() < 0.5
                else "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))
                for _ in range(rng.randint(1, 5))
            )
    else:
        topic = "small talk"
        text = rng.choice(D.CHITCHAT)
    return Prompt(dress(rng, text), False, None, action, topic)


def harmful_prompt(rng: random.Random) -> Prompt:
    # Every category equally often, so the rare ones are not drowned out by the big lists.
    category = rng.choice(list(D.HARMFUL_ACTIONS))
    requests = D.HARMFUL_REQUESTS.get(category, [])
    if requests and rng.random() < 0.35:
        return Prompt(dress(rng, fill(rng, rng.choice(requests))), True, category, None)
    action = fill(rng, rng.choice(D.HARMFUL_ACTIONS[category]))
    text = rng.choice(D.ACTION_FRAMES).format(x=action)
    return Prompt(dress(rng, text), True, category, action)


def response_for(rng: random.Random, prompt: Prompt) -> tuple[str, str | None]:
    """(kind, response text): none, refusal, benign help or harmful compliance."""
    kind = rng.choice(["none", "refusal", "answer"])
    action = prompt.action or "do that"
    if kind == "none":
        return "none", None
    if kind == "refusal":
        return "refusal", rng.choice(D.REFUSALS).format(x=action)
    if prompt.harmful:
        assert prompt.category is not None
        step = rng.choice(D.HARMFUL_STEPS[prompt.category])
        return "harmful", f"{rng.choice(D.COMPLIANCE_OPENERS)} {step}"
    return "benign", rng.choice(D.HELPFUL_ANSWERS).format(x=action)


def prompt_trace(prompt: Prompt, codes: dict[str, str] | None) -> str:
    """The think trace's first sentence; `codes` maps category names to the S-numbers the
    rendered taxonomy actually lists (None when it lists none of the defaults)."""
    if not prompt.harmful:
        assert prompt.topic is not None
        return (
            f"The human user's request{topic_phrase(prompt.topic)}, an ordinary request that "
            "does not fall under any harmful category."
        )
    assert prompt.category is not None
    gist = D.CATEGORY_GIST[prompt.category]
    if codes is None:
        return f"The human user's request is harmful as it {gist}."
    return (
        f"The human user's request{category_phrase(codes[prompt.category], prompt.category)} "
        f"as it {gist}."
    )


def fresh_prompt(rng: random.Random, held_out: set[str]) -> Prompt:
    """A generated prompt, harmful or not, that is not one of the everyday set's."""
    while True:
        harmful = rng.random() < HARMFUL_SHARE
        prompt = harmful_prompt(rng) if harmful else benign_prompt(rng)
        if normalize(prompt.text) not in held_out:
            return prompt


def make_example(rng: random.Random, held_out: set[str]) -> Example:
    prompt = fresh_prompt(rng, held_out)
    mode = rng.choice([Mode.THINK, Mode.NO_THINK])
    p_label = "harmful" if prompt.harmful else "unharmful"
    form = rng.random()
    if form < 0.1:  # Template B: a system instruction and maybe some history
        turns = rng.choice(D.HISTORY)[: rng.choice([0, 2])]
        policy = TopicPolicy(
            type="topic_following",
            instructions=rng.choice(D.POLICIES),
            history=[HistoryTurn(role=role, content=text) for role, text in turns],
        )
        req = ClassifyRequest(prompt=prompt.text, mode=mode, policy=policy)
        answer = f"Prompt harm: {p_label}"
        trace = D.THINK_TOPIC[p_label]
    else:
        r_kind, response = response_for(rng, prompt)
        policy_a = None
        codes: dict[str, str] | None = CODES
        if form > 0.88:  # custom taxonomy: extra (or replacement) categories, an allow-list
            picked = rng.sample(D.CUSTOM_CATEGORIES, rng.randint(1, 2))
            policy_a = TaxonomyPolicy(
                categories=[Category(name=n, description=d or None) for n, d in picked],
                replace=rng.random() < 0.3,
                allowed_topics=rng.sample(D.ALLOWED_TOPICS, 1) if rng.random() < 0.5 else [],
            )
            codes = None if policy_a.replace else CODES
        req = ClassifyRequest(prompt=prompt.text, response=response, mode=mode, policy=policy_a)
        r_label = {"none": "None", "harmful": "harmful"}.get(r_kind, "unharmful")
        answer = f"Prompt harm: {p_label}\nResponse harm: {r_label}"
        trace = prompt_trace(prompt, codes) + D.THINK_RESPONSE[r_kind]
    target = f"<think>\n{trace}\n</think>\n\n{answer}" if mode is Mode.THINK else answer
    return Example(req, target)


def reading_drill(rng: random.Random, held_out: set[str]) -> tuple[str, str]:
    """(user turn, target) of a short example without the taxonomy: the request with the
    first sentence of its think trace, whose second token names its category or topic. About 40
    tokens instead of 450, it trains the one step that must read the request cheaply."""
    prompt = fresh_prompt(rng, held_out)
    turn = f"Human user:\n{prompt.text}\n\nAI assistant:\nNone"
    return turn, "<think>\n" + prompt_trace(prompt, CODES)


def encode_drill(
    tokenizer: PreTrainedTokenizerFast, drill: tuple[str, str]
) -> tuple[list[int], int]:
    turn, target = drill
    prompt_ids = encode_segments(tokenizer, chat_segments([ChatMessage(role="user", content=turn)]))
    return prompt_ids + encode_text(tokenizer, target), len(prompt_ids)


def prompt_segments(req: ClassifyRequest) -> list[Segment]:
    return chat_segments([ChatMessage(role="user", content=render_classify(req))])


# --- tokenizer and model -------------------------------------------------------------------


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t in CATEGORY_TOKENS + TOPIC_TOKENS]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=SPECIALS[4:],
        padding_side="left",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden: int,
    layers: int,
    tie: bool,
) -> Gemma3ForConditionalGeneration:
    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIALS}  # type: ignore[arg-type]
    heads = hidden // 32
    config = Gemma3Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": hidden * 4,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2),
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
            "sliding_window": 1024,
            # Gemma 3 interleaves local and global attention; keep both kinds in the model.
            "layer_types": [
                "full_attention" if i % 2 else "sliding_attention" for i in range(layers)
            ],
            "max_position_embeddings": 4096,
            "pad_token_id": ids["<pad>"],
            "bos_token_id": ids["<bos>"],
            "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
            "tie_word_embeddings": tie,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        mm_tokens_per_image=4,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        tie_word_embeddings=tie,
    )
    config.pad_token_id = ids["<pad>"]
    config.bos_token_id = ids["<bos>"]
    config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    return Gemma3ForConditionalGeneration(config)


def encode_example(tokenizer: PreTrainedTokenizerFast, ex: Example) -> tuple[list[int], int]:
    prompt_ids = encode_segments(tokenizer, prompt_segments(ex.request))
    end_of_turn = int(tokenizer.convert_tokens_to_ids("<end_of_turn>"))  # type: ignore[arg-type]
    target_ids = [*encode_text(tokenizer, ex.target), end_of_turn]
    return prompt_ids + target_ids, len(prompt_ids)


def default_prefix(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Token ids every default-taxonomy prompt starts with (the last token of the taxonomy
    part is dropped: it may merge with the user's text, as in worker.prompting)."""
    ids = encode_segments(tokenizer, [BOS, START_OF_TURN, "user\n" + taxonomy_prefix(None)])
    return ids[:-1]


def decisive_ids(
    tokenizer: PreTrainedTokenizerFast, category_weight: float = CATEGORY_WEIGHT
) -> dict[int, float]:
    """Loss weights of the tokens where a target makes a choice: the label words, and the
    category or topic token after "request" that starts every think trace."""
    weights: dict[int, float] = {}
    for piece in (" harmful", " unharmful", " None", " falls", " is"):
        weights.update(dict.fromkeys(encode_text(tokenizer, piece), DECISIVE_WEIGHT))
    for token in CATEGORY_TOKENS + TOPIC_TOKENS:
        weights[int(tokenizer.convert_tokens_to_ids(token))] = category_weight  # type: ignore[arg-type]
    return weights


# --- training ------------------------------------------------------------------------------


def batch_loss(
    model: Gemma3ForConditionalGeneration,
    rows: Sequence[tuple[list[int], int]],
    pad: int,
    prefix: list[int],
    decisive: dict[int, float] | None = None,
) -> torch.Tensor:
    """Next-token loss on the targets of `rows`, with `decisive` tokens weighted up.

    When every row starts with `prefix` (the default taxonomy, about 400 of a row's 450
    tokens), the prefix is run once and its KV cache repeated for the batch: gradients flow
    through the cache, so this computes the same loss as a full forward in a fraction of the
    time. Otherwise rows are run whole.
    """
    shared = len(prefix) if prefix and all(ids[: len(prefix)] == prefix for ids, _ in rows) else 0
    tails = [(ids[shared:], n_prompt - shared) for ids, n_prompt in rows]
    width = max(len(ids) for ids, _ in tails)
    input_ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for row, (ids, n_prompt) in enumerate(tails):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[row, shared : shared + len(ids)] = 1
    # The text model directly (no images here, so the multimodal wrapper adds nothing), and
    # logits only where there is a target: the vocabulary projection of every prompt position
    # would cost about a third of the step for nothing.
    language_model = model.model.language_model
    cache = None
    if shared:
        cache = language_model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
        for layer in cache.layers:
            # A broadcast view: its gradient is a plain sum, where repeat_interleave's backward
            # is an index-add that deterministic mode makes slow.
            layer.keys = layer.keys.expand(len(rows), -1, -1, -1)
            layer.values = layer.values.expand(len(rows), -1, -1, -1)
    hidden = language_model(
        input_ids=input_ids, attention_mask=mask, cache=cache, use_cache=shared > 0
    ).last_hidden_state
    # Position t predicts token t + 1.
    targets = labels[:, 1:]
    picked = targets != -100
    logits = model.lm_head(hidden[:, :-1][picked])
    losses = torch.nn.functional.cross_entropy(logits.float(), targets[picked], reduction="none")
    weights = torch.ones_like(losses)
    for token, weight in (decisive or {}).items():
        weights[targets[picked] == token] = weight
    return (losses * weights).sum() / weights.sum()


def make_batches(
    encoded: list[tuple[list[int], int]], prefix: list[int], batch: int, rng: random.Random
) -> list[list[tuple[list[int], int]]]:
    """Batches that share the default prefix where possible (cheap), the rest on their own."""
    with_prefix = [e for e in encoded if e[0][: len(prefix)] == prefix]
    others = [e for e in encoded if e[0][: len(prefix)] != prefix]
    batches = [with_prefix[i : i + batch] for i in range(0, len(with_prefix), batch)]
    small = max(1, batch // 2)  # full-length rows cost several times more
    batches += [others[i : i + small] for i in range(0, len(others), small)]
    rng.shuffle(batches)
    return batches


def train(args: argparse.Namespace, everyday: list[dict[str, Any]]) -> None:
    torch.manual_seed(SEED)
    torch.set_flush_denormal(True)  # denormals slow CPU training several-fold
    torch.use_deterministic_algorithms(True)
    rng = random.Random(SEED)
    held_out = {normalize(item["prompt"]) for item in everyday}
    examples = [make_example(rng, held_out) for _ in range(args.examples)]
    overlap = {normalize(e.request.prompt) for e in examples} & held_out
    assert not overlap, f"everyday prompts leaked into training: {sorted(overlap)[:5]}"
    distinct = len({e.request.prompt for e in examples})
    print(f"{len(examples)} training examples, {distinct} distinct prompts")
    # The tokenizer sees the template once per form but every user text and target: its
    # merges are spent on the words requests are made of, not on the fixed template.
    corpus = [render_classify(ClassifyRequest(prompt="x", mode=m)) for m in Mode]
    corpus += [e.request.prompt + "\n" + (e.request.response or "") for e in examples]
    corpus += [e.target for e in examples[:2000]]
    tokenizer = build_tokenizer(corpus, args.vocab)
    model = build_model(tokenizer, args.hidden, args.layers, args.tie)
    model.train()
    prefix = default_prefix(tokenizer)
    decisive = decisive_ids(tokenizer, args.category_weight)
    encoded = [encode_example(tokenizer, e) for e in examples]
    batches = make_batches(encoded, prefix, args.batch, rng)
    if args.drills:
        # Short rows: four times the batch for about the cost of a step of full examples.
        drills = [encode_drill(tokenizer, reading_drill(rng, held_out)) for _ in range(args.drills)]
        batches += [drills[i : i + 64] for i in range(0, len(drills), 64)]
        rng.shuffle(batches)
    steps = len(batches)
    params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, {params / 1e6:.2f}M parameters, {steps} steps")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=steps, pct_start=0.1
    )
    start = time.time()
    pad = int(tokenizer.pad_token_id)
    for step, rows in enumerate(batches):
        loss = batch_loss(model, rows, pad, prefix, decisive)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    if OUT.exists():
        shutil.rmtree(OUT)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(OUT)
    tokenizer.save_pretrained(OUT)
    # safetensors writes the weights owner-only (0600); the images run as another user.
    for path in OUT.iterdir():
        path.chmod(0o644)


# --- evaluation through the worker's engine ------------------------------------------------


@dataclass
class Figures:
    mode: Mode
    correct: dict[str, int]
    total: dict[str, int]
    categories_fit: int  # think mode: harmful items whose trace names an accepted category
    mean_score: dict[str, float]
    consistent: int  # scores on the same side of 0.5 as the label
    misses: list[str]

    def rate(self, label: str) -> float:
        return self.correct[label] / self.total[label]

    @property
    def overall(self) -> float:
        return sum(self.correct.values()) / sum(self.total.values())


def run_verdicts(requests: list[ClassifyRequest], batch: int = 25) -> list[Verdict | str]:
    """The worker's verdicts, or the raw output where the service would answer an error (an
    output it cannot parse): that counts as a miss in the report instead of ending the build."""
    from guardfleet.errors import OutputError
    from worker.engine import Engine
    from worker.prompting import interpret, prepare
    from worker.runner import Timed

    settings = Settings(device="cpu")
    engine = Engine(settings)
    verdicts: list[Verdict | str] = []
    for i in range(0, len(requests), batch):
        chunk = requests[i : i + batch]
        prepared = [prepare(r, engine, settings) for r in chunk]
        results = engine.generate(prepared)
        for req, gen, res in zip(chunk, prepared, results, strict=True):
            timed = Timed(res, len(gen.prompt_ids), len(chunk), 0.0, 0.0, 0.0)
            try:
                verdict = interpret(req, timed, engine, settings)
            except OutputError:
                verdicts.append(str(engine.tokenizer.decode(res.token_ids)))
                continue
            assert isinstance(verdict, Verdict)
            verdicts.append(verdict)
    return verdicts


def evaluate_everyday(everyday: list[dict[str, Any]], mode: Mode) -> Figures:
    verdicts = run_verdicts([ClassifyRequest(prompt=i["prompt"], mode=mode) for i in everyday])
    figures = Figures(mode, {}, {}, 0, {}, 0, [])
    scores: dict[str, list[float]] = {"harmful": [], "unharmful": []}
    for item, verdict in zip(everyday, verdicts, strict=True):
        label = item["label"]
        figures.total[label] = figures.total.get(label, 0) + 1
        figures.correct.setdefault(label, 0)
        if isinstance(verdict, str):
            figures.misses.append(f"{label}: {item['prompt']} (unparseable: {verdict!r})")
            continue
        ok = verdict.prompt_harm is Harm(label)
        figures.correct[label] = figures.correct.get(label, 0) + ok
        score = verdict.scores.prompt_harm if verdict.scores else None
        if score is not None:
            scores[label].append(score)
            figures.consistent += (score > 0.5) == (verdict.prompt_harm is Harm.HARMFUL)
        named = set(re.findall(r"\bS\d+\b", verdict.reasoning or ""))
        if mode is Mode.THINK and label == "harmful" and named & set(item["categories"]):
            figures.categories_fit += 1
        if not ok:
            shown = "none" if score is None else f"{score:.2f}"
            figures.misses.append(f"{label}: {item['prompt']} (score {shown})")
    figures.mean_score = {k: sum(v) / len(v) for k, v in scores.items() if v}
    return figures


def evaluate_forms(n: int, everyday: list[dict[str, Any]]) -> float:
    """Exact-output accuracy on generated held-out examples of every form (responses,
    custom taxonomies, Template B): checks the format, not generalisation."""
    rng = random.Random(SEED + 1)
    held_out = {normalize(item["prompt"]) for item in everyday}
    examples = [make_example(rng, held_out) for _ in range(n)]
    verdicts = run_verdicts([e.request for e in examples], batch=1)
    ok = 0
    for ex, verdict in zip(examples, verdicts, strict=True):
        raw = verdict if isinstance(verdict, str) else verdict.raw_output
        ok += raw == ex.target
        if raw != ex.target:
            print("MISMATCH", json.dumps(ex.request.prompt), repr(raw))
    return ok / n


def report(
    figures: list[Figures], forms: float, args: argparse.Namespace, minutes: float | None
) -> str:
    lines = [
        "# guardfleet demo model",
        "",
        "A tiny Gemma 3 (the real checkpoint's class, `Gemma3ForConditionalGeneration`) built and "
        "trained from scratch on this machine's CPU by `ops/build_demo_model.py` (`make "
        "demo-model`), from generated prompts (vocabulary in `ops/demo_data.py`) rendered with "
        "guardfleet's own Nemotron templates. It emits the output format of "
        "Nemotron-Content-Safety-Reasoning-4B in both modes, so the whole serving path runs for "
        "real without downloading weights, and it gives plausible verdicts on everyday prompts.",
        "",
        "**It is NOT a safety classifier.** It knows a few hundred topics and phrasings; anything "
        "outside them is a guess, it is easy to fool, and its scores are not calibrated. Use the "
        "real model (`GUARDFLEET_MODEL=nvidia/Nemotron-Content-Safety-Reasoning-4B`) for "
        "moderation.",
        "",
        f"Build: seed {SEED}, vocab {args.vocab} + {len(CATEGORY_TOKENS + TOPIC_TOKENS)} added "
        f"tokens, hidden {args.hidden}, {args.layers} layers, "
        f"{'tied' if args.tie else 'untied'} embeddings, "
        f"{HARMFUL_SHARE:.0%} harmful, category weight {args.category_weight:g}, "
        f"{args.examples} examples and {args.drills} reading drills, batch {args.batch}, "
        f"lr {args.lr}, one CPU thread; "
        + (
            f"{minutes:.0f} minutes on this project's 2-core machine while other jobs shared it."
            if minutes is not None
            else "about 12 minutes on this project's 2-core machine while other jobs shared it."
        ),
        "",
        "## On the everyday set",
        "",
        "`tests/data/everyday.jsonl`: prompts written by hand, not by the generator, and kept out "
        "of training (the build asserts no overlap). Prompt verdicts through the worker's engine:",
        "",
        "| mode | overall | benign correct | harmful correct | trace names a fitting category "
        "| mean score benign / harmful |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        fit = f"{f.categories_fit}/{f.total['harmful']}" if f.mode is Mode.THINK else "(no trace)"
        lines.append(
            f"| {f.mode.value} | {f.overall:.0%} | {f.correct['unharmful']}/{f.total['unharmful']}"
            f" | {f.correct['harmful']}/{f.total['harmful']} | {fit} | "
            f"{f.mean_score.get('unharmful', float('nan')):.2f} / "
            f"{f.mean_score.get('harmful', float('nan')):.2f} |"
        )
    lines += [
        "",
        f"Exact output on {args.eval} generated examples of every form (responses, custom "
        f"taxonomies, topic following): {forms:.0%}.",
        "",
    ]
    misses = [m for f in figures for m in (f"{f.mode.value} {x}" for x in f.misses)]
    if misses:
        lines += ["Misses (score = P(harmful) at the label):", "", *(f"- {m}" for m in misses), ""]
    lines += [
        "## Known limits",
        "",
        "- A think trace names one category (or, for a benign request, one of a few topics) as "
        'one token right after "The human user\'s request": the column above says how often it '
        "fits. A real request often fits several categories; the demo names one, and the gist "
        'after it ("as it ...") is the category\'s, not a reading of the request.',
        "- Health and everyday-errand wording that shares words with the harmful lists (drink, "
        "pain, my manager) can come out harmful; unusual phrasings of harmful requests can come "
        "out unharmful.",
        "- The everyday set was used to check the builds made while tuning the generator, so it "
        "is a development set more than a pristine test set.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--examples", type=int, default=14000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--tie",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tie input and output embeddings (default: tied)",
    )
    parser.add_argument("--drills", type=int, default=32000, help="short reading drills")
    parser.add_argument("--category-weight", type=float, default=CATEGORY_WEIGHT)
    parser.add_argument("--eval", type=int, default=40, help="generated examples to check")
    parser.add_argument("--eval-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    started = time.time()
    everyday = load_everyday()
    if not args.eval_only:
        train(args, everyday)
    minutes = None if args.eval_only else (time.time() - started) / 60
    figures = [evaluate_everyday(everyday, mode) for mode in (Mode.NO_THINK, Mode.THINK)]
    forms = evaluate_forms(args.eval, everyday)
    text = report(figures, forms, args, minutes)
    (OUT / "README.md").write_text(text)
    print(text)
    digest = hashlib.sha256((OUT / "model.safetensors").read_bytes()).hexdigest()
    print(f"model.safetensors sha256 {digest}")
    print(f"total {(time.time() - started) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
