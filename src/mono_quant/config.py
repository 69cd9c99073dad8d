"""``QuantConfig``: one frozen object that describes how a model is quantized, plus presets."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from mono_quant.core.observers import OBSERVERS
from mono_quant.core.spec import MAX_BITS, MIN_BITS, QuantSpec

DEFAULT_GROUP_SIZE = 32
FLOAT_DTYPES = ("float16", "bfloat16")
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "per_group")
ACTIVATIONS = ("static", "dynamic")
ACTIVATION_GRANULARITIES = ("per_tensor", "per_token")

PRESETS: dict[str, dict[str, Any]] = {
    "w8a8": {"bits": 8, "activations": "static", "granularity": "per_channel"},
    "w8a8-dynamic": {"bits": 8, "activations": "dynamic", "granularity": "per_channel"},
    "w8": {"bits": 8, "activations": None, "granularity": "per_channel"},
    "w4": {"bits": 4, "activations": None, "granularity": "per_group"},
    "fp16": {"bits": 16, "dtype": "float16", "activations": None},
    "bf16": {"bits": 16, "dtype": "bfloat16", "activations": None},
}


def _check_patterns(
    field: str, patterns: Any, kind: str = "name globs or class names"
) -> tuple[str, ...] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = (patterns,)
    patterns = tuple(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(
                f"{field} must be a list of non-empty strings ({kind}), got {pattern!r} in it."
            )
    return patterns


# Fields an override may change for the layers it matches; selection fields stay model-wide.
OVERRIDE_FIELDS = (
    "bits",
    "activations",
    "activation_granularity",
    "granularity",
    "group_size",
    "symmetric",
    "observer",
    "weight_observer",
    "dtype",
)
# Written as the value of an override to keep the matched layers in float.
FLOAT_OVERRIDE = "float"

Overrides = tuple[tuple[str, tuple[tuple[str, Any], ...] | None], ...]


def _check_overrides(overrides: Any) -> Overrides | None:
    """Return ``overrides`` as a hashable tuple of ``(pattern, changes or None)`` pairs."""
    if overrides is None:
        return None
    if isinstance(overrides, tuple) and all(isinstance(item, tuple) for item in overrides):
        overrides = {pattern: changes for pattern, changes in overrides}
    if not isinstance(overrides, Mapping):
        raise TypeError(
            "overrides must map layer name globs or class names to field changes, such as "
            f"{{'features.0': {{'bits': 8}}, 'classifier': None}}; got {type(overrides).__name__}."
        )
    normalized = []
    for pattern, changes in overrides.items():
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"overrides keys must be non-empty strings, got {pattern!r}.")
        if changes is None or changes == FLOAT_OVERRIDE:
            normalized.append((pattern, None))
            continue
        if isinstance(changes, tuple):
            changes = dict(changes)
        if not isinstance(changes, Mapping):
            raise TypeError(
                f"overrides[{pattern!r}] must be a mapping of field changes such as "
                f"{{'bits': 8}}, or None (or {FLOAT_OVERRIDE!r}) to keep the layers in float; "
                f"got {changes!r}."
            )
        unknown = sorted(set(changes) - set(OVERRIDE_FIELDS))
        if unknown:
            raise ValueError(
                f"overrides[{pattern!r}] changes {unknown}, which cannot vary by layer; use "
                f"fields from {list(OVERRIDE_FIELDS)}."
            )
        normalized.append((pattern, tuple(changes.items())))
    return tuple(normalized)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model. Field names match ``QuantizeCallback``'s arguments.

    ``"auto"`` values are resolved from ``bits`` when the config is built. 8 bits gives int8
    per-channel weights with static int8 activations (W8A8). Fewer bits give weight-only
    per-group weights with ``group_size`` 32, and 16 bits gives a float16 cast.

    Args:
        bits: weight width: 2 to 8 for integers, 16 for a float16/bfloat16 cast.
        activations: ``"static"`` (calibrated int8), ``"dynamic"`` (int8 computed at run
            time, see ``activation_granularity``), ``None`` (weight-only) or ``"auto"``.
        activation_granularity: qparams of dynamic activations of Linear layers:
            ``"per_token"`` (one pair per row on the 8-bit grid, accurate on transformers
            whose outlier tokens would stretch a shared range; the fbgemm int8 kernel serves
            it on CPUs with VNNI), ``"per_tensor"`` (one pair per call on the 7-bit grid
            [0, 127], where the fbgemm kernel cannot saturate on any x86 CPU, so it is fast on
            AVX2 CPUs without VNNI too) or ``"auto"`` (``"per_token"``). Convolutions always use
            one 8-bit pair per tensor, and LSTM/GRU and attention layers one per token. Other
            activation modes ignore it.
        granularity: weight granularity: ``"per_tensor"``, ``"per_channel"`` (output channels),
            ``"per_group"`` or ``"auto"``.
        group_size: weights per group for ``"per_group"``. A row whose length is not a multiple
            of it gets a shorter last group.
        symmetric: symmetric weights (zero_point 0) or affine. Activations are always affine.
        observer: how static activation ranges are recorded during calibration: ``"minmax"``,
            ``"moving_average"``, ``"percentile"`` or ``"mse"``.
        weight_observer: how weight ranges are chosen, from the same names. ``"mse"`` searches
            each block's clipping range for the lowest weight MSE, which helps most at 4 bits
            or fewer. NOTE: ``MSEObserver(importance=...)``, which weights the error by input
            activations, is not reachable from the config.
        dtype: ``"int"``, ``"float16"``, ``"bfloat16"`` or ``"auto"`` (``int`` unless bits is 16).
        include: quantize only layers whose qualified name matches one of these globs or whose
            class name equals one of them; ``None`` selects every supported layer.
        exclude: leave in float the layers that match one of these globs or class names.
        parameters: qualified parameter names or globs (``"block.proj_weight"``,
            ``"blocks.*.table"``) of modules without a quantized counterpart, to store as
            integer codes (or 16-bit copies) weight-only. The module's own ``forward`` keeps
            working because reading the attribute returns the dequantized tensor.
        overrides: per-layer changes, ``{pattern: {field: value}}``, where a pattern is a
            qualified-name glob or class name as in ``include``. The first matching pattern
            wins. Its fields replace this config's for the matched layers; the fields it does
            not name keep this config's resolved values, except that a new ``granularity``
            resets ``group_size`` and ``bits=16`` switches to a float16 cast. ``None`` (or
            ``"float"``) keeps the matched layers in float. Example: ``{"features.0": {"bits":
            8, "granularity": "per_channel"}, "classifier": None}``.
    """

    bits: int = 8
    activations: Literal["auto", "static", "dynamic"] | None = "auto"
    activation_granularity: Literal["auto", "per_tensor", "per_token"] = "auto"
    granularity: Literal["auto", "per_tensor", "per_channel", "per_group"] = "auto"
    group_size: int | None = None
    symmetric: bool = True
    observer: str = "minmax"
    weight_observer: str = "minmax"
    dtype: Literal["auto", "int", "float16", "bfloat16"] = "auto"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    parameters: tuple[str, ...] | None = None
    overrides: Overrides | None = None

    def __post_init__(self) -> None:
        self._set("include", _check_patterns("include", self.include))
        self._set("exclude", _check_patterns("exclude", self.exclude))
        parameters = _check_patterns("parameters", self.parameters, "parameter name globs")
        self._set("parameters", parameters)
        self._resolve_dtype()
        self._resolve_activations()
        self._resolve_activation_granularity()
        self._resolve_granularity()
        for field in ("observer", "weight_observer"):
            if getattr(self, field) not in OBSERVERS:
                raise ValueError(
                    f"{field}={getattr(self, field)!r} is not a known observer; use one of "
                    f"{sorted(OBSERVERS)}."
                )
        self._set("overrides", _check_overrides(self.overrides))
        for pattern, changes in self.overrides or ():
            if changes is not None:
                try:
                    self._apply_override(dict(changes))
                except (TypeError, ValueError) as error:
                    raise type(error)(f"overrides[{pattern!r}]: {error}") from None

    def _set(self, field: str, value: Any) -> None:
        object.__setattr__(self, field, value)

    def _resolve_dtype(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"bits must be an int, got {self.bits!r}.")
        if self.dtype == "auto":
            self._set("dtype", "float16" if self.bits == 16 else "int")
        if self.dtype not in ("int", *FLOAT_DTYPES):
            raise ValueError(
                f"dtype={self.dtype!r} is not one of 'int', 'float16', 'bfloat16' or 'auto'."
            )
        if self.dtype == "int" and not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(
                f"bits={self.bits} is not supported; use {MIN_BITS} to {MAX_BITS} for integer "
                "weights or 16 for a float16/bfloat16 cast."
            )
        if self.dtype in FLOAT_DTYPES and self.bits != 16:
            raise ValueError(f"dtype={self.dtype!r} stores 16-bit weights; set bits=16.")

    def _resolve_activations(self) -> None:
        if self.activations == "auto":
            self._set("activations", "static" if self.bits == 8 and self.is_integer else None)
        if self.activations is not None and self.activations not in ACTIVATIONS:
            raise ValueError(
                f"activations={self.activations!r} is not one of 'static', 'dynamic', None or "
                "'auto'."
            )
        if self.activations is not None and not self.is_integer:
            raise ValueError(
                f"activations={self.activations!r} needs integer weights, but dtype is "
                f"{self.dtype!r}; use activations=None with a float cast."
            )

    def _resolve_activation_granularity(self) -> None:
        if self.activation_granularity == "auto":
            self._set("activation_granularity", "per_token")
        if self.activation_granularity not in ACTIVATION_GRANULARITIES:
            raise ValueError(
                f"activation_granularity={self.activation_granularity!r} is not one of "
                f"{ACTIVATION_GRANULARITIES} or 'auto'; it sets the qparams of dynamic "
                "activations."
            )

    def _resolve_granularity(self) -> None:
        if self.granularity == "auto":
            per_group = self.is_integer and self.bits < 8
            self._set("granularity", "per_group" if per_group else "per_channel")
        if self.granularity not in WEIGHT_GRANULARITIES:
            hint = (
                " (per_token applies to dynamic activations only: set "
                "activation_granularity='per_token')"
                if self.granularity == "per_token"
                else ""
            )
            raise ValueError(
                f"granularity={self.granularity!r} is not a weight granularity{hint}; use one of "
                f"{WEIGHT_GRANULARITIES} or 'auto' (spelled with underscores)."
            )
        if self.granularity == "per_group" and self.group_size is None:
            self._set("group_size", DEFAULT_GROUP_SIZE)
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
                raise TypeError(f"group_size must be an int, got {self.group_size!r}.")
            # jsonargparse passes int subclasses such as PositiveInt; a plain int keeps the
            # config loadable with torch.load(weights_only=True) when it is saved.
            self._set("group_size", int(self.group_size))
            if self.group_size <= 0:
                raise ValueError(
                    f"group_size={self.group_size} must be positive; typical values are 32, 64 "
                    "or 128."
                )
            if self.granularity != "per_group":
                raise ValueError(
                    f"group_size={self.group_size} is only used with granularity='per_group', not "
                    f"{self.granularity!r}; drop it or set granularity='per_group'."
                )

    @property
    def is_integer(self) -> bool:
        """True for integer weights, False for a float16/bfloat16 cast."""
        return self.dtype == "int"

    @property
    def needs_calibration(self) -> bool:
        """True when static activation ranges must be recorded from data."""
        return self.activations == "static"

    def weight_spec(self) -> QuantSpec:
        """Return the spec of the weights, with channels along axis 0 (output channels)."""
        return QuantSpec(
            bits=self.bits,
            symmetric=self.symmetric,
            granularity=self.granularity,  # type: ignore[arg-type]
            axis=0,
            group_size=self.group_size if self.granularity == "per_group" else None,
        )

    @property
    def label(self) -> str:
        """Short description such as ``"w8a8 static, per_channel"``."""
        if not self.is_integer:
            return self.dtype
        activations = f"a8 {self.activations}" if self.activations else " weight-only"
        group = f" {self.group_size}" if self.granularity == "per_group" else ""
        return f"w{self.bits}{activations}, {self.granularity}{group}"

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as plain Python values (tuples as lists), for logs and files."""
        values = asdict(self)
        for field in ("include", "exclude", "parameters"):
            if values[field] is not None:
                values[field] = list(values[field])
        if self.overrides is not None:
            values["overrides"] = {
                pattern: None if changes is None else dict(changes)
                for pattern, changes in self.overrides
            }
        return values

    def _apply_override(self, changes: dict[str, Any]) -> QuantConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name in OVERRIDE_FIELDS}
        if "granularity" in changes and "group_size" not in changes:
            values["group_size"] = None
        if changes.get("bits") == 16 and "dtype" not in changes:
            values.update(dtype="auto", activations=None, granularity="auto", group_size=None)
        elif "bits" in changes and not self.is_integer and "dtype" not in changes:
            values.update(dtype="auto", activations="auto", granularity="auto", group_size=None)
        return QuantConfig(**{**values, **changes})

    def for_layer(self, name: str, module: Any = None) -> QuantConfig | None:
        """Return the config of one layer after ``overrides``; ``None`` keeps it in float.

        ``module`` lets a pattern match the layer's class name as well as its qualified name.
        The returned config has no ``include``, ``exclude``, ``parameters`` or ``overrides``.
        """
        for pattern, changes in self.overrides or ():
            by_type = module is not None and type(module).__name__ == pattern
            if fnmatch.fnmatchcase(name, pattern) or by_type:
                return None if changes is None else self._apply_override(dict(changes))
        return self._apply_override({}) if self.overrides else self

    @property
    def calibrates_any_layer(self) -> bool:
        """True when this config or one of its overrides uses static activations."""
        return self.needs_calibration or any(
            changes is not None and self._apply_override(dict(changes)).needs_calibration
            for _, changes in self.overrides or ()
        )

    def replace(self, **changes: Any) -> QuantConfig:
        """Return a copy with ``changes`` applied and validated."""
        return replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> QuantConfig:
        """Build the config of a preset name (see ``PRESETS``), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; use one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


def resolve_config(config: QuantConfig | str | None) -> QuantConfig:
    """Return ``config`` as a ``QuantConfig``: a preset name is looked up, ``None`` means W8A8."""
    if config is None:
        return QuantConfig()
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        return QuantConfig.from_preset(config)
    raise TypeError(
        f"config must be a QuantConfig or a preset name {sorted(PRESETS)}, got "
        f"{type(config).__name__}."
    )
