"""A small random Gemma 3 (the benchmark's, with the real layer pattern) and the demo tokenizer:
for tests that need a model of the real architecture, or one that never stops on its own
(random weights almost never pick a stop token)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, Gemma3ForCausalLM

from ops.bench_engine import small_gemma3_config
from worker.engine import DEMO_MODEL_DIR


def random_gemma3(path: Path, window: int = 8) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    config = small_gemma3_config(len(tokenizer), window)
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
