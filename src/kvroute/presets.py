"""Old home of the pre-training presets, now in :mod:`kvroute.shapes` with the other named shapes.

Re-exports the same objects: a preset added to ``PRESETS`` here is one of ``kvroute.shapes.PRESETS``.
"""

from kvroute.shapes import PRESETS, parameter_count, preset_config

__all__ = ["PRESETS", "parameter_count", "preset_config"]
