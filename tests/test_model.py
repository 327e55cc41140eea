"""read_model: what it accepts, and the clear errors for what it does not."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import aioov
from aioov.testing import mlp, save_with_external_data

pytestmark = pytest.mark.anyio


async def test_read_model_from_path_reports_inputs_and_outputs(mlp_path: Path) -> None:
    model = await aioov.Core().read_model(mlp_path)
    assert model.path == str(mlp_path)
    assert model.input_names == ["x"]
    assert model.output_names == ["y"]
    assert model.external_data_files == []


async def test_read_model_from_bytes_and_proto(mlp_path: Path) -> None:
    core = aioov.Core()
    from_bytes = await core.read_model(mlp_path.read_bytes())
    from_proto = await core.read_model(mlp())
    assert from_bytes.path is None and from_bytes.data == mlp_path.read_bytes()
    assert from_proto.input_names == ["x"]


async def test_read_model_finds_external_data(external_path: Path) -> None:
    model = await aioov.Core().read_model(external_path)
    assert model.external_data_files == [str(external_path.parent / "bert_ext.onnx.data")]


async def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(aioov.ModelReadError, match="no such model file"):
        await aioov.Core().read_model(tmp_path / "nope.onnx")


async def test_directory_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(aioov.ModelReadError, match="not a file"):
        await aioov.Core().read_model(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, I am a text file\n", b"\x08\x01", bytes(range(256)) * 4],
    ids=["empty", "text", "no-graph", "binary-noise"],
)
async def test_not_an_onnx_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(aioov.ModelReadError, match="not a valid ONNX model"):
        await aioov.Core().read_model(path)


async def test_truncated_file(tmp_path: Path, mlp_path: Path) -> None:
    data = mlp_path.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(aioov.ModelReadError, match="truncated"):
        await aioov.Core().read_model(path)


async def test_truncated_external_data(tmp_path: Path) -> None:
    path = save_with_external_data(mlp(), tmp_path / "m.onnx", size_threshold=0)
    weights = tmp_path / "m.onnx.data"
    weights.write_bytes(weights.read_bytes()[:-16])
    with pytest.raises(aioov.ModelReadError, match="truncated"):
        await aioov.Core().read_model(path)


async def test_missing_external_data(tmp_path: Path) -> None:
    path = save_with_external_data(mlp(), tmp_path / "m.onnx", size_threshold=0)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(aioov.ModelReadError, match="missing"):
        await aioov.Core().read_model(path)


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../x.bin"])
async def test_external_data_outside_the_model_dir_is_refused(tmp_path: Path, location: str) -> None:
    model = mlp()
    for tensor in model.graph.initializer:
        tensor.data_location = onnx.TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", location
        tensor.ClearField("raw_data")
    path = tmp_path / "evil.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(aioov.ModelReadError, match="outside"):
        await aioov.Core().read_model(path)


async def test_external_data_symlink_out_of_the_model_dir_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    inside = tmp_path / "model"
    inside.mkdir()
    save_with_external_data(mlp(), outside / "m.onnx", size_threshold=0)
    (inside / "m.onnx").write_bytes((outside / "m.onnx").read_bytes())
    (inside / "m.onnx.data").symlink_to(outside / "m.onnx.data")
    with pytest.raises(aioov.ModelReadError, match="outside"):
        await aioov.Core().read_model(inside / "m.onnx")


async def test_bytes_with_external_data_are_refused(external_path: Path) -> None:
    with pytest.raises(aioov.ModelReadError, match="external data"):
        await aioov.Core().read_model(external_path.read_bytes())


async def test_unsupported_type() -> None:
    with pytest.raises(aioov.ModelReadError, match="cannot read a model from int"):
        await aioov.Core().read_model(42)
