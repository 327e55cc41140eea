"""Device names → ``Device`` objects, probing, and ``AUTO`` selection.

Names: ``CPU``, ``GPU`` / ``GPU.N``, ``TENSORRT`` / ``TENSORRT.N``, ``OPENVINO``,
``AUTO``. ``AUTO`` picks the first available of ``AUTO_PRIORITY``; CPU always
loads, so AUTO never fails for want of a GPU. TensorRT is left out of AUTO on
purpose: its engine builds take minutes, which nobody should get by surprise. So
is OPENVINO: on a CPU (its default device type) it is a second CPU backend whose
sessions took 2.5x the CPU provider's to build and are not cached, for inference
within ~10% (docs/devices.md).
"""

from __future__ import annotations

import re

from .._errors import DeviceNotFoundError
from .base import BlobFormat, Device, DeviceSpec, ProviderList, cpu_fingerprint, probe_session
from .cpu import CPUDevice
from .nvidia import CUDADevice, TensorRTDevice
from .openvino import OpenVINODevice

__all__ = (
    "AUTO_PRIORITY",
    "BlobFormat",
    "Device",
    "DeviceRegistry",
    "DeviceSpec",
    "ProviderList",
    "blob_format",
    "cpu_fingerprint",
    "probe_session",
)

AUTO_PRIORITY = ("GPU", "CPU")
_NAME = re.compile(r"^([A-Z]+)(?:\.(\d+))?$")


def blob_format(kind: str) -> BlobFormat:
    """The blob format called ``kind`` (for the builder process, which has no registry)."""
    for device in (CPUDevice, CUDADevice, TensorRTDevice, OpenVINODevice):
        if device.blob is not None and device.blob.kind == kind:
            return device.blob
    raise KeyError(kind)


class DeviceRegistry:
    """The devices one ``Core`` knows, each probed at most once."""

    def __init__(self, devices: list[Device] | None = None) -> None:
        devices = devices if devices is not None else [
            CPUDevice(), CUDADevice(), TensorRTDevice(), OpenVINODevice()
        ]
        self._devices = {d.family: d for d in devices}

    def families(self) -> list[str]:
        return list(self._devices)

    def get(self, family: str) -> Device:
        return self._devices[family]

    def available(self) -> list[str]:
        """Names of the devices that really load here, CPU first."""
        return [name for name, device in self._devices.items() if device.available()]

    def probed(self) -> bool:
        """Whether every device has been probed (``available`` no longer blocks)."""
        return all(device.probed for device in self._devices.values())

    def probe_all(self) -> list[str]:
        """Probe every device, and read the names of those available; ``available()``."""
        names = self.available()
        for name in names:
            self._devices[name].full_name()
        return names

    def family_of(self, name: str) -> str | None:
        """The family a name belongs to, or None when it names no device; never probes."""
        match = _NAME.match(name.strip().upper())
        if not match or (match.group(1) not in self._devices and match.group(1) != "AUTO"):
            return None
        return match.group(1)

    def parse(self, name: str) -> DeviceSpec:
        if not isinstance(name, str):
            raise DeviceNotFoundError(f"a device name must be a string, got {type(name).__name__}")
        match = _NAME.match(name.strip().upper())
        if not match or (match.group(1) not in self._devices and match.group(1) != "AUTO"):
            raise DeviceNotFoundError(
                f"unknown device {name!r}; known: AUTO, {', '.join(self._devices)}; "
                f"available here: {', '.join(self.available())}"
            )
        index = int(match.group(2)) if match.group(2) is not None else None
        return DeviceSpec(match.group(1), index)

    def resolve(self, name: str, *, wait: bool = True) -> tuple[Device, DeviceSpec]:
        """The device to compile on; raises when it does not load here. With ``wait=False``
        a named device is only probed in the background (``Device.prepare``): the caller
        reads and hashes the model meanwhile and calls ``require`` before its first session."""
        spec = self.parse(name)
        if spec.family == "AUTO":
            for family in AUTO_PRIORITY:
                device = self._devices.get(family)
                if device is not None and device.available():
                    return device, DeviceSpec(family, spec.index if family != "CPU" else None)
            raise DeviceNotFoundError("no device is available, not even CPU")  # pragma: no cover
        device = self._devices[spec.family]
        if wait:
            self.require(device, spec)
        else:
            device.prepare()
        return device, spec

    def require(self, device: Device, spec: DeviceSpec) -> None:
        """Raise DeviceNotFoundError unless ``device`` loads here (waits for its probe)."""
        if not device.available():
            raise DeviceNotFoundError(
                f"device {spec} is not available here ({device.unavailable_reason}); "
                f"available: {', '.join(self.available())}"
            )
