"""calq's lm-eval tasks: one `calq_<name>.yaml` per task, reading the offline data folder.

calq names a task `<name>`; lm-eval knows it as `calq_<name>` (the prefix keeps it apart from lm-eval's own
tasks of the same name when both are on the search path). The data folder is a setting, not part of the
YAML: lm-eval hands task metadata to `custom_dataset`, so `data_dir` comes from
`TaskManager(metadata={"data_dir": ...})` (calq), `--metadata '{"data_dir": "..."}'` (lm-eval's CLI),
or $CALQ_DATA_DIR.

Adding a task is one YAML here (its first metric is the task's headline accuracy); a new file format
needs one loader in `sources.py`.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).parent
PREFIX = "calq_"


def available() -> dict[str, Path]:
    """calq task name -> its YAML file."""
    return {p.stem.removeprefix(PREFIX): p for p in sorted(TASKS_DIR.glob(f"{PREFIX}*.yaml"))}
