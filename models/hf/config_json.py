"""Reading a Hugging Face config.json without transformers, robust to how transformers spells infinity.

Mamba-2's `time_step_limit` defaults to (0.0, inf). transformers 5.x writes non-finite floats as tagged
objects, `{"__float__": "Infinity"}`, which plain readers return as dicts; transformers 4.x wrote the bare
token `Infinity`, which strict JSON readers reject (Python's json accepts it). Both come back as floats.
"""

import json
import math
from pathlib import Path
from typing import Any

_TAGGED = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _untag(obj: dict) -> Any:
    if obj.keys() == {"__float__"} and obj["__float__"] in _TAGGED:
        return _TAGGED[obj["__float__"]]
    return obj


def load_hf_config(path: str | Path) -> dict:
    """The config.json of a Hugging Face folder (or the file itself) as a dict, non-finite floats decoded."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    return json.loads(path.read_text(), object_hook=_untag)  # json reads bare Infinity / NaN itself
