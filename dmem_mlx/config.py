"""The δ-mem adapter configuration (DESIGN §4): what we implement, and what we refuse by name.

`delta_mem_config.json` written by the official code holds ~50 fields, most of them for archived
experiments. Every field is classified here: implemented, init-only (training from scratch), or
archived (must hold its default). An unknown field or an archived field with a non-default value
is refused with a `ConfigError` naming it — never silently ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError, brief, one_line
from .files import read_regular

CONFIG_NAME = "delta_mem_config.json"
DELTA_HEADS = ("q", "k", "v", "o")
UPDATE_MODES = ("standard", "lambda_outside", "no_lambda")
GRANULARITIES = ("token", "message_mean", "sentence_mean")
OUTPUT_INITS = ("zero", "random", "base_slice", "base_slice_fixed")
MAX_CONFIG_BYTES = 1 << 20
MAX_RANK = 1024
MAX_STATE_HEADS = 256
INT_FIELDS = ("rank", "num_state_heads", "base_slice_ref_width")
FLOAT_FIELDS = ("alpha", "delta_o_rmsnorm_eps", "delta_scale_max", "beta_bias_init",
                "online_gain", "delta_scale_init")
BOOL_FIELDS = ("normalize_qk", "couple_lambda", "rankwise_gates", "delta_o_rmsnorm",
               "trainable_delta_scale")
STR_FIELDS = ("state_update_mode", "memory_write_granularity", "delta_scale_granularity",
              "output_init")

# Archived options: they must hold exactly these values (DESIGN §4).
ARCHIVED_DEFAULTS: dict[str, Any] = {
    "num_memory_partitions": 1,
    "num_global_memory_partitions": 0,
    "memory_partition_routing": "soft",
    "memory_partition_basis": "shared",
    "tie_memory_partition_read_write": False,
    "memory_partition_read_mode": "softmax",
    "slot_read_top_k": 0,
    "global_memory_mode": "shared_rw",
    "global_memory_read_top_k": 0,
    "global_memory_merge_mode": "gated_residual",
    "memory_reader_layers": [],
    "memory_readout_mode": "delta",
    "memory_write_source": "learned_hidden",
    "memory_write_proposals_per_message": 2,
    "synthetic_memory_slots": 1,
    "latent_memory_layers": [],
    "delta_scale_parameterization": "alpha_over_rank",
}

# Settings of archived features that have no effect while those features are off.
INERT_FIELDS = (
    "memory_partition_sigmoid_gate_bias_init",
    "global_memory_gate_bias_init",
    "global_memory_read_logit_bias",
    "memory_reader_hidden_size",
    "memory_reader_residual_scale",
    "memory_reader_read_only",
    "latent_memory_hidden_size",
    "latent_memory_residual_scale",
    "latent_memory_slots",
    "latent_memory_init_std",
    "latent_gate_init",
)


@dataclass(frozen=True)
class DeltaMemConfig:
    # Implemented (DESIGN §1–2).
    rank: int = 8
    alpha: float = 16.0
    normalize_qk: bool = True
    couple_lambda: bool = True
    state_update_mode: str = "standard"
    rankwise_gates: bool = True
    num_state_heads: int = 1
    memory_write_granularity: str = "token"
    target_modules: tuple[str, ...] = ("self_attn",)
    target_layers: tuple[int, ...] = ()
    delta_heads: tuple[str, ...] = DELTA_HEADS
    delta_o_rmsnorm: bool = False
    delta_o_rmsnorm_eps: float = 1e-6
    trainable_delta_scale: bool = False
    delta_scale_max: float = 2.0
    delta_scale_granularity: str = "layer"
    # Init-only: they matter when training from scratch.
    beta_bias_init: float = -1.5
    output_init: str = "zero"
    base_slice_ref_width: int = 8
    online_gain: float = 0.05
    delta_scale_init: float = 1.0
    # Archived fields and inert settings as they were read, kept so a saved config round-trips.
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        _check_types(self)
        heads = self.delta_heads
        if isinstance(heads, str):
            heads = [h for h in heads.split(",")]
        heads = tuple(dict.fromkeys(h.strip().lower() for h in heads if h.strip()))
        if heads == ("none",):
            heads = ()
        if bad := [h for h in heads if h not in DELTA_HEADS]:
            raise ConfigError(f"delta_heads: unknown head(s) {brief(bad)}; expected a subset of "
                              "q,k,v,o")
        set_("delta_heads", heads)
        set_("target_modules", tuple(self.target_modules))
        set_("target_layers", tuple(self.target_layers))
        _check(1 <= self.rank <= MAX_RANK, f"rank must be in 1..{MAX_RANK}")
        _check(1 <= self.num_state_heads <= MAX_STATE_HEADS,
               f"num_state_heads must be in 1..{MAX_STATE_HEADS}")
        for name in FLOAT_FIELDS:
            _check(math.isfinite(getattr(self, name)), f"{name} must be finite")
        _check(self.state_update_mode in UPDATE_MODES,
               f"state_update_mode {self.state_update_mode!r} is not one of {UPDATE_MODES}")
        _check(self.memory_write_granularity in GRANULARITIES,
               f"memory_write_granularity {self.memory_write_granularity!r} is not one of "
               f"{GRANULARITIES}")
        _check(self.target_modules == ("self_attn",),
               f"target_modules {brief(list(self.target_modules))} is not supported (only "
               "['self_attn'])")
        _check(self.delta_scale_granularity in ("layer", "head"),
               f"delta_scale_granularity {self.delta_scale_granularity!r} is not 'layer' or 'head'")
        _check(self.delta_o_rmsnorm_eps > 0, "delta_o_rmsnorm_eps must be > 0")
        _check(self.delta_scale_max > 0, "delta_scale_max must be > 0")
        _check(self.output_init in OUTPUT_INITS,
               f"output_init {self.output_init!r} is not one of {OUTPUT_INITS}")

    # Derived sizes (DESIGN §1 notation).
    @property
    def state_dim(self) -> int:
        """R = r·H: width of the memory projections and of the concatenated reads."""
        return self.rank * self.num_state_heads

    @property
    def gate_dim(self) -> int:
        """G = R for rankwise gates, H otherwise."""
        return self.state_dim if self.rankwise_gates else self.num_state_heads

    @property
    def scaling(self) -> float:
        """α / r — uses `rank`, not R."""
        return self.alpha / self.rank

    def layer_indices(self, num_layers: int) -> list[int]:
        if not self.target_layers:
            return list(range(num_layers))
        if bad := [i for i in self.target_layers if not 0 <= i < num_layers]:
            raise ConfigError(f"target_layers {bad} out of range for a {num_layers}-layer model")
        return sorted(set(self.target_layers))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeltaMemConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        extra: dict[str, Any] = {}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in ARCHIVED_DEFAULTS:
                default = ARCHIVED_DEFAULTS[key]
                normalized = list(value) if isinstance(value, (list, tuple)) else value
                if normalized != default or isinstance(value, bool) != isinstance(default, bool):
                    raise ConfigError(
                        f"{key}={brief(value)} is an archived δ-mem option that is not "
                        f"implemented (only {default!r} is supported)")
                extra[key] = value
            elif key in INERT_FIELDS:
                extra[key] = value
            else:
                raise ConfigError(f"unknown δ-mem config field {brief(key)}")
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        extra = out.pop("extra")
        out.update({k: list(v) if isinstance(v, tuple) else v for k, v in out.items()})
        return {**ARCHIVED_DEFAULTS, **extra, **out}

    @classmethod
    def load(cls, directory: str | Path) -> "DeltaMemConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.exists():
            raise ConfigError(f"{path} not found")
        raw = read_regular(path, ConfigError, MAX_CONFIG_BYTES, "δ-mem config")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON: {one_line(exc)}") from None
        except RecursionError:
            raise ConfigError(f"{path} nests too deeply to be a δ-mem config") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def save(self, directory: str | Path) -> None:
        (Path(directory) / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _check_types(config: DeltaMemConfig) -> None:
    """Each field holds its type: ints are ints (not bools, floats or strings), bools are
    bools, floats are numbers, lists hold ints (target_layers) or strings."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def want(ok: bool, name: str, kind: str) -> None:
        if not ok:
            raise ConfigError(f"{name} must be {kind}, got {brief(getattr(config, name))}")

    for name in INT_FIELDS:
        want(is_int(getattr(config, name)), name, "an integer")
    for name in FLOAT_FIELDS:
        value = getattr(config, name)
        want(is_int(value) or isinstance(value, float), name, "a number")
    for name in BOOL_FIELDS:
        want(isinstance(getattr(config, name), bool), name, "true or false")
    for name in STR_FIELDS:
        want(isinstance(getattr(config, name), str), name, "a string")
    layers, modules, heads = config.target_layers, config.target_modules, config.delta_heads
    want(isinstance(layers, (list, tuple)) and all(is_int(i) for i in layers), "target_layers",
         "a list of layer indices")
    want(isinstance(modules, (list, tuple)) and all(isinstance(m, str) for m in modules),
         "target_modules", "a list of strings")
    want(isinstance(heads, str) or isinstance(heads, (list, tuple))
         and all(isinstance(h, str) for h in heads), "delta_heads",
         "a list of heads or a comma-separated string")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
