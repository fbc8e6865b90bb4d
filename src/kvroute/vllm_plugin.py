"""Old name of :mod:`kvroute.vllm`, kept for the code and installed entry points that still use it.

An environment installed before the move names ``kvroute.vllm_plugin:register`` in its
``vllm.general_plugins`` entry point until kvroute is reinstalled.
"""

from kvroute.vllm import *  # noqa: F403
from kvroute.vllm import __all__  # noqa: F401
