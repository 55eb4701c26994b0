"""The run folder's state without torch: a finished job says so before the heavy imports."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def committed_updates(directory: Path) -> list[tuple[int, Path]]:
    """``(update, folder)`` of the committed model checkpoints under ``directory``, oldest first.

    Committed: DCP's ``.metadata`` (written last) and ``trainer_state.json`` both exist.
    """
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob("update_*"):
        if (path / ".metadata").is_file() and (path / "trainer_state.json").is_file():
            found.append((int(path.name.split("_")[1]), path))
    return sorted(found)


def finished_message(run_dir: Path, updates: int) -> str | None:
    """What to tell a user who reruns a finished job (None if it is not finished).

    Finished: a committed checkpoint at ``updates`` or later and the report written.
    """
    committed = committed_updates(run_dir / "checkpoints")
    newest = committed[-1][0] if committed else None
    if newest is None or newest < updates or not (run_dir / "summary.md").is_file():
        return None
    results = ", ".join(str(run_dir / name) for name in ("summary.md", "val_loss.png") if (run_dir / name).is_file())
    return (f"{run_dir} is finished ({newest}/{updates} updates): results in {results}, EMA checkpoints in "
            f"{run_dir / 'ema'}. To train again: delete {run_dir}, give --run-dir for a new run, or a larger "
            "--updates to continue this one")


def exit_if_finished(argv: list[str]) -> None:
    """Exit (status 0, rank 0 prints why) when the run that ``argv`` asks for is finished.

    A fast path read from the YAML and the flags alone; anything unclear (no ``run_dir`` or
    ``train.updates`` in the file, an unreadable file) is left to the full check of the trainer.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--run-dir")
    parser.add_argument("--updates", type=int)
    try:
        import yaml

        args, _ = parser.parse_known_args(argv)
        data = yaml.safe_load(Path(args.config).read_text()) or {}
        run_dir = args.run_dir or data.get("run_dir")
        updates = args.updates or (data.get("train") or {}).get("updates")
    except Exception:  # the trainer reports bad flags and files properly
        return
    if run_dir is None or not isinstance(updates, int):
        return
    message = finished_message(Path(run_dir), updates)
    if message is not None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(message, flush=True)
        sys.exit(0)
