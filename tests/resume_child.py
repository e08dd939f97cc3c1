"""Child process of tests/test_resume.py: a training loop that checkpoints its loader and can
be killed at any moment and restarted.

``python tests/resume_child.py DB_URI ASSET OUT CKPT RANK WORLD EPOCHS EVERY KIND``

Reads rank ``RANK`` of ``WORLD``'s shard of split 'train' for ``EPOCHS`` epochs in batches of
64 and appends every delivered ``id`` (int64) to ``OUT``. Every ``EVERY`` batches it writes
``CKPT`` atomically: the loader's state and the length of ``OUT`` at that moment. On start it
loads ``CKPT`` if there is one, cuts ``OUT`` back to the recorded length and continues.
``KIND`` is ``loader`` (`BatchLoader` over the shard), ``stateful`` (torchdata's
``StatefulDataLoader`` over the shard as a map-style dataset, 2 forked worker processes) or
``dagster`` (the ``loader`` loop inside a training asset, ``trained``, materialized in the
instance of ``$DAGSTER_HOME``: its ``train`` input is the view the IO manager hands out, and the
run records that view's lineage for `reproduce_input`).
``RESUME_CHILD_DELAY`` seconds of sleep per batch give the test time to kill it mid-epoch.
"""

# ruff: noqa: T201 -- the output is the report

from __future__ import annotations

import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np

from perm_assets import LanceDBIOManager, LanceDBResource, ViewRequest, open_view
from perm_assets.training import BatchLoader, shard

BATCH = 64


def save(ckpt: Path, state: dict[str, Any]) -> None:
    part = ckpt.with_suffix(".part")
    part.write_bytes(pickle.dumps(state))
    os.replace(part, ckpt)  # atomic: a kill leaves the old checkpoint or the new one


def main(uri: str, asset: str, out: str, ckpt_path: str, *numbers: str) -> None:
    rank, world, epochs, every = (int(n) for n in numbers[:4])
    kind = numbers[4]
    delay = float(os.environ.get("RESUME_CHILD_DELAY", "0"))
    db = LanceDBResource(uri=uri, read_consistency_seconds=None)
    ckpt = Path(ckpt_path)

    def train(view: Any) -> None:
        part = shard(view, rank=rank, world_size=world, seed=11)
        state = pickle.loads(ckpt.read_bytes()) if ckpt.exists() else None
        with open(out, "ab") as sink:
            if state is not None:
                sink.truncate(state["out_bytes"])  # rows delivered after the checkpoint: again
            if kind == "stateful":
                run_stateful(part, state, sink, ckpt, epochs, every, delay)
            else:
                run_loader(part, state, sink, ckpt, epochs, every, delay)

    if kind == "dagster":
        run_asset(db, asset, train)
    else:
        request = ViewRequest(split="train", columns=["id"], format="arrow")
        train(open_view(db, asset=asset, table=asset, version=None, request=request))
    print("finished", flush=True)


def run_asset(db: LanceDBResource, asset: str, train: Any) -> None:
    """``train`` as the body of a training asset materialized in ``$DAGSTER_HOME``'s instance."""
    metadata = {"split": "train", "columns": ["id"], "format": "arrow"}

    @dg.asset(ins={"train_rows": dg.AssetIn(key=asset, metadata=metadata)})
    def trained(train_rows: Any) -> dg.MaterializeResult:
        train(train_rows)
        return dg.MaterializeResult()

    with dg.DagsterInstance.get() as instance:
        dg.materialize(
            [dg.AssetSpec(asset), trained],
            selection=[trained],
            resources={"lancedb": db, "io_manager": LanceDBIOManager(db=db)},
            instance=instance,
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )


def run_loader(
    part: Any, state: Any, sink: Any, ckpt: Path, epochs: int, every: int, delay: float
) -> None:
    loader = BatchLoader(part, BATCH, io_bytes=BATCH * 8 * 3)
    if state is not None:
        loader.load_state_dict(state["loader"])
    done = 0
    while loader.epoch < epochs:
        for batch in loader:
            sink.write(batch.column("id").to_numpy().astype(np.int64).tobytes())
            done += 1
            if done % every == 0:
                sink.flush()
                save(ckpt, {"loader": loader.state_dict(), "out_bytes": sink.tell()})
            time.sleep(delay)
        loader.set_epoch(loader.epoch + 1)


def run_stateful(
    part: Any, state: Any, sink: Any, ckpt: Path, epochs: int, every: int, delay: float
) -> None:
    from torch.utils.data import default_convert
    from torchdata.stateful_dataloader import StatefulDataLoader  # type: ignore[import-not-found]  # optional: torchdata

    epoch = 0 if state is None else state["epoch"]
    done = 0
    while epoch < epochs:
        part.set_epoch(epoch)
        loader = StatefulDataLoader(
            part,
            batch_size=BATCH,
            num_workers=2,
            collate_fn=default_convert,
            multiprocessing_context="fork",
        )
        if state is not None and state["epoch"] == epoch:
            loader.load_state_dict(state["loader"])
        for batch in loader:
            sink.write(batch.column("id").to_numpy().astype(np.int64).tobytes())
            done += 1
            if done % every == 0:
                sink.flush()
                save(
                    ckpt, {"loader": loader.state_dict(), "epoch": epoch, "out_bytes": sink.tell()}
                )
            time.sleep(delay)
        epoch += 1


if __name__ == "__main__":
    main(*sys.argv[1:])
