"""The bundled demo model as the images copy it: they run as an unprivileged user, so every
file of it must be readable by others (a rebuilt model once had its weights at 0600, and the CPU
worker image built from that checkout could not load them)."""

from __future__ import annotations

import stat
from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parents[2] / "worker" / "demo_model"


def test_every_demo_model_file_is_readable_by_others() -> None:
    files = sorted(DEMO_MODEL.iterdir())
    assert {f.name for f in files} >= {"config.json", "model.safetensors", "tokenizer.json"}
    unreadable = [f.name for f in files if not f.stat().st_mode & stat.S_IROTH]
    assert not unreadable, f"not readable by others (the images' user): {unreadable}"
