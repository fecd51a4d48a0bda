"""A resumed run's TensorBoard event files, cut back to its checkpoint as metrics.jsonl is.

A run killed between checkpoints has logged steps the resumed run logs again. TensorBoard's own `purge_step` only
hides them in the TensorBoard app (which warns "Detected out of order event.step"); programs that read the event
files (tbparse, pandas, the `tensorboard` data API) saw each of those steps twice."""

from __future__ import annotations

import io
import logging
from pathlib import Path

log = logging.getLogger(__name__)

END_OF_SESSION_TAG = "train_runtime"
"""The Trainer's end-of-training record (`train/train_runtime`): it describes a session, not the run, and the
resumed session writes its own (metrics.jsonl drops it too: checkpoints.truncate_metrics)."""

EVAL_TAG_PREFIX = "eval/"
"""An evaluation's scalars (transformers' TensorBoard callback writes `eval_loss` as `eval/loss`)."""


def trim_event_files(log_dir: Path, step: int, *, evaluated_at_step: bool = True) -> int:
    """Drop the events of every event file in `log_dir` logged after `step`, and an interrupted session's end of
    training record with what followed it; returns how many events were dropped. `evaluated_at_step` False: the
    evaluation events at `step` itself came after the checkpoint and go too (checkpoints.evaluated_before_save). A
    file that cannot be read whole is left as it is (TensorBoard's purge step still hides its later steps)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    from peftkit.utils.atomic import atomic_write_bytes

    dropped = 0
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        try:
            records = list(RawEventFileLoader(str(path)).Load())
        except Exception as exc:  # noqa: BLE001 - a damaged file is kept, not a reason to refuse the resume
            log.debug("TensorBoard file %s not trimmed: %s", path, exc)
            continue
        kept: list[bytes] = []
        for record in records:
            event = event_pb2.Event.FromString(record)
            if any(value.tag.endswith(END_OF_SESSION_TAG) for value in event.summary.value):
                break
            after_save = event.step == step and not evaluated_at_step and any(
                value.tag.startswith(EVAL_TAG_PREFIX) for value in event.summary.value)
            if (event.step <= step and not after_save) or event.HasField("file_version"):
                kept.append(record)
        if len(kept) == len(records):
            continue
        dropped += len(records) - len(kept)
        buffer = io.BytesIO()
        writer = RecordWriter(buffer)
        for record in kept:
            writer.write(record)
        atomic_write_bytes(path, buffer.getvalue())
    return dropped
