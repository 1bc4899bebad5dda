"""Write a memory file as a demo model would have: the fingerprint of a model directory, or of
an earlier build of it (another adapter hash), with empty states."""

from pathlib import Path
from typing import Optional

import numpy as np


def write_memory(path: Path, model_dir: Path, adapter_sha256: Optional[str] = None) -> bytes:
    """A memory of the model in `model_dir` (adapter_sha256: of another adapter on the same
    backbone, as an earlier demo model) at `path`; returns its bytes."""
    from dmem_mlx.runtime import fingerprint_from_files
    from dmem_mlx.runtime.memory_file import MemoryData, encode

    fingerprint = fingerprint_from_files(model_dir)
    assert fingerprint is not None
    if adapter_sha256 is not None:
        fingerprint = {**fingerprint, "adapter_sha256": adapter_sha256}
    config = fingerprint["delta_config"]
    shape = (config["num_state_heads"], config["rank"], config["rank"])
    data = MemoryData(states={i: np.zeros(shape, np.float32) for i in config["layers"]},
                      fingerprint=fingerprint, tokens_written=12, turns=1,
                      transcript=[{"role": "user", "content": "My name is Ada."},
                                  {"role": "assistant", "content": "Hi Ada!"}])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(data))
    return path.read_bytes()
