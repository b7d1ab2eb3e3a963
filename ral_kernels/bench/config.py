"""Problem shapes, sweeps and presets of the benchmark.

A :class:`Shape` is one problem: ``q [B, Hq, T, D]``, ``k, v [B, Hk, T, D]``, the old
policy's queries for the last ``R`` rows (the divergence rows) and its keys, one
divergence and head reduction, one dtype, causal. A :class:`Preset` is a base shape,
sweep axes (a cartesian product) and optional one-at-a-time variants; the command line
overrides any axis.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Sequence

from .._semantics import DIVERGENCES, HEAD_REDUCTIONS

MODES = ("forward", "backward", "full")
MODE_ALIASES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "full", "forward+backward": "full"}
DTYPES = ("float32", "bfloat16", "float16", "float64")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp64": "float64"}


def _plain(name: str, value, choices, aliases=None) -> str:
    key = str(value).strip().lower()
    key = (aliases or {}).get(key, key)
    if key not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(choices)}")
    return key


def parse_mode(value: str) -> str:
    return _plain("mode", value, MODES, MODE_ALIASES)


def parse_dtype(value: str) -> str:
    return _plain("dtype", value, DTYPES, DTYPE_ALIASES)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark problem. The divergence rows are the last ``div_rows`` rows, or the
    last ``div_frac`` of the sequence when ``div_rows`` is None (RL responses sit at the
    end of the sequence)."""

    batch: int = 1
    heads: int = 4
    kv_heads: int = 2
    seq_len: int = 1024
    head_dim: int = 64
    div_frac: float = 1.0
    div_rows: int | None = None
    divergence: str = "jsd"
    head_reduction: str = "mean"
    dtype: str = "float32"
    causal: bool = True

    def __post_init__(self):
        for name in ("batch", "heads", "kv_heads", "seq_len", "head_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads} (GQA)")
        if not 0.0 < float(self.div_frac) <= 1.0:
            raise ValueError(f"div_frac must be in (0, 1], got {self.div_frac!r}")
        if self.div_rows is not None and (isinstance(self.div_rows, bool) or not isinstance(self.div_rows, int)
                                          or self.div_rows <= 0):
            raise ValueError(f"div_rows must be a positive int or None, got {self.div_rows!r}")
        _plain("divergence", self.divergence, DIVERGENCES)
        _plain("head_reduction", self.head_reduction, HEAD_REDUCTIONS)
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))

    @property
    def rows(self) -> int:
        """Rows carrying a divergence (the last ``rows`` of the sequence)."""
        if self.div_rows is not None:
            return min(self.div_rows, self.seq_len)
        return max(1, min(self.seq_len, round(self.div_frac * self.seq_len)))

    @property
    def div_spec(self) -> str:
        """How the divergence rows were chosen, independent of ``seq_len`` (for grouping)."""
        if self.div_rows is not None:
            return f"last {self.div_rows}"
        return "all" if self.div_frac >= 1.0 else f"last {self.div_frac:.4g}"

    @property
    def id(self) -> str:
        return (f"B{self.batch}-H{self.heads}-K{self.kv_heads}-T{self.seq_len}-D{self.head_dim}-R{self.rows}-"
                f"{self.divergence}-{self.head_reduction}-{self.dtype}" + ("" if self.causal else "-full"))

    def columns(self) -> dict:
        return dict(seq_len=self.seq_len, batch=self.batch, heads=self.heads, kv_heads=self.kv_heads,
                    head_dim=self.head_dim, div_rows=self.rows, div_spec=self.div_spec, divergence=self.divergence,
                    head_reduction=self.head_reduction, dtype=self.dtype, causal=self.causal)


# Sweep axis names accepted by presets and by the command line; ("heads", "kv_heads") and
# ("divergence", "head_reduction") may also be swept as pairs.
AXES = ("seq_len", "batch", "heads", "kv_heads", "head_dim", "div_frac", "div_rows", "divergence",
        "head_reduction", "dtype")


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    device: str  # "cpu" or "cuda"
    base: dict
    axes: dict  # axis name (or tuple of names) -> list of values (or tuples)
    variants: tuple = ({},)  # one-at-a-time overrides, each crossed with ``axes``
    repeats: int = 3  # CPU timing repeats (CUDA: do_bench decides)
    compile_dynamic: bool = False  # eager_compiled: one dynamic-shape compile instead of one per shape

    def shapes(self, overrides: dict | None = None) -> list[Shape]:
        return expand(self.base, self.axes, self.variants, overrides)


def _axis_names(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def expand(base: dict, axes: dict, variants: Sequence[dict] = ({},), overrides: dict | None = None) -> list[Shape]:
    """Every shape of the sweep, ``seq_len`` varying fastest; ``overrides`` (axis -> list)
    replace the axes and variants that set the same fields."""
    axes = dict(axes)
    variants = [dict(v) for v in variants] or [{}]
    for name, values in (overrides or {}).items():
        names = _axis_names(name)
        for key in list(axes):
            shared = set(_axis_names(key)) & set(names)
            if shared:
                # A paired axis loses the overridden field; the other field keeps its values.
                rest = [n for n in _axis_names(key) if n not in shared]
                vals = axes.pop(key)
                if rest:
                    idx = [_axis_names(key).index(n) for n in rest]
                    kept = list(dict.fromkeys(tuple(v[i] for i in idx) for v in vals))
                    axes[tuple(rest) if len(rest) > 1 else rest[0]] = [k if len(k) > 1 else k[0] for k in kept]
        for v in variants:
            for n in names:
                v.pop(n, None)
        if "div_frac" in names:  # a fraction replaces fixed rows and the other way round
            axes.pop("div_rows", None)
            base = {**base, "div_rows": None}
        if "div_rows" in names:
            axes.pop("div_frac", None)
        axes[name] = list(values)
    variants = list({tuple(sorted(v.items())): v for v in variants}.values())
    ordered = sorted(axes, key=lambda k: "seq_len" in _axis_names(k))  # seq_len last: fastest
    shapes = []
    for variant in variants:
        for combo in itertools.product(*(axes[k] for k in ordered)):
            fields = {**base, **variant}
            for key, value in zip(ordered, combo):
                names = _axis_names(key)
                values = value if len(names) > 1 else (value,)
                if len(values) != len(names):
                    raise ValueError(f"axis {key} needs {len(names)} values per point, got {value!r}")
                fields.update(zip(names, values))
            unknown = set(fields) - {f.name for f in dataclasses.fields(Shape)}
            if unknown:
                raise ValueError(f"unknown shape field(s) {sorted(unknown)}; valid: {', '.join(AXES)}")
            shapes.append(Shape(**fields))
    return list(dict.fromkeys(shapes))


_CPU_BASE = dict(batch=1, heads=4, kv_heads=2, head_dim=64, div_frac=0.25, divergence="jsd", head_reduction="mean",
                 dtype="float32")
_GPU_SEQ = [1024, 2048, 4096, 8192, 16384, 32768]
_MODEL_SEQ = [4096, 8192, 16384, 32768]


def _model(name: str, heads: int, kv_heads: int, what: str) -> Preset:
    return Preset(name, f"{what} last layer (Hq={heads}, Hk={kv_heads}, D=128): B=1, response = last 1/8, "
                        "head-mean JSD, bf16, causal, T 4k..32k", "cuda",
                  dict(batch=1, heads=heads, kv_heads=kv_heads, head_dim=128, div_frac=0.125, divergence="jsd",
                       head_reduction="mean", dtype="bfloat16"), {"seq_len": _MODEL_SEQ})


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("cpu-quick", "CPU, under 5 minutes on 2 cores: B=1, Hq=4, Hk=2, D=64, response = last 1/4, "
                        "head-mean JSD, fp32, causal, T 256..4096", "cpu",
           _CPU_BASE, {"seq_len": [256, 512, 1024, 2048, 4096]}, compile_dynamic=True),
    Preset("cpu-sweep", "CPU: the cpu-quick shape, T 256..8192", "cpu",
           _CPU_BASE, {"seq_len": [256, 512, 1024, 2048, 4096, 8192]}),
    Preset("cpu-axes", "CPU, T=1024, one axis at a time: divergence-row fraction, heads / KV heads, head dim, "
                       "divergence and head reduction", "cpu",
           _CPU_BASE, {"seq_len": [1024]},
           variants=({}, {"div_frac": 0.125}, {"div_frac": 1.0}, {"heads": 8, "kv_heads": 2},
                     {"heads": 8, "kv_heads": 8}, {"head_dim": 128}, {"divergence": "kl"},
                     {"divergence": "reverse_kl"}, {"divergence": "kl", "head_reduction": "none"})),
    Preset("shape-A", "RL-realistic: B=4, Hq=28, Hk=4, T=8192, D=128, divergence rows = last 1024, "
                      "head-mean JSD, bf16, causal", "cuda",
           dict(batch=4, heads=28, kv_heads=4, head_dim=128, div_rows=1024, divergence="jsd", head_reduction="mean",
                dtype="bfloat16"), {"seq_len": [8192]}),
    Preset("shape-B", "stress: B=1, Hq=32, Hk=8, T=8192, D=128, every row, per-head KL and head-mean JSD, "
                      "bf16, causal", "cuda",
           dict(batch=1, heads=32, kv_heads=8, head_dim=128, div_frac=1.0, dtype="bfloat16"),
           {"seq_len": [8192], ("divergence", "head_reduction"): [("kl", "none"), ("jsd", "mean")]}),
    Preset("gpu-sweep", "GPU sequence-length sweep: B=1, Hq=28, Hk=4, D=128, response = last 1/8, head-mean JSD, "
                        "bf16, causal, T 1k..32k", "cuda",
           dict(batch=1, heads=28, kv_heads=4, head_dim=128, div_frac=0.125, divergence="jsd", head_reduction="mean",
                dtype="bfloat16"), {"seq_len": _GPU_SEQ}),
    _model("qwen2.5-vl-7b", 28, 4, "Qwen2.5-VL-7B"),
    _model("qwen2.5-vl-32b", 40, 8, "Qwen2.5-VL-32B"),
    _model("llama-3-8b", 32, 8, "Llama-3-8B"),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def parse_heads(values: Iterable[str]) -> list[tuple[int, int]]:
    """``"28:4"`` (or ``"28/4"``) -> ``(28, 4)``; ``"8"`` -> ``(8, 8)``."""
    out = []
    for v in values:
        parts = str(v).replace("/", ":").split(":")
        try:
            hq, hk = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
        except ValueError:
            hq = hk = None
        if hq is None or hq <= 0 or hk <= 0:
            raise ValueError(f"--heads takes HQ:HK pairs of positive ints (e.g. 28:4), got {v!r}")
        if hq % hk:
            raise ValueError(f"--heads {v}: query heads {hq} must be a multiple of KV heads {hk}")
        out.append((hq, hk))
    return out
