"""hyperattn_jax.parallel: the single-device contracts here, and the 8-device cases of `parallel_cases.py`.

jax in this process has started with one CPU device, so the multi-device cases run in ONE subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (one jax start-up), and each case function is reported here as
its own test: it passes only if every parametrisation of it passed there. Under pytest-xdist the workers share that
one run (the first to need it runs it under a file lock; the others read its report): it takes minutes on 2 cores.
"""

import ast
import fcntl
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import jax
import numpy as np
import pytest
from helpers import random_qkv

import hyperattn_jax as ha
from hyperattn_jax import ops
from hyperattn_jax.ops.sortlsh import plan_projections
from hyperattn_jax.parallel import sharded_hyper_attention
from hyperattn_jax.parallel._randomness import check_paper_plan, plan_sample_index

CASES = pathlib.Path(__file__).with_name("parallel_cases.py")
CASE_NAMES = [
    node.name
    for node in ast.parse(CASES.read_text()).body
    if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
]


def _run_cases_once(report):
    """Run parallel_cases.py on 8 forced CPU devices into the junit `report`, unless another worker already did."""
    with open(report.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if report.exists():
            return
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES), f"--junitxml={report}"]
        run = subprocess.run(command, cwd=CASES.parent.parent, env=env, capture_output=True, text=True, timeout=1200)
        if not report.exists():
            output = f"{run.stdout[-4000:]}{run.stderr}"
            pytest.fail(f"the 8-device run produced no report (exit {run.returncode}):\n{output}")


@pytest.fixture(scope="module")
def multi_device_results(tmp_path_factory):
    """Run parallel_cases.py on 8 forced CPU devices; returns {case function: [(test id, failure text or None)]}."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # The parent of a worker's base temp dir belongs to this run alone and is shared by its workers.
        report = tmp_path_factory.getbasetemp().parent / "parallel_report.xml"
    else:
        report = tmp_path_factory.mktemp("parallel") / "report.xml"
    _run_cases_once(report)
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name")
        problems = [child for child in case if child.tag in ("failure", "error", "skipped")]
        text = "\n".join(f"{p.tag}: {p.get('message')}\n{p.text or ''}" for p in problems) or None
        results.setdefault(name.split("[")[0], []).append((name, text))
    return results


@pytest.mark.parametrize("case", CASE_NAMES)
def test_on_eight_devices(multi_device_results, case):
    outcomes = multi_device_results.get(case)
    assert outcomes, f"{case} did not run in the 8-device subprocess"
    failed = [f"{name}:\n{text}" for name, text in outcomes if text is not None]
    assert not failed, "\n\n".join(failed)


def _paper_config(**fields):
    paper = getattr(ha.HyperAttentionConfig, "paper", None)
    return paper(**fields) if paper is not None else ha.HyperAttentionConfig(**fields)


def test_sharded_draws_are_make_plans_draws(rng):
    # The sharded strategies re-draw make_plan's hyperplanes and samples; if make_plan changes its draws, this fails.
    cfg = _paper_config(block_size=32, sample_size=24, num_projections=5, min_seq_len=0)
    q, k, _ = random_qkv(rng, b=3, t=200, s=160, n=4, kv=2, h=16)
    key = jax.random.key(int(rng.integers(1 << 30)))
    plan = ops.make_plan(ops.group_queries(q, 2), ops.heads_major(k), key=key, config=cfg)
    samples = plan_sample_index(key, batch=3, kv_heads=2, num_keys=160, config=cfg)
    np.testing.assert_array_equal(np.asarray(samples), np.asarray(plan.sample_index))
    key_rank = ha.lsh_rank(ops.heads_major(k), plan_projections(key, 16, cfg))
    expected = np.argsort(np.asarray(key_rank), axis=-1, kind="stable")
    np.testing.assert_array_equal(np.asarray(plan.key_order.perm), expected)


def test_one_device_mesh_equals_hyper_attention(rng):
    cfg = _paper_config(block_size=32, sample_size=16, num_projections=4, min_seq_len=64)
    q, k, v = random_qkv(rng, b=1, t=256, n=2, kv=1, h=16)
    key = jax.random.key(int(rng.integers(1 << 30)))
    mesh = jax.make_mesh((1,), ("seq",))
    ref = ha.hyper_attention(q, k, v, key=key, config=cfg)
    for strategy in ("all_to_all", "bucket_dispatch"):
        out = sharded_hyper_attention(q, k, v, key=key, config=cfg, mesh=mesh, seq_axis="seq", strategy=strategy)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_accuracy_options_are_refused_by_name():
    check_paper_plan(_paper_config(), "here")  # the published plan passes
    fields = ha.HyperAttentionConfig.__dataclass_fields__
    options = {"num_sink_keys": 4, "local_window": 8}
    for name, value in options.items():
        if name in fields:  # the accuracy options may not have landed in this checkout
            config = _paper_config(**{name: value})
            with pytest.raises(ValueError, match=f"reproduces the published plan only.*{name}={value!r}"):
                check_paper_plan(config, "here")


def test_bad_strategy_is_named(rng):
    q, k, v = random_qkv(rng, b=1, t=64, n=2, h=16)
    with pytest.raises(ValueError, match="strategy='ring'"):
        sharded_hyper_attention(
            q, k, v, key=jax.random.key(0), config=_paper_config(), mesh=jax.make_mesh((1,), ("seq",)),
            seq_axis="seq", strategy="ring",
        )  # fmt: skip
