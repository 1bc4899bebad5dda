"""The offline demo model shipped inside the package (no network needed).

A small domain model, not a general assistant: a ~3.7M-parameter Qwen3-architecture backbone
trained from scratch on synthetic chats in which people tell the assistant about themselves
(name, city, job, pet, travel plans, favourite food, hobby) and ask about it later, plus a δ-mem
adapter trained so that those facts are recalled from the δ memory alone. The model shipped now
(v4) is the whole build of `tools/build_demo.py` (domain: `dmem_mlx/demo/persona.py`), all six
δ stages; the script's docstring records each stage and how to rebuild it.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "model"
DEMO_NAME = "dmem-demo"
# dmem-chat's first words on a new memory with the demo: what this small model can remember.
DEMO_GREETING = ("I am a small demo model. Tell me your name, where you live, your job, your pet "
                 "and its name, your travel plans, your favourite food or your hobby, and I will "
                 "remember them next time.")


def demo_model_path() -> Path:
    """Directory of the shipped demo model (loadable with `dmem_mlx.load`)."""
    if not (DEMO_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo model is missing from {DEMO_DIR}; regenerate it with "
            "tools/build_demo.py (see its docstring)")
    return DEMO_DIR


def load_demo():
    """(model, tokenizer) of the demo model, δ memory empty."""
    from ..utils import load

    return load(str(demo_model_path()))
