"""The seam to vLLM: every name yarn-vllm relies on is checked at start-up, and a vLLM that
lacks one leaves plain models alone and refuses YaRN models in one line naming it.

tests/seam_damage_worker.py damages one name of vllm_vllm_seam.vllm_names.NAMES at a time
in a subprocess (as an upgrade would: a renamed name, or a method whose parameters changed)
and builds vLLM's engine config for a request-mode YaRN model and a plain model; then it
runs real engines with InputProcessor.process_inputs changed (before, the plugin's patch
raised for every model, plain ones included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from yarn_vllm.vllm_seam.vllm_names import NAMES, SUPPORTED_VLLM, problems

HERE = os.path.dirname(os.path.abspath(__file__))
# names vLLM itself reads while it builds any engine config: damaging one breaks vLLM for
# every model, so only the check and the absence of our own error can be asserted
VLLM_NEEDS_AT_CONFIG_TIME = {
    "vllm.config.parallel:ParallelConfig.prefill_context_parallel_size",
    "vllm.config.vllm:VllmConfig.kv_transfer_config",
    "vllm.config.model:ModelConfig.use_mla",
    "vllm.config.scheduler:SchedulerConfig.scheduler_cls",
}


def _refusal(error: str, name: str) -> str:
    """The refusal's one line inside vLLM's config error (vLLM wraps what its platform hook
    raises in a pydantic ValidationError): it names the vLLM name, the range and the fix."""
    lines = [line for line in error.splitlines() if "yarn-vllm:" in line]
    assert len(lines) == 1, error
    line = lines[0]
    assert name in line and "it supports vLLM >= 0.32.0, < 0.33.0" in line and "Fix:" in line
    return line


@pytest.fixture(scope="module")
def damaged(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("seam") / "out.json"
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "seam_damage_worker.py"),
                           tiny_llama, tiny_llama, str(out), "engine"],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_the_running_vllm_has_every_name():
    assert problems() == []


def test_every_name_resolves_and_is_listed_once():
    paths = [e.path for e in NAMES]
    assert len(paths) == len(set(paths)) >= 25
    low, high = SUPPORTED_VLLM
    assert low < high


@pytest.mark.parametrize("entry", NAMES, ids=[e.path.split(":")[1] for e in NAMES])
def test_a_damaged_name_is_found_and_named(damaged, entry):
    record = damaged[entry.path]
    assert any(entry.path in p for p in record["problems"]), record["problems"]
    assert record["register"] == {"ok": True}  # the plugin itself never raises


@pytest.mark.parametrize("entry", [e for e in NAMES if e.path not in VLLM_NEEDS_AT_CONFIG_TIME],
                         ids=lambda e: e.path.split(":")[1])
def test_a_damaged_name_refuses_yarn_models_and_leaves_plain_ones(damaged, entry):
    record = damaged[entry.path]
    assert record["plain"] == {"ok": True}
    assert not record["yarn"]["ok"]
    assert _refusal(record["yarn"]["error"], entry.path)


@pytest.mark.parametrize("path", sorted(VLLM_NEEDS_AT_CONFIG_TIME))
def test_names_vllm_needs_itself_fail_in_vllm_not_in_the_plugin(damaged, path):
    for side in ("plain", "yarn"):
        record = damaged[path][side]
        assert record["ok"] or not record["raised_in_yarn_vllm"], record


def test_engines_with_a_changed_process_inputs(damaged):
    """The issue's case: a plain model generates, a YaRN model is refused in one line."""
    assert damaged["engine_plain"] == {"ok": True} and len(damaged["engine_plain_tokens"]) == 4
    assert not damaged["engine_yarn"]["ok"]
    assert _refusal(damaged["engine_yarn"]["error"], "InputProcessor.process_inputs takes no")
