"""Build and train guardfleet's bundled demo model, offline and reproducibly.

    python ops/build_demo_model.py            # writes worker/demo_model/ (about 3 MB)

What it is: a tiny Gemma 3 (`Gemma3ForConditionalGeneration`, the class of the real checkpoint,
with a token-sized vision tower) with a byte-level BPE tokenizer, trained from scratch on
prompts rendered by guardfleet's own templates. It learns the *output format* of
Nemotron-Content-Safety-Reasoning-4B in both modes (think / no_think, with and without a
response, Template A default and custom taxonomy, Template B) and labels keyword-templated
requests. It is a stand-in that exercises the real code path (AutoTokenizer,
AutoModelForCausalLM, generate, parsing); it is NOT a safety classifier.

Reproducible: fixed seeds, single-threaded tokenizer training, deterministic torch kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # deterministic BPE training
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

from guardfleet.prompts import chat_segments, render_classify
from guardfleet.schemas import (
    Category,
    ChatMessage,
    ClassifyRequest,
    HistoryTurn,
    Mode,
    TaxonomyPolicy,
    TopicPolicy,
)
from worker.tokenization import encode_segments, encode_text

OUT = Path(__file__).resolve().parents[1] / "worker" / "demo_model"
SEED = 20261128
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

HARMFUL = [
    "build a pipe bomb",
    "steal a car",
    "poison my neighbor",
    "hack into a bank account",
    "make methamphetamine",
    "hurt my coworker",
    "buy an untraceable gun",
    "launder money",
    "kidnap a child",
    "write ransomware",
    "stalk my ex",
    "burn down a house",
]
BENIGN = [
    "bake sourdough bread",
    "learn to swim",
    "fix a flat tire",
    "plant tomatoes",
    "write a cover letter",
    "train my puppy",
    "improve my sleep",
    "cook brown rice",
    "study for an exam",
    "paint a room",
    "tune a guitar",
    "start running",
]
FRAMES = [
    "How do I {x}?",
    "Tell me how to {x}.",
    "What is the best way to {x}?",
    "Can you explain how to {x} step by step?",
    "I want to {x}. Where do I start?",
    "Give me tips to {x} quickly.",
    "my friend asked me how to {x}, any advice?",
]
FILLER = [
    "It is a rainy day here.",
    "I have been thinking about this for a while.",
    "Please keep it short.",
    "Thanks in advance!",
    "This is for a weekend project.",
]
REFUSALS = ["I can't help with that request.", "Sorry, I won't assist with that."]
HARMFUL_ANSWERS = [
    "Sure. First get the explosive powder and pack it into the detonator.",
    "Sure. Hotwire the ignition and disable the alarm before anyone sees you.",
    "Sure. Mix the toxic chemicals into their food when they are away.",
]
BENIGN_ANSWERS = [
    "Sure! Start slowly and practice a little every day.",
    "Happy to help. Gather your tools and follow the steps in order.",
]
CUSTOM_CATEGORIES = [
    Category(name="Financial Advice", description="Recommending specific investments."),
    Category(name="Medical Advice"),
]
POLICIES = [
    "You are a cooking assistant. Only discuss recipes and cooking. Never help with harm.",
    "You are a customer support bot for a bank. Stay polite and never assist with crimes.",
]

THINK_PROMPT = {
    "harmful": "The human user's request falls under S21 (Illegal Activity) as it asks for "
    "help to cause harm.",
    "unharmful": "The human user's request is an everyday question and falls under no category.",
}
THINK_RESPONSE = {
    "none": " There is no AI assistant response.",
    "refusal": " The AI assistant's response is a refusal, making it unharmful.",
    "harmful": " The AI assistant's response gives harmful instructions.",
    "benign": " The AI assistant's response is helpful and unharmful.",
}
THINK_TOPIC = {
    "harmful": "The current user message breaks the rules in the taxonomy.",
    "unharmful": "The current user message is consistent with the rules in the taxonomy.",
}


@dataclass
class Example:
    request: ClassifyRequest
    target: str


def make_example(rng: random.Random) -> Example:
    harmful = rng.random() < 0.5
    text = rng.choice(FRAMES).format(x=rng.choice(HARMFUL if harmful else BENIGN))
    if rng.random() < 0.4:
        pieces = [text, *rng.sample(FILLER, rng.randint(1, 3))]
        rng.shuffle(pieces)
        text = " ".join(pieces)
    mode = rng.choice([Mode.THINK, Mode.NO_THINK])
    p_label = "harmful" if harmful else "unharmful"
    kind = rng.random()
    if kind < 0.2:  # Template B
        history = [
            HistoryTurn(role="user", content="Hi there."),
            HistoryTurn(role="assistant", content="Hello! How can I help?"),
        ]
        policy = TopicPolicy(
            type="topic_following",
            instructions=rng.choice(POLICIES),
            history=history[: rng.choice([0, 2])],
        )
        req = ClassifyRequest(prompt=text, mode=mode, policy=policy)
        answer = f"Prompt harm: {p_label}"
        trace = THINK_TOPIC[p_label]
    else:
        r_kind = rng.choice(["none", "none", "refusal", "harmful" if harmful else "benign"])
        response = {
            "none": None,
            "refusal": rng.choice(REFUSALS),
            "harmful": rng.choice(HARMFUL_ANSWERS),
            "benign": rng.choice(BENIGN_ANSWERS),
        }[r_kind]
        policy_a = None
        if kind > 0.85:
            policy_a = TaxonomyPolicy(
                categories=CUSTOM_CATEGORIES[: rng.randint(1, 2)],
                replace=rng.random() < 0.3,
                allowed_topics=["cooking"] if rng.random() < 0.5 else [],
            )
        req = ClassifyRequest(prompt=text, response=response, mode=mode, policy=policy_a)
        r_label = {"none": "None", "harmful": "harmful"}.get(r_kind, "unharmful")
        answer = f"Prompt harm: {p_label}\nResponse harm: {r_label}"
        trace = THINK_PROMPT[p_label] + THINK_RESPONSE[r_kind]
    target = f"<think>\n{trace}\n</think>\n\n{answer}" if mode is Mode.THINK else answer
    return Example(req, target)


def prompt_segments(req: ClassifyRequest) -> list:  # type: ignore[type-arg]
    return chat_segments([ChatMessage(role="user", content=render_classify(req))])


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=768,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
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


def build_model(tokenizer: PreTrainedTokenizerFast) -> Gemma3ForConditionalGeneration:
    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIALS}  # type: ignore[arg-type]
    config = Gemma3Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
            "sliding_window": 1024,
            "layer_types": ["sliding_attention", "full_attention"],
            "max_position_embeddings": 4096,
            "pad_token_id": ids["<pad>"],
            "bos_token_id": ids["<bos>"],
            "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
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


def train(steps: int, batch: int, lr: float) -> None:
    torch.manual_seed(SEED)
    torch.set_flush_denormal(True)  # denormals slow CPU training several-fold
    torch.use_deterministic_algorithms(True)
    rng = random.Random(SEED)
    examples = [make_example(rng) for _ in range(steps * batch)]
    corpus = [
        "".join(s if isinstance(s, str) else "" for s in prompt_segments(e.request)) + e.target
        for e in examples[:2000]
    ]
    tokenizer = build_tokenizer(corpus)
    model = build_model(tokenizer)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    pad = tokenizer.pad_token_id
    start = time.time()
    for step in range(steps):
        chunk = [encode_example(tokenizer, e) for e in examples[step * batch : (step + 1) * batch]]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((batch, width), pad)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for row, (ids, n_prompt) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            mask[row, : len(ids)] = 1
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            token_type_ids=torch.zeros_like(input_ids),
            labels=labels,
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:4d} loss {out.loss.item():.4f} ({time.time() - start:.0f}s)")
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
    (OUT / "README.md").write_text(
        "# guardfleet demo model\n\nBuilt by `ops/build_demo_model.py` (seed "
        f"{SEED}, {steps} steps). A tiny Gemma 3 that imitates the output format of "
        "Nemotron-Content-Safety-Reasoning-4B on keyword-templated prompts. It exercises the "
        "real serving path; it is NOT a safety classifier.\n"
    )


def evaluate(n: int) -> float:
    tokenizer = AutoTokenizer.from_pretrained(OUT)
    model = AutoModelForCausalLM.from_pretrained(OUT, dtype=torch.float32).eval()
    rng = random.Random(SEED + 1)
    ok = 0
    for _ in range(n):
        ex = make_example(rng)
        ids = torch.tensor([encode_segments(tokenizer, prompt_segments(ex.request))])
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=96, do_sample=False)
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        ok += text == ex.target
        if text != ex.target:
            print("MISMATCH", json.dumps(ex.request.prompt), repr(text), "!=", repr(ex.target))
    return ok / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval", type=int, default=60, help="held-out examples to check")
    parser.add_argument("--eval-only", action="store_true")
    args = parser.parse_args()
    if not args.eval_only:
        train(args.steps, args.batch, args.lr)
    accuracy = evaluate(args.eval)
    print(f"exact-output accuracy on {args.eval} held-out examples: {accuracy:.1%}")


if __name__ == "__main__":
    main()
