"""`perm_assets.tables.commit_fragments`: rows an engine wrote itself as Lance fragments (the
Ray engine's workers) become exactly one new table version, or none. Real tables in tmp_path;
the fragments are written with pylance's fragment writer, which lance-ray's wraps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lance
import lancedb
import numpy as np
import pyarrow as pa
import pytest
from lance.fragment import FragmentMetadata, write_fragments

from perm_assets import LanceDBResource
from perm_assets.pins import retain
from perm_assets.tables import FragmentWrite, WriteMode, commit_fragments, read_all, write_table

SCHEMA = pa.schema([pa.field("row_id", pa.uint64()), pa.field("split_id", pa.uint64())])
METADATA = {b"split_names": b'["train"]', b"base_version": b"3"}


def _rows(start: int, n: int) -> pa.Table:
    ids = np.arange(start, start + n, dtype=np.uint64)
    return pa.table({"row_id": ids, "split_id": np.zeros(n, dtype=np.uint64)}, schema=SCHEMA)


def _writer(
    parts: list[pa.Table], *, between: Callable[[], None] | None = None
) -> tuple[FragmentWrite, list[str]]:
    """A FragmentWrite of ``parts``, one fragment each, in order; ``between`` runs after the
    first part is written. Also the list of locations it was asked to write to."""
    asked: list[str] = []

    def write(uri: str) -> list[FragmentMetadata]:
        asked.append(uri)
        written: list[FragmentMetadata] = []
        for index, part in enumerate(parts):
            written += write_fragments(part, uri, schema=SCHEMA)
            if index == 0 and between is not None:
                between()
        return written

    return FragmentWrite(write), asked


def _versions(db: lancedb.DBConnection, name: str) -> list[int]:
    return sorted(v["version"] for v in db.open_table(name).list_versions())


def test_a_new_table_is_created_by_the_one_commit(tmp_path: Path) -> None:
    db = lancedb.connect(tmp_path / "db")
    parts = [_rows(100, 5), _rows(0, 7), _rows(50, 3)]
    fragments, asked = _writer(parts)
    table = commit_fragments(db, "perm", fragments, SCHEMA.with_metadata(METADATA))
    assert asked == [f"{tmp_path / 'db'}/perm.lance"]  # lancedb's own location for the name
    assert _versions(db, "perm") == [1] and table.version == 1
    rows = read_all(table)
    assert rows.column("row_id").to_pylist() == pa.concat_tables(parts)["row_id"].to_pylist()
    assert rows.schema.metadata == METADATA
    assert len(lance.dataset(f"{tmp_path / 'db'}/perm.lance").get_fragments()) == 3
    # Checked out at the committed version: a later write by another handle is not what the
    # caller records, pins and counts.
    write_table(lancedb.connect(tmp_path / "db"), "perm", _rows(0, 2), WriteMode.OVERWRITE)
    assert table.version == 1 and table.count_rows() == 15


def test_an_existing_table_gets_exactly_one_new_version(tmp_path: Path) -> None:
    db = lancedb.connect(tmp_path / "db")
    write_table(db, "perm", _rows(0, 4), WriteMode.OVERWRITE)
    write_table(db, "perm", _rows(10, 4), WriteMode.OVERWRITE)
    fragments, _ = _writer([_rows(20, 6), _rows(30, 2)])
    table = commit_fragments(db, "perm", fragments, SCHEMA.with_metadata(METADATA))
    assert _versions(db, "perm") == [1, 2, 3] and table.version == 3
    assert read_all(table).column("row_id").to_pylist() == [*range(20, 26), 30, 31]
    assert read_all(table).schema.metadata == METADATA
    before = db.open_table("perm")
    before.checkout(2)  # the replaced version stays readable
    assert read_all(before).column("row_id").to_pylist() == [10, 11, 12, 13]


def test_a_write_that_fails_part_way_commits_nothing(tmp_path: Path) -> None:
    db = lancedb.connect(tmp_path / "db")

    def fail() -> None:
        raise RuntimeError("a worker's task failed")

    # No table yet: a failed first write leaves none. Its data files are referenced by no
    # version (lancedb's table_names lists their folder, but the table does not open), and
    # the next write creates the table there.
    fragments, _ = _writer([_rows(0, 3), _rows(3, 3)], between=fail)
    with pytest.raises(RuntimeError, match="a worker's task failed"):
        commit_fragments(db, "perm", fragments, SCHEMA.with_metadata(METADATA))
    with pytest.raises(ValueError, match="was not found"):
        db.open_table("perm")
    # retain() goes over every listed table: the folder without a version is skipped.
    write_table(db, "other", _rows(0, 2), WriteMode.OVERWRITE)
    report = retain(LanceDBResource(uri=str(tmp_path / "db")), keep=1)
    assert "perm" not in report.versions_removed
    # An existing table: the previous version stays the latest and reads its rows.
    write_table(db, "perm", _rows(0, 4), WriteMode.OVERWRITE)
    with pytest.raises(RuntimeError, match="a worker's task failed"):
        commit_fragments(db, "perm", fragments, SCHEMA.with_metadata(METADATA))
    assert _versions(db, "perm") == [1]
    assert read_all(db.open_table("perm")).column("row_id").to_pylist() == [0, 1, 2, 3]


def test_another_writer_committing_meanwhile_costs_no_rows(tmp_path: Path) -> None:
    # Another process overwrites the table while the fragments are being written: this commit
    # still lands, as the one version after the other writer's, with exactly its own rows.
    db = lancedb.connect(tmp_path / "db")
    write_table(db, "perm", _rows(0, 4), WriteMode.OVERWRITE)

    def other_writer() -> None:
        write_table(lancedb.connect(tmp_path / "db"), "perm", _rows(90, 2), WriteMode.OVERWRITE)

    fragments, asked = _writer([_rows(20, 3), _rows(30, 3)], between=other_writer)
    table = commit_fragments(db, "perm", fragments, SCHEMA.with_metadata(METADATA))
    assert len(asked) == 1  # the fragments were written once, whatever the commit needed
    assert _versions(db, "perm") == [1, 2, 3] and table.version == 3
    assert read_all(table).column("row_id").to_pylist() == [20, 21, 22, 30, 31, 32]
    theirs = db.open_table("perm")
    theirs.checkout(2)
    assert read_all(theirs).column("row_id").to_pylist() == [90, 91]
