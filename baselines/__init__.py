"""Baselines, one self-registering file each; installed as `mowbench.baselines`.

Importing this package imports every module in it, so a new file `baselines/my_method.py` that calls
`@register_agent("my_method", MyConfig)` is picked up by `agent=my_method` with no other edits.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
