"""What a trial is doing before its first result (loading, starting its workers, opening its MLflow run, its
first epoch), told by the trial's processes to the driver's progress table.

The phase goes through Ray's key-value store in the GCS (no extra actor, no file, so it works from any node):
key = the trial's run key "<sweep>/<trial_id>", value = [phase, unix time it began]. Progress reporting
never fails a trial: errors here are ignored.
"""

from __future__ import annotations

import json
import time

from ray.experimental import internal_kv

NAMESPACE = "vmrnn-sweep"


def set_phase(key: str, phase: str) -> None:
    """Record that the trial `key` ("<sweep>/<trial_id>") entered `phase` now."""
    try:
        internal_kv._internal_kv_put(key, json.dumps([phase, time.time()]), overwrite=True, namespace=NAMESPACE)
    except Exception:
        pass


def clear_phase(key: str) -> None:
    try:
        internal_kv._internal_kv_del(key, namespace=NAMESPACE)
    except Exception:
        pass


def phases(sweep: str) -> dict[str, tuple[str, float]]:
    """{trial_id: (phase, since)} of the sweep's trials that recorded one."""
    out: dict[str, tuple[str, float]] = {}
    try:
        prefix = f"{sweep}/"
        for key in internal_kv._internal_kv_list(prefix, namespace=NAMESPACE):
            key = key.decode() if isinstance(key, bytes) else key
            raw = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
            if raw:
                phase, since = json.loads(raw)
                out[key[len(prefix) :]] = (str(phase), float(since))
    except Exception:
        return out
    return out
