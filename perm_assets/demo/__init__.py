"""The demo pipeline that ``definitions.py`` wires: digits → subsets, splits and folds →
classifiers, plus a growing table with a hash split that follows it, and maintenance."""

from perm_assets.demo import assets, refresh
from perm_assets.demo.assets import digits, digits_classifier, digits_inked, digits_splits

ASSETS = [*assets.ASSETS, *refresh.ASSETS]
SCHEDULES = [refresh.refresh_schedule]
SENSORS = [refresh.automation_sensor]

__all__ = [
    "ASSETS",
    "SCHEDULES",
    "SENSORS",
    "digits",
    "digits_classifier",
    "digits_inked",
    "digits_splits",
]
