from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

from digests import *  # noqa: E402,F401,F403  (opt-in output digests, see digests.py)


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    """Tests marked ``slow`` (large inputs, minutes) run only when asked: ``python -m pytest -m slow``."""
    import pytest

    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with python -m pytest -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _converter_fixture():  # noqa: ANN202
    import pytest

    @pytest.fixture(scope="session")
    def converter(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN202
        """llama.cpp's convert_hf_to_gguf.py with its conversion package and gguf-py (tests/gguf_ref.py)."""
        from gguf_ref import extract_converter

        return extract_converter(tmp_path_factory.mktemp("llama.cpp"))

    return converter


converter = _converter_fixture()


def _quantized_bases():  # noqa: ANN202
    import pytest

    @pytest.fixture(scope="session")
    def fp8(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN202
        """tests/test_fp8.py's block FP8 base, built once for every module that uses it."""
        from test_fp8 import make_fp8

        return make_fp8(tmp_path_factory.mktemp("fp8"))

    @pytest.fixture(scope="session")
    def qlora(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN202
        """tests/test_bnb.py's bitsandbytes 4-bit bases, built once for every module that uses them."""
        from test_bnb import make_qlora

        return make_qlora(tmp_path_factory.mktemp("bnb"))

    return fp8, qlora


fp8, qlora = _quantized_bases()
