"""Exact mid-epoch resume: a training process killed with SIGKILL and restarted from its last
checkpoint delivers exactly the rows of an uninterrupted run, across an epoch boundary, per rank.

The training loop is a real child process (tests/resume_child.py) over a real table built once
for the module (tests/exit_table.py); its loader state goes through `BatchLoader.state_dict`.
State loaded onto another view, shard or batch size is refused, naming what differs.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest

from perm_assets import LanceDBResource, ViewRequest, open_view
from perm_assets.errors import LineageError, SpecError
from perm_assets.lineage import reproduce_input
from perm_assets.training import BatchLoader, ShardOrder, shard
from tests.exit_table import SPLITS, build
from tests.processes import REPO, child_env

ROWS = 20_000  # train split 16,000: 125 batches of 64 per rank and epoch
EPOCHS = 2
EVERY = 5
CHILD = REPO / "tests" / "resume_child.py"


@pytest.fixture(scope="module")
def table_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("resume") / "lancedb")
    build(uri, ROWS)
    return uri


def train_view(uri: str, columns: tuple[str, ...] = ("id",)) -> Any:
    request = ViewRequest(split="train", columns=list(columns), format="arrow")
    return open_view(
        LanceDBResource(uri=uri), asset=SPLITS, table=SPLITS, version=None, request=request
    )


def start(
    uri: str, out: Path, rank: int, kind: str, delay: float, **env: str
) -> subprocess.Popen[bytes]:
    args = [uri, SPLITS, str(out), str(out.with_suffix(".ckpt"))]
    args += [str(rank), "2", str(EPOCHS), str(EVERY), kind]
    return subprocess.Popen(
        [sys.executable, str(CHILD), *args],
        env=child_env(RESUME_CHILD_DELAY=str(delay), **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(process: subprocess.Popen[bytes]) -> None:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr.decode(errors="replace")[-3000:]
    assert b"finished" in stdout


def checkpoint(out: Path) -> dict[str, Any] | None:
    path = out.with_suffix(".ckpt")
    return pickle.loads(path.read_bytes()) if path.exists() else None


def kill_when(process: subprocess.Popen[bytes], out: Path, epoch: int, batches: int) -> None:
    """SIGKILL the child once its checkpoint is ``batches`` batches into ``epoch``."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        state = checkpoint(out)
        if state is not None:
            where = state.get("epoch", state["loader"].get("epoch"))
            rows = state["out_bytes"] // 8
            if where == epoch and rows >= (epoch * 8_000 + batches * 64):
                os.kill(process.pid, signal.SIGKILL)
                process.communicate(timeout=30)  # reaps it and closes the pipes
                assert process.returncode == -signal.SIGKILL
                return
        assert process.poll() is None, process.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint {batches} batches into epoch {epoch} in 240 s")


def expected_ids(uri: str, rank: int) -> np.ndarray:
    """What rank ``rank`` must deliver over the epochs: its shard's rows, epoch by epoch."""
    view = train_view(uri)
    part = shard(view, rank=rank, world_size=2, seed=11)
    ids = []
    for epoch in range(EPOCHS):
        for batch in BatchLoader(part.with_epoch(epoch), 64):
            ids.append(batch.column("id").to_numpy())
    return np.concatenate(ids)


def killed_and_resumed(uri: str, out: Path, rank: int, kind: str, **env: str) -> np.ndarray:
    """Rank ``rank``'s ids from a run killed mid-epoch 0 and mid-epoch 1, resumed each time."""
    process = start(uri, out, rank, kind, delay=0.02, **env)
    kill_when(process, out, epoch=0, batches=40)
    process = start(uri, out, rank, kind, delay=0.02, **env)
    kill_when(process, out, epoch=1, batches=70)
    finish(start(uri, out, rank, kind, delay=0.0, **env))
    return np.fromfile(out, dtype=np.int64)


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_killed_run_resumes_exactly_where_it_stopped(
    table_uri: str, tmp_path: Path, rank: int
) -> None:
    whole = expected_ids(table_uri, rank)  # an uninterrupted run, in this process
    assert whole.size == EPOCHS * 8_000
    if rank == 0:  # and as a child process (the same script, never killed)
        uninterrupted = tmp_path / "whole.bin"
        finish(start(table_uri, uninterrupted, rank, "loader", delay=0.0))
        assert np.array_equal(np.fromfile(uninterrupted, dtype=np.int64), whole)

    resumed = killed_and_resumed(table_uri, tmp_path / "resumed.bin", rank, "loader")
    assert np.array_equal(resumed, whole)


@pytest.mark.slow
def test_stateful_dataloader_over_a_shard_resumes_exactly(table_uri: str, tmp_path: Path) -> None:
    pytest.importorskip(
        "torchdata.stateful_dataloader",
        reason="torchdata is not a dependency yet (torchdata 0.11.0 installs with torch 2.13)",
    )
    resumed = killed_and_resumed(table_uri, tmp_path / "resumed.bin", 1, "stateful")
    assert np.array_equal(resumed, expected_ids(table_uri, 1))


@pytest.mark.slow
def test_reproduce_input_reopens_the_view_a_killed_and_resumed_training_run_read(
    table_uri: str, tmp_path: Path
) -> None:
    """A training asset killed with SIGKILL mid-epoch 1 and resumed from its checkpoint (two
    Dagster runs in a real instance): each run recorded the view it read, the loader state
    names the same tables and pinned versions, and `reproduce_input` of either run reopens a
    view whose shard gives exactly the rows of an uninterrupted run."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    out = tmp_path / "resumed.bin"
    process = start(table_uri, out, 1, "dagster", delay=0.01, DAGSTER_HOME=str(home))
    kill_when(process, out, epoch=1, batches=30)
    finish(start(table_uri, out, 1, "dagster", delay=0.0, DAGSTER_HOME=str(home)))
    whole = expected_ids(table_uri, 1)
    assert np.array_equal(np.fromfile(out, dtype=np.int64), whole)

    db = LanceDBResource(uri=table_uri)
    saved = checkpoint(out)
    assert saved is not None
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_run_records(order_by="create_timestamp", ascending=True)
        assert [r.dagster_run.status for r in runs][-1] == dg.DagsterRunStatus.SUCCESS
        assert len(runs) == 2  # killed in epoch 1, resumed to the end
        for record in runs:
            view = reproduce_input(
                db, instance, run_id=record.dagster_run.run_id, input_name="train_rows"
            )
            # The loader state of the resumed run names this view: it loads without complaint.
            loader = BatchLoader(shard(view, rank=1, world_size=2, seed=11), 64)
            loader.load_state_dict(saved["loader"])
            state_view = saved["loader"]["view"]
            lineage = view.lineage
            assert (state_view["table"], state_view["table_version"]) == (
                lineage.table,
                lineage.table_version,
            )
            assert (state_view["base_table"], state_view["base_version"], state_view["pin"]) == (
                lineage.base_table,
                lineage.base_version,
                lineage.pin,
            )
            part = shard(view, rank=1, world_size=2, seed=11)
            again = [
                b.column("id").to_numpy()
                for epoch in range(EPOCHS)
                for b in BatchLoader(part.with_epoch(epoch), 64)
            ]
            assert np.array_equal(np.concatenate(again), whole)


@pytest.mark.parametrize("order", ["bijection", "distributed_sampler"])
def test_state_is_small_json_and_names_the_lineage(table_uri: str, order: ShardOrder) -> None:
    view = train_view(table_uri)
    loader = BatchLoader(shard(view, rank=1, world_size=2, seed=11, epoch=3, order=order), 64)
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    state = loader.state_dict()
    text = json.dumps(state)
    assert len(text) < 2048
    assert state["position"] == 192 and state["epoch"] == 3
    lineage = view.lineage
    assert state["view"]["table"] == lineage.table == SPLITS
    assert state["view"]["table_version"] == lineage.table_version
    assert state["view"]["base_version"] == lineage.base_version
    assert state["view"]["split"] == "train" and state["view"]["pin"] == lineage.pin
    assert state["shard"] == {
        "rank": 1,
        "world_size": 2,
        "seed": 11,
        "shuffle": True,
        "remainder": "drop",
        "order": order,
    }

    again_shard = shard(train_view(table_uri), rank=1, world_size=2, seed=11, order=order)
    again = BatchLoader(again_shard, 64)
    again.load_state_dict(json.loads(text))
    rest = [b.column("id").to_numpy() for b in again]
    expected = [b.column("id").to_numpy() for b in batches]
    assert np.array_equal(np.concatenate(rest), np.concatenate(expected))
    # Both ranks of the epoch: disjoint, and together the split less its odd row.
    ranks = [
        BatchLoader(shard(view, rank=r, world_size=2, seed=11, epoch=3, order=order), 64)
        for r in range(2)
    ]
    ids = np.concatenate([b.column("id").to_numpy() for loader in ranks for b in loader])
    assert np.unique(ids).size == ids.size == (len(view) // 2) * 2


def test_a_state_saved_before_shard_orders_reads_distributed_samplers_order(
    table_uri: str,
) -> None:
    """Shard states saved before `ShardOrder` existed name no order: they were saved over
    DistributedSampler's order, and resume only onto it."""
    view = train_view(table_uri)
    old = BatchLoader(shard(view, rank=0, world_size=2, seed=11, order="distributed_sampler"), 64)
    state = old.state_dict()
    del state["shard"]["order"]
    with pytest.raises(SpecError, match=r"saved with shard=.*'order': 'distributed_sampler'"):
        BatchLoader(shard(view, rank=0, world_size=2, seed=11), 64).load_state_dict(state)
    old.load_state_dict(state)


def test_state_of_another_view_or_layout_is_refused(table_uri: str) -> None:
    view = train_view(table_uri)
    state = BatchLoader(shard(view, rank=0, world_size=2, seed=11), 64).state_dict()
    test_view = open_view(
        LanceDBResource(uri=table_uri),
        asset=SPLITS,
        table=SPLITS,
        version=None,
        request=ViewRequest(split="test", columns=["id"], format="arrow"),
    )
    with pytest.raises(LineageError, match="split: saved 'train', this view 'test'"):
        BatchLoader(shard(test_view, rank=0, world_size=2, seed=11), 64).load_state_dict(state)
    with pytest.raises(LineageError, match=r"columns: saved \['id'\], this view \['id', 'x'\]"):
        wide = train_view(table_uri, ("id", "x"))
        BatchLoader(shard(wide, rank=0, world_size=2, seed=11), 64).load_state_dict(state)
    with pytest.raises(LineageError, match="offset: saved None, this view 64"):
        BatchLoader(shard(view.with_skip(64), rank=0, world_size=2, seed=11), 64).load_state_dict(
            state
        )
    with pytest.raises(SpecError, match=r"shard=.*'rank': 0.*this loader has shard=.*'rank': 1"):
        BatchLoader(shard(view, rank=1, world_size=2, seed=11), 64).load_state_dict(state)
    with pytest.raises(SpecError, match="batch_size=64, this loader has batch_size=32"):
        BatchLoader(shard(view, rank=0, world_size=2, seed=11), 32).load_state_dict(state)
    with pytest.raises(SpecError, match=r"shard=.*this loader has shard=None"):
        BatchLoader(view, 64).load_state_dict(state)
    with pytest.raises(SpecError, match="not a BatchLoader state"):
        BatchLoader(view, 64).load_state_dict({"epoch": 0})
    shard_state = shard(view, rank=0, world_size=2, seed=11, epoch=2).state_dict()
    with pytest.raises(LineageError, match="split: saved 'train', this view 'test'"):
        shard(test_view, rank=0, world_size=2, seed=11).load_state_dict(shard_state)
    resumed = shard(view, rank=0, world_size=2, seed=11)
    resumed.load_state_dict(shard_state)
    assert resumed.epoch == 2


def test_a_view_loader_resumes_mid_pass_without_a_shard(table_uri: str) -> None:
    view = train_view(table_uri).with_skip(5)
    loader = BatchLoader(view, 100, drop_last=True)
    batches = iter(loader)
    head = [next(batches).column("id").to_numpy() for _ in range(7)]
    state = loader.state_dict()
    assert state["position"] == 700 and state["shard"] is None
    tail = [b.column("id").to_numpy() for b in batches]
    again = BatchLoader(train_view(table_uri).with_skip(5), 100, drop_last=True)
    again.load_state_dict(state)
    assert np.array_equal(
        np.concatenate([b.column("id").to_numpy() for b in again]), np.concatenate(tail)
    )
    assert sum(len(h) for h in head) + sum(len(t) for t in tail) == (len(view) // 100) * 100
