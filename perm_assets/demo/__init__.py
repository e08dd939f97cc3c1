"""The demo pipeline that ``definitions.py`` wires (digits → subset, split → classifier)."""

from perm_assets.demo.assets import ASSETS, digits, digits_classifier, digits_inked, digits_splits

__all__ = ["ASSETS", "digits", "digits_classifier", "digits_inked", "digits_splits"]
