"""Device profiles: one TOML file per device class next to this module, their loader, and host detection.

Stdlib only: the runtime imports this on devices that have neither numpy nor torch.

- schema.py: the keys a profile must have, the values they allow, and one-line error messages naming the line;
- profile.py: DeviceProfile and Provider, and loading the shipped profiles or a .toml file;
- host.py: what this machine is (CPU, cores, memory, bandwidth) and the shipped profile closest to it.
"""

from __future__ import annotations

from edge_lora.devices.host import HostInfo, closest, detect
from edge_lora.devices.profile import DeviceProfile, Provider, load, load_all, names, resolve_threads
from edge_lora.devices.schema import KERNELS, KNOWN_PROVIDERS, DeviceProfileError

__all__ = [
    "DeviceProfile",
    "DeviceProfileError",
    "HostInfo",
    "KERNELS",
    "KNOWN_PROVIDERS",
    "Provider",
    "closest",
    "detect",
    "load",
    "load_all",
    "names",
    "resolve_threads",
]
