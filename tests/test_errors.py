"""One family of errors: every user-caused error is a DmemError, one class per fault."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import app.commands
import app.main
import convert.adapter
import convert.convert
import convert.torch_pickle
import dmem_mlx.config
import dmem_mlx.hub
import dmem_mlx.runtime
import dmem_mlx.train
import dmem_mlx.training.data
from dmem_mlx import errors
from dmem_mlx.errors import AdapterError, DmemError
from dmem_mlx.model import delta_parameters, load_delta_parameters
from dmem_mlx.tiny import build_model, tiny_args

ROOT = Path(__file__).resolve().parents[1]


def make_tiny_model():
    return build_model(tiny_args())

# Every error class a user can cause, where callers import it from (unchanged places).
PUBLISHED = [
    (dmem_mlx.config, "ConfigError"), (dmem_mlx.hub, "HubError"),
    (dmem_mlx.runtime, "MemoryFileError"), (dmem_mlx.runtime, "MemoryLockedError"),
    (dmem_mlx.runtime, "MemoryNotWritableError"),
    (dmem_mlx.runtime, "ContextTooLongError"), (dmem_mlx.runtime, "SessionBusyError"),
    (dmem_mlx.training.data, "DataError"), (dmem_mlx.train, "TrainError"),
    (convert.adapter, "AdapterError"), (convert.convert, "ConvertError"),
    (convert.torch_pickle, "CheckpointError"), (convert.torch_pickle, "UnsafeCheckpointError"),
    (convert.torch_pickle, "CorruptCheckpointError"),
    (convert.torch_pickle, "UnsupportedCheckpointError"),
    (app.main, "UsageError"), (app.commands, "CommandError"),
]


@pytest.mark.parametrize("module,name", PUBLISHED, ids=[n for _, n in PUBLISHED])
def test_every_error_sits_under_dmem_error_where_it_always_was(module, name):
    cls = getattr(module, name)
    assert issubclass(cls, DmemError)
    assert cls is getattr(errors, name)  # one definition, re-exported


def test_errors_module_does_not_load_mlx():
    code = ("import sys, dmem_mlx.errors, dmem_mlx.config, dmem_mlx.runtime.memory_file; "
            "print(any(m.startswith('mlx') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_a_missing_tensor_is_the_same_error_in_the_converter_and_the_loader():
    from dmem_mlx.config import DeltaMemConfig
    from dmem_mlx.model import attach_delta_mem

    config = DeltaMemConfig(delta_heads=("q", "v"))
    skeleton = make_tiny_model()
    model = make_tiny_model()
    attach_delta_mem(model, config)
    weights = delta_parameters(model)
    key = sorted(weights)[0]
    del weights[key]
    with pytest.raises(AdapterError, match="missing 1 tensor") as from_loader:
        load_delta_parameters(model, weights)
    shapes = convert.adapter.expected_shapes(config, skeleton)
    official = {k: mx.zeros(s) for k, s in shapes.items() if k != key}
    with pytest.raises(AdapterError, match="missing 1 tensor") as from_converter:
        convert.adapter.validate_adapter(official, config, skeleton)
    assert type(from_loader.value) is type(from_converter.value)


def test_nan_weights_are_the_same_error_in_the_converter_and_the_loader(tmp_path):
    from dmem_mlx.adapter import read_adapter, save_adapter
    from dmem_mlx.config import DeltaMemConfig
    from dmem_mlx.model import attach_delta_mem

    config = DeltaMemConfig(delta_heads=("q",))
    model = make_tiny_model()
    attach_delta_mem(model, config)
    key = sorted(delta_parameters(model))[0]
    layer = model.delta_mem.layers[int(key.split(".")[2])]
    layer.memory.update({key.rsplit(".", 1)[1]: mx.full(delta_parameters(model)[key].shape,
                                                           float("nan"))})
    save_adapter(model, tmp_path)
    with pytest.raises(AdapterError, match="NaN"):
        read_adapter(tmp_path)
    skeleton = make_tiny_model()
    shapes = convert.adapter.expected_shapes(config, skeleton)
    official = {k: mx.full(s, float("nan")) for k, s in shapes.items()}
    with pytest.raises(AdapterError, match="NaN"):
        convert.adapter.validate_adapter(official, config, skeleton)
