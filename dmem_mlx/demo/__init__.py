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
DEMO_NAME = "dmem-demo"  # the model's name: dmem-chat's header, dmem-serve's `model`
# The shipped model's version and the sha256 of the files that decide what its memory means.
# Each version has its own default memory (demo/memory.py): a new model starts on a new memory
# instead of refusing the last one's. Shipping a model changes both: tests/test_demo_memory.py
# checks the hashes against the files and, when they differ, prints what to write here.
DEMO_VERSION = 4
DEMO_SHA256 = {
    "config.json": "632384d90712db48cd3cad64025146632b0e65f4f6219e11f140e11bed1c1d1c",
    "delta_mem_config.json": "26e6fb0d06de20ade16cff78986324ba9826136a1d5b4657c9916187039df63a",
    "delta_mem.safetensors": "39750fb71251deba0d3817f6b198312e0b7d80743ba901538d54fe0b5e36b0b2",
    "model.safetensors": "adff559bbfb3e0e637b2acea395cc98d2877efbf30ca82cc784c856e18fd10cb",
}
DEMO_MEMORY = f"{DEMO_NAME}-v{DEMO_VERSION}"  # its default memory's name (.safetensors, or dir)
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
