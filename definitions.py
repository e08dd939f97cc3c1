"""The perm_assets code location: wires the demo pipeline to an embedded LanceDB.

The database lives in ``data/lancedb`` beside this file whatever the working directory, so
``make run`` and ``make ui`` see the same tables.
"""

from pathlib import Path

import dagster as dg

from perm_assets import LanceDBIOManager, LanceDBResource, check_definitions
from perm_assets.demo import ASSETS, SCHEDULES, SENSORS

_lancedb = LanceDBResource(uri=str(Path(__file__).resolve().parent / "data" / "lancedb"))

# check_definitions: wiring mistakes (IO manager, split names, input metadata) fail on load.
defs = check_definitions(
    dg.Definitions(
        assets=ASSETS,
        schedules=SCHEDULES,
        sensors=SENSORS,
        resources={"lancedb": _lancedb, "io_manager": LanceDBIOManager(db=_lancedb)},
    )
)
