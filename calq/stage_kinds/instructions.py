"""The calibrators' instruction records, split once into fit and held-out sets."""

from __future__ import annotations

import random
from pathlib import Path

from calq import data as data_mod
from calq.errors import CalqError
from calq.pipeline import Context
from calq.runs import write_json
from calq.stages import KINDS, StageKind


@KINDS.register
class Instructions(StageKind):
    kind, pattern, group, words, order = "instructions", "instructions", "calibrate", "instruction split", 60
    outputs = {"records": "instructions.json"}

    @classmethod
    def check(cls, recipe, data_root, variants, config) -> None:
        if recipe.calibrators is not None:  # too few records is an error now, not after quantization
            instruction_records(recipe.calibrators, data_root)

    @classmethod
    def add_stages(cls, table) -> None:
        spec = table.recipe.calibrators
        if spec is None:
            return
        table.add("instructions", stage_instructions,
                  settings=[spec.model_dump(include={"fit_records", "heldout_records", "seed"}),
                            data_mod.fingerprint(spec.data, table.data_root), *table.raised(cls)])


def instruction_records(spec, data_root: Path | None) -> tuple[str, list[dict], str | None]:
    """(source read, the Alpaca-style records, note on a fallback); fewer than fit + held-out records is an error."""
    name, records, note = data_mod.load_records(spec.data, "calibrators.data", data_root)
    records = [r for r in records if isinstance(r, dict) and r.get("instruction") and r.get("output")]
    need = spec.fit_records + spec.heldout_records
    if len(records) < need:
        raise CalqError(f"{name} has {len(records)} instruction records (with 'instruction' and 'output'), fewer than "
                        f"fit_records + heldout_records = {need}", "calibrators.data",
                        "give more Alpaca-style records, or lower fit_records / heldout_records")
    return name, records, note


def stage_instructions(ctx: Context):
    """Instruction records split once, with the recipe's seed, into fit and held-out sets shared by every variant."""
    spec = ctx.recipe.calibrators
    name, records, note = instruction_records(spec, ctx.data_root)
    if note:
        ctx.log(f"[yellow]note:[/] {note}")
    need = spec.fit_records + spec.heldout_records
    chosen = random.Random(spec.seed).sample(range(len(records)), need)
    parts = {"source": name, "note": note, "fit": [records[i] for i in chosen[:spec.fit_records]],
             "heldout": [records[i] for i in chosen[spec.fit_records:]]}
    out = write_json(ctx.output("instructions", "records"), parts)
    return {"records": out}, {"source": name, "note": note, "fit_records": spec.fit_records,
                              "heldout_records": spec.heldout_records, "seed": spec.seed}
