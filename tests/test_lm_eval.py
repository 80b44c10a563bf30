"""lm-evaluation-harness against ``minimind serve``: its ``local-completions`` model (over our
/v1/completions, logprobs + echo) gives the same per-item loglikelihoods and greedy generations
as its ``hf`` model on the same weights (the ``convert --to hf`` export of a tiny random model).

Needs the ``eval`` extra (lm-eval, ~450 MB with its dependencies): CI installs it, elsewhere
the test skips. The tasks are local YAML files over tests/data/lm_eval/tiny.jsonl; nothing is
downloaded (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[eval]'")

from conftest import write_checkpoint  # noqa: E402
from server_helpers import MODEL, ServerThread  # noqa: E402

from converters import to_hf  # noqa: E402
from minimind_core import load  # noqa: E402
from minimind_core.server import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "data" / "lm_eval"
LL, GEN = "minimind_tiny_ll", "minimind_tiny_gen"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("lm_eval")
    path, _, _ = write_checkpoint(root, tokenizer_dir, "minimind3", 5, scale=0.2)
    return to_hf.convert(path, root / "hf", progress=False)


def _evaluate(model: str, model_args: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[LL, GEN],
                                  task_manager=TaskManager(include_path=str(TASKS)),
                                  batch_size=1, log_samples=True, random_seed=0,
                                  numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0)
    return {task: sorted(samples, key=lambda s: s["doc_id"])
            for task, samples in out["samples"].items()}


@pytest.mark.slow
def test_lm_eval_local_completions_matches_hf(hf_dir, monkeypatch):
    import datasets
    import huggingface_hub.constants

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository root
    engine = load(hf_dir, backend="torch", device="cpu", dtype="float32")
    with ServerThread(create_app(engine, model_name=MODEL)) as server:
        ours = _evaluate("local-completions", ",".join([
            f"base_url={server.url}/v1/completions", f"model={MODEL}",
            "tokenizer_backend=huggingface", f"tokenizer={hf_dir}", "num_concurrent=1",
            "max_retries=1", "timeout=60"]))
    theirs = _evaluate("hf", f"pretrained={hf_dir},device=cpu,dtype=float32")
    assert len(ours[LL]) == len(theirs[LL]) == 4
    for a, b in zip(ours[LL], theirs[LL]):
        got = [tuple(r) for r in a["filtered_resps"]]  # (loglikelihood, is_greedy) per choice
        want = [tuple(r) for r in b["filtered_resps"]]
        assert len(got) == len(want) == 3
        assert max(abs(x[0] - y[0]) for x, y in zip(got, want)) <= 1e-3, (got, want)
        assert [x[1] for x in got] == [y[1] for y in want]
        assert all(x[0] <= 0 for x in got) and any(x[0] < 0 for x in got), got  # real logprobs
    assert [s["filtered_resps"] for s in ours[GEN]] == \
        [s["filtered_resps"] for s in theirs[GEN]]
    assert any(s["filtered_resps"][0] for s in ours[GEN])  # something was generated
