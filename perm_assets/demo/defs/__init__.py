"""The demo's assets declared in YAML (dg components): one folder per asset, each with a
``defs.yaml``. `dg scaffold defs perm_assets.PermutationComponent <name>` adds one here."""
