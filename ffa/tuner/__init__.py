"""Measured launch configurations per GPU: `python -m ffa.tuner` measures them (search.py),
cache.py keeps them on disk, and the runtime reads them through `load_table`."""

from .cache import KERNEL_VERSION, DeviceInfo, Table, TunerCacheWarning, load_table, reset

__all__ = ["KERNEL_VERSION", "DeviceInfo", "Table", "TunerCacheWarning", "load_table", "reset"]
