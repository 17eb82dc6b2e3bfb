"""What the hardware a run is planned for can do: datasheet profiles of the GPUs, and this CPU measured.

Two users: MFU (pretrain/metrics.py), whose denominator on a GPU is the datasheet dense peak of
the detected model as Megatron-LM and torchtitan report it (a measured matmul rate moves with
clocks, shapes and a busy machine, so it does not compare across runs), and the memory/speed
planner, which takes a profile by name (`get_hardware("h100")`).

GPU figures are NVIDIA's datasheet numbers (sources at _GPU_ROWS), dense: no sparsity. fp32 is
the non-tensor-core rate: TF32 matmuls, when enabled, can run faster than it. Link figures are
per GPU and one direction, in GB/s.

"cpu" is this machine, measured once and cached in ~/.cache/pretrain/cpu_profile.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Hardware:
    """One accelerator model (or this CPU) as the planner and MFU see it."""

    name: str
    """Profile name: "h100"."""
    description: str
    """What it is: "NVIDIA H100 SXM 80GB"."""
    peak_tflops: dict[str, float] = field(hash=False)  # a dict does not hash; the profile still does
    """Dense peak by precision name ("bf16", "fp16", "fp32"), TFLOP/s."""
    memory_gib: float
    """Device memory (the datasheet capacity; the CUDA context and allocator take some of it)."""
    hbm_gbps: float
    """Memory bandwidth, GB/s."""
    intra_node_gbps: float
    """Per-GPU NVLink bandwidth, one direction, GB/s."""
    inter_node_gbps: float
    """Per-GPU InfiniBand/RoCE bandwidth, one direction, GB/s (a 400 Gb/s NIC per GPU = 50)."""
    gpus_per_node: int

    def peak(self, precision: str) -> float:
        """Dense peak TFLOP/s for "bf16", "fp16" or "fp32"."""
        if precision not in self.peak_tflops:
            raise ValueError(f"unknown precision {precision!r} for {self.name}: one of {', '.join(DTYPES)}")
        return self.peak_tflops[precision]


def _gpu(row: tuple[str, str, float, float, float, float, float, float]) -> Hardware:
    name, description, bf16, fp32, memory_gib, hbm, nvlink, network = row
    # The fp16 tensor-core peak equals bf16 on every NVIDIA part listed here.
    peaks = {"bf16": bf16, "fp16": bf16, "fp32": fp32}
    return Hardware(name, description, peaks, float(memory_gib), hbm, nvlink, network, gpus_per_node=8)


# fmt: off
# Sources: NVIDIA's datasheets, SXM parts, dense (the sheets quote bf16 with 2:4 sparsity: halved
# here) and NVLink bidirectional (halved here); the network is one NIC per GPU as in DGX/HGX.
# - A100 (40GB/80GB SXM): 312 bf16, 19.5 fp32; HBM2 1,555 GB/s / HBM2e 2,039 GB/s; NVLink 3 600
#   GB/s; HDR 200 Gb/s = 25 GB/s.
# - H100 SXM: 1,979 sparse = 989.4 dense bf16, 66.9 fp32; HBM3 3.35 TB/s; NVLink 4 900 GB/s;
#   NDR 400 Gb/s = 50 GB/s.
# - H100 PCIe: 1,513 sparse = 756 dense, 51.2 fp32, HBM2e 2 TB/s; kept so its MFU is not measured
#   against the SXM peak. Its NVLink bridge joins pairs only: a collective over 8 GPUs runs at
#   PCIe Gen5 x16, 64 GB/s per direction.
# - H200 SXM: the H100's compute and links, 141 GB HBM3e at 4.8 TB/s.
# - HGX B200: 4.5 PFLOP/s sparse = 2,250 dense bf16, 80 fp32 (DGX B200 sheet; 75 on some), HBM3e
#   8 TB/s, NVLink 5 1.8 TB/s, 400 Gb/s per GPU. 192 GB are built in, 180 GB usable on HGX B200:
#   the planner must count on 180.
# memory_gib is the datasheet capacity; torch reports slightly less (H100: 79.1 GiB) and the CUDA
# context and allocator take some of that.
#    name         description                         bf16    fp32  GiB  HBM GB/s NVLink network
_GPU_ROWS = (
    ("a100-40gb", "NVIDIA A100 SXM4 40GB",             312.0,  19.5,  40, 1555,  300, 25),
    ("a100-80gb", "NVIDIA A100 SXM4 80GB",             312.0,  19.5,  80, 2039,  300, 25),
    ("h100",      "NVIDIA H100 SXM 80GB",              989.4,  66.9,  80, 3350,  450, 50),
    ("h100-pcie", "NVIDIA H100 PCIe 80GB",             756.0,  51.2,  80, 2000,   64, 50),
    ("h200",      "NVIDIA H200 SXM 141GB",             989.4,  66.9, 141, 4800,  450, 50),
    ("b200",      "NVIDIA B200 (HGX, 180GB usable)",  2250.0,  80.0, 180, 8000,  900, 50),
)
# fmt: on
PROFILES: dict[str, Hardware] = {row[0]: _gpu(row) for row in _GPU_ROWS}

# torch.cuda.get_device_name fragment -> profile, matched as whole words: "GH200" and "GB200"
# (other chips with other figures) must not pass for "H200" and "B200", and "H100 PCIe" comes
# before "H100". The A100's memory size picks 40GB or 80GB (same compute). Variants not listed
# (H100 NVL, H200 NVL: lower clocks) match their SXM profile, which only understates their MFU.
_NAME_FRAGMENTS: dict[str, str] = {
    "H100 PCIe": "h100-pcie",
    "H100": "h100",
    "H200": "h200",
    "B200": "b200",
    "A100": "a100-80gb",
}

# name fragment -> dtype -> dense peak TFLOP/s, derived from PROFILES (one table of figures).
DATASHEET_TFLOPS: dict[str, dict[torch.dtype, float]] = {
    fragment: {DTYPES[p]: PROFILES[key].peak(p) for p in DTYPES} for fragment, key in _NAME_FRAGMENTS.items()
}


def detect_hardware(device: torch.device) -> Hardware | None:
    """The profile of the GPU torch sees at `device`, or None on a CPU or a GPU not in the table."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return hardware_of_gpu(torch.cuda.get_device_name(device), memory_gib)


def hardware_of_gpu(name: str, memory_gib: float) -> Hardware | None:
    """The profile of a GPU by the name its driver reports ("NVIDIA H100 80GB HBM3", as torch
    and nvidia-smi print it) and its memory, or None for a GPU not in the table."""
    for fragment, key in _NAME_FRAGMENTS.items():
        if re.search(rf"\b{re.escape(fragment)}\b", name):
            if key == "a100-80gb" and memory_gib < 60:
                key = "a100-40gb"
            return PROFILES[key]
    return None


def datasheet_peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The datasheet dense peak of this device for dtype, or None where it is not in the table
    (CPUs, other GPUs): callers then fall back to a measured rate and say so."""
    hardware = detect_hardware(device)
    precision = {v: k for k, v in DTYPES.items()}.get(dtype)
    return hardware.peak(precision) if hardware is not None and precision is not None else None


def get_hardware(name: str) -> Hardware:
    """A profile by name (case-insensitive) or by a GPU's own name as nvidia-smi reports it
    (the SLURM preflight passes that), or "cpu": this machine, measured once and cached."""
    key = name.lower()
    if key == "cpu":
        return cpu_hardware()
    if key in PROFILES:
        return PROFILES[key]
    by_name = hardware_of_gpu(name, memory_gib=80)  # A100: the caller states the memory it has
    if by_name is None:
        raise ValueError(f"unknown hardware {name!r}: one of {', '.join([*PROFILES, 'cpu'])} or a GPU name they cover")
    return by_name


def measure_matmul_tflops(
    device: torch.device, dtype: torch.dtype, *, sizes: tuple[int, ...] = (), min_seconds: float = 0.2
) -> float:
    """The best matmul rate seen over square sizes, each repeated for at least `min_seconds`:
    the best of several is what the device can do; a busy moment only lowers single runs."""
    sizes = sizes or ((4096, 8192) if device.type == "cuda" else (512, 1024))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b  # warm-up: thread pool, cuBLAS handles, the kernel chosen for this shape
        sync()
        start, runs = time.perf_counter(), 0
        while runs < 2 or time.perf_counter() - start < min_seconds:
            t = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * size**3 / (time.perf_counter() - t) / 1e12)
            runs += 1
    return best


# --- this CPU ---------------------------------------------------------------------------------

# Collectives between CPU ranks run over gloo; spawning two processes to measure them costs
# seconds, so this is a nominal figure: a gloo all-reduce of 4-64 MB between two 1-thread
# processes over loopback ran at 0.65 GB/s bus bandwidth on the 2-core development VM.
CPU_NOMINAL_LINK_GBPS = 0.5

_CPU_MEMO: dict[tuple[Path, str], Hardware] = {}


def cpu_cache_path() -> Path:
    """Where the measured CPU profile is kept ($XDG_CACHE_HOME, else ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pretrain" / "cpu_profile.json"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def cpu_cache_key() -> str:
    """A new machine, core count, torch build or thread count measures again: each changes the
    rate. Threads matter because launched CPU ranks run with OMP_NUM_THREADS=1."""
    return f"{_cpu_model()} | {os.cpu_count()} cores | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _physical_memory_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 2**30  # reported in kB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _copy_gbps(mib: int = 128) -> float:
    """Best of a few copies of a tensor far larger than the caches: bytes read plus written."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of the pages is not bandwidth
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def measure_cpu() -> Hardware:
    """This CPU, measured now (2-4 s on 2 busy cores): matmul peaks per precision with the current torch
    thread count, physical RAM, copy bandwidth; the links are nominal (CPU_NOMINAL_LINK_GBPS)."""
    cpu = torch.device("cpu")
    peaks = {p: measure_matmul_tflops(cpu, dtype, min_seconds=0.25) for p, dtype in DTYPES.items()}
    return Hardware(
        name="cpu",
        description=f"{_cpu_model()}, {torch.get_num_threads()} torch threads",
        peak_tflops=peaks,
        memory_gib=round(_physical_memory_gib(), 2),
        hbm_gbps=round(_copy_gbps(), 2),
        intra_node_gbps=CPU_NOMINAL_LINK_GBPS,
        inter_node_gbps=CPU_NOMINAL_LINK_GBPS,
        gpus_per_node=os.cpu_count() or 1,  # one rank per core, as the CPU tests launch them
    )


def _read_cache(path: Path) -> dict:
    """The cache's entries; {} when it is missing or unreadable (then it is measured again)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _from_entry(entry: object) -> Hardware | None:
    fields = {f.name for f in dataclasses.fields(Hardware)}
    try:
        hardware = Hardware(**{k: v for k, v in entry.items() if k in fields})  # type: ignore[union-attr]
        if all(hardware.peak(p) > 0 for p in DTYPES):
            return hardware
    except (AttributeError, TypeError, ValueError):
        pass
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process measures at a time: CPU ranks starting together would otherwise measure
    while competing for the same cores, and cache each other's low figures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def cpu_hardware() -> Hardware:
    """This CPU's profile: from the cache when it holds this machine's key, else measured now and
    written there. A corrupt cache is measured again and rewritten."""
    path, key = cpu_cache_path(), cpu_cache_key()
    if (path, key) in _CPU_MEMO:
        return _CPU_MEMO[(path, key)]
    with _locked(path):
        entries = _read_cache(path)
        hardware = _from_entry(entries.get(key))
        if hardware is None:
            hardware = measure_cpu()
            entries[key] = {**dataclasses.asdict(hardware), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            _write_cache(path, entries)
    _CPU_MEMO[(path, key)] = hardware
    return hardware


def raise_cpu_peak(precision: str, tflops: float) -> None:
    """A run on this CPU achieved `tflops`, more than the cached peak: a measurement taken while
    the machine was busy. Keep the higher figure (a measured lower bound of the true peak), so the
    peak only rises towards the truth instead of staying wrong for every later run."""
    path, key = cpu_cache_path(), cpu_cache_key()
    with _locked(path):
        entries = _read_cache(path)
        hardware = _from_entry(entries.get(key))
        if hardware is None or hardware.peak(precision) >= tflops:
            return
        hardware = dataclasses.replace(hardware, peak_tflops={**hardware.peak_tflops, precision: tflops})
        entries[key] = {**entries[key], "peak_tflops": hardware.peak_tflops}
        _write_cache(path, entries)
    _CPU_MEMO[(path, key)] = hardware


def _write_cache(path: Path, entries: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries, indent=1) + "\n")
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one
