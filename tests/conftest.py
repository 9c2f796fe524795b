"""Shared fixtures: the tiny offline models and data, built once per test session."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process: the tiny models gain nothing from more, and on a loaded 2-core machine OpenMP's spinning
# threads made steps up to 30x slower. Subprocesses (accelerate launch) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"  # official prompt files and real small weight files, beside the checkout
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    from tiny import build_sd15

    return build_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from tiny import build_sdxl

    return build_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def pickapic(tmp_path_factory) -> Path:
    """64 pairs in the Pick-a-Pic v2 schema (ties, varied sizes, one corrupt image) as a local parquet folder."""
    from tiny import build_pickapic

    return build_pickapic(tmp_path_factory.mktemp("data") / "pickapic", n_pairs=64)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (the shared fixtures folder) is not beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def tiny_sd2v(tmp_path_factory) -> Path:
    from tiny import build_sd2v

    return build_sd2v(tmp_path_factory.mktemp("models") / "tiny-sd2v")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    from tiny import build_sd3

    return build_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    from tiny import build_flux

    return build_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="session")
def cpu_bf16_attention():
    """Skips a test that runs bf16 attention on the CPU where torch cannot: with ATEN_CPU_CAPABILITY forcing kernels
    below an AVX-512 CPU's own (docs/testing.md), torch's CPU flash attention still picks its AVX-512 bf16 path by the
    hardware and stops ("pack_vnni2 is only supported when avx512 is supported"). A real AVX2 CPU takes another path;
    the override's limitation is torch's, not the project's."""
    import torch.nn.functional as F

    q = torch.zeros(1, 1, 64, 8, dtype=torch.bfloat16)
    try:
        F.scaled_dot_product_attention(q, q, q)
    except RuntimeError as error:
        pytest.skip(f"torch's CPU bf16 attention fails under ATEN_CPU_CAPABILITY="
                    f"{os.environ.get('ATEN_CPU_CAPABILITY')}: {error}")
