"""circuitlab.patching.methods: the discovery methods, one file each, and their one registry (`registry`).

Every module in this folder is imported here, and each registers its `Method`; adding a method is adding a file.
"""

import importlib
import pkgutil

from circuitlab.patching.methods.registry import (METHODS, SEARCHES, CircuitSearch, Method, MethodOptions,
                                                  MethodScores, alias_names, get_method, get_search,
                                                  leaderboard_names, leaderboard_searches, method_names, register,
                                                  run_method_names, search_names)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")  # each method file registers itself

__all__ = ["METHODS", "SEARCHES", "CircuitSearch", "Method", "MethodOptions", "MethodScores", "alias_names",
           "get_method", "get_search", "leaderboard_names", "leaderboard_searches", "method_names", "register",
           "run_method_names", "search_names"]
