"""Hardware targets as data: one YAML file per target in `hardware/specs/`, loaded into a frozen
`HardwareSpec` in SI units. Every number is a `Quantity` that carries its source and provenance.

A value in YAML is `[number, source_key]` or `{value: number, source: key, note: "..."}`; the
file's `sources:` table maps each key to a reference and a provenance (`datasheet`, `derived`,
`published` (measured by someone else, with a citation), `measured` (here), `assumed`).
Adding a target is adding a file; `optim targets` lists them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from optim.errors import ConfigError, UnknownNameError

PROVENANCES = ("datasheet", "derived", "published", "measured", "assumed")
DTYPES = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int4", "binary")

# YAML key suffix -> (SI unit, factor)
_UNITS = {"tflops": ("FLOP/s", 1e12), "gbs": ("B/s", 1e9), "gb": ("B", 1e9), "mb": ("B", 1e6),
          "mhz": ("Hz", 1e6), "w": ("W", 1.0), "us": ("s", 1e-6), "": ("", 1.0)}


@dataclass(frozen=True)
class Quantity:
    """One number of a spec, in SI units, with where it came from."""

    value: float
    unit: str
    source: str
    provenance: str
    note: str = ""

    def __float__(self) -> float:
        return float(self.value)

    def to_dict(self) -> dict:
        d = {"value": self.value, "unit": self.unit, "source": self.source,
             "provenance": self.provenance}
        return {**d, "note": self.note} if self.note else d


@dataclass(frozen=True)
class Interconnect:
    name: str
    bandwidth: Quantity  # B/s per device, per direction
    latency: Quantity  # s per hop/collective step
    max_devices: int
    topology: str  # "switch" (NVSwitch: all-to-all) | "ring" | "mesh"


@dataclass(frozen=True)
class HardwareSpec:
    """A target's peaks and limits. Peaks are dense; `sparse_2_4` lists the dtypes a vendor
    sparse path doubles (only credited when the backend has such kernels)."""

    name: str
    kind: str  # gpu | cpu | tpu | fpga | soc
    vendor: str
    description: str
    peak: dict[str, Quantity]  # dtype -> FLOP/s (OP/s for ints)
    mem_bandwidth: Quantity  # B/s
    mem_capacity: Quantity  # B
    onchip: Quantity  # B of last-level on-chip memory (L2/LLC/SRAM)
    launch_overhead: Quantity  # s of fixed cost per kernel/operator
    efficiency: dict[str, Quantity]  # gemm (large-GEMM fraction of peak), memory (of bandwidth)
    compute_units: Quantity | None = None  # SMs / cores / TensorCores, for wave quantization
    clock: Quantity | None = None
    tdp: Quantity | None = None
    sparse_2_4: tuple[str, ...] = ()
    sparse_2_4_source: str = ""
    sparse_2_4_speedup: Quantity | None = None  # measured GEMM speedup; None: the vendor's 2x
    features: frozenset[str] = frozenset()  # e.g. popcount, amx, int8_dot
    interconnect: Interconnect | None = None
    fpga: dict[str, Any] = field(default_factory=dict)
    cuda_arch: str = ""  # e.g. sm_80: what CUDA code for this target is compiled for
    sources: dict[str, dict] = field(default_factory=dict)
    path: str = ""

    def peak_for(self, dtype: str) -> Quantity | None:
        return self.peak.get(dtype)

    def quantities(self) -> dict[str, Quantity]:
        """Every number of the spec by dotted name (for listing provenance)."""
        out = {f"peak.{k}": v for k, v in self.peak.items()}
        out |= {"memory.bandwidth": self.mem_bandwidth, "memory.capacity": self.mem_capacity,
                "onchip": self.onchip, "launch_overhead": self.launch_overhead}
        out |= {f"efficiency.{k}": v for k, v in self.efficiency.items()}
        for key in ("compute_units", "clock", "tdp"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.interconnect:
            out["interconnect.bandwidth"] = self.interconnect.bandwidth
            out["interconnect.latency"] = self.interconnect.latency
        out |= {f"fpga.{k}": v for k, v in _flat(self.fpga).items()}
        return out

    def provenance(self) -> str:
        """The weakest provenance among the peaks and bandwidth, for one-line listings."""
        order = {p: i for i, p in enumerate(("measured", "datasheet", "published", "derived",
                                             "assumed"))}
        core = list(self.peak.values()) + [self.mem_bandwidth]
        counts: dict[str, int] = {}
        for q in core:
            counts[q.provenance] = counts.get(q.provenance, 0) + 1
        return ", ".join(f"{p}" for p in sorted(counts, key=order.get))

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "vendor": self.vendor,
                "description": self.description, "sparse_2_4": list(self.sparse_2_4),
                "features": sorted(self.features),
                "numbers": {k: q.to_dict() for k, q in self.quantities().items()}}


def _flat(d: dict, prefix: str = "") -> dict[str, Quantity]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Quantity):
            out[prefix + k] = v
        elif isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
    return out


# ---------------------------------------------------------------- loading

def specs_dir() -> Path:
    return Path(str(resources.files("hardware").joinpath("specs")))


@cache
def _schema() -> dict:
    return json.loads(resources.files("hardware").joinpath("schemas/target.schema.json")
                      .read_text())


def target_names() -> list[str]:
    return sorted(p.stem.replace("_", "-") for p in specs_dir().glob("*.yaml"))


def load_spec(name_or_path: str | Path, machine: dict | None = None) -> HardwareSpec:
    """Load a target by name (`a100`, ...) or from a YAML path. A `detect` spec (`cpu`: this
    machine) is a template filled from `machine`, the facts and rates `hardware.cpu_probe.probe`
    measured; loading never measures (`optim.targets.resolve_target("cpu")` does both)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = specs_dir() / f"{str(name_or_path).replace('-', '_')}.yaml"
        if not path.exists():
            raise UnknownNameError("target", str(name_or_path), target_names())
    raw = _read(str(path.resolve()))
    if raw.get("detect"):
        if machine is None:
            raise ConfigError(f"target {raw.get('name', path.stem)!r} is this machine: its spec "
                              f"needs the measured rates; use optim.targets.resolve_target"
                              f"({raw.get('name', path.stem)!r}), or pass "
                              f"machine=hardware.cpu_probe.probe()")
        return _validated(this_cpu(raw, machine), str(path))
    return _load_path(str(path.resolve()))


@cache
def _read(path: str) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"no target spec at {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a target spec is a mapping, got {type(raw).__name__}")
    return raw


@cache
def _load_path(path: str) -> HardwareSpec:
    return _validated(_read(path), path)


def _validated(raw: dict, path: str) -> HardwareSpec:
    try:
        jsonschema.validate(raw, _schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ConfigError(f"{path}: {where}: {e.message}") from None
    return build_spec(raw, path)


def build_spec(raw: dict, path: str = "<dict>") -> HardwareSpec:
    """Turn a validated YAML mapping into a `HardwareSpec` (SI units, sources resolved)."""
    sources = raw["sources"]

    def q(value: Any, suffix: str, where: str) -> Quantity:
        if isinstance(value, list):
            number, key, note = value[0], value[1], ""
        else:
            number, key, note = value["value"], value["source"], value.get("note", "")
        if key not in sources:
            raise ConfigError(f"{path}: {where}: source {key!r} is not in the sources table "
                              f"(have: {', '.join(sorted(sources))})")
        unit, factor = _UNITS[suffix]
        src = sources[key]
        return Quantity(float(number) * factor, unit, src["ref"], src["provenance"], note)

    def qs(table: dict, suffix: str, where: str) -> dict[str, Quantity]:
        return {k: q(v, suffix, f"{where}.{k}") for k, v in table.items()}

    mem = raw["memory"]
    ic = raw.get("interconnect")
    interconnect = None
    if ic:
        interconnect = Interconnect(ic["name"], q(ic["bandwidth_gbs"], "gbs", "interconnect"),
                                    q(ic["latency_us"], "us", "interconnect"),
                                    int(ic["max_devices"]), ic["topology"])
    fpga = {}
    for k, v in (raw.get("fpga") or {}).items():
        suffix = next((s for s in _UNITS if s and k.endswith("_" + s)), "")
        if isinstance(v, dict) and "value" not in v:
            fpga[k] = qs(v, suffix, f"fpga.{k}")
        else:
            fpga[k] = q(v, suffix, f"fpga.{k}")
    sparse = raw.get("sparse_2_4") or {}
    opt = lambda key, suffix: q(raw[key], suffix, key) if key in raw else None  # noqa: E731
    return HardwareSpec(
        name=raw["name"], kind=raw["kind"], vendor=raw.get("vendor", ""),
        description=raw["description"],
        peak=qs(raw["peak_tflops"], "tflops", "peak_tflops"),
        mem_bandwidth=q(mem["bandwidth_gbs"], "gbs", "memory.bandwidth_gbs"),
        mem_capacity=q(mem["capacity_gb"], "gb", "memory.capacity_gb"),
        onchip=q(raw["onchip_mb"], "mb", "onchip_mb"),
        launch_overhead=q(raw["launch_overhead_us"], "us", "launch_overhead_us"),
        efficiency=qs(raw["efficiency"], "", "efficiency"),
        compute_units=opt("compute_units", ""), clock=opt("clock_mhz", "mhz"),
        tdp=opt("tdp_w", "w"),
        sparse_2_4=tuple(sparse.get("dtypes", ())),
        sparse_2_4_source=sources[sparse["source"]]["ref"] if sparse else "",
        sparse_2_4_speedup=q(sparse["speedup"], "", "sparse_2_4.speedup")
        if "speedup" in sparse else None,
        features=frozenset(raw.get("features", ())), interconnect=interconnect, fpga=fpga,
        cuda_arch=raw.get("cuda_arch", ""),
        sources=sources, path=path)


def this_cpu(raw: dict, p: dict) -> dict:
    """Fill the `cpu` spec template (hardware/specs/cpu.yaml) with this machine's numbers, `p`
    as `hardware.cpu_probe.probe()` detected and measured them."""
    m = p["measured"]
    src_m = f"measured here {m['measured_at']}, {m['threads']} threads (hardware/cpu_probe.py)"
    src_d = "detected here from /proc/cpuinfo, /proc/meminfo and /sys cache info"
    out = dict(raw)
    out.pop("detect")
    out["description"] = f"this machine: {p['model']} (family {p['family']} model " \
                         f"{p['model_id']}), {p['cores']} cores, {' '.join(p['isa'])}"
    out["sources"] = {**raw.get("sources", {}),
                      "here": {"ref": src_m, "provenance": "measured"},
                      "detected": {"ref": src_d, "provenance": "measured"}}
    out["peak_tflops"] = {"fp32": [m["fp32_flops"] / 1e12, "here"],
                          "int8": [m["int8_ops"] / 1e12, "here"],
                          "binary": [m["binary_ops"] / 1e12, "here"]}
    out["memory"] = {"bandwidth_gbs": {"value": m["read_bytes_per_s"] / 1e9, "source": "here",
                                       "note": f"streaming read; copy (read+write) reaches "
                                               f"{m['copy_bytes_per_s'] / 1e9:.1f} GB/s"},
                     "capacity_gb": [p["mem_bytes"] / 1e9, "detected"], "type": "DRAM"}
    out["onchip_mb"] = [(p["l3_bytes"] or p["l2_bytes"]) / 1e6, "detected"]
    out["compute_units"] = [p["cores"], "detected"]
    out["features"] = sorted(set(raw.get("features", [])) | set(p["isa"]) | {"popcount"})
    return out
