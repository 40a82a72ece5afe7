"""pytest options for the Python suite.

--device cpu|cuda   run the suite on that device (default cpu); tests marked `gpu` need cuda.
--compile           also run the reference-comparison tests through torch.compile(fullgraph=True)
"""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--device", default="cpu", choices=("cpu", "cuda"), help="device the flce tests run on"
    )
    parser.addoption(
        "--compile",
        action="store_true",
        default=False,
        help="run the reference tests through torch.compile(fullgraph=True) too",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run with --device cuda)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--device") == "cuda":
        return
    skip = pytest.mark.skip(reason="needs --device cuda")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    name = pytestconfig.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.exit("--device cuda was given but torch.cuda.is_available() is False", returncode=4)
    if name == "cuda":
        import flce

        if not flce.cuda_available():
            pytest.exit("--device cuda was given but flce was built without CUDA", returncode=4)
    return torch.device(name)


@pytest.fixture(scope="session")
def compile_mode(pytestconfig) -> bool:
    return pytestconfig.getoption("--compile")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
