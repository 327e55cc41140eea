"""Properties: OpenVINO names, validation, and what a device reports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import aioov
from aioov._properties import PROPERTIES, parse_size

from .helpers import manifests

pytestmark = pytest.mark.anyio


def test_openvino_style_set_and_get(tmp_path: Path) -> None:
    core = aioov.Core()
    assert core.get_property("CACHE_DIR") is None
    core.set_property({"CACHE_DIR": tmp_path, "PERFORMANCE_HINT": "throughput", "CACHE_VERIFY": "size"})
    assert core.get_property("CACHE_DIR") == str(tmp_path)
    assert core.get_property("PERFORMANCE_HINT") == "THROUGHPUT"
    assert core.get_property("CACHE_VERIFY") == "SIZE"
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": "2"})
    assert core.get_property("CPU", "INFERENCE_NUM_THREADS") == 2
    assert core.get_property("INFERENCE_NUM_THREADS") == 0  # the Core default is unchanged


def test_device_properties() -> None:
    core = aioov.Core()
    assert "EXPORT_IMPORT" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert isinstance(core.get_property("CPU", "FULL_DEVICE_NAME"), str)
    assert "PERFORMANCE_HINT" in core.get_property("CPU", "SUPPORTED_PROPERTIES")
    assert core.get_property("AVAILABLE_DEVICES")[0] == "CPU"
    assert "CACHE_DIR" in core.get_property("SUPPORTED_PROPERTIES")


@pytest.mark.parametrize(
    "props, message",
    [
        ({"CACHE_DRI": "/tmp"}, "unknown property 'CACHE_DRI'"),
        ({"INFERENCE_NUM_THREADS": "many"}, "bad value for INFERENCE_NUM_THREADS"),
        ({"INFERENCE_NUM_THREADS": -1}, "must be between 0 and 1024"),
        ({"INFERENCE_NUM_THREADS": 2**32}, "must be between 0 and 1024"),
        ({"NUM_STREAMS": True}, "expected an integer"),
        ({"PERFORMANCE_HINT": "FAST"}, "expected one of LATENCY, THROUGHPUT"),
        ({"CACHE_PREPACK": "maybe"}, "expected AUTO, ALWAYS or NEVER"),
        ({"CACHE_LOCK_TIMEOUT": -5}, "must be a number of seconds from 0 to"),
        ({"CACHE_LOCK_TIMEOUT": float("nan")}, "must be a number of seconds from 0 to"),
        ({"CACHE_REMOTE_LOCK_TTL": "nan"}, "must be a number of seconds from 0 to"),
        ({"CACHE_MAX_SIZE": "huge"}, "expected a size"),
        ({"ORT_GRAPH_OPTIMIZATION_LEVEL": "MAX"}, "expected one of DISABLE_ALL"),
        ({"ORT_SESSION_CONFIG": "x=1"}, "expected a mapping"),
        ({"OPTIMIZATION_CAPABILITIES": "x"}, "read-only"),
        ({"CACHE_DIR": 42}, "expected a path"),
    ],
)
def test_bad_properties_are_rejected(props: dict[str, object], message: str) -> None:
    with pytest.raises(aioov.PropertyError, match=message):
        aioov.Core().set_property(props)


def test_core_only_property_in_a_compile_config_is_rejected() -> None:
    with pytest.raises(aioov.PropertyError, match="only be set on the Core"):
        aioov.Core().set_property("CPU", {"CACHE_MAX_SIZE": "1G"})


async def test_bad_config_in_compile_model(mlp_path: Path) -> None:
    with pytest.raises(aioov.PropertyError, match="unknown property"):
        await aioov.Core().compile_model(mlp_path, "CPU", {"NOPE": 1})


def test_unknown_property_on_get() -> None:
    with pytest.raises(aioov.PropertyError):
        aioov.Core().get_property("NOPE")
    with pytest.raises(aioov.DeviceNotFoundError):
        aioov.Core().get_property("NPU", "FULL_DEVICE_NAME")


@pytest.mark.parametrize("text, size", [("10G", 10 * 1024**3), ("512M", 512 * 1024**2), ("1.5KB", 1536),
                                        ("123", 123), (7, 7)])
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


def test_key_properties_are_documented() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "properties.md").read_text()
    for name in PROPERTIES:
        assert f"`{name}`" in doc, f"{name} is missing from docs/properties.md"


async def test_throughput_hint_sets_streams_and_threads(mlp_path: Path) -> None:
    compiled = await aioov.Core().compile_model(mlp_path, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS") == (os.cpu_count() or 1)
    assert compiled.get_property("PERFORMANCE_HINT") == "THROUGHPUT"


async def test_what_was_set_for_a_device_applies_when_auto_picks_it(mlp_path: Path) -> None:
    """As in OpenVINO: properties set for CPU apply when AUTO compiles on CPU; AUTO's own win."""
    async with aioov.Core() as core:
        picked = "GPU" if "GPU" in core.get_available_devices() else "CPU"  # AUTO's choice here
        core.set_property(picked, {"NUM_STREAMS": 3})
        auto = await core.compile_model(mlp_path, "AUTO")
        assert auto.get_property("EXECUTION_DEVICES") == [picked] and auto.get_property("NUM_STREAMS") == 3
        core.set_property("AUTO", {"NUM_STREAMS": 2})
        assert (await core.compile_model(mlp_path, "AUTO")).get_property("NUM_STREAMS") == 2
        assert (await core.compile_model(mlp_path, picked)).get_property("NUM_STREAMS") == 3
        (result,) = await core.compile_all([mlp_path], "AUTO")
        assert result.device == "AUTO" and result.unwrap().get_property("NUM_STREAMS") == 2


def test_every_property_has_a_typed_constant() -> None:
    """``aioov.props``: one constant per property aioov knows, each its own name, and no other."""
    from aioov import props

    assert sorted(props.__all__) == sorted(PROPERTIES)
    assert all(getattr(props, name) == name for name in PROPERTIES)
    assert {name for name in vars(props) if name.isupper()} == set(PROPERTIES)


async def test_property_constants_work_where_names_do(mlp_path: Path, cache_dir: Path) -> None:
    from aioov import props

    async with aioov.Core(properties={props.CACHE_DIR: cache_dir}) as core:
        compiled = await core.compile_model(mlp_path, "CPU", {props.NUM_STREAMS: 2, props.CACHE_EXPORT: "SYNC"})
    assert compiled.get_property(props.NUM_STREAMS) == 2
    assert compiled.get_property(props.LOADED_FROM_CACHE) is False
    assert compiled.get_property(props.EXECUTION_PROVIDERS) == ["CPUExecutionProvider"]
    with pytest.raises(aioov.PropertyError, match="read-only"):
        aioov.Core(properties={props.EXECUTION_PROVIDERS: "CPU"})


@pytest.mark.parametrize(
    "name, value",
    [
        ("CACHE_LOCK_TIMEOUT", 10**400),  # float() overflows
        ("CACHE_REMOTE_LOCK_TTL", 10**400),
        ("CACHE_REMOTE_LOCK_TTL", float("inf")),  # a lease that never ends is no lock
        ("CACHE_LOCK_TIMEOUT", -1),
        ("ORT_SESSION_CONFIG", {"x" * 2000: "1"}),  # onnxruntime's own limit on keys
    ],
)
def test_values_no_one_can_mean_are_property_errors(name: str, value: object) -> None:
    with pytest.raises(aioov.PropertyError, match=name):
        aioov.Core(properties={name: value})


@pytest.mark.anyio
async def test_huge_warmup_shapes_neither_fail_the_compile_nor_stop_the_cache(cache_dir: Path) -> None:
    """Each dimension is bounded, their product is not: inputs too big to make up are left
    out of the warm-up and of the builder's checks, and said so."""
    import onnx

    from aioov.testing import bert_like

    path = cache_dir.parent / "bert.onnx"
    onnx.save(bert_like(layers=1, hidden=32, heads=2, vocab=50), path)
    async with aioov.Core(cache_dir=cache_dir) as core:
        for warmup in (0, 1):
            compiled = await core.compile_model(path, "CPU", {"WARMUP": warmup,
                                                              "WARMUP_SHAPES": {"input_ids": [1 << 20, 1 << 20]}})
            assert compiled.warmup_seconds is None
        await core.wait_exports()
        assert core.cache_stats.exports == 1
    (manifest,) = manifests(cache_dir)
    assert manifest["build"]["check"] == "ran and matched"  # at the model's own shapes
    assert len(manifest["build"]["checked"]) >= 2
    assert any(reason.startswith("WARMUP_SHAPES: ") for reason in manifest["build"]["left_out"])
