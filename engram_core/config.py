"""EngramConfig: the shape of an Engram memory and the seeds of its addressing.

Everything that decides which row a token sequence addresses lives here, so the config is part
of the model fingerprint: a delta compiled under one config is meaningless under another.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


FAMILIES = ("llama", "qwen2", "gpt2")
"""Model families the tiny builder makes (transformers' model_type: Llama, Qwen2, GPT-2)."""


class ConfigError(ValueError):
    """A config that is invalid or does not fit the model it is attached to."""


@dataclass(frozen=True)
class EngramConfig:
    layers: tuple[int, ...] = (1, 3)
    """Decoder layers whose input receives an Engram lookup."""
    write_layer: int | None = None
    """Layer that users' facts are written to (default: the last of ``layers``)."""
    max_ngram: int = 3
    """Suffix N-grams of orders 2..max_ngram are hashed."""
    heads_per_order: int = 8
    """Hash heads per N-gram order; each head addresses its own sub-table."""
    row_width: int = 32
    """Values per row (per head)."""
    slots_per_head: int = 100_003
    """Target size of each head's sub-table; each head gets a distinct prime at or above it."""
    seed: int = 0
    """Seeds the hash multipliers."""
    short_conv: bool = True
    """Depthwise causal conv branch over the gated value (zero-initialised)."""
    conv_kernel: int = 4
    soften_gate: bool = True
    """Apply sign(g)*sqrt(|g|) to the gate logit before the sigmoid (as in the Engram demo)."""
    schema_version: int = field(default=1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if not self.layers:
            raise ConfigError("engram config: field 'layers' must name at least one decoder layer")
        if len(set(self.layers)) != len(self.layers) or any(x < 0 for x in self.layers):
            raise ConfigError(f"engram config: field 'layers' must be distinct non-negative ints, got {self.layers}")
        if self.write_layer is not None and self.write_layer not in self.layers:
            raise ConfigError(
                f"engram config: field 'write_layer' = {self.write_layer} is not one of layers {self.layers}"
            )
        checks = {
            "max_ngram": self.max_ngram >= 2,
            "heads_per_order": self.heads_per_order >= 1,
            "row_width": self.row_width >= 1,
            "slots_per_head": self.slots_per_head >= 3,
            "conv_kernel": self.conv_kernel >= 1,
            "seed": self.seed >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"engram config: field '{name}' has an invalid value {getattr(self, name)!r}")
        if self.schema_version != 1:
            raise ConfigError(f"engram config: schema_version {self.schema_version} is not supported (expected 1)")

    @property
    def target_layer(self) -> int:
        """The layer facts are written to."""
        return self.write_layer if self.write_layer is not None else self.layers[-1]

    @property
    def orders(self) -> tuple[int, ...]:
        return tuple(range(2, self.max_ngram + 1))

    @property
    def heads_per_layer(self) -> int:
        """Rows addressed at one position of one layer (orders x heads)."""
        return len(self.orders) * self.heads_per_order

    @property
    def engram_dim(self) -> int:
        """Width of the concatenated addressed rows at one position."""
        return self.heads_per_layer * self.row_width

    def check_fits(self, num_decoder_layers: int) -> None:
        bad = [x for x in self.layers if x >= num_decoder_layers]
        if bad:
            raise ConfigError(
                f"engram config: layers {bad} out of range for a model with {num_decoder_layers} decoder layers "
                f"(valid: 0..{num_decoder_layers - 1})"
            )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layers"] = list(self.layers)
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "EngramConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"engram config: unknown field(s) {unknown}; known fields: {sorted(known)}")
        kwargs = dict(raw)
        if "layers" in kwargs:
            if not isinstance(kwargs["layers"], (list, tuple)) or not all(
                    isinstance(x, int) and not isinstance(x, bool) for x in kwargs["layers"]):
                raise ConfigError(f"engram config: field 'layers' must be a list of ints, got {kwargs['layers']!r}")
            kwargs["layers"] = tuple(kwargs["layers"])
        write_layer = kwargs.get("write_layer")
        if write_layer is not None and (not isinstance(write_layer, int) or isinstance(write_layer, bool)):
            raise ConfigError(f"engram config: field 'write_layer' must be an int, got {write_layer!r}")
        for f in fields(cls):
            value = kwargs.get(f.name)
            if f.name in ("layers", "write_layer") or value is None:
                continue
            expected = bool if f.type == "bool" else int
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(f"engram config: field '{f.name}' must be {expected.__name__}, got {value!r}")
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "EngramConfig":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"engram config {path}: file not found") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"engram config {path}: not UTF-8 JSON (byte {exc.object[exc.start]:#04x} at offset "
                              f"{exc.start})") from None
        except OSError as exc:  # a directory, or a folder above it that is a file
            raise ConfigError(f"engram config {path}: cannot read it ({exc.strerror or exc})") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"engram config {path}: not valid JSON ({exc})") from None
        return cls.from_dict(raw)
