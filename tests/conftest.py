import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

if not torch.cuda.is_available():
    # Kernel tests run through Triton's interpreter on the CPU; it must be on before anything imports triton
    # (llm-compressor and compressed-tensors do, through their own modules).
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_tiny_llama, train_tiny_llama  # noqa: E402

# Tiny models run faster on one thread than on two busy cores (the slow real-model test asks for more).
torch.set_num_threads(1)



@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def texts(tmp_path_factory) -> dict[str, Path]:
    """Two disjoint text files, for calibration and for held-out evaluation."""
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("texts")
    names = sorted(topics)
    calib, held = folder / "calib.txt", folder / "heldout.txt"
    calib.write_text("\n".join(topics[n] for n in names[:40]))
    held.write_text("\n".join(topics[n] for n in names[40:60]))
    return {"calib": calib, "heldout": held}


@pytest.fixture(scope="session")
def working_model(tmp_path_factory, texts) -> Path:
    """The tiny model after 100 training steps on the calibration text: a working LM that passes the baseline check
    (a random one is refused: tests/test_baseline.py)."""
    return train_tiny_llama(make_tiny_llama(tmp_path_factory.mktemp("working-llama")), texts["calib"].read_text())


@pytest.fixture
def tiny_recipe(working_model, texts, tmp_path):
    """A small recipe dict on the trained tiny model; write it with `write_recipe`."""
    return {
        "name": "tiny",
        "model": {"id": str(working_model)},
        "calibration": {"data": {"source": str(texts["calib"])}, "num_samples": 8, "seq_len": 32,
                        "allow_any_size": True},
        "variants": [{"method": "minmax", "scheme": "w8a8"}, {"method": "minmax", "scheme": "w4a16", "group_size": 32}],
        "evaluation": {"tokens": {"data": {"source": str(texts["heldout"])}, "max_tokens": 2048, "seq_len": 64,
                                  "batch_size": 4}},
    }


@pytest.fixture
def write_recipe(tmp_path):
    def write(recipe: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


def data_dir() -> Path | None:
    value = os.environ.get("CALQ_DATA_DIR")
    return Path(value) if value and Path(value).is_dir() else None


@pytest.fixture
def alpaca(tmp_path):
    """60 Alpaca-style instruction records (pydoc topics as answers), for calibrators."""
    from pydoc_data.topics import topics

    texts = sorted(set(topics.values()))
    records = [{"instruction": f"Explain topic {i}.", "input": "", "output": texts[i][:300]} for i in range(60)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    return path
