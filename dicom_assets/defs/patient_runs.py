"""Per-patient pipeline runs: chunks of patients per run, and which patients a live run holds.

A run covers a partition *range* (start and end keys, in the order Dagster keeps the dynamic
partitions: the order they were added), never one run per patient: a cohort of 20,000 patients
is 100 runs, not 20,000. Sensors skip patients that a queued or running run already covers, so
a change is not asked for a second time while the first run for it waits for a slot.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import dagster as dg

PATIENTS_PER_RUN = 200
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
PARTITION_TAG = "dagster/partition"

#: Runs that hold their patients: waiting for a slot, starting, running or being stopped.
LIVE_RUN_STATUSES = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def range_tags(start: str, end: str) -> dict[str, str]:
    return {RANGE_START_TAG: start, RANGE_END_TAG: end}


def patient_range_requests(keys: list[str], chunk: int = PATIENTS_PER_RUN) -> list[dg.RunRequest]:
    """Run requests covering ``keys`` (in partition order) in ranges of at most ``chunk``."""
    return [dg.RunRequest(tags=range_tags(keys[i], keys[min(i + chunk, len(keys)) - 1])) for i in range(0, len(keys), chunk)]


def ranges_covering(order: Sequence[str], wanted: Iterable[str], span: int = PATIENTS_PER_RUN) -> list[tuple[str, str]]:
    """Partition ranges (start, end) of at most ``span`` partitions each, in ``order``, that
    together cover every key of ``wanted``: as few runs as the spread of ``wanted`` allows.

    The patients between two wanted ones ride along; their pipeline finds nothing to do (no
    outdated marks, nothing pending) and costs a few reads of the state DB, no PACS request.
    """
    position = {key: i for i, key in enumerate(order)}
    indexes = sorted(position[k] for k in set(wanted) if k in position)
    ranges: list[tuple[str, str]] = []
    first = last = None
    for i in indexes:
        if first is not None and i - first < span:
            last = i
            continue
        if first is not None:
            ranges.append((order[first], order[last]))  # type: ignore[index]
        first = last = i
    if first is not None:
        ranges.append((order[first], order[last]))  # type: ignore[index]
    return ranges


def partitions_in_live_runs(instance: dg.DagsterInstance, order: Sequence[str]) -> set[str]:
    """The patient partitions that a queued or running run covers (by its partition or range tags)."""
    position = {key: i for i, key in enumerate(order)}
    held: set[str] = set()
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=LIVE_RUN_STATUSES)):
        tags = run.tags
        if PARTITION_TAG in tags:
            held.add(tags[PARTITION_TAG])
        start, end = position.get(tags.get(RANGE_START_TAG, "")), position.get(tags.get(RANGE_END_TAG, ""))
        if start is not None and end is not None:
            held.update(order[start : end + 1])
    return held
